"""Config helpers shared by every `configs/*.py`.

`get_config(arg)` receives the text after the colon of `--config=configs/x.py:arg`, e.g.
"smoke" or "variant=demo,bands=all". `parse_arg` turns it into a ConfigDict so configs can branch on it.
"""

import ml_collections


def parse_arg(arg, lazy=False, **defaults):
  """Parses "variant=smoke,key=value" (or a bare "smoke") into a ConfigDict over `defaults`.

  A bare word sets `variant`. Values are cast to the type of their default, so a typo such as
  `steps=1O` fails here instead of deep in training.
  """
  parsed = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return parsed
  for item in arg.split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    if not sep:
      key, value = "variant", key
    if key not in parsed and not lazy:
      raise ValueError(f"config argument {key!r} unknown; expected one of {sorted(parsed.keys())}")
    default = parsed.get(key)
    if isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes")
    elif default is not None and not isinstance(default, str):
      value = type(default)(value)
    parsed[key] = value
  return parsed


def check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"config.{name}={value!r}; expected one of {sorted(choices)}")


def base_config(method, dataset="bigearthnet"):
  """Fields every method shares; configs/*.py set the method's own numbers on top.

  Locked by the caller (main) so that a mistyped --config.x.y override is an error before any compute.
  Optional strings are typed placeholders: None until set, and only a string can set them.
  """
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0

  # The dataset's fields (config.data.dataset picks it): the shared ones and the dataset module's own.
  from jaxgeo import data

  c.data = data.data_config(dataset)

  c.model = ml_collections.ConfigDict()
  c.model.arch = "small"
  c.model.patch_size = 16
  c.model.depth = -1  # -1: the arch's own
  c.model.embed_dim = -1
  c.model.num_heads = -1
  c.model.drop_path_rate = 0.0
  c.model.dtype = "auto"  # bfloat16 on GPU/TPU, float32 on CPU; params always float32
  c.model.attention = "xla"  # or "cudnn" (jax.nn.dot_product_attention)

  c.head = ml_collections.ConfigDict()
  c.aug = ml_collections.ConfigDict()
  c.loss = ml_collections.ConfigDict()
  c.optim = ml_collections.ConfigDict()

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 256
  c.train.epochs = 100
  c.train.steps = -1  # -1: epochs x steps per epoch
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.on_nonfinite = "error"  # or "skip": the step's update is dropped and counted
  c.train.max_nonfinite_consecutive = 10  # skip mode stops past this many non-finite steps in a row ...
  c.train.max_nonfinite_total = 100  # ... or past this many over the whole run (resumes included)
  c.train.resume_step = -1  # -1: resume from the latest intact checkpoint; N: from step N (later ones set aside)
  c.train.accept_config_change = False  # resume although the config differs from the run's stored one

  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = ml_collections.config_dict.placeholder(str)  # PyTorch DINO .pth / .safetensors
  c.init.which = "teacher"

  # Periodic evaluation, keep-best, early stopping, lr plateau: train/evaluation.py documents the fields.
  from jaxgeo.train.evaluation import eval_config

  c.eval = eval_config()
  c.eval.knn_every = 0  # steps; 0 disables the kNN monitor
  c.eval.knn_batches = 8  # host batches of train (bank) and validation (queries)
  c.eval.final_probe = False  # linear probe: pretrained vs random-init features, printed at the end

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  # (regex over the param path, "replicate" | "fsdp" | per-dimension axes); first match wins.
  c.sharding_rules = [(".*", "fsdp")]

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)
  c.distributed.num_processes = -1
  c.distributed.process_id = -1
  c.distributed.cpu_collectives = "gloo"
  return c


# The small variants' synthetic SEN12MS and ResNet: (scenes, patches per scene, patch px, stem width). MoCo and
# classification take them from here, so a configs/moco_sen12ms.py run of a variant initialises the
# configs/classify_sen12ms.py run of the same variant (the table demo chains them).
SEN12MS_SMALL = {"demo": (40, 16, 64, 16), "smoke": (8, 8, 32, 4)}


def sen12ms_resnet(config, variant):
  """Sets config.model to a ResNet-50 and, for the variants in SEN12MS_SMALL, shrinks it and the synthetic data."""
  config.model = ml_collections.ConfigDict(
    dict(
      arch="resnet50",
      stages=(3, 4, 6, 3),  # bottleneck blocks per stage; smaller for tests and demos
      width=64,  # stem channels (64 in ResNet-50)
      dtype="auto",  # bfloat16 compute on GPU/TPU, float32 on CPU; params always float32
    )
  )
  if variant in SEN12MS_SMALL:
    scenes, per_scene, size, width = SEN12MS_SMALL[variant]
    config.data.synthetic_num_scenes = scenes
    config.data.synthetic_patches_per_scene = per_scene
    config.data.synthetic_patch_size = size
    config.data.worker_count = 0
    config.model.stages = (1, 1, 1, 1)
    config.model.width = width
