"""BigEarthNet-S2 on disk: band files per patch, labels in the BigEarthNet-19 nomenclature, splits from metadata.

Layout (v1): `<root>/<patch>/<patch>_B01.tif ... _B12.tif, _B8A.tif` and `<patch>_labels_metadata.json`
(json keys "labels" (43 CORINE class names), "coordinates", "projection", "tile_source", "acquisition_date").
BigEarthNet v2 nests patches one level deeper, `<root>/<tile>/<patch>/` (labels only in its metadata.parquet);
both are found, with or without metadata.

Band files as people have them are read: each band at its native size (120 / 60 / 20 px for 10 / 20 / 60 m) or
already resampled to the 10 m grid (120 px, as TorchGeo, HDF5 and Hugging Face derivatives store them), in any
integer dtype with non-negative values (uint16 in the original, int16 in TorchGeo's v2 fixtures). Only bands not
yet at `image_size` are resampled, all by `bands_to_image`, which the packed reader shares.

Split and labels come from, in order of preference (the readers and the nomenclature are in `ben_labels`):
  * a bigearthnet-gdf-builder parquet: columns `name`, `original_split`, `new_labels` (19-class names);
  * a BigEarthNet v2 `metadata.parquet`: columns `patch_id`, `split`, `labels` (19-class names);
  * no parquet: every patch folder under root; labels from its json (43 -> 19 classes) and the split from a hash
    of the patch name (`hash_split`, 60/20/20), stable across machines and Python versions.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from typing import Sequence

import numpy as np

from jaxgeo.data.ben_labels import (
  CLASSES_19,
  CLASSES_43,
  LABEL_43_TO_19,
  hash_split,
  labels_to_multi_hot,
  read_parquet_split,
)
from jaxgeo.data.geotiff import BadSampleError, read_band, resize_bilinear

log = logging.getLogger(__name__)

ALL_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
RGB_BANDS = ("B04", "B03", "B02")
BAND_RESOLUTION_M = {
  "B01": 60,
  "B02": 10,
  "B03": 10,
  "B04": 10,
  "B05": 20,
  "B06": 20,
  "B07": 20,
  "B08": 10,
  "B8A": 20,
  "B09": 60,
  "B11": 20,
  "B12": 20,
}
PATCH_SIZE = 120  # pixels of a 10 m band; a patch covers 1.2 km x 1.2 km
SPLITS = ("train", "validation", "test")
# Nodata policy (config.data.nodata / data.max_nodata_fraction). Sentinel-2 L2A reserves DN 0 for NO_DATA, but
# before processing baseline 04.00 (all of BigEarthNet, 2017-18) it also clips negative surface reflectance to 0,
# so dark water and shadow pixels are legitimately 0, and over open water most of B09 / B11 / B12 can be. A per-
# band fraction cannot tell such a patch from a partial hole, so by default a band is bad only when no pixel of
# it is valid; lower the fraction for imagery with swath-edge holes (these show as 0 in the visible bands too).
S2_NODATA = 0
DEFAULT_MAX_NODATA_FRACTION = 1.0

# Per-band reflectance statistics of BigEarthNet-S2, in the reflectance / 10000 units the pipeline feeds the
# device. Source: BAND_STATS in BigEarthNet.py of git.tu-berlin.de/rsim/bigearthnet-models-tf (the dataset
# authors' reference models; also used by seasonal-contrast and torchgeo), there in DN; divided by 10000 here.
_BAND_MEAN_DN = (
  340.76769064,
  429.9430203,
  614.21682446,
  590.23569706,
  950.68368468,
  1792.46290469,
  2075.46795189,
  2218.94553375,
  2266.46036911,
  2246.0605464,
  1594.42694882,
  1009.32729131,
)
_BAND_STD_DN = (
  554.81258967,
  572.41639287,
  582.87945694,
  675.88746967,
  729.89827633,
  1096.01480586,
  1273.45393088,
  1365.45589904,
  1356.13789355,
  1302.3292881,
  1079.19066363,
  818.86747235,
)
BAND_MEAN = {band: m / 10000.0 for band, m in zip(ALL_BANDS, _BAND_MEAN_DN)}
BAND_STD = {band: s / 10000.0 for band, s in zip(ALL_BANDS, _BAND_STD_DN)}
# True-colour input is reflectance / 2000 clipped to [0, 1], an 8-bit-like picture, so it is normalised like
# ImageNet photos, as the DINO reference does for its RGB input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def band_shape(band: str) -> tuple[int, int]:
  """Native [H, W] of a band's file in a patch: 120 px at 10 m, 60 px at 20 m, 20 px at 60 m."""
  size = PATCH_SIZE * 10 // BAND_RESOLUTION_M[band]
  return size, size


def resolve_bands(bands: str | Sequence[str]) -> tuple[str, ...]:
  """ "rgb" -> B04, B03, B02; "all" -> the 12 L2A bands in ALL_BANDS order; or a list of band names."""
  if isinstance(bands, str):
    if bands in ("rgb", "all"):
      return RGB_BANDS if bands == "rgb" else ALL_BANDS
    raise ValueError(f"data.bands: expected 'rgb', 'all' or a list of names from {ALL_BANDS}, got {bands!r}")
  unknown = [b for b in bands if b not in BAND_RESOLUTION_M]
  if unknown or not bands:
    raise ValueError(f"data.bands: unknown band(s) {unknown} in {list(bands)}; expected names from {ALL_BANDS}")
  return tuple(bands)


def normalization_stats(bands: str | Sequence[str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel for the device-side normalisation of images scaled as this module scales them."""
  if isinstance(bands, str) and bands == "rgb":
    return IMAGENET_MEAN, IMAGENET_STD
  names = resolve_bands(bands)
  return tuple(BAND_MEAN[b] for b in names), tuple(BAND_STD[b] for b in names)


def scale_reflectance(reflectance: np.ndarray, rgb: bool, out: np.ndarray | None = None) -> np.ndarray:
  """Model input from reflectance DN: true colour as clip(DN / 2000, 0, 1), other band sets as DN / 10000.

  Computed in float32; `out` (float32, e.g. `reflectance` itself) receives the result instead of a new array.
  """
  scaled = np.divide(reflectance, 2000.0 if rgb else 10000.0, out=out, dtype=np.float32)
  if rgb:
    np.clip(scaled, 0.0, 1.0, out=scaled)
  return scaled


def nodata_policy(data_config) -> tuple[float | None, float]:
  """(data.nodata, data.max_nodata_fraction) of a config, checked; nodata None (or NaN): only a file's own tag
  counts. nodata comes back as a plain int when integral (0.0 -> 0)."""
  get = data_config.get if hasattr(data_config, "get") else lambda k, d: getattr(data_config, k, d)
  nodata, fraction = get("nodata", S2_NODATA), get("max_nodata_fraction", DEFAULT_MAX_NODATA_FRACTION)
  if nodata is not None:
    if isinstance(nodata, bool) or not isinstance(nodata, numbers.Real):
      raise ValueError(f"data.nodata: expected a pixel value (e.g. 0) or None, got {nodata!r}")
    if np.isnan(nodata):  # NaN equals no pixel: how a command line (--config.data.nodata=nan) says None
      nodata = None
    else:
      nodata = int(nodata) if float(nodata).is_integer() else float(nodata)  # plain, for json manifests and logs
  if fraction is None:
    fraction = DEFAULT_MAX_NODATA_FRACTION
  if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= fraction <= 1.0:
    raise ValueError(f"data.max_nodata_fraction: expected a fraction in [0, 1], got {fraction!r}")
  return nodata, float(fraction)


def describe_nodata_policy(nodata: float | None, max_nodata_fraction: float) -> str:
  """The policy in words, for logs and `python -m jaxgeo.data.check`."""
  value = "only a file's own nodata tag" if nodata is None else f"value {nodata:g} (or a file's own nodata tag)"
  if max_nodata_fraction >= 1.0:
    rule = "all of it is"
  elif max_nodata_fraction <= 0.0:
    rule = "any pixel of it is"
  else:
    rule = f"all of it or more than {max_nodata_fraction:.1%} of it is"
  return (
    f"nodata = {value}; a band is bad when {rule} nodata "
    f"(data.nodata={nodata!r}, data.max_nodata_fraction={max_nodata_fraction:g})"
  )


_FORMS_SEEN: set[tuple[str, tuple[int, int], str]] = set()


def read_s2_band(
  path: str, band: str, *, nodata: float | None = S2_NODATA, max_nodata_fraction: float = DEFAULT_MAX_NODATA_FRACTION
) -> np.ndarray:
  """One band file of a patch as stored ([H, W], native size or 120 px, non-negative integers), or BadSampleError.

  Nodata pixels of a band the policy accepts read as 0 (a file's own tag may be another value, e.g. -32768).
  Band files in another form than the original's (uint16 at native size) are said once per process and form.
  """
  data = read_band(
    path,
    expected_shape=(band_shape(band), (PATCH_SIZE, PATCH_SIZE)),
    expected_dtype="integer",
    nodata=nodata,
    max_nodata_fraction=max_nodata_fraction,
    min_value=0,
    fill_nodata=0,  # S2's NO_DATA value, and what the model sees of clipped dark pixels
  )
  form = (band, data.shape, data.dtype.name)
  if form not in _FORMS_SEEN and (data.shape != band_shape(band) or data.dtype != np.uint16):
    _FORMS_SEEN.add(form)
    at = (
      f"stored at {data.shape[0]} px (already on the 10 m grid), so not upsampled"
      if data.shape != band_shape(band)
      else f"stored at its native {data.shape[0]} px"
    )
    # A warning, not info: grain's worker processes, where samples are read, pass warnings on without set-up.
    log.warning("BigEarthNet band %s %s; dtype %s (first seen in %s)", band, at, data.dtype.name, path)
  return data


def bands_to_image(bands: Sequence[np.ndarray], image_size: int, rgb: bool) -> np.ndarray:
  """Band arrays of one patch (any mix of sizes, integer DN) -> the model input, float32 [image_size, image_size, C].

  Bands not at image_size are resampled (bilinear, `resize_bilinear`), those of one size together; then scaled by
  `scale_reflectance`. The folder and packed readers both build their samples here, so they are bit-equal.
  """
  size = (image_size, image_size)
  image = np.empty(size + (len(bands),), np.float32)
  groups: dict[tuple[int, ...], list[int]] = {}
  for channel, band in enumerate(bands):
    groups.setdefault(band.shape, []).append(channel)
  for shape, channels in groups.items():
    if shape == size:
      for channel in channels:
        image[..., channel] = bands[channel]
      continue
    stack = np.empty(shape + (len(channels),), np.float32)
    for k, channel in enumerate(channels):
      stack[..., k] = bands[channel]
    image[..., channels] = resize_bilinear(stack, size)
  return scale_reflectance(image, rgb, out=image)


def _list_dirs(path: str) -> list[str]:
  with os.scandir(path) as entries:
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _holds_band_files(folder: str, name: str) -> bool:
  if os.path.isfile(os.path.join(folder, f"{name}_B02.tif")):  # the common case: one stat, no listing
    return True
  with os.scandir(folder) as entries:
    return any(e.name.startswith(f"{name}_B") and e.name.endswith(".tif") for e in entries)


def find_patches(root: str) -> dict[str, str]:
  """Patch name -> its folder relative to root, for every patch under root, at either depth.

  A folder holding band files `<name>_B02.tif` ... is a patch (v1: `<root>/<patch>`); a folder of patch folders
  is a tile (v2: `<root>/<tile>/<patch>`), and every folder in it is a patch. A top-level folder that is
  neither is listed as a patch, so reading it says which band files are missing rather than dropping it.
  """
  found: dict[str, str] = {}
  for top in _list_dirs(root):
    top_dir = os.path.join(root, top)
    inner = [] if _holds_band_files(top_dir, top) else _list_dirs(top_dir)
    if not any(_holds_band_files(os.path.join(top_dir, n), n) for n in inner):
      inner = []
    for name, relative in [(n, os.path.join(top, n)) for n in inner] or [(top, top)]:
      if name in found:
        raise ValueError(
          f"{root}: patch {name!r} is in two folders, {found[name]} and {relative}; expected each patch once"
        )
      found[name] = relative
  return found


class BigEarthNetSource:
  """grain RandomAccessDataSource over one split of BigEarthNet-S2.

  `source[i]` -> {"image": float32 [image_size, image_size, C], "labels": float32 [19] multi-hot,
  "index": int32 i}. Image scaling: bands == "rgb" -> clip(reflectance / 2000, 0, 1) (true colour as a picture);
  otherwise reflectance / 10000 (the device normalises with `normalization_stats`). Any problem with the
  sample's files raises BadSampleError naming the file (a band is bad when it is all nodata or more than
  max_nodata_fraction of it is: see S2_NODATA); problems with the metadata as a whole raise ValueError at
  construction. Holds only names and labels: rasterio files are opened per read, so it pickles to workers.
  """

  name = "bigearthnet"
  label_kind = "multilabel"
  class_names = CLASSES_19

  def __init__(
    self,
    root: str | os.PathLike,
    metadata: str | os.PathLike | None = None,
    split: str = "train",
    bands: str | Sequence[str] = "rgb",
    image_size: int = PATCH_SIZE,
    nodata: float | None = S2_NODATA,
    max_nodata_fraction: float = DEFAULT_MAX_NODATA_FRACTION,
  ):
    if split not in SPLITS:
      raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    self.root = os.fspath(root)
    self.metadata = None if metadata is None else os.fspath(metadata)
    self.split = split
    self.bands = resolve_bands(bands)
    self.rgb_scaling = isinstance(bands, str) and bands == "rgb"
    self.image_size = int(image_size)
    self.nodata, self.max_nodata_fraction = nodata_policy(
      {"nodata": nodata, "max_nodata_fraction": max_nodata_fraction}
    )
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"{self.root}: BigEarthNet root folder does not exist (data.root)")
    self._folders: dict[str, str] = {}  # patch name -> folder under root, where found by listing
    if self.metadata is not None:
      self.names, self._labels = read_parquet_split(self.metadata, split)
      listed_in = self.metadata
    else:
      found = find_patches(self.root)
      self.names = [n for n in sorted(found) if hash_split(n) == split]
      self._folders = {n: found[n] for n in self.names if found[n] != n}  # v1 needs no entry
      self._labels = None  # read from each patch's json, so a broken json is one bad sample, not a dead run
      listed_in = f"{self.root} (patch folders, split by hash_split)"
    if not self.names:
      raise ValueError(f"{listed_in}: split {split!r} is empty (no patches); check data.root / data.metadata")

  def __len__(self) -> int:
    return len(self.names)

  @property
  def norm_stats(self):
    return {"image": normalization_stats("rgb" if self.rgb_scaling else self.bands)}

  def __repr__(self) -> str:
    return (
      f"BigEarthNetSource(root={self.root!r}, metadata={self.metadata!r}, split={self.split!r}, "
      f"bands={self.bands}, {len(self)} patches)"
    )

  def patch_dir(self, index: int) -> str:
    """Folder of patch `index`: `<root>/<patch>` (v1) or `<root>/<tile>/<patch>` (v2); BadSampleError if none."""
    name = self.names[index]
    if name in self._folders:
      return os.path.join(self.root, self._folders[name])
    flat = os.path.join(self.root, name)
    if os.path.isdir(flat):
      return flat
    nested = os.path.join(self.root, name.rsplit("_", 2)[0], name)
    if os.path.isdir(nested):
      return nested
    raise BadSampleError(flat, f"patch folder does not exist but is listed in {self.metadata or 'the root'}")

  def read_stored_band(self, patch_dir: str, band: str) -> np.ndarray:
    """One band of the patch in `patch_dir` as stored (not resampled), checked by this source's nodata policy."""
    path = os.path.join(patch_dir, f"{os.path.basename(patch_dir)}_{band}.tif")
    return read_s2_band(path, band, nodata=self.nodata, max_nodata_fraction=self.max_nodata_fraction)

  def _json_labels(self, patch_dir: str) -> np.ndarray:
    name = os.path.basename(patch_dir)
    path = os.path.join(patch_dir, f"{name}_labels_metadata.json")
    if not os.path.isfile(path):
      raise BadSampleError(
        path,
        "missing labels metadata json (BigEarthNet v2 keeps labels only in its metadata.parquet: pass data.metadata)",
      )
    try:
      with open(path) as f:
        labels_43 = json.load(f)["labels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise BadSampleError(path, f"unreadable labels metadata (expected json with a 'labels' list): {e!r}") from e
    unknown = [label for label in labels_43 if label not in CLASSES_43]
    if unknown:
      raise BadSampleError(path, f"unknown label(s) {unknown}; expected 43-class CORINE names (CLASSES_43)")
    return labels_to_multi_hot([LABEL_43_TO_19[l] for l in labels_43 if l in LABEL_43_TO_19], where=path)

  def labels_of(self, index: int, patch_dir: str) -> np.ndarray:
    """float32 [19] multi-hot of patch `index` (from the parquet, else from the json in `patch_dir`)."""
    return self._labels[index] if self._labels is not None else self._json_labels(patch_dir)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    patch_dir = self.patch_dir(index)
    bands = [self.read_stored_band(patch_dir, band) for band in self.bands]
    return {
      "image": bands_to_image(bands, self.image_size, self.rgb_scaling),
      "labels": self.labels_of(index, patch_dir),
      "index": np.int32(index),
    }

  def problems(self, index: int) -> list[BadSampleError]:
    """Every problem of sample `index` (all its band files and labels), where __getitem__ stops at the first."""
    try:
      patch_dir = self.patch_dir(index)
    except BadSampleError as e:
      return [e]
    found = []
    for read in [lambda b=b: self.read_stored_band(patch_dir, b) for b in self.bands] + [
      lambda: self.labels_of(index, patch_dir)
    ]:
      try:
        read()
      except BadSampleError as e:
        found.append(e)
    return found


# ---------------------------------------------------------------------------------------------------------------
# Registry entry points (jaxgeo/data/__init__.py): config fields and the source of a split
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_SYNTHETIC_DIR = "~/.cache/jaxgeo/synthetic_ben"
DEFAULT_SYNTHETIC_PATCHES = 256


def data_config(dataset: str = "bigearthnet"):
  """BigEarthNet-S2's own config.data fields (the registry adds the shared ones)."""
  import ml_collections

  del dataset
  c = ml_collections.ConfigDict()
  c.metadata = ml_collections.config_dict.placeholder(str)  # gdf-builder or v2 parquet; None: json + hash split
  c.synthetic_dir = DEFAULT_SYNTHETIC_DIR
  c.synthetic_num_patches = 2048
  c.bands = "rgb"  # "rgb" (B04,B03,B02), "all" (12 bands) or "B08,B04,B03"
  c.image_size = PATCH_SIZE
  # A band is bad when all of it, or more than max_nodata_fraction of it, is `nodata` (None or nan: only a file's
  # own tag counts). Defaults keep dark-water patches, whose NIR / SWIR can be mostly 0 in BigEarthNet (S2_NODATA).
  # A float field, so that --config.data.nodata=nan (or -9999) parses on the command line.
  c.nodata = float(S2_NODATA)
  c.max_nodata_fraction = DEFAULT_MAX_NODATA_FRACTION
  return c


def resolve_paths(data_config) -> tuple[str, str | None]:
  """(root, metadata) of the configured data; with no root, those of the (written once) synthetic dataset."""
  from jaxgeo.data.source import announce_synthetic, field
  from jaxgeo.data.synthetic import write_synthetic_bigearthnet

  root = field(data_config, "root")
  if root is not None:
    metadata = field(data_config, "metadata")
    return os.path.expanduser(root), None if metadata is None else os.path.expanduser(metadata)
  directory = field(data_config, "synthetic_dir", DEFAULT_SYNTHETIC_DIR)
  num_patches = int(field(data_config, "synthetic_num_patches", DEFAULT_SYNTHETIC_PATCHES))
  root, metadata = write_synthetic_bigearthnet(directory, num_patches)
  announce_synthetic(
    f"BigEarthNet-S2 ({num_patches} patches)",
    root,
    "To train on real BigEarthNet-S2, pass --config.data.root=/path/to/BigEarthNet-v1.0 and, for the official "
    "splits, --config.data.metadata=/path/to/metadata.parquet (bigearthnet-gdf-builder or BigEarthNet v2).",
  )
  return root, metadata


_POLICY_WARNED: set[str] = set()  # packed stores already told about, so it is once per process, not per split


def build_source(data_config, split: str):
  """The BigEarthNetSource of `split` described by config.data.

  A data.root that is a packed store (made by `python -m jaxgeo.data.pack`) gives its PackedSource instead:
  same samples, labels and split, read from ArrayRecord.
  """
  from jaxgeo.data import pack
  from jaxgeo.data.source import field

  root, metadata = resolve_paths(data_config)
  bands, image_size = field(data_config, "bands", "rgb"), int(field(data_config, "image_size", PATCH_SIZE))
  nodata, max_nodata_fraction = nodata_policy(data_config)
  if pack.is_packed(root):
    if metadata is not None:
      log.warning(
        "config.data.metadata=%s is ignored: %s is a packed store, whose splits and labels were fixed when it "
        "was packed",
        metadata,
        root,
      )
    source = pack.PackedSource(root, split=split, bands=bands, image_size=image_size)
    if (source.nodata, source.max_nodata_fraction) != (nodata, max_nodata_fraction) and root not in _POLICY_WARNED:
      _POLICY_WARNED.add(root)
      log.warning(
        "config.data.nodata=%r / max_nodata_fraction=%g are not applied to %s: the store was packed with "
        "nodata=%r, max_nodata_fraction=%g (re-pack to change them)",
        nodata,
        max_nodata_fraction,
        root,
        source.nodata,
        source.max_nodata_fraction,
      )
    return source
  return BigEarthNetSource(
    root,
    metadata,
    split=split,
    bands=bands,
    image_size=image_size,
    nodata=nodata,
    max_nodata_fraction=max_nodata_fraction,
  )
