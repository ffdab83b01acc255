"""Which of mmengine's Python modules run compiled, and when their source runs instead.

The build (setup.py) compiles the modules on the request path with Cython,
unchanged: the same source, without the interpreter's dispatch (a quarter of
what serving adds to a tiny model's call; benchmarks/RESULTS.md). A compiled
module sits beside its source, and Python's import prefers it; this finder,
installed first by mmengine/__init__.py, prefers the source where

- MMENGINE_SOURCE is set (profilers that read Python frames, such as py-spy
  without --native, see the source's functions), or MMENGINE_PURE_PYTHON
  (which also runs the native core's Python twins), or
- the source is not the one that was compiled: a build that succeeds
  records each module's digest (mmengine/_digest.py: its source, its .pxd
  and those its .pxd cimports) in BUILD_RECORD beside the compiled modules
  (setup.py), and an edited or checked-out source, or a build that failed
  or was killed, runs the source as it is now, never a stale build of it (a
  warning says to rebuild).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

from mmengine import config
from mmengine._digest import digest

PACKAGE = Path(__file__).resolve().parent
BUILD_RECORD = "_compiled.json"  # {module name: digest of what it was compiled from}




class _SourceFirst:
    """A meta-path finder for mmengine's compiled modules (see above)."""

    def __init__(self, record: dict[str, str], run_source: bool):
        self.record = record
        self.run_source = run_source  # asked for: every source runs

    def find_spec(self, name, path=None, target=None):
        if not name.startswith("mmengine.") or path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return None
        source = Path(spec.origin).with_name(name.rpartition(".")[2] + ".py")
        if not source.is_file():  # a native module of its own (_ring, _cache)
            return None
        if not self.run_source:
            if self.record.get(name) == digest(source):
                return spec
            print(f"mmengine: {name} is not known to be compiled from its source as it is; "
                  f"running the source (rebuild: python setup.py build_ext --inplace)",
                  file=sys.stderr)
        return importlib.util.spec_from_file_location(name, source)


def install() -> None:
    try:
        record = json.loads((PACKAGE / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        record = {}  # never built: nothing compiled to prefer
    sys.meta_path.insert(0, _SourceFirst(record, config.run_source()))


def compiled(module) -> bool:
    """Whether `module` (one of mmengine's) runs compiled."""
    return isinstance(getattr(module, "__loader__", None),
                      importlib.machinery.ExtensionFileLoader)
