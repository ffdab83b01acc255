#!/usr/bin/env bash
# Sets up .venv (tools/setup.sh) and runs the whole test suite. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
