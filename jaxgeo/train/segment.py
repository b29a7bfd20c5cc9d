"""Semantic segmentation on the shared loop: SwinV2 + FPN + head on any segmentation Source (LandCover.ai, slippy
maps, SageMaker folders, Label Maker), trained with torch's weighted, label-smoothed cross-entropy.

One step: the batch's tiles and masks get one joint random view each on the device (augment.segmentation_views,
recipe = config.aug, crop size config.aug.size); the model sees them normalised by the run's input statistics;
the loss is cross-entropy (objectives/segmentation.py, as torch.nn.CrossEntropyLoss(weight, ignore_index,
label_smoothing)) plus optional Dice / Lovasz-softmax terms; Adam or AdamW (optax), its learning rate times the
loop's plateau factor state["lr_scale"]; gradients of config.optim.accumulate consecutive steps are averaged
before one update (optax.MultiSteps: the accumulator is in the state, so a resume mid-accumulation is exact).
Rows the pipeline replaced after a bad sample (batch["valid"] False) are left out of the loss.

Evaluation runs the model on whole tiles and counts the pixel confusion matrix on the device
(metrics.pixel_confusion); summarize gives metrics.segmentation_report (iou_macro = mIoU, iou_micro, F1,
precision, recall, pixel accuracy), the split's loss and the majority-class baseline; report draws the
confusion matrix, per-class IoU and image | truth | prediction tiles in the dataset's class colours.

What a run's state holds (a plain dict; checkpoint.load_state(run)["params"] etc., or `load_run`):
  params       SegmentationModel params {"backbone", "fpn", "head"} (LayerNorm only: no batch statistics)
  input_stats  {"mean", "std"} float32 [bands]: the model's input is (image - mean) / std, image in the
               source's units (0-1 for 8-bit tiles). Chosen by config.model.input_scaling: "dataset" (the
               source's norm_stats, dataset.json), "imagenet" / "unit" (torchvision's / Satlas' own inputs:
               bridge.swin.input_scaling) or "auto" (what config.init.checkpoint's weights were trained with,
               the dataset's without one). Pretrained weights see the inputs they were trained on, whatever
               the dataset's statistics are; so a predictor must read input_stats, not dataset.json.
  class_weights float32 [classes]: data.class_weights when set, else computed once from the train split's
               masks at the start of a run (config.loss.weighting, logged) and kept for resumes
  opt_state, rng, step, lr_scale   Adam state (in MultiSteps when accumulating), the per-step key root, loop fields
"""

import concurrent.futures
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxgeo import config_utils, parallel
from jaxgeo.data import augment
from jaxgeo.data.geotiff import BadSampleError
from jaxgeo.evaluate import metrics
from jaxgeo.models import fpn
from jaxgeo.objectives import segmentation as objective
from jaxgeo.train import optim
from jaxgeo.train.task import Task

SCALINGS = ("auto", "dataset", "imagenet", "unit")
OPTIMIZERS = ("adam", "adamw")
PREVIEW_TILES = 4  # tiles in the evaluation's prediction grid


# ---------------------------------------------------------------------------------------------------------------
# Config: the fields make_task reads
# ---------------------------------------------------------------------------------------------------------------


def default_config(dataset, arch="base", rgb=True):
  """config_utils.base_config("segment", dataset) with every field make_task reads, at the LandCover.ai
  recipe's values (configs/segment_landcoverai.py); a configs/segment_*.py changes what differs.

  model  fpn.model_config (num_classes / in_chans -1: the data's) + input_scaling
  aug    an augment.segmentation_views recipe (augment.landcoverai(rgb)) + size, the training crop
  loss   ce_weight, label_smoothing, weighting ("none" | "inverse" | "enet", used when data.class_weights is
         None), dice_weight, lovasz_weight
  optim  name ("adam" | "adamw"), lr, weight_decay, b1, b2, eps, warmup_epochs, clip_grad_norm, accumulate
  eval   every epoch, best and early stopping by validation mIoU ("iou_macro"), test split at the end
  """
  config = config_utils.base_config(method="segment", dataset=dataset)
  config.model = fpn.model_config(arch, num_classes=-1, in_chans=-1)
  config.model.input_scaling = "auto"  # "auto" | "dataset" | "imagenet" | "unit"
  config.aug = augment.landcoverai(rgb=rgb)
  config.aug.size = int(config.data.tile_size)
  config.loss.ce_weight = 1.0
  config.loss.label_smoothing = 0.1
  config.loss.weighting = "enet"
  config.loss.dice_weight = 0.0
  config.loss.lovasz_weight = 0.0
  config.optim.name = "adam"
  config.optim.lr = 1e-4
  config.optim.weight_decay = 0.0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.warmup_epochs = 0.0
  config.optim.clip_grad_norm = 0.0
  config.optim.accumulate = 1
  config.eval.every = -1
  config.eval.metric = "iou_macro"
  config.eval.mode = "max"
  config.eval.test_split = "test"
  return config


# ---------------------------------------------------------------------------------------------------------------
# Model and inference (also what predict.py calls)
# ---------------------------------------------------------------------------------------------------------------


def build_model(model_config, in_chans, num_classes):
  """The SegmentationModel of a config's `model` section (fpn.from_config) for the data's bands and classes.

  config.model.num_classes / in_chans are -1 in the configs (follow the data); a set value must agree.
  """
  fields = {key: model_config[key] for key in model_config.keys()}
  for name, value, origin in (("num_classes", num_classes, "data.class_names"), ("in_chans", in_chans, "data.bands")):
    configured = fields.get(name, -1)
    if configured not in (-1, None) and int(configured) != int(value):
      raise ValueError(f"config.model.{name}={configured} but {origin} give {value}; set it to -1 or make them agree")
    fields[name] = int(value)
  return fpn.from_config(fields)


def normalize(images, input_stats):
  """(images - mean) / std with a run's input_stats {"mean", "std"} (see the module doc)."""
  return augment.normalize(images, input_stats["mean"], input_stats["std"])


def predict_logits(model, params, images, input_stats):
  """Logits [B, H, W, classes] float32 of images [B, H, W, bands] in the source's units (H, W multiples of the
  patch size, 4). Pure: jit it, shard the batch."""
  return model.apply({"params": params}, normalize(images, input_stats))


def load_run(run_dir, which="best"):
  """(model, params, info) of a trained segmentation run, for inference.

  which: "best" (<run>/best, the evaluation's choice; a run that kept none falls back to its latest
  checkpoint, with a warning) or "last". info: input_stats (numpy), step, and dataset.json's bands,
  class_names, class_colors, ignore_index, norm_stats. The architecture comes from <run>/config.json.
  """
  from jaxgeo import workdir

  config, dataset = workdir.load_config(run_dir), workdir.load_dataset_info(run_dir)
  if config.get("method") != "segment":
    raise ValueError(f"{run_dir}: a {config.get('method')!r} run (config.json method); expected a 'segment' run")
  state, step = _saved_state(run_dir, which)
  model = build_model(config.model, len(dataset["bands"]), len(dataset["class_names"]))
  info = dict(dataset, input_stats={k: np.asarray(v) for k, v in state["input_stats"].items()}, step=step)
  return model, state["params"], info


def _saved_state(run_dir, which):
  """(host state, step) of <run>/best or <run>/checkpoints, verified like checkpoint.load_state."""
  from jaxgeo import checkpoint

  config_utils.check_choice("which", which, ("best", "last"))
  best = os.path.join(os.path.abspath(run_dir), "best")
  if which == "last" or not os.path.isdir(best) or not [d for d in os.listdir(best) if d.isdigit()]:
    if which == "best":
      logging.warning("%s kept no best checkpoint (config.eval.keep_best); using its latest checkpoint", run_dir)
    state = checkpoint.load_state(run_dir)
  else:
    state = checkpoint.load_state(run_dir, name="best")
  return state, int(state["step"])


# ---------------------------------------------------------------------------------------------------------------
# Class weights: one pass over the train split's masks
# ---------------------------------------------------------------------------------------------------------------


def class_pixel_counts(source, num_classes, *, ignore_index=None, on_bad_sample="error", workers=4):
  """int64 [classes]: labelled pixels per class in the masks of `source` (RoboSat's `rs weights` pass).

  Reads only the label files where the source can (SegmentationSource.read_mask: an image's nodata pixels,
  which training ignores, are then counted with their label), else whole samples. ignore_index and values
  outside the class ids are not counted. Several processes each read a share and the counts are summed.
  """
  read = getattr(source, "read_mask", None) or (lambda index: source[index]["mask"])

  def count(index):
    try:
      mask = np.asarray(read(index)).ravel()
    except BadSampleError as error:
      if on_bad_sample != "skip":
        raise
      logging.warning("class weights: %s (skipped)", error)
      return None
    keep = (mask >= 0) & (mask < num_classes)
    if ignore_index is not None:
      keep &= mask != ignore_index
    return np.bincount(mask[keep], minlength=num_classes).astype(np.int64)

  counts = np.zeros(num_classes, np.int64)
  indices = range(jax.process_index(), len(source), jax.process_count())
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:  # file reads release the GIL
    for found in pool.map(count, indices):
      if found is not None:
        counts += found
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    # As 31-bit words: jax arrays are int32 without x64, and a split passes 2**31 pixels quickly.
    words = np.stack([counts >> 31, counts & (2**31 - 1)]).astype(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(words)).astype(np.int64).sum(axis=0)
    counts = (gathered[0] << 31) + gathered[1]
  return counts


def _log_class_weights(class_names, counts, weights, how):
  total = max(int(counts.sum()), 1)
  rows = [f"  {name:<24} {int(n):>14,d} px {100 * n / total:6.2f}%  weight {w:.4f}" for name, n, w in
          zip(class_names, counts, weights)]  # fmt: skip
  logging.info("class weights (%s) from the train split's masks:\n%s", how, "\n".join(rows))
  absent = [name for name, n in zip(class_names, counts) if n == 0]
  if absent:
    logging.warning("class(es) %s have no pixel in the train split: the model cannot learn them", absent)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer, input statistics, pictures
# ---------------------------------------------------------------------------------------------------------------


def make_optimizer(optim_config):
  """optax transformation whose updates are the Adam(W) DIRECTION; the step multiplies by -lr (so the plateau
  factor and warm-up act per step). "adam": torch.optim.Adam's coupled L2 (weight decay added to the gradient);
  "adamw": decoupled, as torch.optim.AdamW. Neither decays biases and norm scales (optim.decays). Gradients
  are clipped by global norm first when optim.clip_grad_norm > 0 (after accumulation, as torch users clip
  before optimizer.step()). With accumulate > 1, optax.MultiSteps averages that many steps' gradients and
  returns zero updates in between."""
  config_utils.check_choice("optim.name", optim_config.name, OPTIMIZERS)
  accumulate = int(optim_config.accumulate)
  if accumulate < 1:
    raise ValueError(f"config.optim.accumulate={accumulate}: expected >= 1 (steps whose gradients are averaged)")
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(optim.decays, params)
  parts = []
  if optim_config.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.clip_grad_norm))
  decay = optim_config.weight_decay
  if decay and optim_config.name == "adam":
    parts.append(optax.add_decayed_weights(decay, mask=decay_mask))
  parts.append(optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps))
  if decay and optim_config.name == "adamw":
    parts.append(optax.add_decayed_weights(decay, mask=decay_mask))
  tx = optax.chain(*parts)
  return optax.MultiSteps(tx, every_k_schedule=accumulate) if accumulate > 1 else tx


def _fixed_input_stats(scaling, in_chans, mean, std):
  """Input statistics known before any checkpoint is read ("auto" starts from the dataset's)."""
  if scaling in ("auto", "dataset"):
    return tuple(mean), tuple(std)
  from jaxgeo.bridge.swin import input_scaling

  stats = input_scaling(scaling, 3 if scaling == "imagenet" else in_chans, in_chans, where="config.model.input_scaling")
  return stats["mean"], stats["std"]


def _display(images, bands):
  """Tiles [N, H, W, bands] in source units -> [N, H, W, 3] in [0, 1]: the red/green/blue bands when named
  (else the first band, grey); values beyond [0, 1] (16-bit, SAR) stretched per tile from the 2-98 percentiles."""
  images = np.asarray(images, np.float32)
  names = [str(b).lower() for b in bands]
  picked = [names.index(c) for c in ("red", "green", "blue")] if {"red", "green", "blue"} <= set(names) else [0] * 3
  rgb = images[..., picked]
  if rgb.min() < 0 or rgb.max() > 1:
    low = np.percentile(rgb, 2, axis=(1, 2, 3), keepdims=True)
    high = np.percentile(rgb, 98, axis=(1, 2, 3), keepdims=True)
    rgb = (rgb - low) / np.maximum(high - low, 1e-6)
  return np.clip(rgb, 0.0, 1.0)


def majority_baseline(confusion, class_names, ignore_index=None):
  """mIoU and pixel accuracy of predicting the split's most frequent class everywhere (from its confusion)."""
  support = confusion.sum(axis=1)
  if ignore_index is not None and 0 <= ignore_index < len(support):
    support = np.where(np.arange(len(support)) == ignore_index, -1, support)
  majority = int(np.argmax(support))
  constant = np.zeros_like(confusion)
  constant[:, majority] = confusion.sum(axis=1)
  report = metrics.segmentation_report(constant, class_names, ignore_index)
  return {
    "majority_class": class_names[majority],
    "majority_iou_macro": report["iou_macro"],
    "majority_pixel_accuracy": report["pixel_accuracy"],
  }


# ---------------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------------


def make_task(config, *, steps_per_epoch, total_steps, in_chans, mean, std, mesh, source=None):
  if source is None or getattr(source, "label_kind", None) != "segmentation":
    raise ValueError(
      f"method 'segment' needs a segmentation dataset (label_kind 'segmentation': samples with a 'mask'); "
      f"config.data.dataset={config.data.dataset!r} gives {getattr(source, 'label_kind', None)!r}"
    )
  class_names = tuple(str(name) for name in source.class_names)
  num_classes = len(class_names)
  ignore_index = getattr(source, "ignore_index", None)
  class_colors = getattr(source, "class_colors", None)
  bands = tuple(getattr(source, "bands", ()))
  model = build_model(config.model, in_chans, num_classes)
  aug, loss_config, optim_config = config.aug, config.loss, config.optim
  size = int(aug.size)
  for what, value in (("config.aug.size", size), ("data.tile_size", getattr(source, "tile_size", size))):
    if value <= 0 or value % model.patch_size:
      raise ValueError(f"{what}={value}: expected a positive multiple of the Swin patch size {model.patch_size}")
  scaling = config.model.get("input_scaling", "dataset")
  config_utils.check_choice("model.input_scaling", scaling, SCALINGS)
  config_utils.check_choice("loss.weighting", loss_config.weighting, objective.WEIGHTINGS)
  given_weights = getattr(source, "class_weights", None)
  initial_weights = np.ones(num_classes, np.float32) if given_weights is None else np.asarray(given_weights)
  initial_mean, initial_std = _fixed_input_stats(scaling, in_chans, mean, std)
  tx = make_optimizer(optim_config)
  accumulate = int(optim_config.accumulate)
  warmup_steps = int(round(optim_config.warmup_epochs * steps_per_epoch))
  if total_steps % accumulate:
    logging.warning(
      "%d steps are not a multiple of config.optim.accumulate=%d: the last %d steps' gradients are never applied",
      total_steps,
      accumulate,
      total_steps % accumulate,
    )
  loss_kwargs = dict(ignore_index=ignore_index)
  views_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES))

  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, 8 * model.patch_size, 8 * model.patch_size, in_chans), jnp.float32)  # shapes only
    params = model.init({"params": params_rng}, dummy)["params"]
    return {
      "params": params,
      "opt_state": tx.init(params),
      "class_weights": jnp.asarray(initial_weights, jnp.float32),
      "input_stats": {"mean": jnp.asarray(initial_mean, jnp.float32), "std": jnp.asarray(initial_std, jnp.float32)},
      "step": jnp.zeros((), jnp.int32),
      "rng": state_rng,
    }

  def losses(logits, masks, weights, valid=None):
    """{term: value} of the configured loss (terms with weight 0 are not computed) and the total."""
    terms, total = {}, 0.0
    if loss_config.ce_weight:
      terms["ce"] = objective.cross_entropy(
        logits, masks, weights=weights, label_smoothing=loss_config.label_smoothing, valid=valid, **loss_kwargs
      )
      total += loss_config.ce_weight * terms["ce"]
    if loss_config.dice_weight:
      terms["dice"] = objective.dice_loss(logits, masks, valid=valid, **loss_kwargs)
      total += loss_config.dice_weight * terms["dice"]
    if loss_config.lovasz_weight:
      terms["lovasz"] = objective.lovasz_softmax(logits, masks, valid=valid, **loss_kwargs)
      total += loss_config.lovasz_weight * terms["lovasz"]
    return total, terms

  def step(state, batch):
    step_index = state["step"]
    aug_rng, drop_rng = jax.random.split(jax.random.fold_in(state["rng"], step_index))
    images, masks = augment.segmentation_views(aug_rng, batch["image"], batch["mask"], aug, size, ignore_index)
    images = jax.lax.with_sharding_constraint(normalize(images, state["input_stats"]), views_sharding)
    valid = batch["valid"]

    def loss_fn(params):
      logits = model.apply({"params": params}, images, train=True, rngs={"drop_path": drop_rng})
      total, terms = losses(logits, masks, state["class_weights"], valid)
      return total, (terms, logits)

    (loss, (terms, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.tree.norm(grads)
    warmup = jnp.minimum(1.0, (step_index + 1.0) / warmup_steps) if warmup_steps else 1.0
    lr = optim_config.lr * warmup * state["lr_scale"]
    directions, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, d: p - lr * d, state["params"], directions)

    # A non-finite loss or gradient never reaches the weights (nor the accumulator): the step is dropped whole.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = {"params": params, "opt_state": opt_state}
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, {k: state[k] for k in new_state})
    new_state = dict(state, **new_state, step=step_index + 1)
    scored = objective.counted_pixels(masks, num_classes, ignore_index, valid)
    correct = jnp.sum(scored & (jnp.argmax(logits, axis=-1) == masks))
    step_metrics = {
      "loss": loss,
      **terms,
      "pixel_accuracy": objective.ratio(correct.astype(jnp.float32), jnp.sum(scored).astype(jnp.float32)),
      "grad_norm": grad_norm,
      "lr": lr,
      "finite": finite,
      "num_skipped": jnp.sum(batch["num_skipped"]),
    }
    return new_state, step_metrics

  def eval_step(state, batch):
    """Whole tiles, no augmentation: the confusion matrix and the loss's sums, and the preview."""
    logits = predict_logits(model, state["params"], batch["image"], state["input_stats"])
    predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    confusion = metrics.pixel_confusion(predictions, batch["mask"], num_classes, batch["valid"], ignore_index)
    numerator, denominator = objective.cross_entropy_terms(
      logits,
      batch["mask"],
      weights=state["class_weights"],
      label_smoothing=loss_config.label_smoothing,
      valid=batch["valid"],
      **loss_kwargs,
    )
    return {
      "sums": {"confusion": confusion, "ce_numerator": numerator, "ce_denominator": denominator},
      "preview": {"image": batch["image"], "mask": batch["mask"], "prediction": predictions, "index": batch["index"]},
    }

  def summarize(rows, sums):
    del rows
    confusion = metrics.confusion_result(sums["confusion"])
    summary = metrics.segmentation_report(confusion, class_names, ignore_index)
    denominator = float(sums["ce_denominator"])
    summary["ce"] = float(sums["ce_numerator"]) / denominator if denominator > 0 else float("nan")
    summary.update(majority_baseline(confusion, class_names, ignore_index))
    logging.info(
      "mIoU %.4f vs %.4f for the majority-class baseline (always %r); pixel accuracy %.4f vs %.4f",
      summary["iou_macro"],
      summary["majority_iou_macro"],
      summary["majority_class"],
      summary["pixel_accuracy"],
      summary["majority_pixel_accuracy"],
    )
    return summary

  def report(summary, out_dir, preview):
    from jaxgeo.evaluate import plots

    confusion = np.asarray(summary["confusion"])
    headline = {"mIoU": summary["iou_macro"], "pixel acc.": summary["pixel_accuracy"]}
    plots.confusion_chart(confusion, class_names, os.path.join(out_dir, "confusion.png"), headline=headline)
    plots.per_class_chart(
      class_names,
      np.asarray(summary["iou_per_class"], np.float64),
      os.path.join(out_dir, "iou_per_class.png"),
      metric="IoU",
      mean=summary["iou_macro"],
      mean_label="mIoU",
    )
    # The first batch's tiles with the most classes in their truth: a grid of plain fields shows little.
    variety = [len(np.unique(mask)) for mask in preview["mask"]]
    shown = sorted(sorted(range(len(variety)), key=lambda i: -variety[i])[:PREVIEW_TILES])
    if shown:
      plots.segmentation_grid(
        _display(preview["image"][shown], bands),
        preview["mask"][shown],
        preview["prediction"][shown],
        class_names,
        os.path.join(out_dir, "predictions.png"),
        colors=class_colors,
        titles=[f"sample {int(i)}" for i in preview["index"][shown]],
        ignore_index=ignore_index,
      )

  def import_pretrained(state):
    """On a fresh start: the class weights (one pass over the train masks, unless data.class_weights or
    loss.weighting="none" says otherwise) and config.init.checkpoint's weights with their input statistics."""
    fixed = {"mean": np.asarray(initial_mean, np.float32), "std": np.asarray(initial_std, np.float32)}
    state = dict(state, input_stats=fixed)
    if given_weights is None and loss_config.weighting != "none":
      counts = class_pixel_counts(
        source,
        num_classes,
        ignore_index=ignore_index,
        on_bad_sample=config.data.on_bad_sample,
        workers=max(config.data.worker_count, 1),
      )
      weights = objective.class_weights(counts, loss_config.weighting)
      _log_class_weights(class_names, counts, weights, f"loss.weighting={loss_config.weighting!r}")
      state["class_weights"] = np.asarray(weights, np.float32)
    elif given_weights is not None:
      logging.info("class weights from data.class_weights: %s", dict(zip(class_names, initial_weights.tolist())))
    if config.init.checkpoint:
      state["params"], stats, note = _pretrained(config.init.checkpoint, state["params"], scaling, in_chans)
      if stats is not None:
        state["input_stats"] = {k: np.asarray(v, np.float32) for k, v in stats.items()}
      logging.info("weights from %s; %s", config.init.checkpoint, note)
    logging.info(
      "model input = (image - %s) / %s (config.model.input_scaling=%r)",
      np.round(np.asarray(state["input_stats"]["mean"]), 4).tolist(),
      np.round(np.asarray(state["input_stats"]["std"]), 4).tolist(),
      scaling,
    )
    return state

  return Task(
    init=init,
    step=step,
    eval_step=eval_step,
    summarize=summarize,
    report=report,
    import_pretrained=import_pretrained,
  )


def _pretrained(path, target, scaling, in_chans):
  """(params, input_stats or None, note) from a torchvision / Satlas / jaxgeo-export file or a jaxgeo
  segmentation run folder. input_stats is returned when config.model.input_scaling is "auto"."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    if not os.path.exists(os.path.join(path, "config.json")):
      raise FileNotFoundError(f"config.init.checkpoint={path}: a folder, but not a jaxgeo run (no config.json)")
    _, params, info = load_run(path)
    merged, kept = _merge_params(target, params, path)
    note = f"jaxgeo run step {info['step']}" + (f"; fresh {', '.join(kept)} (shapes differ)" if kept else "")
    return merged, (info["input_stats"] if scaling == "auto" else None), note
  from jaxgeo import bridge

  requested = scaling if scaling in ("imagenet", "unit") else None
  params, info = bridge.load_segmentation_params(path, target, in_chans=in_chans, input_scaling=requested)
  found = info["input_scaling"]
  note = (
    f"{info['layout']} layout, loaded {info['loaded']}, initialised {info['initialised']}; trained on {found['note']}"
  )
  if scaling != "auto":
    return params, None, note
  if found.get("guessed"):
    logging.warning(
      "%s does not say how its inputs were scaled; assuming %s (%s). Set config.model.input_scaling to "
      "'imagenet', 'unit' or 'dataset' if that is wrong",
      path,
      found["kind"],
      found["note"],
    )
  return params, {"mean": found["mean"], "std": found["std"]}, note


def _merge_params(target, loaded, where):
  """`loaded` params into the tree of `target`; a top-level part ("head" for another class count) whose shapes
  differ keeps the target's. Backbone or FPN mismatches are errors naming the first differing keys."""
  merged, kept = {}, []
  for part, fresh in target.items():
    shapes = lambda tree: jax.tree_util.tree_map_with_path(lambda p, a: (parallel.path_str(p), np.shape(a)), tree)
    want = jax.tree.leaves(shapes(fresh), is_leaf=lambda x: isinstance(x, tuple))
    have = jax.tree.leaves(shapes(loaded.get(part, {})), is_leaf=lambda x: isinstance(x, tuple))
    if want == have:
      merged[part] = loaded[part]
      continue
    if part == "head":
      kept.append(part)
      merged[part] = fresh
      continue
    differ = sorted(set(want) ^ set(have))[:5]
    raise ValueError(
      f"config.init.checkpoint={where}: its {part} differs from config.model's (key, shape) {differ}; the run's "
      "config.json says which architecture it trained"
    )
  return merged, kept
