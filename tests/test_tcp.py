"""The binary TCP protocol end to end: `mmengine serve` as a real process,
the SDK and raw sockets against it, and the other CLI commands."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import msgpack
import numpy as np
import psutil
import pytest

from conftest import (SLOW_HANDLER, Server, busy_process, command, environ, live_pids, run,
                      send_in_background, slow_loading, write_handler, write_problem_models)
from mmengine import demo, protocol, shm
from mmengine.client import AsyncClient, Client, parse_address
from mmengine.config import Config
from mmengine.errors import (BadRequest, ErrorCode, InternalError, LoadFailed, ModelNotFound,
                             Overloaded, Timeout, TooLarge)
from mmengine.ring import LARGEST_RECORD

DIMS = (16, 64, 8)
MODELS = ("m00", "m01", "m02", "m03")
TOL = dict(rtol=1e-5, atol=1e-5)
# Answers its input, or as many float32 ones as "n" asks for.
ECHO_HANDLER = '''
import numpy as np

def load(path, device):
    pass

def predict(inputs):
    if "n" in inputs:
        return {"y": np.ones(int(inputs["n"][0]), np.float32)}
    return {"y": inputs["x"]}
'''

# What a model may answer that is odd: by inputs["kind"].
ODD_HANDLER = '''
import numpy as np

def load(path, device):
    pass

def predict(inputs):
    kind = int(inputs["kind"].ravel()[0])
    if kind == 0:
        return {"y": np.array(["2020-01-01"], "datetime64[D]")}  # no wire dtype
    if kind == 1:
        return {}  # no outputs
    if kind == 2:
        return 3.5  # a scalar
    if kind == 3:
        return {"out_" + name: x for name, x in inputs.items()}  # every input back
    if kind == 6:  # a mask of 0/255 bytes viewed as bool: any byte but 0 is True
        return {"y": np.array([0, 2, 255, 1], np.uint8).view(bool)}
    if kind == 7:  # names that str() would make one
        return {0: np.ones(2), "0": np.zeros(3)}
    if kind == 10:
        return {"y": np.array([None, 1], dtype=object)}
    if kind == 11:
        return "hello"
    if kind == 12:  # a number, which the wire has no dtype for
        return {"y": np.ones(2, np.longdouble)}
    if kind == 8:
        return {"y": [[1.0], [1.0, 2.0]]}  # ragged
    if kind == 9:  # a str's subclass names an output as its string
        return {np.str_("y"): np.ones(2)}
    return {"y": inputs["kind"] * 2}  # the input's shape, 0-d included
'''


def start(request, *args: str, env: dict[str, str] | None = None,
          timeout: float = 60.0) -> tuple[Server, tuple[str, int]]:
    """A serving Server, stopped when the test or module is done."""
    server = Server(*args, "--tcp-port", "0", "--http-port", "-1", env=env)
    request.addfinalizer(lambda: server.proc.poll() is None and server.stop())
    m = server.wait_for(r"serving .* on tcp://(\S+):(\d+)", timeout)
    return server, (m.group(1), int(m.group(2)))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for i, name in enumerate(MODELS):
        demo.write_mlp(root / name, "safetensors", *DIMS, seed=i)
    write_problem_models(root)
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "1" / "handler.py").write_text(ECHO_HANDLER)
    (root / "odd" / "1").mkdir(parents=True)
    (root / "odd" / "1" / "handler.py").write_text(ODD_HANDLER)
    write_handler(root, "slowload", slow_loading(4))
    return root


@pytest.fixture(scope="module")
def served(request, repo) -> tuple[Server, tuple[str, int]]:
    return start(request, "--repo", str(repo), "--workers", "2", "--device-budget", "64MiB")


@pytest.fixture(scope="module")
def address(served) -> tuple[str, int]:
    return served[1]


def reference(name: str, x: np.ndarray) -> np.ndarray:
    return demo.reference(x, *DIMS, seed=MODELS.index(name))


def x_for(rng: np.random.Generator, n: int = 2) -> np.ndarray:
    return rng.standard_normal((n, DIMS[0])).astype(np.float32)


def slow_input(seconds: float) -> dict[str, np.ndarray]:
    return {"seconds": np.array([seconds])}


def read_frame(sock: socket.socket) -> dict:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the server closed the connection mid-frame"
            data += chunk
        return data

    return protocol.decode(exactly(protocol.LENGTH.unpack(exactly(4))[0]))


def assert_closed(sock: socket.socket) -> None:
    assert sock.recv(1) == b"", "the server kept the connection open"


def fast_model_beside_slow(client: Client) -> str:
    """A model resident on a worker other than the slow model's, so that a
    request for it is answered while the slow one still runs."""
    for name in ("slow", *MODELS):
        client.load(name)
    workers = {r["name"]: r["worker"] for r in client.stats()["models"]}
    others = [n for n in MODELS if workers[n] != workers["slow"]]
    assert others, f"every model landed beside the slow one: {workers}"
    return others[0]


# -- pipelining and out-of-order answers ----------------------------------------

def test_answers_come_back_out_of_order_matched_by_id(address):
    with Client(address) as c:
        fast = fast_model_beside_slow(c)
    x = x_for(np.random.default_rng(0))
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(protocol.frame({"id": 1, "op": "infer", "model": "slow",
                                  "inputs": protocol.encode_tensors(slow_input(1.0))})
                  + protocol.frame({"id": 2, "op": "infer", "model": fast,
                                    "inputs": protocol.encode_tensors({"x": x})}))
        first, second = read_frame(s), read_frame(s)
    assert (first["id"], second["id"]) == (2, 1)
    assert first["ok"] and second["ok"]
    np.testing.assert_allclose(protocol.decode_tensors(first["outputs"])["y"],
                               reference(fast, x), **TOL)
    assert protocol.decode_tensors(second["outputs"])["y"][0] == 2.0


def test_infer_many_pipelines_and_keeps_request_order(address):
    rng = np.random.default_rng(1)
    with Client(address) as c:
        fast = fast_model_beside_slow(c)
        xs = [x_for(rng) for _ in range(40)]
        names = [MODELS[i % len(MODELS)] for i in range(40)]
        # The slow request first: every other answer overtakes it on the wire.
        outs = c.infer_many([("slow", slow_input(0.5))]
                            + [(name, {"x": x}) for name, x in zip(names, xs)])
        assert outs[0]["y"][0] == 1.0
        for name, x, out in zip(names, xs, outs[1:]):
            np.testing.assert_allclose(out["y"], reference(name, x), **TOL)
        np.testing.assert_allclose(c.infer(fast, {"x": xs[0]})["y"], reference(fast, xs[0]),
                                   **TOL)


@pytest.mark.parametrize("requests, timeout", [("small", 60), ("large", 60),
                                               ("large", None)])
def test_infer_many_of_answers_past_the_write_allowance(address, requests, timeout):
    # The server reads no further from a client whose answers back up; the
    # SDK reads answers while it sends, so a batch of 32 MiB of answers is
    # answered whole whether its requests are small or as large as their
    # answers, on a socket with a timeout or a blocking one (None).
    n, count = 128 << 10, 64  # 512 KiB answers
    if requests == "small":
        batch = [("echo", {"n": np.array([n])}) for _ in range(count)]
    else:
        batch = [("echo", {"x": np.full(n, i, np.float32)}) for i in range(count)]
    with Client(address, timeout=timeout) as c:
        outs = c.infer_many(batch, timeout=None if timeout is None else 50)
    assert len(outs) == count
    for i, out in enumerate(outs):
        assert out["y"].shape == (n,)
        assert out["y"][0] == out["y"][-1] == (1.0 if requests == "small" else i)


def test_one_connection_pipelining_past_its_limit_waits_and_is_never_overloaded(address):
    # Past 1,024 requests in flight a connection is not read until half are
    # answered; the frames of one read already in hand wait too (a read of
    # small frames holds thousands, which met the model's queue of 1,024).
    count = 3 * 1024
    with Client(address) as c:
        outs = c.infer_many([("echo", {"x": np.full(1, i, np.float32)}) for i in range(count)],
                            timeout=60)
    assert [float(out["y"][0]) for out in outs] == list(range(count))


def test_large_answers_arrive_aligned_and_are_not_copied(address):
    # Where a tensor's data began in its frame was up to the lengths of the
    # keys before it (the id's, the shape's): misaligned, it was copied, and
    # a 40 MB answer took twice its memory (a review). A pad now aligns it.
    xs = [np.arange(n, dtype=np.float32) for n in range(20_000, 20_004)]
    xs += [np.arange(20_001, dtype=np.float64), np.ones((3, 7001), np.complex128)]
    with Client(address) as c:
        for i, x in enumerate(xs * 2):  # ids of other lengths the second time round
            y = c.infer("echo", {"x": x})["y"]
            assert np.array_equal(y, x) and y.flags.aligned
            assert not y.flags.owndata, (i, x.shape, x.dtype)  # a view of its frame


def test_a_map_with_a_pad_key_of_its_own_keeps_it():
    # The alignment pad is a second "pad" entry: beside one of the map's
    # own, the decoder kept the last, and the map's own value was lost.
    data = bytes(range(256)) * 512  # 128 KiB: a large bin
    message = {"id": 1, "t": {"pad": b"mine", "data": data}, "u": {"dtype": "uint8",
                                                                  "shape": [len(data)],
                                                                  "data": data}}
    body = b"".join(bytes(part) for part in protocol.frame_parts(message))[4:]
    got = protocol.decode(bytearray(body))
    assert got["t"]["pad"] == b"mine" and bytes(got["t"]["data"]) == data
    assert bytes(got["u"]["data"]) == data and set(got["u"]) == {"dtype", "shape", "data",
                                                                  "pad"}


def test_large_tensors_cross_whole_both_ways(address):
    # Tensors of protocol.BIG bytes or more are sent from where they lie
    # and decoded as views of the frame they came in: every size around
    # the threshold, both clients, alone and pipelined with small ones.
    rng = np.random.default_rng(9)
    sizes = [protocol.BIG - 1, protocol.BIG, protocol.BIG + 1, 3 << 20]
    xs = [rng.integers(0, 255, n, dtype=np.uint8) for n in sizes]
    xs.append(rng.standard_normal((512, 1031)).astype(np.float32))  # 2 MiB, 2-d
    with Client(address) as c:
        for x in xs:
            y = c.infer("echo", {"x": x})["y"]
            assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(y, x)
            assert y.flags.aligned  # numpy's fast paths skip misaligned data
        small = x_for(rng)
        outs = c.infer_many([("echo", {"x": x}) for x in xs] + [("m00", {"x": small})])
        for x, out in zip(xs, outs):
            assert np.array_equal(out["y"], x)
        np.testing.assert_allclose(outs[-1]["y"], reference("m00", small), **TOL)

    async def main():
        async with AsyncClient(address, connections=2) as c:
            outs = await asyncio.gather(*(c.infer("echo", {"x": x}) for x in xs))
            for x, out in zip(xs, outs):
                assert np.array_equal(out["y"], x)
            # What is sent is the array as it was when infer() was called,
            # whatever the caller does with it once infer() has yielded.
            buffer = np.zeros(8 << 20, np.float32)
            call = asyncio.ensure_future(c.infer("echo", {"x": buffer}))
            await asyncio.sleep(0)
            buffer[:] = 1
            assert not (await call)["y"].any()

    run(main())


@pytest.mark.parametrize("nbytes, pieces", [(100 << 10, 0), (1 << 20, 1), (1 << 20, 7)],
                         ids=["whole-in-one-read", "begun-then-rest", "begun-then-7"])
def test_a_large_frame_between_small_ones(address, nbytes, pieces):
    # The server takes a large frame whole from one read, or begun in one
    # and finished over others (1 MiB: within the receive budget), with the
    # frames before and after it in the same reads.
    x = np.arange(nbytes // 4, dtype=np.float32)
    stream = (protocol.frame({"id": 1, "op": "health"})
              + protocol.frame({"id": 2, "op": "infer", "model": "echo",
                                "inputs": protocol.encode_tensors({"x": x})})
              + protocol.frame({"id": 3, "op": "health"}))
    if pieces:
        cut = 200  # the first read ends inside the large frame
        step = -(-(len(stream) - cut) // pieces)
        chunks = [stream[:cut]] + [stream[i:i + step] for i in range(cut, len(stream), step)]
    else:
        chunks = [stream]
    with socket.create_connection(address, timeout=30) as s:
        for chunk in chunks:
            s.sendall(chunk)
            time.sleep(0.01)
        answers = {}
        for _ in range(3):
            r = read_frame(s)
            answers[r["id"]] = r
    assert answers[1]["ok"] and answers[3]["ok"], answers
    y = protocol.decode_tensors(answers[2]["outputs"])["y"]
    assert np.array_equal(y, x)


def test_odd_outputs_are_answered_and_scalars_stay_scalars(address):
    # Every answer comes back: an output dtype the wire cannot carry is the
    # model's typed error (it went unanswered), no outputs are no outputs,
    # and a 0-d array stays 0-d both ways (it came back with shape [1]).
    with Client(address, timeout=20) as c:
        # Dates, objects, text: no model's answer (a string was served as one).
        for kind, dtype in ((0, "datetime64"), (10, "object"), (11, "<U5")):
            with pytest.raises(InternalError, match=f"^odd: an output is {dtype}"):
                c.infer("odd", {"kind": np.array([kind])})
        with pytest.raises(InternalError, match="^odd: .*float128, which the TCP protocol "
                                                "cannot carry"):
            c.infer("odd", {"kind": np.array([12])})
        assert c.infer("odd", {"kind": np.array([1])}) == {}
        out = c.infer("odd", {"kind": np.array([2])})
        assert out["output"].shape == () and out["output"] == 3.5
        out = c.infer("odd", {"kind": np.array(5, np.int64)})
        assert out["y"].shape == () and out["y"] == 10
        # A bool's bytes on the wire are 0 or 1 (the SDK refuses others).
        assert c.infer("odd", {"kind": np.array([6])})["y"].tolist() == [False, True, True, True]
        # An output named 0 beside one named "0" lost one of them, unsaid.
        with pytest.raises(InternalError, match=r"^odd: an output is named by int 0; "):
            c.infer("odd", {"kind": np.array([7])})
        assert list(c.infer("odd", {"kind": np.array([9])})) == ["y"]
        with pytest.raises(InternalError, match="^odd: an output is not an array: ValueError"):
            c.infer("odd", {"kind": np.array([8])})
        np.testing.assert_allclose(c.infer("m00", {"x": x_for(np.random.default_rng(1))})["y"],
                                   reference("m00", x_for(np.random.default_rng(1))), **TOL)


def test_more_tensors_than_a_ring_record_has_parts_cross_both_ways(address):
    # A record has 64 parts: a request of 64 inputs was TOO_LARGE, and an
    # answer of 64 outputs (a detection head's, every layer's state) too.
    rng = np.random.default_rng(7)
    dtypes = [np.float32, np.float64, np.int8, np.bool_, np.complex128, np.float16, np.uint64]
    inputs = {"kind": np.array([3])}
    for i in range(150):
        shape = [(), (0,), (3,), (2, 5), (1 << 17,)][i % 5] if i != 77 else (1 << 20,)
        inputs[f"t{i:03d}"] = rng.integers(0, 2, shape).astype(dtypes[i % len(dtypes)])
    with Client(address, timeout=30) as c:
        out = c.infer("odd", inputs)
    assert list(out) == ["out_" + name for name in inputs]
    for name, x in inputs.items():
        got = out["out_" + name]
        assert got.dtype == x.dtype and got.shape == x.shape, name
        np.testing.assert_array_equal(got, x, err_msg=name)


def test_the_client_works_with_descriptors_past_1024(address):
    # select() cannot watch a descriptor numbered 1024 or more; the SDK polls.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this machine allows {hard} open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with Client(address) as c:
            x = x_for(np.random.default_rng(3))
            outs = c.infer_many([("m00", {"x": x})] * 3)
            assert c._pool[-1].sock.fileno() >= 1024
            assert c.infer("m00", {"x": x})["y"].shape == outs[0]["y"].shape
            assert c.infer("m00", {"x": x})["y"].shape == outs[0]["y"].shape
        for out in outs:
            np.testing.assert_allclose(out["y"], reference("m00", x), **TOL)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_pipelined_control_operations_take_effect_in_order(address):
    # Each runs as a task of its own; on one model they still run in the
    # order they were sent, so the last one's effect is what stays: a pin
    # of a cold model, then an unload sent before its load is done, leaves
    # it unloaded and unpinned (not pinned by a pin that finished last).
    name = MODELS[3]

    def row(s) -> dict:
        s.sendall(protocol.frame({"id": 0, "op": "stats"}))
        return next(r for r in read_frame(s)["stats"]["models"] if r["name"] == name)

    with socket.create_connection(address, timeout=20) as s:
        for ops in (["pin", "unload"], ["load", "pin", "unload", "load"],
                    ["pin", "unload", "pin", "unload"]):
            s.sendall(protocol.frame({"id": 99, "op": "unload", "model": name}))
            assert read_frame(s)["ok"]  # cold to begin with
            s.sendall(b"".join(protocol.frame({"id": i + 1, "op": op, "model": name})
                               for i, op in enumerate(ops)))
            answers = [read_frame(s) for _ in ops]
            assert all(a["ok"] for a in answers), answers
            state = row(s)
            assert not state["pinned"], (ops, state)
            assert (state["state"] == "resident") == (ops[-1] == "load"), (ops, state)


def assert_each_answer_gives_its_pin_back(address: tuple[str, int], name: str) -> None:
    x = x_for(np.random.default_rng(5))
    with Client(address, timeout=30) as c:
        for _ in range(10):
            np.testing.assert_allclose(c.infer(name, {"x": x})["y"], reference(name, x),
                                       rtol=1e-5, atol=1e-6)
            row = next(r for r in c.stats()["models"] if r["name"] == name)
            assert row["pins"] == 0 and row["state"] == "resident", row
        c.infer(name, {"x": x})
        c.unload(name)
        row = next(r for r in c.stats()["models"] if r["name"] == name)
        assert row["state"] != "resident" and row["pins"] == 0, row


def test_each_answer_gives_its_pin_back_by_the_clients_next_operation(address):
    # The server keeps an answered inference's books (the pin on its
    # model, its call time) in a later turn of the loop than the answer's
    # write (workers.Worker._keep_books): an operation that comes after
    # finds them kept. A pin never given back would keep the model from
    # its unload.
    assert_each_answer_gives_its_pin_back(address, MODELS[2])


def test_answers_read_when_the_worker_wakes_the_loop_give_their_pins_back(request, repo):
    # Not polled for (poll_us 0): the loop drains the answers as the worker
    # wakes it, and keeps their books in the next turn.
    _, address = start(request, "--repo", str(repo), "--workers", "1",
                       env=environ(MMENGINE_POLL_US="0"))
    assert_each_answer_gives_its_pin_back(address, MODELS[0])


def test_async_client_many_in_flight(address):
    with Client(address) as c:
        fast = fast_model_beside_slow(c)
    rng = np.random.default_rng(2)
    xs = [x_for(rng, n=1 + i % 3) for i in range(200)]

    async def main():
        done = []
        # timeout=None: no limit on the client's side (the server's still holds)
        async with AsyncClient(address, connections=2, timeout=None) as client:
            async def one(i):
                out = await client.infer(fast, {"x": xs[i]})
                done.append(i)
                return out

            async def slow():
                out = await client.infer("slow", slow_input(1.0))
                done.append("slow")
                return out

            results = await asyncio.gather(slow(), *(one(i) for i in range(len(xs))))
        return done, results

    done, results = run(main())
    assert done[-1] == "slow", "a fast answer waited behind the slow one"
    assert results[0]["y"][0] == 2.0
    for x, out in zip(xs, results[1:]):
        np.testing.assert_allclose(out["y"], reference(fast, x), **TOL)


STAGES = {"load_wait_ns", "queue_ns", "compute_ns", "ring_ns", "encode_ns", "total_ns"}


def test_both_clients_say_where_a_request_spent_its_time_when_asked(address):
    x = x_for(np.random.default_rng(3))

    def check(plain, timed):
        assert plain.timing is None and set(plain) == set(timed) == {"y"}
        np.testing.assert_allclose(timed["y"], reference("m02", x), **TOL)
        t = timed.timing
        assert STAGES | {"round_trip_ns", "outside_ns"} <= set(t)
        assert sum(t[k] for k in STAGES - {"total_ns"}) == t["total_ns"]
        assert 0 < t["total_ns"] < t["round_trip_ns"] < 10e9
        assert t["outside_ns"] == t["round_trip_ns"] - t["total_ns"]

    with Client(address) as c:
        c.infer("m02", {"x": x})  # resident: no load in what follows
        check(c.infer("m02", {"x": x}), c.infer("m02", {"x": x}, timing=True))
        assert [o.timing for o in c.infer_many([("m02", {"x": x})] * 2)] == [None, None]

    async def main():
        async with AsyncClient(address) as client:
            return (await client.infer("m02", {"x": x}),
                    await client.infer("m02", {"x": x}, timing=True))

    check(*run(main()))
    with socket.create_connection(address, timeout=10) as s:  # not a boolean: refused
        s.sendall(protocol.frame({"id": 5, "op": "infer", "model": "m02", "timing": "yes",
                                  "inputs": protocol.encode_tensors({"x": x})}))
        answer = read_frame(s)
    assert answer["id"] == 5 and answer["error"]["code"] == int(ErrorCode.BAD_REQUEST)
    assert "'timing'" in answer["error"]["message"]


def test_async_client_gives_up_at_its_own_timeout_and_goes_on(address):
    with Client(address) as c:
        fast = fast_model_beside_slow(c)
    x = x_for(np.random.default_rng(9))

    async def main():
        async with AsyncClient(address, timeout=0.3) as client:
            t0 = time.monotonic()
            with pytest.raises(Timeout):
                await client.infer("slow", slow_input(2.0))
            waited = time.monotonic() - t0
            # A call its caller cancels leaves nothing behind either (an
            # answer that never came kept its entry for ever).
            call = asyncio.ensure_future(client.infer("slow", slow_input(2.0), timeout=None))
            await asyncio.sleep(0.1)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            out = await client.infer(fast, {"x": x})  # the connection still serves
            return waited, out, client._conns[0].pending

    waited, out, pending = run(main())
    assert 0.25 <= waited < 1.5  # the loop's clock rounds: not before about 0.3 s
    np.testing.assert_allclose(out["y"], reference(fast, x), **TOL)
    assert not pending  # the abandoned request left nothing behind


def test_both_clients_take_any_positive_timeout_and_refuse_the_rest(address):
    x = x_for(np.random.default_rng(5))
    want = reference("m00", x)
    # No limit, not an OverflowError of the socket's or poll()'s.
    forever = (float("inf"), 1e12, 3e6)
    refused = (0, -1.0, float("nan"), "5", True)
    with Client(address, timeout=float("inf")) as c:
        for t in forever:
            np.testing.assert_allclose(c.infer("m00", {"x": x}, timeout=t)["y"], want, **TOL)
        for t in refused:
            with pytest.raises(ValueError, match="positive number of seconds"):
                c.infer("m00", {"x": x}, timeout=t)
        # (model, inputs, version) as well as (model, inputs).
        outs = c.infer_many([("m00", {"x": x}, 1), ("m00", {"x": x})], timeout=3e6)
        for out in outs:
            np.testing.assert_allclose(out["y"], want, **TOL)

    async def main():
        async with AsyncClient(address, timeout=float("inf")) as client:
            for t in forever:
                np.testing.assert_allclose((await client.infer("m00", {"x": x}, timeout=t))["y"],
                                           want, **TOL)
            for t in refused:
                with pytest.raises(ValueError, match="positive number of seconds"):
                    await client.infer("m00", {"x": x}, timeout=t)
            # A numpy number is a number (msgpack alone would refuse it).
            await client.infer("m00", {"x": x}, timeout=np.float32(20))

    run(main())
    with pytest.raises(ValueError, match="positive number of seconds"):
        Client(address, timeout=0)


# -- typed errors ------------------------------------------------------------------

def test_a_worker_beside_a_busy_process_stops_spinning_and_says_so(request, repo):
    # A worker spinning for requests on a CPU that a busy process shares
    # is runnable but never woken: each request waits out the other's time
    # slice. It backs off (ring.BackOff), and so do the front-end's polls;
    # stats and /metrics count both.
    server, address = start(request, "--repo", str(repo), "--workers", "1")
    cpu = max(os.sched_getaffinity(0))
    x = x_for(np.random.default_rng(5))
    with Client(address) as client:
        for _ in range(2):  # its load (its loader took the CPU too), and one more
            np.testing.assert_allclose(client.infer("m00", {"x": x})["y"],
                                       reference("m00", x), **TOL)
        (worker,) = client.stats()["workers"]
        before = worker["spin_backoffs"]
        for thread in psutil.Process(worker["pid"]).threads():
            os.sched_setaffinity(thread.id, {cpu})
        with busy_process(cpu):
            deadline, backoffs = time.monotonic() + 30, before
            for _ in range(300):  # ~4 ms each until it backs off
                np.testing.assert_allclose(client.infer("m00", {"x": x})["y"],
                                           reference("m00", x), **TOL)
                last, backoffs = backoffs, client.stats()["workers"][0]["spin_backoffs"]
                if backoffs["worker"] > before["worker"] or time.monotonic() > deadline:
                    break
            assert backoffs["worker"] > before["worker"], (before, backoffs)
            # The front-end's polls follow at the next request it sends,
            # which may have been the last one already.
            client.infer("m00", {"x": x})
            after = client.stats()["workers"][0]["spin_backoffs"]
    assert after["front_end"] > last["front_end"], (last, backoffs, after)
    said = subprocess.run(command("stats", "--url", "%s:%d" % address), env=environ(),
                          capture_output=True, text=True, timeout=60)
    assert re.search(r"its spins backed off beside busy processes (\d+) times, the "
                     r"front-end's polls (\d+)", said.stdout), said.stdout


def test_every_typed_error_reaches_the_sdk_as_its_class(served, address):
    rng = np.random.default_rng(3)
    x = x_for(rng)
    tensor = protocol.encode_tensors({"x": x})["x"]

    def infer_message(**fields):
        return {"op": "infer", "model": "m00", "inputs": {"x": tensor}, **fields}

    with Client(address) as c:
        cases = [
            (ModelNotFound, lambda: c.infer("no-such-model", {"x": x})),
            (ModelNotFound, lambda: c.infer("../m00", {"x": x})),
            (ModelNotFound, lambda: c.infer("m00", {"x": x}, version=9)),
            (BadRequest, lambda: c.infer("m00", {"x": x[:, :3]})),
            (BadRequest, lambda: c.infer("m00", {"x": x.astype(np.float64)})),
            (BadRequest, lambda: c.infer("m00", {"z": x})),
            (BadRequest, lambda: c.call({"op": "explode"})),
            (BadRequest, lambda: c.call(infer_message(model=5))),
            (BadRequest, lambda: c.call(infer_message(version="1"))),
            (BadRequest, lambda: c.call(infer_message(timeout=-1))),
            (BadRequest, lambda: c.call(infer_message(inputs=[tensor]))),
            (BadRequest, lambda: c.call(infer_message(inputs={"x": {**tensor, "data": "x"}}))),
            (BadRequest, lambda: c.call(infer_message(inputs={"x": {**tensor, "shape": [3]}}))),
            (BadRequest, lambda: c.call(infer_message(inputs={"x": {**tensor,
                                                                   "dtype": "object"}}))),
            (TooLarge, lambda: c.infer("huge", {"x": x[:, :4]})),
            (LoadFailed, lambda: c.infer("corrupt", {"x": x})),
            (Timeout, lambda: c.infer("slow", slow_input(1.0), timeout=0.2)),
        ]
        for expected, call in cases:
            with pytest.raises(expected) as info:
                call()
            assert type(info.value) is expected
            if expected is Timeout:  # the server's, not the client giving up first
                assert "no answer from the server" not in str(info.value)
            # The connection survives a request error and serves the next one.
            np.testing.assert_allclose(c.infer("m00", {"x": x})["y"], reference("m00", x),
                                       **TOL)
        # echo declares nothing: a bool's bytes are the protocol's own check
        with pytest.raises(BadRequest, match="a bool is one byte, 0 or 1"):
            c.call({"op": "infer", "model": "echo", "inputs": {
                "x": {"dtype": "bool", "shape": [3], "data": bytes([0, 2, 1])}}})
        assert c.infer("echo", {"x": np.array([True, False])})["y"].tolist() == [True, False]
    # The operator's line, on serve's stdout (the engine's "mmengine" logger).
    said = re.compile(r"^\S+Z WARNING mmengine: corrupt v1 failed to load: .+; requests for "
                      r"it fail at once for \d+ s$", re.MULTILINE)
    for _ in range(100):  # bounded: the output is read by a thread
        if said.search("".join(served[0].output)):
            break
        time.sleep(0.05)
    assert said.search("".join(served[0].output)), "".join(served[0].output)


def test_an_oversized_frame_is_refused_from_its_header(address):
    largest = max(protocol.DEFAULT_MAX_FRAME, Config().max_request_bytes)
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(protocol.LENGTH.pack(largest + 1))  # and never the body
        response = read_frame(s)
        assert_closed(s)
    assert response["id"] is None and response["ok"] is False
    assert response["error"]["code"] == ErrorCode.TOO_LARGE
    assert response["error"]["name"] == "TOO_LARGE"
    assert str(largest) in response["error"]["message"]


@pytest.mark.parametrize("after", [0, 4 << 20], ids=["alone", "frames-after-it"])
def test_a_client_that_sends_a_whole_oversized_frame_reads_too_large(address, after):
    # The server refuses the frame from its header but reads the rest away
    # before it closes: a close under the client's send would reset the
    # connection and take the error with it (ConnectionResetError before).
    # What the client pipelined after it is read away too: the close came
    # once the refused frame's last byte was read, and those after it
    # reset the connection under the client's send (BrokenPipeError).
    largest = max(protocol.DEFAULT_MAX_FRAME, Config().max_request_bytes)
    body = protocol.frame({"op": "infer", "model": "m00", "id": 1, "inputs": {
        "x": {"dtype": "uint8", "shape": [largest], "data": bytes(largest)}}})
    more = protocol.frame({"op": "health", "id": 2, "pad": bytes(after)}) if after else b""
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(body + more)
        response = read_frame(s)
        assert_closed(s)
    assert response["id"] is None and response["error"]["name"] == "TOO_LARGE"
    assert "exceeds the maximum" in response["error"]["message"]


def test_the_largest_frame_is_no_longer_than_a_frames_length_can_say(tmp_path):
    # A ring of 4 GiB made the limit 2**32 bytes: a length no header can
    # say, so health promised what no frame can be, and TOO_LARGE could
    # never be sent. The engine is not started: its rings, written whole
    # at creation, would take 8 GiB of /dev/shm, and the limit is the
    # server's own, from the configuration.
    from mmengine.engine import Engine
    from mmengine.server.tcp import TcpServer

    async def main():
        server = TcpServer(Engine(Config(repo=str(tmp_path), workers=1, ring_bytes="4GiB")))
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(protocol.frame({"id": 1, "op": "health"}))
        n = protocol.LENGTH.unpack(await asyncio.wait_for(reader.readexactly(4), 10))[0]
        health = protocol.decode(await reader.readexactly(n))
        writer.close()
        await server.stop()
        return health

    # No longer than one ring record either: what no ring can take is
    # refused before its body is read.
    assert run(main())["max_frame"] == LARGEST_RECORD < protocol.MAX_LENGTH == (1 << 32) - 1


@pytest.mark.parametrize("nbytes", [(1 << 32) - 16, 1 << 32], ids=["frame", "bin"])
def test_an_answer_longer_than_a_frame_can_say_is_too_large(nbytes):
    # What a ring of 4 GiB carries: its answer's frame, 2**32 bytes or more,
    # raised struct.error in the server's callback, and the client never had
    # an answer. TooLarge is the request's answer now (tcp._on_answer makes
    # this very call). The output is calloc'd: untouched, it takes no memory.
    tensors = protocol.encode_tensors({"y": np.zeros(nbytes, np.uint8)})
    with pytest.raises(TooLarge, match=r"a frame of \d+ bytes or more cannot be sent"):
        protocol.frames({"id": b"i" * 64, "ok": True, "outputs": tensors}, tensors)


def test_an_unfinished_frame_is_cut_its_timeout_after_it_began_with_a_request_in_flight(
        request, repo):
    # With a request in flight the timer moved itself a whole timeout from
    # each tick: a frame begun between two ticks lived up to twice its limit.
    idle = 2.0
    _, address = start(request, "--repo", str(repo), "--workers", "1",
                       env=environ(MMENGINE_TCP_IDLE_TIMEOUT_S=str(idle)))
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(protocol.frame({"id": 0, "op": "health"}))
        assert read_frame(s)["ok"]  # the idle timer ticks an idle timeout after the connect
        s.sendall(protocol.frame({"id": 1, "op": "infer", "model": "slow",
                                  "inputs": protocol.encode_tensors(slow_input(3 * idle))}))
        time.sleep(idle / 2)
        t0 = time.monotonic()
        s.sendall(protocol.LENGTH.pack(100) + b"\x81")  # begun, never finished
        answer = read_frame(s)
        took = time.monotonic() - t0
    assert answer["id"] is None and answer["error"]["name"] == "TIMEOUT", answer
    assert took < 1.25 * idle, took  # 1.5 idle timeouts before


def test_a_frame_cut_as_unfinished_while_its_bytes_come_reads_its_whole_timeout(
        request, repo):
    """The TIMEOUT of a frame that came too slowly was followed by a close
    with the frame's next bytes unread, which reset the connection: its
    client read ECONNRESET after the error, or in its place."""
    idle = 1.0
    server, address = start(request, "--repo", str(repo), "--workers", "1",
                            env=environ(MMENGINE_TCP_IDLE_TIMEOUT_S=str(idle)))
    n = 16 << 20
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(protocol.LENGTH.pack(n) + b"\x81")  # begun
        time.sleep(idle / 2)
        with stopped(server):  # its next bytes come as it is due
            sender = send_in_background(s, bytes(n - 2))  # all but the last
            time.sleep(idle)
        response = read_frame(s)
        assert_closed(s)  # ConnectionResetError before
        sender.join(30)
    assert response["id"] is None and response["error"]["name"] == "TIMEOUT", response


def test_the_sdk_refuses_a_request_past_the_servers_maximum_unsent(address):
    # health says the server's maximum frame; both clients ask it before
    # their first request over 1 MiB, and refuse one past it themselves.
    largest = max(protocol.DEFAULT_MAX_FRAME, Config().max_request_bytes)
    x = np.zeros(largest // 4 + 1, np.float32)
    fits = np.zeros((2 << 20) // 4, np.float32)  # checked, and sent
    with Client(address) as c:
        assert c.health()["max_frame"] == largest
        with pytest.raises(TooLarge, match="not sent"):
            c.infer("m00", {"x": x})
        with pytest.raises(BadRequest):  # the server's answer: it was sent
            c.infer("m00", {"x": fits})
        small = x_for(np.random.default_rng(4))
        np.testing.assert_allclose(c.infer("m00", {"x": small})["y"], reference("m00", small),
                                   **TOL)

    async def main():
        async with AsyncClient(address) as c:
            with pytest.raises(TooLarge, match="not sent"):
                await c.infer("m00", {"x": x})
            with pytest.raises(BadRequest):
                await c.infer("m00", {"x": fits})

    run(main())


@pytest.mark.parametrize("body", [b"\xc1\xc1\xc1\xc1", b"\x92\x01", b"\x2a",
                                  msgpack.packb({"op": "health"}),
                                  msgpack.packb({"id": None, "op": "health"}),
                                  # 1 MiB that decoded to ~75 MiB of empty maps
                                  msgpack.packb({"id": 1, "op": "health",
                                                 "pad": [{}] * (1 << 20)}),
                                  msgpack.packb({"id": 1, "op": "health",
                                                 "pad": [[1] * 60_000] * 20})],
                         ids=["garbage", "truncated", "not-a-map", "no-id", "nil-id",
                              "many-maps", "many-values"])
def test_a_malformed_frame_closes_only_its_connection(address, body):
    x = x_for(np.random.default_rng(4))
    with Client(address, pool_size=1) as c:
        c.infer("m00", {"x": x})  # its connection is open before the bad one
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(protocol.LENGTH.pack(len(body)) + body)
            response = read_frame(s)
            assert_closed(s)
        assert response["id"] is None
        assert response["error"]["code"] == ErrorCode.BAD_REQUEST
        np.testing.assert_allclose(c.infer("m00", {"x": x})["y"], reference("m00", x), **TOL)


def test_a_connection_ended_with_inferences_in_flight_holds_no_drain(tmp_path, own_segments):
    # A malformed frame ends its connection and cancels its inferences; the
    # engine runs no answer for a future its caller cancels, so they stayed
    # among the connection's requests in flight, done: a stopping server's
    # drain found them done, looked again, and spun until its deadline.
    from mmengine.engine import Engine
    from mmengine.server.tcp import TcpServer

    write_handler(tmp_path, "slow", SLOW_HANDLER)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            server = TcpServer(engine)
            port = await server.start("127.0.0.1", 0)
            try:
                await engine.infer("slow", slow_input(0.0))  # resident
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"".join(
                    protocol.frame({"id": i, "op": "infer", "model": "slow",
                                    "inputs": protocol.encode_tensors(slow_input(2.0))})
                    for i in (1, 2)) + protocol.LENGTH.pack(0))  # and a malformed one
                error = protocol.decode((await reader.readexactly(
                    protocol.LENGTH.unpack(await reader.readexactly(4))[0])))
                assert error["id"] is None and not error["ok"]
                t0 = time.monotonic()
                await server.drain(t0 + 10)
                drained = time.monotonic() - t0
                writer.close()
                return drained
            finally:
                await server.stop()

    assert run(main(), max_stall=5) < 1.0


def test_an_errors_message_is_cut_short_where_it_quotes_a_long_value(address):
    # A message quotes what the caller sent as repr, up to four characters
    # a byte: a 1 MiB name made a 4 MiB answer (a 64 MiB one, 256 MiB, held
    # in the server until its client read it).
    long = "\x00" * (1 << 20)
    requests = [({"id": 1, "op": "infer", "model": "m00",
                  "inputs": {long: {"dtype": "float32", "shape": [1]}}}, ErrorCode.BAD_REQUEST),
                ({"id": 2, "op": "load", "model": long}, ErrorCode.MODEL_NOT_FOUND)]
    with socket.create_connection(address, timeout=10) as s:
        for request, code in requests:
            s.sendall(protocol.frame(request))
            response = read_frame(s)
            assert response["id"] == request["id"]
            assert response["error"]["code"] == code
            message = response["error"]["message"]
            assert len(message) <= 4096 and "characters in all) ..." in message, message[:200]


@contextlib.contextmanager
def stopped(server: Server):
    """The server's process stopped while the block runs, as a loop busy
    elsewhere is: what a client sends meanwhile waits whole in the kernel
    for the loop's accept, or its next read."""
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)


def test_a_malformed_frame_with_frames_after_it_is_read_whole_to_the_end(served):
    """A malformed frame's error was followed by a close with the frames
    sent after it unread, and the kernel answered them with a reset: its
    client read ECONNRESET after the error, or in place of it when the
    reset came first."""
    server, address = served
    bad = protocol.LENGTH.pack(4) + b"\xc1\xc1\xc1\xc1"
    more = b"".join(protocol.frame({"id": i, "op": "health"}) for i in range(1, 100_000))
    with stopped(server):  # all of it waits for the server's first read, which ends there
        s = socket.create_connection(address, timeout=10)
        sender = send_in_background(s, bad + more)
        time.sleep(0.2)
    with s:
        response = read_frame(s)
        assert_closed(s)  # ConnectionResetError before
        sender.join(10)
    assert response["id"] is None and response["error"]["name"] == "BAD_REQUEST", response
    with Client(address) as c:  # the server goes on
        assert c.health()["status"] == "serving"


def test_a_connection_past_max_connections_reads_its_whole_overloaded_frame(request, repo):
    """One past max_connections was written OVERLOADED and closed at once,
    whatever its client had sent by then: unread, its request reset the
    connection, and the client read ECONNRESET after the frame, or in its
    place. A server that has max_connections open is busy, and accepts the
    next connection late, when its request has come."""
    server, address = start(request, "--repo", str(repo), "--workers", "1",
                            env=environ(MMENGINE_MAX_CONNECTIONS="1"))
    with socket.create_connection(address, timeout=10) as held:
        held.sendall(protocol.frame({"id": 1, "op": "health"}))
        assert read_frame(held)["ok"]  # admitted: the one open
        with stopped(server):
            s = socket.create_connection(address, timeout=10)
            s.sendall(protocol.frame({"id": 2, "op": "health"}))
        with s:
            refusal = read_frame(s)
            assert_closed(s)  # ConnectionResetError before
        assert refusal["id"] is None and refusal["error"]["name"] == "OVERLOADED", refusal
        held.sendall(protocol.frame({"id": 3, "op": "health"}))  # still served
        assert read_frame(held)["ok"]


def nested(depth: int, inner: object) -> object:
    for _ in range(depth):
        inner = [inner]
    return inner


@pytest.mark.parametrize("field", ["op", "dtype"])
def test_a_value_nested_as_deep_as_the_protocol_allows_is_a_bad_request(address, field):
    # repr() of a value nested ~1,000 deep is past Python's recursion: the
    # error was INTERNAL, with a nil id, and the connection closed.
    value = nested(1000, 1)
    message = {"id": 7, "op": value} if field == "op" else {
        "id": 7, "op": "infer", "model": "m00",
        "inputs": {"x": {"dtype": value, "shape": [1], "data": b"\0" * 4}}}
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(protocol.frame(message) + protocol.frame({"id": 8, "op": "health"}))
        response = read_frame(s)
        assert response["id"] == 7, response
        assert response["error"]["code"] == ErrorCode.BAD_REQUEST, response
        assert read_frame(s)["id"] == 8  # the connection goes on


@pytest.mark.parametrize("pad, entries", [([0] * 65_528, 65_536), ([0] * 65_529, 65_537),
                                          ([{"a": 0}] * 16_382, 65_536),
                                          ([{"a": 0}] * 16_383, 65_540)],
                         ids=["items-at-limit", "items-past", "maps-at-limit", "maps-past"])
def test_a_large_frames_entries_are_counted_as_the_protocol_says(address, pad, entries):
    # docs/protocol.md: each map's keys and values, each array's items, and
    # each map or array once more for itself (said otherwise before, and
    # counted otherwise: a map's pair as one entry).
    body = msgpack.packb({"id": 1, "op": "health", "pad": pad})
    assert len(body) >= protocol.BIG
    assert 8 + len(pad) + sum(1 + 2 * len(item) for item in pad if item != 0) == entries
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(protocol.LENGTH.pack(len(body)) + body)
        response = read_frame(s)
        if entries <= protocol.MAX_REQUEST_ENTRIES:
            assert response["id"] == 1 and response["ok"], response
            return
        assert response["id"] is None and response["error"]["code"] == ErrorCode.BAD_REQUEST
        assert "more than 65536 entries" in response["error"]["message"]
        assert_closed(s)


def test_empty_maps_in_arrays_nested_deep_are_counted_as_they_are_built():
    # Counted only as their parent's items, they cost nothing until it
    # ended: 16 nested arrays of 65,535 empty maps each built 1 M maps
    # before the frame was refused (a 64 MiB frame, 64 M: ~4.8 GB).
    import tracemalloc
    body = b"\x81\xa3pad"  # {"pad": [{} * 65535, [{} * 65535, [...]]]}
    for _ in range(16):
        body += b"\xdc\xff\xff" + b"\x80" * 65_534  # an array: 65,534 maps, then the next
    body += b"\x80" * 16
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest, match="more than 65536 entries"):
            protocol.decode(body, protocol.MAX_REQUEST_ENTRIES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak  # 65,536 maps, not a million


# -- the command line ----------------------------------------------------------------

def test_stats_prints_the_table(address):
    with Client(address) as c:
        c.infer("m01", {"x": x_for(np.random.default_rng(5))})
        with pytest.raises(LoadFailed):
            c.infer("corrupt", {"x": x_for(np.random.default_rng(5))})
    r = subprocess.run(command("stats", "--url", "%s:%d" % address), env=environ(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["model", "ver", "state", "worker", "queued", "bytes", "host",
                              "bytes", "uses", "loads", "evicts", "fails"]
    # Which model failed, and why, whatever its state now; in its back-off
    # (failed), for how long still.
    said = re.search(r"^corrupt v1: \d+ failed loads?, the last: .*safetensors.*?"
                     r"( \(tried again in [\d.]+ s\))?$", r.stdout, re.MULTILINE)
    assert said, r.stdout
    corrupt = next(row.split() for row in rows if row.startswith("corrupt "))
    assert (corrupt[2] == "failed") == (said[1] is not None), r.stdout
    m01 = next(row.split() for row in rows if row.startswith("m01 "))
    assert m01[:3] == ["m01", "1", "resident"]
    assert re.search(r"\d+ resident .* \d+ in the host tier \([\d,]+ bytes, [\d,]+ in copies "
                     r"that models resident on CPU workers run on; \d+ not resident\), "
                     r"\d+ hits, \d+ loads "
                     r"\(\d+ from the host tier\)", r.stdout)
    workers = [row for row in rows if row.startswith("worker ")]
    assert len(workers) == 2 and all(
        re.fullmatch(r"worker \d \(cpu, up, pid \d+\): \d+ in flight \(\d+ waiting a turn\), "
                     r"busy \d+%, "
                     r"[\d,]+ of [\d,]+ bytes"
                     r"(; its spins backed off beside busy processes \d+ times, "
                     r"the front-end's polls \d+)?", row) for row in workers), workers
    # Each server, with this connection among those open.
    tcp = [row for row in rows if row.startswith("tcp server ")]
    assert len(tcp) == 1 and re.fullmatch(
        r"tcp server on port %d: [1-9]\d* of \d+ connections open, \d+ refused, \d+ lingers"
        % address[1], tcp[0]), rows
    with socket.socket() as unused:  # a port nobody listens on: one line, exit 1
        unused.bind(("127.0.0.1", 0))
        down = subprocess.run(command("stats", "--url", "127.0.0.1:%d" % unused.getsockname()[1]),
                              env=environ(), capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr
    assert down.stderr.startswith("mmengine stats: ConnectionRefusedError"), down.stderr
    # The HTTP port's URL is not the TCP address: said so, not a DNS error.
    http = subprocess.run(command("stats", "--url", "http://%s:%d" % address), env=environ(),
                          capture_output=True, text=True, timeout=60)
    assert http.returncode == 1 and "host:port" in http.stderr, http.stderr


def test_both_clients_walk_the_listing_and_the_stats_a_page_at_a_time(address):
    with Client(address) as c:
        c.infer("m02", {"x": x_for(np.random.default_rng(6))})
        whole = c.list()
        pages, after = [], None
        for _ in range(len(whole) + 1):  # bounded: each page moves on by 3 names
            page = c.list(after=after, limit=3)
            pages.append(page)
            after = page.next
            if after is None:
                break
        totals_only = c.stats(limit=0)
        one_row = c.stats(after="m01", limit=1)
        counted = sorted({r["name"] for r in c.stats()["models"] if r["name"] > "m01"})
        bad = []
        for kwargs in ({"limit": 0}, {"limit": -1}, {"after": 7}):
            with pytest.raises(BadRequest) as caught:
                c.list(**kwargs)
            bad.append(str(caught.value))
        with pytest.raises(BadRequest):
            c.stats(limit=True)
        assert c.infer("m02", {"x": x_for(np.random.default_rng(6))})  # still serving

    async def walk_async():
        async with AsyncClient(address) as ac:
            first = await ac.list(limit=2)
            return first, await ac.list(after=first.next, limit=2)

    first, second = asyncio.run(walk_async())
    assert whole.next is None and len(whole) > 6
    assert [r["name"] for p in pages for r in p] == [r["name"] for r in whole]
    assert all(1 <= len({r["name"] for r in p}) <= 3 for p in pages) and len(pages) > 1
    assert [r["name"] for r in first + second] == [r["name"] for r in whole[:4]]
    assert totals_only["models"] == [] and totals_only["totals"]["loads"] >= 1
    assert "m02" in counted and [r["name"] for r in one_row["models"]] == counted[:1]
    assert one_row["next"] == (counted[0] if len(counted) > 1 else None)
    assert "'limit' must be an integer >= 1" in bad[0] and "'after'" in bad[2]


def test_bench_prints_its_table(address):
    r = subprocess.run(command("bench", "--url", "%s:%d" % address, "--requests", "200",
                               "--concurrency", "8", "--timeout", "20"),
                       env=environ(), capture_output=True, text=True, timeout=60)
    table = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in r.stdout.splitlines())
    # The models that declare no inputs are skipped, and said so; the rest
    # are driven, and what fails is counted by type.
    for name in ("corrupt", "slow"):
        assert f"skipping {name}" in r.stderr
    assert table["models"].startswith(f"{len(MODELS) + 1} ")  # with "huge"
    ok, failed = map(int, re.match(r"(\d+) ok, (\d+) failed of 200", table["requests"]).groups())
    assert ok + failed == 200 and ok > 0
    assert failed == int(table["errors"]) == int(table.get("errors TooLarge", 0))  # "huge"
    assert r.returncode == (1 if failed else 0), r.stderr  # failures: a failed run
    for key in ("latency p50", "latency p90", "latency p99", "latency max"):
        assert table[key].endswith(" ms")
    assert float(table["throughput"].split()[0].replace(",", "")) > 0
    assert table["hit rate"].endswith("%")
    assert int(table["loads"]) >= 0 and int(table["evictions"]) >= 0
    assert "200/200 requests" in r.stderr  # the progress bar's last state
    # Redrawn every 0.2 s into a pipe too: a line each in a CI log.
    assert r.stderr.count("/200 requests") == 1, r.stderr


def test_bench_draws_its_progress_on_a_terminal(address):
    master, slave = os.openpty()
    try:
        try:
            bench = subprocess.Popen(command("bench", "--url", "%s:%d" % address, "--requests",
                                             "2000", "--concurrency", "2", "--timeout", "20",
                                             "--duration", "20"),  # the reads end
                                     env=environ(), stdout=subprocess.PIPE, stderr=slave,
                                     text=True)
        finally:
            os.close(slave)  # the child's is then the only one: its end ends the reads
        drawn = b""
        with contextlib.suppress(OSError):  # EIO: the child's end is closed
            while chunk := os.read(master, 65536):
                drawn += chunk
        bench.communicate(timeout=60)
    finally:
        os.close(master)
    assert b"Traceback" not in drawn, drawn
    # Redrawn as it went, over itself, then its last state.
    assert drawn.count(b"\r[") >= 2 and b"2000/2000 requests" in drawn, drawn


def interruptible() -> None:
    """A child's Ctrl-C as a terminal's: the tests' own SIGINT may be
    ignored (a job a shell started in the background), and a child
    inherits that, so that no KeyboardInterrupt comes (preexec_fn)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def bench_table(stdout: str) -> dict[str, str]:
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in stdout.splitlines())


def requests_taken(address) -> int:
    """The inference requests the server at `address` has taken, in all."""
    with Client(address) as c:
        totals = c.stats()["totals"]
    return totals["hits"] + totals["misses"]


def wait_for_requests(address, more: int, since: int,
                      proc: subprocess.Popen | None = None) -> None:
    """Until the server has taken `more` requests after `since` (a child
    `proc`'s, which is then past its start-up), 60 s at most."""
    deadline = time.monotonic() + 60
    while requests_taken(address) < since + more:
        assert proc is None or proc.poll() is None, "it ended first"
        assert time.monotonic() < deadline, "no requests came"
        time.sleep(0.05)


def test_bench_interrupted_reports_what_it_did(address):
    # Ctrl-C: a traceback, and the requests done so far went unreported.
    before = requests_taken(address)
    bench = subprocess.Popen(command("bench", "--url", "%s:%d" % address, "--requests", "1000000",
                                     "--concurrency", "4", "--timeout", "20"),
                             env=environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=interruptible)
    try:
        wait_for_requests(address, 20, before, bench)
        bench.send_signal(signal.SIGINT)
        out, err = bench.communicate(timeout=60)
    finally:
        bench.kill()
    assert bench.returncode == 130 and "Traceback" not in err, err
    table = bench_table(out)
    assert table["stopped"] == "interrupted (Ctrl-C)"
    ok = int(re.match(r"(\d+) ok", table["requests"])[1])
    assert ok > 0 and table["latency p50"].endswith(" ms")


def test_bench_reports_what_it_did_when_the_server_goes_away(request, repo):
    # It ran through the rest of its requests, each refused at once, then
    # printed only "ConnectionRefusedError" (the server's totals failed).
    server, address = start(request, "--repo", str(repo), "--workers", "1")
    bench = subprocess.Popen(command("bench", "--url", "%s:%d" % address, "--requests", "1000000",
                                     "--concurrency", "4", "--timeout", "20"),
                             env=environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for_requests(address, 20, 0, bench)
        assert server.stop() == 0
        out, err = bench.communicate(timeout=60)
    finally:
        bench.kill()
    assert bench.returncode == 1 and "Traceback" not in err, err
    table = bench_table(out)
    assert table["stopped"].startswith("the server went away"), table
    ok, failed = map(int, re.match(r"(\d+) ok, (\d+) failed", table["requests"]).groups())
    assert ok > 0 and ok + failed < 1_000_000
    assert table["loads"].startswith("- (the server did not answer")


def test_stats_interrupted_or_misused_says_one_line(address):
    with socket.socket() as silent:  # listens, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        stats = subprocess.Popen(command("stats", "--url", "127.0.0.1:%d" % silent.getsockname()[1],
                                         "--timeout", "60"),
                                 env=environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, preexec_fn=interruptible)
        try:
            silent.settimeout(60)
            # It waits for the answer now, past its start-up. The connection
            # stays open: dropped, it was reset, and stats said so first.
            taken, _ = silent.accept()
            with taken:
                stats.send_signal(signal.SIGINT)
                _, err = stats.communicate(timeout=30)
        finally:
            stats.kill()
    assert stats.returncode == 130 and "Traceback" not in err, err
    # A bad --timeout is a usage error (2), not a server down (1).
    r = subprocess.run(command("stats", "--url", "%s:%d" % address, "--timeout", "nan"),
                       env=environ(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--timeout" in r.stderr, r.stderr


def test_bench_takes_a_steep_zipf(address):
    # 1 / k ** 2000 overflowed: a traceback, not a run (an operations review).
    r = subprocess.run(command("bench", "--url", "%s:%d" % address, "--requests", "20",
                               "--concurrency", "2", "--zipf", "2000", "--timeout", "20"),
                       env=environ(), capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    table = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in r.stdout.splitlines())
    assert "zipf s=2000" in table["models"]
    ok, failed = map(int, re.match(r"(\d+) ok, (\d+) failed of 20", table["requests"]).groups())
    assert ok + failed == 20


def test_bench_with_a_huge_request_count_is_bounded_by_its_duration(address):
    # It drew its whole schedule before the first request: a billion of
    # them took minutes and gigabytes, whatever --duration said.
    t0 = time.monotonic()
    r = subprocess.run(command("bench", "--url", "%s:%d" % address, "--requests", "1000000000",
                               "--concurrency", "2", "--duration", "1", "--timeout", "20"),
                       env=environ(), capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 15, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    table = bench_table(r.stdout)
    ok, failed = map(int, re.match(r"(\d+) ok, (\d+) failed", table["requests"]).groups())
    assert 0 < ok < 1_000_000_000
    # The stop was not said: "of 1000000000" read as requests gone missing.
    assert table["stopped"] == f"by --duration after 1 s: {ok + failed} of 1000000000 sent"
    assert r.returncode == (1 if failed else 0), r.stderr  # the bound is no failure


def test_bench_against_a_host_that_does_not_resolve_says_one_line():
    # Each of its connections failed to resolve the name; the first error
    # ended the connect, and the others, cancelled inside uvloop's
    # create_connection, were logged as "Future exception was never
    # retrieved", with their tracebacks, above the one line.
    r = subprocess.run(command("bench", "--url", "nosuchhost.invalid:8081", "--concurrency", "4"),
                       env=environ(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("mmengine bench: ") and r.stderr.count("\n") == 1, r.stderr


def test_bench_refuses_bad_arguments_before_it_connects():
    # --seed -1 connected, then failed on numpy's "expected non-negative integer".
    for args in (["--seed", "-1"], ["--requests", "0"], ["--zipf", "nan"]):
        r = subprocess.run(command("bench", "--url", "127.0.0.1:1", *args), env=environ(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and args[0] in r.stderr, (args, r.stderr)


def test_configuration_errors_are_refused_at_start(tmp_path, repo):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("workers = 2\nbogus_key = 1\n")
    latin1_toml = tmp_path / "latin1.toml"  # (a comment in Latin-1: not UTF-8, as TOML is)
    latin1_toml.write_bytes(b"# budget in \xb5s\nworkers = 2\n")
    cases = [  # (args, environment, the key the message must name)
        (["--device-budget", "lots"], {}, "device_budget"),
        ([], {"MMENGINE_WORKERS": "abc"}, "workers"),
        (["--config", str(bad_toml)], {}, "bogus_key"),
        (["--demo"], {}, "repo"),  # --demo serves its own repository: not silently
        (["--host", ""], {}, "host"),  # every interface, where it looked like none
        # The two below ended in a traceback: the file's decoding error, and
        # (after the workers had started) the name's lookup's, as IDNA.
        (["--config", str(latin1_toml)], {}, "config file"),
        (["--host", "127.0.0..1"], {}, "host"),
        ([], {"MMENGINE_LOG_LEVEL": "loud"}, "log_level"),
    ]
    procs = [subprocess.Popen(command("serve", "--repo", str(repo), "--tcp-port", "0", "--http-port", "-1", *args),
                              env=environ(**env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for args, env, _ in cases]
    try:
        for proc, (_, _, key) in zip(procs, cases):
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 2, out + err
            assert re.search(rf"configuration error: {key}\b", err), err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_demo_refuses_a_repository_from_the_file_or_a_variable(tmp_path, repo):
    # --demo --repo DIR was refused, where the file's repo or MMENGINE_REPO
    # was dropped without a word. A cache it cannot write: the refusal
    # comes before the demo would be generated.
    toml = tmp_path / "c.toml"
    toml.write_text(f"repo = {str(repo)!r}\n")
    cases = [(["--config", str(toml)], {}, f"in {str(toml)!r}"),
             ([], {"MMENGINE_REPO": str(repo)}, "from MMENGINE_REPO")]
    procs = [subprocess.Popen(command("serve", "--demo", "--tcp-port", "0", "--http-port", "-1",
                                      *args),
                              env=environ(XDG_CACHE_HOME="/proc/no-such-dir", **env),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args, env, _ in cases]
    try:
        for proc, (_, _, where) in zip(procs, cases):
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 2, out + err
            assert err == ("mmengine: configuration error: repo: --demo serves the demo "
                           f"repository; drop repo, or --demo to serve it ({where})\n"), err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_demo_that_cannot_be_written_is_one_line_not_a_traceback():
    # HOME read-only or unset, as in a container: two tracebacks, it was.
    r = subprocess.run(command("serve", "--demo", "--tcp-port", "0", "--http-port", "-1"),
                       env=environ(XDG_CACHE_HOME="/proc/no-such-dir"), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "configuration error: repo: --demo writes its models under " in r.stderr
    assert "XDG_CACHE_HOME" in r.stderr


def test_demo_models_that_fail_to_generate_are_one_line_not_a_traceback(tmp_path):
    # A full disk (or no torch): the generator said why, and the server's
    # CalledProcessError followed it as a traceback of its own.
    def small_files():  # as a full disk: a write past 4 KiB fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    r = subprocess.run(command("serve", "--demo", "--tcp-port", "0", "--http-port", "-1"),
                       env=environ(XDG_CACHE_HOME=str(tmp_path)), capture_output=True,
                       text=True, timeout=60, preexec_fn=small_files)
    assert r.returncode == 2, r.stderr
    said = r.stderr.rstrip("\n").rpartition("\n")[2]
    assert said.startswith("mmengine: configuration error: repo: --demo could not generate "
                           "its models in "), r.stderr
    assert "CalledProcessError" not in r.stderr, r.stderr
    assert os.listdir(tmp_path / "mmengine") == []  # no half-written repository


def test_two_first_runs_of_the_demo_at_once_keep_the_first_ones_repository(tmp_path):
    # Each generates into a directory of its own; the second to end deleted
    # the first's repository, which that server was serving from, to put
    # its own there (or, both looking before either moved, failed and left
    # its copy behind for good).
    root = tmp_path / "demo"
    generate = [sys.executable, "-c", "import sys, pathlib; from mmengine.cli import "
                "ensure_demo_repository as e; e(pathlib.Path(sys.argv[1]))", str(root)]
    procs = [subprocess.Popen(generate, env=environ(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        first = None  # the repository the first to end put in place
        deadline = time.monotonic() + 120
        while first is None and time.monotonic() < deadline and \
                any(p.poll() is None for p in procs):
            with contextlib.suppress(FileNotFoundError):
                if (root / ".complete").exists():
                    first = os.stat(root).st_ino
            time.sleep(0.002)
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert first is not None
    assert os.stat(root).st_ino == first  # still the first's
    assert sorted(os.listdir(tmp_path)) == ["demo"]  # and no copy left beside it


def test_a_port_in_use_is_one_line_not_a_traceback(repo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run(command("serve", "--repo", str(repo), "--tcp-port",
                                      str(taken.getsockname()[1]), "--http-port", "-1"),
                              env=environ(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "mmengine: cannot serve:" in proc.stderr and "Traceback" not in proc.stderr, \
        proc.stderr
    assert re.search(r"tcp_port \d+: .*in use", proc.stderr), proc.stderr  # what to change


def test_a_host_this_machine_lacks_is_named_as_the_host(repo):
    # (192.0.2.1: TEST-NET-1, an address no machine has.) It was said as
    # tcp_port's fault.
    proc = subprocess.run(command("serve", "--repo", str(repo), "--host", "192.0.2.1",
                                  "--tcp-port", "0", "--http-port", "-1"),
                          env=environ(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot serve: [Errno 99] host 192.0.2.1: " in proc.stderr, proc.stderr


def test_stats_says_when_its_address_is_no_mmengine_tcp_port(request, repo):
    # The server's HTTP port (8080 for 8081) said "the server closed the
    # connection"; a peer that never answered held it 31 s, with no
    # --timeout to give.
    server = Server("--repo", str(repo), "--tcp-port", "0", "--http-port", "0", env=environ())
    request.addfinalizer(lambda: server.proc.poll() is None and server.stop())
    web = server.wait_for(r"HTTP .* on http://(\S+):(\d+)", 60)
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        for peer, said in (("%s:%s" % web.groups(), "answered in HTTP: give the SDK the "
                                                      "server's TCP port"),
                           ("%s:%d" % silent.getsockname()[:2], "Timeout")):
            t0 = time.monotonic()
            r = subprocess.run(command("stats", "--url", peer, "--timeout", "1"),
                               env=environ(), capture_output=True, text=True, timeout=60)
            assert r.returncode == 1 and said in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
            assert time.monotonic() - t0 < 20
    finally:
        silent.close()


@pytest.mark.parametrize("greeting", [b"SSH-2.0-OpenSSH_8.9\r\n", b"220 mail ESMTP\r\n",
                                      b"+OK POP3 ready\r\n"])
def test_both_clients_say_at_once_that_a_peer_that_greets_is_no_server(greeting):
    # Its greeting read as a length is hundreds of MB that never come: each
    # call waited its whole timeout and raised Timeout (an SDK review).
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    held, over = [], threading.Event()

    def greet():
        # Each connection greets as it is made: one the AsyncClient opened
        # fails at its greeting, and is opened again, before a call is sent.
        while not over.is_set() and len(held) < 6:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            conn.sendall(greeting)
            held.append(conn)  # and says no more
    thread = threading.Thread(target=greet, daemon=True)
    thread.start()
    address = listener.getsockname()

    async def main():
        async with AsyncClient(address, timeout=30) as c:
            with pytest.raises(ConnectionError, match="no mmengine server"):
                await c.health()

    try:
        t0 = time.monotonic()
        with Client(address, timeout=30) as c:
            with pytest.raises(ConnectionError, match="no mmengine server"):
                c.health()
        run(main(), timeout=20)
        assert time.monotonic() - t0 < 10
    finally:
        over.set()
        thread.join(10)
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False),
    ("10.1.2.3", False), ("example.com", False)])
def test_the_hosts_a_server_without_a_control_token_warns_of(host, loopback):
    # (The warning itself needs a listener beyond the loopback, which a
    # test does not open.)
    from mmengine.cli import _loopback
    assert _loopback(host) == loopback


def test_serve_demo_serves_and_shuts_down_cleanly(request, tmp_path):
    server, address = start(request, "--demo", env=environ(XDG_CACHE_HOME=str(tmp_path)),
                            timeout=120)
    # The usage it prints must be a call that works.
    m = server.wait_for(r'c\.infer\("([^"]+)", \{"(\w+)": np\.ones\(\((\d+), (\d+)\), '
                        r'np\.(\w+)\)\}\)', 10)
    name, input_name, shape, dtype = m[1], m[2], (int(m[3]), int(m[4])), m[5]
    with Client(address) as c:
        assert len({r["name"] for r in c.list()}) == 64
        out = c.infer(name, {input_name: np.ones(shape, dtype)})
        assert out["y"].shape[0] == shape[0] and np.isfinite(out["y"]).all()
        pids = [w["pid"] for w in c.stats()["workers"]]
    assert pids
    assert server.stop() == 0, "".join(server.output)
    assert "shutting down" in "".join(server.output)
    assert not live_pids(pids)
    prefix = f"{shm.PREFIX}{server.proc.pid}-"
    assert not [s for s in shm.list_segments() if s.startswith(prefix)]


def test_the_start_line_counts_models_not_folders(request, tmp_path):
    # A folder with no version directory serves nothing: it was counted.
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "unversioned" / "notes").mkdir(parents=True)
    server, _ = start(request, "--repo", str(tmp_path), "--workers", "1")
    line = next(line for line in server.output if "on tcp://" in line)
    assert f"serving 1 model from {tmp_path} on" in line, line


@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["TERM", "INT-to-group"])
def test_a_demo_interrupted_while_it_generates_leaves_nothing(tmp_path, sig, group):
    # SIGTERM while --demo generated its models left the generator running
    # and a demo-v1.tmp<pid> directory that no later run removed (Ctrl-C:
    # the directory, and a traceback).
    cache = tmp_path / "mmengine"
    cache.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = cache / f"demo-v1.tmp{gone.pid}"  # a server killed while it generated
    (stale / "m").mkdir(parents=True)
    proc = subprocess.Popen(command("serve", "--demo", "--tcp-port", "0", "--http-port", "-1"),
                            env=environ(XDG_CACHE_HOME=str(tmp_path)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    generators: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not generators:  # the generator, importing what it runs
            assert time.monotonic() < deadline and proc.poll() is None
            generators = [c.pid for c in psutil.Process(proc.pid).children()]
            time.sleep(0.02)
        time.sleep(0.5)
        (os.killpg if group else os.kill)(proc.pid, sig)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out
        deadline = time.monotonic() + 5
        while live_pids(generators) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not live_pids(generators)
        assert sorted(os.listdir(cache)) == [], out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in live_pids(generators):
            os.kill(pid, signal.SIGKILL)


def test_a_pooled_connection_the_server_closed_is_replaced(address):
    with Client(address) as c:
        x = x_for(np.random.default_rng(11))
        c.infer("m00", {"x": x})
        conn = c._pool[0]
        conn.sock.shutdown(socket.SHUT_RDWR)  # as if the server had closed it
        c.infer("m00", {"x": x})  # a fresh connection, no ConnectionError
        assert c._pool[0] is not conn


def test_a_connection_in_use_when_its_client_closes_is_closed_as_its_call_ends(address):
    # It went back to the pool of the closed client, open, for good.
    c = Client(address)
    answers = []
    slow = threading.Thread(target=lambda: answers.append(
        c.infer("slow", {"seconds": np.array([0.5])})["y"].tolist()))
    before = requests_taken(address)
    slow.start()
    wait_for_requests(address, 1, before)
    c.close()
    slow.join(10)
    assert answers == [[1.0]]  # the call in flight ends as ever
    assert not slow.is_alive() and len(c._pool) == 0
    c.infer("m00", {"x": x_for(np.random.default_rng(3))})  # a later call connects anew
    assert len(c._pool) == 1
    c.close()


def test_a_call_whose_connection_dies_under_it_is_not_sent_again():
    # A peer that answers the first request, then takes the second and
    # dies without answering: the SDK sent it again on a new connection (a
    # second run of it, on a server restarted meanwhile).
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    taken = []

    def peer():
        conn, _ = listener.accept()
        with conn:
            first = read_frame(conn)
            conn.sendall(protocol.frame({"id": first["id"], "ok": True}))
            taken.append(read_frame(conn))
        try:  # a second connection, if the SDK makes one
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(2)
                taken.append(read_frame(conn))
        except OSError:
            pass

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    with Client(listener.getsockname(), timeout=10) as c:
        c.health()
        with pytest.raises(ConnectionError):
            c.health()
    listener.close()
    thread.join(10)
    assert [m["op"] for m in taken] == ["health"], taken


def established(port: int) -> int:
    return sum(c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port
               for c in psutil.Process().net_connections("tcp"))


def test_async_client_opens_each_connection_once_however_many_calls_need_it(address):
    # Every call that found no connection (or a lost one) opened its own:
    # a burst of a thousand calls held a thousand sockets, and the server's
    # max_connections refused the rest.
    x = x_for(np.random.default_rng(12))

    async def main():
        client = AsyncClient(address, connections=2)  # not connected first
        try:
            outs = await asyncio.gather(*(client.infer("m00", {"x": x}) for _ in range(200)))
            first = established(address[1])
            for conn in client._conns:  # both lost at once, as in a server restart
                conn.transport.abort()
            await asyncio.sleep(0)
            outs += await asyncio.gather(*(client.infer("m00", {"x": x}) for _ in range(200)))
            again = established(address[1])
        finally:
            await client.close()
        await asyncio.sleep(0.1)
        return outs, first, again, established(address[1])

    outs, first, again, after = run(main())
    assert (first, again, after) == (2, 2, 0)
    for out in outs:
        np.testing.assert_allclose(out["y"], reference("m00", x), **TOL)


def test_an_async_client_goes_on_in_the_next_event_loop(address):
    # asyncio.run() per call: the connections of a closed loop were used
    # still, and the answer was never read (a hang with timeout=None).
    x = x_for(np.random.default_rng(13))
    client = AsyncClient(address, timeout=None)

    async def one():
        return (await client.infer("m00", {"x": x}))["y"]

    for _ in range(3):
        np.testing.assert_allclose(run(one(), timeout=10), reference("m00", x), **TOL)
    run(client.close())


def test_a_client_used_across_fork_answers_each_process_its_own(address):
    # The child inherited the pooled socket: parent and child read each
    # other's answers.
    rng = np.random.default_rng(14)
    xs = [x_for(rng) for _ in range(2)]
    # Before the fork: torch's thread pool hangs a forked child that uses it.
    want = [reference("m00", x) for x in xs]
    with Client(address) as c:
        c.infer("m00", {"x": xs[0]})  # a pooled connection, before the fork
        pid = os.fork()
        if pid == 0:  # the child: its own answers, or a nonzero status
            try:
                for _ in range(100):
                    y = c.infer("m00", {"x": xs[1]})["y"]
                    if not np.allclose(y, want[1], **TOL):
                        os._exit(2)
                os._exit(0)
            except BaseException:  # noqa: BLE001 - said by the status
                os._exit(3)
        for _ in range(100):
            np.testing.assert_allclose(c.infer("m00", {"x": xs[0]})["y"], want[0], **TOL)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_load_and_pin_tell_the_server_how_long_the_client_waits(address):
    # The server's own default for a load (load_timeout_s, 120 s) outlasts
    # the client's 30: the client sends its wait, and the server answers
    # TIMEOUT in it, typed, on a connection that goes on serving.
    async def asynchronous():
        async with AsyncClient(address, timeout=60) as c:
            with pytest.raises(Timeout, match="not loaded within"):
                await c.load("slowload", timeout=0.5)
            assert (await c.health())["status"] == "serving"

    t0 = time.monotonic()
    run(asynchronous())
    with Client(address, timeout=60) as c:
        with pytest.raises(Timeout, match="not loaded within"):
            c.load("slowload", timeout=0.5)
        assert c.health()["status"] == "serving"
    with Client(address, timeout=0.5) as c:  # the client's own timeout, sent
        with pytest.raises(Timeout, match="not loaded within"):
            c.pin("slowload")
    assert time.monotonic() - t0 < 3.5  # the load (4 s) was not waited for


def test_the_sdk_takes_torch_tensors_and_bfloat16_as_float32(address):
    import torch

    x = torch.from_numpy(x_for(np.random.default_rng(3))).to(torch.bfloat16)
    want = x.float().numpy()  # numpy has no bfloat16; float32 holds each value

    async def asynchronous():
        async with AsyncClient(address) as c:
            return (await c.infer("echo", {"x": x}))["y"]

    with Client(address) as c:
        got = [c.infer("echo", {"x": x})["y"], run(asynchronous())]
    for y in got:
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, want)


def test_the_sdk_takes_torch_views_and_sparse_tensors_and_refuses_what_cannot_travel(
        address):
    # A conjugate or lazily negated view, and a sparse tensor, raised
    # torch's own errors; a float8 a TypeError, a list of inputs an
    # AttributeError.
    import torch

    x = torch.from_numpy(x_for(np.random.default_rng(4)))
    z = torch.complex(x, 2 * x).conj()  # a conjugate view; its imag, a negative one
    class Tagged(torch.Tensor):  # a subclass from outside torch (as MONAI's MetaTensor)
        pass

    tagged = x.to(torch.bfloat16).requires_grad_().as_subclass(Tagged)
    sent = {"conj": (z, np.conj(torch.complex(x, 2 * x).numpy())),
            "neg": (z.imag, -2 * x.numpy()), "sparse": (x.to_sparse(), x.numpy()),
            "subclass": (tagged, x.to(torch.bfloat16).float().numpy())}
    with Client(address) as c:
        for what, (tensor, want) in sent.items():
            np.testing.assert_array_equal(c.infer("echo", {"x": tensor})["y"], want,
                                          err_msg=what)
        with pytest.raises(BadRequest, match="float8"):
            c.infer("echo", {"x": x.to(torch.float8_e4m3fn)})
        with pytest.raises(BadRequest, match="meta device"):
            c.infer("echo", {"x": x.to("meta")})
        with pytest.raises(BadRequest, match="mapping"):
            c.infer("echo", [x])
        # numpy's ValueError, torch's RuntimeError: the caller's input, typed.
        with pytest.raises(BadRequest, match="'x' is not an array"):
            c.infer("echo", {"x": [[1.0], [1.0, 2.0]]})
        with warnings.catch_warnings():  # "prototype stage"
            warnings.simplefilter("ignore")
            nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
        with pytest.raises(BadRequest, match="'x' is not an array"):
            c.infer("echo", {"x": nested})


def peer_answering(answer) -> socket.socket:
    """A listener whose connections are each answered `answer(request)`
    (the pieces of bytes to send, as it makes them) for each request it
    reads; closed with the listener."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def serve(conn):
        with conn, contextlib.suppress(OSError, AssertionError):
            while True:
                for piece in answer(read_frame(conn)):
                    conn.sendall(piece)

    def accept():
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=serve, args=(listener.accept()[0],),
                                 daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


def test_a_blocking_clients_timeout_bounds_an_answer_that_trickles_in():
    # Each read had the whole timeout: an answer a byte each 0.3 s took 21 s
    # of a client whose timeout was 1 s (the AsyncClient's took 2).
    def trickle(request):
        frame = protocol.frame({"id": request["id"], "ok": True, "status": "serving"})
        for i in range(len(frame)):
            time.sleep(0.3)
            yield frame[i:i + 1]

    with peer_answering(trickle) as listener, Client(listener.getsockname(), timeout=1) as c:
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            c.infer("m", {"x": np.ones(1)})
        took = time.monotonic() - t0
    assert took < 6, took  # the timeout and the answer's grace (2 s); it took 21


def test_the_servers_own_timeout_of_a_connection_keeps_its_words():
    # The blocking client's own "no answer in time" stood in for it: the
    # server's Timeout is a socket.timeout too.
    said = "a frame was begun and not finished within 300 s"

    def stream_timeout(request):
        yield protocol.frame(protocol.error_response(None, Timeout(said)))

    with peer_answering(stream_timeout) as listener, \
            Client(listener.getsockname(), timeout=5) as c, pytest.raises(Timeout, match=said):
        c.health()


def test_a_connection_with_bytes_past_its_answer_is_never_used_again():
    # The extra bytes stayed in the pooled connection's buffer, and the next
    # call read them as the head of its answer: ConnectionError.
    connections = []

    def extra_after_the_first(request):
        connections.append(request["id"])
        frame = protocol.frame({"id": request["id"], "ok": True, "status": "serving"})
        yield frame + (protocol.LENGTH.pack(16) if len(connections) == 1 else b"")

    with peer_answering(extra_after_the_first) as listener, \
            Client(listener.getsockname(), timeout=5) as c:
        assert c.health()["status"] == "serving"
        assert c.health()["status"] == "serving"


@pytest.mark.parametrize("batch", [False, True])
def test_a_large_request_has_the_time_its_bytes_took(batch):
    # An upload longer than the call's wait timed out once its last byte was
    # sent, though the server had it all: the time its bytes bought (1 MiB a
    # second) was counted for a request in several buffers alone. And once
    # sent, the server still reads what the kernel holds of it (megabytes)
    # before it can answer: that silence is no silent server's.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def slow_reader():
        with contextlib.suppress(OSError), listener.accept()[0] as conn:
            while True:  # the client asks for max_frame first (health)
                head = b""
                while len(head) < 4:
                    head += conn.recv(4 - len(head))
                left = protocol.LENGTH.unpack(head)[0]
                body = bytearray()
                while left:
                    chunk = conn.recv(min(left, 1 << 20))
                    body += chunk
                    left -= len(chunk)
                    if len(body) > 1 << 20:
                        time.sleep(0.5)  # ~2 MiB a second
                rid = msgpack.unpackb(bytes(body))["id"]
                conn.sendall(protocol.frame({"id": rid, "ok": True, "status": "serving",
                                             "max_frame": 1 << 30}))

    threading.Thread(target=slow_reader, daemon=True).start()
    with listener, Client(listener.getsockname(), timeout=0.5) as c:
        t0 = time.monotonic()
        if batch:  # exchange(): sent as the server takes it, answers read meanwhile
            pads = [{"op": "health", "pad": bytes(4 << 20)}] * 2
            assert [a["status"] for a in c.call_many(pads)] == ["serving"] * 2
        else:  # exchange_one(): one buffer, one sendall
            assert c.call({"op": "health", "pad": bytes(8 << 20)})["status"] == "serving"
    assert time.monotonic() - t0 > 1.5  # past the call's wait (0.5 s and 1 s of grace)


@pytest.mark.parametrize("after_the_first", ["pause", "stall"])
def test_a_large_infer_many_waits_its_timeout_after_its_first_answer(after_the_first):
    # Its frames were sent as one buffer, whose every request ends at its
    # end: the first answer, read while most of it was unsent, showed it all
    # read, and the wait left went below none: where the server then stalled
    # (read and answered nothing more), the call waited for ever (poll's
    # negative wait); a read after the sends had a microsecond's. A server
    # that pauses less than the wait is waited for.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # the first answer early
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(30)

    def serve():
        with contextlib.suppress(OSError, AssertionError), listener.accept()[0] as conn:
            first = True
            while True:
                rid = read_frame(conn)["id"]
                if first or after_the_first == "pause":
                    conn.sendall(protocol.frame({"id": rid, "ok": True, "outputs": {}}))
                if first:
                    first = False
                    time.sleep(1.5 if after_the_first == "pause" else 40)

    threading.Thread(target=serve, daemon=True).start()
    requests = [("m", {"x": np.zeros(12_000, np.float32)})] * 200  # 9.6 MB
    ended: list = []

    def call():
        with Client(listener.getsockname(), timeout=1.0) as c:
            t0 = time.monotonic()
            try:
                ended.append(len(c.infer_many(requests)))
            except Timeout:
                ended.append("timeout")
            ended.append(time.monotonic() - t0)

    with listener:
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(30)
        assert not caller.is_alive(), "the call still waits after 30 s"
    if after_the_first == "pause":
        assert ended[0] == 200, ended
    else:  # its wait (1 s and 1 s of grace) and the time the bytes sent bought
        assert ended[0] == "timeout" and 2 < ended[1] < 20, ended


def test_an_async_client_reading_late_answers_never_waits():
    # Read on a socket made from the transport's descriptor, which took
    # socket.setdefaulttimeout()'s timeout: a read that found nothing more
    # polled for it (the loop stood still 2 s), and its TimeoutError closed
    # a healthy connection as a reset.
    def answer_late(request):
        if request.get("op") == "stats":
            time.sleep(0.5)  # its caller has gone
        yield protocol.frame({"id": request["id"], "ok": True, "status": "serving",
                              "stats": {}})

    async def main(address):
        async with AsyncClient(address, timeout=30, connections=1) as c:
            stats = asyncio.ensure_future(c.stats())
            await asyncio.sleep(0.2)
            stats.cancel()  # its answer is owed, to be read and dropped
            with contextlib.suppress(asyncio.CancelledError):
                await stats
            conn = c._conns[0]
            time.sleep(1.5)  # the late answer comes while the loop is held
            t0 = time.monotonic()
            assert (await c.health())["status"] == "serving"
            assert c._conns[0] is conn  # not ended as a reset
            return time.monotonic() - t0

    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(2.0)
    try:
        with peer_answering(answer_late) as listener:
            # (The test holds the loop 1.5 s itself: the stall it looks for
            # comes after, in the call it times.)
            took = run(main(listener.getsockname()), timeout=30, max_stall=5)
    finally:
        socket.setdefaulttimeout(before)
    assert took < 1, took


def test_an_async_client_refused_at_every_address_of_a_name_raises_connection_error(
        monkeypatch):
    # asyncio raises a plain OSError ("Multiple exceptions") where each of a
    # name's addresses refuses (localhost's ::1 and 127.0.0.1), which an
    # `except ConnectionError` (README) missed; the blocking Client raised
    # ConnectionRefusedError.
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed: nothing listens there
    lookup = socket.getaddrinfo

    def both(host, *args, **kwargs):
        if host == "dual.invalid":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", both)

    async def main():
        with pytest.raises(ConnectionError):
            await AsyncClient(f"dual.invalid:{port}", timeout=5).health()

    # asyncio's own loop: uvloop resolves names in libuv, not getaddrinfo().
    asyncio.run(asyncio.wait_for(main(), 30))
    with pytest.raises(ConnectionError):
        Client(f"dual.invalid:{port}", timeout=5).health()


def test_a_raw_call_of_an_op_the_server_bounds_carries_the_clients_timeout():
    # As load(), unload(), pin() and infer() send it (Client's docstring):
    # a raw load waited out the server's load_timeout_s (120 s) where the
    # client gave up after its own, and closed the connection.
    seen = []

    def record(request):
        seen.append((request.get("op"), request.get("timeout")))
        yield protocol.frame({"id": request["id"], "ok": True, "model": {}})

    async def call_async(address):
        async with AsyncClient(address, timeout=7.0) as c:
            await c.call({"op": "load", "model": "m"})

    with peer_answering(record) as listener:
        with Client(listener.getsockname(), timeout=3.0) as c:
            c.call({"op": "load", "model": "m"})
            c.call({"op": "pin", "model": "m", "timeout": 9.0})  # its own stands
            c.call_many([{"op": "unload", "model": "m"}, {"op": "unpin", "model": "m"}],
                        timeout=4.0)
            c.call({"op": "list"})
        run(call_async(listener.getsockname()), timeout=30)
    assert [s for s in seen if s[0] != "health"] == [
        ("load", 3.0), ("pin", 9.0), ("unload", 4.0), ("unpin", None), ("list", None),
        ("load", 7.0)]


def test_an_async_call_never_answered_times_out_while_other_answers_stream_in():
    # Every byte that came on its connection put its wait off: 2 MiB answers
    # to other calls, back to back at 4 MiB/s, kept a call the server never
    # answered waiting for ever (whether a due time found one half read or not).
    def answer_all_but_stats(request):
        if request.get("op") != "stats":
            frame = protocol.frame({"id": request["id"], "ok": True, "status": "serving",
                                    "pad": bytes(2 << 20)})
            for i in range(0, len(frame), 128 << 10):
                yield frame[i:i + (128 << 10)]
                time.sleep(0.03)

    async def main(address):
        async with AsyncClient(address, timeout=1.0, connections=1) as c:
            lost = asyncio.ensure_future(c.stats())
            t0 = time.monotonic()
            while not lost.done() and time.monotonic() - t0 < 20:
                await c.health()
            assert lost.done(), "the call never answered still waits"
            with pytest.raises(Timeout):
                lost.result()
            return time.monotonic() - t0

    with peer_answering(answer_all_but_stats) as listener:
        took = run(main(listener.getsockname()), timeout=40)
    # Its wait (2 s), one more for the answers that came whole, and the
    # answer coming in when it was due (2 MiB at 1 MiB/s at most).
    assert took < 10, took


def test_a_large_answer_made_in_time_is_read_to_its_end_past_the_timeout():
    # The whole-call deadline must not cut off an answer the server made in
    # time: 16 MiB begun at 1.5 s of 2, arriving at 8 MiB/s, with a pause of
    # 1 s halfway (a read's wait stayed the shortest one before).
    y = np.arange(4 << 20, dtype=np.float32)

    def slow_big(request):
        time.sleep(1.5)
        frame = b"".join(protocol.frames({"id": request["id"], "ok": True,
                                          "outputs": protocol.encode_tensors({"y": y})}))
        for i in range(0, len(frame), 1 << 20):
            yield frame[i:i + (1 << 20)]
            time.sleep(1.0 if i == 8 << 20 else 1 / 8)

    with peer_answering(slow_big) as listener, Client(listener.getsockname(), timeout=1) as c:
        np.testing.assert_array_equal(c.infer("m", {"x": np.ones(1)})["y"], y)


@pytest.mark.parametrize("answer, async_raises", [
    (lambda rid: protocol.LENGTH.pack(3) + b"\xc1\xc1\xc1", ConnectionError),  # not msgpack
    (lambda rid: protocol.frame({"id": rid, "ok": True}), ConnectionError),  # no outputs
    (lambda rid: protocol.frame({"id": rid, "ok": True, "outputs": [1, 2]}), ConnectionError),
    # An answer nobody asked for: the AsyncClient drops it, and times out
    # waiting for its own.
    (lambda rid: protocol.frame({"id": rid + 1, "ok": True, "outputs": {}}), Timeout),
    (lambda rid: protocol.frame({"id": [rid], "ok": True, "outputs": {}}), ConnectionError),
], ids=["not-msgpack", "no-outputs", "outputs-a-list", "unknown-id", "id-a-list"])
def test_an_answer_that_is_not_the_protocols_is_a_connection_error(answer, async_raises):
    # The blocking client raised BadRequest ("fix the request"), KeyError or
    # AttributeError; a server that says nonsense is the connection's fault.
    with peer_answering(lambda request: [answer(request["id"])]) as listener, \
            Client(listener.getsockname(), timeout=2) as c, \
            pytest.raises(ConnectionError, match="unreadable answer"):
        c.infer("m", {"x": np.ones(1)})

    async def main(address):
        async with AsyncClient(address, timeout=1) as c:
            await c.infer("m", {"x": np.ones(1)})

    with peer_answering(lambda request: [answer(request["id"])]) as listener, \
            pytest.raises(async_raises):
        run(main(listener.getsockname()), timeout=20)


@pytest.mark.parametrize("call, answer", [
    (lambda c: c.load("m"), {"ok": True}),
    (lambda c: c.pin("m"), {"ok": True, "model": "m"}),
    (lambda c: c.stats(), {"ok": True, "stats": [1]}),
    (lambda c: c.list(), {"ok": True, "models": {}}),
    (lambda c: c.infer("m", {"x": np.ones(1)}, timing=True),
     {"ok": True, "outputs": {}, "timing": [1]}),
    (lambda c: c.infer("m", {"x": np.ones(1)}, timing=True),
     {"ok": True, "outputs": {}, "timing": {"total_ns": "soon"}}),
], ids=["load-without-model", "pin-model-a-str", "stats-a-list", "models-a-map",
        "timing-a-list", "total-a-str"])
def test_an_answer_without_what_its_call_reads_is_a_connection_error(call, answer):
    # KeyError, TypeError: a server that says nonsense is the connection's
    # fault, not the caller's bug.
    def reply(request):
        yield protocol.frame({"id": request["id"], **answer})

    with peer_answering(reply) as listener, Client(listener.getsockname(), timeout=2) as c, \
            pytest.raises(ConnectionError, match="unreadable answer"):
        call(c)

    async def main(address):
        async with AsyncClient(address, timeout=2) as c:
            await call(c)

    with peer_answering(reply) as listener, \
            pytest.raises(ConnectionError, match="unreadable answer"):
        run(main(listener.getsockname()), timeout=20)


@pytest.mark.parametrize("args", [("serve", "--repo", ".", "--workers", "1_0"),
                                  ("serve", "--repo", ".", "--idle-unload", "\u0663"),
                                  ("bench", "--requests", "\u0663"),
                                  ("bench", "--duration", "1_0")])
def test_a_flags_number_is_ascii_digits_as_the_files_and_the_variables_are(args):
    # argparse's int() and float() took "1_0" as 10 and "٣" as 3, where the
    # same value in the file or a variable is refused.
    done = subprocess.run(command(*args), env=environ(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and f"argument {args[-2]}: invalid" in done.stderr, done.stderr


def test_an_error_answer_that_is_not_a_map_is_still_an_error():
    with peer_answering(lambda r: [protocol.frame({"id": r["id"], "ok": False,
                                                   "error": "it broke"})]) as listener, \
            Client(listener.getsockname(), timeout=2) as c:
        with pytest.raises(InternalError, match="it broke"):
            c.health()


def test_an_async_client_closes_in_a_later_event_loop(address):
    # A shutdown hook's asyncio.run(client.close()) raised "Event loop is
    # closed" from the first loop's transports, and closed none of them.
    client = AsyncClient(address, timeout=10, connections=2)

    async def use():
        return await client.health()

    assert asyncio.run(use())["ok"]
    asyncio.run(client.close())
    assert asyncio.run(use())["ok"]  # and it goes on, connected anew
    asyncio.run(client.close())


def test_both_clients_connect_within_their_timeout():
    # An address that drops the connection's packets (here: a listener
    # whose backlog is full) held every AsyncClient call for the system's
    # connect timeout, minutes; the blocking Client gave up in time but
    # raised the builtin TimeoutError, not Timeout.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=5)

    # And within a call's own, shorter timeout: the connection was made
    # within the client's (an SDK review's finding).
    async def main(client_timeout, call_timeout):
        client = AsyncClient(listener.getsockname(), timeout=client_timeout)
        t0 = time.monotonic()
        with pytest.raises(Timeout, match="could not connect"):
            await client.call({"op": "health"}, timeout=call_timeout)
        took = time.monotonic() - t0
        await client.close()  # and its opening, left going on within the client's timeout
        return took

    took = []
    try:
        for client_timeout, call_timeout in ((0.5, None), (10, 0.5)):
            took.append(run(main(client_timeout, call_timeout), timeout=20))
            t0 = time.monotonic()
            with Client(listener.getsockname(), timeout=client_timeout) as c:
                with pytest.raises(Timeout, match="could not connect"):
                    c.call({"op": "health"}, timeout=call_timeout)
            took.append(time.monotonic() - t0)
    finally:
        filler.close()
        listener.close()
    assert max(took) < 5, took  # the timeout, and the grace for the server's answer


def test_an_async_call_waiting_for_its_connection_when_the_client_closes_is_told_so():
    # close() ends the openings under way (one a timed-out call left behind
    # outlived its loop): a call still waiting for one gets ConnectionError,
    # not the opening's CancelledError.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=5)

    async def main():
        client = AsyncClient(listener.getsockname(), timeout=10)
        call = asyncio.ensure_future(client.health())
        await asyncio.sleep(0.2)
        assert not call.done()
        await client.close()
        with pytest.raises(ConnectionError, match="the client was closed"):
            await call

    try:
        run(main(), timeout=20)
    finally:
        filler.close()
        listener.close()


def test_an_async_client_closes_after_the_loop_of_a_connection_it_was_opening():
    # close() cancelled the opening a timed-out call left going, and a task
    # of a closed loop raised "Event loop is closed" (a review's finding).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=5)
    client = AsyncClient(listener.getsockname(), timeout=10)

    async def times_out():
        with pytest.raises(Timeout, match="could not connect"):
            await client.call({"op": "health"}, timeout=0.2)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(times_out())  # its opening still under way
    finally:
        loop.close()
        filler.close()
        listener.close()
    with warnings.catch_warnings():  # the opening, destroyed pending with its loop
        warnings.simplefilter("ignore")
        run(client.close())


def test_both_clients_hear_why_a_server_refused_their_connection():
    # One past max_connections is told OVERLOADED (nil id), then closed:
    # the AsyncClient most often raised the close's ConnectionError instead,
    # and a retry policy keyed on Overloaded never fired.
    refusal = b"".join(protocol.frames(protocol.error_response(
        None, Overloaded("too many connections; retry later"))))

    async def main():
        async def refuse(reader, writer):
            writer.write(refusal)
            writer.close()
        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        try:
            for _ in range(5):
                client = AsyncClient(address, timeout=5)
                with pytest.raises(Overloaded, match="too many connections"):
                    await client.health()
                await client.close()
            with Client(address, timeout=5) as c:
                for _ in range(5):
                    with pytest.raises(Overloaded, match="too many connections"):
                        await asyncio.to_thread(c.health)
        finally:
            server.close()

    run(main(), timeout=30)


def test_an_overloaded_answer_says_when_to_retry():
    # Over TCP OVERLOADED said nothing of when to retry, where HTTP says
    # Retry-After (none where only an unpin makes room: PinnedFull). The
    # answers as they cross the wire, read as both clients read them.
    from mmengine.errors import PinnedFull
    backed_off = Overloaded("out of memory while loading; next try in 3 s")
    backed_off.retry_after_s = 3
    for refusal, want in ((Overloaded("busy"), 1), (PinnedFull("pinned: unpin one"), None),
                          (backed_off, 3)):
        frame = b"".join(protocol.frames(protocol.error_response(1, refusal)))
        answer = protocol.decode(frame[4:])
        assert answer["error"].get("retry_after_s") == want, answer
        with pytest.raises(Overloaded) as raised:
            protocol.raise_for(answer)
        assert raised.value.retry_after_s == want
    # A peer's value that is no count of seconds is no advice.
    with pytest.raises(Overloaded) as raised:
        protocol.raise_for({"id": 1, "ok": False, "error": {"code": 4, "message": "x",
                                                            "retry_after_s": "soon"}})
    assert raised.value.retry_after_s is None


def test_a_message_sent_twice_is_two_requests_and_stays_the_callers(address):
    # The ids were written into the caller's dicts: one dict twice went out
    # twice with the last id, and the call waited for the other to its end.
    message = {"op": "health"}
    with Client(address, timeout=5, token="t") as c:
        answers = c.call_many([message, message])
    assert [a["ok"] for a in answers] == [True, True]
    assert message == {"op": "health"}

    async def main():
        async with AsyncClient(address, timeout=5, token="t") as c:
            return await asyncio.gather(c.call(message), c.call(message))

    assert [a["ok"] for a in run(main())] == [True, True]
    assert message == {"op": "health"}


@pytest.mark.parametrize("address, parsed", [
    ("10.0.0.1:99", ("10.0.0.1", 99)), ("tcp://h:7", ("h", 7)), ("h", ("h", 8081)),
    ("[::1]:99", ("::1", 99)), ("[::1]", ("::1", 8081)), ("::1", ("::1", 8081)),
    ("fe80::1:2", ("fe80::1:2", 8081))])
def test_addresses_of_every_form_are_read(address, parsed):
    # "::1" was host ":" port 1, and "[::1]" a ValueError of int().
    assert parse_address(address) == parsed
    for bad in ("h:", "h:x", "[::1]x", "[::1]:", "[::1", ":80", "[]:80", "h:99999", ""):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_an_async_client_fails_at_once_when_its_new_connection_is_closed_at_once():
    # A server that accepts and closes (one past max_connections does):
    # the call's answer was awaited on a connection already lost, and it
    # failed with Timeout at its deadline; and close() while a connection
    # was being opened left that connection open.
    async def main():
        async def close_at_once(reader, writer):
            writer.close()
        server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        try:
            client = AsyncClient(address, timeout=5)
            t0 = time.monotonic()
            with pytest.raises(ConnectionError):
                await client.health()
            failed_in = time.monotonic() - t0
            other = AsyncClient(address, timeout=5)
            connecting = asyncio.ensure_future(other.connect())
            await asyncio.sleep(0)
            await other.close()
            with pytest.raises(ConnectionError, match="closed"):
                await connecting
            return failed_in, [c for c in other._conns if c is not None]
        finally:
            server.close()

    failed_in, left = run(main(), timeout=30)
    assert failed_in < 2, failed_in
    assert left == []


def test_a_frame_the_server_refuses_fails_the_other_calls_as_lost_not_as_its_own(address):
    """A nil-id error over one frame ends the connection: the calls beside
    it got that frame's BadRequest before (a review's finding), which says
    to fix a request that may have been fine, and may have run."""
    async def main():
        async with AsyncClient(address, timeout=20) as c:
            slow = asyncio.ensure_future(c.infer("slow", slow_input(0.5)))
            await asyncio.sleep(0.1)
            bad = c.call({"op": "health", "pad": [0] * 70_000})  # too many values in one frame
            got = await asyncio.gather(bad, slow, return_exceptions=True)
            assert all(type(e) is ConnectionError for e in got), got
            assert all(isinstance(e.__cause__, BadRequest) for e in got), got
            with pytest.raises(BadRequest, match="more than 65536 entries"):  # alone: its own error
                await c.call({"op": "health", "pad": [0] * 70_000})
            assert (await c.health())["status"] == "serving"  # on a new connection

    run(main(), timeout=60)


def test_a_frame_the_server_refuses_in_a_blocking_batch_fails_it_as_lost(address):
    # The blocking client's twin of the above: its batch got the refused
    # frame's BadRequest.
    with Client(address, timeout=20) as c:
        with pytest.raises(ConnectionError) as e:
            c.call_many([{"op": "infer", "model": "slow",
                          "inputs": protocol.encode_tensors(slow_input(0.5))},
                         {"op": "health", "pad": [0] * 70_000}])
        assert isinstance(e.value.__cause__, BadRequest), e.value
        with pytest.raises(BadRequest, match="more than 65536 entries"):  # alone: its own error
            c.call({"op": "health", "pad": [0] * 70_000})
        assert c.health()["status"] == "serving"


@pytest.mark.parametrize("model, version", [("\ud800", None), ("m00", 2 ** 70)],
                         ids=["lone-surrogate", "version-past-64-bits"])
def test_what_msgpack_cannot_carry_is_a_bad_request_of_the_sdk(address, model, version):
    # msgpack's UnicodeEncodeError and OverflowError reached the caller as
    # they were (an SDK review); the Engine said ModelNotFound.
    x = x_for(np.random.default_rng(5))
    with Client(address) as c:
        with pytest.raises(BadRequest, match="cannot be sent"):
            c.infer(model, {"x": x}, version=version)
        np.testing.assert_allclose(c.infer("m00", {"x": x})["y"], reference("m00", x), **TOL)

    async def main():
        async with AsyncClient(address) as c:
            with pytest.raises(BadRequest, match="cannot be sent"):
                await c.infer(model, {"x": x}, version=version)
            assert (await c.health())["status"] == "serving"

    run(main())


def test_the_sdk_takes_numpy_integers_and_refuses_masked_arrays(address):
    x = x_for(np.random.default_rng(5))
    with Client(address) as c:
        y = c.infer("m00", {"x": x}, version=np.int64(1))["y"]
        np.testing.assert_allclose(y, reference("m00", x), **TOL)
        assert len(c.list(limit=np.int32(1))) >= 1
        with pytest.raises(BadRequest, match="masked array"):
            c.infer("m00", {"x": np.ma.array(x, mask=np.zeros_like(x, bool))})

    async def main():
        async with AsyncClient(address) as c:
            y = (await c.infer("m00", {"x": x}, version=np.uint8(1)))["y"]
            np.testing.assert_allclose(y, reference("m00", x), **TOL)

    run(main())


def test_the_cli_says_sizes_as_an_operator_reads_them():
    from mmengine.cli import _size

    # --device-budget 96KiB was said "0 MiB of models each" (a review's finding).
    assert [_size(n) for n in (500, 96 << 10, 1023 << 20, 11789 << 20)] == \
        ["500 bytes", "96 KiB", "1023 MiB", "11.51 GiB"]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_port_0_on_a_name_of_two_addresses_is_one_port_on_both(tmp_path, own_segments):
    # Each address got a port of its own, and the one announced reached one
    # of them alone (`--host localhost` where it is 127.0.0.1 and ::1).
    from mmengine.engine import Engine
    from mmengine.server.tcp import TcpServer

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            server = TcpServer(engine)
            port = await server.start(["127.0.0.1", "::1"], 0)
            try:
                bound = sorted(s.getsockname()[:2] for s in server._server.sockets)
                for host in ("127.0.0.1", "[::1]"):
                    async with AsyncClient(f"{host}:{port}") as c:
                        assert (await c.health())["status"] == "serving"
                return port, bound
            finally:
                await server.stop()

    port, bound = run(main())
    assert bound == [("127.0.0.1", port), ("::1", port)]


def test_infer_answers_are_arrays_and_calls_get_the_protocols_maps_on_one_connection(address):
    # The SDK reads infer()'s answers into arrays in C (csrc/wire.pyx): not
    # those of call(), even an infer's, sent on the same connection at once.
    name = MODELS[1]
    x = np.random.default_rng(3).standard_normal((2, DIMS[0]), dtype=np.float32)
    want = reference(name, x)
    message = {"op": "infer", "model": name, "inputs": protocol.encode_tensors({"x": x})}

    def check(outputs, raw) -> None:
        np.testing.assert_allclose(outputs["y"], want, rtol=1e-5, atol=1e-6)
        assert raw["outputs"]["y"].keys() == {"dtype", "shape", "data"}
        np.testing.assert_allclose(protocol.decode_tensors(raw["outputs"])["y"], want,
                                   rtol=1e-5, atol=1e-6)

    with Client(address, timeout=30, pool_size=1) as c:
        for _ in range(2):
            check(c.infer(name, {"x": x}), c.call(message))
        for outputs in c.infer_many([(name, {"x": x})] * 3):
            check(outputs, c.call_many([message])[0])

    async def main():
        async with AsyncClient(address, timeout=30, connections=1) as c:
            return await asyncio.gather(*(c.infer(name, {"x": x}) if i % 2 else c.call(message)
                                          for i in range(16)))

    answers = run(main())
    for outputs, raw in zip(answers[1::2], answers[0::2]):
        check(outputs, raw)


def read_raw_frame(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < 4 + protocol.LENGTH.unpack_from(data)[0]:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-frame"
        data += chunk
    return data


@pytest.mark.skipif(protocol.native is None, reason="the native core is not built")
def test_a_server_in_pure_python_answers_the_same_bytes(request, repo, address):
    # The native server reads plain requests and packs their answers in C
    # (csrc/wire.pyx); one with MMENGINE_PURE_PYTHON=1 does both in
    # protocol.py. Each answers the same frames with the same bytes.
    _, pure = start(request, "--repo", str(repo), "--workers", "1",
                    env=environ(MMENGINE_PURE_PYTHON="1"))
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    frames = [
        {"id": 1, "op": "infer", "model": "echo", "inputs": protocol.encode_tensors({"x": x})},
        {"id": 2, "op": "infer", "model": "echo", "timeout": 30.0, "version": 1,
         "inputs": protocol.encode_tensors({"x": np.array([True, False])})},
        {"id": 3, "op": "infer", "model": "echo", "timeout": 30,  # an int: protocol.py's
         "inputs": protocol.encode_tensors({"x": x[:, :2]})},
        {"id": "four", "op": "infer", "model": "echo",  # an id of no int: protocol.py's
         "inputs": protocol.encode_tensors({"x": x})},
        {"id": 5, "op": "infer", "model": "echo", "inputs": {}},  # BadRequest
        {"id": 6, "op": "infer", "model": "nope", "inputs": protocol.encode_tensors({"x": x})},
        {"id": 7, "op": "infer", "model": "echo",
         "inputs": {"x": {"dtype": "bool", "shape": [1], "data": b"\x02"}}},
    ]
    answers = {}
    for at in (address, pure):
        with socket.create_connection(at, timeout=30) as s:
            answers[at] = []
            for frame in frames:
                s.sendall(protocol.frame(frame))
                answers[at].append(read_raw_frame(s))
    assert answers[address] == answers[pure]
    assert [protocol.decode(a[4:])["ok"] for a in answers[pure]] == [True] * 4 + [False] * 3


def _calls_from(cpu: int, port: int, n: int, transport: str) -> None:
    """n calls, from a thread pinned to `cpu`, one at a time with a pause
    between (each answer's linger ends before the next): the SDK's, or
    KServe v2 over a keep-alive HTTP connection."""
    import http.client
    import json

    os.sched_setaffinity(0, {cpu})  # this thread only
    x = {"x": np.ones(3, np.float32)}
    body = json.dumps({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32",
                                   "data": [1.0, 1.0, 1.0]}]})
    with contextlib.ExitStack() as stack:
        if transport == "tcp":
            client = stack.enter_context(Client(f"127.0.0.1:{port}"))
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            stack.callback(conn.close)
        for _ in range(n):
            if transport == "tcp":
                np.testing.assert_array_equal(client.infer("echo", x)["y"], x["x"])
            else:
                conn.request("POST", "/v2/models/echo/infer", body,
                             {"Content-Type": "application/json"})
                answer = conn.getresponse()
                assert answer.status == 200 and json.loads(answer.read())["outputs"][0]["data"] \
                    == [1.0, 1.0, 1.0]
            time.sleep(0.005)


@pytest.mark.parametrize("transport", ["tcp", "http"])
def test_after_an_answer_the_loop_lingers_for_a_client_on_another_cpu_only(tmp_path,
                                                                          own_segments,
                                                                          transport):
    """A client on another CPU: the loop turns on after its answer instead
    of sleeping (a sleeping CPU wakes slowly on a virtual machine), once an
    answer. On the loop's own CPU it sleeps: turning, it would only hold
    the client off."""
    from mmengine.engine import Engine
    from mmengine.server import kserve
    from mmengine.server.http import HttpServer
    from mmengine.server.tcp import TcpServer

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: the loop's and another")
    write_handler(tmp_path, "echo", "def load(path, device):\n    pass\n\n"
                  "def predict(inputs):\n    return {'y': inputs['x']}\n")

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            server = TcpServer(engine) if transport == "tcp" \
                else HttpServer(engine, kserve.ROUTES)
            port = await server.start("127.0.0.1", 0)
            loop_cpus = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {cpus[0]})  # this thread: the loop's
            try:
                await engine.load("echo")
                lingers, failed = {}, []

                def calls_from(cpu):
                    try:
                        _calls_from(cpu, port, 20, transport)
                    except BaseException as e:  # noqa: BLE001 - the test's to raise
                        failed.append(e)

                def counted():  # as stats() and /metrics say
                    (srv,) = engine.stats()["servers"]
                    assert srv["server"] == transport and srv["lingers"] == server.lingers
                    return srv["lingers"]

                for where in ("other", "own"):
                    before = counted()
                    calls = threading.Thread(target=calls_from, args=(
                        cpus[-1] if where == "other" else cpus[0],))
                    calls.start()
                    while calls.is_alive():
                        await asyncio.sleep(0.01)
                    if failed:
                        raise failed[0]
                    lingers[where] = counted() - before
                return lingers
            finally:
                os.sched_setaffinity(0, loop_cpus)
                await server.stop()
                assert engine.stats()["servers"] == []  # closed: no longer counted

    lingers = run(main(), timeout=60)
    # Each answer, but while the linger backs off (its CPU found taken:
    # busy neighbours, where the test runs among them).
    assert lingers["other"] >= 1, lingers
    assert lingers["own"] == 0, lingers


@pytest.mark.parametrize("transport", ["tcp", "http"])
def test_a_connection_that_lingered_goes_once_its_client_closes(tmp_path, own_segments,
                                                                transport):
    # The timer that bounds a linger held the connection, its parser and
    # buffers until it fired, however soon the client closed: a client that
    # sent an oversized frame's header and closed, in a loop, held one a
    # turn for tcp_idle_timeout_s (300 s); each HTTP/1.0 request, LINGER_S.
    import gc
    from mmengine.engine import Engine
    from mmengine.server import kserve
    from mmengine.server import http as http_module
    from mmengine.server import tcp as tcp_module

    if transport == "tcp":
        kind, ask = tcp_module._Connection, protocol.LENGTH.pack(0xFFFF_FFFF)
    else:
        kind, ask = http_module._HttpConnection, b"GET /v2/health/live HTTP/1.0\r\n\r\n"

    def ask_and_close(port):
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(ask)
                while s.recv(1 << 16):  # the answer, then the server's end of the stream
                    pass

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            server = tcp_module.TcpServer(engine) if transport == "tcp" \
                else http_module.HttpServer(engine, kserve.ROUTES)
            port = await server.start("127.0.0.1", 0)
            try:
                await asyncio.get_running_loop().run_in_executor(None, ask_and_close, port)
                await asyncio.sleep(0.2)  # their losses told
                gc.collect()
                return sum(type(o) is kind for o in gc.get_objects())
            finally:
                await server.stop()

    assert run(main(), timeout=60) == 0
