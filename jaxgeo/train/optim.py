"""AdamW as PyTorch's, with a parameter group that can be frozen whole, and per-tensor gradient clipping.

Why not plain optax.adamw: the DINO reference freezes the head's last layer for the first epoch by dropping
its gradient (`p.grad = None`), so PyTorch's AdamW skips that tensor entirely: no moment update, no weight
decay, and its per-parameter step counter (hence Adam's bias correction) only starts once it is unfrozen.
Feeding a zero gradient to a shared-count optax.adamw would decay the weights and under-correct the moments
afterwards. So each group keeps its own Adam state and count; lr and weight decay come from the caller's
per-step schedules, like the reference's param_group updates.
"""

import re

import jax
import jax.numpy as jnp
import optax

from jaxgeo import parallel

GROUPS = ("main", "frozen")


class GroupedAdamW:
  """Two Adam states over one param tree; `labels_fn(params)` says which group each leaf belongs to."""

  def __init__(self, frozen_pattern, b1=0.9, b2=0.999, eps=1e-8):
    self.frozen_pattern = re.compile(frozen_pattern)
    self.adam = {
      g: optax.masked(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        lambda p, g=g: jax.tree.map(lambda label: label == g, self.labels(p)),
      )
      for g in GROUPS
    }

  def labels(self, params):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if self.frozen_pattern.search(parallel.path_str(path)) else "main", params
    )

  def init(self, params):
    return {g: self.adam[g].init(params) for g in GROUPS}

  def apply(self, grads, opt_state, params, *, lr, wd, frozen):
    """One step; with `frozen` true the frozen group's params and Adam state stay exactly as they were."""
    directions, new_state = {}, {}
    for g in GROUPS:
      directions[g], new_state[g] = self.adam[g].update(grads, opt_state[g], params)
    new_state["frozen"] = jax.tree.map(
      lambda new, old: jnp.where(frozen, old, new), new_state["frozen"], opt_state["frozen"]
    )

    def leaf(path, p, main_dir, frozen_dir, label):
      direction = frozen_dir if label == "frozen" else main_dir
      decay = wd if decays(path, p) else 0.0
      new_p = p - lr * (direction + decay * p)
      return jnp.where(frozen, p, new_p) if label == "frozen" else new_p

    new_params = jax.tree_util.tree_map_with_path(
      leaf, params, directions["main"], directions["frozen"], self.labels(params)
    )
    return new_params, new_state


def decays(path, param):
  """The reference's rule: no weight decay on biases and 1-D params (norm scales).

  The weight-norm gain is the exception: PyTorch stores it as [out_dim, 1], so the reference decays it.
  """
  name = parallel.path_str(path)
  if name.endswith("bias"):
    return False
  return param.ndim > 1 or name.endswith("last_layer_g")


def clip_per_tensor(grads, max_norm):
  """Each tensor's gradient scaled to norm <= max_norm on its own (the reference's clip_gradients)."""
  if not max_norm:
    return grads

  def clip(g):
    coef = max_norm / (jnp.linalg.norm(g.reshape(-1)) + 1e-6)
    return jnp.where(coef < 1.0, g * coef, g)

  return jax.tree.map(clip, grads)
