"""What serving adds to a tiny model's call, against a bare TCP echo, in one run.

    python benchmarks/overhead.py [--json] [--quick]

An MLP 64->32->16 at batch 1, called four ways: directly in this process,
through an in-process Engine, through the blocking SDK against a server
subprocess (one request at a time), and through the AsyncClient with 64
requests in flight over 4 connections, in turns with its twin whose
manifest sets max_batch_size (its worker joins the requests queued together
into one call: sdk_rps_c64_batched, and batched_vs_alone_rps_c64 the rate
over the unbatched one's). A plain uvloop server exchanging
frames of the SDK's request and response sizes gives the floor of a TCP
round trip; a relay (the same server passing each frame through a ring to
a worker process that answers it, with the rings' spinning and the
front-end's polling) gives the floor of mmengine's shape, two hops and no
work (relay_vs_echo: relay over echo, the least sdk_vs_echo this shape
would allow a model that cost nothing). The same server answers KServe v2 over HTTP: one request at a
time over a keep-alive connection from a blocking raw-socket client (JSON
tensors, and the binary tensor extension), and with 32 in flight over 32
keep-alive connections from a uvloop client of raw asyncio Protocols, whose
own cost is a few Python lines per response. The breakdown splits the
SDK's median into the model, the worker and its rings, the engine, the
client's own work and the server's front end (the client's, as the SDK
costs more than a raw-socket client of the same server in turns with it:
client_in_turns; client_codec is the same work warm, in a loop of its
own); `sdk_stages_p50_us` gives the stages the server itself reports for
one request at a time (`"timing": true` from a raw-socket client); and it
counts each process's CPU time per
request, one at a time and under load. Last, a 16 MiB tensor
through the SDK to a handler that returns it, against the echo server
exchanging frames of the same sizes (large_vs_echo: what the path adds to
moving the bytes). `front_end_gc`: the server's garbage collections from
the SDK's first call to the HTTP rates' end, by generation, and the
milliseconds the loop stood still for them (its /metrics).

The echo's client and server are pinned to one CPU (`echo_p50_us`, the
bare round trip at its fastest, the unit of sdk_vs_echo) and to two
(`echo_two_cpus_p50_us`, where the server's sleeping CPU must wake: 19
against 66-98 µs here); unpinned, a run got either, and the ratio moved
from 1 to 15 with no change to mmengine.

The SDK's calls one at a time are timed the same way, the client beside
its server: the front-end and the client on one CPU, the worker on the
other (`sdk_p50_us`, sdk_vs_echo's), as ab.py times its servers. Unpinned,
the kernel kept the client on whichever CPU it ran on first, and a run got
either ~41 or 55-60 µs (RESULTS.md, session 55). The other placement is
timed too (`sdk_beside_worker_p50_us`, and sdk_beside_worker_vs_echo):
there an answer waits for the spinning worker to yield its CPU, or for the
interrupt that preempts it, which takes ~16 µs on these virtual CPUs.

The direct call (on the worker's CPU), the echo on one CPU and the SDK's
calls go in rounds, a block of each in turn (15 rounds of 2,000 calls
each; --quick 5 of 600): sdk_vs_echo is the median of the rounds' own
ratios, listed in `sdk_vs_echo_rounds`, with the direct call's and the
echo's p50 of each round in `direct_rounds_us` and `echo_rounds_us`. The
host slows each virtual CPU on its own, for seconds at a time (the MLP's
call 13 or 21 µs, pinned to one CPU and then the other): measured one
after another, a slow spell during the SDK's calls alone put a run's
sdk_vs_echo at 2.74 where the next run gave 1.97 (RESULTS.md, session 56).
sdk_vs_echo_after_gap and sdk_beside_worker_vs_echo are measured outside
the rounds (the gapped direct call before the server starts, the SDK
beside the worker after the rounds), against the rounds' medians.

On these virtual CPUs a path that went untouched for 50 µs or more runs about
twice as slow as back to back, whatever the process did meanwhile (spun in
C, spun on the clock, slept): the MLP's call 15 -> 30 µs (a scratch timing,
RESULTS.md, session 45). In the server every process's path waits that long
for the others': direct_after_gap_p50_us calls the model GAP_US apart, and
sdk_vs_echo_after_gap measures the overhead from there.
Prints one JSON object (the last line) with --json.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import uvloop
from prometheus_client.parser import text_string_to_metric_families

import report  # benchmarks/report.py: the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mmengine import AsyncClient, Client, protocol, resources, trace  # noqa: E402
from mmengine.config import Config  # noqa: E402

MODEL, DIMS = "mlp", (64, 32, 16)
BATCHED = "mlp-batched"
# One model lives on one worker; a second one would only compete for the two cores.
WORKERS = 1
# A worker's model is called after the rest of the round trip, ~100 µs of
# other processes' work: direct_after_gap_p50_us calls it that long apart.
GAP_US = 100
CONCURRENCY, CONNECTIONS = 64, 4
HTTP_CONCURRENCY = 32  # one request in flight on each of this many connections
# A large tensor through the SDK and back (a handler that returns its input),
# against an echo of frames of the same sizes.
LARGE, LARGE_MIB = "identity", 16
IDENTITY_HANDLER = """
def load(path, device):
    return None

def predict(inputs):
    return {"y": inputs["x"]}
"""


# -- the server subprocess (zipf.py uses it too) -----------------------------

@contextlib.contextmanager
def server(repo: Path, *flags: str, start_timeout: float = 120.0, root: Path = ROOT):
    """`mmengine serve` of the checkout `root` (its compiled modules built)
    on free ports; yields ("host:port", proc), with the HTTP server's
    "host:port" as proc.http_address; stops it with SIGTERM. Its output
    goes to our stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    # In `root`: `python -m` puts the working directory first on sys.path.
    proc = subprocess.Popen([sys.executable, "-m", "mmengine.cli", "serve", "--repo",
                             str(repo), "--tcp-port", "0", "--http-port", "0", *flags],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    hung = threading.Timer(start_timeout, proc.kill)
    hung.start()
    try:
        m = http = None
        for line in proc.stdout:
            sys.stderr.write(line)
            m = m or re.search(r"on tcp://(\S+):(\d+)", line)
            http = http or re.search(r"HTTP .* on http://(\S+):(\d+)", line)
            if m and http:
                break
        else:
            raise RuntimeError(f"the server exited ({proc.wait()}) before listening")
        proc.http_address = f"{http.group(1)}:{http.group(2)}"
        hung.cancel()
        # Keep reading: a full pipe would block the server.
        threading.Thread(target=shutil.copyfileobj, args=(proc.stdout, sys.stderr),
                         daemon=True).start()
        yield f"{m.group(1)}:{m.group(2)}", proc
    finally:
        hung.cancel()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the baselines: an echo server, and one with a worker process behind it ---

class FrameServer(asyncio.Protocol):
    """Hands each length-prefixed frame that arrives to on_frame(), as the
    end of its bytes in `buf` (the frame is buf[4:end]), then calls
    after_frames()."""

    def connection_made(self, transport):
        self.transport, self.buf = transport, bytearray()

    def data_received(self, data):
        self.buf += data
        while len(self.buf) >= 4:
            n = 4 + protocol.LENGTH.unpack_from(self.buf)[0]
            if len(self.buf) < n:
                break
            self.on_frame(n)
            del self.buf[:n]
        self.after_frames()

    def after_frames(self):
        pass


def serve(factory) -> None:
    """Serves `factory`'s protocol on a free port of 127.0.0.1, printed
    first, until SIGTERM."""
    async def main():
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        srv = await loop.create_server(factory, "127.0.0.1", 0)
        print(srv.sockets[0].getsockname()[1], flush=True)
        await stop.wait()

    uvloop.run(main())


def echo_server(response_bytes: int) -> None:
    """Answers each frame with a frame of `response_bytes`."""
    response = protocol.LENGTH.pack(response_bytes - 4) + bytes(response_bytes - 4)

    class Echo(FrameServer):
        def on_frame(self, end):
            self.transport.write(response)

    serve(Echo)


def relay_worker(requests, answers, response_bytes: int) -> None:
    """Answers each record of `requests` with `response_bytes` bytes."""
    from mmengine.errors import PeerDied, RingClosed
    from mmengine.ring import Ring

    requests, answers = Ring.attach(requests), Ring.attach(answers)
    payload = bytes(response_bytes)
    with contextlib.suppress(RingClosed, PeerDied):
        while True:
            requests.get()
            requests.release()
            answers.put(payload)


def relay_server(response_bytes: int) -> None:
    """The echo server with the shape of mmengine's path and none of its
    work: each frame goes through a ring to a worker process, whose answer
    comes back through another, read as the front-end reads a worker's
    (polled for poll_us after a request, else woken through the eventfd),
    with the rings' default spin_us."""
    import multiprocessing

    from mmengine.ring import Ring

    config = Config()
    requests = Ring.create(config.ring_bytes, spin_us=config.spin_us)
    answers = Ring.create(config.ring_bytes, spin_us=config.spin_us)
    worker = multiprocessing.get_context("spawn").Process(
        target=relay_worker, args=(requests.handle, answers.handle, response_bytes - 4))
    worker.start()
    header = protocol.LENGTH.pack(response_bytes - 4)

    class Relay(FrameServer):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.loop = asyncio.get_running_loop()
            self.in_flight, self.poll_until, self.polling = 0, 0.0, False
            self.loop.add_reader(answers.readable_fd, self.woken)

        def on_frame(self, end):
            requests.put(bytes(self.buf[4:end]))
            self.in_flight += 1

        def after_frames(self):
            self.poll_until = time.monotonic() + config.poll_us / 1e6
            if not self.polling:
                self.polling = True
                answers.disarm_read()
                self.loop.call_soon(self.poll)

        def drain(self):
            while (record := answers.try_get()) is not None:
                # A copy: a write left partial keeps what it was given, and
                # the ring reuses the space once released.
                self.transport.writelines([header, bytes(record[0])])
                answers.release()
                self.in_flight -= 1

        def poll(self):
            self.drain()
            if self.in_flight and time.monotonic() < self.poll_until:
                self.loop.call_soon(self.poll)
                return
            self.polling = False
            if not answers.arm_read():
                self.loop.call_soon(self.woken)

        def woken(self):
            answers.disarm_read()
            self.drain()
            if not self.polling and not answers.arm_read():
                self.loop.call_soon(self.woken)

    try:
        serve(Relay)
    finally:
        requests.close()
        answers.close()
        worker.join(10)


@contextlib.contextmanager
def baseline(kind: str, response_bytes: int, cpu: int | None = None):
    """The `kind` server ("echo" or "relay") answering frames with frames
    of `response_bytes`, in a subprocess (on `cpu` alone, if given);
    yields a blocking, connected socket to it and the subprocess's id."""
    pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    proc = subprocess.Popen([sys.executable, __file__, f"--{kind}-server", str(response_bytes)],
                            stdout=subprocess.PIPE, text=True, preexec_fn=pin)
    try:
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            yield sock, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exchange_ns(sock: socket.socket, request: bytes, into: memoryview) -> int:
    """One frame sent and an answer of len(into) bytes read, timed."""
    t0 = time.perf_counter_ns()
    sock.sendall(request)
    got = 0
    while got < len(into):
        got += sock.recv_into(into[got:])
    return time.perf_counter_ns() - t0


def exchanges_p50_us(sock: socket.socket, request: bytes, response_bytes: int, n: int) -> float:
    """The p50 of n exchanges over `sock`, after a tenth of them as warm-up."""
    into = memoryview(bytearray(response_bytes))
    samples = [exchange_ns(sock, request, into) for _ in range(n)]
    return _p(samples[n // 10:], 50) / 1e3


def baseline_p50_us(request: bytes, response_bytes: int, n: int, kind: str = "echo",
                    cpus: list[int] | None = None) -> float:
    """The p50 of a blocking client's exchanges with the `kind` server;
    with `cpus`, arranged as the SDK's calls are (the server and the
    client on the first, the relay's worker on the last)."""
    with baseline(kind, response_bytes) as (sock, pid):
        if cpus is None:
            return exchanges_p50_us(sock, request, response_bytes, n)
        with arranged(pid, cpus[0], cpus[-1]):
            return on_cpu(cpus[0], exchanges_p50_us, sock, request, response_bytes, n)


# -- the model, the engine, the SDK --------------------------------------------

def _p(samples, q: float) -> float:
    return float(np.percentile(samples, q))


def direct_model():
    """The MLP as the worker serves it, in this process, with the worker's
    torch threads."""
    import torch

    from mmengine.demo import mlp

    torch.set_num_threads(resources.torch_threads(Config(workers=WORKERS)))  # the worker's
    return mlp(*DIMS, seed=0)


def direct_p50_us(model, x: np.ndarray, n: int, gap_us: float = 0) -> float:
    """The model's call in this process, back to back; or each after
    `gap_us` of this process busy with other work (a spin on the clock)."""
    import torch

    samples = []
    for _ in range(n):
        end = time.perf_counter_ns() + gap_us * 1e3
        while time.perf_counter_ns() < end:
            pass
        t0 = time.perf_counter_ns()
        with torch.inference_mode():
            model(torch.from_numpy(x)).numpy()
        samples.append(time.perf_counter_ns() - t0)
    return _p(samples[n // 10:], 50) / 1e3


@contextlib.contextmanager
def pinned(cpu: int):
    """The calling thread on `cpu` alone, then back where it was allowed."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pin_server(pid: int, front_end_cpu: int, worker_cpu: int) -> dict[int, set[int]]:
    """Every thread of server `pid` on front_end_cpu, its child processes'
    (its workers') on worker_cpu; returns where each process was allowed
    before (its main thread's CPUs), by id. A thread or a process that
    ends meanwhile is passed over."""
    front = psutil.Process(pid)
    before = {}
    for proc, cpu in [(front, front_end_cpu)] + [(child, worker_cpu) for child in
                                                 front.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            before[proc.pid] = os.sched_getaffinity(proc.pid)
            _place(proc, {cpu})
    return before


def _place(proc: psutil.Process, cpus: set[int]) -> None:
    for thread in proc.threads():
        with contextlib.suppress(ProcessLookupError):  # (ended since)
            os.sched_setaffinity(thread.id, cpus)


@contextlib.contextmanager
def arranged(pid: int, front_end_cpu: int, worker_cpu: int):
    """Server `pid` pinned (pin_server) while calls are timed one at a
    time, then every thread of its processes, those started meanwhile too
    (a load's readers), allowed where its process was before."""
    before = pin_server(pid, front_end_cpu, worker_cpu)
    try:
        yield
    finally:
        for proc_pid, cpus in before.items():
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                _place(psutil.Process(proc_pid), cpus)


def on_cpu(cpu: int, fn, *args):
    """fn(*args) with the calling thread on `cpu` alone."""
    with pinned(cpu):
        return fn(*args)


def echo_p50_us(sock: socket.socket, cpu: int, request: bytes, response_bytes: int,
                n: int) -> float:
    """A blocking client's exchanges with an echo server, the client on
    `cpu` alone (the server is pinned by baseline())."""
    return on_cpu(cpu, exchanges_p50_us, sock, request, response_bytes, n)


async def _engine(repo: Path, x: np.ndarray, n: int) -> dict:
    from mmengine.engine import Engine
    from mmengine.messages import Op

    async with Engine(Config(repo=str(repo), workers=WORKERS)) as engine:
        await engine.infer(MODEL, {"x": x})
        worker = engine.pool.workers[0]
        infer, call, compute = [], [], []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            await engine.infer(MODEL, {"x": x})
            infer.append(time.perf_counter_ns() - t0)
        # The worker alone, as the engine calls it: rings both ways plus
        # the worker's own handling; compute_us is the model's share of it.
        for _ in range(n):
            t0 = time.perf_counter_ns()
            body, _ = await worker.call(Op.INFER, MODEL, 1, {"x": x})
            call.append(time.perf_counter_ns() - t0)
            compute.append(body["t_done"] - body["t_recv"])  # the worker's ns stamps
    skip = n // 10
    return {"engine": _p(infer[skip:], 50) / 1e3, "worker_call": _p(call[skip:], 50) / 1e3,
            "compute": _p(compute[skip:], 50) / 1e3}


def sdk_samples_ns(address: str, model: str, x: np.ndarray, n: int) -> list[int]:
    """One SDK call at a time, after a tenth of them as warm-up."""
    with Client(address) as c:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            c.infer(model, {"x": x})
            samples.append(time.perf_counter_ns() - t0)
    return samples[n // 10:]


def in_rounds(rounds: int, n: int, model, x: np.ndarray, echo: socket.socket,
              request: bytes, response_bytes: int, address: str, pid: int,
              cpus: list[int]) -> dict:
    """The model called directly, the echo and the SDK's calls one at a
    time, a block of `n` each in every round (in an order that turns round
    by round): the clients on the front-end's CPU (cpus[0]), the model on
    the worker's (cpus[-1]), where the worker calls it. The machine drifts,
    and a burst of the host's noise lands on one round of all three, not on
    one of them; and the host slows each virtual CPU on its own (the MLP's
    call 13 or 21 us, on one CPU and not the other, seconds apart), which
    the model's call on the worker's CPU counts as the worker's. Each
    one's median over the rounds of its blocks' p50, sdk_vs_echo the median
    of the rounds' own (their list in `sdk_vs_echo_rounds`, and the direct
    call's and the echo's in `direct_rounds_us` and `echo_rounds_us`: each
    CPU's speed, round by round), the SDK's p99 over all its calls, and its
    CPU time per request (cpu_per_request) the mean over its blocks."""
    sdk_all, cpu_us = [], []

    def sdk() -> float:
        samples, used = cpu_per_request(pid, n, sdk_samples_ns, address, MODEL, x, n)
        sdk_all.extend(samples)
        cpu_us.append(used)
        return _p(samples, 50) / 1e3

    steps = [(0, cpus[-1], direct_p50_us, (model, x, n)),
             (1, cpus[0], exchanges_p50_us, (echo, request, response_bytes, n)),
             (2, cpus[0], sdk, ())]
    rows = []
    for i in range(rounds):
        row = [0.0] * 3
        for at, cpu, step, args in steps[i % 3:] + steps[:i % 3]:
            row[at] = on_cpu(cpu, step, *args)
        rows.append(row)
    med = statistics.median
    ratios = [(sdk_p50 - direct_p50) / echo_p50 for direct_p50, echo_p50, sdk_p50 in rows]
    return {"direct": med(r[0] for r in rows), "echo": med(r[1] for r in rows),
            "sdk": med(r[2] for r in rows), "sdk_p99": _p(sdk_all, 99) / 1e3,
            "sdk_vs_echo": med(ratios), "sdk_vs_echo_rounds": [round(r, 3) for r in ratios],
            "direct_rounds_us": [round(r[0], 2) for r in rows],
            "echo_rounds_us": [round(r[1], 2) for r in rows],
            "cpu_us": {k: statistics.fmean(c[k] for c in cpu_us) for k in cpu_us[0]}}


def _answer(sock: socket.socket, frame: bytes) -> tuple[int, bytes]:
    """One frame sent to the server and its answer read whole: (the
    round trip in ns, the answer's frame)."""
    t0 = time.perf_counter_ns()
    sock.sendall(frame)
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + protocol.LENGTH.unpack_from(buf)[0]:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk
    return time.perf_counter_ns() - t0, buf


def sdk_and_raw_p50_us(address: str, x: np.ndarray, request: dict, n: int) -> tuple:
    """The SDK's calls and a raw-socket client's exchanges of the same
    request, in turns (the machine drifts): what the SDK's own work costs
    in the round trip, where its caches are cold after the server's turn
    on the same cores (client_codec times it warm, in a loop of its own)."""
    frame = protocol.frame(request)
    host, port = address.rsplit(":", 1)
    sdk, raw = [], []
    with Client(address) as c, socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            t0 = time.perf_counter_ns()
            c.infer(MODEL, {"x": x})
            sdk.append(time.perf_counter_ns() - t0)
            raw.append(_answer(sock, frame)[0])
    return _p(sdk[n // 10:], 50) / 1e3, _p(raw[n // 10:], 50) / 1e3


def stages_p50_us(address: str, request: dict, n: int) -> dict:
    """Where one request at a time spends its time, from the server's
    `timing` (docs/observability.md) and a raw-socket client: each stage's
    median, with `outside` = the round trip less the server's stages (the
    client, the two TCP legs and the frame's decode before submit)."""
    frame = protocol.frame({**request, "timing": True})
    host, port = address.rsplit(":", 1)
    rows = []
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            round_trip, buf = _answer(sock, frame)
            timing = protocol.decode(buf[4:])["timing"]
            rows.append({**trace.durations(timing),
                         "outside": round_trip - timing["total_ns"], "round_trip": round_trip})
    rows = rows[n // 10:]
    keys = set.intersection(*(set(r) for r in rows))  # an answer may lack worker stamps
    return {k: _p([r[k] for r in rows], 50) / 1e3 for k in sorted(keys)}


def sdk_large_ms(address: str, x: np.ndarray, n: int) -> float:
    return _p(sdk_samples_ns(address, LARGE, x, n), 50) / 1e6


def client_codec_p50_us(x: np.ndarray, response: bytes, n: int) -> float:
    """The SDK's own share of a call, as infer() does it (in C where
    mmengine._wire is built): frame the request, cut the answer out of the
    stream and read it into arrays (no I/O)."""
    from mmengine import client

    frames, samples = client._Frames(), []
    frames.arrays = client._wire is not None
    request = (MODEL, {"x": x}, None)
    for i in range(n):
        t0 = time.perf_counter_ns()
        if client._native_frames([i], [request], 30.0, None, False, None) is None:
            protocol.frames(client._infer_message(*request, 30.0))
        client._outputs(frames.feed(response)[0])
        samples.append(time.perf_counter_ns() - t0)
    return _p(samples[n // 10:], 50) / 1e3


async def _rps(address: str, x: np.ndarray, n: int, model: str = MODEL) -> float:
    async with AsyncClient(address, connections=CONNECTIONS) as c:
        left = n

        async def one():
            nonlocal left
            while left > 0:
                left -= 1
                await c.infer(model, {"x": x})

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
        return n / (time.perf_counter() - t0)


def cpu_per_request(server_pid: int, n: int, fn, *args):
    """fn(*args), and each process's user and system CPU microseconds per
    request (n of them) meanwhile."""
    front = psutil.Process(server_pid)
    procs = {"front_end": [front], "worker": front.children(), "client": [psutil.Process()]}

    def cpu():
        return {f"{k}_{kind}": sum(getattr(p.cpu_times(), kind) for p in ps)
                for k, ps in procs.items() for kind in ("user", "system")}

    before = cpu()
    result = fn(*args)
    after = cpu()
    return result, {k: (after[k] - before[k]) * 1e6 / n for k in before}


# -- KServe v2 over HTTP --------------------------------------------------------

def front_end_gc(http: str) -> tuple[list[float], float]:
    """The server's garbage collections so far, by generation, and the
    seconds they took (its /metrics: the front-end's)."""
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    got = {s.name + s.labels.get("generation", ""): s.value
           for family in text_string_to_metric_families(text) for s in family.samples
           if s.name.startswith("mmengine_front_end_gc_")}
    return ([got[f"mmengine_front_end_gc_collections_total{g}"] for g in "012"],
            sum(got[f"mmengine_front_end_gc_pause_seconds_total{g}"] for g in "012"))


def kserve_request(x: np.ndarray, binary: bool) -> bytes:
    """One whole HTTP request for MODEL, as tritonclient would send it."""
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    if not binary:
        body = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
        return (b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: bench\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (MODEL.encode(), len(body), body))
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return (b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: bench\r\n"
            b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n%s%s"
            % (MODEL.encode(), len(head), len(head) + x.nbytes, head, x.tobytes()))


def _cut_response(buf: bytearray) -> bool:
    """Removes one whole response from the front of buf; False if there is none yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    i = buf.find(b"Content-Length: ", 0, end) + 16
    n = end + 4 + int(buf[i:buf.find(b"\r\n", i)])
    if len(buf) < n:
        return False
    if not buf.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"the server answered {bytes(buf[:n])!r}")
    del buf[:n]
    return True


def http_exchange(sock: socket.socket, request: bytes, buf: bytearray) -> None:
    """One whole HTTP request sent over keep-alive and its response read
    whole (cut from `buf`, which keeps what comes after it)."""
    sock.sendall(request)
    while not _cut_response(buf):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk


def http_latency_us(address: str, request: bytes, n: int) -> float:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf, samples = bytearray(), []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            http_exchange(sock, request, buf)
            samples.append(time.perf_counter_ns() - t0)
    return _p(samples[n // 10:], 50) / 1e3


class _KeepAlive(asyncio.Protocol):
    """Sends the next request as soon as the last one is answered."""

    def __init__(self, request: bytes, left: list, done: asyncio.Future):
        self.request, self.left, self.done, self.buf = request, left, done, bytearray()

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                      socket.TCP_NODELAY, 1)

    def data_received(self, data):
        self.buf += data
        try:
            while _cut_response(self.buf):
                self.left[1] -= 1  # answers still to come
                if self.left[1] == 0 and not self.done.done():
                    self.done.set_result(None)
                if self.left[0] > 0:
                    self.left[0] -= 1  # requests still to send
                    self.transport.write(self.request)
        except RuntimeError as e:
            if not self.done.done():
                self.done.set_exception(e)


async def _http_rps(address: str, request: bytes, n: int) -> float:
    loop = asyncio.get_running_loop()
    host, port = address.rsplit(":", 1)
    left, done = [n, n], loop.create_future()
    conns = [await loop.create_connection(lambda: _KeepAlive(request, left, done),
                                          host, int(port)) for _ in range(HTTP_CONCURRENCY)]
    t0 = time.perf_counter()
    for transport, _ in conns:
        left[0] -= 1
        transport.write(request)
    await done
    rate = n / (time.perf_counter() - t0)
    for transport, _ in conns:
        transport.close()
    return rate


# -- the run -------------------------------------------------------------------

def run(quick: bool) -> dict:
    from mmengine.demo import write_mlp

    n = 2_000 if quick else 10_000
    rounds, block = (5, 600) if quick else (15, 2_000)  # in_rounds
    rps_n = 5_000 if quick else 30_000
    repeats = 1 if quick else 3
    med = statistics.median
    x = np.random.default_rng(0).standard_normal((1, DIMS[0]), dtype=np.float32)
    y = np.zeros((1, DIMS[2]), np.float32)
    big = np.ones(LARGE_MIB << 18, np.float32)
    large_n = 20 if quick else 60
    big_request = protocol.frame({"op": "infer", "model": LARGE, "id": 1000,
                                  "inputs": protocol.encode_tensors({"x": big})})
    big_response = len(protocol.frame({"outputs": protocol.encode_tensors({"y": big}),
                                       "id": 1000, "ok": True}))
    # As the SDK's Client writes it, its timeout included (30 s, its default).
    request = {"op": "infer", "model": MODEL, "inputs": protocol.encode_tensors({"x": x}),
               "id": 1000, "timeout": 30.0}
    response = protocol.frame({"outputs": protocol.encode_tensors({"y": y}), "id": 1000,
                               "ok": True})
    with tempfile.TemporaryDirectory(prefix="mmengine-overhead-") as tmp:
        repo = Path(tmp)
        write_mlp(repo / MODEL, "safetensors", *DIMS)
        # The same model, its queued requests joined into calls (batching.py).
        batched = write_mlp(repo / BATCHED, "safetensors", *DIMS)
        (batched / "model.toml").write_text(f"max_batch_size = {CONCURRENCY}\n"
                                            + (batched / "model.toml").read_text())
        (repo / LARGE / "1").mkdir(parents=True)
        (repo / LARGE / "1" / "handler.py").write_text(IDENTITY_HANDLER)
        engine = [uvloop.run(_engine(repo, x, n)) for _ in range(repeats)]
        engine = {k: med(e[k] for e in engine) for k in engine[0]}
        model = direct_model()
        cpus = sorted(os.sched_getaffinity(0))
        # On the worker's CPU, as in_rounds calls it directly.
        direct_after_gap = med(on_cpu(cpus[-1], direct_p50_us, model, x, n, GAP_US)
                               for _ in range(repeats))
        with server(repo, "--workers", str(WORKERS)) as (address, proc), \
                baseline("echo", len(response), cpus[0]) as (beside, _), \
                baseline("echo", len(response), cpus[-1]) as (apart, _):
            # The bare round trip at its fastest, client and server on one
            # CPU, is the unit of sdk_vs_echo (in_rounds); on two, it is
            # reported too, before and after the SDK's: the machine drifts.
            two_cpus = [echo_p50_us(apart, cpus[0], protocol.frame(request), len(response), n)]
            gc_before = front_end_gc(proc.http_address)
            # As the echo's client beside its server: the SDK's beside the
            # front-end, the worker on the other CPU (and, for what the
            # other placement costs, beside the worker).
            with arranged(proc.pid, cpus[0], cpus[-1]):
                ones = in_rounds(rounds, block, model, x, beside, protocol.frame(request),
                                 len(response), address, proc.pid, cpus)
                beside_worker = [on_cpu(cpus[-1], sdk_samples_ns, address, MODEL, x, n)
                                 for _ in range(repeats)]
                stages = [on_cpu(cpus[0], stages_p50_us, address, request, n)
                          for _ in range(repeats)]
                in_turns = [on_cpu(cpus[0], sdk_and_raw_p50_us, address, x, request, n)
                            for _ in range(repeats)]
            two_cpus.append(echo_p50_us(apart, cpus[0], protocol.frame(request), len(response),
                                        n))
            uvloop.run(_rps(address, x, CONCURRENCY * 10))  # warm up
            uvloop.run(_rps(address, x, CONCURRENCY * 10, BATCHED))
            rps, rps_batched = [], []
            for _ in range(repeats):  # in turns: the machine drifts
                rps.append(cpu_per_request(proc.pid, rps_n, uvloop.run,
                                           _rps(address, x, rps_n)))
                rps_batched.append(cpu_per_request(proc.pid, rps_n, uvloop.run,
                                                   _rps(address, x, rps_n, BATCHED)))
            http = proc.http_address
            json_req, binary_req = kserve_request(x, False), kserve_request(x, True)
            # Warmed up, then alternated: the first thousand requests after
            # the rate runs are slower whichever form comes first.
            http_latency_us(http, json_req, n // 10)
            http_latency_us(http, binary_req, n // 10)
            http_json, http_binary = [], []
            for _ in range(repeats):
                http_json.append(cpu_per_request(proc.pid, n, http_latency_us, http,
                                                 json_req, n))
                http_binary.append(http_latency_us(http, binary_req, n))
            http_binary = med(http_binary)
            uvloop.run(_http_rps(http, binary_req, HTTP_CONCURRENCY * 10))  # warm up
            http_rps = [cpu_per_request(proc.pid, rps_n, uvloop.run,
                                        _http_rps(http, binary_req, rps_n))
                        for _ in range(repeats)]
            gc_after = front_end_gc(proc.http_address)  # before the large tensors
            sdk_large = med(sdk_large_ms(address, big, large_n) for _ in range(repeats))
        relay = med(baseline_p50_us(protocol.frame(request), len(response), n, "relay", cpus)
                    for _ in range(repeats))
        echo_large = med(baseline_p50_us(big_request, big_response, large_n) / 1e3
                         for _ in range(repeats))
    codec = client_codec_p50_us(x, response, n)
    direct, echo, sdk_p50 = ones["direct"], ones["echo"], ones["sdk"]
    sdk_beside_worker = med(_p(s, 50) / 1e3 for s in beside_worker)
    client = med(t[0] - t[1] for t in in_turns)
    return {
        "direct_p50_us": direct,
        "direct_after_gap_p50_us": direct_after_gap,
        "engine_p50_us": engine["engine"],
        "sdk_p50_us": sdk_p50,
        "sdk_p99_us": ones["sdk_p99"],
        "sdk_beside_worker_p50_us": sdk_beside_worker,
        "echo_p50_us": echo,
        "echo_two_cpus_p50_us": med(two_cpus),
        "relay_p50_us": relay,
        "raw_client_p50_us": med(t[1] for t in in_turns),
        "sdk_rps_c64": med(r[0] for r in rps),
        "sdk_rps_c64_batched": med(r[0] for r in rps_batched),
        "http_json_p50_us": med(h[0] for h in http_json),
        "http_binary_p50_us": http_binary,
        "http_rps_c32": med(r[0] for r in http_rps),
        "large_mib": LARGE_MIB,
        "sdk_large_p50_ms": sdk_large,
        "echo_large_p50_ms": echo_large,
        "front_end_gc": {"collections": [a - b for a, b in zip(gc_after[0], gc_before[0])],
                         "pause_ms": (gc_after[1] - gc_before[1]) * 1e3},
        "breakdown_p50_us": {
            "model_compute": engine["compute"],
            "worker_and_rings": engine["worker_call"] - engine["compute"],
            "engine": engine["engine"] - engine["worker_call"],
            "client_codec": codec,
            "client_in_turns": client,
            "tcp_echo": echo,
            "front_end_rest": sdk_p50 - engine["engine"] - client - echo,
        },
        "sdk_stages_p50_us": {k: med(st[k] for st in stages) for k in stages[0]},
        "cpu_us_per_request_c1": ones["cpu_us"],
        "cpu_us_per_request_c64": {k: med(r[1][k] for r in rps) for k in rps[0][1]},
        "cpu_us_per_request_c64_batched": {k: med(r[1][k] for r in rps_batched)
                                           for k in rps_batched[0][1]},
        "cpu_us_per_request_http_json_c1": {k: med(r[1][k] for r in http_json)
                                            for k in http_json[0][1]},
        "cpu_us_per_request_http_c32": {k: med(r[1][k] for r in http_rps)
                                        for k in http_rps[0][1]},
        "sdk_vs_echo_rounds": ones["sdk_vs_echo_rounds"],
        "direct_rounds_us": ones["direct_rounds_us"],
        "echo_rounds_us": ones["echo_rounds_us"],
        "ratios": {"sdk_vs_echo": ones["sdk_vs_echo"],
                   "sdk_beside_worker_vs_echo": (sdk_beside_worker - direct) / echo,
                   "sdk_vs_echo_after_gap": (sdk_p50 - direct_after_gap) / echo,
                   "relay_vs_echo": relay / echo,
                   "large_vs_echo": sdk_large / echo_large,
                   "batched_vs_alone_rps_c64": med(r[0] for r in rps_batched)
                   / med(r[0] for r in rps)},
    }


def main() -> None:
    ap = report.arguments(__doc__)
    ap.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--relay-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_server:
        echo_server(args.echo_server)
        return
    if args.relay_server:
        relay_server(args.relay_server)
        return
    report.emit(run(args.quick), args.json)


if __name__ == "__main__":
    main()
