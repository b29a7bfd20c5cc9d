"""Weights converter, both directions.

  python -m jaxgeo.bridge to-jax  IN.pth|IN.safetensors  OUT.safetensors  [--which student] [--head]
                                  [--in-chans 12] [--family vit|resnet50] [--no-strict]
  python -m jaxgeo.bridge to-torch IN.safetensors|WORKDIR OUT.pth|OUT.safetensors [--which teacher|params]

to-jax writes the jaxgeo file format (safetensors, flax paths, model config in the metadata; no pickle). A MoCo
checkpoint (facebookresearch/moco or the seed's OpenSelfSup) gives its query encoder with the MLP projector
(`--which encoder_k`: the key encoder) and the S2 / single band adapter as the ResNet's adapter.
to-torch takes such a file or a jaxgeo training workdir (orbax checkpoints; `--which` picks teacher or
student params) and writes reference PyTorch names (.pth needs torch; .safetensors always works). A MoCo run's
workdir becomes a whole MoCo checkpoint in facebookresearch/moco's layout (main_lincls.py --pretrained reads it),
band adapters under the seed's input_module_q / input_module_k names (jaxgeo/bridge/moco.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxgeo.bridge import common, export, moco
from jaxgeo.bridge.resnet import resnet50_from_torch
from jaxgeo.bridge.vit import dino_vit_from_torch


def _guess_family(checkpoint) -> str:
  names = " ".join(_tensor_names(checkpoint))
  if "cls_token" in names or "pos_embed" in names:
    return "vit"
  if "conv1.weight" in names and "layer1.0." in names:
    return "resnet50"
  raise SystemExit("cannot tell whether the checkpoint holds a DINO ViT or a ResNet-50; pass --family")


def _tensor_names(node, prefix=""):
  if hasattr(node, "items"):
    for key, value in node.items():
      yield from _tensor_names(value, f"{prefix}{key}.")
  elif hasattr(node, "shape"):
    yield prefix


def to_jax(args) -> None:
  checkpoint, _ = common.read_checkpoint(args.input)
  family = args.family or _guess_family(checkpoint)
  strict = dict(strict=not args.no_strict)
  if family == "vit":
    model, variables = dino_vit_from_torch(
      checkpoint, which=args.which or "teacher", load_head=args.head, in_chans=args.in_chans, **strict
    )
  elif moco.is_moco_checkpoint(checkpoint, args.input) and not args.no_fc and not args.in_chans:
    # facebookresearch/moco or the seed's OpenSelfSup layout: one encoder (+ the S2 / single band adapter)
    model, variables = moco.resnet_from_moco(checkpoint, which=args.which or "encoder_q")
  else:
    model, variables = resnet50_from_torch(
      checkpoint, which=args.which, load_fc=not args.no_fc, in_chans=args.in_chans, **strict
    )
  export.save_jax_file(model, variables, args.output)
  print(f"{args.input} -> {args.output}: {export.model_spec(model)['family']}")


def to_torch(args) -> None:
  if os.path.isdir(args.input) and _run_method(args.input) == "moco":
    from jaxgeo.bridge import moco

    print(f"{args.input} -> {moco.export_run(args.input, args.output)}: MoCo checkpoint (module.encoder_q.*, ...)")
    return
  if os.path.isdir(args.input):
    from jaxgeo.checkpoint import load_params  # lead's orbax reader; only needed for workdirs

    variables = {"params": load_params(args.input, which=args.which or "teacher")}
  else:
    _, variables = export.load_jax_file(args.input)
  state = export.to_torch_state_dict(variables)
  export.save_state_dict(state, args.output)
  print(f"{args.input} -> {args.output}: {len(state)} tensors")


def _run_method(workdir):
  from jaxgeo import workdir as workdir_lib

  try:
    return workdir_lib.load_config(workdir).get("method")
  except FileNotFoundError:
    return None


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m jaxgeo.bridge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = parser.add_subparsers(dest="command", required=True)
  jax_parser = sub.add_parser("to-jax", help="PyTorch checkpoint -> jaxgeo safetensors")
  jax_parser.add_argument("input")
  jax_parser.add_argument("output")
  jax_parser.add_argument("--family", choices=("vit", "resnet50"))
  jax_parser.add_argument("--which", help="DINO: teacher (default) | student; MoCo: encoder_q | encoder_k")
  jax_parser.add_argument("--head", action="store_true", help="DINO: keep the DINOHead too")
  jax_parser.add_argument("--no-fc", action="store_true", help="ResNet: drop the fc / MoCo projector")
  jax_parser.add_argument("--in-chans", type=int, help="adapt the RGB input layer to this many bands")
  jax_parser.add_argument("--no-strict", action="store_true", help="tolerate missing / unexpected keys")
  torch_parser = sub.add_parser("to-torch", help="jaxgeo safetensors or workdir -> PyTorch state dict")
  torch_parser.add_argument("input")
  torch_parser.add_argument("output", help=".pth (needs torch) or .safetensors")
  torch_parser.add_argument("--which", help="workdir only: teacher (default) | params (student)")
  args = parser.parse_args(argv)
  (to_jax if args.command == "to-jax" else to_torch)(args)


if __name__ == "__main__":
  main(sys.argv[1:])
