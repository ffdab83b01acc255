"""Builds the native core in csrc/ as extensions of the mmengine package,
and compiles the Python modules on the request path with Cython.

The compiled modules are their .py files unchanged: the interpreter's
dispatch is what they save, and where a .pxd beside a module declares its
classes as extension types, their attributes' lookups too. Once they are
built, each module's digest of what it was compiled from (its source, its
.pxd and those that .pxd cimports: mmengine/_digest.py) goes into
_compiled.json beside them, so that a module edited since runs as source
(mmengine/_source.py).

Build-time switches (read here, not by mmengine at run time):
MMENGINE_BUILD_DEBUG=1 compiles the internal asserts of csrc/debug.h in and
turns on Cython's bounds checks; the default build is -O3 with both out.
"""
import importlib.util
import json
import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("MMENGINE_BUILD_DEBUG", "0") not in ("", "0")
# MMENGINE_BUILD_ONLY=cache builds one extension while working on it
# ("compiled": only the compiled Python modules).
MODULES = os.environ.get("MMENGINE_BUILD_ONLY", "ring,cache,wire,records,reads,guard,compiled").split(",")
# Every per-request line of the front-end, the worker and the client.
COMPILED = [
    "batching", "calltimes", "client", "declared", "engine", "messages", "protocol", "ring",
    "cache", "trace", "workers",
    "worker", "backends/base", "backends/safetensors",
    "server/listener", "server/tcp", "server/http", "server/kserve", "server/sagemaker",
    "server/metrics",
]

CFLAGS = ["-std=c11", "-O0" if DEBUG else "-O3", "-g" if DEBUG else "-g0",
          "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
MACROS = [("MMENGINE_DEBUG", "1" if DEBUG else "0"), ("_GNU_SOURCE", "1")]


# The extensions that make arrays through numpy's C API (csrc/arrays.pxd).
NUMPY_API = {"wire", "records"}


def native(name):
    includes, macros = ["csrc"], MACROS
    if name in NUMPY_API:
        import numpy  # a build requirement (pyproject.toml): only these need it

        includes.append(numpy.get_include())
        macros = MACROS + [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    return Extension(
        f"mmengine._{name}",
        sources=[f"csrc/{name}.pyx"],
        include_dirs=includes,
        extra_compile_args=CFLAGS,
        define_macros=macros,
        depends=[path for path in (f"csrc/{name}.h", f"csrc/{name}.pxd", "csrc/debug.h",
                                   "csrc/packing.pxd", "csrc/unpacking.pxd", "csrc/arrays.pxd",
                                   "csrc/readjob.h")
                 if os.path.exists(path)],
    )


RECORD = "_compiled.json"  # in the package: {module: digest of what it was compiled from}


def _module(name):  # "server/tcp" -> "mmengine.server.tcp"
    return "mmengine." + name.replace("/", ".")


def _digests():
    """Each compiled module's digest of what it is compiled from
    (mmengine/_digest.py, loaded by its path: the package cannot be
    imported before it is built)."""
    spec = importlib.util.spec_from_file_location("_mmengine_digest", "mmengine/_digest.py")
    digest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digest)
    return {_module(name): digest.digest(Path(f"mmengine/{name}.py")) for name in COMPILED}


def compiled(digests):
    """The COMPILED modules' extensions. A source whose digest is not the
    one of the last build in place loses its C file, so that it is compiled
    again whatever the files' times say."""
    try:
        with open(os.path.join("mmengine", RECORD)) as f:
            built = json.load(f)
    except (OSError, ValueError):
        built = {}
    for name in COMPILED:
        if built.get(_module(name)) != digests[_module(name)] and \
                os.path.exists(f"mmengine/{name}.c"):
            os.unlink(f"mmengine/{name}.c")
    return cythonize(
        [Extension(_module(name), [f"mmengine/{name}.py"], extra_compile_args=["-O2", "-g0"])
         for name in COMPILED],
        language_level=3,
        compiler_directives={
            "binding": True,  # functions introspect as Python's do
            "annotation_typing": False,  # annotations stay hints, as in Python
            "embedsignature": True,
        },
        quiet=True,
    )


class BuildExt(build_ext):
    """build_ext that records what the compiled modules were built from,
    beside them, once they are: a build that fails or is killed leaves no
    record, and its modules run as source until one succeeds."""

    def run(self):
        if "compiled" not in MODULES:
            return super().run()
        package = "mmengine" if self.inplace else os.path.join(self.build_lib, "mmengine")
        record = os.path.join(package, RECORD)
        if os.path.exists(record):
            os.unlink(record)
        super().run()
        os.makedirs(package, exist_ok=True)
        with open(record, "w") as f:
            json.dump(DIGESTS, f, indent=1, sort_keys=True)


DIGESTS = _digests() if "compiled" in MODULES else {}  # before cythonize reads them
setup(
    ext_modules=cythonize(
        [native(name) for name in MODULES if name != "compiled"],
        language_level=3,
        # csrc/NAME.pxd declares csrc/NAME.h; NAME.pyx cimports it by name.
        include_path=["csrc"],
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": DEBUG,
            "initializedcheck": DEBUG,
            "embedsignature": True,
        },
    ) + (compiled(DIGESTS) if "compiled" in MODULES else []),
    cmdclass={"build_ext": BuildExt},
    # The C that Cython generates is built, not shipped.
    exclude_package_data={"": ["*.c"]},  # every package
)
