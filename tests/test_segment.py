"""Segmentation (train/segment.py, objectives/segmentation.py, configs/segment_landcoverai.py): the loss against
torch, class weights, gradient accumulation, the smoke config end to end with resume, plateau and early stop,
evaluation metrics, run folders and exported weights as a start, the step benchmark."""

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import REPO, losses_by_step

from jaxgeo import bridge, checkpoint, data, parallel
from jaxgeo.data import augment
from jaxgeo.evaluate import metrics
from jaxgeo.objectives import segmentation as objective
from jaxgeo.train import evaluation, loop, segment, writers

sys.path.insert(0, os.path.join(REPO, "configs"))
import segment_landcoverai  # noqa: E402


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  return tmp_path_factory.mktemp("synthetic_landcoverai")


def seg_config(synthetic_dir, **overrides):
  """The smoke config on the module's synthetic LandCover.ai; overrides as {"eval.patience": 3, ...}."""
  config = segment_landcoverai.get_config("smoke")
  config.data.synthetic_dir = str(synthetic_dir)
  for key, value in overrides.items():
    section, name = key.rsplit(".", 1)
    setattr(functools.reduce(getattr, section.split("."), config), name, value)
  config.lock()
  return config


def make_task(config, mesh=None, source=None):
  source = source or data.build_source(config.data, "train")
  mean, std = source.norm_stats["image"]
  mesh = mesh or parallel.make_mesh(config.mesh)
  task = segment.make_task(
    config, steps_per_epoch=7, total_steps=14, in_chans=3, mean=mean, std=std, mesh=mesh, source=source
  )
  return task, source


@pytest.fixture(scope="module")
def smoke_run(synthetic, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("segment_smoke"))
  config = seg_config(synthetic)
  return config, workdir, loop.run(config, workdir, segment.make_task)


# ---------------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [255, 2])
def test_cross_entropy_equals_torch_with_weights_ignore_and_smoothing(ignore_index):
  rng = np.random.default_rng(0)
  logits = (3 * rng.standard_normal((2, 7, 6, 5))).astype(np.float32)
  targets = rng.integers(0, 5, (2, 7, 6))
  targets[0, :2] = ignore_index
  targets[1, 3, :4] = ignore_index
  weights = rng.uniform(0.2, 3.0, 5).astype(np.float32)
  for smoothing in (0.0, 0.1, 0.3):
    for w in (None, weights):
      torch_logits = torch.tensor(logits, requires_grad=True)
      expected = torch.nn.functional.cross_entropy(
        torch_logits.permute(0, 3, 1, 2),
        torch.tensor(targets),
        weight=None if w is None else torch.tensor(w),
        ignore_index=ignore_index,
        label_smoothing=smoothing,
      )
      expected.backward()
      loss = functools.partial(
        objective.cross_entropy, targets=jnp.asarray(targets), weights=w, ignore_index=ignore_index,
        label_smoothing=smoothing,
      )  # fmt: skip
      value, grad = jax.value_and_grad(loss)(jnp.asarray(logits))
      np.testing.assert_allclose(float(value), expected.item(), rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(np.asarray(grad), torch_logits.grad.numpy(), rtol=1e-5, atol=1e-7)
  # Smoothing with weights is not "weighted smoothed one-hot": the naive formula gives another number.
  probs = jax.nn.log_softmax(jnp.asarray(logits), -1)
  keep = targets != ignore_index
  safe = np.where(keep, targets, 0)
  soft = 0.9 * jax.nn.one_hot(safe, 5) + 0.1 / 5
  naive = -jnp.sum(weights[safe][..., None] * soft * probs * keep[..., None]) / jnp.sum(weights[safe] * keep)
  ours = objective.cross_entropy(
    jnp.asarray(logits), jnp.asarray(targets), weights=weights, ignore_index=ignore_index, label_smoothing=0.1
  )
  assert abs(float(naive) - float(ours)) > 1e-3
  # Nothing counted: torch gives NaN, we give 0 with a zero gradient (a no-op step, not a dropped one).
  grad = jax.grad(lambda x: objective.cross_entropy(x, jnp.full((2, 7, 6), 255), ignore_index=255))(logits)
  assert not np.any(np.asarray(grad))


def _torch_lovasz(probs, labels, ignore):
  """Berman et al.'s lovasz_softmax_flat (classes="present") from the paper: ignored pixels dropped first."""
  keep = labels != ignore
  probs, labels = probs[keep], labels[keep]
  losses = []
  for c in range(probs.shape[1]):
    fg = (labels == c).float()
    if fg.sum() == 0:
      continue
    errors = (fg - probs[:, c]).abs()
    errors_sorted, order = torch.sort(errors, descending=True)
    fg_sorted = fg[order]
    intersection = fg_sorted.sum() - fg_sorted.cumsum(0)
    union = fg_sorted.sum() + (1 - fg_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    losses.append(torch.dot(errors_sorted, jaccard))
  return torch.stack(losses).mean()


def test_lovasz_and_dice_terms():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 6, 5, 4)).astype(np.float32)
  targets = rng.integers(0, 3, (2, 6, 5))  # class 3 absent: "present" classes only
  targets[0, 0] = 255
  probs = torch.softmax(torch.tensor(logits), -1).reshape(-1, 4)
  expected = _torch_lovasz(probs, torch.tensor(targets).reshape(-1), 255)
  got = objective.lovasz_softmax(jnp.asarray(logits), jnp.asarray(targets), ignore_index=255)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
  # Dice by hand over the counted pixels, classes 0..2 present.
  keep = (targets != 255).reshape(-1)
  p = probs.numpy()[keep]
  g = np.eye(4)[targets.reshape(-1)[keep]]
  dice = (2 * (p * g).sum(0) + 1) / (p.sum(0) + g.sum(0) + 1)
  got = objective.dice_loss(jnp.asarray(logits), jnp.asarray(targets), ignore_index=255)
  np.testing.assert_allclose(float(got), 1 - dice[:3].mean(), rtol=1e-5)


def test_class_weights_from_masks(synthetic):
  counts = np.array([600, 300, 100, 0])
  np.testing.assert_allclose(objective.class_weights(counts, "inverse"), [1000 / 1800, 1000 / 900, 1000 / 300, 0.0])
  enet = [1 / np.log(1.02 + 0.6), 1 / np.log(1.02 + 0.3), 1 / np.log(1.02 + 0.1), 1 / np.log(1.02)]
  np.testing.assert_allclose(objective.class_weights(counts, "enet"), enet)
  assert list(objective.class_weights(counts, "none")) == [1, 1, 1, 1]
  with pytest.raises(ValueError, match="config.loss.weighting"):
    objective.class_weights(counts, "balanced")
  # The pass over a real split's masks: every labelled pixel of every tile, ignore_index left out.
  config = seg_config(synthetic)
  source = data.build_source(config.data, "train")
  masks = np.stack([source[i]["mask"] for i in range(len(source))])
  masks[0, :4] = 255
  source.read_mask = lambda i: masks[i]
  counts = segment.class_pixel_counts(source, 5, ignore_index=255, workers=2)
  assert counts.sum() == masks.size - 4 * masks.shape[2]
  np.testing.assert_array_equal(counts, [(masks == c).sum() for c in range(5)])


# ---------------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_one_step_on_the_doubled_batch(synthetic):
  """Two smoke steps of 16 tiles (optim.accumulate=2) == one plain Adam step on the 32 tiles, whose loss is the
  mean of the two halves' (torch's loss / accumulation_steps), with each half's views and drop-path draws."""
  config = seg_config(synthetic)
  assert config.optim.accumulate == 2
  task, _ = make_task(config)
  _, dataset = loop.make_input(config, "train")
  iterator = iter(dataset)
  halves = [next(iterator), next(iterator)]
  # Initialised and jitted exactly as train/loop.py does: the smoke run's compiled programs are reused.
  mesh, init = parallel.make_mesh(config.mesh), loop.with_loop_fields(task.init)
  shardings = parallel.tree_shardings(jax.eval_shape(init, jax.random.PRNGKey(0)), config.sharding_rules, mesh)
  state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
  initial = jax.device_get(state)
  batch_shardings = {k: parallel.batch_sharding(mesh, np.ndim(v)) for k, v in halves[0].items()}
  step = jax.jit(
    loop._carry_loop_fields(task.step),  # pylint: disable=protected-access
    in_shardings=(shardings, batch_shardings),
    out_shardings=(shardings, parallel.replicated(mesh)),
    donate_argnums=0,
  )
  state, _ = step(state, parallel.host_to_global(halves[0], mesh))
  after_one = jax.device_get(state)
  for a, b in zip(jax.tree.leaves(after_one["params"]), jax.tree.leaves(initial["params"])):
    np.testing.assert_array_equal(a, b)  # the first half only accumulates
  state, step_metrics = step(state, parallel.host_to_global(halves[1], mesh))
  after_two = jax.device_get(state)

  model = segment.build_model(config.model, 3, 5)

  @jax.jit
  def half_gradient(params, half, index):
    """The gradient of one half's loss as its step saw it: the same views, the same drop-path draws."""
    aug_rng, drop_rng = jax.random.split(jax.random.fold_in(initial["rng"], index))
    views, masks = augment.segmentation_views(aug_rng, half["image"], half["mask"], config.aug, 32, 255)
    images = segment.normalize(views, initial["input_stats"])
    loss = lambda p: objective.cross_entropy(
      model.apply({"params": p}, images, train=True, rngs={"drop_path": drop_rng}),
      masks,
      ignore_index=255,
      label_smoothing=0.1,
    )
    return jax.grad(loss)(params)

  halves = [{k: v for k, v in half.items() if k in ("image", "mask")} for half in halves]
  grads = [half_gradient(initial["params"], half, index) for index, half in enumerate(halves)]
  grads = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  adam = optax.adam(config.optim.lr)
  updates, _ = adam.update(grads, adam.init(initial["params"]), initial["params"])
  expected = optax.apply_updates(initial["params"], updates)
  moved = 0
  for got, want, before in zip(*(jax.tree.leaves(t) for t in (after_two["params"], expected, initial["params"]))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    moved += int(np.any(got != before))
  assert moved > len(jax.tree.leaves(expected)) // 2 and bool(step_metrics["finite"])
  assert int(after_two["opt_state"].mini_step) == 0 and int(after_two["opt_state"].gradient_step) == 1


def test_config_errors_name_the_field(synthetic):
  with pytest.raises(ValueError, match=r"config.aug.size=30: expected a positive multiple of the Swin patch size"):
    make_task(seg_config(synthetic, **{"aug.size": 30}))
  with pytest.raises(ValueError, match="config.model.num_classes=3 but data.class_names give 5"):
    make_task(seg_config(synthetic, **{"model.num_classes": 3}))
  with pytest.raises(ValueError, match="config.optim.name='sgd'"):
    make_task(seg_config(synthetic, **{"optim.name": "sgd"}))
  classification = types.SimpleNamespace(
    label_kind="multilabel", class_names=("a", "b"), norm_stats={"image": ((0,), (1,))}
  )
  with pytest.raises(ValueError, match="needs a segmentation dataset"):
    make_task(seg_config(synthetic), source=classification)


# ---------------------------------------------------------------------------------------------------------------
# The shared loop
# ---------------------------------------------------------------------------------------------------------------


def test_smoke_trains_evaluates_and_reports(smoke_run):
  config, workdir, status = smoke_run
  assert status == "done"
  rows = losses_by_step(workdir)
  assert sorted(rows) == list(range(1, 15)) and all(np.isfinite(rows[s]["loss"]) for s in rows)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  test = results["test"]
  for key in ("iou_macro", "iou_micro", "iou_per_class", "f1_macro", "precision_macro", "recall_macro",
              "pixel_accuracy", "confusion", "ce", "majority_iou_macro", "majority_pixel_accuracy"):  # fmt: skip
    assert key in test, key
  assert test["num_samples"] == len(data.build_source(config.data, "test")) and len(test["iou_per_class"]) == 5
  assert results["metric"] == "iou_macro" and results["selected_step"] in (7, 14)
  assert sum(map(sum, test["confusion"])) == test["num_pixels"] == test["num_samples"] * 32 * 32
  assert os.listdir(os.path.join(workdir, "best")) and results["validation"]["iou_macro"] is not None
  for folder in ("test", "eval/step_0000007", "eval/step_0000014"):
    for picture in ("confusion.png", "iou_per_class.png", "predictions.png"):
      assert os.path.getsize(os.path.join(workdir, folder, picture)) > 1000, (folder, picture)
  # Stored with the run: the class weights of the train masks (ENet) and the input statistics.
  state = checkpoint.load_state(workdir)
  source = data.build_source(config.data, "train")
  counts = np.bincount(np.concatenate([source.read_mask(i).ravel() for i in range(len(source))]), minlength=5)
  np.testing.assert_allclose(state["class_weights"], objective.class_weights(counts, "enet"), rtol=1e-6)
  np.testing.assert_allclose(state["input_stats"]["mean"], data.IMAGENET_MEAN, rtol=1e-6)
  assert set(state["params"]) == {"backbone", "fpn", "head"} and int(state["step"]) == 14
  assert os.path.exists(os.path.join(workdir, "loss.png"))


def test_resume_gives_identical_losses_and_state(smoke_run, tmp_path):
  config, workdir, _ = smoke_run
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  ckpt_dir = resumed / "checkpoints"
  saved = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  start = min(s for s in saved if s % 2)  # an odd step: half an accumulation is in the state
  assert int(checkpoint.load_state(str(resumed), start)["opt_state"]["mini_step"]) == 1
  for step in saved:
    if step > start:
      shutil.rmtree(ckpt_dir / str(step))
  for name in ("metrics.jsonl", "results.json"):
    os.remove(resumed / name)
  # A best checkpoint newer than the resumed step belongs to the steps trained again: the loop sets it aside.
  newer = [int(d) for d in os.listdir(resumed / "best") if d.isdigit() and int(d) > start]
  assert loop.run(config, str(resumed), segment.make_task) == "done"
  set_aside = os.listdir(resumed / checkpoint.SET_ASIDE) if newer else []
  assert all(any(name.startswith(f"best-{step}-") for name in set_aside) for step in newer)
  original, again = losses_by_step(workdir), losses_by_step(str(resumed))
  redone = [s for s in sorted(again) if s > start]
  assert redone == list(range(start + 1, 15))
  for step in redone:
    assert again[step]["loss"] == original[step]["loss"], step
  for a, b in zip(jax.tree.leaves(checkpoint.load_state(workdir)), jax.tree.leaves(checkpoint.load_state(resumed))):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(workdir, "results.json")) as f, open(resumed / "results.json") as g:
    assert json.load(f)["test"] == json.load(g)["test"]


def test_plateau_lowers_the_learning_rate_and_early_stopping_ends_the_run(synthetic, tmp_path):
  """Evaluate every step; no evaluation counts as better (relative gain of 100x for the plateau, +1 mIoU for
  early stopping): the learning rate halves after each evaluation from the second, the run stops at the 3rd."""
  config = seg_config(synthetic, **{
    "eval.every": 1, "eval.patience": 2, "eval.min_delta": 1.0, "eval.plateau.factor": 0.5,
    "eval.plateau.patience": 0, "eval.plateau.threshold": 100.0, "eval.test_split": "", "train.steps": 10})  # fmt: skip
  workdir = str(tmp_path / "plateau")
  assert loop.run(config, workdir, segment.make_task) == "early_stopped"
  state = checkpoint.load_state(workdir)
  assert int(state["step"]) == 3 and float(state["lr_scale"]) == 0.25
  rows = {}
  for row in writers.read_metrics(workdir):
    rows.setdefault(row["step"], {}).update(row)
  assert [rows[s]["lr_scale"] for s in (1, 2, 3)] == [1.0, 0.5, 0.25]
  assert [rows[s]["lr"] for s in (1, 2, 3)] == pytest.approx([1e-3, 1e-3, 5e-4])
  assert os.listdir(os.path.join(workdir, "best")) == ["1"]  # the first evaluation stayed the best


def test_eval_step_metrics_equal_numpy_confusion(smoke_run):
  """Confusion counted on the device (padding rows, ignore_index) -> summarize == segmentation_report of a
  numpy confusion matrix of the same predictions."""
  config, workdir, _ = smoke_run
  task, _ = make_task(config)
  state = checkpoint.load_state(workdir)
  eval_step = jax.jit(task.eval_step)
  runner = evaluation.Evaluator(config, task, parallel.make_mesh(config.mesh), None, loop.make_input)
  totals, numpy_confusion, batches = None, np.zeros((5, 5), np.int64), list(runner.batches("validation"))
  assert not batches[-1]["valid"].all()  # 28 tiles: the last batch of 16 has padding rows
  for batch in batches:
    batch = dict(batch, mask=batch["mask"].copy())
    batch["mask"][:, :3] = 255  # unlabelled strips
    out = jax.device_get(eval_step(state, batch))
    sums = jax.tree.map(lambda x: np.asarray(x).astype(np.int64 if x.dtype.kind in "iu" else x.dtype), out["sums"])
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    keep = batch["valid"][:, None, None] & (batch["mask"] != 255)
    np.add.at(numpy_confusion, (batch["mask"][keep], out["preview"]["prediction"][keep]), 1)
  summary = task.summarize({}, totals)
  expected = metrics.segmentation_report(numpy_confusion, summary["class_names"], 255)
  assert summary["num_pixels"] == numpy_confusion.sum() == 28 * 29 * 32
  for key, value in expected.items():
    if key == "confusion":
      assert summary[key] == value
    else:
      assert metrics.jsonable(summary[key]) == pytest.approx(metrics.jsonable(value), nan_ok=True), key
  assert summary["majority_class"] == summary["class_names"][int(np.argmax(numpy_confusion.sum(1)))]


def test_run_folder_and_exported_weights_start_training(smoke_run, tmp_path):
  """load_run + predict_logits reproduce the best checkpoint's validation mIoU; a run folder and a
  torchvision-named export both land in a new run's params, with the input scaling asked for."""
  config, workdir, _ = smoke_run
  model, params, info = segment.load_run(workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert info["step"] == results["selected_step"] and info["class_names"][1] == "building"
  source = data.build_source(config.data, "validation")
  images = np.stack([source[i]["image"] for i in range(len(source))])
  masks = np.stack([source[i]["mask"] for i in range(len(source))])
  logits = jax.jit(functools.partial(segment.predict_logits, model))(params, images, info["input_stats"])
  confusion = metrics.confusion_result(metrics.pixel_confusion(jnp.argmax(logits, -1), masks, 5))
  report = metrics.segmentation_report(confusion, info["class_names"])
  assert report["iou_macro"] == pytest.approx(results["validation"]["iou_macro"], rel=1e-6)

  task, _ = make_task(seg_config(tmp_path, **{"init.checkpoint": workdir, "loss.weighting": "none"}), source=source)
  fresh = jax.tree.map(np.zeros_like, checkpoint.load_state(workdir))  # a state of the right shapes, no compile
  started = task.import_pretrained(fresh)
  for a, b in zip(jax.tree.leaves(started["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(started["class_weights"], np.zeros(5))  # loss.weighting "none": left alone
  np.testing.assert_array_equal(started["input_stats"]["std"], info["input_stats"]["std"])  # "auto": the run's

  path = str(tmp_path / "segmentation.pth")
  bridge.save_state_dict(bridge.segmentation_to_torch(params, window_size=2), path)
  overrides = {"init.checkpoint": path, "model.input_scaling": "unit", "loss.weighting": "inverse"}
  task, _ = make_task(seg_config(tmp_path, **overrides), source=source)
  started = task.import_pretrained(fresh)
  for a, b in zip(jax.tree.leaves(started["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(started["input_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(started["input_stats"]["std"], np.ones(3))
  counts = np.bincount(masks.ravel(), minlength=5)
  np.testing.assert_allclose(started["class_weights"], objective.class_weights(counts, "inverse"), rtol=1e-6)


def test_step_benchmark_smoke_writes_json(tmp_path):
  out = tmp_path / "segment_step.json"
  result = subprocess.run(
    [sys.executable, os.path.join(REPO, "benchmarks", "segment_step.py"), "--smoke", f"--out={out}",
     "--variants=torch_eager,torch_compiled,jaxgeo", "--warmup=1", "--steps=2"],
    cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "NO GPU" in result.stdout and "flops_per_step = " in result.stdout
  report = json.loads(out.read_text())
  assert [r["variant"] for r in report["results"]] == ["torch_eager", "torch_compiled", "jaxgeo"]
  for row in report["results"]:
    assert "error" not in row, row
    assert row["global_batch"] == 8 and row["images_per_s"] > 0
    assert (
      row["compile_s"] > 0 if row["variant"].startswith("jaxgeo") else math.isfinite(row["compile_s"])
    )  # torch: noisy
    assert row["step_time_s"]["min"] <= row["step_time_s"]["median"] <= row["step_time_s"]["max"]
    assert row["mfu"] is None
  assert set(report["ratios"]) == {"jaxgeo / torch_eager", "jaxgeo / torch_compiled"}
  assert report["model"]["depths"] == [2, 1, 1] and report["gpu_available"] is False
