"""Is DINO training input-bound? Patch reading speed (folder GeoTIFFs vs packed ArrayRecord) and end-to-end rate.

  python benchmarks/data_loader.py --out benchmarks/results/loader_cpu.json
  python benchmarks/data_loader.py --root /data/BigEarthNet-v1.0 --metadata /data/meta.parquet \
      --packed /data/ben_packed --arch small --batch 64 --settings 0:2,4:2,8:4,16:4 --out ...
  python benchmarks/data_loader.py --smoke --out /tmp/loader_smoke.json              # CI-sized

1. Reading: patches/s on ONE core (one thread, one process: `source[i]` over a shuffled order) from the
   band-folder GeoTIFFs (BigEarthNetSource) and from the packed store (PackedSource), for rgb and all 12 bands.
   Folder and packed are measured in turns, --read_repeats times, and the medians reported, so a burst of load
   from a neighbour on a shared machine skews one turn, not the ratio. Without --root, a synthetic BigEarthNet in
   the real on-disk format is written (jaxgeo.data.write_synthetic_bigearthnet) and packed once; both are cached
   under --data_dir.
2. End to end: the jaxgeo DINO step (configs/dino_ben.py, built as train/loop.py builds it) fed by the real grain
   loader (folder and packed, several worker_count:prefetch settings) against the same step fed one fixed device
   batch from memory. loader rate / memory rate near 1 means the step, not the input, sets the pace.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dino_step  # noqa: E402  (sets the XLA / allocator environment before jax is imported)
import jax  # noqa: E402
import numpy as np  # noqa: E402
import report  # noqa: E402

from jaxgeo import data, parallel  # noqa: E402
from jaxgeo.data import pack as pack_lib  # noqa: E402
from jaxgeo.data import pipeline


def read_rates(sources, seconds, min_reads, repeats):
  """{kind: {"wall": [patches/s of each turn], "cpu": [patches per CPU second of each turn]}}, the sources
  measured in turns, `repeats` times over."""
  rates = {kind: {"wall": [], "cpu": []} for kind in sources}
  for _ in range(repeats):
    for kind, source in sources.items():
      wall, cpu, _ = read_rate(source, seconds, min_reads)
      rates[kind]["wall"].append(wall)
      rates[kind]["cpu"].append(cpu)
  return rates


def read_rate(source, seconds, min_reads):
  """(patches per wall second, patches per CPU second, reads) of source[i] in this thread over a shuffled order,
  for about `seconds` (at least `min_reads`). On a shared machine the CPU-time rate is the steadier per-core
  number: a neighbour's load stretches the wall clock, much less the CPU time this process is given."""
  order = np.random.default_rng(0).permutation(len(source))
  source[int(order[0])]  # first read opens files / readers: not what a long run pays per patch
  count, start, cpu_start = 0, time.perf_counter(), time.process_time()
  while True:
    source[int(order[count % len(order)])]
    count += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds and count >= min_reads:
      return count / elapsed, count / max(time.process_time() - cpu_start, 1e-9), count


def loader_rate(step, source, global_batch, worker_count, prefetch, steps, warmup):
  """Images/s of the step fed by the grain loader, dispatched as loop.py does (no sync between steps)."""
  dataset = pipeline.make_iter_dataset(
    source, batch_size_per_process=global_batch, seed=0, num_epochs=None, worker_count=worker_count, prefetch=prefetch
  )
  iterator = iter(dataset)

  def one():
    batch = next(iterator)
    # Only what the step reads, so the program (and its compile-cache entry) is the in-memory one.
    device_batch = parallel.host_to_global({"image": batch["image"], "num_skipped": batch["num_skipped"]}, step.mesh)
    step.state, metrics = step.compiled(step.state, device_batch)
    return metrics

  for _ in range(warmup):
    metrics = one()
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    metrics = one()
  jax.block_until_ready((step.state, metrics))
  elapsed = time.perf_counter() - start
  iterator = None  # drops the last reference: stops grain's worker processes
  return steps * global_batch / elapsed


def memory_rate(step, global_batch, steps, warmup):
  step.run(warmup)
  start = time.perf_counter()
  for _ in range(steps):
    step.state, metrics = step.compiled(step.state, step.batch)
  jax.block_until_ready((step.state, metrics))
  return steps * global_batch / (time.perf_counter() - start)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--full_opt", action="store_true", help="with --smoke: full XLA CPU optimisation")
  parser.add_argument("--root", default=None, help="BigEarthNet-S2 folder (default: synthetic)")
  parser.add_argument("--metadata", default=None)
  parser.add_argument("--packed", default=None, help="packed store of --root (made here if missing)")
  parser.add_argument("--data_dir", default="~/.cache/jaxgeo/bench", help="synthetic data and its packed store")
  parser.add_argument("--num_patches", type=int, default=None, help="synthetic patches (default 512; smoke 32)")
  parser.add_argument("--read_seconds", type=float, default=None, help="per read measurement (default 10)")
  parser.add_argument("--read_repeats", type=int, default=3, help="turns of folder / packed reading; medians kept")
  parser.add_argument("--settings", default=None, help="worker_count:prefetch list (default 0:2,1:2,2:4)")
  parser.add_argument("--arch", default="small", choices=("small", "base"))
  parser.add_argument("--batch", type=int, default=None, help="per device (default 64; smoke 4)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per setting (default 20; smoke 3)")
  parser.add_argument("--skip_e2e", action="store_true", help="reading rates only")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  smoke = args.smoke
  num_patches = args.num_patches or (32 if smoke else 512)
  read_seconds = args.read_seconds or (0.5 if smoke else 10.0)
  settings = [
    tuple(int(x) for x in s.split(":")) for s in (args.settings or ("0:2" if smoke else "0:2,1:2,2:4")).split(",")
  ]
  steps = args.steps or (3 if smoke else 20)
  info = dino_step.machine()
  print(f"machine: {info['device_kind']} ({info['jax_backend']}), CPU {info['cpu_model']} x{info['cpu_count']}")

  # ---- data: folder tree and its packed store
  if args.root:
    root, metadata = os.path.expanduser(args.root), args.metadata
    packed = os.path.expanduser(args.packed or root.rstrip("/") + "_packed")
  else:
    directory = os.path.expanduser(args.data_dir)
    root, metadata = data.write_synthetic_bigearthnet(directory, num_patches)
    packed = os.path.join(directory, f"packed_n{num_patches}")
  if not pack_lib.is_packed(packed):
    start = time.perf_counter()
    pack_lib.pack(root, packed, metadata=metadata, bands="all", log_every=10_000)
    print(f"packed {root} -> {packed} in {time.perf_counter() - start:.1f} s")

  # ---- 1. reading, one core
  reading = []
  for bands in ("rgb", "all"):
    sources = {
      "folder": data.BigEarthNetSource(root, metadata, split="train", bands=bands),
      "packed": pack_lib.PackedSource(packed, split="train", bands=bands),
    }
    turns = read_rates(sources, read_seconds, min_reads=8, repeats=max(1, args.read_repeats))
    median = {kind: {clock: statistics.median(v) for clock, v in t.items()} for kind, t in turns.items()}
    for kind in sources:
      reading.append(
        {
          "source": kind,
          "bands": bands,
          "patches_per_s_per_core": median[kind]["wall"],
          "patches_per_cpu_s": median[kind]["cpu"],
          "turns_patches_per_s": turns[kind]["wall"],
          "turns_patches_per_cpu_s": turns[kind]["cpu"],
        }
      )
      print(
        f"  read {kind:<7} {bands:<4} {median[kind]['wall']:9.1f} patches/s/core, "
        f"{median[kind]['cpu']:9.1f} patches/CPU s (medians of {len(turns[kind]['wall'])} turns)",
        flush=True,
      )
    ratio = {clock: median["packed"][clock] / median["folder"][clock] for clock in ("wall", "cpu")}
    reading.append(
      {
        "source": "packed / folder",
        "bands": bands,
        "ratio": ratio["wall"],
        "ratio_cpu_time": ratio["cpu"],
        "turns": [p / f for p, f in zip(turns["packed"]["wall"], turns["folder"]["wall"])],
      }
    )
    print(f"  read packed/folder {bands}: {ratio['wall']:.1f}x per wall second, {ratio['cpu']:.1f}x per CPU second")

  # ---- 2. end to end vs in memory
  e2e = []
  if not args.skip_e2e:
    config = dino_step.load_dino_config(smoke, args.arch)
    mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:1])
    batch = args.batch or (4 if smoke else 64)
    config.train.global_batch_size = batch * mesh.size
    step = dino_step.JaxStep(config, mesh, augmentation=True)
    in_memory = memory_rate(step, config.train.global_batch_size, steps, warmup=2)
    e2e.append(
      {
        "input": "memory (fixed device batch)",
        "images_per_s": in_memory,
        "fraction_of_memory": 1.0,
        "compile_s": step.compile_s,
        "compile_s_method": "jax AOT: jit(step).lower(state, batch).compile()",
      }
    )
    print(f"  e2e memory                      {in_memory:9.1f} img/s", flush=True)
    for kind, data_root, data_metadata in (("folder", root, metadata), ("packed", packed, None)):
      config.data.root, config.data.metadata = data_root, data_metadata
      source = data.build_source(config.data, "train")  # the loader's own choice of reader
      for worker_count, prefetch in settings:
        row = {"input": kind, "reader": type(source).__name__, "worker_count": worker_count, "prefetch": prefetch}
        try:
          rate = loader_rate(step, source, config.train.global_batch_size, worker_count, prefetch, steps, warmup=2)
          row.update(images_per_s=rate, fraction_of_memory=rate / in_memory)
          print(
            f"  e2e {kind:<7} workers={worker_count} prefetch={prefetch}  {rate:9.1f} img/s  "
            f"({100 * rate / in_memory:.0f}% of memory)",
            flush=True,
          )
        except Exception as e:  # pylint: disable=broad-except
          row["error"] = f"{type(e).__name__}: {e}"
          print(f"  e2e {kind} workers={worker_count}: ERROR {row['error']}", flush=True)
        e2e.append(row)

  cpu_note = "NO GPU available: the end-to-end rows are CPU-device numbers{smoke}, not GPU results"
  result = {
    **report.header("data_loader", info, smoke, argv, cpu_note),
    "data": {
      "root": root,
      "metadata": metadata,
      "packed": packed,
      "synthetic": not args.root,
      "train_patches": len(pack_lib.PackedSource(packed, split="train", bands="rgb")),
    },
    "reading": reading,
    "reading_note": "one thread in one process (= one core), source[i] over a shuffled order incl. decoding, "
    "resampling to 120 px and scaling; page cache warm after the first pass; folder and packed measured in "
    "turns; patches_per_s_per_core (wall clock) and patches_per_cpu_s (this process's CPU time, steadier on a shared "
    "machine) are medians of the turns, ratio / ratio_cpu_time the ratios of the medians",
    "end_to_end": e2e,
    "end_to_end_note": "the jaxgeo DINO step with on-device augmentation, dispatched as train/loop.py does; "
    "fraction_of_memory = loader images/s / fixed-device-batch images/s",
  }
  return report.write(result, args.out, "smoke" if smoke else "full", e2e)


if __name__ == "__main__":
  sys.exit(main())
