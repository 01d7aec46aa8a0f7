#!/usr/bin/env bash
# The main job on one machine. Creates or reuses .venv by itself.
# Until the trainer lands this runs the numerics demo: every format's range and
# precision, and the quantization error per granularity.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PYTHON_BIN" experiments/numerics.py "$@"
