"""Linear evaluation of a frozen backbone on BigEarthNet: `run_linear_probe(config, workdir)`.

  python -m jaxgeo.main --config=configs/linear_ben.py --workdir=/tmp/probe \
      --config.init.workdir=/tmp/dino          # or --config.init.checkpoint=dino_deitsmall16.pth, or neither

Config (configs/linear_ben.py builds it; defaults from `probe_config()`):
  init.workdir / init.checkpoint / init.which   backbone source, see evaluate/backbone.py (neither: random)
  model.*                                       architecture; must match the loaded weights
  data.*                                        the pretraining data config (splits train/validation/test)
  probe.image_size (224)        whole patches resized with center_resize to this size, as the reference's
                                evaluation transform resizes ImageNet images to 224
  probe.n_last_blocks (4), probe.avgpool (False)   feature definition (evaluate/features.py)
  probe.multilabel (True)       sigmoid BCE + AP; False: softmax CE + top-1 accuracy
  probe.lrs                     learning-rate sweep, every lr trained at once (evaluate/probe.py)
  probe.epochs (100), probe.batch_size (1024), probe.eval_every (5), probe.weight_decay (0)
  probe.feature_batch_size (256)  global batch of the frozen forward pass
  probe.cache_features (True)   compute features once (sharded forward), then train the heads on them
  probe.aug_scale ((0.08, 1))   RandomResizedCrop scale of the on-the-fly mode (cache_features=False)

Why cached features by default: the backbone is frozen, so the forward pass is nearly all of the cost; paid
once, it lets the 100 epochs and the whole lr sweep run in seconds, deterministically, and extraction is
reusable (features are kept under <workdir>/features). The reference instead recomputes features every epoch
on RandomResizedCrop + flip views; that costs `epochs` forward passes, and on 120 px multi-label patches a
crop can cut away the only field carrying a label, so the target becomes noisy. It stays available as
cache_features=False for comparison with the reference protocol.

Writes to <workdir>: linear_probe.json (all numbers), per_class_ap.png, and predictions_{validation,test}.npz
(scores, labels, index, class_names) so anyone can recompute AP, e.g. with scikit-learn.

`compare_with_random_init` is the end of a pretraining run (config.eval.final_probe): the same probe on the run's
features and on its network at random init, for any method: DINO's teacher ViT with the reference feature above,
any other method through its task.embed (MoCo: the query encoder's pooled features) on the run's own dataset.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxgeo import parallel
from jaxgeo.evaluate import backbone, features, metrics, plots, probe


def probe_config(**overrides):
  c = ml_collections.ConfigDict()
  c.image_size = 224
  c.n_last_blocks = 4
  c.avgpool = False
  c.multilabel = True
  c.lrs = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
  c.epochs = 100
  c.batch_size = 1024
  c.eval_every = 5
  c.weight_decay = 0.0
  c.feature_batch_size = 256
  c.cache_features = True
  c.aug_scale = (0.08, 1.0)
  c.update(overrides)
  return c


def data_info(data_config):
  from jaxgeo.data import ben_labels, bigearthnet

  mean, std = bigearthnet.normalization_stats(data_config.bands)
  return mean, std, list(ben_labels.CLASSES_19)


def split_batches(config, split, *, shuffle=False, seed=0):
  from jaxgeo import data

  source = data.build_source(config.data, split)
  per_process = max(config.probe.feature_batch_size // jax.process_count(), 1)
  return data.make_iter_dataset(
    source,
    batch_size_per_process=per_process,
    seed=seed,
    num_epochs=1,
    shuffle=shuffle,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    worker_count=config.data.worker_count,
    prefetch=config.data.prefetch,
    on_bad_sample=config.data.on_bad_sample,
    drop_remainder=shuffle,
  ), len(source)


def split_features(config, apply_fn, split, mesh, cache_dir=None, cache_key=""):
  """(features, labels, index) of a whole split, loaded from cache_dir when computed there with cache_key.

  apply_fn: images [B, H, W, C] (as the pipeline yields them) -> features [B, D]. cache_key names the backbone
  and feature definition, so a workdir reused for another backbone recomputes.
  """
  path = cache_dir and os.path.join(cache_dir, f"{split}.npz")
  if path and os.path.exists(path):
    cached = np.load(path)
    if str(cached["key"]) == cache_key:
      return cached["features"], cached["labels"], cached["index"]
    logging.info("%s was computed for %s; recomputing for %s", path, cached["key"], cache_key)
  batches, _ = split_batches(config, split)
  result = features.extract_features(apply_fn, batches, mesh, with_index=True)
  if path and jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path, features=result[0], labels=result[1], index=result[2], key=cache_key)
  return result


def _train_on_the_fly(config, model, params, mean, std, mesh, val):
  """The reference protocol: every epoch, fresh RandomResizedCrop + flip views through the frozen backbone."""
  from jaxgeo.data import augment

  p = config.probe
  aug = ml_collections.ConfigDict(
    dict(
      global_size=p.image_size,
      local_size=p.image_size,
      local_crops_number=0,
      global_scale=tuple(p.aug_scale),
      local_scale=tuple(p.aug_scale),
      ratio=(3 / 4, 4 / 3),
      flip_p=0.5,
      jitter=(0.0, 0.0, 0.0, 0.0),
      jitter_p=0.0,
      grayscale_p=0.0,
      blur_p=(0.0, 0.0, 0.0),
      blur_sigma=(0.1, 2.0),
      solarize_p=0.0,
      solarize_threshold=0.5,
    )
  )

  @jax.jit
  def augmented_features(params, rng, images):
    crops, _ = augment.multicrop(rng, images, aug, mean, std)  # first global view = RRC + flip only
    return features.vit_features(model, params, crops[0], n_last_blocks=p.n_last_blocks, avgpool=p.avgpool)

  _, num_train = split_batches(config, "train")
  steps_per_epoch = max(num_train // p.feature_batch_size, 1)
  tx = probe.make_tx(p.epochs * steps_per_epoch)
  step = probe.make_step(tx, p.lrs, p.multilabel, p.weight_decay)
  init_rng, rng = jax.random.split(jax.random.key(config.seed))
  heads = opt_state = None
  best, history = {}, []
  for epoch in range(1, p.epochs + 1):
    batches, _ = split_batches(config, "train", shuffle=True, seed=config.seed + epoch)
    for i, batch in enumerate(batches):
      batch_rng = jax.random.fold_in(rng, epoch * 1_000_003 + i)
      feats, labels = features.extract_features(
        lambda images, batch_rng=batch_rng: augmented_features(params, batch_rng, images), [batch], mesh
      )
      if heads is None:
        if labels.ndim != 2:
          raise ValueError(
            "linear probe with cache_features=False needs multi-hot or one-hot labels [B, C] "
            f"(the class count must be known from the first batch), got shape {labels.shape}"
          )
        heads = probe.init_heads(init_rng, len(p.lrs), feats.shape[1], labels.shape[1])
        opt_state = jax.vmap(tx.init)(heads)
      labels = jnp.asarray(probe.prepare_labels(labels, p.multilabel))
      heads, opt_state, _ = step(heads, opt_state, jnp.asarray(feats), labels, jnp.arange(len(feats)))
    if epoch % p.eval_every == 0 or epoch == p.epochs:
      history.append(probe.select(heads, val[0], val[1], p.multilabel, best, epoch, p.lrs))
  best["history"] = history
  return best


def report(best, splits, class_names, multilabel, out_dir, extra=None):
  """Scores the selected head on each split in `splits` ({name: (features, labels, index)}); writes files.

  Returns the results dict that also goes to <out_dir>/linear_probe.json.
  """
  head = jax.tree.map(lambda x: jnp.asarray(x)[None], best["head"])
  results = dict(
    extra or {},
    selected={"lr": best["lr"], "epoch": best["epoch"], "val_selection": best["value"]},
    history=best["history"],
    class_names=class_names,
  )
  os.makedirs(out_dir, exist_ok=True)
  for name, (feats, labels, index) in splits.items():
    scores = probe.predict(head, feats, multilabel)[0]
    numbers = probe.score_metrics(labels, scores, multilabel)
    numbers.pop("selection")
    if multilabel:
      numbers["ap_per_class"] = dict(zip(class_names, numbers["ap_per_class"]))
    numbers["num_samples"] = len(labels)
    results[name] = numbers
    np.savez(
      os.path.join(out_dir, f"predictions_{name}.npz"),
      scores=scores,
      labels=labels,
      index=index,
      class_names=np.asarray(class_names),
    )
  if multilabel and "test" in results:
    test = results["test"]
    plots.per_class_ap_chart(
      list(test["ap_per_class"]),
      list(test["ap_per_class"].values()),
      test["ap_macro"],
      os.path.join(out_dir, "per_class_ap.png"),
      title=f"Linear probe, test AP ({(extra or {}).get('backbone', '')})",
    )
  with open(os.path.join(out_dir, "linear_probe.json"), "w") as f:
    json.dump(metrics.jsonable(results), f, indent=2)
  return results


def probe_backbone(config, model, params, description, out_dir, mesh=None):
  """A ViT backbone through the reference feature (evaluate/features.py): features of train/validation/test, the
  lr sweep, the report. Returns the results dict."""
  p = config.probe
  mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
  mean, std, class_names = data_info(config.data)
  params = jax.device_put(params, parallel.replicated(mesh))
  feature_fn = features.make_feature_fn(
    model, mean=mean, std=std, image_size=p.image_size, n_last_blocks=p.n_last_blocks, avgpool=p.avgpool
  )
  cache_key = (
    f"{description}; bands={config.data.bands}; image_size={p.image_size}; "
    f"n_last_blocks={p.n_last_blocks}; avgpool={p.avgpool}; data={config.data.root}"
  )
  on_the_fly = None
  if not p.cache_features:
    on_the_fly = lambda val: _train_on_the_fly(config, model, params, mean, std, mesh, val)  # noqa: E731
  feature = {"n_last_blocks": p.n_last_blocks, "avgpool": p.avgpool, "image_size": p.image_size}
  apply_fn = lambda images: feature_fn(params, images)  # noqa: E731
  return probe_features(
    config, apply_fn, description, out_dir, mesh, class_names, cache_key, feature, train_on_the_fly=on_the_fly
  )


def probe_features(
  config, apply_fn, description, out_dir, mesh, class_names, cache_key, feature, train_on_the_fly=None
):
  """Features of train/validation/test through apply_fn (images -> [B, D]), the lr sweep on config.probe, the
  report (linear_probe.json, predictions, chart) in out_dir. train_on_the_fly(val) -> best replaces training on
  cached train features (the reference's per-epoch augmented views). Returns the results dict."""
  p = config.probe
  cached = train_on_the_fly is None
  cache_dir = os.path.join(out_dir, "features")
  splits = {
    split: split_features(config, apply_fn, split, mesh, cache_dir, cache_key)
    for split in (("train",) if cached else ()) + ("validation", "test")
  }
  logging.info("linear probe: features %s from %s", {k: v[0].shape for k, v in splits.items()}, description)
  if cached:
    (train_x, train_y, _), (val_x, val_y, _) = splits["train"], splits["validation"]
    best = probe.train_probe(
      train_x,
      train_y,
      val_x,
      val_y,
      multilabel=p.multilabel,
      lrs=tuple(p.lrs),
      epochs=p.epochs,
      batch_size=p.batch_size,
      eval_every=p.eval_every,
      seed=config.seed,
      weight_decay=p.weight_decay,
    )
  else:
    best = train_on_the_fly(splits["validation"])
  extra = {"backbone": description, "feature": dict(feature, dim=int(splits["test"][0].shape[1]), cached=cached)}
  results = report(best, {k: splits[k] for k in ("validation", "test")}, class_names, p.multilabel, out_dir, extra)
  test = results["test"]
  if p.multilabel:
    logging.info(
      "linear probe (%s): test AP macro %.4f micro %.4f (lr %g, epoch %d)",
      description,
      test["ap_macro"],
      test["ap_micro"],
      best["lr"],
      best["epoch"],
    )
  else:
    logging.info("linear probe (%s): test accuracy %.4f", description, test["accuracy"])
  return results


def run_linear_probe(config, workdir):
  """Entry for config.method == "linear": backbone from config.init, results under workdir."""
  from jaxgeo.data import bigearthnet

  in_chans = len(bigearthnet.resolve_bands(config.data.bands))
  model, params, description = backbone.load_backbone(config, in_chans, config.probe.image_size)
  return probe_backbone(config, model, params, description, workdir)


def compare_with_random_init(config, workdir, task, state, mesh):
  """End of a pretraining run (config.eval.final_probe): the probe on the run's features vs the same network at
  random init, both rows in <workdir>/probe_{pretrained,random_init}/ and printed side by side on the test split.

  DINO: the teacher backbone, CLS of the last min(4, depth) blocks at the global-crop size (the reference's linear
  evaluation). Any other method: task.embed on the run's own dataset and labels (config.data), the random-init
  row being task.init(config.seed), i.e. the network the run started from (before any config.init weights).
  Probe settings from config.probe when the config has one, else `probe_config` shrunk for a demo (30 epochs).
  """
  if config.method == "dino":
    eval_config, rows = _dino_rows(config, workdir, state, mesh)
  else:
    eval_config, rows = _embedding_rows(config, workdir, task, state, mesh)
  key = "ap_macro" if eval_config.probe.multilabel else "accuracy"
  lines = [
    f"linear probe on the held-out test split ({rows['pretrained']['test']['num_samples']} patches, "
    f"{'synthetic' if config.data.root is None else config.data.root}): test {key}"
  ]
  lines += [f"  {name:<12} {row['test'][key]:.4f}" for name, row in rows.items()]
  if jax.process_index() == 0:
    print("\n".join(lines))
  logging.info("%s", " | ".join(lines))
  return rows


def _eval_config(config, probe_settings):
  return ml_collections.ConfigDict(
    {
      "seed": config.seed,
      "data": config.data.to_dict(),
      "mesh": config.mesh.to_dict(),
      "probe": probe_settings.to_dict(),
      "model": config.model.to_dict(),
      "init": {},
    }
  )


def _dino_rows(config, workdir, state, mesh):
  from jaxgeo.data import bigearthnet

  size = config.aug.global_size
  pretrained_model = backbone.build_backbone(config.model, size, train_student=False)
  depth = sum(1 for k in state["teacher"]["backbone"] if k.startswith("blocks_"))
  probe_settings = (
    config.probe
    if "probe" in config
    else probe_config(
      image_size=size,
      n_last_blocks=min(4, depth),
      epochs=30,
      batch_size=128,
      feature_batch_size=config.train.global_batch_size,
    )
  )
  eval_config = _eval_config(config, probe_settings)
  in_chans = len(bigearthnet.resolve_bands(config.data.bands))
  random_model, random_params, _ = backbone.load_backbone(eval_config, in_chans, size)
  rows = {
    "pretrained": probe_backbone(
      eval_config,
      pretrained_model,
      state["teacher"]["backbone"],
      f"pretrained teacher, step {int(state['step'])}",
      os.path.join(workdir, "probe_pretrained"),
      mesh,
    ),
    "random init": probe_backbone(
      eval_config, random_model, random_params, "random init", os.path.join(workdir, "probe_random_init"), mesh
    ),
  }
  return eval_config, rows


def _embedding_rows(config, workdir, task, state, mesh):
  from jaxgeo import data

  if task.embed is None:
    raise ValueError(f"config.eval.final_probe: method {config.method!r} has no embed (features to probe)")
  source = data.build_source(config.data, "test")
  settings = config.probe if "probe" in config else probe_config(epochs=30, batch_size=128)
  settings = ml_collections.ConfigDict(settings.to_dict())
  settings.multilabel = source.label_kind == "multilabel"  # the labels decide: sigmoid + AP or softmax + accuracy
  if "probe" not in config:
    settings.feature_batch_size = config.train.global_batch_size
  eval_config = _eval_config(config, settings)
  embed = jax.jit(task.embed)
  random_state = jax.jit(task.init, out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(config.seed))
  data_key = f"{config.data.dataset} {config.data.get('sensor', config.data.get('bands', ''))} root={config.data.root}"
  rows = {}
  for name, chosen, description in (
    ("pretrained", state, f"{config.method} task.embed, step {int(state['step'])}"),
    ("random init", random_state, f"{config.method} task.embed at random init (seed {config.seed})"),
  ):
    apply_fn = lambda images, chosen=chosen: embed(chosen, images)  # noqa: E731
    out_dir = os.path.join(workdir, f"probe_{name.replace(' ', '_')}")
    rows[name] = probe_features(
      eval_config, apply_fn, description, out_dir, mesh, list(source.class_names), f"{description}; {data_key}", {}
    )
  return eval_config, rows
