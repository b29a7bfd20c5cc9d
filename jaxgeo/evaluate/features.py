"""Frozen-backbone features for evaluation: the reference linear-eval definition and a sharded forward pass.

Feature of an image (facebookresearch/dino eval_linear.py): the CLS tokens of the last `n_last_blocks`
blocks, each through the final LayerNorm, concatenated; with `avgpool` the mean of the last block's patch
tokens is appended. The reference interleaves CLS and pooled values and only allows avgpool with n=1; a
linear head is blind to the order of its inputs, so we simply concatenate and allow any n. With
n_last_blocks=1 and no avgpool the feature is the model's own output, the one DINO's kNN eval uses.

Images arrive as the data pipeline yields them (host-scaled, any size) and are resized to `image_size` with
the deterministic `center_resize`, then normalised with the dataset's per-band mean/std, all inside jit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeo import parallel


def vit_features(model, params, images, *, n_last_blocks=4, avgpool=False):
  """[B, n_last_blocks * D (+ D)] float32 features of already preprocessed images."""
  blocks = model.apply({"params": params}, images, n_last_blocks, method=model.get_intermediate_layers)
  parts = [block[:, 0] for block in blocks]
  if avgpool:
    parts.append(jnp.mean(blocks[-1][:, 1:], axis=1))
  return jnp.concatenate(parts, axis=-1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("model", "mean", "std", "image_size", "n_last_blocks", "avgpool"))
def _preprocessed_features(params, images, *, model, mean, std, image_size, n_last_blocks, avgpool):
  from jaxgeo.data import augment  # device-side preprocessing lives with the augmentations

  images = augment.center_resize(jnp.asarray(images, jnp.float32), image_size)
  images = augment.normalize(images, np.asarray(mean, np.float32), np.asarray(std, np.float32))
  return vit_features(model, params, images, n_last_blocks=n_last_blocks, avgpool=avgpool)


def make_feature_fn(model, *, mean, std, image_size=224, n_last_blocks=4, avgpool=False):
  """Jitted (params, images [B, H, W, C]) -> features [B, F]: center_resize + normalise + vit_features.

  Params are an argument, not a closure constant, so the weights are never baked into the executable and
  one compiled program serves every checkpoint; the settings are static jit arguments, so calling this
  again with the same model and settings reuses the compiled program. Bind params with
  functools.partial(fn, params).
  """
  return functools.partial(
    _preprocessed_features,
    model=model,
    mean=tuple(float(m) for m in mean),
    std=tuple(float(s) for s in std),
    image_size=int(image_size),
    n_last_blocks=int(n_last_blocks),
    avgpool=bool(avgpool),
  )


def _pad_rows(array, rows):
  array = np.asarray(array)
  pad = rows - len(array)
  if pad <= 0:
    return array
  return np.concatenate([array, np.zeros((pad,) + array.shape[1:], array.dtype)])


def extract_features(apply_fn, batches, mesh=None, *, with_index=False):
  """Runs `apply_fn(images) -> features` over host batches; returns numpy (features, labels[, index]).

  apply_fn: e.g. functools.partial(make_feature_fn(...), params). Every batch is zero-padded to the size
    of the first one (rounded up to the device count when sharding), so ragged final batches do not
    recompile, and the padding rows are dropped again.
  batches: iterable of numpy dicts with "image", "labels" (and "index" when with_index); rows whose "valid" is
    False (the pipeline's padding of a last evaluation batch) are left out.
  mesh: None runs on the default device; a mesh splits each batch over all its devices (parallel.py's
    batch sharding). With several processes every process passes its own rows and all of them get every
    row back (features of the whole split, in process order), so each can train an identical probe.
  """
  keys = ("labels", "index") if with_index else ("labels",)
  devices = 1 if mesh is None else mesh.devices.size // jax.process_count()
  batch_rows = None
  features, host = [], {key: [] for key in keys}
  for batch in batches:
    rows = len(batch["image"])
    if batch_rows is None:
      batch_rows = -(-rows // devices) * devices
    if rows > batch_rows:
      raise ValueError(
        f"extract_features: batch of {rows} rows after a first batch of {batch_rows}; "
        "batches must not grow (make_iter_dataset yields a fixed size, last one smaller)"
      )
    # The pipeline marks its own padding and replaced bad samples with valid=False; both stay out.
    valid = np.asarray(batch["valid"], bool) if "valid" in batch else np.ones(rows, bool)
    padded = {"image": _pad_rows(batch["image"], batch_rows), "valid": _pad_rows(valid, batch_rows)}
    padded.update({key: _pad_rows(batch[key], batch_rows) for key in keys})
    if mesh is None:
      keep = padded["valid"][:rows]
      features.append(jax.device_get(apply_fn(jnp.asarray(padded["image"])))[:rows][keep])
      for key in keys:
        host[key].append(padded[key][:rows][keep])
      continue
    arrays = parallel.host_to_global(padded, mesh)
    outputs = dict(arrays, features=apply_fn(arrays["image"]))
    del outputs["image"]
    outputs = _gather(outputs)
    valid = outputs["valid"].astype(bool)
    features.append(outputs["features"][valid])
    for key in keys:
      host[key].append(outputs[key][valid])
  if batch_rows is None:
    raise ValueError(
      "extract_features: no batches to embed (an empty split, or a split smaller than one batch "
      "read with drop_remainder=True)"
    )
  result = (np.concatenate(features).astype(np.float32),) + tuple(np.concatenate(host[k]) for k in keys)
  return result


def _gather(tree):
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)
