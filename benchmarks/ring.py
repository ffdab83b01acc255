"""The shared-memory ring against the transports it replaces, in one run.

    python benchmarks/ring.py [--json] [--quick]

Two processes each time (spawned): small messages one way (ring,
multiprocessing.Queue, a Unix socket), ping-pong round trips (ring, Unix
socket), 1 MiB records one way against a plain memcpy of the same bytes, and
the CPU a parked consumer burns while nothing arrives. The round trips are
measured with the two processes pinned to two CPUs, and to one (where a
spinning waiter holds off the very peer it waits for): left to the
scheduler, one run got either. Prints one JSON object (the last line) with
--json.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import numpy as np
import psutil

import report  # benchmarks/report.py: the script's own folder is on sys.path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mmengine.ring import Ring  # noqa: E402

SPAWN = mp.get_context("spawn")
SMALL = 64
LARGE = 1 << 20


# -- children (module level so that spawn can import them) -----------------

def _ring_send(handle, n, size):
    ring = Ring.attach(handle)
    msg = bytes(size)
    for _ in range(n):
        ring.put(msg)
    ring.close()


def _queue_send(queue, n, size):
    msg = bytes(size)
    for _ in range(n):
        queue.put(msg)


def _uds_send(sock, n, size):
    msg = bytes(size)
    for _ in range(n):
        sock.sendall(msg)
    sock.close()


def _ring_echo(ping_handle, pong_handle, n):
    ping, pong = Ring.attach(ping_handle), Ring.attach(pong_handle)
    for _ in range(n):
        parts = ping.get()
        pong.put(parts[0])
        del parts
        ping.release()


def _uds_echo(sock, n, size):
    buf = bytearray(size)
    for _ in range(n):
        _recv_exact(sock, buf)
        sock.sendall(buf)


def _recv_exact(sock, buf):
    view, got = memoryview(buf), 0
    while got < len(buf):
        got += sock.recv_into(view[got:])


def _park(handle, ready):
    ring = Ring.attach(handle)
    ready.set()
    try:
        ring.get(timeout=30)
        ring.release()
    except Exception:
        pass


# -- measurements ----------------------------------------------------------

def ring_one_way(n, size, capacity=1 << 22):
    ring = Ring.create(capacity)
    child = SPAWN.Process(target=_ring_send, args=(ring.handle, n, size))
    child.start()
    ring.get(timeout=60)  # the first record starts the clock
    ring.release()
    t0 = time.perf_counter()
    left = n - 1
    while left:
        # The front-end's way: drain what is there (up to a burst), then
        # hand all of its space back with one release.
        ring.get()
        left -= 1
        burst = 1
        while left and burst < 64 and ring.try_get() is not None:
            left -= 1
            burst += 1
        ring.release()
    elapsed = time.perf_counter() - t0
    child.join()
    ring.close()
    return (n - 1) / elapsed


def queue_one_way(n, size):
    queue = SPAWN.Queue()
    child = SPAWN.Process(target=_queue_send, args=(queue, n, size))
    child.start()
    queue.get(timeout=60)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        queue.get()
    elapsed = time.perf_counter() - t0
    child.join()
    return (n - 1) / elapsed


def uds_one_way(n, size):
    # The receiver reads in large chunks, the best a stream socket allows.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = SPAWN.Process(target=_uds_send, args=(b, n, size))
    child.start()
    b.close()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = a.recv_into(view)
    t0 = time.perf_counter()
    total = n * size
    while got < total:
        got += a.recv_into(view)
    elapsed = time.perf_counter() - t0
    child.join()
    a.close()
    return (n - 1) / elapsed


@contextlib.contextmanager
def placed(cpus: tuple[int, int]):
    """This process on cpus[0], and the children it starts meanwhile on
    cpus[1] (started, a child keeps the affinity it inherited)."""
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpus[1]})
        yield lambda: os.sched_setaffinity(0, {cpus[0]})  # call once the child started
    finally:
        os.sched_setaffinity(0, before)


def ring_rtt(n, cpus):
    ping, pong = Ring.create(1 << 16), Ring.create(1 << 16)
    with placed(cpus) as child_started:
        child = SPAWN.Process(target=_ring_echo, args=(ping.handle, pong.handle, n))
        child.start()
        child_started()
        return _ring_rtt(n, ping, pong, child)


def _ring_rtt(n, ping, pong, child):
    msg = bytes(SMALL)
    samples = []
    t0 = time.perf_counter_ns()
    for i in range(n):
        ping.put(msg)
        pong.get()  # a dead echo raises PeerDied: no timeout needed
        pong.release()
        t1 = time.perf_counter_ns()
        samples.append(t1 - t0)
        t0 = t1
    child.join()
    ping.close()
    pong.close()
    return statistics.median(samples[n // 10:]) / 1000  # skip the warm-up


def uds_rtt(n, cpus):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with placed(cpus) as child_started:
        child = SPAWN.Process(target=_uds_echo, args=(b, n, SMALL))
        child.start()
        child_started()
        return _uds_rtt(n, a, b, child)


def _uds_rtt(n, a, b, child):
    b.close()
    msg, buf = bytes(SMALL), bytearray(SMALL)
    samples = []
    t0 = time.perf_counter_ns()
    for _ in range(n):
        a.sendall(msg)
        _recv_exact(a, buf)
        t1 = time.perf_counter_ns()
        samples.append(t1 - t0)
        t0 = t1
    child.join()
    a.close()
    return statistics.median(samples[n // 10:]) / 1000


def memcpy_gbps(reps):
    src = np.ones(LARGE, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t0 = time.perf_counter()
    for _ in range(reps):
        np.copyto(dst, src)
    return reps * LARGE / (time.perf_counter() - t0) / 1e9


def idle_cpu_percent(seconds):
    ring = Ring.create(1 << 12)
    ready = SPAWN.Event()
    child = SPAWN.Process(target=_park, args=(ring.handle, ready))
    child.start()
    ready.wait(60)
    time.sleep(0.2)  # past the spin, into the park
    proc = psutil.Process(child.pid)
    before = sum(proc.cpu_times()[:2])
    time.sleep(seconds)
    used = sum(proc.cpu_times()[:2]) - before
    ring.put(b"stop")
    child.join()
    ring.close()
    return 100.0 * used / seconds


def median_of(fn, repeats, *args):
    return statistics.median(fn(*args) for _ in range(repeats))


def run(quick: bool) -> dict:
    small_n = 200_000 if quick else 1_000_000
    rtt_n = 5_000 if quick else 20_000
    large_n = 500 if quick else 2_000
    repeats = 1 if quick else 3
    cpus = sorted(os.sched_getaffinity(0))
    apart, shared = (cpus[0], cpus[-1]), (cpus[0], cpus[0])  # one CPU: both shared
    out = {
        "impl": Ring.__name__,
        "ring_small_msgs_per_s": median_of(ring_one_way, repeats, small_n, SMALL),
        "mpqueue_small_msgs_per_s": median_of(queue_one_way, repeats, small_n // 5, SMALL),
        "uds_small_msgs_per_s": median_of(uds_one_way, repeats, small_n, SMALL),
        "ring_rtt_p50_us": median_of(ring_rtt, 3, rtt_n, apart),
        "uds_rtt_p50_us": median_of(uds_rtt, 3, rtt_n, apart),
        "ring_rtt_shared_cpu_p50_us": median_of(ring_rtt, 3, rtt_n, shared),
        "uds_rtt_shared_cpu_p50_us": median_of(uds_rtt, 3, rtt_n, shared),
        "ring_large_gb_per_s": median_of(ring_one_way, repeats, large_n, LARGE - 64,
                                         8 * LARGE) * (LARGE - 64) / 1e9,
        "memcpy_gb_per_s": median_of(memcpy_gbps, repeats, large_n),
        "idle_cpu_percent": idle_cpu_percent(2.0),
    }
    out["ratios"] = {
        "vs_mpqueue": out["ring_small_msgs_per_s"] / out["mpqueue_small_msgs_per_s"],
        "vs_uds": out["ring_small_msgs_per_s"] / out["uds_small_msgs_per_s"],
        "rtt_vs_uds": out["ring_rtt_p50_us"] / out["uds_rtt_p50_us"],
        "rtt_vs_uds_shared_cpu": out["ring_rtt_shared_cpu_p50_us"]
        / out["uds_rtt_shared_cpu_p50_us"],
        "large_vs_memcpy": out["ring_large_gb_per_s"] / out["memcpy_gb_per_s"],
    }
    return out


def main() -> None:
    args = report.arguments(__doc__).parse_args()
    report.emit(run(args.quick), args.json)


if __name__ == "__main__":
    main()
