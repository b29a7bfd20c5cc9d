"""Reading and writing single GeoTIFF rasters with rasterio, with the checks a training run needs.

Every problem with a file surfaces as `BadSampleError`, whose message starts with the file path, so a run that
meets a broken file among hundreds of thousands says which one and why (and skip mode can count it).
Handles are opened and closed inside each call: nothing here holds a rasterio dataset, so objects that use these
helpers pickle cleanly into grain worker processes.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import rasterio
import rasterio.errors


class BadSampleError(ValueError):
  """A sample that cannot be used; `path` names the file, `problem` says what is wrong with it."""

  def __init__(self, path: str | os.PathLike, problem: str):
    self.path = os.fspath(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}")

  def __reduce__(self):
    # Default exception pickling would call __init__ with the formatted message only; grain worker processes
    # send exceptions back to the trainer by pickling them.
    return (BadSampleError, (self.path, self.problem))


def read_band(
  path: str | os.PathLike,
  *,
  expected_shape: tuple[int, int] | None = None,
  expected_dtype: str | None = "uint16",
  nodata: float | None = None,
) -> np.ndarray:
  """Reads band 1 of a single-band GeoTIFF as a [H, W] array in the file's dtype, or raises BadSampleError.

  `nodata`: value treated as missing when the file declares none. The file's own nodata tag wins, because
  whoever wrote the file knew. NaN pixels are always bad. All problems found are reported together.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise BadSampleError(path, "missing band file")
  try:
    with rasterio.open(path) as src:
      problems = []
      if src.count != 1:
        problems.append(f"has {src.count} bands, expected 1")
      if expected_shape is not None and (src.height, src.width) != tuple(expected_shape):
        problems.append(f"wrong size {src.height}x{src.width}, expected {expected_shape[0]}x{expected_shape[1]}")
      if expected_dtype is not None and src.dtypes[0] != np.dtype(expected_dtype).name:
        problems.append(f"wrong dtype {src.dtypes[0]}, expected {np.dtype(expected_dtype).name}")
      file_nodata = src.nodata
      try:
        data = src.read(1)
      except (rasterio.errors.RasterioError, OSError) as e:
        problems.append(f"unreadable pixel data (truncated or corrupt file): {_describe(e)}")
        raise BadSampleError(path, "; ".join(problems)) from e
  except BadSampleError:
    raise
  except (rasterio.errors.RasterioError, OSError) as e:
    raise BadSampleError(path, f"cannot open as GeoTIFF (truncated or corrupt file): {_describe(e)}") from e

  if np.issubdtype(data.dtype, np.floating):
    num_nan = int(np.count_nonzero(np.isnan(data)))
    if num_nan:
      problems.append(f"{num_nan} NaN pixels")
  missing_value = file_nodata if file_nodata is not None else nodata
  if missing_value is not None and not np.isnan(missing_value):
    num_missing = int(np.count_nonzero(data == missing_value))
    if num_missing:
      problems.append(f"{num_missing} nodata pixels (value {missing_value:g})")
  if problems:
    raise BadSampleError(path, "; ".join(problems))
  return data


def _describe(error: BaseException) -> str:
  # rasterio's read errors say "see previous exception"; the GDAL detail is in the chained cause.
  cause = error.__cause__ or error.__context__
  if cause is None or str(cause) in str(error):
    return str(error)
  return f"{error} ({cause})"


def resize_bilinear(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Bilinear resize of the two leading axes of `image` to `size`, as float32.

  Bilinear, not nearest, to bring 20 m / 60 m Sentinel-2 bands onto the 10 m grid: torchgeo's BigEarthNet
  reader does the same (rasterio Resampling.bilinear), and nearest would stamp 2x2 / 6x6 blocks whose edges
  a patch-based ViT could latch onto as a shortcut. Pixel centres are aligned (align_corners=False), which is
  the geometry of the bands: a 20 m pixel centre lies between four 10 m pixel centres. Values outside the
  image are clamped to the edge, so upsampling never darkens borders.
  """
  out = image.astype(np.float32, copy=False)
  for axis, out_len in enumerate(size[:2]):
    in_len = out.shape[axis]
    if in_len == out_len:
      continue
    coords = (np.arange(out_len, dtype=np.float64) + 0.5) * (in_len / out_len) - 0.5
    coords = np.clip(coords, 0.0, in_len - 1)
    lower = np.floor(coords).astype(np.int64)
    upper = np.minimum(lower + 1, in_len - 1)
    weight_shape = [1] * out.ndim
    weight_shape[axis] = out_len
    weight = (coords - lower).astype(np.float32).reshape(weight_shape)
    below = np.take(out, lower, axis=axis)
    out = below + weight * (np.take(out, upper, axis=axis) - below)  # exact on flat areas, unlike a*(1-w)+b*w
  return out.astype(np.float32, copy=False)


def write_geotiff(path: str | os.PathLike, array: np.ndarray, *, crs, transform, nodata: float | None = None) -> None:
  """Writes a [H, W] or [C, H, W] array as a GeoTIFF with a CRS (e.g. "EPSG:32633") and an affine transform."""
  array = np.asarray(array)
  if array.ndim == 2:
    array = array[None]
  if array.ndim != 3:
    raise ValueError(f"{os.fspath(path)}: expected a [H, W] or [C, H, W] array, got shape {array.shape}")
  count, height, width = array.shape
  with rasterio.open(
    os.fspath(path),
    "w",
    driver="GTiff",
    height=height,
    width=width,
    count=count,
    dtype=array.dtype.name,
    crs=crs,
    transform=transform,
    nodata=nodata,
  ) as dst:
    dst.write(array)
