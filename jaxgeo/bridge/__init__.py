"""PyTorch <-> jaxgeo weights: a torch-free, pickle-safe checkpoint reader, key maps, loaders and export.

    model, variables = dino_vit_from_torch("dino_deitsmall16_pretrain.pth")
    features = model.apply(variables, images_nhwc)          # == reference forward (normed CLS)

    weights = moco_from_torch("moco_v2_200ep_pretrain.pth.tar")  # or the seed's OpenSelfSup MoCo checkpoint
    export_moco_run("runs/moco", "moco.pth.tar")               # a jaxgeo MoCo run, as main_lincls.py reads it

Command line: `python -m jaxgeo.bridge to-jax IN OUT` / `python -m jaxgeo.bridge to-torch IN OUT`.
"""

from jaxgeo.bridge.common import StateDictMismatchError, adapt_input_kernel
from jaxgeo.bridge.export import load_jax_file, save_jax_file, save_state_dict, to_torch_state_dict
from jaxgeo.bridge.moco import export_run as export_moco_run
from jaxgeo.bridge.moco import from_torch as moco_from_torch
from jaxgeo.bridge.moco import init_state as init_moco_state
from jaxgeo.bridge.moco import save as save_moco
from jaxgeo.bridge.moco import to_torch as moco_to_torch
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
  "export_moco_run",
  "init_from_checkpoint",
  "init_moco_state",
  "load_jax_file",
  "load_segmentation_params",
  "load_state",
  "load_vit_backbone_params",
  "moco_from_torch",
  "moco_to_torch",
  "resnet50_from_torch",
  "save_jax_file",
  "save_moco",
  "save_state_dict",
  "segmentation_from_torch",
  "segmentation_to_torch",
  "swin_to_torch",
  "swin_v2_from_torch",
  "to_torch_state_dict",
]
