"""The compiled Python modules (setup.py, mmengine/_source.py): they run
where they were built from the source there is, and the source runs
wherever it is asked for or has changed since the build."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmengine
from mmengine import _source

PACKAGE = Path(mmengine.__file__).resolve().parent
BUILT = (PACKAGE / _source.BUILD_RECORD).is_file()
pytestmark = pytest.mark.skipif(not BUILT, reason="the compiled modules are not built")

REPORT = ("import json, mmengine, mmengine.engine, mmengine.trace, mmengine.worker; "
          "from mmengine import _source; print(json.dumps({m.__name__: _source.compiled(m) "
          "for m in (mmengine.engine, mmengine.trace, mmengine.worker)}))")


def _report(root: Path, **env) -> tuple[dict, str]:
    env = {**{k: v for k, v in os.environ.items() if k != "MMENGINE_PURE_PYTHON"},
           "PYTHONPATH": str(root), **env}
    run = subprocess.run([sys.executable, "-c", REPORT], env=env, capture_output=True,
                         text=True, timeout=120, cwd=root)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout), run.stderr


def test_the_build_records_every_compiled_module_and_they_run_compiled():
    record = json.loads((PACKAGE / _source.BUILD_RECORD).read_text())
    for name, digest in record.items():
        source = PACKAGE.joinpath(*name.split(".")[1:]).with_suffix(".py")
        assert _source.digest(source) == digest, f"{name}: rebuild (python setup.py build_ext)"
    assert {"mmengine.engine", "mmengine.workers", "mmengine.worker",
            "mmengine.server.tcp", "mmengine.client"} <= set(record)
    got, err = _report(PACKAGE.parent)
    assert got == {"mmengine.engine": True, "mmengine.trace": True, "mmengine.worker": True}
    assert "is not known to be compiled" not in err


@pytest.mark.parametrize("switch", ["MMENGINE_SOURCE", "MMENGINE_PURE_PYTHON"])
def test_either_switch_runs_every_source(switch):
    got, _ = _report(PACKAGE.parent, **{switch: "1"})
    assert got == {"mmengine.engine": False, "mmengine.trace": False, "mmengine.worker": False}
    got, _ = _report(PACKAGE.parent, **{switch: "0"})
    assert got == {"mmengine.engine": True, "mmengine.trace": True, "mmengine.worker": True}


def test_a_source_changed_since_the_build_runs_as_source(tmp_path):
    copy = tmp_path / "mmengine"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.c", "__pycache__"))
    trace = copy / "trace.py"
    trace.write_text(trace.read_text() + "\nEDITED = True\n")
    got, err = _report(tmp_path)
    assert got == {"mmengine.engine": True, "mmengine.trace": False, "mmengine.worker": True}
    assert "mmengine.trace is not known to be compiled" in err
    # Without a record (a failed build removes it) nothing runs compiled.
    (copy / _source.BUILD_RECORD).unlink()
    got, _ = _report(tmp_path)
    assert got == {"mmengine.engine": False, "mmengine.trace": False, "mmengine.worker": False}


def test_a_declaration_changed_since_the_build_runs_its_module_as_source(tmp_path):
    # engine.pxd declares engine.py's classes as extension types: the build
    # vouches for the pair, and a declaration edited since is not the one
    # the module was compiled with.
    copy = tmp_path / "mmengine"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.c", "__pycache__"))
    declarations = copy / "engine.pxd"
    assert "cdef class Engine" in declarations.read_text()
    declarations.write_text(declarations.read_text() + "\n# edited\n")
    got, err = _report(tmp_path)
    assert got == {"mmengine.engine": False, "mmengine.trace": True, "mmengine.worker": True}
    assert "mmengine.engine is not known to be compiled" in err


def test_a_module_edited_since_the_build_runs_those_built_against_it_as_source(tmp_path):
    """tcp.pxd and http.pxd cimport listener's BudgetedReading: their
    extension types are built against its C layout, and beside listener's
    source (a Python class of another size) they would not import at all.
    A compiled module that cimports nothing of it stays compiled."""
    copy = tmp_path / "mmengine"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.c", "__pycache__"))
    listener = copy / "server" / "listener.py"
    listener.write_text(listener.read_text() + "\nEDITED = True\n")
    report = ("import json; from mmengine import _source; from mmengine.server import "
              "listener, tcp, http, kserve; print(json.dumps([_source.compiled(m) for m in "
              "(listener, tcp, http, kserve)]))")
    env = {**{k: v for k, v in os.environ.items() if k != "MMENGINE_PURE_PYTHON"},
           "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", report], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [False, False, False, True]
    assert "mmengine.server.tcp is not known to be compiled" in run.stderr
    assert "mmengine.server.http is not known to be compiled" in run.stderr


def test_the_request_paths_classes_are_extension_types():
    """What their .pxd files declare: attributes in slots, not in an
    instance dict (a class of Python's is a heap type; an extension type
    is not)."""
    from mmengine import calltimes, client, engine, worker, workers
    from mmengine.server import http, listener, tcp

    modules = (calltimes, client, engine, worker, workers, listener, tcp, http)
    if not all(_source.compiled(m) for m in modules):
        pytest.skip("they run as source here")
    heap_type = 1 << 9  # Py_TPFLAGS_HEAPTYPE
    for cls in (engine.Engine, engine._Place, workers.Worker, workers._Outlet,
                listener.Listener, listener.BudgetedReading, tcp._Connection,
                http._HttpConnection, client.Client, client._Connection, client._Frames,
                worker.WorkerLogic, worker._Responder, calltimes.CallTimes):
        assert not cls.__flags__ & heap_type, f"{cls.__name__} is a Python class"


def test_a_setup_command_that_builds_nothing_vouches_for_nothing(tmp_path):
    """What `pip install .`, `pip wheel .` and `python -m build` run in the
    tree must not record an edited source as the compiled one."""
    root = PACKAGE.parent
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "csrc", tmp_path / "csrc")
    shutil.copytree(PACKAGE, tmp_path / "mmengine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    trace = tmp_path / "mmengine" / "trace.py"
    trace.write_text(trace.read_text() + "\nEDITED = True\n")
    assert _report(tmp_path)[0]["mmengine.trace"] is False
    setup = subprocess.run([sys.executable, "setup.py", "--version"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0, setup.stderr
    got, err = _report(tmp_path)
    assert got["mmengine.trace"] is False and "mmengine.trace is not known" in err


def _profile_tool():
    import importlib.util

    path = PACKAGE.parent / "tools" / "perf_profile.py"
    spec = importlib.util.spec_from_file_location("mmengine_profile_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _named(dotted: str):
    """What a dotted name names: its module, then attributes; a function
    defined in another (no attribute of it) as the one it is defined in."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if callable(obj) and not isinstance(obj, type) and not hasattr(obj, attr):
                return obj
            obj = getattr(obj, attr)
        return obj
    raise LookupError(dotted)


@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm to list the symbols")
def test_the_profiler_names_every_compiled_function_by_its_python_name():
    # tools/perf_profile.py reads perf's symbols: Cython's names, whose numbers
    # are a length before a module or class and an index before a function.
    tool = _profile_tool()
    assert tool.python_name("__pyx_pw_8mmengine_6engine_6_Place_5leave_then") \
        == "mmengine.engine._Place.leave_then"  # 5 is leave's length too
    assert tool.python_name("__pyx_f_8mmengine_5_ring_8RingCore__wait") \
        == "mmengine._ring.RingCore._wait"  # a cdef method: no attribute says so
    assert tool.python_name("malloc") is None
    for module in ("workers", "engine", "worker"):
        so = next(PACKAGE.glob(f"{module}.cpython-*.so"))
        symbols = subprocess.run(["nm", str(so)], capture_output=True, text=True,
                                 check=True).stdout.split()
        functions = [s for s in symbols if s.startswith(f"__pyx_pw_8mmengine_{len(module)}"
                                                        f"{module}_") and "lambda" not in s
                     and "genexpr" not in s]
        assert len(functions) > 20, module
        for symbol in functions:
            name = tool.python_name(symbol)
            assert name is not None and _named(name) is not None, symbol  # (else it raises)
