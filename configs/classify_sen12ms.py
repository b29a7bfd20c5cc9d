"""SEN12MS scene classification with a ResNet-50: the seed's fine-tuning protocol (jaxgeo/train/classify.py).

One command per cell of the seed's table (rows = model / pretraining, columns = S1, S2, S1+S2):
  python -m jaxgeo.main --config=configs/classify_sen12ms.py --workdir=runs/sup_s2 \
      --config.data.root=/data/SEN12MS \
      --config.data.train_list=/data/SEN12MS/splits/train_list_1024.pkl \
      --config.data.test_list=/data/SEN12MS/splits/test_list.pkl \
      --config.data.sensor=s2                    # s1 | s2 | s1s2
      --config.data.label_type=single            # single (IGBP argmax) | multi (fraction >= data.threshold)
      --config.data.label_scheme=10              # 10 (simplified IGBP) | 17
      --config.classify.model=adapter            # supervised (conv1 for N bands) | adapter (1x1 conv N -> 3)
      --config.init.workdir=runs/moco            # a jaxgeo MoCo run (or --config.init.checkpoint=file.pth)
      --config.init.adapter=random               # with model=adapter: the run's adapter (pretrained) or a new one
      --config.classify.mode=linear              # frozen backbone, only the FC trained
      --config.optim.lr_step_size=25             # StepLR every 25 epochs (x optim.lr_step_gamma)
  python -m jaxgeo.evaluate.table runs/* --out=runs/table

The train list's first 80 % train, the last 20 % validate (data.val_fraction); the checkpoint with the best
validation micro-F1 (checked every epoch) is scored on data.test_list into <workdir>/results.json.
Variants: `:smoke` (what the tests run, seconds) and `:demo` (launch/sen12ms_table_demo.py, minutes on a CPU).
"""

import ml_collections

from jaxgeo import config_utils
from jaxgeo.config_utils import base_config
from jaxgeo.train.classify import classify_config, optim_config


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, variant="full")
  config = base_config(method="classify", dataset="sen12ms")
  config_utils.sen12ms_resnet(config, arg.variant)  # the same data and backbone in both SEN12MS configs
  config.classify = classify_config()
  config.optim = optim_config()
  config.init.workdir = ml_collections.config_dict.placeholder(str)  # a jaxgeo MoCo run
  config.init.which = ""  # sub-model of a PyTorch checkpoint ("": the MoCo query encoder where there is one)
  config.init.adapter = "pretrained"  # with classify.model=adapter: the pretrained band adapter, or "random"

  config.data.sensor = "s2"
  config.data.label_type = "multi"
  config.data.label_scheme = 10
  config.data.threshold = 0.1
  config.data.val_fraction = 0.2

  config.train.global_batch_size = 64
  config.train.epochs = 100
  config.train.log_every = 10
  config.train.checkpoint_every = 500
  config.train.keep_checkpoints = 2

  config.eval.every = -1  # every epoch, as the seed
  config.eval.metric = "f1_micro"
  config.eval.mode = "max"
  config.eval.keep_best = True
  config.eval.test_split = "test"

  if arg.variant == "demo":
    # A small ResNet on small synthetic patches: the data and backbone of configs/moco_sen12ms.py:demo, so its run
    # initialises this one. launch/sen12ms_table_demo.py points data.train_list at the synthetic 1k-like subset.
    config.train.global_batch_size = 16
    config.train.epochs = 30
    config.train.log_every = 20
    config.train.checkpoint_every = 200
  elif arg.variant == "smoke":
    # The synthetic data and backbone of configs/moco_sen12ms.py:smoke, so its run initialises this one.
    config.train.global_batch_size = 8
    config.train.epochs = 2
    config.train.log_every = 1
    config.train.checkpoint_every = 4
  elif arg.variant != "full":
    raise ValueError(f"configs/classify_sen12ms.py: unknown variant {arg.variant!r}; expected full, demo or smoke")
  return config
