"""The one training loop every method runs: mesh, input, state, sharded step, metrics, checkpoints.

Read top to bottom: setup -> input -> task -> state (fresh, imported or resumed) -> step -> loop -> finish.
A method plugs in through `make_task(config, **context) -> Task` (see train/dino.py).
"""

import functools
import math
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metrics as clu_metrics

from jaxgeo import checkpoint, data, parallel
from jaxgeo.data import pipeline
from jaxgeo.train import checks, writers


class NonFiniteError(FloatingPointError):
  pass


class _StopFlag:
  """SIGTERM / SIGINT only set a flag: the loop saves at the current step and exits between two steps."""

  def __init__(self):
    self.signal = None
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C means "now"
    self.signal = signal.Signals(signum).name

  def agreed(self, step, every):
    """The signal name once every process has seen it, else None.

    One process alone must never leave the loop (the others would wait in the next collective forever), so
    with several processes the flags are combined every `every` steps; a preemption notice gives far more
    time than that.
    """
    if jax.process_count() == 1:
      return self.signal
    if step % every:
      return None
    from jax.experimental import multihost_utils

    seen = multihost_utils.process_allgather(np.int32(self.signal is not None))
    return (self.signal or "SIGTERM") if np.any(seen) else None

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def make_input(config, split, *, shuffle=True, num_epochs=1, drop_remainder=True, source=None):
  """Grain dataset of this process's share of `split` (or of the given source), plus its source."""
  source = data.build_source(config.data, split) if source is None else source
  per_process = config.train.global_batch_size // jax.process_count()
  dataset = pipeline.make_iter_dataset(
    source,
    batch_size_per_process=per_process,
    seed=config.seed,
    num_epochs=num_epochs,
    shuffle=shuffle,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    worker_count=config.data.worker_count,
    prefetch=config.data.prefetch,
    on_bad_sample=config.data.on_bad_sample,
    drop_remainder=drop_remainder,
  )
  return source, dataset


def run(config, workdir, make_task):
  """Trains until the schedule ends or a stop signal arrives; returns "done" or "preempted"."""
  # ---- setup: everything that can be wrong is found before the first compile.
  parallel.initialize_distributed(config.distributed)
  mesh = parallel.make_mesh(config.mesh)
  checks.check_config(config, device_count=mesh.size, process_count=jax.process_count())
  checks.prepare_workdir(workdir)
  is_chief = jax.process_index() == 0

  # ---- input
  source = data.build_source(config.data, "train")
  global_batch = config.train.global_batch_size
  steps_per_epoch = len(source) // global_batch
  checks.check_schedule(config, steps_per_epoch, len(source))
  total_steps = config.train.steps if config.train.steps > 0 else config.train.epochs * steps_per_epoch
  _, dataset = make_input(config, "train", num_epochs=math.ceil(total_steps / steps_per_epoch), source=source)
  iterator = iter(dataset)
  mean, std = source.norm_stats["image"]

  # ---- task and state: created already sharded (eval_shape -> rules -> jitted init with out_shardings).
  task = make_task(
    config,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    in_chans=len(source.bands),
    mean=mean,
    std=std,
    mesh=mesh,
  )
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(task.init, rng)
  shardings = parallel.tree_shardings(abstract, config.sharding_rules, mesh)
  logging.info(
    "mesh %s, sharding rules %s\n%s",
    dict(mesh.shape),
    config.sharding_rules,
    parallel.sharding_summary(abstract, shardings),
  )
  checks.check_disk(workdir, abstract, config.train.keep_checkpoints)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  if ckpt.latest_step() is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    state = ckpt.restore(target, iterator)
    logging.info("resuming from step %d of %d", int(state["step"]), total_steps)
  else:
    state = jax.jit(task.init, out_shardings=shardings)(rng)
    if config.init.checkpoint:
      state = _import_backbone(config, task, state, shardings)

  # ---- step
  batch = next(iterator)
  batch_shardings = {k: parallel.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
  step_fn = jax.jit(
    task.step,
    in_shardings=(shardings, batch_shardings),
    out_shardings=(shardings, parallel.replicated(mesh)),
    donate_argnums=0,
  )
  knn = _KnnMonitor(config, task, mesh) if config.eval.knn_every > 0 else None

  # ---- loop
  writer = writers.MetricWriter(workdir, enabled=is_chief)
  if knn is not None and int(jax.device_get(state["step"])) == 0:
    # The untrained network's score is the baseline the later kNN numbers should beat.
    baseline = knn(state)
    writer.write(0, baseline)
    logging.info("kNN monitor at initialisation: %s", baseline)
  stop = _StopFlag()
  pending, averages = [], {}
  skipped_total = 0
  first_step = step = int(jax.device_get(state["step"]))
  interval_start, interval_first = time.perf_counter(), step
  status = "done"
  logging.info(
    "training %d steps (%d per epoch, global batch %d) on %d devices",
    total_steps,
    steps_per_epoch,
    global_batch,
    mesh.size,
  )
  try:
    while step < total_steps:
      if batch is None:
        batch = next(iterator)
      state, step_metrics = step_fn(state, parallel.host_to_global(batch, mesh))
      batch = None
      step += 1
      pending.append((step, step_metrics))
      for key, value in step_metrics.items():
        avg = clu_metrics.Average.from_model_output(jnp.asarray(value, jnp.float32))
        averages[key] = averages[key].merge(avg) if key in averages else avg

      # Read the flag once: a signal landing between the save decision and the exit check must not
      # skip the save.
      stopping = stop.agreed(step, config.train.log_every)
      save_now = step % config.train.checkpoint_every == 0 or step == total_steps or stopping
      if step % config.train.log_every == 0 or save_now:
        # Materialising metrics is also where a non-finite step is found, so it comes before any save.
        skipped_total += _check_pending(pending, config)
        checks.check_skipped(skipped_total, step * global_batch, config.data.max_skipped_fraction)
        scalars = {k: float(v.compute()) for k, v in averages.items()}
        elapsed = time.perf_counter() - interval_start
        rate = (step - interval_first) * global_batch / max(elapsed, 1e-9)
        scalars.update(images_per_s=rate, skipped_samples=skipped_total)
        if knn is not None and (step % config.eval.knn_every == 0 or step == total_steps):
          scalars.update(knn(state))
        writer.write(step, scalars)
        _log_line(step, total_steps, scalars, rate, global_batch)
        pending, averages = [], {}
        interval_start, interval_first = time.perf_counter(), step
      if save_now:
        ckpt.save(step, state, iterator)
      if stopping:
        status = "preempted"
        logging.warning(
          "%s received: saved step %d of %d to %s; run the same command to resume",
          stopping,
          step,
          total_steps,
          ckpt.directory,
        )
        break
  finally:
    stop.restore()
    ckpt.wait()
    ckpt.close()
    writer.close()

  if is_chief and step > first_step:
    path = writers.plot_training_curves(workdir, title=f"{config.method} {config.model.arch}")
    logging.info("loss curve: %s", path)
  if status == "done" and config.eval.final_probe:
    from jaxgeo.evaluate import linear

    linear.compare_with_random_init(config, workdir, task, state, mesh)
  return status


def _check_pending(pending, config):
  """Host-side look at the steps since the last check: non-finite steps and skipped samples."""
  skipped = 0
  for step, step_metrics in pending:
    values = jax.device_get(step_metrics)
    skipped += int(values["num_skipped"])
    if not bool(values["finite"]):
      message = (
        f"non-finite value at step {step}: loss={float(values['loss'])}, "
        f"grad_norm={float(values['grad_norm'])}; the step's update was dropped"
      )
      if config.train.on_nonfinite == "error":
        raise NonFiniteError(
          message + "; stopping with the last good checkpoint kept (set --config.train.on_nonfinite=skip to train on)"
        )
      logging.warning(message)
  return skipped


def _log_line(step, total, scalars, rate, global_batch):
  remaining = (total - step) * global_batch / max(rate, 1e-9)
  extras = " ".join(
    f"{k}={scalars[k]:.4g}"
    for k in ("lr", "weight_decay", "teacher_momentum", "teacher_temp", "knn_ap_macro")
    if k in scalars
  )
  logging.info(
    "step %d/%d loss=%.4f %s | %.1f img/s, ETA %s",
    step,
    total,
    scalars["loss"],
    extras,
    rate,
    time.strftime("%H:%M:%S", time.gmtime(remaining)),
  )


def _import_backbone(config, task, state, shardings):
  """Starts from PyTorch weights (config.init.checkpoint): backbone of student and teacher alike."""
  from jaxgeo import bridge

  section, name = task.backbone_path
  # Only shapes are read: device_get would fail on arrays sharded over devices of other processes.
  target = state[section][name]
  imported = bridge.load_vit_backbone_params(config.init.checkpoint, target, which=config.init.which)
  state = dict(state)
  for key in (section, "teacher"):
    state[key] = dict(state[key])
    state[key][name] = imported
  logging.info("backbone initialised from %s (%s)", config.init.checkpoint, config.init.which)
  return jax.device_put(state, shardings)


class _KnnMonitor:
  """Held-out kNN AP every few steps, so collapse or progress shows in the training log itself."""

  def __init__(self, config, task, mesh):
    from jaxgeo.evaluate import knn

    self._knn = knn
    self.mesh = mesh
    self.embed = jax.jit(task.embed)
    self.bank = self._batches(config, "train", config.eval.knn_batches)
    self.queries = self._batches(config, "validation", config.eval.knn_batches)

  @staticmethod
  def _batches(config, split, n):
    _, dataset = make_input(config, split, shuffle=False, drop_remainder=False)
    batches = []
    for batch in dataset:
      batches.append(batch)
      if len(batches) == n:
        break
    return batches

  def __call__(self, state):
    return self._knn.knn_monitor(functools.partial(self.embed, state), self.bank, self.queries, mesh=self.mesh)
