#!/usr/bin/env bash
# The GPU bench in one command (bench/README.md, "GPU bench"): ~7 minutes on one H200.
#   bash bench/gpu_bench.sh            # on the GPU machine, from the repo root (device tool: run)
#   bash bench/gpu_bench.sh --smoke    # CPU, tiny base, < 90 s on 2 cores (tests/test_gpu_bench_smoke.py)
# Other arguments go to bench/gpu_bench.py (--records, --cap-s, --budget-s, --recipes C,A,B,C-flex ...).
#   bash bench/gpu_bench.sh --nproc N  # also C on N GPUs through torchrun (C-ranks): scaling efficiency
#
# Set up: wheels carried in .whl/ (bitsandbytes, trl, datasets, pydantic, ...; see
# bench/fetch_gpu_wheels.sh) are installed into /tmp/site and put first on PYTHONPATH, as the
# device README says; HF_HUB_OFFLINE=1, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.
# Results: gpu_bench.json, gpu_bench.md and gpu_bench.log (gpu_bench_smoke.* with --smoke) in
# $OUT when set (the device machine's output folder), else in bench/results/.
# The whole run is stopped after GPU_BENCH_TIMEOUT_S (default 480 s); gpu_bench.py itself plans
# for --budget-s (default 450 s) and writes its JSON after every recipe.
set -uo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "gpu_bench: installing the carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_bench: installing the carried wheels (.whl/) failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

name=gpu_bench
for a in "$@"; do [ "$a" = "--smoke" ] && name=gpu_bench_smoke; done
dest="${OUT:-$ROOT/bench/results}"
mkdir -p "$dest"
log="$dest/$name.log"
: > "$log"

{
  echo "gpu_bench: $(date -u +%FT%TZ), python $("$PY" -c 'import sys; print(sys.version.split()[0])'), $(nproc) CPUs"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || true
  else
    echo "gpu_bench: no nvidia-smi (no NVIDIA GPU here)"
  fi
  "$PY" - <<'EOF' || true
import importlib.util as u
names = ("torch", "transformers", "peft", "bitsandbytes", "pydantic", "trl", "datasets", "flash_attn")
print("gpu_bench: packages:", ", ".join(m + (" yes" if u.find_spec(m) else " MISSING") for m in names))
EOF
} 2>&1 | tee -a "$log"

limit="${GPU_BENCH_TIMEOUT_S:-480}"
timeout -k 10 "$limit" "$PY" bench/gpu_bench.py --out "$dest/$name.json" "$@" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "gpu_bench: stopped after $limit s (GPU_BENCH_TIMEOUT_S); $dest/$name.json holds the recipes that finished" | tee -a "$log" >&2
fi
exit "$rc"
