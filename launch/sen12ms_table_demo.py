"""The seed's SEN12MS results table in small: MoCo pretraining, then fine-tuning rows on a 1k-like labelled subset.

  python launch/sen12ms_table_demo.py --out=/tmp/sen12ms_demo                   # S2, 2 seeds, minutes on a CPU
  python launch/sen12ms_table_demo.py --out=/tmp/sen12ms_demo --sensors=s1,s2,s1s2 --seeds=0,1,2
  python launch/sen12ms_table_demo.py --out=/tmp/sen12ms_demo --moco_run=runs/moco   # an existing MoCo run

Every step is a command a user would type, printed before it runs: the MoCo run (configs/moco_sen12ms.py:demo)
unless --moco_run names one, one fine-tuning run per row x sensor x seed (configs/classify_sen12ms.py:demo on the
synthetic data's train_list_small.pkl, the analogue of the seed's train_list_1024.pkl: first 80 % train, last
20 % validation), then `python -m jaxgeo.evaluate.table`. Finished runs are not redone, so an interrupted demo
continues where it stopped. The last lines compare each MoCo row with Supervised on S2 over the seeds, as they
come out.

A Python driver rather than a shell script because it reads the MoCo run's stored config to train the classifiers
on the same synthetic data and backbone, and finds that data's subset list; compiled programs are shared between
runs through JAX's persistent compilation cache (<out>/xla_cache).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The seed's rows: (name, classify.model, starts from the MoCo run, init.adapter)
ROWS = {
  "supervised": ("Supervised", "supervised", False, None),
  "supervised_1x1": ("Supervised_1x1", "adapter", False, None),
  "moco": ("Moco", "supervised", True, None),
  "moco_1x1": ("Moco_1x1", "adapter", True, "pretrained"),
  "moco_1x1rnd": ("Moco_1x1RND", "adapter", True, "random"),
}


def run(command, env):
  print("+ " + " ".join(shlex.quote(part) for part in command), flush=True)
  subprocess.run(command, cwd=REPO, env=env, check=True)


def moco_data_overrides(moco_run):
  """--config overrides that give a classification run the MoCo run's synthetic data and backbone."""
  with open(os.path.join(moco_run, "config.json")) as f:
    stored = json.load(f)
  data, model = stored["data"], stored["model"]
  overrides = [f"--config.model.stages={tuple(model['stages'])!r}"]
  overrides.append(f"--config.model.width={model['width']}")
  if data.get("root"):
    raise SystemExit(
      f"{moco_run} was trained on {data['root']}; this demo uses synthetic data. For real SEN12MS run the README's "
      "commands with --config.data.root"
    )
  for key in ("synthetic_dir", "synthetic_num_scenes", "synthetic_patches_per_scene", "synthetic_patch_size"):
    overrides.append(f"--config.data.{key}={data[key]}")
  return overrides, data


def synthetic_subset(data):
  """The synthetic SEN12MS root's train_list_small.pkl (written now if the MoCo run's data is not there)."""
  sys.path.insert(0, REPO)
  from jaxgeo.data import sen12ms

  root, _ = sen12ms.resolve_root(data)
  return os.path.join(root, "train_list_small.pkl")


def verdict(table_json):
  """Lines comparing each MoCo row with Supervised on S2: mean, spread, seeds."""
  with open(table_json) as f:
    tables = json.load(f)["tables"]
  lines = []
  for table in tables:
    cells = table["cells"]
    baseline = cells.get("Supervised", {}).get("S2")
    if baseline is None:
      continue
    metric = table["group"]["metric"]
    for row, by_column in cells.items():
      cell = by_column.get("S2")
      if not row.startswith("Moco") or cell is None:
        continue
      gap = cell["mean"] - baseline["mean"]
      spread = max(cell["std"] or 0.0, baseline["std"] or 0.0)
      if gap > spread:
        word = "beats"
      elif gap > 0:
        word = "is ahead of, but within one standard deviation of,"
      else:
        word = "does NOT beat"
      lines.append(
        f"S2 {metric}: {row} {cell['mean']:.4f} (seeds {cell['seeds']}: {', '.join(f'{v:.4f}' for v in cell['values'])}) "
        f"{word} Supervised {baseline['mean']:.4f} (seeds {baseline['seeds']}: "
        f"{', '.join(f'{v:.4f}' for v in baseline['values'])}); difference {gap:+.4f}, larger std {spread:.4f}"
      )
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="/tmp/sen12ms_table_demo", help="runs, table and pictures go here")
  parser.add_argument("--moco_run", help="an existing MoCo run (default: train configs/moco_sen12ms.py:demo)")
  parser.add_argument("--rows", default="supervised,moco,moco_1x1", help=f"comma-separated, of {sorted(ROWS)}")
  parser.add_argument("--sensors", default="s2", help="comma-separated, of s1, s2, s1s2")
  parser.add_argument("--seeds", default="0,1", help="comma-separated config.seed values (init and data order)")
  parser.add_argument("--labels", default="multi", choices=("multi", "single"), help="data.label_type")
  args = parser.parse_args(argv)
  rows = args.rows.split(",")
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    parser.error(f"--rows: unknown {unknown}; expected some of {sorted(ROWS)}")
  out = os.path.abspath(args.out)
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, "xla_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  python = [sys.executable, "-m", "jaxgeo.main"]

  moco_run = os.path.abspath(args.moco_run) if args.moco_run else os.path.join(out, "moco")
  if not args.moco_run:
    run([*python, "--config=configs/moco_sen12ms.py:demo", f"--workdir={moco_run}"], env)
  overrides, data = moco_data_overrides(moco_run)
  overrides.append(f"--config.data.train_list={synthetic_subset(data)}")

  workdirs = []
  for sensor in args.sensors.split(","):
    for row in rows:
      _, model, pretrained, adapter = ROWS[row]
      for seed in args.seeds.split(","):
        workdir = os.path.join(out, "runs", f"{row}_{sensor}_{args.labels}_seed{seed}")
        workdirs.append(workdir)
        if os.path.exists(os.path.join(workdir, "results.json")):
          print(f"= {workdir} is finished", flush=True)
          continue
        command = [*python, "--config=configs/classify_sen12ms.py:demo", f"--workdir={workdir}", *overrides]
        command += [
          f"--config.seed={seed}",
          f"--config.data.sensor={sensor}",
          f"--config.data.label_type={args.labels}",
        ]
        command.append(f"--config.classify.model={model}")
        if pretrained:
          command.append(f"--config.init.workdir={moco_run}")
        if adapter:
          command.append(f"--config.init.adapter={adapter}")
        run(command, env)

  table_dir = os.path.join(out, "table")
  run([sys.executable, "-m", "jaxgeo.evaluate.table", *workdirs, f"--out={table_dir}"], env)
  for line in verdict(os.path.join(table_dir, "table.json")):
    print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
