#!/usr/bin/env bash
# One process drives every GPU of this machine: JAX's single-controller model needs no per-GPU launcher.
#   launch/single_host.sh configs/dino_ben.py /runs/dino [--config.x=y ...]
# Environment it relies on:
#   CUDA_VISIBLE_DEVICES   which GPUs to use (default: all)
#   XLA_PYTHON_CLIENT_MEM_FRACTION  share of GPU memory JAX preallocates (default here 0.9)
#   JAXGEO_PYTHON          the interpreter (default: python on PATH), e.g. /opt/venv/bin/python
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec "${JAXGEO_PYTHON:-python}" -m jaxgeo.main --config="$config" --workdir="$workdir" "$@"
