"""The MoCo v2 training step in PyTorch as facebookresearch/moco main_moco.py runs it, and the torchvision-named
ResNet-50 it trains: the baseline of benchmarks/moco_step.py and the torch reference the tests load weights into
(tests/torch_reference.py re-exports the ResNet). Written from the published recipe; not a copy of its code.

One step (builder.MoCo.forward + main_moco.train): query forward, momentum update of the key encoder's params,
key forward on the shuffled batch (no grad), unshuffle, logits [q.k, q.queue] / T, cross-entropy against 0,
enqueue, SGD (momentum 0.9, weight decay 1e-4 on every parameter). One process stands for one reference GPU:
main_moco refuses anything but DistributedDataParallel, and with a world of one its all_gather is the identity,
so the batch shuffle is a permutation of this process's batch (its BatchNorm statistics are the whole batch's).
Two flavours:
  "eager":    main_moco as published plus what its README runs on V100s today: fp16 autocast + GradScaler,
              channels_last, eager mode, a Python loop over parameters for the momentum update;
  "compiled": what a PyTorch user tuning for speed adds: both encoders under torch.compile, a foreach momentum
              update and foreach SGD.
Images come in ready-made (augmentation is the data loader's job in the reference, on CPU workers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESNET50_STAGES = (3, 4, 6, 3)


class Bottleneck(nn.Module):
  """torchvision's v1.5 bottleneck (stride on the 3x3 conv), same submodule names."""

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), nn.BatchNorm2d(4 * planes)
    self.downsample = None
    if stride != 1 or inplanes != 4 * planes:
      self.downsample = nn.Sequential(
        nn.Conv2d(inplanes, 4 * planes, 1, stride=stride, bias=False), nn.BatchNorm2d(4 * planes)
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
  """torchvision-named ResNet (v1.5 bottlenecks); NCHW input. fc: None (Identity), an int (Linear) or (hidden, out)
  (MoCo v2's MLP: fc.0 Linear -> ReLU -> fc.2 Linear). `width` / `stages` shrink it for tests (64, (3, 4, 6, 3) is
  ResNet-50). torch's default initialisation (the tests load weights; a benchmark's speed does not depend on it)."""

  def __init__(self, in_chans=3, fc=1000, width=64, stages=RESNET50_STAGES):
    super().__init__()
    self.conv1 = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    inplanes = width
    for stage, blocks in enumerate(stages, start=1):
      planes = width * 2 ** (stage - 1)
      layers = []
      for index in range(blocks):
        layers.append(Bottleneck(inplanes, planes, 2 if stage > 1 and index == 0 else 1))
        inplanes = 4 * planes
      setattr(self, f"layer{stage}", nn.Sequential(*layers))
    self.num_stages = len(stages)
    if fc is None:
      self.fc = nn.Identity()
    elif isinstance(fc, int):
      self.fc = nn.Linear(inplanes, fc)
    else:
      self.fc = nn.Sequential(nn.Linear(inplanes, fc[0]), nn.ReLU(), nn.Linear(fc[0], fc[1]))

  def features(self, images):
    x = self.maxpool(F.relu(self.bn1(self.conv1(images))))
    for stage in range(1, self.num_stages + 1):
      x = getattr(self, f"layer{stage}")(x)
    return x.mean(dim=(2, 3))

  def forward(self, images):
    return self.fc(self.features(images))


class MoCoTrainer:
  """builder.MoCo (mlp=True) + main_moco's optimizer and loss on one device; `step(im_q, im_k)` -> loss."""

  def __init__(
    self,
    *,
    flavour="eager",
    device="cpu",
    in_chans=3,
    width=64,
    stages=RESNET50_STAGES,
    dim=128,
    mlp_hidden=2048,
    queue_size=65536,
    momentum=0.999,
    temperature=0.2,
    lr=0.03,
    weight_decay=1e-4,
    amp_dtype=torch.float16,
    compile_backend="inductor",
  ):
    if flavour not in ("eager", "compiled"):
      raise ValueError(f"flavour: expected 'eager' or 'compiled', got {flavour!r}")
    self.device, self.flavour = torch.device(device), flavour
    on_cuda = self.device.type == "cuda"
    memory_format = torch.channels_last

    def build():
      return ResNet50(in_chans, (mlp_hidden, dim), width, stages).to(self.device, memory_format=memory_format)

    self.encoder_q, self.encoder_k = build(), build()
    self.encoder_k.load_state_dict(self.encoder_q.state_dict())  # params copied; BN buffers equal at init anyway
    for p in self.encoder_k.parameters():
      p.requires_grad = False
    self.params_q, self.params_k = list(self.encoder_q.parameters()), list(self.encoder_k.parameters())
    self.queue = F.normalize(torch.randn(dim, queue_size, device=self.device), dim=0)
    self.queue_ptr = 0
    self.momentum, self.temperature = momentum, temperature
    self.optimizer = torch.optim.SGD(
      self.params_q, lr, momentum=0.9, weight_decay=weight_decay, foreach=flavour == "compiled"
    )
    # fp16 autocast + GradScaler on GPUs; on CPU no autocast (fp16 convolutions there are emulated).
    self.amp_dtype = amp_dtype if on_cuda else None
    self.scaler = torch.amp.GradScaler("cuda", enabled=on_cuda and amp_dtype == torch.float16)
    self.forward_q, self.forward_k = self.encoder_q, self.encoder_k
    if flavour == "compiled":
      self.forward_q = torch.compile(self.encoder_q, backend=compile_backend)
      self.forward_k = torch.compile(self.encoder_k, backend=compile_backend)

  @torch.no_grad()
  def _momentum_update(self):
    if self.flavour == "compiled":
      torch._foreach_mul_(self.params_k, self.momentum)
      torch._foreach_add_(self.params_k, self.params_q, alpha=1.0 - self.momentum)
    else:
      for k, q in zip(self.params_k, self.params_q):
        k.data = k.data * self.momentum + q.data * (1.0 - self.momentum)

  def step(self, im_q, im_k):
    """im_q, im_k [B, C, H, W] (channels_last is applied here); returns the loss (a device tensor)."""
    im_q = im_q.contiguous(memory_format=torch.channels_last)
    im_k = im_k.contiguous(memory_format=torch.channels_last)
    self.encoder_q.train()
    self.encoder_k.train()
    autocast = torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=bool(self.amp_dtype))
    with autocast:
      q = F.normalize(self.forward_q(im_q).float(), dim=1)
      with torch.no_grad():
        self._momentum_update()
        order = torch.randperm(im_k.shape[0], device=self.device)
        k = F.normalize(self.forward_k(im_k[order]).float(), dim=1)[torch.argsort(order)]
      positive = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
      negative = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
      logits = torch.cat([positive, negative], dim=1) / self.temperature
      loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=self.device))
    with torch.no_grad():
      batch = k.shape[0]
      self.queue[:, self.queue_ptr : self.queue_ptr + batch] = k.T
      self.queue_ptr = (self.queue_ptr + batch) % self.queue.shape[1]
    self.optimizer.zero_grad(set_to_none=True)
    self.scaler.scale(loss).backward()
    self.scaler.step(self.optimizer)
    self.scaler.update()
    return loss.detach()
