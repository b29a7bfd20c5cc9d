"""MoCo checkpoints <-> jaxgeo MoCo weights: the official facebookresearch/moco layout and the seed's OpenSelfSup one.

jaxgeo MoCo weights are the weight part of train/moco.py's state (a plain dict of arrays):
  {"params":      {"encoder": ResNet50 params (fc_0 / fc_1 = the MLP projector), "adapters": {name: ...}},
   "batch_stats": {"encoder": ..., "adapters": {name: ...}},
   "key":         {"params": ..., "batch_stats": ...}       the momentum encoder, same tree as the encoder's
   "queue": float32 [dim, K], "queue_ptr": int32 []}
Adapter names: "s2" and "s1" (sensor pairing: the S2 query adapter and the S1 key adapter) or "image" (one
adapter for the run's bands). "adapters" is absent when the model has none.

PyTorch layouts read (torch.save files, read without torch by bridge/torch_reader.py, or state dicts):
  official   {"state_dict": {"module.encoder_q.<torchvision names, fc.0 / fc.2>", "module.encoder_k.*",
             "module.queue", "module.queue_ptr"}}, as main_moco.py saves it
  seed       OpenSelfSup MOCO: {"state_dict": {"backbone.*" (the query backbone registered a second time),
             "encoder_q.0.*", "encoder_q.1.mlp.{0,2}.*" (NonLinearNeckV1), "encoder_k.{0,1}.*",
             "input_module_q.net.{0,1}.*" (S2 Conv1x1Block), "input_module_k.net.*" (S1), "queue", "queue_ptr"}}
Written (`to_torch`, `save`, `export_run`): the official layout, which main_lincls.py loads as it loads a
main_moco.py checkpoint (it keeps module.encoder_q.* minus fc and asserts only fc.weight / fc.bias are missing),
plus the adapters as "module.input_module_q.net.*" / "module.input_module_k.net.*" (the seed's names).

`init_state` starts a MoCo run from a file: a MoCo checkpoint of either layout as a whole state (encoders,
adapters, queue), or a plain ResNet-50 (torchvision, timm, SSL4EO-S12) as both encoders' backbone.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np
from absl import logging

from jaxgeo.bridge import common
from jaxgeo.bridge.export import to_torch_state_dict
from jaxgeo.bridge.resnet import RESNET, resnet_state

WEIGHT_KEYS = ("params", "batch_stats", "key", "queue", "queue_ptr")
# Adapter name <-> the seed's input module: S2 is its query sensor, S1 its key sensor.
_MODULE_OF = {"s2": "input_module_q", "image": "input_module_q", "s1": "input_module_k"}


def is_moco_checkpoint(checkpoint, where: str = "<checkpoint>") -> bool:
  """Whether a loaded checkpoint (a torch.save dict, or its state dict) holds a MoCo model of either layout."""
  return isinstance(checkpoint, Mapping) and is_moco_state(_tensors(checkpoint, where))


def is_moco_state(state: Mapping) -> bool:
  """Whether a flat torch state dict holds a MoCo model of either layout (query and key encoder)."""
  keys = [k[len("module.") :] if k.startswith("module.") else k for k in state]
  return any(k.startswith("encoder_q.") for k in keys) and any(k.startswith("encoder_k.") for k in keys)


def _tensors(checkpoint, where):
  state, _ = common.pick_state_dict(checkpoint, where, ("state_dict", "model"))
  return common.strip_prefix({k: v for k, v in state.items() if isinstance(v, np.ndarray)}, ("module.",))


def _variables(state, where):
  """A torchvision-named state dict -> flax {"params", "batch_stats"}, every key placed."""
  flat, unmapped = common.torch_to_flax(state, RESNET)
  if unmapped:
    raise common.StateDictMismatchError(f"{where}: keys with no place in a ResNet-50: {sorted(unmapped)[:8]}")
  return common.unflatten(common.as_float32(flat))


def _seed_encoder(state, prefix, where):
  """OpenSelfSup Sequential(backbone, neck) -> torchvision names: encoder_x.0.* as is, encoder_x.1.mlp.i -> fc.i."""
  encoder = common.subtree(state, f"{prefix}.0.")
  for key, value in common.subtree(state, f"{prefix}.1.").items():
    if not key.startswith("mlp."):
      raise common.StateDictMismatchError(f"{where}: unexpected neck key {prefix}.1.{key} (expected mlp.0 / mlp.2)")
    encoder[f"fc.{key[len('mlp.') :]}"] = value
  return encoder


def _adapter(state, prefix, where):
  """input_module_x.net.{0,1}.* (Conv1x1Block) -> BandAdapter variables, or None when absent."""
  torch_state = {f"adapter.{k}": v for k, v in common.subtree(state, f"{prefix}.net.").items()}
  return _variables(torch_state, f"{where} ({prefix})") if torch_state else None


def from_torch(path_or_state, where: Optional[str] = None) -> dict:
  """jaxgeo MoCo weights (module doc) from a MoCo checkpoint of the official or the seed's layout (numpy)."""
  checkpoint, found_where = common.read_checkpoint(path_or_state)
  where = where or found_where
  state = _tensors(checkpoint, where)
  if not is_moco_state(state):
    raise ValueError(
      f"{where}: not a MoCo checkpoint (no encoder_q.* and encoder_k.* keys; keys start {sorted(state)[:4]}); "
      "a plain ResNet-50 loads with resnet50_from_torch"
    )
  if any(k.startswith("encoder_q.0.") for k in state):  # the seed's OpenSelfSup MOCO
    query, key = _seed_encoder(state, "encoder_q", where), _seed_encoder(state, "encoder_k", where)
    for name, value in common.subtree(state, "backbone.").items():  # the same module under a second name
      if name not in query or not np.array_equal(query[name], value):
        raise ValueError(f"{where}: backbone.{name} should repeat encoder_q.0.{name}, but differs or is missing")
  else:
    query, key = common.subtree(state, "encoder_q."), common.subtree(state, "encoder_k.")
  query_vars, key_vars = _variables(query, f"{where} (encoder_q)"), _variables(key, f"{where} (encoder_k)")
  weights = {
    "params": {"encoder": query_vars["params"]},
    "batch_stats": {"encoder": query_vars["batch_stats"]},
    "key": key_vars,
  }
  adapters = {side: _adapter(state, f"input_module_{side}", where) for side in ("q", "k")}
  if adapters["k"] is not None and adapters["q"] is None:
    raise ValueError(f"{where}: input_module_k without input_module_q; expected the seed's pair or a query adapter")
  if adapters["q"] is not None:
    named = {"s2": adapters["q"], "s1": adapters["k"]} if adapters["k"] is not None else {"image": adapters["q"]}
    if "s1" in named and np.shape(named["s1"]["params"]["adapter_conv"]["kernel"])[2] != 2:
      raise ValueError(f"{where}: input_module_k (the seed's S1 adapter) should read 2 bands (VV, VH)")
    weights["params"]["adapters"] = {n: v["params"] for n, v in named.items()}
    weights["batch_stats"]["adapters"] = {n: v["batch_stats"] for n, v in named.items()}
  if "queue" in state:
    weights["queue"] = np.asarray(state["queue"], np.float32)
    weights["queue_ptr"] = np.int32(np.asarray(state.get("queue_ptr", 0)).reshape(-1)[0])
  return weights


def resnet_from_moco(path_or_state, which: str = "encoder_q"):
  """(ResNet50 model, variables) of one encoder of a MoCo checkpoint, MLP projector included (fc_0 / fc_1), with
  the query sensor's band adapter ("s2" or the single one) as the model's band adapter when there is one. The
  seed's S1 key adapter has no place in one model; `from_torch` keeps it."""
  from jaxgeo.models.resnet import ResNet50

  weights = from_torch(path_or_state)
  if which not in ("encoder_q", "encoder_k"):
    raise ValueError(f"which={which!r}: a MoCo checkpoint holds encoder_q and encoder_k")
  variables = weights["key"] if which == "encoder_k" else {k: weights[k]["encoder"] for k in ("params", "batch_stats")}
  variables = {k: dict(v) for k, v in variables.items()}
  adapters = weights["params"].get("adapters", {})
  name = "s2" if "s2" in adapters else next(iter(adapters), None)
  if name is not None:
    variables["params"].update(adapters[name])
    variables["batch_stats"].update(weights["batch_stats"]["adapters"][name])
  fc = variables["params"]
  model = ResNet50(
    num_classes=np.shape(fc["fc_1"]["kernel"])[1],
    head="mlp",
    mlp_hidden=np.shape(fc["fc_0"]["kernel"])[1],
    band_adapter=name is not None,
    stages=tuple(sum(1 for k in fc if k.startswith(f"layer{s}_")) for s in range(1, 5)),
    width=np.shape(fc["conv1"]["kernel"])[3],
  )
  return model, variables


def to_torch(weights: Mapping) -> dict[str, np.ndarray]:
  """The official MoCo state dict ("module.encoder_q.*", ...) of jaxgeo MoCo weights, adapters as the seed names them."""
  state = {}
  encoder = {"params": weights["params"]["encoder"], "batch_stats": weights["batch_stats"]["encoder"]}
  for side, variables in (("encoder_q", encoder), ("encoder_k", weights["key"])):
    state.update({f"module.{side}.{k}": v for k, v in to_torch_state_dict(variables).items()})
  for name, params in weights["params"].get("adapters", {}).items():
    flat = {("params", *k): v for k, v in common.flatten(params).items()}
    flat.update({("batch_stats", *k): v for k, v in common.flatten(weights["batch_stats"]["adapters"][name]).items()})
    module = _MODULE_OF.get(name)
    if module is None:
      raise ValueError(f"moco.py: adapter {name!r} has no seed name; expected one of {sorted(_MODULE_OF)}")
    for key, value in common.flax_to_torch(flat, RESNET).items():
      state[f"module.{module}.net.{key[len('adapter.') :]}"] = value
  if "queue" in weights:
    state["module.queue"] = np.asarray(weights["queue"], np.float32)
    state["module.queue_ptr"] = np.asarray(weights["queue_ptr"], np.int64).reshape(1)
  return state


def save(weights: Mapping, path: str | os.PathLike, **extra) -> str:
  """Writes `to_torch(weights)`: .pth / .pth.tar as main_moco.py does ({"arch", "state_dict", **extra}, with
  torch.save), .safetensors as the flat state dict (no pickle)."""
  path = os.fspath(path)
  state = {k: np.ascontiguousarray(v) for k, v in to_torch(weights).items()}
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file

    save_file(state, path)
    return path
  try:
    import torch
  except ImportError:
    raise RuntimeError(f"{path}: writing .pth needs torch; write .safetensors instead") from None
  torch.save(
    {"arch": "resnet50", **extra, "state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, path
  )
  return path


def export_run(run_dir: str, path: str | os.PathLike, step: Optional[int] = None) -> str:
  """A jaxgeo MoCo run's newest (or `step`) checkpoint as a MoCo checkpoint for main_lincls.py (see `save`)."""
  from jaxgeo import checkpoint
  from jaxgeo import workdir as workdir_lib

  config = workdir_lib.load_config(run_dir)
  if config.get("method") != "moco":
    raise ValueError(f"{run_dir}: config.json says method={config.get('method')!r}; only MoCo runs export this way")
  state = checkpoint.load_state(run_dir, step)
  return save({k: state[k] for k in WEIGHT_KEYS}, path, jaxgeo_step=int(state["step"]), jaxgeo_run=str(run_dir))


# ---------------------------------------------------------------------------------------------------------------
# Starting a run from a file
# ---------------------------------------------------------------------------------------------------------------


def _replace(target, source, where, allow_missing=()):
  """`target` (any arrays) with every leaf of `source` put in; a leaf of source not in target, or of another
  shape, is an error, and so is a leaf of target missing from source unless its path starts with allow_missing."""
  flat_target, flat_source = common.flatten(target), common.flatten(source)
  name = "/".join
  problems = [f"unexpected {name(k)}" for k in flat_source if k not in flat_target]
  problems += [
    f"{name(k)}: checkpoint {np.shape(v)}, model {np.shape(flat_target[k])}"
    for k, v in flat_source.items()
    if k in flat_target and np.shape(v) != np.shape(flat_target[k])
  ]
  problems += [
    f"missing {name(k)}"
    for k in flat_target
    if k not in flat_source and not any(name(k).startswith(p) for p in allow_missing)
  ]
  if problems:
    raise common.StateDictMismatchError(f"{where}: " + "; ".join(problems[:12]))
  flat_target.update(flat_source)
  return common.unflatten(flat_target)


def _fit_conv1(variables, channels, bands, where):
  """conv1 of a checkpoint fitted to `channels` input bands: kept, tiled from RGB (timm's rule), or the named
  bands picked from a 13-band Sentinel-2 L1C conv1 (SSL4EO-S12, B01..B12 with B8A; SEN12MS's S2 order)."""
  from jaxgeo.data.sen12ms import S2_BANDS

  kernel = np.asarray(variables["params"]["conv1"]["kernel"])
  indices = None
  if kernel.shape[2] == len(S2_BANDS) and channels != kernel.shape[2]:
    if not all(b in S2_BANDS for b in bands):
      raise ValueError(f"{where}: a 13-band S2 conv1 cannot read bands {tuple(bands)}; pick Sentinel-2 bands")
    indices = [S2_BANDS.index(b) for b in bands]
  variables["params"]["conv1"]["kernel"] = common.adapt_input_kernel(kernel, channels, indices, where=where)
  return variables


def init_state(state: Mapping, path: str, *, bands: Sequence[str], which: Optional[str] = None) -> dict:
  """`state` (train/moco.py's) with the weights of `path` put in: a MoCo checkpoint's whole model, else a plain
  ResNet-50 backbone in both encoders (the MoCo projector keeps its fresh init). `bands`: the run's input bands
  (conv1 is fitted to them when there are no adapters). Returns host arrays where weights were loaded."""
  checkpoint, where = common.read_checkpoint(path)
  channels = np.shape(state["params"]["encoder"]["conv1"]["kernel"])[2]
  state = dict(state)
  if is_moco_state(_tensors(checkpoint, where)):
    weights = from_torch(checkpoint, where)
    for side in ("encoder", "key"):
      variables = weights["key"] if side == "key" else {k: weights[k]["encoder"] for k in ("params", "batch_stats")}
      _fit_conv1(variables, channels, bands, where)
    state["params"] = dict(
      state["params"], encoder=_replace(state["params"]["encoder"], weights["params"]["encoder"], where)
    )
    state["batch_stats"] = dict(
      state["batch_stats"], encoder=_replace(state["batch_stats"]["encoder"], weights["batch_stats"]["encoder"], where)
    )
    state["key"] = _replace(state["key"], weights["key"], f"{where} (encoder_k)")
    loaded = set(weights["params"].get("adapters", {}))
    own = set(state["params"].get("adapters", {}))
    if loaded - own:
      raise ValueError(
        f"{where}: holds band adapter(s) {sorted(loaded - own)} but this run has {sorted(own) or 'none'}; "
        "set config.moco.pairing / config.moco.adapter to the checkpoint's model"
      )
    for group in ("params", "batch_stats"):
      if loaded:
        adapters = dict(state[group]["adapters"])
        for name in loaded:
          adapters[name] = _replace(adapters[name], weights[group]["adapters"][name], f"{where} (adapter {name})")
        state[group] = dict(state[group], adapters=adapters)
    if own - loaded:
      logging.info("%s has no band adapter for %s: those start from their fresh init", where, sorted(own - loaded))
    if "queue" in weights and np.shape(weights["queue"]) == np.shape(state["queue"]):
      state["queue"], state["queue_ptr"] = weights["queue"], weights["queue_ptr"]
    else:
      logging.info(
        "%s: queue not taken (shape %s, run %s)", where, np.shape(weights.get("queue")), state["queue"].shape
      )
    logging.info("MoCo state initialised from %s (query, key encoder%s)", where, ", adapters" if loaded else "")
    return state
  backbone = resnet_state(checkpoint, which, where)
  backbone = _variables({k: v for k, v in backbone.items() if not k.startswith("fc.")}, where)
  _fit_conv1(backbone, channels, bands, where)
  for group in ("params", "batch_stats"):
    merged = _replace(state[group]["encoder"], backbone[group], where, allow_missing=("fc_0", "fc_1"))
    state[group] = dict(state[group], encoder=merged)
  state["key"] = {
    "params": dict(state["key"]["params"], **backbone["params"]),
    "batch_stats": dict(state["key"]["batch_stats"], **backbone["batch_stats"]),
  }
  # The key encoder starts equal to the query encoder, projector included, as MoCo's copy at construction.
  state["key"]["params"].update({k: v for k, v in state["params"]["encoder"].items() if k.startswith("fc_")})
  logging.info("both MoCo encoders' backbone initialised from %s", where)
  return state
