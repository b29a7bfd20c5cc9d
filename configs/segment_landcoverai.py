"""SwinV2-B + FPN land-cover segmentation on LandCover.ai (buildings, woodland, water, roads; 512 px tiles).

  python -m jaxgeo.main --config=configs/segment_landcoverai.py --workdir=/tmp/lcai \
      --config.data.root=/data/landcover.ai.v1 --config.init.checkpoint=/weights/swin_v2_b-781e5279.pth
  python -m jaxgeo.main --config=configs/segment_landcoverai.py:demo --workdir=/tmp/lcai_demo   # CPU, minutes
  python -m jaxgeo.main --config=configs/segment_landcoverai.py:smoke --workdir=/tmp/lcai_smoke # what tests run

The recipe (a team's PyTorch fine-tuning, done right): SwinV2-B, an FPN of 128 channels over all four stages
(their code tapped one level), a light conv head; cross-entropy with class weights and label smoothing 0.1;
Adam with ReduceLROnPlateau on validation mIoU, gradients of 2 steps accumulated; one evaluation per epoch,
the best checkpoint by validation mIoU, early stopping after 10 epochs without improvement, and the test split
evaluated with the best checkpoint at the end (<workdir>/results.json, <workdir>/test/*.png).
Without --config.data.root a synthetic LandCover.ai (real layout: GeoTIFF orthophotos, masks, split files) is
used. config.init.checkpoint takes torchvision's swin_v2_b weights, a Satlas SwinV2-B checkpoint or a jaxgeo
segmentation run folder; config.model.input_scaling="auto" feeds each the inputs it was trained on.
"""

from jaxgeo import config_utils


def get_config(arg=None):
  from jaxgeo.train import segment  # pylint: disable=g-import-not-at-top

  arg = config_utils.parse_arg(arg, variant="full")
  # Every field train/segment.py reads, at this recipe's values; set again below where they define the recipe.
  config = segment.default_config("landcoverai", arch="base")

  # SwinV2-B; torchvision trains it with stochastic depth 0.5 on ImageNet, fine-tuning for segmentation uses
  # less (Swin's UperNet recipes: 0.3). The FPN takes all four stages; num_classes / in_chans follow the data.
  config.model.drop_path_rate = 0.3
  config.model.fpn_channels = 128
  config.model.levels = (0, 1, 2, 3)
  config.model.head_channels = 128
  config.model.input_scaling = "auto"  # what config.init.checkpoint's weights were trained on (train/segment.py)

  # augment.landcoverai: flips, quarter turns, mild colour jitter; whole 512 px tiles.
  config.aug.size = 512

  config.loss.label_smoothing = 0.1
  # Used when data.class_weights is None: "enet" = RoboSat's 1 / ln(1.02 + p), bounded at 50.5. LandCover.ai's
  # buildings are ~1% of pixels: inverse frequency would weight them ~70x the background, ENet ~16x.
  config.loss.weighting = "enet"

  config.optim.name = "adam"
  config.optim.lr = 1e-4
  config.optim.accumulate = 2  # steps whose gradients are averaged into one update

  config.train.global_batch_size = 8  # x accumulate 2 = 16 tiles per update
  config.train.epochs = 100  # an upper bound: early stopping ends the run
  config.train.log_every = 50
  config.train.checkpoint_every = 500

  config.eval.every = -1  # once per epoch
  config.eval.batch_size = 16
  config.eval.metric = "iou_macro"  # mIoU
  config.eval.keep_best = True
  config.eval.patience = 10  # evaluations = epochs
  config.eval.test_split = "test"
  # torch's ReduceLROnPlateau(mode="max", factor=0.1); its default patience of 10 would never act before the
  # early stop at 10 epochs, so the learning rate drops after 3 epochs without a relative gain of 1e-4.
  config.eval.plateau.factor = 0.1
  config.eval.plateau.patience = 3
  config.eval.plateau.threshold = 1e-4

  if arg.variant == "demo":
    # A 2-core CPU trains this in a few minutes; the test mIoU clearly beats the majority-class baseline
    # (both printed at the end and kept in results.json). Tiles of 128 px from the synthetic orthophotos,
    # 64 px random crops, a small SwinV2 (about 1.2 M parameters).
    config.data.tile_size = 128
    config.data.worker_count = 0
    config.model.arch = "tiny"
    config.model.embed_dim = 32
    config.model.depths = (2, 2, 2)
    config.model.num_heads = (1, 2, 4)
    config.model.window_size = 4  # stage maps 16, 8, 4 of a crop: no window padding (train/segment.py)
    config.model.levels = (0, 1, 2)
    config.model.drop_path_rate = 0.1
    config.model.fpn_channels = 32
    config.model.head_channels = 32
    config.aug.size = 64
    config.aug.scale = (0.25, 0.25)  # a 64 px window of the 128 px tile at its own resolution
    config.optim.lr = 1e-3
    config.optim.warmup_epochs = 1.0
    config.train.global_batch_size = 16
    config.train.epochs = 8
    config.train.log_every = 10
    config.train.checkpoint_every = 100
    config.eval.batch_size = 32
    config.eval.patience = 4
    config.eval.plateau.patience = 1
  elif arg.variant == "smoke":
    config.data.synthetic_num_orthophotos = 2
    config.data.synthetic_height = 288
    config.data.synthetic_width = 320
    config.data.tile_size = 32
    config.data.worker_count = 0
    config.model.arch = "tiny"
    config.model.embed_dim = 8
    config.model.depths = (2, 1, 1)  # a second block in stage 1: the shifted window runs
    config.model.num_heads = (1, 1, 2)
    config.model.window_size = 2  # stage maps 8, 4, 2: no window padding (train/segment.py says why)
    config.model.levels = (0, 1, 2)
    config.model.drop_path_rate = 0.1
    config.model.fpn_channels = 8
    config.model.head_channels = 8
    config.aug.size = 32
    config.aug.scale = (0.5, 1.0)
    config.aug.ratio = (3 / 4, 4 / 3)
    config.aug.rotate_degrees = 10.0
    config.optim.lr = 1e-3
    config.train.global_batch_size = 16
    config.train.epochs = 2
    config.train.log_every = 1
    config.train.checkpoint_every = 3  # odd steps too: a resume mid-accumulation is tested
    config.train.keep_checkpoints = 4
    config.eval.batch_size = 16
    config.eval.plateau.patience = 1
  elif arg.variant != "full":
    raise ValueError(f"configs/segment_landcoverai.py: unknown variant {arg.variant!r}; expected full, demo or smoke")
  return config
