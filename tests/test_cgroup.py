"""A container's limits: the memory and CPU that its cgroup allows.

The readings are checked against cgroup file trees written as the kernel
lays them out (both versions, with and without a cgroup namespace), and a
real server is started in a real memory cgroup where this machine lets the
tests make one (root, a writable memory controller)."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import GATED, Server, run, until, write_handler
from mmengine import Client, cgroup, demo, hosttier, resources, ring
from mmengine.config import Config, ConfigError
from mmengine.engine import Engine
from mmengine.errors import LoadFailed, Timeout

GiB = 1 << 30
MACHINE = 64 * GiB


def tree(tmp_path: Path, self_cgroup: str, files: dict[str, str],
         monkeypatch) -> Path:
    """A cgroup mount at tmp_path/cg holding `files` (path: text), and
    /proc/self/cgroup saying `self_cgroup`, both read by cgroup.py."""
    root = tmp_path / "cg"
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    (tmp_path / "self").write_text(self_cgroup)
    monkeypatch.setattr(cgroup, "ROOT", str(root))
    monkeypatch.setattr(cgroup, "SELF", str(tmp_path / "self"))
    return root


def v2_group(limit: str = "max", current: int = 3 * GiB, cache: int = GiB,
             cpu: str = "max 100000") -> dict[str, str]:
    """A group whose page cache is `cache` bytes, a quarter of it active."""
    stat = (f"anon {current - cache}\nfile {cache + GiB // 8}\nshmem {GiB // 8}\n"
            f"active_file {cache // 4}\ninactive_file {cache - cache // 4}\n")
    return {"memory.max": limit, "memory.current": str(current), "cgroup.procs": "1\n",
            "memory.stat": stat, "cpu.max": cpu}


def under(folder: str, files: dict[str, str]) -> dict[str, str]:
    return {f"{folder}/{name}": text for name, text in files.items()}


def test_v2_a_pods_limit_binds_its_container_and_page_cache_is_not_in_use(
        tmp_path, monkeypatch):
    # Kubernetes sets the pod's limit on the pod's group; the container's
    # own says max. The pod has 3 GiB charged, 1 GiB of it page cache,
    # active or not (shmem, /dev/shm, is in "file" but counts: the kernel
    # cannot take it back); the container itself, less.
    tree(tmp_path, "0::/kubepods/pod1/ctr\n",
         {**under("kubepods/pod1", v2_group(limit=str(8 * GiB))),
          **under("kubepods/pod1/ctr", v2_group(current=GiB + GiB // 2, cpu="250000 100000"))},
         monkeypatch)
    assert cgroup.memory(MACHINE) == (2 * GiB, 8 * GiB)
    assert cgroup.cpu_quota() == 2.5
    # A limit above the machine's memory is none.
    assert cgroup.memory(4 * GiB) is None


def test_the_usage_is_the_binding_groups_siblings_and_all(tmp_path, monkeypatch):
    # A job's limit holds its steps together: this one's own 2 GiB is not
    # what the kernel weighs when the job nears 8 GiB.
    tree(tmp_path, "0::/job.slice/step1\n",
         {**under("job.slice", v2_group(limit=str(8 * GiB), current=7 * GiB + GiB // 2,
                                        cache=0)),
          **under("job.slice/step1", v2_group(current=2 * GiB, cache=0)),
          **under("job.slice/step2", v2_group(current=5 * GiB + GiB // 2, cache=0))},
         monkeypatch)
    assert cgroup.memory(MACHINE) == (7 * GiB + GiB // 2, 8 * GiB)


def test_v2_in_a_cgroup_namespace_the_group_is_the_mounts_root(tmp_path, monkeypatch):
    tree(tmp_path, "0::/\n", v2_group(limit=str(6 * GiB), cpu="50000 100000"), monkeypatch)
    assert cgroup.memory(MACHINE) == (2 * GiB, 6 * GiB)
    assert cgroup.cpu_quota() == 0.5


def test_v2_without_limits_says_none(tmp_path, monkeypatch):
    tree(tmp_path, "0::/user.slice\n", under("user.slice", v2_group()), monkeypatch)
    assert cgroup.memory(MACHINE) is None
    assert cgroup.cpu_quota() is None


def test_v1_without_a_namespace_reads_the_mounts_root(tmp_path, monkeypatch):
    # Docker on cgroup v1: /proc/self/cgroup names the host's path, which
    # the container's mount does not have; its root is the container's group.
    tree(tmp_path, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n",
         {"memory/memory.limit_in_bytes": str(4 * GiB),
          "memory/memory.usage_in_bytes": str(3 * GiB),
          "memory/memory.stat": f"hierarchical_memory_limit {4 * GiB}\n"
                                f"total_active_file {GiB // 4}\n"
                                f"total_inactive_file {GiB // 4}\n",
          "cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, monkeypatch)
    assert cgroup.memory(MACHINE) == (3 * GiB - GiB // 2, 4 * GiB)
    assert cgroup.cpu_quota() == 3.0


def test_v1_a_parents_limit_binds_with_its_usage(tmp_path, monkeypatch):
    unlimited = str(9223372036854771712)  # v1's "no limit"
    tree(tmp_path, "4:memory:/slice/job\n1:cpu:/slice/job\n",
         {"memory/slice/job/memory.limit_in_bytes": unlimited,
          "memory/slice/job/memory.usage_in_bytes": str(GiB),
          "memory/slice/job/memory.stat": "total_inactive_file 0\n",
          "memory/slice/memory.limit_in_bytes": str(2 * GiB),
          "memory/slice/memory.usage_in_bytes": str(GiB + GiB // 2),
          "memory/slice/memory.stat": f"total_active_file {GiB // 4}\n",
          "memory/memory.limit_in_bytes": unlimited, "memory/memory.stat": "",
          "cpu/slice/cpu.cfs_quota_us": "150000", "cpu/slice/cpu.cfs_period_us": "100000",
          "cpu/slice/job/cpu.cfs_quota_us": "-1", "cpu/slice/job/cpu.cfs_period_us": "100000",
          "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, monkeypatch)
    assert cgroup.memory(MACHINE) == (GiB + GiB // 4, 2 * GiB)  # the slice's
    assert cgroup.cpu_quota() == 1.5  # the parent's


def test_unreadable_or_absent_groups_are_no_limit(tmp_path, monkeypatch):
    tree(tmp_path, "0::/gone\n", {}, monkeypatch)
    assert cgroup.memory(MACHINE) is None and cgroup.cpu_quota() is None
    tree(tmp_path, "0::/\n", v2_group(limit="garbage"), monkeypatch)
    assert cgroup.memory(MACHINE) is None
    monkeypatch.setattr(cgroup, "SELF", str(tmp_path / "no such file"))
    assert cgroup.memory(MACHINE) is None and cgroup.cpu_quota() is None


def test_the_automatic_sizes_and_the_cores_come_from_the_container(tmp_path, monkeypatch):
    allowed = len(os.sched_getaffinity(0))
    tree(tmp_path, "0::/\n", v2_group(limit=str(4 * GiB), current=3 * GiB, cache=GiB,
                                      cpu="50000 100000"), monkeypatch)
    c = Config(workers=2)
    assert resources.host_memory() == (2 * GiB, 4 * GiB)
    assert resources.host_memory_fraction() == 0.5
    # The server's own first (two workers' rings, three processes), then
    # half of the rest for the workers' models, a quarter for the host tier.
    rings = 2 * (c.ring_bytes + ring.HEADER_BYTES) + ring.CONTROL_BYTES + ring.HEADER_BYTES
    left = 4 * GiB - 2 * rings - 3 * resources.PROCESS_BYTES
    assert resources.device_budget(c, "cpu") == left // 2 // 2
    # A ring's data area is a power of two: one asked for 40 MiB takes 64.
    assert resources.device_budget(c.replace(ring_bytes="40MiB"), "cpu") == left // 2 // 2
    assert hosttier.budget(c) == left // 4
    assert resources.overcommitted(c, [left // 4] * 2, left // 4) is None
    said = resources.overcommitted(c.replace(device_budget=2 * GiB), [2 * GiB] * 2, left // 4)
    assert "more than the memory it may have (4096 MiB)" in said, said
    assert resources.cores() == 1  # half a core: still one
    tree(tmp_path, "0::/\n", v2_group(cpu=f"{allowed * 100000 + 1} 100000"), monkeypatch)
    assert resources.cores() == allowed  # above the affinity
    assert resources.host_memory()[1] == psutil.virtual_memory().total  # no limit


def test_a_container_too_small_for_the_server_itself_is_refused_at_start(tmp_path,
                                                                       monkeypatch):
    # 512 MiB: two workers' rings (256 MiB) and three processes leave no
    # memory for models; the automatic size that would be 0 is named.
    tree(tmp_path, "0::/\n", v2_group(limit=str(GiB // 2), current=GiB // 4, cache=0),
         monkeypatch)
    with pytest.raises(ConfigError, match=r"^device_budget: automatic, but .* \(512 MiB\) "
                                          r"leaves none for models"):
        resources.device_budget(Config(workers=2), "cpu")
    with pytest.raises(ConfigError, match="^host_tier_bytes: automatic"):
        hosttier.budget(Config(workers=2, device_budget=GiB // 8))
    assert hosttier.budget(Config(workers=2, host_tier_bytes=0)) == 0  # set: taken as it is


# Loads once the file "go" beside it exists (20 s at most).
GATED_LOAD_HANDLER = GATED + """
def load(path, device):
    wait_for_go(path)

def predict(inputs):
    return {"y": inputs["x"]}
"""


def test_host_memory_relief_counts_the_models_being_unloaded_as_gone(tmp_path, monkeypatch,
                                                                     own_segments):
    # A load past its load_timeout_s is unloaded behind it: its bytes stay
    # reserved (cache.leaving) until its worker answers, once the load is
    # over. Host memory read past host_memory_watermark meanwhile, by less
    # than those bytes, took the least recently used model all the same:
    # evicted for memory that was already on its way back. Once the unload
    # is answered, a reading still over takes it. (A container's memory,
    # read from a cgroup tree as the kernel lays it out.)
    limit, watermark, going = 4 * GiB, 0.5, 64 << 20
    group = tree(tmp_path, "0::/\n", v2_group(limit=str(limit), current=GiB, cache=0),
                 monkeypatch)
    repo = tmp_path / "repo"
    write_handler(repo, "quick", "def load(path, device):\n    pass\n\n"
                  "def predict(inputs):\n    return {'y': inputs['x']}\n", "bytes = 1048576\n")
    gated = write_handler(repo, "gated", GATED_LOAD_HANDLER, f"bytes = {going}\n")
    quick = ("quick", 1)

    async def turns_after(worker, t_ns: int) -> None:
        """Until a monitor turn after `t_ns`, and the next: the first's
        relief has chosen what it evicts."""
        await until(lambda: worker._sampled[1] > t_ns, 10, "a monitor turn")
        first = worker._sampled[1]
        await until(lambda: worker._sampled[1] > first, 10, "the next monitor turn")

    async def main():
        async with Engine(Config(repo=str(repo), workers=1, device="cpu", device_budget=GiB,
                                 host_tier_bytes=0, monitor_interval_s=0.1, load_timeout_s=1.0,
                                 host_memory_watermark=watermark)) as engine:
            worker = engine.pool.workers[0]
            await engine.infer("quick", {"x": np.ones(1, np.float32)})
            try:
                with pytest.raises((LoadFailed, Timeout)):
                    await engine.load("gated")
                await until(lambda: engine.cache.leaving(0) == going, 10,
                            "gated's unload, behind its load")
                (group / "memory.current").write_text(str(int(limit * watermark) + (1 << 20)))
                await turns_after(worker, time.monotonic_ns())
                assert engine.model_row(quick)["state"] == "resident"
            finally:
                (gated / "go").write_text("")
            await until(lambda: engine.cache.leaving(0) == 0, 10, "gated's unload")
            await until(lambda: engine.model_row(quick)["state"] == "on storage", 10,
                        "quick's eviction, the memory still over")
            return engine.model_row(quick)

    row = run(main(), timeout=60)
    assert row["evictions_by_reason"] == {"host_memory": 1}, row


def _memory_controller() -> Path | None:
    """The folder of this process's memory group where a child can be made
    in it, or None."""
    paths = cgroup._paths()
    if os.geteuid() != 0:
        return None
    for mount, path, marker in ((cgroup.ROOT, paths.get(""), "memory.max"),
                                (os.path.join(cgroup.ROOT, "memory"), paths.get("memory"),
                                 "memory.limit_in_bytes")):
        if path is None:
            continue
        folder = Path(mount) / path.lstrip("/")
        if (folder / "cgroup.procs").exists() and os.access(folder, os.W_OK) and \
                (marker != "memory.max" or "memory" in (
                    folder / "cgroup.subtree_control").read_text()):
            return folder
    return None


@pytest.fixture
def memory_group():
    """A child memory cgroup of this process's, limited to 3 GiB; removed
    after the test."""
    parent = _memory_controller()
    if parent is None:
        pytest.skip("no memory cgroup to make here (needs root and a writable controller)")
    group = parent / f"mmengine-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    v2 = (group / "memory.max").exists()
    (group / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(3 * GiB))
    yield group
    for _ in range(50):  # its processes must be gone before it can be removed
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def test_a_server_in_a_container_sizes_itself_by_the_containers_memory(
        tmp_path, memory_group):
    if psutil.virtual_memory().total <= 3 * GiB:
        pytest.skip("the machine has no more memory than the group's limit")
    repo = tmp_path / "repo"
    demo.write_mlp(repo / "m", "safetensors", 4, 4, 4)
    procs = str(memory_group / "cgroup.procs")

    def join() -> None:  # in the child, before exec: its workers follow
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    server = Server("--repo", str(repo), "--workers", "1", "--tcp-port", "0",
                    "--http-port", "-1", preexec_fn=join)
    try:
        m = server.wait_for(r"serving .* on tcp://(\S+):(\d+)", 60)
        with Client(f"{m.group(1)}:{m.group(2)}") as c:
            c.infer("m", {"x": np.ones((1, 4), np.float32)})
            stats = c.stats()
        left = 3 * GiB - resources.own_memory(Config(), 1)
        assert stats["workers"][0]["budget_bytes"] == left // 2
        assert stats["host_tier"]["budget_bytes"] == left // 4
    finally:
        server.stop()
