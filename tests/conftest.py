"""Test-wide setup: JAX on the CPU with 8 fake devices, so every sharding path runs without a GPU.

These variables must be set before jax is first imported, which is why they live at the top of conftest.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compiled steps are reused across the subprocesses some tests start (same program, same shapes).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join("/tmp", f"jaxgeo-test-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


# ---- shared fixtures: one synthetic dataset and one smoke training run for the whole session.
import sys  # noqa: E402

import pytest  # noqa: E402

from jaxgeo.train import dino, loop, writers  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import dino_ben  # noqa: E402


def smoke_config(synthetic_dir, **train):
  config = dino_ben.get_config("smoke")
  config.data.synthetic_dir = str(synthetic_dir)
  for key, value in train.items():
    config.train[key] = value
  config.lock()
  return config


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("synthetic_ben")


@pytest.fixture(scope="session")
def smoke_run(synthetic_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dino_smoke")
  config = smoke_config(synthetic_dir)
  status = loop.run(config, str(workdir), dino.make_task)
  return config, str(workdir), status


def losses_by_step(workdir):
  """Training rows by step (the last one wins after a resume); the step-0 kNN baseline row has no loss."""
  rows = {}
  for row in writers.read_metrics(workdir):
    if "loss" in row:
      rows[row["step"]] = row
  return rows
