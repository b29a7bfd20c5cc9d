"""Scene classification (single- or multi-label) with a ResNet-50 on the shared loop: the seed's SEN12MS protocol.

The protocol of Berkeley-Data/SEN12MS classification/main_train.py (the seed's fine-tuning of every pretrained
model; see /work/shared/reference/moco_sen12ms.md 2.6): Adam lr 1e-3 with weight decay 1e-5 added to the gradient
(torch.optim.Adam's L2, not AdamW's decoupled decay), batch 64, 100 epochs, optional StepLR (optim.lr_step_size
epochs, optim.lr_step_gamma), BCE-with-logits for multi-label and cross-entropy for single-label targets, no
augmentation, validation every epoch with the best micro-F1 kept; predictions are sigmoid >= 0.5 / argmax.

Models (config.classify.model, config.init.*), named as the seed's table rows:
  supervised + no init       "Supervised": conv1 reads the N bands; kaiming_normal_ (fan_in) on every conv and the
                             FC weight, the FC bias torch's default U(+-1/sqrt(fan_in)), BatchNorm 1 / 0
  adapter + no init          "Supervised_1x1": a 1x1 conv + BN + ReLU maps N bands to 3 before a 3-band conv1
  supervised + pretrained    "Moco": the backbone of a run / checkpoint with conv1 re-made for the N bands
  adapter + pretrained       "Moco_1x1": the run's own band adapter; with init.adapter=random "Moco_1x1RND"
Pretrained weights come from config.init.workdir (a jaxgeo MoCo run: its query encoder and band adapters) or
config.init.checkpoint (PyTorch: torchvision / timm / SSL4EO-S12 ResNet-50, the seed's classifiers with their
`encoder.N` / `conv1` / `FC` keys, the seed's OpenSelfSup MoCo checkpoints and their `*_converted.pth`).

Input layers are carried to other bands by band name (`fit_bands`): a band the layer was trained on keeps its
weights, a band it never saw starts at zero, so at initialisation the model computes what the pretrained one
did on the bands they share. A 3-channel conv1 fed by adapter outputs or RGB has no band names; `supervised`
then re-makes it for N bands as the bridge does for RGB weights (kernels tiled over the bands, scaled 3 / N).

Where this differs from the seed, on purpose:
  * Moco_1x1RND gets a random adapter (main_train.py builds Moco_1x1 for it, so its "RND" rows reused the
    pretrained adapter), initialised as Supervised_1x1's; Moco_1x1 takes each band's adapter weights by name (the
    seed copies the 1x1 conv only when there are exactly 10 input bands, and always the S2 adapter's BatchNorm,
    also for S1 input);
  * a fusion conv1 (12 bands: S2 then S1) keeps only the bands given, where the seed zero-filled the missing
    sensor before normalising (constant inputs of -mean / std);
  * StepLR decays after lr_step_size epochs; the seed calls scheduler.step() before each epoch, so its every
    decay came one epoch early (PyTorch warns about that order);
  * the test split is scored with the checkpoint of the best validation micro-F1; the seed saved that one but
    scored its last epoch's model;
  * an epoch is floor(N / batch) steps, the shared loop carrying the remainder into the next one; the seed kept a
    short last batch (819 samples: 13 steps an epoch there, 12 here, the same samples seen per step).

Frozen-backbone linear evaluation (classify.mode=linear, as MoCo's main_lincls): BatchNorm in eval mode, only
the FC trained, initialised N(0, 0.01) with zero bias.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxgeo import config_utils
from jaxgeo.data import augment
from jaxgeo.evaluate import metrics, plots
from jaxgeo.models.resnet import ResNet50
from jaxgeo.models.vit import compute_dtype
from jaxgeo.train.task import Task

MODELS = ("supervised", "adapter")
MODES = ("finetune", "linear")
ADAPTER_INIT = ("pretrained", "random")


def classify_config(**overrides):
  """config.classify: which of the seed's models, and fine-tuning or a frozen-backbone linear head."""
  c = ml_collections.ConfigDict()
  c.model = "supervised"  # or "adapter" (1x1 band adapter in front of a 3-band conv1)
  c.mode = "finetune"  # or "linear": frozen backbone (BN in eval mode), only the FC trained
  c.name = ""  # the row name in results tables ("": derived from model, init and pretraining run)
  c.update(overrides)
  return c


def optim_config(**overrides):
  """config.optim: torch.optim.Adam(lr, weight_decay) with an optional StepLR, as the seed's main_train.py."""
  c = ml_collections.ConfigDict()
  c.lr = 1e-3
  c.weight_decay = 1e-5  # L2 added to the gradient, on every trained parameter (BN and biases included)
  c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
  c.lr_step_size = 0  # epochs between decays (StepLR); 0: constant (the seed's default, --use_lr_step off)
  c.lr_step_gamma = 0.1
  c.update(overrides)
  return c


# ---------------------------------------------------------------------------------------------------------------
# Model, its initialisation, the optimizer
# ---------------------------------------------------------------------------------------------------------------


def build_model(config, num_classes):
  """The ResNet-50 of config.model / config.classify with a linear `fc` of num_classes outputs."""
  model_config = config.model
  return ResNet50(
    num_classes=num_classes,
    head="linear",
    stages=tuple(model_config.stages),
    width=int(model_config.width),
    band_adapter=config.classify.model == "adapter",
    dtype=compute_dtype(model_config.dtype),
  )


def seed_init(model, in_chans, rng, head="seed"):
  """{"params", "batch_stats"} as the seed's ResNet50 / ResNet50_1x1 start: torch.nn.init.kaiming_normal_ (fan_in,
  gain sqrt(2)) on every conv kernel and the FC weight, the FC bias torch.nn.Linear's default U(+-1/sqrt(fan_in)),
  BatchNorm scale 1, bias 0, running mean 0, var 1 (torch's defaults, which the seed leaves alone).
  head="linear": main_lincls's FC instead, weight N(0, 0.01) and bias 0.

  Every weight comes from one normal draw (and one uniform for the FC bias) cut into the kernels: XLA compiles
  each random op on its own, and the ~90 of a per-leaf init take a minute to compile on a CPU."""
  dummy = jnp.zeros((1, 32, 32, in_chans), jnp.float32)  # param shapes do not depend on the image size
  shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  kernels = [leaf.shape for path, leaf in leaves if path[-1].key == "kernel"]
  normal_key, uniform_key = jax.random.split(rng)
  draws = jax.random.normal(normal_key, (sum(int(np.prod(s)) for s in kernels),), jnp.float32)
  fc_in = shapes["params"]["fc"]["kernel"].shape[0]
  out, offset = [], 0
  for path, leaf in leaves:
    names = [k.key for k in path]
    if names[-1] == "kernel":
      size = int(np.prod(leaf.shape))
      std = 0.01 if head == "linear" and names[1] == "fc" else np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      out.append(draws[offset : offset + size].reshape(leaf.shape) * std)
      offset += size
    elif names[1] == "fc":  # the FC bias
      bound = 0.0 if head == "linear" else 1.0 / np.sqrt(fc_in)
      out.append(jax.random.uniform(uniform_key, leaf.shape, jnp.float32, -bound, bound))
    elif names[-1] in ("scale", "var"):
      out.append(jnp.ones(leaf.shape, jnp.float32))
    else:  # BatchNorm bias and running mean
      out.append(jnp.zeros(leaf.shape, jnp.float32))
  return treedef.unflatten(out)


def adam_l2(optim):
  """torch.optim.Adam(weight_decay=wd): wd * param joins the gradient before the moments (coupled L2)."""
  return optax.chain(
    optax.add_decayed_weights(optim.weight_decay), optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps)
  )


def step_lr(step, steps_per_epoch, optim):
  """torch.optim.lr_scheduler.StepLR stepped once per epoch: lr * gamma ** (epoch // step_size)."""
  if optim.lr_step_size <= 0:
    return jnp.float32(optim.lr)
  epoch = step // steps_per_epoch
  return optim.lr * jnp.float32(optim.lr_step_gamma) ** (epoch // optim.lr_step_size).astype(jnp.float32)


def classification_loss(logits, labels, valid, multilabel):
  """BCEWithLogitsLoss (mean over samples and classes) or CrossEntropyLoss (mean over samples), over valid rows."""
  logits = logits.astype(jnp.float32)
  if multilabel:
    per_row = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)), axis=-1)
  else:
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
  weights = valid.astype(jnp.float32)
  return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def check_config(config):
  config_utils.check_choice("classify.model", config.classify.model, MODELS)
  config_utils.check_choice("classify.mode", config.classify.mode, MODES)
  config_utils.check_choice("init.adapter", config.init.adapter, ADAPTER_INIT)
  if config.init.workdir and config.init.checkpoint:
    raise ValueError(
      f"config.init: set workdir ({config.init.workdir}) or checkpoint ({config.init.checkpoint}), not both"
    )
  if config.train.global_batch_size < 2:
    raise ValueError("config.train.global_batch_size must be >= 2: train-mode BatchNorm needs a batch")


# ---------------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------------


def make_task(config, *, steps_per_epoch, total_steps, in_chans, mean, std, mesh, source):
  del total_steps, mesh  # the schedule is per epoch; shardings come from the loop's rules
  check_config(config)
  if source.label_kind not in ("single", "multilabel"):
    raise ValueError(
      f"config.method='classify' needs scene labels; the {source.name} source gives {source.label_kind!r} "
      "(a segmentation dataset needs config.method='segment')"
    )
  multilabel = source.label_kind == "multilabel"
  class_names = tuple(source.class_names)
  bands = tuple(source.bands)
  model = build_model(config, len(class_names))
  tx = adam_l2(config.optim)
  linear = config.classify.mode == "linear"

  def trainable(params):
    return {"fc": params["fc"]} if linear else params

  def init(rng):
    variables = seed_init(model, in_chans, rng, head="linear" if linear else "seed")
    params = variables["params"]
    return {
      "params": params,
      "batch_stats": variables["batch_stats"],
      "opt_state": tx.init(trainable(params)),
      "step": jnp.zeros((), jnp.int32),
    }

  def logits_of(params, batch_stats, images, train):
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
      return model.apply(variables, images, train=False), batch_stats
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return logits, updates["batch_stats"]

  def step(state, batch):
    step_index = state["step"]
    images = augment.normalize(batch["image"], mean, std)
    params = state["params"]

    def loss_fn(trained):
      # In linear mode only the FC is an argument: the frozen backbone is a constant, never differentiated.
      full = dict(params, **trained)
      logits, batch_stats = logits_of(full, state["batch_stats"], images, train=not linear)
      return classification_loss(logits, batch["labels"], batch["valid"], multilabel), batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable(params))
    grad_norm = optax.tree.norm(grads)
    lr = step_lr(step_index, steps_per_epoch, config.optim) * state["lr_scale"]
    updates, opt_state = tx.update(grads, state["opt_state"], trainable(params))
    trained = jax.tree.map(lambda p, u: p - lr * u, trainable(params), updates)
    new = {"params": dict(params, **trained), "batch_stats": batch_stats, "opt_state": opt_state}
    # A non-finite loss or gradient never reaches the weights: the step is dropped whole and reported.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, {k: state[k] for k in new})
    new["step"] = step_index + 1
    step_metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": lr,
      "finite": finite,
      "num_skipped": jnp.sum(batch["num_skipped"]),
    }
    return new, step_metrics

  def eval_step(state, batch):
    images = augment.normalize(batch["image"], mean, std)
    logits, _ = logits_of(state["params"], state["batch_stats"], images, train=False)
    loss = classification_loss(logits, batch["labels"], batch["valid"], multilabel)
    count = jnp.sum(batch["valid"].astype(jnp.float32))
    scores = jax.nn.sigmoid(logits) if multilabel else jax.nn.softmax(logits, axis=-1)
    return {"rows": {"scores": scores, "labels": batch["labels"]}, "sums": {"loss": loss * count, "count": count}}

  def summarize(rows, sums):
    report = metrics.classification_report(rows["labels"], rows["scores"], multilabel, class_names)
    report["loss"] = float(sums["loss"] / max(float(sums["count"]), 1.0))
    return report

  def embed(state, images):
    images = augment.normalize(images, mean, std)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return model.apply(variables, images, train=False, return_features=True)[1]["pooled"]

  def import_pretrained(state):
    if not (config.init.workdir or config.init.checkpoint):
      if linear:
        logging.warning("classify.mode=linear with no config.init: the frozen backbone is random (a baseline row)")
      return state
    # Leaves that stay fresh (the FC, a random adapter) are passed through untouched: only shapes are read, so
    # arrays sharded over other processes' devices never need gathering.
    variables, description = pretrained_variables(config, bands, {k: state[k] for k in ("params", "batch_stats")})
    logging.info("weights from %s (config.classify.model=%s)", description, config.classify.model)
    params = variables["params"]
    return dict(state, params=params, batch_stats=variables["batch_stats"], opt_state=tx.init(trainable(params)))

  return Task(
    init=init,
    step=step,
    embed=embed,
    eval_step=eval_step,
    summarize=summarize,
    report=lambda summary, out_dir, preview: report(summary, out_dir, class_names),
    import_pretrained=import_pretrained,
  )


def report(summary, out_dir, class_names):
  """Per-class bars (accuracy = recall for single-label, F1 for multi-label) and the confusion matrix (single)."""
  import os

  if summary["multilabel"]:
    plots.per_class_chart(
      class_names,
      summary["f1_per_class"],
      os.path.join(out_dir, "per_class_f1.png"),
      metric="F1",
      mean=summary["f1_macro"],
      mean_label="macro F1",
      title=f"Per-class F1 (sigmoid >= 0.5), OA {summary['oa_multi']:.3f}, micro F1 {summary['f1_micro']:.3f}",
    )
    return
  plots.per_class_chart(
    class_names,
    summary["recall_per_class"],
    os.path.join(out_dir, "per_class_accuracy.png"),
    metric="accuracy (recall)",
    mean=summary["aa"],
    mean_label="AA",
    title="Per-class accuracy",
  )
  headline = {"OA": summary["oa"], "AA": summary["aa"], "AA (seed)": summary["aa_seed"]}
  plots.confusion_chart(summary["confusion"], class_names, os.path.join(out_dir, "confusion.png"), headline=headline)


# ---------------------------------------------------------------------------------------------------------------
# Pretrained weights: read (a jaxgeo MoCo run, PyTorch files of several layouts), then fit to this model's bands
# ---------------------------------------------------------------------------------------------------------------
#
# Every reader returns one neutral form, which `fit` turns into this model's variables:
#   backbone     {"params", "batch_stats"} of the ResNet without fc and adapter (conv1 included)
#   conv1_bands  the band names conv1's input channels stand for, or None (adapter outputs, RGB, unknown)
#   adapters     [(band names, {"params": {"adapter_conv", "adapter_bn"}, "batch_stats": {"adapter_bn"}})]
#   fc           {"kernel", "bias"} of a classifier's head (the seed's FC), else None
#   where        what was read, for messages

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
