"""MoCo v2 training-step throughput: jaxgeo (train/moco.py) against PyTorch main_moco (eager AMP, torch.compile).

  python benchmarks/moco_step.py --out benchmarks/results/h100_moco_r50_b256.json     # the paper setting
  python benchmarks/moco_step.py --smoke --out /tmp/moco_step_smoke.json             # tiny shapes, CPU, seconds

Setting (default): ResNet-50 at 224 px, MoCo v2 MLP head 2048-2048-128, global batch 256, queue 65536, T 0.2,
SGD momentum 0.9 + weight decay, shuffle BN. Variants:
  jaxgeo_augment         the real jaxgeo step (configs/moco_sen12ms.py, moco.make_task, jitted with the loop's
                         shardings), plain MoCo v2 on a 3-band image: two views drawn INSIDE the step from 256-px
                         patches, BatchNorm in groups of 64 (the reference's 4 GPUs x 64)
  jaxgeo_augment_noaug   the same step fed ready-made 224-px views (augmentation excluded): apples to apples
  jaxgeo_sensor          the seed's method: S2 (10 bands) and S1 (2 bands) 256-px patches, a view of each drawn in
                         the step, a 1x1 band adapter per sensor, the half-batch swap
  torch_eager            benchmarks/torch_moco.py as main_moco: fp16 autocast + GradScaler, channels_last, eager
  torch_compiled         the same with both encoders under torch.compile and foreach updates
PyTorch runs one process standing for one reference GPU with the whole batch (main_moco's shuffle with a world of
one; BatchNorm over the batch) and is fed ready-made views, as its loader workers would. Helpers (machine
description, timing, summaries, ratios) are benchmarks/dino_step.py's, the printed and written report
benchmarks/report.py's. No GPU number is ever estimated.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dino_step  # noqa: E402  first: it sets XLA_FLAGS for --smoke before jax starts
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import report  # noqa: E402

from jaxgeo import parallel  # noqa: E402
from jaxgeo.data import sen12ms  # noqa: E402
from jaxgeo.models.vit import compute_dtype  # noqa: E402
from jaxgeo.train import loop, moco  # noqa: E402

REPO = dino_step.REPO
ALL_VARIANTS = ("torch_eager", "torch_compiled", "jaxgeo_augment", "jaxgeo_augment_noaug", "jaxgeo_sensor")
SMOKE_VARIANTS = ("torch_eager", "torch_compiled", "jaxgeo_augment_noaug", "jaxgeo_sensor")
RGB = "B04,B03,B02"  # SEN12MS true colour in DN: the 3-band input of the plain MoCo variants
JAX_MEMORY_NOTE = "jax peak_bytes_in_use is the process's peak so far (earlier jax variants included)"
FLOPS_FORMULA = (
  "flops_per_step = B * (3 * F_enc + F_enc) + 3 * 2 * B * (K + 1) * d (+ 3 * F_adapters for jaxgeo_sensor): query "
  "forward + backward (3x) and key forward (1x) of F_enc = F_resnet(S) + 2 * (2048 * H + H * d), the logits against "
  "K + 1 keys (forward + backward); F_resnet counts every convolution, 2 * h_out * w_out * k^2 * C_in * C_out; "
  "F_adapters = 2 * S^2 * (10 + 2) * 3; matmul / conv FLOPs only (BatchNorm, ReLU, pooling, loss, optimizer, "
  "augmentation not counted); B global batch, S crop size, H MLP hidden, d embedding dim, K queue size"
)


def load_moco_config(smoke, pairing):
  import importlib.util

  spec = importlib.util.spec_from_file_location("moco_sen12ms", os.path.join(REPO, "configs", "moco_sen12ms.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"{'smoke' if smoke else 'full'},pairing={pairing}")
  if pairing == "augment":
    config.data.sensor = RGB
  return config


def resnet_flops(size, in_chans, width, stages):
  """Convolution FLOPs of one ResNet forward at size x size (torchvision's v1.5 strides and paddings)."""
  conv = lambda h, k, cin, cout: 2 * h * h * k * k * cin * cout  # noqa: E731
  h = (size + 6 - 7) // 2 + 1
  flops, inplanes = conv(h, 7, in_chans, width), width
  h = (h + 2 - 3) // 2 + 1
  for stage, blocks in enumerate(stages, start=1):
    planes = width * 2 ** (stage - 1)
    for index in range(blocks):
      stride = 2 if stage > 1 and index == 0 else 1
      out = (h + 2 - 3) // stride + 1
      flops += conv(h, 1, inplanes, planes) + conv(out, 3, planes, planes) + conv(out, 1, planes, 4 * planes)
      if stride != 1 or inplanes != 4 * planes:
        flops += conv(out, 1, inplanes, 4 * planes)
      h, inplanes = out, 4 * planes
  return flops


def model_shape(config, in_chans):
  m = config.moco
  return {
    "arch": "resnet50",
    "stages": list(config.model.stages),
    "width": config.model.width,
    "in_chans": in_chans,
    "image_size": m.image_size,
    "dim": m.dim,
    "mlp_hidden": m.mlp_hidden,
    "queue_size": m.queue_size,
    "temperature": m.temperature,
    "bn_group_size": m.bn_group_size,
  }


def step_flops(shape, global_batch, adapters=False):
  s = shape
  features = 32 * s["width"]
  encoder = resnet_flops(s["image_size"], 3 if adapters else s["in_chans"], s["width"], s["stages"])
  encoder += 2 * (features * s["mlp_hidden"] + s["mlp_hidden"] * s["dim"])
  flops = global_batch * 4 * encoder + 3 * 2 * global_batch * (s["queue_size"] + 1) * s["dim"]
  if adapters:
    flops += 3 * global_batch * 2 * s["image_size"] ** 2 * (10 + 2) * 3
  return flops


# ---------------------------------------------------------------------------------------------------------------
# jaxgeo
# ---------------------------------------------------------------------------------------------------------------


class JaxMocoStep(dino_step.CompiledStep):
  """The jaxgeo MoCo state + compiled step, built as train/loop.py builds them, on a fixed device batch.

  augmentation=False compiles the same step with the views replaced by "the batch already holds the views".
  """

  def __init__(self, config, mesh, *, augmentation=True, patch_size=256):
    sensor = config.moco.pairing == "sensor"
    bands = sen12ms.resolve_bands(config.data.sensor)
    stats = {"image": sen12ms.normalization_stats(bands)}
    if sensor:
      stats.update(s1=sen12ms.normalization_stats(sen12ms.S1_BANDS), s2=sen12ms.normalization_stats(bands))
    source = types.SimpleNamespace(bands=bands, norm_stats=stats)
    task = moco.make_task(
      config,
      steps_per_epoch=1000,
      total_steps=200_000,
      in_chans=len(bands),
      mean=stats["image"][0],
      std=stats["image"][1],
      mesh=mesh,
      source=source,
    )
    shardings = self.init_state(loop.with_loop_fields(task.init), config, mesh)
    global_batch = config.train.global_batch_size
    host = np.random.default_rng(0)
    size = patch_size if augmentation else config.moco.image_size
    dn = lambda c: host.uniform(500, 3000, (global_batch, size, size, c)).astype(np.float32)  # noqa: E731
    batch = {"image": dn(len(bands)), "num_skipped": np.zeros((global_batch,), np.int32)}
    if sensor:
      batch.update(s2=batch["image"], s1=host.uniform(-25, 0, (global_batch, size, size, 2)).astype(np.float32))
    self.batch = parallel.host_to_global(batch, mesh)  # laid out as the loop lays out its batches
    # Two distinct ready-made views: the batch and its mirror image.
    views_given = lambda rng, images, offsets, recipe, size, n: jnp.stack([images, images[:, :, ::-1]][:n])
    self.compile(
      loop._carry_loop_fields(task.step),  # noqa: SLF001  exactly what the loop jits
      shardings,
      mesh,
      swap=None if augmentation else (moco, "_views", views_given),
    )


# ---------------------------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------------------------


def torch_variant(config, batch, flavour, *, warmup, steps, compile_backend):
  import torch
  import torch_moco

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  m = config.moco
  trainer = torch_moco.MoCoTrainer(
    flavour=flavour,
    device=device,
    width=config.model.width,
    stages=tuple(config.model.stages),
    dim=m.dim,
    mlp_hidden=m.mlp_hidden,
    queue_size=m.queue_size,
    momentum=m.momentum,
    temperature=m.temperature,
    lr=config.optim.base_lr * batch / 256,
    weight_decay=config.optim.weight_decay,
    compile_backend=compile_backend,
  )
  views = [torch.randn(batch, 3, m.image_size, m.image_size, device=device) for _ in range(2)]
  measured = dino_step.time_torch(functools.partial(trainer.step, *views), device, warmup=warmup, steps=steps)
  del trainer, views
  if device == "cuda":
    torch.cuda.empty_cache()
  return measured


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def benchmark(args, mesh, info):
  global_batch = args.batch or (16 if args.smoke else 256)
  peak = report.peak_tflops(info["device_kind"], info["jax_backend"])
  backend = args.torch_compile_backend or ("aot_eager" if args.smoke else "inductor")
  rows, shape = [], None
  for name in args.variants:
    pairing = "sensor" if name == "jaxgeo_sensor" else "augment"
    config = load_moco_config(args.smoke, pairing)
    config.train.global_batch_size = global_batch
    shape = model_shape(config, 3)
    torch_row = name.startswith("torch")
    devices = 1 if torch_row else mesh.size
    flops = step_flops(shape, global_batch, adapters=pairing == "sensor")
    row = {
      "variant": name,
      "framework": "torch" if torch_row else "jaxgeo",
      "batch_per_device": global_batch // devices,
      "global_batch": global_batch,
      "devices": devices,
      "augmentation_in_step": name in ("jaxgeo_augment", "jaxgeo_sensor"),
      "flops_per_step": flops,
    }
    with dino_step.errors_recorded(row):
      if torch_row:
        flavour = name.split("_", 1)[1]
        row.update(
          precision="fp16 autocast + GradScaler, channels_last" if info["gpu_available"] else "fp32 (CPU: no autocast)",
          torch_compile=backend if flavour == "compiled" else None,
          batchnorm="one group: the whole batch (main_moco on one GPU)",
        )
        measured = torch_variant(
          config, global_batch, flavour, warmup=args.warmup, steps=args.steps, compile_backend=backend
        )
        row.update(dino_step.torch_fields(measured, flops, global_batch, peak))
      else:
        row.update(
          pairing=pairing,
          precision=f"params fp32, compute {jnp.dtype(compute_dtype(config.model.dtype)).name}",
          batchnorm=f"groups of {config.moco.bn_group_size} (shuffle BN as {global_batch // config.moco.bn_group_size} "
          "reference GPUs)",
        )
        step = JaxMocoStep(config, mesh, augmentation=name != "jaxgeo_augment_noaug")
        row.update(dino_step.jax_fields(step, args, flops, global_batch, devices, peak, JAX_MEMORY_NOTE))
        del step
    rows.append(row)
    dino_step._print_row(row)  # noqa: SLF001
  return rows, shape


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (configs/moco_sen12ms.py:smoke), CPU")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default 256; smoke 16)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 3)")
  parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, >= 1 (default 3; smoke 1)")
  parser.add_argument("--devices", type=int, default=1, help="jax devices in the mesh (torch uses one; -1: all)")
  parser.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(ALL_VARIANTS)}")
  parser.add_argument("--torch_compile_backend", default=None, help="default inductor (smoke: aot_eager)")
  parser.add_argument("--full_opt", action="store_true", help="with --smoke: keep XLA's full CPU optimisation")
  parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/moco_step_<...>.json)")
  args = parser.parse_args(argv)
  default = SMOKE_VARIANTS if args.smoke else ALL_VARIANTS
  args.variants = report.parse_variants(parser, args.variants or ",".join(default), ALL_VARIANTS)
  args.steps = args.steps or (3 if args.smoke else 20)
  args.warmup = max(1, args.warmup or (1 if args.smoke else 3))

  info = dino_step.machine()
  devices = jax.devices() if args.devices == -1 else jax.devices()[: args.devices]
  mesh = parallel.make_mesh(types.SimpleNamespace(data=-1, fsdp=1), devices=devices)
  report.print_machine(info, mesh.size, FLOPS_FORMULA, cpu_model=False)
  rows, shape = benchmark(args, mesh, info)
  result = report.step_result(
    "moco_step",
    info,
    args,
    argv,
    model=shape,
    inputs={
      "jaxgeo_augment, jaxgeo_sensor": "a fixed device batch of raw 256-px patches (DN / dB); views drawn in the step",
      "jaxgeo_augment_noaug": "ready-made views of the crop size (augmentation excluded)",
      "torch": "ready-made views of the crop size on the device (augmentation excluded)",
    },
    flops_formula=FLOPS_FORMULA,
    rows=rows,
    ratios=dino_step.ratios(rows),
    ratios_note="images/s per device of a jaxgeo variant over a torch variant, same run, same batch per device",
  )
  return report.write(result, args.out, "smoke" if args.smoke else "r50", rows)


if __name__ == "__main__":
  sys.exit(main())
