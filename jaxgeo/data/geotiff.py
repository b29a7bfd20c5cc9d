"""Reading and writing single GeoTIFF rasters with rasterio, with the checks a training run needs.

Every problem with a file surfaces as `BadSampleError`, whose message starts with the file path, so a run that
meets a broken file among hundreds of thousands says which one and why (and skip mode can count it).
Handles are opened and closed inside each call: nothing here holds a rasterio dataset, so objects that use these
helpers pickle cleanly into grain worker processes.
"""

from __future__ import annotations

import functools
import os
from typing import Collection, Sequence

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
    return (type(self), (self.path, self.problem))


def read_band(
  path: str | os.PathLike,
  *,
  expected_shape: tuple[int, int] | Collection[tuple[int, int]] | None = None,
  expected_dtype: str | None = "uint16",
  nodata: float | None = None,
  max_nodata_fraction: float = 0.0,
  min_value: float | None = None,
  fill_nodata: float | None = None,
) -> np.ndarray:
  """Reads band 1 of a single-band GeoTIFF as a [H, W] array in the file's dtype, or raises BadSampleError.

  expected_shape: one (H, W), or a collection of the sizes accepted. expected_dtype: a dtype name, "integer"
  (any integer dtype) or None (any). `nodata`: value treated as missing when the file declares none; the file's
  own nodata tag wins, because whoever wrote the file knew. A band is bad when all of it is nodata or more than
  `max_nodata_fraction` of it is (0: any nodata pixel); the nodata pixels of a band that passes are set to
  `fill_nodata` when given, so a sentinel such as -32768 never reaches a model as a value. min_value: pixels below
  it (nodata aside) are an error. NaN pixels are always bad. All problems found are reported together.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise BadSampleError(path, "missing band file")
  try:
    with rasterio.open(path) as src:
      problems = []
      if src.count != 1:
        problems.append(f"has {src.count} bands, expected 1")
      shapes = _accepted_shapes(expected_shape)
      if shapes and (src.height, src.width) not in shapes:
        expected = " or ".join(f"{h}x{w}" for h, w in shapes)
        problems.append(f"wrong size {src.height}x{src.width}, expected {expected}")
      dtype = np.dtype(src.dtypes[0])
      if expected_dtype == "integer":
        if not np.issubdtype(dtype, np.integer):
          problems.append(f"wrong dtype {dtype.name}, expected an integer dtype")
      elif expected_dtype is not None and dtype != np.dtype(expected_dtype):
        problems.append(f"wrong dtype {dtype.name}, expected {np.dtype(expected_dtype).name}")
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
  missing = None
  if missing_value is not None and not np.isnan(missing_value):
    missing = data == missing_value
    num_missing = int(np.count_nonzero(missing))
    if num_missing and num_missing == data.size:
      problems.append(f"all {data.size} pixels are nodata (value {missing_value:g})")
    elif num_missing > max_nodata_fraction * data.size:
      problems.append(
        f"{num_missing} of {data.size} pixels ({num_missing / data.size:.1%}) are nodata (value "
        f"{missing_value:g}), more than max_nodata_fraction={max_nodata_fraction:g}"
      )
  if min_value is not None and data.size and data.min() < min_value:
    below = data < min_value
    if missing is not None:
      below &= ~missing
    num_below = int(np.count_nonzero(below))
    if num_below:
      problems.append(f"{num_below} pixel(s) below {min_value:g} (lowest {data[below].min():g})")
  if problems:
    raise BadSampleError(path, "; ".join(problems))
  if fill_nodata is not None and missing is not None and fill_nodata != missing_value and missing.any():
    data = np.where(missing, np.asarray(fill_nodata, data.dtype), data)
  return data


def _accepted_shapes(expected_shape) -> list[tuple[int, int]]:
  if expected_shape is None:
    return []
  if len(expected_shape) == 2 and all(isinstance(n, (int, np.integer)) for n in expected_shape):
    expected_shape = [expected_shape]
  return list(dict.fromkeys(tuple(int(n) for n in shape) for shape in expected_shape))  # in order, once each


def _describe(error: BaseException) -> str:
  # rasterio's read errors say "see previous exception"; the GDAL detail is in the chained cause.
  cause = error.__cause__ or error.__context__
  if cause is None or str(cause) in str(error):
    return str(error)
  return f"{error} ({cause})"


def resize_bilinear(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Bilinear resize of the two leading axes of `image` to `size`, as float32 (possibly not C-contiguous).

  Bilinear, not nearest, to bring 20 m / 60 m Sentinel-2 bands onto the 10 m grid: torchgeo's BigEarthNet
  reader does the same (rasterio Resampling.bilinear), and nearest would stamp 2x2 / 6x6 blocks whose edges
  a patch-based ViT could latch onto as a shortcut. Pixel centres are aligned (align_corners=False), which is
  the geometry of the bands: a 20 m pixel centre lies between four 10 m pixel centres. Values outside the
  image are clamped to the edge, so upsampling never darkens borders. The same arithmetic as
  torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False).

  Trailing axes (bands) ride along, so a stack of bands costs one pass per axis, not one per band.
  """
  out = np.asarray(image).astype(np.float32, copy=False)
  if out.shape[0] != size[0]:
    out = _resize_leading_axis(out, size[0])
  if out.shape[1] != size[1]:
    # The second axis is resampled as the leading one of a transposed copy: gathering whole contiguous rows is
    # twice as fast as gathering a few floats at a time along a middle axis.
    out = np.swapaxes(_resize_leading_axis(np.ascontiguousarray(np.swapaxes(out, 0, 1)), size[1]), 0, 1)
  return out


def _resize_leading_axis(image: np.ndarray, out_len: int) -> np.ndarray:
  lower, upper, weight = _bilinear_taps(image.shape[0], out_len)
  below = image[lower]
  step = image[upper]
  step -= below
  step *= weight.reshape((out_len,) + (1,) * (image.ndim - 1))
  below += step  # below + w * (above - below): exact on flat areas, unlike below * (1 - w) + above * w
  return below


@functools.lru_cache(maxsize=64)
def _bilinear_taps(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lower index, upper index, float32 weight of the upper) per output position; computed once per size pair."""
  centres = (np.arange(out_len, dtype=np.float64) + 0.5) * (in_len / out_len) - 0.5
  centres = np.clip(centres, 0.0, in_len - 1)
  lower = np.floor(centres).astype(np.intp)
  upper = np.minimum(lower + 1, in_len - 1)
  weight = (centres - lower).astype(np.float32)
  for array in (lower, upper, weight):
    array.setflags(write=False)  # shared by every call through the cache
  return lower, upper, weight


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
