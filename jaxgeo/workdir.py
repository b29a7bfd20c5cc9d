"""A run's folder: one run at a time (a lock), and the config it was started with (so a resume can be checked).

Lock: `<workdir>/jaxgeo.lock`, an flock held by process 0 for the whole run. The kernel drops an flock when its
process dies, so a lock left by a killed run is simply taken over; a live holder is named (pid, host, start time,
command) and the second run refuses to start. That is the requeued-job-racing-the-old-one case: without a lock
both write the same checkpoints and metrics and one of them hangs or crashes inside Orbax.

Config: `<workdir>/config.json`, written when a run starts. A resume compares it with the config it is given:
a difference that changes the schedule, the data order or the shape of the state would silently train something
else (a batch size change halving the schedule, an epochs change re-computing the cosine half way), so it is an
error listing the differences, unless `--config.train.accept_config_change=True` says it is deliberate. Fields
that change none of those (how often to log or save, the device layout, worker processes, evaluation cadence)
may differ freely. Tools that read a run (probe, embed, classification from a MoCo run) take the architecture
from this file rather than from their own flags.
"""

import fcntl
import json
import os
import socket
import sys
import time

import jax
import ml_collections

from jaxgeo.errors import RunError

LOCK_FILE = "jaxgeo.lock"
CONFIG_FILE = "config.json"
DATASET_FILE = "dataset.json"

# Fields that may differ between a run and its resume: none of them changes what is computed.
RESUME_SAFE = (
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.accept_config_change",
  "train.resume_step",
  "train.on_nonfinite",
  "train.max_nonfinite_consecutive",
  "train.max_nonfinite_total",
  "data.worker_count",
  "data.prefetch",
  "data.on_bad_sample",
  "data.max_skipped_fraction",
  "model.attention",
  "mesh.",
  "sharding_rules",
  "distributed.",
  "init.",
  "eval.knn_every",
  "eval.knn_batches",
  "eval.final_probe",
  "probe.",
)


class WorkdirBusyError(RunError):
  pass


class ConfigChangedError(RunError):
  pass


class WorkdirLock:
  """Context manager: process 0 holds the workdir's flock; every process learns whether it got it."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def __enter__(self):
    refusal = self._acquire() if jax.process_index() == 0 else ""
    if jax.process_count() > 1:
      # Every process must leave together: one refusing alone would leave the others in a collective forever.
      from jax.experimental import multihost_utils

      refused = multihost_utils.process_allgather(int(bool(refusal))).max()
      refusal = refusal or ("process 0 could not lock the workdir" if refused else "")
    if refusal:
      raise WorkdirBusyError(refusal)
    return self

  def _acquire(self):
    self._file = open(self.path, "a+")  # noqa: SIM115  held open for the run: the flock lives with the file
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or "another process"
      self._file.close()
      self._file = None
      return (
        f"workdir {os.path.dirname(self.path)} is in use by {holder} (lock {self.path}); wait for that run to "
        "finish or stop it, or pass another --workdir"
      )
    self._file.seek(0)
    self._file.truncate()
    command = " ".join(sys.argv)[:300]
    self._file.write(
      f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} ({command})"
    )
    self._file.flush()
    return ""

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _flatten(tree, prefix=""):
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _as_plain(config):
  """ConfigDict -> JSON-able dict, tuples as lists (what comes back from the file)."""
  return json.loads(config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else json.dumps(config))


def save_config(workdir, config, step=None):
  """Writes config.json (process 0); a previous one is kept as config.step<N>.json when a change was accepted."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  if step is not None and os.path.exists(path):
    os.replace(path, os.path.join(workdir, f"config.step{step}.json"))
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_as_plain(config), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def load_config(workdir):
  """The config a run was started with, as a ConfigDict; FileNotFoundError naming the run when there is none."""
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no stored config; {workdir} is not a jaxgeo run (or predates config storage)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def config_differences(stored, current):
  """["key: stored -> current"] for fields that differ and are not RESUME_SAFE."""
  old, new = _flatten(stored), _flatten(_as_plain(current))
  changed = []
  for key in sorted(set(old) | set(new)):
    if any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE):
      continue
    if old.get(key, "<absent>") != new.get(key, "<absent>"):
      changed.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
  return changed


def check_resume_config(workdir, config, step):
  """Before resuming at `step`: the stored config must match, or the change must be accepted explicitly."""
  try:
    stored = json.loads(open(os.path.join(workdir, CONFIG_FILE)).read())
  except FileNotFoundError:
    save_config(workdir, config)  # a run from before configs were stored: start recording now
    return
  changed = config_differences(stored, config)
  if not changed:
    return
  if not config.train.get("accept_config_change", False):
    raise ConfigChangedError(
      f"resuming {workdir} at step {step} with a config that differs from the one it was started with "
      f"({os.path.join(workdir, CONFIG_FILE)}):\n  " + "\n  ".join(changed) + "\nthese change the schedule, the "
      "data order or the state; run with the original settings, pass another --workdir, or accept the change "
      "deliberately with --config.train.accept_config_change=True"
    )
  from absl import logging

  logging.warning("accepted config change at step %d (train.accept_config_change): %s", step, "; ".join(changed))
  save_config(workdir, config, step=step)


def save_dataset_info(workdir, source):
  """dataset.json: what the model was trained to read (bands, their normalisation, classes), so tools applying a
  run to new imagery (predict.py, probes) select and scale bands exactly as in training without the training data."""
  if jax.process_index() != 0:
    return
  info = {
    "dataset": getattr(source, "name", None),
    "bands": list(source.bands),
    "norm_stats": {k: [list(map(float, m)), list(map(float, s))] for k, (m, s) in source.norm_stats.items()},
    "class_names": list(source.class_names),
    "label_kind": source.label_kind,
  }
  for optional in ("class_colors", "ignore_index", "image_scale"):
    if getattr(source, optional, None) is not None:
      value = getattr(source, optional)
      info[optional] = [list(v) for v in value] if optional == "class_colors" else value
  with open(os.path.join(workdir, DATASET_FILE), "w") as f:
    json.dump(info, f, indent=2)


def load_dataset_info(workdir):
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), DATASET_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no dataset description; {workdir} is not a jaxgeo run (or predates it)")
  with open(path) as f:
    return json.load(f)
