#!/usr/bin/env bash
# Create .venv and install the project with its test tools. Idempotent: a second run is instant.
# With no CUDA GPU, torch==2.13.0 (CPU build) is installed first so that no multi-GB CUDA build
# is pulled in; an existing torch (e.g. your CUDA build) is left alone.
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
want="$(cat pyproject.toml bin/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$want" ]; then
  echo "setup: installing into $ROOT/.venv (first run: about a minute)" >&2
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "$PY" -m pip install -q --disable-pip-version-check "torch>=2.4"
    else
      "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
    fi
  fi
  "$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
  echo "$want" > .venv/.setup-stamp
fi
