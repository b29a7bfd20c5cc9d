"""What every dataset hands the shared machinery, and the few helpers the dataset modules share.

A dataset lives in one module of jaxgeo/data (bigearthnet.py, sen12ms.py, landcoverai.py, tiles.py) that the
registry in jaxgeo/data/__init__.py finds by `config.data.dataset`. The module provides:

  data_config(dataset) -> ml_collections.ConfigDict   its own config.data fields with their defaults (the shared
                                                       ones, root / on_bad_sample / workers ..., come from the
                                                       registry), so a mistyped override fails at start-up
  build_source(data_config, split) -> Source          one split ("train" | "validation" | "test"); with no
                                                       data.root it writes (once, cached) and reads a synthetic
                                                       copy in the dataset's real on-disk layout

A Source is a grain RandomAccessDataSource with a little more, described by `Source` below. Samples are dicts
of numpy arrays whose shapes are the same for every sample of a split (the pipeline stacks them into batches);
the device normalises image-like keys with the source's `norm_stats`, so sources yield values in the units
their statistics are in.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Callable, Protocol

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
LABEL_KINDS = ("multilabel", "single", "segmentation")
_ANNOUNCED = set()


class Source(Protocol):
  """The contract between a dataset and the shared pipeline, loop, evaluation and tools.

  name         the registry name (config.data.dataset)
  split        "train" | "validation" | "test"
  bands        channel names of sample["image"], in order
  norm_stats   {image key: (mean per channel, std per channel)} for every image-like key of a sample
               ("image" always; e.g. "s1" / "s2" too when a dataset yields a sensor pair)
  class_names  names of the classes, index = class id
  label_kind   "multilabel": sample["labels"] float32 [C] multi-hot
               "single":     sample["labels"] int32 [] class id
               "segmentation": sample["mask"] int32 [H, W] class ids (ignore_index where unlabelled)

  source[i]    {"image": float32 [H, W, C], "labels" or "mask", "index": int32 i, ...}; any problem with the
               sample's files raises data.geotiff.BadSampleError naming the file (the pipeline's skip mode
               counts it); problems with the dataset as a whole raise ValueError / FileNotFoundError at
               construction
  problems(i)  every problem of sample i as a list of BadSampleError (empty when good), for `data.check`
  """

  name: str
  split: str
  bands: tuple[str, ...]
  norm_stats: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]
  class_names: tuple[str, ...]
  label_kind: str

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...

  def problems(self, index: int) -> list: ...


def field(config, name, default=None):
  """config.data.<name> from a ConfigDict, a plain dict or an object; `default` when absent or None."""
  value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
  return default if value is None else value


def announce_synthetic(dataset: str, path: str, how_to_use_real: str) -> None:
  """Warns once per process and path that a run reads generated data, and how to point it at real data."""
  if path in _ANNOUNCED:
    return
  _ANNOUNCED.add(path)
  log.warning(
    "config.data.root is not set: using SYNTHETIC %s data (generated at %s); results say nothing about real "
    "imagery. %s",
    dataset,
    path,
    how_to_use_real,
  )


def write_once(directory, folder: str, write: Callable[[str], str | None], marker: str = ".jaxgeo-complete") -> str:
  """`directory/folder`, written by `write(staging_path)` unless a complete copy exists (its `marker` file, holding
  what `write` returns, is written last). Written into a temporary folder and renamed into place, so concurrent
  writers (hosts, test processes) never see half a dataset, and a crash mid-write leaves nothing that looks done."""
  directory = os.path.expanduser(os.fspath(directory))
  final = os.path.join(directory, folder)
  if os.path.isfile(os.path.join(final, marker)):
    return final
  os.makedirs(directory, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".writing-", dir=directory)
  try:
    stamp = write(staging)
    with open(os.path.join(staging, marker), "w") as f:
      f.write(stamp or "")
    try:
      os.rename(staging, final)
    except OSError:
      if not os.path.isfile(os.path.join(final, marker)):  # not a concurrent writer having won the race
        raise
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging)
  return final
