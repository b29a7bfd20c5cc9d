"""MoCo v2 ResNet-50 pretraining on SEN12MS: the seed's sensor-pair positives (S2 query, S1 key of the same place,
each sensor through its own 1x1 band adapter), plain MoCo v2 and the fusion modes (jaxgeo/train/moco.py).

  python -m jaxgeo.main --config=configs/moco_sen12ms.py --workdir=runs/moco --config.data.root=/data/SEN12MS
  python -m jaxgeo.main --config=configs/moco_sen12ms.py:pairing=augment ...          # plain MoCo v2 on S2
  python -m jaxgeo.main --config=configs/moco_sen12ms.py:pairing=fusion_all ...       # or fusion_partial
  python -m jaxgeo.main --config=configs/moco_sen12ms.py:demo --workdir=/tmp/moco     # minutes on a laptop CPU
  python -m jaxgeo.main --config=configs/moco_sen12ms.py:smoke --workdir=/tmp/smoke   # what the tests run

`pairing=` also picks the bands the pairing reads (data.sensor s2, or s1s2 for fusion; data.pair_sensors for
sensor pairs); --config.moco.* overrides the rest (aug_set, adapter, freeze_adapters, swap_halves, ...).
The train list (data.train_list, default <root>/train_list.txt) is pretrained on whole but for the last
data.val_fraction, which the kNN monitor queries. Without data.root a synthetic SEN12MS is written and used.
"""

from jaxgeo import config_utils
from jaxgeo.config_utils import base_config
from jaxgeo.train.moco import PAIRINGS, moco_config, optim_config


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, variant="full", pairing="sensor")
  config_utils.check_choice("moco.pairing (configs/moco_sen12ms.py:pairing=...)", arg.pairing, PAIRINGS)
  config = base_config(method="moco", dataset="sen12ms")
  config_utils.sen12ms_resnet(config, arg.variant)  # the same data and backbone in both SEN12MS configs
  config.moco = moco_config()
  config.moco.pairing = arg.pairing
  config.optim = optim_config()
  config.init.which = ""  # sub-model of a plain PyTorch checkpoint; a MoCo checkpoint is read whole

  config.data.sensor = "s1s2" if arg.pairing.startswith("fusion") else "s2"
  config.data.pair_sensors = arg.pairing == "sensor"
  config.data.val_fraction = 0.01  # the seed pretrains on its whole list; 1 % is left for the kNN monitor

  # facebookresearch/moco v2: 200 epochs, batch 256 (the seed: 64 per GPU on 4 GPUs), lr 0.03, cosine.
  config.train.global_batch_size = 256
  config.train.epochs = 200
  config.train.log_every = 50
  config.train.checkpoint_every = 1000
  config.eval.knn_every = 2000
  config.eval.knn_batches = 8

  if arg.variant == "demo":
    # The synthetic data and backbone of configs/classify_sen12ms.py:demo, so a demo run initialises its
    # fine-tuning. Small numbers where the reference's assume 160k patches: a queue of 64 on ~500 training
    # patches, a faster key encoder (the MoCo Colab demo's 0.99). Measured here (kNN AP on held-out patches from
    # 0.602 at init): with a queue of 256 (half the data, so every query meets several overlapping patches of
    # its own scene as negatives) or an lr of 0.03, the loss rose after ~120 steps and the features faded back to
    # ~0.55-0.60; queue 64 with lr 0.015 trained steadily to 0.658.
    from jaxgeo.evaluate.linear import probe_config

    config.data.val_fraction = 0.2
    config.moco.image_size = 64
    config.moco.dim = 64
    config.moco.mlp_hidden = 256
    config.moco.queue_size = 64
    config.moco.momentum = 0.99
    config.moco.bn_group_size = 8
    config.optim.base_lr = 0.12  # 0.015 at batch 32 (see above)
    config.train.global_batch_size = 32
    config.train.epochs = 30
    config.train.log_every = 20
    config.train.checkpoint_every = 120
    config.eval.knn_every = 120
    config.eval.knn_batches = 8
    config.eval.final_probe = True
    config.probe = probe_config(image_size=64, epochs=100, batch_size=128, eval_every=5, feature_batch_size=64)
  elif arg.variant == "smoke":
    config.data.val_fraction = 0.2
    config.moco.image_size = 32
    config.moco.dim = 16
    config.moco.mlp_hidden = 32
    config.moco.queue_size = 64
    config.moco.bn_group_size = 8
    config.train.global_batch_size = 16
    config.train.epochs = 3
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.eval.knn_every = 3
    config.eval.knn_batches = 1
  elif arg.variant != "full":
    raise ValueError(f"configs/moco_sen12ms.py: unknown variant {arg.variant!r}; expected full, demo or smoke")
  return config
