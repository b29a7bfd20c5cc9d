"""Small PyTorch models with the reference state-dict names (DINO ViT + DINOHead, torchvision ResNet-50),
written for the bridge tests. They follow the published architectures; they are not copies of their code.
The ResNet-50 (and its Bottleneck) lives in benchmarks/torch_moco.py, which the MoCo benchmark trains."""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from torch_moco import Bottleneck, ResNet50  # noqa: E402

__all__ = ["Bottleneck", "DINOHead", "MultiCropWrapper", "ResNet50", "VisionTransformer", "randomize"]


class Attention(nn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
    query, key, value = qkv[0], qkv[1], qkv[2]
    weights = (query @ key.transpose(-2, -1) * head_dim**-0.5).softmax(dim=-1)
    return self.proj((weights @ value).transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
    self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch_size, in_chans, dim):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

  def forward(self, images):
    return self.proj(images).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
  """DINO ViT (num_classes=0): returns the normed CLS token; NCHW input."""

  def __init__(self, patch_size=16, dim=192, depth=12, num_heads=3, in_chans=3, img_size=224):
    super().__init__()
    self.patch_size = patch_size
    grid = img_size // patch_size
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.5)
    self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
    self.blocks = nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Identity()

  def position_embedding(self, tokens, height, width):
    stored = self.pos_embed.shape[1] - 1
    if tokens == stored and height == width:
      return self.pos_embed
    dim, side = self.pos_embed.shape[-1], int(math.sqrt(stored))
    # The +0.1 and the scale-factor (not size) form are what the DINO release does; keep them.
    h_patches, w_patches = height // self.patch_size + 0.1, width // self.patch_size + 0.1
    grid = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
      grid, scale_factor=(h_patches / math.sqrt(stored), w_patches / math.sqrt(stored)), mode="bicubic"
    )
    return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

  def forward(self, images):
    height, width = images.shape[-2:]
    tokens = self.patch_embed(images)
    tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    tokens = tokens + self.position_embedding(tokens.shape[1] - 1, height, width)
    for block in self.blocks:
      tokens = block(tokens)
    return self.norm(tokens)[:, 0]


class DINOHead(nn.Module):
  def __init__(self, in_dim, out_dim, hidden_dim=64, bottleneck_dim=32, norm_last_layer=True):
    super().__init__()
    self.mlp = nn.Sequential(
      nn.Linear(in_dim, hidden_dim),
      nn.GELU(),
      nn.Linear(hidden_dim, hidden_dim),
      nn.GELU(),
      nn.Linear(hidden_dim, bottleneck_dim),
    )
    with warnings.catch_warnings():  # the reference uses the old (deprecated) weight_norm: same keys
      warnings.simplefilter("ignore", FutureWarning)
      self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    self.last_layer.weight_g.data.fill_(1)
    if norm_last_layer:
      self.last_layer.weight_g.requires_grad = False

  def forward(self, x):
    return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
  def __init__(self, backbone, head):
    super().__init__()
    self.backbone, self.head = backbone, head

  def forward(self, images):
    return self.head(self.backbone(images))


def randomize(module: nn.Module, seed: int, calibration_images=None):
  """Random weights that exercise every parameter; BatchNorm running stats taken from one batch (momentum
  1) so that eval-mode activations stay O(1) through all 50 layers, then scale/shift perturbed."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      if name.endswith("weight_g"):
        continue
      if param.ndim == 1:
        # Small last-BN gains in each residual branch, as in trained ResNets: keeps activations
        # O(1) so that an fp32 comparison at atol 1e-5 is meaningful rather than roundoff.
        base = (0.2 if ".bn3." in name else 1.0) if name.endswith("weight") else 0.0
        param.copy_(
          base + 0.2 * base * torch.randn(param.shape, generator=generator)
          if name.endswith("weight")
          else 0.1 * torch.randn(param.shape, generator=generator)
        )
    if calibration_images is not None:
      bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
      for bn in bns:
        bn.momentum = 1.0
      module.train()
      module(calibration_images)
      for bn in bns:
        bn.momentum = 0.1
        # Near-dead channels would get var ~ 0 and turn fp32 rounding into 1e-4 output noise.
        bn.running_var.clamp_(min=float(bn.running_var.mean()))
  return module.eval()
