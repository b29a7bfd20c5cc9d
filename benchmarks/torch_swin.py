"""SwinV2 + FPN + segmentation head in PyTorch, with torchvision's state-dict key names: the reference for
tests/test_swin.py and the baseline of a GPU segmentation benchmark. torchvision cannot be imported on these
machines, so its `swin_v2_*` and `ops.FeaturePyramidNetwork` are written here from their documented behaviour
(see /work/shared/reference/segmentation.md); they are not copies of its code.

  SwinTransformerV2(embed_dim, depths, num_heads, num_classes=1000)   torchvision swin_v2_t/s/b (ARCHS)
  SwinTransformerV2(..., num_classes=None)                             features only, as a segmentation backbone
  FeaturePyramidNetwork(in_channels_list, out_channels)                keys inner_blocks.{i}.0.*; old .{i}.* load
  SegmentationModel(...)                                                the jaxgeo SegmentationModel's twin

All NCHW at the boundaries (images [B, C, H, W], logits [B, K, H, W]); the Swin is NHWC inside, as torchvision's.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = {
  "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), stochastic_depth_prob=0.2),
  "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), stochastic_depth_prob=0.3),
  "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), stochastic_depth_prob=0.5),
}


class Permute(nn.Module):
  def __init__(self, dims):
    super().__init__()
    self.dims = dims

  def forward(self, x):
    return x.permute(*self.dims)


class StochasticDepth(nn.Module):
  """Per-sample ("row") drop of a residual branch, survivors scaled by 1 / (1 - p)."""

  def __init__(self, p):
    super().__init__()
    self.p = p

  def forward(self, x):
    if not self.training or self.p == 0.0:
      return x
    survival = 1.0 - self.p
    noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(survival)
    return x * noise / survival if survival > 0 else x * noise


def window_attention(x, qkv, proj, position_bias, logit_scale, window, num_heads, shift):
  """torchvision's shifted_window_attention with logit_scale (the V2 path); x [B, H, W, C]."""
  batch, height, width, dim = x.shape
  pad_r, pad_b = (window - width % window) % window, (window - height % window) % window
  x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
  _, padded_h, padded_w, _ = x.shape
  shift = [0 if window >= padded_h else shift, 0 if window >= padded_w else shift]
  if sum(shift) > 0:
    x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
  num_windows = (padded_h // window) * (padded_w // window)
  x = x.view(batch, padded_h // window, window, padded_w // window, window, dim)
  x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * num_windows, window * window, dim)

  bias = qkv.bias.clone()
  third = bias.numel() // 3
  bias[third : 2 * third].zero_()
  tokens = x.size(1)
  q, k, v = (
    F.linear(x, qkv.weight, bias).reshape(x.size(0), tokens, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
  )
  attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
  attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp() + position_bias
  if sum(shift) > 0:
    regions = x.new_zeros((padded_h, padded_w))
    rows = ((0, -window), (-window, -shift[0]), (-shift[0], None))
    cols = ((0, -window), (-window, -shift[1]), (-shift[1], None))
    count = 0
    for row in rows:
      for col in cols:
        regions[row[0] : row[1], col[0] : col[1]] = count
        count += 1
    regions = regions.view(padded_h // window, window, padded_w // window, window).permute(0, 2, 1, 3)
    regions = regions.reshape(num_windows, tokens)
    mask = regions.unsqueeze(1) - regions.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    attn = attn.view(batch, num_windows, num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
    attn = attn.view(-1, num_heads, tokens, tokens)
  out = (F.softmax(attn, dim=-1) @ v).transpose(1, 2).reshape(x.size(0), tokens, dim)
  out = proj(out)
  out = out.view(batch, padded_h // window, padded_w // window, window, window, dim)
  out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, dim)
  if sum(shift) > 0:
    out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
  return out[:, :height, :width].contiguous()


class ShiftedWindowAttentionV2(nn.Module):
  def __init__(self, dim, window, shift, num_heads):
    super().__init__()
    self.window, self.shift, self.num_heads = window, shift, num_heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
    self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
    with torch.no_grad():
      self.qkv.bias[dim : 2 * dim].zero_()
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    table = table / (window - 1) * 8
    table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / 3.0
    self.register_buffer("relative_coords_table", table)
    grid = torch.flatten(torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")), 1)
    delta = (grid[:, :, None] - grid[:, None, :]).permute(1, 2, 0).contiguous() + (window - 1)
    index = (delta[:, :, 0] * (2 * window - 1) + delta[:, :, 1]).flatten()
    self.register_buffer("relative_position_index", index)

  def position_bias(self):
    tokens = self.window * self.window
    table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
    bias = table[self.relative_position_index].view(tokens, tokens, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
    return 16 * torch.sigmoid(bias)

  def forward(self, x):
    return window_attention(
      x, self.qkv, self.proj, self.position_bias(), self.logit_scale, self.window, self.num_heads, self.shift
    )


class SwinTransformerBlockV2(nn.Module):
  def __init__(self, dim, num_heads, window, shift, stochastic_depth_prob, mlp_ratio=4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-5)
    self.attn = ShiftedWindowAttentionV2(dim, window, shift, num_heads)
    self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
    self.norm2 = nn.LayerNorm(dim, eps=1e-5)
    hidden = int(dim * mlp_ratio)  # torchvision.ops.MLP: Linear, GELU, Dropout, Linear, Dropout
    self.mlp = nn.Sequential(
      nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0)
    )

  def forward(self, x):
    x = x + self.stochastic_depth(self.norm1(self.attn(x)))
    return x + self.stochastic_depth(self.norm2(self.mlp(x)))


class PatchMergingV2(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
    self.norm = nn.LayerNorm(2 * dim, eps=1e-5)

  def forward(self, x):
    height, width = x.shape[-3:-1]
    x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
    x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
    return self.norm(self.reduction(x))


class SwinTransformerV2(nn.Module):
  """torchvision SwinTransformer with the V2 block and merge; num_classes=None keeps `features` only."""

  def __init__(self, embed_dim, depths, num_heads, num_classes=1000, in_chans=3, window=8, stochastic_depth_prob=0.0):
    super().__init__()
    layers = [
      nn.Sequential(nn.Conv2d(in_chans, embed_dim, 4, stride=4), Permute([0, 2, 3, 1]), nn.LayerNorm(embed_dim))
    ]
    total, block_id = sum(depths), 0
    for stage, (depth, heads) in enumerate(zip(depths, num_heads)):
      dim = embed_dim * 2**stage
      blocks = []
      for index in range(depth):
        rate = stochastic_depth_prob * float(block_id) / max(total - 1, 1)
        blocks.append(SwinTransformerBlockV2(dim, heads, window, 0 if index % 2 == 0 else window // 2, rate))
        block_id += 1
      layers.append(nn.Sequential(*blocks))
      if stage < len(depths) - 1:
        layers.append(PatchMergingV2(dim))
    self.features = nn.Sequential(*layers)
    self.num_classes = num_classes
    if num_classes is not None:
      self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1), eps=1e-5)
      self.head = nn.Linear(embed_dim * 2 ** (len(depths) - 1), num_classes)
    for module in self.modules():
      if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
          nn.init.zeros_(module.bias)

  def stages(self, images):
    """NCHW images -> list of NHWC stage outputs (features.1, .3, .5, ...), no final norm."""
    outputs, x = [], images
    for index, layer in enumerate(self.features):
      x = layer(x)
      if index % 2 == 1:
        outputs.append(x)
    return outputs

  def forward(self, images):
    x = self.norm(self.features(images))
    return self.head(x.permute(0, 3, 1, 2).mean(dim=(2, 3)))


class ConvBlock(nn.Sequential):
  """torchvision's Conv2dNormActivation without norm and activation: a Sequential holding the conv at 0."""

  def __init__(self, in_channels, out_channels, kernel):
    super().__init__(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2))


class FeaturePyramidNetwork(nn.Module):
  _version = 2

  def __init__(self, in_channels_list, out_channels):
    super().__init__()
    self.inner_blocks = nn.ModuleList([ConvBlock(c, out_channels, 1) for c in in_channels_list])
    self.layer_blocks = nn.ModuleList([ConvBlock(out_channels, out_channels, 3) for _ in in_channels_list])
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_uniform_(module.weight, a=1)
        nn.init.constant_(module.bias, 0)

  def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    # Old torchvision (plain Conv2d) keys {block}.{i}.weight become {block}.{i}.0.weight, as torchvision does.
    old = re.compile(re.escape(prefix) + r"(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$")
    for key in [k for k in state_dict if old.match(k)]:
      block, index, leaf = old.match(key).groups()
      state_dict[f"{prefix}{block}.{index}.0.{leaf}"] = state_dict.pop(key)
    super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

  def forward(self, features):
    """features: NCHW maps, finest first -> list of NCHW maps, finest first."""
    last_inner = self.inner_blocks[-1](features[-1])
    results = [self.layer_blocks[-1](last_inner)]
    for index in range(len(features) - 2, -1, -1):
      lateral = self.inner_blocks[index](features[index])
      last_inner = lateral + F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
      results.insert(0, self.layer_blocks[index](last_inner))
    return results


class SegmentationHead(nn.Module):
  def __init__(self, in_channels, num_classes, channels=128, fusion="sum", num_levels=4):
    super().__init__()
    self.fusion = fusion
    fused = in_channels * (num_levels if fusion == "concat" else 1)
    self.conv = nn.Conv2d(fused, channels, 3, padding=1)
    self.classifier = nn.Conv2d(channels, num_classes, 1)

  def forward(self, pyramid, image_size):
    size = pyramid[0].shape[-2:]
    levels = [pyramid[0]] + [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pyramid[1:]]
    if self.fusion == "sum":
      fused = levels[0]
      for level in levels[1:]:
        fused = fused + level
    else:
      fused = torch.cat(levels, dim=1)
    logits = self.classifier(F.relu(self.conv(fused)))
    return F.interpolate(logits, size=tuple(image_size), mode="bilinear", align_corners=False)


class SegmentationModel(nn.Module):
  def __init__(
    self,
    num_classes,
    embed_dim=96,
    depths=(2, 2, 6, 2),
    num_heads=(3, 6, 12, 24),
    in_chans=3,
    window=8,
    fpn_channels=128,
    levels=(0, 1, 2, 3),
    fusion="sum",
    head_channels=128,
    stochastic_depth_prob=0.0,
  ):
    super().__init__()
    self.levels = tuple(levels)
    self.backbone = SwinTransformerV2(
      embed_dim, depths, num_heads, None, in_chans, window, stochastic_depth_prob=stochastic_depth_prob
    )
    self.fpn = FeaturePyramidNetwork([embed_dim * 2**level for level in self.levels], fpn_channels)
    self.head = SegmentationHead(fpn_channels, num_classes, head_channels, fusion, len(self.levels))

  def forward(self, images, return_intermediates=False):
    stages = self.backbone.stages(images)
    pyramid = self.fpn([stages[level].permute(0, 3, 1, 2) for level in self.levels])
    logits = self.head(pyramid, images.shape[-2:])
    return (logits, {"stages": stages, "pyramid": pyramid}) if return_intermediates else logits


def swin_v2(arch, **overrides):
  """torchvision's swin_v2_t / swin_v2_s / swin_v2_b (1000 classes unless overridden)."""
  return SwinTransformerV2(**{**ARCHS[arch], **overrides})
