"""Key maps for SwinV2 (torchvision names), torchvision's FeaturePyramidNetwork and the segmentation head;
loaders and export.

Checkpoint layouts understood, recognised by where `features.0.0.weight` and `fpn.inner_blocks.*` sit:
  torchvision  bare features.*, norm.*, head.*: swin_v2_t/s/b files, and TorchGeo's Satlas re-hosts
               (`sentinel2_swinb_si_ms-...pth`: torchvision names, a first conv of N bands)
  satlas       backbone.backbone.features.* (single image) or backbone.backbone.backbone.features.* (multi-image
               AggregationBackbone), intermediates.0.fpn.{inner,layer}_blocks.{i}[.0].* (old and current
               torchvision FPN names), heads.0.* (the task head: never loaded, listed in info["ignored"])
  jaxgeo       backbone.features.*, fpn.{inner,layer}_blocks.{i}.0.*, head.{conv,classifier}.*: a SegmentationModel
               exported by to_torch_state_dict (also what satlaspretrain_models' prefix stripping leaves), or a
               jaxgeo safetensors file (export.save_jax_file)
  wrapped      any of these under {"state_dict" | "model"} and/or with "module." prefixes

The per-block buffers relative_coords_table / relative_position_index are recomputed, not loaded; the
checkpoint's copies are checked against them (a different window or a pretrained-window build is an error).
Every loader returns `info` with the input scaling the weights expect: Satlas weights take 0-1 inputs with no
ImageNet mean/std; torchvision's ImageNet weights take /255 then ImageNet mean/std.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeo.bridge import common
from jaxgeo.models.fpn import SegmentationModel
from jaxgeo.models.swin import SWIN_ARCHS, SwinTransformerV2, relative_coords_table, relative_position_index

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALINGS = ("imagenet", "unit")
_BUFFERS = ("relative_coords_table", "relative_position_index")
_PATCH_KERNEL = ("features_0_0", "kernel")


# ---------------------------------------------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------------------------------------------


def _swin_to_flax(module: str):
  """features.1.0.attn.cpb_mlp.0 -> (features_1_0, attn, cpb_mlp_0): each index joins the name before it."""
  parts = module.split(".")
  if parts[0] not in ("features", "norm", "head"):
    return None
  path: list[str] = []
  for part in parts:
    if part.isdigit() and path:
      path[-1] += f"_{part}"
    else:
      path.append(part)
  return tuple(path)


def _swin_to_torch(path: tuple) -> str:
  return ".".join(re.sub(r"_(\d+)", r".\1", part) for part in path)


SWIN = common.Family(
  "swin_v2", _swin_to_flax, _swin_to_torch, lambda path: path[-1].startswith("norm") or path[-1] == "features_0_2"
)

_FPN_BLOCK = re.compile(r"^(inner|layer)_blocks\.(\d+)(\.0)?$")  # torchvision <= 0.12 has no ".0"


def _fpn_to_flax(module: str):
  match = _FPN_BLOCK.match(module)
  return (f"{match.group(1)}_blocks_{match.group(2)}",) if match else None


FPN = common.Family(
  "fpn", _fpn_to_flax, lambda path: re.sub(r"^(inner|layer)_blocks_(\d+)$", r"\1_blocks.\2.0", path[0]), lambda _: False
)
HEAD = common.Family(
  "segmentation_head", lambda m: (m,) if m in ("conv", "classifier") else None, lambda path: path[0], lambda _: False
)
_FAMILIES = {"backbone": SWIN, "fpn": FPN, "head": HEAD}


def _named_as_in_file(prefixes: Mapping[str, str]) -> common.Family:
  """A family over {"backbone", "fpn", "head"} whose torch names carry the checkpoint's own prefixes, so that
  mismatch messages name keys exactly as the file spells them."""

  def to_torch(path):
    part, rest = path[0], tuple(path[1:])
    return prefixes[part] + _FAMILIES[part].to_torch(rest) if rest else prefixes[part].rstrip(".")

  return common.Family(
    "swin_v2 segmentation",
    lambda module: None,
    to_torch,
    lambda path: len(path) > 1 and _FAMILIES[path[0]].is_norm(tuple(path[1:])),
  )


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layout
# ---------------------------------------------------------------------------------------------------------------


class SwinCheckpoint(NamedTuple):
  backbone: dict  # torch names inside the Swin: features.*, norm.*, head.*
  fpn: dict  # inside the FPN: inner_blocks.*, layer_blocks.*
  head: dict  # jaxgeo segmentation head: conv.*, classifier.*
  other: dict  # everything else, by full name
  prefixes: dict  # {"backbone", "fpn", "head"} -> prefix in the file
  layout: str  # "torchvision" | "satlas" | "jaxgeo"
  where: str


def _read(path_or_state) -> tuple[Any, str, bool]:
  """(checkpoint, where, is_jaxgeo_file): jaxgeo safetensors files come back as torch-named state dicts."""
  if isinstance(path_or_state, (str, os.PathLike)) and os.fspath(path_or_state).endswith(".safetensors"):
    from jaxgeo.bridge.torch_reader import read_safetensors

    where = os.fspath(path_or_state)
    tensors, metadata = read_safetensors(where)
    if common.FORMAT_KEY in metadata:  # flax paths: back to torch names, buffers for the model's own window
      config = json.loads(metadata.get("model", "{}")).get("config", {})
      window = config.get("window_size", 8) if isinstance(config, dict) else 8
      params = common.unflatten({tuple(k.split("/")): v for k, v in tensors.items()}).get("params", {})
      state = segmentation_to_torch(params, window) if "fpn" in params else swin_to_torch(params, window)
      return state, where, True
    return tensors, where, False
  checkpoint, where = common.read_checkpoint(path_or_state)
  return checkpoint, where, False


def split_swin_checkpoint(path_or_state) -> SwinCheckpoint:
  checkpoint, where, is_jaxgeo = _read(path_or_state)
  state, _ = common.pick_state_dict(checkpoint, where, ("state_dict", "model"))
  state = common.strip_prefix({k: v for k, v in state.items() if isinstance(v, np.ndarray)}, ("module.",))
  anchors = sorted({k[: -len("features.0.0.weight")] for k in state if k.endswith("features.0.0.weight")})
  if len(anchors) != 1:
    found = "no" if not anchors else f"{len(anchors)} ({', '.join(a + 'features.0.0.weight' for a in anchors)})"
    raise common.StateDictMismatchError(
      f"{where}: expected one SwinV2 patch embedding `<prefix>features.0.0.weight`, found {found}; "
      f"keys start with {sorted(state)[:5]}"
    )
  backbone_prefix = anchors[0]
  fpn_prefixes = sorted({m.group(1) for m in (re.match(r"^(.*?fpn\.)(inner|layer)_blocks\.", k) for k in state) if m})
  if len(fpn_prefixes) > 1:
    raise common.StateDictMismatchError(f"{where}: several FPNs ({', '.join(fpn_prefixes)}); expected at most one")
  fpn_prefix = fpn_prefixes[0] if fpn_prefixes else "fpn."
  # Our head sits beside a prefixed backbone; a bare torchvision file's head.* is the Swin's own classifier.
  head_prefix = "head." if backbone_prefix else None
  parts = {"backbone": {}, "fpn": {}, "head": {}, "other": {}}
  for key, value in state.items():
    rest = key[len(backbone_prefix) :]
    if key.startswith(backbone_prefix) and rest.split(".")[0] in ("features", "norm", "head"):
      parts["backbone"][rest] = value
    elif fpn_prefixes and key.startswith(fpn_prefix):
      parts["fpn"][key[len(fpn_prefix) :]] = value
    elif head_prefix and re.match(r"^head\.(conv|classifier)\.", key):
      parts["head"][key[len(head_prefix) :]] = value
    else:
      parts["other"][key] = value
  if is_jaxgeo or (backbone_prefix == "backbone." and fpn_prefix == "fpn."):
    layout = "jaxgeo"
  elif "backbone.backbone." in backbone_prefix or "intermediates." in fpn_prefix:
    layout = "satlas"
  else:
    layout = "torchvision"
  prefixes = {"backbone": backbone_prefix, "fpn": fpn_prefix, "head": "head."}
  return SwinCheckpoint(parts["backbone"], parts["fpn"], parts["head"], parts["other"], prefixes, layout, where)


def infer_swin_config(backbone: Mapping[str, np.ndarray], where: str = "<state dict>") -> dict:
  """SwinTransformerV2 fields from tensor shapes: heads from each stage's logit_scale, the window from the
  coordinate-table buffer (8 when the file has no buffers)."""
  try:
    kernel = backbone["features.0.0.weight"]
    embed_dim, in_chans, patch_size = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
    blocks = [re.match(r"^features\.(\d+)\.(\d+)\.", k) for k in backbone]
    last = max(int(m.group(1)) for m in blocks if m and int(m.group(1)) % 2 == 1)
    depths, num_heads = [], []
    for index in range(1, last + 1, 2):
      depths.append(1 + max(int(m.group(2)) for m in blocks if m and int(m.group(1)) == index))
      num_heads.append(backbone[f"features.{index}.0.attn.logit_scale"].shape[0])
    hidden = backbone["features.1.0.mlp.0.weight"].shape[0]
  except (KeyError, ValueError) as err:
    raise common.StateDictMismatchError(
      f"{where}: does not look like a torchvision SwinV2 (missing {err}); its keys start with {sorted(backbone)[:5]}"
    ) from None
  table = backbone.get("features.1.0.attn.relative_coords_table")
  window = (table.shape[1] + 1) // 2 if table is not None and table.ndim == 4 else 8
  config = dict(
    embed_dim=embed_dim,
    depths=tuple(depths),
    num_heads=tuple(num_heads),
    window_size=window,
    patch_size=patch_size,
    mlp_ratio=hidden / embed_dim,
  )
  arch = next((name for name, spec in SWIN_ARCHS.items() if all(config[k] == v for k, v in spec.items())), None)
  classes = backbone["head.weight"].shape[0] if "head.weight" in backbone else None
  return dict(arch=arch, in_chans=in_chans, num_classes=classes, config=config)


def input_scaling(kind: str, bands: int, in_chans=None, band_indices=None, *, where: str = "") -> dict:
  """{"kind", "mean", "std", "note"} for the model's input bands: x01 = image in 0-1 units (/255 for 8-bit),
  then (x01 - mean) / std per band. Bands are picked and tiled as common.adapt_input_kernel does the kernel."""
  if kind not in SCALINGS:
    raise ValueError(f"{where}: input_scaling must be one of {SCALINGS}, got {kind!r}")
  if kind == "unit":
    channels = in_chans or (len(band_indices) if band_indices is not None else bands)
    note = "Satlas: 0-1 inputs, no ImageNet mean/std (8-bit RGB / 255, Sentinel-2 B05-B12 / 8160, clipped)"
    return dict(kind="unit", mean=(0.0,) * channels, std=(1.0,) * channels, note=note)
  if bands != 3:
    raise ValueError(f"{where}: ImageNet mean/std is defined for 3 (RGB) bands, the checkpoint has {bands}")
  stats = np.array([IMAGENET_MEAN, IMAGENET_STD])
  if band_indices is not None:
    stats = stats[:, list(band_indices)]
  if in_chans == 1 and stats.shape[1] == 3:  # the adapted kernel sums R, G and B: a grey band
    stats = stats.mean(axis=1, keepdims=True)
  elif in_chans is not None and in_chans != stats.shape[1]:  # kernels tiled R, G, B, R, ...
    stats = np.concatenate([stats] * -(-in_chans // stats.shape[1]), axis=1)[:, :in_chans]
  mean, std = (tuple(float(v) for v in row) for row in stats)
  return dict(kind="imagenet", mean=mean, std=std, note="torchvision: image / 255, then ImageNet mean/std")


def _scaling_kind(ckpt: SwinCheckpoint, bands: int, requested: Optional[str]) -> tuple[str, bool]:
  """(kind, guessed). Only the Satlas layout says it; a torchvision-named file with other than 3 bands is
  not an ImageNet model (TorchGeo's Satlas re-hosts), an RGB one may be either."""
  if requested is not None:
    return requested, False
  if ckpt.layout == "satlas":
    return "unit", False
  return ("unit" if bands != 3 else "imagenet"), True


# ---------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------


def swin_to_flax(backbone, *, window_size: int, in_chans=None, band_indices=None, where="<state dict>"):
  """Swin torch state -> ({(params, *path): float32}, unmapped torch keys). Buffers are checked, not loaded."""
  expected = {
    "relative_coords_table": relative_coords_table(window_size),
    "relative_position_index": relative_position_index(window_size),
  }
  flat, rest, bad = {}, {}, []
  for key, value in backbone.items():
    module, _, leaf = key.rpartition(".")
    if leaf in _BUFFERS:
      want = expected[leaf]
      if value.shape != want.shape or not np.allclose(np.asarray(value, np.float64), want, rtol=0, atol=1e-5):
        bad.append(f"{key}: differs from torchvision's for window {window_size}")
    elif leaf == "logit_scale" and _swin_to_flax(module) is not None:
      flat[("params", *_swin_to_flax(module), leaf)] = value  # a bare Parameter: no leaf rule in common
    else:
      rest[key] = value
  if bad:
    raise common.StateDictMismatchError(f"{where}: buffers " + "; ".join(bad))
  converted, unmapped = common.torch_to_flax(rest, SWIN)
  flat.update(converted)
  kernel_key = ("params", *_PATCH_KERNEL)
  if kernel_key in flat:
    flat[kernel_key] = common.adapt_input_kernel(flat[kernel_key], in_chans, band_indices, where=where)
  return common.as_float32(flat), unmapped


def _prefixed(family: common.Family, prefix: str) -> common.Family:
  """The family with the checkpoint's prefix on every torch name (for messages that match the file)."""
  return family._replace(to_torch=lambda path: prefix + family.to_torch(path) if path else prefix.rstrip("."))


def _part_to_flax(state, family, part, where="<state dict>", prefix=""):
  names: dict[tuple, list[str]] = {}
  for key in state:
    module, _, leaf = key.rpartition(".")
    path = family.to_flax(module)
    if path is not None:
      names.setdefault((*path, leaf), []).append(prefix + key)
  clashes = ["; ".join(", ".join(sorted(keys)) for keys in names.values() if len(keys) > 1)]
  if clashes[0]:  # both torchvision FPN key forms of one conv: which one is meant is anyone's guess
    raise common.StateDictMismatchError(f"{where}: keys naming the same weight: {clashes[0]}")
  flat, unmapped = common.torch_to_flax(state, family)
  return {(k[0], part, *k[1:]): v for k, v in common.as_float32(flat).items()}, unmapped


def infer_fpn_config(fpn: Mapping[str, np.ndarray], where: str = "<state dict>") -> tuple[int, list[int]]:
  """(out_channels, in_channels per level) of a torchvision FPN state, either key form."""
  inner = {}
  for key, value in fpn.items():
    match = re.match(r"^inner_blocks\.(\d+)(\.0)?\.weight$", key)
    if match:
      inner[int(match.group(1))] = value.shape
  if sorted(inner) != list(range(len(inner))) or not inner:
    raise common.StateDictMismatchError(
      f"{where}: FPN inner_blocks.{{i}}.weight are not numbered 0..n-1: {sorted(inner)}"
    )
  return inner[0][0], [inner[i][1] for i in range(len(inner))]


def _segmentation_flat(ckpt: SwinCheckpoint, window_size, in_chans, band_indices, load_fpn, load_head):
  """({(params, backbone|fpn|head, *path): array}, unmapped, ignored) for a SegmentationModel."""
  flat, unmapped = swin_to_flax(
    ckpt.backbone, window_size=window_size, in_chans=in_chans, band_indices=band_indices, where=ckpt.where
  )
  # The torchvision classifier (final norm + head) is unused by segmentation: Satlas files carry it too.
  flat = {(k[0], "backbone", *k[1:]): v for k, v in flat.items() if k[1] not in ("norm", "head")}
  unmapped = [ckpt.prefixes["backbone"] + k for k in unmapped]
  ignored = [ckpt.prefixes["backbone"] + k for k in ckpt.backbone if k.split(".")[0] in ("norm", "head")]
  for part, family, state, wanted in (("fpn", FPN, ckpt.fpn, load_fpn), ("head", HEAD, ckpt.head, load_head)):
    if not wanted:
      ignored += [ckpt.prefixes[part] + k for k in state]
      continue
    part_flat, part_unmapped = _part_to_flax(state, family, part, ckpt.where, ckpt.prefixes[part])
    flat.update(part_flat)
    unmapped += [ckpt.prefixes[part] + k for k in part_unmapped]
  for key in ckpt.other:  # Satlas' task heads are never loaded (satlaspretrain_models does not either)
    (ignored if key.startswith("heads.") else unmapped).append(key)
  return flat, unmapped, ignored


def _info(ckpt, found, channels, band_indices, scaling, loaded, ignored) -> dict:
  """What was loaded and how to feed it. input_scaling["guessed"]: the file does not say; pass input_scaling=."""
  kind, guessed = _scaling_kind(ckpt, found["in_chans"], scaling)
  in_chans = None if band_indices is not None and channels == len(band_indices) else channels
  return dict(
    layout=ckpt.layout,
    where=ckpt.where,
    arch=found["arch"],
    config=found["config"],
    checkpoint_bands=found["in_chans"],
    in_chans=channels,
    input_scaling=dict(
      input_scaling(kind, found["in_chans"], in_chans, band_indices, where=ckpt.where), guessed=guessed
    ),
    loaded=loaded,
    ignored=sorted(ignored),
  )


def _channels(found, in_chans, band_indices) -> int:
  return in_chans or (len(band_indices) if band_indices is not None else found["in_chans"])


def swin_v2_from_torch(
  path_or_state_dict,
  *,
  load_head: bool = True,
  in_chans: Optional[int] = None,
  band_indices: Optional[Sequence[int]] = None,
  input_scaling: Optional[str] = None,
  strict: bool = True,
  allow_missing: Sequence[str] = (),
  allow_unexpected: Sequence[str] = (),
  **model_overrides,
):
  """(SwinTransformerV2, variables, info) from any layout above; the architecture comes from the tensors.

  model.apply(variables, images) on NHWC images equals torchvision's forward (logits when the file has a
  classifier and load_head, else the pooled normed features); features_only=True gives the stage outputs,
  and is the only way to call a model from a file without the final norm (info["features_only"]).
  FPN / segmentation / Satlas task heads in the file are ignored (listed in info["ignored"]).
  in_chans / band_indices adapt the patch embedding (common.adapt_input_kernel); input_scaling ("imagenet" |
  "unit") overrides the guess (unit for Satlas layouts and non-RGB files, else ImageNet): pass "unit" for
  TorchGeo's RGB Satlas re-hosts, which carry plain torchvision names.
  """
  ckpt = split_swin_checkpoint(path_or_state_dict)
  found = infer_swin_config(ckpt.backbone, ckpt.where)
  config = dict(found["config"])
  if load_head and found["num_classes"] is not None:
    config["num_classes"] = found["num_classes"]
  config.update(model_overrides)
  model = SwinTransformerV2(**config)
  flat, unmapped = swin_to_flax(
    ckpt.backbone, window_size=model.window_size, in_chans=in_chans, band_indices=band_indices, where=ckpt.where
  )
  ignored = [ckpt.prefixes["fpn"] + k for k in ckpt.fpn] + [ckpt.prefixes["head"] + k for k in ckpt.head]
  if model.num_classes is None:
    ignored += [ckpt.prefixes["backbone"] + k for k in ckpt.backbone if k.startswith("head.")]
    flat = {k: v for k, v in flat.items() if k[1] != "head"}
  unmapped = [ckpt.prefixes["backbone"] + k for k in unmapped]
  for key in ckpt.other:
    (ignored if key.startswith("heads.") else unmapped).append(key)
  channels = _channels(found, in_chans, band_indices)
  images = jnp.zeros((1, 8 * model.patch_size, 8 * model.patch_size, channels), jnp.float32)
  # A file without the final norm (a features-only backbone) gives a model used with features_only=True.
  features_only = not any(k.startswith("norm.") for k in ckpt.backbone)
  init = functools.partial(model.init, train=False, features_only=features_only)
  shapes = jax.eval_shape(init, jax.random.key(0), images)
  missing = common.match_strict(
    flat,
    {k: tuple(v.shape) for k, v in common.flatten(dict(shapes)).items()},
    family=_prefixed(SWIN, ckpt.prefixes["backbone"]),
    where=ckpt.where,
    unmapped=unmapped,
    strict=strict,
    allow_missing=allow_missing,
    allow_unexpected=allow_unexpected,
  )
  info = _info(ckpt, found, channels, band_indices, input_scaling, ["backbone"], ignored)
  info["features_only"] = features_only
  flat = common.fill_missing(flat, missing, model, images, False, features_only)  # closed over: static
  return model, jax.tree.map(jnp.asarray, common.unflatten(flat)), info


def segmentation_from_torch(
  path_or_state_dict,
  *,
  num_classes: Optional[int] = None,
  load_fpn: bool = True,
  load_head: bool = True,
  in_chans: Optional[int] = None,
  band_indices: Optional[Sequence[int]] = None,
  input_scaling: Optional[str] = None,
  strict: bool = True,
  allow_missing: Sequence[str] = (),
  allow_unexpected: Sequence[str] = (),
  **model_overrides,
):
  """(SegmentationModel, variables, info) from a torchvision Swin, a Satlas checkpoint or a jaxgeo export.

  The Swin is loaded strictly; the FPN (fpn_channels and levels read from its convs) and the segmentation
  head (num_classes, head_channels, fusion) come from the file when it has them, else they are initialised
  (seed 0) and listed in info["initialised"]; num_classes is then required. **model_overrides go to
  SegmentationModel (dtype, drop_path_rate, levels, fusion...); a disagreeing checkpoint is reported as shape
  mismatches. See swin_v2_from_torch for in_chans / band_indices / input_scaling.
  """
  ckpt = split_swin_checkpoint(path_or_state_dict)
  found = infer_swin_config(ckpt.backbone, ckpt.where)
  fields = dict(found["config"], levels=tuple(range(len(found["config"]["depths"]))))
  has_fpn, has_head = load_fpn and bool(ckpt.fpn), load_head and bool(ckpt.head)
  if has_fpn:
    fpn_channels, in_channels = infer_fpn_config(ckpt.fpn, ckpt.where)
    widths = [fields["embed_dim"] * 2**stage for stage in range(len(fields["depths"]))]
    if not set(in_channels) <= set(widths):
      raise common.StateDictMismatchError(
        f"{ckpt.where}: FPN input widths {in_channels} are not stage widths of the Swin {widths}"
      )
    fields.update(fpn_channels=fpn_channels, levels=tuple(widths.index(c) for c in in_channels))
  if has_head:
    conv, classifier = ckpt.head.get("conv.weight"), ckpt.head.get("classifier.weight")
    if conv is not None and classifier is not None:
      fused = fields.get("fpn_channels", 128)
      fields.update(head_channels=conv.shape[0], num_classes=classifier.shape[0])
      fields["fusion"] = "sum" if conv.shape[1] == fused else "concat"
  if num_classes is not None:
    fields["num_classes"] = num_classes
  if "num_classes" not in fields:
    raise ValueError(f"{ckpt.where}: the checkpoint has no segmentation head (head.classifier.*); pass num_classes")
  channels = _channels(found, in_chans, band_indices)
  model = SegmentationModel(**{**fields, "in_chans": channels, **model_overrides})
  flat, unmapped, ignored = _segmentation_flat(ckpt, model.window_size, in_chans, band_indices, has_fpn, has_head)
  images = jnp.zeros((1, 32, 32, channels), jnp.float32)  # param shapes do not depend on the size
  initialised = [part for part, loaded in (("fpn", has_fpn), ("head", has_head)) if not loaded]
  missing = common.match_strict(
    flat,
    common.expected_shapes(model, images),
    family=_named_as_in_file(ckpt.prefixes),
    where=ckpt.where,
    unmapped=unmapped,
    strict=strict,
    allow_missing=(*allow_missing, *(f"{ckpt.prefixes[part]}*" for part in initialised)),
    allow_unexpected=allow_unexpected,
  )
  loaded = ["backbone"] + [part for part in ("fpn", "head") if part not in initialised]
  info = _info(ckpt, found, channels, band_indices, input_scaling, loaded, ignored)
  info["initialised"] = initialised
  flat = common.fill_missing(flat, missing, model, images)
  return model, jax.tree.map(jnp.asarray, common.unflatten(flat)), info


def load_segmentation_params(
  path_or_state_dict,
  target_params,
  *,
  load_head: bool = True,
  in_chans: Optional[int] = None,
  band_indices: Optional[Sequence[int]] = None,
  input_scaling: Optional[str] = None,
):
  """(params, info): a SegmentationModel params tree {"backbone", "fpn", "head"} (arrays, e.g. fresh from
  model.init) with the checkpoint's weights put in, for starting training from them.

  The backbone must come whole from the checkpoint (strict); the FPN is taken when the file has one (and must
  then match); the head only when the file has one of the same shapes (another class count keeps the fresh
  head: info["initialised"] says so). in_chans defaults to the target's input bands.
  """
  if "backbone" not in target_params:
    raise ValueError(f"swin.py: target_params must be a SegmentationModel tree, got keys {sorted(target_params)}")
  ckpt = split_swin_checkpoint(path_or_state_dict)
  found = infer_swin_config(ckpt.backbone, ckpt.where)
  target = {("params", *k): tuple(v.shape) for k, v in common.flatten(dict(target_params)).items()}
  channels = in_chans or target[("params", "backbone", *_PATCH_KERNEL)][2]
  window = found["config"]["window_size"]
  flat, unmapped, ignored = _segmentation_flat(ckpt, window, channels, band_indices, True, load_head)
  head = {k: v for k, v in flat.items() if k[1] == "head"}
  if head and any(target.get(k) != tuple(v.shape) for k, v in head.items()):
    logging.info("%s: segmentation head shapes differ from the target's; keeping the target's head", ckpt.where)
    flat = {k: v for k, v in flat.items() if k[1] != "head"}
    ignored += [ckpt.prefixes["head"] + k for k in ckpt.head]
  initialised = [part for part in ("fpn", "head") if not any(k[1] == part for k in flat)]
  missing = common.match_strict(
    flat,
    target,
    family=_named_as_in_file(ckpt.prefixes),
    where=ckpt.where,
    unmapped=unmapped,
    allow_missing=tuple(f"{ckpt.prefixes[part]}*" for part in initialised),
  )
  loaded = ["backbone"] + [part for part in ("fpn", "head") if part not in initialised]
  info = _info(ckpt, found, channels, band_indices, input_scaling, loaded, ignored)
  info["initialised"] = initialised
  missing = set(missing)
  kept = {k: v for k, v in common.flatten(dict(target_params)).items() if ("params", *k) in missing}
  loaded = {k[1:]: v for k, v in flat.items()}
  return common.unflatten({**kept, **loaded}), info


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def swin_to_torch(params, window_size: int = 8, prefix: str = "") -> dict[str, np.ndarray]:
  """A SwinTransformerV2 params tree -> torchvision names, with the per-block buffers torchvision's strict
  load_state_dict wants (recomputed for `window_size`, 8 in every torchvision / Satlas model)."""
  flat = {("params", *k): v for k, v in common.flatten(dict(params)).items()}
  state = {prefix + k: v for k, v in common.flax_to_torch(flat, SWIN).items()}
  for name in params:
    if re.fullmatch(r"features_\d+_\d+", name) and "attn" in params[name]:
      module = f"{prefix}{_swin_to_torch((name,))}.attn"
      state[f"{module}.relative_coords_table"] = relative_coords_table(window_size)
      state[f"{module}.relative_position_index"] = relative_position_index(window_size)
  return state


def segmentation_to_torch(params, window_size: int = 8) -> dict[str, np.ndarray]:
  """SegmentationModel params -> "backbone.*" (torchvision Swin), "fpn.*" (current torchvision FPN names,
  inner_blocks.{i}.0.*), "head.*": benchmarks/torch_swin.SegmentationModel loads it with strict=True."""
  state = swin_to_torch(params["backbone"], window_size, "backbone.")
  for part in ("fpn", "head"):
    flat = {("params", *k): v for k, v in common.flatten(dict(params[part])).items()}
    state.update({f"{part}.{k}": v for k, v in common.flax_to_torch(flat, _FAMILIES[part]).items()})
  return state
