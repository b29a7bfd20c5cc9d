"""Segmentation on your own tiles (RoboSat slippy maps, SageMaker folders, Label Maker), then whole-scene prediction.

  python -m jaxgeo.main --config=configs/segment_tiles.py --workdir=/tmp/buildings \
      --config.data.root=/data/robosat/dataset            # images/{z}/{x}/{y}.jpg + labels/{z}/{x}/{y}.png
  python -m jaxgeo.main --config=configs/segment_tiles.py:dataset=folders --workdir=/tmp/sm \
      --config.data.root=/data/sagemaker                  # train/ train_annotation/ validation/ ... label_map/
  python -m jaxgeo.main --config=configs/segment_tiles.py:dataset=labelmaker --workdir=/tmp/lm \
      --config.data.root=/data/label-maker/dest           # labels.npz + tiles/ + config.json
  python -m jaxgeo.main --config=configs/segment_tiles.py:demo --workdir=/tmp/tiles_demo     # CPU, minutes
  python -m jaxgeo.main --config=configs/segment_tiles.py:smoke --workdir=/tmp/tiles_smoke   # what tests run
  python -m jaxgeo.predict --checkpoint=/tmp/buildings --input=scene.tif --out=buildings.tif --polygons

The argument after the colon is `variant` (full | demo | smoke) and `dataset` (slippy | folders | labelmaker),
e.g. `:variant=demo,dataset=folders`. Without --config.data.root each layout is a synthetic copy written in its
real on-disk form (jaxgeo/data/synthetic_aerial.py).

The dataset's TOML of RoboSat (classes, colours, weights) lives in config.data:
  --config.data.class_names='("background", "parking")' --config.data.class_colors='((0,0,0), (255,165,0))'
  --config.data.class_weights='(1.6248, 5.762827)'      # None (default): RoboSat's `rs weights` scheme,
                                                        # 1 / ln(1.02 + p), computed from the train masks
Class 0 is background in all three tools. Tiles are 256 px (--config.data.tile_size for others, e.g. 512).

The recipe: RoboSat's (Adam 1e-4, horizontal flips and quarter turns, ENet class weights, whole 256 px tiles)
on a small SwinV2-T + FPN, trained with cross-entropy; one evaluation per epoch on the validation split, the best
checkpoint by mIoU kept (what predict.py then loads), early stopping after 10 epochs without gain, the learning
rate cut tenfold after 3. Start from pretrained weights with --config.init.checkpoint=swin_v2_t-b137f0e2.pth
(config.model.input_scaling="auto" feeds them the ImageNet-normalised input they were trained on).
"""

from jaxgeo import config_utils

DATASETS = ("slippy", "folders", "labelmaker")


def get_config(arg=None):
  from jaxgeo.data import augment  # pylint: disable=g-import-not-at-top
  from jaxgeo.train import segment  # pylint: disable=g-import-not-at-top

  arg = config_utils.parse_arg(arg, variant="full", dataset="slippy")
  config_utils.check_choice("dataset (configs/segment_tiles.py argument)", arg.dataset, DATASETS)
  # Every field train/segment.py reads (Adam 1e-4, ENet weights, cross-entropy); what RoboSat does otherwise below.
  config = segment.default_config(arg.dataset, arch="tiny")  # -1 classes / bands: the data's
  config.model.drop_path_rate = 0.1

  config.aug = augment.robosat(rgb=True)
  config.aug.size = 256  # = data.tile_size: whole tiles, as RoboSat trains
  config.loss.label_smoothing = 0.0
  # RoboSat's default loss is Lovasz: e.g. --config.loss.lovasz_weight=1.0 --config.loss.ce_weight=0.0

  config.train.global_batch_size = 16
  config.train.epochs = 50  # an upper bound: early stopping ends the run
  config.train.log_every = 50
  config.train.checkpoint_every = 500

  config.eval.every = -1  # once per epoch
  config.eval.split = "validation"
  config.eval.batch_size = 16
  config.eval.metric = "iou_macro"
  config.eval.mode = "max"
  config.eval.keep_best = True
  config.eval.patience = 10
  config.eval.plateau.factor = 0.1
  config.eval.plateau.patience = 3
  config.eval.plateau.threshold = 1e-4
  if arg.dataset == "slippy":
    config.data.test_fraction = 0.1  # the hash split keeps a test split (tile lists: data.test_tiles)
    config.eval.test_split = "test"
  elif arg.dataset == "folders":
    config.eval.test_split = ""  # SageMaker has train and validation channels only
  else:
    # As the synthetic folder's config.json splits; label-maker's default split_names are [train, test]: then pass
    # --config.eval.split=test --config.eval.test_split='' (or --config.data.split=hash).
    config.eval.test_split = "test"

  if arg.variant == "demo":
    # A 2-core CPU trains this in under 3 minutes on 96 synthetic zoom-18 tiles (37 cm pixels) and the buildings
    # it finds in a new scene (python -m jaxgeo.predict on write_synthetic_scene at 0.37 m) clearly beat the
    # all-background baseline. 128 px crops at the tiles' own resolution, a small SwinV2 (~1.2 M parameters).
    config.data.synthetic_grid = (12, 8)
    config.data.worker_count = 0
    config.model.embed_dim = 32
    config.model.depths = (2, 2, 2, 2)
    config.model.num_heads = (1, 2, 4, 8)
    config.model.window_size = 4  # 128 px crops: stage maps 32, 16, 8, 4, whole windows (train/segment.py)
    config.model.fpn_channels = 32
    config.model.head_channels = 32
    config.aug.size = 128
    config.aug.scale = (0.25, 0.25)  # a 128 px window of the 256 px tile at its own resolution
    # RoboSat's [weights] of its dataset TOML, set by hand: the ENet weights of 2 % building pixels (~19x the
    # background) made the model paint a building margin around every roof in this short run.
    config.data.class_weights = (1.0, 4.0)
    config.optim.lr = 1e-3
    config.optim.warmup_epochs = 1.0
    config.train.global_batch_size = 16
    config.train.epochs = 40  # 160 steps
    config.train.log_every = 20
    config.train.checkpoint_every = 80
    # ~80 training tiles make 4 steps an epoch: validation every 20 steps, and no plateau or early stop, which
    # would act on the noise of 11 validation tiles before the model has seen much.
    config.eval.every = 20
    config.eval.batch_size = 16
    config.eval.patience = 0
    config.eval.plateau.factor = 0.0
  elif arg.variant == "smoke":
    config.data.synthetic_grid = (4, 4)
    config.data.synthetic_zoom = 19
    config.data.val_fraction = 0.2
    config.data.test_fraction = 0.0
    config.data.worker_count = 0
    config.eval.test_split = ""
    config.model.embed_dim = 8
    config.model.depths = (1, 1)  # two stages: compiling is what a smoke run spends its time on
    config.model.num_heads = (1, 2)
    config.model.levels = (0, 1)
    config.model.window_size = 2  # 64 px crops: stage maps 16 and 8, whole windows
    config.model.fpn_channels = 8
    config.model.head_channels = 8
    config.aug.size = 64
    config.aug.scale = (1 / 16, 1 / 16)  # 64 px of the 256 px tile at its own resolution
    config.optim.lr = 1e-3
    config.train.global_batch_size = 8
    config.train.epochs = 2
    config.train.log_every = 1
    config.train.checkpoint_every = 4
    config.eval.batch_size = 8
  elif arg.variant != "full":
    raise ValueError(f"configs/segment_tiles.py: unknown variant {arg.variant!r}; expected full, demo or smoke")
  return config
