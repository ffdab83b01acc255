"""A manifest's declared tensors, checked against what a request brings
(its caller's mistake: BAD_REQUEST) and what a model answers (the model's:
INTERNAL). Free of torch: the front-end checks a request before it loads a
model for it, and the worker checks it again as it runs."""
from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmengine.errors import InputsRefused, InternalError
from mmengine.storage import TensorSpec


def check_inputs(declared: tuple[TensorSpec, ...], inputs: Mapping[str, Any]) -> None:
    """A request's inputs against what its model declares: a mismatch is
    the caller's (BAD_REQUEST), told before the model runs."""
    if _fit(declared, inputs, InputsRefused, "inputs do not match the model's"):
        return
    torch = sys.modules.get("torch")  # a tensor is torch's: imported where there are any
    for t in declared:
        value = inputs[t.name]
        if isinstance(value, np.ndarray):
            # Comparing dtype objects is cheap; dtype.name is not (it is
            # computed in Python on every access), and this runs per request.
            dtype = t.dtype if value.dtype == np_dtype(t.dtype) else value.dtype.name
        elif torch is not None and isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
        else:
            raise InputsRefused(f"input {t.name!r} must be a numpy array or a torch tensor, "
                             f"not {type(value).__name__}")
        if dtype != t.dtype:
            raise InputsRefused(f"input {t.name!r} must be {t.dtype}, not {dtype}")
        shape = tuple(value.shape)
        if not dims_fit(shape, t.shape):
            raise InputsRefused(f"input {t.name!r} must have shape {list(t.shape)} "
                             f"(-1: any), not {list(shape)}")


def check_outputs(declared: tuple[TensorSpec, ...], outputs: Mapping[str, np.ndarray]) -> None:
    """A model's answer against its manifest's [[outputs]], which the
    protocols' metadata advertise: a mismatch is the model's fault (or its
    manifest's), an INTERNAL error, never an answer other than promised."""
    if _fit(declared, outputs, InternalError, "its outputs do not match its manifest's"):
        return
    for t in declared:
        value = outputs[t.name]
        if not value.dtype.isnative:  # the protocols write the declared values either way
            value = value.view(value.dtype.newbyteorder("="))
        if not _fits(t, value):
            raise InternalError(f"output {t.name!r} is {value.dtype} "
                                f"{list(value.shape)}; its manifest declares {t.dtype} "
                                f"{list(t.shape)} (-1: any)")


def _fit(declared: tuple[TensorSpec, ...], arrays: Mapping[str, Any], error: type,
         mismatch: str) -> bool:
    """True where nothing is declared or `arrays` are exactly the declared
    tensors (the common case, told without building a message); `error`
    where their names differ; False: each is to be looked at."""
    if not declared or _all_fit(declared, arrays):
        return True
    names = {t.name for t in declared}
    missing = sorted(n for n in names if n not in arrays)
    unexpected = sorted(str(n) for n in arrays if n not in names)
    if missing or unexpected:
        raise error(f"{mismatch}: missing {missing}, unexpected {unexpected}")
    return False


def _all_fit(declared: tuple[TensorSpec, ...], arrays: Mapping[str, Any]) -> bool:
    """Whether `arrays` are exactly the declared tensors. Plain loops: this
    runs twice per request, and generators cost a microsecond here."""
    if len(arrays) != len(declared):
        return False
    for t in declared:
        value = arrays.get(t.name)
        if value is None or not _fits(t, value):
            return False
    return True


def _fits(t: TensorSpec, value: Any) -> bool:
    return type(value) is np.ndarray and value.dtype == np_dtype(t.dtype) \
        and dims_fit(value.shape, t.shape)


def dims_fit(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    """Whether `shape` is of the `declared` one (-1: any size)."""
    if len(shape) != len(declared):
        return False
    for s, d in zip(shape, declared):
        if d != s and d != -1:
            return False
    return True


@functools.lru_cache(maxsize=None)
def np_dtype(name: str) -> np.dtype:
    return np.dtype(name)
