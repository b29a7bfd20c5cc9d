"""Periodic evaluation for every method: run a split, keep the best checkpoint, stop early, cut the lr on plateau.

Config (config.eval; all methods share it, a method only supplies eval_step / summarize, see train/task.py):
  every        steps between evaluations of `split` (0: never; -1: once per epoch); the last step always evaluates
  split        "validation"
  batch_size   global evaluation batch (-1: train.global_batch_size); evaluation batches are padded, never dropped
  metric       the summary entry that ranks evaluations, e.g. "f1_micro" or "iou_macro" (evaluate/metrics.py's
               report names); mode "max" or "min"
  keep_best    save the best evaluation's state to <workdir>/best (one checkpoint, replaced on improvement)
  patience     stop after this many evaluations without an improvement larger than min_delta (0: never)
  test_split   when training ends, evaluate the best checkpoint (or the last state) on this split ("": skip)
               and write <workdir>/results.json and its pictures under <workdir>/<test_split>/
  plateau.*    ReduceLROnPlateau on the same metric, as torch.optim.lr_scheduler.ReduceLROnPlateau
               (factor, patience, threshold (relative), cooldown, min_scale; factor 0: off). The scale lives in
               the train state ("lr_scale"), so a resumed run continues with the learning rate it had.
The monitor's own counters (best value and step, evaluations since the best, plateau counters) are saved with
every checkpoint (checkpoint.py's "loop" item), so early stopping and the plateau resume exactly too.
"""

import glob
import json
import math
import os

import jax
import numpy as np

from jaxgeo import parallel
from jaxgeo.evaluate import metrics


def eval_config():
  import ml_collections

  c = ml_collections.ConfigDict()
  c.every = 0
  c.split = "validation"
  c.batch_size = -1
  c.metric = ""
  c.mode = "max"
  c.keep_best = True
  c.patience = 0
  c.min_delta = 0.0
  c.test_split = "test"
  c.plateau = ml_collections.ConfigDict(dict(factor=0.0, patience=10, threshold=1e-4, cooldown=0, min_scale=0.0))
  return c


class Monitor:
  """Host-side decisions from a sequence of metric values; `state` is a JSON-able dict saved with checkpoints."""

  def __init__(self, eval_cfg, state=None):
    self.mode, self.min_delta, self.patience = eval_cfg.mode, float(eval_cfg.min_delta), int(eval_cfg.patience)
    if self.mode not in ("max", "min"):
      raise ValueError(f"config.eval.mode={self.mode!r}; expected 'max' or 'min'")
    self.plateau = eval_cfg.plateau
    self.state = dict(
      best=None,
      best_step=-1,
      since_best=0,
      evaluations=0,
      plateau_best=None,
      plateau_bad=0,
      plateau_cooldown=0,
      lr_scale=1.0,
    )
    self.state.update(state or {})

  def _better(self, value, reference, margin):
    if reference is None:
      return True
    return value > reference + margin if self.mode == "max" else value < reference - margin

  def update(self, step, value):
    """Takes one evaluation; returns {"improved", "stop", "lr_scale", "lr_reduced"}."""
    s = self.state
    value = float(value)
    if not math.isfinite(value):
      raise FloatingPointError(f"evaluation metric is {value} at step {step}")
    s["evaluations"] += 1
    improved = self._better(value, s["best"], self.min_delta)
    if improved:
      s.update(best=value, best_step=int(step), since_best=0)
    else:
      s["since_best"] += 1
    stop = self.patience > 0 and s["since_best"] >= self.patience

    # torch ReduceLROnPlateau: relative threshold, bad epochs counted only outside the cooldown.
    reduced = False
    if self.plateau.factor > 0:
      threshold = float(self.plateau.threshold)
      ref = s["plateau_best"]
      rel_better = ref is None or (
        value > ref * (1 + threshold) if self.mode == "max" else value < ref * (1 - threshold)
      )
      if rel_better:
        s["plateau_best"], s["plateau_bad"] = value, 0
      else:
        s["plateau_bad"] += 1
      if s["plateau_cooldown"] > 0:
        s["plateau_cooldown"] -= 1
        s["plateau_bad"] = 0
      if s["plateau_bad"] > self.plateau.patience:
        new = max(s["lr_scale"] * self.plateau.factor, self.plateau.min_scale)
        if s["lr_scale"] - new > 1e-8:
          s["lr_scale"], reduced = new, True
        s["plateau_cooldown"], s["plateau_bad"] = int(self.plateau.cooldown), 0
    return {"improved": improved, "stop": stop, "lr_scale": s["lr_scale"], "lr_reduced": reduced}


def _widen(x):
  x = np.asarray(x)
  return x.astype(np.int64) if np.issubdtype(x.dtype, np.integer) else x


def _gather(tree):
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


class Evaluator:
  """Runs task.eval_step over a whole split and returns task.summarize's dict (plus "num_samples")."""

  def __init__(self, config, task, mesh, state_shardings, make_input):
    self.config, self.task, self.mesh, self._make_input = config, task, mesh, make_input
    self._shardings = state_shardings
    self._step = None
    batch = config.eval.batch_size if config.eval.batch_size > 0 else config.train.global_batch_size
    if batch % mesh.size:
      raise ValueError(f"config.eval.batch_size={batch} must be a multiple of the {mesh.size} devices")
    self.batch_size = batch

  def _compiled(self, batch):
    if self._step is None:

      def step(state, batch):
        out = self.task.eval_step(state, batch)
        rows = dict(out.get("rows", {}), __valid=batch["valid"])
        preview = dict(out.get("preview", {}), __valid=batch["valid"])
        return {"rows": rows, "sums": out.get("sums", {}), "preview": preview}

      batch_shardings = {k: parallel.batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}
      self._step = jax.jit(step, in_shardings=(self._shardings, batch_shardings))
    return self._step

  def batches(self, split):
    _, dataset = self._make_input(self.config, split, shuffle=False, drop_remainder=False, batch_size=self.batch_size)
    return dataset

  def run(self, state, split):
    """(summary, preview) of `split`: the task's summary plus "num_samples", and the first batch's preview."""
    rows, sums, preview = {}, None, None
    for batch in self.batches(split):
      out = self._compiled(batch)(state, parallel.host_to_global(batch, self.mesh))
      for key, value in _gather(out["rows"]).items():
        rows.setdefault(key, []).append(np.asarray(value))
      # Integer sums (pixel counts of a confusion matrix) are added in int64 on the host: a split of 512 px tiles
      # passes 2**31 pixels long before it ends.
      batch_sums = jax.tree.map(_widen, jax.device_get(out["sums"]))
      sums = batch_sums if sums is None else jax.tree.map(np.add, sums, batch_sums)
      if preview is None:
        preview = _gather(out["preview"])
        keep = np.asarray(preview.pop("__valid")).astype(bool)
        preview = {k: np.asarray(v)[keep] for k, v in preview.items()}
    if preview is None:
      raise ValueError(f"evaluation split {split!r} has no batches")
    valid = np.concatenate(rows.pop("__valid")).astype(bool)
    rows = {k: np.concatenate(v)[valid] for k, v in rows.items()}
    summary = dict(self.task.summarize(rows, sums or {}))
    summary["num_samples"] = int(valid.sum())
    return summary, preview


def scalars_of(summary, prefix):
  """The finite numbers of a summary, prefixed ("val_miou"), for the metrics log and TensorBoard."""
  out = {}
  for key, value in summary.items():
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
      if math.isfinite(float(value)):
        out[f"{prefix}{key}"] = float(value)
  return out


def write_report(task, summary, preview, out_dir, writer, step, tag):
  """summary.json and the task's pictures of one evaluation into out_dir; each PNG also to TensorBoard."""
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(metrics.jsonable(summary), f, indent=2)
  if task.report is not None:
    task.report(summary, out_dir, preview)
  for path in sorted(glob.glob(os.path.join(out_dir, "*.png"))):
    writer.image(f"{tag}/{os.path.splitext(os.path.basename(path))[0]}", path, step)
