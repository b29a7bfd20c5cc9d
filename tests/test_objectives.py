"""DINO loss, centre, schedules and the optimizer against the reference's rules, computed independently."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgeo.objectives import dino
from jaxgeo.train import optim, schedules


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_dino_loss_by_hand():
  rng = np.random.default_rng(0)
  n_crops, batch, dim = 4, 3, 5
  student = rng.normal(size=(n_crops, batch, dim)).astype(np.float32)
  teacher = rng.normal(size=(2, batch, dim)).astype(np.float32)
  center = rng.normal(size=(1, dim)).astype(np.float32) * 0.1
  # The reference's double loop, written out.
  total, pairs = 0.0, 0
  for t in range(2):
    q = _softmax((teacher[t] - center) / 0.04)
    for v in range(n_crops):
      if v == t:
        continue
      logp = np.log(_softmax(student[v] / 0.1))
      total += np.mean(np.sum(-q * logp, axis=-1))
      pairs += 1
  expected = total / pairs
  got = dino.dino_loss(
    jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center), student_temp=0.1, teacher_temp=0.04
  )
  assert pairs == 6
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_loss_has_no_gradient_through_teacher():
  student = jnp.ones((3, 2, 4))
  grad = jax.grad(lambda t: dino.dino_loss(student, t, jnp.zeros((1, 4)), student_temp=0.1, teacher_temp=0.04))(
    jnp.arange(16.0).reshape(2, 2, 4)
  )
  assert not np.any(np.asarray(grad))


def test_center_update_by_hand():
  teacher = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
  center = np.full((1, 4), 2.0, np.float32)
  expected = center * 0.9 + teacher.reshape(-1, 4).mean(0, keepdims=True) * 0.1
  got = dino.update_center(jnp.asarray(center), jnp.asarray(teacher), 0.9)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)


def _reference_cosine(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0):
  warmup_iters = warmup_epochs * niter
  warmup = np.linspace(start_warmup, base, warmup_iters) if warmup_iters else np.array([])
  iters = np.arange(epochs * niter - warmup_iters)
  cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate((warmup, cosine))


@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_warmup_cosine_matches_reference_table(warmup_epochs):
  table = _reference_cosine(5e-4, 1e-6, epochs=5, niter=7, warmup_epochs=warmup_epochs)
  got = jax.vmap(
    lambda s: schedules.warmup_cosine(s, base=5e-4, final=1e-6, total_steps=35, warmup_steps=warmup_epochs * 7)
  )(jnp.arange(35))
  np.testing.assert_allclose(np.asarray(got), table, rtol=1e-5, atol=1e-10)


def test_teacher_temperature_matches_reference_table():
  table = np.concatenate((np.linspace(0.04, 0.07, 3), np.ones(5) * 0.07))
  got = [float(dino.teacher_temperature(e, warmup_temp=0.04, final_temp=0.07, warmup_epochs=3)) for e in range(8)]
  np.testing.assert_allclose(got, table, rtol=1e-6)


def test_clip_per_tensor_is_per_tensor():
  grads = {"big": jnp.full((4,), 10.0), "small": jnp.full((4,), 0.1)}
  clipped = optim.clip_per_tensor(grads, 3.0)
  assert math.isclose(float(jnp.linalg.norm(clipped["big"])), 3.0, rel_tol=1e-5)
  np.testing.assert_array_equal(np.asarray(clipped["small"]), np.asarray(grads["small"]))


def test_grouped_adamw_matches_torch_with_a_frozen_group():
  """PyTorch AdamW where the frozen group's grads are None for 2 steps, then trained (the DINO rule)."""
  import torch  # in the test extra: CI always has it

  rng = np.random.default_rng(1)
  params = {
    "body": {"kernel": rng.normal(size=(3, 2)).astype(np.float32), "bias": rng.normal(size=(2,)).astype(np.float32)},
    "head": {"last_layer_v": rng.normal(size=(2, 4)).astype(np.float32)},
  }
  grads_seq = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(5)]
  lrs, wds = [0.1, 0.05, 0.02, 0.01, 0.005], [0.04, 0.1, 0.2, 0.3, 0.4]

  t_params = {
    k: torch.nn.Parameter(torch.tensor(v))
    for k, v in [
      ("kernel", params["body"]["kernel"]),
      ("bias", params["body"]["bias"]),
      ("last", params["head"]["last_layer_v"]),
    ]
  }
  opt = torch.optim.AdamW(
    [{"params": [t_params["kernel"], t_params["last"]]}, {"params": [t_params["bias"]], "weight_decay": 0.0}], lr=0.1
  )
  for i, g in enumerate(grads_seq):
    opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lrs[i]
    opt.param_groups[0]["weight_decay"] = wds[i]
    t_params["kernel"].grad = torch.tensor(g["body"]["kernel"])
    t_params["bias"].grad = torch.tensor(g["body"]["bias"])
    t_params["last"].grad = None if i < 2 else torch.tensor(g["head"]["last_layer_v"])
    opt.step()

  tx = optim.GroupedAdamW(frozen_pattern=r"^head/last_layer")
  state, jparams = tx.init(params), jax.tree.map(jnp.asarray, params)
  for i, g in enumerate(grads_seq):
    jparams, state = tx.apply(g, state, jparams, lr=lrs[i], wd=wds[i], frozen=i < 2)
  np.testing.assert_allclose(
    np.asarray(jparams["body"]["kernel"]), t_params["kernel"].detach().numpy(), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(jparams["body"]["bias"]), t_params["bias"].detach().numpy(), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(jparams["head"]["last_layer_v"]), t_params["last"].detach().numpy(), rtol=1e-5, atol=1e-6
  )
