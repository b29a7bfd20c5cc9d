"""MoCo v2 on SEN12MS (jaxgeo/train/moco.py, configs/moco_sen12ms.py, jaxgeo/bridge/moco.py): the smoke config end
to end with a bit-exact resume, the step on 8 devices equal to 1 (shuffle BN), every pairing mode's step, the
seed's half-batch swap and partial fusion, views normalised once, checkpoint import / export with PyTorch files,
the end-of-run probe through task.embed, config errors and the benchmark's smoke mode.

Compile time is the budget here (a ResNet step costs ~15 s of CPU): states are filled from numpy rather than
by flax's init, and each pairing compiles one step at tiny shapes."""

import json
import math
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from conftest import REPO, losses_by_step
from torch_reference import ResNet50 as TorchResNet

from jaxgeo import bridge, checkpoint, parallel
from jaxgeo.bridge.__main__ import main as bridge_main
from jaxgeo.data import sen12ms
from jaxgeo.evaluate import linear
from jaxgeo.objectives import infonce
from jaxgeo.train import loop, moco
from jaxgeo.train.task import Task

sys.path.insert(0, os.path.join(REPO, "configs"))
import moco_sen12ms  # noqa: E402

TINY = dict(width=4, stages=(1, 1, 1, 1))  # the smoke config's ResNet


def smoke_config(synthetic_dir, arg="smoke", **moco_fields):
  config = moco_sen12ms.get_config(arg)
  config.data.synthetic_dir = str(synthetic_dir)
  for key, value in moco_fields.items():
    config.moco[key] = value
  config.lock()
  return config


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("synthetic_sen12ms_moco")


@pytest.fixture(scope="module")
def smoke_run(synthetic_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("moco_smoke"))
  config = smoke_config(synthetic_dir)
  return config, workdir, loop.run(config, workdir, moco.make_task)


def make_task(config, mesh, source):
  mean, std = source.norm_stats["image"]
  return moco.make_task(
    config, steps_per_epoch=2, total_steps=6, in_chans=len(source.bands), mean=mean, std=std, mesh=mesh, source=source
  )


def filled_state(task, seed=0):
  """A MoCo state of the task's layout with random weights from numpy (He-scaled kernels, non-trivial BatchNorm
  affine params and statistics, unit queue columns), the key encoder a perturbed copy of the query's."""
  abstract = jax.eval_shape(loop.with_loop_fields(task.init), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    top, last = path[0].key, getattr(path[-1], "key", None)
    if top == "queue":
      return np.asarray(infonce.l2_normalize(rng.standard_normal(leaf.shape), axis=0), np.float32)
    if top == "rng":
      return np.asarray(jax.random.PRNGKey(seed))
    if top in ("queue_ptr", "step", "opt_state"):
      return np.zeros(leaf.shape, leaf.dtype)
    if top == "lr_scale":
      return np.ones(leaf.shape, leaf.dtype)
    value = {
      "kernel": lambda: rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1])),
      "scale": lambda: 1.0 + 0.1 * rng.standard_normal(leaf.shape),
      "bias": lambda: 0.05 * rng.standard_normal(leaf.shape),
      "mean": lambda: 0.05 * rng.standard_normal(leaf.shape),
      "var": lambda: rng.uniform(0.5, 1.5, leaf.shape),
    }[last]()
    return value.astype(np.float32)

  state = jax.tree_util.tree_map_with_path(fill, abstract)
  state["key"] = jax.tree.map(
    lambda x: x + 0.01 * rng.standard_normal(x.shape).astype(np.float32),
    {"params": state["params"]["encoder"], "batch_stats": state["batch_stats"]["encoder"]},
  )
  return state


def task_state(task, restored):
  """A restored checkpoint (plain containers) in the task's own tree structure (optax states are namedtuples)."""
  abstract = jax.eval_shape(loop.with_loop_fields(task.init), jax.random.PRNGKey(0))
  leaves = jax.tree.leaves(restored)
  assert [np.shape(x) for x in leaves] == [x.shape for x in jax.tree.leaves(abstract)]
  return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def one_step(task, state, batch, mesh, fast_compile=False):
  """The loop's jitted step (same shardings, donation) on `mesh`; host copies of (new state, metrics).

  fast_compile: XLA:CPU without its expensive LLVM passes (a third less compile time; not the loop's program)."""
  shardings = parallel.tree_shardings(jax.eval_shape(lambda: state), [(".*", "fsdp")], mesh)
  batch_shardings = {k: parallel.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
  step_fn = jax.jit(
    loop._carry_loop_fields(task.step),  # noqa: SLF001  the wrapper the loop jits
    in_shardings=(shardings, batch_shardings),
    out_shardings=(shardings, parallel.replicated(mesh)),
    donate_argnums=0,
  )
  args = (jax.device_put(state, shardings), parallel.host_to_global(batch, mesh))
  options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True} if fast_compile else None
  new_state, metrics = step_fn.lower(*args).compile(compiler_options=options)(*args)
  return jax.device_get(new_state), jax.device_get(metrics)


def max_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


# ---------------------------------------------------------------------------------------------------------------
# The smoke config through the shared loop
# ---------------------------------------------------------------------------------------------------------------


def test_smoke_trains_end_to_end(smoke_run):
  config, workdir, status = smoke_run
  assert status == "done"
  rows = losses_by_step(workdir)
  assert sorted(rows) == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["loss"]) and 0 <= r["acc1"] <= r["acc5"] <= 100 for r in rows.values())
  # main_moco's adjust_learning_rate: cosine over epochs, constant within one (2 steps per epoch here).
  for step, row in rows.items():
    epoch = (step - 1) // 2
    assert row["lr"] == pytest.approx(0.03 * 16 / 256 * 0.5 * (1 + np.cos(np.pi * epoch / 3)), rel=1e-6)
  monitor = [
    r for r in (json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))) if "knn_ap_macro" in r
  ]
  assert [r["step"] for r in monitor] == [0, 3, 6]  # the kNN monitor read task.embed
  state = checkpoint.load_state(workdir)
  assert int(state["step"]) == 6 and int(state["queue_ptr"]) == 6 * 16 % 64
  np.testing.assert_allclose(np.linalg.norm(state["queue"], axis=0), 1.0, rtol=1e-5)
  assert max_diff(state["key"]["params"], state["params"]["encoder"]) > 1e-4  # an EMA, not a copy
  earlier = checkpoint.load_state(workdir, step=2)
  assert sorted(state["params"]["adapters"]) == ["s1", "s2"]
  assert max_diff(state["params"]["adapters"], earlier["params"]["adapters"]) > 1e-5  # trained, as the seed's
  assert np.shape(state["params"]["adapters"]["s2"]["adapter_conv"]["kernel"]) == (1, 1, 10, 3)
  assert np.shape(state["params"]["encoder"]["conv1"]["kernel"])[2] == 3  # the RGB stem behind the adapters
  info = json.load(open(os.path.join(workdir, "dataset.json")))
  assert info["bands"] == list(sen12ms.SEED_S2_BANDS) and set(info["norm_stats"]) == {"image", "s1", "s2"}

  encoder = moco.load_query_encoder(workdir)  # what train/classify.py fine-tunes from
  assert sorted(encoder["adapters"]) == ["s1", "s2"] and encoder["config"].moco.pairing == "sensor"
  np.testing.assert_array_equal(
    encoder["backbone"]["params"]["conv1"]["kernel"], state["params"]["encoder"]["conv1"]["kernel"]
  )
  np.testing.assert_array_equal(
    encoder["adapters"]["s1"]["batch_stats"]["adapter_bn"]["var"],
    state["batch_stats"]["adapters"]["s1"]["adapter_bn"]["var"],
  )


def test_resume_is_bit_exact(smoke_run, tmp_path):
  config, workdir, _ = smoke_run
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  for step in (4, 6):  # keep only step 2: steps 3..6 are redone
    shutil.rmtree(resumed / "checkpoints" / str(step))
  os.remove(resumed / "metrics.jsonl")
  assert loop.run(config, str(resumed), moco.make_task) == "done"
  original, again = losses_by_step(workdir), losses_by_step(str(resumed))
  assert sorted(again) == [3, 4, 5, 6]
  for step in again:
    assert again[step]["loss"] == original[step]["loss"], step
  for a, b in zip(
    jax.tree.leaves(checkpoint.load_state(workdir)), jax.tree.leaves(checkpoint.load_state(str(resumed)))
  ):
    np.testing.assert_array_equal(a, b)


def test_step_on_8_devices_equals_1_and_the_loop(smoke_run):
  """Shuffle BN on any mesh: from the run's step-4 checkpoint, step 5 on 8 devices (groups of 8 samples spanning
  4 devices each) and on 1 device agree, and the 8-device one is the loop's own step 5."""
  config, workdir, _ = smoke_run
  source, dataset = loop.make_input(config, "train", num_epochs=3, start_batch=4)
  batch = next(iter(dataset))
  results = {}
  for devices in (8, 1):
    mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:devices])
    task = make_task(config, mesh, source)
    state = task_state(task, checkpoint.load_state(workdir, step=4))
    results[devices] = one_step(task, state, batch, mesh, fast_compile=devices == 1)
  (state8, metrics8), (state1, metrics1) = results[8], results[1]
  assert metrics8["loss"] == losses_by_step(workdir)[5]["loss"]
  np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=1e-5)
  # float32 sums in another order: BatchNorm over 8-sample groups (layer4 is 1x1 at 32 px) amplifies them in the
  # gradient to ~1e-5 of its largest entries; the params themselves agree to ~1e-8.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state8), jax.tree.leaves(state1)):
    atol = 1e-5 * max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))
  assert int(state8["queue_ptr"]) == int(state1["queue_ptr"]) == (int(state["queue_ptr"]) + 16) % 64

  # The momentum update used the query params from before this step's SGD update.
  m = config.moco.momentum
  expected_key = jax.tree.map(lambda k, q: m * k + (1 - m) * q, state["key"]["params"], state["params"]["encoder"])
  assert max_diff(state8["key"]["params"], expected_key) < 1e-6
  # The S1 adapter had gradients, not just weight decay and momentum: the swapped halves put S1 in the query.
  wd, lr = config.optim.weight_decay, metrics8["lr"]
  kernel = state["params"]["adapters"]["s1"]["adapter_conv"]["kernel"]
  trace = state["opt_state"][1].trace["adapters"]["s1"]["adapter_conv"]["kernel"]
  without_gradient = kernel - lr * (0.9 * trace + wd * kernel)
  assert np.abs(state8["params"]["adapters"]["s1"]["adapter_conv"]["kernel"] - without_gradient).max() > 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Pairing modes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("pairing", "channels"), [("augment", 10), ("fusion_all", 12), ("fusion_partial", 12)], ids=lambda v: str(v)
)
def test_pairing_trains_a_step(synthetic_dir, pairing, channels):
  # aug_set 1 (crops only): the recipes themselves are covered by test_augment; this keeps the compile small.
  config = smoke_config(synthetic_dir, f"smoke,pairing={pairing}", aug_set=1)
  source, dataset = loop.make_input(config, "train")
  mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:1])
  task = make_task(config, mesh, source)
  state = filled_state(task)
  assert "adapters" not in state["params"]  # fusion and plain MoCo read all bands with conv1, as the seed's runs
  assert np.shape(state["params"]["encoder"]["conv1"]["kernel"])[2] == channels
  new, metrics = one_step(task, state, next(iter(dataset)), mesh, fast_compile=True)
  assert bool(metrics["finite"]) and np.isfinite(metrics["loss"]) and metrics["loss"] > 0
  assert int(new["queue_ptr"]) == 16 and int(new["step"]) == 1
  queue_moved = np.abs(new["queue"] - state["queue"]).max(axis=0) > 0
  assert queue_moved[:16].all() and not queue_moved[16:].any()
  np.testing.assert_allclose(np.linalg.norm(new["queue"][:, :16], axis=0), 1.0, rtol=1e-5)
  assert max_diff(new["params"], state["params"]) > 1e-6 and max_diff(new["batch_stats"], state["batch_stats"]) > 1e-6
  assert max_diff(new["key"]["batch_stats"], state["key"]["batch_stats"]) > 1e-6  # its own train-mode statistics


def test_sensor_pairs_swap_halves():
  s2, s1 = jnp.arange(8.0)[:, None], 100 + jnp.arange(8.0)[:, None]
  query, key = moco.sensor_pairs(s2, s1, group=4)  # two reference GPUs of 4 samples
  assert query[:, 0].tolist() == [0, 1, 102, 103, 4, 5, 106, 107]
  assert key[:, 0].tolist() == [100, 101, 2, 3, 104, 105, 6, 7]
  query, key = moco.sensor_pairs(s2, s1)  # swap_halves=False: S2 always the query
  assert query[:, 0].tolist() == list(range(8)) and key[:, 0].tolist() == list(range(100, 108))


def test_partial_fusion_shares_and_zero_filling(synthetic_dir):
  bands = sen12ms.BAND_SETS["s1s2"]
  s1 = np.array([b in sen12ms.S1_BANDS for b in bands])
  keep = np.asarray(moco.partial_fusion_channels(jax.random.PRNGKey(3), 16, s1))
  kinds = {"both": keep.all(axis=1), "s2 only": (keep == ~s1).all(axis=1), "s1 only": (keep == s1).all(axis=1)}
  assert sum(kinds.values()).tolist() == [1] * 16  # every sample is exactly one kind
  assert sorted(int(k.sum()) for k in kinds.values()) == [5, 5, 6]  # equal shares, 16 = 5 + 5 + 6
  again = np.asarray(moco.partial_fusion_channels(jax.random.PRNGKey(3), 16, s1))
  other = np.asarray(moco.partial_fusion_channels(jax.random.PRNGKey(4), 16, s1))
  assert np.array_equal(keep, again) and not np.array_equal(keep, other)  # a function of the step key

  # Through the views: the missing sensor is 0 in raw units, then normalised once -> -mean / std exactly.
  config = smoke_config(synthetic_dir, "smoke,pairing=fusion_partial", aug_set=1)
  source, dataset = loop.make_input(config, "train")
  batch = next(iter(dataset))
  mean, std = (np.asarray(v, np.float32) for v in source.norm_stats["image"])
  views = jax.jit(moco.make_views(config, source.bands, source.norm_stats))(jax.random.PRNGKey(0), batch)
  kind = lambda view: np.all(np.isclose(np.asarray(view), -mean / std, rtol=0, atol=1e-5), axis=(1, 2))  # noqa: E731
  missing = kind(views["query"])  # [B, C]: the channel is (0 - mean) / std all over the view
  np.testing.assert_array_equal(missing, kind(views["key"]))  # a sample's two views are of the same kind
  s1_only, s2_only = (missing == ~s1).all(axis=1), (missing == s1).all(axis=1)
  both = ~missing.any(axis=1)
  assert (s1_only | s2_only | both).all() and sorted([s1_only.sum(), s2_only.sum(), both.sum()]) == [5, 5, 6]


def test_sensor_views_are_normalised_once(synthetic_dir):
  """The seed scaled S2 by 1/10000 and S1 to [0, 1], then applied raw-unit statistics: near-constant inputs.
  Here a whole-image crop of a raw patch comes out as exactly (raw - mean) / std of its sensor."""
  config = moco_sen12ms.get_config("smoke")
  config.data.synthetic_dir = str(synthetic_dir)
  config.moco.aug_set = 1
  source, dataset = loop.make_input(config, "train")
  batch = next(iter(dataset))
  recipe = moco.view_recipe(1)
  assert (recipe.jitter_p, recipe.blur_p, recipe.flip_p, recipe.clip) == (0.0, 0.0, 0.0, (0.0, None))
  with config.unlocked():
    config.moco.image_size = batch["s2"].shape[1]
  original = moco.view_recipe
  whole = ml_collections.ConfigDict(dict(original(1), scale=(1.0, 1.0), ratio=(1.0, 1.0)))
  moco.view_recipe = lambda aug_set: whole
  try:
    views = jax.jit(moco.make_views(config, source.bands, source.norm_stats))(jax.random.PRNGKey(0), batch)
  finally:
    moco.view_recipe = original
  for sensor in ("s1", "s2"):
    mean, std = (np.asarray(v, np.float32) for v in source.norm_stats[sensor])
    np.testing.assert_allclose(views[sensor], (batch[sensor] - mean) / std, rtol=1e-5, atol=1e-4)
    assert 0.3 < float(np.std(views[sensor])) < 3.0  # unit-scale inputs, not the seed's near-constant ones


# ---------------------------------------------------------------------------------------------------------------
# PyTorch checkpoints: the seed's OpenSelfSup MoCo and the official facebookresearch/moco layout
# ---------------------------------------------------------------------------------------------------------------


def torch_moco_parts(seed):
  """Random torch encoders (query, key: TINY ResNet with the MoCo MLP), the seed's adapters, a queue."""
  torch.manual_seed(seed)
  encoders = [TorchResNet(3, (32, 16), **TINY) for _ in range(2)]
  for encoder in encoders:  # non-trivial statistics so a swapped mean / var would show
    for module in encoder.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 1.5)
  adapters = {}
  for side, bands in (("q", 10), ("k", 2)):
    block = torch.nn.Sequential(torch.nn.Conv2d(bands, 3, 1, bias=False), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    block[1].running_mean.normal_()
    adapters[side] = block
  queue = torch.nn.functional.normalize(torch.randn(16, 64), dim=0)
  return encoders, adapters, queue


def seed_state_dict(encoders, adapters, queue):
  """OpenSelfSup MOCO's keys: backbone + neck as encoder_q.{0,1}, the backbone again as backbone.*, input modules."""
  state = {}
  for side, encoder in zip(("q", "k"), encoders):
    for key, value in encoder.state_dict().items():
      if key.startswith("fc."):
        state[f"encoder_{side}.1.mlp.{key[3:]}"] = value
      else:
        state[f"encoder_{side}.0.{key}"] = value
        if side == "q":
          state[f"backbone.{key}"] = value
  for side, block in adapters.items():
    state.update({f"input_module_{side}.net.{k}": v for k, v in block.state_dict().items()})
  return dict(state, queue=queue, queue_ptr=torch.tensor([32]))


def official_state_dict(encoders, queue):
  state = {f"module.encoder_{s}.{k}": v for s, e in zip("qk", encoders) for k, v in e.state_dict().items()}
  return dict(state, **{"module.queue": queue, "module.queue_ptr": torch.tensor([48])})


def assert_weights_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_seed_and_official_checkpoints_import_and_export(tmp_path, synthetic_dir):
  encoders, adapters, queue = torch_moco_parts(0)
  seed_path = str(tmp_path / "openselfsup_moco_epoch_20.pth")
  torch.save(
    {"meta": {"epoch": 20, "iter": 14000}, "state_dict": seed_state_dict(encoders, adapters, queue)}, seed_path
  )
  weights = bridge.moco_from_torch(seed_path)
  assert sorted(weights["params"]["adapters"]) == ["s1", "s2"] and int(weights["queue_ptr"]) == 32
  np.testing.assert_array_equal(weights["queue"], queue.numpy())
  torch_q, torch_k = (e.state_dict() for e in encoders)
  np.testing.assert_array_equal(weights["params"]["encoder"]["fc_0"]["kernel"], torch_q["fc.0.weight"].numpy().T)
  np.testing.assert_array_equal(weights["key"]["params"]["fc_1"]["bias"], torch_k["fc.2.bias"].numpy())
  np.testing.assert_array_equal(
    weights["key"]["batch_stats"]["layer3_0"]["downsample_bn"]["var"], torch_k["layer3.0.downsample.1.running_var"]
  )
  np.testing.assert_array_equal(
    weights["params"]["adapters"]["s2"]["adapter_conv"]["kernel"],
    adapters["q"][0].weight.detach().numpy().transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    weights["batch_stats"]["adapters"]["s2"]["adapter_bn"]["mean"], adapters["q"][1].running_mean.numpy()
  )

  # Into a sensor-pairing run's state, out as the official layout plus the seed's adapter names, and back.
  config = smoke_config(synthetic_dir)
  source, _ = loop.make_input(config, "train")
  task = make_task(config, parallel.make_mesh(config.mesh, devices=jax.devices()[:1]), source)
  state = bridge.init_moco_state(filled_state(task), seed_path, bands=source.bands)
  assert_weights_equal({k: state[k] for k in bridge.moco.WEIGHT_KEYS}, weights)
  exported = bridge.save_moco(weights, tmp_path / "exported.pth.tar")
  checkpoint_dict = torch.load(exported, weights_only=True)
  saved = checkpoint_dict["state_dict"]
  assert checkpoint_dict["arch"] == "resnet50"
  torch.testing.assert_close(saved["module.input_module_k.net.0.weight"], adapters["k"][0].weight.detach())
  torch.testing.assert_close(saved["module.encoder_k.layer4.0.bn3.running_mean"], torch_k["layer4.0.bn3.running_mean"])
  assert int(saved["module.queue_ptr"]) == 32
  assert_weights_equal(bridge.moco_from_torch(exported), weights)
  assert main_lincls_load(saved) == {"fc.weight", "fc.bias"}
  bridge_main(["to-jax", seed_path, str(tmp_path / "query.safetensors")])  # one encoder + the S2 adapter
  model, variables = bridge.load_jax_file(tmp_path / "query.safetensors")
  assert model.band_adapter and model.head == "mlp" and tuple(model.stages) == TINY["stages"] and model.width == 4
  np.testing.assert_array_equal(
    variables["params"]["adapter_conv"]["kernel"], weights["params"]["adapters"]["s2"]["adapter_conv"]["kernel"]
  )
  np.testing.assert_array_equal(
    variables["batch_stats"]["layer1_0"]["bn2"]["mean"], weights["batch_stats"]["encoder"]["layer1_0"]["bn2"]["mean"]
  )

  # The official layout (with main_moco's optimizer state in the file) reads the same way; safetensors too.
  official_path = str(tmp_path / "checkpoint_0199.pth.tar")
  optimizer = torch.optim.SGD(encoders[0].parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
  encoders[0](torch.randn(2, 3, 32, 32)).sum().backward()
  optimizer.step()
  official = official_state_dict(encoders, queue)
  torch.save(
    {"epoch": 200, "arch": "resnet50", "state_dict": official, "optimizer": optimizer.state_dict()}, official_path
  )
  weights = bridge.moco_from_torch(official_path)
  assert "adapters" not in weights["params"] and int(weights["queue_ptr"]) == 48
  np.testing.assert_array_equal(
    weights["params"]["encoder"]["conv1"]["kernel"], encoders[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
  )
  roundtrip = bridge.moco_from_torch(bridge.save_moco(weights, tmp_path / "official.safetensors"))
  assert_weights_equal(roundtrip, weights)
  torch.testing.assert_close(
    torch.load(bridge.save_moco(weights, tmp_path / "again.pth"), weights_only=True)["state_dict"]["module.queue"],
    official["module.queue"],
  )


def main_lincls_load(state_dict):
  """main_lincls.py's --pretrained loading: keep module.encoder_q minus its fc, strip the prefix, load with
  strict=False into a fresh resnet; returns the missing keys (it asserts they are exactly fc.weight, fc.bias)."""
  kept = {
    k[len("module.encoder_q.") :]: v
    for k, v in state_dict.items()
    if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc")
  }
  result = TorchResNet(3, 10, **TINY).load_state_dict(kept, strict=False)
  assert not result.unexpected_keys, result.unexpected_keys
  return set(result.missing_keys)


def test_exported_run_loads_in_main_lincls_and_pretrained_init(smoke_run, tmp_path):
  config, workdir, _ = smoke_run

  out = tmp_path / "moco_run.pth.tar"
  bridge_main(["to-torch", workdir, str(out)])  # a MoCo run folder: the whole MoCo checkpoint
  saved = torch.load(out, weights_only=True)
  assert saved["jaxgeo_step"] == 6
  assert main_lincls_load(saved["state_dict"]) == {"fc.weight", "fc.bias"}
  state = checkpoint.load_state(workdir)
  assert_weights_equal(bridge.moco_from_torch(str(out)), {k: state[k] for k in bridge.moco.WEIGHT_KEYS})

  # config.init.checkpoint with a plain torchvision ResNet-50: both encoders' backbone, a fresh projector.
  torchvision = TorchResNet(3, 1000, **TINY)
  path = tmp_path / "resnet50_imagenet.pth"
  torch.save(torchvision.state_dict(), path)
  with config.unlocked():
    config.init.checkpoint = str(path)
  source, _ = loop.make_input(config, "train")
  task = make_task(config, parallel.make_mesh(config.mesh, devices=jax.devices()[:1]), source)
  fresh = filled_state(task)
  loaded = task.import_pretrained(fresh)
  conv1 = torchvision.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
  for side in (loaded["params"]["encoder"], loaded["key"]["params"]):
    np.testing.assert_array_equal(side["conv1"]["kernel"], conv1)
  np.testing.assert_array_equal(
    loaded["key"]["params"]["fc_0"]["kernel"], loaded["params"]["encoder"]["fc_0"]["kernel"]
  )
  np.testing.assert_array_equal(
    loaded["params"]["encoder"]["fc_0"]["kernel"], fresh["params"]["encoder"]["fc_0"]["kernel"]
  )
  assert_weights_equal(loaded["params"]["adapters"], fresh["params"]["adapters"])  # none in the file: kept


# ---------------------------------------------------------------------------------------------------------------
# The end-of-run probe through task.embed, config errors, the benchmark
# ---------------------------------------------------------------------------------------------------------------


def test_final_probe_works_for_any_task_embed(synthetic_dir, tmp_path):
  """linear.compare_with_random_init for a non-DINO method: task.embed features of the run's own dataset (SEN12MS
  multi-label here) for the given state and for task.init(seed). A tiny linear embedding keeps it cheap."""
  config = smoke_config(synthetic_dir)
  with config.unlocked():
    config.probe = linear.probe_config(epochs=4, batch_size=16, eval_every=2, feature_batch_size=16, lrs=(0.1, 1.0))

  def init(rng):
    return {"w": jax.random.normal(rng, (10, 8)), "step": jnp.zeros((), jnp.int32)}

  def embed(state, images):
    return jnp.log1p(jnp.mean(images, axis=(1, 2))) @ state["w"]

  task = Task(init=init, step=None, embed=embed)
  mesh = parallel.make_mesh(config.mesh)
  trained = {"w": jnp.eye(10, 8) * 3.0, "step": jnp.int32(7)}
  rows = linear.compare_with_random_init(
    config, str(tmp_path), task, jax.device_put(trained, parallel.replicated(mesh)), mesh
  )
  assert set(rows) == {"pretrained", "random init"}
  for name, row in rows.items():
    folder = tmp_path / f"probe_{name.replace(' ', '_')}"
    written = json.loads((folder / "linear_probe.json").read_text())
    assert written["test"]["ap_macro"] == pytest.approx(row["test"]["ap_macro"]) and 0 < row["test"]["ap_macro"] <= 1
    assert written["class_names"] == list(sen12ms.CLASSES_10) and written["feature"]["dim"] == 8
    assert (folder / "predictions_test.npz").exists() and (folder / "features" / "train.npz").exists()
  assert "step 7" in rows["pretrained"]["backbone"] and "seed 0" in rows["random init"]["backbone"]
  features = [
    np.load(tmp_path / f"probe_{n}" / "features" / "test.npz")["features"] for n in ("pretrained", "random_init")
  ]
  assert not np.allclose(features[0], features[1])


def test_full_config_is_the_reference_recipe():
  """configs/moco_sen12ms.py (full): ResNet-50 with the 2048-2048-128 MLP, K 65536, T 0.2, m 0.999, batch 256,
  200 epochs, lr 0.03 at 256, SGD 0.9 / 1e-4, shuffle BN over 4 x 64; shapes only (nothing compiled)."""
  config = moco_sen12ms.get_config()
  m = config.moco
  assert (m.pairing, m.swap_halves, m.queue_size, m.temperature, m.momentum, m.dim, m.mlp_hidden) == (
    "sensor",
    True,
    65536,
    0.2,
    0.999,
    128,
    2048,
  )
  assert (config.train.global_batch_size, config.train.epochs, m.bn_group_size, m.image_size) == (256, 200, 64, 224)
  assert (config.optim.base_lr, config.optim.momentum, config.optim.weight_decay) == (0.03, 0.9, 1e-4)
  assert config.data.pair_sensors and config.data.sensor == "s2" and moco.resolved(m) == (2, True)
  stats = {
    "image": sen12ms.normalization_stats(sen12ms.SEED_S2_BANDS),
    "s2": sen12ms.normalization_stats(sen12ms.SEED_S2_BANDS),
  }
  stats["s1"] = sen12ms.normalization_stats(sen12ms.S1_BANDS)
  source = types.SimpleNamespace(bands=sen12ms.SEED_S2_BANDS, norm_stats=stats)
  task = make_task(config, parallel.make_mesh(config.mesh), source)
  abstract = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
  encoder = abstract["params"]["encoder"]
  head = {k: v for k, v in encoder.items() if k.startswith("fc_")}
  assert count(encoder) - count(head) == 23_508_032  # torchvision resnet50 without fc
  assert count(head) == 2048 * 2048 + 2048 + 2048 * 128 + 128
  assert abstract["queue"].shape == (128, 65536) and count(abstract["key"]["params"]) == count(encoder)
  assert {k: count(v) for k, v in abstract["params"]["adapters"].items()} == {"s1": 2 * 3 + 6, "s2": 10 * 3 + 6}
  assert count(abstract["opt_state"]) == count(abstract["params"])  # SGD momentum over encoder and adapters


def test_config_errors_name_the_field(synthetic_dir):
  source = types.SimpleNamespace(
    bands=sen12ms.SEED_S2_BANDS, norm_stats={"image": sen12ms.normalization_stats(sen12ms.SEED_S2_BANDS)}
  )
  mesh = parallel.make_mesh(types.SimpleNamespace(data=1, fsdp=1), devices=jax.devices()[:1])

  def build(arg="smoke", source=source, **moco_fields):
    config = moco_sen12ms.get_config(arg)
    config.moco.update(moco_fields)
    return make_task(config, mesh, source)

  with pytest.raises(ValueError, match=r"config\.moco\.queue_size=40 must be a positive multiple"):
    build(queue_size=40)
  with pytest.raises(ValueError, match=r"config\.moco\.bn_group_size=3"):
    build(bn_group_size=3)
  with pytest.raises(ValueError, match=r"config\.data\.pair_sensors=True"):
    build()  # sensor pairing, but the source yields no s1 / s2
  with pytest.raises(ValueError, match=r"data\.sensor='s1s2'"):
    build("smoke,pairing=fusion_all")
  with pytest.raises(ValueError, match=r"config\.moco\.aug_set=5"):
    build("smoke,pairing=augment", aug_set=5)
  with pytest.raises(ValueError, match=r"config\.moco\.pairing='fuse'"):
    build("smoke,pairing=augment", pairing="fuse")
  with pytest.raises(ValueError, match=r"moco\.pairing .*'fuse'"):
    moco_sen12ms.get_config("smoke,pairing=fuse")
  paired = types.SimpleNamespace(
    bands=source.bands, norm_stats=dict(source.norm_stats, s1=((0, 0), (1, 1)), s2=source.norm_stats["image"])
  )
  with pytest.raises(ValueError, match=r"config\.moco\.adapter=False"):
    build(source=paired, adapter=False)


def test_moco_step_benchmark_smoke_writes_json(tmp_path):
  out = tmp_path / "moco_step.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "benchmarks", "moco_step.py"),
      "--smoke",
      f"--out={out}",
      "--steps=2",
      "--variants=torch_eager,torch_compiled,jaxgeo_sensor",  # the in-step views and adapters; noaug is a subset
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "NO GPU" in result.stdout and "flops_per_step = " in result.stdout
  report = json.loads(out.read_text())
  assert report["gpu_available"] is False and report["machine"]["torch"]
  variants = [r["variant"] for r in report["results"]]
  assert variants == ["torch_eager", "torch_compiled", "jaxgeo_sensor"]
  for row in report["results"]:
    assert "error" not in row, row
    assert row["images_per_s"] > 0 and row["flops_per_step"] > 0
    assert (
      row["compile_s"] > 0 if row["variant"].startswith("jaxgeo") else math.isfinite(row["compile_s"])
    )  # torch: noisy
    assert row["step_time_s"]["min"] <= row["step_time_s"]["median"] <= row["step_time_s"]["max"]
  assert report["model"]["queue_size"] % report["results"][0]["global_batch"] == 0
  assert set(report["ratios"]) == {"b16: jaxgeo_sensor / torch_eager", "b16: jaxgeo_sensor / torch_compiled"}
