"""Run by tests/test_distributed.py as 2 jax.distributed processes: features of a 17-row split, 8 rows per process.

Prints {"index": [...], "features": [...]} as this process sees the gathered split.
"""

import json
import os

import jax
import ml_collections
import numpy as np

from jaxgeo import parallel
from jaxgeo.data import pipeline
from jaxgeo.evaluate import features


class Rows:
  """Row i: an image whose features (the sum over a 1x1x3 image of ones * i) are 3 i."""

  def __len__(self):
    return 17

  def __getitem__(self, i):
    return {"image": np.full((1, 1, 3), float(i), np.float32), "labels": np.int32(i % 2), "index": np.int32(i)}


def main():
  parallel.initialize_distributed(
    ml_collections.ConfigDict(dict(coordinator_address=None, num_processes=-1, process_id=-1, cpu_collectives="gloo"))
  )
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  batches = pipeline.make_iter_dataset(
    Rows(),
    batch_size_per_process=8,
    seed=0,
    num_epochs=1,
    shuffle=False,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    drop_remainder=False,
    read_threads=0,
  )
  feats, _, index = features.extract_features(
    jax.jit(lambda images: images.reshape(images.shape[0], -1).sum(-1, keepdims=True)), batches, mesh, with_index=True
  )
  print(json.dumps({"index": index.tolist(), "features": feats.tolist()}))


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
