"""DINO training-step throughput: jaxgeo (XLA and cuDNN attention) against PyTorch (eager and compiled), one run.

  python benchmarks/dino_step.py --arch small --batch 64 --out benchmarks/results/h100_vits16_b64.json
  python benchmarks/dino_step.py --arch base --sweep 32,64,128 --out benchmarks/results/h100_vitb16_sweep.json
  python benchmarks/dino_step.py --smoke --out /tmp/dino_step_smoke.json        # tiny shapes, CPU, seconds

Variants (per batch size):
  jaxgeo_xla, jaxgeo_cudnn           the real jaxgeo step (configs/dino_ben.py, dino.make_task, jitted with the
                                     shardings of train/loop.py): multi-crop augmentation runs INSIDE the step
  jaxgeo_xla_noaug, jaxgeo_cudnn_noaug   the same step fed ready-made crops (augmentation excluded): the
                                     apples-to-apples number against PyTorch
  torch_eager                        benchmarks/torch_dino.py as main_dino: naive attention, fp16 autocast +
                                     GradScaler, eager
  torch_compiled                     scaled_dot_product_attention + torch.compile, fused AdamW
PyTorch is fed ready-made crops (in the reference, augmentation runs on CPU loader workers, not in the step).
Paper timing setting (default): ViT-S/16, head out_dim 65536, 2 x 224 + 10 x 96 crops, bf16 (jax) / fp16
autocast (torch). No GPU number is ever estimated: on a CPU the JSON says so and MFU is null.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import platform
import statistics
import sys
import time
import traceback
import types

# Both frameworks share one GPU in this process: JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Smoke runs are about "does it still run", in CI: XLA:CPU's LLVM passes cost 3x the compile time there.
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "--smoke" in sys.argv[1:] and "--full_opt" not in sys.argv[1:]:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SMOKE_XLA_FLAGS).strip()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # report, torch_dino: beside this file
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import report  # noqa: E402

from jaxgeo import data, parallel  # noqa: E402
from jaxgeo.models import vit  # noqa: E402
from jaxgeo.train import dino  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_MEMORY_NOTE = (
  "jax peak_bytes_in_use is the process's peak so far (all jax variants run before this one included); "
  "compiled_memory is this step's own"
)
FLOPS_FORMULA = (
  "flops_per_step = global_batch * (3 * F_student + F_teacher), matmul FLOPs only (2 per multiply-add; "
  "softmax, norms, GELU, loss, optimizer and augmentation not counted); "
  "F_student = 2 * F_vit(G) + n_local * F_vit(l) + (2 + n_local) * F_head, F_teacher = 2 * F_vit(G) + 2 * F_head "
  "(3x = forward + backward); F_vit(r) = depth * (24 * N * D^2 + 4 * N^2 * D) + 2 * (N - 1) * p^2 * C * D with "
  "N = (r / p)^2 + 1 tokens; F_head = 2 * (D * H + H * H + H * K + K * O); D embed dim, p patch, C channels, "
  "G / l global / local crop size, H head hidden dim, K bottleneck dim, O out_dim"
)


def vit_flops(size, patch, chans, dim, depth):
  tokens = (size // patch) ** 2 + 1
  return depth * (24 * tokens * dim**2 + 4 * tokens**2 * dim) + 2 * (tokens - 1) * patch**2 * chans * dim


def step_flops(shape, global_batch):
  """Analytic matmul FLOPs of one DINO step (see FLOPS_FORMULA); `shape` is the dict of dims."""
  s = shape
  head = 2 * (
    s["embed_dim"] * s["hidden_dim"]
    + s["hidden_dim"] ** 2
    + s["hidden_dim"] * s["bottleneck_dim"]
    + s["bottleneck_dim"] * s["out_dim"]
  )
  vit_global = vit_flops(s["global_size"], s["patch_size"], s["in_chans"], s["embed_dim"], s["depth"])
  vit_local = vit_flops(s["local_size"], s["patch_size"], s["in_chans"], s["embed_dim"], s["depth"])
  student = 2 * vit_global + s["local_crops"] * vit_local + (2 + s["local_crops"]) * head
  teacher = 2 * vit_global + 2 * head
  return global_batch * (3 * student + teacher)


def load_dino_config(smoke, arch="small"):
  """configs/dino_ben.py (the real recipe) with the benchmark's overrides."""
  spec = importlib.util.spec_from_file_location("dino_ben", os.path.join(REPO, "configs", "dino_ben.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke" if smoke else None)
  if not smoke:
    config.model.arch = arch
    config.aug.local_crops_number = 10  # the paper's timing setting (its training recipe uses 8 or 10)
  # Time the steady state: the first epoch's frozen last layer would skip its Adam update.
  config.optim.freeze_last_layer_epochs = 0
  return config


def model_shape(config, in_chans):
  from jaxgeo.models import vit as vit_lib  # pylint: disable=g-import-not-at-top

  arch = dict(vit_lib.VIT_ARCHS[config.model.arch])
  for key in ("depth", "embed_dim", "num_heads"):
    if config.model[key] > 0:
      arch[key] = config.model[key]
  return {
    "arch": config.model.arch,
    **arch,
    "patch_size": config.model.patch_size,
    "in_chans": in_chans,
    "global_size": config.aug.global_size,
    "local_size": config.aug.local_size,
    "local_crops": config.aug.local_crops_number,
    "out_dim": config.head.out_dim,
    "hidden_dim": config.head.hidden_dim,
    "bottleneck_dim": config.head.bottleneck_dim,
  }


# ---------------------------------------------------------------------------------------------------------------
# jaxgeo
# ---------------------------------------------------------------------------------------------------------------


class CompiledStep:
  """A jaxgeo training state and its step, jitted as train/loop.py jits it (state donated, metrics replicated) and
  compiled ahead of time on one fixed device batch. A subclass calls init_state, sets `batch`, then compile."""

  def init_state(self, init, config, mesh):
    """`state` = init(PRNGKey(config.seed)) laid out by config.sharding_rules; returns its shardings."""
    rng = jax.random.PRNGKey(config.seed)
    shardings = parallel.tree_shardings(jax.eval_shape(init, rng), config.sharding_rules, mesh)
    self.state = jax.jit(init, out_shardings=shardings)(rng)
    return shardings

  def compile(self, step, shardings, mesh, *, swap=None):
    """Sets `compiled` and `compile_s`. swap: (module, attribute, stand-in), in place only while the step compiles:
    how a variant leaves a part of the step (augmentation) out and nothing else."""
    batch_shardings = jax.tree.map(lambda a: a.sharding, self.batch)
    step_fn = jax.jit(
      step,
      in_shardings=(shardings, batch_shardings),
      out_shardings=(shardings, parallel.replicated(mesh)),
      donate_argnums=0,
    )
    start = time.perf_counter()
    with _swapped(*swap) if swap else contextlib.nullcontext():
      self.compiled = step_fn.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start

  def xla_flops(self):
    try:
      analysis = self.compiled.cost_analysis()
      analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
      return float(analysis.get("flops")) if analysis and analysis.get("flops") else None
    except Exception:  # pylint: disable=broad-except
      return None

  def compiled_memory(self):
    try:
      m = self.compiled.memory_analysis()
      return {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
      }
    except Exception:  # pylint: disable=broad-except
      return None

  def run(self, steps):
    """Runs `steps` steps on the fixed device batch; per-step wall times (each step synchronised)."""
    times, metrics = [], None
    for _ in range(steps):
      start = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - start)
    if metrics is not None and not bool(metrics["finite"]):
      raise FloatingPointError(f"non-finite loss {float(metrics['loss'])} in the benchmark step")
    return times


@contextlib.contextmanager
def errors_recorded(row):
  """A variant that fails (e.g. out of memory) records its error in its row, and the others still run."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {e}"
    traceback.print_exc()


@contextlib.contextmanager
def _swapped(module, attribute, stand_in):
  real = getattr(module, attribute)
  setattr(module, attribute, stand_in)
  try:
    yield
  finally:
    setattr(module, attribute, real)


class JaxStep(CompiledStep):
  """The jaxgeo DINO state + compiled step for one config, built exactly as train/loop.py builds them.

  augmentation=False compiles the same step with `augment.multicrop` replaced by "the batch already holds the
  crops", so the time excludes augmentation and nothing else changes.
  """

  def __init__(self, config, mesh, *, in_chans=3, image_size=120, augmentation=True, total_steps=100_000):
    self.config, self.mesh = config, mesh
    mean, std = data.normalization_stats(config.data.bands)
    task = dino.make_task(
      config, steps_per_epoch=1000, total_steps=total_steps, in_chans=in_chans, mean=mean, std=std, mesh=mesh
    )
    shardings = self.init_state(task.init, config, mesh)
    global_batch = config.train.global_batch_size
    host = np.random.default_rng(0)
    if augmentation:
      batch = {"image": host.uniform(0, 1, (global_batch, image_size, image_size, in_chans)).astype(np.float32)}
    else:
      aug = config.aug
      batch = {
        "image": (
          host.standard_normal((2, global_batch, aug.global_size, aug.global_size, in_chans), np.float32),
          host.standard_normal(
            (aug.local_crops_number, global_batch, aug.local_size, aug.local_size, in_chans), np.float32
          ),
        )
      }
    batch["num_skipped"] = np.zeros((global_batch,), np.int32)
    self.batch = self._to_device(batch)
    crops_given = types.SimpleNamespace(multicrop=lambda rng, crops, *args: crops)
    self.compile(task.step, shardings, mesh, swap=None if augmentation else (dino, "augment", crops_given))

  def _to_device(self, batch):
    def put(path, array):
      # Crops are [crop, batch, ...]: their batch axis is the second.
      crop_major = (
        any(getattr(k, "key", None) == "image" for k in path) and isinstance(array, np.ndarray) and array.ndim == 5
      )
      spec = (None, parallel.BATCH_AXES) if crop_major else (parallel.BATCH_AXES,)
      sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))
      return jax.make_array_from_process_local_data(sharding, array)

    return jax.tree_util.tree_map_with_path(put, batch)


def jax_peak_memory():
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s]
  return max(peaks) if peaks and all(p is not None for p in peaks) else None


# ---------------------------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------------------------


def torch_variant(shape, batch, flavour, *, warmup, steps, compile_backend, drop_path_rate):
  import torch  # pylint: disable=g-import-not-at-top
  import torch_dino  # pylint: disable=g-import-not-at-top

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  trainer = torch_dino.DinoTrainer(
    arch=shape["arch"],
    depth=shape["depth"],
    embed_dim=shape["embed_dim"],
    num_heads=shape["num_heads"],
    patch_size=shape["patch_size"],
    in_chans=shape["in_chans"],
    global_size=shape["global_size"],
    out_dim=shape["out_dim"],
    hidden_dim=shape["hidden_dim"],
    bottleneck_dim=shape["bottleneck_dim"],
    drop_path_rate=drop_path_rate,
    flavour=flavour,
    device=device,
    compile_backend=compile_backend,
  )
  g, l, c = shape["global_size"], shape["local_size"], shape["in_chans"]
  global_crops = torch.randn(2 * batch, c, g, g, device=device)
  local_crops = torch.randn(shape["local_crops"] * batch, c, l, l, device=device)
  measured = time_torch(functools.partial(trainer.step, global_crops, local_crops), device, warmup=warmup, steps=steps)
  del trainer, global_crops, local_crops
  if device == "cuda":
    torch.cuda.empty_cache()
  return measured


def time_torch(step, device, *, warmup, steps):
  """(timed step times, first step's time, peak CUDA memory or None) of `step()`, which returns the loss: the first
  step on its own, `warmup` - 1 more untimed, then `steps` timed, each synchronised."""
  import torch  # pylint: disable=g-import-not-at-top

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  step()
  sync()
  first_step_s = time.perf_counter() - start
  times = []
  for i in range(warmup - 1 + steps):
    start = time.perf_counter()
    loss = step()
    sync()
    if i >= warmup - 1:
      times.append(time.perf_counter() - start)
  if not bool(torch.isfinite(loss)):
    raise FloatingPointError(f"non-finite torch loss {float(loss)}")
  return times, first_step_s, int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def machine():
  devices = jax.devices()
  cpu_model = None
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
  except OSError:
    pass
  info = {
    "jax_backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "jax": jax.__version__,
    "python": platform.python_version(),
    "cpu_model": cpu_model or platform.processor(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
  }
  try:
    import flax  # pylint: disable=g-import-not-at-top
    import jaxlib  # pylint: disable=g-import-not-at-top

    info.update(jaxlib=jaxlib.__version__, flax=flax.__version__)
  except ImportError:
    pass
  try:
    import torch  # pylint: disable=g-import-not-at-top

    info.update(
      torch=torch.__version__,
      torch_cuda=torch.version.cuda,
      torch_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    )
  except ImportError:
    info.update(torch=None)
  info["gpu_available"] = info["jax_backend"] == "gpu"
  # Shared machines: a load above the core count makes every CPU timing here noisy.
  info["load_average_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  return info


def summarize(times, flops, global_batch, devices, peak):
  median = statistics.median(times)
  achieved = flops / median / 1e12
  return {
    "images_per_s": global_batch / median,
    "images_per_s_per_device": global_batch / median / devices,
    "step_time_s": {"median": median, "min": min(times), "max": max(times), "timed_steps": len(times)},
    "achieved_tflops": achieved,
    "mfu": None if peak is None else achieved / (peak * devices),
  }


def torch_fields(measured, flops, batch, peak):
  """A torch variant's row fields from what time_torch measured, the batch on its one device."""
  times, first_s, mem = measured
  summary = summarize(times, flops, batch, 1, peak)
  return dict(
    summary,
    # torch has no ahead-of-time compile to time: its first step pays for tracing / torch.compile / lazy
    # optimizer state, and what that costs over a steady-state step is its compile time.
    compile_s=first_s - summary["step_time_s"]["median"],
    compile_s_method="first step - median steady-state step",
    first_step_s=first_s,
    peak_memory_bytes=mem,
  )


def jax_fields(step, args, flops, global_batch, devices, peak, peak_memory_note):
  """Times a CompiledStep: the first step on its own, args.warmup - 1 more untimed, then args.steps timed; its row
  fields."""
  first = time.perf_counter()
  step.run(1)
  first_s = time.perf_counter() - first
  step.run(args.warmup - 1)
  times = step.run(args.steps)
  return dict(
    summarize(times, flops, global_batch, devices, peak),
    compile_s=step.compile_s,
    compile_s_method="jax AOT: jit(step).lower(state, batch).compile()",
    first_step_s=first_s,
    xla_cost_analysis_flops=step.xla_flops(),
    compiled_memory=step.compiled_memory(),
    peak_memory_bytes=jax_peak_memory(),
    peak_memory_note=peak_memory_note,
  )


def benchmark_batch(args, batch, mesh, info):
  """All variants at one per-device batch size; a variant that fails (e.g. out of memory) records its error."""
  devices = mesh.size
  global_batch = batch * devices
  rows = []
  peak = report.peak_tflops(info["device_kind"], info["jax_backend"])
  shape = None
  backend = args.torch_compile_backend or ("aot_eager" if args.smoke else "inductor")

  for flavour in [f for f in ("eager", "compiled") if f"torch_{f}" in args.variants]:
    name = f"torch_{flavour}"
    config = load_dino_config(args.smoke, args.arch)
    shape = model_shape(config, 3)
    flops = step_flops(shape, batch)  # torch runs one device's share
    row = {
      "variant": name,
      "framework": "torch",
      "batch_per_device": batch,
      "global_batch": batch,
      "devices": 1,
      "augmentation_in_step": False,
      "attention": "naive (q@k^T, softmax, @v)" if flavour == "eager" else "F.scaled_dot_product_attention",
      "precision": "fp16 autocast + GradScaler" if info["gpu_available"] else "fp32 (CPU: no autocast)",
      "torch_compile": None if flavour == "eager" else backend,
      "flops_per_step": flops,
    }
    with errors_recorded(row):
      measured = torch_variant(
        shape,
        batch,
        flavour,
        warmup=args.warmup,
        steps=args.steps,
        compile_backend=backend,
        drop_path_rate=config.model.drop_path_rate,
      )
      row.update(torch_fields(measured, flops, batch, peak))
    rows.append(row)
    _print_row(row)

  for name in [v for v in args.variants if v.startswith("jaxgeo")]:
    attention = "cudnn" if "cudnn" in name else "xla"
    augmentation = not name.endswith("_noaug")
    config = load_dino_config(args.smoke, args.arch)
    config.model.attention = attention
    config.train.global_batch_size = global_batch
    shape = model_shape(config, 3)
    flops = step_flops(shape, global_batch)
    row = {
      "variant": name,
      "framework": "jaxgeo",
      "batch_per_device": batch,
      "global_batch": global_batch,
      "devices": devices,
      "augmentation_in_step": augmentation,
      "attention": "einsum softmax (XLA)"
      if attention == "xla"
      else "jax.nn.dot_product_attention(implementation='cudnn')"
      + ("" if info["gpu_available"] else " (CPU: falls back to XLA)"),
      "precision": f"params fp32, compute {jnp.dtype(vit.compute_dtype(config.model.dtype)).name}",
      "flops_per_step": flops,
    }
    with errors_recorded(row):
      step = JaxStep(config, mesh, augmentation=augmentation)
      row.update(jax_fields(step, args, flops, global_batch, devices, peak, JAX_MEMORY_NOTE))
      del step
    rows.append(row)
    _print_row(row)
  return rows, shape


def ratios(rows):
  """jaxgeo variant / torch variant images per second, per batch size, measured in this run."""
  out = {}
  rate = {(r["variant"], r["batch_per_device"]): r.get("images_per_s_per_device") for r in rows}
  for (jname, batch), jrate in rate.items():
    if not jname.startswith("jaxgeo") or not jrate:
      continue
    for tname in ("torch_eager", "torch_compiled"):
      trate = rate.get((tname, batch))
      if trate:
        out[f"b{batch}: {jname} / {tname}"] = jrate / trate
  return out


def _print_row(row):
  if "error" in row:
    print(f"  {row['variant']:<22} b={row['batch_per_device']:<4} ERROR {row['error'][:200]}", flush=True)
    return
  mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
  mem = row.get("peak_memory_bytes")
  print(
    f"  {row['variant']:<22} b={row['batch_per_device']:<4} {row['images_per_s_per_device']:9.1f} img/s/dev  "
    f"step median {1e3 * row['step_time_s']['median']:8.1f} ms (min {1e3 * row['step_time_s']['min']:.1f}, "
    f"max {1e3 * row['step_time_s']['max']:.1f})  {row['achieved_tflops']:.3f} TFLOP/s  MFU {mfu}  "
    f"peak mem {'n/a' if mem is None else f'{mem / 2**30:.2f} GiB'}  compile {row['compile_s']:.2f} s",
    flush=True,
  )


ALL_VARIANTS = ("torch_eager", "torch_compiled", "jaxgeo_xla", "jaxgeo_cudnn", "jaxgeo_xla_noaug", "jaxgeo_cudnn_noaug")

SMOKE_VARIANTS = ("torch_eager", "torch_compiled", "jaxgeo_xla", "jaxgeo_cudnn_noaug")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--arch", default="small", choices=("small", "base"))
  parser.add_argument("--batch", type=int, default=None, help="per device (default 64; smoke 4)")
  parser.add_argument("--sweep", default=None, help="comma-separated per-device batch sizes, e.g. 32,64,128")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (configs/dino_ben.py:smoke), few steps")
  parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 3)")
  parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, >= 1 (default 3)")
  parser.add_argument("--devices", type=int, default=1, help="jax devices in the mesh (torch always uses one; -1: all)")
  parser.add_argument(
    "--variants",
    default=None,
    help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (default all; smoke: "
    f"{','.join(SMOKE_VARIANTS)}, which covers every code path once)",
  )
  parser.add_argument(
    "--torch_compile_backend",
    default=None,
    help="default inductor (smoke: aot_eager, which skips codegen to stay CI-sized)",
  )
  parser.add_argument(
    "--full_opt",
    action="store_true",
    help="with --smoke: keep XLA's full CPU optimisation (slower compile, faster steps)",
  )
  parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/dino_step_<...>.json)")
  args = parser.parse_args(argv)
  default = SMOKE_VARIANTS if args.smoke else ALL_VARIANTS
  args.variants = report.parse_variants(parser, args.variants or ",".join(default), ALL_VARIANTS)
  args.steps = args.steps or (3 if args.smoke else 20)
  args.warmup = max(1, args.warmup or 3)
  batches = [int(b) for b in args.sweep.split(",")] if args.sweep else [args.batch or (4 if args.smoke else 64)]

  info = machine()
  devices = jax.devices() if args.devices == -1 else jax.devices()[: args.devices]
  config = load_dino_config(args.smoke, args.arch)
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  report.print_machine(info, mesh.size, FLOPS_FORMULA)
  rows, shape = [], None
  for batch in batches:
    batch_rows, shape = benchmark_batch(args, batch, mesh, info)
    rows.extend(batch_rows)
  result = report.step_result(
    "dino_step",
    info,
    args,
    argv,
    model=shape,
    inputs={
      "jaxgeo": "a fixed device batch of 120x120 images; multi-crop augmentation runs on the device "
      "inside the step (jaxgeo_*), or ready-made crops are fed (jaxgeo_*_noaug)",
      "torch": "ready-made crops on the device (augmentation excluded, as in jaxgeo_*_noaug)",
    },
    flops_formula=FLOPS_FORMULA,
    rows=rows,
    ratios=ratios(rows),
    ratios_note="images/s per device of a jaxgeo variant over a torch variant, same run, same batch per device",
  )
  return report.write(result, args.out, "smoke" if args.smoke else args.arch, rows)


if __name__ == "__main__":
  sys.exit(main())
