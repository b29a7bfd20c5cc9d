"""Test-wide setup: JAX on the CPU with 8 fake devices, so every sharding path runs without a GPU.

These variables must be set before jax is first imported, which is why they live at the top of conftest.
"""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compiled steps are reused across the subprocesses some tests start (same program, same shapes).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join("/tmp", f"jaxgeo-test-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
