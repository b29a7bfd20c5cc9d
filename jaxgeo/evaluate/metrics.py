"""Evaluation metrics: average precision, single- and multi-label classification, and segmentation.

Everything here is host numpy except the pixel confusion matrix of segmentation, which is counted on the
device inside the jitted, sharded evaluation step and accumulated there exactly (see "Segmentation").

  classification_report(labels, scores, multilabel, class_names)   one split's classification metrics
  pixel_confusion -> confusion_add -> confusion_result               segmentation counts, device to host
  segmentation_report(confusion, class_names, ignore_index)         one split's segmentation metrics
  jsonable(report)                                                   strict JSON (NaN -> null) for files
Reports are flat dicts of Python numbers and per-class lists (index = class id), with the class names.

Undefined values. A ratio whose denominator is zero (the precision of a class never predicted, the recall of a
class absent from the truth, the IoU of a class in neither truth nor prediction, a sample's precision when it
has no predicted label) is NaN, and NaN entries are left out of every macro and samples mean; a mean over
nothing is NaN. That is scikit-learn with `zero_division=np.nan` (and, for recall, `balanced_accuracy_score`).
scikit-learn's default (0.0 with a warning) would let a class missing from a test split drag every macro mean
down for a reason that has nothing to do with the model. Each report counts the classes it averaged over.

Average precision follows scikit-learn's `average_precision_score` exactly: the step-wise sum
AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (no interpolation), where samples with
equal scores form one threshold (they enter the ranking together, so ties are never broken by order).
Classes without a positive sample: scikit-learn 1.9 warns ("No positive class found in y_true, recall is
set to one for all thresholds") and scores such a class 0.0; we report NaN and leave it out of the macro mean,
as above. Micro AP flattens all (sample, class) pairs into one binary problem, as scikit-learn's
average="micro", and is therefore identical to it (NaN instead of 0.0 only when there is no positive at all).
"""

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------- average precision (multi-label ranking)


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


# ---------------------------------------------------------------- shared ratio arithmetic


def _ratio(numerator, denominator):
  """numerator / denominator elementwise, NaN where the denominator is 0 (the undefined case)."""
  numerator = np.asarray(numerator, np.float64)
  denominator = np.asarray(denominator, np.float64)
  return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def _nanmean(values):
  values = np.asarray(values, np.float64)
  kept = values[~np.isnan(values)]
  return float(kept.mean()) if kept.size else float("nan")


def _prf(true_pos, false_pos, false_neg):
  """precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN), elementwise.

  This F1 is scikit-learn's (>= 1.3): 0, not NaN, when one of precision / recall is undefined and the other 0.
  """
  return {
    "precision": _ratio(true_pos, true_pos + false_pos),
    "recall": _ratio(true_pos, true_pos + false_neg),
    "f1": _ratio(2 * true_pos, 2 * true_pos + false_pos + false_neg),
  }


def _precision_recall_f1(true_pos, false_pos, false_neg, keep=None):
  """Per-class precision, recall, F1 [C], their macro means (NaN skipped) and micro values (counts pooled).

  `keep` [C] bool: classes outside it are NaN and take no part in the macro or the micro values.
  """
  counts = [np.asarray(x, np.float64) for x in (true_pos, false_pos, false_neg)]
  keep = np.ones(counts[0].shape, bool) if keep is None else np.asarray(keep, bool)
  out = {}
  for metric, value in _prf(*counts).items():
    value = np.where(keep, value, np.nan)
    out[f"{metric}_per_class"] = value.tolist()
    out[f"{metric}_macro"] = _nanmean(value)
  for metric, value in _prf(*(np.sum(x[keep]) for x in counts)).items():
    out[f"{metric}_micro"] = float(value)
  return out


# ---------------------------------------------------------------- single-label classification


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


def _checked_ids(values, num_classes, what):
  """class_ids() of ids [N] or rows [N, C] (one-hot / scores -> argmax), checked against `num_classes`."""
  values = np.asarray(values)
  if values.ndim == 2:
    if values.shape[1] != num_classes:
      raise ValueError(f"{what}: rows have {values.shape[1]} columns; expected {num_classes} (one per class name)")
    if len(values) and not np.all(np.isfinite(values)):
      raise ValueError(f"{what}: rows {np.flatnonzero(~np.isfinite(values).all(1))[:5].tolist()} hold NaN or inf")
    if what == "labels" and np.any(np.max(values, axis=1) <= 0):
      # argmax of an all-zero row is 0: a sample without a label would silently count as class 0.
      raise ValueError(f"labels: one-hot rows {np.flatnonzero(np.max(values, axis=1) <= 0)[:5].tolist()} have no class")
  elif values.ndim != 1:
    raise ValueError(f"{what}: expected class ids [N] or rows [N, C]; got shape {values.shape}")
  elif values.size and not np.all(np.mod(values, 1) == 0):
    raise ValueError(f"{what}: class ids must be whole numbers; got {values[np.mod(values, 1) != 0][:5].tolist()}")
  ids = class_ids(values)
  bad = (ids < 0) | (ids >= num_classes)
  if bad.any():
    raise ValueError(
      f"{what}: class ids {np.unique(ids[bad])[:5].tolist()} at rows {np.flatnonzero(bad)[:5].tolist()} are "
      f"outside [0, {num_classes}) (num_classes = number of class names)"
    )
  return ids


def confusion_matrix(truth, predicted, num_classes):
  """[C, C] int64 counts, row = true class, column = predicted class (scikit-learn's layout).

  `truth`, `predicted`: class ids [N] or one-hot / score rows [N, C] (argmax), every id in [0, num_classes).
  """
  truth = _checked_ids(truth, num_classes, "labels")
  predicted = _checked_ids(predicted, num_classes, "predictions")
  if truth.shape != predicted.shape:
    raise ValueError(f"confusion matrix: {len(truth)} labels but {len(predicted)} predictions")
  flat = np.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes).astype(np.int64)


def _confusion_scores(confusion, keep=None):
  """Accuracy, support and per-class / macro / micro precision, recall, F1 of a [C, C] confusion matrix."""
  confusion = np.asarray(confusion, np.int64)
  true_pos = np.diag(confusion)
  support = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  out = _precision_recall_f1(true_pos, predicted - true_pos, support - true_pos, keep)
  out["accuracy"] = float(_ratio(true_pos.sum(), confusion.sum()))
  out["support_per_class"] = support.tolist()
  out["predicted_per_class"] = predicted.tolist()
  return out


def single_label_scores(confusion):
  """The single-label metrics of a [C, C] confusion matrix (rows = truth).

  oa          overall accuracy: trace / total (= scikit-learn accuracy_score; NaN with no sample)
  aa          average accuracy: the mean per-class recall over classes present in the truth
              (= balanced_accuracy_score; = recall_macro); absent classes are NaN in recall_per_class
  aa_seed     the seed's get_AA: the diagonal of the row-normalised matrix summed and divided by ALL C
              classes, so each class absent from the split counts 0. Its code divides with np.divide(...,
              where=rows > 0) and no `out`, leaving those entries uninitialised; 0 is what it documents.
  precision/recall/f1 _per_class, _macro, _micro (undefined entries NaN and skipped, see the module docstring;
              micro = oa); support_per_class (true count), predicted_per_class, confusion (nested list)
  """
  out = _confusion_scores(confusion)
  recall = np.asarray(out["recall_per_class"])
  out["oa"] = out.pop("accuracy")
  out["aa"] = out["recall_macro"]
  out["aa_seed"] = float(np.sum(np.nan_to_num(recall)) / len(recall)) if np.sum(confusion) else float("nan")
  out["num_classes_present"] = int(np.sum(~np.isnan(recall)))
  out["confusion"] = np.asarray(confusion, np.int64).tolist()
  return out


# ---------------------------------------------------------------- multi-label classification


def _multi_hot(values, num_classes, what):
  values = np.asarray(values)
  if values.ndim != 2 or values.shape[1] != num_classes:
    raise ValueError(f"{what}: expected multi-hot [N, {num_classes}] (one column per class name); got {values.shape}")
  return values > 0.5


def multilabel_scores(truth, predicted):
  """The multi-label metrics of multi-hot truth [N, C] and predictions [N, C] (bool or 0/1; > 0.5 is positive).

  oa_multi         the seed's OA_multi: mean over samples of |pred AND true| / |pred OR true| (the samples
                   Jaccard index). A sample with nothing true and nothing predicted agrees perfectly and
                   scores 1 (= jaccard_score(average="samples", zero_division=1)); the seed divides 0/0
                   there and its mean becomes NaN.
  subset_accuracy  fraction of samples whose predicted set equals the true set exactly
  hamming_loss     fraction of (sample, class) entries predicted wrong
  precision/recall/f1 _per_class, _macro (over classes), _micro (pooled counts), _samples (mean over samples
                   of each sample's own ratio); undefined entries NaN and skipped (see the module docstring)
  support_per_class (true count), predicted_per_class
  """
  truth = np.asarray(truth) > 0.5
  predicted = np.asarray(predicted) > 0.5
  if truth.shape != predicted.shape or truth.ndim != 2:
    raise ValueError(f"multi-label metrics: truth {truth.shape} and predictions {predicted.shape} must both be [N, C]")
  both = truth & predicted
  true_pos, false_pos, false_neg = both, predicted & ~truth, truth & ~predicted
  out = _precision_recall_f1(true_pos.sum(0), false_pos.sum(0), false_neg.sum(0))
  for metric, per_sample in _prf(true_pos.sum(1), false_pos.sum(1), false_neg.sum(1)).items():
    out[f"{metric}_samples"] = _nanmean(per_sample)
  union = np.sum(truth | predicted, axis=1)
  jaccard = np.where(union > 0, _ratio(both.sum(1), union), 1.0)
  out["oa_multi"] = _nanmean(jaccard)
  out["subset_accuracy"] = _nanmean(np.all(truth == predicted, axis=1))
  out["hamming_loss"] = _nanmean(truth != predicted)
  out["support_per_class"] = truth.sum(0).tolist()
  out["predicted_per_class"] = predicted.sum(0).tolist()
  return out


# ---------------------------------------------------------------- the classification entry point


def classification_report(labels, scores, multilabel, class_names, threshold=0.5, predictions=None):
  """Every classification metric of one split as a flat dict of scalars and per-class lists (JSON via jsonable).

  Single-label (multilabel=False): `labels` class ids [N] or one-hot [N, C]; `scores` [N, C] (argmax is the
  prediction) or `predictions` ids [N]. Keys: single_label_scores'.
  Multi-label: `labels` multi-hot [N, C]; `scores` [N, C] sigmoid probabilities, predicted positive when
  >= threshold (the seed's rule), or `predictions` multi-hot [N, C] to use instead. Keys: multilabel_scores'
  plus average_precision's (ap_macro, ap_micro, ap_per_class, num_classes_scored) when scores are given.
  Both add num_samples, num_classes, class_names, multilabel (and threshold when it was applied).
  """
  class_names = [str(name) for name in class_names]
  num_classes = len(class_names)
  if scores is None and predictions is None:
    raise ValueError("classification_report: give scores [N, C] or predictions")
  source = np.asarray(scores if predictions is None else predictions)
  if len(np.asarray(labels)) != len(source):
    raise ValueError(f"classification_report: {len(np.asarray(labels))} labels but {len(source)} scores/predictions")
  report = {"num_samples": len(source), "num_classes": num_classes, "class_names": class_names}
  report["multilabel"] = bool(multilabel)
  if not multilabel:
    confusion = confusion_matrix(labels, source, num_classes)
    report.update(single_label_scores(confusion))
    return report
  truth = _multi_hot(labels, num_classes, "labels")
  if scores is not None:
    scores = np.asarray(scores, np.float64)
    if scores.shape != truth.shape:
      raise ValueError(f"scores: expected [N, C] = {truth.shape} like the labels; got {scores.shape}")
  if predictions is None:
    if scores.size and not (np.min(scores) >= 0 and np.max(scores) <= 1):
      raise ValueError(
        f"scores: thresholding at {threshold} needs probabilities in [0, 1] (sigmoid of the logits); got values "
        f"in [{np.min(scores):.4g}, {np.max(scores):.4g}] (pass predictions= to threshold them yourself)"
      )
    predicted = scores >= threshold
    report["threshold"] = float(threshold)
  else:
    predicted = _multi_hot(predictions, num_classes, "predictions")
  report.update(multilabel_scores(truth, predicted))
  if scores is not None:
    ap = average_precision(truth, scores)
    report.update(ap, ap_per_class=ap["ap_per_class"].tolist())
  return report


# ---------------------------------------------------------------- segmentation
#
# On the device, pixel_confusion counts one batch into an int32 matrix: exact while a batch has fewer than
# 2**31 pixels (8192 tiles of 512 x 512), which it checks when traced. Summed over an evaluation set the counts
# near and pass int32's 2.1e9 (LandCover.ai's 7470 training tiles are 1.96e9 pixels; a user's scenes more),
# float32 stops being exact at 2**24, and jax has no int64 unless x64 is on for the whole process. So the total is
# two uint32 words per cell, {"hi", "lo"}: confusion_add adds a batch to "lo" and carries its wrap-around into
# "hi", exact up to 2**64 pixels, on the device, with no host round trip per batch.
#
# The matrix has one extra row and column, index C, for pixels whose target or prediction is not a class id
# (and whose target is not ignore_index): a mask value the class list does not declare would otherwise vanish
# from every metric. confusion_result raises when that row or column is not empty.


def pixel_confusion(predictions, targets, num_classes, valid=None, ignore_index=None):
  """[C + 1, C + 1] int32 pixel counts of one batch, row = target class, column = predicted class. Jit-able.

  predictions, targets: integer class ids of the same shape [B, ...] (take the argmax of logits first).
  valid: bool [B] (False marks padding rows of the last evaluation batch) or a pixel mask of the targets'
    shape; pixels outside it are not counted. ignore_index: target value whose pixels are not counted.
  Row / column C counts the counted pixels whose target / prediction lies outside [0, C) (see above).
  Under jit with the batch sharded over devices, XLA counts each shard where it lies and all-reduces the
  (C + 1)^2 totals: no pixel crosses devices.
  """
  if predictions.shape != targets.shape:
    raise ValueError(
      f"pixel_confusion: predictions {predictions.shape} and targets {targets.shape} must have the same shape "
      "(class ids: take the argmax of the logits over the class axis first)"
    )
  if targets.size >= 2**31:
    raise ValueError(f"pixel_confusion: {targets.size} pixels in one batch overflow int32 counts; use smaller batches")
  counted = jnp.ones(targets.shape, bool)
  if valid is not None:
    valid = jnp.asarray(valid, bool)
    if valid.shape not in (targets.shape[:1], targets.shape):
      raise ValueError(f"pixel_confusion: valid {valid.shape} must be [B] = {targets.shape[:1]} or {targets.shape}")
    counted = jnp.broadcast_to(valid.reshape(valid.shape + (1,) * (targets.ndim - valid.ndim)), targets.shape)
  targets = targets.astype(jnp.int32)
  predictions = predictions.astype(jnp.int32)
  if ignore_index is not None:
    counted = counted & (targets != ignore_index)
  size = num_classes + 1
  targets = jnp.where((targets >= 0) & (targets < num_classes), targets, num_classes)
  predictions = jnp.where((predictions >= 0) & (predictions < num_classes), predictions, num_classes)
  # One scatter-add into (C+1)^2 bins: memory O(pixels), no [pixels, C] one-hot, no loop over classes.
  cells = (targets * size + predictions).reshape(-1)
  counts = jnp.zeros(size * size, jnp.int32).at[cells].add(counted.reshape(-1).astype(jnp.int32))
  return counts.reshape(size, size)


def confusion_zeros(num_classes):
  """The running total for confusion_add: {"hi", "lo"} uint32 [C + 1, C + 1], all zero."""
  zeros = jnp.zeros((num_classes + 1, num_classes + 1), jnp.uint32)
  return {"hi": zeros, "lo": zeros}


@jax.jit
def confusion_add(total, counts):
  """total + counts (one batch's pixel_confusion), exact to 2**64: "lo" wraps modulo 2**32, "hi" takes the carry."""
  lo = total["lo"] + counts.astype(jnp.uint32)
  carry = (lo < total["lo"]).astype(jnp.uint32)  # counts < 2**31, so "lo" wraps at most once
  return {"hi": total["hi"] + carry, "lo": lo}


def confusion_result(total):
  """The [C, C] int64 host matrix of pixel_confusion counts; raises if any pixel was outside [0, C).

  `total`: a confusion_add total {"hi", "lo"}, or [C + 1, C + 1] counts summed on the host. A host sum must
  be kept in int64: numpy adds int32 arrays modulo 2**32 without a word, and the first wrap shows as a
  negative count, which raises here.
  """
  if isinstance(total, dict):
    hi, lo = (np.asarray(jax.device_get(total[word])).astype(np.uint64) for word in ("hi", "lo"))
    full = ((hi << np.uint64(32)) | lo).astype(np.int64)
  else:
    full = np.asarray(jax.device_get(total)).astype(np.int64)
    if np.any(full < 0):
      raise ValueError(
        "segmentation evaluation: the summed confusion counts are negative, so an int32 sum overflowed; sum "
        "pixel_confusion batches in int64 on the host, or on the device with confusion_add"
      )
  num_classes = full.shape[0] - 1
  stray_targets, stray_predictions = int(full[num_classes].sum()), int(full[:, num_classes].sum())
  if stray_targets or stray_predictions:
    raise ValueError(
      f"segmentation evaluation: {stray_targets} target and {stray_predictions} predicted pixels hold values "
      f"outside the class ids [0, {num_classes}) that are not ignore_index; check the masks' values against "
      "the dataset's class names and config.data.ignore_index"
    )
  return full[:num_classes, :num_classes]


def segmentation_report(confusion, class_names, ignore_index=None):
  """Every segmentation metric of a [C, C] pixel confusion matrix (rows = truth) as a flat dict.

  iou_per_class  TP / (TP + FP + FN); NaN when the class is in neither truth nor prediction
  iou_macro      mIoU: mean of iou_per_class over the classes that are not NaN (num_classes_scored of them);
                 what papers report (LandCover.ai's 85.56 %)
  iou_micro      sum TP / sum (TP + FP + FN) over classes: one Jaccard index of all pixels pooled, dominated
                 by the frequent classes. TorchGeo's SemanticSegmentationTask logs this one as "JaccardIndex"
                 (average="micro"), which is why its numbers are not mIoU
  pixel_accuracy trace / total (= micro recall); precision/recall/f1 _per_class, _macro, _micro, with
                 F1 = Dice; support_per_class (true pixels), predicted_per_class, num_pixels, confusion
  ignore_index   a class id in [0, C) whose pixels the matrix already excludes (pixel_confusion): its metrics
                 are NaN and out of every mean; its predictions on counted pixels stay errors of the true class
                 (= scikit-learn with labels= the other classes)
  """
  confusion = np.asarray(confusion, np.int64)
  class_names = [str(name) for name in class_names]
  num_classes = len(class_names)
  if confusion.shape != (num_classes, num_classes):
    raise ValueError(f"segmentation_report: confusion {confusion.shape}; expected [{num_classes}, {num_classes}]")
  keep = np.ones(num_classes, bool)
  if ignore_index is not None and 0 <= ignore_index < num_classes:
    keep[ignore_index] = False
  report = {"num_classes": num_classes, "class_names": class_names, "num_pixels": int(confusion.sum())}
  report.update(_confusion_scores(confusion, keep))
  report["pixel_accuracy"] = report.pop("accuracy")
  true_pos = np.diag(confusion).astype(np.float64)
  union = confusion.sum(0) + confusion.sum(1) - true_pos
  iou = np.where(keep, _ratio(true_pos, union), np.nan)
  report["iou_per_class"] = iou.tolist()
  report["iou_macro"] = _nanmean(iou)
  report["iou_micro"] = float(_ratio(true_pos[keep].sum(), union[keep].sum()))
  report["num_classes_scored"] = int(np.sum(~np.isnan(iou)))
  report["confusion"] = confusion.tolist()
  return report


def jsonable(value):
  """A report (or any nest of dicts, lists, numpy values) as strict JSON values: NaN and inf become None."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else None
  return value
