"""Output files: Cloud-Optimised GeoTIFFs (and a check that a file is one), palette PNG masks, preview pictures.

COG: finished rows go into a tiled, compressed working GeoTIFF in whole blocks (`BlockRowWriter`); GDAL's COG
driver then copies it into the final layout (IFDs first, overviews smallest-first, tiled, DEFLATE) block by block,
building the overviews on the way (MODE for class maps, AVERAGE for probabilities), into `<out>.partial` renamed
over `<out>` at the end, so an interrupted run never leaves a file that looks complete. No dependency beyond
rasterio's GDAL (>= 3.1 has the COG driver); `cog_problems` checks the layout the way GDAL's
validate_cloud_optimized_geotiff.py does.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

BLOCK = 256  # the working file's block: strips are multiples of it, so every block is written once, whole
COG_BLOCK = 512  # GDAL's COG default


def working_raster(
  path: str,
  *,
  height: int,
  width: int,
  count: int,
  dtype,
  nodata,
  crs,
  transform,
  colormap=None,
  descriptions=None,
  tags=None,
):
  """A tiled, DEFLATE-compressed GeoTIFF open for writing (the input of to_cog)."""
  profile = dict(driver="GTiff", height=height, width=width, count=count, dtype=np.dtype(dtype).name, nodata=nodata)
  profile.update(crs=crs, transform=transform, tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate")
  profile.update(zlevel=1, bigtiff="IF_SAFER")
  dst = rasterio.open(path, "w", **profile)
  if colormap is not None:
    dst.write_colormap(1, colormap)
  for i, description in enumerate(descriptions or (), start=1):
    dst.set_band_description(i, description)
  if tags:
    dst.update_tags(**tags)
  return dst


class BlockRowWriter:
  """Finished rows [n, width(, bands)] of a strip of columns, written to the working rasters once a whole row of
  blocks is there (so a compressed block is never rewritten). `nbytes`: what it holds now (its peak is bounded by
  BLOCK + a window's rows)."""

  def __init__(self, outputs: dict, left: int):
    self.outputs, self.left = outputs, left  # {name: open dataset}
    self.top, self.pending, self.peak = 0, [], 0

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for rows in self.pending for a in rows.values())

  def add(self, rows: dict) -> None:
    self.pending.append(rows)
    self.peak = max(self.peak, self.nbytes)
    held = sum(len(next(iter(r.values()))) for r in self.pending)
    if held >= BLOCK:
      self._write(held // BLOCK * BLOCK)

  def close(self) -> None:
    held = sum(len(next(iter(r.values()))) for r in self.pending)
    if held:
      self._write(held)

  def _write(self, n: int) -> None:
    joined = {name: np.concatenate([r[name] for r in self.pending]) for name in self.pending[0]}
    for name, dst in self.outputs.items():
      block = joined[name][:n]
      bands = block[None] if block.ndim == 2 else np.moveaxis(block, -1, 0)
      dst.write(bands, window=Window(self.left, self.top, bands.shape[2], n))
    rest = {name: array[n:] for name, array in joined.items()}
    self.pending = [rest] if len(next(iter(rest.values()))) else []
    self.top += n


def to_cog(working_path: str, out_path: str, resampling: str) -> None:
  """Copies a GeoTIFF into a Cloud-Optimised GeoTIFF at out_path (see the module docstring)."""
  partial = out_path + ".partial"
  options = dict(compress="DEFLATE", blocksize=COG_BLOCK, overview_resampling=resampling, bigtiff="IF_SAFER")
  rasterio.shutil.copy(working_path, partial, driver="COG", num_threads="ALL_CPUS", **options)
  os.replace(partial, out_path)


# ---------------------------------------------------------------------------------------------------------------
# COG check
# ---------------------------------------------------------------------------------------------------------------

_TAGS = {256: "width", 257: "height", 254: "subfile_type", 322: "tile_width", 273: "strip_offsets", 324: "tile_offsets"}


def _ifds(path: str) -> list[dict]:
  """Every IFD of a (Big)TIFF: its file offset and the few tags a COG check reads."""
  with open(path, "rb") as f:
    head = f.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None:
      raise ValueError(f"{path}: not a TIFF file")
    (version,) = struct.unpack(order + "H", head[2:4])
    big = version == 43
    offset = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
    count_fmt, entry_size, next_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    types = {3: "H", 4: "I", 16: "Q"}
    ifds = []
    while offset:
      f.seek(offset)
      (count,) = struct.unpack(order + count_fmt, f.read(struct.calcsize(count_fmt)))
      entries = f.read(count * entry_size)
      ifd = {"offset": offset}
      for k in range(count):
        entry = entries[k * entry_size : (k + 1) * entry_size]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag not in _TAGS or kind not in types:
          continue
        n = struct.unpack(order + ("Q" if big else "I"), entry[4 : 12 if big else 8])[0]
        size = n * struct.calcsize(types[kind])
        inline = entry[12:] if big else entry[8:]
        if size <= len(inline):
          raw = inline[:size]
        else:
          here = f.tell()
          f.seek(struct.unpack(order + ("Q" if big else "I"), inline)[0])
          raw = f.read(size)
          f.seek(here)
        ifd[_TAGS[tag]] = struct.unpack(order + types[kind] * n, raw)
      ifds.append(ifd)
      (offset,) = struct.unpack(order + next_fmt, f.read(struct.calcsize(next_fmt)))
  return ifds


def cog_problems(path: str) -> list[str]:
  """What keeps `path` from being a Cloud-Optimised GeoTIFF (empty when it is one): GDAL's own layout flag, tiles,
  overviews for images over 512 px, IFDs all before the pixel data, each overview's data before the next larger
  image's, and block offsets increasing within each image. After GDAL's validate_cloud_optimized_geotiff.py."""
  problems = []
  with rasterio.open(path) as src:
    if src.driver != "GTiff":
      return [f"{path}: a {src.driver} file, not a GeoTIFF"]
    if src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG":
      problems.append(f"{path}: GDAL does not report LAYOUT=COG (not written by the COG driver, or edited since)")
  ifds = [ifd for ifd in _ifds(path) if not ifd.get("subfile_type", (0,))[0] & 4]  # masks aside
  main, overviews = ifds[0], ifds[1:]
  if "tile_width" not in main:
    problems.append(f"{path}: the full-resolution image is not tiled")
  if max(main["width"][0], main["height"][0]) > COG_BLOCK and not overviews:
    problems.append(f"{path}: {main['width'][0]} x {main['height'][0]} px without overviews")
  for before, after in zip(ifds, ifds[1:]):
    if after["offset"] < before["offset"]:
      problems.append(f"{path}: IFD at {after['offset']} comes before the previous one at {before['offset']}")
  first_data = [min(o for o in ifd.get("tile_offsets", ifd.get("strip_offsets", (0,))) if o > 0) for ifd in ifds]
  if max(ifd["offset"] for ifd in ifds) > min(first_data):
    problems.append(f"{path}: an IFD comes after pixel data (IFDs must all lead the file)")
  for level in range(len(ifds) - 1):
    if first_data[level + 1] > first_data[level]:
      problems.append(f"{path}: the data of image {level + 1} (smaller) is not before that of image {level}")
  for level, ifd in enumerate(ifds):
    offsets = [o for o in ifd.get("tile_offsets", ifd.get("strip_offsets", ())) if o > 0]
    if any(b < a for a, b in zip(offsets, offsets[1:])):
      problems.append(f"{path}: the blocks of image {level} are not in increasing file order")
  return problems


# ---------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------


def palette(colors, nodata: int | None = None) -> list[int]:
  """A 256-entry PIL palette from class colours; the nodata entry white."""
  flat = np.zeros((256, 3), np.uint8)
  flat[: len(colors)] = np.asarray(colors, np.uint8)
  if nodata is not None and nodata < 256:
    flat[nodata] = 255
  return flat.ravel().tolist()


def save_mask_png(path: str, classes: np.ndarray, colors, nodata: int = 255) -> None:
  """Class ids [H, W] as a mode-P PNG with the class palette (what RoboSat writes), nodata transparent."""
  from PIL import Image

  image = Image.fromarray(np.ascontiguousarray(classes.astype(np.uint8)), mode="P")
  image.putpalette(palette(colors, nodata))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  options = {"transparency": nodata} if (classes == nodata).any() else {}
  image.save(path, **options)


def display_rgb(pixels: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """[H, W, 1 or 3] pixels of any dtype -> float RGB in [0, 1]: 8-bit as is, others stretched 2-98 % per band."""
  eight_bit = pixels.dtype == np.uint8
  pixels = pixels.astype(np.float64)
  if pixels.shape[-1] == 1:
    pixels = np.repeat(pixels, 3, axis=-1)
  if not eight_bit:
    for b in range(3):
      values = pixels[..., b][valid]
      lo, hi = np.percentile(values, (2, 98)) if values.size else (0.0, 1.0)
      pixels[..., b] = (pixels[..., b] - lo) / max(hi - lo, 1e-12)
    return np.clip(pixels, 0, 1)
  return pixels / 255.0


def save_preview(
  path: str,
  picture: np.ndarray,
  classes: np.ndarray,
  valid: np.ndarray,
  class_names,
  colors,
  title: str,
  alpha: float = 0.45,
) -> str:
  """The picture with the class map over it (class 0, taken as background, left clear), and a legend."""
  from matplotlib.patches import Patch

  from jaxgeo.evaluate import plots

  plt = plots.plt
  rgb = plots.class_palette(colors, len(class_names))
  overlay = np.zeros(classes.shape + (4,))
  coloured = valid & (classes > 0) & (classes < len(class_names))
  overlay[coloured, :3] = rgb[classes[coloured]]
  overlay[coloured, 3] = alpha
  shown = np.where(valid[..., None], picture, 1.0)
  height, width = classes.shape
  fig, ax = plt.subplots(figsize=(min(12, 3 + 9 * width / max(height, width)), 9 * height / max(height, width) + 1))
  ax.imshow(shown, interpolation="bilinear")
  ax.imshow(overlay, interpolation="nearest")
  ax.set_title(title, fontsize=9)
  ax.set_axis_off()
  handles = [Patch(facecolor=c, edgecolor="0.3", label=str(n)) for n, c in zip(class_names, rgb)]
  handles[0] = Patch(facecolor="none", edgecolor="0.3", label=f"{class_names[0]} (clear)")
  handles.append(Patch(facecolor="white", edgecolor="0.3", label="no data"))
  ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path
