"""Scale-out: 2 processes on localhost train exactly like 1, FSDP trains exactly like replication, and FSDP
really splits the state (the smoke model's live state and a ViT-B state on 8 fake devices).

Runs, one per configuration and shared by the tests below (all 4 DINO smoke steps, kNN monitor on):
  two_process_run   launch/local_processes.sh: 2 jax.distributed processes x 4 CPU devices, gloo collectives
  replicated_run    this process, 8 devices, mesh data=8 fsdp=1
  fsdp_run          this process, 8 devices, mesh data=2 fsdp=4 (kNN off), the live state's shardings recorded
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxgeo import checkpoint, data, parallel
from jaxgeo.data import pipeline
from jaxgeo.train import dino, loop, writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(REPO, "configs") not in sys.path:
  sys.path.insert(0, os.path.join(REPO, "configs"))
import dino_ben  # noqa: E402

STEPS = 8  # smoke epochs: the schedules' warm-up fits, and checkpoints land at steps 2, 4, 6 and 8
KNN_EVERY = 2
PROCESSES = 2


def make_config(synthetic_dir, *, data_axis=-1, fsdp_axis=1, **overrides):
  config = dino_ben.get_config("smoke")
  config.data.synthetic_dir = str(synthetic_dir)
  config.train.steps = STEPS
  config.eval.knn_every = KNN_EVERY
  config.mesh.data, config.mesh.fsdp = data_axis, fsdp_axis
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  config.lock()
  return config


def losses(workdir):
  """{step: row} of the training steps (a step-0 row, e.g. a kNN baseline, has no loss)."""
  return {row["step"]: row for row in writers.read_metrics(workdir) if "loss" in row}


def knn_rows(workdir):
  return {row["step"]: row["knn_ap_macro"] for row in writers.read_metrics(workdir) if "knn_ap_macro" in row}


@pytest.fixture(scope="session")
def dist_synthetic_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("dist_synthetic")
  data.resolve_paths(make_config(directory).data)  # written once here, before several processes read it
  return directory


def _subprocess_env(devices_per_process):
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_"))
  }
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  # No persistent compilation cache across processes: on CPU with gloo, a resumed 2-process run that loaded its
  # step from a cache both processes had written hung in its first collective (seen with jax 0.10.2); compiling
  # afresh costs seconds.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  # The launcher must run this interpreter, activated venv or not: take the venv off PATH so a launcher that
  # ran `python` from PATH would get another interpreter (without jax) and fail.
  env["JAXGEO_PYTHON"] = sys.executable
  venv_bin = os.path.dirname(sys.executable)
  env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
  env.pop("VIRTUAL_ENV", None)
  return env


def _start(workdir, synthetic_dir, log):
  """launch/local_processes.sh with 2 processes in a new session (so the whole group can be killed)."""
  command = [
    "bash",
    os.path.join(REPO, "launch", "local_processes.sh"),
    str(PROCESSES),
    "configs/dino_ben.py:smoke",
    str(workdir),
    f"--config.data.synthetic_dir={synthetic_dir}",
    f"--config.train.steps={STEPS}",
    f"--config.eval.knn_every={KNN_EVERY}",
  ]
  return subprocess.Popen(
    command,
    cwd=REPO,
    env=_subprocess_env(8 // PROCESSES),
    stdout=log,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )


def _launch(workdir, synthetic_dir, log_path, timeout=420):
  """A 2-process run to its end; the whole process group dies if it overruns."""
  with open(log_path, "w") as log:
    proc = _start(workdir, synthetic_dir, log)
    try:
      returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      returncode = "timeout"
  with open(log_path) as f:
    output = f.read()
  assert returncode == 0, f"2-process run failed ({returncode}):\n{output[-6000:]}"
  return output


@pytest.fixture(scope="session")
def two_process_run(dist_synthetic_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("two_processes") / "run"
  output = _launch(workdir, dist_synthetic_dir, workdir.parent / "log.txt")
  return str(workdir), output


@pytest.fixture(scope="session")
def replicated_run(dist_synthetic_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("replicated")
  config = make_config(dist_synthetic_dir, data_axis=8, fsdp_axis=1)
  assert loop.run(config, str(workdir), dino.make_task) == "done"
  return str(workdir)


@pytest.fixture(scope="session")
def fsdp_run(dist_synthetic_dir, tmp_path_factory):
  """The real loop under FSDP; every checkpoint save records the live state's shardings on the way."""
  workdir = tmp_path_factory.mktemp("fsdp")
  # kNN off: its agreement across layouts is the 2-process test's job; here it would only add compiles.
  config = make_config(dist_synthetic_dir, data_axis=2, fsdp_axis=4, eval__knn_every=0)
  live = {}
  original_save = checkpoint.Checkpointer.save

  def recording_save(self, step, state, loop_state):
    live[step] = {
      parallel.path_str(path): (leaf.shape, leaf.sharding, leaf.addressable_shards[0].data.shape)
      for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    }
    return original_save(self, step, state, loop_state)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint.Checkpointer, "save", recording_save)
    assert loop.run(config, str(workdir), dino.make_task) == "done"
  return str(workdir), live


def _restore_state(workdir, target):
  """The saved train state restored into `target`'s shardings (the loop's resume path, without the data)."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "loop"))
  try:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  finally:
    manager.close()
  return restored.state


def _abstract_state(config, mesh):
  source = data.build_source(config.data, "train")
  mean, std = data.normalization_stats(config.data.bands)
  task = dino.make_task(
    config,
    steps_per_epoch=len(source) // config.train.global_batch_size,
    total_steps=STEPS,
    in_chans=len(source.bands),
    mean=mean,
    std=std,
    mesh=mesh,
  )
  abstract = jax.eval_shape(loop.with_loop_fields(task.init), jax.random.PRNGKey(config.seed))
  return task, abstract, parallel.tree_shardings(abstract, config.sharding_rules, mesh)


# ---- input: the global batch of P processes is, row for row, the one of a single process.


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_process_blocks_rebuild_the_single_process_batches(drop_remainder):
  source = [{"index": np.int32(i)} for i in range(23)]

  def batches(process_index, process_count, rows):
    # Padding rows of a last evaluation batch (valid False) are placeholders: only valid rows are data.
    return [
      b["index"][b["valid"]]
      for b in pipeline.make_iter_dataset(
        source,
        batch_size_per_process=rows,
        seed=3,
        num_epochs=2,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=drop_remainder,
        read_threads=0,
      )
    ]

  single = batches(0, 1, 6)
  for processes in (2, 3):
    shares = [batches(p, processes, 6 // processes) for p in range(processes)]
    assert len({len(share) for share in shares}) == 1, "processes must see the same number of batches"
    stacked = [np.concatenate([share[k] for share in shares]) for k in range(len(shares[0]))]
    assert len(stacked) == len(single)
    for k, (got, want) in enumerate(zip(stacked, single)):
      np.testing.assert_array_equal(got, want, err_msg=f"batch {k} with {processes} processes")


# ---- 2 processes (jax.distributed, gloo) == 1 process over the same global batch


def test_two_processes_train_like_one(two_process_run, replicated_run):
  workdir, output = two_process_run
  assert "process 1 of 2, 4 local / 8 global devices" in output
  multi, single = losses(workdir), losses(replicated_run)
  assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
  for step in single:
    np.testing.assert_allclose(multi[step]["loss"], single[step]["loss"], rtol=1e-5, err_msg=f"step {step}")
    np.testing.assert_allclose(multi[step]["grad_norm"], single[step]["grad_norm"], rtol=1e-4)
  knn_multi, knn_single = knn_rows(workdir), knn_rows(replicated_run)
  assert sorted(knn_multi) == sorted(knn_single) and STEPS in knn_single
  for step in knn_single:  # features gathered from both processes: the same bank and queries
    np.testing.assert_allclose(knn_multi[step], knn_single[step], rtol=1e-5, err_msg=f"kNN at step {step}")


def test_only_process_zero_writes_and_logs(two_process_run):
  workdir, output = two_process_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert len(steps) == len(set(steps)), f"metrics.jsonl has rows from more than one process: {steps}"
  assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
  assert os.path.exists(os.path.join(workdir, "loss.png"))
  assert len(re.findall(rf"step {STEPS}/{STEPS} loss=", output)) == 1, "step lines logged by both processes"


def test_two_process_checkpoint_restores(two_process_run, replicated_run, dist_synthetic_dir):
  workdir, _ = two_process_run
  latest = os.path.join(workdir, "checkpoints", str(STEPS))
  # The loop's own counters are saved once (the data position is the step itself: no per-process state).
  assert not os.path.exists(os.path.join(latest, "data"))
  assert os.path.isdir(os.path.join(latest, "loop"))
  # The state both processes wrote restores here, on one process, straight into FSDP shardings.
  config = make_config(dist_synthetic_dir, data_axis=2, fsdp_axis=4)
  mesh = parallel.make_mesh(config.mesh)
  _, abstract, shardings = _abstract_state(config, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  restored = _restore_state(workdir, target)
  assert int(restored["step"]) == STEPS
  kernel = restored["params"]["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding == shardings["params"]["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  reference = checkpoint.load_state(replicated_run)
  for (path, got), want in zip(
    jax.tree_util.tree_leaves_with_path(jax.device_get(restored)), jax.tree.leaves(reference)
  ):
    # atol: the k-part of the qkv bias gets no gradient (softmax ignores it) and holds only rounding noise.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=parallel.path_str(path))


# ---- FSDP (data=2, fsdp=4) == replicated (data=8, fsdp=1), and FSDP really splits the live state


def test_fsdp_trains_like_replicated(fsdp_run, replicated_run):
  fsdp, single = losses(fsdp_run[0]), losses(replicated_run)
  assert sorted(fsdp) == sorted(single) == list(range(1, STEPS + 1))
  for step in single:
    np.testing.assert_allclose(fsdp[step]["loss"], single[step]["loss"], rtol=1e-4, err_msg=f"step {step}")
  final_fsdp, final_single = checkpoint.load_state(fsdp_run[0]), checkpoint.load_state(replicated_run)
  for a, b in zip(jax.tree.leaves(final_fsdp["params"]), jax.tree.leaves(final_single["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_fsdp_shards_the_live_state(fsdp_run):
  _, live = fsdp_run
  assert sorted(live) == list(range(2, STEPS + 1, 2))
  state = live[STEPS]
  sharded_bytes = total_bytes = 0
  for name, (shape, sharding, shard_shape) in state.items():
    size = int(np.prod(shape))
    total_bytes += size
    if name in ("step", "rng", "lr_scale") or name.endswith("/count"):
      continue
    # Every parameter, teacher and optimizer moment of the smoke model has a dimension divisible by 4.
    assert "fsdp" in sharding.spec, f"{name} {shape} is not sharded: {sharding.spec}"
    assert int(np.prod(shard_shape)) * 4 == size, f"{name}: shard {shard_shape} of {shape}"
    assert "data" not in sharding.spec, f"{name} is split over the data axis: {sharding.spec}"
    sharded_bytes += size
  assert sharded_bytes / total_bytes > 0.99


# ---- ViT-B under FSDP on 8 fake devices: what a large model's state looks like


def test_vit_b_state_is_created_sharded():
  config = dino_ben.get_config("smoke")
  config.model.arch = "base"
  config.model.depth = config.model.embed_dim = config.model.num_heads = -1  # the arch's own 12 x 768
  config.mesh.data, config.mesh.fsdp = 2, 4
  mesh = parallel.make_mesh(config.mesh)
  task = dino.make_task(
    config, steps_per_epoch=4, total_steps=4, in_chans=3, mean=np.zeros(3), std=np.ones(3), mesh=mesh
  )
  abstract = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  shardings = parallel.tree_shardings(abstract, config.sharding_rules, mesh)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
  assert 85e6 < num_params < 88e6, num_params  # ViT-B/8 backbone plus the smoke head
  assert parallel.replicated_fraction(abstract, shardings) < 1e-3
  assert "replicated (0.00% of the bytes)" in parallel.sharding_summary(abstract, shardings)
  replicated = parallel.tree_shardings(abstract, [(".*", "replicate")], mesh)
  assert parallel.replicated_fraction(abstract, replicated) == 1.0

  state = jax.jit(task.init, out_shardings=shardings)(jax.random.PRNGKey(0))
  blocks = state["params"]["backbone"]
  for name in ("attn/qkv/kernel", "attn/proj/kernel", "mlp/fc1/kernel", "mlp/fc2/kernel"):
    for depth in (0, 11):
      leaf = blocks[f"blocks_{depth}"]
      for key in name.split("/"):
        leaf = leaf[key]
      spec = leaf.sharding.spec
      assert "fsdp" in spec and "data" not in spec, (name, spec)
      shard = leaf.addressable_shards[0].data
      assert shard.size * 4 == leaf.size, (name, leaf.shape, shard.shape)
  # Memory per device: a quarter of the state (fsdp=4), held twice over by the data axis.
  total = sum(x.nbytes for x in jax.tree.leaves(state))
  on_device_0 = sum(
    s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards if s.device == jax.devices()[0]
  )
  assert on_device_0 < 0.26 * total, (on_device_0, total)
  # The Adam moments follow their parameters' layout; only the step counters stay whole.
  for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"]):
    if leaf.ndim:
      assert "fsdp" in leaf.sharding.spec, (parallel.path_str(path), leaf.sharding.spec)


# ---- a 2-process run killed with SIGKILL resumes bit for bit, like the 1-process one (test_robustness.py)


def test_two_process_run_killed_and_resumed_is_bit_exact(two_process_run, dist_synthetic_dir, tmp_path):
  reference, _ = two_process_run
  workdir = tmp_path / "killed"
  with open(tmp_path / "first.log", "w") as log:
    proc = _start(workdir, dist_synthetic_dir, log)
    deadline = time.monotonic() + 420
    # Half way: step 4 committed (Orbax renames the step folder into place only once it is complete).
    while not (workdir / "checkpoints" / str(STEPS // 2)).is_dir():
      assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
      assert time.monotonic() < deadline, "no checkpoint within the time limit"
      time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert not (workdir / "checkpoints" / str(STEPS)).is_dir(), "the run ended before it could be killed"
  output = _launch(workdir, dist_synthetic_dir, tmp_path / "resumed.log")
  resumed_from = int(re.search(r"resuming from step (\d+) of", output).group(1))
  assert STEPS // 2 <= resumed_from < STEPS
  want, got = losses(reference), losses(str(workdir))
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), "each step once in metrics.jsonl"
  for step in want:
    assert got[step]["loss"] == want[step]["loss"], step
  for a, b in zip(
    jax.tree.leaves(checkpoint.load_state(reference)), jax.tree.leaves(checkpoint.load_state(str(workdir)))
  ):
    np.testing.assert_array_equal(a, b)


# ---- evaluation batches: a last global batch with fewer rows than processes must neither hang nor lose rows


def test_features_gathered_when_last_batch_has_fewer_rows_than_processes(tmp_path):
  """17 rows, 8 per process: the last global batch has 1 row, so process 1's share of it is empty."""
  script = os.path.join(REPO, "tests", "two_process_features.py")
  port = __import__("portpicker").pick_unused_port()
  procs = []
  for p in range(PROCESSES):
    env = dict(
      _subprocess_env(8 // PROCESSES),
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES=str(PROCESSES),
      JAX_PROCESS_ID=str(p),
    )
    out = open(tmp_path / f"p{p}.json", "w")
    procs.append(
      (
        subprocess.Popen(
          [sys.executable, script],
          cwd=REPO,
          env=env,
          stdout=out,
          stderr=subprocess.PIPE,
          text=True,
          start_new_session=True,
        ),
        out,
      )
    )
  results = []
  for p, (proc, out) in enumerate(procs):
    try:
      _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for other, _ in procs:
        os.killpg(other.pid, signal.SIGKILL)
      raise AssertionError("feature gathering hung: a process waited in a collective the other never reached") from None
    out.close()
    assert proc.returncode == 0, err[-4000:]
    results.append(json.loads((tmp_path / f"p{p}.json").read_text().strip().splitlines()[-1]))  # after gloo chatter
  for result in results:  # every process holds every row, once, in order, with its own features
    assert result["index"] == list(range(17))
    np.testing.assert_allclose(result["features"], [[3.0 * i] for i in range(17)])
