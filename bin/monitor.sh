#!/usr/bin/env bash
# The monitor: dashboard and API on http://127.0.0.1:8080/ (config.json "monitor": host, port, token).
#   bin/monitor.sh [--host H] [--port P] [--home DIR]                 in the foreground
#   bin/monitor.sh --background [--host H] [--port P] [--home DIR]    detached; pid in logs/monitor.pid,
#                                                                     output in logs/monitor_stdout.log
# A non-loopback --host needs a token (monitor.token or TRAINER_MONITOR_TOKEN).
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
PY="${TRAINER_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || { echo "monitor: no virtualenv at $ROOT/.venv: run bin/setup.sh first" >&2; exit 2; }
cd "$ROOT"
BACKGROUND=0
ARGS=()
HOME_DIR="${TRAINER_HOME:-$ROOT}"
prev=""
for a in "$@"; do
  case "$a" in
    --background) BACKGROUND=1 ;;
    --home=*) HOME_DIR="${a#--home=}"; ARGS+=("$a") ;;
    *) [ "$prev" = "--home" ] && HOME_DIR="$a"; ARGS+=("$a") ;;
  esac
  prev="$a"
done
set -- ${ARGS[@]+"${ARGS[@]}"}
[ "$BACKGROUND" = 1 ] || exec "$PY" -m monitor "$@"
mkdir -p "$HOME_DIR/logs"
PIDFILE="$HOME_DIR/logs/monitor.pid"
LOG="$HOME_DIR/logs/monitor_stdout.log"
if [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null \
   && grep -q "monitor" "/proc/$(cat "$PIDFILE")/cmdline" 2>/dev/null; then
  echo "monitor: already running (pid $(cat "$PIDFILE"))"
  exit 0
fi
nohup "$PY" -m monitor "$@" >>"$LOG" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$PIDFILE"
for _ in $(seq 1 30); do          # up to 3 s for it to fail (bad config, port taken, no token)
  kill -0 "$pid" 2>/dev/null || { echo "monitor: failed to start; the end of $LOG:" >&2; tail -n 5 "$LOG" >&2; rm -f "$PIDFILE"; exit 1; }
  sleep 0.1
done
echo "monitor: started (pid $pid); output in $LOG"
