"""The weights a SEN12MS classifier (train/classify.py) starts from: a jaxgeo MoCo run or a PyTorch file of several
layouts, read into one neutral form and then fitted to the model's bands.

Input layers are carried to other bands by band name (`fit_bands`): a band the layer was trained on keeps its
weights, a band it never saw starts at zero, so at initialisation the model computes what the pretrained one
did on the bands they share. A 3-channel conv1 fed by adapter outputs or RGB has no band names; `supervised`
then re-makes it for N bands as the bridge does for RGB weights (kernels tiled over the bands, scaled 3 / N).

Every reader returns one neutral form, which `fit` turns into this model's variables:
  backbone     {"params", "batch_stats"} of the ResNet without fc and adapter (conv1 included)
  conv1_bands  the band names conv1's input channels stand for, or None (adapter outputs, RGB, unknown)
  adapters     [(band names, {"params": {"adapter_conv", "adapter_bn"}, "batch_stats": {"adapter_bn"}})]
  fc           {"kernel", "bias"} of a classifier's head (the seed's FC), else None
  where        what was read, for messages
"""

import numpy as np
from absl import logging

_ADAPTER = ("adapter_conv", "adapter_bn")


def pretrained_variables(config, bands, target):
  """(variables fitted to `target` ({"params", "batch_stats"} of this model), description) from config.init."""
  if config.init.workdir:
    pretrained = read_jaxgeo_run(config.init.workdir)
  else:
    pretrained = read_torch_checkpoint(config.init.checkpoint, which=config.init.which or None)
  variables = fit(pretrained, target, bands, adapter_init=config.init.adapter)
  return variables, pretrained["where"]


def fit_bands(kernel, kernel_bands, bands, where):
  """An input kernel [kh, kw, len(kernel_bands), out] carried to `bands` by name; unseen bands get zeros."""
  kernel = np.asarray(kernel)
  shared = [b for b in bands if b in kernel_bands]
  if not shared:
    raise ValueError(
      f"{where}: its input layer was trained on bands {list(kernel_bands)}, none of the {list(bands)} given "
      "(config.data.sensor); pick a sensor it has seen, or train the input layer from scratch"
    )
  out = np.zeros(kernel.shape[:2] + (len(bands), kernel.shape[3]), kernel.dtype)
  for i, band in enumerate(bands):
    if band in kernel_bands:
      out[:, :, i] = kernel[:, :, kernel_bands.index(band)]
  unseen = [b for b in bands if b not in kernel_bands]
  if unseen:
    logging.info("%s: bands %s are new to its input layer and start at zero weight", where, unseen)
  return out


def _flat(tree):
  from jaxgeo.bridge import common

  return common.flatten(tree)


def _architecture(params):
  """(stages, width) of a ResNet param tree, for messages."""
  stages = [sum(1 for k in params if k.startswith(f"layer{s}_")) for s in range(1, 5)]
  return tuple(stages), int(np.shape(params["conv1"]["kernel"])[-1]) if "conv1" in params else None


def fit(pretrained, target, bands, adapter_init="pretrained"):
  """This model's variables (`target`: the freshly initialised ones) with the pretrained weights put in."""
  where, bands = pretrained["where"], tuple(bands)
  own = ("fc", "conv1") + _ADAPTER
  out = {}
  for collection in ("params", "batch_stats"):
    want = {k: v for k, v in _flat(target[collection]).items() if k[0] not in own}
    got = {k: v for k, v in _flat(pretrained["backbone"].get(collection, {})).items() if k[0] not in own}
    missing = sorted("/".join(k) for k in want if k not in got)
    unexpected = sorted("/".join(k) for k in got if k not in want)
    mismatched = [
      f"{'/'.join(k)} {np.shape(got[k])} vs {np.shape(v)}"
      for k, v in want.items()
      if k in got and np.shape(got[k]) != np.shape(v)
    ]
    if missing or unexpected or mismatched:
      theirs, ours = _architecture(pretrained["backbone"]["params"]), _architecture(target["params"])
      raise ValueError(
        f"{where}: its backbone (stages {theirs[0]}, width {theirs[1]}) does not fit this model (stages {ours[0]}, "
        f"width {ours[1]}); set config.model.stages / config.model.width to the pretrained ones. "
        f"{collection}: missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {mismatched[:5]}"
      )
    out[collection] = {**_flat(target[collection]), **{k: np.asarray(v, np.float32) for k, v in got.items()}}
  params, stats = out["params"], out["batch_stats"]
  behind_adapter = "adapter_conv" in target["params"]
  params[("conv1", "kernel")] = _fit_conv1(
    pretrained, np.shape(target["params"]["conv1"]["kernel"]), bands, behind_adapter
  )
  if behind_adapter:
    _fit_adapter(pretrained, params, stats, bands, adapter_init)
  fc = pretrained.get("fc")
  if fc is not None and np.shape(fc["kernel"]) == np.shape(target["params"]["fc"]["kernel"]):
    params[("fc", "kernel")], params[("fc", "bias")] = np.asarray(fc["kernel"]), np.asarray(fc["bias"])
    logging.info("%s: its classifier head (FC) is kept: it has this model's %d classes", where, fc["kernel"].shape[1])
  from jaxgeo.bridge import common

  return {"params": common.unflatten(params), "batch_stats": common.unflatten(stats)}


def _fit_conv1(pretrained, shape, bands, behind_adapter):
  where = pretrained["where"]
  kernel = np.asarray(pretrained["backbone"]["params"]["conv1"]["kernel"], np.float32)
  channels, wanted = kernel.shape[2], shape[2]
  if kernel.shape[:2] + kernel.shape[3:] != tuple(shape[:2]) + tuple(shape[3:]):
    raise ValueError(f"{where}: conv1 kernel {kernel.shape} does not fit this model's {tuple(shape)}")
  if behind_adapter:  # this model's conv1 reads its band adapter's 3 outputs, not bands
    if channels != 3:
      raise ValueError(
        f"{where}: its conv1 reads {channels} bands directly, so there is no 3-channel conv1 to put behind a band "
        "adapter; use config.classify.model=supervised"
      )
    return kernel
  if pretrained["conv1_bands"] is not None:
    return fit_bands(kernel, pretrained["conv1_bands"], bands, f"{where} conv1")
  if channels == wanted:
    return kernel
  if channels == 3:
    from jaxgeo.bridge import common

    logging.info(
      "%s: conv1 reads 3 channels (RGB or band-adapter outputs), re-made for %d bands (kernels tiled, scaled 3/%d)",
      where,
      wanted,
      wanted,
    )
    return common.adapt_input_kernel(kernel, wanted, where=where)
  raise ValueError(f"{where}: conv1 reads {channels} channels of unknown bands; this model has {wanted} bands {bands}")


def _fit_adapter(pretrained, params, stats, bands, adapter_init):
  where = pretrained["where"]
  if adapter_init == "random":
    logging.info("band adapter: random (config.init.adapter=random), backbone from %s", where)
    return
  candidates = [
    (sum(b in adapter_bands for b in bands), adapter_bands, variables)
    for adapter_bands, variables in pretrained["adapters"]
  ]
  shared, adapter_bands, variables = max(candidates, key=lambda c: c[0], default=(0, (), None))
  if not shared:
    have = [list(b) for b, _ in pretrained["adapters"]] or "none"
    raise ValueError(
      f"{where}: no band adapter for bands {list(bands)} (its adapters read {have}); pass "
      "--config.init.adapter=random for a fresh one (the seed's Moco_1x1RND)"
    )
  kernel = variables["params"]["adapter_conv"]["kernel"]
  params[("adapter_conv", "kernel")] = fit_bands(kernel, adapter_bands, bands, f"{where} band adapter")
  for leaf in ("scale", "bias"):
    params[("adapter_bn", leaf)] = np.asarray(variables["params"]["adapter_bn"][leaf], np.float32)
  for leaf in ("mean", "var"):
    stats[("adapter_bn", leaf)] = np.asarray(variables["batch_stats"]["adapter_bn"][leaf], np.float32)
  logging.info("band adapter from %s (its adapter for %s)", where, list(adapter_bands))


# ---- readers


# Input channel count -> the bands a PyTorch checkpoint's first layer reads, for the layouts in use: the seed's
# classifiers and adapters (S1 2, S2 10, S2+S1 12, in the seed's order) and SSL4EO-S12 (13 L1C bands).
def _bands_by_count(count):
  from jaxgeo.data import sen12ms

  return {2: sen12ms.S1_BANDS, 10: sen12ms.SEED_S2_BANDS, 12: sen12ms.BAND_SETS["s1s2"], 13: sen12ms.S2_BANDS}.get(
    count
  )


def _torch_variables(state, where):
  """A torchvision-named state dict (adapter.0 / adapter.1 for a band adapter) -> flax variables, strictly."""
  from jaxgeo.bridge import common
  from jaxgeo.bridge.resnet import RESNET

  flat, unmapped = common.torch_to_flax(state, RESNET)
  if unmapped:
    raise ValueError(f"{where}: keys with no place in a ResNet-50: {sorted(unmapped)[:8]}")
  flat = common.as_float32(flat)
  return common.unflatten(flat)


def _split_head_and_adapter(variables, where):
  """Neutral form of flax variables holding a backbone, maybe an adapter and maybe a head."""
  params, stats = dict(variables.get("params", {})), dict(variables.get("batch_stats", {}))
  if "conv1" not in params:
    raise ValueError(f"{where}: no conv1 weight; is it a ResNet?")
  fc = params.pop("fc", None)
  for key in [k for k in params if k.startswith("fc_")]:  # MoCo's projector: not part of the encoder
    params.pop(key)
  adapters = []
  if "adapter_conv" in params:
    adapter = {
      "params": {k: params.pop(k) for k in _ADAPTER},
      "batch_stats": {"adapter_bn": stats.pop("adapter_bn")},
    }
    count = np.shape(adapter["params"]["adapter_conv"]["kernel"])[2]
    adapters.append((_bands_by_count(count) or (), adapter))
  channels = np.shape(params["conv1"]["kernel"])[2]
  conv1_bands = None if adapters or channels == 3 else _bands_by_count(channels)
  return {
    "backbone": {"params": params, "batch_stats": stats},
    "conv1_bands": conv1_bands,
    "adapters": adapters,
    "fc": fc,
    "where": where,
  }


def _seed_classifier_state(state, where):
  """The seed's classifier keys (models/ResNet.py: `encoder` Sequential, `conv1` / `Conv1x1Block` registered twice,
  `FC`) -> torchvision names. With an adapter the Sequential starts with it, shifting every index by one."""
  has_adapter = "encoder.0.0.weight" in state
  first = 1 if has_adapter else 0
  names = {first: "conv1", first + 1: "bn1", **{first + 3 + s: f"layer{s}" for s in range(1, 5)}}
  out, aliases = {}, {}
  for key, value in state.items():
    head, _, rest = key.partition(".")
    index, _, leaf = rest.partition(".")
    if head == "encoder" and has_adapter and index == "0":
      out[f"adapter.{leaf}"] = value
    elif head == "encoder" and index.isdigit() and int(index) in names:
      out[f"{names[int(index)]}.{leaf}"] = value
    elif head == "FC":
      out[f"fc.{rest}"] = value
    elif head in ("conv1", "Conv1x1Block"):
      aliases[key] = value
    else:
      raise ValueError(f"{where}: unexpected key {key!r} for the seed's ResNet50 / ResNet50_1x1 / Moco classifiers")
  for key, value in aliases.items():  # the same module under a second name: must be the same tensor
    twin = ("conv1." if key.startswith("conv1.") else "adapter.") + key.partition(".")[2]
    if twin not in out or not np.array_equal(out[twin], value):
      raise ValueError(f"{where}: {key} should repeat the encoder's {twin}, but differs or is missing")
  return out


def read_torch_checkpoint(path, which=None):
  """Neutral form of a PyTorch ResNet-50 checkpoint: torchvision / timm / SSL4EO-S12, MoCo of the official or the
  seed's OpenSelfSup layout (bridge/moco.py: query encoder and band adapters), the seed's classifiers (main_train.py's
  {"model_state_dict"}: encoder.N, conv1, FC) and convert_moco_to_resnet50.py's {"state_dict", "input_module"}."""
  from jaxgeo.bridge import common
  from jaxgeo.bridge import moco as moco_bridge
  from jaxgeo.bridge.resnet import resnet_state

  checkpoint, where = common.read_checkpoint(path)
  state, _ = common.pick_state_dict(checkpoint, where, ("model_state_dict", "state_dict", "model"))
  state = common.strip_prefix({k: v for k, v in state.items() if isinstance(v, np.ndarray)}, ("module.",))
  if which is None and moco_bridge.is_moco_state(state):
    weights = moco_bridge.from_torch(checkpoint, where)
    encoder = {group: weights[group]["encoder"] for group in ("params", "batch_stats")}
    neutral = _split_head_and_adapter(encoder, where)
    neutral["fc"] = None  # the MoCo projector
    for name, params in sorted(weights["params"].get("adapters", {}).items()):
      variables = {"params": params, "batch_stats": weights["batch_stats"]["adapters"][name]}
      neutral["adapters"].append((_adapter_bands(name, variables, where), variables))
  else:
    adapters = {}  # torch prefix of a band adapter -> the tensors holding it
    if "FC.weight" in state:
      backbone = _seed_classifier_state(state, where)
    else:
      backbone = resnet_state(checkpoint, which, where)
      if isinstance(checkpoint.get("input_module"), dict):  # convert_moco_to_resnet50.py keeps the query adapter here
        adapters["input_module.net."] = {
          k: v for k, v in checkpoint["input_module"].items() if isinstance(v, np.ndarray)
        }
    backbone = {k: v for k, v in backbone.items() if not k.endswith("num_batches_tracked")}
    neutral = _split_head_and_adapter(_torch_variables(backbone, where), where)
    if "FC.weight" not in state:
      neutral["fc"] = None  # only the seed's classifiers carry a head meant for these classes
    for prefix, tensors in adapters.items():
      adapter_state = {f"adapter.{k[len(prefix) :]}": v for k, v in tensors.items() if k.startswith(prefix)}
      adapter_state = {k: v for k, v in adapter_state.items() if not k.endswith("num_batches_tracked")}
      if adapter_state:
        variables = _torch_variables(adapter_state, f"{where} {prefix}")
        neutral["adapters"].append((_adapter_bands(prefix, variables, where), variables))
  if neutral["adapters"]:
    neutral["conv1_bands"] = None
  logging.info(
    "pretrained ResNet from %s: conv1 reads %s, adapters for %s",
    where,
    list(neutral["conv1_bands"] or ["3 channels"]),
    [list(b) for b, _ in neutral["adapters"]] or "none",
  )
  return neutral


def _adapter_bands(name, variables, where):
  """The bands a PyTorch file's band adapter reads: by its name (bridge/moco.py's "s2" / "s1") or its width."""
  from jaxgeo.data import sen12ms

  if name in ("s1", "s2"):
    return sen12ms.BAND_SETS[name]
  count = np.shape(variables["params"]["adapter_conv"]["kernel"])[2]
  bands = _bands_by_count(count)
  if bands is None:
    raise ValueError(f"{where}: band adapter {name} reads {count} channels; expected 2 (S1) or 10 (S2)")
  return bands


# ---- MoCo runs of jaxgeo.train.moco


def read_jaxgeo_run(run_dir):
  """Neutral form of a jaxgeo MoCo run's query encoder and band adapters (train/moco.py's load_query_encoder)."""
  from jaxgeo.data import sen12ms
  from jaxgeo.train import moco

  encoder = moco.load_query_encoder(run_dir)
  where = f"MoCo run {run_dir}"
  neutral = _split_head_and_adapter(encoder["backbone"], where)
  for sensor, variables in sorted(encoder.get("adapters", {}).items()):
    neutral["adapters"].append((sen12ms.resolve_bands(sensor), variables))
  channels = np.shape(neutral["backbone"]["params"]["conv1"]["kernel"])[2]
  neutral["conv1_bands"] = None  # with adapters, conv1 reads their 3 outputs
  if not neutral["adapters"]:
    from jaxgeo import workdir as workdir_lib

    run_bands = tuple(workdir_lib.load_dataset_info(run_dir)["bands"])
    if len(run_bands) != channels:
      raise ValueError(f"{where}: conv1 reads {channels} channels but the run's dataset.json lists bands {run_bands}")
    neutral["conv1_bands"] = run_bands
  return neutral
