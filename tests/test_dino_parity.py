"""jaxgeo's DINO training step against a PyTorch step written to facebookresearch/dino main_dino.py.

Both sides start from the same weights and see the same pre-made crops (jaxgeo's on-device augmentation is
bypassed), then run 4 steps of the reference's recipe at a tiny size:
  epoch 0 (steps 0, 1): last layer frozen (grad = None, so AdamW skips it whole), lr warming up from 0;
  epoch 1 (steps 2, 3): last layer trained (its AdamW step count starts at 1), lr on the cosine;
weight decay and teacher momentum on their cosines, teacher temperature warming up per epoch, per-tensor
clipping at a threshold some tensors exceed and some do not. Compared: the loss of every step, the schedules,
and the student, teacher, centre and AdamW moments afterwards.

The PyTorch side is written from the reference's text (train_one_epoch, DINOLoss, utils.get_params_groups,
clip_gradients, cancel_gradients_last_layer, cosine_scheduler), not from jaxgeo's code.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from jaxgeo import bridge, parallel  # noqa: E402
from jaxgeo.data import augment  # noqa: E402
from jaxgeo.train import dino  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference  # noqa: E402
from conftest import dino_ben  # noqa: E402

BATCH, GLOBAL_SIZE, LOCAL_SIZE, N_LOCAL, CHANNELS = 4, 32, 16, 2, 3
DIM, DEPTH, HEADS, PATCH = 32, 2, 2, 8
OUT_DIM, HIDDEN, BOTTLENECK = 64, 48, 16
STEPS_PER_EPOCH, EPOCHS, N_STEPS = 2, 3, 4
PEAK_LR = 1e-3
CLIP = 0.5  # some tensors' gradients are above it and some below on every step (asserted below)


def parity_config():
  config = dino_ben.get_config("smoke")
  config.model.update(
    depth=DEPTH, embed_dim=DIM, num_heads=HEADS, patch_size=PATCH, drop_path_rate=0.0, dtype="float32", attention="xla"
  )
  config.head.update(out_dim=OUT_DIM, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, norm_last_layer=True)
  config.aug.update(global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE, local_crops_number=N_LOCAL)
  config.loss.update(
    student_temp=0.1, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2, center_momentum=0.9
  )
  config.optim.update(
    base_lr=PEAK_LR * 256 / BATCH,
    min_lr=1e-5,
    warmup_epochs=1,
    weight_decay=0.04,
    weight_decay_end=0.4,
    clip_grad=CLIP,
    freeze_last_layer_epochs=1,
    momentum_teacher=0.9,
  )
  config.train.update(global_batch_size=BATCH, epochs=EPOCHS)
  return config


# ---- the reference, in PyTorch ------------------------------------------------------------------------------


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
  warmup_iters = warmup_epochs * niter_per_ep
  warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
  iters = np.arange(epochs * niter_per_ep - warmup_iters)
  cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate((warmup, cosine))


class MultiCropWrapper(torch.nn.Module):
  """Backbone once per run of same-resolution crops, head once over all features (the reference's wrapper)."""

  def __init__(self, backbone, head):
    super().__init__()
    self.backbone, self.head = backbone, head

  def forward(self, crops):
    sizes = torch.tensor([crop.shape[-1] for crop in crops])
    ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
    start, features = 0, []
    for end in ends.tolist():
      features.append(self.backbone(torch.cat(crops[start:end])))
      start = end
    return self.head(torch.cat(features))


class ReferenceDinoLoss:
  def __init__(self, config, ncrops, nepochs):
    loss = config.loss
    self.student_temp, self.center_momentum, self.ncrops = loss.student_temp, loss.center_momentum, ncrops
    self.center = torch.zeros(1, OUT_DIM)
    self.teacher_temp_schedule = np.concatenate(
      (
        np.linspace(loss.warmup_teacher_temp, loss.teacher_temp, loss.warmup_teacher_temp_epochs),
        np.ones(nepochs - loss.warmup_teacher_temp_epochs) * loss.teacher_temp,
      )
    )

  def __call__(self, student_output, teacher_output, epoch):
    student_out = (student_output / self.student_temp).chunk(self.ncrops)
    temp = self.teacher_temp_schedule[epoch]
    teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
      for v in range(len(student_out)):
        if v == iq:
          continue
        total_loss += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
        n_loss_terms += 1
    total_loss /= n_loss_terms
    with torch.no_grad():  # single process: the all_reduce is the identity
      batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
      self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
    return total_loss


def get_params_groups(model):
  regularized, not_regularized = [], []
  for name, param in model.named_parameters():
    if not param.requires_grad:
      continue
    if name.endswith(".bias") or len(param.shape) == 1:
      not_regularized.append(param)
    else:
      regularized.append(param)
  return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients(model, clip):
  norms = []
  for _, p in model.named_parameters():
    if p.grad is not None:
      param_norm = p.grad.data.norm(2)
      norms.append(param_norm.item())
      clip_coef = clip / (param_norm + 1e-6)
      if clip_coef < 1:
        p.grad.data.mul_(clip_coef)
  return np.array(norms)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
  if epoch >= freeze_last_layer:
    return
  for name, p in model.named_parameters():
    if "last_layer" in name:
      p.grad = None


def build_torch_models(seed=0):
  torch.manual_seed(seed)

  def one():
    backbone = torch_reference.VisionTransformer(
      patch_size=PATCH, dim=DIM, depth=DEPTH, num_heads=HEADS, in_chans=CHANNELS, img_size=GLOBAL_SIZE
    )
    head = torch_reference.DINOHead(DIM, OUT_DIM, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, norm_last_layer=True)
    return MultiCropWrapper(backbone, head)

  student, teacher = one(), one()
  teacher.load_state_dict(student.state_dict())
  for p in teacher.parameters():
    p.requires_grad = False
  return student, teacher


def run_reference(config, student, teacher, crops_per_step):
  """main_dino.train_one_epoch over N_STEPS iterations, fp32, no autocast, one process."""
  optim_config = config.optim
  ncrops = 2 + N_LOCAL
  dino_loss = ReferenceDinoLoss(config, ncrops, EPOCHS)
  optimizer = torch.optim.AdamW(get_params_groups(student))
  lr_schedule = cosine_scheduler(
    optim_config.base_lr * BATCH / 256.0,
    optim_config.min_lr,
    EPOCHS,
    STEPS_PER_EPOCH,
    warmup_epochs=optim_config.warmup_epochs,
  )
  wd_schedule = cosine_scheduler(optim_config.weight_decay, optim_config.weight_decay_end, EPOCHS, STEPS_PER_EPOCH)
  momentum_schedule = cosine_scheduler(optim_config.momentum_teacher, 1, EPOCHS, STEPS_PER_EPOCH)
  log = []
  for it, images in enumerate(crops_per_step):
    epoch = it // STEPS_PER_EPOCH
    for i, param_group in enumerate(optimizer.param_groups):
      param_group["lr"] = lr_schedule[it]
      if i == 0:
        param_group["weight_decay"] = wd_schedule[it]
    teacher_output = teacher(images[:2])
    student_output = student(images)
    loss = dino_loss(student_output, teacher_output, epoch)
    optimizer.zero_grad()
    loss.backward()
    norms = clip_gradients(student, optim_config.clip_grad)
    cancel_gradients_last_layer(epoch, student, optim_config.freeze_last_layer_epochs)
    optimizer.step()
    with torch.no_grad():
      m = momentum_schedule[it]
      for param_q, param_k in zip(student.parameters(), teacher.parameters()):
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
    log.append(
      dict(
        loss=loss.item(),
        lr=lr_schedule[it],
        weight_decay=wd_schedule[it],
        teacher_momentum=momentum_schedule[it],
        teacher_temp=dino_loss.teacher_temp_schedule[epoch],
        grad_norms=norms,
      )
    )
  return log, dino_loss.center.numpy(), optimizer


# ---- jaxgeo -----------------------------------------------------------------------------------------------


def to_flax_params(torch_model_or_state):
  """Flax {"backbone", "head"} params from a torch MultiCropWrapper (or a dict under its names), via the bridge."""
  state = torch_model_or_state if isinstance(torch_model_or_state, dict) else torch_model_or_state.state_dict()
  _, variables = bridge.dino_vit_from_torch(state, load_head=True)
  return variables["params"]


def run_jaxgeo(config, torch_student, crops_per_step, monkeypatch):
  # The step's multi-crop is replaced by "the batch already is the crops": (global [2,B,H,W,C], local [..]).
  monkeypatch.setattr(augment, "multicrop", lambda rng, images, aug, mean, std: images)
  mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:1])
  task = dino.make_task(
    config,
    steps_per_epoch=STEPS_PER_EPOCH,
    total_steps=EPOCHS * STEPS_PER_EPOCH,
    in_chans=CHANNELS,
    mean=np.zeros(CHANNELS),
    std=np.ones(CHANNELS),
    mesh=mesh,
  )
  state = task.init(jax.random.PRNGKey(0))
  params = to_flax_params(torch_student)
  assert jax.tree.structure(params) == jax.tree.structure(state["params"])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
    assert a.shape == b.shape
  state.update(params=params, teacher=jax.tree.map(jnp.copy, params))
  step = jax.jit(task.step)
  log, states = [], []
  for images in crops_per_step:
    # torch crop list (NCHW per crop) -> crop-major NHWC stacks.
    to_nhwc = lambda crops: jnp.asarray(np.stack([c.numpy().transpose(0, 2, 3, 1) for c in crops]))
    batch = {"image": (to_nhwc(images[:2]), to_nhwc(images[2:])), "num_skipped": jnp.zeros((BATCH,), jnp.int32)}
    state, metrics = step(state, batch)
    log.append(jax.device_get(metrics))
    states.append(jax.device_get(state))
  return log, states


def make_crops(seed=1):
  generator = torch.Generator().manual_seed(seed)
  steps = []
  for _ in range(N_STEPS):
    crops = [torch.randn(BATCH, CHANNELS, GLOBAL_SIZE, GLOBAL_SIZE, generator=generator) for _ in range(2)]
    crops += [torch.randn(BATCH, CHANNELS, LOCAL_SIZE, LOCAL_SIZE, generator=generator) for _ in range(N_LOCAL)]
    steps.append(crops)
  return steps


@pytest.fixture(scope="module")
def both_runs():
  monkeypatch = pytest.MonkeyPatch()
  try:
    config = parity_config()
    crops = make_crops()
    student, teacher = build_torch_models()
    initial = to_flax_params(student)
    jax_log, jax_states = run_jaxgeo(config, student, crops, monkeypatch)
    ref_log, ref_center, optimizer = run_reference(config, student, teacher, crops)
  finally:
    monkeypatch.undo()
  return dict(
    config=config,
    initial=initial,
    jax_log=jax_log,
    jax_states=jax_states,
    ref_log=ref_log,
    ref_center=ref_center,
    student=student,
    teacher=teacher,
    optimizer=optimizer,
  )


def max_abs_diff(tree_a, tree_b):
  assert jax.tree.structure(tree_a) == jax.tree.structure(tree_b)
  return {
    parallel.path_str(path): float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree_a), jax.tree.leaves(tree_b))
  }


def split_key_bias(params):
  """Pulls the key third of every qkv bias out of the tree. Its true gradient is exactly zero (a shift of all
  keys of a query by q.b_k is removed by the softmax), so both sides' "gradients" there are float rounding
  noise, which Adam's normalisation turns into O(lr) steps of arbitrary sign: not comparable across
  frameworks. Everything else is compared tightly."""
  params = jax.tree.map(np.array, params)
  key_biases = {}
  for name, block in params["backbone"].items():
    if name.startswith("blocks_"):
      bias = block["attn"]["qkv"]["bias"]
      key_biases[name] = bias[DIM : 2 * DIM].copy()
      bias[DIM : 2 * DIM] = 0.0
  return params, key_biases


def reference_adam_moments(student, optimizer, which):
  """torch AdamW's exp_avg / exp_avg_sq per param, mapped to flax paths with the same bridge as the weights."""
  state = {name: optimizer.state[p][which] for name, p in student.named_parameters() if p.requires_grad}
  return to_flax_params(state)


def jaxgeo_adam(opt_state, field):
  """One tree of `field` (mu / nu) over all params, each leaf from the group that owns it."""

  def pick(main, frozen):
    return frozen if isinstance(main, optax.MaskedNode) else main

  main, frozen = (getattr(opt_state[g].inner_state, field) for g in ("main", "frozen"))
  return jax.tree.map(pick, main, frozen, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def test_recipe_exercises_freezing_clipping_and_schedules(both_runs):
  ref = both_runs["ref_log"]
  frozen_epochs = both_runs["config"].optim.freeze_last_layer_epochs
  assert [i // STEPS_PER_EPOCH < frozen_epochs for i in range(N_STEPS)] == [True, True, False, False]
  for row in ref:  # per-tensor clipping both engaged and not engaged on every step
    assert np.any(row["grad_norms"] > CLIP) and np.any(row["grad_norms"] < CLIP)
  assert ref[1]["lr"] == pytest.approx(PEAK_LR) and ref[0]["lr"] == 0.0
  assert ref[0]["teacher_temp"] != ref[2]["teacher_temp"]


def test_schedules_match_reference(both_runs):
  for jax_row, ref_row in zip(both_runs["jax_log"], both_runs["ref_log"]):
    for key in ("lr", "weight_decay", "teacher_momentum", "teacher_temp"):
      np.testing.assert_allclose(jax_row[key], ref_row[key], rtol=1e-6, atol=1e-12, err_msg=key)


def test_loss_per_step_matches_reference(both_runs):
  jax_losses = [float(row["loss"]) for row in both_runs["jax_log"]]
  ref_losses = [row["loss"] for row in both_runs["ref_log"]]
  assert all(bool(row["finite"]) for row in both_runs["jax_log"])
  np.testing.assert_allclose(jax_losses, ref_losses, rtol=1e-5)
  assert len(set(np.round(ref_losses, 4))) == N_STEPS  # the steps change the model


def test_student_teacher_and_center_match_reference(both_runs):
  state = both_runs["jax_states"][-1]
  ref_student = to_flax_params(both_runs["student"])
  ref_teacher = to_flax_params(both_runs["teacher"])
  moved = max_abs_diff(ref_student, both_runs["initial"])
  assert min(moved.values()) > 1e-4, moved  # every tensor, the last layer included, was updated
  for name, (got, want) in {
    "student": (state["params"], ref_student),
    "teacher": (state["teacher"], ref_teacher),
  }.items():
    (got, got_key_bias), (want, want_key_bias) = split_key_bias(got), split_key_bias(want)
    diffs = max_abs_diff(got, want)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-5, f"{name}: {worst} differs by {diffs[worst]:.3g}"
    # The noise-driven key biases: bounded by what Adam can move them (sum of lr), nothing more.
    bound = sum(row["lr"] for row in both_runs["ref_log"]) * 2
    for block in got_key_bias:
      assert np.max(np.abs(got_key_bias[block] - want_key_bias[block])) < bound
  np.testing.assert_allclose(state["center"], both_runs["ref_center"], atol=1e-6)
  assert int(state["step"]) == N_STEPS


def test_adam_moments_and_counts_match_reference(both_runs):
  """The frozen last layer's AdamW state starts only when it is unfrozen, as with grad = None in PyTorch."""
  state, student, optimizer = both_runs["jax_states"][-1], both_runs["student"], both_runs["optimizer"]
  for field, which, atol in (("mu", "exp_avg", 1e-6), ("nu", "exp_avg_sq", 1e-8)):
    got, _ = split_key_bias(jaxgeo_adam(state["opt_state"], field))
    want, _ = split_key_bias(reference_adam_moments(student, optimizer, which))
    diffs = max_abs_diff(got, want)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < atol, f"{field}: {worst} differs by {diffs[worst]:.3g}"
  steps = {name: int(optimizer.state[p]["step"]) for name, p in student.named_parameters() if p.requires_grad}
  assert steps["head.last_layer.weight_v"] == N_STEPS - STEPS_PER_EPOCH
  assert set(v for k, v in steps.items() if "last_layer" not in k) == {N_STEPS}
  assert int(state["opt_state"]["frozen"].inner_state.count) == N_STEPS - STEPS_PER_EPOCH
  assert int(state["opt_state"]["main"].inner_state.count) == N_STEPS


def test_last_layer_untouched_while_frozen(both_runs):
  """After the frozen epoch the last layer and its AdamW state are exactly as they were (no decay, count 0)."""
  state = both_runs["jax_states"][STEPS_PER_EPOCH - 1]
  np.testing.assert_array_equal(state["params"]["head"]["last_layer_v"], both_runs["initial"]["head"]["last_layer_v"])
  for leaf in jax.tree.leaves(state["opt_state"]["frozen"]):
    assert not np.any(np.asarray(leaf)), "frozen group's Adam state moved while frozen"
