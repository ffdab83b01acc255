"""The host tier: evicted models demoted to shared memory and loaded back
from it, on real workers; the staging pipeline's logic on CPU."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmengine import demo, shm, staging
from mmengine.backends import safetensors
from mmengine.config import Config
from mmengine.engine import Engine
from mmengine.errors import LoadFailed
from tests.conftest import ROOT, Server, environ, live_pids, run, until

DIMS = (64, 256, 16)   # 83,008 bytes of weights per model
X = {"x": np.random.default_rng(0).standard_normal((3, DIMS[0]), dtype=np.float32)}


def repo(tmp_path, n: int = 3):
    for i in range(n):
        demo.write_mlp(tmp_path / f"m{i}", "safetensors", *DIMS, seed=i)
    return tmp_path


def expected(i: int) -> np.ndarray:
    return demo.reference(X["x"], *DIMS, seed=i)


def host_segments(pid: int | None = None) -> set[str]:
    prefix = f"{shm.PREFIX}{pid or os.getpid()}-host-"
    return {s for s in shm.list_segments() if s.startswith(prefix)}


def row(engine: Engine, name: str) -> dict:
    return next(r for r in engine.stats()["models"] if r["name"] == name)


async def settle(engine: Engine, name: str, state: str, timeout: float = 10.0) -> dict:
    """The model's row once it reaches `state` (a publish runs after its load answers)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while row(engine, name)["state"] != state or (
            state == "resident" and not row(engine, name)["host_bytes"]):
        assert loop.time() < deadline, row(engine, name)
        await asyncio.sleep(0.02)
    return row(engine, name)


def config(root, **changes) -> Config:
    # One worker whose budget holds one model: every new load evicts the last.
    return Config(repo=str(root), workers=1, device_budget=100_000, **changes)


def test_a_module_whose_state_holds_no_tensor_stays_out_of_the_host_tier():
    # An _extra_state (or a quantized module's packed dtype) in its state
    # dict raised AttributeError asking its layout: the worker's LOAD
    # answered LoadFailed, though the model was loaded and stayed resident,
    # its bytes counted nowhere.
    class Scaled(torch.nn.Linear):
        def get_extra_state(self):
            return {"scale": 2}

        def set_extra_state(self, state):
            pass

    with pytest.raises(LoadFailed, match="no tensor"):
        safetensors.host_tensors(Scaled(2, 2), "m")


def test_a_copy_into_the_host_tier_is_sent_before_a_later_eviction(tmp_path, own_segments):
    # The copy (a publish) goes to the worker's loader as the load answers,
    # though a load sent before it waits there: an eviction of the model
    # that comes meanwhile is sent after it, and finds the copy made. (A
    # review found a publish that waited for loads queued ahead being
    # overtaken by the eviction: the model never got a host copy.)
    slow = demo.write_mlp(tmp_path / "slow", "safetensors", *DIMS, seed=1)
    (slow / "model.py").write_text("import time\ntime.sleep(0.8)\n"
                                   + (slow / "model.py").read_text())
    demo.write_mlp(tmp_path / "other", "safetensors", *DIMS, seed=2)
    (tmp_path / "queued" / "1").mkdir(parents=True)
    (tmp_path / "queued" / "1" / "handler.py").write_text(
        "import time\n\ndef load(path, device):\n    time.sleep(1.5)\n\n"
        "def predict(inputs):\n    return {'y': inputs['x']}\n")
    (tmp_path / "queued" / "1" / "model.toml").write_text("bytes = 1000\n")

    async def main():
        async with Engine(config(tmp_path, host_tier_bytes=64 << 20)) as engine:
            await engine.load("other")
            await engine.unload("other")  # the worker's first imports, paid
            loading = asyncio.ensure_future(engine.load("slow"))
            await asyncio.sleep(0.3)
            queued = asyncio.ensure_future(engine.load("queued"))  # behind slow's load
            await loading
            await engine.load("other")  # evicts slow, whose copy is queued behind "queued"
            await queued
            return await settle(engine, "slow", "in host memory")

    slow_row = run(main(), timeout=60)
    assert slow_row["host_bytes"] > 0 and not slow_row["last_error"]


def test_evicted_models_are_demoted_and_load_back_from_shared_memory(tmp_path, own_segments):
    root = repo(tmp_path)

    async def main():
        async with Engine(config(root)) as engine:
            y = await engine.infer("m0", X)
            np.testing.assert_allclose(y["y"], expected(0), rtol=1e-5, atol=1e-6)
            first = await settle(engine, "m0", "resident")
            assert first["host_bytes"] >= first["bytes"] > 0
            assert len(host_segments()) == 1

            await engine.infer("m1", X)  # evicts m0: demoted, not dropped
            demoted = row(engine, "m0")
            assert demoted["state"] == "in host memory"
            assert demoted["bytes"] == 0 and demoted["host_bytes"] == first["host_bytes"]

            for _ in range(3):  # back and forth: each reload maps the host copy
                for i in (0, 1):
                    y = await engine.infer(f"m{i}", X)
                    np.testing.assert_allclose(y["y"], expected(i), rtol=1e-5, atol=1e-6)
            again = row(engine, "m0")
            assert again["loads"] == 4 and again["loads_from_host"] == 3
            stats = engine.stats()
            assert stats["host_tier"]["models"] == 2
            assert stats["totals"]["loads_from_host"] == 6
            assert len(host_segments()) == 2
        assert not host_segments()  # stop() unlinks the tier

    run(main())


async def load_in_turn(engine: Engine, n: int) -> None:
    """m0 .. m<n-1> loaded one after the other onto the one worker, whose
    budget holds one: each evicts (demotes) the one before; each copy made."""
    for i in range(n):
        await engine.infer(f"m{i}", X)
        await settle(engine, f"m{i}", "resident")


def test_resident_models_are_never_dropped_and_the_lru_demoted_one_goes_first(tmp_path,
                                                                               own_segments):
    root = repo(tmp_path, 4)

    async def main():
        # A copy is 87,104 bytes (83,008 of weights, a page of header): two
        # fit under the high watermark (0.8 x 280,000), three do not, and
        # making room down to the low one (0.7) drops one. (A CPU worker's
        # books: gpu_check.sh runs this file where workers are GPUs.)
        async with Engine(config(root, host_tier_bytes=280_000, device="cpu")) as engine:
            await load_in_turn(engine, 3)
            # m2 is resident (pinned in the tier), and its CPU worker runs on
            # its copy: charged to the worker, not here, so the two demoted
            # copies fit beside it (charged to both, m0's was dropped).
            host = engine.stats()["host_tier"]
            copy = row(engine, "m2")["host_bytes"]
            assert row(engine, "m0")["state"] == row(engine, "m1")["state"] == "in host memory"
            assert copy > 0 and host["drops"] == 0
            assert host["bytes"] == 2 * copy and host["cpu_worker_bytes"] == copy
            # m3's load demotes m2, whose copy now needs room here: m0, the
            # least recently used demoted copy, is dropped for it.
            await engine.infer("m3", X)
            await settle(engine, "m3", "resident")
            assert row(engine, "m0")["state"] == "on storage"
            assert row(engine, "m1")["state"] == row(engine, "m2")["state"] == "in host memory"
            assert engine.stats()["host_tier"]["drops"] == 1
            assert engine.stats()["host_tier"]["bytes"] <= 0.8 * 280_000
            y = await engine.infer("m0", X)  # from its files again
            np.testing.assert_allclose(y["y"], expected(0), rtol=1e-5, atol=1e-6)
            assert row(engine, "m0")["loads_from_host"] == 0

    run(main())


def test_a_copy_made_from_what_the_manifest_no_longer_says_is_never_mapped(tmp_path,
                                                                           own_segments):
    # A demoted copy was found by (name, version) alone: a version whose
    # manifest changed (a remote model's files' digests, its options) went
    # on serving what its copy held (found in review).
    from safetensors.torch import save_file

    root = repo(tmp_path, 2)

    async def main():
        async with Engine(config(root, repo_scan_s=0.1)) as engine:
            await load_in_turn(engine, 2)
            assert row(engine, "m0")["state"] == "in host memory"
            # Its files replaced by other weights, and its manifest edited
            # (any of what a worker loads by: here, `trusted`).
            version = root / "m0" / "1"
            save_file(demo.mlp(*DIMS, seed=5).state_dict(), version / "model.safetensors")
            manifest = version / "model.toml"
            manifest.write_text("trusted = true\n" + manifest.read_text())
            await asyncio.sleep(0.5)  # rescans read it
            return await engine.infer("m0", X), row(engine, "m0")

    y, m0 = run(main())
    np.testing.assert_allclose(y["y"], expected(5), rtol=1e-5, atol=1e-6)
    assert m0["loads_from_host"] == 0 and m0["loads"] == 2


def test_a_reload_from_the_tier_and_an_unload_drop_no_other_copy(tmp_path, own_segments):
    # Two ways in which room made for a demoted copy dropped copies it did
    # not need to (found in review): the room made for a load of m0 from the
    # tier (m2 evicted, demoted) could drop m0's own copy, the one the load
    # was to map; and unload(), which drops its model's copy, first demoted
    # it, making room for it by dropping the least recently used other copy.
    root = repo(tmp_path, 3)

    async def main():  # (a CPU worker's books, as above)
        async with Engine(config(root, host_tier_bytes=280_000, device="cpu")) as engine:
            await load_in_turn(engine, 3)
            y = await engine.infer("m0", X)  # m2 demoted beside m1; m0 mapped
            np.testing.assert_allclose(y["y"], expected(0), rtol=1e-5, atol=1e-6)
            reload = row(engine, "m0")
            demoted = [row(engine, name)["state"] for name in ("m1", "m2")]
            drops_after_reload = engine.stats()["host_tier"]["drops"]
            await engine.unload("m0")  # its copy goes with it, and no other
            return (reload, demoted, drops_after_reload, engine.stats()["host_tier"],
                    [row(engine, name)["state"] for name in ("m0", "m1", "m2")])

    reload, demoted, drops_after_reload, host, states = run(main())
    assert reload["loads_from_host"] == 1 and reload["state"] == "resident"
    assert demoted == ["in host memory", "in host memory"] and drops_after_reload == 0
    assert states == ["on storage", "in host memory", "in host memory"]
    assert host["drops"] == 1 and host["models"] == 2 and host["cpu_worker_bytes"] == 0


def test_no_host_tier_when_it_is_off(tmp_path, own_segments):
    root = repo(tmp_path, 2)

    async def main():
        async with Engine(config(root, host_tier_bytes=0)) as engine:
            for i in (0, 1, 0):
                await engine.infer(f"m{i}", X)
            await asyncio.sleep(0.1)
            assert row(engine, "m1")["state"] == "on storage"
            assert engine.stats()["totals"]["loads_from_host"] == 0
            assert not host_segments()

    run(main())


def test_a_lost_segment_falls_back_to_the_files_and_is_published_again(tmp_path,
                                                                       own_segments):
    root = repo(tmp_path, 1)

    async def main():
        async with Engine(config(root)) as engine:
            await engine.infer("m0", X)
            await settle(engine, "m0", "resident")
            (lost,) = host_segments()
            os.unlink(os.path.join(shm.SHM_DIR, lost))
            # A fresh worker has not mapped it: its load finds it gone.
            await restart(engine)
            y = await engine.infer("m0", X)
            np.testing.assert_allclose(y["y"], expected(0), rtol=1e-5, atol=1e-6)
            again = await settle(engine, "m0", "resident")
            assert again["loads_from_host"] == 0 and again["host_bytes"] > 0
            assert lost not in host_segments() and len(host_segments()) == 1

    run(main())


async def restart(engine: Engine) -> None:
    pid = engine.pool.workers[0].pid
    os.kill(pid, signal.SIGKILL)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while engine.pool.workers[0].pid == pid or not engine.pool.workers[0].alive:
        assert loop.time() < deadline, "the worker did not come back"
        await asyncio.sleep(0.05)


def mapped(pid: int, segment: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return segment in f.read()


def test_unload_drops_the_host_copy_unless_asked_to_keep_it(tmp_path, own_segments):
    root = repo(tmp_path, 2)

    async def main():
        async with Engine(config(root)) as engine:
            for name in ("m0", "m1"):
                await engine.load(name)
                await settle(engine, name, "resident")
            segments = host_segments()
            await engine.unload("m0", keep_host=True)
            assert row(engine, "m0")["state"] == "in host memory"
            await engine.unload("m1")
            assert row(engine, "m1")["state"] == "on storage"
            assert len(host_segments()) == 1
            # The worker is told, and unmaps m1's copy: its memory is gone.
            (gone,) = segments - host_segments()
            pid = engine.pool.workers[0].pid
            for _ in range(200):
                if not mapped(pid, gone):
                    break
                await asyncio.sleep(0.02)
            assert not mapped(pid, gone)
            assert mapped(pid, next(iter(host_segments())))  # m0's stays mapped
            assert (await engine.load("m0"))["loads_from_host"] == 1

    run(main())


def test_a_killed_worker_reloads_from_the_host_tier(tmp_path, own_segments):
    root = repo(tmp_path, 1)

    async def main():
        async with Engine(config(root)) as engine:
            await engine.infer("m0", X)
            await settle(engine, "m0", "resident")
            await restart(engine)
            assert row(engine, "m0")["state"] == "in host memory"
            y = await engine.infer("m0", X)
            np.testing.assert_allclose(y["y"], expected(0), rtol=1e-5, atol=1e-6)
            assert row(engine, "m0")["loads_from_host"] == 1

    run(main())


HELD_IN_ITS_PUBLISH = '''

import os
import time


class Held(MLP):
    """Its second load_state_dict, after the one that built it, is its
    publish moving it onto its host copy, written: it says so there, and
    holds the worker."""
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.loads = 0
        self.register_load_state_dict_post_hook(Held.loaded)

    @staticmethod
    def loaded(module, incompatible_keys):
        module.loads += 1
        if module.loads == 2:
            open(os.path.join(os.path.dirname(__file__), "publishing"), "w").close()
            time.sleep(30)
'''


def test_a_worker_killed_as_it_writes_a_copy_drops_no_other(tmp_path, own_segments):
    # A CPU worker runs on the copy it writes: its reservation is charged to
    # the worker. Killed before its publish answered, the model, demoted with
    # its worker, made room in the tier for a copy that would never come:
    # m0's demoted copy was dropped for it (a review's finding).
    demo.write_mlp(tmp_path / "m0", "safetensors", *DIMS, seed=0)
    held = demo.write_mlp(tmp_path / "held", "safetensors", *DIMS, seed=1)
    (held / "model.py").write_text((held / "model.py").read_text() + HELD_IN_ITS_PUBLISH)
    manifest = held / "model.toml"
    manifest.write_text(manifest.read_text().replace('module = "MLP"', 'module = "Held"'))

    async def main():
        # Room for one copy (87,104 bytes) under the high watermark (0.8 x 150,000).
        async with Engine(config(tmp_path, host_tier_bytes=150_000, device="cpu")) as engine:
            await engine.infer("m0", X)
            await settle(engine, "m0", "resident")
            await engine.infer("held", X)  # evicts m0: demoted
            await until((held / "publishing").exists, 20, "held's publish")
            await restart(engine)
            await until(lambda: ("held", 1) not in engine.host.keys(), 10,
                        "held's reservation to go")
            return row(engine, "m0"), engine.stats()["host_tier"]

    m0, host = run(main(), timeout=60)
    assert m0["state"] == "in host memory" and m0["host_bytes"] > 0
    assert host["models"] == 1 and host["drops"] == 1  # held's reservation, abandoned


def test_a_killed_front_end_leaves_host_segments_that_the_next_start_reclaims(tmp_path):
    root = repo(tmp_path, 2)
    server = Server("--repo", str(root), "--tcp-port", "0", "--http-port", "-1",
                    "--workers", "1", "--device-budget", "100000",
                    env=environ(MMENGINE_MONITOR_INTERVAL_S="0.2"))
    try:
        port = int(server.wait_for(r"tcp://[\d.]+:(\d+)", 60).group(1))
        from mmengine import Client

        with Client(f"127.0.0.1:{port}") as client:
            for name in ("m0", "m1"):
                client.infer(name, X)
            for _ in range(200):  # bounded: the publishes answer after the loads
                if len(host_segments(server.proc.pid)) == 2:
                    break
                client.infer("m1", X)
            assert len(host_segments(server.proc.pid)) == 2
            workers = [w["pid"] for w in client.stats()["workers"]]
    finally:
        server.proc.kill()
        server.proc.wait()
    for _ in range(100):  # the workers notice their front-end is gone
        if not live_pids(workers):
            break
        asyncio.run(asyncio.sleep(0.05))
    reclaimed = set(shm.reclaim_orphans())
    assert host_segments(server.proc.pid) == set()
    assert {s for s in reclaimed if "-host-" in s}


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 10_000])
@pytest.mark.parametrize("staged", [False, True])
def test_the_stager_moves_every_byte_in_order(n, staged, tmp_path):
    # The GPU's logic (two buffers, chunks that wrap around them) on CPU
    # buffers, with a chunk far smaller than the data.
    stager = staging.Stager(torch.device("cpu"), chunk=1000, depth=2)
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    path = tmp_path / "blob"
    path.write_bytes(b"header" + data.tobytes())
    out = torch.zeros(n, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        stager.from_file(f, 6, n, out, staged=staged)
    assert np.array_equal(out.numpy(), data)
    again = torch.zeros(n, dtype=torch.uint8)
    stager.from_host(torch.from_numpy(data), again, staged=staged)
    assert np.array_equal(again.numpy(), data)
    assert stager.chunks == (2 * -(-n // 1000) if staged else 0)


NO_THREAD_FOR_A_PART = """
import os, sys, threading, torch
from mmengine import staging

start = threading.Thread.start
made = []

def start_or_fail(thread):  # as where a container's pids limit is reached
    if thread.name.startswith("mmengine-reader"):
        made.append(thread)
        if len(made) == 2:
            raise RuntimeError("can't start new thread")
    return start(thread)

threading.Thread.start = start_or_fail
out = torch.empty(48 << 20, dtype=torch.uint8)
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    staging.Readers(threads=3).read(fd, 0, out)
except RuntimeError as e:
    print("raised:", e)
print("readers left:", sum(t.is_alive() for t in made))
"""


def test_a_read_whose_part_gets_no_thread_leaves_no_reader_behind(tmp_path):
    # The parts begun kept reading into `out` after read() raised, and the
    # part whose thread failed to start was queued with no future: its
    # caller freed `out` (a staging buffer: the next chunk's) and closed
    # the file under them (a review's finding).
    path = tmp_path / "f"
    path.write_bytes(bytes(48 << 20))
    done = subprocess.run([sys.executable, "-c", NO_THREAD_FOR_A_PART, str(path)],
                          capture_output=True, text=True, timeout=60, env=environ(), cwd=ROOT)
    assert done.stdout == "raised: can't start new thread\nreaders left: 0\n", \
        (done.stdout, done.stderr)


def test_the_stager_refuses_a_file_that_ends_early(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    stager = staging.Stager(torch.device("cpu"), chunk=64)
    with open(path, "rb", buffering=0) as f, pytest.raises(ValueError, match="ends inside"):
        stager.from_file(f, 0, 200, torch.zeros(200, dtype=torch.uint8), staged=True)


@pytest.mark.parametrize("backend", ["torchscript", "export"])
def test_parsed_formats_reload_from_the_host_tier_without_a_parse(tmp_path, backend,
                                                                   own_segments):
    # Each closed model leaves its module behind, emptied; a load from the
    # host tier points it at the host copy: the artifact is not opened.
    for i in range(2):
        demo.write_mlp(tmp_path / f"m{i}", backend, *DIMS, seed=i)

    async def main():
        async with Engine(config(tmp_path)) as engine:
            await engine.infer("m0", X)
            first = await settle(engine, "m0", "resident")
            await engine.infer("m1", X)  # evicts m0
            assert row(engine, "m0")["state"] == "in host memory"
            # Garbage in place of the artifact, same inode, size and mtime: a
            # parse would fail now; the kept module does not parse.
            artifact = next((tmp_path / "m0" / "1").glob("model.pt*"))
            st = artifact.stat()
            with open(artifact, "r+b") as f:
                f.write(b"\0" * st.st_size)
            os.utime(artifact, ns=(st.st_atime_ns, st.st_mtime_ns))
            y = await engine.infer("m0", X)
            np.testing.assert_allclose(y["y"], expected(0), rtol=1e-5, atol=1e-5)
            assert row(engine, "m0")["loads_from_host"] == 1
            assert row(engine, "m0")["bytes"] == first["bytes"] == 83_008

    run(main())


_TIED = '''
import torch
from torch import nn


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64, bias=False)
        self.b = nn.Linear(64, 64, bias=False)
        self.b.weight = self.a.weight  # one tensor, two names: not laid out flat

    def forward(self, x):
        return self.b(self.a(x))
'''


def test_a_copy_stays_charged_to_the_tier_while_its_load_waits_for_room(tmp_path,
                                                                         own_segments):
    # A CPU worker runs on a model's host copy, so the copy is charged to
    # the worker once loaded. It was uncharged as soon as the load began,
    # while the load waited for room: other copies were demoted into what it
    # seemed to free, past the tier's budget (a review's finding).
    root = repo(tmp_path, 1)
    from tests.conftest import SLOW_HANDLER, write_handler
    write_handler(root, "slow", SLOW_HANDLER, "bytes = 90000\n")  # the worker's room, held

    async def main():
        async with Engine(config(root, host_tier_bytes=64 << 20, device="cpu")) as engine:
            await engine.infer("m0", X)
            await settle(engine, "m0", "resident")
            await engine.unload("m0", keep_host=True)
            copy = row(engine, "m0")["host_bytes"]
            assert engine.stats()["host_tier"]["bytes"] == copy > 0
            busy = asyncio.ensure_future(
                engine.infer("slow", {"seconds": np.array([1.5], np.float32)}))
            await until(lambda: any(r["name"] == "slow" and r["state"] == "resident"
                                    for r in engine.stats()["models"]), 20, "slow's load")
            waiting = asyncio.ensure_future(engine.infer("m0", X))  # no room till slow ends
            await asyncio.sleep(0.5)
            assert not waiting.done()
            host = engine.stats()["host_tier"]
            assert (host["bytes"], host["cpu_worker_bytes"]) == (copy, 0)
            await busy
            y = await waiting
            np.testing.assert_allclose(y["y"], expected(0), rtol=1e-5, atol=1e-6)
            host = engine.stats()["host_tier"]
            assert (host["bytes"], host["cpu_worker_bytes"]) == (0, copy)
            assert row(engine, "m0")["loads_from_host"] == 1

    run(main(), timeout=60)


def test_a_copy_charged_back_to_the_tier_after_a_failed_reservation_needs_room(own_segments):
    # A reservation that failed after its victims were demoted charged the
    # loading copy back to the tier on top of them: past its budget, and
    # no room made (a review's finding). Room is made, or the copy goes.
    from mmengine import cache as books
    from mmengine import hosttier

    config = Config(repo=".", host_tier_bytes=1000)
    tier = hosttier.HostTier(config)
    tier.size(config)
    try:
        for key, on_cpu in ((("loading", 1), False), (("victim", 1), True)):
            tier.published(key, tier.reserve(key, 600, on_cpu=on_cpu), 600, 1.0)
        tier.set_resident(("loading", 1), True, 2.0)  # its load waits for room
        tier.run_on(("loading", 1), True)  # a CPU worker's room, chosen
        tier.set_resident(("victim", 1), False, 3.0)  # evicted for it: demoted
        tier.run_on(("loading", 1), False)  # the reservation failed after all
        assert tier.book.used(books.HOST, 0) <= 0.8 * 1000
        assert tier.keys() == [("loading", 1)]  # the demoted one went for it
    finally:
        tier.clear()


MANY_TENSORS = """
import torch
from torch import nn

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.ParameterList(nn.Parameter(torch.zeros(4)) for _ in range(1000))

    def forward(self, x):
        return {"y": x}
"""


def test_a_copy_larger_than_its_reservation_makes_room_for_the_rest(tmp_path, own_segments):
    # A copy is reserved as its tensor bytes and a page of header. The
    # header of a model of 1,000 small tensors takes 16 pages: published, its
    # real size was charged without room made, and a GPU server's tier went
    # past its budget (a review's finding). A copy charged to the tier as
    # it is written (a GPU worker's) is booked here as the engine books it.
    from mmengine import cache as books
    from mmengine import hosttier
    from mmengine.worker import WorkerLogic

    version = tmp_path / "many" / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(MANY_TENSORS)
    safetensors.save_file({f"p.{i}": torch.zeros(4) for i in range(1000)},
                          version / "model.safetensors")
    (version / "model.toml").write_text(
        'backend = "safetensors"\n'
        '[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, 4]\n'
        '[[outputs]]\nname = "y"\ndtype = "float32"\nshape = [-1, 4]\n')
    config = Config(repo=str(tmp_path), host_tier_bytes=150_000)
    tier = hosttier.HostTier(config)
    tier.size(config)
    logic = WorkerLogic(config, "cpu")
    tier.on_drop = logic.forget  # as the engine tells its workers
    key, demoted = ("many", 1), ("demoted", 1)
    try:
        nbytes, _ = logic.load(*key, str(version))
        tier.published(demoted, tier.reserve(demoted, 90_000), 90_000, 1.0)
        segment = tier.reserve(key, nbytes + hosttier.HEADER_ALLOWANCE)
        assert tier.keys() == [demoted, key]  # the reservation fits beside it
        size = logic.publish(*key, segment)
        assert size > nbytes + hosttier.HEADER_ALLOWANCE + 50_000
        tier.published(key, segment, size, 2.0)
        assert tier.book.used(books.HOST, 0) <= tier.budget()
        assert tier.keys() == [key] and tier.segment(key) == segment
    finally:
        logic.close(key, logic.unload(*key))
        tier.clear()


FLAKY_WARMUP = """
import os
import torch
from torch import nn

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.register_buffer("count", torch.zeros(1024))

    def forward(self, x):
        self.count += 1  # a model that writes its own tensors, as its warm-up runs too
        if os.path.exists(os.path.join(os.path.dirname(__file__), "fail")):
            raise RuntimeError("a flaky warm-up")
        return {"y": x * self.w}
"""


def test_a_failed_load_from_the_host_tier_gives_back_what_it_wrote(tmp_path, own_segments):
    # Only a loaded model's close gave the pages it wrote back to the copy:
    # a load that failed after its warm-up wrote left them, and the next
    # load of the copy began from the failed one's state (a review's finding).
    from mmengine.worker import WorkerLogic

    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(FLAKY_WARMUP)
    safetensors.save_file({"w": torch.ones(4), "count": torch.zeros(1024)},
                          version / "model.safetensors")
    (version / "model.toml").write_text(
        'backend = "safetensors"\nwarmup = true\n'
        '[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, 4]\n'
        '[[outputs]]\nname = "y"\ndtype = "float32"\nshape = [-1, 4]\n')
    logic = WorkerLogic(Config(repo=str(tmp_path)), "cpu")
    segment = shm.new_name("host")
    key = ("m", 1)

    def load_from_the_copy() -> float:
        assert logic.load("m", 1, str(version), host=segment)[1] == "host"
        count = float(logic.models[key].module.count[0])
        logic.close(key, logic.unload("m", 1))
        return count

    try:
        logic.load("m", 1, str(version))
        logic.publish("m", 1, segment)
        logic.close(key, logic.unload("m", 1))
        first = load_from_the_copy()
        (version / "fail").touch()
        with pytest.raises(LoadFailed, match="flaky"):
            logic.load("m", 1, str(version), host=segment)
        (version / "fail").unlink()
        assert load_from_the_copy() == first
    finally:
        safetensors.HOST_MAPS.forget(segment)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(shm.SHM_DIR, segment))


def test_a_model_the_host_tier_cannot_hold_takes_no_room_from_the_others(tmp_path,
                                                                        own_segments):
    import importlib.util

    demo.write_mlp(tmp_path / "m0", "safetensors", *DIMS, seed=0)
    (tmp_path / "tied.py").write_text(_TIED)
    spec = importlib.util.spec_from_file_location("tied", tmp_path / "tied.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    version = tmp_path / "m1" / "1"
    version.mkdir(parents=True)
    torch.jit.script(module.Tied()).save(str(version / "model.pt"))  # as demo.py does

    async def main():
        # Room in the host tier for m0's copy and no other.
        async with Engine(config(tmp_path, host_tier_bytes=100_000)) as engine:
            await engine.infer("m0", X)
            await settle(engine, "m0", "resident")
            for _ in range(3):  # each load of m1 from its file evicts m0 from the worker
                await engine.infer("m1", {"x": np.ones((1, 64), np.float32)})
                await engine.infer("m0", X)
                await asyncio.sleep(0.1)  # time for a publish, were one started
            assert engine.stats()["host_tier"]["drops"] == 0
            assert engine.stats()["host_tier"]["models"] == 1
            assert row(engine, "m0")["loads_from_host"] == 3
            assert row(engine, "m1")["host_bytes"] == 0

    run(main())


def test_a_frozen_torchscript_model_stays_out_of_the_host_tier(tmp_path, own_segments):
    # torch.jit.freeze makes a module's weights constants of its graph: its
    # state dict is empty. Taken for a model the tier can hold, it kept a
    # copy of a page there (a GPU worker's made room for its estimate,
    # dropping others), and its loads "from" that copy parsed its file,
    # counted as host loads (a review's finding). (A CPU worker: a frozen
    # module's constants stay where they were saved, not on a GPU.)
    demo.write_mlp(tmp_path / "m0", "safetensors", *DIMS, seed=0)
    artifact = str(demo.write_mlp(tmp_path / "frozen", "torchscript", *DIMS, seed=1)
                   / "model.pt")
    torch.jit.freeze(torch.jit.load(artifact).eval()).save(artifact)

    async def main():
        async with Engine(config(tmp_path, host_tier_bytes=64 << 20, device="cpu")) as engine:
            await engine.infer("m0", X)
            await settle(engine, "m0", "resident")
            for _ in range(2):  # each evicts the other from the worker
                y = await engine.infer("frozen", X)
                np.testing.assert_allclose(y["y"], expected(1), rtol=1e-5, atol=1e-5)
                await asyncio.sleep(0.1)  # time for a publish, were one started
                await engine.infer("m0", X)
            return row(engine, "frozen"), row(engine, "m0"), engine.stats()["host_tier"]

    frozen, m0, host = run(main())
    assert frozen["loads"] == 2 and frozen["loads_from_host"] == 0
    assert frozen["host_bytes"] == 0 and frozen["state"] == "on storage"
    assert m0["loads_from_host"] == 2
    assert host["models"] == 1


def test_a_safetensors_model_of_no_tensors_stays_out_of_the_host_tier(tmp_path, own_segments):
    # Session 63's rule (no tensor bytes: no host copy) was asked of other
    # modules only: a safetensors model whose file holds no tensor (its
    # model.py computes from its inputs alone) was published, a segment of
    # a header and no data, and its loads "from" it imported its model.py
    # all the same, counted as host loads.
    version = tmp_path / "double" / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(
        "import torch\n\nclass Model(torch.nn.Module):\n"
        "    def forward(self, x):\n        return {'y': x * 2}\n")
    safetensors.save_file({}, version / "model.safetensors")

    async def main():
        async with Engine(config(tmp_path, host_tier_bytes=64 << 20, device="cpu")) as engine:
            for _ in range(2):
                y = await engine.infer("double", X)
                np.testing.assert_array_equal(y["y"], X["x"] * 2)
                await asyncio.sleep(0.2)  # time for a publish, were one started
                await engine.unload("double", keep_host=True)  # as an eviction demotes it
            return row(engine, "double"), engine.stats()["host_tier"]

    double, host = run(main())
    assert double["loads"] == 2 and double["loads_from_host"] == 0
    assert double["host_bytes"] == 0 and double["state"] == "on storage"
    assert host["models"] == 0 and not host_segments()


EMBEDDER_WITHOUT_STOP = '''
import asyncio, sys
import numpy as np
from mmengine.config import Config
from mmengine.engine import Engine

async def main():
    engine = await Engine(Config(repo=sys.argv[1], workers=1, host_tier_bytes=64 << 20)).start()
    await engine.infer("m0", {"x": np.ones((1, int(sys.argv[2])), np.float32)})
    for _ in range(200):  # bounded: the copy is made after the load answers
        if engine.stats()["host_tier"]["models"] and engine.host.segment(("m0", 1)):
            break
        await asyncio.sleep(0.02)
    print(engine.host.segment(("m0", 1)), flush=True)
    # Returns without engine.stop(), as an embedder's script may.

asyncio.run(main())
'''


def test_an_embedder_that_never_stops_leaves_no_host_copies(tmp_path):
    import subprocess
    import sys

    root = repo(tmp_path, 1)
    script = tmp_path / "embed.py"
    script.write_text(EMBEDDER_WITHOUT_STOP)
    done = subprocess.run([sys.executable, str(script), str(root), str(DIMS[0])], capture_output=True,
                          text=True, timeout=120, env=environ())
    assert done.returncode == 0, done.stderr
    segment = done.stdout.split()[-1]
    assert "-host-" in segment, done.stdout
    assert not os.path.exists(os.path.join(shm.SHM_DIR, segment))


def test_a_demoted_copy_is_ordered_by_its_last_use_not_its_load(tmp_path, own_segments):
    # m0, loaded first and used until its demotion, went before m1, demoted
    # long before and unused since (a review's finding).
    root = repo(tmp_path, 3)

    async def main():
        async with Engine(config(root, host_tier_bytes=280_000)) as engine:
            await load_in_turn(engine, 2)  # m1 resident, m0 demoted
            await engine.unload("m1", keep_host=True)  # m1 demoted, unused from here on
            for _ in range(3):
                await engine.infer("m0", X)
            await settle(engine, "m0", "resident")
            await engine.unload("m0", keep_host=True)  # demoted just now: the last to go
            await engine.infer("m2", X)
            await settle(engine, "m2", "resident")
            await engine.unload("m2", keep_host=True)  # room for it: one copy goes
            assert row(engine, "m1")["state"] == "on storage"
            assert row(engine, "m0")["state"] == row(engine, "m2")["state"] == "in host memory"

    run(main())


COUNTING_MODEL = '''
import torch

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(4096))

    def forward(self, x):
        self.calls[0] += 1  # a model that writes its own tensors
        return x[:, :1] * 0 + self.calls[0]
'''


def test_a_model_that_writes_its_tensors_runs_on_its_host_copy(tmp_path, own_segments):
    # Its worker ran it on a read-only mapping of the copy: SIGSEGV at its
    # first write, twice, then backed off (a review's finding). Its writes
    # are its own now, and a reload maps the copy as it was made.
    from mmengine.backends.safetensors import save_file

    version = tmp_path / "counts" / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(COUNTING_MODEL)
    save_file({"calls": torch.zeros(4096)}, version / "model.safetensors")
    x = {"x": np.ones((1, 4), np.float32)}

    async def main():
        async with Engine(config(tmp_path)) as engine:
            await engine.infer("counts", x)
            await settle(engine, "counts", "resident")  # on its copy from here on
            calls = [float((await engine.infer("counts", x))["output"][0, 0])
                     for _ in range(3)]
            assert calls == sorted(calls) and len(set(calls)) == 3
            firsts = []
            for _ in range(2):  # demoted, then back on the same worker's mapping
                await engine.unload("counts", keep_host=True)
                firsts.append(float((await engine.infer("counts", x))["output"][0, 0]))
            assert firsts[0] == firsts[1]  # the copy's count, not the last run's
            assert row(engine, "counts")["loads_from_host"] == 2
            assert engine.stats()["totals"]["worker_restarts"] == 0

    run(main())


@pytest.mark.skipif(safetensors._guard is None, reason="the write guard is not built")
def test_a_guarded_mapping_is_walked_only_after_a_write(own_segments):
    """A CPU worker's mapping of a copy stays read-only until a model
    writes to it (csrc/guard.h): the write goes through, to a page of its
    own, and is noted; an eviction gives it back and makes the mapping
    read-only again. One nobody wrote to is not walked at all."""
    segment = f"{shm.PREFIX}{os.getpid()}-host-guarded"
    weights = torch.arange(4096, dtype=torch.float32)
    entries = [("w", "F32", [4096], 0, weights.numel() * 4)]
    safetensors._write_segment(segment, entries, [(0, weights.view(torch.uint8))])
    maps = safetensors.HostMaps()
    try:
        flat, _, _ = maps.get(segment, "guarded", torch.device("cpu"))
        w = flat.view(torch.float32)
        guard = maps._guards[segment]
        assert not safetensors._guard.written(guard)
        maps.revert(segment)  # nothing written: nothing to give back
        assert torch.equal(w, weights)

        w[5] = -1.0  # faults once, then runs on a copy of its page
        w[4000] = -2.0
        assert safetensors._guard.written(guard) and w[5] == -1.0 and w[4000] == -2.0
        again, _ = safetensors._map_host(segment, "another worker's")
        assert torch.equal(again.view(torch.float32), weights)  # the segment is as it was
        del again

        maps.revert(segment)
        assert torch.equal(w, weights) and not safetensors._guard.written(guard)
        w[7] = -3.0  # read-only again: noted anew
        assert safetensors._guard.written(guard)
        maps.revert(segment)
        assert torch.equal(w, weights)
        del w, flat
    finally:
        maps.forget(segment)
        os.unlink(os.path.join(shm.SHM_DIR, segment))
    assert segment not in maps._guards


@pytest.mark.skipif(safetensors._guard is None, reason="the write guard is not built")
def test_a_fault_outside_every_guard_still_kills_the_process():
    # The handler passes what is not its own to the one before it: here
    # the default, and the process dies of SIGSEGV as it would have.
    code = """if True:
        import ctypes, mmap
        from mmengine import _guard
        ro = mmap.mmap(-1, 2 * mmap.PAGESIZE, prot=mmap.PROT_READ)
        import numpy as np
        a = np.frombuffer(ro, np.uint8)
        start = a.__array_interface__["data"][0]
        assert _guard.add(start, mmap.PAGESIZE) is not None  # the first page only
        (ctypes.c_uint8 * 1).from_address(start)[0] = 1  # guarded: goes through
        print("guarded write", flush=True)
        (ctypes.c_uint8 * 1).from_address(start + mmap.PAGESIZE)[0] = 1
        print("unreachable", flush=True)
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == -signal.SIGSEGV, r.stderr
    assert r.stdout == "guarded write\n"


def test_a_sigsegv_sent_to_a_guarded_process_kills_it_as_it_would_have():
    # The handler took a sent SIGSEGV (no fault, no address of its own) as
    # a fault outside every guard: it put the default handler back and
    # returned, so the process lived on, and its next guarded write killed it.
    code = """if True:
        import ctypes, mmap, os, signal
        from mmengine import _guard
        ro = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ)
        import numpy as np
        start = np.frombuffer(ro, np.uint8).__array_interface__["data"][0]
        assert _guard.add(start, mmap.PAGESIZE) is not None
        (ctypes.c_uint8 * 1).from_address(start)[0] = 1  # guarded: goes through
        print("guarded write", flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)
        print("unreachable", flush=True)
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "guarded write\n"


class MatMul(torch.nn.Module):
    """Reads its weight in place, as mm does (a Linear reads a view)."""

    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((n, n), 1.0 / n), requires_grad=False)

    def forward(self, x):
        return torch.mm(x, self.w)


def test_a_model_moved_onto_its_host_copy_as_it_runs_is_not_freed_under_it(tmp_path,
                                                                          own_segments):
    # Published to the host tier as its first requests ran (the loader
    # thread, right after the load's answer), a TorchScript model's weights
    # were moved onto the host copy's mapping and their own memory freed
    # while a call's kernel read it: the worker died of SIGSEGV (a review).
    path = tmp_path / "mm" / "1"
    path.mkdir(parents=True)
    torch.jit.script(MatMul(2048)).save(str(path / "model.pt"))
    x = np.ones((512, 2048), np.float32)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            answers = await asyncio.gather(*(engine.infer("mm", {"x": x}) for _ in range(6)))
            await until(lambda: engine.model_row(("mm", 1))["host_bytes"], 20, "the copy")
            return answers, engine.stats()["totals"]

    answers, totals = run(main())
    assert totals["worker_restarts"] == 0
    for answer in answers:
        np.testing.assert_allclose(answer["output"], 1.0, rtol=1e-4)
