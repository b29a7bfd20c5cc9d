"""The one training loop every method runs: mesh, input, state, sharded step, metrics, evaluation, checkpoints.

Read top to bottom: setup -> input -> task -> state (fresh, imported or resumed) -> step -> loop -> finish.
A method plugs in through `make_task(config, **context) -> Task` (train/task.py says what a Task holds).

What a long run can count on here: the workdir is locked (one run at a time) and holds the config it started
with, so a resume with a config that would train something else is refused (workdir.py); checkpoints are
verified and a damaged one is set aside for the previous one (checkpoint.py); a non-finite step never reaches
the weights and either stops the run, naming the checkpoints to resume from, or is skipped within bounds; the
counts of skipped samples and non-finite steps survive resumes; a finished run rerun says so and exits.
"""

import functools
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metrics as clu_metrics

from jaxgeo import checkpoint, data, parallel
from jaxgeo import workdir as workdir_lib
from jaxgeo.data import pipeline
from jaxgeo.errors import RunError
from jaxgeo.evaluate import metrics
from jaxgeo.train import checks, evaluation, writers


class NonFiniteError(RunError, FloatingPointError):
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


def make_input(
  config, split, *, shuffle=True, num_epochs=1, drop_remainder=True, source=None, start_batch=0, batch_size=None
):
  """Grain dataset of this process's share of `split` (or of the given source), plus its source."""
  source = data.build_source(config.data, split) if source is None else source
  per_process = (batch_size or config.train.global_batch_size) // jax.process_count()
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
    start_batch=start_batch,
  )
  return source, dataset


def run(config, workdir, make_task):
  """Trains until the schedule ends, early stopping or a stop signal; returns "done", "early_stopped",
  "preempted" or "complete" (the run had already finished)."""
  parallel.initialize_distributed(config.distributed)
  mesh = parallel.make_mesh(config.mesh)
  checks.check_config(config, device_count=mesh.size, process_count=jax.process_count())
  checks.prepare_workdir(workdir)
  with workdir_lib.WorkdirLock(workdir):
    return _run(config, workdir, make_task, mesh)


def with_loop_fields(init):
  """The state the loop trains: the task's, plus the loop's own fields ("lr_scale", see train/task.py)."""

  def wrapped(rng):
    return dict(init(rng), lr_scale=jnp.ones((), jnp.float32))

  return wrapped


def _carry_loop_fields(step):
  """A method's step need not know the loop's own state fields: they pass through unless it sets them."""

  def wrapped(state, batch):
    new_state, metrics = step(state, batch)
    return dict(new_state, lr_scale=new_state.get("lr_scale", state["lr_scale"])), metrics

  return wrapped


def _run(config, workdir, make_task, mesh):
  is_chief = jax.process_index() == 0

  # ---- input: the train split decides the schedule.
  source = data.build_source(config.data, "train")
  global_batch = config.train.global_batch_size
  steps_per_epoch = len(source) // global_batch
  checks.check_schedule(config, steps_per_epoch, len(source))
  total_steps = config.train.steps if config.train.steps > 0 else config.train.epochs * steps_per_epoch

  # ---- task and state: created already sharded (eval_shape -> rules -> jitted init with out_shardings).
  mean, std = source.norm_stats["image"]
  task = make_task(
    config,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    in_chans=len(source.bands),
    mean=mean,
    std=std,
    mesh=mesh,
    source=source,
  )
  init = with_loop_fields(task.init)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  shardings = parallel.tree_shardings(abstract, config.sharding_rules, mesh)
  logging.info(
    "mesh %s, sharding rules %s\n%s",
    dict(mesh.shape),
    config.sharding_rules,
    parallel.sharding_summary(abstract, shardings),
  )
  checks.check_disk(workdir, abstract, config.train.keep_checkpoints)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  evaluator = _Evaluation(config, task, mesh, shardings, workdir) if config.eval.every != 0 else None
  try:
    state, loop_state = _initial_state(config, workdir, task, init, rng, abstract, shardings, ckpt, source, total_steps)
    step = int(jax.device_get(state["step"]))
    if evaluator is not None:
      evaluator.forget_after(step)
    if step >= total_steps:
      logging.info(
        "the run in %s is complete (step %d of %d); nothing to train. Pass another --workdir to train again.",
        workdir,
        step,
        total_steps,
      )
      if evaluator is not None:
        evaluator.finish(state, step, loop_state)
      return "complete"
    status, state, step = _train(
      config, workdir, task, state, loop_state, shardings, ckpt, evaluator, source, mesh, steps_per_epoch, total_steps
    )
  finally:
    ckpt.close()
    if evaluator is not None:
      evaluator.close()
  if is_chief and step > 0:
    path = writers.plot_training_curves(workdir, title=f"{config.method} {config.model.get('arch', '')}")
    logging.info("loss curve: %s", path)
  if status in ("done", "early_stopped"):
    if evaluator is not None:
      evaluator.finish(state, step, loop_state)
    if config.eval.final_probe:
      from jaxgeo.evaluate import linear

      linear.compare_with_random_init(config, workdir, task, state, mesh)
  return status


def _initial_state(config, workdir, task, init, rng, abstract, shardings, ckpt, source, total_steps):
  """(state, loop_state): resumed from the newest intact checkpoint, or fresh (+ pretrained weights)."""
  train_samples = len(source)
  resume_step = config.train.resume_step if config.train.resume_step >= 0 else None
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  restored = None
  if ckpt.steps() or resume_step is not None:
    # Before restoring: a config that changes the state's shapes would not fit the checkpoint, and the
    # difference itself is what the user needs to hear about.
    workdir_lib.check_resume_config(workdir, config, resume_step if resume_step is not None else ckpt.steps()[-1])
    restored = ckpt.restore(target, max_step=resume_step)
  if restored is not None:
    state, loop_state, step = restored
    before = loop_state.get("train_samples", train_samples)
    if before != train_samples and not config.train.accept_config_change:
      raise workdir_lib.ConfigChangedError(
        f"the train split had {before} samples when the run in {workdir} started and has {train_samples} now "
        f"(config.data.root={config.data.root}); the data order and schedule would change. Point data.root at "
        "the original data, or accept it with --config.train.accept_config_change=True"
      )
    loop_state["train_samples"] = train_samples
    dropped = writers.truncate_metrics(workdir, step)
    logging.info(
      "resuming from step %d of %d%s",
      step,
      total_steps,
      f" ({dropped} metrics rows after it dropped)" if dropped else "",
    )
    return state, loop_state
  state = jax.jit(init, out_shardings=shardings)(rng)
  if task.import_pretrained is not None:
    state = jax.device_put(task.import_pretrained(state), shardings)
  workdir_lib.save_config(workdir, config)
  workdir_lib.save_dataset_info(workdir, source)
  return state, {"skipped_samples": 0, "nonfinite_steps": 0, "nonfinite_consecutive": 0, "train_samples": train_samples}


def _train(
  config, workdir, task, state, loop_state, shardings, ckpt, evaluator, source, mesh, steps_per_epoch, total_steps
):
  global_batch = config.train.global_batch_size
  step = int(jax.device_get(state["step"]))
  # The data position is the step: batch k is a pure function of (seed, k), whatever the worker count.
  _, dataset = make_input(
    config, "train", num_epochs=math.ceil(total_steps / steps_per_epoch), source=source, start_batch=step
  )
  iterator = iter(dataset)
  batch = _next_batch(iterator, step, total_steps)
  batch_shardings = {k: parallel.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
  step_fn = jax.jit(
    _carry_loop_fields(task.step),
    in_shardings=(shardings, batch_shardings),
    out_shardings=(shardings, parallel.replicated(mesh)),
    donate_argnums=0,
  )
  knn = _KnnMonitor(config, task, mesh, source) if config.eval.knn_every > 0 and task.embed is not None else None
  writer = writers.MetricWriter(workdir, enabled=jax.process_index() == 0)
  if knn is not None and step == 0:
    # The untrained network's score is the baseline the later kNN numbers should beat.
    baseline = knn(state)
    writer.write(0, baseline)
    logging.info("kNN monitor at initialisation: %s", baseline)
  eval_every = steps_per_epoch if config.eval.every == -1 else config.eval.every
  stop = _StopFlag()
  pending, averages = [], {}
  interval_start, interval_first = time.perf_counter(), step
  status, checked_disk = "done", False
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
        batch = _next_batch(iterator, step, total_steps)
      state, step_metrics = step_fn(state, parallel.host_to_global(batch, mesh))
      batch = None
      step += 1
      pending.append((step, step_metrics))
      for key, value in step_metrics.items():
        avg = clu_metrics.Average.from_model_output(jnp.asarray(value, jnp.float32))
        averages[key] = averages[key].merge(avg) if key in averages else avg

      # Read the flag once: a signal landing between the save decision and the exit check must not skip the save.
      stopping = stop.agreed(step, config.train.log_every)
      evaluate_now = evaluator is not None and (step % eval_every == 0 or step == total_steps)
      save_now = step % config.train.checkpoint_every == 0 or step == total_steps or stopping
      if step % config.train.log_every == 0 or save_now or evaluate_now:
        # Materialising metrics is also where a non-finite step is found, so it comes before any save.
        _check_pending(pending, config, loop_state, ckpt)
        checks.check_skipped(loop_state["skipped_samples"], step * global_batch, config.data.max_skipped_fraction)
        scalars = {k: float(v.compute()) for k, v in averages.items()}
        elapsed = time.perf_counter() - interval_start
        rate = (step - interval_first) * global_batch / max(elapsed, 1e-9)
        scalars.update(
          images_per_s=rate,
          skipped_samples=loop_state["skipped_samples"],
          nonfinite_steps=loop_state["nonfinite_steps"],
        )
        if knn is not None and (step % config.eval.knn_every == 0 or step == total_steps):
          scalars.update(knn(state))
        writer.write(step, scalars)
        _log_line(step, total_steps, scalars, rate, global_batch)
        pending, averages = [], {}
        interval_start, interval_first = time.perf_counter(), step
      if evaluate_now:
        state, decision = evaluator(state, step, loop_state, writer)
        if decision["stop"]:
          status, save_now = "early_stopped", True
          logging.info(
            "early stop at step %d: %d evaluations without improvement of %s (best %.4g at step %d)",
            step,
            config.eval.patience,
            config.eval.metric,
            loop_state["monitor"]["best"],
            loop_state["monitor"]["best_step"],
          )
        interval_start = time.perf_counter()
      if save_now:
        ckpt.save(step, state, loop_state)
        if not checked_disk:  # size the rest of the run's checkpoints from the real first one
          ckpt.wait()
          checks.check_disk_after_save(
            ckpt.directory,
            checkpoint.directory_size(ckpt.step_dir(step)),
            len(ckpt.steps()),
            config.train.keep_checkpoints,
          )
          checked_disk = True
      if stopping:
        status = "preempted"
        logging.warning(
          "%s received: saved step %d of %d to %s; run the same command to resume",
          stopping,
          step,
          total_steps,
          ckpt.directory,
        )
      if stopping or status == "early_stopped":
        break
  finally:
    stop.restore()
    ckpt.wait()
    writer.close()
  return status, state, step


def _next_batch(iterator, step, total_steps):
  try:
    return next(iterator)
  except StopIteration:
    raise RunError(
      f"the training data ran out at step {step} of {total_steps}: the pipeline yields fewer batches than the "
      "schedule needs (a changed split, or data.root changed under a running job)"
    ) from None


def _check_pending(pending, config, loop_state, ckpt):
  """Host-side look at the steps since the last check: skipped samples and non-finite steps, both cumulative."""
  for step, step_metrics in pending:
    values = jax.device_get(step_metrics)
    loop_state["skipped_samples"] += int(values["num_skipped"])
    if bool(values["finite"]):
      loop_state["nonfinite_consecutive"] = 0
      continue
    loop_state["nonfinite_steps"] += 1
    loop_state["nonfinite_consecutive"] += 1
    message = (
      f"non-finite value at step {step}: loss={float(values['loss'])}, grad_norm="
      f"{float(values.get('grad_norm', np.nan))}; the step's update was dropped"
    )
    resume_hint = (
      f"{ckpt.describe()}; the newest may already hold diverged weights (a huge but finite update saved before the "
      "first NaN): resume from an earlier one with --config.train.resume_step=N (add "
      "--config.train.accept_config_change=True to change e.g. the learning rate)"
    )
    if config.train.on_nonfinite == "error":
      raise NonFiniteError(f"{message}. Stopping. {resume_hint}; or set --config.train.on_nonfinite=skip")
    consecutive, total = loop_state["nonfinite_consecutive"], loop_state["nonfinite_steps"]
    if consecutive > config.train.max_nonfinite_consecutive or total > config.train.max_nonfinite_total:
      raise NonFiniteError(
        f"{message}; {consecutive} non-finite steps in a row and {total} in all, past "
        f"config.train.max_nonfinite_consecutive={config.train.max_nonfinite_consecutive} / "
        f"max_nonfinite_total={config.train.max_nonfinite_total}: the run is diverging, not hitting a stray bad "
        f"batch. {resume_hint}"
      )
    logging.warning("%s (on_nonfinite=skip: %d in a row, %d in all)", message, consecutive, total)


def _log_line(step, total, scalars, rate, global_batch):
  remaining = (total - step) * global_batch / max(rate, 1e-9)
  names = ("lr", "weight_decay", "teacher_momentum", "teacher_temp", "knn_ap_macro", "knn_top1")
  extras = " ".join(f"{k}={scalars[k]:.4g}" for k in names if k in scalars)
  logging.info(
    "step %d/%d loss=%.4f %s | %.1f img/s, ETA %s",
    step,
    total,
    scalars["loss"],
    extras,
    rate,
    time.strftime("%H:%M:%S", time.gmtime(remaining)),
  )


class _Evaluation:
  """Periodic validation with keep-best, early stopping and the lr plateau (train/evaluation.py)."""

  def __init__(self, config, task, mesh, shardings, workdir):
    if task.eval_step is None or task.summarize is None:
      raise ValueError(f"config.eval.every={config.eval.every} but method {config.method!r} has no evaluation")
    self.config, self.task, self.workdir, self.mesh, self.shardings = config, task, workdir, mesh, shardings
    self.runner = evaluation.Evaluator(config, task, mesh, shardings, make_input)
    self.best = checkpoint.Checkpointer(workdir, keep=1, name="best") if config.eval.keep_best else None

  def __call__(self, state, step, loop_state, writer):
    """Evaluates `state` at `step`; returns (state, decision) with lr_scale updated on a plateau."""
    cfg = self.config.eval
    start = time.perf_counter()
    summary, preview = self.runner.run(state, cfg.split)
    if cfg.metric not in summary:
      raise KeyError(f"config.eval.metric={cfg.metric!r} is not in the evaluation summary {sorted(summary)}")
    monitor = evaluation.Monitor(cfg, loop_state.get("monitor"))
    decision = monitor.update(step, summary[cfg.metric])
    loop_state["monitor"] = monitor.state
    scalars = evaluation.scalars_of(summary, f"{cfg.split}_")
    scalars.update(lr_scale=decision["lr_scale"], eval_seconds=time.perf_counter() - start)
    writer.write(step, scalars)
    logging.info(
      "evaluation at step %d on %s (%d samples): %s=%.4f%s (best %.4f at step %d)%s",
      step,
      cfg.split,
      summary["num_samples"],
      cfg.metric,
      summary[cfg.metric],
      " new best" if decision["improved"] else "",
      monitor.state["best"],
      monitor.state["best_step"],
      f"; learning rate scaled to {decision['lr_scale']:g} (plateau)" if decision["lr_reduced"] else "",
    )
    out_dir = os.path.join(self.workdir, "eval", f"step_{step:07d}")
    evaluation.write_report(self.task, summary, preview, out_dir, writer, step, cfg.split)
    if decision["improved"] and self.best is not None:
      self.best.save(step, state, {"step": step, "metric": cfg.metric, "summary": metrics.jsonable(summary)})
      self.best.wait()
    if decision["lr_reduced"]:
      scale = jax.device_put(jnp.float32(decision["lr_scale"]), self.shardings["lr_scale"])
      state = dict(state, lr_scale=scale)
    return state, decision

  def forget_after(self, step):
    """On resume at `step`: a best checkpoint saved after it belongs to steps this run trains again (their
    evaluations re-decide it; the restored monitor does not know of it)."""
    if self.best is not None:
      self.best.set_aside_after(step, f"newer than the resumed step {step}")

  def finish(self, state, step, loop_state):
    """After training: the best checkpoint (or the last state) on config.eval.test_split -> results.json."""
    cfg = self.config.eval
    results_path = os.path.join(self.workdir, "results.json")
    if not cfg.test_split or os.path.exists(results_path):
      return
    chosen, best_info = state, {"step": step, "summary": None}
    if self.best is not None and self.best.steps():
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, self.shardings)
      restored = self.best.restore(abstract)
      if restored is not None:
        chosen, best_info, _ = restored
    summary, preview = self.runner.run(chosen, cfg.test_split)
    results = {
      "metric": cfg.metric,
      "selected_step": int(best_info.get("step", step)),
      "selection": cfg.split,
      cfg.split: best_info.get("summary"),
      cfg.test_split: summary,
      "monitor": loop_state.get("monitor"),
    }
    writer = writers.MetricWriter(self.workdir, enabled=jax.process_index() == 0)
    evaluation.write_report(
      self.task, summary, preview, os.path.join(self.workdir, cfg.test_split), writer, step, cfg.test_split
    )
    writer.close()
    if jax.process_index() == 0:
      import json

      with open(results_path, "w") as f:
        json.dump(metrics.jsonable(results), f, indent=2)
    logging.info(
      "%s with the checkpoint of step %d (best %s on %s): %s",
      cfg.test_split,
      results["selected_step"],
      cfg.metric,
      cfg.split,
      ", ".join(f"{k}={v:.4f}" for k, v in evaluation.scalars_of(summary, "").items()),
    )

  def close(self):
    if self.best is not None:
      self.best.close()


class _KnnMonitor:
  """Held-out kNN score every few steps, so collapse or progress shows in the training log itself."""

  def __init__(self, config, task, mesh, source):
    from jaxgeo.evaluate import knn

    self._knn = knn
    self.mesh = mesh
    self.multilabel = source.label_kind == "multilabel"
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
    return self._knn.knn_monitor(
      functools.partial(self.embed, state), self.bank, self.queries, mesh=self.mesh, multilabel=self.multilabel
    )
