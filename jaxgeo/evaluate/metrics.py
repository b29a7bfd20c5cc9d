"""Classification metrics on host numpy arrays: average precision (multi-label) and accuracy (single-label).

Average precision follows scikit-learn's `average_precision_score` exactly: the step-wise sum
AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (no interpolation), where samples with
equal scores form one threshold (they enter the ranking together, so ties are never broken by order).

Classes without a positive sample. scikit-learn 1.9 warns ("No positive class found in y_true, recall is
set to one for all thresholds") and scores such a class 0.0, which then drags its macro mean down for a
reason that has nothing to do with the features. We instead report NaN for that class and leave it out of
the macro mean (the macro mean is over classes with at least one positive; NaN if there is none). Micro AP
flattens all (sample, class) pairs into one binary problem, as scikit-learn's average="micro", and is
therefore identical to it (NaN instead of 0.0 only when there is no positive at all).
"""

import numpy as np


def _as_2d(labels, scores):
  labels = np.asarray(labels)
  scores = np.asarray(scores, dtype=np.float64)
  if labels.ndim == 1:
    labels, scores = labels[:, None], scores[:, None]
  if labels.shape != scores.shape or labels.ndim != 2:
    raise ValueError(
      f"average precision: labels {labels.shape} and scores {scores.shape} must both be "
      "[num_samples, num_classes] (or both [num_samples])"
    )
  return labels > 0.5, scores


def per_class_average_precision(labels, scores):
  """AP per column of multi-hot `labels` [N, C] against `scores` [N, C]; NaN for a column without positives.

  Vectorised over classes: one stable sort per column, then every positive sample contributes the
  precision measured at the end of its tie group (the threshold that admits it), divided by the number of
  positives. That is the same sum as scikit-learn's, grouped by sample instead of by threshold.
  """
  positives, scores = _as_2d(labels, scores)
  num_samples, num_classes = scores.shape
  if num_samples == 0:
    return np.full(num_classes, np.nan)
  order = np.argsort(-scores, axis=0, kind="stable")
  sorted_scores = np.take_along_axis(scores, order, axis=0)
  sorted_pos = np.take_along_axis(positives, order, axis=0)
  true_pos = np.cumsum(sorted_pos, axis=0, dtype=np.float64)

  rows = np.arange(num_samples)[:, None]
  # A row ends a tie group when the next score differs (exact equality, as scikit-learn's np.diff test).
  group_end = np.ones_like(sorted_pos)
  group_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
  end_row = np.where(group_end, rows, num_samples - 1)
  # Each row takes the first group end at or after it: a reversed running minimum.
  end_row = np.minimum.accumulate(end_row[::-1], axis=0)[::-1]
  precision_at_end = np.take_along_axis(true_pos, end_row, axis=0) / (end_row + 1)

  num_pos = true_pos[-1]
  summed = np.sum(np.where(sorted_pos, precision_at_end, 0.0), axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(num_pos > 0, summed / np.maximum(num_pos, 1), np.nan)


def average_precision(labels, scores):
  """{"ap_macro", "ap_micro", "ap_per_class" [C], "num_classes_scored"} for multi-label scores.

  `ap_macro` averages over classes with at least one positive (see the module docstring for how this
  differs from scikit-learn when a class has none).
  """
  positives, scores = _as_2d(labels, scores)
  per_class = per_class_average_precision(positives, scores)
  scored = ~np.isnan(per_class)
  macro = float(np.mean(per_class[scored])) if scored.any() else float("nan")
  micro = float(per_class_average_precision(positives.reshape(-1), scores.reshape(-1))[0])
  return {"ap_macro": macro, "ap_micro": micro, "ap_per_class": per_class, "num_classes_scored": int(scored.sum())}


def class_ids(labels):
  """Integer class ids from either ids [N] or one-hot rows [N, C]."""
  labels = np.asarray(labels)
  return labels.astype(np.int64) if labels.ndim == 1 else np.argmax(labels, axis=-1)


def accuracy(labels, scores):
  """Top-1 accuracy of `scores` [N, C] against class ids [N] or one-hot labels [N, C]."""
  scores = np.asarray(scores)
  if len(scores) == 0:
    return float("nan")
  return float(np.mean(np.argmax(scores, axis=-1) == class_ids(labels)))
