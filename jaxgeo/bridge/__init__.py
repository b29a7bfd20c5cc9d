"""PyTorch <-> jaxgeo weights: a torch-free, pickle-safe checkpoint reader, key maps, loaders and export.

    model, variables = dino_vit_from_torch("dino_deitsmall16_pretrain.pth")
    features = model.apply(variables, images_nhwc)          # == reference forward (normed CLS)

Command line: `python -m jaxgeo.bridge to-jax IN OUT` / `python -m jaxgeo.bridge to-torch IN OUT`.
"""

from jaxgeo.bridge.common import StateDictMismatchError, adapt_input_kernel
from jaxgeo.bridge.export import load_jax_file, save_jax_file, save_state_dict, to_torch_state_dict
from jaxgeo.bridge.resnet import resnet50_from_torch
from jaxgeo.bridge.swin import (
  load_segmentation_params,
  segmentation_from_torch,
  segmentation_to_torch,
  swin_to_torch,
  swin_v2_from_torch,
)
from jaxgeo.bridge.torch_reader import UnsafeCheckpointError, load_state
from jaxgeo.bridge.vit import VitWithHead, dino_vit_from_torch, load_vit_backbone_params

init_from_checkpoint = load_vit_backbone_params  # the name the training config hook calls

__all__ = [
  "StateDictMismatchError",
  "UnsafeCheckpointError",
  "VitWithHead",
  "adapt_input_kernel",
  "dino_vit_from_torch",
  "init_from_checkpoint",
  "load_jax_file",
  "load_segmentation_params",
  "load_state",
  "load_vit_backbone_params",
  "resnet50_from_torch",
  "save_jax_file",
  "save_state_dict",
  "segmentation_from_torch",
  "segmentation_to_torch",
  "swin_to_torch",
  "swin_v2_from_torch",
  "to_torch_state_dict",
]
