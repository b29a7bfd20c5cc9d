"""Vision Transformer faithful to facebookresearch/dino `vision_transformer.py`, in flax.linen.

Param names mirror the torch state-dict keys (`blocks_3/attn/qkv` <-> `blocks.3.attn.qkv`) so the bridge is a
plain key map. Numerics follow the reference, including the parts that look arbitrary: LayerNorm eps 1e-6, erf
GELU, and a position-embedding resize that reproduces PyTorch's bicubic `F.interpolate` bit for bit, because
96 px local crops and 120 px BigEarthNet patches both pass through it and a pretrained checkpoint expects the
exact grid it was trained with.

Precision: params are float32; matmuls run in `dtype` (bf16 on GPU). The residual stream, LayerNorm, GELU,
softmax and all outputs stay float32, as under torch autocast, where the residual additions promote to fp32.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

VIT_ARCHS = {
  "tiny": dict(embed_dim=192, depth=12, num_heads=3),
  "small": dict(embed_dim=384, depth=12, num_heads=6),
  "base": dict(embed_dim=768, depth=12, num_heads=12),
}

_ATTENTION_KINDS = ("xla", "cudnn")
_CUBIC_A = np.float32(-0.75)  # PyTorch's bicubic constant (not the -0.5 of PIL / jax.image)


def trunc_normal(std: float = 0.02):
  """The reference's trunc_normal_(std): truncation at the ABSOLUTE bounds [-2, 2], not at +-2 std."""

  def init(key, shape, dtype=jnp.float32):
    return (jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, jnp.float32) * std).astype(dtype)

  return init


def torch_default_bias(fan_in: int):
  """torch's default Linear/Conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# torch's default Linear/Conv weight init (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# ---------------------------------------------------------------------------------------------------------------
# Position-embedding interpolation
# ---------------------------------------------------------------------------------------------------------------


def _cubic_coefficients(t: np.ndarray) -> list[np.ndarray]:
  """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t (cubic convolution, A=-0.75)."""
  a = float(_CUBIC_A)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(in_size: int, scale_factor: float) -> np.ndarray:
  """[out, in] matrix of torch's 1-D bicubic resampling with align_corners=False and an explicit scale factor.

  As ATen does when given scale_factor: output size floor(in * sf); source coordinate
  (dst + 0.5) / sf - 0.5 in float32 with 1/sf taken from the GIVEN factor (not in/out); taps outside the
  input clamped to the border. The polynomial is then evaluated in float64 and rounded once: ATen evaluates
  it in float32 with whatever FMA contraction its compiler chose, which leaves it a few float32 ulps from
  the exact weights, and no choice here could match every torch build bit for bit.
  """
  out_size = int(math.floor(in_size * scale_factor))
  inv_scale = np.float32(1.0 / scale_factor)
  src = inv_scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src.astype(np.float64) - idx, 0.0, 1.0)
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for offset, weight in zip((-1, 0, 1, 2), _cubic_coefficients(t)):
    np.add.at(matrix, (rows, np.clip(idx + offset, 0, in_size - 1)), weight)
  return matrix.astype(np.float32)


def _pos_grid_size(pos_embed) -> int:
  num_patches = pos_embed.shape[1] - 1
  grid = int(math.sqrt(num_patches))
  if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or grid * grid != num_patches:
    raise ValueError(f"vit.py: pos_embed must be [1, 1 + g*g, D] (CLS + square grid), got {pos_embed.shape}")
  return grid


def resample_pos_encoding(pos_embed, h_patches: int, w_patches: int):
  """Always resample (the reference also does so when only the pixel aspect differs); float32 out."""
  num_patches = pos_embed.shape[1] - 1
  grid = _pos_grid_size(pos_embed)
  # The +0.1 keeps floor(in * sf) from landing one short (dino issue #8); sqrt(N) as the reference writes it.
  rows = bicubic_matrix(grid, (h_patches + 0.1) / math.sqrt(num_patches))
  cols = bicubic_matrix(grid, (w_patches + 0.1) / math.sqrt(num_patches))
  if rows.shape[0] != h_patches or cols.shape[0] != w_patches:
    raise ValueError(
      f"vit.py: resizing a {grid}x{grid} position grid gave {rows.shape[0]}x{cols.shape[0]}, "
      f"expected {h_patches}x{w_patches}"
    )
  pos_embed = pos_embed.astype(jnp.float32)
  patch_pos = pos_embed[0, 1:].reshape(grid, grid, -1)
  hi = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes: the result must match torch to float32 rounding
  patch_pos = jnp.einsum("yh,hwd->ywd", rows, patch_pos, precision=hi)
  patch_pos = jnp.einsum("xw,ywd->yxd", cols, patch_pos, precision=hi)
  return jnp.concatenate([pos_embed[:, :1], patch_pos.reshape(1, h_patches * w_patches, -1)], axis=1)


def interpolate_pos_encoding(pos_embed, h_patches: int, w_patches: int):
  """pos_embed [1, 1+N, D] for a h_patches x w_patches grid, as torch's bicubic F.interpolate with
  scale_factor ((h+0.1)/sqrt(N), (w+0.1)/sqrt(N)); unchanged when the grid already matches."""
  grid = _pos_grid_size(pos_embed)
  if h_patches == w_patches == grid:
    return pos_embed
  return resample_pos_encoding(pos_embed, h_patches, w_patches)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


def dense(features: int, dtype, name: str, use_bias: bool = True) -> nn.Dense:
  """Linear layer as the reference initialises it: trunc_normal(.02) kernel, zero bias, float32 params."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=trunc_normal(0.02),
    bias_init=nn.initializers.zeros,
    name=name,
  )


def _layer_norm(name: str) -> nn.LayerNorm:
  # Two-pass variance as torch computes it; the fast E[x^2]-E[x]^2 form loses digits on large activations.
  return nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, name=name)


def exact_gelu(x):
  """erf GELU computed in float32 (torch nn.GELU default), returned in the input dtype."""
  return nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def drop_path(module: nn.Module, x, rate: float, train: bool):
  """Stochastic depth per sample: zero the whole residual branch with probability `rate`, else scale by
  1/keep_prob. Identity in eval or at rate 0 (and then needs no rng)."""
  if not train or rate == 0.0:
    return x
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(module.make_rng("drop_path"), keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


class PatchEmbed(nn.Module):
  patch_size: int
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    fan_in = self.patch_size * self.patch_size * images.shape[-1]
    # The reference leaves this conv at torch's default init (its _init_weights only touches Linear/LN).
    tokens = nn.Conv(
      self.embed_dim,
      (self.patch_size, self.patch_size),
      strides=self.patch_size,
      padding="VALID",
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_default_kernel,
      bias_init=torch_default_bias(fan_in),
      name="proj",
    )(images)
    return tokens  # [B, H/p, W/p, D], floor division as torch's conv


class Attention(nn.Module):
  num_heads: int
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, return_attention: bool = False):
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    scale = head_dim**-0.5
    qkv = dense(3 * dim, self.dtype, "qkv", use_bias=self.qkv_bias)(x)
    # Feature layout (3, heads, head_dim) as torch's reshape(B, N, 3, H, C//H).
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, hd]

    weights = None
    if self.attention == "xla" or return_attention:
      logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
      weights = jax.nn.softmax(logits, axis=-1)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), value)
    else:
      out = fused_attention(query, key, value, scale)
    out = out.reshape(batch, tokens, dim)
    return dense(dim, self.dtype, "proj")(out), weights


def fused_attention(query, key, value, scale):
  """jax.nn.dot_product_attention; on GPU with half-precision inputs ask for cuDNN explicitly, because
  implementation=None still means XLA in jax 0.10. Anything cuDNN refuses at trace time falls back to XLA."""
  if jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return jax.nn.dot_product_attention(query, key, value, scale=scale, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError) as err:
      logging.warning("vit.py: cuDNN attention unavailable (%s); using XLA attention", err)
  return jax.nn.dot_product_attention(query, key, value, scale=scale, implementation=None)


class Mlp(nn.Module):
  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = exact_gelu(dense(self.hidden_dim, self.dtype, "fc1")(x))
    return dense(x.shape[-1], self.dtype, "fc2")(hidden)


class Block(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool = False, return_attention: bool = False):
    attn_out, weights = Attention(self.num_heads, self.qkv_bias, self.dtype, self.attention, name="attn")(
      _layer_norm("norm1")(x), return_attention=return_attention
    )
    if return_attention:
      return weights
    x = x + drop_path(self, attn_out.astype(jnp.float32), self.drop_path_rate, train)
    mlp_out = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")(_layer_norm("norm2")(x))
    return x + drop_path(self, mlp_out.astype(jnp.float32), self.drop_path_rate, train)


class VisionTransformer(nn.Module):
  """DINO ViT backbone on NHWC images; the patch-embedding kernel takes its channel count from the input."""

  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0  # linear rise over blocks, active only when train=True
  pos_grid: int = 14  # pos_embed holds 1 + pos_grid**2 tokens (img_size 224 / patch 16)
  dtype: Any = jnp.float32  # compute dtype; params always float32
  attention: str = "xla"  # "xla" (einsum softmax) | "cudnn" (jax.nn.dot_product_attention)

  def setup(self):
    if self.attention not in _ATTENTION_KINDS:
      raise ValueError(f"vit.py: attention must be one of {_ATTENTION_KINDS}, got {self.attention!r}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"vit.py: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
    self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, self.dtype)
    self.cls_token = self.param("cls_token", trunc_normal(0.02), (1, 1, self.embed_dim))
    self.pos_embed = self.param("pos_embed", trunc_normal(0.02), (1, 1 + self.pos_grid**2, self.embed_dim))
    # float32 linspace as torch.linspace gives, so a bridged model drops exactly the same rates.
    rates = np.linspace(0.0, self.drop_path_rate, self.depth, dtype=np.float32)
    self.blocks = [
      Block(self.num_heads, self.mlp_ratio, self.qkv_bias, float(rate), self.dtype, self.attention) for rate in rates
    ]
    self.norm = _layer_norm("norm")

  def prepare_tokens(self, images):
    """[B, H, W, C] -> [B, 1 + h*w, D] float32: patch tokens, CLS prepended, then position embedding."""
    if images.ndim != 4:
      raise ValueError(f"vit.py: images must be [B, H, W, C], got shape {images.shape}")
    height, width = images.shape[1:3]
    patches = self.patch_embed(images)
    batch, h_patches, w_patches, dim = patches.shape
    tokens = patches.reshape(batch, h_patches * w_patches, dim).astype(jnp.float32)
    cls = jnp.broadcast_to(self.cls_token, (batch, 1, dim))
    tokens = jnp.concatenate([cls, tokens], axis=1)
    # The reference keys "unchanged" on the PIXEL size being square and the token count matching, so a
    # non-square image that floors to the stored grid is still resampled (with sf (g+0.1)/g).
    if height == width and h_patches == self.pos_grid:
      pos = self.pos_embed
    else:
      pos = resample_pos_encoding(self.pos_embed, h_patches, w_patches)
    return tokens + pos

  def __call__(self, images, train: bool = False):
    """Normed CLS features [B, D] float32."""
    tokens = self.prepare_tokens(images)
    for block in self.blocks:
      tokens = block(tokens, train)
    return self.norm(tokens)[:, 0]

  def get_intermediate_layers(self, images, n: int = 1, train: bool = False):
    """Outputs of the last n blocks, each through the final norm: list of n [B, 1+N, D] float32."""
    tokens = self.prepare_tokens(images)
    outputs = []
    for index, block in enumerate(self.blocks):
      tokens = block(tokens, train)
      if len(self.blocks) - index <= n:
        outputs.append(self.norm(tokens))
    return outputs

  def get_last_selfattention(self, images):
    """Softmax attention of the last block, [B, heads, 1+N, 1+N] float32 (always the explicit path)."""
    tokens = self.prepare_tokens(images)
    for block in self.blocks[:-1]:
      tokens = block(tokens)
    return self.blocks[-1](tokens, return_attention=True)


def vit(arch: str, **overrides) -> VisionTransformer:
  """VisionTransformer for "tiny" | "small" | "base" ("vit_small" style names accepted), fields overridable."""
  name = arch[len("vit_") :] if arch.startswith("vit_") else arch
  if name not in VIT_ARCHS:
    raise ValueError(f"vit.py: unknown arch {arch!r}; expected one of {sorted(VIT_ARCHS)}")
  return VisionTransformer(**{**VIT_ARCHS[name], **overrides})


def compute_dtype(name):
  """ "auto": bfloat16 where the hardware has fast bf16 matmuls (GPU/TPU), float32 on CPU."""
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  return jnp.dtype(name)


def from_config(model_config, image_size, train_student=True):
  """The ViT a config's `model` section describes, its position grid sized for `image_size` crops."""
  overrides = {k: model_config[k] for k in ("depth", "embed_dim", "num_heads") if model_config[k] > 0}
  return vit(
    model_config.arch,
    patch_size=model_config.patch_size,
    drop_path_rate=model_config.drop_path_rate if train_student else 0.0,
    pos_grid=image_size // model_config.patch_size,
    dtype=compute_dtype(model_config.dtype),
    attention=model_config.attention,
    **overrides,
  )
