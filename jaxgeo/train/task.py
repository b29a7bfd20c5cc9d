"""The Task interface: what a method gives the shared loop (train/loop.py). Everything else is the loop's.

A method file (dino.py, moco.py, classify.py, segment.py) is a `make_task(config, **context) -> Task` over pure
functions of a plain-dict state. The loop calls it with keyword context:

  steps_per_epoch, total_steps   the schedule, from the train split and config.train
  source                         the train split's data.source.Source (bands, norm_stats, class_names, ...)
  in_chans, mean, std            shortcuts: len(source.bands) and source.norm_stats["image"]
  mesh                           the device mesh the state and batches are sharded over

and then owns everything else: data, sharding, jit, checkpoints, metrics, evaluation cadence, keep-best,
early stopping, the learning-rate plateau, preemption and resume.

State: a plain dict of arrays. It must hold "step" (int32 scalar, the number of steps taken); the loop adds
"lr_scale" (float32 scalar, 1.0 until a validation plateau lowers it: a method with a plateau-driven schedule
multiplies its learning rate by it) before anything is compiled.

Step: `step(state, batch) -> (state, metrics)`, pure and jitted by the loop with the state's shardings (donated)
and the batch split over every device. `batch` is the pipeline's dict (the source's keys stacked, plus "valid"
and "num_skipped" per row). `metrics` are scalars; the loop reads "loss", "finite" (False drops the step: the
method must return the old state then), "num_skipped" (summed over the batch) and logs the rest.

Evaluation (optional; config.eval.every > 0 turns periodic validation on):
  eval_step(state, batch) -> {"rows": {name: [B, ...]}, "sums": {name: array}, "preview": {name: [B, ...]}}
      jitted; rows are gathered over the split (padding rows, batch["valid"] False, are dropped by the loop),
      sums are added up over the split's batches (the method masks padding rows itself, e.g. with batch["valid"]),
      preview (optional) is gathered for the split's first batch only: what a picture needs (image, truth,
      prediction), computed under the same sharding as everything else
  summarize(rows, sums) -> dict      host: metric name -> number (and per-class lists), e.g. {"micro_f1": ...};
                                     config.eval.metric names the one that selects the best checkpoint
  report(summary, out_dir, preview)  optional host pictures (confusion matrix, per-class bars, a prediction grid
                                     from the preview); every PNG written into out_dir also goes to TensorBoard

Other hooks:
  embed(state, images) -> [B, D]     features for the kNN monitor and the linear probe (config.eval.knn_every)
  import_pretrained(state) -> state  on a fresh start, before the first step: config.init.* weights into the
                                     state (host arrays are fine; the loop places them on the devices)
"""

import dataclasses
from typing import Any, Callable, Optional

import jax

State = dict
Batch = dict


@dataclasses.dataclass(frozen=True)
class Task:
  init: Callable[[jax.Array], State]
  step: Callable[[State, Batch], tuple]
  embed: Optional[Callable[[State, jax.Array], jax.Array]] = None
  eval_step: Optional[Callable[[State, Batch], dict]] = None
  summarize: Optional[Callable[[dict, dict], dict]] = None
  report: Optional[Callable[[dict, str, dict], Any]] = None
  import_pretrained: Optional[Callable[[State], State]] = None
