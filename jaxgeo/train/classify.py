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
`encoder.N` / `conv1` / `FC` keys, the seed's OpenSelfSup MoCo checkpoints and their `*_converted.pth`), read and
fitted to the model's bands by train/classifier_weights.py.

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
from jaxgeo.train import classifier_weights
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
    variables, description = classifier_weights.pretrained_variables(
      config, bands, {k: state[k] for k in ("params", "batch_stats")}
    )
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
