"""A PyTorch MoCo v2 step, written from the semantics of facebookresearch/moco (builder.py, main_moco.py), for
tests/test_infonce.py. Not a copy of their code.

Multi-GPU DistributedDataParallel is emulated on one process: the global batch is cut into `num_gpus`
consecutive slices, each run through the same modules (shared parameters, so autograd sums every slice's
gradient, as DDP's all-reduce does) in train mode, and each slice's BatchNorm updates its own copy of the
running buffers starting from the same values (DDP broadcasts rank 0's buffers at the start of every forward).
The reference keeps rank 0's copy; `buffer_rule="mean"` keeps the mean over ranks instead (jaxgeo's rule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_reference import ResNet50


class ResNet(ResNet50):
  """torchvision-named ResNet (v1.5 bottlenecks) with a configurable width and depth and MoCo v2's MLP head
  (fc.0 Linear -> ReLU -> fc.2 Linear); NCHW input. benchmarks/torch_moco.py's ResNet50, the MLP's sizes named."""

  def __init__(self, in_chans=3, width=64, stages=(3, 4, 6, 3), mlp_hidden=2048, dim=128):
    super().__init__(in_chans, (mlp_hidden, dim), width, stages)


def per_gpu_forward(module, images, num_gpus, buffer_rule="rank0"):
  """(outputs of the whole batch, [per-rank buffers]) of `module` run as DDP would on `num_gpus` GPUs."""
  if buffer_rule not in ("rank0", "mean"):
    raise ValueError(f"buffer_rule must be 'rank0' or 'mean', got {buffer_rule!r}")
  start = {name: buffer.clone() for name, buffer in module.named_buffers()}
  outputs, per_rank = [], []
  for local in images.chunk(num_gpus):
    # Fresh tensors per rank rather than copy_: autograd keeps the earlier ranks' buffers as op inputs.
    set_buffers(module, {name: value.clone() for name, value in start.items()})
    outputs.append(module(local))
    per_rank.append(dict(module.named_buffers()))
  merged = {}
  for name, value in per_rank[0].items():
    if buffer_rule == "mean" and value.is_floating_point():
      value = torch.stack([rank[name] for rank in per_rank]).mean(0)
    merged[name] = value.clone()
  set_buffers(module, merged)
  return torch.cat(outputs), per_rank


def set_buffers(module, buffers):
  for name, value in buffers.items():
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner), leaf, value)


class MoCo(nn.Module):
  """builder.MoCo: query / momentum key encoder, a [dim, K] queue of normalised keys, shuffled key batch."""

  def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, num_gpus=1, buffer_rule="rank0"):
    super().__init__()
    self.K, self.m, self.T = K, m, T
    self.num_gpus, self.buffer_rule = num_gpus, buffer_rule
    self.encoder_q, self.encoder_k = base_encoder(), base_encoder()
    for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
      param_k.data.copy_(param_q.data)
      param_k.requires_grad = False
    self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
    self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

  @torch.no_grad()
  def momentum_update_key_encoder(self):
    for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
      param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

  @torch.no_grad()
  def dequeue_and_enqueue(self, keys):
    # keys are already the global batch here: the all_gather is the identity on one process.
    batch = keys.shape[0]
    ptr = int(self.queue_ptr)
    assert self.K % batch == 0
    self.queue[:, ptr : ptr + batch] = keys.T
    self.queue_ptr[0] = (ptr + batch) % self.K

  def forward(self, im_q, im_k, idx_shuffle):
    """(logits [N, 1 + K], labels zeros [N]); idx_shuffle is the randperm rank 0 would broadcast."""
    q, self.q_buffers = per_gpu_forward(self.encoder_q, im_q, self.num_gpus, self.buffer_rule)
    q = F.normalize(q, dim=1)
    with torch.no_grad():
      self.momentum_update_key_encoder()
      # Rank r gets slice r of the shuffled global batch, so per_gpu_forward's consecutive slices are right.
      k, self.k_buffers = per_gpu_forward(self.encoder_k, im_k[idx_shuffle], self.num_gpus, self.buffer_rule)
      k = F.normalize(k, dim=1)
      k = k[torch.argsort(idx_shuffle)]
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
    logits = torch.cat([l_pos, l_neg], dim=1) / self.T
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    self.dequeue_and_enqueue(k)
    return logits, labels


def accuracy(output, target, topk=(1,)):
  """main_moco.accuracy: percent of rows whose target is among the top-k outputs."""
  with torch.no_grad():
    maxk = max(topk)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
    return [correct[:k].reshape(-1).float().sum() * (100.0 / target.shape[0]) for k in topk]


def make_optimizer(moco, lr, weight_decay, momentum=0.9):
  """main_moco: SGD over every parameter (encoder_k's have no grad and are skipped), WD on all of them."""
  return torch.optim.SGD(moco.parameters(), lr, momentum=momentum, weight_decay=weight_decay)


def train_step(moco, optimizer, im_q, im_k, idx_shuffle):
  """One iteration of main_moco.train: forward, CE against label 0, zero_grad, backward, step."""
  moco.train()
  logits, labels = moco(im_q, im_k, idx_shuffle)
  loss = nn.CrossEntropyLoss()(logits, labels)
  acc1, acc5 = accuracy(logits, labels, topk=(1, 5))
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return loss.detach(), logits.detach(), acc1, acc5
