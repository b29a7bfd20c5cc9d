"""SEN12MS on disk: co-registered Sentinel-1 / Sentinel-2 / MODIS land-cover patches; scene labels from the LC patch.

Layout (schmitt-muc/SEN12MS; mediatum 1474000), 256 x 256 px at 10 m:
  <root>/ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p30.tif   S2 L1C: 13 bands uint16 DN (B01..B08, B8A, B09..B12)
  <root>/ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p30.tif   S1 GRD: 2 bands float32 sigma0 in dB (VV, VH)
  <root>/ROIs1158_spring/lc_1/ROIs1158_spring_lc_1_p30.tif   4 bands uint16: IGBP, LCCS LC, LCCS LU, LCCS SH
Seasons: ROIs1158_spring, ROIs1868_summer, ROIs1970_fall, ROIs2017_winter.

Splits come from lists of S2 file names (S1 / LC are found by swapping the sensor in folder and file name):
`train_list.txt` / `test_list.txt` (one name a line) or the pickled lists people have (schmitt-muc's
`*_list.pkl`, the Berkeley seed's `train_list_1024.pkl`: a list of numpy.str_), read by `read_name_list`
without running any pickle code (`safe_pickle`). Validation is `data.val_list` or, as the seed does, the last
`data.val_fraction` of the train list in list order (first int(0.8 N) train). Each split is then sorted by name
and the one known-broken patch (NaN SAR) dropped, as the seed does.

Labels are computed from the LC patch itself: the IGBP class fractions of band 1 (values 1..17; anything else
is a bad sample), optionally merged into the simplified 10-class scheme, then argmax ("single") or
fraction >= threshold ("multi"). This gives the seed's `IGBP_probability_labels.pkl` labels without the pickle.

Values are raw units: S2 as float32 DN, S1 in dB (non-finite values replaced by `data.s1_nan_value` and counted,
then clipped to `data.s1_clip_db` as the seed does); `norm_stats` holds the seed's per-band mean / std in those
units, so the device normalises exactly once (the seed's pretraining normalised twice; see the reference notes).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Sequence

import numpy as np
import rasterio
import rasterio.errors

from jaxgeo.data.geotiff import BadSampleError, _describe
from jaxgeo.data.safe_pickle import load_string_list

log = logging.getLogger(__name__)

PATCH_SIZE = 256
SEASONS = ("ROIs1158_spring", "ROIs1868_summer", "ROIs1970_fall", "ROIs2017_winter")
SPLITS = ("train", "validation", "test")
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
S1_BANDS = ("VV", "VH")
LC_COUNT = 4
# The seed's 10 "land" bands (S2_BANDS_LD = file bands 2..9, 12, 13): B01, B09 (aerosol, water vapour) and B10
# (cirrus) describe the atmosphere, not the ground.
SEED_S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
# "rgb" is the seed's S2_BANDS_RGB, file bands 2, 3, 4 = B02, B03, B04 (blue first), normalised with the first
# three S2 statistics: the order its RGB models (schmitt-muc's released ResNet/DenseNet RGB weights, the hpt
# RGB runs) were trained on. True-colour order is available by name: data.sensor = "B04,B03,B02".
BAND_SETS = {
  "s2": SEED_S2_BANDS,
  "s2_all": S2_BANDS,
  "rgb": ("B02", "B03", "B04"),
  "s1": S1_BANDS,
  "s1s2": SEED_S2_BANDS + S1_BANDS,  # the seed's 12-channel fusion order: S2 then S1
}

# The seed's normalisation ("statistics for multi_label" in schmitt-muc/SEN12MS classification/dataset.py, also
# Berkeley-Data/SEN12MS main_train.py and hpt): S2 in raw DN, S1 in dB.
_SEED_S2_MEAN = (
  1226.4215,
  1137.3799,
  1139.6792,
  1350.9973,
  1932.9058,
  2211.1584,
  2154.9846,
  2409.1128,
  2001.8622,
  1356.0801,
)
_SEED_S2_STD = (
  741.6254,
  740.883,
  960.1045,
  946.76056,
  985.52747,
  1082.4341,
  1057.7628,
  1136.1942,
  1132.7898,
  991.48016,
)
_SEED_S1_MEAN = (-11.76858, -18.294598)
_SEED_S1_STD = (4.525339, 4.3586307)
# The seed has no statistics for B01, B09, B10. These are SSL4EO-S12's Sentinel-2 L1C statistics (S2C_MEAN / STD
# in zhu-xlab/SSL4EO-S12 src/benchmark/pretrain_ssl/datasets/SSL4EO/ssl4eo_dataset.py): same product level (L1C
# DN) as SEN12MS, global sampling too.
_L1C_EXTRA = {
  "B01": (1605.57504906, 786.78685367),
  "B09": (830.06605044, 577.31607053),
  "B10": (22.10351321, 51.15431158),
}
BAND_MEAN = {
  **dict(zip(SEED_S2_BANDS, _SEED_S2_MEAN)),
  **dict(zip(S1_BANDS, _SEED_S1_MEAN)),
  **{b: m for b, (m, _) in _L1C_EXTRA.items()},
}
BAND_STD = {
  **dict(zip(SEED_S2_BANDS, _SEED_S2_STD)),
  **dict(zip(S1_BANDS, _SEED_S1_STD)),
  **{b: s for b, (_, s) in _L1C_EXTRA.items()},
}

# IGBP classes, index = value - 1 (schmitt-muc utils/Sen12MSOverview.ipynb order).
CLASSES_17 = (
  "Evergreen Needleleaf Forests",
  "Evergreen Broadleaf Forests",
  "Deciduous Needleleaf Forests",
  "Deciduous Broadleaf Forests",
  "Mixed Forests",
  "Closed Shrublands",
  "Open Shrublands",
  "Woody Savannas",
  "Savannas",
  "Grasslands",
  "Permanent Wetlands",
  "Croplands",
  "Urban and Built-Up Lands",
  "Cropland/Natural Vegetation Mosaics",
  "Permanent Snow and Ice",
  "Barren",
  "Water Bodies",
)
CLASSES_10 = (
  "Forest",
  "Shrubland",
  "Savanna",
  "Grassland",
  "Wetlands",
  "Croplands",
  "Urban/Built-up",
  "Snow/Ice",
  "Barren",
  "Water",
)
# The seed's simplified scheme (IGBP_s): 17-class index -> 10-class index; the cropland/natural mosaic joins
# croplands. Equal to torchgeo's DFC2020_CLASS_MAPPING.
IGBP_TO_10 = np.asarray((0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 5, 7, 8, 9))
LABEL_TYPES = {"single": "single", "multi": "multilabel"}
# The seed drops this patch (NaN SAR) from every list it reads; it is not in the official train_list either.
KNOWN_BROKEN = ("ROIs1868_summer_s2_146_p202.tif",)
_S2_NAME = re.compile(r"ROIs\d+_[A-Za-z]+_s2_\d+_p\d+\.tif")


# ---------------------------------------------------------------------------------------------------------------
# Band sets, labels
# ---------------------------------------------------------------------------------------------------------------


def resolve_bands(sensor: str | Sequence[str]) -> tuple[str, ...]:
  """A named band set (BAND_SETS: s2, s2_all, rgb, s1, s1s2) or band names ("B04,B03,B02" or a list)."""
  if isinstance(sensor, str) and sensor in BAND_SETS:
    return BAND_SETS[sensor]
  names = [b.strip() for b in sensor.split(",")] if isinstance(sensor, str) else list(sensor)
  unknown = [b for b in names if b not in S2_BANDS + S1_BANDS]
  if unknown or not names or len(set(names)) != len(names):
    raise ValueError(
      f"data.sensor: expected one of {sorted(BAND_SETS)} or distinct band names from {S2_BANDS + S1_BANDS}, "
      f"got {sensor!r}" + (f" (unknown: {unknown})" if unknown else "")
    )
  return tuple(names)


def normalization_stats(bands: Sequence[str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel in the units the source yields (S2 DN, S1 dB)."""
  return tuple(BAND_MEAN[b] for b in bands), tuple(BAND_STD[b] for b in bands)


def igbp_counts(igbp: np.ndarray, path: str = "") -> np.ndarray:
  """Pixel count of each IGBP class (values 1..17) in an LC patch's band 1 -> int64 [17].

  Any other value is a BadSampleError naming `path`: the dataset documents 1..17 only, and a fill value or a
  wrong band would otherwise become a silently wrong label.
  """
  values = np.asarray(igbp).astype(np.int64, copy=False).ravel()
  bad = (values < 1) | (values > len(CLASSES_17))
  if bad.any():
    found = np.unique(values[bad])
    raise BadSampleError(
      path,
      f"IGBP band (band 1) holds {int(bad.sum())} pixels with values {found[:10].tolist()} outside 1..17",
    )
  return np.bincount(values - 1, minlength=len(CLASSES_17))


def scheme_counts(counts_17: np.ndarray, scheme: int) -> np.ndarray:
  """17-class counts -> counts in `scheme` (17, or 10 = the seed's simplified IGBP), summed as integers."""
  if scheme == 17:
    return np.asarray(counts_17)
  if scheme == 10:
    return np.bincount(IGBP_TO_10, weights=counts_17, minlength=len(CLASSES_10)).astype(np.int64)
  raise ValueError(f"data.label_scheme: expected 10 or 17, got {scheme!r}")


def make_labels(counts: np.ndarray, label_type: str, threshold: float) -> np.ndarray:
  """Scheme counts -> "single": int32 argmax; "multi": float32 multi-hot of fraction >= threshold.

  Ties in "single" go to the lowest class index (numpy argmax, as the seed). Counts are integers, so classes
  whose fractions are equal tie exactly; the seed summed float fractions, where rounding could break a tie.
  """
  if label_type == "single":
    return np.int32(np.argmax(counts))
  if label_type == "multi":
    return (counts / counts.sum() >= threshold).astype(np.float32)
  raise ValueError(f"data.label_type: expected one of {sorted(LABEL_TYPES)}, got {label_type!r}")


# ---------------------------------------------------------------------------------------------------------------
# Split lists: text, or pickles read without running pickle code
# ---------------------------------------------------------------------------------------------------------------


def read_name_list(path: str | os.PathLike) -> list[str]:
  """S2 file names of a split list: a pickle (`.pkl` / `.pickle`, or any file starting like one: a list or tuple of
  str / numpy string scalars, read with an unpickler that refuses every other global) or text (one name a line;
  blank lines ignored).

  Entries may be paths (OpenSelfSup's lists hold them): only the file name is kept. A name that is not a SEN12MS
  S2 file name is a ValueError naming the list file and the entry.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: split list does not exist")
  with open(path, "rb") as f:
    is_pickle = path.endswith((".pkl", ".pickle")) or f.read(1) == b"\x80"  # protocol >= 2 starts with PROTO
  if is_pickle:
    entries = load_string_list(path)
    if not isinstance(entries, (list, tuple)):
      raise ValueError(f"{path}: expected a pickled list of S2 file names, got {type(entries).__name__}")
  else:
    with open(path, encoding="utf-8") as f:
      entries = [line.strip() for line in f if line.strip()]
  names = []
  for i, entry in enumerate(entries):
    if isinstance(entry, bytes):  # numpy.bytes_ from a pickle
      entry = entry.decode("utf-8")
    if not isinstance(entry, str):
      raise ValueError(f"{path}: entry {i} is a {type(entry).__name__}, expected a file name string")
    name = os.path.basename(str(entry).strip().replace("\\", "/"))
    if not _S2_NAME.fullmatch(name):
      raise ValueError(
        f"{path}: entry {i} {entry!r} is not a SEN12MS S2 file name (expected e.g. "
        "'ROIs1158_spring_s2_1_p30.tif'; lists name S2 files, the S1 and LC files are found from them)"
      )
    names.append(name)
  return names


def _default_list(root: str, stem: str) -> str:
  candidates = [os.path.join(root, f"{stem}.{ext}") for ext in ("txt", "pkl")]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(
    f"no {stem} for SEN12MS: looked for {' and '.join(candidates)}; set data.{stem} to the list file "
    "(train_list.txt / test_list.txt from schmitt-muc/SEN12MS splits/, or a .pkl such as train_list_1024.pkl)"
  )


def split_names(
  root: str,
  split: str,
  *,
  train_list: str | None = None,
  test_list: str | None = None,
  val_list: str | None = None,
  val_fraction: float = 0.2,
) -> tuple[list[str], str]:
  """(sorted S2 names of `split`, where they were listed) following the seed's protocol (module doc)."""
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
  train_path = lambda: os.path.expanduser(train_list) if train_list else _default_list(root, "train_list")
  if split == "test":
    listed_in = os.path.expanduser(test_list) if test_list else _default_list(root, "test_list")
    names = read_name_list(listed_in)
  elif val_list:
    listed_in = train_path() if split == "train" else os.path.expanduser(val_list)
    names = read_name_list(listed_in)
    if split == "validation":
      overlap = set(names) & set(read_name_list(train_path()))
      if overlap:
        log.warning("%d names of data.val_list %s are also in data.train_list", len(overlap), listed_in)
  else:
    if not 0.0 <= val_fraction < 1.0:
      raise ValueError(f"data.val_fraction: expected a fraction in [0, 1), got {val_fraction!r}")
    listed_in = train_path()
    names = read_name_list(listed_in)
    total = len(names)
    cut = int(total * (1.0 - val_fraction))  # the seed: int(0.8 * N) with val_fraction 0.2
    names = names[:cut] if split == "train" else names[cut:]
    listed_in += f" (entries [{':' + str(cut) if split == 'train' else str(cut) + ':'}] of {total}, data.val_fraction)"
  broken = [n for n in names if n in KNOWN_BROKEN]
  if broken:
    log.info("dropping %s from split %s: the known-broken SEN12MS patch the seed drops", broken[0], split)
  return sorted(n for n in names if n not in KNOWN_BROKEN), listed_in


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def sensor_path(root: str, s2_name: str, sensor: str) -> str:
  """Path of the `sensor` ("s1" | "s2" | "lc") file of the patch an S2 file name names."""
  season_a, season_b, _, scene, patch = s2_name.split("_")
  season = f"{season_a}_{season_b}"
  return os.path.join(root, season, f"{sensor}_{scene}", f"{season}_{sensor}_{scene}_{patch}")


def read_raster(
  path: str, *, count: int, size: int, dtypes: Sequence[str], indexes: Sequence[int] | None = None, what: str
) -> np.ndarray:
  """Bands `indexes` (1-based; all when None) of a `count`-band, size x size GeoTIFF -> [H, W, k] in its dtype.

  The file's band count, size and dtype (one of `dtypes`) are checked first; every problem (missing, not a
  GeoTIFF, truncated, wrong shape) is a BadSampleError naming the file. Opened and closed here, so callers pickle.
  """
  if not os.path.exists(path):
    raise BadSampleError(path, f"missing {what} file")
  try:
    with rasterio.open(path) as src:
      problems = []
      if src.count != count:
        problems.append(f"has {src.count} bands, expected {count} ({what})")
      if (src.height, src.width) != (size, size):
        problems.append(f"wrong size {src.height}x{src.width}, expected {size}x{size}")
      if src.dtypes[0] not in dtypes:
        problems.append(f"wrong dtype {src.dtypes[0]}, expected {' or '.join(dtypes)} ({what})")
      if problems:
        raise BadSampleError(path, "; ".join(problems))
      data = src.read(list(indexes) if indexes is not None else None)
  except BadSampleError:
    raise
  except (rasterio.errors.RasterioError, OSError) as e:
    raise BadSampleError(path, f"cannot read as GeoTIFF (truncated or corrupt file): {_describe(e)}") from e
  return np.moveaxis(data, 0, -1)


class Sen12msSource:
  """grain RandomAccessDataSource over one split of SEN12MS (see the module doc for layout, lists and labels).

  `source[i]` -> {"image": float32 [H, W, C] (channels `bands`: S2 DN then / or S1 dB), "labels": int32 []
  ("single") or float32 [num_classes] ("multi"), "label_fractions": float32 [num_classes] (class cover of the
  LC patch in the scheme), "num_cleaned": int32 (non-finite S1 values replaced in this sample), "index": int32 i}
  and, with pair_sensors, "s1": float32 [H, W, 2] (VV, VH dB) and "s2": float32 [H, W, 10] (the seed's bands,
  DN) for MoCo's sensor pairs and fusion. `names[i]` is sample i's S2 file name. Holds only names: files are
  opened per read, so it pickles into grain workers.

  S1: non-finite values become `s1_nan_value`, then everything is clipped to `s1_clip_db`. `patch_size`: the
  size every file must have (256 for real SEN12MS); other sizes are bad samples, so batches always stack.
  """

  name = "sen12ms"

  def __init__(
    self,
    root: str | os.PathLike,
    split: str = "train",
    *,
    train_list: str | None = None,
    test_list: str | None = None,
    val_list: str | None = None,
    val_fraction: float = 0.2,
    sensor: str | Sequence[str] = "s2",
    label_type: str = "multi",
    label_scheme: int = 10,
    threshold: float = 0.1,
    s1_nan_value: float = -25.0,
    s1_clip_db: tuple[float, float] = (-25.0, 0.0),
    pair_sensors: bool = False,
    patch_size: int = PATCH_SIZE,
  ):
    self.root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"{self.root}: SEN12MS root folder does not exist (data.root)")
    if label_type not in LABEL_TYPES:
      raise ValueError(f"data.label_type: expected one of {sorted(LABEL_TYPES)}, got {label_type!r}")
    if int(label_scheme) not in (10, 17):
      raise ValueError(f"data.label_scheme: expected 10 or 17, got {label_scheme!r}")
    if not 0.0 < float(threshold) <= 1.0:
      raise ValueError(f"data.threshold: expected a fraction in (0, 1], got {threshold!r}")
    low, high = (float(v) for v in s1_clip_db)
    if not low < high:
      raise ValueError(f"data.s1_clip_db: expected (low, high) dB with low < high, got {tuple(s1_clip_db)}")
    self.split, self.bands = split, resolve_bands(sensor)
    self.label_type, self.label_scheme, self.threshold = label_type, int(label_scheme), float(threshold)
    self.label_kind = LABEL_TYPES[label_type]
    self.class_names = CLASSES_10 if self.label_scheme == 10 else CLASSES_17
    self.s1_nan_value, self.s1_clip_db = float(s1_nan_value), (low, high)
    self.pair_sensors, self.patch_size = bool(pair_sensors), int(patch_size)
    self.names, self.listed_in = split_names(
      self.root, split, train_list=train_list, test_list=test_list, val_list=val_list, val_fraction=val_fraction
    )
    if not self.names:
      raise ValueError(f"{self.listed_in}: split {split!r} is empty; check data.train_list / test_list / val_list")
    season = os.path.join(self.root, self.names[0].split("_s2_")[0])
    if not os.path.isdir(season):
      raise FileNotFoundError(
        f"{season}: season folder of the first listed patch {self.names[0]} does not exist; data.root must be the "
        f"folder holding {', '.join(SEASONS)}"
      )
    wanted = set(self.bands) | (set(SEED_S2_BANDS + S1_BANDS) if self.pair_sensors else set())
    self._s2_read = tuple(b for b in S2_BANDS if b in wanted)  # file order: one read per file
    self._reads_s1 = bool(wanted & set(S1_BANDS))

  def __len__(self) -> int:
    return len(self.names)

  @property
  def norm_stats(self):
    stats = {"image": normalization_stats(self.bands)}
    if self.pair_sensors:
      stats.update(s1=normalization_stats(S1_BANDS), s2=normalization_stats(SEED_S2_BANDS))
    return stats

  def __repr__(self) -> str:
    return (
      f"Sen12msSource(root={self.root!r}, split={self.split!r}, bands={self.bands}, labels="
      f"{self.label_type}/{self.label_scheme}, listed in {self.listed_in}, {len(self)} patches)"
    )

  def _path(self, index: int, sensor: str) -> str:
    return sensor_path(self.root, self.names[index], sensor)

  def _read_s2(self, index: int) -> dict[str, np.ndarray]:
    indexes = [S2_BANDS.index(b) + 1 for b in self._s2_read]
    path, size = self._path(index, "s2"), self.patch_size
    data = read_raster(path, count=len(S2_BANDS), size=size, dtypes=("uint16",), indexes=indexes, what="S2 L1C DN")
    return {band: data[..., i].astype(np.float32) for i, band in enumerate(self._s2_read)}

  def _read_s1(self, index: int) -> tuple[dict[str, np.ndarray], int]:
    path, size = self._path(index, "s1"), self.patch_size
    # float only: integer S1 would be amplitude DN, not the dB the statistics are in
    data = read_raster(path, count=len(S1_BANDS), size=size, dtypes=("float32", "float64"), what="S1 sigma0 dB")
    data = data.astype(np.float32)
    bad = ~np.isfinite(data)
    data = np.clip(np.where(bad, np.float32(self.s1_nan_value), data), *self.s1_clip_db)
    return {band: data[..., i] for i, band in enumerate(S1_BANDS)}, int(bad.sum())

  def _read_labels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    path = self._path(index, "lc")
    dtypes = ("uint8", "uint16", "int16", "int32")
    igbp = read_raster(path, count=LC_COUNT, size=self.patch_size, dtypes=dtypes, indexes=[1], what="land cover")
    counts = scheme_counts(igbp_counts(igbp, path), self.label_scheme)
    return make_labels(counts, self.label_type, self.threshold), (counts / counts.sum()).astype(np.float32)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    channels = self._read_s2(index) if self._s2_read else {}
    num_cleaned = 0
    if self._reads_s1:
      s1, num_cleaned = self._read_s1(index)
      channels.update(s1)
    labels, fractions = self._read_labels(index)
    sample = {
      "image": np.stack([channels[b] for b in self.bands], axis=-1),
      "labels": labels,
      "label_fractions": fractions,
      "num_cleaned": np.int32(num_cleaned),
      "index": np.int32(index),
    }
    if self.pair_sensors:
      sample["s1"] = np.stack([channels[b] for b in S1_BANDS], axis=-1)
      sample["s2"] = np.stack([channels[b] for b in SEED_S2_BANDS], axis=-1)
    return sample

  def problems(self, index: int) -> list[BadSampleError]:
    """Every problem of sample `index` (each file it reads), where __getitem__ stops at the first."""
    reads = (
      [self._read_labels] + ([self._read_s2] if self._s2_read else []) + ([self._read_s1] if self._reads_s1 else [])
    )
    found = []
    for read in reads:
      try:
        read(index)
      except BadSampleError as e:
        found.append(e)
    return found


# ---------------------------------------------------------------------------------------------------------------
# Registry entry points (jaxgeo/data/__init__.py): config fields and the source of a split
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_SYNTHETIC_DIR = "~/.cache/jaxgeo/synthetic_sen12ms"


def data_config(dataset: str = "sen12ms"):
  """SEN12MS's own config.data fields (the registry adds the shared ones)."""
  import ml_collections

  del dataset
  c = ml_collections.ConfigDict()
  c.train_list = ml_collections.config_dict.placeholder(str)  # None: <root>/train_list.txt, else .pkl
  c.test_list = ml_collections.config_dict.placeholder(str)  # None: <root>/test_list.txt, else .pkl
  c.val_list = ml_collections.config_dict.placeholder(str)  # None: the last val_fraction of the train list
  c.val_fraction = 0.2
  c.sensor = "s2"  # s2 (seed's 10 bands), s2_all, rgb (B02,B03,B04 as the seed), s1, s1s2, or "B04,B03,B02"
  c.label_type = "multi"  # "multi" (fraction >= threshold) or "single" (argmax)
  c.label_scheme = 10  # 10 (the seed's simplified IGBP) or 17
  c.threshold = 0.1
  # -25 dB is the floor of the clip below: a missing return is treated as no backscatter (what -inf dB means),
  # not as the seed's 0 dB (np.nan_to_num), which clips to the brightest possible value.
  c.s1_nan_value = -25.0
  c.s1_clip_db = (-25.0, 0.0)  # the seed clips sigma0 to [-25, 0] dB
  c.pair_sensors = False  # also yield "s1" [H, W, 2] and "s2" [H, W, 10] (MoCo sensor pairs / fusion)
  c.synthetic_dir = DEFAULT_SYNTHETIC_DIR
  c.synthetic_num_scenes = 8  # spread over the four seasons; about a fifth are held out as test scenes
  c.synthetic_patches_per_scene = 16
  c.synthetic_patch_size = PATCH_SIZE
  return c


def resolve_root(data_config) -> tuple[str, int]:
  """(root, patch size) of the configured data; with no data.root, those of the (written once) synthetic copy."""
  from jaxgeo.data.source import announce_synthetic, field
  from jaxgeo.data.synthetic_sen12ms import write_synthetic_sen12ms

  root = field(data_config, "root")
  if root is not None:
    return os.path.expanduser(root), PATCH_SIZE
  num_scenes = int(field(data_config, "synthetic_num_scenes", 8))
  per_scene = int(field(data_config, "synthetic_patches_per_scene", 16))
  size = int(field(data_config, "synthetic_patch_size", PATCH_SIZE))
  root = write_synthetic_sen12ms(
    field(data_config, "synthetic_dir", DEFAULT_SYNTHETIC_DIR), num_scenes, per_scene, patch_size=size
  )
  announce_synthetic(
    f"SEN12MS ({num_scenes} scenes x {per_scene} patches of {size} px)",
    root,
    "To train on real SEN12MS, pass --config.data.root=/path/to/SEN12MS (the folder holding ROIs1158_spring, ...) "
    "and --config.data.train_list / test_list (train_list.txt / test_list.txt of schmitt-muc/SEN12MS, or a pickled "
    "list such as the seed's train_list_1024.pkl).",
  )
  return root, size


def build_source(data_config, split: str) -> Sen12msSource:
  """The Sen12msSource of `split` described by config.data."""
  from jaxgeo.data.source import field

  root, patch_size = resolve_root(data_config)
  return Sen12msSource(
    root,
    split,
    train_list=field(data_config, "train_list"),
    test_list=field(data_config, "test_list"),
    val_list=field(data_config, "val_list"),
    val_fraction=float(field(data_config, "val_fraction", 0.2)),
    sensor=field(data_config, "sensor", "s2"),
    label_type=field(data_config, "label_type", "multi"),
    label_scheme=int(field(data_config, "label_scheme", 10)),
    threshold=float(field(data_config, "threshold", 0.1)),
    s1_nan_value=float(field(data_config, "s1_nan_value", -25.0)),
    s1_clip_db=tuple(field(data_config, "s1_clip_db", (-25.0, 0.0))),
    pair_sensors=bool(field(data_config, "pair_sensors", False)),
    patch_size=patch_size,
  )
