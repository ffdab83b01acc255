"""ONNX models, run by onnxruntime when that optional extra is installed.

Manifest option `providers`: onnxruntime execution providers in order of
preference (default: CUDA on a GPU device, then CPU). Without declared
inputs, requests are checked against the names, element types and shapes
the graph declares.
"""
from __future__ import annotations

from typing import Any

import torch

from mmengine.backends.base import Inputs, LoadedModel, as_arrays
from mmengine.errors import LoadFailed
from mmengine.storage import ModelSpec, TensorSpec


class OnnxModel(LoadedModel):
    def __init__(self, spec: ModelSpec, device: torch.device, session: Any) -> None:
        super().__init__(spec, device, _derived_inputs(session))
        self.session = session
        self._output_names = [o.name for o in session.get_outputs()]

    def _call(self, inputs: Inputs) -> Any:
        results = self.session.run(self._output_names, as_arrays(inputs))
        return dict(zip(self._output_names, results))

    def close(self) -> None:
        self.session = None


def load(spec: ModelSpec, device: torch.device) -> OnnxModel:
    where = f"{spec.name} v{spec.version}"
    try:
        import onnxruntime
    except ImportError:
        raise LoadFailed(f"{where}: model.onnx needs onnxruntime, which is not installed "
                         f"(pip install onnxruntime)") from None
    unknown = set(spec.options) - {"providers"}
    if unknown:
        raise LoadFailed(f"{where}: model.toml: unknown option {sorted(unknown)[0]!r} "
                         f"(onnx takes ['providers'])")
    default = ["CPUExecutionProvider"]
    if device.type == "cuda":
        default.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    providers = spec.options.get("providers", default)
    try:
        session = onnxruntime.InferenceSession(str(spec.path / spec.artifact),
                                               providers=providers)
    except Exception as e:
        raise LoadFailed(f"{where}: onnxruntime cannot open {spec.artifact}: {e}") from e
    return OnnxModel(spec, device, session)


def _derived_inputs(session: Any) -> tuple[TensorSpec, ...]:
    specs = []
    for arg in session.get_inputs():
        dtype = _ONNX_TYPES.get(arg.type)
        if dtype is None:
            return ()  # a type numpy cannot carry: leave the checks to onnxruntime
        shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
        specs.append(TensorSpec(arg.name, dtype, shape))
    return tuple(specs)


# onnxruntime's element type names -> numpy's.
_ONNX_TYPES = {
    "tensor(bool)": "bool", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
    "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(float16)": "float16", "tensor(float)": "float32", "tensor(double)": "float64",
}
