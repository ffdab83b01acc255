#!/usr/bin/env bash
# Fetches into .whl/ the wheels of the server's packages that the GPU
# machine's image lacks, built for its Python (3.12, x86_64 Linux): that
# machine reaches no package index. The device call then carries .whl
# (ignored by git), and tools/gpu_check.sh installs them there.
#
#   bash tools/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
rm -rf .whl
# The versions this machine's environment runs, where it has them.
pin() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
for name in httptools orjson zstandard; do
  version=$(pin "$name")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$name${version:+==$version}"
done
ls -l .whl
