"""A Python handler: the model directory's `handler.py` is the model.

The handler module defines `load(path, device)`, called once with the
version directory and the device name, and `predict(inputs) -> outputs`,
called per request with a dict of numpy arrays; it returns a dict of arrays
(or tensors), a tuple/list, or one array. Each load imports the file as a
fresh module, so module globals hold one loaded model's state. The handler
is the operator's code: it runs with the worker's rights.
"""
from __future__ import annotations

import types
from typing import Any

import torch

from mmengine.backends.base import (OUT_OF_MEMORY, Inputs, LoadedModel, as_arrays,
                                    forget_module, import_file)
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

    def close(self) -> None:
        forget_module(self.handler)
        self.handler = None


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
        forget_module(handler)
        raise
    return HandlerModel(spec, device, handler)
