"""Per-patch embeddings of a frozen backbone, written to parquet for downstream use.

  python -m jaxgeo.evaluate.embed --checkpoint=/tmp/dino --split=test --out=test_embeddings.parquet \
      [--config=configs/linear_ben.py --config.probe.n_last_blocks=1]

One row per patch: `name` (BigEarthNet patch id), `index` (row in the split), `split`, `embedding`
(fixed_size_list<float32>[D]), `labels` (fixed_size_list<float32>[19] multi-hot) and `label_names`
(list<string>). The embedding is the probe's feature definition (config.probe: n_last_blocks, avgpool,
image_size); n_last_blocks=1 gives the backbone's own normed CLS output. The schema metadata records the
backbone and feature definition, so a file says where its vectors came from.
"""

import json

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, flags

from jaxgeo import parallel
from jaxgeo.evaluate import backbone, features


def _fixed_list(array):
  array = np.ascontiguousarray(array, np.float32)
  return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])


def write_embeddings(path, *, names, index, embeddings, labels, class_names, split="", metadata=None):
  """Writes the parquet table described in the module docstring; returns path."""
  labels = np.asarray(labels, np.float32)
  label_names = [[class_names[c] for c in np.flatnonzero(row > 0.5)] for row in labels]
  table = pa.table(
    {
      "name": pa.array(list(names), pa.string()),
      "index": pa.array(np.asarray(index, np.int32)),
      "split": pa.array([split] * len(labels), pa.string()),
      "embedding": _fixed_list(embeddings),
      "labels": _fixed_list(labels),
      "label_names": pa.array(label_names, pa.list_(pa.string())),
    }
  )
  schema_metadata = {"jaxgeo": json.dumps(dict(metadata or {}, class_names=list(class_names)))}
  pq.write_table(table.replace_schema_metadata(schema_metadata), path)
  return path


def read_embeddings(path):
  """{"name", "index", "split", "embedding" [N, D], "labels" [N, C], "metadata"} as numpy / Python."""
  table = pq.read_table(path)

  def matrix(column):
    chunked = table.column(column).combine_chunks()
    return chunked.values.to_numpy().reshape(len(table), chunked.type.list_size)

  return {
    "name": table.column("name").to_pylist(),
    "index": table.column("index").to_numpy(),
    "split": table.column("split").to_pylist(),
    "embedding": matrix("embedding"),
    "labels": matrix("labels"),
    "metadata": json.loads(table.schema.metadata[b"jaxgeo"]),
  }


def embed(config, split, out):
  """Embeds every patch of `split` with config's backbone and feature definition; process 0 writes `out`."""
  from jaxgeo import data
  from jaxgeo.data import bigearthnet
  from jaxgeo.evaluate import linear

  p = config.probe
  mean, std, class_names = linear.data_info(config.data)
  in_chans = len(bigearthnet.resolve_bands(config.data.bands))
  model, params, description = backbone.load_backbone(config, in_chans, p.image_size)
  mesh = parallel.make_mesh(config.mesh)
  params = jax.device_put(params, parallel.replicated(mesh))
  feature_fn = features.make_feature_fn(
    model, mean=mean, std=std, image_size=p.image_size, n_last_blocks=p.n_last_blocks, avgpool=p.avgpool
  )
  source = data.build_source(config.data, split)
  batches, _ = linear.split_batches(config, split)
  embeddings, labels, index = features.extract_features(
    lambda images: feature_fn(params, images), batches, mesh, with_index=True
  )
  if jax.process_index() != 0:
    return out
  metadata = {
    "backbone": description,
    "bands": str(config.data.bands),
    "image_size": p.image_size,
    "n_last_blocks": p.n_last_blocks,
    "avgpool": p.avgpool,
  }
  return write_embeddings(
    out,
    names=[source.names[i] for i in index],
    index=index,
    embeddings=embeddings,
    labels=labels,
    class_names=class_names,
    split=split,
    metadata=metadata,
  )


def main(argv):
  del argv
  config = backbone.set_checkpoint(_CONFIG.value, _CHECKPOINT.value)
  print(embed(config, _SPLIT.value, _OUT.value))


if __name__ == "__main__":
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
    "config", backbone.default_config_path(), "evaluation config (model, data, init, probe feature definition)"
  )
  _CHECKPOINT = flags.DEFINE_string("checkpoint", "", "jaxgeo run folder or PyTorch DINO checkpoint")
  _SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "split to embed")
  _OUT = flags.DEFINE_string("out", "embeddings.parquet", "output parquet file")
  from jaxgeo.logs import quiet_library_logs

  quiet_library_logs()
  app.run(main)
