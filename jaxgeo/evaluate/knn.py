"""Weighted cosine k-nearest-neighbour evaluation, as DINO's eval_knn.py, extended to multi-label targets.

Features are L2-normalised, so a dot product is the cosine similarity. Each query takes its k most similar
training samples; neighbour i votes with weight exp(sim_i / T). Single-label: the class with the largest
summed weight wins (top-1 accuracy). Multi-label: the score of class c is the weight fraction of neighbours
carrying label c, sum_i w_i y_ic / sum_i w_i, a number in [0, 1] that ranks queries for average precision.
Normalising by the total weight matters only in multi-label mode (argmax ignores it); without it a query in
a dense neighbourhood would outrank one in a sparse neighbourhood for every class at once.

The similarity matmul runs in JAX, one fixed-size chunk of queries at a time (the last chunk is padded, so
one compiled program serves all chunks), which keeps the [chunk, num_train] similarity block small.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeo.evaluate import features, metrics


def l2_normalize(features, eps=1e-12):
  features = jnp.asarray(features, jnp.float32)
  norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
  return features / jnp.maximum(norm, eps)


@functools.partial(jax.jit, static_argnames=("k",))
def _chunk_scores(queries, train_features, train_targets, k, temperature):
  similarity = l2_normalize(queries) @ train_features.T
  top_sim, top_idx = jax.lax.top_k(similarity, k)
  # Subtracting the row maximum before exp changes no normalised score and keeps exp finite for tiny T.
  weights = jnp.exp((top_sim - top_sim[:, :1]) / temperature)
  neighbour_targets = train_targets[top_idx]  # [chunk, k, C]
  votes = jnp.einsum("qk,qkc->qc", weights, neighbour_targets)
  return votes / jnp.sum(weights, axis=-1, keepdims=True)


def _one_hot(labels, num_classes=None):
  labels = np.asarray(labels)
  if labels.ndim == 2:
    return labels.astype(np.float32)
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  return np.eye(num_classes, dtype=np.float32)[labels.astype(np.int64)]


def knn_scores(
  train_features, train_labels, test_features, *, k=20, temperature=0.07, chunk_size=256, num_classes=None
):
  """Per-class vote scores [num_test, C] (numpy) for every test feature.

  `train_labels`: multi-hot [N, C] or class ids [N] (turned into one-hot). k is capped at the number of
  training samples, so tiny monitor subsets still work.
  """
  train_targets = jnp.asarray(_one_hot(train_labels, num_classes))
  train_features = l2_normalize(train_features)
  test_features = np.asarray(test_features, np.float32)
  num_test = len(test_features)
  if len(train_features) == 0 or num_test == 0:
    raise ValueError(f"knn: need training and test features, got {len(train_features)} and {num_test}")
  k = min(int(k), len(train_features))
  chunk_size = min(chunk_size, num_test)
  pad = -num_test % chunk_size
  padded = np.concatenate([test_features, np.zeros((pad,) + test_features.shape[1:], np.float32)])
  chunks = [
    _chunk_scores(padded[i : i + chunk_size], train_features, train_targets, k, jnp.float32(temperature))
    for i in range(0, len(padded), chunk_size)
  ]
  return np.asarray(jnp.concatenate(chunks))[:num_test]


def knn_evaluate(
  train_features, train_labels, test_features, test_labels, *, k=20, temperature=0.07, multilabel=True, chunk_size=256
):
  """{"knn_ap_macro", "knn_ap_micro"} (multi-label) or {"knn_top1"} (single-label, labels ids or one-hot)."""
  if multilabel:
    scores = knn_scores(
      train_features, train_labels, test_features, k=k, temperature=temperature, chunk_size=chunk_size
    )
    result = metrics.average_precision(test_labels, scores)
    return {"knn_ap_macro": result["ap_macro"], "knn_ap_micro": result["ap_micro"]}
  num_classes = max(int(metrics.class_ids(train_labels).max()), int(metrics.class_ids(test_labels).max())) + 1
  scores = knn_scores(
    train_features,
    metrics.class_ids(train_labels),
    test_features,
    k=k,
    temperature=temperature,
    chunk_size=chunk_size,
    num_classes=num_classes,
  )
  return {"knn_top1": metrics.accuracy(test_labels, scores)}


def knn_monitor(embed_fn, train_batches, test_batches, *, mesh=None, k=20, temperature=0.07, multilabel=True):
  """kNN metrics of the current backbone, for the training loop to log every N steps.

  embed_fn: images -> features [B, D], a jitted forward of the current teacher backbone. With a mesh it
    receives global arrays already split over the devices, e.g. in the training loop
    `knn_monitor(lambda images: embed_jit(state, images), bank, queries, mesh=mesh)` with
    embed_jit = jax.jit(task.embed); without a mesh it receives a jax array on the default device.
  train_batches / test_batches: sequences of host batches {"image", "labels", ...}, a few fixed batches
    drawn once at start-up (the memory bank and the held-out queries).
  mesh: as features.extract_features: batches are padded to the device count (a ragged last batch is
    fine), split over the mesh, and with several processes every process gets all features back.
  Returns {"knn_ap_macro", "knn_ap_micro"} (or {"knn_top1"} when multilabel=False) as Python floats.
  """
  train_features, train_labels = features.extract_features(embed_fn, train_batches, mesh)
  test_features, test_labels = features.extract_features(embed_fn, test_batches, mesh)
  return knn_evaluate(
    train_features, train_labels, test_features, test_labels, k=k, temperature=temperature, multilabel=multilabel
  )
