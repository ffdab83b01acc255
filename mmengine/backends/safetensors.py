"""safetensors weights + a module class from the model's `model.py`.

The file format (mmengine/tensorfile.py parses and checks its header) is
read and written here without the safetensors package. A load reads the
whole tensor region with a few large `readinto`s into one arena (see
mmengine/staging.py, which recycles arenas of evicted models), and every
weight is a view of it: one allocation, no copy. On a GPU the arena is
copied to the device once, and the weights are views of that.

The module's structure is kept between loads: a skeleton on the meta
device, per (model.py path, mtime, size, class, kwargs), lent to one loaded
model at a time and handed back without its tensors when that model
closes. A reload imports nothing and builds nothing; it reads the bytes and
assigns views.

Manifest options: `module` (the class in model.py, default "Model") and
`module_kwargs` (its constructor's keyword arguments). The module's forward
takes the inputs as keyword arguments.
"""
from __future__ import annotations

import collections
import json
import os
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmengine import staging
from mmengine.backends.base import TorchModel, forget_module, import_file
from mmengine.errors import LoadFailed
from mmengine.storage import ModelSpec
from mmengine.tensorfile import ITEMSIZE, parse_header

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_OPTIONS = frozenset({"module", "module_kwargs"})


def load_file(path: Path, where: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on CPU: views of one arena."""
    flat, entries = _read(path, where or str(path))
    return _views(flat, entries)


Entries = list[tuple[str, str, list[int], int, int]]  # name, dtype, shape, begin, end


def _read(path: Path, where: str) -> tuple[torch.Tensor, Entries]:
    """The file's tensor region as one flat uint8 tensor, and where each
    tensor lies in it."""
    try:
        with open(path, "rb", buffering=0) as f:
            header, data_start = parse_header(f, os.fstat(f.fileno()).st_size)
            lo = min((e["data_offsets"][0] for e in header.values()), default=0)
            hi = max((e["data_offsets"][1] for e in header.values()), default=0)
            flat = staging.POOL.take(hi - lo)
            staging.read_into(f, data_start + lo, flat)
    except OSError as e:
        raise LoadFailed(f"{where}: cannot read {path.name}: {e}") from e
    except ValueError as e:
        raise LoadFailed(f"{where}: {path.name} is not a valid safetensors file: {e}") from e
    entries = [(name, e["dtype"], e["shape"], e["data_offsets"][0] - lo,
                e["data_offsets"][1] - lo) for name, e in header.items()]
    return flat, entries


def _views(flat: torch.Tensor, entries: Entries) -> dict[str, torch.Tensor]:
    out = {}
    for name, dtype, shape, begin, end in entries:
        raw = flat[begin:end]
        if begin % ITEMSIZE[dtype]:
            raw = raw.clone()  # the format allows unaligned data; a view cannot be
        out[name] = raw.view(DTYPES[dtype]).reshape(shape)
    return out


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

#: Meta-device skeletons that no loaded model holds, most recently returned last.
SKELETON_LIMIT = 64
_skeletons: collections.OrderedDict[tuple, tuple[torch.nn.Module, Any]] = \
    collections.OrderedDict()
_skeletons_lock = threading.Lock()


class ModuleModel(TorchModel):
    def __init__(self, spec: ModelSpec, device: torch.device, module: torch.nn.Module,
                 source: Any, skeleton_key: tuple | None = None) -> None:
        super().__init__(spec, device, module)
        self._source = source
        self._skeleton_key = skeleton_key

    def close(self) -> None:
        module, source, key = self.module, self._source, self._skeleton_key
        super().close()
        self._source = self._skeleton_key = None
        if module is not None and key is not None and _strip(module):
            _give_skeleton(key, module, source)
        else:
            forget_module(source)


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
    flat, entries = _read(spec.path / spec.artifact, where)
    if device.type != "cpu":
        flat = flat.to(device)  # one copy; the host arena goes back to the pool
    state = _views(flat, entries)
    del flat
    key = _skeleton_key(spec.path / "model.py", class_name, kwargs)
    skeleton = _take_skeleton(key)
    if skeleton is None:
        source = import_file(spec.path / "model.py", spec)
        try:
            module, reusable = _build(source, class_name, kwargs, state, where)
        except BaseException:
            forget_module(source)
            raise
        if not reusable:
            key = None
    else:
        module, source = skeleton
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except BaseException:
            if _strip(module):  # it may hold some of the tensors already
                _give_skeleton(key, module, source)
            else:
                forget_module(source)
            raise
    try:
        module.to(device).eval()
    except BaseException:
        ModuleModel(spec, device, module, source, key).close()
        raise
    return ModuleModel(spec, device, module, source, key)


def _build(source: Any, class_name: str, kwargs: dict[str, Any],
           state: dict[str, torch.Tensor], where: str) -> tuple[torch.nn.Module, bool]:
    """The module with `state` as its tensors, and whether its skeleton can
    be kept (every tensor it has came from the file)."""
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
        return module, False
    return module, True


def _skeleton_key(model_py: Path, class_name: str, kwargs: dict[str, Any]) -> tuple | None:
    try:
        st = model_py.stat()
    except OSError:
        return None  # import_file reports it
    return (str(model_py), st.st_mtime_ns, st.st_size, st.st_ino, class_name,
            json.dumps(kwargs, sort_keys=True, default=repr))


def _take_skeleton(key: tuple | None) -> tuple[torch.nn.Module, Any] | None:
    if key is None:
        return None
    with _skeletons_lock:
        return _skeletons.pop(key, None)  # lent: one loaded model at a time owns it


def _give_skeleton(key: tuple, module: torch.nn.Module, source: Any) -> None:
    with _skeletons_lock:
        if key in _skeletons:
            dropped = [source]  # another load built one meanwhile
        else:
            _skeletons[key] = (module, source)
            dropped = []
            while len(_skeletons) > SKELETON_LIMIT:
                dropped.append(_skeletons.popitem(last=False)[1][1])
    for old in dropped:
        forget_module(old)


def _strip(module: torch.nn.Module) -> bool:
    """Moves every parameter and buffer of `module` to the meta device, so
    it references no weights; False if a tensor it keeps elsewhere (an
    attribute, a cache) could not be stripped: it must not be kept."""
    try:
        module.to("meta")
    except Exception:  # noqa: BLE001 - a module that refuses is simply not kept
        return False
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_meta:
                return False
    return True


def clear_skeletons() -> None:
    """Forgets every kept skeleton (tests; a worker that wants its memory)."""
    with _skeletons_lock:
        entries = list(_skeletons.values())
        _skeletons.clear()
    for _, source in entries:
        forget_module(source)
