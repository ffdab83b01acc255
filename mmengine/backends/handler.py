"""A Python handler: the model directory's `handler.py` is the model.

The handler module defines `load(path, device)`, called once with the
version directory and the device name, and `predict(inputs) -> outputs`,
called per request with a dict of numpy arrays; it returns a dict of arrays
(or tensors), a tuple/list, or one array. Each load imports the file as a
fresh module, so module globals hold one loaded model's state. The handler
is the operator's code: it runs with the worker's rights.

What a handler holds is measured by what its module reaches
(`held_bytes`), as a module's tensors are counted for the other backends:
the process's own counts (its heap, its RSS) take in what other threads
allocate meanwhile, and what imports keep for every model.
"""
from __future__ import annotations

import builtins
import collections
import gc
import itertools
import sys
import types
from typing import Any, Iterable

import numpy as np
import torch

from mmengine.backends.base import (OUT_OF_MEMORY, Inputs, LoadedModel, Span, as_arrays,
                                    covered_bytes, forget_module, import_file, module_spans,
                                    tensor_span)
from mmengine.errors import LoadFailed
from mmengine.storage import ModelSpec


class HandlerModel(LoadedModel):
    def __init__(self, spec: ModelSpec, device: torch.device, handler: types.ModuleType) -> None:
        super().__init__(spec, device)
        self.handler: types.ModuleType | None = handler

    def _call(self, inputs: Inputs) -> Any:
        # A worker serves in inference mode; the operator's code runs as
        # written, autograd included.
        with torch.inference_mode(False):
            return self.handler.predict(as_arrays(inputs))

    def tensor_bytes(self) -> int:
        held = 0 if self.handler is None else held_bytes(self.handler, self.device)
        return max(held, self.spec.estimated_bytes)

    def close(self) -> None:
        handler, self.handler = self.handler, None
        _drop(handler)


def _drop(handler: types.ModuleType | None) -> None:
    """Forgets a handler's module, and empties it: its functions hold its
    globals (__globals__), which hold them, a cycle that kept what the
    handler loaded (its weights, a GPU's memory) until a full collection,
    which a worker serving steadily may not make for hours; the next load
    ran out of memory meanwhile. (Each load imports its own module: no
    other model's code reads these globals.)"""
    forget_module(handler)
    if handler is not None:
        vars(handler).clear()


def load(spec: ModelSpec, device: torch.device) -> HandlerModel:
    where = f"{spec.name} v{spec.version}"
    handler = import_file(spec.path / spec.artifact, spec)
    try:
        for name in ("load", "predict"):
            if not callable(getattr(handler, name, None)):
                raise LoadFailed(f"{where}: handler.py defines no {name}() function")
        try:
            handler.load(str(spec.path), str(device))
        except OUT_OF_MEMORY:  # the machine's state, said as such by load_model
            raise
        except BaseException as e:  # sys.exit() too: the worker's loader must go on
            raise LoadFailed(f"{where}: handler.py load() raised "
                             f"{type(e).__name__}: {e}") from e
    except BaseException:
        _drop(handler)
        raise
    return HandlerModel(spec, device, handler)


#: What the walk does not enter: the process's own, which every model
#: shares (other modules, builtins, and classes and functions not the
#: handler's).
_SHARED = (types.ModuleType, type, types.FunctionType, types.CodeType, types.FrameType)
#: The most objects a walk takes in: past them, what it counted is a floor.
#: (~0.1 s of the loader's, which holds the GIL as it walks.)
WALK_LIMIT = 100_000


def held_bytes(handler: types.ModuleType, device: torch.device) -> int:
    """Bytes of what `handler`'s globals reach: on `device`, the buffers of
    its tensors (and, on a CPU, of its numpy arrays, and the Python objects
    that hold them), a byte that views or torch.from_numpy share counted
    once. Classes and functions the handler defines are walked (their
    class attributes, closures, defaults), and the object a method is bound
    to; the modules it imports, and what it did not define, are not. A
    numpy memory map's pages are the page cache's, not counted. Breadth
    first, so that what the globals hold comes before what a large
    container of theirs holds, up to WALK_LIMIT objects. An object that
    cannot be measured counts nothing: this never raises for what a
    handler keeps."""
    spans: list[Span] = []
    objects = 0  # the Python objects' own bytes (a CPU's only)
    globals_ = vars(handler)
    # Its functions' __globals__ (walked once, without its dunders) and
    # __builtins__ (the process's). Each object seen is kept until the walk
    # ends: one made on the way (a sparse tensor's parts) and freed could
    # leave its address to another, which would pass for seen.
    seen = {id(globals_): globals_, id(builtins.__dict__): builtins.__dict__}
    todo = collections.deque(v for k, v in globals_.items()
                             if not (k.startswith("__") and k.endswith("__")))
    room = WALK_LIMIT - len(todo)  # what may still join the walk
    while todo:
        obj = todo.popleft()
        if id(obj) in seen:
            continue
        seen[id(obj)] = obj
        try:
            measured = _measure(obj, handler.__name__, device, spans)
            if measured is None:
                continue
            own, inside = measured
            objects += own
            if room > 0:
                taken = list(itertools.islice(inside, room))
                todo.extend(taken)
                room -= len(taken)
        except Exception:  # noqa: BLE001 - an operator's object, measured as far as it goes
            # (one that another thread changes as it is walked included)
            continue
    return objects + covered_bytes(spans)


def _measure(obj: Any, handler: str, device: torch.device,
             spans: list[Span]) -> tuple[int, Iterable[Any]] | None:
    """Adds the spans of `obj`'s buffers; answers its own bytes beside them
    (a Python object's, on a CPU) and what the walk goes on to in it, or
    None where it is the process's (a module, what the handler did not
    define)."""
    on_cpu = device.type == "cpu"
    if isinstance(obj, (types.MethodType, types.BuiltinFunctionType)):
        # Whoever's method it is, the object it is bound to is what it keeps.
        bound = getattr(obj, "__self__", None)
        return None if bound is None or isinstance(bound, types.ModuleType) else (0, (bound,))
    if isinstance(obj, _SHARED) and getattr(obj, "__module__", None) != handler:
        return None
    if isinstance(obj, torch.Tensor):
        return 0, tensor_span(obj, device, spans)
    if isinstance(obj, np.ndarray):
        return 0, _array(obj, on_cpu, spans)
    if isinstance(obj, torch.nn.Module):
        module_spans(obj, device, spans)
    own = sys.getsizeof(obj) - _buffer(obj, spans) if on_cpu else 0
    return own, _contents(obj)


#: Below this, a bytes object's buffer is only counted as part of the
#: object (no address is taken: tensors and arrays share no small ones).
_SHARED_BUFFER_BYTES = 4096


def _buffer(obj: Any, spans: list[Span]) -> int:
    """Where `obj` is a bytes or a bytearray of a size that an array or a
    tensor may view (np.frombuffer, torch.frombuffer), its buffer's span,
    and that buffer's bytes, which its size no longer counts; else 0."""
    if type(obj) not in (bytes, bytearray) or len(obj) < _SHARED_BUFFER_BYTES:
        return 0
    start = np.frombuffer(obj, np.uint8).ctypes.data
    spans.append(("cpu", start, start + len(obj)))
    return len(obj)


def _contents(obj: Any) -> Iterable[Any]:
    """What `obj` holds. A dict's keys too (gc does not give the str keys
    of a dict of only those); a list's, a tuple's or a dict's items one by
    one, so that a walk takes no more of a large one than it has room for."""
    kind = type(obj)
    if kind is dict:
        return itertools.chain.from_iterable(obj.items())
    if kind is list or kind is tuple:
        return iter(obj)
    return iter(gc.get_referents(obj))


def _array(a: np.ndarray, on_cpu: bool, spans: list[Span]) -> Iterable[Any]:
    """Counts the buffer `a` views, where the array that owns it is the
    walk's to count; what else of it the walk goes on to: an object
    array's objects, a buffer another object owns (a bytes object's is
    counted as that object; an mmap's pages are not)."""
    owner = a
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    if owner.base is None and on_cpu:
        start = owner.ctypes.data
        spans.append(("cpu", start, start + owner.nbytes))
    inside = iter(() if owner.base is None else (owner.base,))
    return itertools.chain(inside, a.flat) if a.dtype.hasobject else inside
