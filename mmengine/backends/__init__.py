"""Backends: one module per model format behind one interface.

`load_model(spec, device)` opens the model a `ModelSpec` describes, warms
it up when the manifest asks, and measures what it really takes. Each
backend module is imported on first use, so an optional runtime
(onnxruntime) costs nothing until a model needs it.
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mmengine import hosttier
from mmengine.backends.base import OUT_OF_MEMORY, LoadedModel, TorchModel
from mmengine.errors import LoadFailed, MMEngineError, Overloaded
from mmengine.storage import ModelSpec

__all__ = ["LOADERS", "LoadedModel", "load_model", "loader", "warm"]

#: Backend name -> the module whose `load(spec, device)` opens it.
LOADERS: dict[str, str] = {
    "handler": "mmengine.backends.handler",
    "export": "mmengine.backends.export",
    "safetensors": "mmengine.backends.safetensors",
    "torchscript": "mmengine.backends.torchscript",
    "onnx": "mmengine.backends.onnx",
}
#: Backend name -> (what its first load imports, slowly and once per
#: process; the file of a version directory that shows a repository uses
#: the backend). torch.export.load imports its serializer: 1.2 s here, paid
#: by a worker's first export load while the loads behind it waited.
SLOW_FIRST_IMPORTS: dict[str, tuple[str, str]] = {
    "export": ("torch.export.pt2_archive._package", "model.pt2"),
}


def warm(repo: str) -> list[str]:
    """Imports ahead what the first load of each backend that the local
    repository `repo` holds would import slowly; returns those backends."""
    warmed = []
    root = Path(repo)
    for backend, (module, artifact) in SLOW_FIRST_IMPORTS.items():
        if not repo or next(root.glob(f"*/*/{artifact}"), None) is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError:  # another torch: its first load pays, as before
            continue
        warmed.append(backend)
    return warmed


def loader(backend: str) -> Callable[[ModelSpec, torch.device], LoadedModel]:
    try:
        return importlib.import_module(LOADERS[backend]).load
    except KeyError:
        raise LoadFailed(f"unknown backend {backend!r}") from None


def load_model(spec: ModelSpec, device: str | torch.device = "cpu",
               host: str | None = None) -> LoadedModel:
    """The model of `spec`, resident on `device` (its bytes taken from the
    host-tier segment `host` if given: backends of hosttier.BACKENDS), with
    `nbytes` measured
    and `phases`: seconds spent in fetch (0 here: the front-end fetches
    remote models into the disk cache before the load, and fills it in),
    deserialize (reading the files into tensors; on CPU this includes
    placing them), copy (finishing the copies to the GPU queued on the
    current stream; 0 on CPU) and warmup.

    Every failure is LoadFailed with the reason; nothing stays loaded.
    """
    device = torch.device(device)
    where = f"{spec.name} v{spec.version}"
    if spec.device is not None and spec.device != device.type:
        raise LoadFailed(f"{where}: the manifest requires device {spec.device!r}, "
                         f"not {device.type!r}")
    before = _bytes_in_use(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    try:
        if host is None:
            model = loader(spec.backend)(spec, device)
        elif spec.backend in hosttier.BACKENDS:
            model = loader(spec.backend)(spec, device, host=host)
        else:
            raise LoadFailed(f"{where}: backend {spec.backend!r} has no host tier")
    except MMEngineError:
        raise
    except OUT_OF_MEMORY as e:
        raise Overloaded(f"{where}: out of memory while loading: {type(e).__name__}: {e}") \
            from e
    except Exception as e:
        raise LoadFailed(f"{where}: {type(e).__name__}: {e}") from e
    fixed = [t.name for t in model.inputs if not t.shape or t.shape[0] != -1]
    if spec.max_batch_size > 1 and fixed:  # (a manifest's own are checked as it is read)
        model.close()
        raise LoadFailed(f"{where}: 'max_batch_size' joins requests along the first "
                         f"dimension, and the artifact fixes that of its inputs {fixed}")
    t1 = time.perf_counter()
    if device.type == "cuda":  # host-to-device copies are asynchronous until here
        torch.cuda.current_stream(device).synchronize()
    t2 = time.perf_counter()
    try:
        _warm_up(model)
    except BaseException as e:
        model.close()
        if not isinstance(e, Exception):  # an interrupt of the process's, not the model's
            raise
        raise _warm_up_failed(e, where) from e
    model.phases = {"fetch": 0.0, "deserialize": t1 - t0, "copy": t2 - t1,
                    "warmup": time.perf_counter() - t2}
    # A module's own tensors are what evicting it gives back. The allocator's
    # count is no measure of them: it is the device's, so it takes in what
    # inference allocates meanwhile on the other thread, and what CUDA
    # allocates once per thread and stream. Only a backend whose tensors
    # cannot be seen (a handler) is measured by it, and by no less than its
    # estimate. (An RSS delta on CPU is worse still: the first model of a
    # backend pays for the modules it imports, and freed pages are reused.)
    try:
        model.nbytes = model.tensor_bytes()
    except BaseException as e:  # a module's tensors of a kind that has no storage to count
        model.close()
        if not isinstance(e, Exception):  # as at warm-up: closed, and raised as it is
            raise
        raise LoadFailed(f"{where}: its size cannot be measured: {type(e).__name__}: {e}") \
            from e
    if device.type == "cuda" and not isinstance(model, TorchModel):
        model.nbytes = max(model.nbytes, _bytes_in_use(device) - before)
    return model


def _warm_up(model: LoadedModel) -> None:
    dtypes = {t.name: t.dtype for t in model.spec.inputs}
    if model.spec.warmup:
        model.predict({name: np.zeros(shape, dtypes[name]) for name, shape in model.spec.warmup})


def _warm_up_failed(e: Exception, where: str) -> MMEngineError:
    # Out of memory, the inputs' own allocation's too: predict() says the
    # host's as the input's fault, but a warm-up's input is the manifest's,
    # and its load is what failed.
    why = str(e) if isinstance(e, MMEngineError) else f"{type(e).__name__}: {e}"
    if isinstance(e, (Overloaded, *OUT_OF_MEMORY)) or isinstance(e.__cause__, OUT_OF_MEMORY):
        return Overloaded(f"{where}: out of memory while warming up: {why}")
    return LoadFailed(f"{where}: warm-up failed: {why}")


def _bytes_in_use(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device)
