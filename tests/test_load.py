"""The safetensors load path: one arena per model, recycled arenas, kept skeletons."""
from __future__ import annotations

import gc
import json
import os
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import environ
from mmengine import demo, staging
from mmengine.backends import load_model
from mmengine.backends import safetensors as st
from mmengine.errors import LoadFailed
from mmengine.storage import Repository

DIMS = (64, 256, 16)


@pytest.fixture(autouse=True)
def fresh():
    st.clear_skeletons()
    yield
    gc.collect()
    st.clear_skeletons()


def load(root, name="m", version=None):
    return load_model(Repository(root).resolve(name, version), "cpu")


def x(batch: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, DIMS[0]), dtype=np.float32)


def check(model, seed: int) -> None:
    np.testing.assert_allclose(model.predict({"x": x()})["y"], demo.reference(x(), *DIMS, seed),
                               rtol=1e-5, atol=1e-6)


def storages(model) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in model.module.state_dict().values()}


def test_weights_are_views_of_one_arena(tmp_path):
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=3)
    model = load(tmp_path)
    check(model, 3)
    assert len(storages(model)) == 1
    weights = list(model.module.state_dict().values())
    base = weights[0].untyped_storage()
    assert model.nbytes == base.nbytes() == sum(w.nbytes for w in weights)
    # Laid out back to back in file order, with no per-tensor copies.
    ptrs = sorted(w.data_ptr() for w in weights)
    assert ptrs[0] == base.data_ptr()
    model.close()


def test_a_reload_builds_nothing_and_answers_right(tmp_path):
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=5)
    first = load(tmp_path)
    cls, modules = type(first.module), len(sys.modules)
    first.close()
    assert len(st._skeletons) == 1
    module, _, slots = next(iter(st._skeletons.values()))
    assert slots is not None  # its tensors go straight to where they live
    for _ in range(3):
        again = load(tmp_path)
        assert type(again.module) is cls          # the same skeleton, no new import
        assert len(sys.modules) == modules
        assert not st._skeletons                  # lent out while resident
        check(again, 5)
        assert not any(t.is_meta for t in again.module.state_dict().values())
        again.close()
        assert all(t.is_meta for t in module.state_dict().values())


HOOKED_MODEL = '''
import torch
from torch import nn

CALLS = []


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self._register_load_state_dict_pre_hook(self._scale)

    def _scale(self, state_dict, prefix, *args):
        CALLS.append(prefix)
        state_dict[prefix + "fc.weight"] = state_dict[prefix + "fc.weight"] * 2

    def forward(self, x):
        return self.fc(x)
'''


def test_a_module_that_hooks_its_loading_is_loaded_by_torch_each_time(tmp_path):
    """A load_state_dict hook runs at every load, a reload from the kept
    skeleton included: such a module has no slots."""
    path = tmp_path / "h" / "1"
    path.mkdir(parents=True)
    (path / "model.py").write_text(HOOKED_MODEL)
    st.save_file({"fc.weight": torch.ones(2, 4), "fc.bias": torch.zeros(2)},
                 path / "model.safetensors")
    (path / "model.toml").write_text('backend = "safetensors"\n')
    for n in (1, 2, 3):
        model = load(tmp_path, "h")
        calls = sys.modules[type(model.module).__module__].CALLS
        assert len(calls) == n
        out = model.predict({"x": np.ones((1, 4), dtype=np.float32)})
        np.testing.assert_allclose(out["output"], [[8.0, 8.0]])  # 4 ones times weights of 2
        model.close()
        assert next(iter(st._skeletons.values()))[2] is None


def test_two_resident_copies_do_not_share_a_skeleton(tmp_path):
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    load(tmp_path).close()
    a, b = load(tmp_path), load(tmp_path)
    assert a.module is not b.module
    assert storages(a).isdisjoint(storages(b))
    check(a, 1)
    check(b, 1)
    a.close()
    b.close()
    assert len(st._skeletons) == 1


def test_changed_code_or_weights_are_seen(tmp_path):
    path = demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    load(tmp_path).close()
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=2)  # same model.py bytes
    model = load(tmp_path)
    check(model, 2)
    model.close()
    (path / "model.py").write_text((path / "model.py").read_text() + "\nCHANGED = 1\n")
    model = load(tmp_path)
    assert sys.modules[type(model.module).__module__].CHANGED == 1
    check(model, 2)
    model.close()


def test_an_evicted_models_memory_is_not_referenced(tmp_path):
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=4)
    model = load(tmp_path)
    nbytes = model.nbytes
    gc.collect()
    before = staging.POOL.free_bytes()
    model.close()
    del model
    # The arena came back: nothing (the kept skeleton included) views it.
    assert staging.POOL.free_bytes() >= before + nbytes
    module, _, _ = next(iter(st._skeletons.values()))
    assert all(t.is_meta for t in module.state_dict().values())
    hits = staging.POOL.hits
    model = load(tmp_path)  # and the next load of that size reuses it
    assert staging.POOL.hits == hits + 1
    check(model, 4)
    model.close()


def test_the_pool_never_hands_out_referenced_memory():
    pool = staging.ArenaPool()
    a = pool.take(3 << 20)
    view = a[1024:2048]
    del a
    gc.collect()
    assert pool.free_bytes() == 0  # a view still holds it
    b = pool.take(3 << 20)
    assert b.data_ptr() != view.data_ptr() - 1024
    del view
    gc.collect()
    assert pool.free_bytes() > 0
    c = pool.take(3 << 20)
    assert pool.hits == 1 and pool.free_bytes() == 0
    del b, c
    pool.clear()


def test_the_pool_keeps_at_most_its_limit():
    pool = staging.ArenaPool(limit=4 << 20)
    arenas = [pool.take(3 << 20) for _ in range(3)]
    del arenas
    gc.collect()
    assert 0 < pool.free_bytes() <= 4 << 20
    pool.clear()
    assert pool.free_bytes() == 0


@pytest.mark.parametrize("cut", [8, 100, -1])
def test_a_truncated_file_is_load_failed(tmp_path, cut):
    path = demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=0)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:cut])
    with pytest.raises(LoadFailed, match="not a valid safetensors file"):
        load(tmp_path)


def test_a_corrupt_file_is_load_failed_even_after_a_good_load(tmp_path):
    path = demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=0)
    load(tmp_path).close()
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xfe{["
    weights.write_bytes(bytes(data))
    with pytest.raises(LoadFailed):
        load(tmp_path)
    # A file whose tensors do not fit the kept skeleton: it is dropped, and
    # the module built afresh does not fit them either.
    assert st._skeletons
    st.save_file({"fc1.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(LoadFailed, match="fc1.weight"):
        load(tmp_path)
    assert not st._skeletons
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=0)
    model = load(tmp_path)
    check(model, 0)
    model.close()


def test_unaligned_tensors_are_read_right(tmp_path):
    # The format allows a tensor at any offset; a view of an odd offset as
    # float32 is impossible, so that one tensor is copied out.
    values = np.arange(6, dtype=np.float32)
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1, 25]}}
    encoded = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\x07" + values.tobytes())
    tensors = st.load_file(path)
    assert tensors["a"].tolist() == [7]
    np.testing.assert_array_equal(tensors["b"].numpy(), values.reshape(2, 3))


def test_an_empty_file_loads():
    pool = staging.ArenaPool()
    assert pool.take(0).numel() == 0


# -- loads in flight ---------------------------------------------------------------

_LOGGING_HANDLER = '''
import os, time

def load(path, device):
    with open(os.environ["MMENGINE_TEST_LOAD_LOG"], "a") as f:
        f.write(f"start {time.monotonic()}\\n")
    time.sleep(1.5)  # longer than the two workers' first imports can differ by
    with open(os.environ["MMENGINE_TEST_LOAD_LOG"], "a") as f:
        f.write(f"end {time.monotonic()}\\n")

def predict(inputs):
    return {"y": inputs["x"]}
'''


@pytest.mark.parametrize("limit, overlap", [(1, False), (0, True)])
def test_loads_in_flight_are_bounded_by_bytes(tmp_path, monkeypatch, limit, overlap):
    import asyncio

    from mmengine.config import Config
    from mmengine.engine import Engine
    from tests.conftest import run

    log = tmp_path / "loads.log"
    monkeypatch.setenv("MMENGINE_TEST_LOAD_LOG", str(log))  # the workers inherit it
    for name in ("a", "b"):
        (tmp_path / "repo" / name / "1").mkdir(parents=True)
        (tmp_path / "repo" / name / "1" / "handler.py").write_text(_LOGGING_HANDLER)

    async def main():
        # Two workers: nothing but the gate keeps the two loads apart.
        config = Config(repo=str(tmp_path / "repo"), workers=2, load_bytes_in_flight=limit)
        async with Engine(config) as engine:
            await asyncio.gather(engine.load("a"), engine.load("b"))

    run(main())
    events = [line.split() for line in log.read_text().splitlines()]
    assert [kind for kind, _ in events].count("start") == 2
    # Bounded: the second load starts after the first ended. Unbounded: both
    # start before either ends.
    assert (events[1][0] == "start") == overlap, events


# Takes the seconds its model.toml's `seconds` says to load (0 if none).
_PACED_HANDLER = '''
import os, time

def load(path, device):
    seconds = os.path.join(path, "seconds")
    time.sleep(float(open(seconds).read()) if os.path.exists(seconds) else 0)

def predict(inputs):
    return {"y": inputs["x"]}
'''


def _paced(root, name: str, nbytes: int, seconds: float) -> None:
    d = root / name / "1"
    d.mkdir(parents=True)
    (d / "handler.py").write_text(_PACED_HANDLER)
    (d / "model.toml").write_text(f"bytes = {nbytes}\n")
    (d / "seconds").write_text(str(seconds))


def test_a_large_load_is_let_in_while_small_loads_keep_coming(tmp_path):
    # Three workers and a gate of 10 units: a large load (8) waits while
    # small ones (3 each, 0.45 s) hold it, and each small one that came
    # after it waits behind it, though it would fit. Let past it, they
    # overlapped on the other two workers without end, and the large one
    # waited for the last of them.
    import asyncio

    from mmengine.config import Config
    from mmengine.engine import Engine
    from tests.conftest import run, until

    unit = 1 << 20
    root = tmp_path / "repo"
    for i in range(3):
        _paced(root, f"warm{i}", unit, 0)
    _paced(root, "large", 8 * unit, 0)
    smalls = [f"small{i:02d}" for i in range(24)]
    for name in smalls:
        _paced(root, name, 3 * unit, 0.45)

    async def main():
        config = Config(repo=str(root), workers=3, load_bytes_in_flight=10 * unit,
                        device_budget=1 << 30, load_timeout_s=60)
        async with Engine(config) as engine:
            # Each worker's first imports, before the clock starts.
            await asyncio.gather(*(engine.load(f"warm{i}") for i in range(3)))
            loop = asyncio.get_running_loop()
            t_large = None

            async def traffic():  # a small cold model every 0.15 s, for 3.6 s
                tasks = []
                for name in smalls:
                    tasks.append(asyncio.ensure_future(engine.load(name)))
                    await asyncio.sleep(0.15)
                await asyncio.gather(*tasks)
                return loop.time()

            stream = asyncio.ensure_future(traffic())
            await until(lambda: engine._load_gate.held, 10, "a small load in the gate")
            t0 = loop.time()
            await engine.load("large")
            t_large = loop.time() - t0
            t_end = await stream - t0
            return t_large, t_end

    t_large, t_end = run(main(), timeout=60)
    # The large load waited for the loads in the gate when it came (0.45 s
    # each), not for the stream to end.
    assert t_large < 2.0 < t_end - 0.5, (t_large, t_end)


def test_the_byte_gate_lets_loads_in_in_their_order_and_passes_over_those_that_leave():
    import asyncio

    from mmengine.engine import _ByteGate
    from tests.conftest import run

    async def main():
        gate = _ByteGate(10)
        await gate.acquire(3)
        large = asyncio.ensure_future(gate.acquire(8))
        small = asyncio.ensure_future(gate.acquire(3))  # it fits, but came after
        await asyncio.sleep(0)
        assert not large.done() and not small.done() and gate.held == 3
        gate.release(3)
        await large  # the gate emptied: the large one in, the small one behind it
        await asyncio.sleep(0)
        assert not small.done() and gate.held == 8
        # One that gives up in the line holds up nobody behind it.
        huge = asyncio.ensure_future(gate.acquire(20))  # more than the bound: alone
        later = asyncio.ensure_future(gate.acquire(1))
        await asyncio.sleep(0)
        small.cancel()
        huge.cancel()
        await asyncio.gather(small, huge, return_exceptions=True)
        await later
        assert gate.held == 9
        # One let in, then cancelled before it ran, gives its bytes back.
        last = asyncio.ensure_future(gate.acquire(5))
        await asyncio.sleep(0)
        gate.release(8)
        last.cancel()
        await asyncio.gather(last, return_exceptions=True)
        assert gate.held == 1 and not gate._waiters
        gate.release(1)
        await gate.acquire(20)  # alone, at once
        assert gate.held == 20

    run(main(), timeout=10)


@pytest.fixture(params=["native", "python"])
def twin(request, monkeypatch):
    """The readers' C twin (csrc/reads.pyx), or their Python one."""
    if request.param == "python":
        monkeypatch.setattr(staging, "_native", None)
    elif staging._native is None:
        pytest.skip("mmengine._reads is not built")
    return request.param


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 5, 3 * 4096 + 17, 50_000])
def test_parallel_reads_put_every_byte_in_its_place(tmp_path, twin, threads, n):
    readers = staging.Readers(threads)
    readers.MIN_PART = 4096  # parts of a few pages: several threads even for small n
    data = np.random.default_rng(n + threads).integers(0, 256, n, dtype=np.uint8)
    path = tmp_path / "blob"
    path.write_bytes(b"head" + data.tobytes() + b"tail")
    out = torch.zeros(n, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        readers.read(f.fileno(), 4, out)
    assert np.array_equal(out.numpy(), data)
    staged = torch.zeros(n, dtype=torch.uint8)  # the GPU's path: chunk by chunk, each in parts
    stager = staging.Stager(torch.device("cpu"), chunk=10_000)
    with open(path, "rb", buffering=0) as f:
        stager.from_file(f, 4, n, staged, staged=True, readers=readers)
    assert np.array_equal(staged.numpy(), data)


@pytest.mark.parametrize("threads", [1, 3])
def test_parallel_reads_refuse_a_file_that_ends_early(tmp_path, twin, threads):
    readers = staging.Readers(threads)
    readers.MIN_PART = 4096
    path = tmp_path / "short"
    path.write_bytes(b"x" * 20_000)
    with open(path, "rb", buffering=0) as f, pytest.raises(ValueError, match="ends inside"):
        readers.read(f.fileno(), 0, torch.zeros(30_000, dtype=torch.uint8))


def test_reads_widen_while_the_worker_is_idle(tmp_path):
    serving = staging.Serving()
    readers = staging.Readers(1, 3, serving)
    readers.MIN_PART = 4096
    data = np.random.default_rng(9).integers(0, 256, 50_000, dtype=np.uint8)
    path = tmp_path / "blob"
    path.write_bytes(data.tobytes())
    for idle in (False, True):
        if idle:
            serving.end(0)  # the last request long ago, none now
        else:
            serving.begin()  # (these readers do not give way)
        out = torch.zeros(len(data), dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            readers.read(f.fileno(), 0, out)
        assert np.array_equal(out.numpy(), data)
        # Serving: this thread alone, no pool. Idle: a pool of two helpers.
        assert (readers._pool is not None) == idle
    assert readers._pool._max_workers == 2


@pytest.mark.parametrize("threads", [1, 2])
def test_reads_wait_out_the_request_being_served_and_not_an_idle_worker(tmp_path, monkeypatch,
                                                                        twin, threads):
    # A head start long enough that a read which gives way waits for the
    # request to end, however slow the machine: no part is read meanwhile.
    monkeypatch.setattr(staging, "GIVE_WAY_GRACE_NS", 60_000_000_000)
    serving = staging.Serving()
    readers = staging.Readers(threads, threads, serving, give_way=True)
    readers.MIN_PART = 4096
    n = 8 * staging.GIVE_WAY_CHUNK + 17
    data = np.random.default_rng(threads).integers(0, 256, n, dtype=np.uint8)
    path = tmp_path / "blob"
    path.write_bytes(data.tobytes())

    def read() -> tuple[torch.Tensor, threading.Thread]:
        out = torch.zeros(n, dtype=torch.uint8)

        def run():
            with open(path, "rb", buffering=0) as f:
                readers.read(f.fileno(), 0, out)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return out, thread

    # Idle (nothing served for a while), or between requests: read at once.
    for last in (0, time.monotonic_ns()):
        serving.end(last)
        out, thread = read()
        thread.join(30)
        assert not thread.is_alive() and np.array_equal(out.numpy(), data)
    # A request being served: nothing is read until it ends.
    serving.begin()
    out, thread = read()
    thread.join(0.3)
    assert thread.is_alive() and not out.any()
    serving.end(time.monotonic_ns())
    thread.join(30)
    assert not thread.is_alive() and np.array_equal(out.numpy(), data)


def test_a_read_that_gives_way_to_requests_ends_all_the_same(tmp_path, twin):
    # A worker that is always serving still gets its load: the read waits
    # at most as long as it reads (and a millisecond's head start).
    serving = staging.Serving()
    serving.begin()
    readers = staging.Readers(1, 1, serving, give_way=True)
    n = 40 * staging.GIVE_WAY_CHUNK
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * (n // 256))
    out = torch.zeros(n, dtype=torch.uint8)

    def run():
        with open(path, "rb", buffering=0) as f:
            readers.read(f.fileno(), 0, out)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and out.numpy().tobytes() == path.read_bytes()


def _reads_made() -> int:
    """The read system calls this thread has made."""
    with open("/proc/thread-self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("syscr:"))


def test_reads_are_small_parts_only_while_the_worker_serves(tmp_path, monkeypatch, twin):
    if not os.path.exists("/proc/thread-self/io"):  # a kernel that keeps no I/O accounting
        pytest.skip("no /proc/thread-self/io")
    monkeypatch.setattr(staging, "CHUNK", 1 << 20)
    monkeypatch.setattr(staging, "GIVE_WAY_CHUNK", 64 << 10)
    n = 4 << 20
    path = tmp_path / "blob"
    path.write_bytes(bytes(n))
    serving = staging.Serving()
    out = torch.zeros(n, dtype=torch.uint8)
    looking = -_reads_made() + _reads_made()  # what a look itself reads
    with open(path, "rb", buffering=0) as f:
        for readers, last, parts in (
                (staging.Readers(1, 1), None, 4),  # nothing to give way to
                (staging.Readers(1, 1, serving, give_way=True), 0, 4),  # idle for long
                # Served just now: small parts (the head start covers any wait).
                (staging.Readers(1, 1, serving, give_way=True), time.monotonic_ns(), 64)):
            if last is not None:
                serving.end(last)
            before = _reads_made()
            readers.read(f.fileno(), 0, out)  # on this thread: one part, read here
            assert _reads_made() - before - looking == parts, (last, parts)


def test_a_read_that_gives_way_refuses_a_file_that_ends_early(tmp_path, twin):
    serving = staging.Serving()
    serving.end(time.monotonic_ns())  # served just now: small parts
    readers = staging.Readers(1, 1, serving, give_way=True)
    path = tmp_path / "short"
    path.write_bytes(b"x" * (3 * staging.GIVE_WAY_CHUNK))
    with open(path, "rb", buffering=0) as f, pytest.raises(ValueError, match="ends inside"):
        readers.read(f.fileno(), 0, torch.zeros(4 * staging.GIVE_WAY_CHUNK, dtype=torch.uint8))


def _helped_read(tmp_path, monkeypatch, data: bytes, n: int, then=None, busy: bool = True):
    """A load's read of `data` into n bytes beside a thread waiting for a
    record on a ring whose waits help with the worker's reads (the serving
    thread's place), which reads its parts meanwhile. `busy`: the reader
    waits out a request being served all along (it reads nothing itself
    until the test ends it); else one was served just now, and the reader
    reads what the waiter does not. `then(producer, slot)` runs while the
    read is under way. Returns (out, the reader's failure or None, the
    waiter's record, the bytes it helped with)."""
    from mmengine.ring import NativeRing

    if staging._native is None or NativeRing is None:
        pytest.skip("mmengine._reads or mmengine._ring is not built")
    monkeypatch.setattr(staging, "GIVE_WAY_GRACE_NS", 60_000_000_000)  # outlasts the test
    path = tmp_path / "blob"
    path.write_bytes(data)
    serving = staging.Serving()
    if busy:
        serving.begin()
    else:
        serving.end(time.monotonic_ns())
    readers = staging.Readers(1, 1, serving, give_way=True)
    producer = NativeRing.create(4096)
    waiter = NativeRing.attach(producer.handle)
    waiter.spin_us = 30e6  # spins (and so helps) however late the read starts
    waiter.help_reads(readers.slot)
    out = torch.zeros(n, dtype=torch.uint8)
    failed, got = [], []

    def read():
        try:
            with open(path, "rb", buffering=0) as f:
                readers.read(f.fileno(), 0, out)
        except Exception as e:  # noqa: BLE001 - handed to the test
            failed.append(e)

    def wait():
        try:
            record = waiter.get(timeout=30)
            got.append(bytes(record[0]))
            waiter.release()
        except Exception as e:  # noqa: BLE001 - handed to the test
            got.append(e)

    helper = threading.Thread(target=wait, daemon=True)
    helper.start()  # waiting (and spinning) before the read begins
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if then is not None:
            then(producer, readers.slot)
        deadline = time.monotonic() + 30
        while (readers.slot.helped < n and helper.is_alive() and reader.is_alive()
               and time.monotonic() < deadline):
            time.sleep(0.001)
        helped = readers.slot.helped
        serving.end(time.monotonic_ns())  # the request ends: the reader takes what is left
        reader.join(30)
        assert not reader.is_alive()
    finally:
        if helper.is_alive():  # not closed under a thread that waits on it
            producer.put(b"request")
            helper.join(30)
        if not helper.is_alive():
            waiter.close()
            producer.close()
    return out, (failed or [None])[0], got[0], helped


# 64 MiB in 4 KiB parts: a helper takes tens of milliseconds over them all.
_LONG_READ = 16384 * 4096


def test_a_serving_thread_waiting_for_requests_reads_the_load_meanwhile(tmp_path, monkeypatch):
    n = 40 * staging.GIVE_WAY_CHUNK + 17
    data = np.random.default_rng(5).integers(0, 256, n, dtype=np.uint8).tobytes()
    out, failed, record, helped = _helped_read(tmp_path, monkeypatch, data, n)
    # The reader waited out the request throughout: every part was read by
    # the thread that waited for its next one, and it still gets that one.
    assert failed is None and helped == n
    assert out.numpy().tobytes() == data and record == b"request"


def test_a_read_the_serving_thread_helps_with_between_requests_ends_whole(tmp_path, monkeypatch):
    # No request in flight: the reader reads too, and sleeps while the help
    # comes; the two put every byte in its place.
    monkeypatch.setattr(staging, "HELP_CHUNK", 4096)
    n = _LONG_READ + 5  # help comes long before the end
    data = np.random.default_rng(6).integers(0, 256, n, dtype=np.uint8).tobytes()
    # Help comes from a waiter that spins: on a busy machine its back-off
    # (ring.BackOff) may park it for a whole read (CI once saw none). Every
    # try must end whole; one of three, at least, helped.
    for _ in range(3):
        out, failed, record, helped = _helped_read(tmp_path, monkeypatch, data, n, busy=False)
        assert failed is None and helped <= n
        assert out.numpy().tobytes() == data and record == b"request"
        if helped:
            break
    assert helped > 0


def test_a_request_ends_the_help_and_the_reader_reads_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "HELP_CHUNK", 4096)
    data = bytes(range(256)) * (_LONG_READ // 256)

    def request(producer, slot):
        deadline = time.monotonic() + 30
        while not slot.helped and time.monotonic() < deadline:
            time.sleep(0.0005)
        producer.put(b"first")

    out, failed, record, helped = _helped_read(tmp_path, monkeypatch, data, _LONG_READ,
                                               then=request)
    assert record == b"first" and failed is None
    assert 0 < helped < _LONG_READ  # it stopped for the request, mid-read
    assert out.numpy().tobytes() == data  # what the waiter left, the reader read


def test_a_wait_that_helps_with_a_read_still_ends_at_its_timeout(tmp_path, monkeypatch):
    from mmengine.ring import NativeRing, RingTimeout

    if staging._native is None or NativeRing is None:
        pytest.skip("mmengine._reads or mmengine._ring is not built")
    monkeypatch.setattr(staging, "HELP_CHUNK", 4096)
    monkeypatch.setattr(staging, "GIVE_WAY_GRACE_NS", 60_000_000_000)
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * (_LONG_READ // 256))
    serving = staging.Serving()
    serving.begin()  # the reader waits it out: only the waiter below reads
    readers = staging.Readers(1, 1, serving, give_way=True)
    out = torch.zeros(_LONG_READ, dtype=torch.uint8)

    def read():
        with open(path, "rb", buffering=0) as f:
            readers.read(f.fileno(), 0, out)

    reader = threading.Thread(target=read, daemon=True)
    with NativeRing.create(4096) as producer, NativeRing.attach(producer.handle) as waiter:
        waiter.help_reads(readers.slot)
        reader.start()
        took = []
        deadline = time.monotonic() + 30
        while not readers.slot.helped and time.monotonic() < deadline:
            t0 = time.monotonic()
            with pytest.raises(RingTimeout):
                waiter.get(timeout=0.001)
            took.append(time.monotonic() - t0)
        helped = readers.slot.helped
        serving.end(time.monotonic_ns())
        reader.join(30)
    assert not reader.is_alive() and out.numpy().tobytes() == path.read_bytes()
    # It helped, and its last wait ended at its bound, long before the read's end.
    assert 0 < helped < _LONG_READ and took[-1] < 1.0


def test_a_file_that_ends_early_fails_the_read_a_serving_thread_helps_with(tmp_path,
                                                                             monkeypatch):
    part = staging.HELP_CHUNK
    n = 16 * part
    out, failed, record, helped = _helped_read(tmp_path, monkeypatch, b"x" * (6 * part), n)
    assert isinstance(failed, ValueError) and "ends inside" in str(failed)
    # Nothing is claimed past the part that failed (the seventh).
    assert record == b"request" and helped == 7 * part


_MARKS_HANDLER = '''
import numpy as np
from mmengine import staging

def load(path, device):
    return None

def predict(inputs):
    marks = staging.READERS.serving.marks  # the worker's: what its loads' reads look at
    return {"serving": np.array([marks[0]]), "served_at": np.array([marks[1]])}
'''


def test_a_worker_marks_itself_serving_for_its_loads_while_it_serves(tmp_path):
    from mmengine.config import Config
    from mmengine.engine import Engine
    from tests.conftest import run

    (tmp_path / "repo" / "m" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "1" / "handler.py").write_text(_MARKS_HANDLER)
    x = {"x": np.zeros(1, np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path / "repo"), workers=1)) as engine:
            t0 = time.monotonic_ns()
            first = await engine.infer("m", x)
            second = await engine.infer("m", x)
            return t0, first, second, time.monotonic_ns()

    t0, first, second, t1 = run(main())
    # Marked busy while its model is called, and marked done (when, on one
    # clock for every process) once its answer is sent, before the next.
    assert first["serving"][0] == second["serving"][0] == 1
    assert first["served_at"][0] < t0 <= second["served_at"][0] <= t1


def test_giving_way_waits_at_most_as_long_as_the_read_reads(monkeypatch):
    # The Python twin on a clock of its own: each part takes 12 us to read,
    # and every nap oversleeps to 0.1 ms (a timer's slack). A worker that
    # is always serving still gets its load at half speed or more.
    now = [1_000_000_000]

    class Clock:
        @staticmethod
        def monotonic_ns() -> int:
            return now[0]

        @staticmethod
        def sleep(seconds: float) -> None:
            now[0] += 100_000

    monkeypatch.setattr(staging, "time", Clock)
    serving = staging.Serving()
    serving.begin()
    pace = staging._GiveWay(serving)
    reading = 0
    for _ in range(1000):
        assert pace() == staging.GIVE_WAY_CHUNK
        now[0] += 12_000
        reading += 12_000
    waited = now[0] - 1_000_000_000 - reading
    assert reading < waited <= reading + staging.GIVE_WAY_GRACE_NS + 100_000
    serving.end(now[0])
    now[0] += staging.IDLE_NS + 1  # nothing served for a while: large parts, no waiting
    before = now[0]
    assert pace() == staging.CHUNK and now[0] == before


LAZY_BUFFER_MODEL = '''
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64, bias=False)
        self.register_buffer("wt", None, persistent=False)

    def forward(self, x):
        if self.wt is None or self.wt.device != x.device:
            self.wt = self.fc.weight.t()
        return x @ self.wt
'''

APPLY_CACHE_MODEL = '''
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64, bias=False)
        self._cache = {}

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._cache = {k: fn(v) for k, v in self._cache.items()}
        return self

    def forward(self, x):
        wt = self._cache.get("wt")
        if wt is None or wt.device != x.device:
            wt = self._cache["wt"] = self.fc.weight.t()
        return x @ wt
'''


@pytest.mark.parametrize("code", [LAZY_BUFFER_MODEL, APPLY_CACHE_MODEL],
                         ids=["lazy_buffer", "apply_cache"])
def test_every_eviction_strips_and_every_reload_sees_the_file(tmp_path, code):
    """Modules that keep tensors outside their state dict (a buffer filled
    by forward, a cache their own _apply moves): each eviction gives the
    arena back, and each reload computes with the file's new weights."""
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    (path / "model.py").write_text(code)
    (path / "model.toml").write_text('backend = "safetensors"\n')
    for r in range(1, 5):
        st.save_file({"fc.weight": torch.eye(64) * r}, path / "model.safetensors")
        model = load(tmp_path)
        out = model.predict({"x": np.ones((1, 64), np.float32)})["output"]
        np.testing.assert_allclose(out, r, err_msg=f"load {r} answered with stale weights")
        gc.collect()
        before = staging.POOL.free_bytes()
        nbytes = model.flat.numel()
        model.close()
        del model
        gc.collect()
        assert staging.POOL.free_bytes() >= before + nbytes, f"eviction {r} kept its arena"


GROWS_A_BUFFER_MODEL = '''
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        if not hasattr(self, "seen"):
            self.register_buffer("seen", torch.zeros(1))  # persistent: in no file
        return self.fc(x)
'''


def test_a_kept_module_that_no_longer_fits_its_file_is_built_afresh(tmp_path):
    """A skeleton whose state grew (its forward registered a buffer) fails
    to take the file's tensors: the load builds the module again from
    model.py instead of failing until the code changes."""
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    (path / "model.py").write_text(GROWS_A_BUFFER_MODEL)
    (path / "model.toml").write_text('backend = "safetensors"\n')
    st.save_file({"fc.weight": torch.eye(4)}, path / "model.safetensors")
    for _ in range(3):
        model = load(tmp_path)
        out = model.predict({"x": np.ones((1, 4), np.float32)})["output"]
        np.testing.assert_allclose(out, 1.0)
        model.close()


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def test_a_files_estimate_is_the_region_its_load_reads(tmp_path):
    # Two 4-byte tensors at the two ends of 1 MiB were estimated at 8 bytes
    # and took the whole MiB (a review's finding): the estimate is the span.
    from mmengine import tensorfile

    n = 1 << 20
    path = tmp_path / "w.safetensors"
    _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                            "w": {"dtype": "F32", "shape": [1], "data_offsets": [n - 4, n]}},
                     bytes(n))
    header, _ = tensorfile.read_header(path, "m")
    assert tensorfile.data_bytes(header) == n


@pytest.mark.parametrize("header, match", [
    # 50 names over one region were estimated 50 times its bytes (refused as
    # too large) and a write to one changed the others.
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "'a' and 'b' overlap"),
    # An empty tensor's other dimensions passed whatever they were, and the
    # worker's reshape failed untyped.
    ({"e": {"dtype": "F32", "shape": [0, 1 << 64], "data_offsets": [0, 0]}},
     "shape .* no tensor can have"),
    ({"e": {"dtype": "F32", "shape": [1 << 40, 1 << 40, 0], "data_offsets": [0, 0]}},
     "shape .* no tensor can have"),
])
def test_a_header_no_tensor_file_can_have_is_load_failed(tmp_path, header, match):
    from mmengine import tensorfile

    path = tmp_path / "w.safetensors"
    _raw_safetensors(path, header, bytes(16))
    with pytest.raises(LoadFailed, match=match):
        tensorfile.read_header(path, "m")


def test_no_memory_for_a_load_is_overloaded_not_a_bad_file(tmp_path):
    # The arena's mmap failing (ENOMEM) was "cannot read model.safetensors":
    # the file's fault, and a remote model's good cached copy was evicted.
    # An address-space limit in a process of its own stands in for a full
    # machine.
    demo.write_mlp(tmp_path / "m", "safetensors", 1024, 16384, 4, seed=0)  # 64 MiB
    code = (
        "import resource, sys\n"
        "from mmengine.backends import load_model\n"
        "import mmengine.backends.safetensors\n"
        "from mmengine.storage import Repository\n"
        "spec = Repository(sys.argv[1]).resolve('m')\n"
        "vm = next(int(l.split()[1]) << 10 for l in open('/proc/self/status')\n"
        "          if l.startswith('VmSize'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (32 << 20), resource.RLIM_INFINITY))\n"
        "try:\n"
        "    load_model(spec)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env=environ())
    assert out.stdout.startswith("Overloaded"), (out.stdout, out.stderr[-2000:])
