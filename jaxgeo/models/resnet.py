"""ResNet-50 matching torchvision's (v1.5: stride on the 3x3 conv of the bottleneck), in flax.linen.

Param names mirror torchvision state-dict keys (`layer2_0/conv2` <-> `layer2.0.conv2`,
`layer2_0/downsample_conv` <-> `layer2.0.downsample.0`) so jaxgeo.bridge.resnet is a plain key map.
Numerics follow torchvision: explicit padding 3 on the 7x7/2 stem and 1 on the 3x3/2 max-pool (padded with
-inf) instead of 'SAME', which pads asymmetrically and would shift every feature by a pixel; BatchNorm eps 1e-5
with flax momentum 0.9 == torch momentum 0.1. One difference remains in train mode: torch updates running_var
with the unbiased batch variance, flax with the biased one (a factor n/(n-1), n = batch * H * W).

Band adapter (``band_adapter=True``): a 1x1 conv (no bias), BatchNorm and ReLU mapping any number of input
bands to the 3 the RGB stem expects, so an ImageNet ResNet can read Sentinel-2. With
``freeze_adapter=True`` its BatchNorm always uses running statistics and its output is cut from the gradient;
the optimizer must still leave its params alone (weight decay would move them), e.g.::

    labels = adapter_param_labels(params)  # "frozen" under adapter_*, "trainable" elsewhere
    tx = optax.multi_transform({"trainable": optax.adamw(1e-3), "frozen": optax.set_to_zero()}, labels)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

RESNET50_STAGES = (3, 4, 6, 3)

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for convs.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's default Linear init, U(+-1/sqrt(fan_in)), for the fc layers.
_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _batch_norm(name, train, dtype):
  return nn.BatchNorm(
    use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name
  )


def _conv(features, kernel, stride, padding, name, dtype):
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=stride,
    padding=padding,
    use_bias=False,
    kernel_init=_conv_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    out_features = self.planes * 4
    out = _conv(self.planes, 1, 1, "VALID", "conv1", self.dtype)(x)
    out = nn.relu(_batch_norm("bn1", train, self.dtype)(out))
    out = _conv(self.planes, 3, self.stride, ((1, 1), (1, 1)), "conv2", self.dtype)(out)
    out = nn.relu(_batch_norm("bn2", train, self.dtype)(out))
    out = _conv(out_features, 1, 1, "VALID", "conv3", self.dtype)(out)
    out = _batch_norm("bn3", train, self.dtype)(out)
    if self.stride != 1 or x.shape[-1] != out_features:
      x = _conv(out_features, 1, self.stride, "VALID", "downsample_conv", self.dtype)(x)
      x = _batch_norm("downsample_bn", train, self.dtype)(x)
    return nn.relu(out + x)


class ResNet50(nn.Module):
  """NHWC images -> pooled features [B, 2048] (no head) or logits/embeddings (with fc), float32.

  head: None (no fc), "linear" (fc, torchvision) or "mlp" (fc_0 -> ReLU -> fc_1, MoCo v2's projector).
  """

  num_classes: Optional[int] = None  # output size of the fc head; required unless head is None
  head: Optional[str] = None
  mlp_hidden: int = 2048
  stages: Sequence[int] = RESNET50_STAGES
  band_adapter: bool = False
  freeze_adapter: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, return_features: bool = False):
    """With return_features=True returns (output, {"stem", "layer1".."layer4", "pooled"})."""
    if images.ndim != 4:
      raise ValueError(f"resnet.py: images must be [B, H, W, C], got shape {images.shape}")
    x = images.astype(self.dtype)
    if self.band_adapter:
      adapter_train = train and not self.freeze_adapter
      x = _conv(3, 1, 1, "VALID", "adapter_conv", self.dtype)(x)
      x = nn.relu(_batch_norm("adapter_bn", adapter_train, self.dtype)(x))
      if self.freeze_adapter:
        x = jax.lax.stop_gradient(x)
    x = _conv(64, 7, 2, ((3, 3), (3, 3)), "conv1", self.dtype)(x)
    x = nn.relu(_batch_norm("bn1", train, self.dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # flax pads max_pool with -inf
    features = {"stem": x}
    for stage, (blocks, planes) in enumerate(zip(self.stages, (64, 128, 256, 512)), start=1):
      for index in range(blocks):
        stride = 2 if stage > 1 and index == 0 else 1
        x = Bottleneck(planes, stride, self.dtype, name=f"layer{stage}_{index}")(x, train)
      features[f"layer{stage}"] = x
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    features["pooled"] = pooled
    out = pooled
    if self.head is not None:
      if self.num_classes is None:
        raise ValueError(f"resnet.py: head={self.head!r} needs num_classes")
      dense = lambda n, name: nn.Dense(
        n, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_linear_init, name=name
      )
      if self.head == "linear":
        out = dense(self.num_classes, "fc")(pooled)
      elif self.head == "mlp":
        out = dense(self.num_classes, "fc_1")(nn.relu(dense(self.mlp_hidden, "fc_0")(pooled)))
      else:
        raise ValueError(f"resnet.py: head must be None, 'linear' or 'mlp', got {self.head!r}")
      out = out.astype(jnp.float32)
    return (out, features) if return_features else out


def resnet50(**overrides) -> ResNet50:
  return ResNet50(**overrides)


def adapter_param_labels(params, frozen: str = "frozen", trainable: str = "trainable"):
  """Per-leaf labels for optax.multi_transform: `frozen` for the band adapter's params, else `trainable`."""

  def label(path, _):
    top = getattr(path[0], "key", None)
    return frozen if isinstance(top, str) and top.startswith("adapter_") else trainable

  return jax.tree_util.tree_map_with_path(label, params)
