"""Requests joined into one call (a manifest's max_batch_size): a real
server and worker, requests queued together through the SDK, each answer
checked against its own inputs."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import urllib.request

import numpy as np
import pytest

from conftest import SLOW_HANDLER, Server, environ, run, write_handler
from mmengine import batching, demo, diskcache, resources, trace
from mmengine.calltimes import CallTimes
from mmengine.config import Config
from mmengine.engine import Engine
from mmengine.client import AsyncClient
from mmengine.errors import BadRequest, InternalError, LoadFailed, Timeout
from mmengine.server import metrics
from mmengine.storage import read_spec

def _handler(answer: str) -> str:
    """A handler that sleeps as long as its largest x[:, 0] says, then
    answers `answer` (of x)."""
    return ("import time\nimport numpy as np\n\ndef load(path, device):\n    pass\n\n"
            "def predict(inputs):\n    x = inputs['x']\n    time.sleep(float(x[:, 0].max()))\n"
            f"    return {answer}\n")


# Each row twice its input, and how many rows the call had.
ROWS_HANDLER = _handler('{"y": x * 2, "rows": np.full(len(x), len(x), np.int64)}')
# One row for the whole call, however many it was given.
WHOLE_HANDLER = _handler('{"y": x.sum(axis=0, keepdims=True)}')
# Answers the torch threads of the process it runs in.
THREADS_HANDLER = '''
import numpy as np
import torch

def load(path, device):
    pass

def predict(inputs):
    return {"y": np.array([torch.get_num_threads()])}
'''
# Raises on a NaN among its inputs.
PICKY_HANDLER = _handler('{"y": x * 2} if not np.isnan(x).any() else '
                         'exec("raise ValueError(\'not a number\')")')
LIMIT = 4
DIMS = (16, 32, 8)


def _manifest(limit: int) -> str:
    return (f"max_batch_size = {limit}\n"
            '[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, -1]\n')


@pytest.fixture(scope="module")
def served(request, tmp_path_factory) -> tuple[tuple[str, int], str]:
    """The TCP address and the HTTP URL of a server of the models above."""
    root = tmp_path_factory.mktemp("repo")
    write_handler(root, "rows", ROWS_HANDLER, _manifest(LIMIT))
    write_handler(root, "rows2", ROWS_HANDLER, _manifest(LIMIT))
    write_handler(root, "alone", ROWS_HANDLER, _manifest(0))
    write_handler(root, "whole", WHOLE_HANDLER, _manifest(LIMIT))
    write_handler(root, "picky", PICKY_HANDLER, _manifest(LIMIT))
    write_handler(root, "threads", THREADS_HANDLER)
    mlp = demo.write_mlp(root / "mlp", "safetensors", *DIMS)
    (mlp / "model.toml").write_text(f"max_batch_size = {LIMIT}\n"
                                    + (mlp / "model.toml").read_text())
    # One worker: every request queues behind the one running; and no
    # bound on the worker's backlog: each goes into its ring at once, so
    # that what the worker joins does not depend on when the front-end
    # lets them in (test_waiting_requests_go_in_together).
    server = Server("--repo", str(root), "--workers", "1", "--tcp-port", "0",
                    "--http-port", "0", env=environ(MMENGINE_WORKER_BACKLOG_MS="0"))
    request.addfinalizer(lambda: server.proc.poll() is None and server.stop())
    m = server.wait_for(r"serving .* on tcp://(\S+):(\d+)", 60)
    web = server.wait_for(r"HTTP .* on (http://\S+:\d+)", 60)
    return (m.group(1), int(m.group(2))), web.group(1)


@pytest.fixture(scope="module")
def address(served) -> tuple[str, int]:
    return served[0]


def x_rows(first: float, n: int, width: int = 3, seed: int = 0) -> np.ndarray:
    """n rows of `width` distinct values, the first column `first` (the
    handlers' sleep)."""
    x = np.random.default_rng(seed).random((n, width), dtype=np.float32) + 10
    x[:, 0] = first
    return x


async def _behind_one(address, model: str, requests: list, block_s: float = 0.3,
                      timeout: float = 30.0) -> list:
    """Sends one request that holds the worker for `block_s`, then
    `requests` ([inputs, or (inputs, timeout)]) at once behind it: they
    queue together. Their answers, or the errors they raised."""
    async with AsyncClient(f"{address[0]}:{address[1]}") as c:
        await c.infer(model, {"x": x_rows(0.0, 1)})  # loaded: the block is a call alone
        first = asyncio.ensure_future(c.infer(model, {"x": x_rows(block_s, 1)}))
        await asyncio.sleep(0.05)  # the worker has begun it
        calls = []
        for r in requests:
            x, timeout = r if isinstance(r, tuple) else (r, None)
            calls.append(c.infer(model, {"x": x}, timeout=timeout, timing=True))
        answers = await asyncio.gather(*calls, return_exceptions=True)
        await first
        return answers


def test_queued_requests_are_joined_and_each_gets_its_rows(address):
    xs = [x_rows(0.0, 1, seed=i) for i in range(10)]
    answers = run(_behind_one(address, "rows", xs))
    batches = []
    for x, out in zip(xs, answers):
        assert not isinstance(out, BaseException), out
        np.testing.assert_array_equal(out["y"], x * 2)  # its own row, none other's
        rows = int(out["rows"][0])
        assert 1 <= rows <= LIMIT
        assert out.timing.get("batch", 1) == rows
        batches.append(rows)
    # Ten requests queued at once: calls of the limit while they last.
    assert max(batches) == LIMIT


@pytest.fixture(scope="module")
def bounded(request, tmp_path_factory) -> tuple[str, int]:
    """A server with the default bound on its worker's backlog: past it,
    requests wait in the front-end for their turn."""
    root = tmp_path_factory.mktemp("bounded")
    write_handler(root, "rows", ROWS_HANDLER, _manifest(LIMIT))
    write_handler(root, "rows2", ROWS_HANDLER, _manifest(LIMIT))
    write_handler(root, "alone", ROWS_HANDLER, _manifest(0))
    server = Server("--repo", str(root), "--workers", "1", "--tcp-port", "0",
                    "--http-port", "-1", env=environ())
    request.addfinalizer(lambda: server.proc.poll() is None and server.stop())
    m = server.wait_for(r"serving .* on tcp://(\S+):(\d+)", 60)
    return m.group(1), int(m.group(2))


def test_waiting_requests_go_in_together(bounded):
    """Requests that wait in the front-end for their turn (the worker's
    backlog is full) go into its ring as one call's, not one at a time."""
    xs = [x_rows(0.0, 1, seed=i) for i in range(9)]
    answers = run(_behind_one(bounded, "rows", xs))
    for x, out in zip(xs, answers):
        np.testing.assert_array_equal(out["y"], x * 2)
    assert max(int(out["rows"][0]) for out in answers) == LIMIT


def _triton_counts(http: str, model: str) -> tuple[int, int]:
    with urllib.request.urlopen(f"{http}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.load(r)["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


def test_triton_counts_a_joined_call_as_one_execution(served):
    address, http = served
    before = _triton_counts(http, "rows")
    answers = run(_behind_one(address, "rows", [x_rows(0.0, 1, seed=i) for i in range(8)]))
    calls = 2 + round(sum(1 / out.timing.get("batch", 1) for out in answers))  # + warm-up, block
    inferences, executions = _triton_counts(http, "rows")
    assert inferences - before[0] == 10
    assert executions - before[1] == calls < 10


def test_a_call_let_in_together_keeps_its_time_when_its_first_is_abandoned(tmp_path,
                                                                          own_segments):
    """The front-end books a call of waiting requests let in together on
    its first; the worker skips that one, abandoned, and runs the others as
    one call all the same. Its time went with the first: the call ran
    uncounted, the ring looked empty under it, and more calls went in ahead
    of a neighbour's request."""
    from conftest import until

    write_handler(tmp_path, "rows", ROWS_HANDLER, _manifest(LIMIT))

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, worker_backlog_ms=1)) as engine:
            worker = engine.pool.workers[0]
            for _ in range(4):  # its call time is known: ~50 ms
                await engine.infer("rows", {"x": x_rows(0.05, 1)})
            # Runs 1 s, booked ~50 ms: past them, the ring has room, and the
            # requests waiting go in behind it, together, as one call.
            running = asyncio.ensure_future(engine.infer("rows", {"x": x_rows(1.0, 1)}))
            xs = [x_rows(0.0, 1, seed=i) for i in range(LIMIT)]
            call = [asyncio.ensure_future(engine.infer("rows", {"x": x})) for x in xs]
            await until(lambda: len(worker._sent_ns) == 1 + LIMIT, 5, "the call let in")
            booked = worker._ring_ns
            first = list(worker._sent_ns)[1]  # the call's (behind the one running)
            call[0].cancel()
            await until(lambda: worker._sent_ns[first] == 0, 5, "the first abandoned")
            kept = worker._ring_ns
            await running
            answers = await asyncio.gather(*call[1:])
            return booked, kept, answers, xs

    booked, kept, answers, xs = run(main())
    assert kept == booked  # the call's time, now on its second
    for x, out in zip(xs[1:], answers):
        np.testing.assert_array_equal(out["y"], x * 2)
        assert int(out["rows"][0]) == LIMIT - 1  # the three, as one call


def test_requests_that_cannot_join_each_count_as_a_call(bounded):
    """Requests of the batch's whole rows each are each a call of their
    own: the front-end counts each against the worker's backlog, and a
    neighbour's request waits for one call at most, not for all of them."""
    async def go():
        async with AsyncClient(f"{bounded[0]}:{bounded[1]}") as c:
            full = x_rows(0.15, LIMIT)  # a call's rows each: none joins another
            for _ in range(3):
                await c.infer("rows", {"x": full})  # its calls' time is known
            await c.infer("alone", {"x": x_rows(0.0, 1)})
            flood = [asyncio.ensure_future(c.infer("rows", {"x": full})) for _ in range(8)]
            await asyncio.sleep(0.2)  # one or two calls in: the rest wait their turn
            t0 = time.monotonic()
            await c.infer("alone", {"x": x_rows(0.0, 1)})
            waited = time.monotonic() - t0
            answers = await asyncio.gather(*flood)
            return waited, answers
    waited, answers = run(go())
    assert all(int(out["rows"][0]) == LIMIT for out in answers)
    # Behind the call under way (0.15 s), not behind the flood (1.2 s).
    assert waited < 0.6, waited


def test_a_joined_call_that_fails_is_made_again_request_by_request(address):
    """A value that makes the model raise fails its own request only."""
    xs = [x_rows(0.0, 1, seed=i) for i in range(4)]
    xs[2][0, 1] = np.nan  # the handler below raises on it
    answers = run(_behind_one(address, "picky", xs))
    assert isinstance(answers[2], BadRequest) and "not a number" in str(answers[2])
    for i in (0, 1, 3):
        np.testing.assert_array_equal(answers[i]["y"], xs[i] * 2)


def test_a_joined_call_that_fails_is_counted_and_traced_as_an_execution(tmp_path):
    """The joined call that raised ran all the same: it was no execution in
    Triton's count, nor a call on its worker's track, where one that
    answered was both (a review's finding)."""
    repo = tmp_path / "repo"
    write_handler(repo, "picky", PICKY_HANDLER, _manifest(LIMIT))
    path = tmp_path / "trace.json"

    async def go():
        async with Engine(Config(repo=str(repo), workers=1, worker_backlog_ms=0)) as engine:
            counts = metrics.attach(engine)
            tracer = trace.Trace(path)
            engine.observers.append(tracer)
            await engine.infer("picky", {"x": x_rows(0.0, 1)})
            block = asyncio.ensure_future(engine.infer("picky", {"x": x_rows(0.3, 1)}))
            await asyncio.sleep(0.05)
            xs = [x_rows(0.0, 1, seed=i) for i in range(3)]
            xs[1][0, 1] = np.nan  # the handler raises on it: the call of all three fails
            answers = await asyncio.gather(*(engine.infer("picky", {"x": x}) for x in xs),
                                           return_exceptions=True)
            await block
            engine.flush_observations()
            engine.observers.remove(tracer)
            tracer.close()
            return answers, counts.version_stats([("picky", 1)])[0]
    answers, stats = run(go())
    assert isinstance(answers[1], BadRequest) and not isinstance(answers[0], BaseException)
    # The first, the block, the joined call that failed, and the two of its
    # requests that ran alone again and were answered (the third failed alone).
    assert (stats["inference_count"], stats["execution_count"]) == (4, 5), stats
    calls = [e for e in trace.read(path) if e.get("cat") == "compute"]
    failed = [e for e in calls if e["name"] == "picky x3 (failed)"]
    assert len(failed) == 1 and failed[0]["args"]["batch"] == 3, calls
    assert len(calls) == 6, calls  # each call once: the joined one and five alone


def test_a_joined_call_that_fails_counts_its_time(tmp_path):
    """The joined call that raised took its worker's time: it counts once
    in the front-end's figure of the model's calls (what its worker's
    ring is filled by; the worker's own figure counted it), and in the
    compute stage of each of its requests answered OK, as a joined call
    that answered does, not in their queue: the worker had taken them.
    It counted in neither (a review's finding)."""
    repo = tmp_path / "repo"
    write_handler(repo, "picky", PICKY_HANDLER, _manifest(LIMIT))
    told = []

    async def go():
        async with Engine(Config(repo=str(repo), workers=1, worker_backlog_ms=0)) as engine:
            counts = metrics.attach(engine)
            engine.observers.append(lambda kind, f: kind == "request" and told.append(f))
            await engine.infer("picky", {"x": x_rows(0.0, 1)})
            block = asyncio.ensure_future(engine.infer("picky", {"x": x_rows(0.3, 1)}))
            await asyncio.sleep(0.05)
            xs = [x_rows(0.0, 1, seed=i) for i in range(3)]
            xs[1][0, 0] = 0.2  # the joined call sleeps as long, then raises on the NaN
            xs[1][0, 1] = np.nan
            await asyncio.gather(*(engine.infer("picky", {"x": x}) for x in xs),
                                 return_exceptions=True)
            await block
            engine.flush_observations()
            calls = engine.pool.workers[0]._times._calls[("picky", 1)]
            requests = counts._requests["picky"]
            return calls[:2], counts.version_stats([("picky", 1)])[0], requests.queue_s, \
                requests.compute.sum

    figures, stats, queue_s, compute_s = run(go())
    failed = {(c["t_recv"], c["t_done"], c["batch"]) for c in (f.get("failed_call") for f in told)
              if c}
    assert len(failed) == 1, told
    ((t_recv, t_done, batch),) = failed
    assert batch == 3 and t_done - t_recv >= 0.2e9, failed
    # The front-end's figure: each call that ran, the joined one that
    # failed once, and the rerun that raised on its NaN too (its model ran,
    # as the worker's own figure has it), in the order they ran.
    expected, key, booked = CallTimes(), ("picky", 1), False
    compute_ns = queue_ns = 0
    for f in told:
        again = 0
        if f.get("failed_call"):
            again = t_done - t_recv
            if not booked:
                expected.ran(key, again / 1e9, 0.0)
                booked = True
        if f.get("worker_ns") and f["worker_ns"][1] is not None:
            t_in, t_out, _ = f["worker_ns"]
            expected.ran(key, (t_out - t_in) / 1e9, 0.0)
        if f["code"] == "OK":
            compute_ns += t_out - t_in + again
            queue_ns += t_in - f["start_ns"] - again
    assert figures == pytest.approx(expected._calls[key][:2], rel=1e-9)
    infer = stats["inference_stats"]
    assert infer["success"]["count"] == 4, stats
    assert (infer["compute_infer"]["ns"], infer["queue"]["ns"]) == (compute_ns, queue_ns)
    # Waiting on the worker (mmengine's queue seconds) no more than Triton's queue.
    waited = sum(f["worker_ns"][0] - f["t_sent"] - (t_done - t_recv if f["failed_call"] else 0)
                 for f in told if f.get("worker_ns") and f["worker_ns"][1] is not None)
    assert queue_s == pytest.approx(waited / 1e9, rel=1e-9)
    # And in mmengine's compute histogram, which left the failed call out.
    ran = sum(f["worker_ns"][1] - f["worker_ns"][0] + (t_done - t_recv if f["failed_call"] else 0)
              for f in told if f.get("worker_ns") and f["worker_ns"][1] is not None)
    assert compute_s == pytest.approx(ran / 1e9, rel=1e-9)


def test_waiting_requests_that_join_a_call_are_judged_by_its_end(tmp_path):
    """Two requests waiting behind a call, whose deadline their joined call
    makes and the second alone would not: both are let in and answered."""
    write_handler(tmp_path, "rows", ROWS_HANDLER, _manifest(LIMIT))

    async def go():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            for _ in range(4):  # its calls' time is known: 0.3 s
                await engine.infer("rows", {"x": x_rows(0.3, 1)})
            block = asyncio.ensure_future(engine.infer("rows", {"x": x_rows(0.3, 1)}))
            await asyncio.sleep(0.05)
            # The block ends at ~0.25 s, a call of both at ~0.55 s, the
            # second alone at ~0.85 s: past their deadline, 0.75 s.
            answers = await asyncio.gather(*(
                engine.infer("rows", {"x": x_rows(0.3, 1, seed=i)}, timeout=0.75)
                for i in range(2)), return_exceptions=True)
            await block
            return answers
    answers = run(go())
    assert [int(out["rows"][0]) for out in answers] == [2, 2], answers


def test_a_request_refused_as_its_call_is_joined_is_told_as_one_refused_alone(tmp_path):
    """Refused while its call was joined, a request's error carried no run:
    its request's observation had no worker and no timing (a review's
    finding). Alone it has both."""
    write_handler(tmp_path, "rows", ROWS_HANDLER, f"max_batch_size = {LIMIT}\n"
                  '[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, 3]\n')
    bad = {"x": np.zeros((1, 4), np.float32)}

    async def go():
        async with Engine(Config(repo=str(tmp_path), workers=1, worker_backlog_ms=0)) as engine:
            await engine.infer("rows", {"x": np.zeros((1, 3), np.float32)})
            with pytest.raises(BadRequest) as alone:
                await engine.infer("rows", bad)
            block = asyncio.ensure_future(engine.infer("rows", {"x": x_rows(0.3, 1)[:, :3]}))
            await asyncio.sleep(0.05)
            answers = await asyncio.gather(
                engine.infer("rows", {"x": np.zeros((1, 3), np.float32)}),
                engine.infer("rows", bad), return_exceptions=True)
            await block
            return alone.value, answers
    alone, (good, joined) = run(go())
    assert int(good["rows"][0]) == 1 and isinstance(joined, BadRequest), (good, joined)
    for error in (alone, joined):
        assert error.ran is not None and error.ran["worker"] == 0 and "t_recv" in error.ran, \
            error.ran


def test_a_joined_first_call_counts_once_in_its_models_time(tmp_path):
    """A model's first call, a warm-up, is left out of its time; joined,
    each of its requests' answers counted it, and the second taken for the
    model's time: a request behind another call, whose deadline the model
    (10 ms) makes, was dropped as sure to miss it (a review's finding)."""
    write_handler(tmp_path, "rows", ROWS_HANDLER, _manifest(LIMIT))
    write_handler(tmp_path, "slow", SLOW_HANDLER)

    async def go():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            for _ in range(3):  # its calls' time is known: 0.3 s
                await engine.infer("slow", {"seconds": np.array([0.3])})
            await engine.load("rows")
            block = asyncio.ensure_future(engine.infer("slow", {"seconds": np.array([0.3])}))
            await asyncio.sleep(0.05)
            first = await asyncio.gather(*(  # one call of three, 1.5 s: the warm-up
                engine.infer("rows", {"x": x_rows(1.5, 1, seed=i)}) for i in range(3)))
            await block
            block = asyncio.ensure_future(engine.infer("slow", {"seconds": np.array([0.3])}))
            await asyncio.sleep(0.01)
            after = await engine.infer("rows", {"x": x_rows(0.01, 1)}, timeout=0.6)
            await block
            return [int(out["rows"][0]) for out in first], int(after["rows"][0])
    assert run(go()) == ([3, 3, 3], 1)


def test_a_later_call_leaves_out_requests_that_timed_out_during_the_calls_ahead(tmp_path):
    """Requests of two forms queued together make two calls, one after the
    other. One of the second call's requests times out while the first call
    runs: the second call runs without it."""
    write_handler(tmp_path, "rows", ROWS_HANDLER, _manifest(LIMIT))

    async def go():
        # No bound on the worker's backlog: all go into its ring at once,
        # and the worker takes them together as the block ends.
        config = Config(repo=str(tmp_path), workers=1, worker_backlog_ms=0)
        async with Engine(config) as engine:
            for _ in range(4):  # its fast calls known: none is skipped as it is taken
                await engine.infer("rows", {"x": x_rows(0.0, 1)})
            block = asyncio.ensure_future(engine.infer("rows", {"x": x_rows(0.2, 1)}))
            await asyncio.sleep(0.05)
            # The block ends at ~0.15 s; the first call (width 3) at
            # ~0.55 s, past the last request's deadline, 0.35 s.
            answers = await asyncio.gather(
                engine.infer("rows", {"x": x_rows(0.4, 1, width=3, seed=1)}),
                engine.infer("rows", {"x": x_rows(0.4, 1, width=3, seed=2)}),
                engine.infer("rows", {"x": x_rows(0.0, 1, width=5, seed=3)}),
                engine.infer("rows", {"x": x_rows(0.0, 1, width=5, seed=4)}, timeout=0.35),
                return_exceptions=True)
            await block
            return answers
    answers = run(go())
    assert isinstance(answers[3], Timeout), answers
    assert [int(out["rows"][0]) for out in answers[:3]] == [2, 2, 1], answers


def test_triton_counts_a_joined_call_once_whatever_became_of_its_requests(served):
    """A joined call one of whose requests timed out (its answer late):
    still one execution."""
    address, http = served

    async def go():
        async with AsyncClient(f"{address[0]}:{address[1]}") as c:
            for _ in range(3):  # its fast calls known: the late one is not skipped
                await c.infer("rows", {"x": x_rows(0.0, 1)})
            before = _triton_counts(http, "rows")
            block = asyncio.ensure_future(c.infer("rows", {"x": x_rows(0.3, 1)}))
            await asyncio.sleep(0.05)
            answers = await asyncio.gather(
                c.infer("rows", {"x": x_rows(0.3, 1)}, timeout=5, timing=True),
                c.infer("rows", {"x": x_rows(0.0, 1)}, timeout=0.4), return_exceptions=True)
            await block
            for _ in range(50):  # the late answer is read within a turn of the loop
                after = _triton_counts(http, "rows")
                if after[1] - before[1] == 2:
                    break
                await asyncio.sleep(0.1)
            return answers, before, after
    answers, before, after = run(go())
    assert answers[0].timing["batch"] == 2 and isinstance(answers[1], Timeout), answers
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)  # the block, the joined


def test_a_model_without_max_batch_size_runs_each_alone(address):
    answers = run(_behind_one(address, "alone", [x_rows(0.0, 1, seed=i) for i in range(6)]))
    assert [int(out["rows"][0]) for out in answers] == [1] * 6
    assert all("batch" not in out.timing for out in answers)


def test_rows_count_against_the_limit(address):
    sizes = [3, 2, 1, 2, 4, 1]
    xs = [x_rows(0.0, n, seed=i) for i, n in enumerate(sizes)]
    answers = run(_behind_one(address, "rows", xs))
    for x, out in zip(xs, answers):
        np.testing.assert_array_equal(out["y"], x * 2)
        assert x.shape[0] <= int(out["rows"][0]) <= LIMIT


def test_requests_of_another_form_make_calls_of_their_own(address):
    xs = [x_rows(0.0, 1, width=3), x_rows(0.0, 1, width=5), x_rows(0.0, 1, width=3),
          x_rows(0.0, 2, width=5)]
    answers = run(_behind_one(address, "rows", xs))
    for x, out in zip(xs, answers):
        np.testing.assert_array_equal(out["y"], x * 2)
    # (They may reach the worker in any order: the SDK spreads them over
    # its connections.)
    assert [int(out["rows"][0]) for out in answers] == [2, 3, 2, 3]


def test_a_bad_request_fails_alone(address):
    bad = x_rows(0.0, 1).astype(np.float64)  # declared float32
    xs = [x_rows(0.0, 1, seed=1), bad, x_rows(0.0, 1, seed=2)]
    answers = run(_behind_one(address, "rows", xs))
    assert isinstance(answers[1], BadRequest) and "float32" in str(answers[1])
    for i in (0, 2):
        np.testing.assert_array_equal(answers[i]["y"], xs[i] * 2)
        assert int(answers[i]["rows"][0]) == 2


def test_requests_past_their_deadline_are_skipped_not_joined(address):
    late = [(x_rows(0.0, 1, seed=i), 0.1) for i in range(3)]
    kept = [x_rows(0.0, 1, seed=10 + i) for i in range(3)]
    answers = run(_behind_one(address, "rows", [*late, *kept], block_s=0.6))
    assert all(isinstance(out, Timeout) for out in answers[:3]), answers[:3]
    for x, out in zip(kept, answers[3:]):
        np.testing.assert_array_equal(out["y"], x * 2)
        assert int(out["rows"][0]) == 3


def test_an_answer_that_is_not_row_by_row_fails_the_joined_requests(address):
    answers = run(_behind_one(address, "whole", [x_rows(0.0, 1, seed=i) for i in range(3)]))
    for out in answers:
        assert isinstance(out, InternalError), out
        assert "max_batch_size" in str(out) and "'y'" in str(out)
    # A request alone is its whole batch: answered.
    async def alone():
        async with AsyncClient(f"{address[0]}:{address[1]}") as c:
            return await c.infer("whole", {"x": x_rows(0.0, 1)})
    assert run(alone())["y"].shape == (1, 3)


def test_a_torch_module_answers_joined_requests_as_alone(address):
    """A safetensors MLP: the joined call's rows are what each request
    alone would get."""
    xs = [np.random.default_rng(i).standard_normal((1 + i % 2, DIMS[0])).astype(np.float32)
          for i in range(8)]

    async def go():
        async with AsyncClient(f"{address[0]}:{address[1]}") as c:
            await c.infer("mlp", {"x": xs[0]})
            return await asyncio.gather(*(c.infer("mlp", {"x": x}, timing=True) for x in xs))
    answers = run(go())
    for x, out in zip(xs, answers):
        np.testing.assert_allclose(out["y"], demo.reference(x, *DIMS, seed=0), rtol=1e-5, atol=1e-5)


async def _queued_behind_a_call(address, requests: list[tuple[str, np.ndarray]]) -> list:
    """The answers to `requests` ((model, x)), sent at once behind a call
    of "rows" that holds the worker for 0.3 s, their models loaded first."""
    async with AsyncClient(f"{address[0]}:{address[1]}") as c:
        models = {"rows", *dict(requests)}
        await asyncio.gather(*(c.infer(m, {"x": x_rows(0.0, 1)}) for m in models))
        first = asyncio.ensure_future(c.infer("rows", {"x": x_rows(0.3, 1)}))
        await asyncio.sleep(0.05)
        answers = await asyncio.gather(*(c.infer(m, {"x": x}) for m, x in requests))
        await first
        return answers


def test_other_models_queued_between_are_served(address):
    """Requests of another model queued among a batch's: each answered."""
    xs = [x_rows(0.0, 1, seed=i) for i in range(8)]
    answers = run(_queued_behind_a_call(
        address, [("rows" if i % 3 else "alone", x) for i, x in enumerate(xs)]))
    for x, out in zip(xs, answers):
        np.testing.assert_array_equal(out["y"], x * 2)


def test_a_batching_models_requests_behind_anothers_call_are_joined_too(address):
    """The first request of another batching model, found behind a joined
    call, ran alone with its own batch queued behind it (a review's
    finding): it heads a joined call of its own."""
    # Fewer than the limit: the first joined call reads on into rows2's.
    answers = run(_queued_behind_a_call(address, [
        (model, x_rows(0.0, 1, seed=i)) for model, n in (("rows", LIMIT - 1), ("rows2", LIMIT))
        for i in range(n)]))
    assert [int(out["rows"][0]) for out in answers] == [LIMIT - 1] * (LIMIT - 1) + [LIMIT] * LIMIT


# -- the manifest and the helpers ------------------------------------------------

@pytest.mark.parametrize("manifest, message", [
    ("max_batch_size = -1\n", "must not be negative"),
    ("max_batch_size = true\n", "must be an integer"),
    ('max_batch_size = 4\n[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [1, 4]\n',
     "'inputs[0].shape' must begin with -1"),
    ('max_batch_size = 4\n[[outputs]]\nname = "y"\ndtype = "float32"\nshape = []\n',
     "'outputs[0].shape' must begin with -1"),
])
def test_a_manifest_that_cannot_batch_is_refused(tmp_path, manifest, message):
    path = write_handler(tmp_path, "m", ROWS_HANDLER, manifest)
    with pytest.raises(LoadFailed, match=re.escape(message)):
        read_spec("m", 1, path)


def test_max_batch_size_one_with_a_fixed_first_dimension_is_taken(tmp_path):
    path = write_handler(tmp_path, "m", ROWS_HANDLER, 'max_batch_size = 1\n[[inputs]]\n'
                         'name = "x"\ndtype = "float32"\nshape = [1, 4]\n')
    assert read_spec("m", 1, path).max_batch_size == 1


def test_forms_join_and_split():
    a = {"x": np.ones((2, 3), np.float32), "m": np.zeros((2,), np.int8)}
    b = {"m": np.ones((1,), np.int8), "x": np.full((1, 3), 2, np.float32)}
    assert batching.form(a)[0] == 2 and batching.form(a)[1] == batching.form(b)[1]
    assert batching.form({"x": np.ones((2, 4), np.float32)})[1] != batching.form(a)[1]
    assert batching.form({"x": np.ones((2, 3)), "m": np.ones((3,))}) is None  # rows disagree
    assert batching.form({"x": np.float32(1)}) is None and batching.form({}) is None
    joined = batching.join([a, b])
    assert joined["x"].shape == (3, 3) and joined["m"].tolist() == [0, 0, 1]
    parts = batching.split({"y": joined["x"] * 2}, [2, 1], "m")
    assert parts[0]["y"].shape == (2, 3) and parts[1]["y"].tolist() == [[4, 4, 4]]
    assert parts[1]["y"].flags.c_contiguous
    with pytest.raises(InternalError, match="not a row for each of the 3 rows"):
        batching.split({"y": np.ones(2)}, [2, 1], "m")


def test_a_cached_copy_keeps_max_batch_size(tmp_path):
    """The disk cache writes a copy's manifest from its spec: the key
    survives it."""
    spec = read_spec("m", 1, write_handler(tmp_path / "a", "m", ROWS_HANDLER, _manifest(8)))
    copy = write_handler(tmp_path / "b", "m", ROWS_HANDLER, diskcache.manifest(spec))
    assert read_spec("m", 1, copy).max_batch_size == 8


def test_an_edited_max_batch_size_takes_effect_at_the_next_scan(tmp_path):
    """A resident model's max_batch_size edited in its manifest changed
    nothing until the model happened to load again (a review's finding:
    an operator's "set it to 0" for a model failing joined calls)."""
    version = write_handler(tmp_path, "rows", ROWS_HANDLER, _manifest(LIMIT))

    async def go():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.infer("rows", {"x": x_rows(0.0, 1)})
            assert engine._loaded_specs[("rows", 1)].max_batch_size == LIMIT
            (version / "model.toml").write_text(_manifest(0))
            for _ in range(100):  # bounded: the scan marks it stale, its next request loads it
                await asyncio.sleep(0.05)
                await engine.infer("rows", {"x": x_rows(0.0, 1)})
                if engine.model_row(("rows", 1))["loads"] == 2:
                    break
            return engine._loaded_specs[("rows", 1)].max_batch_size

    assert run(go()) == 0


def test_server_timing_leaves_out_the_batch():
    assert trace.server_timing({"queue_ns": 1_000_000, "batch": 3}) == "queue;dur=1.000"


def test_a_cpu_worker_runs_torch_on_the_cores_the_front_end_leaves(address):
    """A joined call's ops may go parallel where a lone request's did not:
    a worker's torch threads leave the front-end its core."""
    async def go():
        async with AsyncClient(f"{address[0]}:{address[1]}") as c:
            return await c.infer("threads", {"x": np.ones(1, np.float32)})
    assert int(run(go())["y"][0]) == resources.torch_threads(Config(workers=1))


def test_a_stop_serves_the_requests_queued_for_a_batching_model(tmp_path):
    """The pool's stop closes a worker's ring behind what it sent: the
    worker joins what is queued, answers it all and exits."""
    write_handler(tmp_path, "rows", ROWS_HANDLER, _manifest(LIMIT))

    async def go():
        async with Engine(Config(repo=str(tmp_path), workers=1, worker_backlog_ms=0)) as engine:
            await engine.infer("rows", {"x": x_rows(0.0, 1)})
            block = asyncio.ensure_future(engine.infer("rows", {"x": x_rows(0.4, 1)}))
            await asyncio.sleep(0.1)
            xs = [x_rows(0.0, 1, seed=i) for i in range(2)]
            queued = [asyncio.ensure_future(engine.infer("rows", {"x": x})) for x in xs]
            await asyncio.sleep(0.05)
            await engine.pool.stop(time.monotonic() + 10)
            return xs, await asyncio.gather(block, *queued, return_exceptions=True)
    xs, answers = run(go())
    assert not any(isinstance(out, BaseException) for out in answers), answers
    for x, out in zip(xs, answers[1:]):
        np.testing.assert_array_equal(out["y"], x * 2)


def test_an_artifact_that_fixes_its_first_dimension_cannot_take_batches(tmp_path):
    """An export whose signature fixes the batch (the inputs derived from
    the artifact, none declared) is refused at load, naming the key: its
    requests would pass alone and fail joined."""
    import torch

    from mmengine.backends import load_model

    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    torch.export.save(torch.export.export(Double(), (torch.ones(1, 4),)), str(path / "model.pt2"))
    (path / "model.toml").write_text("max_batch_size = 4\n")
    with pytest.raises(LoadFailed, match="'max_batch_size'.*fixes that of its inputs"):
        load_model(read_spec("m", 1, path))
    (path / "model.toml").write_text("max_batch_size = 0\n")
    assert load_model(read_spec("m", 1, path)).predict(
        {"x": np.ones((1, 4), np.float32)})["output"].tolist() == [[2.0] * 4]


# Hangs in a call of more than one row; a 0-d input joins nothing.
HANGS_JOINED = _handler('x if x.ndim == 0 else {"y": x * 2} if len(x) == 1 else '
                        'time.sleep(60)').replace("x[:, 0].max()", "0 if x.ndim == 0 else x[:, 0].max()")


@contextlib.contextmanager
def _hanging(tmp_path):
    """The address of a server of HANGS_JOINED as "b" whose worker is
    restarted 0.5 s past the deadline of a request it runs; its Server."""
    write_handler(tmp_path, "b", HANGS_JOINED, _manifest(LIMIT))
    server = Server("--repo", str(tmp_path), "--workers", "1", "--tcp-port", "0",
                    "--http-port", "-1", env=environ(MMENGINE_WORKER_BACKLOG_MS="0",
                                                     MMENGINE_STUCK_INFERENCE_S="0.5",
                                                     MMENGINE_MONITOR_INTERVAL_S="0.2"))
    try:
        m = server.wait_for(r"serving .* on tcp://(\S+):(\d+)", 60)
        yield (m.group(1), int(m.group(2))), server
    finally:
        server.stop()


def test_a_joined_call_that_hangs_is_blamed_on_its_model(tmp_path):
    """A request that joins nothing, queued ahead of a joined call, is
    served in its turn; the call that then hangs is what the front-end
    finds running: its model is blamed (backed off), not taken for a
    worker that hung between requests."""
    with _hanging(tmp_path) as (address, server):
        xs = [np.float32(1.0), x_rows(0.0, 1), x_rows(0.0, 1, seed=1)]
        run(_behind_one(address, "b", [(x, 1.0) for x in xs]))
        line = server.wait_for(r"worker 0 was restarted: .*", 20).group(0)
    assert "b v1 ran" in line and "past its request's deadline" in line, line


def test_a_hanging_call_is_judged_by_its_own_deadline(tmp_path):
    """A joined call that runs ahead of an older request (of another
    form, with a distant deadline) and hangs: its worker is restarted by
    the deadline of the request it runs, not by the older one's."""
    with _hanging(tmp_path) as (address, server):
        # The first is skipped (its deadline passes behind the block); the
        # third joins the fourth ahead of the second.
        requests = [(x_rows(0.0, 1), 0.1), (x_rows(0.0, 1, width=5), 30.0),
                    (x_rows(0.0, 1), 1.0), (x_rows(0.0, 1, seed=1), 1.0)]
        t0 = time.monotonic()
        answers = run(_behind_one(address, "b", requests))
        took = time.monotonic() - t0
        line = server.wait_for(r"worker 0 was restarted: .*", 5).group(0)
    assert all(isinstance(out, BaseException) for out in answers), answers
    # The restart failed them all soon after the joined call's deadline
    # (1 s), not at the second's (30 s).
    assert took < 15 and "b v1 ran" in line, (took, line)


# Sleeps a twentieth of a second a call, whatever its rows (none included).
STEADY_HANDLER = ("import time\n\ndef load(path, device):\n    pass\n\n"
                  "def predict(inputs):\n    time.sleep(0.05)\n    return {'y': inputs['x'] * 2}\n")


def test_requests_of_no_rows_count_as_calls_of_max_batch_size_requests(tmp_path):
    """A worker joins at most max_batch_size requests into a call, rows or
    none: the front-end counts a flood of requests of no rows as that many
    calls, and another model's request goes into the ring in its turn, not
    behind all of them."""
    write_handler(tmp_path, "zero", STEADY_HANDLER, _manifest(LIMIT))
    write_handler(tmp_path, "other", STEADY_HANDLER)
    empty = np.zeros((0, 3), np.float32)

    async def go():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            for _ in range(3):  # both models' calls known: 0.05 s
                await engine.infer("zero", {"x": empty})
                await engine.infer("other", {"x": x_rows(0.0, 1)})
            done = []

            def send(name: str, x: np.ndarray) -> asyncio.Future:
                task = asyncio.ensure_future(engine.infer(name, {"x": x}))
                task.add_done_callback(lambda _: done.append(name))
                return task
            # The first goes into the ring alone; the rest wait for its end,
            # then go in together as what the front-end counts as calls.
            tasks = [send("zero", empty) for _ in range(4 * LIMIT + 1)]
            await asyncio.sleep(0.08)
            tasks.append(send("other", x_rows(0.0, 1)))
            outs = await asyncio.gather(*tasks)
            return done, outs
    done, outs = run(go())
    assert all(out["y"].shape == (0, 3) for out in outs[:-1])
    # In its turn: after the call in the ring when it came, and one more at
    # most (the turns go by the models' last calls); not after all four.
    assert done.index("other") <= 2 * LIMIT, done
