"""LandCover.ai: split.py's tile numbering, windowed reads of the raw GeoTIFFs, both layouts, bad labels."""

import logging
import os

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image

from jaxgeo import data
from jaxgeo.data import landcoverai
from jaxgeo.data.geotiff import BadSampleError, write_geotiff
from jaxgeo.data.landcoverai import LandCoverAISource, grid_cells
from jaxgeo.data.synthetic_aerial import write_synthetic_landcoverai
from jaxgeo.data.tiles import Classes

TILE = 256
SYNTHETIC = dict(num_orthophotos=4, height=1030, width=1100, tile_size=TILE)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return write_synthetic_landcoverai(tmp_path_factory.mktemp("landcoverai"), **SYNTHETIC)


def _split_py_ids(height, width, size):
  """split.py's loop, transcribed: k counts every cell of the row-major grid; only full tiles are written."""
  image = np.zeros((height, width), np.uint8)
  written, k = [], 0
  for y in range(0, image.shape[0], size):
    for x in range(0, image.shape[1], size):
      tile = image[y : y + size, x : x + size]
      if tile.shape[0] == size and tile.shape[1] == size:
        written.append((k, y, x))
      k += 1
  return written


# ---------------------------------------------------------------- split.py numbering
def test_grid_cells_number_every_cell_and_keep_full_ones():
  # 1030 x 1100 with 512 tiles: a 3 x 3 grid (k = 0..8); the last row and column are partial, so the
  # full cells are k = 0, 1 (top row) and 3, 4 (second row).
  assert grid_cells(1030, 1100, 512) == [(0, 0, 0), (1, 0, 512), (3, 512, 0), (4, 512, 512)]
  # 1030 x 1600: 4 cells across (the 4th partial), 3 down: full k = 0, 1, 2 and 4, 5, 6.
  assert [k for k, _, _ in grid_cells(1030, 1600, 512)] == [0, 1, 2, 4, 5, 6]
  assert grid_cells(1030, 1600, 512)[3] == (4, 512, 0)
  # Exact multiples leave no gaps; an image smaller than a tile has no tiles.
  assert [k for k, _, _ in grid_cells(1024, 1024, 512)] == [0, 1, 2, 3]
  assert grid_cells(500, 9000, 512) == []
  for height, width, size in [(9000, 9500, 512), (4200, 4700, 512), (1030, 1100, 256), (777, 1301, 100)]:
    assert grid_cells(height, width, size) == _split_py_ids(height, width, size)


def test_split_files_name_full_cells_of_the_orthophotos(root):
  ids = {}
  for name in ("train.txt", "val.txt", "test.txt"):
    ids[name] = [f"{sheet}_{k}" for sheet, k in landcoverai.read_split_file(os.path.join(root, name))]
    assert ids[name], name
  listed = sum(ids.values(), [])
  assert len(listed) == len(set(listed))  # disjoint splits
  expected = set()
  for tif in os.listdir(os.path.join(root, "images")):
    with rasterio.open(os.path.join(root, "images", tif)) as src:
      assert (src.count, src.dtypes[0], src.crs.to_epsg()) == (3, "uint8", 2180)
      assert src.transform.a in (0.25, 0.5) and src.transform.e == -src.transform.a
      expected |= {f"{tif[:-4]}_{k}" for k, _, _ in grid_cells(src.height, src.width, TILE)}
  assert set(listed) == expected
  # split.py writes every full cell into output/: a jpg and a 3-channel mask png.
  outputs = os.listdir(os.path.join(root, "output"))
  assert {f[: -len("_m.png")] for f in outputs if f.endswith("_m.png")} == expected
  assert {f[: -len(".jpg")] for f in outputs if f.endswith(".jpg")} == expected
  with Image.open(os.path.join(root, "output", f"{listed[0]}_m.png")) as mask:
    assert mask.mode == "RGB"


# ---------------------------------------------------------------- raw layout: windows and georeferencing
def test_windows_read_equal_the_tile_pixels_and_georeference_them(root):
  source = LandCoverAISource(root, "train", tile_size=TILE)
  assert source.layout == "raw" and source.label_kind == "segmentation"
  assert source.norm_stats["image"] == (data.IMAGENET_MEAN, data.IMAGENET_STD)
  seen_classes = set()
  for index in range(0, len(source), 5):
    sheet, k = source.names[index].rsplit("_", 1)
    with rasterio.open(os.path.join(root, "images", f"{sheet}.tif")) as src:
      full, transform, crs = src.read(), src.transform, src.crs
      cells = {cell[0]: cell[1:] for cell in grid_cells(src.height, src.width, TILE)}
    with rasterio.open(os.path.join(root, "masks", f"{sheet}.tif")) as src:
      full_mask = src.read(1)
    row, col = cells[int(k)]
    sample = source[index]
    assert sample["image"].shape == (TILE, TILE, 3) and sample["image"].dtype == np.float32
    assert sample["mask"].dtype == np.int32 and sample["index"] == index
    expected = full[:, row : row + TILE, col : col + TILE].transpose(1, 2, 0)
    np.testing.assert_array_equal(np.round(sample["image"] * 255).astype(np.uint8), expected)
    np.testing.assert_array_equal(sample["mask"], full_mask[row : row + TILE, col : col + TILE])
    tile_crs, tile_transform = source.georef(index)
    assert tile_crs == crs
    assert tile_transform == transform @ Affine.translation(col, row)
    # The tile's top-left corner in EPSG:2180 metres, by hand: origin + offset * pixel size.
    assert tile_transform.c == pytest.approx(transform.c + col * transform.a)
    assert tile_transform.f == pytest.approx(transform.f + row * transform.e)
    seen_classes |= set(np.unique(sample["mask"]).tolist())
  assert seen_classes <= {0, 1, 2, 3, 4} and len(seen_classes) >= 3


def test_both_layouts_give_the_same_samples(root):
  for split in ("train", "validation", "test"):
    raw = LandCoverAISource(root, split, layout="raw", tile_size=TILE)
    output = LandCoverAISource(root, split, layout="output", tile_size=TILE)
    assert raw.names == output.names
    for index in range(0, len(raw), 4):
      a, b = raw[index], output[index]
      np.testing.assert_array_equal(a["mask"], b["mask"])  # the 3-channel PNG, read as its first channel
      # The jpg went through JPEG at quality 95 (4:2:0 chroma), which keeps the mean colour of each 16 x 16
      # block (channel order and all) and drops some pixel-level noise.
      blocks = [s["image"].reshape(TILE // 16, 16, TILE // 16, 16, 3).mean(axis=(1, 3)) for s in (a, b)]
      assert np.abs(blocks[0] - blocks[1]).max() < 5 / 255
      assert np.abs(a["image"] - b["image"]).mean() < 5 / 255
      assert output.georef(index) is None


def test_registry_builds_the_synthetic_dataset(tmp_path):
  config = data.data_config("landcoverai")
  assert config.tile_size == 512 and config.layout == "auto" and config.ignore_index == 255
  assert config.class_names == landcoverai.CLASSES and config.class_colors[1] == (97, 74, 74)
  config.synthetic_dir = str(tmp_path)
  config.synthetic_num_orthophotos, config.synthetic_height, config.synthetic_width = 2, 600, 700
  config.tile_size = 128
  sizes = {split: len(data.build_source(config, split)) for split in ("train", "validation", "test")}
  # 2 orthophotos of about 600 x 700 px hold 4 x 5 = 20 full 128 px cells each.
  assert sum(sizes.values()) == 40 and all(sizes.values())
  config.layout = "output"
  assert data.build_source(config, "train").layout == "output"
  config.layout = "mosaic"
  with pytest.raises(ValueError, match="data.layout"):
    data.build_source(config, "train")


# ---------------------------------------------------------------- bad input, on small hand-made archives
def _archive(tmp_path, mask, sheets=("A",), with_mask=("A",), splits=None):
  """A 600 x 600 px archive: with 256 px tiles, cells k = 0, 1, 3, 4 are full."""
  image = np.random.default_rng(0).integers(1, 255, size=(3, 600, 600), dtype=np.uint8)
  transform = Affine(0.25, 0, 500000.0, 0, -0.25, 400000.0)
  for sheet in sheets:
    write_geotiff(_path(tmp_path, "images", f"{sheet}.tif"), image, crs="EPSG:2180", transform=transform)
    if sheet in with_mask:
      write_geotiff(_path(tmp_path, "masks", f"{sheet}.tif"), mask, crs="EPSG:2180", transform=transform)
  splits = splits or {
    "train.txt": [f"{s}_{k}" for s in sheets for k in (0, 4)],
    "val.txt": ["A_1"],
    "test.txt": ["A_3"],
  }
  for name, ids in splits.items():
    (tmp_path / name).write_text("".join(f"{i}\n" for i in ids))
  return str(tmp_path)


def _path(tmp_path, folder, name):
  (tmp_path / folder).mkdir(exist_ok=True)
  return str(tmp_path / folder / name)


def test_out_of_range_mask_value_is_named_or_ignored(tmp_path):
  mask = np.zeros((600, 600), np.uint8)
  mask[300:310, 260:270] = 7  # inside cell k = 4 (rows 256..511, columns 256..511)
  mask[400, 400] = 255  # the ignore value means "unlabelled"; never an error
  root = _archive(tmp_path, mask)
  source = LandCoverAISource(root, "train", tile_size=TILE)
  assert source.names == ["A_0", "A_4"]
  assert source[0]["mask"].max() == 0
  with pytest.raises(BadSampleError, match=r"masks/A.tif: label value\(s\) 7 \(100 px\) encode no class") as caught:
    source[1]
  assert caught.value.path == os.path.join(root, "masks", "A.tif")
  assert [e.path for e in source.problems(1)] == [caught.value.path] and source.problems(0) == []
  ignoring = LandCoverAISource(
    root,
    "train",
    tile_size=TILE,
    classes=Classes(landcoverai.CLASSES, landcoverai.CLASS_COLORS, unknown_labels="ignore"),
  )
  tile = ignoring[1]["mask"]
  expected = np.zeros((TILE, TILE), np.int32)
  expected[300 - 256 : 310 - 256, 260 - 256 : 270 - 256] = 255
  expected[400 - 256, 400 - 256] = 255
  np.testing.assert_array_equal(tile, expected)


def test_missing_mask_is_named_at_construction_and_when_read(tmp_path, caplog):
  splits = {"train.txt": ["B_0", "A_0", "B_4", "A_4"], "val.txt": ["A_1"], "test.txt": ["A_3"]}
  root = _archive(tmp_path, np.zeros((600, 600), np.uint8), sheets=("A", "B"), with_mask=("A",), splits=splits)
  missing = os.path.join(root, "masks", "B.tif")
  with pytest.raises(ValueError, match=r"2 tile\(s\) without image or labels.*masks/B.tif: missing mask"):
    LandCoverAISource(root, "train", tile_size=TILE)
  with caplog.at_level(logging.WARNING):
    source = LandCoverAISource(root, "train", tile_size=TILE, on_bad_sample="skip")
  assert "masks/B.tif" in caplog.text and "skipped" in caplog.text
  assert source.names == ["B_0", "A_0", "B_4", "A_4"]
  with pytest.raises(BadSampleError, match="missing label file") as caught:
    source[0]
  assert caught.value.path == missing
  # In skip mode the pipeline counts them as skipped and trains on the good tiles.
  options = dict(seed=0, num_epochs=1, shuffle=False, on_bad_sample="skip", read_threads=0, drop_remainder=False)
  (batch,) = list(data.make_iter_dataset(source, batch_size_per_process=4, **options))
  assert batch["num_skipped"].sum() == 2 and sorted(batch["index"][batch["num_skipped"] == 0].tolist()) == [1, 3]


def test_split_ids_off_the_grid_and_size_mismatches_are_errors(tmp_path):
  root = _archive(
    tmp_path,
    np.zeros((600, 600), np.uint8),
    splits={"train.txt": ["A_0", "A_2"], "val.txt": ["A_x"], "test.txt": ["A_1"]},
  )
  with pytest.raises(ValueError, match=r"train.txt: 1 tile id\(s\) are no full 256 px cell.*A_2.*data.tile_size"):
    LandCoverAISource(root, "train", tile_size=TILE)
  with pytest.raises(ValueError, match=r"val.txt:1: tile id 'A_x' is not <orthophoto>_<k>"):
    LandCoverAISource(root, "validation", tile_size=TILE)
  write_geotiff(
    str(tmp_path / "masks" / "A.tif"),
    np.zeros((600, 610), np.uint8),
    crs="EPSG:2180",
    transform=Affine(0.25, 0, 0, 0, -0.25, 0),
  )
  with pytest.raises(ValueError, match=r"masks/A.tif: mask is 600x610, its orthophoto 600x600"):
    LandCoverAISource(root, "test", tile_size=TILE)
  source = LandCoverAISource(root, "test", tile_size=TILE, on_bad_sample="skip")
  with pytest.raises(BadSampleError, match="is 600x610, expected 600x600 like its pair"):
    source[0]
  os.remove(tmp_path / "test.txt")
  with pytest.raises(FileNotFoundError, match="test.txt: LandCover.ai split file does not exist"):
    LandCoverAISource(root, "test", tile_size=TILE)
