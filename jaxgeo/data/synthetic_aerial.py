"""Synthetic aerial imagery with a land-cover mask, written in the real on-disk layouts of the segmentation datasets.

`render_scene` draws a piece of countryside at a given ground resolution: fields in strips (each its own crop,
with furrows), woodland (dark, lumpy crowns), water (a lake or a meandering river, dark with ripples), paved
roads (grey, with a dashed centre line) and buildings along them (gable roofs lit on one side or flat roofs with
a parapet, each casting a shadow away from the sun). Classes differ in colour *and* texture, at realistic sizes
in metres, so a segmentation model has something real to learn. The writers cut scenes into the layouts people
download or make with the tools (LandCover.ai v1 and its split.py output, RoboSat slippy maps, SageMaker
channels, Label Maker's labels.npz, a big GeoTIFF scene), each written once into a versioned folder.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import rasterio
import rasterio.warp
from affine import Affine

from jaxgeo.data.geotiff import resize_bilinear, write_geotiff
from jaxgeo.data.source import write_once

_FORMAT_VERSION = 1  # bump when the written data changes, so stale caches are not reused
# Scene classes: LandCover.ai's ids, which the other layouts remap to their own class sets.
BACKGROUND, BUILDING, WOODLAND, WATER, ROAD = range(5)
# Where the synthetic places are (Warsaw), so every layout's coordinates are plausible for its CRS.
LON, LAT = 21.0122, 52.2297

_FIELD_COLORS = np.asarray(
  [(0.36, 0.45, 0.24), (0.70, 0.63, 0.42), (0.52, 0.42, 0.31), (0.46, 0.53, 0.30), (0.60, 0.58, 0.36)], np.float32
)
_ROOF_COLORS = np.asarray([(0.63, 0.29, 0.21), (0.31, 0.31, 0.33), (0.47, 0.34, 0.26), (0.55, 0.20, 0.17)], np.float32)
_FLAT_ROOF = np.asarray((0.72, 0.72, 0.69), np.float32)
_FOREST = np.asarray((0.13, 0.25, 0.10), np.float32)
_WATER = np.asarray((0.10, 0.19, 0.23), np.float32)
_ASPHALT = np.asarray((0.40, 0.40, 0.41), np.float32)


def _noise(rng, shape, cell_px):
  """Smooth unit-scale random field whose features are about `cell_px` pixels across."""
  cells = (max(2, int(shape[0] / cell_px) + 2), max(2, int(shape[1] / cell_px) + 2))
  return resize_bilinear(rng.standard_normal(cells).astype(np.float32), shape) * 1.5


def _fields(rng, grid, gsd):
  # Parcels: strips 20-60 m wide at a random angle, cut into fields 40-150 m long, each its own crop.
  rows, cols = grid
  cos, sin = math.cos(angle := rng.uniform(0, np.pi)), math.sin(angle)  # Python floats keep the math float32
  along, across = cols * cos + rows * sin, rows * cos - cols * sin
  along, across = along - along.min(), across - across.min()
  strip_cuts = np.cumsum(rng.uniform(20, 60, size=int(across.max() / 20) + 2))
  strip = np.searchsorted(strip_cuts, across)
  offsets = rng.uniform(0, 150, size=len(strip_cuts) + 1).astype(np.float32)
  field = ((along + offsets[strip]) * (1.0 / rng.uniform(40, 150))).astype(np.int32)
  fields_per_strip = int(field.max()) + 1
  crop = rng.integers(0, len(_FIELD_COLORS), size=(len(strip_cuts) + 1) * fields_per_strip)
  colour = _FIELD_COLORS[crop] * rng.uniform(0.85, 1.15, size=(len(crop), 1)).astype(np.float32)
  image = np.take(colour, strip.astype(np.int32) * fields_per_strip + field, axis=0)
  furrows = 1.0 + 0.06 * np.sin(along * (2 * np.pi / rng.uniform(1.5, 3.0)))
  shape = rows.shape
  image *= (furrows * (1.0 + 0.08 * _noise(rng, shape, 12 / gsd)) * (1.0 + 0.03 * _normal(rng, shape)))[..., None]
  return image


def _normal(rng, shape):
  """Unit-variance pixel noise; uniform, which is cheaper to draw than Gaussian and looks the same."""
  noise = rng.random(shape, dtype=np.float32)
  noise -= 0.5
  noise *= math.sqrt(12.0)
  return noise


def _woodland(rng, shape, gsd):
  crowns = _noise(rng, shape, 2.5 / gsd) + 0.5 * _noise(rng, shape, 1.2 / gsd)
  shade = np.clip(0.75 + 0.22 * crowns, 0.3, 1.4)  # dark gaps between bright crowns
  return _FOREST * (shade * (1.0 + 0.1 * _noise(rng, shape, 30 / gsd)))[..., None]


def _water(rng, shape, gsd, depth):
  ripples = 1.0 + 0.05 * _noise(rng, shape, 1.5 / gsd) + 0.03 * _normal(rng, shape)
  return _WATER * (ripples * (1.15 - 0.3 * depth))[..., None]


def _road_distance(rng, grid, gsd):
  """(distance in metres from each pixel to a gently curving line through the scene, position along it, the
  line's direction, and `place(t, offset)`: the (row, col) in metres of the point `offset` metres beside it at
  position `t`)."""
  rows, cols = grid
  origin = rng.uniform(0.2, 0.8, size=2) * np.asarray(rows.shape) * gsd
  angle = rng.uniform(0, np.pi)
  direction, normal = np.asarray([np.sin(angle), np.cos(angle)]), np.asarray([np.cos(angle), -np.sin(angle)])
  amplitude, wavelength, phase = rng.uniform(0, 15), rng.uniform(80, 200), rng.uniform(0, 2 * np.pi)
  (o_row, o_col), (d_row, d_col), (n_row, n_col) = (map(float, v) for v in (origin, direction, normal))
  along = (cols - o_col) * d_col + (rows - o_row) * d_row
  across = (cols - o_col) * n_col + (rows - o_row) * n_row
  bend = lambda t: amplitude * np.sin(t / wavelength + phase)
  place = lambda t, offset: origin + t * direction + (bend(t) + offset) * normal
  return np.abs(across - bend(along)), along, angle, place


def _rectangle(rows, cols, centre, angle, length, depth):
  along = (cols - centre[1]) * np.cos(angle) + (rows - centre[0]) * np.sin(angle)
  across = -(cols - centre[1]) * np.sin(angle) + (rows - centre[0]) * np.cos(angle)
  return (np.abs(along) <= length / 2) & (np.abs(across) <= depth / 2), across


def _draw_building(rng, image, classes, centre_px, angle, gsd, sun):
  """Draws one building (roof + shadow) unless it would overlap a road, water or another building."""
  length, depth = rng.uniform(8, 18) / gsd, rng.uniform(7, 12) / gsd
  height = rng.uniform(4, 10) / gsd
  shadow = (sun[0] * height, sun[1] * height)
  reach = int(math.hypot(length, depth) / 2 + abs(shadow[0]) + abs(shadow[1])) + 2
  r0, c0 = int(centre_px[0]) - reach, int(centre_px[1]) - reach
  r1, c1 = int(centre_px[0]) + reach, int(centre_px[1]) + reach
  if r0 < 0 or c0 < 0 or r1 > classes.shape[0] or c1 > classes.shape[1]:
    return False
  rows, cols = np.mgrid[r0:r1, c0:c1].astype(np.float32)
  footprint, across = _rectangle(rows, cols, centre_px, angle, length, depth)
  window = classes[r0:r1, c0:c1]
  clearance, _ = _rectangle(rows, cols, centre_px, angle, length + 3 / gsd, depth + 3 / gsd)
  if np.isin(window[clearance], (BUILDING, ROAD, WATER)).any():
    return False
  cast = np.zeros_like(footprint)
  for step in np.linspace(0.0, 1.0, int(math.hypot(*shadow)) + 2):  # the footprint swept along the sun's ray
    moved, _ = _rectangle(
      rows, cols, (centre_px[0] + step * shadow[0], centre_px[1] + step * shadow[1]), angle, length, depth
    )
    cast |= moved
  cast &= ~footprint & (window != BUILDING)
  patch = image[r0:r1, c0:c1]
  patch[cast] = patch[cast] * np.asarray((0.42, 0.44, 0.52), np.float32)  # skylight keeps shadows bluish
  if rng.random() < 0.25:  # flat roof with a darker parapet
    roof = np.broadcast_to(_FLAT_ROOF * rng.uniform(0.85, 1.1), patch.shape).copy()
    inner, _ = _rectangle(rows, cols, centre_px, angle, length - 1.2 / gsd, depth - 1.2 / gsd)
    roof[~inner] *= 0.7
  else:  # gable roof: the ridge runs along the long side, one slope faces the sun
    colour = _ROOF_COLORS[rng.integers(len(_ROOF_COLORS))] * rng.uniform(0.85, 1.15)
    lit = np.where(across < 0, 1.12, 0.78)[..., None]
    ridge = np.where(np.abs(across) < 0.25 / gsd, 1.2, 1.0)[..., None]
    roof = colour * lit * ridge
  roof = roof * (1.0 + 0.04 * _normal(rng, footprint.shape))[..., None]
  patch[footprint] = roof[footprint]
  window[footprint] = BUILDING
  return True


def render_scene(rng: np.random.Generator, height: int, width: int, gsd: float) -> tuple[np.ndarray, np.ndarray]:
  """-> (RGB uint8 [H, W, 3] with values 1..255, classes uint8 [H, W] in LandCover.ai ids) at `gsd` m / pixel.

  Value 0 never occurs in the image, so writers can use it as nodata.
  """
  shape = (int(height), int(width))
  grid = tuple(np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32) * np.float32(gsd))  # (rows, cols) in m
  image = _fields(rng, grid, gsd)
  classes = np.zeros(shape, np.uint8)
  forest = _noise(rng, shape, 120 / gsd) + 0.3 * _noise(rng, shape, 25 / gsd) > rng.uniform(0.3, 1.2)
  np.copyto(image, _woodland(rng, shape, gsd), where=forest[..., None])
  classes[forest] = WOODLAND
  if rng.random() < 0.6:  # a lake, or a river
    level = _noise(rng, shape, 150 / gsd)
    water = level > rng.uniform(1.0, 1.6)
    depth = np.clip(level - level[water].min() if water.any() else level, 0, 1)
  else:
    distance, *_ = _road_distance(rng, grid, gsd)  # a river winds like a road
    half_width = rng.uniform(6, 14)
    water = distance < half_width
    depth = np.clip(1.0 - distance / half_width, 0, 1)
  np.copyto(image, _water(rng, shape, gsd, depth), where=water[..., None])
  classes[water] = WATER
  azimuth = rng.uniform(-0.6, 0.6)  # midday sun from the south: shadows point north (up), a little aside
  sun = rng.uniform(0.3, 0.7) * np.asarray([-np.cos(azimuth), np.sin(azimuth)])
  roads = []
  for _ in range(rng.integers(1, 4)):
    distance, along, angle, place = _road_distance(rng, grid, gsd)
    half_width = rng.uniform(2.5, 3.5)
    road = distance < half_width
    asphalt = _ASPHALT * rng.uniform(0.85, 1.15) * (1.0 + 0.05 * _normal(rng, (int(road.sum()), 1)))
    dashes = (distance[road] < 0.15) & (np.mod(along[road], 6.0) < 3.0)
    image[road] = np.where(dashes[:, None], np.float32(0.85), asphalt)
    classes[road] = ROAD
    roads.append((half_width, angle, place))
  span = math.hypot(*shape) * gsd
  for half_width, angle, place in roads:  # houses line the roads on both sides, a few metres back, facing them
    for t in np.arange(-span / 2, span / 2, rng.uniform(16, 30)):
      for side in (-1, 1):
        if rng.random() < 0.35:
          continue
        offset = side * (half_width + rng.uniform(9, 16))
        _draw_building(rng, image, classes, place(t, offset) / gsd, angle + rng.normal(0, 0.05), gsd, sun)
  for _ in range(rng.integers(0, 6)):  # farmsteads away from the roads
    centre = rng.uniform(0, 1, size=2) * np.asarray(shape)
    _draw_building(rng, image, classes, centre, rng.uniform(0, np.pi), gsd, sun)
  image *= rng.uniform(0.85, 1.15)
  image += 0.012 * _normal(rng, image.shape)
  return np.clip(np.round(image * 255), 1, 255).astype(np.uint8), classes


# ---------------------------------------------------------------------------------------------------------------
# Writers: each dataset in its real layout, written once into a versioned folder
# ---------------------------------------------------------------------------------------------------------------


def _save_png(path: str, array: np.ndarray, palette: np.ndarray | None = None) -> None:
  from PIL import Image

  img = Image.fromarray(np.ascontiguousarray(array))
  if palette is not None:  # an 8-bit grey image with a palette is saved as mode P, as RoboSat writes masks
    img.putpalette(palette.astype(np.uint8).ravel().tolist())
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path)


def _save_jpeg(path: str, rgb: np.ndarray, quality: int = 90) -> None:
  from PIL import Image

  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.ascontiguousarray(rgb)).save(path, quality=quality)


def _palette(colors_by_value: dict[int, tuple[int, int, int]]) -> np.ndarray:
  palette = np.zeros((256, 3), np.uint8)
  for value, rgb in colors_by_value.items():
    palette[value] = rgb
  return palette


def write_synthetic_landcoverai(
  directory: str | os.PathLike,
  *,
  num_orthophotos: int = 4,
  height: int = 1030,
  width: int = 1100,
  tile_size: int = 512,
  seed: int = 0,
) -> str:
  """A LandCover.ai v1 archive, unpacked and already split: `images/<sheet>.tif` (RGB uint8, EPSG:2180, 25 cm;
  every fourth at 50 cm as in the real set), `masks/<sheet>.tif` (1 band, classes 0..4), `train.txt`,
  `val.txt`, `test.txt` (tile ids `<sheet>_<k>` numbered as split.py numbers them) and `output/` (what split.py
  writes: `<sheet>_<k>.jpg` at cv2's default quality 95 and `<sheet>_<k>_m.png`, the mask as 3 equal
  channels). Orthophoto sizes vary a little around height x width, so grids differ. Returns the root."""
  from jaxgeo.data import landcoverai

  def write(root):
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(num_orthophotos):
      sheet = f"M-34-{51 + i // 16}-C-{'abcd'[i // 4 % 4]}-{i % 4 + 1}-{i // 2 % 4 + 1}"
      gsd = 0.5 if i % 4 == 3 else 0.25
      rows, cols = height + 13 * (i % 3), width + 7 * (i % 2)
      rgb, classes = render_scene(rng, rows, cols, gsd)
      transform = Affine(gsd, 0.0, 637000.0 + 600.0 * i, 0.0, -gsd, 487000.0)
      write_geotiff(
        _mkdirs(root, "images", f"{sheet}.tif"), rgb.transpose(2, 0, 1), crs="EPSG:2180", transform=transform
      )
      write_geotiff(_mkdirs(root, "masks", f"{sheet}.tif"), classes, crs="EPSG:2180", transform=transform)
      for k, row, col in landcoverai.grid_cells(rows, cols, tile_size):
        window = (slice(row, row + tile_size), slice(col, col + tile_size))
        _save_jpeg(os.path.join(root, "output", f"{sheet}_{k}.jpg"), rgb[window], quality=95)
        _save_png(os.path.join(root, "output", f"{sheet}_{k}_m.png"), np.repeat(classes[window][..., None], 3, -1))
        ids.append(f"{sheet}_{k}")
    order = rng.permutation(len(ids))
    cuts = (max(1, int(0.7 * len(ids))), max(2, int(0.85 * len(ids))))
    for name, part in zip(("train", "val", "test"), np.split(order, cuts)):
      with open(os.path.join(root, f"{name}.txt"), "w") as f:
        f.writelines(f"{ids[j]}\n" for j in sorted(part))

  folder = f"landcoverai_v{_FORMAT_VERSION}_n{num_orthophotos}_{height}x{width}_t{tile_size}_s{seed}"
  return write_once(directory, folder, write)


def _mkdirs(*parts: str) -> str:
  os.makedirs(os.path.join(*parts[:-1]), exist_ok=True)
  return os.path.join(*parts)


def _tile_block(zoom: int, grid: tuple[int, int]):
  """(first tile (x, y), ground metres per pixel) of a block of grid = (columns, rows) 256 px tiles at zoom."""
  import mercantile

  first = mercantile.tile(LON, LAT, zoom)
  left, _, right, _ = mercantile.xy_bounds(first)
  return (first.x, first.y), (right - left) / 256 * math.cos(math.radians(LAT))


def _cut(scene: np.ndarray, grid: tuple[int, int], size: int = 256):
  """(column, row, tile) for each size x size tile of `scene`, row-major."""
  for row in range(grid[1]):
    for col in range(grid[0]):
      yield col, row, scene[row * size : (row + 1) * size, col * size : (col + 1) * size]


def write_synthetic_slippy(
  directory: str | os.PathLike,
  *,
  zoom: int = 18,
  grid: tuple[int, int] = (8, 6),
  colors: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (255, 128, 0)),
  seed: int = 0,
) -> str:
  """A RoboSat slippy-map dataset of buildings: `images/{z}/{x}/{y}.jpg` and `labels/{z}/{x}/{y}.png` (mode P,
  0 background / 1 building, palette from `colors`), grid = (columns, rows) tiles of 256 px at `zoom`,
  covering a block of Warsaw. Returns the root."""

  def write(root):
    (x0, y0), gsd = _tile_block(zoom, grid)
    rgb, classes = render_scene(np.random.default_rng(seed), grid[1] * 256, grid[0] * 256, gsd)
    building = (classes == BUILDING).astype(np.uint8)
    palette = _palette(dict(enumerate(colors)))
    for (col, row, image), (_, _, labels) in zip(_cut(rgb, grid), _cut(building, grid)):
      x, y = x0 + col, y0 + row
      _save_jpeg(os.path.join(root, "images", str(zoom), str(x), f"{y}.jpg"), image)
      _save_png(os.path.join(root, "labels", str(zoom), str(x), f"{y}.png"), labels, palette)

  return write_once(directory, f"slippy_v{_FORMAT_VERSION}_z{zoom}_{grid[0]}x{grid[1]}_s{seed}", write)


# SageMaker encodings of the synthetic channels: train by a "map" (class id -> pixel value), validation by a
# "scale" (pixel = class * 3), the two label-map forms of the SageMaker documentation.
SAGEMAKER_TRAIN_MAP = {"0": 10, "1": 20, "2": 30, "3": 40, "4": 50}
SAGEMAKER_VALIDATION_SCALE = 3


def write_synthetic_folders(
  directory: str | os.PathLike,
  *,
  grid: tuple[int, int] = (8, 6),
  colors: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (97, 74, 74), (38, 115, 0), (0, 197, 255), (207, 207, 207)),
  seed: int = 0,
) -> str:
  """SageMaker semantic-segmentation channels of 256 px tiles at 30 cm with the 5 scene classes: `train/*.jpg`,
  `train_annotation/*.png` (mode P), `validation/`, `validation_annotation/` (every fifth tile) and
  `label_map/{train,validation}_label_map.json` in both forms (SAGEMAKER_TRAIN_MAP, SAGEMAKER_VALIDATION_SCALE).
  Returns the root."""

  def write(root):
    rgb, classes = render_scene(np.random.default_rng(seed), grid[1] * 256, grid[0] * 256, 0.3)
    encode = {
      "train": np.asarray([SAGEMAKER_TRAIN_MAP[str(c)] for c in range(len(colors))], np.uint8),
      "validation": np.arange(len(colors), dtype=np.uint8) * SAGEMAKER_VALIDATION_SCALE,
    }
    for (col, row, image), (_, _, labels) in zip(_cut(rgb, grid), _cut(classes, grid)):
      channel = "validation" if (row * grid[0] + col) % 5 == 4 else "train"
      stem = f"aerial_{row:03d}_{col:03d}"
      palette = _palette({int(v): rgb_ for v, rgb_ in zip(encode[channel], colors)})
      _save_jpeg(os.path.join(root, channel, f"{stem}.jpg"), image)
      _save_png(os.path.join(root, f"{channel}_annotation", f"{stem}.png"), encode[channel][labels], palette)
    os.makedirs(os.path.join(root, "label_map"))
    with open(os.path.join(root, "label_map", "train_label_map.json"), "w") as f:
      json.dump({"map": SAGEMAKER_TRAIN_MAP}, f)
    with open(os.path.join(root, "label_map", "validation_label_map.json"), "w") as f:
      json.dump({"scale": str(SAGEMAKER_VALIDATION_SCALE)}, f)

  return write_once(directory, f"sagemaker_v{_FORMAT_VERSION}_{grid[0]}x{grid[1]}_s{seed}", write)


LABELMAKER_SEED = 42  # the `seed` of the synthetic Label Maker config.json


def write_synthetic_labelmaker(
  directory: str | os.PathLike, *, zoom: int = 17, grid: tuple[int, int] = (8, 6), seed: int = 0
) -> str:
  """A Label Maker segmentation folder (`label-maker labels` + `images`): `labels.npz` (key "x-y-z" -> 256 x 256
  class ids: 0 background, 1 building, 2 road), `tiles/{x}-{y}-{z}.jpg` for every tile with a class pixel and
  half the background ones (Label Maker skips the others), `labels/{x}-{y}-{z}.png` RGB previews for tiles
  with class pixels, and the `config.json` they came from. Returns the root."""

  def write(root):
    (x0, y0), gsd = _tile_block(zoom, grid)
    rng = np.random.default_rng(seed)
    rgb, classes = render_scene(rng, grid[1] * 256, grid[0] * 256, gsd)
    ids = np.zeros_like(classes)
    ids[classes == BUILDING], ids[classes == ROAD] = 1, 2
    preview = np.asarray([(0, 0, 0), (255, 128, 0), (207, 207, 207)], np.uint8)
    labels = {}
    for (col, row, image), (_, _, tile_ids) in zip(_cut(rgb, grid), _cut(ids, grid)):
      key = f"{x0 + col}-{y0 + row}-{zoom}"
      # Label Maker's arrays: int64 zeros for tiles without features, rasterize's uint8 for the others.
      labels[key] = tile_ids.copy() if tile_ids.any() else np.zeros((256, 256), np.int64)
      if tile_ids.any() or rng.random() < 0.5:
        _save_jpeg(os.path.join(root, "tiles", f"{key}.jpg"), image)
      if tile_ids.any():
        _save_png(os.path.join(root, "labels", f"{key}.png"), preview[tile_ids])
    np.savez(os.path.join(root, "labels.npz"), **labels)
    import mercantile

    west, north = mercantile.ul(x0, y0, zoom)
    east, south = mercantile.ul(x0 + grid[0], y0 + grid[1], zoom)
    config = {
      "country": "poland",
      "bounding_box": [west + 1e-6, south + 1e-6, east - 1e-6, north - 1e-6],
      "zoom": zoom,
      "classes": [
        {"name": "Buildings", "filter": ["has", "building"]},
        {"name": "Roads", "filter": ["has", "highway"]},
      ],
      "imagery": "https://tiles.example.com/{z}/{x}/{y}.jpg",
      "background_ratio": 1,
      "ml_type": "segmentation",
      "seed": LABELMAKER_SEED,
      "split_names": ["train", "validation", "test"],
      "split_vals": [0.7, 0.15, 0.15],
    }
    with open(os.path.join(root, "config.json"), "w") as f:
      json.dump(config, f, indent=2)

  return write_once(directory, f"labelmaker_v{_FORMAT_VERSION}_z{zoom}_{grid[0]}x{grid[1]}_s{seed}", write)


def write_synthetic_scene(
  directory: str | os.PathLike,
  *,
  crs: str = "EPSG:32634",
  height: int = 1536,
  width: int = 2048,
  gsd: float = 0.3,
  seed: int = 0,
) -> tuple[str, str]:
  """A big georeferenced scene for windowed prediction: (image path, mask path).

  The image is an RGB uint8 GeoTIFF (tiled 256, deflate) in `crs` (a metric CRS, e.g. a UTM zone, or
  EPSG:3857, whose units are scaled by 1 / cos(latitude)) at `gsd` ground metres per pixel, over Warsaw. A
  wedge beyond a slanted swath edge on the right holds no data (0 in every band, the declared nodata). The mask
  is its ground truth (uint8, LandCover.ai classes 0..4, 255 = nodata where the image has none).
  """
  from rasterio.crs import CRS

  target = CRS.from_user_input(crs)
  if target.is_geographic or (target.linear_units or "").lower() not in ("metre", "meter", "metres"):
    raise ValueError(f"crs={crs!r}: expected a projected CRS in metres (a UTM zone or EPSG:3857)")

  def write(root):
    rgb, classes = render_scene(np.random.default_rng(seed), height, width, gsd)
    rows, cols = np.mgrid[0:height, 0:width]
    outside = cols > 0.8 * width + 0.25 * (height - rows)  # beyond the swath edge
    rgb[outside], classes[outside] = 0, 255
    (x,), (y,) = rasterio.warp.transform("EPSG:4326", target, [LON], [LAT])
    pixel = gsd / math.cos(math.radians(LAT)) if target.to_epsg() == 3857 else gsd
    transform = Affine(pixel, 0.0, x - width / 2 * pixel, 0.0, -pixel, y + height / 2 * pixel)
    profile = dict(driver="GTiff", height=height, width=width, crs=target, transform=transform, tiled=True)
    profile.update(blockxsize=256, blockysize=256, compress="deflate")
    with rasterio.open(os.path.join(root, "scene.tif"), "w", count=3, dtype="uint8", nodata=0, **profile) as dst:
      dst.write(rgb.transpose(2, 0, 1))
    with rasterio.open(os.path.join(root, "scene_mask.tif"), "w", count=1, dtype="uint8", nodata=255, **profile) as dst:
      dst.write(classes[None])

  tag = crs.replace(":", "").lower()
  root = write_once(directory, f"scene_v{_FORMAT_VERSION}_{tag}_{height}x{width}_g{gsd:g}_s{seed}", write)
  return os.path.join(root, "scene.tif"), os.path.join(root, "scene_mask.tif")
