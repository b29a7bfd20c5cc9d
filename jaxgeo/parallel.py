"""Mesh, sharding rules, host batches -> global arrays, and multi-host start-up.

Every method trains on a 2-D mesh ("data", "fsdp"). The batch is split over both axes; parameters are placed
by rules, a list of (regex over the "/"-joined param path, spec) pairs where the first match wins. A spec is
"replicate", "fsdp" (shard the largest dimension that divides evenly over the "fsdp" axis) or a tuple of mesh
axis names / None per dimension. With fsdp=1 every rule degenerates to plain data parallelism.
"""

import os
import re

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices=None):
  """Builds the ("data", "fsdp") mesh; -1 in either size means "all remaining devices"."""
  devices = jax.devices() if devices is None else devices
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("config.mesh: at most one of data and fsdp may be -1")
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(
      f"config.mesh data={mesh_config.data} x fsdp={mesh_config.fsdp} does not cover the "
      f"{n} devices; choose sizes whose product is {n}"
    )
  # Auto axes: shardings come from jit's in/out_shardings (GSPMD), not from explicit-sharding types.
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=auto, devices=devices)


def batch_sharding(mesh, ndim=1):
  """Leading (batch) axis split over every device, the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh):
  return NamedSharding(mesh, P())


def path_str(path):
  """("blocks_0", "attn", "qkv", "kernel") key path -> "blocks_0/attn/qkv/kernel"."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _spec_for(spec, shape, mesh, name):
  if spec == "replicate":
    return P()
  if spec == "fsdp":
    size = mesh.shape["fsdp"]
    if size == 1:
      return P()
    # Largest dimension first: sharding the big axis keeps each shard contiguous-ish and balanced.
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % size == 0 and shape[dim] >= size:
        axes = [None] * len(shape)
        axes[dim] = "fsdp"
        return P(*axes)
    return P()  # too small to split (biases, scalars): replication costs nothing worth saving
  spec = tuple(spec)
  if len(spec) != len(shape):
    raise ValueError(f"sharding rule spec {spec} for {name} has {len(spec)} entries; the array has shape {shape}")
  return P(*spec)


def tree_shardings(tree, rules, mesh):
  """Resolves rules against a pytree of arrays (or ShapeDtypeStructs) into NamedShardings."""
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def one(path, leaf):
    name = path_str(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for pattern, spec in compiled:
      if pattern.search(name):
        return NamedSharding(mesh, _spec_for(spec, shape, mesh, name))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def _leaf_layout(tree, shardings):
  """(path, shape, bytes, bytes per device, replicated?) for every leaf: what the two reports below read."""
  rows = []
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings)):
    itemsize = np.dtype(leaf.dtype).itemsize
    shape = tuple(leaf.shape)
    rows.append(
      (
        path_str(path),
        shape,
        int(np.prod(shape)) * itemsize,
        int(np.prod(sharding.shard_shape(shape))) * itemsize,
        all(axis is None for axis in sharding.spec),
      )
    )
  return rows


def replicated_fraction(tree, shardings):
  """Fraction of the tree's bytes that every device holds in full (used to check FSDP rules)."""
  rows = _leaf_layout(tree, shardings)
  return sum(r[2] for r in rows if r[4]) / max(sum(r[2] for r in rows), 1)


def sharding_summary(tree, shardings, top=5):
  """A few log lines: bytes in total and per device, the replicated fraction, the largest replicated leaves.

  Printed once at start-up by the training loop, so a run's FSDP layout can be checked from its log.
  """
  rows = _leaf_layout(tree, shardings)
  total = sum(r[2] for r in rows)
  replicated = sorted(((r[2], r[0], r[1]) for r in rows if r[4]), reverse=True)
  lines = [
    f"state: {total / 2**20:.1f} MiB in {len(rows)} arrays, "
    f"{sum(r[3] for r in rows) / 2**20:.1f} MiB per device; {len(rows) - len(replicated)} sharded, "
    f"{len(replicated)} replicated ({replicated_fraction(tree, shardings):.2%} of the bytes)"
  ]
  for nbytes, name, shape in replicated[:top]:
    if nbytes:
      lines.append(f"  replicated: {name} {shape} {nbytes / 2**10:.1f} KiB")
  return "\n".join(lines)


def host_to_global(batch, mesh):
  """This process's slice of the batch (numpy) -> global jax.Arrays split over every device.

  Each process passes only the rows it loaded; jax stitches the global array without any copy across hosts.
  """

  def one(local):
    local = np.asarray(local)
    sharding = batch_sharding(mesh, local.ndim)
    return jax.make_array_from_process_local_data(sharding, local)

  return jax.tree.map(one, batch)


def initialize_distributed(dist_config):
  """Starts jax.distributed when more than one process takes part; returns True if it did.

  Explicit config (coordinator address, process count and id) wins; otherwise JAX's own cluster detection
  handles SLURM (SLURM_NTASKS > 1) and the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
  variables our launch scripts export (Kubernetes indexed Jobs use those too).
  """
  explicit = dist_config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  under_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if not explicit and not under_slurm:
    return False
  if dist_config.cpu_collectives:
    # CPU runs (tests, debugging) need a cross-process collective backend; gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", dist_config.cpu_collectives)
  kwargs = {}
  if explicit:
    kwargs = dict(
      coordinator_address=explicit,
      num_processes=_explicit_int(dist_config.num_processes, 1, "num_processes", "JAX_NUM_PROCESSES"),
      process_id=_explicit_int(dist_config.process_id, 0, "process_id", "JAX_PROCESS_ID"),
    )
  jax.distributed.initialize(**kwargs)
  if jax.process_index() != 0:
    # Every process runs the same loop and would print the same lines; process 0 speaks for all of them.
    # Warnings and errors still come from every process (a failing host must say so itself).
    logging.set_verbosity(logging.WARNING)
  logging.warning(
    "jax.distributed: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def _explicit_int(configured, minimum, field, env):
  """config.distributed.<field> when set (>= minimum), else the environment variable; an error names both."""
  if configured >= minimum:
    return int(configured)
  if env not in os.environ:
    raise ValueError(
      f"a coordinator address is set (config.distributed.coordinator_address or "
      f"JAX_COORDINATOR_ADDRESS) but neither config.distributed.{field} nor {env} is; set both "
      "on every process (launch/local_processes.sh and launch/k8s-indexed-job.yaml show how)"
    )
  return int(os.environ[env])
