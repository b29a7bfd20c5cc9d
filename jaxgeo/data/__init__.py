"""Host-side data: one source per dataset behind one registry, the grain pipeline, GeoTIFF helpers.

    source = data.build_source(config.data, "train")    # config.data.dataset picks the dataset module

The registry maps `config.data.dataset` to the module that reads it; each module provides `data_config` (its
config fields) and `build_source` (a split as a `data.source.Source`). Modules are imported on first use, so
a run only loads the readers it needs.
"""

from __future__ import annotations

import importlib

import ml_collections

from jaxgeo.data.ben_labels import CLASSES_19, CLASSES_43, LABEL_43_TO_19
from jaxgeo.data.bigearthnet import (
  ALL_BANDS,
  BAND_MEAN,
  BAND_STD,
  IMAGENET_MEAN,
  IMAGENET_STD,
  RGB_BANDS,
  BigEarthNetSource,
  normalization_stats,
  resolve_bands,
  resolve_paths,
)
from jaxgeo.data.geotiff import BadSampleError, read_band, resize_bilinear, write_geotiff
from jaxgeo.data.pipeline import make_iter_dataset, steps_per_epoch
from jaxgeo.data.source import SPLITS, Source
from jaxgeo.data.synthetic import write_synthetic_bigearthnet

# config.data.dataset -> the module that reads it.
DATASETS = {
  "bigearthnet": "jaxgeo.data.bigearthnet",
  "sen12ms": "jaxgeo.data.sen12ms",
  "landcoverai": "jaxgeo.data.landcoverai",
  "slippy": "jaxgeo.data.tiles",
  "folders": "jaxgeo.data.tiles",
  "labelmaker": "jaxgeo.data.tiles",
}


def dataset_module(name: str):
  if name not in DATASETS:
    raise ValueError(f"config.data.dataset={name!r}; expected one of {sorted(DATASETS)}")
  return importlib.import_module(DATASETS[name])


def data_config(dataset: str = "bigearthnet") -> ml_collections.ConfigDict:
  """config.data for `dataset`: the fields every dataset shares, then the dataset module's own."""
  c = ml_collections.ConfigDict()
  c.dataset = dataset
  c.root = ml_collections.config_dict.placeholder(str)  # None: a synthetic copy in the real layout
  c.on_bad_sample = "error"  # or "skip": logged once, counted, bounded by max_skipped_fraction
  c.max_skipped_fraction = 0.01
  c.worker_count = 4  # grain worker processes; the data order does not depend on it
  c.prefetch = 2
  own = dataset_module(dataset).data_config(dataset)
  clash = sorted(set(own.keys()) & set(c.keys()))
  if clash:
    raise ValueError(f"{DATASETS[dataset]}.data_config redefines shared field(s) {clash}")
  c.update(own)
  return c


def build_source(data_config, split: str) -> Source:
  """The Source of `split` ("train" | "validation" | "test") described by config.data."""
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
  name = data_config.get("dataset", "bigearthnet") if hasattr(data_config, "get") else "bigearthnet"
  return dataset_module(name).build_source(data_config, split)


__all__ = [
  "ALL_BANDS",
  "BAND_MEAN",
  "BAND_STD",
  "CLASSES_19",
  "CLASSES_43",
  "DATASETS",
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "LABEL_43_TO_19",
  "RGB_BANDS",
  "BadSampleError",
  "BigEarthNetSource",
  "Source",
  "build_source",
  "data_config",
  "dataset_module",
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
