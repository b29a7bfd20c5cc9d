"""DINO through the shared loop: the smoke config end to end, sharding equivalence, resume, config errors."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, dino_ben, losses_by_step, smoke_config

from jaxgeo import checkpoint, parallel
from jaxgeo.train import checks, dino, loop


def test_smoke_trains_end_to_end(smoke_run):
  config, workdir, status = smoke_run
  assert status == "done"
  rows = losses_by_step(workdir)
  steps = sorted(rows)
  assert steps[-1] >= 6, steps
  losses = [rows[s]["loss"] for s in steps]
  assert all(np.isfinite(losses))
  assert abs(losses[-1] - losses[0]) > 1e-3, "loss did not move"
  assert any("knn_ap_macro" in rows[s] for s in steps), "kNN monitor never ran"
  assert os.path.exists(os.path.join(workdir, "loss.png"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  state = checkpoint.load_state(workdir)
  assert int(state["step"]) == steps[-1]
  # The EMA teacher moved away from its initial copy of the student, but not onto it.
  diff = jax.tree.map(lambda s, t: float(np.abs(s - t).max()), state["params"], state["teacher"])
  assert max(jax.tree.leaves(diff)) > 0


def test_resume_gives_identical_losses_and_params(smoke_run, tmp_path):
  config, workdir, _ = smoke_run
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  ckpt_dir = resumed / "checkpoints"
  saved = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert len(saved) >= 2
  for step in saved[1:]:  # keep only the oldest checkpoint: the run must redo everything after it
    shutil.rmtree(ckpt_dir / str(step))
  os.remove(resumed / "metrics.jsonl")
  assert loop.run(config, str(resumed), dino.make_task) == "done"
  original, again = losses_by_step(workdir), losses_by_step(str(resumed))
  redone = [s for s in sorted(again) if s > saved[0]]
  assert redone
  for step in redone:
    assert again[step]["loss"] == original[step]["loss"], step
  final_a, final_b = checkpoint.load_state(workdir), checkpoint.load_state(str(resumed))
  for a, b in zip(jax.tree.leaves(final_a), jax.tree.leaves(final_b)):
    np.testing.assert_array_equal(a, b)


def test_step_on_8_devices_equals_step_on_1(synthetic_dir):
  config = smoke_config(synthetic_dir)
  source, dataset = loop.make_input(config, "train")
  batch = next(iter(dataset))
  mean, std = loop.data.normalization_stats(config.data.bands)

  def one_step(devices):
    mesh = parallel.make_mesh(config.mesh, devices=devices)
    task = dino.make_task(
      config, steps_per_epoch=4, total_steps=12, in_chans=len(source.bands), mean=mean, std=std, mesh=mesh
    )
    abstract = jax.eval_shape(task.init, jax.random.PRNGKey(0))
    shardings = parallel.tree_shardings(abstract, config.sharding_rules, mesh)
    state = jax.jit(task.init, out_shardings=shardings)(jax.random.PRNGKey(0))
    step = jax.jit(task.step, out_shardings=(shardings, parallel.replicated(mesh)))
    state, metrics = step(state, parallel.host_to_global(batch, mesh))
    return jax.device_get(state), jax.device_get(metrics)

  state8, metrics8 = one_step(jax.devices()[:8])
  state1, metrics1 = one_step(jax.devices()[:1])
  np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(state1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fsdp_rules_leave_little_replicated():
  config = dino_ben.get_config("full")  # ViT-S/16 with the 65536-wide head: shapes only, nothing computed
  config.mesh.data, config.mesh.fsdp = 2, 4
  mesh = parallel.make_mesh(config.mesh)
  student, _ = dino.build_models(config)
  dummy = [jax.ShapeDtypeStruct((1, 1, 224, 224, 3), np.float32)]
  abstract = jax.eval_shape(
    lambda: student.init({"params": jax.random.PRNGKey(0)}, [np.zeros(d.shape, d.dtype) for d in dummy])["params"]
  )
  shardings = parallel.tree_shardings(abstract, config.sharding_rules, mesh)
  assert parallel.replicated_fraction(abstract, shardings) < 0.01
  replicated_rules = parallel.tree_shardings(abstract, [(".*", "replicate")], mesh)
  assert parallel.replicated_fraction(abstract, replicated_rules) == 1.0


def test_config_errors_fail_before_compute(tmp_path, synthetic_dir):
  config = dino_ben.get_config("smoke")
  config.train.global_batch_size = 12
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    checks.check_config(config, device_count=8, process_count=1)
  config.train.global_batch_size = 16
  config.optim.warmup_epochs = 50
  with pytest.raises(ValueError, match="warmup_epochs"):
    checks.check_schedule(config, steps_per_epoch=3, dataset_size=48)
  readonly = tmp_path / "ro"
  readonly.mkdir()
  readonly.chmod(0o500)
  if os.access(readonly, os.W_OK):  # root ignores permissions: use a path under a file instead
    readonly = tmp_path / "a_file"
    readonly.write_text("")
    readonly = readonly / "workdir"
  with pytest.raises(PermissionError, match="not writable"):
    checks.prepare_workdir(str(readonly))


def test_mistyped_override_is_rejected():
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxgeo.main",
      "--config=configs/dino_ben.py:smoke",
      "--config.train.global_batchsize=8",
      "--workdir=/nonexistent",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "global_batchsize" in result.stderr


def test_training_starts_from_pytorch_weights(smoke_run, tmp_path):
  """config.init.checkpoint: a PyTorch-format backbone lands in both student and teacher, sharded."""
  from jaxgeo import bridge

  config, workdir, _ = smoke_run
  config = config.copy_and_resolve_references()  # the session's config stays as it was
  trained = checkpoint.load_params(workdir, "teacher")["backbone"]
  path = str(tmp_path / "backbone.pth")
  bridge.save_state_dict(bridge.to_torch_state_dict({"params": trained}), path)
  with config.unlocked():
    config.init.checkpoint = path
  source, _ = loop.make_input(config, "train")
  mean, std = loop.data.normalization_stats(config.data.bands)
  mesh = parallel.make_mesh(config.mesh)
  task = dino.make_task(
    config, steps_per_epoch=4, total_steps=12, in_chans=len(source.bands), mean=mean, std=std, mesh=mesh
  )
  abstract = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  shardings = parallel.tree_shardings(abstract, config.sharding_rules, mesh)
  fresh = jax.jit(task.init, out_shardings=shardings)(jax.random.PRNGKey(0))
  state = jax.device_put(task.import_pretrained(fresh), shardings)  # what the loop does on a fresh start
  for key in ("params", "teacher"):
    for a, b in zip(jax.tree.leaves(state[key]["backbone"]), jax.tree.leaves(trained)):
      np.testing.assert_array_equal(np.asarray(a), b)
    assert jax.tree.leaves(state[key]["backbone"])[0].sharding == jax.tree.leaves(shardings[key]["backbone"])[0]
