"""DINO: the student/teacher model, its initial state and the pure training step.

The shared loop (loop.py) owns data, mesh, checkpoints and logging; this file only says what one DINO step
is, faithful to facebookresearch/dino main_dino.py: multi-crop on the device, teacher on the 2 global crops,
student on all crops, centred and sharpened teacher targets, AdamW with per-step lr / weight-decay schedules,
per-tensor gradient clipping, last layer frozen during the first epoch(s), EMA teacher.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

from jaxgeo import parallel
from jaxgeo.data import augment
from jaxgeo.models import heads, vit
from jaxgeo.objectives import dino as dino_objective
from jaxgeo.train import optim, schedules
from jaxgeo.train.task import Task


class DinoModel(nn.Module):
  """Backbone + projection head over crops grouped by resolution.

  Crops of one size go through the backbone together (one compiled shape per resolution, as the reference's
  MultiCropWrapper); the head then sees every crop's features at once.
  """

  backbone: nn.Module
  head: nn.Module

  def __call__(self, crop_groups, train=False):
    n_crops = sum(group.shape[0] for group in crop_groups)
    batch = crop_groups[0].shape[1]
    features = [self.backbone(group.reshape((-1,) + group.shape[2:]), train=train) for group in crop_groups]
    logits = self.head(jnp.concatenate(features, axis=0))
    return logits.reshape(n_crops, batch, -1)


def build_models(config):
  """Student (with stochastic depth) and teacher (without), same architecture and param tree."""

  def one(student):
    backbone = vit.from_config(config.model, config.aug.global_size, train_student=student)
    head = heads.DINOHead(
      out_dim=config.head.out_dim,
      hidden_dim=config.head.hidden_dim,
      bottleneck_dim=config.head.bottleneck_dim,
      norm_last_layer=config.head.norm_last_layer,
      dtype=vit.compute_dtype(config.model.dtype),
    )
    return DinoModel(backbone=backbone, head=head)

  return one(True), one(False)


def make_task(config, *, steps_per_epoch, total_steps, in_chans, mean, std, mesh, source=None):
  student, teacher = build_models(config)
  aug, optim_config, loss_config = config.aug, config.optim, config.loss
  lr_peak = optim_config.base_lr * config.train.global_batch_size / 256
  warmup_steps = optim_config.warmup_epochs * steps_per_epoch
  freeze_steps = optim_config.freeze_last_layer_epochs * steps_per_epoch
  # The head's weight-normed last layer is the group the reference freezes during the first epoch(s).
  tx = optim.GroupedAdamW(frozen_pattern=r"^head/last_layer")
  crop_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXES))

  def init(rng):
    dummy = [jnp.zeros((1, 1, aug.global_size, aug.global_size, in_chans), jnp.float32)]
    params = student.init({"params": rng}, dummy)["params"]
    return {
      "params": params,
      "teacher": jax.tree.map(jnp.copy, params),
      "opt_state": tx.init(params),
      "center": jnp.zeros((1, config.head.out_dim), jnp.float32),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.fold_in(rng, 1),
    }

  def step(state, batch):
    step_index = state["step"]
    epoch = step_index // steps_per_epoch
    rng = jax.random.fold_in(state["rng"], step_index)
    aug_rng, drop_rng = jax.random.split(rng)
    global_crops, local_crops = augment.multicrop(aug_rng, batch["image"], aug, mean, std)
    global_crops = jax.lax.with_sharding_constraint(global_crops, crop_sharding)
    student_groups = [global_crops]
    if local_crops.shape[0]:
      student_groups.append(jax.lax.with_sharding_constraint(local_crops, crop_sharding))

    teacher_out = teacher.apply({"params": state["teacher"]}, [global_crops])
    temp = dino_objective.teacher_temperature(
      epoch,
      warmup_temp=loss_config.warmup_teacher_temp,
      final_temp=loss_config.teacher_temp,
      warmup_epochs=loss_config.warmup_teacher_temp_epochs,
    )

    def loss_fn(params):
      student_out = student.apply({"params": params}, student_groups, train=True, rngs={"drop_path": drop_rng})
      return dino_objective.dino_loss(
        student_out, teacher_out, state["center"], student_temp=loss_config.student_temp, teacher_temp=temp
      )

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    grad_norm = optax.tree.norm(grads)
    grads = optim.clip_per_tensor(grads, optim_config.clip_grad)
    lr = schedules.warmup_cosine(
      step_index, base=lr_peak, final=optim_config.min_lr, total_steps=total_steps, warmup_steps=warmup_steps
    )
    wd = schedules.warmup_cosine(
      step_index, base=optim_config.weight_decay, final=optim_config.weight_decay_end, total_steps=total_steps
    )
    params, opt_state = tx.apply(
      grads, state["opt_state"], state["params"], lr=lr, wd=wd, frozen=step_index < freeze_steps
    )
    momentum = schedules.warmup_cosine(
      step_index, base=optim_config.momentum_teacher, final=1.0, total_steps=total_steps
    )
    teacher_params = jax.tree.map(lambda t, s: t * momentum + s * (1.0 - momentum), state["teacher"], params)
    center = dino_objective.update_center(state["center"], teacher_out, loss_config.center_momentum)

    # A non-finite loss or gradient never reaches the weights: the step is dropped whole and reported.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = {"params": params, "teacher": teacher_params, "opt_state": opt_state, "center": center}
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, {k: state[k] for k in new_state})
    new_state.update(step=step_index + 1, rng=state["rng"])
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": lr,
      "weight_decay": wd,
      "teacher_momentum": momentum,
      "teacher_temp": temp,
      "finite": finite,
      "num_skipped": jnp.sum(batch["num_skipped"]),
    }
    return new_state, metrics

  eval_backbone = vit.from_config(config.model, aug.global_size, train_student=False)

  def embed(state, images):
    """Teacher CLS features of whole patches resized to the global crop size (the kNN/probe view)."""
    images = augment.normalize(augment.center_resize(images, aug.global_size), mean, std)
    return eval_backbone.apply({"params": state["teacher"]["backbone"]}, images)

  def import_pretrained(state):
    """config.init.checkpoint (a PyTorch DINO checkpoint): its backbone into student and teacher alike."""
    if not config.init.checkpoint:
      return state
    from jaxgeo import bridge

    # Only shapes are read: device_get would fail on arrays sharded over devices of other processes.
    imported = bridge.load_vit_backbone_params(
      config.init.checkpoint, state["params"]["backbone"], which=config.init.which
    )
    state = dict(state)
    for key in ("params", "teacher"):
      state[key] = dict(state[key], backbone=imported)
    logging.info("backbone initialised from %s (%s)", config.init.checkpoint, config.init.which)
    return state

  del source  # DINO needs only the bands (in_chans) and their statistics (mean, std)
  return Task(init=init, step=step, embed=embed, import_pretrained=import_pretrained)
