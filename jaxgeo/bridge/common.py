"""Shared machinery of the key maps: torch leaf <-> flax leaf, strict matching, input-band adaptation.

A family (vit, dino_head, resnet) only says how a torch *module* name maps to a flax module path and back;
the leaves follow one rule everywhere: Linear weight [out, in] <-> kernel [in, out], Conv weight OIHW <->
kernel HWIO, norm weight <-> scale, BatchNorm running_mean/var <-> batch_stats mean/var, num_batches_tracked
has no flax counterpart (dropped on import, written as 0 on export).
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np

# The jaxgeo weights file (safetensors with flax paths) marks itself with this metadata key. It lives here, not
# in export.py, because both export.py (writes it) and vit.py (recognises it) need it, and export.py imports vit.py.
FORMAT_KEY, FORMAT_VERSION = "jaxgeo_format", "1"


class StateDictMismatchError(ValueError):
  """Missing keys, unexpected keys and shape mismatches, all listed by torch name (as load_state_dict)."""


class Family(NamedTuple):
  name: str
  to_flax: Callable[[str], Optional[tuple]]  # torch module name -> flax module path (None: not ours)
  to_torch: Callable[[tuple], str]  # flax module path -> torch module name
  is_norm: Callable[[tuple], bool]  # flax module path is a LayerNorm/BatchNorm
  raw: tuple = ()  # bare torch params copied as they are (cls_token, pos_embed)


_BN_STATS = {"running_mean": "mean", "running_var": "var"}


def torch_to_flax(state: Mapping[str, np.ndarray], family: Family):
  """-> ({(collection, *path): array}, [torch keys with no place in the family])."""
  flat, unmapped = {}, []
  for key, value in state.items():
    if key in family.raw:
      flat[("params", key)] = np.asarray(value)
      continue
    module, _, leaf = key.rpartition(".")
    path = family.to_flax(module) if module else None
    if path is None:
      unmapped.append(key)
      continue
    value = np.asarray(value)
    if leaf == "num_batches_tracked":
      continue
    if leaf in _BN_STATS:
      flat[("batch_stats", *path, _BN_STATS[leaf])] = value
    elif leaf == "bias":
      flat[("params", *path, "bias")] = value
    elif leaf == "weight" and family.is_norm(path):
      flat[("params", *path, "scale")] = value
    elif leaf == "weight" and value.ndim == 2:
      flat[("params", *path, "kernel")] = value.T
    elif leaf == "weight" and value.ndim == 4:
      flat[("params", *path, "kernel")] = value.transpose(2, 3, 1, 0)
    else:
      unmapped.append(key)
  return flat, unmapped


def flax_to_torch_name(key: tuple, family: Family) -> str:
  """(collection, *path, leaf) -> torch key, for export and for error messages."""
  collection, *path, leaf = key
  module = family.to_torch(tuple(path))
  if collection == "batch_stats":
    leaf = {v: k for k, v in _BN_STATS.items()}[leaf]
  else:
    # last_layer_*: DINOHead's weight-normed layer, a bare param pair rather than a submodule.
    leaf = {
      "kernel": "weight",
      "scale": "weight",
      "last_layer_v": "last_layer.weight_v",
      "last_layer_g": "last_layer.weight_g",
    }.get(leaf, leaf)
  return f"{module}.{leaf}" if module else leaf


def flax_to_torch(flat: Mapping[tuple, np.ndarray], family: Family) -> dict[str, np.ndarray]:
  state = {}
  for key, value in flat.items():
    value = np.asarray(value)
    if key[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    state[flax_to_torch_name(key, family)] = np.ascontiguousarray(value)
    if key[0] == "batch_stats" and key[-1] == "mean":  # torch expects the counter buffer too
      module = flax_to_torch_name(key, family).rpartition(".")[0]
      state[f"{module}.num_batches_tracked"] = np.array(0, np.int64)
  return state


def prefixed_family(families: Mapping[str, Family]) -> Family:
  """One family over {"backbone": ..., "head": ...} sub-trees, torch names "backbone.*" / "head.*"."""

  def to_flax(module):
    prefix, _, rest = module.partition(".")
    path = families[prefix].to_flax(rest) if prefix in families else None
    return None if path is None else (prefix, *path)

  def to_torch(path):
    inner = families[path[0]].to_torch(tuple(path[1:])) if len(path) > 1 else ""
    return f"{path[0]}.{inner}" if inner else path[0]

  return Family(
    "+".join(families), to_flax, to_torch, lambda path: len(path) > 1 and families[path[0]].is_norm(tuple(path[1:]))
  )


def read_checkpoint(path_or_state) -> tuple[Any, str]:
  """(checkpoint, name for messages) from a path or an already loaded dict."""
  if isinstance(path_or_state, (str, os.PathLike)):
    from jaxgeo.bridge.torch_reader import load_state

    return load_state(path_or_state), os.fspath(path_or_state)
  return _to_numpy(path_or_state), "<state dict>"


def _to_numpy(node):
  """torch tensors (duck-typed, torch is not imported here) and jax arrays inside dicts -> numpy."""
  if isinstance(node, Mapping):
    return {k: _to_numpy(v) for k, v in node.items()}
  if hasattr(node, "detach") and hasattr(node, "is_floating_point"):
    tensor = node.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
  if hasattr(node, "__array__") and not isinstance(node, np.ndarray):
    return np.asarray(node)
  return node


def flatten(tree, prefix=()) -> dict[tuple, np.ndarray]:
  if hasattr(tree, "items"):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, prefix + (key,)))
    return out
  return {prefix: tree}


def unflatten(flat: Mapping[tuple, np.ndarray]) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    for part in key[:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = value
  return tree


def _matches(name: str, patterns: Iterable[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def match_strict(
  got: Mapping[tuple, np.ndarray],
  expected: Mapping[tuple, tuple],
  *,
  family: Family,
  where: str,
  unmapped: Sequence[str] = (),
  strict: bool = True,
  allow_missing: Sequence[str] = (),
  allow_unexpected: Sequence[str] = (),
):
  """Raises one StateDictMismatchError listing everything wrong; shapes must match even when not strict.

  allow_missing / allow_unexpected: torch-name patterns (fnmatch, e.g. "head.*", "fc.*").
  Returns the missing flax keys the caller agreed to (it keeps their initial values).
  """
  name = lambda key: flax_to_torch_name(key, family)
  missing = [k for k in expected if k not in got]
  unexpected = [name(k) for k in got if k not in expected] + list(unmapped)
  mismatched = [
    f"{name(k)}: checkpoint {tuple(got[k].shape)}, model {tuple(expected[k])}"
    for k in expected
    if k in got and tuple(got[k].shape) != tuple(expected[k])
  ]
  bad_missing = [name(k) for k in missing if strict and not _matches(name(k), allow_missing)]
  bad_unexpected = [k for k in unexpected if strict and not _matches(k, allow_unexpected)]
  if bad_missing or bad_unexpected or mismatched:
    lines = [f"Error(s) loading {family.name} weights from {where}:"]
    for title, items in (
      ("Missing key(s)", bad_missing),
      ("Unexpected key(s)", bad_unexpected),
      ("Shape mismatch(es)", mismatched),
    ):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
    raise StateDictMismatchError("\n".join(lines))
  return missing


def expected_shapes(module, *inputs) -> dict[tuple, tuple]:
  """{(collection, *path): shape} of module.init(*inputs), traced only (no compute)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return {k: tuple(v.shape) for k, v in flatten(dict(shapes)).items()}


def fill_missing(flat, missing, module, *inputs):
  """Missing-but-allowed entries take the module's initial values (seed 0). Only those leaves leave the
  jitted init, so XLA prunes the forward pass and the other initialisers."""
  if missing:
    pick = lambda key: {k: v for k, v in flatten(dict(module.init(key, *inputs))).items() if k in missing}
    flat.update({k: np.asarray(v) for k, v in jax.jit(pick)(jax.random.key(0)).items()})
  return flat


def strip_prefix(state: Mapping[str, np.ndarray], prefixes: Sequence[str]) -> dict[str, np.ndarray]:
  """Removes each prefix in turn when every key carries it (as the DINO eval scripts do)."""
  state = dict(state)
  for prefix in prefixes:
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix) :]: v for k, v in state.items()}
  return state


def subtree(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def adapt_input_kernel(
  kernel: np.ndarray, in_chans: Optional[int] = None, band_indices: Optional[Sequence[int]] = None, *, where: str = ""
) -> np.ndarray:
  """Adapts a first-layer kernel [kh, kw, C, out] (HWIO) to other input bands.

  band_indices: keep those input channels of the checkpoint (e.g. drop B10 of a 13-band L1C model).
  in_chans, from an RGB (C=3) kernel, following timm's adapt_input_conv:
    1 band  -> sum of the RGB kernels (a grey image then gives the RGB model's activations);
    N bands -> the RGB kernels tiled R,G,B,R,G,B,... over the N bands and scaled by 3/N, so that bands with
               RGB-like statistics keep the activation scale the pretrained layers expect.
  """
  kernel = np.asarray(kernel)
  if band_indices is not None:
    kernel = kernel[:, :, list(band_indices)]
  channels = kernel.shape[2]
  if in_chans is None or in_chans == channels:
    return kernel
  if channels != 3:
    raise ValueError(
      f"{where}: can only adapt an RGB (3-band) input kernel to {in_chans} bands, the "
      f"checkpoint's has {channels}; pass band_indices to pick {in_chans} of its bands"
    )
  if in_chans == 1:
    return kernel.sum(axis=2, keepdims=True)
  tiled = np.concatenate([kernel] * (-(-in_chans // 3)), axis=2)[:, :, :in_chans]
  return (tiled * (3.0 / in_chans)).astype(kernel.dtype)


def as_float32(flat: Mapping[tuple, np.ndarray]) -> dict[tuple, np.ndarray]:
  """Checkpoint tensors (possibly fp16/bf16) as float32, the dtype of every jaxgeo param."""
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def pick_state_dict(checkpoint, where: str, keys: Sequence[str]):
  """The tensor dict inside a checkpoint: the first of `keys` present, or the checkpoint itself."""
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{where}: expected a dict-like checkpoint, got {type(checkpoint).__name__}")
  for key in keys:
    if key in checkpoint and isinstance(checkpoint[key], Mapping):
      return checkpoint[key], key
  return checkpoint, None
