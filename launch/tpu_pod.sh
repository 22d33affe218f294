#!/usr/bin/env bash
# Runs the trainer on every worker of a Cloud TPU VM pod slice. JAX finds the other hosts itself
# (sae_jax.train --distributed=auto detects the pod), each host reads its share of the store.
#   bash launch/tpu_pod.sh TPU_NAME ZONE --flagfile=launch/configs/pod_16m.flags --store=... --workdir=...
# The repo must be at ~/llava-sae on every worker (e.g. `gcloud ... scp --worker=all`), and the
# store and workdir on storage every worker sees (a GCS bucket via gcsfuse, or Filestore).
set -euo pipefail
tpu="$1"; zone="$2"; shift 2
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/llava-sae && pip install -q -e '.[tpu]' &&
  python -m sae_jax.train $*"
