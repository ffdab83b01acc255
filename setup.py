"""Builds the native core in csrc/ as extensions of the mmengine package.

Build-time switches (read here, not by mmengine at run time):
MMENGINE_BUILD_DEBUG=1 compiles the internal asserts of csrc/debug.h in and
turns on Cython's bounds checks; the default build is -O3 with both out.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("MMENGINE_BUILD_DEBUG", "0") not in ("", "0")
# MMENGINE_BUILD_ONLY=cache builds one extension while working on it.
MODULES = os.environ.get("MMENGINE_BUILD_ONLY", "ring,cache").split(",")

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


setup(
    ext_modules=cythonize(
        [native(name) for name in MODULES],
        language_level=3,
        # csrc/NAME.pxd declares csrc/NAME.h; NAME.pyx cimports it by name.
        include_path=["csrc"],
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": DEBUG,
            "initializedcheck": DEBUG,
            "embedsignature": True,
        },
    ),
)
