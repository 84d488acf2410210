#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) with every extra the tests need.
# Idempotent: the environment is rebuilt only when pyproject.toml changes (a stamp holds its hash).
# pip's download cache (~/.cache/pip) keeps wheels by version, so a second machine setup is fast.
#
# Usage: tools/setup-python.sh [EXTRAS]   (default: operator,trainer,dev)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QWEN_VENV:-$ROOT/.venv}"
EXTRAS="${1:-operator,trainer,dev}"

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
[[ -n "$PY" ]] || { echo "setup-python: no python3 found" >&2; exit 1; }
"$PY" - <<'PYCHECK' || { echo "setup-python: Python >= 3.11 is required" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PYCHECK

want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$EXTRAS"
stamp="$VENV/.qwen-stamp"
if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup-python: $VENV is up to date"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
start=$(date +%s)
"$VENV/bin/python" -m pip install --quiet -e "$ROOT[$EXTRAS]"
echo "$want" > "$stamp"
echo "setup-python: installed .[$EXTRAS] into $VENV in $(( $(date +%s) - start )) s"
