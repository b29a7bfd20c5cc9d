"""Evaluation: AP against scikit-learn, kNN votes, the linear probe, and the files the commands write."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from jaxgeo.evaluate import embed, features, knn, metrics, plots, probe


def sklearn_ap(labels, scores):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn warns on a class without positives; we test that value apart
    return average_precision_score(labels, scores)


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(6))
def test_ap_matches_sklearn_random(seed):
  rng = np.random.default_rng(seed)
  labels = (rng.random((200, 7)) < rng.uniform(0.05, 0.6, 7)).astype(np.float32)
  # Odd seeds draw few distinct scores, so most thresholds are ties.
  scores = rng.integers(0, 4, labels.shape).astype(np.float32) if seed % 2 else rng.random(labels.shape)
  ours = metrics.average_precision(labels, scores)
  expected = [sklearn_ap(labels[:, c], scores[:, c]) for c in range(labels.shape[1])]
  np.testing.assert_allclose(ours["ap_per_class"], expected, rtol=0, atol=1e-12)
  assert ours["ap_macro"] == pytest.approx(average_precision_score(labels, scores, average="macro"), abs=1e-12)
  assert ours["ap_micro"] == pytest.approx(average_precision_score(labels, scores, average="micro"), abs=1e-12)


def test_ap_ties_are_one_threshold():
  # All four share a score: one threshold at recall 1 with precision 2/4, whatever the order of the rows.
  labels = np.array([1, 0, 1, 0])
  scores = np.zeros(4)
  assert metrics.per_class_average_precision(labels, scores)[0] == pytest.approx(0.5)
  assert sklearn_ap(labels, scores) == pytest.approx(0.5)
  # Breaking the tie in favour of a positive changes the answer: the tie rule is really exercised.
  assert metrics.per_class_average_precision(labels, [1e-6, 0, 0, 0])[0] == pytest.approx(0.75)


def test_ap_class_without_positives_is_nan_and_left_out_of_macro():
  labels = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1]], np.float32)  # class 1: no positive; class 2: all
  scores = np.array([[0.9, 0.1, 0.2], [0.2, 0.8, 0.3], [0.4, 0.3, 0.1]])
  ours = metrics.average_precision(labels, scores)
  assert np.isnan(ours["ap_per_class"][1])
  assert ours["num_classes_scored"] == 2
  assert ours["ap_per_class"][2] == pytest.approx(1.0)  # all positive: precision 1 throughout
  assert ours["ap_per_class"][0] == pytest.approx(sklearn_ap(labels[:, 0], scores[:, 0]))
  assert sklearn_ap(labels[:, 1], scores[:, 1]) == 0.0  # sklearn 1.9: 0.0 (+ warning) ...
  assert ours["ap_macro"] == pytest.approx(np.mean(ours["ap_per_class"][[0, 2]]))  # ... we exclude it
  assert ours["ap_micro"] == pytest.approx(average_precision_score(labels, scores, average="micro"))


def test_ap_single_sample_and_accuracy():
  assert metrics.per_class_average_precision([1], [0.3])[0] == 1.0
  assert np.isnan(metrics.per_class_average_precision([0], [0.3])[0])
  assert np.isnan(metrics.average_precision(np.zeros((2, 3)), np.ones((2, 3)))["ap_macro"])
  scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
  assert metrics.accuracy([1, 0, 0], scores) == pytest.approx(2 / 3)
  assert metrics.accuracy(np.eye(2)[[1, 0, 0]], scores) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="labels"):
    metrics.average_precision(np.zeros((3, 2)), np.zeros((3, 3)))


# ---------------------------------------------------------------- kNN


def test_knn_votes_hand_made():
  # Train points on two axes; the query sits at 30 degrees from axis 0, 60 from axis 1.
  train = np.array([[1, 0], [2, 0], [0, 1], [0, 3]], np.float32)  # norms differ: cosine ignores them
  train_labels = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 0]], np.float32)
  query = np.array([[np.cos(np.pi / 6), np.sin(np.pi / 6)]], np.float32)
  w0, w1 = np.exp(np.cos(np.pi / 6) / 0.07), np.exp(np.cos(np.pi / 3) / 0.07)
  scores = knn.knn_scores(train, train_labels, query, k=4, temperature=0.07)
  expected = np.array([2 * w0, 2 * w1, w0]) / (2 * w0 + 2 * w1)
  np.testing.assert_allclose(scores[0], expected, rtol=1e-5)
  # k=2 keeps only the two axis-0 neighbours.
  np.testing.assert_allclose(knn.knn_scores(train, train_labels, query, k=2)[0], [1, 0, 0.5], rtol=1e-6)
  # Single label: the query goes with axis 0, a query near axis 1 with class 1.
  queries = np.concatenate([query, [[0.1, 1.0]]]).astype(np.float32)
  result = knn.knn_evaluate(train, [0, 0, 1, 1], queries, [0, 1], k=3, multilabel=False)
  assert result == {"knn_top1": 1.0}
  wrong = knn.knn_evaluate(train, [0, 0, 1, 1], queries, [1, 0], k=3, multilabel=False)
  assert wrong == {"knn_top1": 0.0}


def test_knn_monitor_separates_clusters_and_chunks():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 16)).astype(np.float32)

  def batch(n):
    cls = rng.integers(0, 3, n)
    image = centers[cls] + 0.1 * rng.normal(size=(n, 16)).astype(np.float32)
    return {"image": image[:, None, None, :], "labels": np.eye(3, dtype=np.float32)[cls]}

  embed_fn = jax.jit(lambda images: images.reshape(images.shape[0], -1))
  train, test = [batch(32), batch(32)], [batch(24), batch(20)]  # ragged last batch
  result = knn.knn_monitor(embed_fn, train, test, k=5)
  assert set(result) == {"knn_ap_macro", "knn_ap_micro"}
  assert result["knn_ap_macro"] > 0.99
  # The same through an 8-device mesh (padding to the device count) gives the same numbers.
  mesh = jax.make_mesh((8, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  assert knn.knn_monitor(embed_fn, train, test, k=5, mesh=mesh) == pytest.approx(result)
  # Random features: chance level, well below.
  noise = jax.jit(lambda images: jax.random.normal(jax.random.key(images.shape[0]), (images.shape[0], 16)))
  assert knn.knn_monitor(noise, train, test, k=5)["knn_ap_macro"] < 0.8
  # Chunked scores equal one-shot scores.
  feats = rng.normal(size=(37, 8)).astype(np.float32)
  labels = (rng.random((37, 4)) < 0.3).astype(np.float32)
  np.testing.assert_allclose(
    knn.knn_scores(feats, labels, feats[:30], chunk_size=7),
    knn.knn_scores(feats, labels, feats[:30], chunk_size=64),
    rtol=1e-4,
    atol=1e-7,
  )


# ---------------------------------------------------------------- linear probe


def _separable(rng, n, num_classes=5, informative=True):
  labels = (rng.random((n, num_classes)) < 0.3).astype(np.float32)
  signal = (2 * labels - 1) if informative else rng.normal(size=labels.shape)
  feats = np.concatenate([signal, rng.normal(size=(n, 11))], 1) + 0.3 * rng.normal(size=(n, num_classes + 11))
  return feats.astype(np.float32), labels


def test_linear_probe_separable_vs_random(tmp_path):
  rng = np.random.default_rng(0)
  train, val, test = (_separable(rng, n) for n in (256, 96, 96))
  best = probe.train_probe(*train, *val, lrs=(0.01, 0.3), epochs=6, batch_size=64, eval_every=3)
  assert best["lr"] in (0.01, 0.3) and best["epoch"] in (3, 6) and best["value"] > 0.97
  assert len(best["history"]) == 2 and set(best["history"][0]["val"]) == {"0.01", "0.3"}
  names = [f"class {c}" for c in range(5)]
  results = probe_report(best, test, names, tmp_path)
  assert results["test"]["ap_macro"] > 0.97
  noise = [_separable(rng, n, informative=False) for n in (256, 96, 96)]
  random_best = probe.train_probe(*noise[0], *noise[1], lrs=(0.01, 0.3), epochs=6, batch_size=64, eval_every=3)
  random_scores = probe.predict(jax.tree.map(lambda x: x[None], random_best["head"]), noise[2][0], True)[0]
  assert metrics.average_precision(noise[2][1], random_scores)["ap_macro"] < 0.6

  # Saved predictions reproduce the reported numbers with scikit-learn.
  saved = np.load(tmp_path / "predictions_test.npz")
  assert average_precision_score(saved["labels"], saved["scores"], average="macro") == pytest.approx(
    results["test"]["ap_macro"], abs=1e-6
  )
  written = json.loads((tmp_path / "linear_probe.json").read_text())
  assert written["test"]["ap_per_class"]["class 0"] == pytest.approx(results["test"]["ap_per_class"]["class 0"])
  png = tmp_path / "per_class_ap.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def probe_report(best, test, names, out_dir):
  from jaxgeo.evaluate import linear

  return linear.report(
    best, {"test": (*test, np.arange(len(test[1])))}, names, True, str(out_dir), {"backbone": "synthetic"}
  )


def test_linear_probe_single_label():
  rng = np.random.default_rng(1)
  classes = rng.integers(0, 4, 300)
  feats = (3 * np.eye(4)[classes] + rng.normal(size=(300, 4))).astype(np.float32)
  best = probe.train_probe(
    feats[:200],
    classes[:200],
    feats[200:],
    np.eye(4)[classes[200:]],
    multilabel=False,
    lrs=(0.1,),
    epochs=5,
    batch_size=32,
  )
  assert best["value"] > 0.85


def test_per_class_chart_handles_nan(tmp_path):
  path = plots.per_class_ap_chart(
    ["a", "a much longer class name " * 3, "c"], [0.5, float("nan"), 0.9], 0.7, str(tmp_path / "sub" / "chart.png")
  )
  assert os.path.getsize(path) > 3000


# ---------------------------------------------------------------- backbone-based commands (tiny ViT)


@pytest.fixture(scope="module")
def tiny_vit():
  from jaxgeo.models import vit

  model = vit.vit("tiny", depth=2, embed_dim=32, num_heads=2, patch_size=8, pos_grid=4)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  return model, params


def test_vit_features_definition(tiny_vit):
  model, params = tiny_vit
  images = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))

  @jax.jit
  def both(params, images):
    blocks = model.apply({"params": params}, images, 2, method=model.get_intermediate_layers)
    return (
      features.vit_features(model, params, images, n_last_blocks=2, avgpool=True),
      blocks,
      features.vit_features(model, params, images, n_last_blocks=1),
      model.apply({"params": params}, images),
    )

  feats, blocks, cls_feats, output = both(params, images)
  assert feats.shape == (3, 3 * 32)
  np.testing.assert_allclose(feats[:, :32], blocks[0][:, 0])
  np.testing.assert_allclose(feats[:, 64:], blocks[1][:, 1:].mean(1), rtol=1e-5, atol=1e-6)
  # n=1 without pooling is the model's own output (the kNN feature).
  np.testing.assert_allclose(cls_feats, output, rtol=1e-5, atol=1e-6)
  fn = features.make_feature_fn(model, mean=(0.5,) * 3, std=(0.2,) * 3, image_size=32, n_last_blocks=2)
  host = [
    {"image": np.random.default_rng(0).random((5, 40, 40, 3), np.float32), "labels": np.eye(5)},
    {"image": np.random.default_rng(1).random((2, 40, 40, 3), np.float32), "labels": np.eye(5)[:2]},
  ]
  feats, labels = features.extract_features(lambda x: fn(params, x), host)
  assert feats.shape == (7, 64) and labels.shape == (7, 5)
  again, _ = features.extract_features(lambda x: fn(params, x), host)
  np.testing.assert_array_equal(feats, again)  # deterministic


def _write_patch(directory, size=32):
  """A 3-band uint16 GeoTIFF (B04, B03, B02 order) with a bright square, written with rasterio."""
  import rasterio.transform

  from jaxgeo.data import write_geotiff

  reflectance = np.full((3, size, size), 500, np.uint16)
  reflectance[:, 8:20, 10:24] = 1800
  path = os.path.join(directory, "patch.tif")
  write_geotiff(path, reflectance, crs="EPSG:32633", transform=rasterio.transform.from_origin(500000, 5000000, 10, 10))
  return path


def test_attention_png(tmp_path, tiny_vit):
  from jaxgeo.evaluate import attention

  model, params = tiny_vit
  image, picture = attention.read_patch(_write_patch(str(tmp_path)), "rgb")
  assert image.shape == (32, 32, 3) and picture.max() <= 1.0 and image.max() == pytest.approx(0.9)
  maps = attention.cls_attention(model, params, image, mean=(0.4,) * 3, std=(0.2,) * 3, image_size=32)
  assert maps.shape == (2, 4, 4)
  np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0 - _cls_self_attention(model, params, image), rtol=1e-4)
  out = attention.render(picture, maps, str(tmp_path / "attn.png"), title="tiny")
  assert open(out, "rb").read(4) == b"\x89PNG" and os.path.getsize(out) > 5000


def _cls_self_attention(model, params, image):
  from jaxgeo.data import augment

  images = augment.normalize(jnp.asarray(image)[None], (0.4,) * 3, (0.2,) * 3)
  attn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.get_last_selfattention))(params, images)
  return np.asarray(attn[0, :, 0, 0])


def test_embed_parquet_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  emb, labels = rng.normal(size=(4, 6)).astype(np.float32), np.eye(4, 3, dtype=np.float32)
  path = embed.write_embeddings(
    str(tmp_path / "e.parquet"),
    names=["p0", "p1", "p2", "p3"],
    index=[3, 1, 0, 2],
    embeddings=emb,
    labels=labels,
    class_names=["a", "b", "c"],
    split="test",
    metadata={"backbone": "random init"},
  )
  back = embed.read_embeddings(path)
  np.testing.assert_array_equal(back["embedding"], emb)
  np.testing.assert_array_equal(back["labels"], labels)
  assert back["name"] == ["p0", "p1", "p2", "p3"] and list(back["index"]) == [3, 1, 0, 2]
  assert back["metadata"]["backbone"] == "random init" and back["metadata"]["class_names"] == ["a", "b", "c"]
  import pyarrow.parquet as pq

  table = pq.read_table(path)
  assert table.schema.field("embedding").type.list_size == 6
  assert table.column("label_names").to_pylist()[3] == []


def test_linear_ben_smoke_end_to_end(tmp_path):
  """configs/linear_ben.py:smoke through run_linear_probe, then embed and attention on the same data."""
  import importlib.util

  from jaxgeo import data
  from jaxgeo.evaluate import attention, linear

  spec = importlib.util.spec_from_file_location(
    "linear_ben", os.path.join(os.path.dirname(__file__), "..", "configs", "linear_ben.py")
  )
  linear_ben = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(linear_ben)
  config = linear_ben.get_config("smoke")
  config.data.synthetic_dir = str(tmp_path / "synthetic")
  workdir = tmp_path / "probe"

  results = linear.run_linear_probe(config, str(workdir))
  assert results["backbone"] == "random init" and results["feature"]["dim"] == 2 * 32
  assert results["selected"]["lr"] in (0.01, 0.1) and 1 <= results["selected"]["epoch"] <= 3
  saved = np.load(workdir / "predictions_test.npz")
  assert saved["scores"].shape == (results["test"]["num_samples"], 19)
  scored = saved["labels"].sum(0) > 0
  expected = [sklearn_ap(saved["labels"][:, c], saved["scores"][:, c]) for c in np.flatnonzero(scored)]
  assert results["test"]["ap_macro"] == pytest.approx(np.mean(expected), abs=1e-6)
  assert results["test"]["ap_micro"] == pytest.approx(
    average_precision_score(saved["labels"], saved["scores"], average="micro"), abs=1e-6
  )
  assert (workdir / "per_class_ap.png").stat().st_size > 5000
  assert json.loads((workdir / "linear_probe.json").read_text())["test"]["num_classes_scored"] == scored.sum()

  out = embed.embed(config, "test", str(tmp_path / "test.parquet"))
  table = embed.read_embeddings(out)
  cached = np.load(workdir / "features" / "test.npz")
  order = np.argsort(table["index"])
  np.testing.assert_allclose(
    table["embedding"][order], cached["features"][np.argsort(cached["index"])], rtol=1e-5, atol=1e-6
  )
  source = data.build_source(config.data, "test")
  assert table["name"] == [source.names[i] for i in table["index"]]

  png = attention.attention_figure(config, source.patch_dir(0), str(tmp_path / "attention.png"))
  assert os.path.getsize(png) > 5000
