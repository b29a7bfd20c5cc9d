"""grain input pipeline: shuffled epochs of a random-access source, per-process shards, bad-sample policy, batches.

Order of operations (all processes build the same pipeline with the same seed):
  range(len(source)) -> shuffle(seed) -> repeat(num_epochs) -> this process's block of every global batch
  -> map(load) -> to_iter_dataset -> drop/count bad samples -> batch -> [mp_prefetch].
Shuffling and repeating indices before the split give every process the same global order. Global batch k is
elements [k * B * P, (k + 1) * B * P) of that order (B rows per process, P processes); process p takes its
contiguous block [k * B * P + p * B, k * B * P + (p + 1) * B). jax.make_array_from_process_local_data stacks
the blocks in process order, so the global batch of P processes is row for row the one a single process
builds: per-row randomness (augmentation keys, drop-path) and so the losses do not depend on the process
count. Nothing is loaded for an index another process owns.

The iterator is a grain DatasetIterator: `get_state()` / `set_state()` (or orbax with
`grain.checkpoint.CheckpointSave/CheckpointRestore`) resume at the exact next batch.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import grain
import numpy as np
from absl import flags

from jaxgeo.data.geotiff import BadSampleError

log = logging.getLogger(__name__)
ON_BAD_SAMPLE = ("error", "skip")


class _Skipped:
  """Stands in for a sample that failed to load, so the counting step downstream can drop and count it."""

  def __init__(self, index: int, error: BadSampleError):
    self.index = index
    self.error = error


class _LoadSample(grain.transforms.Map):
  """Loads source[index]; in skip mode a BadSampleError becomes a _Skipped marker instead of an exception."""

  def __init__(self, source, on_bad_sample: str):
    self._source = source
    self._skip = on_bad_sample == "skip"

  def map(self, index):
    try:
      return self._source[int(index)]
    except BadSampleError as e:
      if not self._skip:
        raise
      return _Skipped(int(index), e)


class _CountSkippedIterator(grain.DatasetIterator):
  """Drops _Skipped markers and puts how many were dropped into the next good sample's `num_skipped`.

  Between two `next` calls no drop is pending (a call only returns after a good sample), so the parent's state
  alone is the state: checkpoints stay grain's own.
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._logged: set[int] = set()

  def __next__(self):
    num_skipped = 0
    while True:
      element = next(self._parent)
      if not isinstance(element, _Skipped):
        return {**element, "num_skipped": np.int32(num_skipped)}
      num_skipped += 1
      if element.index not in self._logged:  # once per sample, not once per epoch it comes round again
        self._logged.add(element.index)
        log.warning("Skipping bad sample %d (data.on_bad_sample='skip'): %s", element.index, element.error)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _CountSkipped(grain.IterDataset):
  def __iter__(self):
    return _CountSkippedIterator(self._parent.__iter__())


class _GlobalPosition(grain.transforms.Map):
  """Local position j of process p -> the index at that row's position in the global order."""

  def __init__(self, indices, block, process_index, process_count, full_rows, remainder):
    self._indices, self._block = indices, block
    self._process_index, self._process_count = process_index, process_count
    self._full_rows, self._remainder = full_rows, remainder

  def map(self, j):
    j = int(j)
    if j < self._full_rows:  # inside a whole global batch: this process's block of it
      k, row = divmod(j, self._block)
      return self._indices[(k * self._process_count + self._process_index) * self._block + row]
    # The last, partial global batch (evaluation only): split into near-equal contiguous shares.
    start = self._full_rows * self._process_count + self._process_index * self._remainder // self._process_count
    return self._indices[start + j - self._full_rows]


def _process_block(indices, block, process_index, process_count, drop_remainder):
  """The indices process p reads: its block of B rows of every global batch of B * P (see module doc)."""
  if process_count == 1:
    return indices
  total = len(indices)
  full_batches, remainder = divmod(total, block * process_count)
  full_rows = full_batches * block
  extra = 0
  if not drop_remainder:
    extra = ((process_index + 1) * remainder // process_count) - (process_index * remainder // process_count)
  position = _GlobalPosition(indices, block, process_index, process_count, full_rows, remainder)
  return grain.MapDataset.range(full_rows + extra).map(position)


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
) -> grain.IterDataset:
  """Batches of {"image", "labels", "index", "num_skipped"} numpy arrays with a leading local batch axis.

  num_epochs None repeats forever (training); an int stops after that many passes (evaluation: 1, with
  shuffle=False and drop_remainder=False). `prefetch`: batches buffered per worker process (worker_count > 0);
  `read_threads`: threads loading samples in each process (0 = load in the calling thread).
  """
  if on_bad_sample not in ON_BAD_SAMPLE:
    raise ValueError(f"data.on_bad_sample: expected one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, process_count={process_count})")
  if batch_size_per_process < 1:
    raise ValueError(f"batch_size_per_process: expected >= 1, got {batch_size_per_process}")
  indices = grain.MapDataset.range(len(source))
  if shuffle:
    indices = indices.shuffle(seed=seed)  # grain reshuffles every epoch of the repeat (seed + epoch)
  indices = indices.repeat(num_epochs)
  indices = _process_block(indices, batch_size_per_process, process_index, process_count, drop_remainder)
  samples = indices.map(_LoadSample(source, on_bad_sample))
  read_options = grain.ReadOptions(
    num_threads=read_threads, prefetch_buffer_size=max(1, 2 * batch_size_per_process) if read_threads else 0
  )
  dataset = _CountSkipped(samples.to_iter_dataset(read_options=read_options))
  dataset = dataset.batch(batch_size_per_process, drop_remainder=drop_remainder)
  if worker_count > 0:
    # grain's worker processes read absl flags; outside an absl.app entry point (tests, notebooks) nothing has
    # parsed them, and grain would fail on the first batch, so fall back to the flag defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=max(1, prefetch))
    )
  return dataset


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches in one pass over `num_examples` (the remainder is carried into the next epoch)."""
  steps = num_examples // global_batch_size
  if steps < 1:
    raise ValueError(
      f"global batch size {global_batch_size} is larger than the {num_examples} examples of the "
      "split: lower the batch size or use more data"
    )
  return steps
