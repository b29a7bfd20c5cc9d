"""Predicting a slippy map `{z}/{x}/{y}.{png,jpg,webp,tif}` tile by tile, with RoboSat's neighbour buffer.

Each T x T tile goes through the model as a (T + 2 * buffer)^2 composite: the tile with a `buffer`-pixel margin
cut from its 8 neighbours (x grows east, y south, as in XYZ tiles), so objects on a tile edge are seen whole; the
prediction is then cropped back to the tile. Where a neighbour is missing (the edge of the covered area), the margin
is the tile mirrored at its edge (numpy "reflect"), not black as in RoboSat (whose code leaves mirroring as an open note):
the model never saw black margins in training, and a black band biases the edge pixels toward dark classes (water,
shadow), while a mirror continues the local texture and statistics. A missing corner next to present sides is the
tile's mirrored corner (it only feeds the receptive field: the margin is cropped away).

Masks go to `out/{z}/{x}/{y}.png`: mode P class ids with the class palette, as RoboSat writes them (readable again
as a jaxgeo "slippy" dataset); pixels without data in the tile (alpha 0, or a GeoTIFF's nodata) are 255, the
palette's transparent entry. `out/preview.png` shows the most common zoom's tiles as one mosaic.
"""

from __future__ import annotations

import collections
import os
import time

import numpy as np

from jaxgeo.data import segmentation
from jaxgeo.data.tiles import IMAGE_EXTENSIONS, list_slippy
from jaxgeo.predict import writers
from jaxgeo.predict.batches import Batcher, Progress

PREVIEW_SIZE = 1200


class _TileReader:
  """Decoded tiles, the last `capacity` kept: tiles go x-column by x-column, so three columns of neighbours cover
  what the next composite needs."""

  def __init__(self, paths: dict, channels: int, capacity: int):
    self.paths, self.channels, self.capacity = paths, channels, capacity
    self.cache = collections.OrderedDict()
    self.size = None

  def __call__(self, key):
    if key in self.cache:
      self.cache.move_to_end(key)
      return self.cache[key]
    path = self.paths[key]
    pixels, valid = segmentation.read_image(path, self.channels)
    if pixels.shape[0] != pixels.shape[1] or (self.size is not None and pixels.shape[0] != self.size):
      raise ValueError(f"{path}: a {pixels.shape[0]} x {pixels.shape[1]} tile among {self.size} px square tiles")
    self.size = pixels.shape[0]
    self.cache[key] = (pixels, valid)
    if len(self.cache) > self.capacity:
      self.cache.popitem(last=False)
    return pixels, valid


def buffered_tile(read, key, present, buffer: int) -> np.ndarray:
  """The (T + 2 * buffer)^2 composite of tile `key` = (x, y, z) and the parts of its neighbours in `present`."""
  x, y, z = key
  centre, _ = read(key)
  size = centre.shape[0]
  if not 0 <= buffer < size:
    raise ValueError(f"--tile-buffer={buffer}: expected 0 <= buffer < the tile size {size}")
  composite = np.pad(centre, ((buffer, buffer), (buffer, buffer), (0, 0)), mode="reflect")
  if buffer == 0:
    return composite
  # (offset in composite, slice of the neighbour) per step -1, 0, +1 along an axis
  parts = {-1: (slice(0, buffer), slice(size - buffer, size)), 0: (slice(buffer, buffer + size), slice(0, size))}
  parts[1] = (slice(buffer + size, size + 2 * buffer), slice(0, buffer))
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      neighbour = (x + dx, y + dy, z)
      if (dx or dy) and neighbour in present:
        pixels, _ = read(neighbour)
        (rows_to, rows_from), (cols_to, cols_from) = parts[dy], parts[dx]
        composite[rows_to, cols_to] = pixels[rows_from, cols_from]
  return composite


class _Mosaic:
  """A small picture of the most common zoom's tiles and their masks, filled in as tiles are predicted."""

  def __init__(self, keys, tile_size: int):
    zooms = collections.Counter(z for _, _, z in keys)
    self.zoom = zooms.most_common(1)[0][0]
    xs = [x for x, _, z in keys if z == self.zoom]
    ys = [y for _, y, z in keys if z == self.zoom]
    self.x0, self.y0 = min(xs), min(ys)
    across, down = max(xs) - self.x0 + 1, max(ys) - self.y0 + 1
    self.step = max(1, -(-max(across, down) * tile_size // PREVIEW_SIZE))
    self.cell = -(-tile_size // self.step)
    self.picture = np.ones((down * self.cell, across * self.cell, 3))
    self.classes = np.zeros((down * self.cell, across * self.cell), np.int64)
    self.valid = np.zeros((down * self.cell, across * self.cell), bool)

  def add(self, key, pixels, classes, valid) -> None:
    x, y, z = key
    if z != self.zoom:
      return
    rows = slice((y - self.y0) * self.cell, (y - self.y0 + 1) * self.cell)
    cols = slice((x - self.x0) * self.cell, (x - self.x0 + 1) * self.cell)
    decimate = (slice(None, None, self.step), slice(None, None, self.step))
    self.picture[rows, cols] = writers.display_rgb(pixels[decimate], valid[decimate])
    self.classes[rows, cols] = classes[decimate]
    self.valid[rows, cols] = valid[decimate]


def predict_tiles(
  predictor,
  forward,
  tiles_dir: str,
  out_dir: str,
  *,
  buffer: int = 32,
  batch_size: int = 8,
  device_count: int = 1,
  preview: bool = True,
  progress: bool = True,
) -> dict:
  """Masks of every tile of the slippy map at tiles_dir into out_dir (see the module docstring); returns
  {"tiles", "tile_size", "preview", "seconds", "tiles_per_s"}."""
  start = time.perf_counter()
  paths = list_slippy(tiles_dir, IMAGE_EXTENSIONS)
  if not paths:
    raise FileNotFoundError(f"--tiles={tiles_dir}: no {{z}}/{{x}}/{{y}}.{{png,jpg,webp,tif}} tiles under it")
  keys = sorted(paths, key=lambda k: (k[2], k[0], k[1]))
  column = max(collections.Counter((x, z) for x, _, z in keys).values())
  read = _TileReader(paths, len(predictor.bands), capacity=min(3 * column + 3, 1024))
  first, _ = read(keys[0])
  size = first.shape[0]
  if predictor.image_scale is None and first.dtype != np.uint8:
    raise ValueError(f"{paths[keys[0]]}: {first.dtype} pixels; the model ({predictor.where}) reads 8-bit imagery")
  if (size + 2 * buffer) % predictor.multiple:
    raise ValueError(
      f"{tiles_dir}: {size} px tiles + 2 x --tile-buffer={buffer} = {size + 2 * buffer} px, not a multiple of the "
      f"model's patch size {predictor.multiple}; choose another buffer"
    )
  batch = -(-max(batch_size, 1) // device_count) * device_count
  meter = Progress(len(keys), f"predict {tiles_dir}", progress, unit="tiles")
  batcher = Batcher(forward, batch, size + 2 * buffer, len(predictor.bands), first.dtype, meter)
  mosaic = _Mosaic(keys, size) if preview else None
  present = set(paths)
  for key in keys:
    composite = buffered_tile(read, key, present, buffer)

    def consume(probabilities, key=key):
      pixels, valid = read(key)
      valid = np.ones(pixels.shape[:2], bool) if valid is None else valid
      classes = np.argmax(probabilities[buffer : buffer + size, buffer : buffer + size], axis=-1).astype(np.uint8)
      classes[~valid] = 255
      x, y, z = key
      writers.save_mask_png(os.path.join(out_dir, str(z), str(x), f"{y}.png"), classes, predictor.class_colors)
      if mosaic is not None:
        mosaic.add(key, pixels, classes, valid)

    batcher.add(composite, consume)
  batcher.close()
  result = {"tiles": len(keys), "tile_size": size, "preview": None}
  if mosaic is not None:
    title = f"{tiles_dir}: zoom {mosaic.zoom}, {len(keys)} tiles"
    result["preview"] = writers.save_preview(
      os.path.join(out_dir, "preview.png"), mosaic.picture, mosaic.classes, mosaic.valid, predictor.class_names,
      predictor.class_colors, title,
    )  # fmt: skip
  result.update(seconds=time.perf_counter() - start, tiles_per_s=meter.rate)
  return result
