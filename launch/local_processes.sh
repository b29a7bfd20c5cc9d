#!/usr/bin/env bash
# N cooperating processes on this host through jax.distributed (what CI uses to exercise multi-host code on
# CPU; also handy to debug a multi-node run on one box). Each process gets its own share of the data.
#   launch/local_processes.sh 2 configs/dino_ben.py:smoke /tmp/run2 [--config.x=y ...]
# Environment each process receives (read by jaxgeo.parallel.initialize_distributed):
#   JAX_COORDINATOR_ADDRESS=localhost:PORT  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
# JAXGEO_PYTHON names the interpreter (default: python on PATH); pass the venv's python when it is not activated,
# e.g. JAXGEO_PYTHON=.venv/bin/python launch/local_processes.sh 2 ...
set -euo pipefail
python=${JAXGEO_PYTHON:-python}
n=${1:?number of processes}; config=${2:?config}; workdir=${3:?workdir}; shift 3
port=${JAX_PORT:-$("$python" -c 'import portpicker; print(portpicker.pick_unused_port())')}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=localhost:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    "$python" -m jaxgeo.main --config="$config" --workdir="$workdir" "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT  # forward preemption: every process saves together
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
