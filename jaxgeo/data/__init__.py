"""Host-side data: BigEarthNet-S2 sources read with rasterio, a synthetic stand-in, and the grain pipeline."""

from __future__ import annotations

import logging
import os

from jaxgeo.data.bigearthnet import (
  ALL_BANDS,
  BAND_MEAN,
  BAND_STD,
  CLASSES_19,
  CLASSES_43,
  IMAGENET_MEAN,
  IMAGENET_STD,
  LABEL_43_TO_19,
  RGB_BANDS,
  BigEarthNetSource,
  normalization_stats,
  resolve_bands,
)
from jaxgeo.data.geotiff import BadSampleError, read_band, resize_bilinear, write_geotiff
from jaxgeo.data.pipeline import make_iter_dataset, steps_per_epoch
from jaxgeo.data.synthetic import write_synthetic_bigearthnet

log = logging.getLogger(__name__)
DEFAULT_SYNTHETIC_DIR = "~/.cache/jaxgeo/synthetic_ben"
DEFAULT_SYNTHETIC_PATCHES = 256
_ANNOUNCED = set()


def _field(config, name, default=None):
  value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
  return default if value is None else value


def resolve_paths(data_config) -> tuple[str, str | None]:
  """(root, metadata) of the configured data; with no root, those of the (written once) synthetic dataset."""
  root = _field(data_config, "root")
  if root is not None:
    metadata = _field(data_config, "metadata")
    return os.path.expanduser(root), None if metadata is None else os.path.expanduser(metadata)
  directory = _field(data_config, "synthetic_dir", DEFAULT_SYNTHETIC_DIR)
  num_patches = int(_field(data_config, "synthetic_num_patches", DEFAULT_SYNTHETIC_PATCHES))
  root, metadata = write_synthetic_bigearthnet(directory, num_patches)
  if root in _ANNOUNCED:
    return root, metadata
  _ANNOUNCED.add(root)  # once per process: every split and evaluation reads through here
  log.warning(
    "config.data.root is not set: using SYNTHETIC BigEarthNet-S2 data (%d generated patches at %s); "
    "results say nothing about real imagery. To train on real BigEarthNet-S2, pass "
    "--config.data.root=/path/to/BigEarthNet-v1.0 and, for the official splits, "
    "--config.data.metadata=/path/to/metadata.parquet (bigearthnet-gdf-builder or BigEarthNet v2).",
    num_patches,
    root,
  )
  return root, metadata


def build_source(data_config, split: str) -> BigEarthNetSource:
  """The BigEarthNetSource of `split` ("train" | "validation" | "test") described by config.data.

  A data.root that is a packed store (made by `python -m jaxgeo.data.pack`) gives its PackedSource instead:
  same samples, labels and split, read from ArrayRecord.
  """
  root, metadata = resolve_paths(data_config)
  from jaxgeo.data import pack  # pylint: disable=g-import-not-at-top

  if pack.is_packed(root):
    if metadata is not None:
      log.warning(
        "config.data.metadata=%s is ignored: %s is a packed store, whose splits and labels were "
        "fixed when it was packed",
        metadata,
        root,
      )
    return pack.PackedSource(
      root,
      split=split,
      bands=_field(data_config, "bands", "rgb"),
      image_size=int(_field(data_config, "image_size", 120)),
    )
  return BigEarthNetSource(
    root,
    metadata,
    split=split,
    bands=_field(data_config, "bands", "rgb"),
    image_size=int(_field(data_config, "image_size", 120)),
  )


__all__ = [
  "ALL_BANDS",
  "BAND_MEAN",
  "BAND_STD",
  "CLASSES_19",
  "CLASSES_43",
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "LABEL_43_TO_19",
  "RGB_BANDS",
  "BadSampleError",
  "BigEarthNetSource",
  "build_source",
  "make_iter_dataset",
  "normalization_stats",
  "read_band",
  "resize_bilinear",
  "resolve_bands",
  "resolve_paths",
  "steps_per_epoch",
  "write_geotiff",
  "write_synthetic_bigearthnet",
]
