"""Whole GeoTIFF scenes -> class map COG (+ probabilities COG, polygons, preview), read and written in windows.

One scene, `predict_scene`:
  1. bands and scale as the model was trained (bands.py), or an error naming the scene and the model
  2. the window grid (blend.py); strips of columns as wide as `max_memory_mb` allows (usually the whole width)
  3. per strip, per row of windows: the rows are read once with rasterio (pixels and GDAL's dataset mask, which
     covers the nodata value, alpha bands and internal masks), windows cut from them are batched, padded to a
     multiple of the device count and run through the jitted forward; the host blends one batch while the devices
     compute the next
  4. rows no later window reaches are finished: argmax -> class ids (uint8, or uint16 beyond 255 classes), nodata
     where the scene has none; with `probabilities`, every class's probability as uint8 (p * 254, 255 = nodata)
  5. whole rows of blocks go into working GeoTIFFs, which GDAL's COG driver then lays out (writers.py)
The output keeps the scene's CRS, transform and size; the class map carries the class colours as its colour
table, "class" as band description and the class names as a tag.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np

from jaxgeo.predict import bands as bands_lib
from jaxgeo.predict import blend, writers
from jaxgeo.predict.batches import Batcher, Progress

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Options:
  window: int | None = None  # None: the size the model was trained at
  overlap: int | None = None  # None: a quarter of the window
  batch_size: int = 8  # windows per step (rounded up to a multiple of the device count)
  tta: bool = False  # D4 test-time augmentation (8 x the compute)
  probabilities: bool = False  # also write every class's probability
  max_memory_mb: float = 1024.0  # for the blending buffers; the scene is cut into strips to stay under it
  bands: tuple[str, ...] | None = None  # scene band numbers or names, in the model's order
  polygons: str | None = None  # GeoJSON path
  polygon_classes: tuple[str, ...] | None = None  # names or ids; None: every class but class 0 (background)
  simplify: float = 1.0  # Douglas-Peucker tolerance in pixels
  min_area: float = 0.0  # m^2
  preview: bool = True
  progress: bool = True


def chosen_classes(class_names, requested) -> list[int]:
  """Class ids for polygons from names or ids; default every class but 0 (background in every tile format)."""
  if not requested:
    return list(range(1, len(class_names)))
  ids = []
  for token in requested:
    token = str(token).strip()
    if token.isdigit() and int(token) < len(class_names):
      ids.append(int(token))
    elif token in class_names:
      ids.append(list(class_names).index(token))
    else:
      raise ValueError(f"--polygon-classes: {token!r} is not a class of the model {tuple(class_names)} (or its id)")
  return sorted(set(ids))


def _read_rows(src, indexes, row: int, height: int, left: int, right: int):
  from rasterio.windows import Window

  window = Window(left, row, right - left, height)
  pixels = np.moveaxis(src.read(indexes, window=window), 0, -1)
  valid = src.dataset_mask(window=window) > 0
  return pixels, valid


def predict_scene(predictor, forward, input_path: str, out_path: str, options: Options, device_count: int = 1) -> dict:
  """Predicts one scene into `out_path` (a COG) and its companions; returns what was written and measured:
  {"classes", "probabilities", "polygons", "preview": paths or None, "windows", "windows_computed", "strips",
  "strip_width", "buffer_bytes" (peak of the blending band + input rows + output rows), "seconds",
  "windows_per_s", "polygon_count"}."""
  import rasterio

  start = time.perf_counter()
  src = rasterio.open(input_path)
  try:
    indexes = bands_lib.select_bands(src, input_path, predictor.bands, predictor.where, options.bands)
    dtypes = {src.dtypes[i - 1] for i in indexes}
    if len(dtypes) != 1:
      raise ValueError(f"{input_path}: the chosen bands {indexes} have different data types {sorted(dtypes)}")
    dtype = np.dtype(dtypes.pop())
    bands_lib.check_scale(dtype, input_path, predictor.image_scale, predictor.where)
    if dtype == np.float64:
      dtype = np.dtype(np.float32)
    window = int(options.window or predictor.window)
    if window % predictor.multiple:
      raise ValueError(f"--window={window}: expected a multiple of the model's patch size {predictor.multiple}")
    overlap = window // 4 if options.overlap is None else int(options.overlap)
    grid = blend.Grid(src.height, src.width, window, overlap)
    num_classes = predictor.num_classes
    class_dtype, class_nodata = (np.uint8, 255) if num_classes <= 255 else (np.uint16, 65535)
    polygon_ids = chosen_classes(predictor.class_names, options.polygon_classes) if options.polygons else []
    if polygon_ids and src.crs is None:
      raise ValueError(f"{input_path}: no CRS, so --polygons cannot place its polygons in WGS84")
    if polygon_ids and max(polygon_ids) >= 255:
      raise ValueError(f"--polygons: class ids up to 254 can be vectorised, got {max(polygon_ids)}")
    out_bytes = (
      np.dtype(class_dtype).itemsize + (num_classes if options.probabilities else 0) + (2 if polygon_ids else 0)
    )
    budget = int(options.max_memory_mb * 2**20)
    per_pixel_in = len(indexes) * dtype.itemsize + 1  # + the dataset mask
    buffers = dict(
      size=window, height=src.height, num_classes=num_classes, pixel_bytes=per_pixel_in, out_bytes=out_bytes,
      block=writers.BLOCK,
    )  # fmt: skip
    strip_width = blend.strip_width_for_budget(budget, **buffers)
    narrowest = min(writers.BLOCK, src.width)
    if strip_width < narrowest:
      need = blend.strip_bytes(narrowest, **buffers) / 2**20
      raise ValueError(
        f"--max-memory-mb={options.max_memory_mb:g} is too small for {window} px windows of {num_classes} classes over "
        f"{len(indexes)} bands: a strip of {narrowest} columns needs {need:.1f} MB; raise it or lower --window"
      )
    column_strips = blend.strips(src.width, strip_width, writers.BLOCK)
    layout = dict(strip_width=column_strips[0][1], strips=len(column_strips), windows=len(grid))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".jaxgeo-predict-", dir=os.path.dirname(os.path.abspath(out_path)))
    try:
      result = _predict_strips(
        src, predictor, forward, indexes, dtype, grid, column_strips, work, out_path, options, device_count,
        class_dtype, class_nodata, polygon_ids,
      )  # fmt: skip
    finally:
      shutil.rmtree(work, ignore_errors=True)
  finally:
    src.close()
  result.update(layout)
  result["seconds"] = time.perf_counter() - start
  return result


def _companion(out_path: str, suffix: str) -> str:
  stem, _ = os.path.splitext(out_path)
  return f"{stem}{suffix}"


def _predict_strips(
  src, predictor, forward, indexes, dtype, grid, column_strips, work, out_path, options, device_count,
  class_dtype, class_nodata, polygon_ids,
):  # fmt: skip
  import warnings

  from rasterio.errors import NotGeoreferencedWarning

  names, num_classes = predictor.class_names, predictor.num_classes
  colormap = {i: tuple(c) + (255,) for i, c in enumerate(predictor.class_colors)} if class_dtype == np.uint8 else None
  common = dict(height=src.height, width=src.width, crs=src.crs, transform=src.transform)
  if src.crs is None:
    log.warning("%s has no CRS: the outputs keep its pixel grid but say nothing about where it is", src.name)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", NotGeoreferencedWarning)
    outputs = {
      "classes": writers.working_raster(
        os.path.join(work, "classes.tif"), count=1, dtype=class_dtype, nodata=class_nodata, colormap=colormap,
        descriptions=["class"], tags={"class_names": json.dumps(list(names)), "source": os.path.basename(src.name)},
        **common,
      )
    }  # fmt: skip
    if options.probabilities:
      outputs["probabilities"] = writers.working_raster(
        os.path.join(work, "probabilities.tif"), count=num_classes, dtype=np.uint8, nodata=255,
        descriptions=[f"p({n})" for n in names], tags={"scale": "probability = value / 254; 255 = no data"}, **common,
      )  # fmt: skip
    if polygon_ids:
      outputs["vector"] = writers.working_raster(
        os.path.join(work, "vector.tif"), count=2, dtype=np.uint8, nodata=None, **common
      )
  batch = -(-max(options.batch_size, 1) // device_count) * device_count
  computed = sum(len(grid.rows) * len(grid.strip_cols(left, right)) for left, right in column_strips)
  progress = Progress(computed, f"predict {os.path.basename(src.name)}", options.progress)
  batcher = Batcher(forward, batch, grid.size, len(indexes), dtype, progress)
  chosen = np.zeros(num_classes, bool)
  chosen[polygon_ids] = True
  peak, grid_rows = 0, grid.rows
  try:
    for left, right in column_strips:
      cols = grid.strip_cols(left, right)
      read_left, read_right = cols[0], min(cols[-1] + grid.size, src.width)
      band = blend.RowBand(min(grid.size, src.height), left, right, num_classes)
      rows_out = writers.BlockRowWriter(outputs, left)
      for r, row in enumerate(grid_rows):
        height = min(grid.size, src.height - row)
        pixels, valid = _read_rows(src, indexes, row, height, read_left, read_right)
        next_top = grid_rows[r + 1] if r + 1 < len(grid_rows) else src.height
        peak = max(peak, band.nbytes + pixels.nbytes + valid.nbytes + rows_out.peak)
        finished_valid = valid[: next_top - row, left - read_left : right - read_left]

        def finish(band=band, next_top=next_top, finished_valid=finished_valid, rows_out=rows_out):
          probabilities = band.advance(next_top)
          rows_out.add(_finished_rows(probabilities, finished_valid, class_dtype, class_nodata, options, chosen))

        for k, col in enumerate(cols):
          piece = pixels[:, col - read_left : col - read_left + grid.size]

          last = k == len(cols) - 1

          def consume(probabilities, row=row, col=col, band=band, last=last, finish=finish):
            band.add(row, col, probabilities, grid.weights(row, col))
            if last:
              finish()

          batcher.add(blend.pad_window(piece, grid.size), consume)
      batcher.close()
      rows_out.close()
      peak = max(peak, band.nbytes + rows_out.peak)
  finally:
    for dst in outputs.values():
      dst.close()
  result = {"classes": out_path, "probabilities": None, "polygons": None, "preview": None, "polygon_count": None}
  result.update(buffer_bytes=peak, windows_computed=computed, windows_per_s=progress.rate)
  writers.to_cog(os.path.join(work, "classes.tif"), out_path, "MODE")
  if options.probabilities:
    result["probabilities"] = _companion(out_path, "_probabilities.tif")
    writers.to_cog(os.path.join(work, "probabilities.tif"), result["probabilities"], "AVERAGE")
  if polygon_ids:
    from jaxgeo.predict import vector

    features = vector.polygon_features(
      os.path.join(work, "vector.tif"), names, simplify=options.simplify, min_area=options.min_area
    )
    result["polygons"] = options.polygons
    result["polygon_count"] = vector.write_geojson(options.polygons, features, name=os.path.basename(src.name))
  if options.preview:
    result["preview"] = write_scene_preview(src, indexes, out_path, predictor, _companion(out_path, "_preview.png"))
  return result


def _finished_rows(probabilities, valid, class_dtype, class_nodata, options, chosen) -> dict:
  """Blended probabilities [n, w, C] of finished rows -> the arrays the working rasters take."""
  classes = np.argmax(probabilities, axis=-1).astype(class_dtype)
  classes[~valid] = class_nodata
  rows = {"classes": classes}
  if options.probabilities:
    quantised = np.rint(probabilities * 254).astype(np.uint8)
    quantised[~valid] = 255
    rows["probabilities"] = quantised
  if chosen.any():
    selected = np.where(chosen[classes.clip(0, len(chosen) - 1)] & valid, classes.astype(np.int32) + 1, 0)
    confidence = np.rint(probabilities.max(axis=-1) * 254)
    rows["vector"] = np.stack([selected, confidence], axis=-1).astype(np.uint8)
  return rows


def write_scene_preview(src, indexes, out_path: str, predictor, path: str, max_size: int = 1200) -> str:
  """The scene, downsampled to at most max_size px (GDAL reads through overviews where there are some), with the
  class map of out_path over it and a legend."""
  from rasterio.enums import Resampling

  scale = min(1.0, max_size / max(src.height, src.width))
  shape = (max(1, round(src.height * scale)), max(1, round(src.width * scale)))
  names = [n.lower() for n in predictor.bands]
  shown = (
    [indexes[names.index(c)] for c in ("red", "green", "blue")]
    if {"red", "green", "blue"} <= set(names)
    else indexes[:3]
  )
  if len(shown) == 2:
    shown = shown[:1]
  pixels = np.moveaxis(src.read(shown, out_shape=(len(shown),) + shape, resampling=Resampling.average), 0, -1)
  valid = src.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
  import rasterio

  with rasterio.open(out_path) as classes_src:
    classes = classes_src.read(1, out_shape=shape, resampling=Resampling.nearest)
  title = f"{os.path.basename(src.name)} -> {os.path.basename(out_path)} ({src.width} x {src.height} px)"
  return writers.save_preview(
    path, writers.display_rgb(pixels, valid), classes.astype(np.int64), valid, predictor.class_names,
    predictor.class_colors, title,
  )  # fmt: skip
