"""ResNet-50 matching torchvision's (v1.5: stride on the 3x3 conv of the bottleneck), in flax.linen.

Param names mirror torchvision state-dict keys (`layer2_0/conv2` <-> `layer2.0.conv2`,
`layer2_0/downsample_conv` <-> `layer2.0.downsample.0`) so jaxgeo.bridge.resnet is a plain key map.
Numerics follow torchvision: explicit padding 3 on the 7x7/2 stem and 1 on the 3x3/2 max-pool (padded with
-inf) instead of 'SAME', which pads asymmetrically and would shift every feature by a pixel. BatchNorm is
torch's BatchNorm2d: eps 1e-5, running = 0.9 * running + 0.1 * batch (torch momentum 0.1), normalising with
the biased batch variance but storing the unbiased one (n/(n-1), n = samples * H * W), so a train-mode step
leaves the same running statistics as torch (flax.linen.BatchNorm stores the biased one).

Grouped ("ghost") BatchNorm (``bn_group_size=g``): in train mode the statistics are those of each run of g
consecutive samples, as when each of B/g GPUs normalises its own slice of the batch (MoCo's per-GPU BN that its
batch shuffle relies on). It depends only on the batch order, never on the mesh: under a data-sharded jit a
group may live on one device or span several and the result is the same. The single running average stores
the mean over groups of the group statistics; see BatchNorm for why.

Small variants for tests and smoke runs: ``stages`` (blocks per stage) and ``width`` (stem channels, 64 in
ResNet-50; stage s has width * 2**(s-1) planes, so features are 32 * width wide).

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


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over the last (channel) axis, optionally over groups of consecutive samples.

  Same variable names as flax.linen.BatchNorm (params scale/bias, batch_stats mean/var) and the same eval-mode
  arithmetic, so checkpoints and the torch key map are unchanged. Statistics are float32 whatever `dtype` is.

  Running statistics with groups: the reference keeps one copy per GPU (each updated from its own slice; DDP
  re-broadcasts rank 0's at every forward and rank 0's copy is what gets saved), i.e. an EMA of one group's
  statistics. Here the EMA is fed the mean over groups of each group's (mean, unbiased var): the same
  expectation (every group is an equally likely slice of the batch; after the key shuffle a random one), less
  noise, and determined by the batch alone rather than by which device is "rank 0". It equals the mean of the
  per-GPU copies after a step that started from shared ones. It is not the statistics of the whole batch: the
  spread between group means is left out, as it is on every reference GPU.
  """

  use_running_average: bool
  group_size: Optional[int] = None  # None: one group, the whole batch
  momentum: float = 0.9  # flax convention: running = momentum * running + (1 - momentum) * batch
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    if self.use_running_average:
      # flax.linen.BatchNorm's eval arithmetic, operation for operation: exported models must not move.
      y = x - ra_mean.value
      y = y * (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale)
      return jnp.asarray(y + bias, self.dtype)

    batch = x.shape[0]
    group = batch if self.group_size is None else self.group_size
    if group < 1 or batch % group:
      raise ValueError(
        f"resnet.py: {self.name}: bn_group_size={self.group_size} must be >= 1 and divide the batch of {batch} "
        "(groups are runs of consecutive samples, one per reference GPU)"
      )
    values_per_group = x.size // (batch // group) // features
    if values_per_group < 2:
      raise ValueError(
        f"resnet.py: {self.name}: train-mode BatchNorm needs more than one value per channel per group, got "
        f"groups of {group} sample(s) x {x.shape[1:-1]} (torch refuses this too); use a larger bn_group_size or "
        "larger images"
      )
    grouped = x.astype(jnp.float32).reshape(batch // group, values_per_group, features)
    mean = jnp.mean(grouped, axis=1, keepdims=True)
    # Two-pass variance (as torch), not E[x^2] - E[x]^2, which cancels badly when |mean| >> std.
    var = jnp.mean(jnp.square(grouped - mean), axis=1, keepdims=True)
    y = (grouped - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    if not self.is_initializing():
      unbiased = var * (values_per_group / (values_per_group - 1))
      keep = self.momentum
      ra_mean.value = keep * ra_mean.value + (1.0 - keep) * jnp.mean(mean, axis=(0, 1))
      ra_var.value = keep * ra_var.value + (1.0 - keep) * jnp.mean(unbiased, axis=(0, 1))
    return y.reshape(x.shape).astype(self.dtype)


def _batch_norm(name, train, dtype, group_size=None):
  return BatchNorm(use_running_average=not train, group_size=group_size, dtype=dtype, name=name)


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
  bn_group_size: Optional[int] = None

  @nn.compact
  def __call__(self, x, train: bool):
    out_features = self.planes * 4
    bn = lambda name: _batch_norm(name, train, self.dtype, self.bn_group_size)
    out = _conv(self.planes, 1, 1, "VALID", "conv1", self.dtype)(x)
    out = nn.relu(bn("bn1")(out))
    out = _conv(self.planes, 3, self.stride, ((1, 1), (1, 1)), "conv2", self.dtype)(out)
    out = nn.relu(bn("bn2")(out))
    out = _conv(out_features, 1, 1, "VALID", "conv3", self.dtype)(out)
    out = bn("bn3")(out)
    if self.stride != 1 or x.shape[-1] != out_features:
      x = _conv(out_features, 1, self.stride, "VALID", "downsample_conv", self.dtype)(x)
      x = bn("downsample_bn")(x)
    return nn.relu(out + x)


class ResNet50(nn.Module):
  """NHWC images -> pooled features [B, 2048] (no head) or logits/embeddings (with fc), float32.

  head: None (no fc), "linear" (fc, torchvision) or "mlp" (fc_0 -> ReLU -> fc_1, MoCo v2's projector).
  bn_group_size: None, or g: train-mode BatchNorm statistics per run of g consecutive samples (module docstring).
  """

  num_classes: Optional[int] = None  # output size of the fc head; required unless head is None
  head: Optional[str] = None
  mlp_hidden: int = 2048
  stages: Sequence[int] = RESNET50_STAGES
  width: int = 64
  bn_group_size: Optional[int] = None
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
      x = nn.relu(_batch_norm("adapter_bn", adapter_train, self.dtype, self.bn_group_size)(x))
      if self.freeze_adapter:
        x = jax.lax.stop_gradient(x)
    x = _conv(self.width, 7, 2, ((3, 3), (3, 3)), "conv1", self.dtype)(x)
    x = nn.relu(_batch_norm("bn1", train, self.dtype, self.bn_group_size)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # flax pads max_pool with -inf
    features = {"stem": x}
    for stage, blocks in enumerate(self.stages, start=1):
      planes = self.width * 2 ** (stage - 1)
      for index in range(blocks):
        stride = 2 if stage > 1 and index == 0 else 1
        block = Bottleneck(planes, stride, self.dtype, self.bn_group_size, name=f"layer{stage}_{index}")
        x = block(x, train)
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
