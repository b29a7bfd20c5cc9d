"""Users' tiles: RoboSat slippy maps, SageMaker channels, Label Maker; label maps, bad input, georeferencing."""

import json
import logging
import math
import os
import pickle

import mercantile
import numpy as np
import pytest
import rasterio
import rasterio.warp
from affine import Affine
from PIL import Image

from jaxgeo import data
from jaxgeo.data import synthetic_aerial, tiles
from jaxgeo.data.geotiff import BadSampleError, write_geotiff
from jaxgeo.data.tiles import Classes, LabelTable, sagemaker_label_table, to_class_ids

BINARY = Classes(("background", "building"), ((0, 0, 0), (255, 128, 0)))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  directory = tmp_path_factory.mktemp("synthetic_tiles")
  return {
    "slippy": synthetic_aerial.write_synthetic_slippy(directory, zoom=19, grid=(4, 3)),
    "folders": synthetic_aerial.write_synthetic_folders(directory, grid=(5, 2)),
    "labelmaker": synthetic_aerial.write_synthetic_labelmaker(directory, zoom=17, grid=(5, 4)),
  }


def _config(dataset, root, **fields):
  config = data.data_config(dataset)
  config.root = str(root)
  for key, value in fields.items():
    config[key] = value
  return config


def _rgb(seed, size=256):
  return np.random.default_rng(seed).integers(1, 256, size=(size, size, 3), dtype=np.uint8)


# RoboSat's make_palette lists one colour per class; Pillow then writes a 2-colour mode-P PNG at 1 bit per pixel.
ROBOSAT_PALETTE = [0, 0, 0, 255, 128, 0]
GREY_PALETTE = [v for v in range(256) for _ in range(3)]  # 256 entries: an 8-bit mode-P PNG


def _smooth_rgb(size=256):
  ramp = np.linspace(20, 230, size)
  return np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1, None]), -1).astype(np.uint8)


def _save(path, array, palette=None, **options):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(array)
  if palette is not None:
    image.putpalette(palette)
  image.save(path, **options)
  return str(path)


def _slippy_tile(root, x, y, z=18, image_ext="png", label=None, image=None, palette=ROBOSAT_PALETTE):
  image = _rgb(x * 7 + y) if image is None else image
  if image_ext == "tif":
    write_geotiff(
      f"{root}/images/{z}/{x}/{y}.tif",
      image.transpose(2, 0, 1),
      crs="EPSG:3857",
      transform=Affine(0.3, 0, 0, 0, -0.3, 0),
    )
  else:
    _save(f"{root}/images/{z}/{x}/{y}.{image_ext}", image, **({"lossless": True} if image_ext == "webp" else {}))
  if label is not None:
    _save(f"{root}/labels/{z}/{x}/{y}.png", label, palette)
  return image


# ---------------------------------------------------------------- slippy maps
def test_synthetic_slippy_map_is_robosat_layout_georeferenced_by_mercantile(synthetic):
  root = synthetic["slippy"]
  config = _config("slippy", root, val_fraction=0.25)
  train, validation = data.build_source(config, "train"), data.build_source(config, "validation")
  assert len(train) + len(validation) == 12 and not set(train.names) & set(validation.names)
  assert train.names == data.build_source(config, "train").names  # the hash split is stable
  assert all(tiles.tile_split(*map(int, n.split("/")), 0.25, 0.0) == "validation" for n in validation.names)
  with Image.open(os.path.join(root, "labels", train.names[0] + ".png")) as label:
    assert label.mode == "P" and label.getpalette()[3:6] == [255, 128, 0]
  buildings = 0
  for source in (train, validation):
    for index, name in enumerate(source.names):
      z, x, y = map(int, name.split("/"))
      sample = source[index]
      assert sample["image"].shape == (256, 256, 3) and set(np.unique(sample["mask"])) <= {0, 1}
      buildings += int(sample["mask"].sum())
      crs, transform = source.georef(index)
      bounds = mercantile.xy_bounds(x, y, z)
      assert crs.to_epsg() == 3857
      assert transform @ (0, 0) == pytest.approx((bounds.left, bounds.top))
      assert transform @ (256, 256) == pytest.approx((bounds.right, bounds.bottom))
  assert buildings > 500
  copy = pickle.loads(pickle.dumps(train))  # sources travel to grain worker processes
  np.testing.assert_array_equal(copy[1]["mask"], train[1]["mask"])
  # RoboSat's fixture tile 69623,104945,18: pixel size 2 pi R / (2^18 * 256) m.
  crs, transform = tiles.slippy_georef((69623, 104945, 18), 256)
  assert transform.a == pytest.approx(2 * math.pi * 6378137 / 2**18 / 256) and transform.e == -transform.a
  assert (transform.c, transform.f) == pytest.approx(tuple(mercantile.xy_bounds(69623, 104945, 18))[::3])
  with pytest.raises(ValueError, match="no 'test' split"):
    data.build_source(config, "test")


def test_slippy_reads_every_image_format_label_mode_and_tile_list(tmp_path):
  labels = {
    key: np.random.default_rng(i).integers(0, 2, size=(256, 256), dtype=np.uint8) for i, key in enumerate("abcd")
  }
  images = {
    "a": _slippy_tile(tmp_path, 10, 20, image_ext="png", label=labels["a"]),
    "b": _slippy_tile(tmp_path, 10, 21, image_ext="webp", label=labels["b"]),
    "c": _slippy_tile(tmp_path, 11, 20, image_ext="jpg", label=labels["c"], image=_smooth_rgb()),
    "d": _slippy_tile(tmp_path, 11, 21, image_ext="tif"),
  }
  _save(f"{tmp_path}/labels/18/11/21.png", labels["d"])  # mode L, not P: grey class ids are fine too
  os.makedirs(tmp_path / "images" / "18" / "notes")
  (tmp_path / "images" / "18" / "10" / "README.txt").write_text("non-integer names are skipped, as RoboSat does")
  (tmp_path / "train.csv").write_text("11,21,18\n10,20,18\n11,20,18\n")
  (tmp_path / "validation.csv").write_text("10,21,18\n")
  config = _config(
    "slippy", tmp_path, train_tiles=str(tmp_path / "train.csv"), validation_tiles=str(tmp_path / "validation.csv")
  )
  train, validation = data.build_source(config, "train"), data.build_source(config, "validation")
  assert train.names == ["18/11/21", "18/10/20", "18/11/20"] and validation.names == ["18/10/21"]
  for source, keys in ((train, "dac"), (validation, "b")):
    for index, key in enumerate(keys):
      sample = source[index]
      np.testing.assert_array_equal(sample["mask"], labels[key])
      pixels = np.round(sample["image"] * 255).astype(int)
      if key == "c":  # JPEG: close, not equal
        assert np.abs(pixels - images[key]).mean() < 2
      else:
        np.testing.assert_array_equal(pixels, images[key])
  with pytest.raises(ValueError, match="data.test_tiles is not set"):
    data.build_source(config, "test")
  (tmp_path / "bad.csv").write_text("10,20\n")
  with pytest.raises(ValueError, match=r"bad.csv:1: expected a row `x,y,z`"):
    data.build_source(_config("slippy", tmp_path, train_tiles=str(tmp_path / "bad.csv")), "train")


def test_unpaired_slippy_tiles_are_reported_then_bad_samples(tmp_path, caplog):
  label = np.zeros((256, 256), np.uint8)
  _slippy_tile(tmp_path, 1, 1, label=label)
  _slippy_tile(tmp_path, 1, 2)  # image without label
  _save(f"{tmp_path}/labels/18/2/2.png", label, ROBOSAT_PALETTE)  # label without image
  config = _config("slippy", tmp_path, val_fraction=0.0)
  with pytest.raises(ValueError, match=r"2 tile\(s\) without image or labels") as caught:
    data.build_source(config, "train")
  assert f"{tmp_path}/labels/18/1/2.png: missing label file" in str(caught.value)
  assert f"{tmp_path}/images/18/2/2.{{png,jpg,webp,tif}}: missing image file" in str(caught.value)
  config.on_bad_sample = "skip"
  with caplog.at_level(logging.WARNING):
    source = data.build_source(config, "train")
  assert "2 tile(s) without image or labels" in caplog.text
  assert source.names == ["18/1/1", "18/1/2", "18/2/2"]
  assert source[0]["mask"].shape == (256, 256)
  with pytest.raises(BadSampleError, match="missing label file") as caught:
    source[1]
  assert caught.value.path == f"{tmp_path}/labels/18/1/2.png"
  assert [e.problem for e in source.problems(2)] == ["missing image file"]
  (tmp_path / "list.csv").write_text("1,1,18\n5,5,18\n")
  config = _config(
    "slippy", tmp_path, train_tiles=str(tmp_path / "list.csv"), validation_tiles=str(tmp_path / "list.csv")
  )
  with pytest.raises(ValueError, match="images/18/5/5.*listed, but neither image nor label file exists"):
    data.build_source(config, "train")


def test_label_values_outside_the_classes_are_named_or_ignored(tmp_path):
  label = np.zeros((256, 256), np.uint8)
  label[:4, :5] = 2  # not a class of a binary dataset
  label[10, 10] = 255  # data.ignore_index: unlabelled, never an error
  _slippy_tile(tmp_path, 3, 3, label=label, palette=GREY_PALETTE)
  source = data.build_source(_config("slippy", tmp_path, val_fraction=0.0), "train")
  with pytest.raises(BadSampleError, match=r"label value\(s\) 2 \(20 px\) encode no class; expected class ids 0..1"):
    source[0]
  mask = data.build_source(_config("slippy", tmp_path, val_fraction=0.0, unknown_labels="ignore"), "train")[0]["mask"]
  expected = np.zeros((256, 256), np.int32)
  expected[:4, :5], expected[10, 10] = 255, 255
  np.testing.assert_array_equal(mask, expected)
  with pytest.raises(ValueError, match="data.unknown_labels"):
    data.build_source(_config("slippy", tmp_path, val_fraction=0.0, unknown_labels="drop"), "train")


def test_bad_tiles_are_bad_samples_naming_the_file(tmp_path):
  zeros = np.zeros((256, 256), np.uint8)
  _slippy_tile(tmp_path, 1, 1, image=_rgb(0, size=128), label=np.zeros((128, 128), np.uint8))
  _slippy_tile(tmp_path, 1, 2)
  _save(f"{tmp_path}/labels/18/1/2.png", np.stack([zeros, zeros + 1, zeros], -1))  # a colour preview
  _slippy_tile(tmp_path, 1, 3)
  _save(f"{tmp_path}/labels/18/1/3.png", np.stack([zeros + 1] * 3, -1))  # grey saved as RGB (cv2): fine
  rgba = np.concatenate([_rgb(4), np.full((256, 256, 1), 255, np.uint8)], -1)
  rgba[:, :16, 3] = 0  # transparent: no data there
  _slippy_tile(tmp_path, 1, 4, image=rgba, label=zeros)
  _slippy_tile(tmp_path, 1, 5, label=zeros)
  with open(f"{tmp_path}/images/18/1/5.png", "r+b") as f:
    f.truncate(300)
  source = data.build_source(_config("slippy", tmp_path, val_fraction=0.0), "train")
  assert source.names == [f"18/1/{y}" for y in range(1, 6)]
  with pytest.raises(BadSampleError, match=r"images/18/1/1.png: tile is 128x128, expected 256x256 \(data.tile_size\)"):
    source[0]
  with pytest.raises(BadSampleError, match=r"labels/18/1/2.png: RGB colours, not class ids"):
    source[1]
  np.testing.assert_array_equal(source[2]["mask"], zeros + 1)
  mask = source[3]["mask"]
  assert (mask[:, :16] == 255).all() and (mask[:, 16:] == 0).all()
  with pytest.raises(BadSampleError, match=r"images/18/1/5.png: cannot read image"):
    source[4]


def test_robosat_training_validation_folders(tmp_path):
  for folder, x in (("training", 1), ("validation", 2)):
    _slippy_tile(tmp_path / folder, x, 7, label=np.full((256, 256), x - 1, np.uint8))
  config = _config("slippy", tmp_path)
  assert data.build_source(config, "train").names == ["18/1/7"]
  assert data.build_source(config, "validation")[0]["mask"].max() == 1
  with pytest.raises(ValueError, match="no 'test' split"):
    data.build_source(config, "test")


# ---------------------------------------------------------------- SageMaker channels
def test_sagemaker_label_maps_by_hand(tmp_path):
  classes = Classes(("a", "b", "c"), ((0, 0, 0),) * 3)
  scale = tmp_path / "scale.json"
  scale.write_text(json.dumps({"scale": "3"}))
  table = sagemaker_label_table(str(scale), num_classes=3)
  assert table.values[:10].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, tiles.UNKNOWN]  # 0, 3, 6 -> 0, 1, 2; 9: none
  np.testing.assert_array_equal(to_class_ids(np.array([[0, 3, 6, 8]], np.uint8), table, classes, "x"), [[0, 1, 2, 2]])
  # The SageMaker documentation's example: keys are class ids, values pixel values; [0, 5, 2] -> [1, 0, 2].
  mapped = tmp_path / "map.json"
  mapped.write_text(json.dumps({"map": {"0": 5, "1": 0, "2": 2}}))
  table = sagemaker_label_table(str(mapped), num_classes=3)
  np.testing.assert_array_equal(to_class_ids(np.array([0, 5, 2], np.uint8), table, classes, "x"), [1, 0, 2])
  with pytest.raises(BadSampleError, match=r"label value\(s\) 1 \(1 px\).*pixel values \[0, 2, 5\]"):
    to_class_ids(np.array([0, 1], np.uint8), table, classes, "x")
  for spec, problem in [
    ({"scale": "3", "map": {}}, "expected"),
    ({"scale": "0"}, "positive number"),
    ({"map": {"0": 1, "1": 1}}, "encodes two classes"),
    ({"map": {"3": 1}}, r"class id 3 outside 0..2"),
  ]:
    scale.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=problem):
      sagemaker_label_table(str(scale), num_classes=3)


def test_synthetic_sagemaker_channels_decode_both_label_map_forms(synthetic, caplog):
  root = synthetic["folders"]
  config = _config("folders", root)
  train, validation = data.build_source(config, "train"), data.build_source(config, "validation")
  assert (len(train), len(validation)) == (8, 2)
  decode = {"train": lambda raw: raw // 10 - 1, "validation": lambda raw: raw // 3}  # map {c: 10 (c + 1)}, scale 3
  seen = set()
  for source in (train, validation):
    for index in range(len(source)):
      annotation = source.tiles[index].labels
      with Image.open(annotation) as png:
        assert png.mode == "P" and annotation.endswith(f"{source.split}_annotation/{source.names[index]}.png")
        raw = np.asarray(png).astype(np.int32)
      mask = source[index]["mask"]
      np.testing.assert_array_equal(mask, decode[source.split](raw))
      seen |= set(np.unique(mask).tolist())
  assert seen <= set(range(5)) and len(seen) >= 3
  assert train.georef(0) is None
  with pytest.raises(ValueError, match="channels train and validation, no 'test' split"):
    data.build_source(config, "test")
  with pytest.raises(ValueError, match="data.num_classes=3 but data.class_names has 5"):
    data.build_source(_config("folders", root, num_classes=3), "train")


def test_sagemaker_missing_annotation_and_label_map(tmp_path, caplog):
  for channel, stems in (("train", "ab"), ("validation", "c")):
    for stem in stems:
      _save(f"{tmp_path}/{channel}/{stem}.jpg", _rgb(0))
      _save(f"{tmp_path}/{channel}_annotation/{stem}.png", np.full((256, 256), 6, np.uint8), GREY_PALETTE)
  os.makedirs(tmp_path / "label_map")
  (tmp_path / "label_map" / "train_label_map.json").write_text(json.dumps({"scale": "3"}))
  assert data.build_source(_config("folders", tmp_path), "train")[0]["mask"].max() == 2
  with caplog.at_level(logging.WARNING):
    validation = data.build_source(_config("folders", tmp_path), "validation")
  assert "validation_label_map.json does not exist but" in caplog.text
  with pytest.raises(BadSampleError, match=r"validation_annotation/c.png: label value\(s\) 6 .*no label map: scale 1"):
    validation[0]
  os.remove(tmp_path / "train_annotation" / "b.png")
  with pytest.raises(ValueError, match=r"1 tile\(s\) without image or labels.*train_annotation/b.png: missing label"):
    data.build_source(_config("folders", tmp_path), "train")


# ---------------------------------------------------------------- Label Maker
def _package_split(dest, seed, split_names, split_vals):
  """label-maker package's split, transcribed: global seed, shuffle the sorted keys, skip tiles without an
  image, cut at int(cumsum(n * split_vals)) with np.split."""
  # The legacy global generator on purpose: it is what label-maker calls.
  state = np.random.get_state()  # noqa: NPY002
  try:
    np.random.seed(seed)  # noqa: NPY002
    with np.load(os.path.join(dest, "labels.npz")) as labels:
      names = np.array(sorted(labels.files))
    np.random.shuffle(names)  # noqa: NPY002
  finally:
    np.random.set_state(state)  # noqa: NPY002
  kept = [n for n in names if os.path.exists(os.path.join(dest, "tiles", f"{n}.jpg"))]
  indices = np.cumsum([len(kept) * v for v in split_vals]).astype(np.int64)
  return dict(zip(split_names, (part.tolist() for part in np.split(np.array(kept), indices[:-1]))))


def test_labelmaker_split_is_label_maker_packages_and_labels_are_read(synthetic, caplog):
  root = synthetic["labelmaker"]
  with open(os.path.join(root, "config.json")) as f:
    settings = json.load(f)
  expected = _package_split(root, settings["seed"], settings["split_names"], settings["split_vals"])
  with np.load(os.path.join(root, "labels.npz")) as npz:
    labels = {key: npz[key] for key in npz.files}
  assert len(labels) == 20 and all(a.shape == (256, 256) for a in labels.values())
  with_image = {name[:-4] for name in os.listdir(os.path.join(root, "tiles"))}
  assert 0 < len(with_image) < 20  # Label Maker downloads no image for some background tiles
  previews = {name[:-4] for name in os.listdir(os.path.join(root, "labels"))}
  assert previews == {k for k, a in labels.items() if a.any()} and previews <= with_image
  config = _config("labelmaker", root)
  with caplog.at_level(logging.WARNING):
    sources = {split: data.build_source(config, split) for split in ("train", "validation", "test")}
  assert f"{20 - len(with_image)} labelled tile(s) have no readable image" in caplog.text
  for split, source in sources.items():
    assert source.names == expected[split]
    for index, key in enumerate(source.names):
      np.testing.assert_array_equal(source[index]["mask"], labels[key])
      x, y, z = map(int, key.split("-"))
      assert source.georef(index)[1] @ (0, 0) == pytest.approx(tuple(mercantile.xy_bounds(x, y, z))[::3])
  hashed = {
    s: data.build_source(_config("labelmaker", root, split="hash", val_fraction=0.3), s)
    for s in ("train", "validation")
  }
  assert sorted(hashed["train"].names + hashed["validation"].names) == sorted(with_image)
  settings["split_names"], settings["split_vals"] = ["train", "test"], [0.8, 0.2]
  own = os.path.join(os.path.dirname(root), "lm_config.json")
  with open(own, "w") as f:
    json.dump(settings, f)
  with pytest.raises(ValueError, match=r"split_names \['train', 'test'\] has no 'validation' split"):
    data.build_source(_config("labelmaker", root, labelmaker_config=own), "validation")


def test_labelmaker_unknown_class_and_unseeded_config(tmp_path):
  _save(f"{tmp_path}/tiles/1-2-17.jpg", _rgb(0))
  label = np.zeros((256, 256), np.int64)
  label[0, :3] = 7
  np.savez(tmp_path / "labels.npz", **{"1-2-17": label})
  (tmp_path / "config.json").write_text(json.dumps({"seed": 0, "ml_type": "segmentation"}))
  with pytest.raises(ValueError, match="no non-zero `seed`"):
    data.build_source(_config("labelmaker", tmp_path), "train")
  source = data.build_source(_config("labelmaker", tmp_path, split="hash", val_fraction=0.0), "train")
  with pytest.raises(BadSampleError, match=r"labels.npz\['1-2-17'\]: label value\(s\) 7 \(3 px\)"):
    source[0]
  ignoring = data.build_source(
    _config("labelmaker", tmp_path, split="hash", val_fraction=0.0, unknown_labels="ignore"), "train"
  )
  assert (ignoring[0]["mask"][0, :3] == 255).all() and ignoring[0]["mask"][1:].max() == 0


# ---------------------------------------------------------------- the big-scene GeoTIFF
@pytest.mark.parametrize("crs", ["EPSG:32634", "EPSG:3857"])
def test_synthetic_scene_is_a_georeferenced_geotiff_with_a_nodata_wedge(tmp_path, crs):
  image_path, mask_path = synthetic_aerial.write_synthetic_scene(tmp_path, crs=crs, height=300, width=400, gsd=0.5)
  with rasterio.open(image_path) as image, rasterio.open(mask_path) as mask:
    assert (image.count, image.dtypes[0], image.nodata, image.crs.to_string()) == (3, "uint8", 0, crs)
    assert image.block_shapes[0] == (256, 256) and image.transform == mask.transform and mask.nodata == 255
    scale = 1 / math.cos(math.radians(synthetic_aerial.LAT)) if crs == "EPSG:3857" else 1.0
    assert image.transform.a == pytest.approx(0.5 * scale) and image.transform.e == pytest.approx(-0.5 * scale)
    (lon,), (lat,) = rasterio.warp.transform(crs, "EPSG:4326", *map(list, zip(image.transform @ (200, 150))))
    assert (lon, lat) == pytest.approx((synthetic_aerial.LON, synthetic_aerial.LAT), abs=1e-6)
    pixels, classes = image.read(), mask.read(1)
  nodata = (pixels == 0).all(axis=0)
  np.testing.assert_array_equal(nodata, classes == 255)
  assert 0.02 < nodata.mean() < 0.2 and not nodata[:, 0].any() and (pixels[:, ~nodata] > 0).all()
  assert set(np.unique(classes[~nodata]).tolist()) <= {0, 1, 2, 3, 4}
  with pytest.raises(ValueError, match="projected CRS in metres"):
    synthetic_aerial.write_synthetic_scene(tmp_path, crs="EPSG:4326")


def test_label_table_identity_and_class_config_checks():
  table = LabelTable.identity(3)
  assert table.values[:4].tolist() == [0, 1, 2, tiles.UNKNOWN]
  with pytest.raises(ValueError, match="data.class_colors"):
    Classes(("a", "b"), ((0, 0, 0),))
  with pytest.raises(ValueError, match="data.ignore_index"):
    Classes(("a", "b"), ((0, 0, 0),) * 2, ignore_index=-1)
  # ignore_index may be a class id (that class is not scored); the label table still decides what a value means.
  zero_ignored = Classes(("nodata", "a", "b"), ((0, 0, 0),) * 3, ignore_index=0)
  table = LabelTable(np.asarray([1, 0, 2] + [tiles.UNKNOWN] * (2**16 - 3), np.int32), "a map")
  np.testing.assert_array_equal(to_class_ids(np.array([0, 1, 2], np.uint8), table, zero_ignored, "x"), [1, 0, 2])
  with pytest.raises(BadSampleError, match="3 \\(1 px\\)"):
    to_class_ids(np.array([3], np.uint8), table, zero_ignored, "x")
  with pytest.raises(ValueError, match="data.class_weights"):
    Classes(("a", "b"), ((0, 0, 0),) * 2, weights=(1.0,))
  assert set(data.data_config("slippy")) >= {"train_tiles", "val_fraction", "class_weights", "synthetic_zoom"}
  assert "num_classes" in data.data_config("folders") and "split" in data.data_config("labelmaker")
