"""What this process's control group allows it: its memory and its CPU time.

A container (a Kubernetes pod, `docker run --memory`) is a cgroup. The
machine's figures (psutil's, os.cpu_count()) are the host's: a budget made
from them overcommits the container, whose kernel kills the process at its
limit. Both cgroup versions are read, each where this process's entry in
/proc/self/cgroup points under the mount; where that directory is not
there, the mount's root is taken: a container without a cgroup namespace
sees its host's path in /proc/self/cgroup, while its mount shows its own
group at the root.

A limit at or above the machine's memory is no limit. What a group uses
is what the kernel cannot take back from it: its usage less its page
cache, active or not (active_file, inactive_file), which the kernel
reclaims before it kills anyone at the limit. Model files read through
the page cache (twice, and they are "active") must not count as memory in
use, or every load would look like pressure. /dev/shm (shmem: the rings,
the host tier) is no such cache: it counts.
"""
from __future__ import annotations

import os

#: Where the cgroup file systems are mounted: v2's at the root, v1's in a
#: folder per controller.
ROOT = "/sys/fs/cgroup"
#: This process's groups: "0::<path>" for v2, "<n>:<controllers>:<path>" for v1.
SELF = "/proc/self/cgroup"


def _paths() -> dict[str, str]:
    """Controller ("" for v2) to this process's group path."""
    out: dict[str, str] = {}
    try:
        with open(SELF) as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) == 3:
                    for controller in parts[1].split(","):
                        out[controller] = parts[2]
    except OSError:
        pass  # not Linux, or no /proc: no groups
    return out


def _group(mount: str, path: str, marker: str) -> str | None:
    """The folder of this process's group under `mount`, holding `marker`."""
    for folder in (os.path.normpath(os.path.join(mount, path.lstrip("/"))), mount):
        if folder.startswith(mount) and os.path.exists(os.path.join(folder, marker)):
            return folder
    return None


def _up(folder: str, mount: str):
    """`folder` and its parents, to the mount's root: a parent's limit
    binds its children too."""
    while True:
        yield folder
        if len(folder) <= len(mount):
            return
        folder = os.path.dirname(folder)


def _binding(folder: str, mount: str, limit) -> tuple[str, float] | None:
    """The one of `folder` and its parents whose limit binds (the least of
    limit(f), None being no limit), with that limit; None where none has
    one. Its usage is what that limit is compared with: the group's own
    would miss the siblings that share a parent's limit (a job's other
    steps, a slice's other services)."""
    best = None
    for f in _up(folder, mount):
        value = limit(f)
        if value is not None and (best is None or value < best[1]):
            best = (f, value)
    return best


def _read(folder: str, name: str) -> str:
    with open(os.path.join(folder, name)) as f:
        return f.read().strip()


def _stat(folder: str, name: str) -> dict[str, int]:
    out = {}
    for line in _read(folder, name).splitlines():
        key, _, value = line.partition(" ")
        if value.isdigit():
            out[key] = int(value)
    return out


def memory(machine: int) -> tuple[int, int] | None:
    """(bytes in use, limit) of this process's memory cgroup,
    where it has a limit below `machine` (the machine's memory); None where
    it has none, or none can be read."""
    paths = _paths()
    try:
        if "" in paths and (group := _group(ROOT, paths[""], "memory.current")):
            binding = _binding(group, ROOT, _v2_memory)
            if binding is None:
                return None
            folder, limit = binding
            used = int(_read(folder, "memory.current"))
            stat = _stat(folder, "memory.stat")
            cache = stat.get("active_file", 0) + stat.get("inactive_file", 0)
        elif "memory" in paths and (group := _group(os.path.join(ROOT, "memory"),
                                                    paths["memory"], "memory.stat")):
            # v1: usage and the stat's total_* count the children too.
            folder, limit = _binding(group, os.path.join(ROOT, "memory"), _v1_memory) or (
                group, machine)
            used = int(_read(folder, "memory.usage_in_bytes"))
            stat = _stat(folder, "memory.stat")
            cache = stat.get("total_active_file", 0) + stat.get("total_inactive_file", 0)
        else:
            return None
    except (OSError, ValueError):
        return None
    if limit >= machine:
        return None
    return max(0, used - cache), int(limit)


def cpu_quota() -> float | None:
    """The cores' worth of CPU time this process's cgroup may use (2.5:
    two and a half), or None where it has no quota."""
    paths = _paths()
    try:
        if "" in paths and (group := _group(ROOT, paths[""], "cgroup.procs")):
            return _least(group, ROOT, _v2_cpu)
        mount = os.path.join(ROOT, "cpu")
        if "cpu" in paths and (group := _group(mount, paths["cpu"], "cpu.cfs_quota_us")):
            return _least(group, mount, _v1_cpu)
    except (OSError, ValueError):
        pass
    return None


def _least(folder: str, mount: str, limit) -> float | None:
    binding = _binding(folder, mount, limit)
    return None if binding is None else binding[1]


def _v2_memory(folder: str) -> int | None:
    if not os.path.exists(os.path.join(folder, "memory.max")):
        return None  # the root's: no limit there
    value = _read(folder, "memory.max")
    return None if value == "max" else int(value)


def _v1_memory(folder: str) -> int | None:
    if not os.path.exists(os.path.join(folder, "memory.limit_in_bytes")):
        return None
    return int(_read(folder, "memory.limit_in_bytes"))  # "no limit" is a huge number


def _v2_cpu(folder: str) -> float | None:
    if not os.path.exists(os.path.join(folder, "cpu.max")):
        return None
    quota, period = _read(folder, "cpu.max").split()[:2]
    return None if quota == "max" else int(quota) / int(period)


def _v1_cpu(folder: str) -> float | None:
    if not os.path.exists(os.path.join(folder, "cpu.cfs_quota_us")):
        return None
    quota = int(_read(folder, "cpu.cfs_quota_us"))
    return None if quota < 0 else quota / int(_read(folder, "cpu.cfs_period_us"))
