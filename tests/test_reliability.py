"""What a days-long run on real data trips over, each case driven through the real loop (DINO smoke config).

Most runs here start from a copy of the session's smoke run (conftest.smoke_run), so they reuse its compiled
step from the persistent compilation cache and only pay for the steps they train.
"""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, losses_by_step, smoke_config

from jaxgeo import checkpoint, data
from jaxgeo import workdir as workdir_lib
from jaxgeo.data import bigearthnet, pipeline
from jaxgeo.data.geotiff import BadSampleError
from jaxgeo.train import checks, dino, loop, writers


def copy_run(smoke_run, tmp_path, name="copy", drop_latest=0):
  """A copy of the smoke run; drop_latest removes its newest checkpoints (as if it had died before saving them)."""
  _, workdir, _ = smoke_run
  target = tmp_path / name
  shutil.copytree(workdir, target)
  for step in committed(target)[len(committed(target)) - drop_latest :]:
    shutil.rmtree(target / "checkpoints" / str(step))
  assert committed(target), "the smoke run keeps more checkpoints than this test drops"
  return target


def committed(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def configured(base, **sections):
  """A copy of a locked config with --config.section.key=value style overrides."""
  config = base.copy_and_resolve_references()
  with config.unlocked():
    for key, value in sections.items():
      if "__" in key:
        section, field = key.split("__")
        config[section][field] = value
      else:
        config[key] = value
  config.lock()
  return config


# ---- 3. rerunning a finished run


def test_rerun_of_a_finished_run_says_complete_and_exits_0(smoke_run, tmp_path):
  target = copy_run(smoke_run, tmp_path)
  command = [
    sys.executable,
    "-m",
    "jaxgeo.main",
    "--config=configs/dino_ben.py:smoke",
    f"--workdir={target}",
    f"--config.data.synthetic_dir={smoke_run[0].data.synthetic_dir}",
  ]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "is complete" in result.stderr and "finished: complete" in result.stderr


# ---- 4. a resume with a changed config; tools take the architecture from the run


@pytest.mark.parametrize(
  ("override", "named"),
  [
    ({"train__global_batch_size": 32}, "train.global_batch_size: 16 -> 32"),
    ({"train__epochs": 4}, "train.epochs: 3 -> 4"),
    ({"head__out_dim": 128}, "head.out_dim: 64 -> 128"),
    ({"data__root": "/elsewhere"}, "data.root: None -> '/elsewhere'"),
  ],
)
def test_resume_with_a_changed_config_is_refused_naming_the_change(smoke_run, tmp_path, override, named):
  config, _, _ = smoke_run
  target = copy_run(smoke_run, tmp_path, drop_latest=1)
  if "data__root" in override:  # a real folder, so the refusal is about the change and not a missing path
    override = {"data__root": str(tmp_path / "elsewhere"), "data__metadata": None}
    shutil.copytree(data.resolve_paths(config.data)[0], tmp_path / "elsewhere")
    named = f"data.root: None -> '{tmp_path / 'elsewhere'}'"
  with pytest.raises(workdir_lib.ConfigChangedError, match="accept_config_change") as error:
    loop.run(configured(config, **override), str(target), dino.make_task)
  assert named in str(error.value)


def test_harmless_changes_resume_and_a_deliberate_change_is_accepted_and_kept(smoke_run, tmp_path):
  config, _, _ = smoke_run
  target = copy_run(smoke_run, tmp_path, drop_latest=1)
  stored = json.loads((target / "config.json").read_text())
  harmless = configured(config, train__log_every=2, data__worker_count=0, eval__knn_every=0)
  assert workdir_lib.config_differences(stored, harmless) == []
  changed = configured(config, seed=7, train__accept_config_change=True)
  assert loop.run(changed, str(target), dino.make_task) == "done"
  assert json.loads((target / "config.json").read_text())["seed"] == 7
  resumed_at = committed(copy_run(smoke_run, tmp_path, name="reference", drop_latest=1))[-1]
  assert json.loads((target / f"config.step{resumed_at}.json").read_text())["seed"] == 0  # the original, kept


def test_probe_takes_the_architecture_from_the_run(smoke_run):
  from jaxgeo.evaluate import backbone

  config, workdir, _ = smoke_run
  probe_config = configured(config, model__depth=1, model__num_heads=4)
  with probe_config.unlocked():
    probe_config.init.workdir = workdir
  model, params, _ = backbone.load_backbone(probe_config, in_chans=3, image_size=32)
  assert model.depth == 2 and model.num_heads == 2
  assert sum(k.startswith("blocks_") for k in params) == 2


def test_tools_never_create_folders_under_a_mistyped_run(tmp_path, smoke_run):
  from jaxgeo.evaluate import backbone

  config, _, _ = smoke_run
  typo = tmp_path / "no_such_run"
  probe_config = configured(config)
  with probe_config.unlocked():
    probe_config.init.workdir = str(typo)
  with pytest.raises(FileNotFoundError, match="no_such_run"):
    backbone.load_backbone(probe_config, in_chans=3, image_size=32)
  with pytest.raises(FileNotFoundError, match="not a jaxgeo run"):
    checkpoint.load_state(str(typo))
  assert not typo.exists()


# ---- 5. a diverging run: the error names the checkpoints; resume from a chosen one; skip mode is bounded


def test_divergence_names_checkpoints_and_resumes_from_a_chosen_one(synthetic_dir, tmp_path, caplog):
  workdir = str(tmp_path / "diverged")
  config = smoke_config(synthetic_dir, steps=6, checkpoint_every=1, log_every=1)
  with config.unlocked():
    config.optim.base_lr = 1e30
    config.eval.knn_every = 0
  with pytest.raises(loop.NonFiniteError, match=r"holds step\(s\) \[.*\].*resume_step") as error:
    loop.run(config, workdir, dino.make_task)
  steps = committed(workdir)
  assert steps and str(steps) in str(error.value)

  resumed = configured(config, train__resume_step=steps[0], train__accept_config_change=True)
  with resumed.unlocked():
    resumed.optim.base_lr = 5e-4
  with caplog.at_level(logging.INFO):
    assert loop.run(resumed, workdir, dino.make_task) == "done"
  assert f"resuming from step {steps[0]} of 6" in caplog.text
  set_aside = os.listdir(os.path.join(workdir, checkpoint.SET_ASIDE))
  assert len(set_aside) == len(steps) - 1, "later checkpoints are moved aside, never deleted"
  assert all(np.isfinite(row["loss"]) for row in losses_by_step(workdir).values() if row["step"] > steps[0])


def test_skipping_nonfinite_steps_is_bounded_and_counted(synthetic_dir, tmp_path):
  workdir = str(tmp_path / "skipping")
  config = smoke_config(synthetic_dir, steps=6, on_nonfinite="skip", max_nonfinite_consecutive=2, log_every=1)
  with config.unlocked():
    config.optim.base_lr = 1e30
    config.eval.knn_every = 0
  with pytest.raises(loop.NonFiniteError, match="3 non-finite steps in a row"):
    loop.run(config, workdir, dino.make_task)
  counts = [row["nonfinite_steps"] for row in writers.read_metrics(workdir) if "nonfinite_steps" in row]
  assert counts == sorted(counts) and counts[-1] >= 2, f"cumulative count expected, got {counts}"


# ---- 6. a damaged latest checkpoint is set aside and the previous one restored


def _largest_file(step_dir):
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names]
  files = [f for f in files if not f.endswith(checkpoint.CHECKSUMS)]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_latest_checkpoint_is_set_aside_for_the_previous(smoke_run, tmp_path, caplog, damage):
  config, reference, _ = smoke_run
  target = copy_run(smoke_run, tmp_path)
  latest, previous = committed(target)[-1], committed(target)[-2]
  victim = _largest_file(target / "checkpoints" / str(latest))
  payload = bytearray(open(victim, "rb").read())
  if damage == "truncate":
    payload = payload[: len(payload) // 2]
  else:
    for offset in range(64):  # 64 flipped bytes mid-file: Orbax alone would load them silently
      payload[len(payload) // 2 + offset] ^= 0xFF
  open(victim, "wb").write(bytes(payload))
  with caplog.at_level(logging.INFO):
    assert loop.run(config, str(target), dino.make_task) == "done"
  damaged = [r for r in caplog.records if r.levelno >= logging.ERROR and "is damaged" in r.getMessage()]
  assert len(damaged) == 1 and os.path.basename(victim) in damaged[0].getMessage()
  assert f"resuming from step {previous} of" in caplog.text
  assert any(d.startswith(f"checkpoints-{latest}-") for d in os.listdir(target / checkpoint.SET_ASIDE))
  want, got = losses_by_step(reference), losses_by_step(str(target))
  assert all(got[s]["loss"] == want[s]["loss"] for s in want), "the redone steps equal the original run"


# ---- 7. two jobs in one workdir


def test_a_second_run_in_a_busy_workdir_is_refused_and_a_dead_holder_is_taken_over(smoke_run, tmp_path):
  config, _, _ = smoke_run
  workdir = tmp_path / "busy"
  workdir.mkdir()
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from jaxgeo.workdir import WorkdirLock; lock = WorkdirLock(sys.argv[1]); lock.__enter__(); "
      "print('locked', flush=True); time.sleep(120)",
      str(workdir),
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"in use by pid {holder.pid} on host"):
      loop.run(config, str(workdir), dino.make_task)
  finally:
    holder.kill()
    holder.wait()
  assert (workdir / workdir_lib.LOCK_FILE).exists()  # left behind by the killed holder
  with workdir_lib.WorkdirLock(str(workdir)):  # a lock whose holder died is simply taken over
    assert f"pid {os.getpid()}" in (workdir / workdir_lib.LOCK_FILE).read_text()


# ---- 8. skip mode when the data vanishes; skipped counts survive a resume


def test_vanished_data_stops_with_a_clear_error_not_stop_iteration(synthetic_dir, tmp_path, monkeypatch):
  config = smoke_config(synthetic_dir, steps=6)
  with config.unlocked():
    config.data.on_bad_sample, config.data.max_skipped_fraction = "skip", 0.5
    config.eval.knn_every = 0
  # The mount drops after step 2: every sample outside the first two batches fails. Keyed on the sample, not
  # on a read count, because batches are read concurrently (read threads, prefetch) and a count would mix them.
  _, batches = loop.make_input(config, "train", num_epochs=1)
  batches = iter(batches)
  readable = {int(i) for _ in range(2) for i in next(batches)["index"]}
  original = bigearthnet.BigEarthNetSource.__getitem__

  def mount_drops_after_two_batches(self, index):
    if self.split == "train" and int(index) not in readable:
      raise BadSampleError(os.path.join(self.root, self.names[index]), "patch folder does not exist")
    return original(self, index)

  monkeypatch.setattr(bigearthnet.BigEarthNetSource, "__getitem__", mount_drops_after_two_batches)
  with pytest.raises(pipeline.AllSamplesBadError, match="all 16 samples of batch 2 failed"):
    loop.run(config, str(tmp_path / "vanished"), dino.make_task)


def test_skipped_sample_count_survives_a_resume(synthetic_dir, tmp_path):
  base = smoke_config(synthetic_dir, steps=4, checkpoint_every=1, log_every=1)
  root, metadata = data.resolve_paths(base.data)
  broken = tmp_path / "ben"
  shutil.copytree(root, broken)
  config = configured(base, data__root=str(broken), data__metadata=metadata, data__on_bad_sample="skip")
  config = configured(config, data__max_skipped_fraction=0.5, eval__knn_every=0)
  _, first_batches = loop.make_input(config, "train", num_epochs=1)
  first = int(next(iter(first_batches))["index"][0])  # a sample of step 1's batch
  patch = data.build_source(config.data, "train").names[first]
  band = broken / patch / f"{patch}_B04.tif"
  band.write_bytes(band.read_bytes()[:200])
  workdir = tmp_path / "skips"
  assert loop.run(config, str(workdir), dino.make_task) == "done"
  shutil.rmtree(workdir / "checkpoints" / "4")
  assert loop.run(config, str(workdir), dino.make_task) == "done"
  rows = losses_by_step(str(workdir))
  assert sorted(rows) == [1, 2, 3, 4], "each step once in metrics.jsonl after the resume"
  assert [rows[s]["skipped_samples"] for s in (1, 2, 3, 4)] == [1, 1, 1, 1]


def test_data_order_does_not_depend_on_the_worker_count(synthetic_dir):
  config = smoke_config(synthetic_dir)
  orders = []
  for workers in (0, 2):
    _, dataset = loop.make_input(configured(config, data__worker_count=workers), "train", num_epochs=1)
    orders.append([b["index"].tolist() for b in dataset])
  assert orders[0] == orders[1]


# ---- 9. disk full: sized from the real checkpoint; ENOSPC mid-save is one line naming the steps


def test_room_is_checked_against_the_real_first_checkpoint(synthetic_dir, tmp_path, monkeypatch):
  config = smoke_config(synthetic_dir, steps=4)
  with config.unlocked():
    config.eval.knn_every = 0
  real = shutil.disk_usage
  # The pre-flight estimate passes; once the first real checkpoint exists, 100 KiB are left.
  monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: real(path)._replace(free=1 << 40))
  original = checks.check_disk_after_save

  def with_little_room(directory, checkpoint_bytes, num_saved, keep):
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: real(path)._replace(free=100 * 1024))
    return original(directory, checkpoint_bytes, num_saved, keep)

  monkeypatch.setattr(checks, "check_disk_after_save", with_little_room)
  with pytest.raises(
    checkpoint.DiskFullError, match=r"a checkpoint of this run takes \d+\.\d (KiB|MiB) .*100\.0 KiB is free"
  ):
    loop.run(config, str(tmp_path / "tight"), dino.make_task)


def test_disk_full_mid_save_is_one_line_naming_the_steps(synthetic_dir, tmp_path, monkeypatch):
  config = smoke_config(synthetic_dir, steps=6)
  with config.unlocked():
    config.eval.knn_every = 0
  original = ocp.CheckpointManager.save

  def full_at_step_4(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_step_4)
  with pytest.raises(checkpoint.DiskFullError) as error:
    loop.run(config, str(tmp_path / "full"), dino.make_task)
  message = str(error.value)
  assert "\n" not in message
  assert "disk full while saving step 4" in message and "the latest complete checkpoint is step 2" in message


# ---- 10. the data under a run changed


def test_a_changed_dataset_under_the_same_config_is_named(smoke_run, tmp_path):
  config, _, _ = smoke_run
  target = copy_run(smoke_run, tmp_path, drop_latest=1)
  step_dir = target / "checkpoints" / str(committed(target)[-1])
  loop_json = next(p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "loop")
  loop_state = json.loads(loop_json.read_text())
  loop_state["train_samples"] += 100  # as if the run had started on a larger folder
  loop_json.write_text(json.dumps(loop_state))
  checkpoint.write_checksums(str(step_dir))
  with pytest.raises(workdir_lib.ConfigChangedError, match=r"had \d+ samples when the run .* started and has"):
    loop.run(config, str(target), dino.make_task)


def test_one_line_errors_on_the_command_line(smoke_run, tmp_path):
  target = copy_run(smoke_run, tmp_path, drop_latest=1)
  command = [
    sys.executable,
    "-m",
    "jaxgeo.main",
    "--config=configs/dino_ben.py:smoke",
    f"--workdir={target}",
    f"--config.data.synthetic_dir={smoke_run[0].data.synthetic_dir}",
    "--config.train.global_batch_size=32",
  ]
  start = time.monotonic()
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "train.global_batch_size: 16 -> 32" in result.stderr and "Traceback" not in result.stderr
  assert time.monotonic() - start < 300
