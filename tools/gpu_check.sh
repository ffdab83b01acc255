#!/usr/bin/env bash
# The load path on a GPU machine, in one prepared run of under five minutes:
# builds the native parts in place with the machine's own python3 (the one
# whose torch has CUDA; no virtual environment, nothing downloaded), prints
# tools/gpu_check.py's JSON (see its docstring for each figure) on stdout,
# then runs the device paths' tests (tests/test_gpu.py, tests/test_hosttier.py)
# with their output on stderr; exits non-zero if either failed. The tests
# need pytest and pytest-timeout in that python; on an H200 they took two
# minutes, the check under one. Between the two, benchmarks/load.py --quick
# runs three times on a CPU worker with the machine's cores to spare, its
# small model's slowest requests during loads split by what the worker's
# thread did (MMENGINE_ACCOUNT_REQUESTS): spinning during loads and not,
# then spinning with a GIL switch interval of 50 us instead of 500: one
# JSON line each on stderr, for #6's interference goal (~30 s).
#
#   bash tools/gpu_check.sh            # on the GPU machine
#   bash tools/gpu_check.sh --device cpu --mb 16   # a dry run of the same steps here
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "${1:-}" = "--device" ] && PY=.venv/bin/python
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; print('gpu_check: torch', torch.__version__, 'cuda', torch.cuda.is_available(), file=sys.stderr)" || exit
"$PY" setup.py build_ext --inplace -j "$(nproc)" >/dev/null || exit
timeout 90 "$PY" tools/gpu_check.py "$@"
check=$?
for run in "auto 500" "off 500" "auto 50"; do
  read -r spin switch <<< "$run"
  CUDA_VISIBLE_DEVICES= MMENGINE_SPIN_DURING_LOADS=$spin MMENGINE_GIL_SWITCH_US=$switch \
    MMENGINE_ACCOUNT_REQUESTS=1 timeout 60 "$PY" benchmarks/load.py --quick --json 2>/dev/null |
    tail -n 1 | sed "s/^/gpu_check: load.py, $(nproc) cores, spin_during_loads=$spin, gil_switch_us=$switch: /" >&2
done
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short --timeout 40 tests/test_gpu.py tests/test_hosttier.py >&2
tests=$?
echo "gpu_check: check exit $check, tests exit $tests" >&2
[ "$check" = 0 ] && [ "$tests" = 0 ]
