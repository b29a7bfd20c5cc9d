"""SwinV2 (tiny / small / base) faithful to torchvision's `swin_v2_t/s/b`, in flax.linen.

Param names mirror the torch state-dict keys with each index joined to the name before it
(`features_1_0/attn/cpb_mlp_0` <-> `features.1.0.attn.cpb_mlp.0`), so jaxgeo.bridge.swin is a plain key map.
torchvision's layout: features_0_0 patch conv, features_0_2 its LayerNorm, features_{1,3,5,7}_{block} the
stages, features_{2,4,6} PatchMergingV2, then norm and head (the classifier only).

Numerics follow torchvision, including the parts that look arbitrary: LayerNorm eps 1e-5; erf GELU;
res-post-norm blocks; cosine attention with the logit scale clamped at log(100); the continuous position bias
(an MLP over a log-spaced coordinate table, then 16*sigmoid); the k-bias zeroed at every forward (the stored
values are ignored); zero padding to a multiple of the window, with the shift switched off on an axis whose
padded map the window covers, and padded tokens left unmasked when there is no shift (they attend with a zero
key); the -100 mask between regions of a shifted window; PatchMergingV2 concatenating (even row, even col),
(odd, even), (even, odd), (odd, odd), then reduction, then norm.

Precision: params float32; matmuls in `dtype` (bf16 on GPU); the residual stream, norms, the position bias,
softmax and every returned feature stay float32, as in models/vit.py.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgeo.models.vit import dense, drop_path, exact_gelu, torch_default_bias, torch_default_kernel, trunc_normal

SWIN_ARCHS = {
  "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
  "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
  "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}
# torchvision's ImageNet stochastic depth per arch (the swin_v2_* defaults).
SWIN_DROP_PATH = {"tiny": 0.2, "small": 0.3, "base": 0.5}
_ARCH_ALIASES = {"swin_v2_t": "tiny", "swin_v2_s": "small", "swin_v2_b": "base"}

_MASK_VALUE = -100.0  # torchvision's, not -inf: a fully masked row (impossible here) would still be finite


def arch_name(arch: str) -> str:
  """ "tiny" | "small" | "base", also accepting torchvision's "swin_v2_t" style names."""
  name = _ARCH_ALIASES.get(arch, arch)
  if name not in SWIN_ARCHS:
    raise ValueError(f"swin.py: unknown arch {arch!r}; expected one of {sorted(SWIN_ARCHS)} or {sorted(_ARCH_ALIASES)}")
  return name


# ---------------------------------------------------------------------------------------------------------------
# Static geometry (numpy, from shapes only)
# ---------------------------------------------------------------------------------------------------------------


def relative_coords_table(window: int) -> np.ndarray:
  """torchvision's `relative_coords_table` buffer, [1, 2w-1, 2w-1, 2] float32: offsets scaled to +-8, then
  sign(t) * log2(|t| + 1) / 3, so the position MLP sees log-spaced coordinates."""
  offsets = np.arange(-(window - 1), window, dtype=np.float32)
  table = np.stack(np.meshgrid(offsets, offsets, indexing="ij"), axis=-1)
  table = table / np.float32(window - 1) * np.float32(8)
  table = np.sign(table) * np.log2(np.abs(table) + np.float32(1)) / np.float32(3)
  return table[None].astype(np.float32)


def relative_position_index(window: int) -> np.ndarray:
  """torchvision's `relative_position_index` buffer, [w^4] int64: row of the coordinate table for each
  (query, key) pair of a window."""
  grid = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  delta = (grid[:, :, None] - grid[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return (delta[..., 0] * (2 * window - 1) + delta[..., 1]).reshape(-1).astype(np.int64)


def window_layout(height: int, width: int, window: int, shift: int) -> tuple[int, int, int, int]:
  """(padded_h, padded_w, shift_h, shift_w) of one block: zero padding to a multiple of the window, and no
  shift on an axis the window covers (torchvision's rule, judged on the PADDED size)."""
  padded = [size + (-size) % window for size in (height, width)]
  shifts = [0 if window >= size else shift for size in padded]
  return padded[0], padded[1], shifts[0], shifts[1]


@functools.lru_cache(maxsize=64)
def shifted_window_mask(padded_h: int, padded_w: int, window: int, shift_h: int, shift_w: int) -> np.ndarray:
  """[windows, w*w, w*w] float32 additive mask: -100 between tokens that the roll brought together from
  different regions of the map, else 0. Windows in row-major order, tokens row-major within a window.
  Cached (every other block of a stage asks for the same one), hence read-only."""
  regions = np.zeros((padded_h, padded_w), np.float32)
  # The same slices as torchvision. With a zero shift on one axis, (-0, None) covers that whole axis and
  # overwrites the other two bands, which leaves the regions of the shifted axis only: the intended result.
  rows = ((0, -window), (-window, -shift_h), (-shift_h, None))
  cols = ((0, -window), (-window, -shift_w), (-shift_w, None))
  count = 0
  for row in rows:
    for col in cols:
      regions[row[0] : row[1], col[0] : col[1]] = count
      count += 1
  windows = partition_windows(regions[None, :, :, None], window)[0, :, :, 0]  # [nW, N]
  different = windows[:, None, :] != windows[:, :, None]
  mask = np.where(different, np.float32(_MASK_VALUE), np.float32(0)).astype(np.float32)
  mask.setflags(write=False)
  return mask


def partition_windows(x, window: int):
  """[B, H, W, C] (H, W multiples of the window) -> [B, windows, w*w, C]; works on numpy and jax arrays."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // window, window, width // window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, window * window, channels)


def merge_windows(windows, window: int, height: int, width: int):
  """Inverse of partition_windows."""
  batch, _, _, channels = windows.shape
  x = windows.reshape(batch, height // window, width // window, window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


def _layer_norm(name: str) -> nn.LayerNorm:
  # torchvision's eps (flax defaults to 1e-6); two-pass variance as torch computes it.
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, name=name)


def _l2_normalize(x):
  """F.normalize(x, dim=-1) in float32: x / max(||x||, 1e-12). A zero key (a padded token: k-bias is 0)
  therefore stays zero instead of becoming NaN -- and so does its gradient: the norm is taken as
  rsqrt(max(sum x^2, 1e-24)), not as sqrt, whose derivative at 0 is infinite (NaN through the chain rule),
  where torch's is finite. Padded windows (a 224 px input: stage maps 56/28/14/7 with window 8) need it."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


class QKV(nn.Module):
  """The qkv Linear with its k third of the bias zeroed at every forward, as torchvision does (on a clone, so
  the stored k-bias is ignored and receives no gradient)."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", trunc_normal(0.02), (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    third = self.features // 3
    keep = np.concatenate([np.ones(third), np.zeros(third), np.ones(third)]).astype(np.float32)
    out = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    return out + (bias * keep).astype(self.dtype)


class WindowAttentionV2(nn.Module):
  num_heads: int
  window_size: int = 8
  shift_size: int = 0
  dtype: Any = jnp.float32

  def position_bias(self):
    """[heads, N, N] float32: 16 * sigmoid(cpb_mlp(log-spaced offsets)) gathered per (query, key) pair."""
    window = self.window_size
    table = jnp.asarray(relative_coords_table(window).reshape(-1, 2))
    # A constant 225 x 2 input: run it at full float32 precision (no TF32 / bf16 passes) on any backend.
    mlp = dict(dtype=jnp.float32, param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    hidden = nn.relu(
      nn.Dense(512, kernel_init=trunc_normal(0.02), bias_init=nn.initializers.zeros, name="cpb_mlp_0", **mlp)(table)
    )
    per_offset = nn.Dense(self.num_heads, use_bias=False, kernel_init=trunc_normal(0.02), name="cpb_mlp_2", **mlp)(
      hidden
    )
    tokens = window * window
    bias = per_offset[relative_position_index(window)].reshape(tokens, tokens, self.num_heads)
    return 16.0 * jax.nn.sigmoid(bias.transpose(2, 0, 1))

  @nn.compact
  def __call__(self, x):
    """[B, H, W, C] float32 -> [B, H, W, C] in `dtype`."""
    batch, height, width, dim = x.shape
    window, heads = self.window_size, self.num_heads
    padded_h, padded_w, shift_h, shift_w = window_layout(height, width, window, self.shift_size)
    x = jnp.pad(x, ((0, 0), (0, padded_h - height), (0, padded_w - width), (0, 0)))
    shifted = shift_h > 0 or shift_w > 0
    if shifted:
      x = jnp.roll(x, (-shift_h, -shift_w), axis=(1, 2))
    windows = partition_windows(x, window)  # [B, nW, N, C]
    num_windows, tokens = windows.shape[1], windows.shape[2]

    qkv = QKV(3 * dim, self.dtype, name="qkv")(windows).reshape(batch, num_windows, tokens, 3, heads, dim // heads)
    query, key, value = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # [B, nW, N, heads, hd]
    query, key = _l2_normalize(query).astype(self.dtype), _l2_normalize(key).astype(self.dtype)
    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", query, key, preferred_element_type=jnp.float32)
    logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(10.0)), (heads, 1, 1), jnp.float32)
    logits = logits * jnp.exp(jnp.minimum(logit_scale, math.log(100.0))) + self.position_bias()
    if shifted:
      mask = shifted_window_mask(padded_h, padded_w, window, shift_h, shift_w)
      logits = logits + mask[None, :, None]
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bwhqk,bwkhd->bwqhd", weights.astype(self.dtype), value.astype(self.dtype))
    out = dense(dim, self.dtype, "proj")(out.reshape(batch, num_windows, tokens, dim))

    out = merge_windows(out, window, padded_h, padded_w)
    if shifted:
      out = jnp.roll(out, (shift_h, shift_w), axis=(1, 2))
    return out[:, :height, :width]


class SwinBlockV2(nn.Module):
  """Res-post-norm block: x + drop(norm1(attn(x))), then x + drop(norm2(mlp(x)))."""

  num_heads: int
  window_size: int = 8
  shift_size: int = 0
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    dim = x.shape[-1]
    attn = WindowAttentionV2(self.num_heads, self.window_size, self.shift_size, self.dtype, name="attn")(x)
    x = x + drop_path(self, _layer_norm("norm1")(attn.astype(jnp.float32)), self.drop_path_rate, train)
    hidden = exact_gelu(dense(int(dim * self.mlp_ratio), self.dtype, "mlp_0")(x))
    mlp = dense(dim, self.dtype, "mlp_3")(hidden)  # torchvision's MLP: Linear, GELU, Dropout, Linear, Dropout
    return x + drop_path(self, _layer_norm("norm2")(mlp.astype(jnp.float32)), self.drop_path_rate, train)


class PatchMergingV2(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C] float32 (odd sizes padded with a zero row/column)."""
    height, width, dim = x.shape[1:]
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    merged = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    reduced = dense(2 * dim, self.dtype, "reduction", use_bias=False)(merged)
    return _layer_norm("norm")(reduced.astype(jnp.float32))


def drop_path_rates(depths: Sequence[int], rate: float) -> list[list[float]]:
  """Per-block stochastic depth, rising linearly with a counter over ALL blocks (torchvision's rule)."""
  total = sum(depths)
  counter = iter(range(total))
  return [[rate * next(counter) / max(total - 1, 1) for _ in range(depth)] for depth in depths]


class SwinTransformerV2(nn.Module):
  """SwinV2 on NHWC images of any size the patch size divides, any band count.

  __call__(images, train) -> [B, num_classes] logits (norm, global average pool, head) or, with
  num_classes=None, the pooled normed features [B, embed_dim * 2^(stages-1)].
  __call__(images, train, features_only=True) -> tuple of stage outputs [B, H/4, W/4, C], [B, H/8, W/8, 2C],
  ... float32, NHWC, WITHOUT the final norm (as Satlas and TorchGeo tap them); only then are norm/head
  params not created. Odd stage sizes round up (PatchMergingV2 pads), e.g. 100 px -> 25, 13, 7, 4.
  """

  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 8
  patch_size: int = 4
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0  # active only when train=True; rng stream "drop_path"
  num_classes: Optional[int] = None
  in_chans: Optional[int] = None  # when set, inputs with another band count are refused with a clear error
  dtype: Any = jnp.float32  # compute dtype; params always float32

  def _check(self, images):
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"swin.py: depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} differ in length")
    for stage, heads in enumerate(self.num_heads):
      if (self.embed_dim * 2**stage) % heads:
        raise ValueError(f"swin.py: stage {stage} width {self.embed_dim * 2**stage} is not divisible by {heads} heads")
    if self.window_size < 2:
      raise ValueError(
        f"swin.py: window_size must be >= 2 (the coordinate table divides by w-1), got {self.window_size}"
      )
    if images.ndim != 4:
      raise ValueError(f"swin.py: images must be [B, H, W, C], got shape {images.shape}")
    height, width, bands = images.shape[1:]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
        f"swin.py: image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
        "crop or pad the images (a floor would silently drop the last rows/columns)"
      )
    if self.in_chans is not None and bands != self.in_chans:
      raise ValueError(f"swin.py: the model takes {self.in_chans} bands (in_chans), the images have {bands}")

  @nn.compact
  def __call__(self, images, train: bool = False, features_only: bool = False):
    self._check(images)
    patch = self.patch_size
    fan_in = patch * patch * images.shape[-1]
    # torchvision leaves the patch conv at torch's default init (its trunc_normal pass touches Linear only).
    x = nn.Conv(
      self.embed_dim,
      (patch, patch),
      strides=patch,
      padding="VALID",
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_default_kernel,
      bias_init=torch_default_bias(fan_in),
      name="features_0_0",
    )(images)
    x = _layer_norm("features_0_2")(x.astype(jnp.float32))

    stages = []
    rates = drop_path_rates(self.depths, self.drop_path_rate)
    for stage, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      for index in range(depth):
        shift = 0 if index % 2 == 0 else self.window_size // 2
        x = SwinBlockV2(
          heads,
          self.window_size,
          shift,
          self.mlp_ratio,
          rates[stage][index],
          self.dtype,
          name=f"features_{2 * stage + 1}_{index}",
        )(x, train)
      stages.append(x)
      if stage < len(self.depths) - 1:
        x = PatchMergingV2(self.dtype, name=f"features_{2 * stage + 2}")(x)
    if features_only:
      return tuple(stages)

    pooled = jnp.mean(_layer_norm("norm")(x), axis=(1, 2))
    if self.num_classes is None:
      return pooled
    return dense(self.num_classes, self.dtype, "head")(pooled).astype(jnp.float32)


def swin_v2(arch: str, **overrides) -> SwinTransformerV2:
  """SwinTransformerV2 for "tiny" | "small" | "base" (or "swin_v2_t/s/b"), any field overridable (depths,
  embed_dim, num_heads for a smoke-sized model; num_classes=1000 for torchvision's classifier).
  drop_path_rate defaults to 0 (evaluation); SWIN_DROP_PATH holds torchvision's training values."""
  return SwinTransformerV2(**{**SWIN_ARCHS[arch_name(arch)], **overrides})


def stage_features(model: SwinTransformerV2, variables, images, train: bool = False, rngs=None):
  """The stage outputs (strides 4, 8, 16, 32 for 4 stages), NHWC float32, without the final norm."""
  return model.apply(variables, images, train, features_only=True, rngs=rngs)


def param_count(params) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
