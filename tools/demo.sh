#!/usr/bin/env bash
# Sets up .venv (tools/setup.sh) and serves the bundled demo repository:
# 64 generated models of several backends, a budget that holds a fraction of
# them. Extra arguments go to `mmengine serve`. Stop with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m mmengine.cli serve --demo "$@"
