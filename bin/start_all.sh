#!/usr/bin/env bash
# One command from a fresh clone: set up, make sure a base model exists (the embedded tiny one by
# default), give the queue demo data if it is empty, start the daemon, and say how to watch it.
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
"$ROOT/bin/setup.sh"
cd "$ROOT"
PY=.venv/bin/python
HOME_DIR="${TRAINER_HOME:-$ROOT}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# A base model: the one config.json names, or the embedded tiny base built once.
"$PY" - "$HOME_DIR" <<'PYEOF'
import sys
from pathlib import Path
from core.config import ConfigError, load_config
home = Path(sys.argv[1])
try:
    cfg = load_config(home / "config.json")
except ConfigError as exc:
    sys.exit(f"start_all: {exc}")
base = cfg.base_model_path(home)
if cfg.trainer == "qlora" and (base is None or not base.is_dir()):
    from trainer.tiny_base import build_tiny_base
    target = base or home / "consolidated_models" / "tiny-base"
    if base is None or not base.is_relative_to(home / "consolidated_models"):
        sys.exit(f"start_all: base_model {base} does not exist; point config.json at a local HF model folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    build_tiny_base(target)
    print(f"start_all: built the embedded tiny base in {target}")
PYEOF
# Demo data when there is nothing to do.
if [ -z "$(ls -A "$HOME_DIR/inbox" 2>/dev/null | grep -v '^\.')" ] && [ -z "$(ls -A "$HOME_DIR/queue/pending" 2>/dev/null)" ] \
   && [ ! -s "$HOME_DIR/status/state.db" ]; then
  "$PY" -m ops.ctl --home "$HOME_DIR" generate --count 2000 --seed 0
fi
rc=0; "$ROOT/bin/launch_training_daemon.sh" --home "$HOME_DIR" || rc=$?
[ "$rc" -eq 0 ] || [ "$rc" -eq 1 ] || exit "$rc"     # 1: already running, which is fine here
"$ROOT/bin/monitor.sh" --background --home "$HOME_DIR" \
  || echo "start_all: the dashboard did not start (see $HOME_DIR/logs/monitor_stdout.log); training goes on" >&2
PORT="$("$PY" -c "import sys; from core.config import load_config; print(load_config(sys.argv[1]).monitor.port)" "$HOME_DIR/config.json")"
cat <<MSG

Watch:  http://localhost:$PORT/        (dashboard: loss, throughput, memory, layers, queue)
        bin/trainer-ctl status        (step, loss, queue)
        tail -f $HOME_DIR/logs/daemon_$(date +%Y%m%d).log
Feed:   cp your.jsonl $HOME_DIR/inbox/    or   bin/trainer-ctl queue add FILE
Steer:  bin/trainer-ctl pause | resume | skip | stop      (emergency: touch $HOME_DIR/.stop)
MSG
