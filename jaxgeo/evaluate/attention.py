"""Self-attention maps: the last block's CLS attention per head, overlaid on the patch (DINO's visualisation).

  python -m jaxgeo.evaluate.attention --checkpoint=/tmp/dino --patch=BigEarthNet-v1.0/S2A_..._26_57 \
      --out=attention.png [--config=configs/linear_ben.py:variant=... --config.data.bands=all]

--patch is a BigEarthNet patch folder (one GeoTIFF per band) or one multi-band GeoTIFF whose bands are, in
order, the config's data.bands. Pixels are scaled exactly as the data pipeline scales them, resized to
config.probe.image_size and normalised, so the backbone sees what it sees during evaluation. --checkpoint is
a jaxgeo run folder or a PyTorch DINO checkpoint (no flag: the config's init, else random weights).
The figure: the true-colour image, then one panel per head and their mean, each map upsampled (nearest) to
the image and drawn over it.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import rasterio
from absl import app, flags

from jaxgeo.data import augment, bigearthnet
from jaxgeo.evaluate import backbone, plots

plt = plots.plt


def read_patch(path, bands):
  """(model input [H, W, C] scaled as BigEarthNetSource, true-colour picture [H, W, 3] in [0, 1])."""
  names = bigearthnet.resolve_bands(bands)
  rgb_input = isinstance(bands, str) and bands == "rgb"
  if os.path.isdir(path):
    # The training reader's own band reading and resampling (nodata policy, accepted dtypes and sizes), so the
    # map shows what the model saw.
    patch = os.path.basename(os.path.normpath(path))

    def stack(names):
      bands = [bigearthnet.read_s2_band(os.path.join(path, f"{patch}_{name}.tif"), name) for name in names]
      return bigearthnet.bands_to_image(bands, bigearthnet.PATCH_SIZE, rgb=False) * 10000.0  # back to DN

    reflectance = stack(names)
    picture = stack(bigearthnet.RGB_BANDS) / 2000.0
  else:
    with rasterio.open(path) as src:
      reflectance = np.moveaxis(src.read(), 0, -1).astype(np.float32)
    if reflectance.shape[-1] != len(names):
      raise ValueError(
        f"{path}: {reflectance.shape[-1]} bands, but config.data.bands={bands!r} needs "
        f"{len(names)} ({', '.join(names)}) in that order"
      )
    rgb_index = [names.index(b) for b in bigearthnet.RGB_BANDS if b in names]
    picture = reflectance[..., rgb_index] if len(rgb_index) == 3 else reflectance[..., :1].repeat(3, -1)
    picture = picture / 2000.0
  image = bigearthnet.scale_reflectance(reflectance, rgb_input)
  return image, np.clip(picture, 0.0, 1.0).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _last_selfattention(model, params, images):
  return model.apply({"params": params}, images, method=model.get_last_selfattention)


def cls_attention(model, params, image, *, mean, std, image_size):
  """[heads, h, w] attention of the CLS token to each patch in the last block, for one image [H, W, C]."""
  images = augment.normalize(augment.center_resize(jnp.asarray(image)[None], image_size), mean, std)
  attention = _last_selfattention(model, params, images)
  grid = image_size // model.patch_size
  return np.asarray(attention[0, :, 0, 1:]).reshape(-1, grid, grid)


def render(picture, maps, path, title=""):
  """Grid of the picture, each head's map over it, and the head mean; returns path."""
  panels = [("image", None)] + [(f"head {i}", m) for i, m in enumerate(maps)] + [("mean", maps.mean(0))]
  cols = min(len(panels), 4)
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.4), squeeze=False)
  height, width = picture.shape[:2]
  for ax, (name, attention_map) in zip(axes.flat, panels):
    ax.imshow(picture, extent=(0, width, height, 0))
    if attention_map is not None:
      # Each head's own range: heads differ in sharpness, and a shared scale would blank the diffuse ones.
      ax.imshow(attention_map, cmap="inferno", alpha=0.6, interpolation="nearest", extent=(0, width, height, 0))
    ax.set_title(name, fontsize=9)
  for ax in axes.flat:
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def attention_figure(config, patch, out):
  """Loads the backbone of `config` (init/model/data/probe.image_size), reads `patch`, writes the PNG."""
  image, picture = read_patch(patch, config.data.bands)
  mean, std = bigearthnet.normalization_stats(config.data.bands)
  model, params, description = backbone.load_backbone(config, image.shape[-1], config.probe.image_size)
  maps = cls_attention(model, params, image, mean=mean, std=std, image_size=config.probe.image_size)
  return render(picture, maps, out, title=f"{os.path.basename(os.path.normpath(patch))} · {description}")


def main(argv):
  del argv
  config = backbone.set_checkpoint(_CONFIG.value, _CHECKPOINT.value)
  print(attention_figure(config, _PATCH.value, _OUT.value))


if __name__ == "__main__":
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
    "config", backbone.default_config_path(), "evaluation config (model, data.bands, init, probe.image_size)"
  )
  _CHECKPOINT = flags.DEFINE_string("checkpoint", "", "jaxgeo run folder or PyTorch DINO checkpoint")
  _PATCH = flags.DEFINE_string("patch", None, "BigEarthNet patch folder or multi-band GeoTIFF", required=True)
  _OUT = flags.DEFINE_string("out", "attention.png", "output PNG")
  from jaxgeo.logs import quiet_library_logs

  quiet_library_logs()
  app.run(main)
