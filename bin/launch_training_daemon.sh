#!/usr/bin/env bash
# Start trainerd in the background for the base dir (repo root, or $TRAINER_HOME).
# Exactly one daemon per base dir: an flock guards it; a second launch exits 1 "already running (pid N)".
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
PY="${TRAINER_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || { echo "launch_training_daemon: no virtualenv at $ROOT/.venv: run bin/setup.sh first" >&2; exit 2; }
cd "$ROOT" && exec "$PY" -m daemon.launcher "$@"
