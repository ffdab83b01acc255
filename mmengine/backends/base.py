"""The one interface every backend implements, and what they share.

A `LoadedModel` answers `predict(inputs) -> outputs`: dicts of numpy arrays
(torch tensors are accepted as inputs). Inputs are checked against the
declared `TensorSpec`s before the model runs; a model's own error on a
request becomes BadRequest carrying the model's message.
"""
from __future__ import annotations

import abc
import collections
import importlib.machinery
import importlib.util
import itertools
import sys
import threading
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmengine import protocol
from mmengine.errors import (BadRequest, InputsRefused, InternalError, LoadFailed, MMEngineError,
                             Overloaded)
from mmengine.declared import check_inputs, check_outputs, dims_fit
from mmengine.storage import ModelSpec, TensorSpec

# Request tensors are views of the shared-memory ring, which the worker may
# map read-only. Models run under inference_mode and do not write to their
# inputs, so wrapping such a view without a copy is safe.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# Out of memory while loading, the host's or a GPU's (torch.OutOfMemoryError
# since 2.5 only): the machine's state, not the model's fault, so OVERLOADED
# (a SageMaker load answers 507, its cue to unload models and try again).
OUT_OF_MEMORY = (MemoryError, torch.cuda.OutOfMemoryError)

Inputs = Mapping[str, "np.ndarray | torch.Tensor"]
Outputs = dict[str, np.ndarray]


class LoadedModel(abc.ABC):
    """A model resident on `device`. `nbytes` is set by `load_model` after
    the load from what the model really takes."""

    def __init__(self, spec: ModelSpec, device: torch.device,
                 inputs: tuple[TensorSpec, ...] | None = None) -> None:
        self.spec = spec
        self.device = device
        # What requests are checked against: the manifest's declaration,
        # else what the backend derived from the artifact, else nothing.
        self.inputs = spec.inputs or inputs or ()
        self.nbytes = 0

    def predict(self, inputs: Inputs) -> Outputs:
        if not (type(inputs) is dict or isinstance(inputs, Mapping)):  # dict: the fast way
            raise InputsRefused(f"{self.spec.name}: inputs must be a mapping of name to array")
        check_inputs(self.inputs, inputs)
        return self._outputs(self._run(self._call, inputs))

    def _run(self, call: Callable[[Any], Any], inputs: Any) -> Any:
        """call(inputs): the model's own code, its errors as the caller's
        (BadRequest) or as the machine's (out of memory: Overloaded)."""
        try:
            return call(inputs)
        except MMEngineError:
            raise
        except torch.cuda.OutOfMemoryError as e:  # torch.OutOfMemoryError since 2.5 only
            # (A MemoryError here is most often an input asking for more than
            # any machine has: the caller's, as any exception of the model's.)
            raise Overloaded(f"{self.spec.name}: out of memory: {e}") from e
        except BaseException as e:  # exit(), or any BaseException of its own, ends no worker
            raise BadRequest(f"{self.spec.name}: {type(e).__name__}: {e}") from e

    def _outputs(self, raw: Any) -> Outputs:
        """The model's result `raw` as the outputs its manifest promises."""
        try:
            outputs = outputs_to_numpy(raw, self.spec.outputs)
            check_outputs(self.spec.outputs, outputs)
        except InternalError as e:
            raise InternalError(f"{self.spec.name}: {e}") from None
        except BaseException as e:
            # The model's own code runs here too (an __array__, a Mapping's
            # items(), a tensor subclass): its exit() must end no worker.
            raise InternalError(f"{self.spec.name}: its answer cannot be made outputs: "
                                f"{type(e).__name__}: {e}") from e
        return outputs

    def tensor_bytes(self) -> int:
        """Bytes of the model's own tensors (parameters, buffers). A backend
        that cannot see them (a handler, onnxruntime) answers the artifact
        estimate: a floor for an RSS delta that reused freed pages."""
        return self.spec.estimated_bytes

    def close(self) -> None:
        """Drop the model; its memory is freed once no request holds it."""

    @abc.abstractmethod
    def _call(self, inputs: Inputs) -> Any:
        """Run the model on checked inputs; any result `outputs_to_numpy` takes."""


class TorchModel(LoadedModel):
    """A model that is a callable torch module on `device`.

    A backend that sets `skeleton_key` (what identifies the artifact the
    module came from) has the model kept when it closes, its tensors
    emptied: its next load from the host tier on this worker points the
    kept module at the host copy instead of parsing the artifact again."""

    def __init__(self, spec: ModelSpec, device: torch.device, module: Any,
                 inputs: tuple[TensorSpec, ...] | None = None) -> None:
        super().__init__(spec, device, inputs)
        self.module = module
        self.skeleton_key: tuple | None = None
        self._plain: _Plain | None = None

    def predict(self, inputs: Inputs) -> Outputs:
        # A CPU model whose tensors are declared (by its manifest, or its
        # artifact), called as a worker calls it, in one pass: the checks
        # below are those of the general way for what passes them, and what
        # does not goes that way.
        # ~4 µs of a tiny model's ~30, warm (benchmarks/RESULTS.md, session 46).
        plain = self._plain
        if plain is None or plain.spec is not self.spec:
            plain = self._plain = _Plain(self)
        tensors = plain.tensors(inputs) if plain.inputs else None
        if tensors is None:
            return super().predict(inputs)
        raw = self._run(self._on_tensors, tensors)
        return plain.outputs(raw) or self._outputs(raw)

    def _call(self, inputs: Inputs) -> Any:
        # (A subclass that changes it takes no request in one pass: _Plain.)
        return self._on_tensors(as_tensors(inputs, self.device))

    def _on_tensors(self, tensors: dict[str, torch.Tensor]) -> Any:
        if torch.is_inference_mode_enabled():  # a worker's serving thread, always:
            return self._forward(tensors)      # entering the mode costs 1.5 µs a request
        with torch.inference_mode():
            return self._forward(tensors)

    def _forward(self, tensors: dict[str, torch.Tensor]) -> Any:
        # The one rule for modules: inputs are keyword arguments of forward.
        return self.module(**tensors)

    def tensor_bytes(self) -> int:
        # A frozen TorchScript module keeps its weights as constants of its
        # graph, where nothing can count them: its artifact's estimate does.
        return module_bytes(self.module) or self.spec.estimated_bytes

    def close(self) -> None:
        key, module = self.skeleton_key, self.module
        self.skeleton_key = None
        if key is not None and module is not None and _emptied(module):
            SKELETONS.give(key, self)
            return
        self.module = None


def _emptied(module: Any) -> bool:
    """Empties a closing module's tensors in place, where its state dict
    holds all its bytes, so that it can be kept as a skeleton; False where
    it does not: a module that keeps tensors elsewhere (torch.export's
    constants, a frozen graph's) would keep them, on the device, after its
    eviction; a sparse tensor cannot be emptied in place; tensors of a
    kind that cannot be measured are not kept either."""
    from mmengine.backends import safetensors  # the host tier's format

    try:
        held = module_bytes(module)
        tensors = safetensors.module_tensors(module)
        if not all(t.layout == torch.strided for t in tensors.values()):
            return False
        safetensors.strip(tensors)
        return bool(held) and not module_bytes(module)
    except Exception:  # noqa: BLE001 - a model dropped, not kept, whatever its tensors
        return False


class _Plain:
    """What the common case of a TorchModel's request looks like, from its
    `spec`: numpy arrays of exactly the declared names, dtypes and shapes
    in, one CPU tensor of the one declared output out. `inputs` is empty
    where the model takes no such request (a device other than the CPU,
    tensors undeclared, a bool output: its bytes need a look; a `_call` of
    a subclass's own)."""

    __slots__ = ("spec", "inputs", "output")

    def __init__(self, model: TorchModel) -> None:
        self.spec = spec = model.spec
        declared, out = model.inputs, spec.outputs
        plain = (model.device.type == "cpu" and declared and len(out) == 1
                 and out[0].dtype != "bool" and type(model)._call is TorchModel._call)
        # np.dtype of a name is one object (the builtin dtypes are singletons),
        # as is the dtype of an array of it in native byte order.
        self.inputs = {t.name: (np.dtype(t.dtype), t.shape) for t in declared} if plain else {}
        self.output = (out[0].name, np.dtype(out[0].dtype), out[0].shape) if plain else None

    def tensors(self, inputs: Any) -> dict[str, torch.Tensor] | None:
        """`inputs` as tensors, in their order (a forward(**inputs) may go
        by it), where they are the common case; else None."""
        if type(inputs) is not dict or len(inputs) != len(self.inputs):
            return None
        tensors = {}
        for name, value in inputs.items():
            declared = self.inputs.get(name)
            if declared is None or type(value) is not np.ndarray \
                    or value.dtype is not declared[0] or not dims_fit(value.shape, declared[1]):
                return None
            try:
                tensors[name] = torch.from_numpy(value)
            except (TypeError, ValueError):  # negative strides: the general way copies
                return None
        return tensors

    def outputs(self, raw: Any) -> Outputs | None:
        """The model's answer `raw` as its outputs, where it is the common
        case; else None (and the general way says what is wrong with it)."""
        try:
            if type(raw) is not torch.Tensor or not raw.is_cpu or raw.requires_grad:
                return None
            array = raw.numpy()
        except BaseException:  # noqa: BLE001 - a model's torch mode runs Python here too
            return None
        name, dtype, dims = self.output
        if array.dtype is not dtype or not dims_fit(array.shape, dims):
            return None
        return {name: array}


class Skeletons:
    """Closed models whose modules hold no tensors, by the artifact they
    came from, most recently closed last; each is taken by one load."""

    LIMIT = 64

    def __init__(self) -> None:
        self._kept: collections.OrderedDict[tuple, TorchModel] = collections.OrderedDict()
        self._lock = threading.Lock()

    def give(self, key: tuple, model: TorchModel) -> None:
        with self._lock:
            self._kept[key] = model
            self._kept.move_to_end(key)
            while len(self._kept) > self.LIMIT:
                self._kept.popitem(last=False)

    def take(self, key: tuple) -> TorchModel | None:
        with self._lock:
            return self._kept.pop(key, None)

    def __len__(self) -> int:
        return len(self._kept)

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()


#: The process's kept skeletons (TorchScript, torch.export).
SKELETONS = Skeletons()


def load_kept(spec: ModelSpec, device: torch.device, host: str | None,
              parse: Callable[[], TorchModel]) -> TorchModel:
    """A model of a format that must be parsed (TorchScript, torch.export).
    With the host-tier segment `host`: the module this worker kept when the
    model last closed, pointed at the host copy (no parse); without one, the
    module `parse` builds, then on CPU pointed at the host copy as well, so
    that every worker runs on the same pages."""
    from mmengine.backends import safetensors  # the host tier's format

    key = artifact_key(spec, device)
    kept = SKELETONS.take(key) if host is not None and key is not None else None
    model = kept or parse()
    model.spec, model.skeleton_key = spec, key
    if host is not None and (kept is not None or device.type == "cpu"):
        try:
            safetensors.load_from_host(model, host, device)
        except BaseException:
            model.skeleton_key = model.module = None
            raise
    return model


def artifact_key(spec: ModelSpec, device: torch.device) -> tuple | None:
    """What identifies the artifact of `spec` as it is on disk now; None if
    it cannot be read."""
    try:
        st = (spec.path / spec.artifact).stat()
    except OSError:
        return None
    return (str(spec.path / spec.artifact), st.st_mtime_ns, st.st_size, st.st_ino,
            str(device), spec.trusted)


def as_tensors(inputs: Inputs, device: torch.device) -> dict[str, torch.Tensor]:
    """Tensors on `device`, sharing memory with the arrays where possible."""
    out = {}
    for name, value in inputs.items():
        if isinstance(value, np.ndarray):
            # torch cannot wrap these two layouts; copying is the only way in.
            if not value.dtype.isnative:
                value = value.astype(value.dtype.newbyteorder("="))
            if value.strides and min(value.strides) < 0:
                value = value.copy()
            try:
                value = torch.from_numpy(value)
            except TypeError as e:
                raise InputsRefused(f"input {name!r}: {e}") from e
        elif not isinstance(value, torch.Tensor):
            raise InputsRefused(f"input {name!r} must be a numpy array or a torch tensor, "
                             f"not {type(value).__name__}")
        out[name] = value if value.device == device else value.to(device, non_blocking=True)
    return out


def as_arrays(inputs: Inputs) -> dict[str, np.ndarray]:
    return {name: _to_numpy(value) if isinstance(value, torch.Tensor) else value
            for name, value in inputs.items()}


def outputs_to_numpy(raw: Any, declared: tuple[TensorSpec, ...]) -> Outputs:
    """A model's result as named arrays: a dict as it is, a tuple or list by
    declared names (else output_0, output_1, ...), one tensor by the first
    declared name (else "output")."""
    # A tensor, the common case, is known before the slower check against the ABC.
    if isinstance(raw, torch.Tensor) or not isinstance(raw, (Mapping, tuple, list)):
        items = [(declared[0].name if declared else "output", raw)]
    elif isinstance(raw, Mapping):
        items = raw.items()
        for name in raw:
            if type(name) is not str:  # rare: every name looked at closer
                items = _string_named(raw)
                break
    else:
        names = [t.name for t in declared] if len(declared) == len(raw) else [
            f"output_{i}" for i in range(len(raw))]
        items = zip(names, raw)
    try:
        return {name: _to_numpy(value) for name, value in items}
    except BadRequest as e:  # the model's answer, not the caller's request
        raise InternalError(f"an output: {e}") from None
    except (ValueError, TypeError, RuntimeError) as e:  # numpy's or torch's: a ragged list
        raise InternalError(f"an output is not an array: {type(e).__name__}: {e}") from None


def _string_named(raw: Mapping) -> list[tuple[str, Any]]:
    """A model's outputs by names that are strings: a str's subclass (numpy's
    str_, a StrEnum) as the plain string it holds; any other name is its
    error (str() of it may be another's: 0 and "0")."""
    for name in raw:
        if not isinstance(name, str):
            raise InternalError(f"an output is named by {type(name).__name__} {name!r}; "
                                f"outputs are named by strings")
    return [(str.__str__(name), value) for name, value in raw.items()]


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.is_cpu and not value.requires_grad:
            try:
                array = value.numpy()  # the common case, without detach() and device.type
            except (RuntimeError, TypeError):  # bfloat16, a conjugate or negative view, sparse
                array = protocol.from_torch(value)
        else:
            array = protocol.from_torch(value)
    else:
        array = np.asarray(value)
    if array.dtype.kind not in "biufc":  # text, objects, dates: no answer of a model's
        raise InternalError(f"an output is {array.dtype} ({type(value).__name__}); a model "
                            f"answers arrays of numbers or booleans")
    if array.dtype == np.bool_:
        # A mask viewed as bool (uint8's 0/255 through view()) holds bytes
        # that the wire's bool may not: 0 or 1, as numpy and torch mean them.
        raw = array.view(np.uint8)
        if raw.max(initial=0) > 1:
            return raw != 0
    return array


def module_bytes(module: Any) -> int:
    """Bytes of the storages behind a module's tensors, each byte once:
    parameters, buffers, and tensors kept as plain attributes (torch.export's
    lifted constants); a sparse tensor's by its dense parts."""
    spans: list[Span] = []
    module_spans(module, None, spans)
    return covered_bytes(spans)


def module_spans(module: Any, device: torch.device | None, spans: list[Span]) -> None:
    """Adds the spans of a module's tensors on `device` (None: any) to
    `spans`: module_bytes's, and a handler's modules' (a scripted one's
    tensors are no attributes that a walk of its objects would find)."""
    attributes = (v for m in module.modules() for v in vars(m).values()
                  if isinstance(v, torch.Tensor))
    todo = [*module.parameters(), *module.buffers(), *attributes,
            *_scripted_attributes(module)]
    while todo:
        todo.extend(tensor_span(todo.pop(), device, spans))


def _scripted_attributes(module: Any) -> list[torch.Tensor]:
    """A scripted module's tensors kept as plain attributes (`self.mean =
    torch.tensor(...)`, a list of tensors): no parameter, buffer or state
    dict entry, and no Python attribute of its objects."""
    if not isinstance(module, torch.jit.ScriptModule):
        return []
    try:
        named = torch._C._jit_debug_module_iterators(module._c)["named_attributes_r"]
    except (AttributeError, KeyError, RuntimeError):  # another torch's internals
        return []
    found, todo = [], [value for _, value in named]
    while todo:
        value = todo.pop()
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            todo.extend(value)
        elif isinstance(value, dict):
            todo.extend(value.values())
    return found


#: A buffer's place: (device, first address, address past its end).
Span = tuple[str, int, int]


def tensor_span(t: torch.Tensor, device: torch.device | None,
                spans: list[Span]) -> tuple[torch.Tensor, ...]:
    """Adds the span of `t`'s storage to `spans` where it is on `device`
    (None: any); answers a sparse tensor's dense parts instead (it has no
    storage of its own), and its gradient, if any: the tensors to count
    in turn. An opaque tensor (mkldnn's, as torch.utils.mkldnn makes a
    CPU module's) has no address: its elements' bytes, once per tensor
    object."""
    if t.layout == torch.sparse_coo:
        parts: tuple[torch.Tensor, ...] = (t._indices(), t._values())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (t.crow_indices(), t.col_indices(), t.values())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = (t.ccol_indices(), t.row_indices(), t.values())
    else:
        parts = ()
        on = t.device
        if device is None or (on.type == device.type
                              and (device.index is None or on.index == device.index)):
            spans.append(_storage_span(t))
    grad = t.grad if t.is_leaf else None  # (a non-leaf's is None, with a warning)
    return parts if grad is None else (*parts, grad)


def _storage_span(t: torch.Tensor) -> Span:
    if t.is_mkldnn:  # opaque: a place of its own, as no other tensor can share it
        return f"{t.device} opaque {id(t)}", 0, t.numel() * t.element_size()
    storage = t.untyped_storage()
    start = storage.data_ptr()
    return str(t.device), start, start + storage.nbytes()


def covered_bytes(spans: list[Span]) -> int:
    """Bytes the spans cover: each byte once, however many views share it."""
    total, device, end = 0, None, 0
    for on, start, stop in sorted(spans):
        if on != device:
            device, end = on, 0
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


_module_ids = itertools.count()


def import_file(path: Path, spec: ModelSpec) -> types.ModuleType:
    """Import a Python file of the model as a fresh module of its own.

    A unique module name per load keeps two models' `model.py` apart and lets
    a reload see changed code; it is registered in sys.modules because
    dataclasses and pickling look their classes up there. Unregister it with
    `forget_module` when the model closes.
    """
    # Model names may hold dots, which module names read as packages.
    name = f"_mmengine_model_{next(_module_ids)}_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path,
                                                         loader=_SourceOnly(name, str(path)))
    if module_spec is None or module_spec.loader is None:
        raise LoadFailed(f"{spec.name} v{spec.version}: cannot import {path.name}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise LoadFailed(f"{spec.name} v{spec.version}: {path.name} raised "
                         f"{type(e).__name__}: {e}") from e
    except BaseException:
        del sys.modules[name]
        raise
    return module


class _SourceOnly(importlib.machinery.SourceFileLoader):
    """Compiles the file itself, never a cached .pyc beside it: the file's
    digest is what a remote model's manifest vouches for, and an
    unchecked-hash .pyc in __pycache__ would run whatever it holds."""

    def get_code(self, fullname: str) -> types.CodeType:
        return self.source_to_code(self.get_data(self.path), self.path)


def forget_module(module: types.ModuleType | None) -> None:
    if module is not None:
        sys.modules.pop(module.__name__, None)
