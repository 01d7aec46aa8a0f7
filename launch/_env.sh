# Sourced by the launch scripts: creates or reuses the virtual environment ($MPXLA_VENV,
# default .venv in the repository) and installs mpxla (editable) with the extras in
# $MPXLA_EXTRAS, pinned by constraints.txt. Reinstalls only when pyproject.toml,
# constraints.txt or the extras change. One line per stage; pip's output goes to
# $VENV/install.log (printed if the install fails).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MPXLA_VENV:-$ROOT/.venv}"
EXTRAS="${MPXLA_EXTRAS:-dev,data,train}"

if [ ! -x "$VENV/bin/python" ]; then
  PY="${PYTHON:-}"
  if [ -z "$PY" ]; then
    for cand in python3.11 python3.12 python3.13 python3; do
      if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        PY="$cand"; break
      fi
    done
  fi
  if [ -z "$PY" ]; then
    echo "mpxla needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  echo "[mpxla] creating $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.mpxla-$( (cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt"; echo "$EXTRAS") | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  LOG="$VENV/install.log"
  echo "[mpxla] installing mpxla[$EXTRAS] into $VENV (first run takes a few minutes; log: $LOG)" >&2
  SECONDS=0
  if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
         "$VENV/bin/python" -m pip install -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]"; } >"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    echo "[mpxla] install failed; the whole log is $LOG" >&2
    exit 1
  fi
  echo "[mpxla] installed in ${SECONDS} s" >&2
  rm -f "$VENV"/.mpxla-*
  touch "$STAMP"
fi
PYTHON_BIN="$VENV/bin/python"
cd "$ROOT"
