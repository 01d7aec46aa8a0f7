#!/usr/bin/env bash
# The main job on one machine: trains the default GPT on the embedded corpus.
# Creates or reuses .venv by itself; resumes from the workdir's latest checkpoint.
#   bash launch/local.sh                                   # configs/gpt_tiny.py -> workdirs/gpt_tiny
#   bash launch/local.sh --config=configs/gpt_tiny.py:coat --workdir=workdirs/coat --config.total_steps=100
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
args=("$@")
[[ " ${args[*]-} " == *" --config="* ]] || args+=("--config=configs/gpt_tiny.py")
[[ " ${args[*]-} " == *" --workdir="* ]] || args+=("--workdir=workdirs/gpt_tiny")
exec "$PYTHON_BIN" -m mpxla.train "${args[@]}"
