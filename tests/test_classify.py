"""SEN12MS scene classification: the step against PyTorch (loss, Adam's L2, StepLR, BatchNorm), keep-best and early
stopping on a scripted metric, the smoke config end to end, the seed's PyTorch classifiers, the results table."""

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import REPO
from torch import nn
from torch_reference import ResNet50, randomize

from jaxgeo import bridge, checkpoint
from jaxgeo.data import sen12ms
from jaxgeo.evaluate import table
from jaxgeo.train import classifier_weights, classify, loop

sys.path.insert(0, os.path.join(REPO, "configs"))
import classify_sen12ms  # noqa: E402
import moco_sen12ms  # noqa: E402

CLASSES = sen12ms.CLASSES_10


def smoke_config(synthetic_dir, **fields):
  config = classify_sen12ms.get_config("smoke")
  config.data.synthetic_dir = str(synthetic_dir)
  for dotted, value in fields.items():
    section, key = dotted.split("__")
    config[section][key] = value
  config.lock()
  return config


def tiny_config():
  """The smoke config with a one-stage ResNet: what the unit tests compile (a quarter of the smoke's layers)."""
  config = classify_sen12ms.get_config("smoke")
  config.model.stages = (1,)
  return config


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("synthetic_sen12ms_classify")


@pytest.fixture(scope="module")
def smoke_run(synthetic_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("classify_smoke"))
  config = smoke_config(synthetic_dir)
  return config, workdir, loop.run(config, workdir, classify.make_task)


@pytest.fixture(scope="module")
def moco_run(synthetic_dir, tmp_path_factory):
  """configs/moco_sen12ms.py:smoke as it is (sensor pairs, S1 and S2 adapters): a run to start from. Unchanged, so
  its compiled programs are shared with the MoCo tests through the persistent compilation cache."""
  from jaxgeo.train import moco

  config = moco_sen12ms.get_config("smoke")
  config.data.synthetic_dir = str(synthetic_dir)
  config.lock()
  workdir = str(tmp_path_factory.mktemp("moco_smoke"))
  assert loop.run(config, workdir, moco.make_task) == "done"
  return workdir


# ---------------------------------------------------------------- PyTorch references


class TorchResNet(ResNet50):
  """torchvision-named ResNet (v1.5 bottlenecks), any width and depth, with a linear fc; NCHW."""

  def __init__(self, in_chans, num_classes, width=8, stages=(1, 1, 1, 1)):
    super().__init__(in_chans, num_classes, width, stages)
    self.feature_dim = self.fc.in_features


class SeedClassifier(nn.Module):
  """The seed's models/ResNet.py layout (ResNet50 / ResNet50_1x1): conv1 (and Conv1x1Block) registered both on
  their own and inside the `encoder` Sequential, the head named FC; small width and depth for the test."""

  def __init__(self, n_inputs, num_classes, adapter, width=8, stages=(1, 1, 1, 1)):
    super().__init__()
    base = TorchResNet(3 if adapter else n_inputs, num_classes, width, stages)
    modules = []
    if adapter:
      self.Conv1x1Block = nn.Sequential(nn.Conv2d(n_inputs, 3, 1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
      modules.append(self.Conv1x1Block)
    self.conv1 = base.conv1
    modules += [self.conv1, base.bn1, nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    modules += [getattr(base, f"layer{s}") for s in range(1, len(stages) + 1)] + [nn.AdaptiveAvgPool2d((1, 1))]
    self.encoder = nn.Sequential(*modules)
    self.FC = nn.Linear(base.feature_dim, num_classes)

  def forward(self, x):
    return self.FC(self.encoder(x).flatten(1))


def _source(label_type, bands):
  return types.SimpleNamespace(
    name="sen12ms", label_kind=sen12ms.LABEL_TYPES[label_type], class_names=CLASSES, bands=tuple(bands)
  )


def _task(config, label_type, bands, steps_per_epoch=1):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  zeros, ones = (0.0,) * len(bands), (1.0,) * len(bands)
  return classify.make_task(
    config,
    steps_per_epoch=steps_per_epoch,
    total_steps=10,
    in_chans=len(bands),
    mean=zeros,
    std=ones,
    mesh=mesh,
    source=_source(label_type, bands),
  )


def _jitted_step(task):
  """task.step as the loop runs it: the loop's own state fields ("lr_scale") pass through."""

  def step(state, batch):
    new, metrics = task.step(state, batch)
    return dict(new, lr_scale=state["lr_scale"]), metrics

  return jax.jit(step)


def _torch_state(variables):
  return {k: torch.from_numpy(np.array(v)) for k, v in bridge.to_torch_state_dict(variables).items()}


# ---------------------------------------------------------------- the step vs PyTorch


@pytest.mark.parametrize("label_type", ["multi", "single"])
def test_loss_matches_torch(label_type):
  """BCEWithLogitsLoss (mean over samples and classes) / CrossEntropyLoss (mean over samples); rows marked invalid
  (padding, replaced bad samples) take no part."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 10)).astype(np.float32) * 3
  if label_type == "multi":
    labels = (rng.random((6, 10)) < 0.3).astype(np.float32)
    want = nn.BCEWithLogitsLoss()(torch.from_numpy(logits[:4]), torch.from_numpy(labels[:4]))
  else:
    labels = rng.integers(0, 10, 6).astype(np.int32)
    want = nn.CrossEntropyLoss()(torch.from_numpy(logits[:4]), torch.from_numpy(labels[:4]).long())
  valid = np.array([True] * 4 + [False] * 2)
  got = classify.classification_loss(jnp.asarray(logits), jnp.asarray(labels), valid, label_type == "multi")
  np.testing.assert_allclose(float(got), want.item(), rtol=1e-6)


def test_step_matches_torch_adam_with_l2_and_steplr():
  """Three steps against torch: CrossEntropy, Adam(weight_decay) (L2 in the gradient: its moments
  see wd * param), StepLR, train-mode BatchNorm and its running statistics; then a non-finite batch leaves the
  state untouched.

  Adam moves a parameter by about lr * sign(gradient), so an entry whose gradient is float noise (|g| ~ 1e-7, e.g.
  a BatchNorm bias at 0) moves by +-lr depending on summation order. Each step therefore starts both sides from
  the same weights and Adam moments (torch is synced to ours), and such entries may differ: at most by 2 lr and in
  a handful of places. A coupled-vs-decoupled decay or a wrong bias correction moves most entries."""
  lr, wd, label_type = 3e-3, 0.05, "single"
  config = tiny_config()
  config.optim.lr, config.optim.weight_decay = lr, wd  # a weight decay large enough to matter
  config.optim.lr_step_size, config.optim.lr_step_gamma = 1, 0.5  # lr halves every epoch (= every step here)
  bands = sen12ms.BAND_SETS["s1s2"]
  task = _task(config, label_type, bands)
  state = dict(task.init(jax.random.key(0)), lr_scale=jnp.float32(1.0))
  net = TorchResNet(len(bands), len(CLASSES), config.model.width, config.model.stages)
  net.load_state_dict(_torch_state({"params": state["params"], "batch_stats": state["batch_stats"]}))
  optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=wd)
  scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
  loss_fn = nn.CrossEntropyLoss()
  rng = np.random.default_rng(0)
  step = _jitted_step(task)
  for index in range(3):
    images = rng.normal(size=(8, 32, 32, len(bands))).astype(np.float32)
    labels = rng.integers(0, len(CLASSES), 8).astype(np.int32)
    batch = {"image": images, "labels": labels, "valid": np.ones(8, bool), "num_skipped": np.zeros(8, np.int32)}
    state, metrics = step(state, batch)
    net.train()
    loss = loss_fn(net(torch.from_numpy(images).permute(0, 3, 1, 2)), torch.from_numpy(labels).long())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
    assert bool(metrics["finite"]) and float(metrics["lr"]) == pytest.approx(lr * 0.5**index)
    ours = bridge.to_torch_state_dict({"params": state["params"], "batch_stats": state["batch_stats"]})
    adam = state["opt_state"][1]
    moments = {"exp_avg": bridge.to_torch_state_dict(adam.mu), "exp_avg_sq": bridge.to_torch_state_dict(adam.nu)}
    differing, total = 0, 0
    for name, value in net.state_dict().items():
      if name.endswith("num_batches_tracked"):
        continue
      if "running" in name:
        np.testing.assert_allclose(ours[name], value.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)
        continue
      diff = np.abs(ours[name] - value.numpy())
      assert diff.max() <= 2.05 * lr * 0.5**index, name
      differing, total = differing + int(np.sum(diff > 1e-6)), total + diff.size
      for key, theirs in moments.items():
        np.testing.assert_allclose(theirs[name], optimizer.state[net.get_parameter(name)][key], atol=1e-5, rtol=1e-3)
    assert differing <= 2e-3 * total, (index, differing, total)
    # Sync torch to our weights and moments, so the next step compares one step again.
    net.load_state_dict(_torch_state({"params": state["params"], "batch_stats": state["batch_stats"]}))
    for key, tree in moments.items():
      for name, value in tree.items():
        optimizer.state[net.get_parameter(name)][key].copy_(torch.from_numpy(np.array(value)))
    assert all(float(s["step"]) == index + 1 for s in optimizer.state.values())
    assert int(adam.count) == index + 1

  before = jax.device_get(state)
  batch["image"][0, 0, 0, 0] = np.nan
  after, metrics = step(state, batch)
  assert not bool(metrics["finite"]) and int(after["step"]) == int(before["step"]) + 1
  for a, b in zip(
    jax.tree.leaves(jax.device_get({k: after[k] for k in ("params", "batch_stats", "opt_state")})),
    jax.tree.leaves({k: before[k] for k in ("params", "batch_stats", "opt_state")}),
  ):
    np.testing.assert_array_equal(a, b)


def test_linear_mode_trains_only_the_head_with_frozen_batchnorm():
  config = tiny_config()
  config.classify.mode = "linear"
  task = _task(config, "single", sen12ms.BAND_SETS["s2"])
  state = dict(task.init(jax.random.key(1)), lr_scale=jnp.float32(1.0))
  assert set(state["opt_state"][1].mu) == {"fc"}  # Adam state for the head only
  assert float(np.std(state["params"]["fc"]["kernel"])) == pytest.approx(0.01, rel=0.1)
  assert not np.any(state["params"]["fc"]["bias"])
  rng = np.random.default_rng(1)
  batch = {
    "image": rng.normal(size=(8, 32, 32, 10)).astype(np.float32) * 3 + 1,
    "labels": rng.integers(0, 10, 8).astype(np.int32),
    "valid": np.ones(8, bool),
    "num_skipped": np.zeros(8, np.int32),
  }
  new, _ = _jitted_step(task)(state, batch)
  for key in ("params", "batch_stats"):
    for path, value in jax.tree_util.tree_leaves_with_path(state[key]):
      moved = not np.array_equal(value, _at(new[key], path))
      assert moved == (key == "params" and path[0].key == "fc"), (key, path)


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_seed_init_is_kaiming_normal_fan_in():
  config = tiny_config()
  config.classify.model = "adapter"
  model = classify.build_model(config, 10)
  variables = classify.seed_init(model, 12, jax.random.key(3))
  params = variables["params"]
  flax_init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 12)))
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, flax_init)
  for path in (("layer1_0", "conv2"), ("conv1",), ("adapter_conv",), ("fc",)):
    kernel = np.asarray(
      _at(params, [types.SimpleNamespace(key=k) for k in path] + [types.SimpleNamespace(key="kernel")])
    )
    fan_in = np.prod(kernel.shape[:-1])
    assert np.std(kernel) == pytest.approx(np.sqrt(2 / fan_in), rel=max(0.1, 4 / np.sqrt(2 * kernel.size))), path
  bound = 1 / np.sqrt(params["fc"]["kernel"].shape[0])
  assert np.all(np.abs(params["fc"]["bias"]) <= bound) and np.std(params["fc"]["bias"]) > bound / 4
  assert np.all(params["bn1"]["scale"] == 1) and np.all(params["bn1"]["bias"] == 0)
  assert np.all(variables["batch_stats"]["adapter_bn"]["var"] == 1) and not np.any(
    variables["batch_stats"]["bn1"]["mean"]
  )
  kernels = [np.asarray(x).ravel()[:50] for x in jax.tree.leaves(params) if np.ndim(x) > 1]
  assert len({tuple(np.round(k / np.std(k), 5)) for k in kernels}) == len(kernels)  # no two kernels share draws


def test_config_errors_name_the_field():
  config = classify_sen12ms.get_config("smoke")
  config.classify.model = "resnet"
  with pytest.raises(ValueError, match="classify.model"):
    classify.check_config(config)
  config = classify_sen12ms.get_config("smoke")
  config.init.workdir, config.init.checkpoint = "/runs/moco", "/w.pth"
  with pytest.raises(ValueError, match="not both"):
    classify.check_config(config)
  with pytest.raises(ValueError, match="unknown variant"):
    classify_sen12ms.get_config("tiny")


def test_fit_bands_carries_weights_by_band_name():
  kernel = np.arange(10 * 3, dtype=np.float32).reshape(1, 1, 10, 3)
  s1s2 = sen12ms.BAND_SETS["s1s2"]
  fitted = classifier_weights.fit_bands(kernel, sen12ms.SEED_S2_BANDS, s1s2, "test")
  np.testing.assert_array_equal(fitted[:, :, :10], kernel)
  assert not np.any(fitted[:, :, 10:])  # VV, VH are new: zero weight
  picked = classifier_weights.fit_bands(kernel, sen12ms.SEED_S2_BANDS, ("B04", "B03", "B02"), "test")
  np.testing.assert_array_equal(picked[0, 0], kernel[0, 0, [2, 1, 0]])
  with pytest.raises(ValueError, match="none of"):
    classifier_weights.fit_bands(kernel, sen12ms.SEED_S2_BANDS, sen12ms.S1_BANDS, "test")


# ---------------------------------------------------------------- the seed's PyTorch classifiers


@pytest.mark.parametrize(("adapter", "sensor"), [(False, "s2"), (True, "s1s2")])
def test_seed_pytorch_classifier_loads_and_predicts_the_same(tmp_path, adapter, sensor):
  bands = sen12ms.BAND_SETS[sensor]
  config = tiny_config()
  net = SeedClassifier(len(bands), len(CLASSES), adapter, config.model.width, config.model.stages)
  calibration = torch.randn(16, len(bands), 32, 32)
  randomize(net, seed=0, calibration_images=calibration)
  path = tmp_path / "seed_model_best.pth"
  torch.save(
    {
      "epoch": 7,
      "arch": "Supervised",
      "model_state_dict": net.state_dict(),
      "optimizer_state_dict": {},
      "best_prec": 0.5,
    },
    path,
  )
  config.classify.model = "adapter" if adapter else "supervised"
  config.init.checkpoint = str(path)
  task = _task(config, "single", bands)
  state = task.import_pretrained(dict(task.init(jax.random.key(0)), lr_scale=jnp.float32(1.0)))
  model = classify.build_model(config, len(CLASSES))
  images = torch.randn(4, len(bands), 32, 32)
  logits = model.apply(
    {"params": state["params"], "batch_stats": state["batch_stats"]}, images.permute(0, 2, 3, 1).numpy()
  )
  with torch.no_grad():
    want = net.eval()(images).numpy()
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)

  config.model.width = 8  # the wrong architecture is refused, naming the fields to set
  wide = _task(config, "single", bands)
  fresh = wide.init(jax.random.key(0))
  with pytest.raises(ValueError, match="config.model.stages"):
    wide.import_pretrained(fresh)


def _features(config, variables, images_nchw):
  model = classify.build_model(config, len(CLASSES))
  _, features = model.apply(variables, images_nchw.permute(0, 2, 3, 1).numpy(), return_features=True)
  return np.asarray(features["pooled"])


def test_ssl4eo_13_band_resnet_reads_the_seed_s2_bands_by_name(tmp_path):
  """An SSL4EO-S12-style torchvision ResNet with a 13-band L1C conv1 (B01..B12, B8A): the seed's 10 S2 bands are
  picked by name, so the features equal the torch model's on the same bands with B01, B09, B10 at zero."""
  config = tiny_config()
  net = randomize(TorchResNet(13, 1000, config.model.width, config.model.stages), 1, torch.randn(8, 13, 32, 32))
  path = tmp_path / "ssl4eo_like.pth"
  torch.save(net.state_dict(), path)
  fresh = classify.seed_init(classify.build_model(config, len(CLASSES)), 10, jax.random.key(0))
  variables = classifier_weights.fit(classifier_weights.read_torch_checkpoint(str(path)), fresh, sen12ms.SEED_S2_BANDS)
  _assert_same(variables["params"]["fc"], fresh["params"]["fc"])  # an ImageNet-style head is not carried over
  images = torch.randn(2, 13, 32, 32)
  dropped = [sen12ms.S2_BANDS.index(b) for b in ("B01", "B09", "B10")]
  images[:, dropped] = 0
  kept = [sen12ms.S2_BANDS.index(b) for b in sen12ms.SEED_S2_BANDS]
  with torch.no_grad():
    want = net.eval().features(images).numpy()
  np.testing.assert_allclose(_features(config, variables, images[:, kept]), want, atol=1e-4, rtol=1e-4)


def test_seed_openselfsup_moco_checkpoint_gives_moco_1x1(tmp_path):
  """The seed's OpenSelfSup MOCO file (backbone.* = encoder_q.0.*, neck, encoder_k, input_module_q / _k, queue):
  Moco_1x1 on S2 is its S2 query adapter in front of its query backbone, exactly; on S1, its S1 key adapter."""
  config = tiny_config()
  config.classify.model = "adapter"
  width, stages = config.model.width, config.model.stages
  query = randomize(TorchResNet(3, 8, width, stages), 2, torch.randn(8, 3, 32, 32))
  adapters = {}
  for name, count in (("q", 10), ("k", 2)):
    block = nn.Sequential(nn.Conv2d(count, 3, 1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
    adapters[name] = randomize(block, 3, torch.randn(8, count, 32, 32))
  state = {}
  for key, value in query.state_dict().items():
    if not key.startswith("fc."):
      state[f"backbone.{key}"] = state[f"encoder_q.0.{key}"] = state[f"encoder_k.0.{key}"] = value
  for side in ("q", "k"):
    state[f"encoder_{side}.1.mlp.0.weight"], state[f"encoder_{side}.1.mlp.0.bias"] = (
      torch.randn(16, query.feature_dim),
      torch.zeros(16),
    )
    state[f"encoder_{side}.1.mlp.2.weight"], state[f"encoder_{side}.1.mlp.2.bias"] = torch.randn(8, 16), torch.zeros(8)
    state.update({f"input_module_{side}.net.{k}": v for k, v in adapters[side].state_dict().items()})
  state["queue"], state["queue_ptr"] = torch.randn(8, 32), torch.zeros(1, dtype=torch.long)
  path = tmp_path / "openselfsup_moco.pth"
  torch.save({"meta": {}, "state_dict": state}, path)
  pretrained = classifier_weights.read_torch_checkpoint(str(path))
  for sensor, side in (("s2", "q"), ("s1", "k")):
    bands = sen12ms.BAND_SETS[sensor]
    fresh = classify.seed_init(classify.build_model(config, len(CLASSES)), len(bands), jax.random.key(0))
    variables = classifier_weights.fit(pretrained, fresh, bands)
    images = torch.randn(2, len(bands), 32, 32)
    with torch.no_grad():
      want = query.eval().features(adapters[side].eval()(images)).numpy()
    np.testing.assert_allclose(_features(config, variables, images), want, atol=1e-4, rtol=1e-4, err_msg=sensor)


# ---------------------------------------------------------------- the shared loop


def test_smoke_run_end_to_end(smoke_run):
  config, workdir, status = smoke_run
  assert status == "done"
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  test = results["test"]
  assert test["num_samples"] == len(loop.data.build_source(config.data, "test")) > 0
  for key in ("oa_multi", "f1_micro", "f1_macro", "precision_micro", "recall_micro", "ap_macro", "loss"):
    assert isinstance(test[key], float) and np.isfinite(test[key]), key
  assert len(test["f1_per_class"]) == len(CLASSES)
  assert results["metric"] == "f1_micro" and results["selection"] == "validation"
  best = results["validation"]["f1_micro"]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  validation = {r["step"]: r["validation_f1_micro"] for r in rows if "validation_f1_micro" in r}
  assert len(validation) == config.train.epochs  # every epoch
  assert best == pytest.approx(max(validation.values())) and validation[results["selected_step"]] == pytest.approx(best)
  assert os.path.isfile(os.path.join(workdir, "test", "per_class_f1.png"))
  assert checkpoint.load_state(workdir)["batch_stats"]["bn1"]["var"].shape == (config.model.width,)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_single_label_summary_and_pictures(tmp_path):
  """summarize on gathered rows: OA, AA over the classes present, the seed's AA over all classes, the loss; and
  the confusion matrix and per-class accuracy pictures."""
  from sklearn.metrics import accuracy_score, balanced_accuracy_score

  task = _task(tiny_config(), "single", sen12ms.BAND_SETS["s2"])
  rng = np.random.default_rng(5)
  labels = rng.choice([0, 1, 2, 5, 9], size=40).astype(np.int32)  # 5 of the 10 classes present
  scores = rng.dirichlet(np.ones(10), size=40).astype(np.float32)
  scores[np.arange(40)[:25], labels[:25]] += 1.0  # right on the first 25
  summary = task.summarize({"scores": scores, "labels": labels}, {"loss": np.float32(12.0), "count": np.float32(40)})
  predicted = scores.argmax(1)
  assert summary["oa"] == pytest.approx(accuracy_score(labels, predicted)) == summary["f1_micro"]
  assert summary["aa"] == pytest.approx(balanced_accuracy_score(labels, predicted))
  assert summary["aa_seed"] == pytest.approx(summary["aa"] * 5 / 10)  # absent classes count 0 in the seed's AA
  assert summary["loss"] == pytest.approx(0.3)
  task.report(summary, str(tmp_path), {})
  assert (tmp_path / "confusion.png").stat().st_size > 1000 and (tmp_path / "per_class_accuracy.png").is_file()


# ---------------------------------------------------------------- the table


def _fake_run(
  root, name, *, sensor, label_type, value, seed=0, model="supervised", init=None, adapter="pretrained", epochs=100
):
  run = root / name
  run.mkdir()
  metric = "aa" if label_type == "single" else "oa_multi"
  config = {
    "method": "classify",
    "seed": seed,
    "data": {
      "dataset": "sen12ms",
      "root": "/data/SEN12MS",
      "sensor": sensor,
      "label_type": label_type,
      "label_scheme": 10,
      "threshold": 0.1,
      "train_list": "/splits/train_list_1024.pkl",
      "val_fraction": 0.2,
      "test_list": "/splits/test_list.pkl",
    },
    "classify": {"model": model, "mode": "finetune", "name": ""},
    "init": {"workdir": init, "checkpoint": None, "adapter": adapter},
    "eval": {"test_split": "test"},
    "train": {"epochs": epochs, "global_batch_size": 64},
  }
  (run / "config.json").write_text(json.dumps(config))
  summary = {metric: value, "f1_micro": value + 0.1, "num_samples": 18106}
  (run / "results.json").write_text(json.dumps({"selected_step": 12, "test": summary}))
  return str(run)


def test_table_from_fabricated_runs(tmp_path, capsys):
  moco = tmp_path / "moco_pairs"
  moco.mkdir()
  (moco / "config.json").write_text(json.dumps({"method": "moco", "moco": {"pairing": "sensor"}}))
  runs = [
    _fake_run(tmp_path, "sup_s1", sensor="s1", label_type="single", value=0.40),
    _fake_run(tmp_path, "sup_s2_a", sensor="s2", label_type="single", value=0.60, seed=0),
    _fake_run(tmp_path, "sup_s2_b", sensor="s2", label_type="single", value=0.62, seed=1),
    _fake_run(tmp_path, "moco_s2", sensor="s2", label_type="single", value=0.65, init=str(moco), model="adapter"),
    _fake_run(
      tmp_path,
      "rnd_s1s2",
      sensor="s1s2",
      label_type="single",
      value=0.5,
      init=str(moco),
      model="adapter",
      adapter="random",
    ),
    _fake_run(tmp_path, "sup_multi", sensor="s2", label_type="multi", value=0.55),
  ]
  out = tmp_path / "table"
  assert table.main([*runs, f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  assert "| Supervised | 0.4000 | 0.6100 ± 0.0141 (n=2) | – |" in printed
  assert "| Moco_1x1 · sensor pairs (moco_pairs) | – | 0.6500 | – |" in printed
  assert "| Moco_1x1RND · sensor pairs (moco_pairs) | – | – | 0.5000 |" in printed
  assert "Supervised / S2: seed 0: 0.6000, seed 1: 0.6200" in printed
  data = json.loads((out / "table.json").read_text())["tables"]
  assert [t["group"]["label_type"] for t in data] == ["single", "multi"]  # a table per label type
  single = data[0]
  assert single["columns"] == ["S1", "S2", "S1+S2"] and single["group"]["metric"] == "aa"
  cell = single["cells"]["Supervised"]["S2"]
  assert (
    cell["seeds"] == [0, 1] and cell["mean"] == pytest.approx(0.61) and cell["std"] == pytest.approx(0.0141421, 1e-4)
  )
  assert cell["metrics"]["f1_micro"] == pytest.approx(0.71)
  assert data[1]["cells"]["Supervised"]["S2"]["mean"] == 0.55 and data[1]["group"]["metric"] == "oa_multi"
  assert (out / "table_0.png").stat().st_size > 1000 and (out / "table_1.png").is_file()

  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  (unfinished / "config.json").write_text(json.dumps({"method": "classify", "data": {}}))
  assert table.main([str(unfinished)]) == 2
  assert "has not finished" in capsys.readouterr().err
  assert table.main([str(moco)]) == 2
  assert "config.method='moco'" in capsys.readouterr().err
  again = _fake_run(tmp_path, "sup_s2_again", sensor="s2", label_type="single", value=0.7, seed=1)
  assert table.main([runs[1], runs[2], again]) == 2  # seed 1 twice in one cell
  assert "both Supervised / S2 with seed 1" in capsys.readouterr().err
  longer = _fake_run(tmp_path, "sup_s2_long", sensor="s2", label_type="single", value=0.7, seed=2, epochs=300)
  assert table.main([runs[1], longer]) == 2  # another recipe in the same cell
  assert "train.epochs: 100 vs 300" in capsys.readouterr().err


def test_table_from_the_smoke_run(smoke_run, tmp_path):
  _, workdir, _ = smoke_run
  tables = table.build_tables([table.read_run(workdir)])
  with open(os.path.join(workdir, "results.json")) as f:
    want = json.load(f)["test"]["oa_multi"]
  assert tables[0]["cells"]["Supervised"]["S2"]["values"] == [want]
  paths = table.write(tables, str(tmp_path))
  assert "| Supervised | {:.4f} |".format(want) in open(paths[0]).read()


# ---------------------------------------------------------------- from a jaxgeo MoCo run


def _imported(pretrained, model, sensor, adapter="pretrained"):
  """(fresh variables, variables with the pretrained weights fitted in) of the smoke model on `sensor`."""
  config = classify_sen12ms.get_config("smoke")
  config.classify.model = model
  bands = sen12ms.BAND_SETS[sensor]
  fresh = classify.seed_init(classify.build_model(config, len(CLASSES)), len(bands), jax.random.key(0))
  fresh = jax.tree.map(np.asarray, fresh)
  return fresh, classifier_weights.fit(pretrained, fresh, bands, adapter_init=adapter)


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_weights_from_a_moco_run_fit_each_model_and_sensor(moco_run):
  """The seed's rows from one sensor-pair run: Moco_1x1 takes the adapter of the input's sensor (S2 or S1; for
  S1+S2 the S2 adapter, VV / VH at zero weight), Moco_1x1RND keeps its fresh adapter, Moco re-makes the 3-channel
  conv1 for the bands; the backbone and its BatchNorm statistics are the run's query encoder in every case."""
  from jaxgeo.bridge import common
  from jaxgeo.train import moco

  encoder = moco.load_query_encoder(moco_run)
  pretrained = classifier_weights.read_jaxgeo_run(moco_run)
  run = {
    g: {k: v for k, v in encoder["backbone"][g].items() if not k.startswith("fc")} for g in ("params", "batch_stats")
  }
  adapters = encoder["adapters"]
  assert sorted(adapters) == ["s1", "s2"]

  for sensor in ("s2", "s1"):
    _, state = _imported(pretrained, "adapter", sensor)
    for group in ("params", "batch_stats"):
      _assert_same({k: state[group][k] for k in run[group]}, run[group])
      _assert_same({k: v for k, v in state[group].items() if k.startswith("adapter")}, adapters[sensor][group])

  _, state = _imported(pretrained, "adapter", "s1s2")
  kernel = state["params"]["adapter_conv"]["kernel"]
  np.testing.assert_array_equal(kernel[:, :, :10], adapters["s2"]["params"]["adapter_conv"]["kernel"])
  assert not np.any(kernel[:, :, 10:])
  _assert_same(state["batch_stats"]["adapter_bn"], adapters["s2"]["batch_stats"]["adapter_bn"])

  fresh, state = _imported(pretrained, "adapter", "s2", adapter="random")
  _assert_same(state["params"]["adapter_conv"], fresh["params"]["adapter_conv"])
  _assert_same(state["params"]["layer1_0"], run["params"]["layer1_0"])

  _, state = _imported(pretrained, "supervised", "s2")
  want = common.adapt_input_kernel(run["params"]["conv1"]["kernel"], 10)
  np.testing.assert_allclose(state["params"]["conv1"]["kernel"], want)
  assert "adapter_conv" not in state["params"]


@pytest.fixture(scope="module")
def scripted_moco_finetune(moco_run, synthetic_dir, tmp_path_factory):
  """The seed's `Moco` row (conv1 re-made for the bands) from the MoCo smoke run, through the loop, with summarize's
  f1_micro scripted: best at the 2nd validation, and patience 2 stops after the 4th. The smoke run's model, so its
  compiled programs come from the persistent cache."""
  script = iter([0.30, 0.60, 0.50, 0.55, 0.42])

  def make_task(config, **context):
    task = classify.make_task(config, **context)

    def summarize(rows, sums):
      return dict(task.summarize(rows, sums), f1_micro=next(script))

    return task.__class__(**{**task.__dict__, "summarize": summarize})

  config = smoke_config(synthetic_dir, init__workdir=moco_run, train__epochs=6, eval__patience=2)
  workdir = str(tmp_path_factory.mktemp("moco"))
  status = loop.run(config, workdir, make_task)
  return config, workdir, status, script


def test_keep_best_and_early_stop_on_a_scripted_metric(scripted_moco_finetune):
  """The real evaluation machinery: the best validation checkpoint is kept and scored on the test split."""
  config, workdir, status, script = scripted_moco_finetune
  assert status == "early_stopped"
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  steps_per_epoch = len(loop.data.build_source(config.data, "train")) // config.train.global_batch_size
  assert results["selected_step"] == 2 * steps_per_epoch
  assert results["validation"]["f1_micro"] == 0.60 and results["test"]["f1_micro"] == 0.42
  assert results["monitor"]["best_step"] == 2 * steps_per_epoch and results["monitor"]["evaluations"] == 4
  best = checkpoint.Checkpointer(workdir, keep=1, name="best")
  assert best.steps() == [2 * steps_per_epoch]
  best.close()
  assert int(checkpoint.load_state(workdir)["step"]) == 4 * steps_per_epoch  # stopped after the 4th evaluation
  assert not os.path.exists(os.path.join(workdir, "eval", f"step_{5 * steps_per_epoch:07d}"))
  with pytest.raises(StopIteration):  # exactly 4 validations and 1 test evaluation
    next(script)


def test_finetune_from_the_moco_smoke_run_joins_the_table(scripted_moco_finetune, moco_run, smoke_run):
  _, workdir, _, _ = scripted_moco_finetune
  with open(os.path.join(workdir, "results.json")) as f:
    test = json.load(f)["test"]
  assert np.isfinite(test["oa_multi"]) and np.isfinite(test["ap_macro"])
  tables = table.build_tables([table.read_run(smoke_run[1]), table.read_run(workdir)])
  assert len(tables) == 1 and tables[0]["columns"] == ["S2"]
  row = f"Moco · sensor pairs ({os.path.basename(moco_run)})"
  assert tables[0]["rows"] == ["Supervised", row]
  assert tables[0]["cells"][row]["S2"]["values"] == [test["oa_multi"]]


def test_moco_1x1_starts_as_the_moco_query_encoder(moco_run, synthetic_dir):
  """At initialisation Moco_1x1 on S2 computes the MoCo run's own features (its kNN / probe view: S2 adapter, then
  the query encoder, running statistics): the transfer loses nothing."""
  from jaxgeo.train import moco

  moco_config = moco_sen12ms.get_config("smoke")
  moco_config.data.synthetic_dir = str(synthetic_dir)
  source = loop.data.build_source(moco_config.data, "train")
  mean, std = source.norm_stats["image"]
  context = dict(steps_per_epoch=2, total_steps=6, in_chans=len(source.bands), mean=mean, std=std, source=source)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  moco_task = moco.make_task(moco_config, mesh=mesh, **context)
  moco_state = checkpoint.load_state(moco_run)

  config = smoke_config(synthetic_dir, classify__model="adapter", init__workdir=moco_run)
  task = classify.make_task(config, mesh=mesh, **context)
  state = task.import_pretrained(jax.device_get(task.init(jax.random.key(0))))
  images = np.stack([source[i]["image"] for i in range(4)])
  np.testing.assert_allclose(task.embed(state, images), moco_task.embed(moco_state, images), atol=1e-4, rtol=1e-4)
