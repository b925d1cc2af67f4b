#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (Python 3.12, x86-64) into .whl/ (git-ignored
# through .git/info/exclude), so `run` can carry them: ~48 MB, under the 64 MiB a call allows.
# The machine has torch, transformers, peft, accelerate, pyarrow, pandas, xxhash, fsspec,
# nvidia-ml-py (see /work/.library/device/KINDS.md); not bitsandbytes, trl, datasets, pydantic.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
for spec in bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
            pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$spec"
done
du -ch .whl/*.whl | tail -1
