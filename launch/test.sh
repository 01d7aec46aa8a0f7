#!/usr/bin/env bash
# Runs the whole test suite (the fast tier; slow tests: `bash launch/test.sh -m slow`).
# Creates or reuses .venv by itself. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec "$PYTHON_BIN" -m pytest -q "$@"
