"""Resource readings: which devices exist and how full memory and disk are.

GPU figures come from pynvml (no torch in the front-end), host memory and
disk from psutil, within the process's cgroup (a container's) where that
allows less (cgroup.py). Every reading degrades to "no GPU" rather than failing
where there is no NVIDIA driver.
"""
from __future__ import annotations

import functools
import math
import os

import psutil

from mmengine import cgroup, ring
from mmengine.config import Config, ConfigError, native
from mmengine.messages import HEAVY_OPS, Op

#: What each process of the server holds besides models and rings, which
#: the automatic sizes leave it: the interpreter, torch, its allocator (a
#: CPU worker held ~150 MiB in a container drill, the front-end ~30).
PROCESS_BYTES = 200 << 20


@functools.lru_cache(maxsize=1)
def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no device: a CPU machine
        return None


#: CUDA numbers GPUs fastest first unless told otherwise; NVML by PCI bus.
#: Workers are started with this order (unless the user set one), so that
#: cuda:i and NVML's GPUs agree.
DEVICE_ORDER = ("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def visible(mask: str | None, count: int) -> list[int | str]:
    """The GPUs a CUDA program sees, in its order (cuda:0 first), as NVML
    knows them: an index, or a UUID (or a prefix of one). NVML counts every
    GPU of the machine; CUDA_VISIBLE_DEVICES (`mask`) narrows and reorders
    what CUDA sees. Read as CUDA reads it: an index is the entry's leading
    digits, entries are all indices or all UUIDs, the list ends at the
    first entry that names no device, and a repeated one hides them all."""
    if mask is None:
        return list(range(count))
    seen: list[int | str] = []
    for entry in (e.strip() for e in mask.split(",")):
        if entry.startswith(("GPU-", "MIG-")):
            gpu: int | str = entry
        else:
            digits = entry[:len(entry) - len(entry.lstrip("0123456789"))]
            if not digits or int(digits) >= count:
                break
            gpu = int(digits)
        if seen and type(gpu) is not type(seen[0]):
            break
        if gpu in seen:
            return []
        seen.append(gpu)
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


def _by_uuid(nvml, uuid: str):
    """The handle of the GPU, or MIG instance, whose UUID is `uuid` or
    begins with it; LookupError if none, or if more than one begins so."""
    try:
        return nvml.nvmlDeviceGetHandleByUUID(uuid)  # a whole UUID, a MIG one too
    except Exception:  # noqa: BLE001 - a prefix, or nothing: look through the GPUs
        pass
    found = []
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        full = nvml.nvmlDeviceGetUUID(handle)
        if (full.decode() if isinstance(full, bytes) else full).startswith(uuid):
            found.append(handle)
    if len(found) != 1:
        raise LookupError(f"{uuid}: {len(found)} GPUs")
    return found[0]


def gpu_count() -> int:
    """The GPUs this process's CUDA sees (CUDA_VISIBLE_DEVICES applied)."""
    return len(_handles())


def gpu_memory(index: int) -> tuple[int, int] | None:
    """(used, total) bytes of cuda:`index`, as the driver sees them; None
    where NVML will not say (a MIG GPU read without the privilege, say)."""
    try:
        info = _nvml().nvmlDeviceGetMemoryInfo(_handles()[index])
    except Exception:  # noqa: BLE001 - pynvml's NVMLError, of many kinds
        return None
    return int(info.used), int(info.total)


def plan_devices(config: Config) -> list[str]:
    """One worker per GPU, or `workers` on the CPU."""
    gpus = gpu_count() if config.device in ("auto", "cuda") else 0
    if config.device == "cuda" and gpus == 0:
        raise ConfigError("device: 'cuda' but no GPU is visible")
    if gpus:
        return [f"cuda:{i}" for i in range(gpus)]
    return ["cpu"] * config.workers


def cores() -> int:
    """The cores this process may run on: its CPU affinity, within its
    cgroup's CPU quota (a container's), not every core of the host."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    quota = cgroup.cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return count


def core_share(config: Config, device: str) -> int:
    """The cores that one worker on `device` may count on."""
    workers = config.workers if device == "cpu" else gpu_count()
    return max(1, cores() // max(1, workers))


def torch_threads(config: Config) -> int:
    """The torch threads of a CPU worker: its share of the cores that the
    front-end leaves. A torch op run by several threads waits at its end
    for the slowest, and one preempted (by the front-end, busy exactly when
    the workers are) holds the others for its time slice: eight rows
    through a 64-32-16 MLP took 16 ms with two threads on two cores beside
    one busy process, 26 µs with one."""
    return config.threads_per_worker or max(1, (cores() - 1) // max(1, config.workers))


def load_readers(config: Config, device: str) -> tuple[int, int]:
    """How many threads a worker's load reads its file with, while the
    worker serves and while it is idle: half its share of the cores, and
    all of it (1 to 4 either way), unless `load_threads` says."""
    share = core_share(config, device)
    return (config.load_threads or max(1, min(4, share // 2)),
            config.load_threads or max(1, min(4, share)))


def helps_loads(device: str) -> bool:
    """Whether a worker's serving thread reads its loads' parts while it
    waits for requests (csrc/readjob.h): a CPU worker's, where the rings
    and the reads are built in C."""
    return device == "cpu" and native("ring") is not None and native("reads") is not None


def spins_during_loads(config: Config, device: str) -> dict[Op, bool]:
    """Whether a worker's serving thread spins, and the front-end polls its
    answers, while the worker runs each heavy op (messages.HEAVY_OPS;
    config.spin_during_loads): any where the worker's share of the cores
    holds its load's readers, the spinning thread and one core more; else
    a load where the serving thread helps with its reads (its spinning is
    the load's reading then). A load from the host tier reads nothing: it
    is ~0.3 ms of Python on the loader thread, beside which parking cost
    each request two wake-ups, on one core (benchmarks/RESULTS.md, Loads,
    session 39). A copy to the host tier is one long copy on the loader
    thread, which needs the core."""
    if config.spin_during_loads != "auto":
        return dict.fromkeys(HEAVY_OPS, config.spin_during_loads == "on")
    spare = core_share(config, device) >= load_readers(config, device)[0] + 2
    return {Op.LOAD: spare or helps_loads(device), Op.PUBLISH: spare}


def device_budget(config: Config, device: str) -> int:
    """The bytes of models a worker on `device` may hold."""
    if config.device_budget:
        return config.device_budget
    if device.startswith("cuda"):
        memory = gpu_memory(int(device.split(":")[1]))
        if memory is None:
            raise ConfigError(f"device_budget: the memory of {device} cannot be read "
                              f"(NVML); set device_budget")
        return memory[1]
    return memory_for_models(config, "device_budget") // 2 // config.workers


def memory_for_models(config: Config, key: str) -> int:
    """What the automatic sizes share out: the memory the server may have,
    less what it holds whatever it serves: each worker's two data rings
    (in /dev/shm, which a container's limit counts) and each process's
    PROCESS_BYTES. Shared out whole, a 1 GiB container's two workers
    were killed at its limit, again and again. ConfigError, naming the
    automatic `key`, where nothing is left."""
    workers = len(plan_devices(config))
    fixed = own_memory(config, workers)
    total = host_memory()[1]
    if total <= fixed:
        raise ConfigError(
            f"{key}: automatic, but the memory the server may have ({total >> 20} MiB) "
            f"leaves none for models after {workers} workers' rings (2 x ring_bytes each, "
            f"rounded up to a power of two) "
            f"and {workers + 1} processes (~{PROCESS_BYTES >> 20} MiB each): give it more "
            f"memory, or fewer workers, a smaller ring_bytes, or set device_budget and "
            f"host_tier_bytes")
    return total - fixed


def own_memory(config: Config, workers: int) -> int:
    """What a server of `workers` workers holds whatever it serves: their
    rings and every process's PROCESS_BYTES."""
    return workers * rings_bytes(config) + (workers + 1) * PROCESS_BYTES


def rings_bytes(config: Config) -> int:
    """The shared memory one worker's rings take (/dev/shm): two data rings
    of ring_bytes and a control ring, each rounded up to a power of two,
    with its header."""
    return 2 * ring.segment_bytes(config.ring_bytes) + ring.segment_bytes(ring.CONTROL_BYTES)


def overcommitted(config: Config, budgets: list[int], host_bytes: int) -> str | None:
    """What to tell an operator whose sizes add up to more than the memory
    the server may have, `budgets` being each worker's device budget on
    the host (a CPU worker's) or 0; None where they fit. (On a CPU worker a
    model loaded from the host tier is the tier's pages, not a copy: the
    sum is the most they can hold.)"""
    own, total = own_memory(config, len(budgets)), host_memory()[1]
    if sum(budgets) + host_bytes + own <= total:
        return None
    return (f"the CPU workers' device_budget ({sum(budgets) >> 20} MiB), host_tier_bytes "
            f"({host_bytes >> 20} MiB) and the server's own ({own >> 20} MiB: rings, "
            f"processes) add up to more than the memory it may have ({total >> 20} MiB): "
            f"the kernel may kill workers at that limit before host_memory_watermark evicts")


def host_memory() -> tuple[int, int]:
    """(used, total) bytes of the memory this process may have: its
    cgroup's working set and limit where the limit is below the
    machine's memory, else the machine's (all but what is available)."""
    machine = psutil.virtual_memory()
    limited = cgroup.memory(machine.total)
    return limited if limited else (machine.total - machine.available, machine.total)


def host_memory_fraction() -> float:
    used, total = host_memory()
    return used / total


def disk_fraction(path: str) -> float:
    return psutil.disk_usage(path).percent / 100.0
