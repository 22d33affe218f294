#!/usr/bin/env bash
# Trains one SAE with N processes on this machine (CPU, gloo collectives): the multi-host code path
# of a pod, runnable anywhere.
#   bash launch/local_multiprocess_cpu.sh 2 --flagfile=launch/configs/tiny_cpu.flags \
#     --store=outputs/quickstart/store/layer_0 --workdir=/tmp/sae_2proc
set -euo pipefail
num="$1"; shift
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < num; i++)); do
  python -m sae_jax.train "$@" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num" --process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
