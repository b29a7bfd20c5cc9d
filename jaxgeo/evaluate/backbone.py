"""The frozen backbone every evaluation command uses: a ViT and its params from one of three sources.

  config.init.workdir     a jaxgeo pretraining run: checkpoint.load_params(workdir, config.init.which)
                          ["backbone"] (the teacher by default, DINO's evaluation choice)
  config.init.checkpoint  a PyTorch DINO checkpoint (.pth / .safetensors) through the weights bridge
  neither                 random initialisation from config.seed (the baseline row of the probe table)

The model is built from config.model (it must match the weights); a jaxgeo run's position-embedding grid
is taken from its params, so a backbone pretrained at 64 px still runs at 224 px (the ViT interpolates, as
the reference).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeo.models.vit import from_config as build_backbone


def _pos_grid(params, where):
  tokens = np.shape(params["pos_embed"])[1] - 1
  grid = int(round(tokens**0.5))
  if grid * grid != tokens:
    raise ValueError(f"{where}: pos_embed holds {tokens} patch positions, not a square grid")
  return grid


@functools.partial(jax.jit, static_argnums=0)
def _init(model, rng, images):
  # Module-level and keyed on the (hashable) model: repeated evaluations compile the init once.
  return model.init(rng, images)


def load_backbone(config, in_chans, image_size):
  """(model, params as device arrays, description) for evaluation (no stochastic depth).

  in_chans / image_size size the model; a jaxgeo run brings its own position grid (the model is rebuilt
  with it), a PyTorch checkpoint is fitted to this model by the bridge (pos_embed resampled, patch
  embedding adapted to in_chans) exactly as when pretraining starts from it.
  """
  init = config.init
  workdir, checkpoint, which = init.get("workdir"), init.get("checkpoint"), init.get("which", "teacher")
  if workdir and checkpoint:
    raise ValueError(f"config.init: set workdir ({workdir}) or checkpoint ({checkpoint}), not both")
  model_config = config.model
  if workdir:
    model_config = run_architecture(workdir, config.model)
  model = build_backbone(model_config, image_size, train_student=False)
  dummy = jnp.zeros((1, image_size, image_size, in_chans), jnp.float32)
  if workdir:
    from jaxgeo import checkpoint as checkpoints

    description = f"jaxgeo run {workdir} ({which})"
    params = checkpoints.load_params(workdir, which)
    if "backbone" not in params:
      raise KeyError(f"config.init.workdir={workdir}: saved params have no 'backbone' (keys {sorted(params)})")
    params = params["backbone"]
    model = model.clone(pos_grid=_pos_grid(params, description))
    kernel_chans = np.shape(params["patch_embed"]["proj"]["kernel"])[2]
    if kernel_chans != in_chans:
      raise ValueError(
        f"{description}: backbone takes {kernel_chans} input bands but config.data.bands gives "
        f"{in_chans}; evaluate with the bands it was trained on"
      )
  elif checkpoint:
    from jaxgeo import bridge

    description = f"PyTorch checkpoint {os.path.basename(checkpoint)} ({which})"
    target = jax.eval_shape(lambda: _init(model, jax.random.key(0), dummy))["params"]
    params = bridge.load_vit_backbone_params(checkpoint, target, which=which)
  else:
    description = "random init"
    params = _init(model, jax.random.key(config.seed), dummy)["params"]
  return model, jax.tree.map(jnp.asarray, params), description


def run_architecture(workdir, model_config):
  """The model section a run was trained with (its stored config.json), not the one the tool was given: a probe
  built with another depth or head count would load the run's weights into the wrong network and report a
  plausible but wrong number. Differences are logged."""
  from absl import logging

  from jaxgeo import workdir as workdir_lib

  stored = workdir_lib.load_config(workdir).model
  given = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  differ = {k: (given.get(k), v) for k, v in stored.to_dict().items() if k in given and given.get(k) != v}
  if differ:
    logging.info(
      "architecture taken from %s/config.json: %s",
      workdir,
      ", ".join(f"model.{k}={v!r} (given {g!r})" for k, (g, v) in sorted(differ.items())),
    )
  return stored


def set_checkpoint(config, checkpoint):
  """The --checkpoint flag of the evaluation commands: a folder is a jaxgeo run, a file a PyTorch checkpoint."""
  if not checkpoint:
    return config
  with config.unlocked():
    if os.path.isdir(checkpoint):
      config.init.workdir, config.init.checkpoint = checkpoint, None
    elif os.path.isfile(checkpoint):
      config.init.checkpoint, config.init.workdir = checkpoint, None
    else:
      raise FileNotFoundError(f"--checkpoint={checkpoint}: neither a jaxgeo run folder nor a checkpoint file")
  return config


def default_config_path():
  """configs/linear_ben.py of this checkout: model, data and init fields the evaluation commands share."""
  return os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "linear_ben.py"
  )
