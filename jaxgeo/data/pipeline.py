"""grain input pipeline: whole batches as a random-access dataset, per-process blocks, bad-sample policy.

Order (every process builds the same pipeline with the same seed):
  range(len(source)) -> shuffle(seed) -> repeat(num_epochs): one flat stream of sample indices (grain reshuffles
  every epoch) -> cut into global batches of B * P rows (B rows per process, P processes) -> process p's block of
  global batch k is stream rows [(k * P + p) * B, (k * P + p + 1) * B).
jax.make_array_from_process_local_data stacks the blocks in process order, so the global batch of P processes is
row for row the one a single process builds, and per-row randomness (augmentation keys, drop-path) and the
losses do not depend on the process count. Nothing is loaded for a row another process owns.

Each element of the grain dataset is one whole batch (a MapDataset indexed by batch number), which buys three
things a stream of samples would not:
  * the data order does not depend on `worker_count`: grain's worker processes take whole batches round-robin;
  * resuming is `start_batch=step`: batch k is a pure function of (seed, k), so a checkpoint needs no iterator
    state, and a resume may change the worker count;
  * evaluation batches all have the same size: the last, partial global batch is split near-equally over the
    processes and padded with rows marked `valid = False`, so every process runs the same number of steps of
    the same shape (no recompilation, and no process waiting in a collective another one never reaches).

Bad samples (`on_bad_sample`): "error" raises the reader's BadSampleError (it names the file); "skip" logs each
bad sample once, replaces it by a good sample of the same batch (so shapes stay fixed) with `valid = False`, and
counts it in `num_skipped`. A batch whose every sample is bad raises at once: that is what a vanished mount or
a corrupt store looks like, and training on would only repeat it. The fraction guard over the whole run lives
in the training loop, which keeps the count across resumes.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import grain
import numpy as np
from absl import flags

from jaxgeo.data.geotiff import BadSampleError
from jaxgeo.errors import RunError

log = logging.getLogger(__name__)
ON_BAD_SAMPLE = ("error", "skip")


class AllSamplesBadError(BadSampleError, RunError):
  """Every sample of a batch failed to load: the data is gone or broken wholesale, not a stray bad file."""


class _LoadBatch(grain.transforms.Map):
  """Batch number -> stacked samples of that batch, with `valid` and `num_skipped` per row."""

  def __init__(self, source, indices, rows, batch_size: int, on_bad_sample: str):
    self._source, self._indices, self._rows = source, indices, rows
    self._batch_size, self._skip = batch_size, on_bad_sample == "skip"
    self._logged: set[int] = set()

  def map(self, batch_index):
    first, count = self._rows[int(batch_index)]
    samples, errors = [], []
    for row in range(first, first + count):
      index = int(self._indices[row])
      try:
        samples.append(self._source[index])
      except BadSampleError as e:
        if not self._skip:
          raise
        samples.append(None)
        errors.append(e)
        if index not in self._logged:  # once per sample, not once per epoch it comes round again
          self._logged.add(index)
          log.warning("Skipping bad sample %d (data.on_bad_sample='skip'): %s", index, e)
    good = [s for s in samples if s is not None]
    if not good:
      if errors:
        raise AllSamplesBadError(
          errors[0].path,
          f"all {count} samples of batch {int(batch_index)} failed to load (the first error above); the data may "
          f"have become unreadable (a dropped mount, a corrupt store): {errors[0].problem}",
        )
      # An empty share of a padded evaluation batch: any sample, marked invalid, keeps the shapes.
      good = [self._source[int(self._indices[0])]]
    valid = np.array([s is not None for s in samples] + [False] * (self._batch_size - count), bool)
    filled = [s if s is not None else good[i % len(good)] for i, s in enumerate(samples)]
    filled += [good[i % len(good)] for i in range(self._batch_size - count)]
    stacked = {key: np.stack([np.asarray(s[key]) for s in filled]) for key in filled[0]}
    stacked["valid"] = valid
    stacked["num_skipped"] = np.array([s is None for s in samples] + [False] * (self._batch_size - count), np.int32)
    return stacked


def make_iter_dataset(
  source: Sequence[Any],
  *,
  batch_size_per_process: int,
  seed: int,
  num_epochs: int | None,
  shuffle: bool = True,
  process_index: int = 0,
  process_count: int = 1,
  worker_count: int = 0,
  prefetch: int = 2,
  on_bad_sample: str = "error",
  drop_remainder: bool = True,
  read_threads: int = 4,
  start_batch: int = 0,
) -> grain.IterDataset:
  """Batches of the source's sample dicts stacked on a leading local batch axis, plus `valid` [B] (bool) and
  `num_skipped` [B] (int32, 1 where a bad sample was replaced).

  num_epochs: passes over the source (None: as many as an effectively endless run needs). drop_remainder=False
  (evaluation) keeps the partial last global batch, padded as the module doc says. start_batch: the first batch
  to yield (a resumed run passes its step). `prefetch`: batches buffered per worker process (worker_count > 0);
  `read_threads`: batches loaded concurrently in each process (0 = in the calling thread).
  """
  if on_bad_sample not in ON_BAD_SAMPLE:
    raise ValueError(f"data.on_bad_sample: expected one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, process_count={process_count})")
  if batch_size_per_process < 1:
    raise ValueError(f"batch_size_per_process: expected >= 1, got {batch_size_per_process}")
  if len(source) == 0:
    raise ValueError(f"{source!r} has no samples")
  epochs = num_epochs if num_epochs is not None else max(1, (1 << 40) // len(source))
  indices = grain.MapDataset.range(len(source))
  if shuffle:
    indices = indices.shuffle(seed=seed)  # reshuffled every epoch of the repeat (seed + epoch)
  indices = indices.repeat(epochs)
  rows = _Rows(len(source), epochs, batch_size_per_process, process_index, process_count, drop_remainder)
  if not 0 <= start_batch <= len(rows):
    raise ValueError(f"start_batch {start_batch} outside the {len(rows)} batches of {source!r}")
  batches = grain.MapDataset.range(start_batch, len(rows)).map(
    _LoadBatch(source, indices, rows, batch_size_per_process, on_bad_sample)
  )
  read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, read_threads))
  dataset = batches.to_iter_dataset(read_options=read_options)
  if worker_count > 0:
    # grain's worker processes read absl flags; outside an absl.app entry point (tests, notebooks) nothing has
    # parsed them, and grain would fail on the first batch, so fall back to the flag defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=max(1, prefetch))
    dataset = dataset.mp_prefetch(options)
  return dataset


class _Rows:
  """Batch k of this process -> (first row of the index stream, row count); computed, not listed, because an
  endless training run has more batches than fit in a list. The count is < batch only for a padded last batch."""

  def __init__(self, num_samples, num_epochs, batch, process_index, process_count, drop_remainder):
    self._batch, self._process_index, self._process_count = batch, process_index, process_count
    per_global = batch * process_count
    self._full, remainder = divmod(num_samples * num_epochs, per_global)
    self._last = None
    if remainder and not drop_remainder:
      # The partial global batch: near-equal contiguous shares, in process order (a share may be empty).
      start = self._full * per_global + process_index * remainder // process_count
      end = self._full * per_global + (process_index + 1) * remainder // process_count
      self._last = (start, end - start)

  def __len__(self):
    return self._full + (self._last is not None)

  def __getitem__(self, k):
    if k < self._full:
      return ((k * self._process_count + self._process_index) * self._batch, self._batch)
    if k == self._full and self._last is not None:
      return self._last
    raise IndexError(k)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches in one pass over `num_examples` (the remainder is carried into the next epoch)."""
  steps = num_examples // global_batch_size
  if steps < 1:
    raise ValueError(
      f"global batch size {global_batch_size} is larger than the {num_examples} examples of the "
      "split: lower the batch size or use more data"
    )
  return steps
