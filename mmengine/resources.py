"""Resource readings: which devices exist and how full memory and disk are.

GPU figures come from pynvml (no torch in the front-end), host memory and
disk from psutil. Every reading degrades to "no GPU" rather than failing
where there is no NVIDIA driver.
"""
from __future__ import annotations

import functools

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


def gpu_count() -> int:
    nvml = _nvml()
    return nvml.nvmlDeviceGetCount() if nvml else 0


def gpu_memory(index: int) -> tuple[int, int]:
    """(used, total) bytes of GPU `index`, as the driver sees them."""
    nvml = _nvml()
    info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
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
