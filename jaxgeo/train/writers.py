"""Metric sinks: JSON lines, TensorBoard event files (via tensorboardX, so no TensorFlow) and the loss plot.

clu's metric_writers would pull in TensorFlow; clu.metrics (aggregation) does not and is used in loop.py.
Only process 0 writes; the others get a writer that drops everything.
"""

import json
import math
import os

import jax
import numpy as np


class MetricWriter:
  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step, scalars):
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in scalars.items():
      self._tb.add_scalar(key, float(value), int(step))
    self._tb.flush()

  def image(self, tag, path, step):
    """A PNG file into TensorBoard (the evaluation pictures), read back as an HWC array."""
    if not self.enabled:
      return
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    if pixels.dtype != np.uint8:
      pixels = (np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    self._tb.add_image(tag, pixels[..., :3], int(step), dataformats="HWC")
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def truncate_metrics(workdir, step):
  """Drops metrics rows after `step` (written by a run that died before saving them): a resume from `step`
  writes them again, and a log with every step once is what the plots and anyone reading it expect."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if (_parse(line) or {"step": step + 1})["step"] <= step]  # torn lines go too
  if len(kept) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return len(lines) - len(kept)


def _parse(line):
  try:
    row = json.loads(line)
  except ValueError:  # the last line of a run killed while writing it
    return None
  return row if isinstance(row, dict) and "step" in row else None


def read_metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [row for row in map(_parse, f) if row is not None]


def plot_training_curves(workdir, title="", out_name="loss.png"):
  """Loss (and the kNN monitor, when present) against step, as a PNG next to the metrics.

  After a resume the JSONL holds the repeated steps twice; the last value of each step wins.
  """
  if jax.process_index() != 0:
    return None
  rows = {}
  for row in read_metrics(workdir):
    rows.setdefault(row["step"], {}).update(row)
  if not rows:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = np.array(sorted(rows))
  series = {k: np.array([rows[s].get(k, math.nan) for s in steps]) for k in ("loss", "knn_ap_macro", "lr")}
  has_knn = np.isfinite(series["knn_ap_macro"]).any()
  fig, axes = plt.subplots(1, 2 if has_knn else 1, figsize=(11 if has_knn else 6, 4), squeeze=False)
  ax = axes[0, 0]
  ax.plot(steps, series["loss"], color="tab:blue", lw=1.5)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  ax.grid(alpha=0.3)
  ax.set_title(title or "training loss")
  lr_ax = ax.twinx()
  lr_ax.plot(steps, series["lr"], color="tab:gray", lw=1, ls="--")
  lr_ax.set_ylabel("learning rate", color="tab:gray")
  if has_knn:
    ok = np.isfinite(series["knn_ap_macro"])
    axes[0, 1].plot(steps[ok], series["knn_ap_macro"][ok], "o-", color="tab:green")
    axes[0, 1].set_xlabel("step")
    axes[0, 1].set_ylabel("kNN macro AP (held-out)")
    axes[0, 1].set_title("kNN monitor")
    axes[0, 1].grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
