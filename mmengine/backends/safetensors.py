"""safetensors weights + a module class from the model's `model.py`.

The file format (mmengine/tensorfile.py parses and checks its header) is
read and written here without the safetensors package. Reading allocates each tensor once and `readinto`s its bytes straight into
the tensor's memory: no intermediate buffer, no copy.

Manifest options: `module` (the class in model.py, default "Model") and
`module_kwargs` (its constructor's keyword arguments). The module's forward
takes the inputs as keyword arguments.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mmengine.backends.base import TorchModel, forget_module, import_file
from mmengine.errors import LoadFailed
from mmengine.storage import ModelSpec
from mmengine.tensorfile import parse_header

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_OPTIONS = frozenset({"module", "module_kwargs"})


def load_file(path: Path, where: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on CPU."""
    where = where or str(path)
    try:
        with open(path, "rb") as f:
            header, data_start = parse_header(f, os.fstat(f.fileno()).st_size)
            # In file order, so the reads run forward through the file.
            entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
            return {name: _read_tensor(f, entry, data_start) for name, entry in entries}
    except OSError as e:
        raise LoadFailed(f"{where}: cannot read {path.name}: {e}") from e
    except ValueError as e:
        raise LoadFailed(f"{where}: {path.name} is not a valid safetensors file: {e}") from e


def _read_tensor(f: BinaryIO, entry: dict[str, Any], data_start: int) -> torch.Tensor:
    begin, end = entry["data_offsets"]
    raw = torch.empty(end - begin, dtype=torch.uint8)
    view = memoryview(raw.numpy())
    f.seek(data_start + begin)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ValueError("file ends inside its tensor data")
        done += n
    return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
              metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` as a safetensors file (used by the demo models)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        blobs.append(data)
        offset += data.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # Spaces pad the header so the data starts 8-byte aligned, as the format allows.
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for data in blobs:
            f.write(memoryview(data))


# -- the backend ----------------------------------------------------------

class ModuleModel(TorchModel):
    def __init__(self, spec: ModelSpec, device: torch.device, module: torch.nn.Module,
                 source: Any) -> None:
        super().__init__(spec, device, module)
        self._source = source

    def close(self) -> None:
        super().close()
        forget_module(self._source)
        self._source = None


def load(spec: ModelSpec, device: torch.device) -> ModuleModel:
    where = f"{spec.name} v{spec.version}"
    unknown = set(spec.options) - _OPTIONS
    if unknown:
        raise LoadFailed(f"{where}: model.toml: unknown option {sorted(unknown)[0]!r} "
                         f"(safetensors takes {sorted(_OPTIONS)})")
    class_name = spec.options.get("module", "Model")
    kwargs = spec.options.get("module_kwargs", {})
    if not isinstance(class_name, str) or not isinstance(kwargs, dict):
        raise LoadFailed(f"{where}: model.toml: options 'module' must be a string and "
                         f"'module_kwargs' a table")
    state = load_file(spec.path / spec.artifact, where)
    source = import_file(spec.path / "model.py", spec)
    try:
        module = _build(source, class_name, kwargs, state, where)
        module.to(device).eval()
    except BaseException:
        forget_module(source)
        raise
    return ModuleModel(spec, device, module, source)


def _build(source: Any, class_name: str, kwargs: dict[str, Any],
           state: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    cls = getattr(source, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise LoadFailed(f"{where}: model.py has no torch.nn.Module class {class_name!r}")
    # Built on the meta device, the module allocates nothing and runs no
    # initialisers; the loaded tensors then become its parameters as they are.
    with torch.device("meta"):
        module = cls(**kwargs)
    module.load_state_dict(state, strict=True, assign=True)
    if any(b.is_meta for b in module.buffers()):
        # Non-persistent buffers are not in the file: build it for real.
        module = cls(**kwargs)
        module.load_state_dict(state, strict=True)
    return module
