"""The one interface every backend implements, and what they share.

A `LoadedModel` answers `predict(inputs) -> outputs`: dicts of numpy arrays
(torch tensors are accepted as inputs). Inputs are checked against the
declared `TensorSpec`s before the model runs; a model's own error on a
request becomes BadRequest carrying the model's message.
"""
from __future__ import annotations

import abc
import functools
import importlib.util
import itertools
import sys
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmengine.errors import BadRequest, LoadFailed, MMEngineError, Overloaded
from mmengine.storage import ModelSpec, TensorSpec

# Request tensors are views of the shared-memory ring, which the worker may
# map read-only. Models run under inference_mode and do not write to their
# inputs, so wrapping such a view without a copy is safe.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

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
        if not isinstance(inputs, Mapping):
            raise BadRequest(f"{self.spec.name}: inputs must be a mapping of name to array")
        check_inputs(self.inputs, inputs)
        try:
            raw = self._call(inputs)
        except MMEngineError:
            raise
        except torch.OutOfMemoryError as e:
            raise Overloaded(f"{self.spec.name}: out of memory: {e}") from e
        except Exception as e:
            raise BadRequest(f"{self.spec.name}: {type(e).__name__}: {e}") from e
        return outputs_to_numpy(raw, self.spec.outputs)

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
    """A model that is a callable torch module on `device`."""

    def __init__(self, spec: ModelSpec, device: torch.device, module: Any,
                 inputs: tuple[TensorSpec, ...] | None = None) -> None:
        super().__init__(spec, device, inputs)
        self.module = module

    def _call(self, inputs: Inputs) -> Any:
        tensors = as_tensors(inputs, self.device)
        with torch.inference_mode():
            return self._forward(tensors)

    def _forward(self, tensors: dict[str, torch.Tensor]) -> Any:
        # The one rule for modules: inputs are keyword arguments of forward.
        return self.module(**tensors)

    def tensor_bytes(self) -> int:
        return module_bytes(self.module)

    def close(self) -> None:
        self.module = None


def check_inputs(declared: tuple[TensorSpec, ...], inputs: Inputs) -> None:
    if not declared:
        return
    names = {t.name for t in declared}
    missing = [n for n in names if n not in inputs]
    unexpected = [n for n in inputs if n not in names]
    if missing or unexpected:
        raise BadRequest(f"inputs do not match the model's: missing {sorted(missing)}, "
                         f"unexpected {sorted(map(str, unexpected))}")
    for t in declared:
        value = inputs[t.name]
        if isinstance(value, np.ndarray):
            # Comparing dtype objects is cheap; dtype.name is not (it is
            # computed in Python on every access), and this runs per request.
            dtype = t.dtype if value.dtype == _np_dtype(t.dtype) else value.dtype.name
        elif isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
        else:
            raise BadRequest(f"input {t.name!r} must be a numpy array or a torch tensor, "
                             f"not {type(value).__name__}")
        if dtype != t.dtype:
            raise BadRequest(f"input {t.name!r} must be {t.dtype}, not {dtype}")
        shape = tuple(value.shape)
        if len(shape) != len(t.shape) or any(d not in (-1, s) for s, d in zip(shape, t.shape)):
            raise BadRequest(f"input {t.name!r} must have shape {list(t.shape)} "
                             f"(-1: any), not {list(shape)}")


@functools.lru_cache(maxsize=None)
def _np_dtype(name: str) -> np.dtype:
    return np.dtype(name)


def as_tensors(inputs: Inputs, device: torch.device) -> dict[str, torch.Tensor]:
    """Tensors on `device`, sharing memory with the arrays where possible."""
    out = {}
    for name, value in inputs.items():
        if isinstance(value, np.ndarray):
            # torch cannot wrap these two layouts; copying is the only way in.
            if not value.dtype.isnative:
                value = value.astype(value.dtype.newbyteorder("="))
            if any(s < 0 for s in value.strides):
                value = value.copy()
            try:
                value = torch.from_numpy(value)
            except TypeError as e:
                raise BadRequest(f"input {name!r}: {e}") from e
        elif not isinstance(value, torch.Tensor):
            raise BadRequest(f"input {name!r} must be a numpy array or a torch tensor, "
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
    if isinstance(raw, Mapping):
        items = raw.items()
    elif isinstance(raw, (tuple, list)):
        names = [t.name for t in declared] if len(declared) == len(raw) else [
            f"output_{i}" for i in range(len(raw))]
        items = zip(names, raw)
    else:
        items = [(declared[0].name if declared else "output", raw)]
    return {str(name): _to_numpy(value) for name, value in items}


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        # numpy has no bfloat16; float32 holds every bfloat16 value exactly.
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.cpu().numpy() if value.device.type != "cpu" else value.numpy()
    return np.asarray(value)


def module_bytes(module: Any) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    seen = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        storage = t.untyped_storage()
        seen[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


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
    module_spec = importlib.util.spec_from_file_location(name, path)
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


def forget_module(module: types.ModuleType | None) -> None:
    if module is not None:
        sys.modules.pop(module.__name__, None)
