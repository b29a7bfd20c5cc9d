"""FPN as torchvision.ops.FeaturePyramidNetwork, a segmentation head, and the SwinV2 + FPN + head model.

FeaturePyramidNetwork: per level a 1x1 lateral conv (`inner_blocks_{i}`) and a 3x3 output conv
(`layer_blocks_{i}`), top-down nearest upsampling with torch's size-based rule src = floor(dst * in / out)
(not half-pixel: on the odd sizes of a padded Swin, 4 -> 7 or 13 -> 25, the two rules pick different
pixels), kaiming_uniform(a=1) kernels and zero biases. Satlas' FPN is this module with 128 channels.

SegmentationHead (no reference; Satlas' own head is not in its checkpoints): the pyramid levels brought to the
finest one with bilinear upsampling and summed (or concatenated), a 3x3 conv + ReLU, a 1x1 conv to the
classes, then bilinear upsampling to the input size. Every resize is torch's
F.interpolate(mode="bilinear", align_corners=False), so benchmarks/torch_swin.py's head gives the same logits.

SegmentationModel: backbone (SwinTransformerV2, stage outputs without the final norm), fpn, head; params
{"backbone", "fpn", "head"}, the names jaxgeo.bridge.swin maps to "backbone.*", "fpn.*", "head.*".
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgeo.models.swin import SWIN_ARCHS, SWIN_DROP_PATH, SwinTransformerV2, arch_name
from jaxgeo.models.vit import compute_dtype, torch_default_bias, torch_default_kernel

FUSIONS = ("sum", "concat")

# torchvision's FPN init: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)).
_fpn_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


# ---------------------------------------------------------------------------------------------------------------
# torch-exact resizing (indices and weights from static shapes, computed in float32 as ATen does)
# ---------------------------------------------------------------------------------------------------------------


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output pixel under torch's "nearest" with an explicit size."""
  if out_size == in_size:
    return np.arange(out_size)
  if out_size == 2 * in_size:  # ATen's exact fast path
    return np.arange(out_size) // 2
  scale = np.float32(in_size) / np.float32(out_size)
  return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def resize_nearest(x, size: Sequence[int]):
  """[B, H, W, C] -> [B, *size, C] as F.interpolate(size=size, mode="nearest") on NCHW."""
  x = jnp.take(x, nearest_indices(x.shape[1], size[0]), axis=1)
  return jnp.take(x, nearest_indices(x.shape[2], size[1]), axis=2)


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(lower index, upper index, lower weight, upper weight) per output pixel, align_corners=False: source
  (dst + 0.5) * in/out - 0.5 clamped at 0, upper tap clamped at the last pixel."""
  scale = np.float32(in_size) / np.float32(out_size)
  source = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
  lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  upper = lower + (lower < in_size - 1)
  upper_weight = np.clip(source - lower.astype(np.float32), 0, 1).astype(np.float32)
  return lower, upper, (np.float32(1) - upper_weight).astype(np.float32), upper_weight


def _bilinear_axis(x, out_size: int, axis: int):
  if x.shape[axis] == out_size:
    return x
  lower, upper, lower_weight, upper_weight = bilinear_taps(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  below, above = jnp.take(x, lower, axis=axis), jnp.take(x, upper, axis=axis)
  return lower_weight.reshape(shape) * below + upper_weight.reshape(shape) * above


def resize_bilinear(x, size: Sequence[int]):
  """[B, H, W, C] -> [B, *size, C] float32 as F.interpolate(mode="bilinear", align_corners=False); columns
  first, then rows, which is ATen's order of the four products."""
  x = _bilinear_axis(x.astype(jnp.float32), size[1], axis=2)
  return _bilinear_axis(x, size[0], axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


def _conv(features: int, kernel: int, name: str, dtype, kernel_init, bias_init) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    padding=((pad, pad), (pad, pad)),
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    bias_init=bias_init,
    name=name,
  )


class FeaturePyramidNetwork(nn.Module):
  out_channels: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Any]) -> list:
    """features: NHWC maps, finest first -> list of [B, h_i, w_i, out_channels] float32, finest first."""
    if not features:
      raise ValueError("fpn.py: FeaturePyramidNetwork needs at least one feature map")
    conv = functools.partial(
      _conv, self.out_channels, dtype=self.dtype, kernel_init=_fpn_kernel_init, bias_init=nn.initializers.zeros
    )
    last = len(features) - 1
    inner = conv(1, f"inner_blocks_{last}")(features[last]).astype(jnp.float32)
    results = [conv(3, f"layer_blocks_{last}")(inner).astype(jnp.float32)]
    for index in range(last - 1, -1, -1):
      lateral = conv(1, f"inner_blocks_{index}")(features[index]).astype(jnp.float32)
      inner = lateral + resize_nearest(inner, lateral.shape[1:3])
      results.insert(0, conv(3, f"layer_blocks_{index}")(inner).astype(jnp.float32))
    return results


class SegmentationHead(nn.Module):
  num_classes: int
  channels: int = 128
  fusion: str = "sum"  # "sum" | "concat" of the levels upsampled to the finest
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pyramid: Sequence[Any], image_size: Sequence[int]):
    """pyramid: NHWC maps, finest first -> logits [B, *image_size, num_classes] float32."""
    if self.fusion not in FUSIONS:
      raise ValueError(f"fpn.py: fusion must be one of {FUSIONS}, got {self.fusion!r}")
    finest = pyramid[0].shape[1:3]
    levels = [resize_bilinear(level, finest) for level in pyramid]
    if self.fusion == "sum":
      fused = functools.reduce(lambda total, level: total + level, levels)
    else:
      fused = jnp.concatenate(levels, axis=-1)
    # No reference init to follow: torch's Conv2d default, which is what the torch head in benchmarks/ uses.
    hidden_fan_in, out_fan_in = 9 * fused.shape[-1], self.channels
    conv = functools.partial(_conv, dtype=self.dtype, kernel_init=torch_default_kernel)
    hidden = nn.relu(conv(self.channels, 3, "conv", bias_init=torch_default_bias(hidden_fan_in))(fused))
    logits = conv(self.num_classes, 1, "classifier", bias_init=torch_default_bias(out_fan_in))(hidden)
    return resize_bilinear(logits, image_size)


class SegmentationModel(nn.Module):
  """SwinV2 -> FPN over the chosen stages -> SegmentationHead. Fields are resolved numbers (see
  segmentation_model / from_config for arch names), so the model is rebuilt from its JSON fields."""

  num_classes: int
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 8
  patch_size: int = 4
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  in_chans: int = 3
  fpn_channels: int = 128  # Satlas' value
  levels: Sequence[int] = (0, 1, 2, 3)  # stages feeding the FPN, finest first
  fusion: str = "sum"
  head_channels: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, return_intermediates: bool = False):
    """images [B, H, W, in_chans] -> logits [B, H, W, num_classes] float32; with return_intermediates,
    (logits, {"stages": backbone outputs, "pyramid": FPN outputs})."""
    stage_count = len(self.depths)
    levels = tuple(self.levels)
    if not levels or list(levels) != sorted(set(levels)) or not all(0 <= lv < stage_count for lv in levels):
      raise ValueError(f"fpn.py: levels must be increasing stage indices in [0, {stage_count}), got {levels}")
    backbone = SwinTransformerV2(
      embed_dim=self.embed_dim,
      depths=tuple(self.depths),
      num_heads=tuple(self.num_heads),
      window_size=self.window_size,
      patch_size=self.patch_size,
      mlp_ratio=self.mlp_ratio,
      drop_path_rate=self.drop_path_rate,
      in_chans=self.in_chans,
      dtype=self.dtype,
      name="backbone",
    )
    stages = backbone(images, train, features_only=True)
    pyramid = FeaturePyramidNetwork(self.fpn_channels, self.dtype, name="fpn")([stages[lv] for lv in levels])
    head = SegmentationHead(self.num_classes, self.head_channels, self.fusion, self.dtype, name="head")
    logits = head(pyramid, images.shape[1:3])
    if return_intermediates:
      return logits, {"stages": stages, "pyramid": pyramid}
    return logits


def segmentation_model(arch: str, num_classes: int, **overrides) -> SegmentationModel:
  """SegmentationModel for "tiny" | "small" | "base" (or "swin_v2_t/s/b"); fields overridable."""
  return SegmentationModel(num_classes=num_classes, **{**SWIN_ARCHS[arch_name(arch)], **overrides})


def model_config(arch: str = "tiny", num_classes: int = 2, in_chans: int = 3) -> ml_collections.ConfigDict:
  """The `model` section from_config reads; -1 / () mean "the arch's own"."""
  c = ml_collections.ConfigDict()
  c.arch = arch
  c.num_classes = num_classes
  c.in_chans = in_chans
  c.embed_dim = -1
  c.depths = ()
  c.num_heads = ()
  c.window_size = 8
  c.drop_path_rate = -1.0  # -1: torchvision's value for the arch (SWIN_DROP_PATH)
  c.fpn_channels = 128
  c.levels = (0, 1, 2, 3)
  c.fusion = "sum"
  c.head_channels = 128
  c.dtype = "auto"  # bfloat16 on GPU/TPU, float32 on CPU; params always float32
  return c


def from_config(config) -> SegmentationModel:
  """The SegmentationModel a config's `model` section describes; fields absent from it take model_config()'s
  defaults. Stochastic depth only acts in calls with train=True."""
  defaults = model_config()
  get = lambda name: config.get(name, defaults[name])
  name = arch_name(get("arch"))
  arch = dict(SWIN_ARCHS[name])
  for field in ("embed_dim", "depths", "num_heads"):
    value = get(field)
    if value not in (-1, (), [], None):
      arch[field] = tuple(value) if isinstance(value, (list, tuple)) else value
  rate = get("drop_path_rate")
  fusion = get("fusion")
  if fusion not in FUSIONS:
    raise ValueError(f"config.model.fusion={fusion!r}; expected one of {FUSIONS}")
  return SegmentationModel(
    num_classes=get("num_classes"),
    window_size=get("window_size"),
    drop_path_rate=SWIN_DROP_PATH[name] if rate < 0 else rate,
    in_chans=get("in_chans"),
    fpn_channels=get("fpn_channels"),
    levels=tuple(get("levels")),
    fusion=fusion,
    head_channels=get("head_channels"),
    dtype=compute_dtype(get("dtype")),
    **arch,
  )
