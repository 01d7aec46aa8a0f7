#!/usr/bin/env bash
# Runs the whole test suite (the fast tier; slow tests: `bash launch/test.sh -m slow`), on
# as many pytest workers as there are cores (at most 4). Creates or reuses .venv by itself.
# Extra arguments go to pytest (e.g. `bash launch/test.sh tests/formats -x`).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
WORKERS="${MPXLA_TEST_WORKERS:-$(nproc 2>/dev/null || echo 2)}"
[ "$WORKERS" -gt 4 ] && WORKERS=4
exec "$PYTHON_BIN" -m pytest -q -n "$WORKERS" "$@"
