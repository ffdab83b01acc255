"""Builds the native core in csrc/ as extensions of the mmengine package,
and compiles the Python modules on the request path with Cython.

The compiled modules are their .py files unchanged (no types declared): the
interpreter's dispatch is what they save. Each source's sha256 goes into
mmengine/_compiled.json, so that a source edited since runs as source
(mmengine/_source.py).

Build-time switches (read here, not by mmengine at run time):
MMENGINE_BUILD_DEBUG=1 compiles the internal asserts of csrc/debug.h in and
turns on Cython's bounds checks; the default build is -O3 with both out.
"""
import hashlib
import json
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("MMENGINE_BUILD_DEBUG", "0") not in ("", "0")
# MMENGINE_BUILD_ONLY=cache builds one extension while working on it
# ("compiled": only the compiled Python modules).
MODULES = os.environ.get("MMENGINE_BUILD_ONLY", "ring,cache,compiled").split(",")
# Every per-request line of the front-end, the worker and the client.
COMPILED = [
    "client", "engine", "messages", "protocol", "ring", "cache", "trace", "workers",
    "worker", "backends/base", "backends/safetensors",
    "server/listener", "server/tcp", "server/http", "server/kserve", "server/sagemaker",
    "server/metrics",
]

CFLAGS = ["-std=c11", "-O0" if DEBUG else "-O3", "-g" if DEBUG else "-g0",
          "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
MACROS = [("MMENGINE_DEBUG", "1" if DEBUG else "0"), ("_GNU_SOURCE", "1")]


def native(name):
    return Extension(
        f"mmengine._{name}",
        sources=[f"csrc/{name}.pyx"],
        include_dirs=["csrc"],
        extra_compile_args=CFLAGS,
        define_macros=MACROS,
        depends=[f"csrc/{name}.h", f"csrc/{name}.pxd", "csrc/debug.h"],
    )




RECORD = "mmengine/_compiled.json"


def compiled():
    """The COMPILED modules' extensions, recording what each is built from.
    A source whose digest changed loses its C file, so that it is compiled
    again whatever the files' times say."""
    try:
        with open(RECORD) as f:
            built = json.load(f)
    except (OSError, ValueError):
        built = {}
    record = {}
    for name in COMPILED:
        with open(f"mmengine/{name}.py", "rb") as f:
            key = "mmengine." + name.replace("/", ".")
            record[key] = hashlib.sha256(f.read()).hexdigest()
        if built.get(key) != record[key] and os.path.exists(f"mmengine/{name}.c"):
            os.unlink(f"mmengine/{name}.c")
    with open(RECORD, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    return cythonize(
        [Extension("mmengine." + name.replace("/", "."), [f"mmengine/{name}.py"],
                   extra_compile_args=["-O2", "-g0"]) for name in COMPILED],
        language_level=3,
        compiler_directives={
            "binding": True,  # functions introspect as Python's do
            "annotation_typing": False,  # annotations stay hints, as in Python
            "embedsignature": True,
        },
        quiet=True,
    )


try:
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
        ) + (compiled() if "compiled" in MODULES else []),
        package_data={"mmengine": ["_compiled.json"]},
    )
except BaseException:  # the build failed: what is left of it runs as source
    if os.path.exists(RECORD):
        os.unlink(RECORD)
    raise
