"""What the benchmark scripts (dino_step, moco_step, segment_step, data_loader) print and write around their own rows:
the machine lines printed first, the fields every result JSON opens with, and the file written at the end.

No jax import here: dino_step sets XLA's environment before jax loads, and this module is imported beside it.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Dense (no sparsity) peak TFLOP/s in the benchmark's matmul dtype (bf16 / fp16 tensor cores), by device kind.
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("V100", 125.0))
PEAK_NOTE = (
  "dense bf16/fp16 tensor-core peak per device: H100 SXM / H200 989, A100 312, V100 125 TFLOP/s "
  "(an H100 PCIe is 756: its MFU here reads low); CPU: none, MFU null"
)
# `{smoke}` is filled with " at smoke (tiny) shapes" on a --smoke run.
STEP_CPU_NOTE = (
  "NO GPU available: CPU numbers only{smoke}; they say nothing about GPU throughput and no GPU number is estimated"
)


def peak_tflops(device_kind, backend):
  if backend == "cpu":
    return None
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def parse_variants(parser, variants, all_variants):
  """The names in the comma-separated `variants`, or a parser error naming the unknown ones."""
  names = [v for v in variants.split(",") if v]
  unknown = sorted(set(names) - set(all_variants))
  if unknown:
    parser.error(f"--variants: unknown {unknown}; expected names from {all_variants}")
  return names


def print_machine(info, devices, flops_formula, *, cpu_model=True):
  """The lines a step benchmark opens with: where it runs, a warning when that is no GPU, how FLOPs are counted."""
  line = (
    f"machine: {info['device_kind']} x{devices} ({info['jax_backend']}), jax {info['jax']}, torch {info.get('torch')}"
  )
  print(line + (f", CPU {info['cpu_model']}" if cpu_model else ""))
  if not info["gpu_available"]:
    print("NO GPU: these are CPU numbers (smoke-sized if --smoke), not GPU results; MFU is null")
  print("FLOPs:", flops_formula)


def header(benchmark, info, smoke, argv, cpu_note=STEP_CPU_NOTE):
  """The fields a result JSON opens with: what ran, how it was called, on what, and with which XLA flags."""
  return {
    "benchmark": benchmark,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    "command": " ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv))),
    "machine": info,
    "gpu_available": info["gpu_available"],
    "note": "GPU run" if info["gpu_available"] else cpu_note.format(smoke=" at smoke (tiny) shapes" if smoke else ""),
    "smoke": smoke,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def step_result(benchmark, info, args, argv, *, model, inputs, flops_formula, rows, ratios, ratios_note, **extra):
  """The JSON of a training-step benchmark; `extra` fields stand after "model"."""
  return {
    **header(benchmark, info, args.smoke, argv),
    # Set, a jaxgeo compile_s may be a load from jax's persistent compilation cache rather than a compile.
    "jax_compilation_cache_dir": os.environ.get("JAX_COMPILATION_CACHE_DIR"),
    "model": model,
    **extra,
    "steps": {"warmup": args.warmup, "timed": args.steps},
    "input": inputs,
    "flops_formula": flops_formula,
    "peak_tflops_per_device": peak_tflops(info["device_kind"], info["jax_backend"]),
    "peak_tflops_note": PEAK_NOTE,
    "results": rows,
    "ratios": ratios,
    "ratios_note": ratios_note,
  }


def write(result, out, tag, rows):
  """Writes `result` to `out` (default benchmarks/results/<benchmark>_<tag>_<jax backend>.json), prints its ratios and
  the path; returns the exit status, 1 when a row records an error."""
  backend = result["machine"]["jax_backend"]
  out = out or os.path.join(RESULTS, f"{result['benchmark']}_{tag}_{backend}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  for key, value in result.get("ratios", {}).items():
    print(f"  ratio {key}: {value:.2f}x")
  print(f"wrote {out}")
  return 1 if any("error" in row for row in rows) else 0
