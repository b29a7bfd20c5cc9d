"""Training that survives crashes, preemption and bad numbers: real subprocesses killed and resumed."""

import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, losses_by_step, smoke_config

from jaxgeo import checkpoint
from jaxgeo.data import bigearthnet
from jaxgeo.train import checks, dino, loop

STEP_LINE = re.compile(r"step (\d+)/(\d+) loss=")


def start_training(workdir, synthetic):
  command = [
    sys.executable,
    "-u",
    "-m",
    "jaxgeo.main",
    "--config=configs/dino_ben.py:smoke",
    f"--workdir={workdir}",
    f"--config.data.synthetic_dir={synthetic}",
  ]
  return subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def committed_steps(workdir):
  """Steps Orbax finished writing (read from the listing: a manager here could clean the child's tmp dirs)."""
  directory = workdir / "checkpoints"
  return [int(d) for d in os.listdir(directory) if d.isdigit()] if directory.exists() else []


def wait_for_step(process, at_least):
  """Reads the training log until it reports step >= at_least; returns that step and the log so far."""
  log = []
  for line in process.stderr:
    log.append(line)
    match = STEP_LINE.search(line)
    if match and int(match.group(1)) >= at_least:
      return int(match.group(1)), log
  raise AssertionError("training ended before step %d:\n%s" % (at_least, "".join(log[-30:])))


def test_killed_and_preempted_run_resumes_bit_for_bit(smoke_run, synthetic_dir, tmp_path):
  """SIGKILL twice at random steps, then SIGTERM: the final losses and params equal an uninterrupted run."""
  _, reference_dir, _ = smoke_run
  workdir = tmp_path / "interrupted"
  rng = random.Random(0)
  preempted_at = None
  for kill_signal in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM):
    process = start_training(workdir, synthetic_dir)
    start = max(committed_steps(workdir), default=0)
    wait_for_step(process, start + rng.randint(1, 3))
    process.send_signal(kill_signal)
    rest = process.stderr.read()
    code = process.wait(timeout=120)
    if kill_signal == signal.SIGTERM:
      assert code == 0, rest[-3000:]
      saved = re.search(r"SIGTERM received: saved step (\d+)", rest)
      assert saved, rest[-3000:]
      preempted_at = int(saved.group(1))
  final = start_training(workdir, synthetic_dir)
  final_log = final.stderr.read()
  assert final.wait(timeout=600) == 0, final_log[-3000:]
  assert f"resuming from step {preempted_at} of" in final_log, [l for l in final_log.splitlines() if "loop" in l]

  reference, interrupted = losses_by_step(reference_dir), losses_by_step(str(workdir))
  assert sorted(reference) == sorted(interrupted)
  for step in reference:
    assert interrupted[step]["loss"] == reference[step]["loss"], step
  for a, b in zip(
    jax.tree.leaves(checkpoint.load_state(reference_dir)), jax.tree.leaves(checkpoint.load_state(str(workdir)))
  ):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_cut_mid_write_falls_back_and_never_unpickles(smoke_run, tmp_path, monkeypatch):
  config, reference_dir, _ = smoke_run
  workdir = tmp_path / "cut"
  shutil.copytree(reference_dir, workdir)
  ckpt_dir = workdir / "checkpoints"
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  # What Orbax leaves behind when the process dies while writing: the step under a temporary name.
  os.rename(ckpt_dir / str(steps[-1]), ckpt_dir / f"{steps[-1]}.orbax-checkpoint-tmp-1700000000")
  os.remove(workdir / "metrics.jsonl")

  def refuse(*args, **kwargs):
    raise AssertionError("the resume path tried to unpickle")

  monkeypatch.setattr(pickle, "load", refuse)
  monkeypatch.setattr(pickle, "loads", refuse)
  monkeypatch.setattr(pickle, "Unpickler", refuse)

  assert loop.run(config, str(workdir), dino.make_task) == "done"
  rows = losses_by_step(str(workdir))
  assert min(rows) == steps[-2] + 1, "did not restart from the last complete checkpoint"
  reference = losses_by_step(reference_dir)
  for step in rows:
    assert rows[step]["loss"] == reference[step]["loss"]


@pytest.fixture
def nan_patch(monkeypatch):
  """Makes one training patch all-NaN after it has been read (the readers would reject it on disk)."""
  original = bigearthnet.BigEarthNetSource.__getitem__

  def poisoned(self, index):
    sample = original(self, index)
    if self.split == "train" and index == 0:
      sample["image"] = np.full_like(sample["image"], np.nan)
    return sample

  monkeypatch.setattr(bigearthnet.BigEarthNetSource, "__getitem__", poisoned)


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(nan_patch, synthetic_dir, tmp_path):
  config = smoke_config(synthetic_dir, steps=4)
  with pytest.raises(loop.NonFiniteError, match=r"non-finite value at step \d+: loss=nan"):
    loop.run(config, str(tmp_path / "stop"), dino.make_task)
  saved = checkpoint.Checkpointer(str(tmp_path / "stop")).latest_step()
  if saved is not None:
    state = checkpoint.load_state(str(tmp_path / "stop"))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_nonfinite_steps_can_be_skipped(nan_patch, synthetic_dir, tmp_path):
  config = smoke_config(synthetic_dir, steps=4, on_nonfinite="skip")
  assert loop.run(config, str(tmp_path / "skip"), dino.make_task) == "done"
  rows = losses_by_step(str(tmp_path / "skip")).values()
  assert min(row["finite"] for row in rows) < 1.0, "the NaN batch was never seen"
  state = checkpoint.load_state(str(tmp_path / "skip"))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["teacher"]))


def test_full_disk_is_refused_at_start(tmp_path, monkeypatch):
  abstract = {"w": jax.ShapeDtypeStruct((1024, 1024), np.float32)}  # 4 MiB
  monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1 << 20))
  with pytest.raises(
    checkpoint.DiskFullError, match=r"1\.0 MiB free but 3 checkpoints of about 4\.5 MiB need 18\.0 MiB"
  ):
    checks.check_disk(str(tmp_path), abstract, keep=3)


def test_skipped_bad_samples_are_counted_and_bounded(synthetic_dir, tmp_path):
  """A truncated band file: 'skip' trains on and counts it; past max_skipped_fraction the run stops."""
  from jaxgeo import data

  config = smoke_config(synthetic_dir, steps=4)
  root, metadata = data.resolve_paths(config.data)
  broken = tmp_path / "ben"
  shutil.copytree(root, broken)
  patch = data.build_source(config.data, "train").names[0]
  band = broken / patch / f"{patch}_B04.tif"
  band.write_bytes(band.read_bytes()[:200])

  def configured(fraction):
    c = smoke_config(synthetic_dir, steps=4)
    with c.unlocked():
      c.data.root, c.data.metadata = str(broken), metadata
      c.data.on_bad_sample, c.data.max_skipped_fraction = "skip", fraction
      c.eval.knn_every = 0
    return c

  assert loop.run(configured(0.5), str(tmp_path / "tolerant"), dino.make_task) == "done"
  rows = losses_by_step(str(tmp_path / "tolerant"))
  assert max(row["skipped_samples"] for row in rows.values()) == 1
  with pytest.raises(RuntimeError, match="1 bad samples skipped"):
    loop.run(configured(0.0), str(tmp_path / "strict"), dino.make_task)
