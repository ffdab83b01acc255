#!/usr/bin/env bash
# The load path on a GPU machine, in one prepared run of under five minutes:
# builds the native parts in place with the machine's own python3 (the one
# whose torch has CUDA; no virtual environment, nothing downloaded) and
# prints tools/gpu_check.py's JSON (see its docstring for each figure).
#
#   bash tools/gpu_check.sh            # on the GPU machine
#   bash tools/gpu_check.sh --device cpu --mb 16   # a dry run of the same steps here
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "${1:-}" = "--device" ] && PY=.venv/bin/python
"$PY" -c "import torch, sys; print('gpu_check: torch', torch.__version__, 'cuda', torch.cuda.is_available(), file=sys.stderr)"
"$PY" setup.py build_ext --inplace >/dev/null
exec timeout 280 env PYTHONPATH=. PYTHONUNBUFFERED=1 "$PY" tools/gpu_check.py "$@"
