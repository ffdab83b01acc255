"""The in-process Engine over real worker processes and real shared memory."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import uvloop

from conftest import (GATED, SLOW_HANDLER, busy_process, environ, eventually, live_pids, run,
                      slow_loading, until, write_handler, write_problem_models,
                      write_sparse_model)
from mmengine import demo, messages, resources, shm
from mmengine.config import Config, native
from mmengine.engine import OBSERVE_WITHIN_S, Engine
from mmengine.errors import (BadRequest, InternalError, LoadFailed, ModelNotFound, Overloaded,
                             PinnedFull, Timeout, TooLarge, Unauthorized, WorkerDied)
from mmengine.server import metrics
from mmengine.storage import Repository

DIMS = (16, 64, 8)  # in, hidden, out: 6,432 bytes of weights each
N_MODELS = 50



@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    models = {}
    for i in range(N_MODELS):
        name = f"m{i:02d}"
        demo.write_mlp(root / name, "safetensors", *DIMS, seed=i)
        models[name] = demo.DemoModel(name, "safetensors", *DIMS, seed=i)
    for backend in demo.BACKENDS:
        demo.write_mlp(root / f"any-{backend}", backend, 4, 8, 2, seed=7)
    write_problem_models(root)
    return root, models


def model_bytes(root) -> int:
    return Repository(root).resolve("m00").estimated_bytes


def config(root, **kw) -> Config:
    defaults = dict(repo=str(root), workers=2, device_budget=3 * model_bytes(root) + 100,
                    monitor_interval_s=0.1, request_timeout_s=60)
    return Config(**{**defaults, **kw})


def x_for(rng: np.random.Generator, in_features: int = DIMS[0]) -> np.ndarray:
    return rng.standard_normal((2, in_features)).astype(np.float32)


def test_random_traffic_is_correct_and_stays_in_budget(repo, own_segments):
    root, models = repo
    names = sorted(models)
    seed = random.randrange(1 << 30)
    print(f"engine traffic seed={seed}")
    budget = config(root).device_budget

    async def main():
        over = []
        async with Engine(config(root)) as engine:
            stop = asyncio.Event()

            async def sample():
                while not stop.is_set():
                    for w in engine.pool.workers:
                        used = engine.cache.used(2, w.index)
                        if used > budget:
                            over.append(used)
                    await asyncio.sleep(0.001)

            async def client(k):
                rng = random.Random(seed + k)
                nrng = np.random.default_rng(seed + k)
                weights = [1 / (i + 1) for i in range(len(names))]
                for _ in range(250):
                    name = rng.choices(names, weights)[0]
                    x = x_for(nrng)
                    out = await engine.infer(name, {"x": x})
                    np.testing.assert_allclose(out["y"], models[name].reference(x),
                                               rtol=1e-5, atol=1e-5)

            sampler = asyncio.ensure_future(sample())
            await asyncio.gather(*(client(k) for k in range(8)))  # 2,000 requests
            stop.set()
            await sampler
            stats = engine.stats()
        return over, stats

    over, stats = run(main(), timeout=240)
    assert not over, f"accounted bytes passed the budget: {max(over)} > {budget}"
    totals = stats["totals"]
    assert totals["failures"] == 0
    assert totals["loads"] > 6, "a budget of ~6 models must have evicted"
    # Every load either is still resident or was evicted once.
    assert totals["loads"] - totals["evictions"] == totals["resident_models"]
    assert totals["loads"] == sum(r["loads"] for r in stats["models"])
    assert totals["hits"] + totals["misses"] == 2000
    # Every load was waited for by a request that missed, and served it.
    assert totals["misses"] >= totals["loads"]
    for w in stats["workers"]:
        assert w["used_bytes"] <= w["budget_bytes"]


def test_concurrent_first_requests_share_one_load(repo, own_segments):
    root, models = repo

    async def main():
        async with Engine(config(root)) as engine:
            x = x_for(np.random.default_rng(1))
            outs = await asyncio.gather(*(engine.infer("m07", {"x": x}) for _ in range(20)))
            for out in outs:
                np.testing.assert_allclose(out["y"], models["m07"].reference(x), rtol=1e-5,
                                           atol=1e-5)
            return engine.stats()

    stats = run(main())
    row = next(r for r in stats["models"] if r["name"] == "m07")
    assert row["loads"] == 1
    assert stats["totals"]["loads"] == 1
    # Each request counts once, the one that waited for the load included
    # (the load's own steps are no uses: GDSF's frequency).
    assert row["hits"] == 20 == stats["totals"]["hits"] + stats["totals"]["misses"]


def test_busy_and_pinned_models_survive_pressure(repo, own_segments):
    root, _ = repo

    async def main():
        async with Engine(config(root, workers=1)) as engine:
            await engine.pin("m01")
            rng = np.random.default_rng(2)
            slow = asyncio.ensure_future(
                engine.infer("slow", {"seconds": np.array([4.0])}))
            await until(lambda: (engine.pool.workers[0].running() or (0, 0, False))[2], 20,
                        "the slow call")
            assert engine.model_row(("slow", 1))["state"] == "resident"
            # Loads run beside inference on the worker's loader thread, so
            # they pile pressure on while the slow request holds its model.
            for name in ("m02", "m03", "m04", "m05", "m06"):  # far past the budget
                await engine.load(name)
                assert not slow.done()
                assert engine.model_row(("slow", 1))["state"] == "resident"
                assert engine.model_row(("m01", 1))["state"] == "resident"
            out = await slow
            assert out["y"][0] == 8.0
            await engine.unpin("m01")
            for name in ("m02", "m03", "m04", "m05"):
                await engine.infer(name, {"x": x_for(rng)})
            return engine.stats()

    stats = run(main())
    rows = {r["name"]: r for r in stats["models"]}
    # Evicted once unpinned: demoted to the host tier (it is a safetensors model).
    assert rows["m01"]["state"] == "in host memory"
    assert rows["m01"]["evictions"] == 1
    assert stats["totals"]["evictions"] >= 4


def test_idle_models_are_unloaded(repo, own_segments):
    root, _ = repo

    async def main():
        async with Engine(config(root, idle_unload_s=0.3)) as engine:
            await engine.infer("m08", {"x": x_for(np.random.default_rng(3))})
            assert engine.model_row(("m08", 1))["state"] == "resident"
            deadline = time.monotonic() + 10
            # Unloaded from its worker: demoted to the host tier if it is a
            # safetensors model, else back to storage.
            while engine.model_row(("m08", 1))["state"] not in ("on storage",
                                                               "in host memory"):
                assert time.monotonic() < deadline, "idle model never unloaded"
                await asyncio.sleep(0.05)
            return engine.model_row(("m08", 1))

    row = run(main())
    assert row["evictions_by_reason"] == {"idle": 1}


def test_a_model_is_idle_from_the_end_of_its_last_request(repo, own_segments):
    # Idle time counted from the request's start: a model whose request ran
    # longer than idle_unload_s was unloaded as it ended (a review's finding).
    root, _ = repo

    async def main():
        async with Engine(config(root, workers=1, idle_unload_s=1.0)) as engine:
            await engine.infer("slow", {"seconds": np.array([1.5])})
            await asyncio.sleep(0.5)
            after = engine.model_row(("slow", 1))["state"]
            deadline = time.monotonic() + 10
            while engine.model_row(("slow", 1))["state"] == "resident":
                assert time.monotonic() < deadline, "idle model never unloaded"
                await asyncio.sleep(0.05)
            return after, engine.model_row(("slow", 1))

    after, row = run(main())
    assert after == "resident"
    assert row["evictions_by_reason"] == {"idle": 1}


def test_a_model_unpinned_after_its_request_is_idle_from_that_requests_end(repo,
                                                                             own_segments):
    # Pinned, its request's end touched nothing (a pin was left): unpinned
    # at once after a request longer than idle_unload_s, it was unloaded
    # at once (a review's finding).
    root, _ = repo

    async def main():
        async with Engine(config(root, workers=1, idle_unload_s=1.0)) as engine:
            await engine.pin("slow")
            await engine.infer("slow", {"seconds": np.array([1.5])})
            await engine.unpin("slow")
            await asyncio.sleep(0.5)
            after = engine.model_row(("slow", 1))["state"]
            deadline = time.monotonic() + 10
            while engine.model_row(("slow", 1))["state"] == "resident":  # idle, it goes
                assert time.monotonic() < deadline, "idle model never unloaded"
                await asyncio.sleep(0.05)
            return after, engine.model_row(("slow", 1))["evictions_by_reason"]

    assert run(main()) == ("resident", {"idle": 1})


def test_host_memory_watermark_evicts(repo, own_segments):
    root, _ = repo

    async def main():
        # Any machine is above 0.1% of its memory in use: the monitor must
        # evict every model, least recently used first, and drop its copy in
        # host memory (a CPU worker's model loaded from there is those very
        # pages), all in its first turn: a model and then its copy a turn
        # took 4 turns here, while a container near its limit had its
        # workers killed.
        interval = 8.0  # the two loads come well within one
        async with Engine(config(root, host_memory_watermark=0.001,
                                 monitor_interval_s=interval)) as engine:
            first_turn = time.monotonic() + interval
            rng = np.random.default_rng(4)
            for name in ("m10", "m11"):
                await engine.infer(name, {"x": x_for(rng)})
            assert time.monotonic() < first_turn, "loaded too slowly to see one turn"
            while engine.stats()["totals"]["resident_models"] or \
                    engine.stats()["host_tier"]["models"]:
                assert time.monotonic() < first_turn + interval * 0.75, engine.stats()
                await asyncio.sleep(0.05)
            return engine.stats()

    stats = run(main())
    reasons = [r["evictions_by_reason"] for r in stats["models"] if r["evictions"]]
    # Each evicted for host memory (a model the monitor took between its
    # load and its request's turn, on a slow machine, is loaded and evicted
    # again: the same reason, twice).
    assert len(reasons) == 2 and all(set(r) == {"host_memory"} for r in reasons), reasons


# Loads once the file "go" beside it exists (20 s at most).
GATED_LOAD_HANDLER = GATED + """
def load(path, device):
    wait_for_go(path)

def predict(inputs):
    return {"y": inputs["x"]}
"""


def test_the_monitor_goes_on_while_its_evictions_wait_behind_a_load(tmp_path, own_segments):
    # An eviction for host memory waits for its worker's answer, which waits
    # behind the load the worker's loader is running. Awaited in the
    # monitor's turn, it held every other duty of the monitor (idle
    # unloads, stuck workers, devices' watermarks) until the load ended.
    write_handler(tmp_path, "quick", QUICK)
    gated = write_handler(tmp_path, "gated", GATED_LOAD_HANDLER)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, monitor_interval_s=0.1,
                                 host_memory_watermark=0.001)) as engine:
            worker = engine.pool.workers[0]
            await engine.pin("quick")  # no victim until the load is under way
            loading = asyncio.ensure_future(engine.load("gated"))
            try:
                await until(lambda: engine.model_row(("gated", 1))["state"] == "loading",
                            10, "gated's load")
                await engine.unpin("quick")
                # The monitor evicts "quick" for host memory (any machine is
                # past 0.1%): its unload waits behind "gated"'s load.
                await until(lambda: engine.model_row(("quick", 1))["state"] == "evicting",
                            10, "quick's eviction, behind the load")
                sampled = worker._sampled[1]  # each monitor turn samples the worker
                await asyncio.sleep(1.0)
                assert worker._sampled[1] > sampled, "no monitor turn while the eviction waits"
                assert engine.model_row(("quick", 1))["state"] == "evicting"  # taken once
            finally:
                (gated / "go").write_text("")
            await asyncio.wait_for(loading, 30)
            await until(lambda: engine.model_row(("quick", 1))["state"] != "evicting",
                        10, "quick's eviction, once the load ended")

    run(main())


def test_typed_errors_reach_the_caller_and_the_rest_is_served(repo, own_segments):
    root, models = repo

    async def main():
        async with Engine(config(root)) as engine:
            x = x_for(np.random.default_rng(5))
            # What its manifest declares is checked before a load: a request
            # the model would refuse loaded it (and could evict another).
            for bad, words in (({"x": x.astype(np.float64)}, "must be float32, not float64"),
                               ({"x": x[:, :3]}, "must have shape"),
                               ({"z": x}, "missing ['x'], unexpected ['z']")):
                with pytest.raises(BadRequest, match=re.escape(words)):
                    await engine.infer("m01", bad)
            assert engine.model_row(("m01", 1))["loads"] == 0
            assert engine.model_row(("m01", 1))["state"] == "on storage"
            cases = [
                (ModelNotFound, engine.infer("no-such-model", {"x": x})),
                (ModelNotFound, engine.infer("../m00", {"x": x})),
                (ModelNotFound, engine.infer("m00", {"x": x}, version=9)),
                (BadRequest, engine.infer("m00", {"x": x[:, :3]})),
                (BadRequest, engine.infer("m00", {"x": x.astype(np.float64)})),
                (BadRequest, engine.infer("m00", {"z": x})),
                (BadRequest, engine.infer("m00", {"x": "not an array"})),
                (TooLarge, engine.infer("huge", {"x": x[:, :4]})),
                (LoadFailed, engine.infer("corrupt", {"x": x})),
            ]
            for expected, call in cases:
                with pytest.raises(expected):
                    await call
                out = await engine.infer("m00", {"x": x})  # still serving
                np.testing.assert_allclose(out["y"], models["m00"].reference(x),
                                           rtol=1e-5, atol=1e-5)
            # Refused by the worker that holds it: the check's own words (it
            # said the run's account, a dict, as its message), and where.
            with pytest.raises(BadRequest) as refused:
                await engine.infer("m00", {"x": x[:, :3]})
            assert str(refused.value) == "input 'x' must have shape [-1, 16] (-1: any), " \
                                         "not [2, 3]", refused.value
            assert refused.value.ran["worker"] == 0 and "t_done" not in refused.value.ran
            # A timeout is any real number of seconds, numpy's too (as the SDK takes it).
            await engine.infer("m00", {"x": x}, timeout=np.float32(5))
            for bad in (np.float32("nan"), np.int64(0), True):
                with pytest.raises(BadRequest, match="timeout must be a positive number"):
                    await engine.infer("m00", {"x": x}, timeout=bad)
            return engine.stats()

    stats = run(main())
    rows = {r["name"]: r for r in stats["models"]}
    assert rows["corrupt"]["state"] == "failed"
    assert "safetensors" in rows["corrupt"]["last_error"]


ANSWERS_THAT_RAISE = """
import collections.abc, sys
import numpy as np

class Exits:
    def __array__(self, dtype=None, copy=None):
        sys.exit("as it was made an array")

class Keys(collections.abc.Mapping):
    def __getitem__(self, name):
        raise KeyError(name)
    def __iter__(self):
        return iter(["y"])
    def __len__(self):
        return 1

def load(path, device):
    pass

def predict(inputs):
    if "exit" in inputs:
        return {"y": Exits()}
    if "keys" in inputs:
        return Keys()
    return {"y": inputs["x"]}
"""


def test_an_answer_that_raises_as_it_is_made_outputs_is_the_models_internal_error(
        tmp_path, own_segments):
    # The model's own code runs as its answer is made arrays: its exit()
    # there ended the worker (WORKER_DIED, every resident model gone), any
    # other exception was INTERNAL without the model's name (a review's finding).
    write_handler(tmp_path, "m", ANSWERS_THAT_RAISE)
    x = np.ones(2, np.float32)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            await engine.infer("m", {"x": x})
            pid = engine.pool.workers[0].pid
            for key, message in (("exit", "SystemExit: as it was made an array"),
                                 ("keys", "KeyError: 'y'")):
                with pytest.raises(InternalError, match=f"^m: .*{message}"):
                    await engine.infer("m", {key: x})
                assert (await engine.infer("m", {"x": x}))["y"].tolist() == [1, 1]
            assert engine.pool.workers[0].pid == pid

    run(main())


def test_each_request_fails_at_its_own_deadline(repo, own_segments):
    # One worker runs "slow" requests one at a time: the three behind the
    # first wait for it. Deadlines come in an order that makes the worker's
    # one timer move earlier, then go on to the next nearest once it fires.
    # The first runs past its deadline to its end ("late"); the two whose
    # deadlines pass while they wait are skipped by the worker, not run.
    root, _ = repo

    def slow(seconds: float) -> dict:
        return {"seconds": np.array([seconds])}

    async def main():
        async with Engine(config(root, workers=1)) as engine:
            late, skipped = [], []
            engine.observers.append(lambda kind, f: kind == "late" and late.append(f))
            engine.observers.append(lambda kind, f: kind == "skipped" and skipped.append(f))
            counted = metrics.attach(engine)
            await engine.load("slow")
            t0 = time.monotonic()
            calls = [engine.infer("slow", slow(2.0), timeout=0.6),
                     engine.infer("slow", slow(0.5), timeout=0.2),
                     engine.infer("slow", slow(0.5), timeout=0.45),
                     engine.infer("slow", slow(0.0), timeout=10)]

            async def timed(call):
                try:
                    return await call, time.monotonic() - t0
                except Timeout as e:
                    return e, time.monotonic() - t0

            results = await asyncio.gather(*map(timed, calls))
            pins = next(r["pins"] for r in engine.stats()["models"] if r["name"] == "slow")
            return results, pins, late, skipped, counted.exposition()[0].decode()

    ((first, t1), (second, t2), (third, t3), (fourth, t4)), pins, late, skipped, exposed = \
        run(main())
    assert 'mmengine_late_answers_total{model="slow"} 1.0' in exposed
    assert 'mmengine_skipped_requests_total{model="slow"} 2.0' in exposed
    assert pins == 0  # the timed-out requests' pins went when the worker was done
    # The first one's call ran to its end, and still says where and when.
    assert [(f["model"], f["version"], f["worker"]) for f in late] == [("slow", 1, 0)]
    t_recv, t_done, t_read = late[0]["worker_ns"]
    assert late[0]["t_sent"] <= t_recv <= t_done <= t_read
    assert t_done - t_recv >= 2.0e9
    assert [(f["model"], f["version"]) for f in skipped] == [("slow", 1)] * 2
    assert fourth["y"][0] == 0.0 and 2.0 <= t4
    # A deadline may come up to a millisecond early: uvloop's clock counts
    # milliseconds (workers._CLOCK_S). Each fails well before the first
    # call ends (2 s), with room for a slow machine's stalls.
    assert isinstance(first, Timeout) and 0.598 <= t1 < 1.6, t1
    assert isinstance(second, Timeout) and 0.198 <= t2 < 1.6, t2
    assert isinstance(third, Timeout) and 0.448 <= t3 < 1.6, t3


def test_every_backend_loads_and_answers(repo, own_segments):
    root, _ = repo

    async def main():
        async with Engine(config(root, device_budget=1 << 24)) as engine:
            x = x_for(np.random.default_rng(6), 4)
            for backend in demo.BACKENDS:
                out = await engine.infer(f"any-{backend}", {"x": x})
                np.testing.assert_allclose(out["y"], demo.reference(x, 4, 8, 2, seed=7),
                                           rtol=1e-5, atol=1e-5, err_msg=backend)

    run(main())


def test_torch_inputs_are_accepted(repo, own_segments):
    root, models = repo

    async def main():
        async with Engine(config(root)) as engine:
            x = torch.randn(3, DIMS[0])
            out = await engine.infer("m09", {"x": x})
            np.testing.assert_allclose(out["y"], models["m09"].reference(x.numpy()),
                                       rtol=1e-5, atol=1e-5)

    run(main())


def test_a_killed_worker_fails_its_requests_and_comes_back(repo, own_segments):
    root, models = repo

    async def main():
        async with Engine(config(root, workers=1)) as engine:
            died = []
            engine.observers.append(
                lambda kind, f: kind == "request" and f["code"] == "WORKER_DIED" and died.append(f))
            victim = engine.pool.workers[0].pid
            slow = asyncio.ensure_future(
                engine.infer("slow", {"seconds": np.array([5.0])}))
            deadline = time.monotonic() + 20
            while not (engine.pool.workers[0].running() or (0, 0, False))[2]:  # running
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            # Said as the log and the trace say it (it said "exited with code -9"),
            # with what it ran.
            with pytest.raises(WorkerDied, match=rf"^worker 0 \(pid {victim}\) ended: SIGKILL, "
                                                 rf"running slow v1$"):
                await slow
            assert time.monotonic() - t0 < 3.0  # at its death, not at the call's end (5 s)
            x = x_for(np.random.default_rng(8))
            deadline = time.monotonic() + 30
            while True:  # the restarted worker serves again
                try:
                    out = await engine.infer("m03", {"x": x})
                    break
                except WorkerDied:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
            np.testing.assert_allclose(out["y"], models["m03"].reference(x), rtol=1e-5,
                                       atol=1e-5)
            assert engine.pool.workers[0].pid != victim
            return engine.stats(), victim, died

    stats, victim, died = run(main())
    # The request it died under says where it was, if not when it ran.
    assert died[0]["model"] == "slow" and died[0]["version"] == 1 and died[0]["worker"] == 0
    assert died[0]["t_sent"] > 0 and died[0]["worker_ns"] == (None, None, None)
    assert stats["totals"]["worker_restarts"] == 1
    assert not live_pids([victim])


def test_a_model_that_cannot_be_read_is_named_in_observations_asked_by_version(repo,
                                                                              own_segments):
    # Strangers' names are not (they would make series); a model's are,
    # though its files cannot be read, by its default version or by number.
    root, _ = repo

    async def main():
        async with Engine(config(root, workers=1)) as engine:
            seen = []
            engine.observers.append(lambda kind, f: kind == "request" and seen.append(f))
            for version in (1, None):
                with pytest.raises(LoadFailed):
                    await engine.infer("corrupt", {"x": x_for(np.random.default_rng(1))},
                                       version=version)
            with pytest.raises(ModelNotFound):
                await engine.infer("nobody", {"x": x_for(np.random.default_rng(1))}, version=2)
            return [(f["model"], f["code"]) for f in seen]

    assert run(main()) == [("corrupt", "LOAD_FAILED"), ("corrupt", "LOAD_FAILED"),
                           ("", "MODEL_NOT_FOUND")]


def test_a_request_that_times_out_on_a_worker_is_observed_with_that_worker(repo, own_segments):
    # Its span is linked to the worker whose queue it waited in (and the
    # "late" call there), not left without one.
    root, _ = repo

    async def main():
        async with Engine(config(root, workers=1)) as engine:
            await engine.load("slow")
            seen = []
            engine.observers.append(lambda kind, f: kind == "request" and seen.append(f))
            with pytest.raises(Timeout):
                await engine.infer("slow", {"seconds": np.array([0.5])}, timeout=0.1)
            return seen

    (f,) = run(main())
    assert (f["code"], f["version"], f["worker"]) == ("TIMEOUT", 1, 0)
    assert f["t_sent"] > 0 and f["worker_ns"] == (None, None, None)


def test_a_request_whose_load_dies_is_observed_with_its_version_and_worker(tmp_path,
                                                                          own_segments):
    # It never reached the worker's ring, but its span says what it waited
    # for: the version that was loading, and where.
    write_handler(tmp_path, "slowload", slow_loading(5))

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            seen = []
            engine.observers.append(lambda kind, f: kind == "request" and seen.append(f))
            victim = engine.pool.workers[0].pid
            waiting = engine.submit("slowload", {"x": np.ones(1)})
            await asyncio.sleep(0.5)
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(WorkerDied, match="during the load"):
                await waiting
            return seen

    seen = run(main(), max_stall=2.0)
    assert [(f["code"], f["version"], f["worker"]) for f in seen] == [("WORKER_DIED", 1, 0)]
    assert seen[0]["worker_ns"] == (None, None, None)


def test_shutdown_leaves_no_process_and_no_segment(repo, own_segments):
    root, _ = repo

    async def main():
        engine = Engine(config(root))
        await engine.start()
        pids = [w.pid for w in engine.pool.workers]
        names = [r.name for w in engine.pool.workers for r in (w.req, w.resp)]
        await engine.infer("m00", {"x": x_for(np.random.default_rng(9))})
        assert engine.model_row(("m00", 1))["state"] == "resident"
        await engine.stop()
        # Nothing is reported resident on workers that are gone.
        assert engine.model_row(("m00", 1))["state"] == "on storage"
        assert engine.stats()["totals"]["resident_models"] == 0
        return pids, names

    pids, names = run(main())
    assert not live_pids(pids)
    assert not set(names) & set(shm.list_segments())


def test_a_full_queue_answers_overloaded_at_once(repo, own_segments):
    root, _ = repo

    async def main():
        async with Engine(config(root, workers=1, max_queue_per_model=2)) as engine:
            slow = [asyncio.ensure_future(engine.infer("slow", {"seconds": np.array([1.0])}))
                    for _ in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(Overloaded):
                await engine.infer("slow", {"seconds": np.array([0.0])})
            assert not any(f.done() for f in slow)  # refused at once, not queued behind them
            await asyncio.gather(*slow)
            # Answered requests leave the queue: the model takes requests again.
            out = await engine.infer("slow", {"seconds": np.array([0.0])})
            assert out["y"][0] == 0.0
            assert engine._queued == {}

    run(main())


@pytest.mark.parametrize("poll_us", [0.0, 200.0])
def test_answers_arrive_polled_or_woken_and_an_idle_front_end_sleeps(repo, own_segments,
                                                                      poll_us):
    """Answers come by polling while requests are in flight (poll_us > 0)
    and by the worker's wake-up otherwise, or once the window has closed
    (a slow model's answer comes long after it): none is lost either way,
    and once idle the front-end costs no CPU."""
    root, models = repo

    async def main():
        async with Engine(config(root, workers=1, poll_us=poll_us)) as engine:
            rng = np.random.default_rng(5)
            for _ in range(20):  # one at a time: the path a lone client takes
                x = x_for(rng)
                out = await engine.infer("m00", {"x": x})
                np.testing.assert_allclose(out["y"], models["m00"].reference(x), rtol=1e-5, atol=1e-5)
            slow = asyncio.ensure_future(engine.infer("slow", {"seconds": np.array([0.05])}))
            xs = [x_for(rng) for _ in range(50)]
            outs = await asyncio.gather(*(engine.infer(f"m0{i % 3}", {"x": x})
                                          for i, x in enumerate(xs)))
            for i, (x, out) in enumerate(zip(xs, outs)):
                np.testing.assert_allclose(out["y"], models[f"m0{i % 3}"].reference(x), rtol=1e-5, atol=1e-5)
            assert (await slow)["y"][0] == 0.1  # the handler answers twice its input
            await asyncio.sleep(0.05)
            assert not engine.pool.workers[0]._polling
            # The loop's thread alone (polling runs there): the process's
            # other threads (the monitor, a repository scan) are not its.
            cpu = time.thread_time()
            await asyncio.sleep(0.5)
            assert time.thread_time() - cpu < 0.05  # parked, not polling

    run(main())


def _polled_model(tmp_path) -> tuple[Config, dict, list[int]]:
    """A model polled for the whole of its calls (3 ms), where a preemption
    lands: its engine's config, its input, and the CPUs (the loop's
    first)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: the loop's, shared, and the worker's")
    write_handler(tmp_path, "slow", "import time\n\ndef load(path, device):\n    pass\n\n"
                  "def predict(inputs):\n    time.sleep(0.003)\n    return {'y': inputs['x']}\n")
    config = Config(repo=str(tmp_path), workers=1, poll_us=20_000, spin_us=0)
    return config, {"x": np.ones(3, np.float32)}, cpus


async def _until_polls_back_off(engine: Engine, x: dict, cpu: int) -> dict:
    """Calls "slow" with a busy process on the loop's CPU until the
    front-end's polls back off (20 s, 300 calls at most): the worker's
    spin_backoffs before."""
    worker = engine.pool.workers[0]
    before = worker.spin_backoffs
    loop_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # this thread: the loop's
    try:
        with busy_process(cpu):
            deadline = time.monotonic() + 20
            for _ in range(300):
                out = await engine.infer("slow", x)
                np.testing.assert_array_equal(out["y"], x["x"])
                if worker.spin_backoffs["front_end"] > before["front_end"] \
                        or time.monotonic() > deadline:
                    break
    finally:
        os.sched_setaffinity(0, loop_cpus)
    return before


def test_polls_that_a_busy_process_keeps_off_their_cpu_back_off(tmp_path, own_segments):
    """The front-end's loop, polling for an answer, is runnable all along:
    beside a busy process on its CPU, an answer waits out the other's time
    slice. Its CPU found taken a millisecond as windows of polls begin,
    twice, its polls back off (ring.BackOff), on their own: the worker
    never spins here, so never backs off for them to follow. (Preempted
    while polling, it finds the answer there when it runs again, and that
    window ends: a look between two polls missed it.)"""
    config, x, cpus = _polled_model(tmp_path)

    async def main():
        async with Engine(config) as engine:
            await engine.infer("slow", x)
            before = await _until_polls_back_off(engine, x, cpus[0])
            return before, engine.pool.workers[0].spin_backoffs

    before, after = run(main())
    assert after["front_end"] > before["front_end"], (before, after)
    assert after["worker"] == before["worker"] == 0, (before, after)


def test_the_spin_back_offs_count_on_across_a_workers_restart(tmp_path, own_segments):
    # They were the new worker's alone, from 0: a counter that went down,
    # which Prometheus reads as a reset (and read 0 while it was dead).
    config, x, cpus = _polled_model(tmp_path)

    async def main():
        async with Engine(config) as engine:
            first = engine.pool.workers[0]
            await engine.infer("slow", x)
            await _until_polls_back_off(engine, x, cpus[0])
            counted = first.spin_backoffs
            assert counted["front_end"] > 0, counted
            os.kill(first.pid, signal.SIGKILL)
            await until(lambda: engine.pool.workers[0] is not first
                        and engine.pool.workers[0].alive, 30, "the restart")
            await engine.infer("slow", x)
            return counted, engine.stats()["workers"][0]["spin_backoffs"]

    counted, after = run(main(), timeout=90)
    assert after["front_end"] >= counted["front_end"] and after["worker"] >= counted["worker"]


@pytest.mark.parametrize("spin", ["off", "on"])
def test_while_a_worker_loads_the_front_end_polls_it_only_where_cores_are_to_spare(
        tmp_path, own_segments, spin):
    """Where a load needs the worker's cores (spin_during_loads off, as on
    this machine), answers come by wake-ups meanwhile, and polling resumes
    once the load is answered; with cores to spare (on) polling goes on,
    where a busy neighbour does not take the worker's CPU (ring.BackOff)."""
    demo.write_mlp(tmp_path / "m00", "safetensors", *DIMS, seed=0)
    write_handler(tmp_path, "slowload", slow_loading(1.0))
    reference = demo.DemoModel("m00", "safetensors", *DIMS, seed=0)
    rng = np.random.default_rng(3)

    async def infer(engine) -> str:
        """Whether the front-end polls for the answer of a request: "polls",
        "backs off" (it would, but a busy neighbour took the worker's CPU:
        the load's own threads, on these two cores, at times), or "sleeps"."""
        x = x_for(rng)
        worker = engine.pool.workers[0]
        fut = engine.submit("m00", {"x": x})  # sent before submit returns
        polled = "polls" if worker._polling else "backs off" if (
            worker._poll_backoff.spin_from > time.monotonic_ns()) else "sleeps"
        _, out = await fut
        np.testing.assert_allclose(out["y"], reference.reference(x), rtol=1e-5, atol=1e-5)
        return polled

    async def main():
        async with Engine(config(tmp_path, workers=1, spin_during_loads=spin)) as engine:
            worker = engine.pool.workers[0]
            await engine.load("m00")
            await until(lambda: not worker._loading)  # its copy to the host tier is done
            assert await infer(engine) != "sleeps"
            load = asyncio.ensure_future(engine.load("slowload"))
            await until(lambda: worker._loading)  # the load went to the worker (1 s long)
            polled = [await infer(engine) for _ in range(5)]
            assert worker._loading  # all five were answered during the load
            if spin == "on":
                assert "sleeps" not in polled, polled
            else:
                assert "polls" not in polled, polled
            await load
            assert await infer(engine) != "sleeps"

    run(main())


def test_an_unload_during_a_load_waits_for_the_requests_that_waited_for_it(
        tmp_path, own_segments):
    # Requests that waited for a cold load were in flight before the unload:
    # they are served by that load, then the model unloads (they used to
    # wait for the unload and load the model again, and it stayed resident).
    write_handler(tmp_path, "slowload", slow_loading(1.0))
    x = {"x": np.arange(3, dtype=np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            requests = [asyncio.ensure_future(engine.infer("slowload", x)) for _ in range(3)]
            await asyncio.sleep(0.3)  # the load is under way
            await engine.unload("slowload")
            outs = await asyncio.gather(*requests)
            return outs, engine.model_row(("slowload", 1))

    outs, row = run(main())
    for out in outs:
        np.testing.assert_array_equal(out["y"], x["x"])
    assert row["loads"] == 1 and row["state"] == "on storage", row


def test_a_model_just_loaded_is_held_for_its_waiters_until_they_have_taken_it(
        tmp_path, own_segments):
    # Its waiters resume turns of the loop after the load's task ends; until
    # then another load's room was made of it whenever every other model was
    # in use, and each of them waited for a second load (~300 of the 2,000
    # requests of test_random_traffic_is_correct_and_stays_in_budget). The
    # load hands them one pin, which the last to resume drops: none stays.
    # A load far longer than its waiters' 0.2 s and than a stall of the loop
    # (run() allows 1 s), so that the test finds the load under way.
    write_handler(tmp_path, "slowload", slow_loading(1.5))
    x = {"x": np.arange(3, dtype=np.float32)}
    key = ("slowload", 1)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            gave_up = asyncio.ensure_future(engine.infer("slowload", x, timeout=0.2))
            waiters = [asyncio.ensure_future(engine.infer("slowload", x)) for _ in range(3)]
            await until(lambda: key in engine._busy)
            pins_as_it_ended = []
            engine._busy[key][1].add_done_callback(
                lambda _: pins_as_it_ended.append(engine.cache.entry(key).pins))
            with pytest.raises(Timeout):
                await gave_up
            outs = await asyncio.gather(*waiters)
            assert pins_as_it_ended == [1]
            assert engine.cache.entry(key).pins == 0
            await engine.unload("slowload", timeout=10)  # would wait for a pin left behind

            # Its only waiter gave up before it ended: nothing is held for nobody.
            with pytest.raises(Timeout):
                await engine.infer("slowload", x, timeout=0.2)
            await until(lambda: key in engine.cache and key not in engine._busy)
            assert engine.cache.entry(key).pins == 0
            return outs, engine.model_row(key)

    outs, row = run(main(), timeout=60)
    for out in outs:
        np.testing.assert_array_equal(out["y"], x["x"])
    assert row["loads"] == 2, row


QUICK = "def load(path, device):\n    pass\n\ndef predict(inputs):\n    return {'y': inputs['x']}\n"


def test_a_load_queued_behind_two_makes_no_room_until_its_turn_is_near(tmp_path, own_segments):
    # A worker's loader runs one load at a time: a load with two ahead of it
    # evicts nothing yet (it used to evict as it was asked for, and a queue
    # of loads held half a budget, its hot models evicted for them). Once
    # the first of the two ends, it makes its room and loads.
    write_handler(tmp_path, "slowload", slow_loading(1.5), "bytes = 1000\n")
    write_handler(tmp_path, "b", QUICK, "bytes = 1000\n")
    for name in ("c", "d"):
        write_handler(tmp_path, name, QUICK, "bytes = 3000\n")
    write_handler(tmp_path, "x", QUICK, "bytes = 4000\n")
    one = {"x": np.ones(1)}

    def state(engine, name):
        key = (name, 1)
        return engine.cache.entry(key).state if key in engine.cache else None

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1,
                                 device_budget=10_000)) as engine:
            await engine.infer("c", one)
            await engine.infer("d", one)
            worker = engine.pool.workers[0]
            slow = asyncio.ensure_future(engine.infer("slowload", one, timeout=20))
            await until(lambda: len(worker.load_turns) == 1)
            b = asyncio.ensure_future(engine.infer("b", one, timeout=20))  # fits beside them
            await until(lambda: len(worker.load_turns) == 2)
            x = asyncio.ensure_future(engine.infer("x", one, timeout=20))  # needs c's or d's room
            await asyncio.sleep(0.5)
            waiting = (state(engine, "c"), state(engine, "d"), state(engine, "x"))
            outs = await asyncio.gather(slow, b, x)
            return waiting, outs, engine.model_row(("x", 1))

    from mmengine.cache import READY

    waiting, outs, row = run(main(), timeout=60)
    assert waiting == (READY, READY, None)  # nothing evicted, nothing reserved for x yet
    for out in outs:
        np.testing.assert_array_equal(out["y"], np.ones(1))
    assert row["loads"] == 1 and row["state"] == "resident", row


def test_evictions_behind_a_long_load_make_room_at_once_for_the_loads_behind_them(
        tmp_path, own_segments):
    # The worker's loader takes control records in order and frees a model
    # before it reads the next one. So the victims of x's load, queued
    # behind a long load, leave the books at once: x's load goes in behind
    # their unloads without waiting for answers that the long load holds up
    # (once, it waited for them past its deadline and was refused), and a
    # request for a victim loads it again behind its unload.
    write_handler(tmp_path, "slowload", slow_loading(2.5), "bytes = 1000\n")
    for name in ("c", "d"):
        write_handler(tmp_path, name, QUICK, "bytes = 1000\n")
    write_handler(tmp_path, "x", QUICK, "bytes = 6000\n")
    one = {"x": np.ones(1)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, device_budget=10_000,
                                 load_timeout_s=1.5)) as engine:
            await engine.infer("c", one)
            await engine.infer("d", one)
            slow = asyncio.ensure_future(engine.infer("slowload", one))
            await asyncio.sleep(0.3)  # its load holds the worker's loader for 2.5 s
            x = asyncio.ensure_future(engine.infer("x", one))  # evicts c and d
            await asyncio.sleep(0.1)
            books = {key: engine.cache.entry(key).state for key in engine.cache.lru_keys()}
            c = await engine.infer("c", one, timeout=10)
            x = await x
            await asyncio.gather(slow, return_exceptions=True)
            return x, c, books

    from mmengine.cache import LOADING

    x, c, books = run(main(), timeout=60)
    np.testing.assert_array_equal(x["y"], np.ones(1))
    np.testing.assert_array_equal(c["y"], np.ones(1))
    # c and d gone from the books while the long load still ran; x's load sent.
    assert books == {("slowload", 1): LOADING, ("x", 1): LOADING}, books


def test_room_that_an_unload_on_its_way_frees_is_not_made_again(tmp_path, own_segments):
    # A model being unloaded (a load past its deadline, its bytes held until
    # its worker answers the unload queued behind it) is gone by the time a
    # load sent after it runs; its bytes were still counted as staying, and
    # x's load evicted a and b for room that was on its way.
    for name in ("a", "b"):
        write_handler(tmp_path, name, QUICK, "bytes = 1000\n")
    write_handler(tmp_path, "slowload", slow_loading(3.0), "bytes = 4000\n")
    write_handler(tmp_path, "x", QUICK, "bytes = 4000\n")
    one = {"x": np.ones(1)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, device_budget=10_000,
                                 load_timeout_s=1.0)) as engine:
            await engine.infer("a", one)
            await engine.infer("b", one)
            slow = asyncio.ensure_future(engine.infer("slowload", one))
            await until(lambda: ("slowload", 1) in engine.cache and engine.cache.entry(
                ("slowload", 1)).state == UNLOADING, what="the load past its deadline")
            x = await engine.infer("x", one, timeout=20)
            await asyncio.gather(slow, return_exceptions=True)
            rows = {m: engine.model_row((m, 1)) for m in ("a", "b")}
            return x, {m: (row["state"], row["evictions"]) for m, row in rows.items()}

    from mmengine.cache import UNLOADING

    x, rows = run(main(), timeout=60)
    np.testing.assert_array_equal(x["y"], np.ones(1))
    assert rows == {"a": ("resident", 0), "b": ("resident", 0)}, rows


def test_an_unload_behind_another_models_load_returns_at_once_and_frees_after_it(
        tmp_path, own_segments):
    # Its eviction queued behind the load on the worker's loader thread: the
    # model is gone from the books at once (nothing can reach it, and what
    # is sent to the loader after the unload runs after it), and the worker
    # answers the unload once that load has ended.
    write_handler(tmp_path, "slowload", slow_loading(3.0))
    write_handler(tmp_path, "quick", QUICK)
    one = {"x": np.ones(1)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            worker = engine.pool.workers[0]
            await engine.infer("quick", one)
            slow = asyncio.ensure_future(engine.infer("slowload", one))
            await asyncio.sleep(0.3)  # its load holds the worker's loader
            t0 = time.monotonic()
            await engine.unload("quick", timeout=0.5)
            took = time.monotonic() - t0
            state = engine.model_row(("quick", 1))["state"]
            behind = worker.in_flight  # the load, and the unload behind it
            await slow
            for _ in range(100):  # then the worker answers the unload
                if not worker.in_flight:
                    break
                await asyncio.sleep(0.05)
            return took, state, behind, worker.in_flight

    took, state, behind, after = run(main(), timeout=60)
    assert took < 0.5 and state == "on storage", (took, state)
    assert (behind, after) == (2, 0)


def test_an_account_says_what_the_loader_thread_was_doing(tmp_path, own_segments):
    """With account_requests, each request's account says what the worker's
    loader thread did as the request began: "load" while a load ran (the
    slow handler's load sleeps, reading nothing), "idle" once it is done."""
    demo.write_mlp(tmp_path / "m00", "safetensors", *DIMS, seed=0)
    write_handler(tmp_path, "slowload", slow_loading(1.0))
    rng = np.random.default_rng(4)

    async def main():
        seen = []
        async with Engine(config(tmp_path, workers=1, account_requests=True,
                                 host_tier_bytes=0)) as engine:
            engine.observers.append(lambda kind, f: kind == "request" and seen.append(f))
            worker = engine.pool.workers[0]
            await engine.load("m00")
            load = asyncio.ensure_future(engine.load("slowload"))
            end = time.monotonic() + 20
            while not worker._loading:  # the load went to the worker (1 s long)
                assert time.monotonic() < end, "the load never started"
                await asyncio.sleep(0.01)
            for _ in range(3):
                await engine.infer("m00", {"x": x_for(rng)})
            assert worker._loading  # all three were answered during the load
            await load
            # The loader's op ends just after its answer (on a busy machine,
            # maybe after a request or two more).
            for _ in range(250):
                await engine.infer("m00", {"x": x_for(rng)})
                if seen[-1]["account"]["loader"] == "idle":
                    break
                await asyncio.sleep(0.02)
        states = [f["account"]["loader"] for f in seen]
        assert states[:3] == ["load"] * 3 and states[-1] == "idle"
        assert set(states[3:-1]) <= {"load"}

    run(main())


LOAD, PUBLISH = messages.Op.LOAD, messages.Op.PUBLISH


@pytest.mark.parametrize("spins, quiet", [
    ({LOAD: False, PUBLISH: False}, True),  # cores are few, nothing helps
    ({LOAD: True, PUBLISH: True}, False),   # cores to spare
    ({LOAD: True, PUBLISH: False}, False),  # few, but it helps with loads (this machine)
])
def test_while_it_loads_a_workers_serving_thread_spins_only_where_cores_are_to_spare(
        tmp_path, spins, quiet):
    """The loader thread stops the serving thread's spinning (spin_us 0)
    for the length of a load where cores are few (quiet), and gives it back
    after; with cores to spare, or where the serving thread helps with its
    loads (`spins` of each heavy op: resources.spins_during_loads), it
    leaves it alone. Real rings, in-process."""
    import threading

    from mmengine import messages, worker
    from mmengine.ring import Ring

    version = tmp_path / "slowload" / "1"
    version.mkdir(parents=True)
    started = tmp_path / "started"
    (version / "handler.py").write_text(slow_loading(1.0).replace(
        "def load(path, device):\n", f"def load(path, device):\n    open({str(started)!r}, 'w')\n"))
    rings = [Ring.create(1 << 16, spin_us=300.0) for _ in range(3)]
    ends = [Ring.attach(r.handle) for r in rings]
    (ctl, ctl_in), (req, req_in), (resp, resp_out) = zip(rings, ends)
    logic = worker.WorkerLogic(Config(repo=str(tmp_path)), "cpu")
    loader = threading.Thread(target=worker._serve_control,
                              args=(ctl_in, req_in, worker._Responder(resp_out), logic, spins))
    loader.start()
    try:
        ctl.put(messages.request(messages.Op.LOAD, 7, "slowload", 1, [],
                                 {"path": str(version)}))
        end = time.monotonic() + 30
        while not started.exists():  # the load has begun: it lasts a second
            assert time.monotonic() < end
            time.sleep(0.005)
        seen, end = set(), time.monotonic() + 0.5
        while time.monotonic() < end:
            seen.add(req_in.spin_us)
            time.sleep(0.005)
        rid, code, _, _ = messages.parse_response(resp.get(timeout=30)[0])
        resp.release()
        assert (rid, code) == (7, messages.OK)
        assert seen == ({0.0} if quiet else {300.0})
        assert req_in.spin_us == 300.0  # given back once loaded
    finally:
        ctl.close()  # the loader thread's ring closes: it returns
        loader.join(30)
        for r in (*ends, *rings[1:]):
            r.close()
    assert not loader.is_alive()


@pytest.mark.parametrize("cores, workers, threads, spins", [
    (2, 1, 0, False),   # this machine: 1 reader + the spinner + 1 > 2
    (2, 2, 0, False),
    (16, 1, 0, True),   # 4 readers + the spinner + 1 <= 16
    (16, 4, 0, True),   # 4 cores a worker: 2 readers + 2
    (16, 8, 0, False),  # 2 a worker
    (16, 1, 15, False),  # load_threads 15 leave no core to spin on
])
def test_a_worker_spins_during_loads_only_where_its_cores_hold_its_readers(
        monkeypatch, cores, workers, threads, spins):
    """...unless it loads where its serving thread helps with a load's
    reads (a CPU worker's, where the C rings and reads are built): its
    spinning is reading then, and a load from the host tier is short. A
    copy to the host tier needs the loader's core."""
    monkeypatch.setattr(resources, "cores", lambda: cores)
    c = Config(workers=workers, load_threads=threads)
    assert resources.core_share(c, "cpu") == max(1, cores // workers)
    helps = native("ring") is not None and native("reads") is not None
    assert resources.helps_loads("cpu") is helps and not resources.helps_loads("cuda:0")
    assert resources.spins_during_loads(c, "cpu") == {LOAD: spins or helps, PUBLISH: spins}
    monkeypatch.setattr(resources, "helps_loads", lambda device: False)
    assert resources.spins_during_loads(c, "cpu") == {LOAD: spins, PUBLISH: spins}
    assert resources.spins_during_loads(c.replace(spin_during_loads="on"), "cpu") == {
        LOAD: True, PUBLISH: True}
    assert resources.spins_during_loads(c.replace(spin_during_loads="off"), "cpu") == {
        LOAD: False, PUBLISH: False}


@pytest.mark.parametrize("cores, workers, threads, expected", [
    (2, 1, 0, 1),     # this machine: one core is the front-end's
    (1, 1, 0, 1),
    (16, 1, 0, 15),
    (16, 4, 0, 3),
    (16, 32, 0, 1),
    (2, 1, 2, 2),     # as the operator says
])
def test_a_cpu_worker_leaves_the_front_end_a_core(monkeypatch, cores, workers, threads,
                                                   expected):
    monkeypatch.setattr(resources, "cores", lambda: cores)
    assert resources.torch_threads(Config(workers=workers,
                                          threads_per_worker=threads)) == expected


def test_with_account_requests_a_worker_says_how_it_spent_each_request(repo, own_segments):
    """Each answer carries its serving thread's account: woken between the
    request's send and its start, CPU time within the model's wall time."""
    root, models = repo

    async def main():
        for account in (True, False):
            seen = []
            async with Engine(config(root, workers=1, account_requests=account,
                                     spin_us=0)) as engine:
                engine.observers.append(lambda kind, f: kind == "request" and seen.append(f))
                rng = np.random.default_rng(9)
                for _ in range(20):
                    x = x_for(rng)
                    out = await engine.infer("m00", {"x": x})
                    np.testing.assert_allclose(out["y"], models["m00"].reference(x),
                                               rtol=1e-5, atol=1e-5)
                    await asyncio.sleep(0.002)  # the worker parks (spin_us 0): a wake-up
            assert len(seen) == 20 and all(f["code"] == "OK" for f in seen)
            assert all(f["version"] == 1 for f in seen)  # the one served, not None asked for
            if not account:
                assert all(f["account"] is None for f in seen)
                continue
            for f in seen:
                t_recv, t_done, _ = f["worker_ns"]
                a = f["account"]
                assert f["t_sent"] <= a["t_woke"] <= t_recv
                assert 0 < a["cpu_ns"] and 0 <= a["runq_ns"] and 0 <= a["wait_runq_ns"]
                # The thread's time on and waiting for a CPU fits in the wall
                # time: both readings lie within t_recv..t_done (the kernel's
                # clocks and CLOCK_MONOTONIC may part by microseconds).
                assert a["cpu_ns"] + a["runq_ns"] <= t_done - t_recv + 20_000
            # Parked between requests, it woke for most of them.
            assert sum(f["account"]["t_woke"] < f["worker_ns"][0] for f in seen) >= 10

    run(main())


def test_a_request_that_failed_in_its_worker_still_says_where_and_how_it_ran(
        tmp_path, own_segments):
    """The observers of a request that a worker took and failed (its model
    raised) get the worker's account of the run, as an answer's have it; a
    request no worker took (an unknown model) has none."""
    d = tmp_path / "picky" / "1"
    d.mkdir(parents=True)
    (d / "handler.py").write_text(
        "def load(path, device):\n    pass\n\n"
        "def predict(inputs):\n"
        "    if inputs['x'].sum() < 0:\n"
        "        raise ValueError('no negative sums here')\n"
        "    return {'y': inputs['x']}\n")

    async def main():
        seen = []
        async with Engine(Config(repo=str(tmp_path), workers=1,
                                 account_requests=True)) as engine:
            engine.observers.append(lambda kind, f: kind == "request" and seen.append(f))
            ok = np.ones((1, 2), np.float32)
            np.testing.assert_array_equal((await engine.infer("picky", {"x": ok}))["y"], ok)
            with pytest.raises(BadRequest, match="no negative sums here"):
                await engine.infer("picky", {"x": -ok})
            with pytest.raises(ModelNotFound):
                await engine.infer("nobody", {"x": ok})
        return seen

    answered, failed, unknown = run(main())
    assert (answered["code"], failed["code"]) == ("OK", "BAD_REQUEST")
    for f in (answered, failed):
        t_recv, t_done, t_read = f["worker_ns"]
        assert f["start_ns"] <= f["t_sent"] <= t_recv <= t_done <= t_read <= f["end_ns"]
        assert f["worker"] == 0 and f["version"] == 1
        assert f["account"] is None or f["account"]["cpu_ns"] > 0  # None: no schedstat
    assert unknown["code"] == "MODEL_NOT_FOUND"
    assert not {"worker", "worker_ns", "t_sent", "account"} & set(unknown)


def test_an_answer_too_large_for_its_ring_still_says_where_it_ran(tmp_path, own_segments):
    d = tmp_path / "huge" / "1"
    d.mkdir(parents=True)
    (d / "handler.py").write_text(
        "import numpy as np\n\ndef load(path, device):\n    pass\n\n"
        "def predict(inputs):\n    return {'y': np.zeros(1 << 22, np.float32)}\n")  # 16 MiB

    async def main():
        seen = []
        async with Engine(Config(repo=str(tmp_path), workers=1, ring_bytes=4 << 20)) as engine:
            engine.observers.append(lambda kind, f: kind == "request" and seen.append(f))
            with pytest.raises(TooLarge, match="larger than the response ring"):
                await engine.infer("huge", {"x": np.ones((1, 2), np.float32)})
        return seen

    (f,) = run(main())
    assert f["code"] == "TOO_LARGE" and f["worker"] == 0 and f["version"] == 1
    assert f["t_sent"] <= f["worker_ns"][0] <= f["worker_ns"][1] <= f["worker_ns"][2]


def test_a_request_too_large_for_its_ring_is_refused_typed_and_serving_goes_on(tmp_path,
                                                                              own_segments):
    d = tmp_path / "echo" / "1"
    d.mkdir(parents=True)
    (d / "handler.py").write_text("def load(path, device):\n    pass\n\n"
                                  "def predict(inputs):\n    return {'y': inputs['x'][:1]}\n")

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, ring_bytes=1 << 20)) as engine:
            with pytest.raises(TooLarge, match=r"request of \d+ bytes exceeds the ring's") as e:
                await engine.infer("echo", {"x": np.ones(1 << 19, np.float32)})  # 2 MiB
            # The typed error alone: the ring's own, which it replaces, not chained to it.
            assert e.value.__context__ is None and e.value.__cause__ is None
            out = await engine.infer("echo", {"x": np.full(4, 2, np.float32)})
            assert out["y"].tolist() == [2.0]

    run(main())


def test_then_runs_once_as_the_answer_is_read_before_the_bookkeeping(repo, own_segments):
    # Engine.submit's `then` is how the servers write answers: once per
    # request, however it ends (answer, deadline, a cold load), ahead of
    # the engine's own callbacks, and a `then` that raises stops nothing.
    root, models = repo
    x = x_for(np.random.default_rng(3))

    async def main():
        events: list = []
        loop_errors: list = []
        async with Engine(config(root, workers=1)) as engine:
            asyncio.get_running_loop().set_exception_handler(
                lambda loop, context: loop_errors.append(context["exception"]))
            engine.observers.append(
                lambda kind, f: kind == "request" and events.append(("observed", f["model"])))

            def then(tag):
                def record(fut):
                    events.append(("then", tag, fut.done(), None if fut.cancelled()
                                   else type(fut.exception()).__name__))
                return record

            cold = engine.submit("m05", {"x": x}, then=then("cold"))  # not resident yet
            await cold
            hot = engine.submit("m05", {"x": x}, then=then("hot"))
            await hot
            await asyncio.sleep(0.05)  # the done callbacks of the last turn
            await engine.load("slow")
            late = engine.submit("slow", {"seconds": np.array([0.4])}, timeout=0.1,
                                 then=then("late"))
            with pytest.raises(Timeout):
                await late
            await asyncio.sleep(0.5)  # its answer comes, and calls nobody

            def broken(fut):
                raise RuntimeError("a server's bug")
            failing = engine.submit("m05", {"x": x}, then=broken)
            out = await failing
            after = await engine.infer("m05", {"x": x})  # the worker still serves
            stats, errors_before_kill = engine.stats(), list(loop_errors)
            dying = engine.submit("slow", {"seconds": np.array([5.0])}, then=then("dying"))
            await asyncio.sleep(0.3)
            os.kill(engine.pool.workers[0].pid, signal.SIGKILL)
            with pytest.raises(WorkerDied):
                await dying
            await asyncio.sleep(0.05)
            return events, errors_before_kill, out, after, stats

    events, loop_errors, out, after, stats = run(main())
    thens = [e for e in events if e[0] == "then"]
    assert thens == [("then", "cold", True, "NoneType"), ("then", "hot", True, "NoneType"),
                     ("then", "late", True, "Timeout"), ("then", "dying", True, "WorkerDied")]
    hot = events.index(("then", "hot", True, "NoneType"))
    assert events[hot + 1] == ("observed", "m05")  # the answer first, then the books
    assert [type(e) for e in loop_errors] == [RuntimeError]
    np.testing.assert_allclose(out[1]["y"], models["m05"].reference(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after["y"], models["m05"].reference(x), rtol=1e-5, atol=1e-5)
    assert stats["totals"]["worker_restarts"] == 0
    assert all(r["pins"] == 0 for r in stats["models"])


def test_a_servers_answer_is_told_to_the_observers_while_the_next_request_runs(repo,
                                                                              own_segments):
    # A request answered through `then` (a server's) is told to the
    # observers at the next request sent to a worker, or within
    # OBSERVE_WITHIN_S if none comes, and before a reader of the metrics
    # reads them; with the time it was answered, not the time it was told.
    root, _ = repo
    x = x_for(np.random.default_rng(4))

    async def main():
        seen, told = [], []

        def observe(kind, f):
            if kind == "request":
                seen.append(f)
                told.append(time.monotonic_ns())

        async with Engine(config(root, workers=1)) as engine:
            engine.observers.append(observe)
            await engine.infer("m05", {"x": x})  # loaded; awaited, so told at once
            told_at_once = len(seen)
            answered: list = []
            await engine.submit("m05", {"x": x}, then=lambda f: answered.append(
                time.monotonic_ns()))
            await asyncio.sleep(0)  # its done callbacks have run
            before_next = len(seen)
            nxt = engine.submit("m05", {"x": x}, then=lambda f: None)
            as_next_sent = len(seen)
            await nxt
            await asyncio.sleep(0)
            before_timer = len(seen)
            await asyncio.sleep(OBSERVE_WITHIN_S * 5)
            after_timer = len(seen)
            await engine.submit("m05", {"x": x}, then=lambda f: None)
            await asyncio.sleep(0)
            before_read = len(seen)
            metrics.attach(engine)
            return told_at_once, before_next, as_next_sent, before_timer, after_timer, \
                before_read, len(seen), answered, seen, told

    once, before_next, as_next, before_timer, after_timer, before_read, after_read, answered, \
        seen, told = run(main())
    assert (once, before_next, as_next) == (1, 1, 2)
    assert (before_timer, after_timer) == (2, 3)
    assert (before_read, after_read) == (3, 4)
    assert all(f["code"] == "OK" and f["worker"] == 0 for f in seen)
    assert seen[1]["start_ns"] < answered[0] <= seen[1]["end_ns"] < told[1]


def test_stopping_during_a_restart_reports_nothing_to_the_loop(repo, own_segments):
    # A gather that a cancel ends holds a CancelledError, not a cancel:
    # untaken, it was logged as "exception was never retrieved" when the
    # engine stopped while a dead worker came back.
    root, _ = repo

    async def main():
        reported: list = []
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: reported.append(context["message"]))
        async with Engine(config(root, workers=1)) as engine:
            await engine.load("slow")
            slow = engine.submit("slow", {"seconds": np.array([5.0])})
            await asyncio.sleep(0.2)
            os.kill(engine.pool.workers[0].pid, signal.SIGKILL)
            with pytest.raises(WorkerDied):
                await slow
            await asyncio.sleep(0.1)  # its successor is starting
        gc.collect()
        await asyncio.sleep(0)
        return reported

    assert run(main()) == []


def test_a_then_that_sends_finds_its_place_free_and_deadlines_kept(repo, own_segments):
    # A server's `then` may send the client's next request at once: the
    # model's queue place of the request answered is free by then, and a
    # request sent from a deadline's `then` breaks no other deadline.
    root, _ = repo

    def slow(seconds: float) -> dict:
        return {"seconds": np.array([seconds])}

    async def main():
        async with Engine(config(root, workers=1, max_queue_per_model=1)) as engine:
            await engine.load("slow")
            sent: list = []

            def send_next(fut):
                sent.append(engine.submit("slow", slow(0.0)))  # Overloaded if still counted
            await engine.submit("slow", slow(0.0), then=send_next)
            await sent[0]

        async with Engine(config(root, workers=1)) as engine:
            await engine.load("slow")
            t0 = time.monotonic()
            follow: list = []
            first = engine.submit("slow", slow(1.0), timeout=0.3,
                                  then=lambda f: follow.append(engine.submit("slow", slow(0.0))))
            other = engine.submit("slow", slow(0.0), timeout=0.3)
            for fut in (first, other):
                with pytest.raises(Timeout):
                    await fut
            elapsed = time.monotonic() - t0
            await follow[0]
            return elapsed

    assert run(main()) < 0.8  # both at their deadline, not after the slow call


def test_requests_refused_at_once_are_observed(repo, own_segments):
    # Refusals decided before a request is queued (a full queue, bad
    # inputs) reach the observers (metrics, traces) as answers do; a name
    # that is no known model is not named.
    root, _ = repo

    async def main():
        events: list = []
        async with Engine(config(root, workers=1, max_queue_per_model=1)) as engine:
            engine.observers.append(lambda kind, f: kind == "request" and events.append(
                (f["model"], f["code"])))
            await engine.load("slow")
            first = engine.submit("slow", {"seconds": np.array([0.3])})
            with pytest.raises(Overloaded):
                engine.submit("slow", {"seconds": np.array([0.0])})
            with pytest.raises(BadRequest):
                engine.submit("no-such-model", {"x": "not an array"})
            await first
            await asyncio.sleep(0.05)
        return events

    assert run(main()) == [("slow", "OVERLOADED"), ("", "BAD_REQUEST"), ("slow", "OK")]


def test_listing_a_broken_model_counts_no_failure(tmp_path, own_segments):
    # models() (the TCP list, KServe's index) only looks: a dashboard that
    # polls it must not put a broken model into ever longer back-off.
    broken = demo.write_mlp(tmp_path / "broken", "safetensors", *DIMS)
    (broken / "model.toml").write_text('bytes = "lots"\n')

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            for _ in range(3):
                listed = {r["name"]: r for r in await engine.models()}
            with pytest.raises(LoadFailed):
                await engine.infer("broken", {"x": np.zeros((1, DIMS[0]), np.float32)})
            row = next(r for r in engine.stats()["models"] if r["name"] == "broken")
            return listed, row

    listed, row = run(main())
    assert listed["broken"]["failures"] == 0 and listed["broken"]["inputs"] == []
    assert "bytes" in listed["broken"]["error"]  # why, where the row cannot say
    assert row["failures"] == 1


def test_pages_of_models_list_each_model_once_with_all_its_versions(tmp_path, own_segments):
    # A dashboard of thousands of models walks the listing a page at a time;
    # a model's versions never straddle two pages, and the stats' totals are
    # the whole engine's whatever the page.
    for i, name in enumerate(("a", "b", "c", "d", "e")):
        demo.write_mlp(tmp_path / name, "safetensors", *DIMS, seed=i)
    demo.write_mlp(tmp_path / "b", "safetensors", *DIMS, seed=9, version=2)
    demo.write_mlp(tmp_path / "d", "safetensors", *DIMS, seed=9, version=3)
    x = x_for(np.random.default_rng(4))

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            for name in ("b", "c", "e"):
                await engine.infer(name, {"x": x})
            pages, after = [], None
            for _ in range(10):  # bounded: 5 models, 2 a page
                rows, after = await engine.models_page(after, 2)
                pages.append([(r["name"], r["version"]) for r in rows])
                if after is None:
                    break
            whole = [(r["name"], r["version"]) for r in await engine.models()]
            last, more = await engine.models_page("d", 5)
            for bad in (lambda: engine.models_page(None, 0),
                        lambda: engine.collect_stats(None, -1)):
                with pytest.raises(ValueError, match="limit must be at least"):
                    await bad()
            stats_pages, after = [], None
            for _ in range(10):
                page = await engine.collect_stats(after, 2)
                stats_pages.append([(r["name"], r["version"]) for r in page["models"]])
                after = page["next"]
                if after is None:
                    break
            return (pages, whole, last, more, stats_pages, engine.stats(),
                    await engine.collect_stats(limit=0))

    pages, whole, last, more, stats_pages, stats, totals_only = run(main())
    assert pages == [[("a", 1), ("b", 1), ("b", 2)], [("c", 1), ("d", 1), ("d", 3)],
                     [("e", 1)]]
    assert sum(pages, []) == whole
    assert [r["name"] for r in last] == ["e"] and more is None
    # The counted versions, those touched: b's default (2), c and e.
    assert stats_pages == [[("b", 2), ("c", 1)], [("e", 1)]]
    assert sum(stats_pages, []) == [(r["name"], r["version"]) for r in stats["models"]]
    assert totals_only["models"] == [] and "next" not in totals_only
    assert totals_only["totals"] == stats["totals"]
    assert stats["totals"]["loads"] == 3 and stats["totals"]["resident_models"] == 3
    assert stats["totals"]["resident_bytes"] == sum(
        r["bytes"] for r in stats["models"] if r["state"] == "resident")


def test_models_and_versions_added_or_removed_while_serving(tmp_path, own_segments):
    # The repository is read again every repo_scan_s: a new version becomes
    # the default one, a new model is listed and served, a removed one is
    # not found any more (before, none of it was seen until a restart).
    import shutil

    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    x = x_for(np.random.default_rng(2))

    def ref(seed):
        return demo.reference(x, *DIMS, seed=seed)

    async def listed(engine):
        return {(r["name"], r["version"]) for r in await engine.models()}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            np.testing.assert_allclose((await engine.infer("m", {"x": x}))["y"], ref(1),
                                       rtol=1e-5, atol=1e-5)
            demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=2, version=2)
            demo.write_mlp(tmp_path / "new", "safetensors", *DIMS, seed=3)

            async def added():
                return {("m", 1), ("m", 2), ("new", 1)} <= await listed(engine)
            await eventually(added, 10, "a scan")
            np.testing.assert_allclose((await engine.infer("m", {"x": x}))["y"], ref(2),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose((await engine.infer("m", {"x": x}, version=1))["y"],
                                       ref(1), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose((await engine.infer("new", {"x": x}))["y"], ref(3),
                                       rtol=1e-5, atol=1e-5)
            await engine.unload("new", keep_host=True)  # its copy in host memory stays
            assert engine.model_row(("new", 1))["state"] == "in host memory"
            shutil.rmtree(tmp_path / "new")

            async def removed():
                return ("new", 1) not in await listed(engine)
            await eventually(removed, 10, "a scan")
            with pytest.raises(ModelNotFound):
                await engine.infer("new", {"x": x})
            # The removed model's copy in host memory goes: it serves nothing.
            assert engine.model_row(("new", 1))["state"] == "on storage"
            assert ("new", 1) not in engine.host.keys()
            # Nor is it a row of stats (a state in /metrics) any more: every
            # version ever removed stayed listed "on storage".
            assert ("new", 1) not in rows(engine)
            # One removed while resident is unloaded, its copy dropped
            # (tests/test_rollout.py: it stayed, serving nothing, until evicted).
            demo.write_mlp(tmp_path / "new", "safetensors", *DIMS, seed=3, version=2)
            await asyncio.sleep(0.5)
            await engine.infer("new", {"x": x})
            shutil.rmtree(tmp_path / "new")
            for _ in range(100):
                if ("new", 2) not in rows(engine):
                    break
                await asyncio.sleep(0.1)
            assert ("new", 2) not in rows(engine) and ("m", 1) in rows(engine)
            assert ("new", 2) not in engine.host.keys() and ("new", 2) not in engine.cache

    run(main())


def rows(engine) -> set:
    return {(r["name"], r["version"]) for r in engine.stats()["models"]}


def test_a_token_rotated_in_its_manifest_is_taken_while_serving(tmp_path, own_segments):
    # token_sha256 is a list so that a token can be rotated: add the new
    # one, move the clients, remove the old one. The edit went unseen until
    # a restart, so a revoked (or leaked) token kept working.
    from mmengine import auth

    manifest = demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1) / "model.toml"
    own = manifest.read_text()

    def tokens(*names):
        digests = ", ".join(f'"{auth.digest(n).hex()}"' for n in names)
        manifest.write_text(f"token_sha256 = [{digests}]\n" + own)

    x = x_for(np.random.default_rng(2))

    async def main():
        tokens("old")
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.infer("m", {"x": x}, token="old")
            tokens("old", "new")

            async def taken(token):
                try:
                    await engine.infer("m", {"x": x}, token=token)
                    return True
                except Unauthorized:
                    return False
            await eventually(lambda: taken("new"), 10, "the new token")
            tokens("new")

            async def refused(token):
                return not await taken(token)
            await eventually(lambda: refused("old"), 10, "the old token's revocation")
            await engine.infer("m", {"x": x}, token="new")
            assert engine.model_row(("m", 1))["loads"] == 1  # the model stayed resident

            # A look at the manifest under way as it changes is used once,
            # not kept: a token revoked then stayed good for that key.
            resolve = engine.repo.resolve

            def slow_disk(name, version=None):  # it reads, then takes its time
                spec = resolve(name, version)
                time.sleep(0.5 if version == 1 else 0)
                return spec
            engine.repo.resolve = slow_disk
            looking = asyncio.ensure_future(engine.infer("m", {"x": x}, version=1, token="new"))
            await asyncio.sleep(0.1)
            tokens("newer")
            await looking  # it began before the change
            await asyncio.sleep(0.5)
            with pytest.raises(Unauthorized):
                await engine.infer("m", {"x": x}, version=1, token="new")

    run(main())


def test_a_token_revoked_beside_a_looping_link_is_refused(tmp_path, own_segments):
    # One link that cannot be followed in the root made every scan fail:
    # the revocation went unseen for as long as the link was there, and
    # the listing failed (a review's finding).
    from mmengine import auth

    manifest = demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1) / "model.toml"
    own = manifest.read_text()
    manifest.write_text(f'token_sha256 = "{auth.digest("old").hex()}"\n' + own)
    x = x_for(np.random.default_rng(2))

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.infer("m", {"x": x}, token="old")
            os.symlink("loop", tmp_path / "loop")
            manifest.write_text(f'token_sha256 = "{auth.digest("new").hex()}"\n' + own)
            for _ in range(50):
                try:
                    await engine.infer("m", {"x": x}, token="old")
                except Unauthorized:
                    break
                await asyncio.sleep(0.1)
            with pytest.raises(Unauthorized):
                await engine.infer("m", {"x": x}, token="old")
            await engine.infer("m", {"x": x}, token="new")
            assert {r["name"] for r in await engine.models()} == {"m"}

    run(main())


def test_a_version_asked_for_by_number_is_found_before_the_next_scan(tmp_path, own_segments):
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    x = x_for(np.random.default_rng(2))

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=3600)) as engine:
            await engine.infer("m", {"x": x})
            with pytest.raises(ModelNotFound, match="no version 2"):
                await engine.infer("m", {"x": x}, version=2)
            demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=2, version=2)
            v2 = (await engine.infer("m", {"x": x}, version=2))["y"]
            default = (await engine.infer("m", {"x": x}))["y"]  # v1 until the next scan
            # A version is an int >= 1 to every call alike (load, pin and
            # metadata took 0 and "1", which infer refused), looked up
            # before or not (True and 1.0 would find version 1).
            await engine.metadata("m", 1)
            for call in (engine.load, engine.pin, engine.unload, engine.unpin,
                         engine.metadata):
                for version in (0, "1", True, 1.0, np.int64(0)):
                    with pytest.raises(BadRequest, match="positive integer"):
                        await call("m", version)
            # A numpy integer (read from an array) is its number, as the SDK takes it.
            np.testing.assert_array_equal((await engine.infer("m", {"x": x}, np.int64(2)))["y"], v2)
            await engine.pin("m", np.uint8(2))
            assert engine.model_row(("m", 2))["pinned"]
            await engine.unpin("m", np.int32(2))
            assert not engine.model_row(("m", 2))["pinned"]
            return v2, default

    v2, default = run(main())
    np.testing.assert_allclose(v2, demo.reference(x, *DIMS, seed=2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(default, demo.reference(x, *DIMS, seed=1), rtol=1e-5, atol=1e-5)


def test_an_embedders_mistakes_are_typed_and_counted(repo, own_segments):
    # Cancelled requests are counted as cancelled, not OK; a torch bfloat16
    # input arrives as float32 (every bfloat16 value is one); datetimes, a
    # NaN timeout and a boolean version are the caller's BAD_REQUEST, seen
    # by observers like any refusal.
    import torch

    root, models = repo

    async def main():
        events: list = []
        async with Engine(config(root, workers=1)) as engine:
            engine.observers.append(lambda kind, f: kind == "request" and events.append(
                (f["model"], f["code"])))
            slow = asyncio.ensure_future(engine.infer("slow", {"seconds": np.array([0.5])}))
            await asyncio.sleep(0.2)
            slow.cancel()
            x = x_for(np.random.default_rng(5))
            y = await engine.infer("m00", {"x": torch.from_numpy(x).to(torch.bfloat16)})
            np.testing.assert_allclose(
                y["y"], models["m00"].reference(torch.from_numpy(x).to(torch.bfloat16)
                                                .float().numpy()), rtol=1e-5, atol=1e-5)
            for bad in ({"inputs": {"x": np.array(["2020-01-01"] * 32, "datetime64[D]")}},
                        {"inputs": {"x": x}, "timeout": float("nan")},
                        {"inputs": {"x": x}, "version": True}):
                with pytest.raises(BadRequest):
                    await engine.infer("m00", **bad)
            await asyncio.sleep(0.4)
        return events

    # (A bad version of a model is still that model's request.)
    assert sorted(run(main())) == sorted([("slow", "CANCELLED"), ("m00", "OK")]
                                         + [("m00", "BAD_REQUEST")] * 3)


def test_an_unload_under_steady_traffic_finishes_and_the_traffic_goes_on(repo, own_segments):
    # New requests for a model being unloaded wait for the unload (and then
    # load it again): the requests in flight end, and the unload with them.
    root, _ = repo

    async def main():
        async with Engine(config(root, workers=1)) as engine:
            await engine.load("slow")
            stop = asyncio.Event()
            served = [0]

            async def client():
                while not stop.is_set():
                    await engine.infer("slow", {"seconds": np.array([0.05])})
                    served[0] += 1

            clients = [asyncio.ensure_future(client()) for _ in range(2)]
            await asyncio.sleep(0.3)
            loads = engine.model_row(("slow", 1))["loads"]
            await engine.unload("slow", timeout=5)
            after = served[0]
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*clients)
            assert served[0] > after  # served again, after a load
            assert engine.model_row(("slow", 1))["loads"] == loads + 1

    run(main(), max_stall=2.0)


def test_a_call_from_another_event_loop_is_refused_and_breaks_nothing(repo, own_segments):
    root, models = repo
    x = x_for(np.random.default_rng(6))

    async def main():
        async with Engine(config(root, workers=1)) as engine:
            # metadata() read the model's directory on the caller's loop: a
            # caller that gave up left the engine a future of a closed loop,
            # and every later request for the model failed on it.
            for call in (lambda: engine.infer("m01", {"x": x}), lambda: engine.load("m01"),
                         lambda: engine.metadata("m01"), lambda: engine.models(),
                         lambda: engine.add_model("new", str(root / "m01" / "1")),
                         # Its event bound to the caller's loop: the engine's own
                         # wait then failed (a review's finding).
                         lambda: engine.warmed(), lambda: engine.collect_stats()):
                with pytest.raises(RuntimeError, match="event loop that started it"):
                    await asyncio.to_thread(lambda: asyncio.run(call()))
            y = await engine.infer("m01", {"x": x})
            np.testing.assert_allclose(y["y"], models["m01"].reference(x), rtol=1e-5, atol=1e-5)
            assert engine.model_row(("m01", 1))["failures"] == 0

    run(main(), max_stall=2.0)


def test_a_call_from_another_loop_of_the_engines_own_thread_is_refused(repo, own_segments):
    # A second loop run in the thread the engine started in, the engine's
    # standing still, is another loop all the same.
    root, models = repo
    x = x_for(np.random.default_rng(7))
    home = uvloop.new_event_loop()
    engine = home.run_until_complete(Engine(config(root, workers=1)).start())
    try:
        other = uvloop.new_event_loop()
        try:
            for call in (lambda: engine.infer("m01", {"x": x}), lambda: engine.models()):
                with pytest.raises(RuntimeError, match="event loop that started it"):
                    other.run_until_complete(call())
        finally:
            other.close()
        y = home.run_until_complete(engine.infer("m01", {"x": x}))
        np.testing.assert_allclose(y["y"], models["m01"].reference(x), rtol=1e-5, atol=1e-5)
    finally:
        home.run_until_complete(engine.stop())
        home.close()


def test_an_engine_whose_loop_moved_to_another_thread_serves_there_alone(repo, own_segments):
    # Started by run_until_complete in one thread, its loop then run in
    # another (the pattern run_coroutine_threadsafe serves): calls made
    # there are the engine's loop's; one from the first thread, running a
    # loop of its own meanwhile, is refused (a check by the thread the
    # engine started in and its loop's running told neither: a review's
    # finding).
    root, models = repo
    x = x_for(np.random.default_rng(8))
    home = uvloop.new_event_loop()
    engine = home.run_until_complete(Engine(config(root, workers=1)).start())
    runner = threading.Thread(target=home.run_forever, daemon=True)
    runner.start()
    try:
        y = asyncio.run_coroutine_threadsafe(engine.infer("m01", {"x": x}), home).result(60)
        np.testing.assert_allclose(y["y"], models["m01"].reference(x), rtol=1e-5, atol=1e-5)
        other = uvloop.new_event_loop()
        try:
            with pytest.raises(RuntimeError, match="event loop that started it"):
                other.run_until_complete(engine.infer("m01", {"x": x}))
        finally:
            other.close()
        y = asyncio.run_coroutine_threadsafe(engine.infer("m01", {"x": x}), home).result(60)
        np.testing.assert_allclose(y["y"], models["m01"].reference(x), rtol=1e-5, atol=1e-5)
    finally:
        asyncio.run_coroutine_threadsafe(engine.stop(), home).result(60)
        home.call_soon_threadsafe(home.stop)
        runner.join(30)
        home.close()


def test_a_request_cut_off_by_stop_is_observed_as_its_client_hears_it(tmp_path, own_segments):
    # stop() cuts off what still waits for a load at its deadline: the
    # client hears OVERLOADED ("shut down"), and so do metrics and traces;
    # only a caller's own cancel is CANCELLED.
    write_handler(tmp_path, "slowload", slow_loading(3))

    async def main():
        events: list = []
        engine = await Engine(Config(repo=str(tmp_path), workers=1,
                                     shutdown_timeout_s=0.3)).start()
        engine.observers.append(lambda kind, f: kind == "request" and events.append(f["code"]))
        waiting = engine.submit("slowload", {"x": np.ones(1)})
        await asyncio.sleep(0.1)
        await engine.stop()
        with pytest.raises(Overloaded, match="shut down"):
            await waiting
        return events

    assert run(main(), max_stall=2.0) == ["OVERLOADED"]


def test_an_unload_that_times_out_or_is_cancelled_leaves_the_model_pinned(repo, own_segments):
    root, _ = repo

    async def main():
        async with Engine(config(root, workers=1)) as engine:
            await engine.pin("slow")
            # (Busy well past both unloads' 0.3 s, whatever a stall adds.)
            busy = asyncio.ensure_future(engine.infer("slow", {"seconds": np.array([4.0])}))
            await asyncio.sleep(0.2)
            with pytest.raises(Timeout, match="still in use"):
                await engine.unload("slow", timeout=0.3)
            row = engine.model_row(("slow", 1))
            assert row["pinned"] and row["state"] == "resident"
            # A caller that stops waiting for its unload leaves it as it was too.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(engine.unload("slow"), 0.3)
            row = engine.model_row(("slow", 1))
            assert row["pinned"] and row["state"] == "resident"
            await busy
            assert engine.model_row(("slow", 1))["pins"] == 1  # the explicit pin alone
            await engine.unload("slow")
            assert not engine.model_row(("slow", 1))["pinned"]

    run(main(), max_stall=2.0)


def test_a_workers_gil_switch_interval_is_the_configs(tmp_path, own_segments):
    write_handler(tmp_path, "switch",
                  "import sys\nimport numpy as np\n\ndef load(path, device):\n    pass\n\n"
                  "def predict(inputs):\n    return {'s': np.array([sys.getswitchinterval()])}\n")

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, device_budget=1 << 24,
                                 gil_switch_us=200)) as engine:  # not the default
            return (await engine.infer("switch", {"x": np.zeros(1, np.float32)}))["s"][0]

    assert run(main()) == pytest.approx(200e-6)
    with pytest.raises(ValueError, match="gil_switch_us"):
        Config(gil_switch_us=0)


def test_no_room_behind_pinned_models_is_overloaded_at_once(tmp_path, own_segments):
    # Two models pinned, one per worker, leave no worker room for a third:
    # no request's end can make it, so waiting out the deadline is no use.
    for name in ("big1", "big2", "big3"):
        write_handler(tmp_path, name, "def load(path, device):\n    pass\n\n"
                      "def predict(inputs):\n    return {'y': inputs['x']}\n",
                      f"bytes = {40 << 20}\n")
    x = {"x": np.ones(2, np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=2, device_budget=64 << 20,
                                 request_timeout_s=30)) as engine:
            await engine.pin("big1")
            await engine.pin("big2")
            t0 = time.monotonic()
            with pytest.raises(PinnedFull, match="unpin"):  # an Overloaded without Retry-After
                await engine.infer("big3", x)
            with pytest.raises(PinnedFull, match="unpin"):
                await engine.load("big3")
            refused_in = time.monotonic() - t0
            await engine.unpin("big1")
            out = await engine.infer("big3", x)  # big1 makes way
            return refused_in, out, engine.stats()

    refused_in, out, stats = run(main())
    assert refused_in < 5, refused_in
    np.testing.assert_array_equal(out["y"], x["x"])
    rows = {r["name"]: r for r in stats["models"]}
    assert rows["big1"]["state"] == "on storage" and rows["big2"]["pinned"]


def test_handlers_that_keep_more_than_their_files_are_placed_by_what_they_keep(tmp_path,
                                                                              own_segments):
    # Each handler keeps 24 MiB it makes in load(), in a file of a few
    # hundred bytes: counted by its file, all three sat in a worker's 40 MiB.
    for name in ("a", "b", "c"):
        write_handler(tmp_path, name, "import numpy as np\n\nkept = None\n\n"
                      "def load(path, device):\n    global kept\n"
                      "    kept = np.ones(24 << 20, np.uint8)\n\n"
                      "def predict(inputs):\n    return {'y': inputs['x'] + kept[0]}\n")
    x = {"x": np.ones(2, np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1,
                                 device_budget=40 << 20)) as engine:
            for name in ("a", "b", "c"):
                np.testing.assert_array_equal((await engine.infer(name, x))["y"], x["x"] + 1)
            return engine.stats()

    stats = run(main())
    rows = {r["name"]: r for r in stats["models"]}
    assert rows["c"]["state"] == "resident" and rows["c"]["bytes"] >= 24 << 20, rows["c"]
    for name in "ab":  # each made way for the next
        assert rows[name]["state"] == "on storage", rows[name]
        assert rows[name]["evictions_by_reason"] == {"pressure": 1}, rows[name]
    assert stats["workers"][0]["used_bytes"] <= 40 << 20


def test_a_model_with_a_sparse_tensor_is_served_and_kept_off_the_host_tier(tmp_path,
                                                                           own_segments):
    # Its bytes were counted through a storage that a sparse tensor has not:
    # every load failed (NotImplementedError), and so did asking whether it
    # could go to the host tier.
    module = write_sparse_model(tmp_path / "s" / "1")
    x = np.ones((1, 4), np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            first = await engine.infer("s", {"x": x})
            await engine.unload("s")
            return first, await engine.infer("s", {"x": x}), engine.stats()

    first, again, stats = run(main())
    np.testing.assert_allclose(first["output"], want, rtol=1e-6)
    np.testing.assert_allclose(again["output"], want, rtol=1e-6)
    row, = stats["models"]
    assert row["loads"] == 2 and row["loads_from_host"] == 0 and row["failures"] == 0, row
    assert row["bytes"] == 40 + 4 * 4 + 8 * 8, row  # the linear's, the sparse values' and indices'


def test_no_room_behind_models_in_use_until_the_deadline_is_overloaded(tmp_path, own_segments):
    # The room is held by a request in flight past the caller's deadline:
    # the answer says so (OVERLOADED: SageMaker's 507, which makes it unload
    # models), not merely that the time ran out.
    write_handler(tmp_path, "busy", "import time\n\ndef load(path, device):\n    pass\n\n"
                  "def predict(inputs):\n    time.sleep(3)\n    return {'y': inputs['x']}\n",
                  f"bytes = {40 << 20}\n")
    write_handler(tmp_path, "other", "def load(path, device):\n    pass\n\n"
                  "def predict(inputs):\n    return {'y': inputs['x']}\n",
                  f"bytes = {40 << 20}\n")
    x = {"x": np.ones(2, np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1,
                                 device_budget=64 << 20)) as engine:
            await engine.load("busy")
            running = asyncio.ensure_future(engine.infer("busy", x))
            await asyncio.sleep(0.2)
            with pytest.raises(Overloaded, match="every resident model is in use"):
                await engine.load("other", timeout=0.5)
            with pytest.raises(Overloaded, match="every resident model is in use"):
                await engine.infer("other", x, timeout=0.5)
            await running
            return await engine.infer("other", x)  # the room came back

    np.testing.assert_array_equal(run(main())["y"], x["x"])


def test_a_burst_for_a_model_that_cannot_be_read_is_one_failed_load(tmp_path, own_segments):
    write_handler(tmp_path, "garbled", "def load(path, device):\n    pass\n",
                  'bytes = "lots"\n')
    loads = []

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1,
                                 device_budget=1 << 24)) as engine:
            engine.observers.append(lambda kind, f: kind == "load" and loads.append(f))
            got = await asyncio.gather(*(engine.infer("garbled", {"x": np.ones(1)})
                                         for _ in range(8)), return_exceptions=True)
            return got, engine.stats()

    got, stats = run(main())
    assert all(isinstance(e, LoadFailed) for e in got)
    (row,) = [r for r in stats["models"] if r["name"] == "garbled"]
    assert row["failures"] == 1 and len(loads) == 1 and "bytes" in loads[0]["error"]


def test_an_unload_that_times_out_behind_a_load_says_so(tmp_path, own_segments):
    # It said "the request's deadline passed", as an inference would.
    write_handler(tmp_path, "slowload", slow_loading(3))

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1,
                                 device_budget=1 << 24)) as engine:
            first = asyncio.ensure_future(engine.infer("slowload", {"x": np.ones(1)}))
            await asyncio.sleep(0.2)  # its load under way
            with pytest.raises(Timeout, match="slowload: its load was still under way"):
                await engine.unload("slowload", timeout=0.5)
            await first
            return engine.model_row(("slowload", 1))["state"]

    assert run(main()) == "resident"


def test_a_control_calls_timeout_counts_its_wait_behind_the_calls_before_it(tmp_path,
                                                                           own_segments):
    write_handler(tmp_path, "slowload", slow_loading(3))

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1,
                                 device_budget=1 << 24)) as engine:
            pin = asyncio.ensure_future(engine.pin("slowload"))
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            with pytest.raises(Timeout, match="behind other"):
                await engine.unload("slowload", timeout=0.5)  # queued behind the pin
            waited = time.monotonic() - t0
            await pin
            return waited

    assert 0.45 <= run(main()) < 2.0


def test_a_model_is_placed_beside_the_idle_worker_not_the_busy_one(tmp_path, own_segments):
    # A worker runs its inferences one at a time: a model placed beside a
    # busy one would wait behind its requests. "slow" keeps worker 0 busy;
    # worker 1 has less free room (a pinned "ballast") but is idle.
    echo = "def load(path, device):\n    pass\n\ndef predict(inputs):\n    return inputs\n"
    write_problem_models(tmp_path)  # "slow"
    write_handler(tmp_path, "ballast", echo, f"bytes = {20 << 20}\n")
    write_handler(tmp_path, "fast", echo, f"bytes = {1 << 20}\n")

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=2, device_budget=64 << 20,
                                 monitor_interval_s=0.05)) as engine:
            await engine.load("slow")
            await engine.pin("ballast")
            rows = {r["name"]: r for r in engine.stats()["models"]}
            assert (rows["slow"]["worker"], rows["ballast"]["worker"]) == (0, 1)
            busy = asyncio.gather(*(engine.infer("slow", {"seconds": np.array([0.3])})
                                    for _ in range(4)))
            await asyncio.sleep(0.4)  # a few of the monitor's samples
            shares = [w["busy"] for w in engine.stats()["workers"]]
            await engine.load("fast")
            placed = next(r["worker"] for r in engine.stats()["models"] if r["name"] == "fast")
            await busy
            return shares, placed

    shares, placed = run(main())
    assert shares[0] > 0.5 and shares[1] == 0.0, shares
    assert placed == 1


def test_room_is_made_where_the_evicted_were_used_least_recently(tmp_path, own_segments):
    # Each worker's budget evicts on its own, but the two should lose what
    # one pooled LRU cache would: "old" (used first) goes, though its
    # worker has less free room than the one "recent" holds. Budgets of
    # 10 MiB evict past 8: "c" fits on neither as they stand.
    echo = "def load(path, device):\n    pass\n\ndef predict(inputs):\n    return inputs\n"
    for name, mib in (("old", 7), ("recent", 5), ("c", 4)):
        write_handler(tmp_path, name, echo, f"bytes = {mib << 20}\n")

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=2,
                                 device_budget=10 << 20)) as engine:
            await engine.infer("old", {"x": np.ones(1)})
            await engine.infer("recent", {"x": np.ones(1)})
            def placed():
                return {r["name"]: r["worker"] for r in engine.stats()["models"]
                        if r["worker"] is not None}

            before = placed()
            await engine.infer("c", {"x": np.ones(1)})
            return before, placed()

    before, after = run(main())
    assert before == {"old": 0, "recent": 1}, before
    assert after == {"recent": 1, "c": 0}, after


def test_a_worker_past_its_budget_with_models_no_longer_in_use_comes_back_under_it(
        tmp_path, own_segments):
    # Their manifests say 1,000 bytes; each takes 40% of the budget once
    # loaded. Pinned, none could make room for the next as it loaded; once
    # unpinned they stayed past the budget until another load came (a
    # review's finding): the monitor now makes the room.
    for i in range(3):
        path = demo.write_mlp(tmp_path / f"u{i}", "safetensors", 64, 2000, 16, seed=i)
        (path / "model.toml").write_text("bytes = 1000\n" + (path / "model.toml").read_text())
    budget = int(4 * (64 * 2000 + 2000 + 2000 * 16 + 16) / 0.4)  # float32 weights and biases

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, device_budget=budget,
                                 monitor_interval_s=0.1)) as engine:
            for i in range(3):
                await engine.pin(f"u{i}")
            used = lambda: engine.stats()["workers"][0]["used_bytes"]  # noqa: E731
            over = used()
            for i in range(3):
                await engine.unpin(f"u{i}")
            await until(lambda: used() <= 0.8 * budget, 10, "the worker under its watermark")
            await asyncio.sleep(0.3)  # and no further than the low one
            rows = {r["name"]: r["state"] for r in engine.stats()["models"]}
            return over, used(), rows

    over, under, rows = run(main())
    assert over > budget, over
    assert 0.3 * budget < under <= 0.7 * budget, under  # down to the low watermark
    assert rows == {"u0": "in host memory", "u1": "in host memory", "u2": "resident"}, rows


def test_a_dead_workers_pinned_model_keeps_its_copy_in_a_tight_host_tier(tmp_path,
                                                                          own_segments):
    # Its models, demoted as it dies, each need room in a tier that holds
    # two: the pinned one, least recently used, went first, and loaded from
    # its files again (a review's finding). Now it is demoted last.
    for name in ("hot", "a", "b", "c"):
        demo.write_mlp(tmp_path / name, "safetensors", 64, 2000, 16)
    size = 4 * (64 * 2000 + 2000 + 2000 * 16 + 16)  # float32 weights and biases

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, device_budget=6 * size,
                                 host_tier_bytes=int(3.5 * size), pin_models="hot",
                                 monitor_interval_s=0.1)) as engine:
            await engine.warmed()
            for name in ("a", "b", "c"):
                await engine.infer(name, {"x": np.ones((1, 64), np.float32)})
            # Written, not only reserved: a copy still being written is
            # abandoned with its worker, and needs no room.
            await until(lambda: all(engine.model_row((n, 1))["host_bytes"]
                                    for n in ("hot", "a", "b", "c")), 10, "the copies made")
            os.kill(engine.pool.workers[0].pid, signal.SIGKILL)
            await until(lambda: engine.model_row(("hot", 1))["loads"] == 2 and
                        engine.model_row(("hot", 1))["state"] == "resident", 30,
                        "the pinned model back")
            return {n: engine.model_row((n, 1)) for n in ("hot", "a", "b", "c")}

    rows = run(main())
    assert rows["hot"]["loads_from_host"] == 1, rows
    # Two copies fit past the high watermark: "a" and "b" made room.
    assert [rows[n]["state"] for n in "ab"] == ["on storage", "on storage"], rows


def test_a_worker_between_its_watermark_and_its_budget_keeps_its_models(tmp_path,
                                                                        own_segments):
    # "small" loads beside the pinned "big" past the high watermark, within
    # the budget: the monitor left it alone until a review's fix for loads
    # past the budget evicted it at each turn (README, "Device": tried, it
    # bought nothing but reloads).
    echo = "def load(path, device):\n    pass\n\ndef predict(inputs):\n    return inputs\n"
    write_handler(tmp_path, "big", echo, f"bytes = {9 << 20}\n")
    write_handler(tmp_path, "small", echo, f"bytes = {1 << 19}\n")

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, device_budget=10 << 20,
                                 pin_models="big", monitor_interval_s=0.05)) as engine:
            await engine.warmed()
            for _ in range(3):
                await engine.infer("small", {"x": np.ones(1)})
                await asyncio.sleep(0.3)  # six of the monitor's turns
            return engine.model_row(("small", 1))

    row = run(main())
    assert (row["state"], row["loads"]) == ("resident", 1), row


def test_a_model_is_not_placed_behind_another_models_load(tmp_path, own_segments):
    # A worker's loads run one at a time: "fast", asked for while "slowload"
    # loads on the roomier worker, goes beside the pinned "ballast" instead
    # and answers at once.
    echo = "def load(path, device):\n    pass\n\ndef predict(inputs):\n    return inputs\n"
    write_handler(tmp_path, "ballast", echo, f"bytes = {20 << 20}\n")
    write_handler(tmp_path, "slowload", slow_loading(3), f"bytes = {1 << 20}\n")
    write_handler(tmp_path, "fast", echo, f"bytes = {1 << 20}\n")

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=2, device_budget=64 << 20,
                                 request_timeout_s=30)) as engine:
            await engine.pin("ballast")
            loading = asyncio.ensure_future(engine.load("slowload"))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            await engine.infer("fast", {"x": np.ones(1)})
            waited = time.monotonic() - t0
            rows = {r["name"]: r["worker"] for r in engine.stats()["models"]}
            await loading
            return rows, waited

    rows, waited = run(main())
    assert rows["slowload"] != rows["ballast"]  # the roomier worker
    assert rows["fast"] == rows["ballast"], rows  # not behind the load
    assert waited < 2.0, waited


def test_an_engine_starts_once_and_only_with_a_repository(tmp_path, own_segments):
    from mmengine.config import ConfigError

    async def main():
        for repo in ("", str(tmp_path / "missing")):
            with pytest.raises(ConfigError, match="repo"):
                await Engine(Config(repo=repo, workers=1)).start()
        roots = os.pathsep.join([str(tmp_path), str(tmp_path / "typo")])
        with pytest.raises(ConfigError, match="^model_roots: .*typo' is not a directory"):
            await Engine(Config(repo=str(tmp_path), workers=1, model_roots=roots)).start()
        engine = Engine(Config(repo=str(tmp_path), workers=1))
        with pytest.raises(RuntimeError, match="has not started"):  # a bug, not an overload
            await engine.infer("m", {"x": np.ones(1)})
        with pytest.raises(RuntimeError, match="has not started"):  # not a wait for ever
            await engine.warmed()
        with pytest.raises(RuntimeError, match="has not started"):  # as the other calls
            await engine.unpin("m")
        await engine.start()
        with pytest.raises(BadRequest, match="timeout"):  # as infer's: 0 is not "the default"
            await engine.load("m", timeout=0)
        pids = [w.pid for w in engine.pool.workers]
        with pytest.raises(RuntimeError, match="started already"):
            await engine.start()  # would leak a second pool of workers
        assert [w.pid for w in engine.pool.workers] == pids
        twice = Engine(Config(repo=str(tmp_path), workers=1))
        started = await asyncio.gather(twice.start(), twice.start(), return_exceptions=True)
        assert sum(isinstance(r, RuntimeError) for r in started) == 1, started
        pids += [w.pid for w in twice.pool.workers]
        await twice.stop()
        await engine.stop()
        with pytest.raises(RuntimeError, match="make a new one"):
            await engine.start()
        with pytest.raises(Overloaded, match="shutting down"):  # it returned nothing before
            await engine.unpin("m")
        with pytest.raises(Overloaded, match="shutting down"):  # it added one before
            await engine.add_model("late", str(tmp_path / "m" / "1"))
        assert not engine.repo.added("late")
        return pids

    pids = run(main())
    assert live_pids(pids) == []


def test_stop_is_one_shutdown_however_it_is_called(tmp_path, own_segments):
    # A second stop() returned at once while the first was under way (so
    # asyncio.run, ending, cancelled the first halfway: workers and segments
    # were left); a cancelled stop() could not be retried; one called from
    # another loop half-stopped the engine, and the right one then did
    # nothing; one called during start() raised AttributeError.
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    write_handler(tmp_path, "slow-load", slow_loading(3.0))
    write_handler(tmp_path, "slow-pin", slow_loading(3.0))
    seconds = {"seconds": np.array([0.5])}

    async def main():
        pids = []
        engine = await Engine(Config(repo=str(tmp_path), workers=1)).start()
        pids += [w.pid for w in engine.pool.workers]
        busy = asyncio.ensure_future(engine.infer("slow", seconds))
        await asyncio.sleep(0.2)
        first = asyncio.ensure_future(engine.stop())
        await asyncio.sleep(0.05)
        await engine.stop()  # returns once stopped, not at once
        assert live_pids(pids) == [] and busy.done() and not busy.exception()
        await first

        engine = await Engine(Config(repo=str(tmp_path), workers=1)).start()
        pids += [w.pid for w in engine.pool.workers]
        with pytest.raises(RuntimeError, match="event loop that started it"):
            await asyncio.to_thread(lambda: asyncio.run(engine.stop()))
        assert engine.health()["status"] == "serving"
        busy = asyncio.ensure_future(engine.infer("slow", seconds))
        await asyncio.sleep(0.2)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(engine.stop(), 0.05)  # the caller gives up, not the stop
        await engine.stop()
        assert live_pids(pids) == [] and not busy.exception()

        # Loads and pins cut off by the stop hear why, as inferences do,
        # instead of a CancelledError nobody asked for.
        engine = await Engine(Config(repo=str(tmp_path), workers=1,
                                     shutdown_timeout_s=0.3)).start()
        pids += [w.pid for w in engine.pool.workers]
        calls = [asyncio.ensure_future(engine.load("slow-load")),
                 asyncio.ensure_future(engine.pin("slow-pin"))]
        await asyncio.sleep(0.2)
        await engine.stop()
        for call in calls:
            with pytest.raises(Overloaded, match="shut down"):
                await call

        # During start(): the stop waits for it, then undoes it.
        for wait in (0.0, 0.05):
            engine = Engine(Config(repo=str(tmp_path), workers=2))
            starting = asyncio.ensure_future(engine.start())
            await asyncio.sleep(wait)
            await engine.stop()
            with pytest.raises(RuntimeError, match="stopped"):
                await starting
            pids += [w.pid for w in engine.pool.workers] if engine.pool else []
        return pids

    pids = run(main(), timeout=60)
    assert live_pids(pids) == []


def test_loads_and_pins_are_no_requests_and_a_name_is_a_string(tmp_path, own_segments):
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    x = x_for(np.random.default_rng(2))

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1,
                                 max_queue_per_model=3)) as engine:
            # A name that is no string is refused, typed; None was queued
            # under None for good, until the model "None" was overloaded.
            for name in [None] * 5 + [["m"]]:
                with pytest.raises(BadRequest, match="a model name is a string"):
                    await engine.infer(name, {"x": x})
            assert engine._queued == {}
            # Hits and misses count inferences (docs/observability.md).
            for _ in range(3):
                await engine.load("m")
            await engine.pin("m")
            await engine.unpin("m")
            assert {k: engine.stats()["totals"][k] for k in ("hits", "misses")} == \
                {"hits": 0, "misses": 0}
            await engine.infer("m", {"x": x})
            assert engine.stats()["totals"]["hits"] == 1

    run(main())


FORKING_APP = """
import asyncio, os, sys, threading
import numpy as np
from mmengine import shm
from mmengine.config import Config
from mmengine.engine import Engine

loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()

def call(coro):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

async def stats():
    return engine.stats()["totals"]

def mine():
    return sorted(s for s in shm.list_segments() if s.startswith(f"{shm.PREFIX}{os.getpid()}-"))

engine = Engine(Config(repo=sys.argv[1], workers=1, host_tier_bytes=1 << 26))
call(engine.start())
x = np.ones((1, 16), np.float32)
call(engine.infer("m", {"x": x}))
call(engine.unload("m", keep_host=True))
before = mine()
child = os.fork()
if child == 0:
    sys.exit(0)  # a helper the application forked, ending as programs do
os.waitpid(child, 0)
after = mine()
call(engine.infer("m", {"x": x}))
print(len(before), before == after, call(stats())["loads_from_host"], flush=True)
call(engine.stop())
print("stopped", mine(), flush=True)
"""


def test_a_forked_child_ending_leaves_the_engine_its_memory(tmp_path):
    # The child's exit ran the parent's finalizers: it unlinked the rings
    # and the host tier's copies, so the host tier was lost for good.
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    done = subprocess.run([sys.executable, "-c", FORKING_APP, str(tmp_path)], env=environ(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    counted, same, from_host = done.stdout.split("\n")[0].split()
    assert int(counted) >= 4 and same == "True" and from_host == "1", done.stdout
    assert done.stdout.split("\n")[1] == "stopped []", done.stdout


EXITING_APP = """
import asyncio, os, sys, threading, time
import numpy as np
from mmengine.config import Config
from mmengine.engine import Engine

loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()
engine = Engine(Config(repo=sys.argv[1], workers=2))
asyncio.run_coroutine_threadsafe(engine.start(), loop).result(60)
x = np.ones((1, 16), np.float32)
asyncio.run_coroutine_threadsafe(engine.infer("m", {"x": x}), loop).result(60)
print(os.getpid(), flush=True)
# It returns without engine.stop(), its loop still running on the thread.
"""


def test_a_program_that_exits_without_stopping_restarts_no_worker(tmp_path):
    # The pool's finalizer killed the workers while the loop thread still
    # ran: the engine took their deaths for crashes and restarted them as
    # the interpreter went, their rings sometimes left behind (a review).
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", EXITING_APP, str(tmp_path)],
                              env=environ(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "restarting" not in done.stderr and "rings are gone" not in done.stderr, \
            done.stderr[-2000:]
        pid = done.stdout.split()[0]
        assert not [s for s in shm.list_segments() if s.startswith(f"{shm.PREFIX}{pid}-")]


FORKING_ON_THE_LOOP = """
import asyncio, os, sys
import numpy as np
from mmengine.config import Config
from mmengine.engine import Engine

async def main():
    x = np.ones((1, 16), np.float32)
    config = Config(repo=sys.argv[1], workers=1, host_tier_bytes=1 << 26)
    async with Engine(config) as engine:
        await engine.infer("m", {"x": x})
        await engine.unload("m")  # its host copy goes: the worker's answers wait in its ring
        loop = asyncio.get_running_loop()
        forked = loop.create_future()

        async def in_the_child():
            try:
                await engine.infer("m", {"x": x})
            except RuntimeError as e:
                print("child:", e, flush=True)
            await engine.stop()  # as `async with` would at its exit
            loop.call_later(0.3, os._exit, 0)  # meanwhile the parent's readers and timers run

        def fork():  # from a callback: the child goes on running the loop
            child = os.fork()
            if child:
                forked.set_result(child)
            else:
                loop.create_task(in_the_child())
        loop.call_soon(fork)
        child = await forked
        await loop.run_in_executor(None, os.waitpid, child, 0)
        y = await engine.infer("m", {"x": x})
        print("parent:", y["y"].shape, engine.stats()["totals"]["worker_restarts"],
              engine.pool.workers[0].alive, flush=True)
    print("stopped", flush=True)

asyncio.run(main())
"""


def test_a_child_forked_on_the_loop_leaves_the_engine_alone(tmp_path):
    # The child's copy of the loop read the parent's answers from the
    # worker's ring (the parent took the ring for broken and restarted
    # the worker), and its stop() closed the parent's rings and killed its
    # worker. (A child that leaves through asyncio.run breaks the parent's
    # loop whatever it runs: closing its copy of the loop takes the
    # parent's wake-up pipe out of the epoll they share.)
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    done = subprocess.run([sys.executable, "-c", FORKING_ON_THE_LOOP, str(tmp_path)],
                          env=environ(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    child, parent, stopped = done.stdout.splitlines()
    assert child == ("child: this Engine is the process's that forked this one: a forked "
                     "child cannot use it; make a new Engine here"), done.stdout
    assert parent == f"parent: (1, {DIMS[2]}) 0 True", (done.stdout, done.stderr[-2000:])
    assert stopped == "stopped"


def test_no_load_begins_once_the_engine_stops(tmp_path, own_segments):
    # A request waiting for an unload woke during stop(), found its model
    # gone, and began a load after stop() had cancelled the engine's tasks:
    # it outlived stop(), waiting load_timeout_s for room on no worker.
    write_handler(tmp_path, "slow", SLOW_HANDLER)

    async def main():
        before = asyncio.all_tasks()  # the test's own
        engine = await Engine(Config(repo=str(tmp_path), workers=1,
                                     shutdown_timeout_s=1.0)).start()
        await engine.load("slow")
        running = asyncio.ensure_future(engine.infer("slow", {"seconds": np.array([20.0])}))
        await asyncio.sleep(0.5)
        unloading = asyncio.ensure_future(engine.unload("slow", timeout=25))
        await asyncio.sleep(0.2)
        waiting = asyncio.ensure_future(
            engine.infer("slow", {"seconds": np.array([0.0])}, timeout=25))
        await asyncio.sleep(0.2)
        await engine.stop()
        left = [t for t in asyncio.all_tasks() - before
                if not t.done() and t not in (running, unloading, waiting)]
        assert left == [], left
        with pytest.raises(WorkerDied):
            await running
        with pytest.raises(Overloaded):
            await waiting
        await asyncio.gather(unloading, return_exceptions=True)

    run(main(), timeout=60)


def test_requests_that_time_out_waiting_for_a_load_are_misses(tmp_path, own_segments):
    # A miss was counted only once the request was served: four of five
    # that waited for a load and timed out counted as neither, and the hit
    # rate (`mmengine bench`'s) read 86% while most requests failed.
    write_handler(tmp_path, "slowload", slow_loading(0.6))
    x = {"x": np.ones(1, np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            results = await asyncio.gather(
                *(engine.infer("slowload", x, timeout=0.1) for _ in range(4)),
                engine.infer("slowload", x, timeout=20), return_exceptions=True)
            await engine.infer("slowload", x)
            return results, engine.stats()["totals"]

    results, totals = run(main())
    assert [type(r).__name__ for r in results] == ["Timeout"] * 4 + ["dict"]
    assert (totals["hits"], totals["misses"], totals["loads"]) == (1, 5, 1)


def test_a_request_its_worker_skips_says_where_it_waited(repo):
    # One the worker skips as it could not finish in time was told to
    # observers (and traces) with no worker, t_sent or version, where one
    # whose deadline passed in the same queue had them.
    root, _ = repo
    slow = {"seconds": np.array([0.05])}
    timeouts, skipped = [], []

    def observe(kind, f):
        if kind == "request" and f["code"] == "TIMEOUT":
            timeouts.append(f)
        elif kind == "skipped":
            skipped.append(f)

    async def main():
        async with Engine(config(root, workers=1)) as engine:
            engine.observers.append(observe)
            await engine.infer("slow", slow)  # loaded, and its call time known
            await asyncio.gather(*(engine.infer("slow", slow, timeout=0.12)
                                   for _ in range(6)), return_exceptions=True)
            await asyncio.sleep(0.3)  # the skipped ones' answers

    run(main())
    assert skipped and len(timeouts) >= len(skipped), (skipped, timeouts)
    for f in timeouts:
        assert (f["worker"], f["version"]) == (0, 1) and f["t_sent"] > 0, f


# Answers x + OFFSET; a negative x first sleeps, to keep a request in flight.
OFFSET_HANDLER = '''
import time

OFFSET = {offset}

def load(path, device):
    pass

def predict(inputs):
    x = inputs["x"]
    if x.ravel()[0] < 0:
        time.sleep(0.5)
    return {{"y": x + OFFSET}}
'''


@contextlib.asynccontextmanager
async def offset_models(tmp_path):
    """An engine serving, as "z" (added at run time), the model of
    tmp_path/a (x + 1); tmp_path/b answers x + 2."""
    for name, offset in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "handler.py").write_text(OFFSET_HANDLER.format(offset=offset))
    (tmp_path / "repo").mkdir(exist_ok=True)
    async with Engine(Config(repo=str(tmp_path / "repo"), workers=1)) as engine:
        await engine.add_model("z", str(tmp_path / "a"))
        yield engine


def test_a_model_removed_while_requests_wait_for_its_unload_is_not_loaded_again(
        tmp_path, own_segments):
    # Requests that came during SageMaker's DELETE waited for the unload,
    # then loaded what they had read before: the model was resident after
    # its removal, and the name added again served the old one's weights.
    x = np.ones((1, 2), np.float32)

    async def main():
        async with offset_models(tmp_path) as engine:
            busy = asyncio.ensure_future(engine.infer("z", {"x": -x}))  # in flight 0.5 s
            await asyncio.sleep(0.2)
            removal = asyncio.ensure_future(engine.remove_model("z"))
            await asyncio.sleep(0.05)  # the unload waits for the request in flight
            waiting = [asyncio.ensure_future(engine.infer("z", {"x": x})) for _ in range(3)]
            await removal
            results = await asyncio.gather(busy, *waiting, return_exceptions=True)
            await asyncio.sleep(0.2)
            rows = [r for r in engine.stats()["models"] if r["name"] == "z"]
            await engine.add_model("z", str(tmp_path / "b"))
            again = await engine.infer("z", {"x": x})
            return results, rows, again, engine.stats()["totals"]

    results, rows, again, totals = run(main())
    np.testing.assert_array_equal(results[0]["y"], -x + 1.0)
    assert [type(r).__name__ for r in results[1:]] == ["ModelNotFound"] * 3, results
    assert rows == []
    np.testing.assert_array_equal(again["y"], x + 2.0)
    assert totals["loads"] == 2 and totals["evictions"] == 1  # the removed one's count too


def test_the_repository_watch_goes_on_after_a_scan_fails(tmp_path, own_segments, monkeypatch):
    # A scan that could not read the repository (no descriptor left, say)
    # ended the watch for good: no model or version added, no manifest
    # edited (a token revoked) was seen again until a restart.
    import errno

    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    scandir, failing, failed = os.scandir, [True], [0]

    def flaky(path):
        if failing[0] and os.fspath(path) == str(tmp_path):
            failed[0] += 1
            raise OSError(errno.EMFILE, "Too many open files")
        return scandir(path)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.models()
            monkeypatch.setattr(os, "scandir", flaky)
            await until(lambda: failed[0] >= 2, 10, "scans that fail")
            failing[0] = False
            demo.write_mlp(tmp_path / "new", "safetensors", *DIMS, seed=3)

            async def seen():
                return {r["name"] for r in await engine.models()} == {"m", "new"}
            await eventually(seen, 10, "a scan after the failed ones")

    run(main())


def test_a_model_removed_while_a_request_reads_its_manifest_is_not_loaded_by_it(
        tmp_path, own_segments):
    # The request counted the name's changes only once its look had ended:
    # a removal between the two went unseen, and it loaded the removed model.
    x = np.ones((1, 2), np.float32)

    async def main():
        async with offset_models(tmp_path) as engine:
            await engine.infer("z", {"x": x})
            await engine.unload("z")
            late = asyncio.ensure_future(engine.infer("z", {"x": x}, version=1))
            for _ in range(100):
                if ("z", 1) in engine._resolving:
                    break
                await asyncio.sleep(0)
            time.sleep(0.05)  # the look ends in its thread; the loop has not resumed it
            await engine.remove_model("z")
            result = await asyncio.gather(late, return_exceptions=True)
            await engine.add_model("z", str(tmp_path / "b"))
            return result[0], (await engine.infer("z", {"x": x}))["y"]

    late, again = run(main())
    assert isinstance(late, ModelNotFound), late
    np.testing.assert_array_equal(again, x + 2.0)


def test_removing_a_repository_model_is_refused_before_anything_is_unloaded(
        tmp_path, own_segments):
    # remove_model() of a model of the repository's directory unloaded it
    # and dropped its pin, then said ModelNotFound of a model that exists.
    x = np.ones((1, 2), np.float32)
    version = tmp_path / "repo" / "r" / "1"
    version.mkdir(parents=True)
    (version / "handler.py").write_text(OFFSET_HANDLER.format(offset=3.0))

    async def main():
        async with offset_models(tmp_path) as engine:
            await engine.pin("r")
            with pytest.raises(BadRequest, match="is the repository's, not added at run time"):
                await engine.remove_model("r")
            with pytest.raises(ModelNotFound, match="nope"):
                await engine.remove_model("nope")
            row = engine.model_row(("r", 1))
            return row["state"], row["pinned"], (await engine.infer("r", {"x": x}))["y"]

    state, pinned, y = run(main())
    assert (state, pinned) == ("resident", True)
    np.testing.assert_array_equal(y, x + 3.0)


def test_a_model_whose_directory_cannot_be_read_is_a_failed_load_backed_off(
        tmp_path, own_segments, monkeypatch):
    # Its failure was not recorded (looking up its versions to record it
    # failed again): no failure in stats, no back-off, every request read
    # the directory anew. (Root reads any directory: its refusal is made here.)
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    demo.write_mlp(tmp_path / "locked", "safetensors", *DIMS, seed=2)
    scandir, looks = os.scandir, [0]

    def refusing(path):
        if os.fspath(path) == str(tmp_path / "locked"):
            looks[0] += 1
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            monkeypatch.setattr(os, "scandir", refusing)
            for _ in range(3):
                with pytest.raises(LoadFailed, match="'locked' cannot be read"):
                    await engine.infer("locked", {"x": x_for(np.random.default_rng(1))})
            await engine.infer("m", {"x": x_for(np.random.default_rng(1))})
            return engine.model_row(("locked", 1)), looks[0]

    row, looked = run(main())
    assert row["state"] == "failed" and row["failures"] == 1, row
    assert looked <= 2, looked  # the first request's look; the others were backed off


def test_a_full_worker_refuses_its_neighbours_and_names_what_holds_it(tmp_path, own_segments):
    # A model flooding its worker past max_queue_per_worker gets the models
    # beside it refused: the refusal says which model the worker is busy with.
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    demo.write_mlp(tmp_path / "fast", "safetensors", *DIMS, seed=1)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, max_queue_per_worker=3,
                                 request_timeout_s=60)) as engine:
            await engine.infer("fast", {"x": x_for(np.random.default_rng(0))})
            second = {"seconds": np.array([0.3], np.float32)}
            flood = [asyncio.ensure_future(engine.infer("slow", second)) for _ in range(3)]
            while engine.pool.workers[0].in_flight < 3:  # the first loads "slow"
                await asyncio.sleep(0.01)
            with pytest.raises(Overloaded, match=r"^worker 0 has 3 requests in flight, 3 of "
                                                 r"them for slow v1; retry later$"):
                await engine.infer("fast", {"x": x_for(np.random.default_rng(1))})
            assert [float(r["y"][0]) for r in await asyncio.gather(*flood)] == [np.float32(0.6)] * 3
            await engine.infer("fast", {"x": x_for(np.random.default_rng(2))})  # served again

    run(main())


@pytest.mark.parametrize("backlog_ms, fair", [(2.0, True), (0.0, False)])
def test_a_flooded_model_delays_its_neighbour_by_a_turn_not_its_queue(tmp_path, own_segments,
                                                                      backlog_ms, fair):
    # One worker, two models: "slow" flooded with a second of work, then one
    # request for "fast". With a bounded backlog the flood waits in the
    # front-end and "fast" goes in at the next turn: it waits for the call
    # under way and the one ready behind it. In one queue (backlog 0) it
    # waits for the whole flood. Every request of the flood is answered.
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    demo.write_mlp(tmp_path / "fast", "safetensors", *DIMS, seed=1)
    call = {"seconds": np.array([0.05], np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, request_timeout_s=60,
                                 worker_backlog_ms=backlog_ms)) as engine:
            await engine.infer("fast", {"x": x_for(np.random.default_rng(0))})
            await engine.infer("slow", call)  # loaded, and its time known
            flood = [asyncio.ensure_future(engine.infer("slow", call)) for _ in range(20)]
            await asyncio.sleep(0)  # all sent or queued
            t0 = time.monotonic()
            await engine.infer("fast", {"x": x_for(np.random.default_rng(1))})
            waited = time.monotonic() - t0
            answers = await asyncio.gather(*flood)
            return waited, [float(a["y"][0]) for a in answers]

    waited, answers = run(main())
    assert answers == [np.float32(0.1)] * 20
    if fair:
        assert waited < 0.3, waited  # the call under way and the one ready: 0.1 s, and stalls
    else:
        assert waited > 0.8, waited  # the flood's 20 calls


def test_requests_that_time_out_waiting_their_turn_are_dropped_unsent(tmp_path,
                                                                      own_segments):
    # A flood of 20 calls of 0.1 s, each with 0.25 s to live: two go into
    # the worker's ring, the rest wait their turn in the front-end and time
    # out there. They are dropped when their turn comes, never sent: the
    # worker runs the calls that could be answered, the model's pins all go,
    # and every dropped request is counted as skipped.
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    call = {"seconds": np.array([0.1], np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, request_timeout_s=60)) as engine:
            skipped, late = [], []
            engine.observers.append(lambda kind, f: kind == "skipped" and skipped.append(f))
            engine.observers.append(lambda kind, f: kind == "late" and late.append(f))
            await engine.infer("slow", call)
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(engine.infer("slow", call, timeout=0.25) for _ in range(20)),
                return_exceptions=True)
            # Those whose deadline passed as they waited left their queues then.
            assert engine.pool.workers[0].waiting_turn == 0
            while engine.pool.workers[0].in_flight and time.monotonic() < t0 + 5:
                await asyncio.sleep(0.01)
            drained = time.monotonic() - t0
            pins = next(r["pins"] for r in engine.stats()["models"] if r["name"] == "slow")
            return results, drained, pins, skipped, late

    results, drained, pins, skipped, late = run(main())
    answered = [r for r in results if not isinstance(r, BaseException)]
    timed_out = [r for r in results if isinstance(r, Timeout)]
    assert len(answered) + len(timed_out) == 20, results
    assert 1 <= len(answered) <= 3, len(answered)
    assert len(skipped) + len(late) == len(timed_out)
    assert len(skipped) >= 15, (len(skipped), len(late))
    assert drained < 1.0, drained  # the calls answered and one late, not 20 calls
    assert pins == 0


def test_two_floods_on_one_worker_share_its_time_not_its_calls(tmp_path, own_segments):
    # Two models flooded at once on one worker, one whose calls take four
    # times the other's: in turns by their calls' time, each gets about half
    # of the worker's time, so the quick one answers about four times as
    # many. (Turns by calls would give the slow one four fifths of it.)
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    write_handler(tmp_path, "quick", SLOW_HANDLER)
    slow, quick = {"seconds": np.array([0.02], np.float32)}, \
        {"seconds": np.array([0.005], np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, request_timeout_s=60)) as engine:
            await engine.infer("slow", slow)
            await engine.infer("quick", quick)
            assert engine.model_row(("quick", 1))["worker"] == 0
            done, counts = False, {"slow": 0, "quick": 0}

            async def flood(name, call):
                while not done:
                    await engine.infer(name, call)
                    counts[name] += 1

            floods = [asyncio.ensure_future(flood(n, c)) for n, c in
                      [("slow", slow)] * 8 + [("quick", quick)] * 8]
            await asyncio.sleep(0.3)  # both queues fill, and the calls are timed
            before = dict(counts)
            await asyncio.sleep(1.5)
            counted = {k: counts[k] - before[k] for k in counts}
            done = True
            await asyncio.gather(*floods)
            return counted

    counted = run(main())
    share = counted["slow"] * 0.02 / (counted["slow"] * 0.02 + counted["quick"] * 0.005)
    assert 0.3 < share < 0.7, counted


def test_requests_waiting_their_turn_fail_typed_when_the_engine_stops(tmp_path,
                                                                      own_segments):
    # A stop whose drain runs out while a flood waits its turn: those
    # waiting fail WORKER_DIED at once, saying so; the call under way in
    # the worker's ring fails as any the stop cuts off (or ends in its
    # grace). None fails as an unreadable answer.
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    call = {"seconds": np.array([0.3], np.float32)}

    async def main():
        engine = Engine(Config(repo=str(tmp_path), workers=1, request_timeout_s=60))
        await engine.start()
        try:
            await engine.infer("slow", call)
            await engine.infer("slow", call)  # its time known: one at a time in the ring
            flood = [asyncio.ensure_future(engine.infer("slow", call)) for _ in range(6)]
            await asyncio.sleep(0.05)
            waiting = engine.stats()["workers"][0]["waiting_turn"]
            await engine.stop(time.monotonic() + 0.1)
            return waiting, await asyncio.gather(*flood, return_exceptions=True)
        finally:
            await engine.stop()

    waiting, results = run(main())
    assert waiting == 5
    # The call under way may end within the workers' grace (0.2 s).
    assert isinstance(results[0], WorkerDied) or results[0]["y"][0] == np.float32(0.6)
    assert all(isinstance(r, WorkerDied) for r in results[1:]), results
    assert all("waiting its turn" in str(r) for r in results[1:]), results
    assert not any("unreadable" in str(r) for r in results), results


def test_requests_cancelled_as_they_wait_their_turn_leave_at_once(tmp_path, own_segments):
    # A caller that goes away (a closed connection cancels its requests)
    # takes its requests out of their queue in the same turn of the loop,
    # pins and all: they do not wait for their turn to be dropped.
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    call = {"seconds": np.array([0.2], np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, request_timeout_s=60)) as engine:
            skipped = []
            engine.observers.append(lambda kind, f: kind == "skipped" and skipped.append(f))
            await engine.infer("slow", call)
            await engine.infer("slow", call)
            flood = [asyncio.ensure_future(engine.infer("slow", call)) for _ in range(6)]
            await asyncio.sleep(0.02)
            worker = engine.pool.workers[0]
            waiting = worker.waiting_turn
            for fut in flood[2:]:
                fut.cancel()
            await asyncio.sleep(0.02)  # well within the call under way
            left = worker.waiting_turn, worker.in_flight, len(skipped)
            answers = await asyncio.gather(*flood[:2])
            pins = next(r["pins"] for r in engine.stats()["models"] if r["name"] == "slow")
            return waiting, left, [float(a["y"][0]) for a in answers], pins

    waiting, left, answers, pins = run(main())
    assert waiting == 5
    assert left == (1, 2, 4)
    assert answers == [np.float32(0.4)] * 2 and pins == 0


def test_a_request_whose_turn_comes_too_late_is_dropped_then(tmp_path, own_segments):
    # Calls of 0.2 s: one runs, the next goes into the ring as it nears its
    # end, and a third waits its turn with 0.5 s to live. Its turn comes as
    # the second nears its end (0.4 s), with 0.1 s left for a 0.2 s call:
    # it fails then, before its deadline, not when the deadline comes.
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    call = {"seconds": np.array([0.2], np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, request_timeout_s=60)) as engine:
            await engine.infer("slow", call)
            await engine.infer("slow", call)
            t0 = time.monotonic()
            ahead = [asyncio.ensure_future(engine.infer("slow", call)) for _ in range(2)]
            await asyncio.sleep(0)  # they are sent first
            try:
                await engine.infer("slow", call, timeout=0.5)
            except Timeout as e:
                failed = e, time.monotonic() - t0
            else:
                raise AssertionError("a request that could not make its deadline ran")
            return failed, await asyncio.gather(*ahead)

    (error, at), ahead = run(main())
    assert "could not have finished" in str(error)  # said at its turn only (workers.py)
    assert 0.2 < at < 0.5, at  # behind the first call, before its deadline
    assert [float(a["y"][0]) for a in ahead] == [np.float32(0.4)] * 2


def test_a_neighbour_of_a_slow_flood_waits_for_the_call_under_way_alone(tmp_path,
                                                                        own_segments):
    # Calls of 0.3 s flooded on one worker: the next goes into the ring
    # only as the call under way nears its end, so a neighbour's request
    # coming 0.1 s into a call goes in before it and is answered as that
    # call ends (0.2 s later), not after the next one too (0.5 s).
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    demo.write_mlp(tmp_path / "fast", "safetensors", *DIMS, seed=1)
    call = {"seconds": np.array([0.3], np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, request_timeout_s=60)) as engine:
            await engine.infer("fast", {"x": x_for(np.random.default_rng(0))})
            await engine.infer("slow", call)
            await engine.infer("slow", call)
            flood = [asyncio.ensure_future(engine.infer("slow", call)) for _ in range(4)]
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            await engine.infer("fast", {"x": x_for(np.random.default_rng(1))})
            waited = time.monotonic() - t0
            return waited, await asyncio.gather(*flood)

    waited, flood = run(main())
    assert waited < 0.35, waited
    assert [float(a["y"][0]) for a in flood] == [np.float32(0.6)] * 4


def test_a_request_expired_in_the_ring_does_not_hold_back_the_turn_behind_it(tmp_path,
                                                                            own_segments):
    # Calls of 0.3 s: A runs, B waits in the ring with 0.1 s to live, C
    # waits its turn with 0.7 s. B expires unbegun: the worker will skip it,
    # so C's turn (as A ends) counts no call ahead of it and C is sent, with
    # the time to run. Counted as still ahead, B would push C's begin past
    # its deadline, and C would be dropped at its turn.
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    call = {"seconds": np.array([0.3], np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, request_timeout_s=60)) as engine:
            await engine.infer("slow", call)
            await engine.infer("slow", call)
            a = asyncio.ensure_future(engine.infer("slow", call))
            b = asyncio.ensure_future(engine.infer("slow", call, timeout=0.1))
            await asyncio.sleep(0)  # sent first, in order
            c = await engine.infer("slow", call, timeout=0.7)
            return await a, await asyncio.gather(b, return_exceptions=True), c

    a, (b,), c = run(main())
    assert isinstance(b, Timeout), b
    assert float(a["y"][0]) == float(c["y"][0]) == np.float32(0.6)


WARMING_HANDLER = '''
import time

calls = [0]

def load(path, device):
    calls[0] = 0

def predict(inputs):
    calls[0] += 1
    time.sleep(0.8 if calls[0] == 1 else float(inputs["seconds"][0]))
    return {"y": inputs["seconds"] * 2}
'''


def test_a_reloaded_models_first_call_is_a_warm_up_again(tmp_path, own_segments):
    # A model whose first call after each load takes 0.8 s, its others
    # 0.05 s. Unloaded and loaded again, its first call is the warm-up, not
    # a call that says the model became slow: a request waiting its turn
    # behind two calls, with 0.25 s to live, is sent and answered. (Judged
    # by calls averaged with the warm-up, it would be dropped at its turn.)
    write_handler(tmp_path, "warming", WARMING_HANDLER)
    call = {"seconds": np.array([0.05], np.float32)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, request_timeout_s=60)) as engine:
            for _ in range(4):
                await engine.infer("warming", call)
            await engine.unload("warming")
            await engine.infer("warming", call)  # the warm-up
            ahead = [asyncio.ensure_future(engine.infer("warming", call)) for _ in range(2)]
            await asyncio.sleep(0)
            last = await engine.infer("warming", call, timeout=0.25)
            return last, await asyncio.gather(*ahead)

    last, ahead = run(main())
    assert [float(r["y"][0]) for r in [last, *ahead]] == [np.float32(0.1)] * 3


# Each call waits, once it has begun (the file "called" says so), for the
# file "go" beside it (20 s at most). What it uses comes as defaults: closed
# meanwhile, its module is emptied.
GATED_CALL_HANDLER = """
import os
import time

where = []

def load(path, device):
    where[:] = [path]

def predict(inputs, where=where, os=os, time=time):
    open(os.path.join(where[0], "called"), "w").close()
    end = time.monotonic() + 20
    while not os.path.exists(os.path.join(where[0], "go")) and time.monotonic() < end:
        time.sleep(0.005)
    return {"y": inputs["x"]}
"""


def test_a_call_noted_after_its_models_unload_leaves_it_no_figure(tmp_path):
    """A worker's serving thread notes a call's time once its answer is out
    (WorkerLogic.noted), by when the loader thread may have unloaded the
    model (the answer unpinned it; the front-end sent the unload), and
    forgotten its figure. Noted all the same, the figure came back for a
    model no longer resident, and the model's next load took its first
    call, a warm-up, for its time. The worker's own two threads on real
    rings, in-process: the model's unload is answered while its call runs."""
    import threading

    from mmengine import worker
    from mmengine.ring import Ring

    version = write_handler(tmp_path, "gated", GATED_CALL_HANDLER)
    key, x = ("gated", 1), {"x": np.ones((1, 2), np.float32)}
    rings = [Ring.create(1 << 16, spin_us=0.0) for _ in range(3)]
    ends = [Ring.attach(r.handle) for r in rings]
    (ctl, ctl_in), (req, req_in), (resp, resp_out) = zip(rings, ends)
    logic = worker.WorkerLogic(Config(repo=str(tmp_path)), "cpu")
    out, abandoned = worker._Responder(resp_out), messages.Abandoned.create()
    spins = {messages.Op.LOAD: True, messages.Op.PUBLISH: True}
    loader = threading.Thread(target=worker._serve_control, args=(ctl_in, req_in, out, logic, spins))
    serving = threading.Thread(target=worker._serve, args=(req_in, out, logic, abandoned, None))
    loader.start()
    serving.start()

    def answer(rid: int) -> int:
        got, code, _, _ = messages.parse_response(resp.get(timeout=30)[0])
        resp.release()
        assert got == rid
        return code

    try:
        ctl.put(messages.request(messages.Op.LOAD, 1, *key, [], {"path": str(version)}))
        assert answer(1) == messages.OK
        header, bufs = messages.request_record(messages.Op.INFER, 2, *key, x)
        req.put(header, *bufs)
        end = time.monotonic() + 30
        while not (version / "called").exists():  # the call has begun
            assert time.monotonic() < end, "the call never began"
            time.sleep(0.005)
        ctl.put(messages.request(messages.Op.UNLOAD, 3, *key))
        assert answer(3) == messages.OK  # unloaded, its figure forgotten
        (version / "go").write_text("")
        assert answer(2) == messages.OK
    finally:
        req.close()  # the serving thread returns once it has noted the call
        ctl.close()
        serving.join(30)
        loader.join(30)
        for r in (*ends, *rings[::2]):
            r.close()
    assert not serving.is_alive() and not loader.is_alive()
    assert key not in logic.models
    assert key not in logic.times._calls, logic.times._calls
    # Loaded again, its first call is a warm-up: no figure yet.
    logic.load(*key, str(version))
    outputs, ran, error = worker._call(0, logic, abandoned, None, *key, x)
    assert error is None
    logic.noted(key, ran)
    assert logic.times.expected(key) is None
    logic.close(key, logic.unload(*key))


def test_a_request_its_caller_cancels_while_the_engine_stops_is_cancelled(tmp_path,
                                                                         own_segments):
    # A cold request (it waited for its model's load) cancelled by its
    # caller (a client gone) while stop() drained ended as ShuttingDown, not
    # cancelled: its worker was not told to skip it, the drain waited for
    # its 3 s call, and it counted OVERLOADED (a review).
    write_handler(tmp_path, "slow", SLOW_HANDLER)

    async def main():
        seen = []
        async with Engine(Config(repo=str(tmp_path), workers=1, worker_backlog_ms=0)) as engine:
            engine.observers.append(lambda kind, f: seen.append((kind, f.get("code"))))
            worker = engine.pool.workers[0]
            first = asyncio.ensure_future(engine.infer("slow", {"seconds": np.array([1.0])}))
            second = asyncio.ensure_future(engine.infer("slow", {"seconds": np.array([3.0])}))
            await until(lambda: worker.in_flight == 2, 20, "both sent")
            stopping = asyncio.ensure_future(engine.stop())
            await asyncio.sleep(0.05)
            second.cancel()
            await stopping
            with pytest.raises(asyncio.CancelledError):
                await second
            assert (await first)["y"][0] == 2.0
        return seen

    seen = run(main())
    assert ("request", "CANCELLED") in seen and ("skipped", None) in seen, seen
    assert ("late", None) not in seen and ("request", "OVERLOADED") not in seen, seen


ECHO_HANDLER = """
def load(path, device):
    pass

def predict(inputs):
    return {"y": inputs["x"]}
"""


def test_requests_cut_off_at_stop_each_say_where_they_were(tmp_path, own_segments):
    # Those waiting their turn at the deadline shared one WorkerDied: each
    # said the last one's version and send time, to observers too (a
    # version its model does not have: a review).
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    for name, version in (("echo-a", 1), ("echo-b", 7)):
        (tmp_path / name / str(version)).mkdir(parents=True)
        (tmp_path / name / str(version) / "handler.py").write_text(ECHO_HANDLER)

    async def main():
        seen = []
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            engine.observers.append(lambda kind, f: kind == "request" and seen.append(f))
            for name in ("slow", "echo-a", "echo-b"):
                await engine.load(name)
            for seconds in (0.3, 1.0):  # its calls' time: ~1 s (the first is not counted)
                await engine.infer("slow", {"seconds": np.array([seconds])})
            worker = engine.pool.workers[0]
            running = asyncio.ensure_future(engine.infer("slow", {"seconds": np.array([3.0])}))
            await until(lambda: (worker.running() or (0, 0, False))[2], 20, "the slow call")
            waiting = [asyncio.ensure_future(engine.infer(name, {"x": np.ones(2, np.float32)}))
                       for name in ("echo-a", "echo-b")]
            await until(lambda: worker.waiting_turn == 2, 20, "both waiting their turn")
            await engine.stop(deadline=time.monotonic() + 0.3)
        errors = [f.exception() for f in waiting]
        assert running.exception() is not None
        return errors, seen

    errors, seen = run(main())
    assert all(isinstance(e, WorkerDied) for e in errors) and errors[0] is not errors[1]
    assert [e.ran["version"] for e in errors] == [1, 7]
    versions = {f["model"]: f["version"] for f in seen if f["code"] == "WORKER_DIED"}
    assert versions.get("echo-a") == 1 and versions.get("echo-b") == 7, seen
