"""Resource readings: which devices exist and how full memory and disk are.

GPU figures come from pynvml (no torch in the front-end), host memory and
disk from psutil. Every reading degrades to "no GPU" rather than failing
where there is no NVIDIA driver.
"""
from __future__ import annotations

import functools
import os

import psutil

from mmengine.config import Config, ConfigError


@functools.lru_cache(maxsize=1)
def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no device: a CPU machine
        return None


def visible(mask: str | None, count: int) -> list[int | str]:
    """The GPUs a CUDA program sees, in its order (cuda:0 first), as NVML
    knows them: an index, or a UUID (or its prefix). NVML counts every GPU
    of the machine; CUDA_VISIBLE_DEVICES (`mask`) narrows and reorders
    what CUDA sees, and CUDA stops reading it at the first entry that is
    not a device, as here."""
    if mask is None:
        return list(range(count))
    seen: list[int | str] = []
    for entry in (e.strip() for e in mask.split(",")):
        if entry.isdigit() and int(entry) < count:
            seen.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")):
            seen.append(entry)
        else:
            break
        if seen[-1] in seen[:-1]:  # CUDA refuses a repeated device outright
            return []
    return seen


@functools.lru_cache(maxsize=1)
def _handles() -> tuple:
    """NVML's handle of each GPU CUDA sees, cuda:0 first."""
    nvml = _nvml()
    if nvml is None:
        return ()
    handles = []
    for gpu in visible(os.environ.get("CUDA_VISIBLE_DEVICES"), nvml.nvmlDeviceGetCount()):
        try:
            handles.append(nvml.nvmlDeviceGetHandleByIndex(gpu) if isinstance(gpu, int)
                           else _by_uuid(nvml, gpu))
        except Exception:  # noqa: BLE001 - an entry naming no GPU ends CUDA's list too
            break
    return tuple(handles)


def _by_uuid(nvml, prefix: str):
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        uuid = nvml.nvmlDeviceGetUUID(handle)
        if (uuid.decode() if isinstance(uuid, bytes) else uuid).startswith(prefix):
            return handle
    raise LookupError(prefix)


def gpu_count() -> int:
    """The GPUs this process's CUDA sees (CUDA_VISIBLE_DEVICES applied)."""
    return len(_handles())


def gpu_memory(index: int) -> tuple[int, int]:
    """(used, total) bytes of cuda:`index`, as the driver sees them."""
    info = _nvml().nvmlDeviceGetMemoryInfo(_handles()[index])
    return int(info.used), int(info.total)


def plan_devices(config: Config) -> list[str]:
    """One worker per GPU, or `workers` on the CPU."""
    gpus = gpu_count() if config.device in ("auto", "cuda") else 0
    if config.device == "cuda" and gpus == 0:
        raise ConfigError("device: 'cuda' but no GPU is visible")
    if gpus:
        return [f"cuda:{i}" for i in range(gpus)]
    return ["cpu"] * config.workers


def device_budget(config: Config, device: str) -> int:
    """The bytes of models a worker on `device` may hold."""
    if config.device_budget:
        return config.device_budget
    if device.startswith("cuda"):
        return gpu_memory(int(device.split(":")[1]))[1]
    return psutil.virtual_memory().total // 2 // config.workers


def host_memory_fraction() -> float:
    return psutil.virtual_memory().percent / 100.0


def disk_fraction(path: str) -> float:
    return psutil.disk_usage(path).percent / 100.0
