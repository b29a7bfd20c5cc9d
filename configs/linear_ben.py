"""Linear probe of a frozen ViT on BigEarthNet-19 (multi-label, 19 classes): AP macro / micro / per class.

One command per row of the seed's table:
  python -m jaxgeo.main --config=configs/linear_ben.py --workdir=/tmp/probe_random          # random init
  python -m jaxgeo.main --config=configs/linear_ben.py --workdir=/tmp/probe_ben \
      --config.init.workdir=/tmp/dino                                         # a jaxgeo DINO run
  python -m jaxgeo.main --config=configs/linear_ben.py --workdir=/tmp/probe_in1k \
      --config.init.checkpoint=dino_deitsmall16_pretrain.pth                  # PyTorch DINO weights
Variants: `:smoke` (what the tests run, seconds) and `:demo` (pairs with dino_ben.py:demo's tiny ViT).
The fields are documented in jaxgeo/evaluate/linear.py.
"""

import ml_collections

from jaxgeo import config_utils
from jaxgeo.config_utils import base_config
from jaxgeo.evaluate.linear import probe_config


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, variant="full")
  config = base_config(method="linear")
  config.init.workdir = ml_collections.config_dict.placeholder(str)  # a jaxgeo pretraining run
  config.init.which = "teacher"

  config.model.arch = "small"
  config.model.patch_size = 16
  config.model.drop_path_rate = 0.0

  # ViT-S/16 as the reference: CLS of the last 4 blocks, 224 px, 100 epochs, SGD, lr swept.
  config.probe = probe_config()

  if arg.variant == "demo":
    # The backbone of dino_ben.py:demo (tiny ViT, 4 blocks, 64 px crops) on its synthetic data.
    config.data.synthetic_num_patches = 640
    config.data.worker_count = 0
    config.model.arch = "tiny"
    config.model.depth = 4
    config.probe.image_size = 64
    config.probe.epochs = 100  # as dino_ben.py:demo's final probe; 30 left the lr=1 head still improving
    config.probe.batch_size = 128
    config.probe.feature_batch_size = 64
  elif arg.variant == "smoke":
    config.data.synthetic_num_patches = 48
    config.data.worker_count = 0
    config.model.arch = "tiny"
    config.model.depth = 2
    config.model.embed_dim = 32
    config.model.num_heads = 2
    config.model.patch_size = 8
    config.probe.image_size = 32
    config.probe.n_last_blocks = 2
    config.probe.lrs = (0.01, 0.1)
    config.probe.epochs = 3
    config.probe.batch_size = 16
    config.probe.eval_every = 1
    config.probe.feature_batch_size = 16
  elif arg.variant != "full":
    raise ValueError(f"configs/linear_ben.py: unknown variant {arg.variant!r}; expected full, demo or smoke")
  return config
