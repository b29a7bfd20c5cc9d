"""Key map for ResNet-50 (torchvision names) and its loader.

Checkpoint layouts understood:
  torchvision / timm      bare keys conv1.*, bn1.*, layerS.I.{conv,bn}{1,2,3}.*, layerS.I.downsample.{0,1}.*, fc.*
                          (timm's resnet50 uses the same names; SSL4EO-S12 style files have a 13-band conv1)
  MoCo v2                 {"state_dict": {"module.encoder_q.*", "module.encoder_k.*", "module.queue", ...}}
                          with the projector in fc.0 / fc.2; the query encoder is taken unless `which` says
  wrapped                 {"state_dict" | "model": ...}, keys prefixed "module." / "backbone." / "model." /
                          "encoder."
  jaxgeo exports          the above names plus adapter.0 (1x1 conv) / adapter.1 (BatchNorm) for the band adapter
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeo.bridge import common
from jaxgeo.models.resnet import ResNet50

_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])$")
_RENAMES = {
  "downsample.0": "downsample_conv",
  "downsample.1": "downsample_bn",
  "fc.0": "fc_0",
  "fc.2": "fc_1",
  "adapter.0": "adapter_conv",
  "adapter.1": "adapter_bn",
}
_TOP = {"conv1", "bn1", "fc", "fc.0", "fc.2", "adapter.0", "adapter.1"}


def _to_flax(module: str):
  match = _BLOCK.match(module)
  if match:
    stage, index, layer = match.groups()
    return (f"layer{stage}_{index}", _RENAMES.get(layer, layer))
  return (_RENAMES.get(module, module),) if module in _TOP else None


def _to_torch(path: tuple) -> str:
  back = {v: k for k, v in _RENAMES.items()}
  names = [back.get(p, p) for p in path]
  names[0] = re.sub(r"^layer(\d)_(\d+)$", r"layer\1.\2", names[0])
  return ".".join(names)


RESNET = common.Family("resnet50", _to_flax, _to_torch, lambda path: "bn" in path[-1])


def resnet_state(checkpoint, which: Optional[str] = None, where: str = "<state dict>"):
  """The flat torch state of one ResNet inside any of the layouts above."""
  state, _ = common.pick_state_dict(checkpoint, where, ("state_dict", "model"))
  state = common.strip_prefix({k: v for k, v in state.items() if isinstance(v, np.ndarray)}, ("module.",))
  if which is None and any(k.startswith("encoder_q.") for k in state):
    which = "encoder_q"
  if which is not None:
    state = common.subtree(state, which.rstrip(".") + ".")
    if not state:
      raise ValueError(f"{where}: no keys under {which!r}")
  return common.strip_prefix(state, ("backbone.", "model.", "encoder."))


def infer_head(state) -> dict:
  if "fc.0.weight" in state and "fc.2.weight" in state:
    return dict(head="mlp", mlp_hidden=state["fc.0.weight"].shape[0], num_classes=state["fc.2.weight"].shape[0])
  if "fc.weight" in state:
    return dict(head="linear", num_classes=state["fc.weight"].shape[0])
  return dict(head=None)


def resnet50_from_torch(
  path_or_state_dict,
  *,
  which: Optional[str] = None,
  load_fc: bool = True,
  in_chans: Optional[int] = None,
  band_indices: Optional[Sequence[int]] = None,
  band_adapter: bool = False,
  strict: bool = True,
  allow_missing: Sequence[str] = (),
  allow_unexpected: Sequence[str] = (),
  **model_overrides,
):
  """A ready (model, {"params", "batch_stats"}) from a torchvision / timm / MoCo ResNet-50 checkpoint.

  model.apply(variables, images) on NHWC float images equals torchvision's eval forward (logits when the
  checkpoint has an fc and load_fc, pooled 2048-d features otherwise; return_features=True gives both).
  which: sub-model prefix ("encoder_q" is picked automatically for MoCo, "encoder_k" on request).
  in_chans / band_indices adapt conv1 to other bands (see common.adapt_input_kernel). band_adapter=True puts
  a freshly initialised 1x1 adapter in front (input bands = in_chans, default 3) unless the file has one.
  """
  checkpoint, where = common.read_checkpoint(path_or_state_dict)
  state = resnet_state(checkpoint, which, where)
  head = infer_head(state) if load_fc else dict(head=None)
  model = ResNet50(band_adapter=band_adapter, **{**head, **model_overrides})
  flat, unmapped = common.torch_to_flax(state, RESNET)
  if not load_fc:
    unmapped = [k for k in unmapped if not k.startswith("fc.")]
    flat = {k: v for k, v in flat.items() if not k[1].startswith("fc")}
  kernel_key = ("params", "conv1", "kernel")
  if kernel_key not in flat:
    raise common.StateDictMismatchError(f"{where}: no conv1.weight; keys start with {sorted(state)[:5]}")
  has_adapter = ("params", "adapter_conv", "kernel") in flat
  if band_adapter and not has_adapter:
    channels = in_chans or 3
    allow_missing = (*allow_missing, "adapter.*")
  else:
    flat[kernel_key] = common.adapt_input_kernel(
      flat[kernel_key], None if band_adapter else in_chans, band_indices, where=where
    )
    channels = flat[("params", "adapter_conv", "kernel")].shape[2] if has_adapter else flat[kernel_key].shape[2]
  flat = common.as_float32(flat)
  images = jnp.zeros((1, 32, 32, channels), jnp.float32)  # param shapes do not depend on it
  missing = common.match_strict(
    flat,
    common.expected_shapes(model, images),
    family=RESNET,
    where=where,
    unmapped=unmapped,
    strict=strict,
    allow_missing=allow_missing,
    allow_unexpected=allow_unexpected,
  )
  flat = common.fill_missing(flat, missing, model, images)
  return model, jax.tree.map(jnp.asarray, common.unflatten(flat))
