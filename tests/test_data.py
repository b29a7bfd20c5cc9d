"""Data: synthetic BigEarthNet-S2 files, the source, metadata forms, bad input, the grain pipeline."""

import json
import logging
import os
import pickle
import shutil

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from affine import Affine

from jaxgeo.data import (
  ALL_BANDS,
  CLASSES_19,
  BadSampleError,
  BigEarthNetSource,
  ben_labels,
  build_source,
  data_config,
  make_iter_dataset,
  normalization_stats,
  pack,
  resize_bilinear,
  steps_per_epoch,
  synthetic,
  write_geotiff,
  write_synthetic_bigearthnet,
)
from jaxgeo.data import bigearthnet as ben
from jaxgeo.data.check import check_dataset
from jaxgeo.data.check import main as check_main

NUM_PATCHES = 24


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("synthetic_ben")
  write_synthetic_bigearthnet(directory, NUM_PATCHES)
  return directory


@pytest.fixture(scope="session")
def dataset(synthetic_dir):
  return write_synthetic_bigearthnet(synthetic_dir, NUM_PATCHES)  # cached: the same files


@pytest.fixture
def dataset_copy(dataset, tmp_path):
  """A private copy to break files in."""
  final = os.path.dirname(dataset[0])
  shutil.copytree(final, tmp_path / "ben")
  return str(tmp_path / "ben" / "BigEarthNet-v1.0"), str(tmp_path / "ben" / "metadata.parquet")


def _band_path(root, name, band):
  return os.path.join(root, name, f"{name}_{band}.tif")


# ---------------------------------------------------------------- synthetic files
def test_synthetic_files_are_georeferenced_geotiffs_at_native_band_sizes(dataset):
  root, metadata = dataset
  names = sorted(os.listdir(root))
  assert len(names) == NUM_PATCHES
  name = names[0]
  for band in ALL_BANDS:
    with rasterio.open(_band_path(root, name, band)) as src:
      size = {10: 120, 20: 60, 60: 20}[ben.BAND_RESOLUTION_M[band]]
      assert (src.driver, src.count, src.height, src.width, src.dtypes[0]) == ("GTiff", 1, size, size, "uint16")
      assert src.crs.to_epsg() == 32633
      assert src.transform.a == ben.BAND_RESOLUTION_M[band] and src.transform.e == -ben.BAND_RESOLUTION_M[band]
      assert 0 <= src.read(1).min() and src.read(1).max() < 20000
  with open(os.path.join(root, name, f"{name}_labels_metadata.json")) as f:
    meta = json.load(f)
  assert {"labels", "coordinates", "projection", "tile_source", "acquisition_date"} <= set(meta)
  assert meta["labels"] and all(label in ben_labels.CLASSES_43 for label in meta["labels"])
  table = pq.read_table(metadata).to_pydict()
  assert {"name", "original_split", "new_labels"} <= set(table) and sorted(table["name"]) == names
  mtime = os.path.getmtime(metadata)
  assert write_synthetic_bigearthnet(os.path.dirname(os.path.dirname(root)), NUM_PATCHES) == dataset
  assert os.path.getmtime(metadata) == mtime  # reused, not rewritten


def test_class_signatures_differ():
  rng = np.random.default_rng(0)
  image, class_map, names = synthetic.render_patch(rng, ["water", "coniferous", "urban"])
  nir, red = image[..., ALL_BANDS.index("B08")], image[..., ALL_BANDS.index("B04")]
  water, forest, urban = (
    class_map == names.index(n) for n in ("Water bodies", "Coniferous forest", "Discontinuous urban fabric")
  )
  assert water.mean() > 0.08 and forest.mean() > 0.08 and urban.mean() > 0.08
  assert nir[water].mean() < 0.3 * nir[forest].mean()
  ndvi = (nir - red) / (nir + red)
  assert ndvi[forest].mean() > ndvi[urban].mean() + 0.3 > ndvi[water].mean() + 0.3
  # Spatial structure: urban blocks change abruptly (streets), water hardly at all.
  edges = np.abs(np.diff(red, axis=1))
  assert edges[urban[:, 1:] & urban[:, :-1]].mean() > 3 * edges[water[:, 1:] & water[:, :-1]].mean()


def test_labels_on_disk_follow_pixels(dataset):
  root, _ = dataset
  nir, has_water = [], []
  for split in ben.SPLITS:
    source = BigEarthNetSource(root, None, split=split, bands=["B08"])
    for i in range(len(source)):
      sample = source[i]
      nir.append(np.percentile(sample["image"], 10))  # water shows as the darkest NIR pixels
      has_water.append(
        sample["labels"][CLASSES_19.index("Inland waters")] + sample["labels"][CLASSES_19.index("Marine waters")] > 0
      )
  nir, has_water = np.array(nir), np.array(has_water)
  assert 0 < has_water.sum() < len(nir)
  # Rank-based, as haze and illumination vary per patch: a patch with water has darker NIR pixels than a dry one.
  darker = (nir[has_water][:, None] < nir[~has_water][None, :]).mean()
  assert darker > 0.75, darker


# ---------------------------------------------------------------- source
def test_source_rgb_and_all_bands(dataset):
  root, metadata = dataset
  rgb = BigEarthNetSource(root, metadata, split="train", bands="rgb")
  all_bands = BigEarthNetSource(root, metadata, split="train", bands="all")
  assert len(rgb) == len(all_bands) > 0
  table = pq.read_table(metadata).to_pydict()
  new_labels = dict(zip(table["name"], table["new_labels"]))
  for i in range(len(rgb)):
    a, b = rgb[i], all_bands[i]
    assert a["image"].shape == (120, 120, 3) and b["image"].shape == (120, 120, 12)
    assert a["image"].dtype == b["image"].dtype == np.float32
    assert 0.0 <= a["image"].min() and a["image"].max() <= 1.0
    assert 0.0 <= b["image"].min() and b["image"].max() < 2.0  # 0: dark pixels clipped by L2A, kept
    # rgb is B04, B03, B02 at reflectance / 2000 clipped; "all" is reflectance / 10000.
    np.testing.assert_allclose(a["image"], np.clip(b["image"][..., [3, 2, 1]] * 5.0, 0, 1), atol=1e-5)
    assert a["index"] == i and a["index"].dtype == np.int32
    expected = np.isin(CLASSES_19, new_labels[rgb.names[i]]).astype(np.float32)
    np.testing.assert_array_equal(a["labels"], expected)
    assert a["labels"].shape == (19,) and a["labels"].sum() >= 1
  clone = pickle.loads(pickle.dumps(all_bands))  # what grain does to send the source to worker processes
  np.testing.assert_array_equal(clone[2]["image"], all_bands[2]["image"])
  mean, std = normalization_stats("all")
  assert len(mean) == len(std) == 12 and 0.03 < mean[0] < 0.04 and normalization_stats("rgb")[0][0] == 0.485


def test_resize_bilinear_keeps_constants_and_aligns_centres():
  np.testing.assert_allclose(resize_bilinear(np.full((20, 20), 7.0), (120, 120)), 7.0)
  ramp = np.arange(60, dtype=np.float32)[None, :].repeat(3, 0)
  up = resize_bilinear(ramp, (3, 120))
  # 10 m pixel j has its centre at 20 m coordinate (j + 0.5) / 2 - 0.5.
  np.testing.assert_allclose(up[0, 2:-2], (np.arange(120)[2:-2] + 0.5) / 2 - 0.5, atol=1e-5)


def _torch_bilinear(image, size):
  """PyTorch's bilinear resize (align_corners=False, no antialias) of an [H, W] image: the reference geometry."""
  import torch  # pylint: disable=g-import-not-at-top

  tensor = torch.from_numpy(np.asarray(image, np.float64))[None, None]
  return torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize(
  ("in_size", "out_size"),
  [((20, 20), (120, 120)), ((60, 60), (120, 120)), ((120, 120), (64, 64)), ((60, 20), (224, 37))],
)
def test_resize_bilinear_matches_torch_and_is_exact_on_flat_areas(in_size, out_size):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 10000, in_size).astype(np.uint16)
  np.testing.assert_allclose(resize_bilinear(image, out_size), _torch_bilinear(image, out_size), rtol=1e-6, atol=1e-3)
  # Trailing axes ride along: a stack of bands resizes as each band alone, bit for bit.
  stack = np.stack([image, image[::-1], image // 3], axis=-1)
  together = resize_bilinear(stack, out_size)
  for k in range(3):
    assert np.array_equal(together[..., k], resize_bilinear(stack[..., k], out_size))
  # Flat areas come out exactly, also where the flat area is only part of the image.
  for level in (0, 1, 7, 3333, 65535):
    assert np.array_equal(
      resize_bilinear(np.full(in_size, level, np.uint16), out_size), np.full(out_size, level, np.float32)
    )
  halves = np.zeros(in_size, np.uint16)
  halves[:, in_size[1] // 2 :] = 4097
  out = resize_bilinear(halves, out_size)
  cols = np.arange(out_size[1])
  source_col = (cols + 0.5) * in_size[1] / out_size[1] - 0.5
  assert np.all(out[:, source_col < in_size[1] // 2 - 1] == 0)
  assert np.all(out[:, source_col >= in_size[1] // 2] == 4097)


def test_bands_to_image_is_per_band_resize_then_scaling():
  rng = np.random.default_rng(1)
  bands = [rng.integers(0, 12000, ben.band_shape(b)).astype(np.uint16) for b in ALL_BANDS]
  bands[4] = rng.integers(0, 12000, (120, 120)).astype(np.int16)  # a band already on the 10 m grid
  for size, rgb in ((120, False), (64, False), (120, True)):
    image = ben.bands_to_image(bands, size, rgb)
    assert image.shape == (size, size, 12) and image.dtype == np.float32
    for c, band in enumerate(bands):
      expected = resize_bilinear(band, (size, size)) if band.shape != (size, size) else band.astype(np.float32)
      expected = np.clip(expected / np.float32(2000), 0, 1) if rgb else expected / np.float32(10000)
      assert np.array_equal(image[..., c], expected), (size, rgb, c)


def test_three_metadata_forms_load_the_same_split(dataset, tmp_path):
  root, gdf_parquet = dataset
  table = pq.read_table(gdf_parquet).to_pydict()
  v2_parquet = str(tmp_path / "metadata.parquet")
  pq.write_table(
    pa.table(
      {
        "patch_id": table["name"],
        "labels": table["new_labels"],
        "split": table["original_split"],
        "country": ["Austria"] * len(table["name"]),
      }
    ),
    v2_parquet,
  )
  for split in ben.SPLITS:
    sources = [BigEarthNetSource(root, m, split=split) for m in (gdf_parquet, v2_parquet, None)]
    by_name = [{s.names[i]: s[i]["labels"] for i in range(len(s))} for s in sources]
    assert by_name[0].keys() == by_name[1].keys() == by_name[2].keys() and by_name[0]
    for name in by_name[0]:
      np.testing.assert_array_equal(by_name[0][name], by_name[1][name])
      np.testing.assert_array_equal(by_name[0][name], by_name[2][name])


def test_build_source_without_root_uses_cached_synthetic_data(synthetic_dir, dataset, caplog, monkeypatch):
  import jaxgeo.data.source

  monkeypatch.setattr(jaxgeo.data.source, "_ANNOUNCED", set())  # the notice is once per process and root
  config = {
    "root": None,
    "metadata": None,
    "synthetic_dir": str(synthetic_dir),
    "synthetic_num_patches": NUM_PATCHES,
    "bands": "rgb",
    "image_size": 120,
  }
  with caplog.at_level(logging.WARNING):
    source = build_source(config, "validation")
  assert source.root == dataset[0] and source.metadata == dataset[1]
  assert (
    "SYNTHETIC" in caplog.text and "--config.data.root=" in caplog.text and "--config.data.metadata=" in caplog.text
  )


# ---------------------------------------------------------------- bad input
def _first_train(root, metadata):
  source = BigEarthNetSource(root, metadata, split="train", bands="all")
  return source, source.names[0]


def _truncate(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def _rewrite(path, array, **kwargs):
  os.remove(path)
  write_geotiff(path, array, crs="EPSG:32633", transform=Affine(10, 0, 0, 0, -10, 0), **kwargs)


def _negative_pixel(path):
  band = np.full((60, 60), 500, np.int16)
  band[3, 4] = -7
  _rewrite(path, band)


BAD_BAND_CASES = {
  "truncated": ("B04", _truncate, "truncated or corrupt"),
  "missing": ("B11", os.remove, "missing band file"),
  "wrong_size": (
    "B05",
    lambda p: _rewrite(p, np.ones((30, 30), np.uint16)),
    "wrong size 30x30, expected 60x60 or 120x120",
  ),
  "nan_float": ("B02", lambda p: _rewrite(p, np.full((120, 120), np.nan, np.float32)), "NaN pixels"),
  "float_dtype": (
    "B03",
    lambda p: _rewrite(p, np.ones((120, 120), np.float32)),
    "wrong dtype float32, expected an integer",
  ),
  "nodata_tag": (
    "B08",
    lambda p: _rewrite(p, np.full((120, 120), 9, np.uint16), nodata=9),
    r"all 14400 pixels are nodata \(value 9\)",
  ),
  "all_zero": ("B01", lambda p: _rewrite(p, np.zeros((20, 20), np.uint16)), r"all 400 pixels are nodata \(value 0\)"),
  "negative_int16": ("B06", _negative_pixel, r"1 pixel\(s\) below 0 \(lowest -7\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_BAND_CASES))
def test_bad_band_file_error_names_file_and_problem(dataset_copy, case):
  band, corrupt, problem = BAD_BAND_CASES[case]
  source, name = _first_train(*dataset_copy)
  path = _band_path(source.root, name, band)
  corrupt(path)
  with pytest.raises(BadSampleError, match=problem) as info:
    source[0]
  assert str(info.value).startswith(path) and info.value.path == path
  source[1]  # the others still load


def _set_dark_pixels(root, names, count, bands=ALL_BANDS):
  """`count` pixels of 0 (clipped dark reflectance) in each listed band of each patch."""
  for name in names:
    for band in bands:
      path = _band_path(root, name, band)
      with rasterio.open(path) as src:
        pixels, profile = src.read(1), src.profile
      pixels.ravel()[np.random.default_rng(len(name)).choice(pixels.size, count, replace=False)] = 0
      with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels, 1)


def test_dark_zero_pixels_are_not_holes(dataset_copy, tmp_path):
  root, metadata = dataset_copy
  source = BigEarthNetSource(root, metadata, split="train", bands="all")
  _set_dark_pixels(root, source.names, 5)
  for i in range(len(source)):
    image = source[i]["image"]
    assert np.count_nonzero(image[..., ALL_BANDS.index("B02")] == 0) >= 5  # 10 m: the zeros come through as 0
  batches = list(
    make_iter_dataset(
      source, batch_size_per_process=4, seed=0, num_epochs=1, on_bad_sample="skip", drop_remainder=False
    )
  )
  assert sum(int(b["num_skipped"].sum()) for b in batches) == 0
  assert sorted(_loaded_indices(batches)) == list(range(len(source)))
  assert check_dataset({"root": root, "metadata": metadata, "bands": "all"}, splits=("train",)) == []
  manifest = pack.pack(root, str(tmp_path / "store"), metadata=metadata, splits=["train"])
  assert manifest["skipped"] == {} and manifest["splits"]["train"]["count"] == len(source)
  assert (manifest["nodata"], manifest["max_nodata_fraction"]) == (0, ben.DEFAULT_MAX_NODATA_FRACTION)


def test_nodata_fraction_policy_from_config(dataset_copy, capsys):
  root, metadata = dataset_copy
  config = {"root": root, "metadata": metadata, "bands": "all"}
  source = build_source(config, "train")
  name = source.names[0]
  _set_dark_pixels(root, [name], 2400, bands=["B11"])  # 2/3 of a 60 x 60 band: open water in SWIR
  source[0]  # the default keeps it
  strict = build_source({**config, "max_nodata_fraction": 0.5}, "train")
  assert (strict.nodata, strict.max_nodata_fraction) == (0, 0.5)
  path = _band_path(root, name, "B11")
  with pytest.raises(
    BadSampleError, match=r"2400 of 3600 pixels \(66.7%\) are nodata \(value 0\), more than max_nodata_fraction=0.5"
  ) as info:
    strict[0]
  assert info.value.path == path
  assert [e.path for e in strict.problems(0)] == [path]
  assert check_main([f"--root={root}", f"--metadata={metadata}", "--splits=train", "--max_nodata_fraction=0.5"]) == 1
  out = capsys.readouterr().out
  assert "data.max_nodata_fraction=0.5" in out and "data.nodata=0" in out and path in out
  assert check_main([f"--root={root}", f"--metadata={metadata}", "--splits=train"]) == 0
  assert "data.max_nodata_fraction=1" in capsys.readouterr().out
  # A band with no valid pixel is bad under the default too; nodata=None turns the value off (the file has no tag).
  _rewrite(_band_path(root, name, "B02"), np.zeros((120, 120), np.uint16))
  with pytest.raises(BadSampleError, match="all 14400 pixels are nodata") as info:
    source[0]
  assert info.value.path == _band_path(root, name, "B02")
  for off in (None, float("nan")):  # nan: what a command line can say for None
    assert np.all(build_source({**config, "nodata": off}, "train")[0]["image"][..., 1] == 0)
  for bad in ({"max_nodata_fraction": 1.5}, {"max_nodata_fraction": "half"}, {"nodata": "zero"}):
    with pytest.raises(ValueError, match="data.max_nodata_fraction|data.nodata"):
      build_source({**config, **bad}, "train")
  defaults = data_config("bigearthnet")
  assert (defaults.nodata, defaults.max_nodata_fraction) == (0, 1.0)


def _store_as_derivatives_do(path, dtype, size=None):
  """Rewrites a band file as derivatives store it: resampled to `size` (rounded) and/or in another dtype."""
  with rasterio.open(path) as src:
    pixels = src.read(1)
  if size is not None:
    pixels = np.round(resize_bilinear(pixels, (size, size)))
  _rewrite(path, pixels.astype(dtype))
  return pixels.astype(np.float32)


def test_bands_already_on_the_10m_grid_and_other_integer_dtypes(dataset_copy, tmp_path, caplog, monkeypatch):
  monkeypatch.setattr(ben, "_FORMS_SEEN", set())
  root, metadata = dataset_copy
  source = BigEarthNetSource(root, metadata, split="train", bands="all")
  before = [source[i]["image"] for i in range(3)]
  stored = {}
  for i in range(3):  # TorchGeo-like: B05 at 120 px in int16, B01 native in int16, B8A native in uint8
    stored[i] = _store_as_derivatives_do(_band_path(root, source.names[i], "B05"), np.int16, size=120)
    _store_as_derivatives_do(_band_path(root, source.names[i], "B01"), np.int16)
  with rasterio.open(_band_path(root, source.names[0], "B8A")) as src:
    _rewrite(_band_path(root, source.names[0], "B8A"), np.minimum(src.read(1), 255).astype(np.uint8))
  with caplog.at_level(logging.INFO, logger="jaxgeo.data.bigearthnet"):
    after = [source[i]["image"] for i in range(3)]
    source[0]
  for i in range(3):
    b05, b01 = ALL_BANDS.index("B05"), ALL_BANDS.index("B01")
    assert np.array_equal(after[i][..., b05], stored[i] / np.float32(10000))  # not resampled a second time
    assert np.array_equal(after[i][..., b01], before[i][..., b01])  # int16 reads as the uint16 did
    others = [c for c in range(12) if c not in (b05, b01, ALL_BANDS.index("B8A"))]
    assert np.array_equal(after[i][..., others], before[i][..., others])
  notes = [r.getMessage() for r in caplog.records]
  assert sum("B05 stored at 120 px (already on the 10 m grid)" in n and "dtype int16" in n for n in notes) == 1
  assert sum("B01 stored at its native 20 px; dtype int16" in n for n in notes) == 1
  assert sum("B8A" in n and "dtype uint8" in n for n in notes) == 1
  # int16 files often tag -32768 as nodata: such pixels read as 0 (what L2A writes), never as a huge negative value.
  path = _band_path(root, source.names[3], "B12")
  with rasterio.open(path) as src:
    b12 = src.read(1).astype(np.int16)
  b12[:2, :5] = -32768
  _rewrite(path, b12, nodata=-32768)
  image = source[3]["image"][..., ALL_BANDS.index("B12")]
  assert image.min() >= 0 and np.array_equal(
    source.read_stored_band(os.path.dirname(path), "B12")[:2, :5], np.zeros((2, 5))
  )
  # The packed store keeps them as they were found and gives the same samples.
  pack.pack(root, str(tmp_path / "store"), metadata=metadata, splits=["train"])
  store = pack.PackedSource(str(tmp_path / "store"), split="train", bands="all")
  for i in range(3):
    assert np.array_equal(store[i]["image"], after[i])
  assert np.array_equal(store[3]["image"], source[3]["image"])
  small = pack.PackedSource(str(tmp_path / "store"), split="train", bands="all", image_size=64)
  assert np.array_equal(
    small[0]["image"], BigEarthNetSource(root, metadata, split="train", bands="all", image_size=64)[0]["image"]
  )


def test_v2_layout_without_metadata_finds_patches_in_tile_folders(dataset_copy):
  root, _ = dataset_copy
  v1 = {split: BigEarthNetSource(root, None, split=split, bands="rgb") for split in ben.SPLITS}
  expected = {split: {s.names[i]: s[i] for i in range(len(s))} for split, s in v1.items()}
  names = sorted(os.listdir(root))
  # Tile folders named unlike the patches (so the layout is found, not guessed); a few patches stay at the top.
  for k, name in enumerate(names[3:]):
    tile = os.path.join(root, f"S2B_MSIL2A_tile{k % 4}")
    os.makedirs(tile, exist_ok=True)
    shutil.move(os.path.join(root, name), os.path.join(tile, name))
  assert ben.find_patches(root)[names[5]].startswith("S2B_MSIL2A_tile")
  for split in ben.SPLITS:
    source = BigEarthNetSource(root, None, split=split, bands="rgb")
    assert source.names == v1[split].names
    for i, name in enumerate(source.names):
      assert np.array_equal(source[i]["image"], expected[split][name]["image"])
      assert np.array_equal(source[i]["labels"], expected[split][name]["labels"])
  # A folder in a tile without band files is still listed, so its missing files are reported, not dropped.
  os.makedirs(os.path.join(root, "S2B_MSIL2A_tile0", "S2B_lost_1_1"))
  assert ben.find_patches(root)["S2B_lost_1_1"] == os.path.join("S2B_MSIL2A_tile0", "S2B_lost_1_1")
  lost = BigEarthNetSource(root, None, split=ben_labels.hash_split("S2B_lost_1_1"), bands="rgb")
  index = lost.names.index("S2B_lost_1_1")
  with pytest.raises(BadSampleError, match="missing band file") as info:
    lost[index]
  assert "S2B_MSIL2A_tile0" in info.value.path


def test_v2_layout_with_tile_folders(dataset_copy):
  root, metadata = dataset_copy
  source = BigEarthNetSource(root, metadata, split="train")
  expected = source[0]["image"]
  name = source.names[0]
  tile = name.rsplit("_", 2)[0]
  os.makedirs(os.path.join(root, tile))
  shutil.move(os.path.join(root, name), os.path.join(root, tile, name))
  np.testing.assert_array_equal(source[0]["image"], expected)


def test_bad_sample_error_survives_pickling():
  error = pickle.loads(pickle.dumps(BadSampleError("/x/p_B04.tif", "missing band file")))
  assert (error.path, error.problem, str(error)) == (
    "/x/p_B04.tif",
    "missing band file",
    "/x/p_B04.tif: missing band file",
  )


def test_metadata_naming_missing_patch(dataset_copy):
  root, metadata = dataset_copy
  source, name = _first_train(root, metadata)
  shutil.rmtree(os.path.join(root, name))
  with pytest.raises(BadSampleError, match="patch folder does not exist") as info:
    source[0]
  assert os.path.join(root, name) in str(info.value) and metadata in str(info.value)


def _rewrite_parquet(path, change):
  table = pq.read_table(path).to_pydict()
  change(table)
  pq.write_table(pa.table(table), path)


def test_parquet_missing_column(dataset_copy):
  root, metadata = dataset_copy
  _rewrite_parquet(metadata, lambda t: t.pop("new_labels"))
  with pytest.raises(ValueError, match=r"missing column\(s\) \['new_labels'\]") as info:
    BigEarthNetSource(root, metadata)
  assert metadata in str(info.value)


def test_unknown_label_in_parquet_and_json(dataset_copy):
  root, metadata = dataset_copy
  _rewrite_parquet(metadata, lambda t: t["new_labels"].__setitem__(3, ["Urban fabrik"]))
  row_split = pq.read_table(metadata).to_pydict()["original_split"][3]
  with pytest.raises(ValueError, match="unknown label 'Urban fabrik'") as info:
    BigEarthNetSource(root, metadata, split=row_split)
  assert metadata in str(info.value) and "row 3" in str(info.value)
  source = BigEarthNetSource(root, None, split="train")
  json_path = os.path.join(root, source.names[0], f"{source.names[0]}_labels_metadata.json")
  with open(json_path, "w") as f:
    json.dump({"labels": ["Continuous urban fabric", "Lava fields"]}, f)
  with pytest.raises(BadSampleError, match="Lava fields") as info:
    source[0]
  assert str(info.value).startswith(json_path)


def test_empty_split(dataset_copy):
  root, metadata = dataset_copy
  _rewrite_parquet(metadata, lambda t: t.__setitem__("original_split", ["train"] * len(t["name"])))
  with pytest.raises(ValueError, match="split 'test' is empty") as info:
    BigEarthNetSource(root, metadata, split="test")
  assert metadata in str(info.value)


def test_check_dataset_finds_every_injected_problem(dataset_copy, capsys):
  root, metadata = dataset_copy
  sources = {split: BigEarthNetSource(root, metadata, split=split) for split in ben.SPLITS}
  broken = [
    _band_path(root, sources["train"].names[0], "B04"),
    _band_path(root, sources["train"].names[0], "B12"),
    _band_path(root, sources["test"].names[0], "B8A"),
  ]
  _truncate(broken[0])
  os.remove(broken[1])
  _rewrite(broken[2], np.ones((7, 7), np.uint16))
  missing_patch = sources["validation"].names[0]
  shutil.rmtree(os.path.join(root, missing_patch))
  problems = check_dataset({"root": root, "metadata": metadata, "bands": "all"})
  assert len(problems) == 4
  for path in broken + [os.path.join(root, missing_patch)]:
    assert sum(path in p for p in problems) == 1, (path, problems)
  assert check_main([f"--root={root}", f"--metadata={metadata}"]) == 1
  assert "4 problem(s)" in capsys.readouterr().out


def test_check_dataset_clean_and_metadata_level_problems(dataset_copy):
  root, metadata = dataset_copy
  assert check_dataset({"root": root, "metadata": metadata, "bands": "rgb"}) == []
  _rewrite_parquet(metadata, lambda t: t.pop("original_split"))
  problems = check_dataset({"root": root, "metadata": metadata}, splits=("train",))
  assert len(problems) == 1 and metadata in problems[0] and "original_split" in problems[0]


# ---------------------------------------------------------------- pipeline
class _FakeSource:
  """In-memory source: image pixels hold the index, so batches say which samples they are made of."""

  def __init__(self, size, bad=()):
    self.size, self.bad = size, set(bad)

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    if index in self.bad:
      raise BadSampleError(f"/fake/{index}_B04.tif", "truncated or corrupt")
    return {
      "image": np.full((2, 2, 1), index, np.float32),
      "labels": np.zeros(19, np.float32),
      "index": np.int32(index),
    }


def _loaded_indices(batches):
  """Indices of the samples the batches really hold: rows marked `valid` (padding and stand-ins for bad samples
  are not), or every row where the pipeline marks none."""
  return [int(i) for b in batches for i, ok in zip(b["index"], b.get("valid", np.ones(len(b["index"]), bool))) if ok]


def _take(dataset, n):
  iterator = iter(dataset)
  return [next(iterator) for _ in range(n)]


def test_per_process_shards_are_disjoint_and_cover_the_global_batch():
  source, batch, processes = _FakeSource(50), 3, 4
  global_batches = _take(
    make_iter_dataset(source, batch_size_per_process=batch * processes, seed=7, num_epochs=None, read_threads=0), 6
  )
  shards = [
    _take(
      make_iter_dataset(
        source,
        batch_size_per_process=batch,
        seed=7,
        num_epochs=None,
        process_index=p,
        process_count=processes,
        read_threads=0,
      ),
      6,
    )
    for p in range(processes)
  ]
  for step in range(6):
    parts = [shards[p][step]["index"] for p in range(processes)]
    assert all(len(part) == batch for part in parts)
    combined = np.concatenate(parts)
    assert len(set(combined.tolist())) == batch * processes  # disjoint
    assert sorted(combined.tolist()) == sorted(global_batches[step]["index"].tolist())
  assert steps_per_epoch(50, batch * processes) == 4
  with pytest.raises(ValueError, match="larger than the 50 examples"):
    steps_per_epoch(50, 64)


def test_epochs_are_permutations_and_reshuffled():
  batches = _take(make_iter_dataset(_FakeSource(20), batch_size_per_process=5, seed=1, num_epochs=2, read_threads=0), 8)
  order = np.concatenate([b["index"] for b in batches])
  assert sorted(order[:20]) == sorted(order[20:]) == list(range(20))
  assert not np.array_equal(order[:20], order[20:])


def test_iterator_state_resumes_exactly(dataset, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  source = BigEarthNetSource(*dataset, split="train", bands="rgb")
  dataset_kwargs = dict(batch_size_per_process=4, seed=3, num_epochs=None)
  iterator = iter(make_iter_dataset(source, **dataset_kwargs))
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = [next(iterator) for _ in range(4)]  # crosses the epoch boundary (len(source) < 28)

  resumed = iter(make_iter_dataset(source, **dataset_kwargs))
  resumed.set_state(state)
  restored = iter(make_iter_dataset(source, **dataset_kwargs))
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for it in (resumed, restored):
    for want in expected:
      got = next(it)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_skip_mode_counts_and_logs_each_bad_sample_once(caplog):
  source = _FakeSource(12, bad={2, 7, 8})
  dataset = make_iter_dataset(
    source, batch_size_per_process=3, seed=0, num_epochs=2, on_bad_sample="skip", drop_remainder=False, read_threads=0
  )
  with caplog.at_level(logging.WARNING, logger="jaxgeo.data.pipeline"):
    batches = list(dataset)
  indices = _loaded_indices(batches)
  assert sorted(indices) == sorted([i for i in range(12) if i not in (2, 7, 8)] * 2)
  assert sum(int(b["num_skipped"].sum()) for b in batches) == 6
  warnings = [r.getMessage() for r in caplog.records if "Skipping bad sample" in r.getMessage()]
  assert len(warnings) == 3 and all("/fake/" in w for w in warnings)
  with pytest.raises(BadSampleError, match="/fake/"):
    list(make_iter_dataset(source, batch_size_per_process=3, seed=0, num_epochs=1, read_threads=0))


def test_skip_mode_on_real_files(dataset_copy):
  root, metadata = dataset_copy
  source = BigEarthNetSource(root, metadata, split="train")
  _truncate(_band_path(root, source.names[1], "B03"))
  os.remove(_band_path(root, source.names[4], "B02"))
  batches = list(
    make_iter_dataset(
      source, batch_size_per_process=4, seed=0, num_epochs=1, on_bad_sample="skip", drop_remainder=False
    )
  )
  indices = _loaded_indices(batches)
  assert sum(int(b["num_skipped"].sum()) for b in batches) == 2
  assert sorted(indices) == [i for i in range(len(source)) if i not in (1, 4)]
  with pytest.raises(BadSampleError, match=source.names[1]):
    list(make_iter_dataset(source, batch_size_per_process=4, seed=0, num_epochs=1, shuffle=False))


def test_check_command_reads_any_registry_dataset(tmp_path, capsys):
  """`python -m jaxgeo.data.check --dataset=slippy`: the same readers, every problem named, exit 1."""
  from PIL import Image

  from jaxgeo.data import check, synthetic_aerial

  root = synthetic_aerial.write_synthetic_slippy(tmp_path / "slippy", zoom=19, grid=(4, 3))
  assert check.main(["--dataset=slippy", f"--root={root}", "--splits=train,validation"]) == 0
  label = sorted((tmp_path / "slippy").rglob("labels/*/*/*.png"))[0]
  Image.fromarray(np.full((256, 256), 7, np.uint8)).save(label)  # class 7 of a 2-class dataset
  assert check.main(["--dataset=slippy", f"--root={root}", "--splits=train,validation"]) == 1
  out = capsys.readouterr().out
  assert str(label) in out and "1 problem(s)" in out
  assert check.main(["--dataset=slippy", f"--root={root}", "--set", "clas_names=a,b"]) == 2
