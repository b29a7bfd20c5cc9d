"""Segmentation on your own tiles: RoboSat slippy maps, SageMaker channel folders, Label Maker's labels.npz.

config.data.dataset picks the layout:
  "slippy"      `images/{z}/{x}/{y}.{png,jpg,webp,tif}` + `labels/{z}/{x}/{y}.png` (mode P or grayscale class ids),
                paired by z/x/y (names that are not integers are skipped, as RoboSat does). Split by tile lists
                (`data.train_tiles` / `validation_tiles` / `test_tiles`: CSV rows `x,y,z`, RoboSat's `rs cover`
                format), else by `tile_split`, a hash of z/x/y (`data.val_fraction` / `data.test_fraction`).
                RoboSat's own pre-split `training/{images,labels}` + `validation/{images,labels}` is read as is.
                georef(): the tile's EPSG:3857 bounds, from mercantile.
  "folders"     SageMaker semantic segmentation channels: `train/` + `train_annotation/`, `validation/` +
                `validation_annotation/` (same basenames; JPG/PNG images, PNG annotations), optional
                `label_map/{train,validation}_label_map.json`: `{"scale": "3"}` (class = pixel // 3) or
                `{"map": {"0": 5, ...}}` (keys are class ids, values the pixel values that encode them).
  "labelmaker"  Label Maker: `labels.npz` (key "x-y-z" -> 256 x 256 class ids, 0 background, classes 1..n)
                and `tiles/{x}-{y}-{z}.jpg`. Split as `label-maker package` splits (its config.json's seed,
                split_names, split_vals) or, with data.split="hash", by `tile_split`. georef() from mercantile.

Tiles missing their image or labels are reported when the source is built (count and first examples): a
ValueError with data.on_bad_sample="error", else a warning, and reading one is a counted bad sample. (Label
Maker's labelled tiles without an image are left out with a warning, as label-maker package leaves them out.)

What every segmentation dataset shares (class fields of config.data, label tables, file readers and
`SegmentationSource`, whose samples are {"image": float32 [T, T, C], "mask": int32 [T, T], "index": int32})
lives in segmentation.py; Classes, LabelTable, to_class_ids and slippy_georef are importable from here too.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from typing import Sequence

import numpy as np

from jaxgeo.data.segmentation import (
  EXAMPLES,
  TABLE_SIZE,
  UNKNOWN,
  Classes,
  LabelTable,
  SegmentationSource,
  Tile,
  image_options,
  report_unpaired,
  segmentation_config,
  slippy_georef,  # noqa: F401  re-exported: callers of this module's readers find them here too
  to_class_ids,  # noqa: F401
)
from jaxgeo.data.source import SPLITS, field

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff")  # lossless only: JPEG would smear class ids at every edge


# ---------------------------------------------------------------------------------------------------------------
# SageMaker label maps
# ---------------------------------------------------------------------------------------------------------------


def sagemaker_label_table(path: str, num_classes: int) -> LabelTable:
  """The table of a SageMaker label_map json: {"scale": s} (class = floor(pixel / s)) or {"map": {class id:
  pixel value}}; classes >= num_classes encode nothing."""
  try:
    with open(path) as f:
      spec = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read label map json: {e}") from e
  if not isinstance(spec, dict) or len(set(spec) & {"scale", "map"}) != 1:
    raise ValueError(
      f'{path}: expected {{"scale": "<number>"}} or {{"map": {{"<class id>": <pixel value>}}}}, got {spec!r}'
    )
  values = np.full(TABLE_SIZE, UNKNOWN, np.int32)
  if "scale" in spec:
    try:
      scale = float(spec["scale"])
    except (TypeError, ValueError):
      scale = 0.0
    if not scale > 0:
      raise ValueError(f'{path}: "scale" must be a positive number, got {spec["scale"]!r}')
    classes = np.floor(np.arange(TABLE_SIZE) / scale).astype(np.int64)
    values = np.where(classes < num_classes, classes, UNKNOWN).astype(np.int32)
    return LabelTable(values, f"pixel values v with v // {spec['scale']} < {num_classes} (scale of {path})")
  mapping = spec["map"]
  if not isinstance(mapping, dict):
    raise ValueError(f'{path}: "map" must be an object {{"<class id>": <pixel value>}}, got {mapping!r}')
  for key, pixel in mapping.items():
    try:
      class_id, pixel = int(key), int(pixel)
    except (TypeError, ValueError):
      raise ValueError(f'{path}: "map" entry {key!r}: {pixel!r} is not <class id>: <pixel value> integers') from None
    if not 0 <= class_id < num_classes:
      raise ValueError(f'{path}: "map" class id {class_id} outside 0..{num_classes - 1} (data.num_classes)')
    if not 0 <= pixel < TABLE_SIZE or values[pixel] != UNKNOWN:
      raise ValueError(f'{path}: "map" pixel value {pixel} is out of range or encodes two classes')
    values[pixel] = class_id
  return LabelTable(values, f"pixel values {sorted(int(v) for v in mapping.values())} (map of {path})")


# ---------------------------------------------------------------------------------------------------------------
# Slippy maps (RoboSat) and tile splits
# ---------------------------------------------------------------------------------------------------------------


def tile_split(z: int, x: int, y: int, val_fraction: float, test_fraction: float) -> str:
  """Split of a tile when no list says: sha256 of "z/x/y" as a number in [0, 1): below val_fraction is
  validation, then test_fraction is test, the rest train. Stable across machines and runs."""
  value = int.from_bytes(hashlib.sha256(f"{z}/{x}/{y}".encode()).digest()[:8], "big") / 2.0**64
  return "validation" if value < val_fraction else "test" if value < val_fraction + test_fraction else "train"


def _int_name(name: str) -> int | None:
  return int(name) if name.isdigit() else None


def list_slippy(folder: str, extensions: Sequence[str]) -> dict[tuple[int, int, int], str]:
  """{(x, y, z): path} of `folder/{z}/{x}/{y}.{ext}`; a tile present with two extensions is a ValueError."""
  found = {}
  if not os.path.isdir(folder):
    return found
  for z_entry in os.scandir(folder):
    z = _int_name(z_entry.name)
    if z is None or not z_entry.is_dir():
      continue
    for x_entry in os.scandir(z_entry.path):
      x = _int_name(x_entry.name)
      if x is None or not x_entry.is_dir():
        continue
      for file in os.scandir(x_entry.path):
        stem, ext = os.path.splitext(file.name)
        y = _int_name(stem)
        if y is None or ext.lower() not in extensions:
          continue
        if (x, y, z) in found:
          raise ValueError(f"{found[x, y, z]} and {file.path}: two files for tile z={z} x={x} y={y}; keep one")
        found[x, y, z] = file.path
  return found


def read_tile_list(path: str) -> list[tuple[int, int, int]]:
  """(x, y, z) per row of a RoboSat tile list (CSV rows `x,y,z`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: tile list does not exist")
  tiles = []
  with open(path, newline="") as f:
    for line, row in enumerate(csv.reader(f), start=1):
      if not row or not "".join(row).strip():
        continue
      try:
        x, y, z = (int(v) for v in row)
      except ValueError:
        raise ValueError(f"{path}:{line}: expected a row `x,y,z` of integers, got {row}") from None
      tiles.append((x, y, z))
  return tiles


def _paired_tiles(images, labels, keys, name_of, expected, xyz=None):
  """Tiles of `keys`, with the files listed in `images` / `labels` or, where one is missing, its `expected`
  (image, label) path (reading it is then a BadSampleError), and the pairing problems found."""
  tiles, problems = [], []
  for key in keys:
    image, label = images.get(key), labels.get(key)
    if image is None and label is None:
      problems.append(f"{expected(key)[0]}: listed, but neither image nor label file exists")
    elif image is None or label is None:
      problems.append(f"{expected(key)[image is not None]}: missing {'image' if image is None else 'label'} file")
    image, label = image or expected(key)[0], label or expected(key)[1]
    tiles.append(Tile(name=name_of(key), image=image, labels=label, xyz=key if xyz else None))
  return tiles, problems


def _hash_fractions(data_config, split: str) -> tuple[float, float]:
  val, test = float(field(data_config, "val_fraction", 0.1)), float(field(data_config, "test_fraction", 0.0))
  if val < 0 or test < 0 or val + test > 1:
    raise ValueError(f"data.val_fraction={val}, data.test_fraction={test}: expected shares >= 0 summing to <= 1")
  if {"train": 1 - val - test, "validation": val, "test": test}[split] <= 0:
    raise ValueError(f"no {split!r} split: data.val_fraction={val}, data.test_fraction={test} give it no tiles")
  return val, test


def slippy_tiles(root: str, split: str, data_config, on_bad_sample: str) -> tuple[list[Tile], str]:
  """The tiles of `split` of a RoboSat slippy-map dataset, and a word on how the split was chosen."""
  folder, keep, chosen = root, None, lambda key: True
  if os.path.isdir(os.path.join(root, "training", "images")):  # RoboSat's dataset/{training,validation}
    if split == "test":
      raise ValueError(f"{root}: RoboSat's training/ + validation/ layout has no 'test' split")
    folder = os.path.join(root, "training" if split == "train" else "validation")
    how = f"the {os.path.basename(folder)}/ folder"
  elif not os.path.isdir(os.path.join(root, "images")):
    raise FileNotFoundError(
      f"{root}: expected images/{{z}}/{{x}}/{{y}}.png + labels/ (or RoboSat's training/ + validation/) (data.root)"
    )
  elif any(field(data_config, f"{s}_tiles") for s in SPLITS):
    tile_list = field(data_config, f"{split}_tiles")
    if not tile_list:
      raise ValueError(f"data.{split}_tiles is not set, but other splits are given by tile lists: set it too")
    keep, how = read_tile_list(os.path.expanduser(tile_list)), f"tile list {tile_list}"
  else:
    val, test = _hash_fractions(data_config, split)
    chosen = lambda key: tile_split(key[2], key[0], key[1], val, test) == split
    how = f"hash of z/x/y (val_fraction={val}, test_fraction={test})"
  images = list_slippy(os.path.join(folder, "images"), IMAGE_EXTENSIONS)
  labels = list_slippy(os.path.join(folder, "labels"), LABEL_EXTENSIONS)
  if keep is not None:
    keys = list(dict.fromkeys(keep))
  else:
    keys = [k for k in sorted(set(images) | set(labels), key=lambda t: (t[2], t[0], t[1])) if chosen(k)]

  def expected(key):
    x, y, z = key
    return (f"{folder}/images/{z}/{x}/{y}.{{png,jpg,webp,tif}}", f"{folder}/labels/{z}/{x}/{y}.png")

  tiles, problems = _paired_tiles(images, labels, keys, lambda k: f"{k[2]}/{k[0]}/{k[1]}", expected, xyz=True)
  report_unpaired(f"{folder} ({split} split, by {how})", problems, on_bad_sample)
  return tiles, how


# ---------------------------------------------------------------------------------------------------------------
# SageMaker channels
# ---------------------------------------------------------------------------------------------------------------


def _list_stems(folder: str, extensions: Sequence[str]) -> dict[str, str]:
  found = {}
  if not os.path.isdir(folder):
    return found
  for entry in os.scandir(folder):
    stem, ext = os.path.splitext(entry.name)
    if entry.is_file() and ext.lower() in extensions:
      if stem in found:
        raise ValueError(f"{found[stem]} and {entry.path}: two files with basename {stem!r}; keep one")
      found[stem] = entry.path
  return found


def folder_tiles(root: str, split: str, num_classes: int, on_bad_sample: str) -> tuple[list[Tile], LabelTable]:
  """The tiles of a SageMaker channel pair and the label table of its label map (default {"scale": "1"})."""
  channel = {"train": "train", "validation": "validation"}.get(split)
  if channel is None:
    raise ValueError(f"{root}: SageMaker semantic segmentation has channels train and validation, no {split!r} split")
  image_dir, label_dir = os.path.join(root, channel), os.path.join(root, f"{channel}_annotation")
  for folder in (image_dir, label_dir):
    if not os.path.isdir(folder):
      raise FileNotFoundError(
        f"{folder}: SageMaker channel folder does not exist (expected {channel}/ and {channel}_annotation/ "
        "under data.root)"
      )
  images = _list_stems(image_dir, (".jpg", ".jpeg", ".png"))
  labels = _list_stems(label_dir, (".png",))
  expected = lambda stem: (os.path.join(image_dir, f"{stem}.jpg"), os.path.join(label_dir, f"{stem}.png"))
  tiles, problems = _paired_tiles(images, labels, sorted(set(images) | set(labels)), str, expected)
  report_unpaired(f"{image_dir} + {label_dir}", problems, on_bad_sample)
  maps = {s: os.path.join(root, "label_map", f"{s}_label_map.json") for s in ("train", "validation")}
  if os.path.isfile(maps[channel]):
    return tiles, sagemaker_label_table(maps[channel], num_classes)
  other = maps["validation" if channel == "train" else "train"]
  if os.path.isfile(other):
    log.warning(
      "%s does not exist but %s does: reading %s with the default {\"scale\": \"1\"}", maps[channel], other, channel
    )
  table = LabelTable.identity(num_classes)
  return tiles, LabelTable(table.values, f"class ids 0..{num_classes - 1} (no label map: scale 1)")


# ---------------------------------------------------------------------------------------------------------------
# Label Maker
# ---------------------------------------------------------------------------------------------------------------


def labelmaker_split(
  keys: Sequence[str], with_image, seed: int, split_names: Sequence[str], split_vals: Sequence[float]
):
  """{split name: keys} as `label-maker package` splits: sort all labelled tiles, shuffle them with numpy's
  global RandomState seeded by `seed`, drop those without an image (`with_image`: the keys that have one),
  then cut what is left at int(cumsum(n * split_vals))."""
  if len(split_names) != len(split_vals) or not np.isclose(sum(split_vals), 1):
    raise ValueError(
      f"Label Maker split_names {list(split_names)} / split_vals {list(split_vals)}: same length, summing to 1"
    )
  tiles = np.array(sorted(keys))
  np.random.RandomState(seed).shuffle(tiles)  # = np.random.seed(seed); np.random.shuffle(tiles)
  tiles = [t for t in tiles.tolist() if t in with_image]
  bounds = np.cumsum([len(tiles) * v for v in split_vals]).astype(np.int64)
  starts = [0, *bounds[:-1].tolist()]
  ends = [*bounds[:-1].tolist(), len(tiles)]
  return {name: tiles[start:end] for name, start, end in zip(split_names, starts, ends)}


def _labelmaker_settings(root: str, data_config) -> tuple[int, list[str], list[float], str]:
  path = field(data_config, "labelmaker_config") or os.path.join(root, "config.json")
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path}: Label Maker config.json not found; its seed, split_names and split_vals define the split "
      "(set data.labelmaker_config), or set data.split='hash'"
    )
  with open(path) as f:
    config = json.load(f)
  seed = config.get("seed")
  if not seed:
    raise ValueError(
      f"{path}: no non-zero `seed`: label-maker package then splits at random, so its split cannot be "
      "recovered; set data.split='hash'"
    )
  return int(seed), list(config.get("split_names", ["train", "test"])), list(config.get("split_vals", [0.8, 0.2])), path


def labelmaker_tiles(root: str, split: str, data_config) -> tuple[list[Tile], str]:
  """The tiles of `split` of a Label Maker folder, and a word on how the split was chosen."""
  mode = field(data_config, "split", "labelmaker")
  if mode not in ("labelmaker", "hash"):
    raise ValueError(f"data.split: expected 'labelmaker' (label-maker package's split) or 'hash', got {mode!r}")
  npz = os.path.join(root, "labels.npz")
  if not os.path.isfile(npz):
    raise FileNotFoundError(
      f"{npz}: Label Maker labels.npz does not exist (data.root must be label-maker's --dest folder)"
    )
  try:
    with np.load(npz) as labels:
      keys = list(labels.files)
      first = labels[keys[0]] if keys else np.zeros((256, 256))
  except (OSError, ValueError) as e:
    raise ValueError(f"{npz}: cannot read as Label Maker labels (npz of arrays): {e}") from e
  if first.ndim != 2:
    raise ValueError(f"{npz}: labels of shape {first.shape}; expected segmentation (ml_type) arrays [256, 256]")
  xyz = {}
  for key in keys:
    parts = key.split("-")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
      raise ValueError(f"{npz}: key {key!r} is not a tile 'x-y-z'")
    xyz[key] = tuple(int(p) for p in parts)
  images = _list_stems(os.path.join(root, "tiles"), IMAGE_EXTENSIONS)
  with_image = {k for k in keys if k in images and _opens(images[k])}
  missing, orphans = sorted(set(keys) - set(with_image)), sorted(set(images) - set(keys))
  if missing:
    log.warning(
      "%s: %d labelled tile(s) have no readable image in tiles/ and are left out, as label-maker package leaves "
      "them out (it downloads no image for most background tiles), e.g. %s",
      npz,
      len(missing),
      missing[:EXAMPLES],
    )
  if orphans:
    log.warning(
      "%s: %d image(s) in tiles/ have no labels in labels.npz and are left out, e.g. %s",
      root,
      len(orphans),
      orphans[:EXAMPLES],
    )
  if mode == "hash":
    val, test = _hash_fractions(data_config, split)
    chosen = [k for k in sorted(with_image) if tile_split(xyz[k][2], xyz[k][0], xyz[k][1], val, test) == split]
    how = f"hash of z/x/y (val_fraction={val}, test_fraction={test})"
  else:
    seed, names, vals, path = _labelmaker_settings(root, data_config)
    aliases = {"train": "train", "training": "train", "val": "validation", "validation": "validation", "test": "test"}
    parts = {aliases.get(n, n): part for n, part in labelmaker_split(keys, with_image, seed, names, vals).items()}
    if split not in parts:
      raise ValueError(
        f"{path}: split_names {names} has no {split!r} split; add one (and its split_vals) or set data.split='hash'"
      )
    chosen, how = parts[split], f"label-maker package split of {path} (seed {seed})"
  tiles = [Tile(name=k, image=images[k], labels=npz, key=k, xyz=xyz[k]) for k in chosen]
  return tiles, how


def _opens(path: str) -> bool:
  """Whether Pillow can open the file's header: label-maker package leaves out tiles it cannot."""
  from PIL import Image

  try:
    with Image.open(path):
      return True
  except (OSError, ValueError, SyntaxError):
    return False


# ---------------------------------------------------------------------------------------------------------------
# Registry entry points (jaxgeo/data/__init__.py)
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_SYNTHETIC_DIR = "~/.cache/jaxgeo/synthetic_tiles"
# The synthetic data's classes; class 0 is background, as RoboSat, SageMaker and Label Maker all have it.
DEFAULT_CLASSES = {
  "slippy": (("background", (0, 0, 0)), ("building", (255, 128, 0))),
  "folders": (
    ("background", (0, 0, 0)),
    ("building", (97, 74, 74)),
    ("woodland", (38, 115, 0)),
    ("water", (0, 197, 255)),
    ("road", (207, 207, 207)),
  ),
  "labelmaker": (("background", (0, 0, 0)), ("building", (255, 128, 0)), ("road", (207, 207, 207))),
}


def data_config(dataset: str = "slippy"):
  """The tile layouts' own config.data fields (the registry adds the shared ones)."""
  import ml_collections

  if dataset not in DEFAULT_CLASSES:
    raise ValueError(f"config.data.dataset={dataset!r}; jaxgeo.data.tiles reads {sorted(DEFAULT_CLASSES)}")
  names, colors = zip(*DEFAULT_CLASSES[dataset])
  c = segmentation_config(names, colors, tile_size=256)
  c.synthetic_dir = DEFAULT_SYNTHETIC_DIR
  c.synthetic_grid = (8, 6)  # tiles across x down of the synthetic area
  if dataset == "slippy":
    c.synthetic_zoom = 18
    for split in SPLITS:
      setattr(c, f"{split}_tiles", ml_collections.config_dict.placeholder(str))  # CSV of x,y,z rows
  if dataset == "folders":
    c.num_classes = ml_collections.config_dict.placeholder(int)  # SageMaker's hyper-parameter; None: len(class_names)
  if dataset == "labelmaker":
    c.synthetic_zoom = 17
    c.split = "labelmaker"  # as `label-maker package` splits (config.json); or "hash"
    c.labelmaker_config = ml_collections.config_dict.placeholder(str)  # None: <root>/config.json
  if dataset in ("slippy", "labelmaker"):
    c.val_fraction = 0.1  # the hash split's shares
    c.test_fraction = 0.0
  return c


def _root(data_config, dataset: str) -> str:
  from jaxgeo.data import synthetic_aerial
  from jaxgeo.data.source import announce_synthetic

  root = field(data_config, "root")
  if root is not None:
    return os.path.expanduser(root)
  directory = field(data_config, "synthetic_dir", DEFAULT_SYNTHETIC_DIR)
  grid = tuple(field(data_config, "synthetic_grid", (8, 6)))
  colors = tuple(tuple(c) for _, c in DEFAULT_CLASSES[dataset])
  if dataset == "slippy":
    root = synthetic_aerial.write_synthetic_slippy(
      directory, zoom=int(field(data_config, "synthetic_zoom", 18)), grid=grid, colors=colors
    )
    how = "pass --config.data.root=/path/with/images+labels (slippy maps, e.g. from robosat or gdal2tiles --xyz)"
  elif dataset == "folders":
    root = synthetic_aerial.write_synthetic_folders(directory, grid=grid, colors=colors)
    how = "pass --config.data.root=/path/with/train+train_annotation+validation+validation_annotation"
  else:
    root = synthetic_aerial.write_synthetic_labelmaker(
      directory, zoom=int(field(data_config, "synthetic_zoom", 17)), grid=grid
    )
    how = "pass --config.data.root=/path/to/label-maker/dest (labels.npz + tiles/)"
  announce_synthetic(f"{dataset} tiles", root, "To train on your own tiles, " + how + ".")
  return root


def build_source(data_config, split: str) -> SegmentationSource:
  """The SegmentationSource of `split` of the tiles described by config.data (dataset slippy | folders |
  labelmaker)."""
  dataset = field(data_config, "dataset", "slippy")
  if dataset not in DEFAULT_CLASSES:
    raise ValueError(f"config.data.dataset={dataset!r}; jaxgeo.data.tiles reads {sorted(DEFAULT_CLASSES)}")
  root = _root(data_config, dataset)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root}: {dataset} root folder does not exist (data.root)")
  classes = Classes.from_config(data_config)
  on_bad_sample = field(data_config, "on_bad_sample", "error")
  table = None
  if dataset == "slippy":
    tiles, how = slippy_tiles(root, split, data_config, on_bad_sample)
  elif dataset == "folders":
    num_classes = int(field(data_config, "num_classes", len(classes.names)))
    if num_classes != len(classes.names):
      raise ValueError(
        f"data.num_classes={num_classes} but data.class_names has {len(classes.names)} names; make them agree"
      )
    tiles, table = folder_tiles(root, split, num_classes, on_bad_sample)
    how = f"the {split} channel"
  else:
    tiles, how = labelmaker_tiles(root, split, data_config)
  source = SegmentationSource(
    name=dataset, split=split, root=root, layout=dataset, tiles=tiles, classes=classes, table=table,
    tile_size=int(field(data_config, "tile_size", 256)), **image_options(data_config),
  )  # fmt: skip
  log.info("%s; split by %s", source.describe(), how)
  return source
