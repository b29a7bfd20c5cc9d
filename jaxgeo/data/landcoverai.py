"""LandCover.ai v1: RGB orthophotos of Poland (25 / 50 cm, EPSG:2180) with 5 land-cover classes.

Two layouts, `data.layout` ("auto" prefers raw when both are there):
  "raw"     the archive as downloaded: `images/<sheet>.tif` (RGB uint8), `masks/<sheet>.tif` (1 band, class
            ids), `train.txt` / `val.txt` / `test.txt` naming tiles `<sheet>_<k>`. jaxgeo cuts each tile out of
            the GeoTIFFs as a rasterio window, numbered exactly as the dataset's split.py numbers them
            (`grid_cells`), so there is no JPEG recompression and every tile keeps its georeferencing.
  "output"  the folder split.py writes: `output/<sheet>_<k>.jpg` and `output/<sheet>_<k>_m.png` (the mask
            saved by cv2 as 3 equal channels; read as its first), beside the same split files. No georeferencing.

Classes (TorchGeo's names and colours): 0 background, 1 building, 2 woodland, 3 water, 4 road.
"""

from __future__ import annotations

import logging
import os

from jaxgeo.data.segmentation import (
  Classes,
  SegmentationSource,
  Tile,
  image_options,
  report_unpaired,
  segmentation_config,
)
from jaxgeo.data.source import field

log = logging.getLogger(__name__)

CLASSES = ("background", "building", "woodland", "water", "road")
CLASS_COLORS = ((0, 0, 0), (97, 74, 74), (38, 115, 0), (0, 197, 255), (207, 207, 207))  # TorchGeo's cmap
TILE_SIZE = 512  # split.py's TARGET_SIZE
SPLIT_FILES = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
LAYOUTS = ("auto", "raw", "output")


def grid_cells(height: int, width: int, tile_size: int = TILE_SIZE) -> list[tuple[int, int, int]]:
  """(k, row, col) of the full tiles of a height x width orthophoto, as split.py numbers them.

  split.py walks a tile_size grid row by row (y outer, x inner) from the top left and counts `k` for EVERY grid
  cell, but writes only the full tile_size x tile_size ones, so the right column and bottom row of partial
  cells leave gaps in the ids.
  """
  cells_across = -(-width // tile_size)  # ceil: the partial cell at the right edge is counted too
  cells = []
  for row in range(0, height, tile_size):
    for col in range(0, width, tile_size):
      if row + tile_size <= height and col + tile_size <= width:
        cells.append(((row // tile_size) * cells_across + col // tile_size, row, col))
  return cells


def read_split_file(path: str) -> list[tuple[str, int]]:
  """(sheet, k) of every tile id `<sheet>_<k>` listed in a LandCover.ai split file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: LandCover.ai split file does not exist (expected beside images/ or output/)")
  ids = []
  with open(path) as f:
    for line, text in enumerate(f, start=1):
      text = text.strip()
      if not text:
        continue
      sheet, _, k = text.rpartition("_")
      if not sheet or not k.isdigit():
        raise ValueError(f"{path}:{line}: tile id {text!r} is not <orthophoto>_<k>")
      ids.append((sheet, int(k)))
  return ids


def resolve_layout(root: str, layout: str) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"data.layout: expected one of {LAYOUTS}, got {layout!r}")
  has_raw, has_output = os.path.isdir(os.path.join(root, "images")), os.path.isdir(os.path.join(root, "output"))
  if layout == "auto":
    if not (has_raw or has_output):
      raise FileNotFoundError(
        f"{root}: no images/ + masks/ (the v1 archive) nor output/ (split.py's tiles) (data.root)"
      )
    return "raw" if has_raw else "output"
  if not (has_raw if layout == "raw" else has_output):
    raise FileNotFoundError(
      f"{root}: data.layout={layout!r} but {'images/' if layout == 'raw' else 'output/'} does not exist"
    )
  return layout


def _image_sizes(folder: str) -> dict[str, tuple[int, int]]:
  """{sheet: (height, width)} of the GeoTIFFs in `folder` (headers only)."""
  import rasterio
  import rasterio.errors

  sizes = {}
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
    sheet, ext = os.path.splitext(name)
    if ext.lower() not in (".tif", ".tiff"):
      continue
    try:
      with rasterio.open(os.path.join(folder, name)) as src:
        sizes[sheet] = (src.height, src.width)
    except (rasterio.errors.RasterioError, OSError):
      sizes[sheet] = None  # unreadable: a bad sample for each of its tiles, named when read
  return sizes


def raw_tiles(root: str, ids, tile_size: int, split_file: str) -> tuple[list[Tile], list[str]]:
  """Tiles cut from the orthophotos by split.py's numbering, and the pairing problems found."""
  images, masks = _image_sizes(os.path.join(root, "images")), _image_sizes(os.path.join(root, "masks"))
  tiles, problems, off_grid = [], [], []
  cells = {}
  for sheet, k in ids:
    image, mask = os.path.join(root, "images", f"{sheet}.tif"), os.path.join(root, "masks", f"{sheet}.tif")
    window = None
    if sheet not in images:
      problems.append(f"{image}: missing orthophoto (tile {sheet}_{k})")
    elif images[sheet] is not None:
      if sheet not in cells:
        cells[sheet] = {cell[0]: cell[1:] for cell in grid_cells(*images[sheet], tile_size)}
      if k not in cells[sheet]:
        off_grid.append(f"{sheet}_{k} ({images[sheet][0]}x{images[sheet][1]} px)")
        continue
      window = (*cells[sheet][k], tile_size)
    if sheet not in masks:
      problems.append(f"{mask}: missing mask (tile {sheet}_{k})")
    elif None not in (masks[sheet], images.get(sheet)) and masks[sheet] != images[sheet]:
      problems.append(
        f"{mask}: mask is {masks[sheet][0]}x{masks[sheet][1]}, its orthophoto {images[sheet][0]}x{images[sheet][1]}"
      )
    window = window or (0, 0, tile_size)
    tiles.append(Tile(name=f"{sheet}_{k}", image=image, labels=mask, window=window, file_shape=images.get(sheet)))
  if off_grid:
    raise ValueError(
      f"{split_file}: {len(off_grid)} tile id(s) are no full {tile_size} px cell of their orthophoto, e.g. "
      f"{off_grid[:5]}: split files number the cells of a data.tile_size grid (split.py: 512); is it right?"
    )
  return tiles, problems


def output_tiles(root: str, ids) -> tuple[list[Tile], list[str]]:
  tiles, problems = [], []
  for sheet, k in ids:
    image, mask = os.path.join(root, "output", f"{sheet}_{k}.jpg"), os.path.join(root, "output", f"{sheet}_{k}_m.png")
    problems += [
      f"{path}: missing {what}" for path, what in ((image, "image"), (mask, "mask")) if not os.path.isfile(path)
    ]
    tiles.append(Tile(name=f"{sheet}_{k}", image=image, labels=mask))
  return tiles, problems


class LandCoverAISource(SegmentationSource):
  """One split of LandCover.ai in either layout; samples as `SegmentationSource` (mask values 0..4).
  `image_kwargs`: SegmentationSource's bands / image_mean / image_std / image_scale."""

  def __init__(
    self,
    root: str,
    split: str = "train",
    *,
    layout: str = "auto",
    tile_size: int = TILE_SIZE,
    classes: Classes | None = None,
    on_bad_sample: str = "error",
    **image_kwargs,
  ):
    root = os.fspath(root)
    if not os.path.isdir(root):
      raise FileNotFoundError(f"{root}: LandCover.ai root folder does not exist (data.root)")
    if split not in SPLIT_FILES:
      raise ValueError(f"split: expected one of {tuple(SPLIT_FILES)}, got {split!r}")
    layout = resolve_layout(root, layout)
    split_file = os.path.join(root, SPLIT_FILES[split])
    ids = read_split_file(split_file)
    if layout == "raw":
      tiles, problems = raw_tiles(root, ids, tile_size, split_file)
    else:
      tiles, problems = output_tiles(root, ids)
    report_unpaired(f"{root} ({layout} layout, {split_file})", problems, on_bad_sample)
    super().__init__(
      name="landcoverai",
      split=split,
      root=root,
      layout=layout,
      tiles=tiles,
      classes=classes or Classes(CLASSES, CLASS_COLORS),
      tile_size=tile_size,
      **image_kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------
# Registry entry points (jaxgeo/data/__init__.py)
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_SYNTHETIC_DIR = "~/.cache/jaxgeo/synthetic_landcoverai"


def data_config(dataset: str = "landcoverai"):
  """LandCover.ai's own config.data fields (the registry adds the shared ones)."""
  del dataset
  c = segmentation_config(CLASSES, CLASS_COLORS, tile_size=TILE_SIZE)
  c.layout = "auto"  # "raw" (images/ + masks/ GeoTIFFs, windowed), "output" (split.py's jpg/png) or "auto"
  c.synthetic_dir = DEFAULT_SYNTHETIC_DIR
  c.synthetic_num_orthophotos = 6
  c.synthetic_height = 1560
  c.synthetic_width = 1560
  return c


def build_source(data_config, split: str) -> LandCoverAISource:
  """The LandCoverAISource of `split` described by config.data (with no data.root: a synthetic copy)."""
  from jaxgeo.data.source import announce_synthetic

  tile_size = int(field(data_config, "tile_size", TILE_SIZE))
  root = field(data_config, "root")
  if root is None:
    from jaxgeo.data.synthetic_aerial import write_synthetic_landcoverai

    root = write_synthetic_landcoverai(
      field(data_config, "synthetic_dir", DEFAULT_SYNTHETIC_DIR),
      num_orthophotos=int(field(data_config, "synthetic_num_orthophotos", 6)),
      height=int(field(data_config, "synthetic_height", 1560)),
      width=int(field(data_config, "synthetic_width", 1560)),
      tile_size=tile_size,
    )
    announce_synthetic(
      "LandCover.ai",
      root,
      "To train on the real LandCover.ai, unzip landcover.ai.v1.zip and pass --config.data.root=/path/to/it "
      "(images/, masks/ and the split files; split.py's output/ also works).",
    )
  source = LandCoverAISource(
    os.path.expanduser(root),
    split,
    layout=field(data_config, "layout", "auto"),
    tile_size=tile_size,
    classes=Classes.from_config(data_config),
    on_bad_sample=field(data_config, "on_bad_sample", "error"),
    **image_options(data_config),
  )
  log.info("%s", source.describe())
  return source
