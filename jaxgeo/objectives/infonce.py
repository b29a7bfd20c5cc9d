"""MoCo's InfoNCE with a queue of negative keys, its momentum encoder and its batch shuffle, as
facebookresearch/moco's builder.py (MoCo v1/v2).

Pieces of one MoCo step, in the reference's order (train/moco.py assembles them; every function is pure):

    check_sizes(queue_size=..., global_batch_size=..., bn_group_size=...)   # once, before any compute
    query = model.apply(query_vars, images_q, train=True)                     # bn_group_size = per-GPU batch
    key_params = momentum_update(key_params, query_params, m)                 # before the key forward
    shuffled, unshuffle_index = shuffle_keys(rng, images_k)
    key = unshuffle(model.apply(key_vars, shuffled, train=True), unshuffle_index)
    logits, keys = contrastive_logits(query, key, queue, temperature)         # positive at column 0
    loss = infonce_loss(logits)
    queue, ptr = enqueue(queue, ptr, keys)                                    # after the logits

The queue is [dim, K] like the reference's buffer (a column per key), so `module.queue` of a MoCo checkpoint
is the same array. Arrays are global: under a data-sharded jit the batch means, the enqueue of the whole
batch and the shuffle over the whole batch are the reference's all_gather / broadcast, done by XLA.
"""

import jax
import jax.numpy as jnp


def check_sizes(*, queue_size: int, global_batch_size: int, bn_group_size: int | None = None) -> None:
  """The reference's `assert K % batch_size == 0`, as a config error raised before anything is compiled.

  Each step writes the whole global batch of keys into one slice of the queue; a queue that is not a multiple
  of the batch would make that slice run off the end (dynamic_update_slice would silently shift it back).
  """
  if global_batch_size < 1:
    raise ValueError(f"config.train.global_batch_size must be >= 1, got {global_batch_size}")
  if queue_size < global_batch_size or queue_size % global_batch_size:
    raise ValueError(
      f"config.moco.queue_size={queue_size} must be a positive multiple of config.train.global_batch_size="
      f"{global_batch_size}: every step enqueues the whole global batch of keys and the pointer must wrap to 0 "
      f"(the reference asserts K % batch_size == 0); e.g. queue_size="
      f"{max(1, queue_size // global_batch_size) * global_batch_size}"
    )
  if bn_group_size is not None and (bn_group_size < 1 or global_batch_size % bn_group_size):
    raise ValueError(
      f"config.moco.bn_group_size={bn_group_size} must be >= 1 and divide config.train.global_batch_size="
      f"{global_batch_size}: BatchNorm statistics are taken per group of that many samples (one reference GPU)"
    )


def l2_normalize(x, axis=-1, eps=1e-12):
  """torch.nn.functional.normalize: x / max(||x||, eps), in float32, with torch's gradient (finite at x = 0,
  where sqrt's is not: the clamp goes under the root)."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), eps * eps))


def init_queue(rng, dim: int, size: int):
  """[dim, size] unit columns from a standard normal: the reference's randn queue normalised along dim 0."""
  return l2_normalize(jax.random.normal(rng, (dim, size), jnp.float32), axis=0)


def contrastive_logits(query, key, queue, temperature: float):
  """(logits [B, 1 + K], keys [B, dim]) from raw query / key embeddings [B, dim] and the queue [dim, K].

  Both embeddings are L2-normalised here. Column 0 holds q.k (the positive), columns 1.. q.queue, all divided
  by the temperature. `keys` are the normalised, gradient-free keys to pass to `enqueue` (the key encoder runs
  under no_grad in the reference, and the queue is a detached buffer).
  """
  q = l2_normalize(query)
  keys = jax.lax.stop_gradient(l2_normalize(key))
  positive = jnp.sum(q * keys, axis=-1, keepdims=True)
  negative = q @ jax.lax.stop_gradient(queue).astype(jnp.float32)
  return jnp.concatenate([positive, negative], axis=1) / temperature, keys


def infonce_loss(logits):
  """Cross-entropy with the positive (column 0) as the target, averaged over the batch."""
  logits = logits.astype(jnp.float32)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])


def instance_accuracy(logits, topk=(1, 5)) -> dict:
  """{"acc1": ..., "acc5": ...} in percent: how often the positive is among the k largest of the 1 + K logits,
  as main_moco.py logs them. A negative tied with the positive ranks before it: torch.topk orders ties
  arbitrarily, and this way a collapsed encoder (every logit equal) scores 0 %, not 100 %."""
  rank = jnp.sum(logits[:, 1:] >= logits[:, :1], axis=-1)
  return {f"acc{k}": 100.0 * jnp.mean((rank < k).astype(jnp.float32)) for k in topk}


def enqueue(queue, ptr, keys):
  """(queue, ptr) with the keys [B, dim] written as columns ptr..ptr+B-1 and ptr advanced to (ptr + B) % K.

  ptr is an int32 scalar that may be traced (it lives in the train state). Call after the logits: the current
  keys are not negatives for the queries they came with.
  """
  dim, size = queue.shape
  batch = keys.shape[0]
  if keys.shape != (batch, dim):
    raise ValueError(f"infonce.py: keys must be [batch, {dim}] to match the queue {queue.shape}, got {keys.shape}")
  if size % batch:
    raise ValueError(
      f"infonce.py: queue size {size} is not a multiple of the batch of {batch} keys; check_sizes should "
      "have rejected this config (config.moco.queue_size, config.train.global_batch_size)"
    )
  ptr = jnp.asarray(ptr, jnp.int32)
  queue = jax.lax.dynamic_update_slice(queue, keys.T.astype(queue.dtype), (jnp.int32(0), ptr))
  return queue, (ptr + batch) % size


def momentum_update(key_params, query_params, momentum):
  """key <- momentum * key + (1 - momentum) * query for every parameter (the reference's
  `_momentum_update_key_encoder`). Pass params only: the key encoder's BatchNorm statistics are its own,
  updated by its own train-mode forwards, never averaged with the query's."""
  for tree, name in ((key_params, "key_params"), (query_params, "query_params")):
    if isinstance(tree, dict) and ("params" in tree or "batch_stats" in tree):
      raise ValueError(
        f"infonce.py: momentum_update got a variables dict for {name} (top-level {sorted(tree)}); "
        "pass variables['params'] only: BatchNorm statistics are not momentum-averaged"
      )
  return jax.tree.map(lambda k, q: k * momentum + q * (1.0 - momentum), key_params, query_params)


def shuffle_keys(rng, images):
  """(images in a random order over the whole global batch, unshuffle_index) for the key encoder.

  With grouped BatchNorm the key encoder then normalises random groups of samples, as the reference's
  broadcast randperm hands each GPU a random slice: without it, a query and its key would share their BN
  statistics and the loss could be cheated through them. Under a data-sharded jit, constrain the result to the
  batch sharding so the key encoder still runs data-parallel.
  """
  order = jax.random.permutation(rng, images.shape[0])
  return jnp.take(images, order, axis=0), jnp.argsort(order)


def unshuffle(keys, unshuffle_index):
  """Key-encoder outputs back in the original sample order (inverse of shuffle_keys)."""
  return jnp.take(keys, unshuffle_index, axis=0)
