"""Scan a dataset with the training readers and report every problem, without training.

    python -m jaxgeo.data.check --root=/path/to/BigEarthNet-v1.0 [--metadata=metadata.parquet] [--bands=all] \
        [--nodata=0] [--max_nodata_fraction=1]
    python -m jaxgeo.data.check --root=/path/to/ben_packed        # a packed store: every record read back
    python -m jaxgeo.data.check --dataset=sen12ms --root=/data/SEN12MS --set sensor=s1s2 --set label_type=single
    python -m jaxgeo.data.check --dataset=slippy --root=/data/robosat --set class_names=background,building

--dataset is any name of the registry (jaxgeo/data/__init__.py); --set key=value sets that dataset's
config.data fields (values parsed like the command line's --config.data.<key>).

Prints the nodata policy it checked with (a packed store's is the one it was packed with, whatever --nodata /
--max_nodata_fraction say). Exits 1 when it finds problems, 0 when the dataset is clean.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

from jaxgeo import logs
from jaxgeo.data import bigearthnet, build_source, pack
from jaxgeo.data.bigearthnet import SPLITS

log = logging.getLogger(__name__)


def check_dataset(data_config, splits: Sequence[str] = SPLITS) -> list[str]:
  """Every problem found, one "<file>: <problem>" line each: metadata-level errors (missing column, unknown
  label, empty split) and per-sample ones (each bad band file, missing patch folder, bad json, bad record)."""
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


def policy_checked(data_config) -> str:
  """The nodata policy a check of `data_config` applies, in words: the config's, or a packed store's own."""
  root = data_config.get("root")
  if root is not None and pack.is_packed(root):
    nodata, fraction = pack.packed_nodata_policy(pack.read_manifest(root))
    return f"{bigearthnet.describe_nodata_policy(nodata, fraction)}, applied when {root} was packed"
  return bigearthnet.describe_nodata_policy(*bigearthnet.nodata_policy(data_config))


def other_dataset_config(dataset, root, settings):
  """config.data of a registry dataset other than BigEarthNet, with --set key=value overrides."""
  from jaxgeo.config_utils import parse_arg
  from jaxgeo.data import data_config

  config = data_config(dataset)
  config.root = root
  values = parse_arg(",".join(settings), lazy=True, **{k: v for k, v in config.items() if not hasattr(v, "keys")})
  for key in settings:
    name = key.partition("=")[0]
    if name not in config:
      raise ValueError(f"--set {key}: config.data of {dataset!r} has no field {name!r}; it has {sorted(config)}")
    config[name] = tuple(values[name].split(",")) if isinstance(config[name], tuple) else values[name]
  return config


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxgeo.data.check", description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default="bigearthnet", help="the registry name (config.data.dataset)")
  parser.add_argument("--set", action="append", default=[], help="key=value for config.data of --dataset")
  parser.add_argument("--root", required=True, help="folder of patch folders (v1) or tile folders (v2), or a store")
  parser.add_argument("--metadata", default=None, help="parquet (gdf-builder or BigEarthNet v2); default: json")
  parser.add_argument(
    "--bands", default=None, help="'all', 'rgb' or comma-separated band names to read (default: all / the store's)"
  )
  parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to scan")
  pack.add_nodata_arguments(parser)
  args = parser.parse_args(argv)
  with logs.command_logging():
    return _check(args)


def _check(args):
  splits = args.splits.split(",")
  if args.dataset != "bigearthnet":
    try:
      config = other_dataset_config(args.dataset, args.root, args.set)
    except ValueError as e:
      print(f"error: {e}")
      return 2
    problems = check_dataset(config, splits)
    for problem in problems:
      print(problem)
    print(f"checked {args.dataset} splits {splits} of {args.root}: {len(problems)} problem(s)")
    return 1 if problems else 0
  packed = pack.is_packed(args.root)
  config = {
    "root": args.root,
    "metadata": args.metadata,
    "bands": "all" if args.bands is None else args.bands if args.bands in ("all", "rgb") else args.bands.split(","),
    "nodata": args.nodata,
    "max_nodata_fraction": args.max_nodata_fraction,
  }
  try:
    if packed:  # its bands and policy were fixed when it was packed
      manifest = pack.read_manifest(args.root)
      config["nodata"], config["max_nodata_fraction"] = pack.packed_nodata_policy(manifest)
      config["bands"] = manifest["bands"] if args.bands is None else config["bands"]
    policy = policy_checked(config)
  except ValueError as e:  # an unreadable store manifest or a bad --nodata / --max_nodata_fraction
    print(f"error: {e}")
    return 2
  print(f"checking with: {policy}")
  problems = check_dataset(config, splits)
  for problem in problems:
    print(problem)
  print(
    f"checked splits {splits} of {args.root}: {len(problems)} problem(s)" + ("" if problems else "; dataset is clean")
  )
  print(f"nodata policy: {policy}")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
