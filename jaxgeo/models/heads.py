"""Projection heads. DINOHead is faithful to facebookresearch/dino `vision_transformer.DINOHead`.

Param names are the bridge's contract: `mlp_{i}` are torch's Linear layers mlp.0/2/4 (GELUs sit between),
`last_layer_v` is torch's weight_v transposed to [bottleneck, out_dim], `last_layer_g` is weight_g flattened
to [out_dim] and exists only when norm_last_layer=False: the reference fixes g = 1 and never trains it, so
here it is a constant rather than a param the optimizer would have to be told to skip.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxgeo.models.vit import dense, exact_gelu, torch_default_kernel


def l2_normalize(x, eps: float = 1e-12):
  """F.normalize(x, dim=-1): x / max(||x||, eps), float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class DINOHead(nn.Module):
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  nlayers: int = 3
  use_bn: bool = False
  norm_last_layer: bool = True
  dtype: Any = jnp.float32  # matmul dtype; the normalisations and the output are float32

  @nn.compact
  def __call__(self, features, train: bool = False):
    """features [B, in_dim] -> logits [B, out_dim] float32, each |logit| <= |g| (= 1 when g is fixed).

    `train` only matters with use_bn (batch statistics then live in the "batch_stats" collection; under a
    data-sharded jit the batch mean is global, as the reference's SyncBatchNorm)."""
    nlayers = max(self.nlayers, 1)
    widths = [self.hidden_dim] * (nlayers - 1) + [self.bottleneck_dim]
    x = features
    for index, width in enumerate(widths):
      x = dense(width, self.dtype, f"mlp_{index}")(x)
      if index < nlayers - 1:
        if self.use_bn:
          # torch BatchNorm1d defaults: momentum 0.1 (flax counts the other way), eps 1e-5.
          x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            name=f"bn_{index}",
          )(x)
        x = exact_gelu(x)
    x = l2_normalize(x)

    # The last layer keeps torch's default Linear init: the reference creates it after its
    # trunc_normal pass over the MLP.
    v = self.param("last_layer_v", torch_default_kernel, (self.bottleneck_dim, self.out_dim), jnp.float32)
    column_norm = jnp.linalg.norm(v, axis=0)  # torch weight_norm(dim=0) norms each output row of weight_v
    if self.norm_last_layer:
      scale = 1.0 / column_norm
    else:
      g = self.param("last_layer_g", nn.initializers.ones, (self.out_dim,), jnp.float32)
      scale = g / column_norm
    weight = v * scale
    return jnp.dot(x.astype(self.dtype), weight.astype(self.dtype), preferred_element_type=jnp.float32)
