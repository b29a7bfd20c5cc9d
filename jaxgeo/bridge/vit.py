"""Key maps for the DINO ViT backbone and DINOHead, and the loaders built on them.

Checkpoint layouts understood (facebookresearch/dino):
  released backbone files      bare keys: cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*
  main_dino training files     {"student": {"module.backbone.*", "module.head.*"},
                                "teacher": {"backbone.*", "head.*"}, "optimizer", "epoch", "args", "dino_loss"}
  MultiCropWrapper state dicts {"backbone.*", "head.*"} (optionally "module."-prefixed)
  jaxgeo exports               the same torch names (see export.py)
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgeo.bridge import common
from jaxgeo.models.heads import DINOHead
from jaxgeo.models.vit import VIT_ARCHS, VisionTransformer, resample_pos_encoding

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_VIT_MODULES = {"patch_embed.proj", "norm", "norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}


def _vit_to_flax(module: str):
  match = _BLOCK.match(module)
  if match:
    rest = match.group(2)
    return (f"blocks_{match.group(1)}", *rest.split(".")) if rest in _VIT_MODULES else None
  return tuple(module.split(".")) if module in ("patch_embed.proj", "norm") else None


def _vit_to_torch(path: tuple) -> str:
  if not path:  # cls_token / pos_embed sit at the top level
    return ""
  head, *rest = path
  return ".".join([re.sub(r"^blocks_(\d+)$", r"blocks.\1", head), *rest])


VIT = common.Family(
  "vit", _vit_to_flax, _vit_to_torch, lambda path: path[-1].startswith("norm"), raw=("cls_token", "pos_embed")
)


def head_family(nlayers: int, use_bn: bool) -> common.Family:
  """torch nn.Sequential indices -> flax names: Linear k at mlp.{k*stride}, its BatchNorm right after."""
  stride = 3 if use_bn else 2

  def to_flax(module):
    if nlayers == 1:
      return ("mlp_0",) if module == "mlp" else None
    match = re.fullmatch(r"mlp\.(\d+)", module)
    if not match:
      return None
    index, offset = divmod(int(match.group(1)), stride)
    if offset == 0 and index < nlayers:
      return (f"mlp_{index}",)
    return (f"bn_{index}",) if use_bn and offset == 1 and index < nlayers - 1 else None

  def to_torch(path):
    kind, index = path[0].split("_")
    if kind == "last":  # last_layer_v / last_layer_g are handled by their own rule
      return "last_layer"
    return "mlp" if nlayers == 1 else f"mlp.{int(index) * stride + (kind == 'bn')}"

  return common.Family("dino_head", to_flax, to_torch, lambda path: path[0].startswith("bn_"))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layout
# ---------------------------------------------------------------------------------------------------------------


def split_dino_checkpoint(checkpoint, which: str = "teacher", where: str = "<state dict>"):
  """-> (backbone torch state, head torch state) with all wrapper prefixes removed."""
  if which not in ("teacher", "student"):
    raise ValueError(f"{where}: which must be 'teacher' or 'student', got {which!r}")
  state, picked = common.pick_state_dict(checkpoint, where, (which, "state_dict", "model"))
  if picked is None and isinstance(checkpoint, Mapping) and ("teacher" in checkpoint or "student" in checkpoint):
    raise ValueError(f"{where}: no {which!r} entry; it holds {sorted(checkpoint)}")
  state = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
  state = common.strip_prefix(state, ("module.",))
  if any(k.startswith("backbone.") for k in state):
    return (
      common.subtree(state, "backbone."),
      common.subtree(state, "head."),
      {k: v for k, v in state.items() if not k.startswith(("backbone.", "head."))},
    )
  return state, {}, {}


def infer_vit_config(backbone: Mapping[str, np.ndarray], where: str = "<state dict>") -> dict:
  """VisionTransformer fields from tensor shapes; num_heads from the arch of that width (else width/64)."""
  try:
    kernel = backbone["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
    grid = math.isqrt(backbone["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, backbone) if m)
    hidden = backbone["blocks.0.mlp.fc1.weight"].shape[0]
  except (KeyError, ValueError) as err:
    raise common.StateDictMismatchError(
      f"{where}: does not look like a DINO ViT backbone (missing {err}); keys start with {sorted(backbone)[:5]}"
    ) from None
  arch = {spec["embed_dim"]: name for name, spec in VIT_ARCHS.items()}.get(embed_dim)
  num_heads = VIT_ARCHS[arch]["num_heads"] if arch else max(embed_dim // 64, 1)
  return dict(
    arch=arch,
    in_chans=in_chans,
    config=dict(
      embed_dim=embed_dim,
      depth=depth,
      num_heads=num_heads,
      patch_size=patch_size,
      pos_grid=grid,
      mlp_ratio=hidden / embed_dim,
      qkv_bias="blocks.0.attn.qkv.bias" in backbone,
    ),
  )


def infer_head_config(head: Mapping[str, np.ndarray], where: str = "<state dict>") -> dict:
  g, v = _last_layer(head, where)
  use_bn = any(k.endswith("running_mean") for k in head)
  if "mlp.weight" in head:
    linears = ["mlp.weight"]
  else:
    linears = sorted(
      (k for k in head if re.fullmatch(r"mlp\.\d+\.weight", k) and head[k].ndim == 2),
      key=lambda k: int(k.split(".")[1]),
    )
  if not linears:
    raise common.StateDictMismatchError(f"{where}: DINO head has no mlp.* Linear weights")
  return dict(
    out_dim=v.shape[0],
    hidden_dim=head[linears[0]].shape[0],
    bottleneck_dim=v.shape[1],
    nlayers=len(linears),
    use_bn=use_bn,
    norm_last_layer=g is None or bool(np.all(g == 1)),
  )


def _last_layer(head, where):
  """(weight_g [out] or None, weight_v [out, bottleneck]) from old-style or parametrize-style weight norm."""
  g = head.get("last_layer.weight_g", head.get("last_layer.parametrizations.weight.original0"))
  v = head.get("last_layer.weight_v", head.get("last_layer.parametrizations.weight.original1"))
  if v is None:
    v = head.get("last_layer.weight")  # plain Linear: the same as weight norm with g = ||v||
    if v is not None:
      g = np.linalg.norm(v, axis=1)
  if v is None:
    raise common.StateDictMismatchError(f"{where}: DINO head has no last_layer.weight_v")
  return (None if g is None else np.asarray(g).reshape(-1)), np.asarray(v)


# ---------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------


def backbone_to_flax(backbone, *, in_chans=None, band_indices=None, where="<state dict>"):
  """torch backbone state -> ({(collection, *path): float32 array}, unmapped torch keys)."""
  flat, unmapped = common.torch_to_flax(backbone, VIT)
  kernel_key = ("params", "patch_embed", "proj", "kernel")
  if kernel_key in flat:
    flat[kernel_key] = common.adapt_input_kernel(flat[kernel_key], in_chans, band_indices, where=where)
  return common.as_float32(flat), unmapped


def head_to_flax(head, config, where="<state dict>"):
  g, v = _last_layer(head, where)
  rest = {k: x for k, x in head.items() if not k.startswith("last_layer.")}
  flat, unmapped = common.torch_to_flax(rest, head_family(config["nlayers"], config["use_bn"]))
  flat[("params", "last_layer_v")] = v.T
  if not config["norm_last_layer"]:
    flat[("params", "last_layer_g")] = np.ones(v.shape[0], np.float32) if g is None else g
  elif g is not None and not np.all(g == 1):
    unmapped.append("last_layer.weight_g (not all 1; load with norm_last_layer=False)")
  return common.as_float32(flat), unmapped


def head_to_torch(head_params, nlayers: int, use_bn: bool, batch_stats=None) -> dict[str, np.ndarray]:
  flat = {
    ("params", *k): v for k, v in common.flatten(head_params).items() if k[0] not in ("last_layer_v", "last_layer_g")
  }
  flat.update({("batch_stats", *k): v for k, v in common.flatten(batch_stats or {}).items()})
  state = common.flax_to_torch(flat, head_family(nlayers, use_bn))
  v = np.asarray(head_params["last_layer_v"], np.float32).T
  g = np.asarray(head_params.get("last_layer_g", np.ones(v.shape[0], np.float32)), np.float32)
  state["last_layer.weight_g"] = g.reshape(-1, 1)
  state["last_layer.weight_v"] = np.ascontiguousarray(v)
  return state


class VitWithHead(nn.Module):
  """Backbone then DINOHead; params {"backbone", "head"} as the DINO train state keeps them."""

  backbone: VisionTransformer
  head: DINOHead

  def __call__(self, images, train: bool = False):
    return self.head(self.backbone(images, train), train)


def dino_vit_from_torch(
  path_or_state_dict,
  *,
  which: str = "teacher",
  arch: Optional[str] = None,
  patch_size: Optional[int] = None,
  load_head: bool = False,
  in_chans: Optional[int] = None,
  band_indices: Optional[Sequence[int]] = None,
  strict: bool = True,
  allow_missing: Sequence[str] = (),
  allow_unexpected: Sequence[str] = (),
  **model_overrides,
):
  """A ready (model, variables) from any DINO ViT checkpoint: a path (.pth/.pt/.safetensors) or a dict.

  model.apply(variables, images) on NHWC float images gives the reference forward: the normed CLS feature
  [B, D] (load_head=False) or the DINOHead output [B, out_dim] (load_head=True; variables then hold
  {"params": {"backbone": ..., "head": ...}}). Architecture and patch size come from the tensors; `arch`
  ("tiny"/"small"/"base") and `patch_size` override them (a disagreeing checkpoint is then reported as shape
  mismatches), **model_overrides go to VisionTransformer (dtype, attention, drop_path_rate, num_heads...).
  in_chans/band_indices adapt the patch embedding to other bands, see common.adapt_input_kernel.
  allow_missing / allow_unexpected: torch-name patterns ("head.*") tolerated even when strict.
  """
  checkpoint, where = common.read_checkpoint(path_or_state_dict)
  backbone, head, other = split_dino_checkpoint(checkpoint, which, where)
  info = infer_vit_config(backbone, where)
  config = dict(info["config"])
  if arch is not None:
    config.update(VIT_ARCHS[arch[len("vit_") :] if arch.startswith("vit_") else arch])
  if patch_size is not None:
    config["patch_size"] = patch_size
  config.update(model_overrides)
  model = VisionTransformer(**config)
  channels = in_chans or (len(band_indices) if band_indices is not None else info["in_chans"])
  # One patch suffices: param shapes do not depend on the image size.
  images = jnp.zeros((1, config["patch_size"], config["patch_size"], channels), jnp.float32)
  flat, unmapped = backbone_to_flax(backbone, in_chans=in_chans, band_indices=band_indices, where=where)
  unmapped += list(other)
  if load_head:
    if not head:
      raise common.StateDictMismatchError(f"{where}: load_head=True but the checkpoint has no head.* keys")
    head_config = infer_head_config(head, where)
    head_flat, head_unmapped = head_to_flax(head, head_config, where)
    head_module = DINOHead(**head_config)
    model = VitWithHead(model, head_module)
    flat = {(k[0], "backbone", *k[1:]): v for k, v in flat.items()}
    flat.update({(k[0], "head", *k[1:]): v for k, v in head_flat.items()})
    unmapped += [f"head.{k}" for k in head_unmapped]
  else:
    unmapped += [f"head.{k}" for k in head]
  family = (
    VIT
    if not load_head
    else common.prefixed_family({"backbone": VIT, "head": head_family(head_config["nlayers"], head_config["use_bn"])})
  )
  missing = common.match_strict(
    flat,
    common.expected_shapes(model, images),
    family=family,
    where=where,
    unmapped=unmapped,
    strict=strict,
    allow_missing=allow_missing,
    allow_unexpected=(*allow_unexpected, *(() if load_head else ("head.*",))),
  )
  flat = common.fill_missing(flat, missing, model, images)
  return model, jax.tree.map(jnp.asarray, common.unflatten(flat))


def load_vit_backbone_params(
  path,
  target_params,
  *,
  which: str = "teacher",
  in_chans: Optional[int] = None,
  band_indices: Optional[Sequence[int]] = None,
):
  """Backbone weights from a checkpoint, shaped like `target_params`, for starting training from them.

  path: any DINO checkpoint dino_vit_from_torch reads, or a jaxgeo file (export.save_jax_file).
  target_params: a freshly initialised backbone params tree (arrays or jax.eval_shape structs), or a tree with "backbone" (then only that
  part is replaced and the rest, e.g. the head, is returned unchanged). Every backbone entry must come from
  the checkpoint (strict); the patch embedding is adapted to the target's input bands (in_chans defaults to
  the target kernel's) and pos_embed is resampled to the target's grid with the model's own bicubic
  interpolation when they differ. Returns numpy float32 arrays (the caller shards/places them).
  """
  wrapped = "backbone" in target_params
  target = target_params["backbone"] if wrapped else target_params
  target_flat = {("params", *k): tuple(v.shape) for k, v in common.flatten(dict(target)).items()}
  channels = in_chans or target_flat[("params", "patch_embed", "proj", "kernel")][2]
  flat, unmapped, where = _backbone_flat(path, which, channels, band_indices)
  pos_key = ("params", "pos_embed")
  if pos_key in flat and pos_key in target_flat and flat[pos_key].shape != target_flat[pos_key]:
    grid = math.isqrt(target_flat[pos_key][1] - 1)
    flat[pos_key] = np.asarray(resample_pos_encoding(flat[pos_key], grid, grid))
  common.match_strict(flat, target_flat, family=VIT, where=where, unmapped=unmapped)
  loaded = common.unflatten({k[1:]: v for k, v in flat.items()})
  return {**target_params, "backbone": loaded} if wrapped else loaded


def _backbone_flat(path, which, in_chans, band_indices):
  """({("params", *path): array}, unmapped, where) from a torch-named checkpoint or a jaxgeo file."""
  if isinstance(path, (str, bytes)) or hasattr(path, "__fspath__"):
    from jaxgeo.bridge.torch_reader import read_safetensors

    where = str(path)
    tensors, metadata = read_safetensors(where) if where.endswith(".safetensors") else ({}, {})
    if common.FORMAT_KEY in metadata:  # jaxgeo file: flax paths already
      flat = {
        ("params", *k.split("/")[1:]): np.asarray(v, np.float32) for k, v in tensors.items() if k.startswith("params/")
      }
      flat = {(k[0], *k[2:]) if k[1] == "backbone" else k: v for k, v in flat.items() if k[1] != "head"}
      kernel_key = ("params", "patch_embed", "proj", "kernel")
      flat[kernel_key] = common.adapt_input_kernel(flat[kernel_key], in_chans, band_indices, where=where)
      return flat, [], where
  checkpoint, where = common.read_checkpoint(path)
  backbone, _, other = split_dino_checkpoint(checkpoint, which, where)
  flat, unmapped = backbone_to_flax(backbone, in_chans=in_chans, band_indices=band_indices, where=where)
  return flat, unmapped + list(other), where
