#!/usr/bin/env bash
# Creates (or reuses) .venv with everything the project needs, and builds the
# native core in place. torch==2.13.0, the CPU build, goes in first so that no
# later requirement can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

# Dependencies change rarely: reinstall only when pyproject.toml changes.
stamp="$VENV/.mmengine-deps"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -c 'import torch' 2>/dev/null || pip install torch==2.13.0
    pip install "setuptools>=77" wheel "cython>=3.0"
    # The build below compiles everything in place: the editable install
    # need not compile the modules too.
    MMENGINE_BUILD_ONLY=ring pip install --no-build-isolation -e '.[dev]'
    echo "$want" > "$stamp"
fi
# The native core is rebuilt on every run; Cython and setuptools skip what
# has not changed.
log=$VENV/.mmengine-build.log
if ! "$VENV/bin/python" setup.py -q build_ext --inplace -j "$(nproc)" >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: building the native core failed (log above)" >&2
    exit 1
fi
"$VENV/bin/python" -c 'import mmengine._ring, mmengine._cache, mmengine._wire, mmengine._records, mmengine._reads, mmengine._guard, mmengine.engine as e
from mmengine import _source
assert _source.compiled(e), "setup: the compiled modules did not build"'
