"""What every segmentation dataset shares: class fields of config.data, label tables, file readers, the source.

tiles.py (RoboSat slippy maps, SageMaker channels, Label Maker) and landcoverai.py build on it:
  segmentation_config / image_options   the config.data fields every segmentation dataset has, and the
                                        SegmentationSource image arguments read from them
  Classes, LabelTable, to_class_ids     the class set (names, colours, weights, ignore_index) and pixel value ->
                                        class id tables; values encoding no class are named or ignored
  read_image, read_labels               image and label files (PNG / JPEG / WebP through Pillow, GeoTIFF through
                                        rasterio, windowed); every problem is a BadSampleError naming the file
  Tile, SegmentationSource              where a sample's pixels are, and the grain source over a split's tiles:
                                        samples {"image": float32 [T, T, C] (8-bit / 255), "mask": int32 [T, T]
                                        class ids (ignore_index where unlabelled), "index": int32}
  slippy_georef                         a slippy-map tile's EPSG:3857 pixel grid
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import numpy as np

from jaxgeo.data.bigearthnet import IMAGENET_MEAN, IMAGENET_STD
from jaxgeo.data.geotiff import BadSampleError, _describe
from jaxgeo.data.source import SPLITS, field

log = logging.getLogger(__name__)

UNKNOWN = -1  # a pixel value that encodes no class, in a label table
TABLE_SIZE = 1 << 16  # label tables cover 8- and 16-bit label files
EXAMPLES = 5  # how many offending files a construction-time report names

# ---------------------------------------------------------------------------------------------------------------
# Classes and label tables
# ---------------------------------------------------------------------------------------------------------------


def segmentation_config(class_names: Sequence[str], class_colors: Sequence[tuple], tile_size: int):
  """The config.data fields every segmentation dataset has, with this dataset's defaults."""
  import ml_collections

  placeholder = ml_collections.config_dict.placeholder
  c = ml_collections.ConfigDict()
  c.class_names = tuple(class_names)
  c.class_colors = tuple(tuple(rgb) for rgb in class_colors)  # RGB per class: palettes, plots, previews
  c.class_weights = placeholder(tuple)  # None: the training code computes them from the train split
  c.ignore_index = 255  # mask value not scored: unlabelled pixels (and a class id here is not scored either)
  c.unknown_labels = "error"  # a label value that is no class: "error" (names the file) or "ignore"
  c.bands = ("red", "green", "blue")
  c.image_mean = placeholder(tuple)  # None: ImageNet's (of 0..1 RGB)
  c.image_std = placeholder(tuple)
  c.image_scale = placeholder(float)  # None: 8-bit imagery only, / 255; e.g. 10000.0 reads 16-bit tiles
  c.tile_size = int(tile_size)  # every tile of a split is tile_size x tile_size; another size is a bad sample
  return c


def image_options(data_config) -> dict:
  """SegmentationSource's image arguments from config.data: bands, normalisation, scaling."""
  return {
    "bands": tuple(field(data_config, "bands", ("red", "green", "blue"))),
    "image_mean": field(data_config, "image_mean"),
    "image_std": field(data_config, "image_std"),
    "image_scale": field(data_config, "image_scale"),
  }


@dataclasses.dataclass(frozen=True)
class Classes:
  """The class set of a dataset and what to do with label values outside it (from config.data)."""

  names: tuple[str, ...]
  colors: tuple[tuple[int, int, int], ...]
  weights: tuple[float, ...] | None = None
  ignore_index: int = 255
  unknown_labels: str = "error"

  def __post_init__(self):
    n = len(self.names)
    if n < 2:
      raise ValueError(f"data.class_names: expected at least 2 classes, got {self.names!r}")
    if len(self.colors) != n or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in self.colors):
      raise ValueError(f"data.class_colors: expected {n} RGB tuples of 0..255 (one per class), got {self.colors!r}")
    if self.weights is not None and len(self.weights) != n:
      raise ValueError(f"data.class_weights: expected {n} weights (one per class) or None, got {self.weights!r}")
    if not 0 <= self.ignore_index < TABLE_SIZE:  # a class id is allowed: that class is then not scored
      raise ValueError(f"data.ignore_index: expected a value in [0, {TABLE_SIZE}), got {self.ignore_index}")
    if self.unknown_labels not in ("error", "ignore"):
      raise ValueError(f"data.unknown_labels: expected 'error' or 'ignore', got {self.unknown_labels!r}")

  @classmethod
  def from_config(cls, data_config) -> Classes:
    weights = field(data_config, "class_weights")
    return cls(
      names=tuple(field(data_config, "class_names")),
      colors=tuple(tuple(int(v) for v in c) for c in field(data_config, "class_colors")),
      weights=None if weights is None else tuple(float(w) for w in weights),
      ignore_index=int(field(data_config, "ignore_index", 255)),
      unknown_labels=field(data_config, "unknown_labels", "error"),
    )


@dataclasses.dataclass(frozen=True)
class LabelTable:
  """Pixel value in a label file -> class id (UNKNOWN where it encodes none); `expected` says which values do."""

  values: np.ndarray  # int32 [TABLE_SIZE]
  expected: str

  @classmethod
  def identity(cls, num_classes: int) -> LabelTable:
    values = np.full(TABLE_SIZE, UNKNOWN, np.int32)
    values[:num_classes] = np.arange(num_classes)
    return cls(values, f"class ids 0..{num_classes - 1} (data.class_names)")


def to_class_ids(raw: np.ndarray, table: LabelTable, classes: Classes, where: str) -> np.ndarray:
  """Label-file values -> int32 class ids. A value that encodes no class is unlabelled when it equals
  data.ignore_index; any other raises BadSampleError naming `where`, or becomes ignore_index when
  data.unknown_labels = "ignore"."""
  raw = np.asarray(raw)
  if not np.issubdtype(raw.dtype, np.integer) and raw.dtype != np.bool_:
    raise BadSampleError(where, f"label values of dtype {raw.dtype}; expected integer class ids")
  if raw.dtype in (np.uint8, np.uint16, np.bool_):
    ids = table.values[raw.astype(np.intp, copy=False)]
  else:
    inside = (raw >= 0) & (raw < TABLE_SIZE)
    ids = np.where(inside, table.values[np.where(inside, raw, 0)], UNKNOWN)
  unknown = ids == UNKNOWN
  if unknown.any():
    unknown &= raw != classes.ignore_index
    if unknown.any() and classes.unknown_labels == "error":
      values, counts = np.unique(raw[unknown], return_counts=True)
      found = ", ".join(f"{v} ({c} px)" for v, c in list(zip(values.tolist(), counts.tolist()))[:8])
      raise BadSampleError(
        where,
        f"label value(s) {found} encode no class; expected {table.expected} or {classes.ignore_index} "
        "(data.ignore_index). Set data.unknown_labels='ignore' to train with them as ignore_index",
      )
    ids[ids == UNKNOWN] = classes.ignore_index
  return ids.astype(np.int32, copy=False)


# ---------------------------------------------------------------------------------------------------------------
# File readers: every problem is a BadSampleError naming the file
# ---------------------------------------------------------------------------------------------------------------


def _is_tiff(path: str) -> bool:
  return path.lower().endswith((".tif", ".tiff"))


def read_image(path: str, channels: int, window: tuple[int, int, int] | None = None, file_shape=None):
  """-> (pixels [H, W, channels] in the file's dtype, valid bool [H, W] or None when every pixel is valid).

  GeoTIFF through rasterio (`window` = (row, col, size) reads that square of a file of `file_shape` = (height,
  width)); other formats through Pillow as 8-bit RGB (palette and grayscale images as a viewer shows them).
  Alpha 0 and the GeoTIFF's nodata value mark invalid pixels, which become unlabelled in the mask.
  """
  if not os.path.isfile(path):
    raise BadSampleError(path, "missing image file")
  if _is_tiff(path):
    return _read_tiff(path, channels, window, file_shape, what="image")
  if channels != 3:
    raise BadSampleError(path, f"PNG/JPEG/WebP images hold RGB; data.bands names {channels} bands (use GeoTIFF tiles)")
  from PIL import Image

  try:
    with Image.open(path) as img:
      img.load()
      if img.mode in ("I", "I;16", "I;16B", "F"):
        raise BadSampleError(
          path, f"{img.mode} (16/32-bit) image; expected 8-bit RGB (or a GeoTIFF with data.image_scale)"
        )
      transparent = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
      rgba = np.asarray(img.convert("RGBA" if transparent else "RGB"))
  except BadSampleError:
    raise
  except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for truncated or foreign files
    raise BadSampleError(path, f"cannot read image (truncated or corrupt file?): {e}") from e
  return rgba[..., :3], (rgba[..., 3] > 0) if transparent else None


def _read_tiff(path: str, channels: int | None, window, file_shape, what: str):
  import rasterio
  import rasterio.errors
  from rasterio.enums import ColorInterp
  from rasterio.windows import Window

  try:
    with rasterio.open(path) as src:
      if file_shape is not None and src.shape != tuple(file_shape):
        raise BadSampleError(
          path, f"is {src.height}x{src.width}, expected {file_shape[0]}x{file_shape[1]} like its pair"
        )
      if window is not None and (window[0] + window[2] > src.height or window[1] + window[2] > src.width):
        raise BadSampleError(
          path,
          f"is {src.height}x{src.width}, too small for the {window[2]} px tile at row {window[0]}, column {window[1]}",
        )
      region = None if window is None else Window(window[1], window[0], window[2], window[2])
      alpha = [i + 1 for i, c in enumerate(src.colorinterp) if c == ColorInterp.alpha]
      count = src.count - len(alpha)
      if channels is not None and count != channels:
        raise BadSampleError(path, f"has {count} {what} band(s), expected {channels} (data.bands)")
      data = src.read([i for i in range(1, src.count + 1) if i not in alpha], window=region)
      valid = None
      if alpha:
        valid = src.read(alpha[0], window=region) > 0
      elif src.nodata is not None:
        valid = ~np.all(data == src.nodata, axis=0)
  except BadSampleError:
    raise
  except (rasterio.errors.RasterioError, OSError) as e:
    raise BadSampleError(path, f"cannot read as GeoTIFF (truncated or corrupt file?): {_describe(e)}") from e
  return np.moveaxis(data, 0, -1), valid


def read_labels(path: str, window: tuple[int, int, int] | None = None, file_shape=None) -> np.ndarray:
  """Raw label values [H, W] of a single-channel label file (PNG mode P / L / 1 / I;16, or a 1-band GeoTIFF,
  of which `window` = (row, col, size) reads that square of a file of `file_shape`).

  An RGB file whose three channels are equal (a grey mask saved by cv2, as LandCover.ai's split.py does) is
  read as its first channel; one with differing channels is a colour preview, not class ids, and is refused.
  """
  if not os.path.isfile(path):
    raise BadSampleError(path, "missing label file")
  if _is_tiff(path) or window is not None:
    data, _ = _read_tiff(path, None, window, file_shape, what="label")
    if data.shape[-1] != 1:
      raise BadSampleError(path, f"has {data.shape[-1]} bands, expected 1 band of class ids")
    return data[..., 0]
  from PIL import Image

  try:
    with Image.open(path) as img:
      img.load()
      mode, data = img.mode, np.asarray(img)
  except (OSError, ValueError, SyntaxError) as e:
    raise BadSampleError(path, f"cannot read label image (truncated or corrupt file?): {e}") from e
  if mode in ("RGB", "RGBA"):
    if not (np.array_equal(data[..., 0], data[..., 1]) and np.array_equal(data[..., 0], data[..., 2])):
      raise BadSampleError(path, f"{mode} colours, not class ids: expected a single-channel PNG (mode P or L)")
    data = data[..., 0]
  elif mode not in ("P", "L", "1", "I", "I;16", "I;16B"):
    raise BadSampleError(path, f"label image of mode {mode}; expected single-channel class ids (mode P or L)")
  return data


# ---------------------------------------------------------------------------------------------------------------
# The source
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tile:
  """Where one sample's pixels and labels are. Paths may be missing (reading them is then a BadSampleError)."""

  name: str
  image: str
  labels: str  # a label file, or labels.npz when `key` is set
  key: str | None = None  # the npz member holding this tile's labels
  window: tuple[int, int, int] | None = None  # (row, col, size): the tile is that square of image and labels
  file_shape: tuple[int, int] | None = None  # (height, width) both windowed files must have
  xyz: tuple[int, int, int] | None = None  # slippy-map address: georeferenced by it


def report_unpaired(where: str, problems: Sequence[str], on_bad_sample: str) -> None:
  """Construction-time report of tiles missing their image or labels: ValueError in error mode (so a run does
  not die mid-epoch on the first), a warning in skip mode (reading them is then a counted bad sample)."""
  if not problems:
    return
  message = f"{where}: {len(problems)} tile(s) without image or labels, e.g. " + "; ".join(problems[:EXAMPLES])
  if on_bad_sample == "error":
    raise ValueError(message + ". Fix the files, or set data.on_bad_sample='skip' to count them as skipped samples")
  log.warning("%s; data.on_bad_sample='skip': they are counted as skipped samples", message)


class SegmentationSource:
  """grain RandomAccessDataSource over the tiles of one split of a segmentation dataset.

  `source[i]` -> {"image": float32 [T, T, C] (/ 255, or / data.image_scale), "mask": int32 [T, T] class ids,
  ignore_index where unlabelled or the image has no data, "index": int32 i}. Holds only paths and small
  tables; files are opened per read, so it pickles into grain workers.
  """

  label_kind = "segmentation"

  def __init__(
    self,
    *,
    name: str,
    split: str,
    root: str,
    layout: str,
    tiles: Sequence[Tile],
    classes: Classes,
    table: LabelTable | None = None,
    tile_size: int = 256,
    bands: Sequence[str] = ("red", "green", "blue"),
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    image_scale: float | None = None,
  ):
    if split not in SPLITS:
      raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    self.name, self.split, self.root, self.layout = name, split, root, layout
    self.tiles = list(tiles)
    if not self.tiles:
      raise ValueError(
        f"{root}: split {split!r} of the {layout} layout has no tiles; check data.root and the split settings"
      )
    self.names = [t.name for t in self.tiles]
    self.classes = classes
    self.table = table or LabelTable.identity(len(classes.names))
    self.tile_size, self.bands, self.image_scale = int(tile_size), tuple(bands), image_scale
    mean = tuple(image_mean) if image_mean is not None else IMAGENET_MEAN
    std = tuple(image_std) if image_std is not None else IMAGENET_STD
    if len(mean) != len(self.bands) or len(std) != len(self.bands):
      raise ValueError(
        f"data.image_mean / image_std: expected {len(self.bands)} values each (data.bands), got {mean}, {std}"
      )
    self.norm_stats = {"image": (mean, std)}

  class_names = property(lambda self: self.classes.names)
  class_colors = property(lambda self: self.classes.colors)
  class_weights = property(lambda self: self.classes.weights)
  ignore_index = property(lambda self: self.classes.ignore_index)

  def __len__(self) -> int:
    return len(self.tiles)

  def __repr__(self) -> str:
    return f"SegmentationSource({self.describe()})"

  def describe(self) -> str:
    return (
      f"{self.name} ({self.layout} layout) at {self.root}, split {self.split!r}: {len(self)} tiles of "
      f"{self.tile_size}x{self.tile_size}, bands {self.bands}, classes {self.classes.names} "
      f"(ignore_index {self.classes.ignore_index}, unknown labels: {self.classes.unknown_labels})"
    )

  def _check_shape(self, path: str, shape: tuple[int, ...]) -> None:
    if tuple(shape[:2]) != (self.tile_size, self.tile_size):
      raise BadSampleError(
        path, f"tile is {shape[0]}x{shape[1]}, expected {self.tile_size}x{self.tile_size} (data.tile_size)"
      )

  def read_image(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    tile = self.tiles[index]
    pixels, valid = read_image(tile.image, len(self.bands), tile.window, tile.file_shape)
    self._check_shape(tile.image, pixels.shape)
    if self.image_scale is not None:
      return (pixels / np.float32(self.image_scale)).astype(np.float32), valid
    if pixels.dtype != np.uint8:
      raise BadSampleError(
        tile.image,
        f"{pixels.dtype} pixels; expected 8-bit imagery, or set data.image_scale to the value of full brightness",
      )
    return pixels.astype(np.float32) / np.float32(255), valid  # as torchvision's ToTensor

  def read_mask(self, index: int) -> np.ndarray:
    tile = self.tiles[index]
    where = tile.labels if tile.key is None else f"{tile.labels}[{tile.key!r}]"
    raw = (
      _read_npz_labels(tile.labels, tile.key)
      if tile.key is not None
      else read_labels(tile.labels, tile.window, tile.file_shape)
    )
    self._check_shape(where, raw.shape)
    return to_class_ids(raw, self.table, self.classes, where)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    image, valid = self.read_image(index)
    mask = self.read_mask(index)
    if valid is not None:
      mask[~valid] = self.classes.ignore_index
    return {"image": image, "mask": mask, "index": np.int32(index)}

  def problems(self, index: int) -> list[BadSampleError]:
    found = []
    for read in (self.read_image, self.read_mask):
      try:
        read(index)
      except BadSampleError as e:
        found.append(e)
    return found

  def georef(self, index: int):
    """(CRS, affine transform of the tile's pixel grid), or None where the files carry no georeferencing."""
    tile = self.tiles[index]
    if tile.xyz is not None:
      return slippy_georef(tile.xyz, self.tile_size)
    if not _is_tiff(tile.image):
      return None
    import rasterio
    import rasterio.errors
    from affine import Affine

    try:
      with rasterio.open(tile.image) as src:
        if src.crs is None:
          return None
        row, col, _ = tile.window or (0, 0, 0)
        return src.crs, src.transform @ Affine.translation(col, row)
    except (rasterio.errors.RasterioError, OSError) as e:
      raise BadSampleError(tile.image, f"cannot read georeferencing: {_describe(e)}") from e


def _read_npz_labels(path: str, key: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise BadSampleError(path, "missing labels.npz")
  try:
    with np.load(path) as labels:  # no pickles: a labels.npz holds plain arrays
      return labels[key]
  except KeyError:
    raise BadSampleError(path, f"no labels for tile {key!r}") from None
  except (OSError, ValueError) as e:
    raise BadSampleError(path, f"cannot read labels of tile {key!r}: {e}") from e


def slippy_georef(xyz: tuple[int, int, int], tile_size: int):
  """(EPSG:3857, transform) of slippy tile (x, y, z) cut into tile_size pixels, from mercantile's bounds."""
  import mercantile
  from affine import Affine
  from rasterio.crs import CRS

  left, bottom, right, top = mercantile.xy_bounds(*xyz)
  return CRS.from_epsg(3857), Affine((right - left) / tile_size, 0.0, left, 0.0, (bottom - top) / tile_size, top)
