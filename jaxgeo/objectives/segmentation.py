"""Segmentation losses, pure and jit-able: torch's weighted, label-smoothed cross-entropy, soft Dice,
Lovasz-softmax, and class weights from pixel counts (host numpy).

Cross-entropy is torch.nn.CrossEntropyLoss(weight=w, ignore_index=i, label_smoothing=e, reduction="mean") on
logits [..., C] (channels last) and targets [...]. Its formula with weights is not "smoothed one-hot target,
weighted by the true class": ATen (LossNLL.cpp, cross_entropy_loss_label_smoothing) computes

  loss = (1 - e) * sum_n w[y_n] * -log p_n[y_n] / sum_n w[y_n]
         + (e / C) * sum_n sum_c w[c] * -log p_n[c] / sum_n w[y_n]

over the pixels n whose target is not ignore_index: the smoothing mass sent to class c is weighted by c's own
weight, and both terms are normalised by the weights of the TRUE classes. ignore_index may be a class id
(those targets are skipped, the class still takes smoothing mass), as in torch. Where torch returns NaN (no
pixel counted), this returns 0 with a zero gradient, so a batch of unlabelled tiles is a no-op, not a dropped
step. `cross_entropy_terms` returns (numerator, denominator) so that a split's loss can be summed exactly over
batches.

Targets outside [0, C) other than ignore_index are a data error that torch asserts on; the sources guarantee
class ids (data/tiles.py to_class_ids), and here such pixels are not counted.
"""

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTINGS = ("none", "inverse", "enet")
ENET_C = 1.02  # ENet / LinkNet / RoboSat `rs weights`: w = 1 / ln(1.02 + p)


def counted_pixels(targets, num_classes, ignore_index=None, valid=None):
  """bool [...]: pixels that take part in the loss (a class id, not ignore_index, in a valid row)."""
  counted = (targets >= 0) & (targets < num_classes)
  if ignore_index is not None:
    counted &= targets != ignore_index
  if valid is not None:
    valid = jnp.asarray(valid, bool)
    counted &= valid.reshape(valid.shape + (1,) * (targets.ndim - valid.ndim))
  return counted


def cross_entropy_terms(logits, targets, *, weights=None, ignore_index=None, label_smoothing=0.0, valid=None):
  """(numerator, denominator) float32 scalars of torch's mean cross-entropy (see the module doc).

  logits [..., C] (any float dtype; computed in float32), targets [...] int class ids; weights [C] or None;
  valid: bool [B] (rows to count) or None.
  """
  num_classes = logits.shape[-1]
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f"segmentation loss: logits {logits.shape} must be targets {targets.shape} + [classes]")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  counted = counted_pixels(targets, num_classes, ignore_index, valid)
  safe = jnp.where(counted, targets, 0).astype(jnp.int32)
  weights = jnp.ones((num_classes,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  true_weight = jnp.where(counted, weights[safe], 0.0)
  true_log_prob = jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  numerator = -(1.0 - label_smoothing) * jnp.sum(true_weight * true_log_prob)
  if label_smoothing:
    smooth = -jnp.sum(log_probs * weights, axis=-1)
    numerator += (label_smoothing / num_classes) * jnp.sum(jnp.where(counted, smooth, 0.0))
  return numerator, jnp.sum(true_weight)


def ratio(numerator, denominator):
  """numerator / denominator, 0 (and a zero gradient) where the denominator is 0."""
  safe = jnp.where(denominator > 0, denominator, 1.0)
  return jnp.where(denominator > 0, numerator / safe, 0.0)


def cross_entropy(logits, targets, **kwargs):
  """torch.nn.functional.cross_entropy(..., reduction="mean") on channels-last logits; kwargs as
  cross_entropy_terms. 0 when no pixel is counted (torch: NaN)."""
  return ratio(*cross_entropy_terms(logits, targets, **kwargs))


def dice_loss(logits, targets, *, ignore_index=None, valid=None, smooth=1.0):
  """1 - mean soft Dice over the classes present in the counted targets (0 when none is).

  Per class c over the counted pixels: (2 sum p_c g_c + smooth) / (sum p_c + sum g_c + smooth), p the softmax,
  g the one-hot target, all pixels of the batch pooled. Absent classes are left out of the mean rather than
  scored 1 (which would reward predicting nothing) or 0 (which would punish a batch for its content).
  """
  num_classes = logits.shape[-1]
  counted = counted_pixels(targets, num_classes, ignore_index, valid)[..., None]
  probs = jnp.where(counted, jax.nn.softmax(logits.astype(jnp.float32), axis=-1), 0.0)
  onehot = jnp.where(counted, jax.nn.one_hot(targets, num_classes, dtype=jnp.float32), 0.0)
  axes = tuple(range(targets.ndim))
  intersection = jnp.sum(probs * onehot, axis=axes)
  support = jnp.sum(onehot, axis=axes)
  dice = (2.0 * intersection + smooth) / (jnp.sum(probs, axis=axes) + support + smooth)
  present = support > 0
  return ratio(jnp.sum(jnp.where(present, 1.0 - dice, 0.0)), jnp.sum(present).astype(jnp.float32))


def _lovasz_gradient(foreground_sorted):
  """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors sorted in decreasing order."""
  total = jnp.sum(foreground_sorted)
  intersection = total - jnp.cumsum(foreground_sorted)
  union = total + jnp.cumsum(1.0 - foreground_sorted)
  jaccard = 1.0 - intersection / union
  return jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(logits, targets, *, ignore_index=None, valid=None):
  """Lovasz-softmax (Berman et al. 2018, classes="present", all pixels of the batch pooled, per_image=False).

  Pixels not counted get error 0 and no foreground, so they sort last and add nothing: the loss equals the
  reference's, which drops them first (a static shape needs them kept).
  """
  num_classes = logits.shape[-1]
  counted = counted_pixels(targets, num_classes, ignore_index, valid).reshape(-1)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, num_classes)
  onehot = jax.nn.one_hot(targets.reshape(-1), num_classes, dtype=jnp.float32) * counted[:, None]
  errors = jnp.abs(onehot - probs) * counted[:, None]

  def one_class(class_errors, class_foreground):
    order = jnp.argsort(-class_errors)
    return jnp.dot(class_errors[order], _lovasz_gradient(class_foreground[order]))

  losses = jax.vmap(one_class, in_axes=(1, 1))(errors, onehot)
  present = jnp.sum(onehot, axis=0) > 0
  return ratio(jnp.sum(jnp.where(present, losses, 0.0)), jnp.sum(present).astype(jnp.float32))


def class_weights(counts, scheme):
  """float64 [C] class weights from labelled pixel counts [C] (host).

  "inverse"  N / (K * n_c), K the classes with pixels (scikit-learn's "balanced" when every class has pixels):
             the pixel-weighted mean weight is 1. A class with no pixel gets 0 (its weight never multiplies a
             target; with smoothing it only scales the mass sent to it).
  "enet"     1 / ln(1.02 + n_c / N): ENet / LinkNet, RoboSat's `rs weights` (unrounded), bounded by 50.5, so a
             rare class is boosted without the inverse scheme's 100x extremes.
  "none"     ones.
  """
  counts = np.asarray(counts, np.float64)
  if scheme not in WEIGHTINGS:
    raise ValueError(f"class weighting {scheme!r}; expected one of {WEIGHTINGS} (config.loss.weighting)")
  if counts.ndim != 1 or np.any(counts < 0):
    raise ValueError(f"class weights need non-negative pixel counts per class, got {counts}")
  total = counts.sum()
  if scheme == "none":
    return np.ones_like(counts)
  if total <= 0:
    raise ValueError("class weights: the masks hold no labelled pixel (every pixel is ignore_index)")
  if scheme == "inverse":
    present = counts > 0
    return np.where(present, total / (present.sum() * np.where(present, counts, 1.0)), 0.0)
  return 1.0 / np.log(ENET_C + counts / total)
