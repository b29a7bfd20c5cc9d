"""The seed's results table from finished classification runs: `python -m jaxgeo.evaluate.table RUN_DIR... [--out=DIR]`.

Each run (a --workdir of configs/classify_sen12ms.py) contributes one cell from its results.json (the test split,
scored with the checkpoint of the best validation metric) and its config.json:
  column   config.data.sensor: S1, S2, S1+S2 (other band sets by name)
  row      config.classify.name, or the seed's model name from classify.model / init / init.adapter
           (Supervised, Supervised_1x1, Moco, Moco_1x1, Moco_1x1RND), then the pretraining (the MoCo run's pairing
           or the checkpoint's file name) and "(linear)" for a frozen backbone
  value    single-label: average accuracy "aa" (the mean per-class recall over the classes present in the test
           split); multi-label: overall accuracy "oa_multi" (the samples' mean |pred & true| / |pred | true|), as
           the seed's footnote says. --metric picks another summary entry (e.g. aa_seed, f1_micro, ap_macro).
Runs that differ in what the numbers mean (label type, scheme, threshold, train / test lists, data root) go to
separate tables. Several runs in one cell (seeds) show mean +- standard deviation (ddof=1) with the seeds named.

Printed as markdown; with --out also table.md, table.json (every cell with its seeds, runs and the mean of the
other test metrics) and one grouped bar chart per table (table_<n>.png).
"""

import argparse
import json
import math
import os
import sys
import textwrap

import numpy as np

COLUMNS = {"s1": "S1", "s2": "S2", "s1s2": "S1+S2", "rgb": "RGB", "s2_all": "S2 (13 bands)"}
CELL_METRIC = {"single": ("aa", "average accuracy (AA)"), "multi": ("oa_multi", "overall accuracy (OA)")}
# train/moco.py's config.moco.pairing -> the seed's name for the pretraining.
PAIRINGS = {
  "sensor": "sensor pairs",
  "augment": "MoCo v2",
  "fusion_all": "full fusion",
  "fusion_partial": "partial fusion",
}
# Settings that change a run's result without changing its row, column or table: the runs of one cell (its seeds)
# must agree on them, or their mean would mix two recipes.
RECIPE = (
  *("optim", "model", "train.epochs", "train.steps", "train.global_batch_size", "classify.model", "classify.mode"),
  *("init.workdir", "init.checkpoint", "init.adapter", "eval.metric", "eval.mode", "eval.patience", "eval.plateau"),
)
# Other test metrics averaged into table.json next to the cell value.
EXTRA = ("oa", "aa", "aa_seed", "oa_multi", "f1_micro", "f1_macro", "precision_micro", "recall_micro", "ap_macro")


class TableError(ValueError):
  pass


def _read_json(path, run_dir, what):
  if not os.path.isfile(path):
    raise TableError(f"{run_dir}: no {os.path.basename(path)} ({what})")
  with open(path) as f:
    return json.load(f)


def _get(tree, dotted, default=None):
  for key in dotted.split("."):
    if not isinstance(tree, dict) or key not in tree:
      return default
    tree = tree[key]
  return tree


def pretraining_label(config):
  """What the backbone was pretrained as: the MoCo run's pairing mode and folder, or the checkpoint's file name."""
  init = config.get("init", {})
  if init.get("checkpoint"):
    return os.path.basename(init["checkpoint"])
  run = init.get("workdir")
  if not run:
    return ""
  name = os.path.basename(os.path.normpath(run))
  try:
    with open(os.path.join(run, "config.json")) as f:
      run_config = json.load(f)
  except OSError:
    return name  # the run moved: its folder name is all that is left
  pairing = _get(run_config, "moco.pairing")
  return f"{PAIRINGS.get(pairing, pairing)} ({name})" if pairing else name


def row_name(config):
  """The seed's model name for a classification run's config (a dict from config.json)."""
  classify, init = config.get("classify", {}), config.get("init", {})
  if classify.get("name"):
    return classify["name"]
  adapter = classify.get("model") == "adapter"
  if init.get("workdir") or init.get("checkpoint"):
    base = "Moco" if init.get("workdir") else "Pretrained"
    if adapter:
      base += "_1x1" + ("RND" if init.get("adapter") == "random" else "")
    base = f"{base} · {pretraining_label(config)}"
  else:
    base = "Supervised_1x1" if adapter else "Supervised"
  return base + (" (linear)" if classify.get("mode") == "linear" else "")


def read_run(run_dir, metric=None):
  """One cell's worth of a finished run: {group, row, column, seed, value, metrics, run}."""
  config = _read_json(os.path.join(run_dir, "config.json"), run_dir, "not a jaxgeo run")
  if config.get("method") != "classify":
    raise TableError(f"{run_dir}: config.method={config.get('method')!r}; the table reads classification runs")
  results = _read_json(os.path.join(run_dir, "results.json"), run_dir, "the run has not finished its test evaluation")
  data = config["data"]
  test_split = _get(config, "eval.test_split", "test")
  summary = results.get(test_split)
  if not summary:
    raise TableError(f"{run_dir}/results.json has no {test_split!r} summary (config.eval.test_split)")
  label_type = data.get("label_type", "multi")
  key, _ = CELL_METRIC[label_type]
  key = metric or key
  if key not in summary:
    raise TableError(f"{run_dir}/results.json: {test_split} has no {key!r}; it has {sorted(summary)}")
  value = summary[key]
  group = {
    "data": data.get("root") or _synthetic_name(data),
    "label_type": label_type,
    "label_scheme": int(data.get("label_scheme", 10)),
    "threshold": float(data.get("threshold", 0.1)) if label_type == "multi" else None,
    "train_list": os.path.basename(data.get("train_list") or "train_list"),
    "val_fraction": float(data.get("val_fraction", 0.2)),
    "test_list": os.path.basename(data.get("test_list") or "test_list"),
    "metric": key,
  }
  return {
    "group": group,
    "recipe": _recipe(config),
    "row": row_name(config),
    "column": COLUMNS.get(data.get("sensor"), str(data.get("sensor"))),
    "seed": int(config.get("seed", 0)),
    "value": float("nan") if value is None else float(value),
    "metrics": {m: summary[m] for m in EXTRA if isinstance(summary.get(m), (int, float))},
    "selected_step": results.get("selected_step"),
    "num_test_samples": summary.get("num_samples"),
    "run": os.path.abspath(run_dir),
  }


def _recipe(config):
  """{dotted field: value} of the RECIPE settings of a run's config."""
  flat = {}

  def walk(tree, prefix):
    for key, value in tree.items():
      name = f"{prefix}{key}"
      if isinstance(value, dict):
        walk(value, name + ".")
      elif any(name == r or name.startswith(r + ".") for r in RECIPE):
        flat[name] = value

  walk(config, "")
  return flat


def _check_cell(row, column, runs):
  """The runs of one cell are seeds of one recipe: no seed twice, no setting that differs."""
  seen = {}
  for entry in runs:
    if entry["seed"] in seen:
      raise TableError(
        f"{seen[entry['seed']]} and {entry['run']} are both {row} / {column} with seed {entry['seed']}; pass each "
        "run once (a repeat with the same seed is not another sample of the spread)"
      )
    seen[entry["seed"]] = entry["run"]
  first = runs[0]
  for entry in runs[1:]:
    differ = sorted(
      k for k in set(first["recipe"]) | set(entry["recipe"]) if first["recipe"].get(k) != entry["recipe"].get(k)
    )
    if differ:
      changes = ", ".join(f"{k}: {first['recipe'].get(k)!r} vs {entry['recipe'].get(k)!r}" for k in differ[:4])
      raise TableError(
        f"{first['run']} and {entry['run']} fall in one cell ({row} / {column}) but were trained differently "
        f"({changes}); give them different rows with --config.classify.name, or table them separately"
      )


def _synthetic_name(data):
  size = [data.get(f"synthetic_{k}") for k in ("num_scenes", "patches_per_scene", "patch_size")]
  return "synthetic SEN12MS ({} scenes x {} patches of {} px)".format(*size)


def _stats(values):
  values = np.asarray(values, np.float64)
  kept = values[np.isfinite(values)]
  mean = float(kept.mean()) if kept.size else float("nan")
  std = float(kept.std(ddof=1)) if kept.size > 1 else None
  return mean, std


def build_tables(entries):
  """Entries of read_run grouped into tables: [{"group", "columns", "rows", "cells"}]."""
  tables = {}
  for entry in entries:
    key = json.dumps(entry["group"], sort_keys=True)
    table = tables.setdefault(key, {"group": entry["group"], "cells": {}})
    cell = table["cells"].setdefault(entry["row"], {}).setdefault(entry["column"], [])
    cell.append(entry)
  out = []
  for table in tables.values():
    present = {c for row in table["cells"].values() for c in row}
    columns = [c for c in COLUMNS.values() if c in present] + sorted(present - set(COLUMNS.values()))
    cells = {}
    for row, by_column in table["cells"].items():
      for column, runs in by_column.items():
        runs = sorted(runs, key=lambda e: (e["seed"], e["run"]))
        _check_cell(row, column, runs)
        mean, std = _stats([e["value"] for e in runs])
        extra = {m: _stats([e["metrics"][m] for e in runs if m in e["metrics"]])[0] for m in EXTRA}
        cells.setdefault(row, {})[column] = {
          "mean": mean,
          "std": std,
          "n": len(runs),
          "seeds": [e["seed"] for e in runs],
          "values": [e["value"] for e in runs],
          "runs": [e["run"] for e in runs],
          "num_test_samples": runs[0]["num_test_samples"],
          "metrics": {m: v for m, v in extra.items() if math.isfinite(v)},
        }
    out.append({"group": table["group"], "columns": columns, "rows": _row_order(cells), "cells": cells})
  return out


def _row_order(cells):
  """Supervised rows first (the baselines), then pretrained ones, each alphabetically."""
  return sorted(cells, key=lambda row: (not row.startswith("Supervised"), row))


def title(group):
  label = (
    "single-label (IGBP argmax)"
    if group["label_type"] == "single"
    else f"multi-label (fraction >= {group['threshold']:g})"
  )
  return (
    f"{label}, {group['label_scheme']} classes; trained on {group['train_list']} (first "
    f"{1 - group['val_fraction']:.0%}; the rest selects the checkpoint), tested on {group['test_list']}; "
    f"data: {group['data']}"
  )


def _metric_name(group):
  default, name = CELL_METRIC[group["label_type"]]
  return name if group["metric"] == default else group["metric"]


def _format_cell(cell):
  if cell is None:
    return "–"
  if not math.isfinite(cell["mean"]):
    return "n/a"
  if cell["n"] == 1:
    return f"{cell['mean']:.4f}"
  return f"{cell['mean']:.4f} ± {cell['std']:.4f} (n={cell['n']})"


def to_markdown(tables):
  lines = []
  for table in tables:
    lines += [f"### {title(table['group'])}", "", f"cell: test {_metric_name(table['group'])}", ""]
    lines.append("| model / pretraining | " + " | ".join(table["columns"]) + " |")
    lines.append("|---|" + "---|" * len(table["columns"]))
    for row in table["rows"]:
      cells = [_format_cell(table["cells"][row].get(c)) for c in table["columns"]]
      lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("seeds (value each, test samples):")
    for row in table["rows"]:
      for column in table["columns"]:
        cell = table["cells"][row].get(column)
        if cell:
          values = ", ".join(f"seed {s}: {v:.4f}" for s, v in zip(cell["seeds"], cell["values"]))
          lines.append(f"- {row} / {column}: {values} ({cell['num_test_samples']} test samples)")
    lines.append("")
  return "\n".join(lines)


def write(tables, out_dir):
  """table.md, table.json and table_<n>.png into out_dir; returns their paths."""
  from jaxgeo.evaluate import metrics, plots

  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "table.md"), os.path.join(out_dir, "table.json")]
  with open(paths[0], "w") as f:
    f.write(to_markdown(tables))
  with open(paths[1], "w") as f:
    json.dump(metrics.jsonable({"tables": [dict(t, title=title(t["group"])) for t in tables]}), f, indent=2)
  for index, table in enumerate(tables):
    results = {row: {c: cell["values"] for c, cell in table["cells"][row].items()} for row in table["rows"]}
    path = os.path.join(out_dir, f"table_{index}.png")
    heading = textwrap.fill(title(table["group"]), 80)  # a one-line title would widen the figure
    plots.results_chart(results, path, title=heading, metric=_metric_name(table["group"]), columns=table["columns"])
    paths.append(path)
  return paths


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m jaxgeo.evaluate.table", description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", help="finished classification run folders (--workdir of each run)")
  parser.add_argument("--out", help="folder for table.md, table.json and the bar charts")
  parser.add_argument("--metric", help="summary entry for every cell instead of AA (single) / OA (multi-label)")
  args = parser.parse_args(argv)
  try:
    tables = build_tables([read_run(run, args.metric) for run in args.runs])
  except TableError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(to_markdown(tables))
  if args.out:
    for path in write(tables, args.out):
      print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
