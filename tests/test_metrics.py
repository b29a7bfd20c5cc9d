"""Metrics against scikit-learn and hand values, the device pixel confusion under a sharded jit, and the plots."""

import json
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from matplotlib import image as mimage
from sklearn import metrics as skm

from jaxgeo import parallel
from jaxgeo.evaluate import metrics, plots


def same(ours, theirs):
  np.testing.assert_allclose(np.asarray(ours, float), np.asarray(theirs, float), rtol=1e-12, atol=1e-12, equal_nan=True)


def sk(fn, *args, **kwargs):
  """scikit-learn, quiet: it warns on exactly the undefined cases these tests are about."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fn(*args, **kwargs)


def check_prf_against_sklearn(report, truth, predicted, labels, averages):
  per_class = sk(skm.precision_recall_fscore_support, truth, predicted, labels=labels, zero_division=np.nan)
  for index, metric in enumerate(("precision", "recall", "f1")):
    same(np.asarray(report[f"{metric}_per_class"])[labels], per_class[index])
  for average in averages:
    values = sk(
      skm.precision_recall_fscore_support, truth, predicted, labels=labels, average=average, zero_division=np.nan
    )
    for index, metric in enumerate(("precision", "recall", "f1")):
      same(report[f"{metric}_{average}"], values[index])


# ---------------------------------------------------------------- single-label


def single_label_case(rng, num_samples=300, num_classes=6):
  truth = rng.choice(num_classes - 1, num_samples)  # the last class never occurs in the truth
  predicted = np.where(rng.random(num_samples) < 0.6, truth, rng.integers(0, num_classes, num_samples))
  predicted[predicted == 3] = 2  # class 3 is never predicted
  return truth, predicted


def test_single_label_matches_sklearn_on_random_data():
  rng = np.random.default_rng(0)
  truth, predicted = single_label_case(rng)
  names = [f"c{i}" for i in range(6)]
  report = metrics.classification_report(truth, None, False, names, predictions=predicted)
  labels = list(range(6))
  same(report["confusion"], skm.confusion_matrix(truth, predicted, labels=labels))
  same(report["oa"], skm.accuracy_score(truth, predicted))
  same(report["aa"], sk(skm.balanced_accuracy_score, truth, predicted))
  check_prf_against_sklearn(report, truth, predicted, labels, ("macro", "micro"))
  # The seed's get_AA: row-normalised diagonal summed over all classes (an empty row counts 0) / C.
  confusion = skm.confusion_matrix(truth, predicted, labels=labels)
  rows = confusion.sum(1, keepdims=True)
  same(report["aa_seed"], np.trace(np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)) / 6)
  assert report["num_classes_present"] == 5 and report["aa_seed"] < report["aa"]
  assert np.isnan(report["recall_per_class"][5]) and np.isnan(report["precision_per_class"][3])
  # One-hot labels and score rows (argmax) give the same report as ids.
  scores = np.eye(6)[predicted] + 0.3 * rng.random((len(truth), 6))
  from_rows = metrics.classification_report(np.eye(6)[truth], scores, False, names)
  assert json.dumps(metrics.jsonable(from_rows)) == json.dumps(metrics.jsonable(report))


def test_single_label_hand_values_and_zero_division():
  # truth 0 0 1 1 2, predicted 0 1 1 1 1, four classes: class 3 absent everywhere, class 2 never predicted.
  report = metrics.classification_report([0, 0, 1, 1, 2], None, False, "abcd", predictions=[0, 1, 1, 1, 1])
  assert report["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
  assert report["oa"] == pytest.approx(0.6)
  same(report["recall_per_class"], [0.5, 1.0, 0.0, np.nan])
  assert report["aa"] == pytest.approx(0.5) and report["aa_seed"] == pytest.approx(1.5 / 4)
  # zero_division = NaN, left out of the mean: class 2's precision (never predicted) does not count as 0.
  same(report["precision_per_class"], [1.0, 0.5, np.nan, np.nan])
  assert report["precision_macro"] == pytest.approx(0.75)
  same(report["f1_per_class"], [2 / 3, 2 / 3, 0.0, np.nan])  # F1 = 2TP / (2TP + FP + FN): 0 for class 2
  assert report["f1_macro"] == pytest.approx(4 / 9)
  assert report["f1_micro"] == pytest.approx(0.6)


def test_single_label_all_correct_all_wrong_and_empty():
  right = metrics.classification_report([0, 1, 2, 2], None, False, "abcd", predictions=[0, 1, 2, 2])
  assert right["oa"] == right["aa"] == right["f1_macro"] == right["precision_macro"] == 1.0
  assert right["aa_seed"] == pytest.approx(0.75)  # the absent class d costs the seed's AA a quarter
  wrong = metrics.classification_report([0, 1, 2], None, False, "abc", predictions=[1, 2, 0])
  assert wrong["oa"] == wrong["aa"] == wrong["aa_seed"] == wrong["f1_macro"] == wrong["precision_micro"] == 0.0
  empty = metrics.classification_report(np.zeros(0, int), np.zeros((0, 3)), False, "abc")
  assert empty["num_samples"] == 0 and np.isnan(empty["oa"]) and np.isnan(empty["aa"]) and np.isnan(empty["f1_macro"])


def test_single_label_bad_input_is_named():
  with pytest.raises(ValueError, match=r"labels: class ids \[5\] .* outside \[0, 3\)"):
    metrics.classification_report([0, 5], np.zeros((2, 3)), False, "abc")
  with pytest.raises(ValueError, match="one-hot rows \\[1\\] have no class"):
    metrics.classification_report(np.array([[1, 0, 0], [0, 0, 0]]), np.zeros((2, 3)), False, "abc")
  with pytest.raises(ValueError, match="4 columns; expected 3"):
    metrics.classification_report([0, 1], np.zeros((2, 4)), False, "abc")
  with pytest.raises(ValueError, match="3 labels but 2"):
    metrics.classification_report([0, 1, 2], np.zeros((2, 3)), False, "abc")


# ---------------------------------------------------------------- multi-label


def multilabel_case(rng, num_samples=160, num_classes=7):
  truth = rng.random((num_samples, num_classes)) < 0.3
  scores = np.clip(0.4 * truth + 0.7 * rng.random(truth.shape) - 0.1, 0, 1)
  truth[:, 5] = False  # a class without a positive
  scores[:, 6] = 0.45 * rng.random(num_samples)  # a class never predicted
  truth[:8], scores[:8] = False, 0.3 * rng.random((8, num_classes))  # empty union: nothing true, nothing predicted
  truth[8:12] = False  # nothing true, something predicted
  scores[12:16] = 0.49  # something true, nothing predicted
  scores[16, 0] = 0.5  # exactly at the threshold: predicted
  return truth, scores


def test_multilabel_matches_sklearn_on_random_data():
  truth, scores = multilabel_case(np.random.default_rng(1))
  names = [f"class {i}" for i in range(7)]
  report = metrics.classification_report(truth.astype(np.float32), scores, True, names)
  predicted = scores >= 0.5
  assert predicted[16, 0] and not predicted[:, 6].any() and not (truth[:8] | predicted[:8]).any()
  check_prf_against_sklearn(report, truth, predicted, list(range(7)), ("macro", "micro", "samples"))
  same(report["hamming_loss"], skm.hamming_loss(truth, predicted))
  same(report["subset_accuracy"], skm.accuracy_score(truth, predicted))
  same(report["oa_multi"], skm.jaccard_score(truth, predicted, average="samples", zero_division=1.0))
  scored = truth.any(0)
  same(report["ap_macro"], skm.average_precision_score(truth[:, scored], scores[:, scored], average="macro"))
  same(report["ap_micro"], skm.average_precision_score(truth, scores, average="micro"))
  assert np.isnan(report["ap_per_class"][5]) and report["num_classes_scored"] == 6
  assert report["threshold"] == 0.5 and report["support_per_class"][5] == 0 and report["predicted_per_class"][6] == 0
  # Given predictions instead of a threshold: the same set metrics, and AP only when scores come too.
  given = metrics.classification_report(truth, None, True, names, predictions=predicted)
  assert given["f1_samples"] == report["f1_samples"] and "ap_macro" not in given and "threshold" not in given
  text = json.dumps(metrics.jsonable(report), allow_nan=False)
  assert json.loads(text)["ap_per_class"][5] is None


def test_oa_multi_empty_union_and_the_seed_formula():
  truth = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0], [1, 1, 0]])
  predicted = np.array([[1, 1, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1]])
  scores = metrics.multilabel_scores(truth, predicted)
  assert scores["oa_multi"] == pytest.approx((0.5 + 1.0 + 0.0 + 2 / 3) / 4)  # sample 1 agrees on nothing: 1
  # Where no union is empty, ours is the seed's OA_multi exactly.
  keep = [0, 2, 3]
  cross = np.sum(truth[keep] & predicted[keep], -1)
  seed = np.mean(cross / (truth[keep].sum(-1) + predicted[keep].sum(-1) - cross))
  assert metrics.multilabel_scores(truth[keep], predicted[keep])["oa_multi"] == pytest.approx(seed)
  perfect = metrics.multilabel_scores(truth, truth)
  assert perfect["oa_multi"] == perfect["subset_accuracy"] == perfect["f1_micro"] == 1.0
  assert perfect["hamming_loss"] == 0.0
  inverted = metrics.multilabel_scores(truth, 1 - truth)
  assert inverted["oa_multi"] == inverted["subset_accuracy"] == inverted["f1_macro"] == 0.0
  assert inverted["hamming_loss"] == 1.0


def test_multilabel_rejects_logits_and_bad_shapes():
  truth = np.eye(3)[[0, 1, 2, 0]]
  with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
    metrics.classification_report(truth, np.full((4, 3), 2.5), True, "abc")
  with pytest.raises(ValueError, match="expected \\[N, C\\]"):
    metrics.classification_report(truth, np.zeros((4, 2)), True, "abc")
  with pytest.raises(ValueError, match="labels: expected multi-hot \\[N, 4\\]"):
    metrics.classification_report(truth, np.zeros((4, 3)), True, "abcd")


# ---------------------------------------------------------------- segmentation


def test_segmentation_report_matches_sklearn():
  rng = np.random.default_rng(2)
  truth = rng.integers(0, 4, 3000)  # classes 4 and 5 absent from the truth
  predicted = np.where(rng.random(3000) < 0.7, truth, rng.integers(0, 5, 3000))  # 4 predicted, 5 never
  labels = list(range(6))
  report = metrics.segmentation_report(skm.confusion_matrix(truth, predicted, labels=labels), [str(i) for i in labels])
  iou = sk(skm.jaccard_score, truth, predicted, labels=labels, average=None)
  same(report["iou_per_class"][:5], iou[:5])
  assert report["iou_per_class"][4] == 0.0 and np.isnan(report["iou_per_class"][5])
  same(report["iou_macro"], skm.jaccard_score(truth, predicted, labels=labels[:5], average="macro"))
  same(report["iou_micro"], skm.jaccard_score(truth, predicted, labels=labels, average="micro"))
  assert report["iou_micro"] != pytest.approx(report["iou_macro"])  # the TorchGeo confusion, kept apart
  same(report["pixel_accuracy"], skm.accuracy_score(truth, predicted))
  check_prf_against_sklearn(report, truth, predicted, labels, ("macro", "micro"))
  assert report["num_classes_scored"] == 5 and report["num_pixels"] == 3000


def test_segmentation_ignore_index_inside_the_class_range():
  rng = np.random.default_rng(3)
  truth = rng.integers(0, 4, (4, 9, 9))  # 0 = no data, a class id the model can still predict
  predicted = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, 4, truth.shape))
  counts = metrics.pixel_confusion(jnp.asarray(predicted), jnp.asarray(truth), 4, ignore_index=0)
  confusion = metrics.confusion_result(metrics.confusion_add(metrics.confusion_zeros(4), counts))
  assert confusion[0].sum() == 0 and confusion[:, 0].sum() > 0
  report = metrics.segmentation_report(confusion, ["nodata", "a", "b", "c"], ignore_index=0)
  kept = truth.ravel() != 0
  truth, predicted = truth.ravel()[kept], predicted.ravel()[kept]
  same(report["iou_per_class"], [np.nan] + list(skm.jaccard_score(truth, predicted, labels=[1, 2, 3], average=None)))
  same(report["iou_macro"], skm.jaccard_score(truth, predicted, labels=[1, 2, 3], average="macro"))
  same(report["iou_micro"], skm.jaccard_score(truth, predicted, labels=[1, 2, 3], average="micro"))
  same(report["pixel_accuracy"], skm.accuracy_score(truth, predicted))
  check_prf_against_sklearn(report, truth, predicted, [1, 2, 3], ("macro", "micro"))


def test_pixel_confusion_sharded_jit_equals_sklearn():
  mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": 4, "fsdp": 2}))
  rng = np.random.default_rng(4)
  num_classes, ignore = 5, 255

  def batch():
    truth = rng.integers(0, num_classes, (16, 6, 10)).astype(np.int32)
    truth[rng.random(truth.shape) < 0.1] = ignore
    predicted = np.where(rng.random(truth.shape) < 0.5, truth % 255, rng.integers(0, num_classes, truth.shape))
    valid = np.arange(16) < 13
    truth[~valid] = 77  # padding rows hold anything, even values that are no class
    return predicted.astype(np.int32), truth, valid

  step = jax.jit(
    lambda p, t, v: metrics.pixel_confusion(p, t, num_classes, valid=v, ignore_index=ignore),
    out_shardings=parallel.replicated(mesh),
  )
  total, expected = metrics.confusion_zeros(num_classes), 0
  for _ in range(2):
    predicted, truth, valid = batch()
    arrays = parallel.host_to_global((predicted, truth, valid), mesh)
    assert len(arrays[1].sharding.device_set) == 8
    total = metrics.confusion_add(total, step(*arrays))
    kept = valid[:, None, None] & (truth != ignore)
    expected = expected + skm.confusion_matrix(truth[kept], predicted[kept], labels=range(num_classes))
  np.testing.assert_array_equal(metrics.confusion_result(total), expected)
  # Each device counts its own pixels; only the (C+1)^2 totals travel (an all-reduce, no all-gather).
  hlo = step.lower(*arrays).compile().as_text()
  assert "all-reduce" in hlo and "all-gather" not in hlo
  # A pixel mask (e.g. no-data pixels) works as `valid` too.
  pixel_valid = rng.random(truth.shape) < 0.7
  counts = jax.jit(lambda p, t, v: metrics.pixel_confusion(p, t, num_classes, valid=v))(
    predicted, truth % 255 % num_classes, pixel_valid
  )
  reference = skm.confusion_matrix((truth % 255 % num_classes)[pixel_valid], predicted[pixel_valid], labels=range(5))
  np.testing.assert_array_equal(np.asarray(counts)[:5, :5], reference)


def test_confusion_total_is_exact_beyond_int32():
  counts = jnp.zeros((3, 3), jnp.int32).at[:2, :2].set(jnp.asarray([[7, 2**31 - 1], [0, 1]]))
  total = metrics.confusion_zeros(2)
  total["lo"] = total["lo"].at[0, 0].set(2**32 - 5)
  exact = np.array([[2**32 - 5, 0], [0, 0]], dtype=object)
  for _ in range(5):
    total = metrics.confusion_add(total, counts)
    exact = exact + np.asarray(counts[:2, :2]).astype(object)
  result = metrics.confusion_result(total)
  assert result.dtype == np.int64 and result.tolist() == exact.tolist()
  assert result[0, 0] == 2**32 + 30 and result[0, 1] == 5 * (2**31 - 1)
  # Counts summed on the host: fine in int64; an int32 sum that wrapped is caught, not reported as a metric.
  host = np.asarray(counts).astype(np.int64) * 3
  assert metrics.confusion_result(host)[0, 1] == 3 * (2**31 - 1)
  with pytest.raises(ValueError, match="int32 sum overflowed"):
    metrics.confusion_result(np.asarray(counts) + np.asarray(counts))


def test_pixel_confusion_refuses_what_would_be_silently_wrong():
  truth = jnp.asarray([[0, 1, 9]])  # 9 is no class of three, and not the ignore_index
  counts = metrics.pixel_confusion(jnp.asarray([[0, 1, 1]]), truth, 3, ignore_index=255)
  with pytest.raises(ValueError, match="1 target and 0 predicted pixels hold values outside the class ids \\[0, 3\\)"):
    metrics.confusion_result(metrics.confusion_add(metrics.confusion_zeros(3), counts))
  with pytest.raises(ValueError, match="argmax"):
    metrics.pixel_confusion(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4), jnp.int32), 3)
  with pytest.raises(ValueError, match="confusion \\(3, 3\\); expected \\[2, 2\\]"):
    metrics.segmentation_report(np.eye(3), ["a", "b"])


# ---------------------------------------------------------------- plots


def test_confusion_per_class_and_results_charts(tmp_path):
  confusion = np.array([[50, 3, 0], [4, 20, 1], [0, 0, 0]])  # class c absent: a grey row
  path = plots.confusion_chart(confusion, ["a", "b", "c"], str(tmp_path / "c" / "confusion.png"), title="test")
  pixels = mimage.imread(path)
  assert pixels.shape[0] > 300 and pixels.shape[1] > 300
  big = plots.confusion_chart(np.arange(900).reshape(30, 30), [f"k{i}" for i in range(30)], str(tmp_path / "big.png"))
  assert mimage.imread(big).shape[0] > 1000  # grows with the class count; no annotations past 20 classes
  plots.per_class_chart(["a", "b"], [3.5, float("nan")], str(tmp_path / "counts.png"), metric="pixels (M)")
  with pytest.raises(ValueError, match="3 values for 2 class names"):
    plots.per_class_chart(["a", "b"], [1, 2, 3], str(tmp_path / "x.png"))
  results = {
    "Supervised": {"S1": 0.40, "S2": 0.611, "S1+S2": 0.586},
    "MoCo": {"S1": [0.50, 0.51, 0.49], "S2": [0.62, 0.63, 0.62], "S1+S2": None},
  }
  assert mimage.imread(plots.results_chart(results, str(tmp_path / "results.png"), metric="AA")).shape[1] > 500
  with pytest.raises(ValueError, match="at least one model"):
    plots.results_chart({}, str(tmp_path / "none.png"))


def test_segmentation_grid_draws_the_class_colours(tmp_path):
  colours = [(0, 0, 0, 0), (97, 74, 74), (38, 115, 0), (0, 197, 255), (207, 207, 207)]  # LandCover.ai's
  truth = np.repeat(np.arange(5), 4)[None, :].repeat(20, 0)  # five vertical stripes
  truth[:2] = 255
  predicted = truth % 255
  predicted[10:, :4] = 3  # one wrong block
  image = np.linspace(0, 1, 20 * 20 * 3).reshape(20, 20, 3)
  path = plots.segmentation_grid(
    [image, (image * 255).astype(np.uint8)],
    [truth, truth],
    [predicted, predicted],
    ["Background", "Building", "Woodland", "Water", "Road"],
    str(tmp_path / "grid.png"),
    colors=colours,
    titles=["tile_0", "tile_1"],
    ignore_index=255,
  )
  pixels = np.round(mimage.imread(path)[..., :3] * 255).astype(int)
  for colour in colours + [(230, 26, 26)]:  # every class and the wrong-pixel red
    assert np.sum(np.all(np.abs(pixels - colour[:3]) <= 1, axis=-1)) > 200, colour
  with pytest.raises(ValueError, match="image 0 is float64 with values in \\[0, 2\\]"):
    plots.segmentation_grid([2 * image], [truth], [predicted], list("abcde"), str(tmp_path / "x.png"), ignore_index=255)
  with pytest.raises(ValueError, match="truth 0 holds values \\[255\\]"):
    plots.segmentation_grid([image], [truth], [predicted], list("abcde"), str(tmp_path / "x.png"))
