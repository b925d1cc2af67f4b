#!/usr/bin/env bash
# The GPU bench in one command (bench/README.md, "GPU bench"): ~8 minutes on one H200.
#   bash bench/gpu_bench.sh            # on the GPU machine, from the repo root
#   bash bench/gpu_bench.sh --smoke    # CPU, tiny base, < 90 s (what CI runs)
# Wheels carried in .whl/ (bitsandbytes, trl, datasets, pydantic, ...) are installed first into
# /tmp/site; results go to $OUT (the device machine's output folder) if set, else bench/results/.
set -uo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_bench: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
dest="${OUT:-$ROOT/bench/results}"
mkdir -p "$dest"
name=gpu_bench
for a in "$@"; do [ "$a" = "--smoke" ] && name=gpu_bench_smoke; done
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
limit="${GPU_BENCH_TIMEOUT_S:-540}"
timeout -k 10 "$limit" "$PY" bench/gpu_bench.py --out "$dest/$name.json" "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu_bench: stopped after $limit s (GPU_BENCH_TIMEOUT_S)" >&2
exit $rc
