#!/usr/bin/env bash
# Training on a Cloud TPU VM pod slice: run the same command on every host.
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command \
#     "cd mpxla && bash launch/tpu_vm.sh --config=configs/gpt_tiny.py:coat --workdir=/mnt/shared/runs/coat"
# jax.distributed discovers the hosts of a TPU pod by itself (mpxla.parallel.initialize()).
# Needs the `tpu` extra. The workdir must be a path every host sees (e.g. a gcsfuse mount).
export MPXLA_EXTRAS="${MPXLA_EXTRAS:-tpu,data,train}"
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PYTHON_BIN" -m mpxla.train "$@"
