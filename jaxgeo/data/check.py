"""Scan a BigEarthNet-S2 dataset with the training readers and report every problem, without training.

    python -m jaxgeo.data.check --root=/path/to/BigEarthNet-v1.0 [--metadata=metadata.parquet] [--bands=all]

Exits 1 when it finds problems, 0 when the dataset is clean.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

from jaxgeo.data import build_source
from jaxgeo.data.bigearthnet import SPLITS

log = logging.getLogger(__name__)


def check_dataset(data_config, splits: Sequence[str] = SPLITS) -> list[str]:
  """Every problem found, one "<file>: <problem>" line each: metadata-level errors (missing column, unknown
  label, empty split) and per-sample ones (each bad band file, missing patch folder, bad json)."""
  problems = []
  for split in splits:
    try:
      source = build_source(data_config, split)
    except (ValueError, OSError) as e:  # metadata-level: nothing of this split can be scanned
      problems.append(f"[{split}] {e}")
      continue
    start, found_before = time.monotonic(), len(problems)
    for index in range(len(source)):
      problems.extend(f"[{split}] {error}" for error in source.problems(index))
      if index and index % 10000 == 0:
        log.info("%s: checked %d / %d patches (%.0f/s)", split, index, len(source), index / (time.monotonic() - start))
    log.info("%s: scanned %d patches, %d problem(s)", split, len(source), len(problems) - found_before)
  return problems


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxgeo.data.check", description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="folder holding one sub-folder per patch")
  parser.add_argument("--metadata", default=None, help="parquet (gdf-builder or BigEarthNet v2); default: json")
  parser.add_argument("--bands", default="all", help="'all', 'rgb' or comma-separated band names to read")
  parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to scan")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  bands = args.bands if args.bands in ("all", "rgb") else args.bands.split(",")
  config = {"root": args.root, "metadata": args.metadata, "bands": bands}
  splits = args.splits.split(",")
  problems = check_dataset(config, splits)
  for problem in problems:
    print(problem)
  print(
    f"checked splits {splits} of {args.root}: {len(problems)} problem(s)" + ("" if problems else "; dataset is clean")
  )
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
