"""The DINO training step in PyTorch, as facebookresearch/dino main_dino.py runs it: the baseline for
benchmarks/dino_step.py. Written for this benchmark from the paper's recipe; not a copy of the reference code.

One step = teacher forward on the 2 global crops, student forward on all crops grouped by resolution (the
reference's MultiCropWrapper), DINO loss with a centred, sharpened teacher, backward under fp16 autocast with a
GradScaler, per-tensor gradient clipping, AdamW (no weight decay on biases and norms), EMA teacher update and
the centre update. Two flavours:
  "eager":    the reference as published: naive attention (q @ k^T, softmax, @ v), eager mode, for-loop AdamW
              and a Python loop over parameters for the EMA;
  "compiled": what a PyTorch user tuning for speed would write: F.scaled_dot_product_attention, the student and
              teacher wrapped in torch.compile, fused AdamW (CUDA) and a foreach EMA.
Crops come in ready-made (augmentation is the data loader's job in the reference, on CPU workers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


class Attention(nn.Module):
  def __init__(self, dim, num_heads, fused):
    super().__init__()
    self.num_heads, self.fused = num_heads, fused
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)
    if self.fused:
      out = F.scaled_dot_product_attention(query, key, value)
    else:
      attn = (query * head_dim**-0.5) @ key.transpose(-2, -1)
      out = attn.softmax(dim=-1) @ value
    return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DropPath(nn.Module):
  def __init__(self, rate):
    super().__init__()
    self.rate = rate

  def forward(self, x):
    if not self.training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
  def __init__(self, dim, num_heads, drop_path, fused):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads, fused)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
    self.drop_path = DropPath(drop_path)

  def forward(self, x):
    x = x + self.drop_path(self.attn(self.norm1(x)))
    return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
  """DINO ViT without classifier: normed CLS token; position embedding resized bicubically per crop size."""

  def __init__(
    self, embed_dim, depth, num_heads, patch_size=16, in_chans=3, img_size=224, drop_path_rate=0.0, fused=False
  ):
    super().__init__()
    self.patch_size = patch_size
    self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
    grid = img_size // patch_size
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
    rates = torch.linspace(0, drop_path_rate, depth).tolist()
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, r, fused) for r in rates])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    nn.init.trunc_normal_(self.pos_embed, std=0.02)
    nn.init.trunc_normal_(self.cls_token, std=0.02)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)

  def pos_encoding(self, h_patches, w_patches):
    num_patches = self.pos_embed.shape[1] - 1
    if h_patches * w_patches == num_patches and h_patches == w_patches:
      return self.pos_embed
    grid = int(math.sqrt(num_patches))
    patch_pos = self.pos_embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
      patch_pos, scale_factor=((h_patches + 0.1) / grid, (w_patches + 0.1) / grid), mode="bicubic"
    )
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h_patches * w_patches, -1)
    return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

  def forward(self, images):
    tokens = self.patch_embed(images)  # [B, D, h, w]
    h_patches, w_patches = tokens.shape[-2:]
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    tokens = tokens + self.pos_encoding(h_patches, w_patches)
    for block in self.blocks:
      tokens = block(tokens)
    return self.norm(tokens)[:, 0]


class DINOHead(nn.Module):
  """3-layer MLP -> l2 normalise -> weight-normed last layer (gain fixed to 1 when norm_last_layer)."""

  def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
    super().__init__()
    self.mlp = nn.Sequential(
      nn.Linear(in_dim, hidden_dim),
      nn.GELU(),
      nn.Linear(hidden_dim, hidden_dim),
      nn.GELU(),
      nn.Linear(hidden_dim, bottleneck_dim),
    )
    for m in self.mlp:
      if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    original0 = self.last_layer.parametrizations.weight.original0  # the gain g
    original0.data.fill_(1.0)
    if norm_last_layer:
      original0.requires_grad = False

  def forward(self, x):
    return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCrop(nn.Module):
  """Backbone once per resolution group, head once over every crop's features."""

  def __init__(self, backbone, head):
    super().__init__()
    self.backbone, self.head = backbone, head

  def forward(self, crop_groups):
    features = torch.cat([self.backbone(group) for group in crop_groups])
    return self.head(features)


def dino_loss(student_out, teacher_out, center, num_crops, student_temp, teacher_temp):
  """Cross-entropy of every student crop against each teacher global crop it is not."""
  student_chunks = (student_out / student_temp).chunk(num_crops)
  teacher_chunks = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(2)
  total, terms = 0.0, 0
  for t_index, t in enumerate(teacher_chunks):
    for s_index, s in enumerate(student_chunks):
      if s_index == t_index:
        continue
      total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
      terms += 1
  return total / terms


def param_groups(model):
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
  return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class DinoTrainer:
  """Holds student, teacher, optimiser, scaler and centre; `step(global_crops, local_crops)` is one update."""

  def __init__(
    self,
    *,
    arch="small",
    depth=None,
    embed_dim=None,
    num_heads=None,
    patch_size=16,
    in_chans=3,
    global_size=224,
    out_dim=65536,
    hidden_dim=2048,
    bottleneck_dim=256,
    drop_path_rate=0.1,
    flavour="eager",
    device="cpu",
    amp_dtype=torch.float16,
    compile_backend="inductor",
    lr=5e-4,
    weight_decay=0.04,
    clip_grad=3.0,
    momentum_teacher=0.996,
    student_temp=0.1,
    teacher_temp=0.04,
    center_momentum=0.9,
  ):
    if flavour not in ("eager", "compiled"):
      raise ValueError(f"flavour: expected 'eager' or 'compiled', got {flavour!r}")
    dim, arch_depth, heads = ARCHS[arch]
    dim, arch_depth, heads = embed_dim or dim, depth or arch_depth, num_heads or heads
    fused = flavour == "compiled"
    self.device = torch.device(device)
    self.flavour = flavour

    def build(rate):
      backbone = VisionTransformer(dim, arch_depth, heads, patch_size, in_chans, global_size, rate, fused)
      return MultiCrop(backbone, DINOHead(dim, out_dim, hidden_dim, bottleneck_dim)).to(self.device)

    self.student = build(drop_path_rate)
    self.teacher = build(0.0)
    self.teacher.load_state_dict(self.student.state_dict())
    for p in self.teacher.parameters():
      p.requires_grad = False
    self.student_params = [p for p in self.student.parameters()]
    self.teacher_params = [p for p in self.teacher.parameters()]
    on_cuda = self.device.type == "cuda"
    self.optimizer = torch.optim.AdamW(
      param_groups(self.student),
      lr=lr,
      weight_decay=weight_decay,
      **({"fused": True} if fused and on_cuda else {"foreach": False}),
    )
    self.weight_decay = weight_decay
    # fp16 autocast + GradScaler as the reference; on CPU no autocast (fp16 matmuls there are emulated).
    self.amp_dtype = amp_dtype if on_cuda else None
    self.scaler = torch.amp.GradScaler("cuda", enabled=on_cuda and amp_dtype == torch.float16)
    self.center = torch.zeros(1, out_dim, device=self.device)
    self.clip_grad, self.momentum = clip_grad, momentum_teacher
    self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
    self.student_forward, self.teacher_forward = self.student, self.teacher
    if fused:
      self.student_forward = torch.compile(self.student, backend=compile_backend)
      self.teacher_forward = torch.compile(self.teacher, backend=compile_backend)

  def step(self, global_crops, local_crops):
    """global_crops [2B, C, G, G], local_crops [LB, C, l, l] (crop-major, as the reference's collate)."""
    num_crops = 2 + local_crops.shape[0] // (global_crops.shape[0] // 2)
    self.student.train()
    with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
      teacher_out = self.teacher_forward([global_crops])
      groups = [global_crops, local_crops] if local_crops.shape[0] else [global_crops]
      student_out = self.student_forward(groups)
      loss = dino_loss(
        student_out.float(), teacher_out.float(), self.center, num_crops, self.student_temp, self.teacher_temp
      )
    self.optimizer.zero_grad(set_to_none=True)
    self.scaler.scale(loss).backward()
    self.scaler.unscale_(self.optimizer)
    # The reference's clip_gradients: each tensor on its own. It reads every norm back with .item() (a host
    # sync per tensor); the eager flavour keeps that, the compiled one clamps on the device.
    for p in self.student_params:
      if p.grad is None:
        continue
      norm = p.grad.detach().norm(2)
      if self.flavour == "eager":
        coef = self.clip_grad / (norm.item() + 1e-6)
        if coef < 1:
          p.grad.mul_(coef)
      else:
        p.grad.mul_(torch.clamp(self.clip_grad / (norm + 1e-6), max=1.0))
    self.scaler.step(self.optimizer)
    self.scaler.update()
    with torch.no_grad():
      if self.flavour == "compiled":
        torch._foreach_mul_(self.teacher_params, self.momentum)
        torch._foreach_add_(self.teacher_params, self.student_params, alpha=1.0 - self.momentum)
      else:
        for t, s in zip(self.teacher_params, self.student_params):
          t.mul_(self.momentum).add_((1.0 - self.momentum) * s.detach())
      batch_center = teacher_out.float().sum(dim=0, keepdim=True) / teacher_out.shape[0]
      self.center.mul_(self.center_momentum).add_(batch_center * (1.0 - self.center_momentum))
    return loss.detach()
