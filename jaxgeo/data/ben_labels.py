"""BigEarthNet labels and splits: the 43-class CORINE and 19-class nomenclatures, the split metadata parquets, and the
hash split used when there is no metadata. `bigearthnet` (the band-folder source), `pack` (the packed store) and
`synthetic` (the generator) take class names, labels and splits from here, so the three agree.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

CLASSES_43 = (
  "Continuous urban fabric",
  "Discontinuous urban fabric",
  "Industrial or commercial units",
  "Road and rail networks and associated land",
  "Port areas",
  "Airports",
  "Mineral extraction sites",
  "Dump sites",
  "Construction sites",
  "Green urban areas",
  "Sport and leisure facilities",
  "Non-irrigated arable land",
  "Permanently irrigated land",
  "Rice fields",
  "Vineyards",
  "Fruit trees and berry plantations",
  "Olive groves",
  "Pastures",
  "Annual crops associated with permanent crops",
  "Complex cultivation patterns",
  "Land principally occupied by agriculture, with significant areas of natural vegetation",
  "Agro-forestry areas",
  "Broad-leaved forest",
  "Coniferous forest",
  "Mixed forest",
  "Natural grassland",
  "Moors and heathland",
  "Sclerophyllous vegetation",
  "Transitional woodland/shrub",
  "Beaches, dunes, sands",
  "Bare rock",
  "Sparsely vegetated areas",
  "Burnt areas",
  "Inland marshes",
  "Peatbogs",
  "Salt marshes",
  "Salines",
  "Intertidal flats",
  "Water courses",
  "Water bodies",
  "Coastal lagoons",
  "Estuaries",
  "Sea and ocean",
)
CLASSES_19 = (
  "Urban fabric",
  "Industrial or commercial units",
  "Arable land",
  "Permanent crops",
  "Pastures",
  "Complex cultivation patterns",
  "Land principally occupied by agriculture, with significant areas of natural vegetation",
  "Agro-forestry areas",
  "Broad-leaved forest",
  "Coniferous forest",
  "Mixed forest",
  "Natural grassland and sparsely vegetated areas",
  "Moors, heathland and sclerophyllous vegetation",
  "Transitional woodland, shrub",
  "Beaches, dunes, sands",
  "Inland wetlands",
  "Coastal wetlands",
  "Inland waters",
  "Marine waters",
)
# BigEarthNet-19 nomenclature (Sumbul et al. 2021): 43-class index -> 19-class index. The 11 classes missing
# here (roads, ports, airports, mines, dumps, construction, green urban, sport, bare rock, burnt areas,
# intertidal flats) have no 19-class counterpart and are dropped.
_CONVERT_43_TO_19 = {
  0: 0,
  1: 0,
  2: 1,
  11: 2,
  12: 2,
  13: 2,
  14: 3,
  15: 3,
  16: 3,
  18: 3,
  17: 4,
  19: 5,
  20: 6,
  21: 7,
  22: 8,
  23: 9,
  24: 10,
  25: 11,
  31: 11,
  26: 12,
  27: 12,
  28: 13,
  29: 14,
  33: 15,
  34: 15,
  35: 16,
  36: 16,
  38: 17,
  39: 17,
  40: 18,
  41: 18,
  42: 18,
}
LABEL_43_TO_19 = {CLASSES_43[i]: CLASSES_19[j] for i, j in _CONVERT_43_TO_19.items()}
_INDEX_19 = {name: i for i, name in enumerate(CLASSES_19)}

# Parquet formats: the column holding the patch name decides which one a file is.
_PARQUET_FORMATS = {
  "name": ("bigearthnet-gdf-builder", {"name": "name", "split": "original_split", "labels": "new_labels"}),
  "patch_id": ("BigEarthNet v2", {"name": "patch_id", "split": "split", "labels": "labels"}),
}
_SPLIT_ALIASES = {
  "train": "train",
  "training": "train",
  "validation": "validation",
  "val": "validation",
  "test": "test",
}


def hash_split(name: str) -> str:
  """Split of a patch when no metadata says: sha256 of the name, 60% train / 20% validation / 20% test."""
  bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 100
  return "train" if bucket < 60 else "validation" if bucket < 80 else "test"


def labels_to_multi_hot(names: Sequence[str], *, where: str) -> np.ndarray:
  """19-class names -> float32 [19] multi-hot; `where` (file, row) goes into the error for an unknown name."""
  multi_hot = np.zeros(len(CLASSES_19), np.float32)
  for name in names:
    if name not in _INDEX_19:
      hint = " (a 43-class CORINE name: this column must hold BigEarthNet-19 names)" if name in CLASSES_43 else ""
      raise ValueError(
        f"{where}: unknown label {name!r}{hint}; expected one of jaxgeo.data.ben_labels."
        f"CLASSES_19, e.g. {CLASSES_19[0]!r}"
      )
    multi_hot[_INDEX_19[name]] = 1.0
  return multi_hot


def read_parquet_split(path: str, split: str) -> tuple[list[str], np.ndarray]:
  import pyarrow.parquet as pq  # here, so pyarrow loads only when a parquet is read

  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: metadata parquet does not exist (data.metadata)")
  try:
    schema_names = pq.read_schema(path).names
  except Exception as e:  # pyarrow raises several types for a file that is not parquet
    raise ValueError(f"{path}: cannot read as parquet: {e}") from e
  name_column = next((c for c in _PARQUET_FORMATS if c in schema_names), None)
  if name_column is None:
    raise ValueError(
      f"{path}: parquet missing column 'name' (bigearthnet-gdf-builder: name, original_split, "
      f"new_labels) or 'patch_id' (BigEarthNet v2: patch_id, split, labels); "
      f"found columns {schema_names}"
    )
  format_name, columns = _PARQUET_FORMATS[name_column]
  missing = [c for c in columns.values() if c not in schema_names]
  if missing:
    raise ValueError(
      f"{path}: parquet missing column(s) {missing} needed for the {format_name} format "
      f"(expected {list(columns.values())}); found columns {schema_names}"
    )
  table = pq.read_table(path, columns=list(columns.values())).to_pydict()
  names, labels = [], []
  for row, (name, row_split, row_labels) in enumerate(zip(*(table[columns[k]] for k in ("name", "split", "labels")))):
    if row_split is None:  # gdf-builder leaves patches outside the official splits (snow, cloud) without one
      continue
    if row_split not in _SPLIT_ALIASES:
      raise ValueError(
        f"{path}: column {columns['split']!r} row {row} (patch {name}): unknown split "
        f"{row_split!r}; expected one of {sorted(_SPLIT_ALIASES)}"
      )
    if _SPLIT_ALIASES[row_split] != split:
      continue
    row_labels = [row_labels] if isinstance(row_labels, str) else list(row_labels or ())
    where = f"{path}: column {columns['labels']!r} row {row} (patch {name})"
    labels.append(labels_to_multi_hot(row_labels, where=where))
    names.append(name)
  return names, np.stack(labels) if labels else np.zeros((0, len(CLASSES_19)), np.float32)
