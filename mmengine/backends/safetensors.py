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
import ctypes
import functools
import json
import mmap
import os
import struct
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmengine import shm, staging, tensorfile
from mmengine.backends.base import TorchModel, forget_module, import_file
from mmengine.config import native
from mmengine.errors import LoadFailed
from mmengine.storage import ModelSpec, open_artifact
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


def _read(path: Path, where: str,
          device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, Entries]:
    """The file's tensor region as one flat uint8 tensor on `device`, and
    where each tensor lies in it. On CPU the bytes are read straight into a
    recycled arena; on a GPU through the pinned staging buffers."""
    try:
        f, size = open_artifact(path)  # a zstd stream in the disk cache: forward reads
        with f:
            header, data_start = parse_header(f, size)
            lo, hi = tensorfile.region(header)
            flat = (staging.POOL.take(hi - lo) if device.type == "cpu"
                    else torch.empty(hi - lo, dtype=torch.uint8, device=device))
            staging.stager(device).from_file(f, data_start + lo, hi - lo, flat)
    except OSError as e:
        raise LoadFailed(f"{where}: cannot read {path.name}: {e}") from e
    except ValueError as e:
        raise LoadFailed(f"{where}: {path.name} is not a valid safetensors file: {e}") from e
    return flat, _entries(header, lo)


def _entries(header: dict[str, dict[str, Any]], lo: int) -> Entries:
    return [(name, e["dtype"], e["shape"], e["data_offsets"][0] - lo,
             e["data_offsets"][1] - lo) for name, e in header.items()]


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

class Slots:
    """Where a kept module's state-dict tensors live: for each name, its
    submodule, attribute, whether it is a parameter, and the meta tensor it
    holds while the module is kept. A load from the skeleton puts the
    file's tensors there, and a close puts the meta ones back: torch's
    load_state_dict and .to("meta") walk the module and check every tensor
    each time (a 400-tensor module: ~12 ms of Python under the GIL, which
    the worker's serving thread waits for, against ~1.5 ms here).

    `of()` gives None for a module that customises loading or moving
    (state-dict hooks, its own _load_from_state_dict, load_state_dict,
    __setattr__ or _apply) or keeps tensors outside its state dict
    (non-persistent buffers): such a module goes through torch as before."""

    def __init__(self, slots: list[tuple[str, torch.nn.Module, str, bool, torch.Tensor]]):
        self._slots = slots
        self._names = frozenset(name for name, *_ in slots)

    @classmethod
    def of(cls, module: torch.nn.Module) -> "Slots | None":
        """The slots of a stripped module (every tensor on the meta device)."""
        base = torch.nn.Module
        if type(module).load_state_dict is not base.load_state_dict:
            return None
        slots = []
        for prefix, sub in module.named_modules(remove_duplicate=False):
            kind = type(sub)
            if (sub._load_state_dict_pre_hooks or sub._load_state_dict_post_hooks
                    or sub._non_persistent_buffers_set
                    or kind._load_from_state_dict is not base._load_from_state_dict
                    or kind.__setattr__ is not base.__setattr__
                    or kind._apply is not base._apply):  # .to() would move more
                return None
            dot = prefix + "." if prefix else ""
            for attr, t in sub._parameters.items():
                if t is not None:
                    slots.append((dot + attr, sub, attr, True, t))
            for attr, t in sub._buffers.items():
                if t is not None:
                    slots.append((dot + attr, sub, attr, False, t))
        if any(not t.is_meta for *_, t in slots) or len({n for n, *_ in slots}) != len(slots):
            return None
        return cls(slots)

    def bind(self, state: dict[str, torch.Tensor]) -> bool:
        """Puts `state`'s tensors in the module as load_state_dict(strict,
        assign) would; False, changing nothing, unless they are exactly its
        names and shapes (load_state_dict then says what is wrong)."""
        if len(state) != len(self._slots) or not self._names.issuperset(state):
            return False
        for name, _, _, is_param, meta in self._slots:
            t = state[name]
            if t.shape != meta.shape or (is_param and meta.requires_grad and not (
                    t.is_floating_point() or t.is_complex())):  # torch names the tensor
                return False
        for name, sub, attr, is_param, meta in self._slots:
            if is_param:
                sub._parameters[attr] = torch.nn.Parameter(state[name],
                                                           requires_grad=meta.requires_grad)
            else:
                sub._buffers[attr] = state[name]
        return True

    def strip(self) -> None:
        """Puts the meta tensors back: the module holds no weight."""
        for _, sub, attr, is_param, meta in self._slots:
            (sub._parameters if is_param else sub._buffers)[attr] = meta


#: Meta-device skeletons that no loaded model holds, most recently returned
#: last, with their slots (None: the module customises loading).
SKELETON_LIMIT = 64
_skeletons: collections.OrderedDict[tuple, tuple[torch.nn.Module, Any, Slots | None]] = \
    collections.OrderedDict()
_skeletons_lock = threading.Lock()


class ModuleModel(TorchModel):
    def __init__(self, spec: ModelSpec, device: torch.device, module: torch.nn.Module,
                 source: Any, skeleton_key: tuple | None = None,
                 flat: torch.Tensor | None = None, entries: Entries = (),
                 slots: Slots | None = None) -> None:
        super().__init__(spec, device, module)
        self._source = source
        self._skeleton_key = skeleton_key
        self._slots = slots  # where the module came from a skeleton that has them
        # The bytes the weights view and where each lies: what `publish`
        # writes to the host tier.
        self.flat, self.entries = flat, entries

    def close(self) -> None:
        module, source, key, slots = self.module, self._source, self._skeleton_key, self._slots
        super().close()
        self._source = self._skeleton_key = self.flat = self._slots = None
        if module is not None and key is not None and _strip(module, slots):
            _give_skeleton(key, module, source, slots or Slots.of(module))
        else:
            forget_module(source)


def load(spec: ModelSpec, device: torch.device, host: str | None = None) -> ModuleModel:
    """The model of `spec` on `device`: its bytes read from its file, or
    from the host-tier segment named `host` (see `publish`)."""
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
    if host is None:
        flat, entries = _read(spec.path / spec.artifact, where, device)
    else:
        flat, entries = _host_region(host, where, device)
    state = _views(flat, entries)
    key = _skeleton_key(spec.path / "model.py", class_name, kwargs)
    skeleton = _take_skeleton(key)
    slots = None
    if skeleton is not None:
        module, source, slots = skeleton
        try:
            if slots is None or not slots.bind(state):
                module.load_state_dict(state, strict=True, assign=True)
        except Exception:
            # The kept module does not fit these tensors (the file changed,
            # or its forward registered one): it is dropped, and a module
            # built afresh says whether the file or the skeleton was wrong.
            _strip(module, None)
            forget_module(source)
            skeleton = slots = None
    if skeleton is None:
        source = import_file(spec.path / "model.py", spec)
        try:
            module, reusable = _build(source, class_name, kwargs, state, where)
        except BaseException:
            forget_module(source)
            raise
        if not reusable:
            key = None
    try:
        # A module whose every tensor came from the file (it has a skeleton
        # key) holds them on `device` already: on CPU the walk moves none.
        # One built for real may have made a buffer elsewhere.
        if device.type != "cpu" or key is None:
            module.to(device)
        module.eval()
    except BaseException:
        ModuleModel(spec, device, module, source, key).close()
        raise
    return ModuleModel(spec, device, module, source, key, flat, entries, slots)


# -- the host tier ----------------------------------------------------------
#
# A model in the host tier is a safetensors file in shared memory (a segment
# the front-end names and owns, see mmengine/hosttier.py) whose data starts
# page-aligned. Every worker can map it: a CPU worker runs the model on views
# of a private mapping (nothing is copied, and workers share the pages until
# a model writes one: copied on its write, given back as it closes), a GPU
# worker copies it to the device, registered as pinned or through its stager.

_HOST_ALIGN = 4096
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable
_RO = "The given buffer is not writable"
# Host-tier mappings are read-only on purpose (a model that wrote to its
# weights would change every worker's copy): torch warns, needlessly.
warnings.filterwarnings("ignore", message=_RO)


def publish(model: TorchModel, segment: str, retired: list) -> int:
    """Writes the model's tensor bytes into the host-tier segment `segment`
    (created here; the front-end unlinks it), and on CPU moves the model's
    weights onto a private mapping of it, so that the worker's own copy is
    freed: the storages they leave are added to `retired`, for the caller
    to free once no call runs on them (another thread's, with the GIL let
    go, reads them to its end). Returns the segment's size in bytes. A
    safetensors model writes its one region; any other module its tensors
    one by one (see `host_tensors` for which modules can be published)."""
    if model.module is None:
        raise LoadFailed(f"{model.spec.name}: not resident, nothing to publish")
    if isinstance(model, ModuleModel):
        entries, chunks = model.entries, [(0, model.flat)]
    else:
        tensors = host_tensors(model.module, model.spec.name)
        entries, chunks = _layout(tensors)
    on_device = [(begin, src) for begin, src in chunks if src.device.type != "cpu"]
    size = _write_segment(segment, entries, [c for c in chunks if c[1].device.type == "cpu"])
    device = on_device[0][1].device if on_device else torch.device("cpu")
    shared, entries, _ = HOST_MAPS.get(segment, model.spec.name, device)
    if on_device:
        # Into the mapping, registered as pinned as it was mapped: the bytes
        # leave at the link's speed, and the next load from this segment
        # here finds it registered (page-locking costs ~8 ms per 64 MiB).
        for begin, src in on_device:
            shared[begin:begin + src.numel()].copy_(src)
    elif isinstance(model, ModuleModel):
        retired.append(model.flat)
        model.module.load_state_dict(_views(shared, entries), strict=True, assign=True)
        model.flat = shared  # the private arena goes back to the pool
    else:
        retired.extend(t.untyped_storage() for t in tensors.values())
        _rebind(tensors, shared, entries, model.spec.name)
    return size


def load_from_host(model: TorchModel, segment: str, device: torch.device) -> None:
    """Points the tensors of `model` (a kept skeleton, or a module just
    parsed) at the host-tier copy in `segment`: views of the mapping on CPU,
    of one copy of it on a GPU."""
    flat, entries = _host_region(segment, model.spec.name, device)
    _rebind(module_tensors(model.module), flat, entries, model.spec.name)


def _host_region(segment: str, where: str,
                 device: torch.device) -> tuple[torch.Tensor, Entries]:
    """The tensor region of a host-tier segment on `device`: the shared
    mapping itself on CPU, one copy of it on a GPU (straight from the
    mapping when it is registered as pinned, else through the stager)."""
    flat, entries, pinned = HOST_MAPS.get(segment, where, device)
    if device.type != "cpu":
        on_device = torch.empty(flat.numel(), dtype=torch.uint8, device=device)
        if pinned:  # one copy at the link's speed, no staging
            on_device.copy_(flat, non_blocking=True)
        else:
            staging.stager(device).from_host(flat, on_device)
        flat = on_device
    return flat, entries


def host_tensors(module: torch.nn.Module, where: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of `module` by name, the objects it holds
    (so that `set_` on one changes the module), if each is a whole
    contiguous tensor over a storage of its own; LoadFailed otherwise (tied
    or strided weights are not laid out flat: such a model stays out of the
    host tier), or if they hold no bytes at all."""
    tensors = module_tensors(module)
    storages = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):  # an _extra_state, a quantized module's dtype
            raise LoadFailed(f"{where}: its state {name!r} is no tensor; the model cannot go "
                             f"to the host tier")
        if t.layout != torch.strided:  # a sparse tensor: no storage of its own
            raise LoadFailed(f"{where}: tensor {name!r} is {t.layout}; the model cannot go "
                             f"to the host tier")
        storage = t.untyped_storage()
        if (not t.is_contiguous() or t.storage_offset() or storage.nbytes() != t.nbytes
                or storage.data_ptr() in storages and t.nbytes
                or t.dtype not in _NAMES):
            raise LoadFailed(f"{where}: tensor {name!r} shares or strides its storage; "
                             f"the model cannot go to the host tier")
        storages.add(storage.data_ptr())
    if not any(t.nbytes for t in tensors.values()):
        # Weights kept elsewhere (a frozen TorchScript module's are constants
        # of its graph): a copy would hold none of them, and a load "from"
        # it would parse the file all the same.
        raise LoadFailed(f"{where}: its state dict holds no tensor bytes; the model cannot "
                         f"go to the host tier")
    return tensors


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers of `module` by name: the objects it holds,
    so that `set_` on one changes what the module computes with."""
    return module.state_dict(keep_vars=True)


def strip(tensors: dict[str, torch.Tensor]) -> None:
    """Empties every tensor in place: the module that holds them keeps its
    structure and none of its bytes."""
    with torch.no_grad():
        for t in tensors.values():
            t.set_(torch.empty(0, dtype=t.dtype, device=t.device))


def _rebind(tensors: dict[str, torch.Tensor], flat: torch.Tensor, entries: Entries,
            where: str) -> None:
    """Points each tensor at its view of `flat`; LoadFailed, changing
    nothing, unless the copy holds exactly these tensors, dtypes and shapes
    (set_ would take any shape without a word). A kept skeleton is emptied,
    so only names and dtypes can be checked against it."""
    views = _views(flat, entries)
    if set(views) != set(tensors) or any(
            v.dtype != tensors[n].dtype or (tensors[n].numel() and v.shape != tensors[n].shape)
            for n, v in views.items()):
        raise LoadFailed(f"{where}: the host tier's copy does not hold this model's tensors")
    with torch.no_grad():
        for name, view in views.items():
            tensors[name].set_(view)


def _layout(tensors: dict[str, torch.Tensor]) -> tuple[Entries, list]:
    """Entries that put the tensors end to end, each 64-byte aligned, and
    (offset, bytes) to write there."""
    entries, chunks, at = [], [], 0
    for name, t in tensors.items():
        at = -(-at // 64) * 64
        raw = t.detach().reshape(-1).view(torch.uint8)
        entries.append((name, _NAMES[t.dtype], list(t.shape), at, at + raw.numel()))
        chunks.append((at, raw))
        at += raw.numel()
    return entries, chunks


def _write_segment(segment: str, entries: Entries, chunks: list) -> int:
    """Creates `segment` as a safetensors file whose data starts page-aligned
    and writes the (offset, host uint8 tensor) chunks into its data (a
    device's are copied in through a mapping); its size."""
    header = {name: {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
              for name, dtype, shape, begin, end in entries}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % _HOST_ALIGN)
    data_start = 8 + len(encoded)
    size = data_start + max((end for *_, end in entries), default=0)
    path = os.path.join(shm.SHM_DIR, _check_segment(segment))
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        # Every page is allocated now: a full /dev/shm fails here, cleanly,
        # and never later as a SIGBUS in a process that maps the segment.
        os.posix_fallocate(fd, 0, size)
        os.pwrite(fd, struct.pack("<Q", len(encoded)) + encoded, 0)
        for begin, src in chunks:
            view = memoryview(src.numpy())
            for at in range(0, len(view), staging.CHUNK):
                os.pwrite(fd, view[at:at + staging.CHUNK], data_start + begin + at)
            del view
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return size


class HostMaps:
    """The host-tier segments this worker has mapped, kept until the
    front-end says a segment is gone (`forget`): a model demoted and loaded
    again maps nothing and unmaps nothing (on CPU a reload is building
    views; an eviction, dropping them), and on a GPU the mapping stays
    registered as pinned memory, so each load is one copy at PCIe speed.
    A mapping holds no memory of its own: its pages are the segment's."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[torch.Tensor, Entries, bool]] = {}
        self._guards: dict[str, int] = {}  # a CPU mapping's write guard (csrc/guard.h)
        self._lock = threading.Lock()

    def get(self, segment: str, where: str,
            device: torch.device) -> tuple[torch.Tensor, Entries, bool]:
        """(flat tensor region, where each tensor lies, registered as pinned)."""
        gpu = device.type == "cuda"
        with self._lock:
            hit = self._maps.get(segment)
        if hit is not None:
            return hit
        # A GPU worker registers the mapping, which CUDA does only for a
        # writable one; it never writes to it. On CPU weights are views of
        # a private mapping of it: a model that writes its own tensors
        # writes copies of their pages, and changes no one else's. Guarded,
        # it is read-only until a write comes (csrc/guard.h).
        guarded = not gpu and _guard is not None
        flat, entries = _map_host(segment, where, writable=gpu, read_only=guarded)
        pinned = gpu and _register(flat)
        with self._lock:
            hit = self._maps.setdefault(segment, (flat, entries, pinned))
            if hit[0] is flat and guarded and flat.numel():
                guard = _guard.add(flat.data_ptr(), flat.numel())
                if guard is not None:
                    self._guards[segment] = guard
            return hit

    def revert(self, segment: str) -> None:
        """Gives the pages of a CPU worker's (private) mapping that its
        model wrote back to the segment's, so that the next load of it is
        of the copy as it was made: said as the model closes, on the loader
        thread, after the unload's answer. Looking for them walks the page
        table (~2 ms per 256 MiB): only where a write came, if guarded."""
        with self._lock:
            hit = self._maps.get(segment)
            guard = self._guards.get(segment)
        if hit is None or not hit[0].numel() or guard is not None and not _guard.written(guard):
            return
        shm.revert_written(hit[0].data_ptr(), hit[0].numel())
        if guard is not None:
            _guard.rearm(guard)

    def forget(self, segment: str) -> None:
        with self._lock:
            gone = self._maps.pop(segment, None)
            guard = self._guards.pop(segment, None)
        if guard is not None:
            _guard.remove(guard)
        if gone is not None and gone[2]:
            if int(torch.cuda.cudart().cudaHostUnregister(gone[0].data_ptr())):
                _clear_cuda_error()

    def __len__(self) -> int:
        return len(self._maps)


#: HostMaps's write guards (csrc/guard.pyx); None where not built.
_guard = native("guard")
#: The process's mappings (a worker loads on one loader thread).
HOST_MAPS = HostMaps()


def _register(flat: torch.Tensor) -> bool:
    """Page-locks a mapping for CUDA; False (the stager copies instead) if
    the driver refuses."""
    if not flat.numel():
        return False
    try:
        # Portable: pinned for every device's context, so that the unregister
        # (from whichever thread forgets it) needs no device of its own.
        error = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel(),
                                                     _HOST_REGISTER_PORTABLE)
    except Exception:  # noqa: BLE001 - no cudart binding: the stager serves
        return False
    if int(error):
        _clear_cuda_error()
    return int(error) == 0


def _clear_cuda_error() -> None:
    """Reads off the calling thread's last CUDA error. torch's binding of
    cudaHostRegister returns a failure without clearing it, and the next
    kernel launch's check on this thread (a warm-up, the next load) would
    raise it as its own."""
    lib = _cudart_library()
    if lib is not None:
        lib.cudaGetLastError()


@functools.cache
def _cudart_library():
    """The CUDA runtime torch loaded (ctypes), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _map_host(segment: str, where: str, writable: bool = False,
              read_only: bool = False) -> tuple[torch.Tensor, Entries]:
    """A host-tier segment's tensor region as a flat uint8 tensor over a
    mapping of it, and where each tensor lies in it: shared and `writable`,
    or private (writable unless `read_only`: a guard makes it so, HostMaps)."""
    try:
        fd = os.open(os.path.join(shm.SHM_DIR, _check_segment(segment)),
                     os.O_RDWR if writable else os.O_RDONLY)
    except OSError as e:
        raise LoadFailed(f"{where}: host tier segment {segment!r}: {e}") from e
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            header, data_start = parse_header(f, size)
        # Private where the model runs on it (CPU): a model that writes its
        # own tensors (a counter in a buffer) gets its own copies of those
        # pages, where a shared mapping would change every worker's. One
        # read-only and unguarded would kill its worker (SIGSEGV).
        mm = mmap.mmap(fd, size, flags=shm.map_flags() if writable else shm.private_map_flags(),
                       prot=mmap.PROT_READ | (0 if read_only and not writable
                                              else mmap.PROT_WRITE))
    except (OSError, ValueError) as e:
        raise LoadFailed(f"{where}: host tier segment {segment!r} is not usable: {e}") from e
    finally:
        os.close(fd)
    n = size - data_start
    flat = (torch.frombuffer(mm, dtype=torch.uint8, offset=data_start, count=n) if n
            else torch.empty(0, dtype=torch.uint8))
    # Populating the page table now is one pass at memory speed; faulting
    # 4 KiB pages in on first touch during inference would be many.
    shm.populate(flat.data_ptr(), n)  # the data starts page-aligned
    return flat, _entries(header, 0)


def _check_segment(name: str) -> str:
    if not (isinstance(name, str) and name.startswith(shm.PREFIX) and "/" not in name):
        raise LoadFailed(f"not a host tier segment: {name!r}")
    return name


def _build(source: Any, class_name: str, kwargs: dict[str, Any],
           state: dict[str, torch.Tensor], where: str) -> tuple[torch.nn.Module, bool]:
    """The module with `state` as its tensors, and whether its skeleton can
    be kept (every tensor it has came from the file)."""
    cls = getattr(source, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise LoadFailed(f"{where}: model.py has no torch.nn.Module class {class_name!r}")
    # Built on the meta device, the module allocates nothing and runs no
    # initialisers; the loaded tensors then become its parameters as they are.
    try:
        with torch.device("meta"):
            module = cls(**kwargs)
    except TypeError as e:  # most often its arguments: say where they come from
        raise LoadFailed(f"{where}: {class_name}(...): {e} (its keyword arguments are "
                         f"model.toml's [options.module_kwargs])") from e
    module.load_state_dict(state, strict=True, assign=True)
    if any(b.is_meta for b in module.buffers()):
        # Non-persistent buffers are not in the file: build it for real,
        # its tensors then the file's as they are (assign: their dtype, and
        # no copy beside the file's bytes, which the model holds).
        module = cls(**kwargs)
        module.load_state_dict(state, strict=True, assign=True)
        return module, False
    # One registered empty (None) and filled by forward is not in the file
    # either: a kept module would keep it, or lose it to the meta device.
    return module, not any(m._non_persistent_buffers_set for m in module.modules())


def _skeleton_key(model_py: Path, class_name: str, kwargs: dict[str, Any]) -> tuple | None:
    try:
        st = model_py.stat()
    except OSError:
        return None  # import_file reports it
    return (str(model_py), st.st_mtime_ns, st.st_size, st.st_ino, class_name,
            json.dumps(kwargs, sort_keys=True, default=repr))


def _take_skeleton(key: tuple | None) -> tuple[torch.nn.Module, Any, Slots | None] | None:
    if key is None:
        return None
    with _skeletons_lock:
        return _skeletons.pop(key, None)  # lent: one loaded model at a time owns it


def _give_skeleton(key: tuple, module: torch.nn.Module, source: Any,
                   slots: Slots | None) -> None:
    with _skeletons_lock:
        if key in _skeletons:
            dropped = [source]  # another load built one meanwhile
        else:
            _skeletons[key] = (module, source, slots)
            dropped = []
            while len(_skeletons) > SKELETON_LIMIT:
                dropped.append(_skeletons.popitem(last=False)[1][1])
    for old in dropped:
        forget_module(old)


def _strip(module: torch.nn.Module, slots: Slots | None) -> bool:
    """Moves every parameter and buffer of `module` to the meta device
    (through its slots if it has them), so it references no weights; False
    if a tensor it keeps elsewhere (an attribute, a cache) could not be
    stripped: it must not be kept."""
    try:
        if slots is not None:
            slots.strip()
        else:
            module.to("meta")
    except Exception:  # noqa: BLE001 - a module that refuses is simply not kept
        return False
    for m in module.modules():
        if slots is not None and any(t is not None and not t.is_meta for t in (
                *m._parameters.values(), *m._buffers.values())):
            return _strip(module, None)  # registered since its slots were taken
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_meta:
                return False
    return True


def clear_skeletons() -> None:
    """Forgets every kept skeleton (tests; a worker that wants its memory)."""
    with _skeletons_lock:
        entries = list(_skeletons.values())
        _skeletons.clear()
    for _, source, _ in entries:
        forget_module(source)
