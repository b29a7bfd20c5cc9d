"""DINO self-distillation loss and its centre, as facebookresearch/dino's DINOLoss.

Outputs are crop-major: student [n_crops, B, K] (2 global crops first, then the local ones), teacher
[2, B, K]. With global jax.Arrays the batch means below already run over every device, which is exactly the
reference's all_reduce of the centre.
"""

import jax
import jax.numpy as jnp


def dino_loss(student_out, teacher_out, center, *, student_temp, teacher_temp):
  """Cross-entropy between the sharpened, centred teacher and the student, over pairs of different views.

  Each teacher crop t is compared with every student crop v != t; the mean over the batch of each pair is
  summed and divided by the number of pairs.
  """
  n_teacher, n_student = teacher_out.shape[0], student_out.shape[0]
  student_logp = jax.nn.log_softmax(student_out.astype(jnp.float32) / student_temp, axis=-1)
  teacher_p = jax.nn.softmax((teacher_out.astype(jnp.float32) - center) / teacher_temp, axis=-1)
  teacher_p = jax.lax.stop_gradient(teacher_p)
  # [n_teacher, n_student]: batch-mean cross-entropy of every (teacher crop, student crop) pair.
  pair_ce = -jnp.einsum("tbk,vbk->tv", teacher_p, student_logp) / teacher_out.shape[1]
  different_view = 1.0 - jnp.eye(n_teacher, n_student)
  n_pairs = n_teacher * n_student - min(n_teacher, n_student)
  return jnp.sum(pair_ce * different_view) / n_pairs


def update_center(center, teacher_out, momentum):
  """EMA of the teacher's mean output over every crop and sample on every device."""
  batch_center = jnp.mean(teacher_out.astype(jnp.float32).reshape(-1, teacher_out.shape[-1]), axis=0, keepdims=True)
  return center * momentum + batch_center * (1.0 - momentum)


def teacher_temperature(epoch, *, warmup_temp, final_temp, warmup_epochs):
  """Linear warm-up per epoch (the reference indexes its schedule by epoch, not by step), then constant."""
  if warmup_epochs <= 0:
    return jnp.asarray(final_temp, jnp.float32)
  # np.linspace(warmup, final, warmup_epochs)[epoch]: the last warm-up epoch already reaches final_temp.
  frac = jnp.clip(epoch / max(warmup_epochs - 1, 1), 0.0, 1.0)
  temp = warmup_temp + frac * (final_temp - warmup_temp)
  return jnp.where(epoch >= warmup_epochs, final_temp, temp).astype(jnp.float32)
