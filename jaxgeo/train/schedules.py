"""Per-step schedules shared by the methods (learning rate, weight decay, EMA momentum)."""

import jax.numpy as jnp


def warmup_cosine(step, *, base, final, total_steps, warmup_steps=0, warmup_start=0.0):
  """The reference's cosine_scheduler as a function of the step instead of a precomputed array.

  Linear from warmup_start to base over warmup_steps, then a half cosine from base to final over the rest;
  past total_steps it stays at final.
  """
  step = jnp.asarray(step, jnp.float32)
  # np.linspace(warmup_start, base, warmup_steps): its last warm-up step already equals base.
  warm = warmup_start + (base - warmup_start) * step / max(warmup_steps - 1, 1)
  decay_steps = max(total_steps - warmup_steps, 1)
  progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
  cosine = final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup_steps, warm, cosine)
