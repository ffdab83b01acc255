"""Configuration: the only reader of MMENGINE_* environment variables."""
from __future__ import annotations

import os

#: Set to 1 to run the pure-Python twins of the native core (the test
#: oracle) instead of the Cython/C extensions.
PURE_PYTHON_VAR = "MMENGINE_PURE_PYTHON"


def pure_python() -> bool:
    return os.environ.get(PURE_PYTHON_VAR, "0") not in ("", "0")
