"""Checkpoints: the train state and the loop's own counters, saved together with Orbax, verified on restore.

Orbax writes each step into a temporary directory and renames it only once complete, so a process killed
mid-save leaves the previous step as the latest restorable one (the partial one is ignored and cleaned up).
Restoring reads tensorstore arrays and JSON: nothing is unpickled on the resume path.

What Orbax does not do, and this file adds:
  * integrity: once a save has completed, the size and CRC-32 of every file of the step are recorded in
    `<step>/jaxgeo_checksums.json`; a restore verifies them first, so flipped bytes or a truncated array file are
    found before they become a "NaN problem" hours later. A damaged step (bad checksum, or any error while
    restoring it) is moved aside to `<workdir>/checkpoints_set_aside/` (never deleted) and the previous complete
    step is restored, with one log line naming the file;
  * a full disk becomes one line saying which step failed to save and which complete step survives
    (`DiskFullError`), instead of pages of tensorstore tracebacks;
  * `resume_step`: restore a chosen earlier step (later ones are moved aside, not deleted).
The data position needs no saving: batch k of the pipeline is a pure function of (seed, k) and the step says k.
"""

import errno
import json
import os
import shutil
import time
import zlib

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxgeo.errors import RunError

CHECKSUMS = "jaxgeo_checksums.json"
SET_ASIDE = "checkpoints_set_aside"


class DiskFullError(RunError):
  pass


class CheckpointError(RunError):
  pass


def _human(num_bytes):
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(num_bytes) < 1024 or unit == "TiB":
      return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
    num_bytes /= 1024


def _files(step_dir):
  for root, _, names in os.walk(step_dir):
    for name in sorted(names):
      path = os.path.join(root, name)
      if os.path.relpath(path, step_dir) != CHECKSUMS:
        yield os.path.relpath(path, step_dir), path


def _crc32(path, chunk=1 << 22):
  crc = 0
  with open(path, "rb") as f:
    while block := f.read(chunk):
      crc = zlib.crc32(block, crc)
  return crc


def directory_size(path):
  return sum(os.path.getsize(p) for _, p in _files(path))


def write_checksums(step_dir):
  sums = {rel: {"size": os.path.getsize(p), "crc32": _crc32(p)} for rel, p in _files(step_dir)}
  tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
  with open(tmp, "w") as f:
    json.dump(sums, f)
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify_checksums(step_dir):
  """None when the step matches its recorded checksums; else "<file>: <problem>". Steps saved without a record
  (a process killed between Orbax's commit and the record) pass with a warning: Orbax's commit is atomic."""
  record = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(record):
    logging.warning("%s has no checksum record (the run stopped right after saving it); restoring unverified", step_dir)
    return None
  try:
    with open(record) as f:
      expected = json.load(f)
  except (OSError, ValueError) as e:
    return f"{record}: unreadable checksum record ({e})"
  for rel, want in expected.items():
    path = os.path.join(step_dir, rel)
    if not os.path.exists(path):
      return f"{path}: missing"
    size = os.path.getsize(path)
    if size != want["size"]:
      return f"{path}: {size} bytes, {want['size']} when saved (truncated or overwritten)"
    if _crc32(path) != want["crc32"]:
      return f"{path}: contents changed since it was saved (CRC-32 mismatch)"
  return None


def _disk_full(error):
  """True if `error` or anything in its cause chain says the device is out of space."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(error) or "ENOSPC" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class Checkpointer:
  """Orbax CheckpointManager over <workdir>/<name> with items "state" (arrays) and "loop" (JSON): the training
  checkpoints ("checkpoints") and the best evaluation's ("best", train/evaluation.py)."""

  def __init__(self, workdir, keep=3, name="checkpoints"):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, name)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "loop"), options=options)
    self._unrecorded = None  # the step whose save is in flight: checksummed once it has completed

  def steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self):
    return self.manager.latest_step()

  def step_dir(self, step):
    return os.path.join(self.directory, str(step))

  def describe(self):
    steps = self.steps()
    return f"{self.directory} holds step(s) {steps}" if steps else f"{self.directory} holds no complete checkpoint"

  def save(self, step, state, loop_state):
    """Asynchronous: training goes on while the arrays are written; `wait` before exiting."""
    self._finish(step)  # Orbax waits for the previous save here anyway; record its checksums now
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop_state))
    try:
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001  a disk-full error surfaces as whichever type the writer raised
      self._raise_disk_full(step, e)
      raise
    self._unrecorded = step

  def wait(self):
    self._finish(self._unrecorded)

  def _finish(self, step):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._raise_disk_full(self._unrecorded if self._unrecorded is not None else step, e)
      raise
    if self._unrecorded is not None and jax.process_index() == 0:
      step_dir = self.step_dir(self._unrecorded)
      if os.path.isdir(step_dir):
        write_checksums(step_dir)
    self._unrecorded = None

  def _raise_disk_full(self, step, error):
    if not _disk_full(error):
      return
    self.manager.reload()
    survivors = [s for s in self.steps() if s != step]
    survived = f"step {survivors[-1]} ({self.step_dir(survivors[-1])})" if survivors else "none"
    free = shutil.disk_usage(self.directory).free
    raise DiskFullError(
      f"disk full while saving step {step} to {self.directory} ({_human(free)} free); the latest complete "
      f"checkpoint is {survived}; free space or lower config.train.keep_checkpoints, then run the same command"
    ) from None

  def restore(self, abstract_state, max_step=None):
    """(state, loop_state, step) of the newest intact step (<= max_step), or None when there is none.

    A damaged step is set aside and the next older one tried. With max_step, steps after it are set aside
    too (a deliberate resume from an earlier step: `train.resume_step`).
    """
    if max_step is not None:
      if max_step not in self.steps():
        raise CheckpointError(
          f"config.train.resume_step={max_step} is not on disk: {self.describe()}; choose one of those steps"
        )
      self.set_aside_after(max_step, f"resuming from step {max_step} (config.train.resume_step)")
    while self.steps():
      step = self.steps()[-1]
      problem = verify_checksums(self.step_dir(step))
      if problem is None:
        try:
          args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore())
          restored = self.manager.restore(step, args=args)
          logging.info("restored step %d from %s", step, self.directory)
          return restored.state, dict(restored.loop or {}), step
        except Exception as e:  # noqa: BLE001  tensorstore raises many types for damaged files
          reason = f"{type(e).__name__}: {_first_line(e)}"
          if os.path.exists(os.path.join(self.step_dir(step), CHECKSUMS)):
            # The files are as they were saved: the state this code builds does not fit them. Setting intact
            # checkpoints aside would throw the run away; say so instead.
            raise CheckpointError(
              f"checkpoint step {step} in {self.directory} is intact but does not fit the state this run builds "
              f"({reason}); the code or the config changed the state's structure since it was saved"
            ) from e
          problem = f"{self.step_dir(step)}: cannot be restored ({reason})"
      self._set_aside(step, problem, damaged=True)
    return None

  def set_aside_after(self, step, reason):
    """Moves every step after `step` aside (not deleted): a run going back to `step` will write them again."""
    for later in [s for s in self.steps() if s > step]:
      self._set_aside(later, reason)

  def _set_aside(self, step, reason, damaged=False):
    name = os.path.basename(self.directory)
    target = os.path.join(self.workdir, SET_ASIDE, f"{name}-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(self.step_dir(step), target)
    _sync("jaxgeo_set_aside")
    self.manager.reload()
    older = [s for s in self.steps() if s < step]
    then = f"; restoring step {older[-1]}" if damaged and older else ""
    (logging.error if damaged else logging.warning)(
      "checkpoint step %d %s; moved to %s%s",
      step,
      f"is damaged ({reason})" if damaged else f"set aside: {reason}",
      target,
      then,
    )

  def close(self):
    self.manager.close()


def _first_line(error):
  text = str(error).strip().splitlines()
  return text[0][:300] if text else ""


def _sync(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def load_state(workdir, step=None, name="checkpoints"):
  """The whole saved train state as host arrays, for evaluation without rebuilding the optimizer; name="best"
  reads the best evaluation's checkpoint (train/evaluation.py)."""
  directory = os.path.join(os.path.abspath(workdir), name)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir}: not a jaxgeo run (no {name}/ folder); check the path")
  manager = ocp.CheckpointManager(
    directory,
    item_handlers={"state": ocp.StandardCheckpointHandler(), "loop": ocp.JsonCheckpointHandler()},
    options=ocp.CheckpointManagerOptions(create=False),
  )
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint under {directory}; train first or check the path")
  problem = verify_checksums(os.path.join(directory, str(step)))
  if problem:
    raise CheckpointError(f"checkpoint step {step} of {workdir} is damaged: {problem}")
  # Restored onto one local device whatever the topology that saved it (a run trained on 2 hosts x 4 GPUs is
  # evaluated on a laptop): the arrays' shapes come from the checkpoint's metadata, the placement is ours.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  metadata = manager.item_metadata(step)["state"]
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  manager.close()
  return jax.tree.map(jax.device_get, restored.state)


def load_params(workdir, which="teacher", step=None):
  """Params of a saved run: "teacher" (DINO's evaluation default, as the reference) or "params" (student)."""
  state = load_state(workdir, step)
  if which not in state:
    raise KeyError(f"checkpoint in {workdir} has no {which!r}; it holds {sorted(state)}")
  return state[which]
