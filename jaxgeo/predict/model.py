"""The model a prediction runs, and how its input is made: from a jaxgeo run or a PyTorch checkpoint.

A `Predictor` is a pure `apply(params, images) -> logits` plus what training fixed about its input: the bands (in
order), the pixel scale (8-bit / 255, or / image_scale), the normalisation (mean / std per band), the classes and
their colours, and the window size it was trained at. `make_forward` turns it into one jitted function over a
batch split across every device, with optional D4 test-time augmentation.

Sources (`load_predictor`):
  a jaxgeo run folder   train/segment.load_run: the SegmentationModel of config.json, the state's "params" and
                        "input_stats" (the mean / std the model was fed) from best/ when the run kept one (the
                        best validation checkpoint), else the newest of checkpoints/; bands, image_scale, classes
                        and colours from dataset.json
  a PyTorch file        .pth / .pt / .safetensors through jaxgeo.bridge.segmentation_from_torch (torchvision Swin,
                        Satlas, or a jaxgeo export): the architecture and, when the file has a segmentation head,
                        the class count come from the tensors; the normalisation from the layout (Satlas: 0-1, no
                        mean / std; torchvision ImageNet: ImageNet mean / std); the bands are taken as red, green,
                        blue for 3-band files and band1..N otherwise. Each can be overridden (num_classes, bands,
                        mean, std, class_names, image_scale), and a file without a head needs num_classes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeo import parallel

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A segmentation model and its input contract. apply(params, images [B, H, W, bands] normalised float32) ->
  logits [B, H, W, classes]."""

  apply: Callable[[Any, jax.Array], jax.Array]
  params: Any
  bands: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  image_scale: float | None  # None: 8-bit imagery, / 255
  class_names: tuple[str, ...]
  class_colors: tuple[tuple[int, int, int], ...]
  window: int  # the tile size it was trained on: the default prediction window
  where: str  # what it was loaded from, for messages
  multiple: int = 1  # window sides must be multiples of it (the patch size)

  def __post_init__(self):
    n = len(self.bands)
    if len(self.mean) != n or len(self.std) != n:
      raise ValueError(f"{self.where}: {n} bands {self.bands} but {len(self.mean)} means and {len(self.std)} stds")
    if len(self.class_colors) != len(self.class_names):
      raise ValueError(f"{self.where}: {len(self.class_names)} classes but {len(self.class_colors)} colours")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def default_colors(num_classes: int) -> tuple[tuple[int, int, int], ...]:
  from jaxgeo.evaluate.plots import class_palette

  return tuple(tuple(int(round(255 * v)) for v in rgb) for rgb in class_palette(None, num_classes))


# ---------------------------------------------------------------------------------------------------------------
# A jaxgeo run
# ---------------------------------------------------------------------------------------------------------------


def load_run(run_dir: str) -> Predictor:
  """The Predictor of a jaxgeo segmentation run (see the module docstring)."""
  from jaxgeo import workdir
  from jaxgeo.train import segment

  run_dir = os.path.abspath(os.path.expanduser(run_dir))
  model, params, info = segment.load_run(run_dir)
  if info.get("label_kind") != "segmentation":
    raise ValueError(f"{run_dir}: dataset.json has label_kind {info.get('label_kind')!r}; expected 'segmentation'")
  config = workdir.load_config(run_dir)
  class_names = tuple(info["class_names"])
  colors = info.get("class_colors") or default_colors(len(class_names))
  stats = info["input_stats"]  # what the model was fed (pretrained weights' own statistics), not dataset.json's
  return Predictor(
    apply=lambda p, images: model.apply({"params": p}, images, train=False),
    params=jax.tree.map(np.asarray, params),
    bands=tuple(info["bands"]),
    mean=tuple(float(v) for v in np.ravel(stats["mean"])),
    std=tuple(float(v) for v in np.ravel(stats["std"])),
    image_scale=info.get("image_scale"),
    class_names=class_names,
    class_colors=tuple(tuple(int(v) for v in c) for c in colors),
    window=int(config.data.get("tile_size", 256)),
    multiple=model.patch_size,
    where=f"{run_dir} (step {info['step']})",
  )


# ---------------------------------------------------------------------------------------------------------------
# A PyTorch checkpoint
# ---------------------------------------------------------------------------------------------------------------


def load_torch(
  path: str,
  *,
  num_classes: int | None = None,
  bands: Sequence[str] | None = None,
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
  class_names: Sequence[str] | None = None,
  image_scale: float | None = None,
  input_scaling: str | None = None,
  window: int = 256,
) -> Predictor:
  """The Predictor of a PyTorch segmentation checkpoint; see the module docstring for what is inferred."""
  from jaxgeo.bridge.swin import segmentation_from_torch

  in_chans = len(bands) if bands else None
  model, variables, info = segmentation_from_torch(
    path, num_classes=num_classes, in_chans=in_chans, input_scaling=input_scaling
  )
  channels = info["in_chans"]
  if bands is None:
    bands = ("red", "green", "blue") if channels == 3 else tuple(f"band{i + 1}" for i in range(channels))
  scaling = info["input_scaling"]
  if scaling.get("guessed") and (mean is None or std is None):
    log.warning(
      "%s: the file does not say how its input was scaled; assuming %s (%s). Pass --input-scaling unit|imagenet "
      "or --mean/--std if it was trained otherwise",
      path,
      scaling["kind"],
      scaling["note"],
    )
  mean = tuple(mean) if mean is not None else scaling["mean"]
  std = tuple(std) if std is not None else scaling["std"]
  names = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(model.num_classes))
  if len(names) != model.num_classes:
    raise ValueError(f"--class-names: {len(names)} names for the {model.num_classes} classes of {path}")
  return Predictor(
    apply=lambda p, images: model.apply({"params": p}, images, train=False),
    params=jax.tree.map(np.asarray, variables["params"]),
    multiple=model.patch_size,
    bands=tuple(bands),
    mean=tuple(float(v) for v in mean),
    std=tuple(float(v) for v in std),
    image_scale=image_scale,
    class_names=names,
    class_colors=default_colors(len(names)),
    window=window,
    where=path,
  )


def load_predictor(checkpoint: str, **torch_options) -> Predictor:
  """A run folder (load_run) or a PyTorch file (load_torch with torch_options)."""
  path = os.path.expanduser(checkpoint)
  if os.path.isdir(path):
    if any(value is not None for value in torch_options.values()):
      given = sorted(k for k, v in torch_options.items() if v is not None)
      raise ValueError(f"{path} is a jaxgeo run, which records its own {given}; drop those options")
    return load_run(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--checkpoint={checkpoint}: no such run folder or file")
  if not path.lower().endswith(TORCH_SUFFIXES):
    raise ValueError(f"--checkpoint={checkpoint}: expected a jaxgeo run folder or a PyTorch file {TORCH_SUFFIXES}")
  return load_torch(path, **{k: v for k, v in torch_options.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------------
# The jitted forward
# ---------------------------------------------------------------------------------------------------------------


def d4_views(images):
  """The 8 symmetries of the square (4 quarter turns, each plain and mirrored) stacked on the batch axis."""
  mirrored = images[:, :, ::-1]
  return jnp.concatenate([jnp.rot90(x, k, axes=(1, 2)) for x in (images, mirrored) for k in range(4)], axis=0)


def d4_mean(outputs, batch: int):
  """Undo d4_views on [8 * B, H, W, C] outputs and average them -> [B, H, W, C]."""
  views = outputs.reshape((8, batch) + outputs.shape[1:])
  back = [jnp.rot90(views[i], -(i % 4), axes=(1, 2)) for i in range(8)]
  back = [view if i < 4 else view[:, :, ::-1] for i, view in enumerate(back)]
  return sum(back) / 8


def make_forward(predictor: Predictor, mesh, tta: bool = False):
  """pixels [B, H, W, bands] (the file's dtype; B a multiple of mesh.size) -> class probabilities [B, H, W, C]
  float32, scaled and normalised as in training, jitted with the batch split over every device of `mesh`."""
  scale = np.float32(predictor.image_scale or 255.0)
  mean, std = np.asarray(predictor.mean, np.float32), np.asarray(predictor.std, np.float32)
  params = jax.device_put(predictor.params, parallel.replicated(mesh))
  batch_sharding = parallel.batch_sharding(mesh, 4)

  def forward(params, pixels):
    images = (pixels.astype(jnp.float32) / scale - mean) / std
    if tta:
      if images.shape[1] != images.shape[2]:
        raise ValueError(f"test-time augmentation turns windows: they must be square, got {images.shape[1:3]}")
      logits = predictor.apply(params, d4_views(images))
      return d4_mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), images.shape[0])
    return jax.nn.softmax(predictor.apply(params, images).astype(jnp.float32), axis=-1)

  compiled = jax.jit(forward, in_shardings=(parallel.replicated(mesh), batch_sharding), out_shardings=batch_sharding)
  return lambda pixels: compiled(params, jax.device_put(pixels, batch_sharding))


def prediction_mesh():
  """Every local device on the batch axis (prediction is one process: each host predicts its own scenes)."""
  import ml_collections

  return parallel.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
