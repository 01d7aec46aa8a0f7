#!/usr/bin/env bash
# N trainer processes on this machine over gloo, each with the same trainer arguments:
#   bash launch/cpu_multiprocess.sh 2 --config=configs/gpt_tiny.py --workdir=workdirs/mp2
# Each process gets MPXLA_DEVICES_PER_PROCESS simulated CPU devices (default 1). The
# global batch, and so every loss, is the same as one process with the same batch size.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
N="${1:?usage: cpu_multiprocess.sh N [trainer arguments]}"; shift
PORT="${MPXLA_PORT:-$("$PYTHON_BIN" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PLATFORMS=cpu
export MPXLA_CPU_COLLECTIVES=gloo
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${MPXLA_DEVICES_PER_PROCESS:-1}"
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PROCESS_ID=$i "$PYTHON_BIN" -m mpxla.train "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
