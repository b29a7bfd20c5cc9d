"""Packed store (pack command, PackedSource, build_source) and the benchmarks' smoke modes."""

import json
import math
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from jaxgeo import data
from jaxgeo.data import BadSampleError, BigEarthNetSource, pack, write_synthetic_bigearthnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  return write_synthetic_bigearthnet(str(tmp_path_factory.mktemp("bench_synthetic")), 20)


@pytest.fixture(scope="module")
def packed(tree, tmp_path_factory):
  root, metadata = tree
  out = str(tmp_path_factory.mktemp("bench_packed") / "store")
  assert pack.main([f"--root={root}", f"--metadata={metadata}", f"--out={out}", "--log_every=5"]) == 0
  return out


def test_pack_gives_the_folder_readers_samples(tree, packed):
  root, metadata = tree
  manifest = pack.read_manifest(packed)
  assert manifest["bands"] == list(data.ALL_BANDS) and manifest["version"] == pack.FORMAT_VERSION
  assert sorted(os.listdir(os.path.dirname(packed))) == ["store"], "staging folder left behind"
  total = 0
  for split in ("train", "validation", "test"):
    for bands in ("rgb", "all", ["B08", "B11", "B01"]):
      folder = BigEarthNetSource(root, metadata, split=split, bands=bands)
      store = pack.PackedSource(packed, split=split, bands=bands)
      assert store.names == folder.names and store.bands == folder.bands
      assert manifest["splits"][split]["count"] == len(store) == len(folder)
      for i in range(len(folder)):
        want, got = folder[i], store[i]
        assert got["image"].dtype == want["image"].dtype == np.float32
        assert np.array_equal(got["image"], want["image"]), (split, bands, i)
        assert np.array_equal(got["labels"], want["labels"]) and got["index"] == want["index"]
    total += manifest["splits"][split]["count"]
  assert total == 20
  # Another image size resamples from the native bands exactly as the folder reader does.
  folder = BigEarthNetSource(root, metadata, split="train", bands="all", image_size=64)
  store = pack.PackedSource(packed, split="train", bands="all", image_size=64)
  assert np.array_equal(store[0]["image"], folder[0]["image"])


def test_build_source_picks_the_packed_store(tree, packed):
  config = ml_collections.ConfigDict({"root": packed, "metadata": None, "bands": "all", "image_size": 120})
  source = data.build_source(config, "validation")
  assert isinstance(source, pack.PackedSource) and source.bands == data.ALL_BANDS
  config.root, config.metadata = tree
  assert isinstance(data.build_source(config, "validation"), BigEarthNetSource)


def test_pack_names_the_bad_file_and_leaves_no_store(tree, tmp_path):
  root, metadata = tree
  name = BigEarthNetSource(root, metadata, split="train").names[0]
  broken = tmp_path / "tree"
  # A copy of the tree with one truncated band file.
  shutil.copytree(root, broken)
  bad_file = broken / name / f"{name}_B8A.tif"
  bad_file.write_bytes(bad_file.read_bytes()[:100])
  out = tmp_path / "store"
  with pytest.raises(BadSampleError, match=str(bad_file)):
    pack.pack(str(broken), str(out), metadata=metadata)
  assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
  manifest = pack.pack(str(broken), str(out), metadata=metadata, on_bad_sample="skip")
  assert [s["name"] for s in manifest["skipped"]["train"]] == [name]
  assert name not in pack.PackedSource(str(out), split="train").names
  with pytest.raises(FileExistsError):
    pack.pack(str(broken), str(out), metadata=metadata)


def test_check_reads_a_packed_store_and_names_corrupt_records(packed, tmp_path, capsys):
  from jaxgeo.data.check import check_dataset
  from jaxgeo.data.check import main as check_main

  assert check_main([f"--root={packed}"]) == 0
  out = capsys.readouterr().out
  assert "dataset is clean" in out and f"applied when {packed} was packed" in out
  assert "data.max_nodata_fraction=1" in out
  store = tmp_path / "store"
  shutil.copytree(packed, store)
  names = pack.PackedSource(str(store), split="train").names
  records = store / "train.array_record"
  raw = bytearray(records.read_bytes())
  # Flip bytes in the middle of the file: riegeli's chunk checksum catches it on reading that record.
  raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(b ^ 0xFF for b in raw[len(raw) // 2 : len(raw) // 2 + 64])
  records.write_bytes(bytes(raw))
  source = pack.PackedSource(str(store), split="train", bands="all")
  bad = [i for i in range(len(source)) if source.problems(i)]
  assert len(bad) >= 1
  error = source.problems(bad[0])[0]
  assert error.path == str(records) and f"record {bad[0]} (patch {names[bad[0]]})" in str(error)
  with pytest.raises(BadSampleError, match=f"record {bad[0]}"):
    source[bad[0]]
  problems = check_dataset({"root": str(store), "bands": "all"}, splits=("train",))
  assert len(problems) == len(bad) and all(str(records) in p for p in problems)
  # A truncated file cannot even be opened: a construction error that names it.
  records.write_bytes(bytes(raw[: len(raw) // 3]))
  with pytest.raises(ValueError, match=str(records)):
    pack.PackedSource(str(store), split="train")
  assert str(records) in check_dataset({"root": str(store)}, splits=("train",))[0]


def test_packed_records_carry_their_own_band_sizes(packed):
  """A record can hold bands at sizes other than the manifest's (files already on the 10 m grid)."""
  source = pack.PackedSource(packed, split="train", bands="all")
  record = source._records[0]  # pylint: disable=protected-access
  header, start = pack.decode_header(record, source.path, "record 0")
  pixels = np.frombuffer(memoryview(record)[start:], "<u2")
  bands, offset = [], 0
  for shape in pack.read_manifest(packed)["band_shapes"]:
    bands.append(pixels[offset : offset + shape[0] * shape[1]].reshape(shape))
    offset += shape[0] * shape[1]
  upsampled = [np.round(data.resize_bilinear(b, (120, 120))).astype(np.uint16) for b in bands]
  labels = np.zeros(19, np.float32)
  labels[header["labels"]] = 1
  encoded = pack.encode_record(header["name"], labels, upsampled, pack.read_manifest(packed)["band_shapes"])
  assert pack.decode_header(encoded, source.path, "x")[0]["shapes"] == [[120, 120]] * 12
  source._records = [encoded]  # pylint: disable=protected-access
  image = source[0]["image"]
  assert np.array_equal(image, np.stack(upsampled, axis=-1) / np.float32(10000))


def _run(script, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, os.path.join(REPO, "benchmarks", script), "--smoke", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def test_dino_step_smoke_writes_json(tmp_path):
  out = tmp_path / "dino_step.json"
  stdout = _run(
    "dino_step.py", f"--out={out}", "--variants=jaxgeo_xla,torch_eager,torch_compiled", "--warmup=1", "--steps=2"
  )
  assert "flops_per_step = " in stdout and "NO GPU" in stdout
  result = json.loads(out.read_text())
  for key in ("machine", "gpu_available", "note", "flops_formula", "results", "ratios", "model"):
    assert key in result, key
  assert result["gpu_available"] is False and result["machine"]["torch"]
  assert [r["variant"] for r in result["results"]] == ["torch_eager", "torch_compiled", "jaxgeo_xla"]
  for row in result["results"]:
    assert "error" not in row, row
    assert row["images_per_s"] > 0 and row["achieved_tflops"] > 0 and row["flops_per_step"] > 0
    assert row["step_time_s"]["min"] <= row["step_time_s"]["median"] <= row["step_time_s"]["max"]
    assert row["mfu"] is None  # a CPU has no peak in the table: no invented utilisation
    # torch's compile_s is first step - median step: noise on a busy machine can make an eager one negative.
    assert row["compile_s"] > 0 if row["variant"].startswith("jaxgeo") else math.isfinite(row["compile_s"]), row
    assert row["compile_s_method"], row
  assert set(result["ratios"]) == {"b4: jaxgeo_xla / torch_eager", "b4: jaxgeo_xla / torch_compiled"}
  assert all(v > 0 for v in result["ratios"].values())


def test_data_loader_smoke_writes_json(tmp_path):
  out = tmp_path / "loader.json"
  _run(
    "data_loader.py",
    f"--out={out}",
    f"--data_dir={tmp_path / 'data'}",
    "--read_seconds=0.2",
    "--read_repeats=2",
    "--steps=2",
  )
  result = json.loads(out.read_text())
  reads = {(r["source"], r["bands"]): r for r in result["reading"]}
  for kind in ("folder", "packed"):
    for bands in ("rgb", "all"):
      assert reads[(kind, bands)]["patches_per_s_per_core"] > 0
  assert reads[("packed / folder", "all")]["ratio"] > 0 and len(reads[("packed / folder", "all")]["turns"]) == 2
  inputs = [r["input"] for r in result["end_to_end"]]
  assert inputs == ["memory (fixed device batch)", "folder", "packed"]
  assert [r.get("reader") for r in result["end_to_end"][1:]] == ["BigEarthNetSource", "PackedSource"]
  assert all(r["images_per_s"] > 0 for r in result["end_to_end"])
  assert result["end_to_end"][0]["compile_s"] > 0
