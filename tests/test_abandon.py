"""Work nobody waits for is skipped: an inference whose caller went away
(a TCP or HTTP client whose connection was reset, an embedding caller
that cancelled) or whose deadline passed is abandoned, and its worker does
not run it if it has not begun it. Real engine, real workers, real sockets.
(A client that half-closes still gets its answers: test_fuzz, test_overload.)"""
from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import time

import numpy as np
import pytest

from conftest import SLOW_HANDLER, run, slow_loading, until, write_handler
from mmengine import protocol
from mmengine.calltimes import CallTimes
from mmengine.config import Config
from mmengine.engine import Engine
from mmengine.errors import Timeout
from mmengine.server import kserve, metrics
from mmengine.server.http import HttpServer
from mmengine.server.tcp import TcpServer
from mmengine.worker import WorkerLogic

RUNNING_S = 0.6  # the request the worker is busy with while the others queue


def slow_repo(tmp_path):
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    return Config(repo=str(tmp_path), workers=1, request_timeout_s=60)


def recorder(engine: Engine) -> dict[str, list]:
    """The observers' late answers and skipped requests, and the codes of
    the slow model's requests, as they come."""
    seen: dict[str, list] = {"late": [], "skipped": [], "codes": [], "workers": [],
                             "cancelled": []}

    def observe(kind: str, f: dict) -> None:
        if kind in ("late", "skipped"):
            seen[kind].append((f["model"], f["version"]))
            seen["workers"].append(f["worker"])  # where: the trace draws it there
        elif kind == "request" and f["model"] == "slow":
            seen["codes"].append(f["code"])
            if f["code"] == "CANCELLED":
                seen["cancelled"].append(f)
    engine.observers.append(observe)
    return seen


def reset(writer: asyncio.StreamWriter) -> None:
    """Closes a connection as a killed client or a dropped link does to a
    server that writes to it: with a reset, not a half-close."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
    writer.close()


def slow_frame(rid: int, seconds: float) -> bytes:
    return protocol.frame({"id": rid, "op": "infer", "model": "slow",
                           "inputs": protocol.encode_tensors({"seconds": np.array([seconds])})})


async def four_in_flight(engine: Engine, port: int):
    """A TCP connection with four requests for the slow model on its worker:
    one it runs, three pipelined behind it on its ring."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(slow_frame(1, RUNNING_S) + b"".join(slow_frame(i, 0.3) for i in (2, 3, 4)))
    await until(lambda: engine.stats()["workers"][0]["in_flight"] == 4)
    await asyncio.sleep(0.1)  # the worker is inside the first
    return reader, writer


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "cold"])
def test_a_tcp_client_whose_connection_resets_abandons_its_queued_requests(
        tmp_path, own_segments, resident):
    # Cold: the requests came while the model loaded, and went to the
    # worker once it had (each a task of the engine's, then).
    config = slow_repo(tmp_path)

    async def main():
        async with Engine(config) as engine:
            seen = recorder(engine)
            exposition = metrics.attach(engine)
            server = TcpServer(engine)
            port = await server.start("127.0.0.1", 0)
            try:
                if resident:
                    await engine.load("slow")
                reader, writer = await four_in_flight(engine, port)
                reset(writer)
                await until(lambda: len(seen["late"]) + len(seen["skipped"]) == 4)
                # The worker is free for everyone else at once.
                after = await engine.infer("slow", {"seconds": np.array([0.0])}, timeout=5)
                pins = next(r["pins"] for r in engine.stats()["models"]
                            if r["name"] == "slow")
                return seen, after, pins, exposition.exposition()[0].decode()
            finally:
                await server.stop()

    seen, after, pins, exposed = run(main(), timeout=60)
    assert seen["late"] == [("slow", 1)]          # it ran to its end
    assert seen["skipped"] == [("slow", 1)] * 3   # they never ran
    assert seen["codes"][:4] == ["CANCELLED"] * 4
    _sent_to_worker_0(seen["cancelled"])
    assert after["y"][0] == 0.0 and pins == 0
    assert 'mmengine_skipped_requests_total{model="slow"} 3.0' in exposed
    assert 'mmengine_late_answers_total{model="slow"} 1.0' in exposed
    # The late call took its worker's time all the same (the histogram had
    # only the answered call's).
    assert 'mmengine_request_compute_seconds_count{model="slow"} 2.0' in exposed
    compute_s = float(re.search(r'mmengine_request_compute_seconds_sum\{model="slow"\} (\S+)',
                                exposed)[1])
    assert compute_s >= RUNNING_S


def test_a_tcp_connection_ended_by_a_malformed_frame_abandons_its_queued_requests(
        tmp_path, own_segments):
    # Ended with a typed error, it lingers (its client may still be sending)
    # and writes no answer: its requests ran on, three held the worker for
    # nothing, until its client closed it or the linger ended.
    config = slow_repo(tmp_path)

    async def main():
        async with Engine(config) as engine:
            seen = recorder(engine)
            server = TcpServer(engine)
            port = await server.start("127.0.0.1", 0)
            try:
                await engine.load("slow")
                reader, writer = await four_in_flight(engine, port)
                writer.write(protocol.LENGTH.pack(1) + b"\xc1")  # no msgpack value
                error = await asyncio.wait_for(reader.read(1 << 16), 5)
                # Well within the linger (LINGER_S), the client still connected.
                await until(lambda: len(seen["late"]) + len(seen["skipped"]) == 4,
                            timeout=3, what="the requests abandoned")
                writer.close()
                return seen, error
            finally:
                await server.stop()

    seen, error = run(main(), timeout=60)
    assert b"BAD_REQUEST" in error
    assert seen["late"] == [("slow", 1)] and seen["skipped"] == [("slow", 1)] * 3
    assert seen["codes"][:4] == ["CANCELLED"] * 4


def test_an_http_client_whose_connection_resets_abandons_its_request(tmp_path, own_segments):
    config = slow_repo(tmp_path)

    def post(seconds: float) -> bytes:
        body = json.dumps({"inputs": [{"name": "seconds", "shape": [1], "datatype": "FP64",
                                       "data": [seconds]}]}).encode()
        return (f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body

    async def main():
        async with Engine(config) as engine:
            seen = recorder(engine)
            server = HttpServer(engine, kserve.ROUTES)
            port = await server.start("127.0.0.1", 0)
            try:
                await engine.load("slow")
                first_r, first_w = await asyncio.open_connection("127.0.0.1", port)
                first_w.write(post(RUNNING_S))
                await until(lambda: engine.stats()["workers"][0]["in_flight"] == 1)
                _, gone_w = await asyncio.open_connection("127.0.0.1", port)
                gone_w.write(post(0.3))
                await until(lambda: engine.stats()["workers"][0]["in_flight"] == 2)
                reset(gone_w)
                answer = await asyncio.wait_for(first_r.read(4096), 10)
                first_w.close()
                await first_w.wait_closed()
                await until(lambda: seen["skipped"] and len(seen["codes"]) == 2)
                return seen, answer, server.receiving.held
            finally:
                await server.stop()

    seen, answer, held = run(main(), timeout=60)
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["outputs"][0]["data"] == [2 * RUNNING_S]
    assert seen["skipped"] == [("slow", 1)] and seen["late"] == []
    assert sorted(seen["codes"]) == ["CANCELLED", "OK"]
    assert held == 0  # the abandoned request's body went back to the budget


def test_an_embedding_caller_that_cancels_abandons_its_request(tmp_path, own_segments):
    config = slow_repo(tmp_path)

    async def main():
        async with Engine(config) as engine:
            seen = recorder(engine)
            await engine.load("slow")
            running = asyncio.ensure_future(
                engine.infer("slow", {"seconds": np.array([RUNNING_S])}))
            await until(lambda: engine.stats()["workers"][0]["in_flight"] == 1)
            try:  # queued behind the first; the caller stops waiting first
                await asyncio.wait_for(engine.infer("slow", {"seconds": np.array([0.3])}), 0.1)
            except TimeoutError:
                pass
            else:
                raise AssertionError("the second request was answered before the first")
            first = await running
            await until(lambda: seen["skipped"])
            return seen, first

    seen, first = run(main(), timeout=60)
    assert first["y"][0] == 2 * RUNNING_S
    assert seen["skipped"] == [("slow", 1)] and seen["late"] == []
    assert seen["codes"] == ["CANCELLED", "OK"]
    _sent_to_worker_0(seen["cancelled"])


def _sent_to_worker_0(cancelled: list[dict]) -> None:
    """Requests cancelled once sent say where, which version and when, as
    one that timed out there does: they said none of it (a review's
    finding), and a trace drew them nowhere."""
    assert cancelled
    for f in cancelled:
        assert (f["worker"], f["version"]) == (0, 1), f
        assert f["start_ns"] <= f["t_sent"] <= f["end_ns"], f
        assert f["worker_ns"] == (None, None, None), f  # its run, if any, is "late"


def test_a_request_sure_to_miss_its_deadline_is_not_run(tmp_path, own_segments):
    # The model's calls take 1 s. Behind a running one, a request with
    # 1.8 s to live would end at 2 s: the worker does not begin it, and
    # its caller hears so when the worker gets to it, before its deadline.
    config = slow_repo(tmp_path)
    call = {"seconds": np.array([1.0])}

    async def main():
        async with Engine(config) as engine:
            seen = recorder(engine)
            await engine.infer("slow", call)  # how long its calls take
            t0 = asyncio.get_running_loop().time()
            running = asyncio.ensure_future(engine.infer("slow", call))
            await until(lambda: engine.stats()["workers"][0]["in_flight"] == 1)
            try:
                await engine.infer("slow", call, timeout=1.8)
            except Timeout as e:
                refused = e, asyncio.get_running_loop().time() - t0
            else:
                raise AssertionError("a request that could not make its deadline ran")
            await running
            roomy = await engine.infer("slow", call, timeout=5)
            return seen, refused, roomy

    seen, (error, at), roomy = run(main(), timeout=60)
    assert "could not have finished" in str(error) and seen["workers"] == [0]
    assert 0.95 < at < 1.75, at  # when the worker got to it: before its deadline
    assert seen["skipped"] == [("slow", 1)] and seen["late"] == []
    assert roomy["y"][0] == 2.0


def test_what_a_worker_takes_for_sure_to_miss_its_deadline():
    logic = WorkerLogic(Config(repo="."), "cpu")
    key = ("m", 1)

    def in_(seconds: float) -> float:  # a deadline that far from now
        return time.monotonic() + seconds

    logic.ran(key, 1.0, time.monotonic())  # a warm-up, not counted
    assert not logic.would_miss(key, in_(0.2), queued=True)
    logic.ran(key, 1.0, time.monotonic())  # the model's calls take 1 s
    assert logic.would_miss(key, in_(0.2), queued=True)
    assert not logic.would_miss(key, in_(0.2), queued=False)  # a worker that keeps up runs it
    assert logic.would_miss(key, in_(-0.001), queued=False)   # past its deadline, surely
    # A figure that no call has renewed for 3 s is trusted an eighth: 0.125 s.
    logic.ran(key, 1.0, time.monotonic() - 3.0)
    assert not logic.would_miss(key, in_(0.2), queued=True)
    assert logic.would_miss(key, in_(0.1), queued=True)
    logic.ran(key, 0.01, time.monotonic())  # a faster call is taken at once
    assert not logic.would_miss(key, in_(0.02), queued=True)
    assert logic.would_miss(key, in_(0.005), queued=True)
    logic.ran(key, 0.09, time.monotonic())  # a slower one moves it an eighth of the way
    # 0.01 + 0.08 / 8 = 0.02 s now
    assert logic.would_miss(key, in_(0.018), queued=True)
    assert not logic.would_miss(key, in_(0.022), queued=True)


def test_a_models_expected_call_is_its_mean_and_its_bar_near_its_fastest():
    # What the front-end sizes a worker's backlog by (the mean: one call
    # refused at once does not make a model look fast) and what a request
    # must have the time for (near the fastest: one slow call does not
    # make it look slow).
    times, key, now = CallTimes(), ("m", 1), time.monotonic()
    times.ran(key, 5.0, now)  # the warm-up
    assert times.expected(key) is None
    times.ran(key, 0.004, now)
    assert times.expected(key) == pytest.approx(0.004)
    times.ran(key, 0.000_010, now)  # an input refused at once
    assert times.expected(key) == pytest.approx(0.004 - (0.004 - 0.000_010) / 4)
    assert times.would_miss(key, now + 0.000_005, now)
    assert not times.would_miss(key, now + 0.000_020, now)
    times.ran(key, 0.8, now)  # one slow call: an eighth of the way
    assert not times.would_miss(key, now + 0.2, now)
    assert times.would_miss(key, now - 0.001, now)  # past the deadline, surely
    times.forget(key)
    assert times.expected(key) is None and not times.would_miss(key, now + 1e-9, now)


def test_a_request_cancelled_before_it_was_sent_counts_its_wait(tmp_path, own_segments):
    """Cancelled while its model loaded, a request's time was all load
    wait, as one that timed out there: it counted none, since a cancelled
    request could not tell whether it had been sent."""
    write_handler(tmp_path, "late", slow_loading(1.0))

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            m = metrics.attach(engine)
            waiting = asyncio.ensure_future(engine.infer("late", {"x": np.zeros(1)}))
            await asyncio.sleep(0.3)
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            return m.exposition()[0].decode()

    exposed = run(main(), timeout=60)
    assert 'mmengine_requests_total{code="CANCELLED",model="late"} 1.0' in exposed, exposed
    wait_s = float(re.search(r'mmengine_request_load_wait_seconds_total\{model="late"\} (\S+)',
                             exposed)[1])
    assert wait_s >= 0.25, wait_s
