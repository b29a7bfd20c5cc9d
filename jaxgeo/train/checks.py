"""Checks run before any compute, so a bad config or workdir fails in seconds, not after an hour of training.

Every message says what is wrong and what to change.
"""

import os
import shutil
import uuid

import jax
import numpy as np

from jaxgeo import config_utils
from jaxgeo.checkpoint import DiskFullError
from jaxgeo.errors import RunError


def check_config(config, *, device_count, process_count):
  config_utils.check_choice("data.on_bad_sample", config.data.on_bad_sample, ("error", "skip"))
  config_utils.check_choice("train.on_nonfinite", config.train.on_nonfinite, ("error", "skip"))
  batch = config.train.global_batch_size
  if batch <= 0 or batch % device_count:
    raise ValueError(
      f"config.train.global_batch_size={batch} must be a positive multiple of the "
      f"{device_count} devices; try {max(1, round(batch / device_count)) * device_count}"
    )
  if batch % process_count:
    raise ValueError(f"config.train.global_batch_size={batch} must split evenly over {process_count} processes")
  for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
    if config.train[key] <= 0:
      raise ValueError(f"config.train.{key}={config.train[key]} must be positive")
  if config.train.epochs <= 0 and config.train.steps <= 0:
    raise ValueError("config.train.epochs and config.train.steps are both <= 0: nothing to train")
  for key in ("max_nonfinite_consecutive", "max_nonfinite_total"):
    if config.train[key] < 1:
      raise ValueError(f"config.train.{key}={config.train[key]} must be >= 1")
  if config.eval.every != 0 and (config.eval.every < -1 or not config.eval.metric):
    raise ValueError(
      f"config.eval.every={config.eval.every} needs config.eval.metric (the summary entry that ranks evaluations) "
      "and is a number of steps, or -1 for once per epoch"
    )
  if not 0.0 <= config.data.max_skipped_fraction < 1.0:
    raise ValueError(f"config.data.max_skipped_fraction={config.data.max_skipped_fraction} must be in [0, 1)")


def check_schedule(config, steps_per_epoch, dataset_size):
  if steps_per_epoch == 0:
    raise ValueError(
      f"the train split has {dataset_size} samples, fewer than one global batch of "
      f"{config.train.global_batch_size}; lower config.train.global_batch_size or add data"
    )
  epochs = config.train.epochs if config.train.steps <= 0 else config.train.steps / steps_per_epoch
  warmup = config.optim.get("warmup_epochs", 0)
  if warmup > epochs:
    raise ValueError(
      f"config.optim.warmup_epochs={warmup} is longer than the whole run ({epochs:g} "
      "epochs); shorten the warm-up or train longer"
    )
  temp_warmup = config.get("loss", {}).get("warmup_teacher_temp_epochs", 0)
  if temp_warmup > epochs:
    raise ValueError(f"config.loss.warmup_teacher_temp_epochs={temp_warmup} is longer than the run ({epochs:g} epochs)")


def prepare_workdir(workdir):
  """Creates the workdir and proves it is writable now rather than at the first checkpoint."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{uuid.uuid4().hex}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(
      f"workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir you can write to"
    ) from e


# Orbax's per-checkpoint files beyond the arrays (metadata, tensorstore manifests, the loop's JSON, checksums):
# measured at ~0.3 MiB on a 0.5 MiB smoke state, so small states need it counted to estimate at all.
_CHECKPOINT_OVERHEAD = 512 * 1024


def human_bytes(num_bytes):
  for unit in ("B", "KiB", "MiB", "GiB"):
    if num_bytes < 1024:
      return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
    num_bytes /= 1024
  return f"{num_bytes:.1f} TiB"


def check_disk(workdir, abstract_state, keep):
  """Refuses to start when the disk cannot hold the checkpoints the run will keep (estimated from the state;
  `check_disk_after_save` redoes it with the size of the first real checkpoint)."""
  state_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state))
  per_checkpoint = state_bytes + _CHECKPOINT_OVERHEAD
  needed = per_checkpoint * (keep + 1)  # +1: the next one is written before the oldest is removed
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise DiskFullError(
      f"workdir {workdir!r} has {human_bytes(free)} free but {keep} checkpoints of about "
      f"{human_bytes(per_checkpoint)} need {human_bytes(needed)}; free space, choose another --workdir or lower "
      "config.train.keep_checkpoints"
    )
  return per_checkpoint


def check_disk_after_save(directory, checkpoint_bytes, num_saved, keep):
  """After the run's first checkpoint: room for the keep + 1 it will hold at once, sized from the real one."""
  more = max(keep + 1 - num_saved, 0) * checkpoint_bytes
  free = shutil.disk_usage(directory).free
  if free < more:
    raise DiskFullError(
      f"a checkpoint of this run takes {human_bytes(checkpoint_bytes)} ({directory}); keeping {keep} needs "
      f"{human_bytes(more)} more but {human_bytes(free)} is free; free space or lower "
      "config.train.keep_checkpoints, then run the same command to resume"
    )


def check_skipped(skipped, seen, max_fraction):
  if skipped and skipped / max(seen, 1) > max_fraction:
    raise RunError(
      f"{skipped} bad samples skipped out of {seen} read, more than config.data.max_skipped_fraction="
      f"{max_fraction}; run `python -m jaxgeo.data.check` on the dataset to list them"
    )
