"""MoCo v2 (facebookresearch/moco) on satellite imagery, with the seed's sensor-pair positives and band adapters.

One step, in the reference's order (objectives/infonce.py holds the pieces, tests/test_infonce.py checks them
against a PyTorch MoCo step): views drawn on the device and normalised once -> band adapters -> query encoder ->
momentum update of the key encoder's params -> keys shuffled over the global batch -> key encoder -> unshuffled
-> logits [q.k, q.queue] / T -> cross-entropy against column 0 -> the keys enqueued -> SGD (momentum 0.9, weight
decay added to the gradient of every trained parameter, as main_moco's torch.optim.SGD) at the epoch's lr
(cosine, constant within an epoch, as adjust_learning_rate).

Shuffle BN on any mesh: train-mode BatchNorm takes its statistics per run of `moco.bn_group_size` consecutive
samples (one reference GPU's batch; models/resnet.py), and the key batch is permuted over the whole global batch
first, as the reference's broadcast randperm hands each GPU a random slice. The result depends on the batch only,
never on the number of devices.

Pairings (`config.moco.pairing`):
  augment         MoCo v2: two views of one image (the bands of data.sensor), 1 + K way instance discrimination
  sensor          the seed's method: the S2 image (query) and the S1 image (key) of the same place, each through
                  its own 1x1 band adapter (N -> 3 bands, BatchNorm, ReLU) into one RGB-stem ResNet; with
                  moco.swap_halves (default) the second half of every reference-GPU batch (bn_group_size
                  samples) swaps roles (S1 query, S2 key), as the seed's forward_train does per GPU
  fusion_all      two views of the stacked image, S2 then S1 (data.sensor = s1s2), read by a 12-band conv1
  fusion_partial  as fusion_all, but each sample is S1 only, S2 only or S1 + S2 in equal shares (a balanced
                  draw per batch from the step key), the missing sensor's channels zero in raw units (0 DN / 0 dB)
                  before normalisation, as the seed's fusion images (gen_s1s2_fusion_image)

Where the seed is followed and where it is not (see /work/shared/reference/moco_sen12ms.md, section 2):
  * adapters are trained by SGD with weight decay (its code), or frozen (moco.freeze_adapters: its draft's
    wording); they are never momentum-copied: the key image goes through the same adapter as a query image of
    that sensor would, and gets no gradient on the key side (the seed's key encoder runs under no_grad);
  * each adapter sees its sensor's whole reference-GPU batch in one train-mode forward (BatchNorm groups of
    bn_group_size, before the key shuffle), as the seed's input modules do;
  * its random q/k swap is a no-op bug and is not reproduced; its inputs were normalised twice (scaled to [0, 1],
    then standardised with raw-unit statistics): here views are drawn in raw units and normalised once;
  * its albumentations pipeline flipped bands instead of pixels; the sets of its draft are used instead
    (augment.sensor_pair_set, moco.aug_set 1 | 2 | 3; 0 = MoCo v2 "aug+" for multispectral input). S1 is
    augmented as dB above the data's floor (data.s1_clip_db[0]): the seed's [0, 1] S1 scaling times 25, so a
    brightness factor scales backscatter the way it did there and values never go below the floor.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxgeo import parallel
from jaxgeo.data import augment
from jaxgeo.data.sen12ms import S1_BANDS
from jaxgeo.models.resnet import BatchNorm, ResNet50
from jaxgeo.models.vit import compute_dtype
from jaxgeo.objectives import infonce
from jaxgeo.train.task import Task

PAIRINGS = ("augment", "sensor", "fusion_all", "fusion_partial")
# Partial fusion: which sensors a sample keeps.
BOTH, S2_ONLY, S1_ONLY = 0, 1, 2


def moco_config():
  """config.moco: the reference's MoCo v2 numbers (main_moco.py --mlp --moco-t 0.2 --aug-plus --cos)."""
  import ml_collections

  c = ml_collections.ConfigDict()
  c.pairing = "sensor"  # augment | sensor | fusion_all | fusion_partial
  c.swap_halves = True  # sensor: second half of every bn_group_size samples has S1 queries and S2 keys (the seed)
  c.aug_set = ml_collections.config_dict.placeholder(int)  # 0 MoCo v2 aug+, 1-3 the seed's; None: 0 augment, else 2
  c.adapter = ml_collections.config_dict.placeholder(bool)  # None: adapters for sensor only; True: also others
  c.freeze_adapters = False  # True: adapters keep their initial weights and statistics (the seed's draft)
  c.image_size = 224  # views are random resized crops to this size
  c.dim = 128
  c.mlp_hidden = 2048
  c.queue_size = 65536  # K, a multiple of the global batch
  c.momentum = 0.999  # key encoder EMA
  c.temperature = 0.2
  c.bn_group_size = 64  # samples per BatchNorm group = the reference's per-GPU batch (256 over 4 GPUs)
  return c


def optim_config():
  import ml_collections

  return ml_collections.ConfigDict(dict(base_lr=0.03, momentum=0.9, weight_decay=1e-4))  # lr at batch 256


class BandAdapter(nn.Module):
  """The seed's Conv1x1Block: 1x1 conv (no bias) N -> 3 bands, BatchNorm, ReLU; a `frozen` one always uses its
  running statistics and passes no gradient. Param names are ResNet50's band adapter ones (adapter_conv,
  adapter_bn), so a classifier can take it over. Initialised as the seed's was: torch's default conv init
  (its own init_weights is never called)."""

  group_size: int
  frozen: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train):
    init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # kaiming_uniform_(a=sqrt(5))
    x = nn.Conv(3, (1, 1), use_bias=False, kernel_init=init, dtype=self.dtype, name="adapter_conv")(images)
    use_running = self.frozen or not train
    x = nn.relu(BatchNorm(use_running, self.group_size, dtype=self.dtype, name="adapter_bn")(x))
    return jax.lax.stop_gradient(x) if self.frozen else x


def build_encoder(config):
  """ResNet-50 (stages / width from config.model) with MoCo v2's 2048-2048-dim MLP projector and grouped BN."""
  model = config.model
  if model.get("arch", "resnet50") != "resnet50":
    raise ValueError(f"config.model.arch={model.arch!r}: MoCo trains a ResNet-50 ('resnet50', any stages / width)")
  return ResNet50(
    num_classes=config.moco.dim,
    head="mlp",
    mlp_hidden=config.moco.mlp_hidden,
    stages=tuple(model.stages),
    width=model.width,
    bn_group_size=config.moco.bn_group_size,
    dtype=compute_dtype(model.dtype),
  )


def resolved(moco):
  """(aug_set, adapter) with the pairing's defaults filled in."""
  aug_set = moco.aug_set if moco.aug_set is not None else (0 if moco.pairing == "augment" else 2)
  adapter = moco.adapter if moco.adapter is not None else moco.pairing == "sensor"
  return aug_set, adapter


def view_recipe(aug_set):
  if aug_set not in (0, 1, 2, 3):
    raise ValueError(f"config.moco.aug_set={aug_set!r}: expected 0 (MoCo v2 aug+) or the seed's set 1, 2 or 3")
  recipe = augment.moco_v2(rgb=False) if aug_set == 0 else augment.sensor_pair_set(aug_set)
  recipe.clip = (0.0, None)  # S2 DN and S1 dB above the floor (see _offsets) are both non-negative
  return recipe


def _offsets(bands, data_config):
  """Per-band shift that makes raw values non-negative for augmentation: S1 dB -> dB above data.s1_clip_db[0]."""
  floor = float(data_config.s1_clip_db[0]) if "s1_clip_db" in data_config else 0.0
  return tuple(-floor if band in S1_BANDS else 0.0 for band in bands)


def _views(rng, images, offsets, recipe, size, num_views):
  """augment.views in raw units, drawn on the shifted (non-negative) values and shifted back."""
  if not any(offsets):
    return augment.views(rng, images, recipe, size, num_views)
  shift = jnp.asarray(offsets, jnp.float32)
  return augment.views(rng, jnp.asarray(images, jnp.float32) + shift, recipe, size, num_views) - shift


def _check_pairing(config, source, bands):
  """The data the pairing needs, checked before anything is compiled; returns the adapters {name: in_bands}."""
  moco = config.moco
  if moco.pairing not in PAIRINGS:
    raise ValueError(f"config.moco.pairing={moco.pairing!r}; expected one of {PAIRINGS}")
  _, adapter = resolved(moco)
  if moco.pairing == "sensor":
    stats = getattr(source, "norm_stats", {})
    if "s1" not in stats or "s2" not in stats:
      raise ValueError(
        "config.moco.pairing='sensor' needs the S1 and S2 image of every sample: set config.data.pair_sensors=True "
        "(SEN12MS; the source then yields 's1' and 's2')"
      )
    if not adapter:
      raise ValueError(
        "config.moco.adapter=False with pairing='sensor': S1 and S2 reach the encoder only through adapters"
      )
    if tuple(stats["image"][0]) != tuple(stats["s2"][0]):
      raise ValueError(
        f"config.data.sensor gives bands {tuple(bands)}; pairing='sensor' embeds the S2 image through the S2 adapter "
        "(kNN monitor, probes), so data.sensor must be 's2', the bands of the 's2' key"
      )
    if moco.swap_halves and moco.bn_group_size % 2:
      raise ValueError(f"config.moco.bn_group_size={moco.bn_group_size} must be even with moco.swap_halves (halves)")
    return {"s2": len(stats["s2"][0]), "s1": len(stats["s1"][0])}
  if moco.pairing.startswith("fusion"):
    s1 = [b for b in bands if b in S1_BANDS]
    if not s1 or len(s1) == len(bands):
      raise ValueError(
        f"config.moco.pairing={moco.pairing!r} stacks S2 and S1, but config.data.sensor gives bands {tuple(bands)}; "
        "use data.sensor='s1s2' (the seed's 12 channels, S2 then S1)"
      )
  return {"image": len(bands)} if adapter else {}


def sensor_pairs(s2, s1, group=None):
  """(query, key) images of the sensor pairing from adapter outputs s2, s1 [B, ...]: S2 queries and S1 keys, and
  with `group` the second half of every run of `group` samples swapped (S1 query, S2 key). The seed does
  im_q = cat(q3[:B/2], k3[B/2:]) on each GPU's batch B; a group is one reference GPU's batch."""
  if group is None:
    return s2, s1
  second_half = (jnp.arange(s2.shape[0]) % group >= group // 2).reshape((-1,) + (1,) * (s2.ndim - 1))
  return jnp.where(second_half, s1, s2), jnp.where(second_half, s2, s1)


def partial_fusion_channels(rng, batch_size, s1_channels):
  """[B, C] float 1 / 0: the channels each partial-fusion sample keeps. Kinds BOTH, S2_ONLY and S1_ONLY in equal
  shares (a random permutation of the batch, taken modulo 3: counts differ by at most one), drawn from `rng`.
  s1_channels: [C] bool, True for the S1 (VV, VH) channels of the stacked image."""
  kinds = jax.random.permutation(rng, batch_size) % 3
  s1_channels = jnp.asarray(s1_channels, bool)
  keep_s1 = (kinds != S2_ONLY)[:, None] & s1_channels[None, :]
  keep_s2 = (kinds != S1_ONLY)[:, None] & ~s1_channels[None, :]
  return (keep_s1 | keep_s2).astype(jnp.float32)


def make_views(config, bands, norm_stats):
  """views_fn(rng, batch) -> the pairing's normalised views, drawn on the device with a key per sample:
  {"query", "key"} [B, S, S, C] of batch["image"] (augment, fusion_*), or {"s2", "s1"} [B, S, S, 10 | 2], one
  view of each sensor (sensor pairing). S = moco.image_size; norm_stats: {"image": (mean, std)} (+ "s1", "s2")
  in the source's raw units, applied once, after the views (and after partial fusion's zero-filling)."""
  moco = config.moco
  recipe, size = view_recipe(resolved(moco)[0]), moco.image_size
  offsets = _offsets(bands, config.data)
  s1_channels = np.asarray([b in S1_BANDS for b in bands])

  def views_fn(rng, batch):
    view_rng, kind_rng = jax.random.split(rng)
    if moco.pairing == "sensor":
      out = {}
      for i, name in enumerate(("s2", "s1")):
        shift = _offsets(S1_BANDS, config.data) if name == "s1" else ()  # S2 DN need none
        view = _views(jax.random.fold_in(view_rng, i), batch[name], shift, recipe, size, 1)[0]
        out[name] = augment.normalize(view, *norm_stats[name])
      return out
    views = _views(view_rng, batch["image"], offsets, recipe, size, 2)
    if moco.pairing == "fusion_partial":
      views = views * partial_fusion_channels(kind_rng, views.shape[1], s1_channels)[None, :, None, None, :]
    mean, std = norm_stats["image"]
    return {"query": augment.normalize(views[0], mean, std), "key": augment.normalize(views[1], mean, std)}

  return views_fn


def make_task(config, *, steps_per_epoch, total_steps, in_chans, mean, std, mesh, source=None):
  moco, optim = config.moco, config.optim
  global_batch = config.train.global_batch_size
  infonce.check_sizes(queue_size=moco.queue_size, global_batch_size=global_batch, bn_group_size=moco.bn_group_size)
  bands = tuple(source.bands) if source is not None else tuple(f"band{i}" for i in range(in_chans))
  adapters = _check_pairing(config, source, bands)
  encoder = build_encoder(config)
  group, size = moco.bn_group_size, moco.image_size
  adapter_model = BandAdapter(group, moco.freeze_adapters, encoder.dtype)
  encoder_chans = 3 if adapters else in_chans
  offsets = _offsets(bands, config.data)
  views_fn = make_views(config, bands, dict(getattr(source, "norm_stats", {}), image=(mean, std)))
  per_device = global_batch // mesh.size
  if per_device % group and group % per_device:
    logging.info(
      "moco.bn_group_size=%d and %d samples per device: BatchNorm groups straddle devices", group, per_device
    )
  tx = optax.chain(optax.add_decayed_weights(optim.weight_decay), optax.trace(decay=optim.momentum))
  lr_peak = optim.base_lr * global_batch / 256
  epochs = max(total_steps / steps_per_epoch, 1.0)
  key_sharding = parallel.batch_sharding(mesh, 4)

  def trainable(params):
    return {"encoder": params["encoder"]} if moco.freeze_adapters or not adapters else params

  def init(rng):
    enc_rng, adapter_rng, queue_rng, state_rng = jax.random.split(rng, 4)
    variables = encoder.init(enc_rng, jnp.zeros((1, size, size, encoder_chans), jnp.float32))
    params, stats = {"encoder": variables["params"]}, {"encoder": variables["batch_stats"]}
    if adapters:
      params["adapters"], stats["adapters"] = {}, {}
      for i, (name, chans) in enumerate(sorted(adapters.items())):
        made = adapter_model.init(jax.random.fold_in(adapter_rng, i), jnp.zeros((1, 1, 1, chans)), train=False)
        params["adapters"][name], stats["adapters"][name] = made["params"], made["batch_stats"]
    return {
      "params": params,
      "batch_stats": stats,
      # The key encoder starts as a copy; from then on its params follow the query's EMA and its BatchNorm
      # statistics come from its own train-mode forwards.
      "key": jax.tree.map(jnp.copy, {"params": params["encoder"], "batch_stats": stats["encoder"]}),
      "opt_state": tx.init(trainable(params)),
      "queue": infonce.init_queue(queue_rng, moco.dim, moco.queue_size),
      "queue_ptr": jnp.zeros((), jnp.int32),
      "step": jnp.zeros((), jnp.int32),
      "rng": state_rng,
    }

  def adapt(name, params, stats, images):
    out, updates = adapter_model.apply(
      {"params": params[name], "batch_stats": stats[name]}, images, train=True, mutable=["batch_stats"]
    )
    return out, updates["batch_stats"]

  def encoder_inputs(adapter_params, adapter_stats, inputs):
    """(query images, key images, adapter statistics) for the encoder, 3 bands wherever there are adapters."""
    if moco.pairing == "sensor":
      s2, s2_stats = adapt("s2", adapter_params, adapter_stats, inputs["s2"])
      s1, s1_stats = adapt("s1", adapter_params, adapter_stats, inputs["s1"])
      query, key = sensor_pairs(s2, s1, group if moco.swap_halves else None)
      return query, key, {"s2": s2_stats, "s1": s1_stats}
    if not adapters:
      return inputs["query"], inputs["key"], None
    query, stats = adapt("image", adapter_params, adapter_stats, inputs["query"])
    key, stats = adapt("image", adapter_params, {"image": stats}, inputs["key"])
    return query, key, {"image": stats}

  def step(state, batch):
    step_index = state["step"]
    rng = jax.random.fold_in(state["rng"], step_index)
    view_rng, shuffle_rng = jax.random.split(rng)
    inputs = views_fn(view_rng, batch)
    params, stats = state["params"], state["batch_stats"]
    # Before the key forward, from the query params as they are before this step's update (the reference).
    key_params = infonce.momentum_update(state["key"]["params"], params["encoder"], moco.momentum)

    def loss_fn(trained):
      current = dict(params, **trained)
      query_images, key_images, adapter_stats = encoder_inputs(current.get("adapters"), stats.get("adapters"), inputs)
      query, query_updates = encoder.apply(
        {"params": current["encoder"], "batch_stats": stats["encoder"]},
        query_images,
        train=True,
        mutable=["batch_stats"],
      )
      shuffled, unshuffle_index = infonce.shuffle_keys(shuffle_rng, jax.lax.stop_gradient(key_images))
      shuffled = jax.lax.with_sharding_constraint(shuffled, key_sharding)
      key, key_updates = encoder.apply(
        {"params": key_params, "batch_stats": state["key"]["batch_stats"]},
        shuffled,
        train=True,
        mutable=["batch_stats"],
      )
      logits, keys = infonce.contrastive_logits(
        query, infonce.unshuffle(key, unshuffle_index), state["queue"], moco.temperature
      )
      new_stats = {"encoder": query_updates["batch_stats"]}
      if adapter_stats is not None:
        new_stats["adapters"] = adapter_stats
      return infonce.infonce_loss(logits), (logits, keys, new_stats, key_updates["batch_stats"])

    trained = trainable(params)
    (loss, (logits, keys, new_stats, key_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    grad_norm = optax.tree.norm(grads)
    epoch = (step_index // steps_per_epoch).astype(jnp.float32)
    lr = lr_peak * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs)) * state["lr_scale"]
    updates, opt_state = tx.update(grads, state["opt_state"], trained)
    trained = jax.tree.map(lambda p, u: p - lr * u, trained, updates)
    queue, queue_ptr = infonce.enqueue(state["queue"], state["queue_ptr"], keys)

    # A non-finite loss or gradient never reaches the weights, the statistics or the queue: the step is dropped.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = {
      "params": dict(params, **trained),
      "batch_stats": dict(stats, **new_stats),
      "key": {"params": key_params, "batch_stats": key_stats},
      "opt_state": opt_state,
      "queue": queue,
      "queue_ptr": queue_ptr,
    }
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, {k: state[k] for k in new_state})
    new_state.update(step=step_index + 1, rng=state["rng"])
    metrics = {
      "loss": loss,
      **infonce.instance_accuracy(logits),
      "positive_cosine": jnp.mean(logits[:, 0]) * moco.temperature,
      "grad_norm": grad_norm,
      "lr": lr,
      "finite": finite,
      "num_skipped": jnp.sum(batch["num_skipped"]),
    }
    return new_state, metrics

  embed_adapter = "s2" if moco.pairing == "sensor" else ("image" if adapters else None)

  def embed(state, images):
    """Pooled query-encoder features of whole patches resized to moco.image_size (S2 through its adapter in
    sensor pairing): the kNN monitor's and the end-of-run probe's view."""
    shift = jnp.asarray(offsets, jnp.float32)
    images = augment.center_resize(jnp.asarray(images, jnp.float32) + shift, size, clip=(0.0, None)) - shift
    x = augment.normalize(images, mean, std)
    if embed_adapter is not None:
      name = embed_adapter
      variables = {"params": state["params"]["adapters"][name], "batch_stats": state["batch_stats"]["adapters"][name]}
      x = adapter_model.apply(variables, x, train=False)
    variables = {"params": state["params"]["encoder"], "batch_stats": state["batch_stats"]["encoder"]}
    _, features = encoder.apply(variables, x, train=False, return_features=True)
    return features["pooled"]

  def import_pretrained(state):
    """config.init.checkpoint: a MoCo checkpoint (official or the seed's) as a whole MoCo state, or a plain
    ResNet-50 (torchvision, timm, SSL4EO-S12) as both encoders' backbone."""
    if not config.init.checkpoint:
      return state
    from jaxgeo.bridge import moco as moco_bridge

    return moco_bridge.init_state(state, config.init.checkpoint, bands=bands, which=config.init.which or None)

  return Task(init=init, step=step, embed=embed, import_pretrained=import_pretrained)


def load_query_encoder(run_dir, step=None):
  """A jaxgeo MoCo run's query side for fine-tuning: {"backbone": {"params", "batch_stats"} (ResNet-50, its MoCo
  projector in fc_0 / fc_1), "adapters": {band set: {"params", "batch_stats"}} ("s2" and "s1" for sensor pairing,
  the run's data.sensor otherwise; empty without adapters), "config": the run's stored config}. Host arrays."""
  from jaxgeo import checkpoint
  from jaxgeo import workdir as workdir_lib

  config = workdir_lib.load_config(run_dir)
  if config.get("method") != "moco":
    raise ValueError(f"{run_dir}: config.json says method={config.get('method')!r}, not a MoCo run")
  state = checkpoint.load_state(run_dir, step)
  adapters = {}
  for name, params in state["params"].get("adapters", {}).items():
    sensor = config.data.sensor if name == "image" else name
    adapters[sensor] = {"params": params, "batch_stats": state["batch_stats"]["adapters"][name]}
  backbone = {"params": state["params"]["encoder"], "batch_stats": state["batch_stats"]["encoder"]}
  return {"backbone": backbone, "adapters": adapters, "config": config}
