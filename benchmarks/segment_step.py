"""SwinV2-B + FPN segmentation training-step throughput: jaxgeo against PyTorch (eager AMP and compiled), one run.

  python benchmarks/segment_step.py --out benchmarks/results/h100_swinv2b_fpn_b16.json   # 512 px, batch 16
  python benchmarks/segment_step.py --smoke --out /tmp/segment_step_smoke.json         # tiny shapes, CPU, seconds

Variants, all at the same GLOBAL batch (jaxgeo splits it over --devices; PyTorch runs it on one device):
  jaxgeo          the real step (configs/segment_landcoverai.py, segment.make_task, jitted with the shardings of
                  train/loop.py): joint image + mask augmentation INSIDE the step, weighted label-smoothed
                  cross-entropy, Adam; bf16 compute on a GPU (config.model.dtype "auto"), fp32 params
  jaxgeo_noaug    the same step fed ready views (augmentation replaced by identity): apples to apples with torch
  torch_eager     benchmarks/torch_swin.SegmentationModel (torchvision's swin_v2_b + FPN + head), bf16 autocast,
                  F.cross_entropy(weight, ignore_index, label_smoothing), Adam; ready-made tensors on the device
  torch_compiled  the same with torch.compile (inductor; --smoke: aot_eager) and fused Adam
Every step is one optimizer update (config.optim.accumulate = 1 here: accumulation only changes how often the
update runs). FLOPs are analytic (FLOPS_FORMULA); on a CPU the JSON says so and MFU is null.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dino_step  # noqa: E402  (sets the smoke XLA flags before jax loads; its helpers are reused below)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import report  # noqa: E402

from jaxgeo import data, parallel  # noqa: E402
from jaxgeo.data import augment, landcoverai  # noqa: E402
from jaxgeo.models import vit  # noqa: E402
from jaxgeo.train import segment  # noqa: E402

REPO = dino_step.REPO
# ENet weights of LandCover.ai's train pixel shares (background .57, building .009, woodland .33, water .06, road
# .03): fixed so that both frameworks weigh the same.
CLASS_WEIGHTS = (2.16, 34.3, 3.42, 11.9, 19.3)
IGNORE_INDEX = 255
JAX_MEMORY_NOTE = "jax peak_bytes_in_use: the process's peak so far (earlier jax variants included)"
FLOPS_FORMULA = (
  "flops_per_step = 3 * global_batch * F (forward + backward), matmul and conv FLOPs only (2 per multiply-add; "
  "norms, softmax, resizes, loss, optimizer and augmentation not counted). F = patch embed 2*N1*p^2*in*C + per "
  "block (24*N*D^2 + 4*N*M*D) + per merge 16*N'*D^2 + FPN sum_l (2*N_l*D_l*F + 18*N_l*F^2) + head "
  "(18*N1*Fin*H + 2*N1*H*K); N tokens of a stage (padded to whole windows), D its width, M = window^2, N' the "
  "merged tokens, F fpn channels, Fin the fused width (F, or levels*F for concat), H head channels, K classes"
)


def load_config(smoke):
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(
    "segment_landcoverai", os.path.join(REPO, "configs", "segment_landcoverai.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke" if smoke else None)
  config.optim.accumulate = 1
  return config


def model_shape(config):
  num_classes = len(CLASS_WEIGHTS)
  model = segment.build_model(config.model, 3, num_classes)
  fields = ("embed_dim", "depths", "num_heads", "window_size", "patch_size", "mlp_ratio", "drop_path_rate")
  shape = {f: getattr(model, f) for f in fields}
  shape.update(
    arch=config.model.arch,
    in_chans=3,
    num_classes=num_classes,
    fpn_channels=model.fpn_channels,
    levels=tuple(model.levels),
    fusion=model.fusion,
    head_channels=model.head_channels,
    image_size=int(config.aug.size),
  )
  return {k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()}


def segmentation_flops(s):
  """Analytic matmul + conv FLOPs of one forward of one image (see FLOPS_FORMULA)."""
  side, window = s["image_size"] // s["patch_size"], s["window_size"]
  total = 2 * side * side * s["patch_size"] ** 2 * s["in_chans"] * s["embed_dim"]
  sides, dims = [], []
  for stage, depth in enumerate(s["depths"]):
    dim = s["embed_dim"] * 2**stage
    padded = -(-side // window) * window
    tokens = padded * padded
    total += depth * (24 * tokens * dim**2 + 4 * tokens * window**2 * dim)
    sides.append(side)
    dims.append(dim)
    if stage < len(s["depths"]) - 1:
      side = -(-side // 2)
      total += 16 * side * side * dim**2
  f = s["fpn_channels"]
  for level in s["levels"]:
    tokens = sides[level] ** 2
    total += 2 * tokens * dims[level] * f + 18 * tokens * f * f
  finest = sides[s["levels"][0]] ** 2
  fused = f * (len(s["levels"]) if s["fusion"] == "concat" else 1)
  total += 18 * finest * fused * s["head_channels"] + 2 * finest * s["head_channels"] * s["num_classes"]
  return total


def host_batch(global_batch, size, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  masks = rng.integers(0, num_classes, (global_batch, size, size)).astype(np.int32)
  masks[:, :2] = IGNORE_INDEX  # a strip of unlabelled pixels, as rotated views and nodata give
  return rng.uniform(0, 1, (global_batch, size, size, 3)).astype(np.float32), masks


# ---------------------------------------------------------------------------------------------------------------
# jaxgeo
# ---------------------------------------------------------------------------------------------------------------


class JaxStep(dino_step.CompiledStep):
  """The jaxgeo segmentation state and compiled step, built as train/loop.py builds them."""

  def __init__(self, config, mesh, global_batch, *, augmentation=True):
    size = int(config.aug.size)
    source = types.SimpleNamespace(
      label_kind="segmentation",
      class_names=landcoverai.CLASSES,
      class_colors=landcoverai.CLASS_COLORS,
      class_weights=CLASS_WEIGHTS,
      ignore_index=IGNORE_INDEX,
      bands=("red", "green", "blue"),
      tile_size=size,
    )
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
    task = segment.make_task(
      config, steps_per_epoch=1000, total_steps=100_000, in_chans=3, mean=mean, std=std, mesh=mesh, source=source
    )
    shardings = self.init_state(_with_lr_scale(task.init), config, mesh)
    images, masks = host_batch(global_batch, size, len(CLASS_WEIGHTS))
    batch = {
      "image": images,
      "mask": masks,
      "index": np.arange(global_batch, dtype=np.int32),
      "valid": np.ones(global_batch, bool),
      "num_skipped": np.zeros(global_batch, np.int32),
    }
    self.batch = parallel.host_to_global(batch, mesh)
    views_given = types.SimpleNamespace(
      segmentation_views=lambda rng, images, masks, *args: (images, masks), normalize=augment.normalize
    )
    self.compile(task.step, shardings, mesh, swap=None if augmentation else (segment, "augment", views_given))


def _with_lr_scale(init):
  from jaxgeo.train import loop  # pylint: disable=g-import-not-at-top

  return loop.with_loop_fields(init)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------------------------


def torch_variant(shape, global_batch, flavour, *, warmup, steps, compile_backend, lr):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import torch_swin  # pylint: disable=g-import-not-at-top

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  model = torch_swin.SegmentationModel(
    shape["num_classes"],
    embed_dim=shape["embed_dim"],
    depths=tuple(shape["depths"]),
    num_heads=tuple(shape["num_heads"]),
    in_chans=shape["in_chans"],
    window=shape["window_size"],
    fpn_channels=shape["fpn_channels"],
    levels=tuple(shape["levels"]),
    fusion=shape["fusion"],
    head_channels=shape["head_channels"],
    stochastic_depth_prob=shape["drop_path_rate"],
  ).to(device)
  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=device == "cuda" and flavour == "compiled")
  weights = torch.tensor(CLASS_WEIGHTS, device=device)
  forward = torch.compile(model, backend=compile_backend) if flavour == "compiled" else model
  images, masks = host_batch(global_batch, shape["image_size"], shape["num_classes"])
  images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
  masks = torch.from_numpy(masks).long().to(device)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
      logits = forward(images)
    loss = F.cross_entropy(logits.float(), masks, weight=weights, ignore_index=IGNORE_INDEX, label_smoothing=0.1)
    loss.backward()
    optimizer.step()
    return loss

  return dino_step.time_torch(step, device, warmup=warmup, steps=steps)


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _free_torch_memory():
  import torch  # pylint: disable=g-import-not-at-top

  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def run_variants(args, mesh, info):
  global_batch = args.batch
  peak = report.peak_tflops(info["device_kind"], info["jax_backend"])
  config = load_config(args.smoke)
  shape = model_shape(config)
  flops = 3 * global_batch * segmentation_flops(shape)
  backend = args.torch_compile_backend or ("aot_eager" if args.smoke else "inductor")
  rows = []
  for name in args.variants:
    framework = "torch" if name.startswith("torch") else "jaxgeo"
    devices = 1 if framework == "torch" else mesh.size
    row = {
      "variant": name,
      "framework": framework,
      "global_batch": global_batch,
      "batch_per_device": global_batch // devices,
      "devices": devices,
      "image_size": shape["image_size"],
      "augmentation_in_step": name == "jaxgeo",
      "flops_per_step": flops,
    }
    if framework == "torch":
      row.update(
        precision="bf16 autocast, fp32 params" if info["gpu_available"] else "fp32 (CPU: no autocast)",
        torch_compile=backend if name == "torch_compiled" else None,
      )
    else:
      row["precision"] = f"params fp32, compute {jnp.dtype(vit.compute_dtype(config.model.dtype)).name}"
    with dino_step.errors_recorded(row):
      if framework == "torch":
        flavour = name.removeprefix("torch_")
        measured = torch_variant(
          shape,
          global_batch,
          flavour,
          warmup=args.warmup,
          steps=args.steps,
          compile_backend=backend,
          lr=config.optim.lr,
        )
        row.update(dino_step.torch_fields(measured, flops, global_batch, peak))
      else:
        step = JaxStep(config, mesh, global_batch, augmentation=name == "jaxgeo")
        row.update(dino_step.jax_fields(step, args, flops, global_batch, devices, peak, JAX_MEMORY_NOTE))
        del step
    rows.append(row)
    _print_row(row)
  return rows, shape


def ratios(rows):
  """jaxgeo images/s over torch images/s at the same global batch, measured in this run."""
  rate = {r["variant"]: r.get("images_per_s") for r in rows}
  return {
    f"{j} / {t}": rate[j] / rate[t]
    for j in ("jaxgeo", "jaxgeo_noaug")
    for t in ("torch_eager", "torch_compiled")
    if rate.get(j) and rate.get(t)
  }


def _print_row(row):
  if "error" in row:
    print(f"  {row['variant']:<16} ERROR {row['error'][:200]}", flush=True)
    return
  mem = row.get("peak_memory_bytes")
  print(
    f"  {row['variant']:<16} batch {row['global_batch']} on {row['devices']} device(s): {row['images_per_s']:8.2f} img/s, "
    f"step median {1e3 * row['step_time_s']['median']:8.1f} ms, {row['achieved_tflops']:.3f} TFLOP/s, "
    f"peak mem {'n/a' if mem is None else f'{mem / 2**30:.2f} GiB'}, compile {row['compile_s']:.2f} s",
    flush=True,
  )


ALL_VARIANTS = ("torch_eager", "torch_compiled", "jaxgeo", "jaxgeo_noaug")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=None, help="global batch (default 16; smoke 8)")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (configs/segment_landcoverai.py:smoke)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 3)")
  parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, >= 1 (default 3)")
  parser.add_argument("--devices", type=int, default=1, help="jax devices in the mesh (torch uses one; -1: all)")
  parser.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma-separated subset of {ALL_VARIANTS}")
  parser.add_argument("--torch_compile_backend", default=None, help="default inductor (smoke: aot_eager)")
  parser.add_argument("--full_opt", action="store_true", help="with --smoke: keep XLA's full CPU optimisation")
  parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/segment_step_<...>.json)")
  args = parser.parse_args(argv)
  args.variants = report.parse_variants(parser, args.variants, ALL_VARIANTS)
  args.batch = args.batch or (8 if args.smoke else 16)
  args.steps = args.steps or (3 if args.smoke else 20)
  args.warmup = max(1, args.warmup or 3)

  info = dino_step.machine()
  devices = jax.devices() if args.devices == -1 else jax.devices()[: args.devices]
  mesh = parallel.make_mesh(load_config(args.smoke).mesh, devices=devices)
  if args.batch % mesh.size:
    parser.error(f"--batch {args.batch} must be a multiple of the {mesh.size} jax devices")
  report.print_machine(info, mesh.size, FLOPS_FORMULA)
  rows, shape = run_variants(args, mesh, info)
  result = report.step_result(
    "segment_step",
    info,
    args,
    argv,
    model=shape,
    loss="cross-entropy, class weights, ignore_index 255, label smoothing 0.1; Adam, one update per step",
    inputs={
      "jaxgeo": "a fixed device batch of tiles + masks; joint augmentation inside the step (jaxgeo) or none "
      "(jaxgeo_noaug)",
      "torch": "ready-made NCHW tensors on the device (augmentation excluded, as jaxgeo_noaug)",
    },
    flops_formula=FLOPS_FORMULA,
    rows=rows,
    ratios=ratios(rows),
    ratios_note="images/s of a jaxgeo variant over a torch variant, same run, same global batch",
  )
  return report.write(result, args.out, "smoke" if args.smoke else "swinv2b", rows)


if __name__ == "__main__":
  sys.exit(main())
