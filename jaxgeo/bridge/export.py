"""jaxgeo params -> PyTorch state dicts with the reference names, and the jaxgeo-side file format.

Exported names load with strict=True into: the DINO VisionTransformer (backbone only: bare keys, as the
released files), MultiCropWrapper(backbone, DINOHead) (backbone + head: "backbone.*" / "head.*"), torchvision's
resnet50 (fc / MoCo fc.0, fc.2 when the model has one; "adapter.0/1" for a band adapter, which torchvision has
no slot for), torchvision's swin_v2_t/s/b (with the window-8 buffers) and the SwinV2 SegmentationModel
("backbone.*" torchvision Swin, "fpn.*" torchvision FPN, "head.*"; benchmarks/torch_swin.py).

The jaxgeo file format is safetensors (no pickle) with '/'-joined flax paths ("params/blocks_0/attn/qkv/kernel")
and the model's constructor fields as JSON in the metadata, so `load_jax_file` rebuilds (model, variables).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from jaxgeo.bridge import common
from jaxgeo.bridge.common import FORMAT_KEY, FORMAT_VERSION
from jaxgeo.bridge.resnet import RESNET
from jaxgeo.bridge.swin import segmentation_to_torch, swin_to_torch
from jaxgeo.bridge.vit import VIT, VitWithHead, head_to_torch


def _numpy_tree(tree):
  return {k: _numpy_tree(v) if hasattr(v, "items") else np.asarray(v) for k, v in tree.items()}


def _head_layout(head_params) -> tuple[int, bool]:
  return sum(1 for k in head_params if k.startswith("mlp_")), any(k.startswith("bn_") for k in head_params)


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Torch-named numpy state dict from {"params": ..., ["batch_stats": ...]} or a bare params tree.

  The family is recognised from the names: cls_token (ViT), backbone + head (ViT + DINOHead), conv1 +
  layer1_0 (ResNet-50), features_0_0 (SwinV2; buffers for window 8), backbone + fpn + head (SwinV2
  SegmentationModel).
  """
  variables = _numpy_tree(dict(variables))
  params = variables.get("params", variables)
  stats = variables.get("batch_stats", {})
  if "fpn" in params and "features_0_0" in params.get("backbone", {}):
    return segmentation_to_torch(params)
  if "features_0_0" in params:
    return swin_to_torch(params)
  if "backbone" in params and "head" in params:
    state = {f"backbone.{k}": v for k, v in vit_to_torch(params["backbone"]).items()}
    nlayers, use_bn = _head_layout(params["head"])
    state.update({f"head.{k}": v for k, v in head_to_torch(params["head"], nlayers, use_bn, stats.get("head")).items()})
    return state
  if "cls_token" in params:
    return vit_to_torch(params)
  if "conv1" in params and "layer1_0" in params:
    flat = {("params", *k): v for k, v in common.flatten(params).items()}
    flat.update({("batch_stats", *k): v for k, v in common.flatten(stats).items()})
    return common.flax_to_torch(flat, RESNET)
  raise ValueError(
    f"export.py: cannot tell the model family from params with top-level names "
    f"{sorted(params)[:8]}; expected cls_token (ViT), backbone+head or conv1+layer1_0 (ResNet)"
  )


def vit_to_torch(params) -> dict[str, np.ndarray]:
  return common.flax_to_torch({("params", *k): v for k, v in common.flatten(params).items()}, VIT)


def save_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """.safetensors always works; .pth/.pt needs torch (written with torch.save, loadable by torch.load
  with weights_only=True)."""
  path = os.fspath(path)
  state = {k: np.ascontiguousarray(v) for k, v in state.items()}
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file

    save_file(state, path)
    return
  try:
    import torch
  except ImportError:
    raise RuntimeError(
      f"{path}: writing .pth needs torch, which is not installed; write .safetensors "
      "instead (torch loads it with safetensors.torch.load_file)"
    ) from None
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)


# ---------------------------------------------------------------------------------------------------------------
# jaxgeo files
# ---------------------------------------------------------------------------------------------------------------


def _fields(module) -> dict:
  skip = {"parent", "name", "dtype"}
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in skip}


def model_spec(model) -> dict:
  """JSON-able description of a bridge model: {"family", "config"}."""
  from jaxgeo.models.fpn import SegmentationModel
  from jaxgeo.models.resnet import ResNet50
  from jaxgeo.models.swin import SwinTransformerV2
  from jaxgeo.models.vit import VisionTransformer

  if isinstance(model, (SwinTransformerV2, SegmentationModel)):
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in _fields(model).items()}
    return {"family": "swin_v2" if isinstance(model, SwinTransformerV2) else "swin_segmentation", "config": config}
  if isinstance(model, VitWithHead):
    return {"family": "vit+dino_head", "config": {"backbone": _fields(model.backbone), "head": _fields(model.head)}}
  if isinstance(model, VisionTransformer):
    return {"family": "vit", "config": _fields(model)}
  if isinstance(model, ResNet50):
    config = _fields(model)
    config["stages"] = list(config["stages"])
    return {"family": "resnet50", "config": config}
  raise ValueError(f"export.py: no jaxgeo file format for {type(model).__name__}")


def build_model(spec: Mapping[str, Any]):
  from jaxgeo.models.fpn import SegmentationModel
  from jaxgeo.models.heads import DINOHead
  from jaxgeo.models.resnet import ResNet50
  from jaxgeo.models.swin import SwinTransformerV2
  from jaxgeo.models.vit import VisionTransformer

  family, config = spec["family"], spec["config"]
  if family in ("swin_v2", "swin_segmentation"):
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return (SwinTransformerV2 if family == "swin_v2" else SegmentationModel)(**config)
  if family == "vit":
    return VisionTransformer(**config)
  if family == "vit+dino_head":
    return VitWithHead(VisionTransformer(**config["backbone"]), DINOHead(**config["head"]))
  if family == "resnet50":
    return ResNet50(**{**config, "stages": tuple(config["stages"])})
  raise ValueError(f"export.py: unknown model family {family!r}")


def save_jax_file(model, variables, path: str | os.PathLike) -> None:
  from safetensors.numpy import save_file

  flat = {"/".join(k): np.ascontiguousarray(v) for k, v in common.flatten(_numpy_tree(dict(variables))).items()}
  save_file(flat, os.fspath(path), metadata={FORMAT_KEY: FORMAT_VERSION, "model": json.dumps(model_spec(model))})


def load_jax_file(path: str | os.PathLike, model_overrides: Optional[Mapping[str, Any]] = None):
  """-> (model, variables) from a file written by save_jax_file / `python -m jaxgeo.bridge to-jax`."""
  from jaxgeo.bridge.torch_reader import read_safetensors

  tensors, metadata = read_safetensors(os.fspath(path))
  if metadata.get(FORMAT_KEY) != FORMAT_VERSION:
    raise ValueError(
      f"{path}: not a jaxgeo weights file (metadata {FORMAT_KEY!r} missing); torch-named "
      "files load with dino_vit_from_torch / resnet50_from_torch"
    )
  spec = json.loads(metadata["model"])
  if model_overrides:
    target = spec["config"]["backbone"] if spec["family"] == "vit+dino_head" else spec["config"]
    target.update(model_overrides)
  return build_model(spec), common.unflatten({tuple(k.split("/")): v for k, v in tensors.items()})
