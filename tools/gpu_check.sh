#!/usr/bin/env bash
# The load path on a GPU machine, in one prepared run of under five minutes:
# builds the native parts in place with the machine's own python3 (the one
# whose torch has CUDA; no virtual environment, nothing downloaded), prints
# tools/gpu_check.py's JSON (see its docstring for each figure) on stdout,
# then runs the device paths' tests (tests/test_gpu.py, tests/test_hosttier.py)
# with their output on stderr; exits non-zero if either failed. Last, with
# the time left, benchmarks/load.py --quick runs on a CPU worker with the
# machine's cores to spare, for #6's interference goal, then again with its
# small model's slowest requests during loads split by what the worker's
# thread did (MMENGINE_ACCOUNT_REQUESTS, whose system calls change the
# worker's timing: not the run to read interference from): one JSON line
# on stderr each (~15 s each).
#
# That machine reaches no package index, and its image lacks some of the
# server's packages (httptools, orjson, zstandard): `bash tools/gpu_wheels.sh`
# here first fetches them into .whl/ for its Python (3.12), and the device
# call carries it (carry: [".whl"]); they are installed from there. With
# $OUT set (the device tool's), the JSON and the tests' log are written
# there as well, so that neither is lost to a cut output.
#
#   bash tools/gpu_check.sh            # on the GPU machine
#   bash tools/gpu_check.sh --device cpu --mb 16   # a dry run of the same steps here
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "${1:-}" = "--device" ] && PY=.venv/bin/python
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-}
if compgen -G ".whl/*.whl" > /dev/null && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mmengine-site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/mmengine-site"
fi
"$PY" -c "import torch, sys; print('gpu_check: torch', torch.__version__, 'cuda', torch.cuda.is_available(), file=sys.stderr)" || exit
"$PY" - <<'EOF' >&2
import importlib.util
missing = [m for m in ("httptools", "orjson", "zstandard", "msgpack", "uvloop", "psutil",
                       "pynvml", "prometheus_client", "pytest", "pytest_timeout")
           if importlib.util.find_spec(m) is None]
if missing:  # the check runs without them; the tests that start a server do not
    print("gpu_check: missing", ", ".join(missing), "(bash tools/gpu_wheels.sh here, then "
          "carry .whl)")
EOF
# The compiled modules take the longest to build (engine.c alone ~45 s on one
# core): without them the same code runs as Python, slower on the request
# path, which no figure here depends on.
if ! "$PY" setup.py build_ext --inplace -j "$(nproc)" > /tmp/mmengine-build.log 2>&1; then
  echo "gpu_check: the full build failed (tail below); building ring and cache only" >&2
  tail -n 20 /tmp/mmengine-build.log >&2
  MMENGINE_BUILD_ONLY=ring,cache "$PY" setup.py build_ext --inplace -j "$(nproc)" \
    > /tmp/mmengine-build.log 2>&1 || { tail -n 20 /tmp/mmengine-build.log >&2; exit 1; }
fi
timeout 120 "$PY" tools/gpu_check.py "$@" | tee ${OUT:+"$OUT/gpu_check.json"}
check=${PIPESTATUS[0]}
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short --timeout 40 \
  tests/test_gpu.py tests/test_hosttier.py 2>&1 | tee ${OUT:+"$OUT/tests.log"} | tail -n 60 >&2
tests=${PIPESTATUS[0]}
for account in 0 1; do
  CUDA_VISIBLE_DEVICES= MMENGINE_ACCOUNT_REQUESTS=$account timeout 45 "$PY" benchmarks/load.py \
    --quick --json 2>/dev/null | tail -n 1 \
    | sed "s/^/gpu_check: load.py, $(nproc) cores, account_requests $account: /" >&2
done
echo "gpu_check: check exit $check, tests exit $tests" >&2
[ "$check" = 0 ] && [ "$tests" = 0 ]
