"""The shared-memory ring, over both implementations and between processes."""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

from conftest import busy_process, environ
from mmengine import shm
from mmengine.errors import PeerDied, RecordTooLarge, RingClosed, RingTimeout, WorkerDied
from mmengine.config import Config, GiB, MiB
from mmengine.ring import (LARGEST_RECORD, PREEMPTED_NS, TAKEN_SHARE, TURN_NS, CpuTaken,
                           NativeRing, PyRing, record_size)

IMPLS = [pytest.param(PyRing, id="py")]
if NativeRing is not None:
    IMPLS.insert(0, pytest.param(NativeRing, id="native"))

SPAWN = mp.get_context("spawn")
STRESS_RECORDS = 1_000_000


@pytest.fixture(params=IMPLS)
def Ring(request):
    return request.param


@pytest.fixture
def pair(Ring):
    a = Ring.create(4096)
    b = Ring.attach(a.handle)
    yield a, b
    b.close()
    a.close()


def _impl(name):
    return {"native": NativeRing, "py": PyRing}[name]


def _name(Ring):
    return "native" if Ring is NativeRing else "py"


# -- in one process -------------------------------------------------------

def test_round_trip_parts_and_views(pair):
    a, b = pair
    x = np.arange(100, dtype=np.float32)
    a.put(b"header", x, b"", b"\x01\x02\x03")
    parts = b.get(timeout=1)
    assert [len(p) for p in parts] == [6, 400, 0, 3]
    assert parts[0] == b"header" and type(parts[0]) is bytes  # a small header: copied out
    assert all(type(p) is memoryview for p in parts[1:])  # tensors: views, however small
    y = np.frombuffer(parts[1], dtype=np.float32)  # a view into the segment
    assert np.array_equal(x, y)
    assert y.ctypes.data % 8 == 0
    assert bytes(parts[3]) == b"\x01\x02\x03"
    del parts, y
    b.release()
    assert b.try_get() is None


def test_empty_and_unusual_arrays_pass_as_their_bytes(pair):
    # An empty batch (KServe's tritonclient sends one) and items a
    # memoryview cannot describe: the twin failed the first with a TypeError.
    a, b = pair
    parts = [np.zeros((0, 16), np.float32), np.zeros((2, 0, 3), np.int8),
             np.array(3.5), np.array(["2026-12-06"], "datetime64[D]"),
             np.arange(6, dtype=np.int16).reshape(2, 3)]
    a.put(b"h", *parts)
    got = b.get(timeout=1)
    assert [bytes(p) for p in got[1:]] == [p.tobytes() for p in parts]
    del got
    b.release()


def test_records_are_fifo_across_many_wraps(pair):
    a, b = pair
    rng = random.Random(7)
    for i in range(5000):
        payload = rng.randbytes(rng.randrange(0, 1500))
        a.put(i.to_bytes(4, "little"), payload, timeout=1)
        parts = b.get(timeout=1)
        assert int.from_bytes(parts[0], "little") == i
        assert bytes(parts[1]) == payload
        del parts
        b.release()


def test_a_record_of_the_whole_capacity_passes_from_any_position(pair):
    a, b = pair
    big = (bytes(range(256)) * 16)[:a.max_record - 16]
    assert record_size(len(big)) == a.max_record
    for offset in (16, 1024, 4000):
        a.put(bytes(offset - 16))  # moves the write position
        b.get(timeout=1)
        b.release()
        # It needs a wrap marker and then the whole ring: the consumer must
        # skip the marker while the producer waits.
        producer = threading.Thread(target=a.put, args=(big,), kwargs={"timeout": 5})
        producer.start()
        assert bytes(b.get(timeout=5)[0]) == big
        b.release()
        producer.join()


def test_oversize_record_is_refused_and_writes_nothing(pair):
    a, b = pair
    with pytest.raises(RecordTooLarge):
        a.put(bytes(a.max_record))
    with pytest.raises(RecordTooLarge):
        a.try_put(b"h", *([b"x"] * 64))
    assert b.try_get() is None
    a.put(b"after")
    assert bytes(b.get(timeout=1)[0]) == b"after"
    b.release()


def test_try_put_when_full_and_try_get_when_empty(pair):
    a, b = pair
    assert b.try_get() is None
    n = 0
    while a.try_put(bytes(1000)):
        n += 1
    assert n == 4096 // record_size(1000)
    b.get(timeout=1)
    b.release()
    assert a.try_put(bytes(1000))


def test_timeouts_are_bounded(pair):
    a, b = pair
    t0 = time.monotonic()
    with pytest.raises(RingTimeout):
        b.get(timeout=0.05)
    with pytest.raises(TimeoutError):  # RingTimeout is also a TimeoutError
        b.get(timeout=0.0)
    while a.try_put(bytes(1000)):
        pass
    with pytest.raises(RingTimeout):
        a.put(bytes(1000), timeout=0.05)
    assert time.monotonic() - t0 < 1.0


def _runnable_s() -> float:
    """Seconds this thread has run or waited for a CPU to run on: a spinner
    wants one all along, however many other processes share the cores (its
    CPU time alone shrinks with them); a parked thread wants none."""
    with open("/proc/thread-self/schedstat") as f:
        ran, waited, _ = map(int, f.read().split())
    return (ran + waited) / 1e9


def test_a_waiter_spins_as_long_as_it_is_told_then_parks(pair):
    a, b = pair
    b.spin_us = 1e6  # longer than the wait: it wants a CPU until the timeout
    assert b.spin_us == 1e6
    runnable, t0 = _runnable_s(), time.monotonic()
    with pytest.raises(RingTimeout):
        b.get(timeout=0.2)
    # Most of the 0.2 s (a parked waiter wants ~0): a virtual machine's
    # stolen time counts as neither run nor waited (0.148 s seen once).
    # Unless it found its CPU taken twice meanwhile, and backed off.
    if b.backoffs == (0, 0):
        assert _runnable_s() - runnable > 0.1
    assert time.monotonic() - t0 < 0.9  # the timeout bounds the spin too
    b.spin_us = 0  # set from any thread; it parks at once from the next wait on
    runnable = _runnable_s()
    with pytest.raises(RingTimeout):
        b.get(timeout=0.2)
    assert _runnable_s() - runnable < 0.1  # its wake-ups, and the waits for a CPU after them
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            b.spin_us = bad
    assert b.spin_us == 0
    a.put(b"after")  # and a parked waiter is still woken
    assert bytes(b.get(timeout=5)[0]) == b"after"
    b.release()


@pytest.mark.parametrize("spin_us", [0.0, 300.0])
def test_a_get_says_when_its_wait_ended(pair, spin_us):
    """woke_ns: 0 for a record found at once; for one waited for, a stamp
    after it was put and before get() returned, parked or spinning."""
    a, b = pair
    b.spin_us = spin_us
    a.put(b"there")
    b.get(timeout=1)
    assert b.woke_ns == 0
    b.release()
    stamps = {}

    def put_later():
        time.sleep(0.05)
        stamps["put"] = time.monotonic_ns()
        a.put(b"later")

    putter = threading.Thread(target=put_later)
    putter.start()
    try:
        assert bytes(b.get(timeout=5)[0]) == b"later"
        returned = time.monotonic_ns()
    finally:
        putter.join()
    assert stamps["put"] <= b.woke_ns <= returned
    b.release()
    woke = b.woke_ns
    assert b.try_get() is None and b.woke_ns == woke  # only get() says


def test_records_got_together_are_released_together(pair):
    a, b = pair
    n = 0
    while a.try_put(b"%d" % n, bytes(300)):
        n += 1
    got = [b.get(timeout=1) for _ in range(n)]  # the whole ring, held at once
    assert [bytes(parts[0]) for parts in got] == [b"%d" % i for i in range(n)]
    assert b.try_get() is None
    with pytest.raises(Exception, match="before waiting"):
        b.get(timeout=1)
    assert not a.try_put(b"x", bytes(300))  # nothing was handed back yet
    del got
    b.release()
    assert b.held == 0
    assert a.try_put(b"x", bytes(300))
    assert bytes(b.get(timeout=1)[0]) == b"x"
    b.release()
    with pytest.raises(Exception, match="no record"):
        b.release()


def test_held_records_appear_together_at_a_publish_or_when_room_runs_out(pair):
    a, b = pair
    assert a.try_put(b"0", bytes(100), hold=True) and a.try_put(b"1", hold=True)
    assert b.try_get() is None  # written, not yet published
    a.publish()
    assert [bytes(b.get(timeout=1)[0]) for _ in range(2)] == [b"0", b"1"]
    b.release()
    a.publish()  # nothing held: nothing happens
    assert b.try_get() is None
    # A put without hold publishes those held before it, in order.
    a.try_put(b"2", hold=True)
    a.try_put(b"3")
    assert [bytes(b.get(timeout=1)[0]) for _ in range(2)] == [b"2", b"3"]
    b.release()
    # Held across the end of the data area: the wrap marker is held too.
    n = 0
    while a.try_put(b"%d" % n, bytes(300), hold=True):
        n += 1
    # The put that found no room published the rest: the consumer, the
    # only one who can make room, sees them all.
    got = [bytes(b.get(timeout=1)[0]) for _ in range(n)]
    assert got == [b"%d" % i for i in range(n)] and b.try_get() is None
    b.release()
    assert a.try_put(b"after", hold=True)
    a.publish()
    assert bytes(b.get(timeout=1)[0]) == b"after"
    b.release()


def test_records_held_behind_a_held_wrap_marker_are_read_past_it(pair):
    a, b = pair
    a.put(bytes(3000))  # the write position moves near the end of the data area
    b.get(timeout=1)
    b.release()
    assert record_size(3000) + record_size(1, 1100) > a.capacity  # the next one wraps
    assert a.try_put(b"x", bytes(1100), hold=True) and a.try_put(b"y", hold=True)
    assert b.try_get() is None  # the marker too is held
    a.publish()
    got = [b.get(timeout=1) for _ in range(2)]
    assert [bytes(parts[0]) for parts in got] == [b"x", b"y"] and len(got[0][1]) == 1100
    del got
    b.release()


def test_taken_counts_the_records_handed_out_as_both_sides_see_it(pair):
    # What a worker's front-end reads from a dead worker's ring: how many of
    # its records the consumer ever got (held or released, wrap markers
    # aside), so that the ones it never got are known.
    a, b = pair
    assert a.taken == b.taken == 0
    for i in range(12):  # sizes that wrap the 4 KiB ring several times
        a.put(b"h", bytes(700 + 90 * i), timeout=1)
        b.get(timeout=1)
        assert a.taken == b.taken == i + 1
        b.release()
    assert a.try_put(b"x", hold=True) and a.try_put(b"y")
    assert b.try_get() is not None and a.taken == 13  # one of the two got, held
    assert a.try_put(b"z")
    assert b.try_get() is not None and b.try_get() is not None and b.try_get() is None
    assert a.taken == b.taken == 15  # an empty ring counts nothing
    b.release()


def test_a_producer_that_closes_sends_what_it_held(pair):
    a, b = pair
    a.try_put(b"last", hold=True)
    a.close()
    assert bytes(b.get(timeout=1)[0]) == b"last"
    b.release()
    with pytest.raises(RingClosed):
        b.get(timeout=1)


def test_a_parked_consumer_wakes_at_the_publish_of_held_records(pair):
    a, b = pair
    a.try_put(b"held", hold=True)
    threading.Timer(0.1, a.publish).start()
    t0 = time.monotonic()
    assert bytes(b.get(timeout=5)[0]) == b"held"
    assert 0.05 < time.monotonic() - t0 < 2.0
    b.release()


def test_close_wakes_the_waiting_peer(pair):
    a, b = pair
    a.put(b"last")
    threading.Timer(0.1, a.close).start()
    assert bytes(b.get(timeout=2)[0]) == b"last"  # what was sent still arrives
    b.release()
    t0 = time.monotonic()
    with pytest.raises(RingClosed):
        b.get(timeout=5)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(WorkerDied):  # RingClosed is a WorkerDied
        b.get(timeout=0)


def test_implementations_share_one_layout():
    if NativeRing is None:
        pytest.skip("native ring not built")
    from mmengine import _ring, ring
    assert (_ring.HEADER_BYTES, _ring.MAX_PARTS, _ring.COPY_HEADER_BYTES) == (
        ring.HEADER_BYTES, ring.MAX_PARTS, ring.COPY_HEADER_BYTES)
    # ...and one back-off rule (ring.BackOff, mm_ring_preempted).
    assert (_ring.PREEMPTED_NS, _ring.TAKEN_SHARE, _ring.TURN_NS, _ring.CONTENDED_WITHIN,
            _ring.BACKOFF_NS, _ring.MAX_BACKOFF_NS) == (
                ring.PREEMPTED_NS, ring.TAKEN_SHARE, ring.TURN_NS, ring.CONTENDED_WITHIN,
                ring.BACKOFF_NS, ring.MAX_BACKOFF_NS)
    for Producer, Consumer in ((NativeRing, PyRing), (PyRing, NativeRing)):
        a = Producer.create(1024)
        b = Consumer.attach(a.handle)
        for i in range(300):
            a.put(b"h", bytes([i % 256]) * (i % 200), timeout=1)
            parts = b.get(timeout=1)
            assert bytes(parts[1]) == bytes([i % 256]) * (i % 200)
            del parts
            b.release()
        assert a.taken == b.taken == 300  # each reads the other's count
        b.close()
        a.close()


# A consumer of what a peer wrote into the shared segment, garbage in place
# of its records: each case writes (tail, head) and the words at a place of
# the data area; the consumer must say RingCorrupt, neither loop in C with
# the GIL held, nor read past the mapping, nor hand out a record twice.
_CORRUPT_CASES = {  # (a record of 24 bytes got and held first?, tail, head, at, words)
    "a wrap marker of 0 bytes": (False, 8, 0, 0, [0, 0xffffffff]),
    "a record of 0 bytes": (False, 8, 0, 0, [0, 1]),
    "a size not 8-aligned": (False, 16, 0, 0, [12, 1, 0]),
    "more bytes than published": (False, 16, 0, 0, [24, 1, 8]),
    "more parts than a record has": (False, 16, 0, 0, [16, 0x7fffffff]),
    "a part past the end of the ring": (False, 4096, 4080, 4080, [16, 1, 200]),
    "a wrap marker short of the end": (False, 4096, 4080, 4080, [8, 0xffffffff]),
    "a wrap marker from the start": (False, 4096, 0, 0, [4096, 0xffffffff]),
    "a tail past the capacity": (False, 8192, 0, 0, [24, 1, 8]),
    "a record over one held": (True, 24 + 4096, 0, 24, [24, 1, 8]),
}
_CORRUPT_SCRIPT = """
import struct, sys
from mmengine.errors import RingCorrupt
from mmengine.ring import NativeRing, PyRing, HEADER_BYTES
Ring = {"native": NativeRing, "py": PyRing}[sys.argv[1]]
for name, (held, tail, head, at, words) in %r.items():
    a = Ring.create(4096)
    b = Ring.attach(a.handle)
    if held:
        a.put(bytes(8))
        assert b.try_get() is not None
    m = a._seg.map
    struct.pack_into("<Q", m, 64, tail)
    struct.pack_into("<Q", m, 128, head)
    struct.pack_into(f"<{len(words)}I", m, HEADER_BYTES + at, *words)
    try:
        b.try_get()
        print(name, "read", flush=True)
    except RingCorrupt as e:
        # Nothing more is read, whatever comes: here, the ring made empty again.
        struct.pack_into("<Q", m, 64, head + 24 * held)
        try:
            b.try_get()
            print(name, "read after", flush=True)
        except RingCorrupt:
            print(name, "RingCorrupt", e, flush=True)
    b.close()
    a.close()
"""


def test_a_consumer_refuses_what_is_no_record_whatever_the_peer_wrote(Ring):
    # Before: the wrap marker of 0 bytes looped for ever in C, holding the
    # GIL; the record of 0 bytes was handed out again and again; a part
    # count or length past the ring read past the mapping (SIGBUS, or
    # another mapping's bytes handed out); a record over one held was
    # handed out, overwriting it.
    done = subprocess.run([sys.executable, "-c", _CORRUPT_SCRIPT % (_CORRUPT_CASES,),
                           _name(Ring)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    said = dict(line.split(" RingCorrupt ") for line in done.stdout.splitlines()
                if " RingCorrupt " in line)
    assert set(said) == set(_CORRUPT_CASES), done.stdout
    assert all(why == "get: the peer wrote what is no record" for why in said.values())


def test_parts_that_no_record_could_hold_are_refused_whole():
    # Four parts of 2**62 bytes summed to 0 (mod 2**64): the native put
    # (whose size this is) took them for a record of 48 bytes, and copied.
    if NativeRing is None:
        pytest.skip("native ring not built")
    ring = NativeRing.create(4096)
    try:
        for lengths in ([1 << 62] * 4, [1 << 32], [8, 16]):
            assert ring.record_size(*lengths) == record_size(*lengths)  # the twin's, exact
        assert record_size(*[1 << 62] * 4) == 8 + 16 + (1 << 64) > LARGEST_RECORD
    finally:
        ring.close()


def test_the_back_off_rule():
    from mmengine.ring import BACKOFF_NS, CONTENDED_WITHIN, MAX_BACKOFF_NS, BackOff

    b = BackOff()
    assert b.spins(0)
    assert not b.preempted(1)  # its CPU taken once: a blip, it spins on
    for _ in range(CONTENDED_WITHIN):
        assert b.spins(2)
    assert not b.preempted(3)  # again, CONTENDED_WITHIN spinning waits later: a blip still
    assert b.spins(4)
    assert b.preempted(5)  # again within them: contended
    assert (b.count, b.length, b.spin_from) == (1, BACKOFF_NS, 5 + BACKOFF_NS)
    assert not b.spins(5 + BACKOFF_NS - 1)  # backing off: waits do not spin, nor count
    assert b.spun == CONTENDED_WITHIN + 2
    lengths, now = [], b.spin_from
    while len(lengths) < 8:  # taken again as each back-off ends: twice as long, up to the most
        assert b.spins(now) and b.preempted(now)
        lengths.append(b.length)
        now = b.spin_from
    assert lengths == [min(BACKOFF_NS << i, MAX_BACKOFF_NS) for i in range(1, 9)]
    assert lengths[-1] == MAX_BACKOFF_NS
    later = now + b.length  # taken again only a back-off's length after one ended
    assert b.spins(later) and b.preempted(later)
    assert (b.length, b.count) == (BACKOFF_NS, 10)


def _spin_beside_a_hog(impl, handle, cpu, queue):
    os.sched_setaffinity(0, {cpu})
    ring = _impl(impl).attach(handle)
    ring.spin_us = 1e5  # a spinner: 100 ms, longer than each wait
    for _ in range(40):  # 2 s at most
        with contextlib.suppress(RingTimeout):
            ring.get(timeout=0.05)
        if ring.backoffs[0]:
            break
    queue.put("waited")
    parts = ring.get(timeout=30)  # backing off, it sleeps: the record wakes it
    queue.put(bytes(parts[0]))


def test_a_spinning_waiter_whose_cpu_another_process_takes_backs_off_and_says_so(Ring):
    # Spinning beside a busy process, a waiter is runnable but never woken:
    # its record waits for the other's time slice (4 ms, where an answer
    # takes 50 us). Found so twice, it sleeps instead, and says so in the
    # header, where its peer reads it.
    cpu = max(os.sched_getaffinity(0))
    ring = Ring.create(4096)
    queue = SPAWN.Queue()
    child = SPAWN.Process(target=_spin_beside_a_hog, args=(_name(Ring), ring.handle, cpu, queue))
    try:
        with busy_process(cpu):
            child.start()
            assert queue.get(timeout=60) == "waited"
            consumer, producer = ring.backoffs
            assert consumer >= 1 and producer == 0
            ring.put(b"wake")
            assert queue.get(timeout=30) == b"wake"
            child.join(30)
            assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        ring.close()


def test_waits_for_a_cpu_that_are_a_small_share_of_a_long_while_are_no_contention(pair):
    # Between two looks seconds apart, the waits of the turns a thread woke
    # for meanwhile add up to a millisecond: a front-end serving a request
    # a second found its CPU "taken" at most of them and stopped polling for
    # its answers (session 46). What counts is their share of the while.
    if not os.path.exists("/proc/thread-self/schedstat"):
        pytest.skip("the kernel keeps no scheduler statistics")
    _, consumer = pair
    consumer.spin_us = 1000
    cpu, before = max(os.sched_getaffinity(0)), os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpu})
        for _ in range(3):  # a look, then two more with the same waits behind each
            with pytest.raises(RingTimeout):
                consumer.get(timeout=0.002)
            with busy_process(cpu):
                time.sleep(0.1)  # the other runs (started, pinned)
                end = time.monotonic() + 0.03  # ~15 ms of it waiting for the CPU
                while time.monotonic() < end:
                    pass
            time.sleep(1.0)
        assert consumer.backoffs == (0, 0)
    finally:
        os.sched_setaffinity(0, before)


@pytest.fixture
def one_cpu():
    """The test's thread on one CPU (the last), given back after; skipped
    where the kernel keeps no scheduler statistics (CpuTaken reads them)."""
    if not os.path.exists("/proc/thread-self/schedstat"):
        pytest.skip("the kernel keeps no scheduler statistics")
    cpu, before = max(os.sched_getaffinity(0)), os.sched_getaffinity(0)
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def test_a_poller_looks_whether_its_cpu_was_taken_since_it_last_looked(one_cpu):
    # The front-end polls rather than waits (workers._poll_answers): it
    # looks for itself. Beside a busy process on its CPU, 50 ms of work is
    # runnable all along, and off its CPU for the other's time slices.
    taken = CpuTaken()
    assert not taken.look()  # its first look: nothing to compare
    os.sched_setaffinity(0, {one_cpu})
    with busy_process(one_cpu):
        time.sleep(0.1)  # the other runs (started, pinned)
        taken.look()
        end = time.monotonic() + 0.05
        while time.monotonic() < end:
            pass
        assert taken.look()


# A peer that takes short turns on the CPU: 40 us of work each time it is
# woken, by a byte on a pipe (all the bytes come: one turn however many) or
# at the end of a 20 us sleep (`paced`: some 60-80 us on these machines).
SHORT_TURNS = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
r, paced = int(sys.argv[2]), sys.argv[3] == "paced"
while paced or os.read(r, 4096):
    if paced:
        time.sleep(20e-6)
    end = time.perf_counter_ns() + 40_000
    while time.perf_counter_ns() < end:
        pass
"""


@contextlib.contextmanager
def short_turns(cpu: int, paced: bool = False):
    """A process on `cpu` that takes short turns, woken by a byte written
    to the pipe it yields (paced: by its own sleeps)."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", SHORT_TURNS, str(cpu), str(r),
                             "paced" if paced else "woken"], pass_fds=(r,))
    os.close(r)
    try:
        time.sleep(0.3)  # started, pinned
        yield w
    finally:
        proc.kill()
        proc.wait()
        os.close(w)


def _short_turns_taken_a_share(waited: int, got_back: int, elapsed: int) -> None:
    """Skips the test where the peer's turns were not what the rule before
    TURN_NS took for a neighbour's (a millisecond and a quarter of the
    time: a scheduler that does not run a woken peer at once), or were not
    short: it told nothing apart then."""
    if not (waited >= PREEMPTED_NS and waited * TAKEN_SHARE >= elapsed
            and waited < TURN_NS * got_back):
        pytest.skip(f"the peer's turns here: {waited / 1e6:.1f} ms of {elapsed / 1e6:.0f} "
                    f"in {got_back} turns")


def _waited() -> tuple[int, int]:
    _, runq, slices = open("/proc/thread-self/schedstat").read().split()[:3]
    return int(runq), int(slices)


def test_a_poller_beside_a_peer_it_wakes_for_short_turns_is_not_taken(one_cpu):
    # A client beside a polling front-end: answered, it runs at once (the
    # kernel runs a woken sleeper first) for 10-20 us. Its turns took a
    # quarter of the front-end's time or more, which then backed off and
    # slept for 50 ms to 1 s, each of its answers paying a CPU's wake-up
    # (session 56: SDK calls of 57-59 us against 44 us). What tells a busy
    # neighbour's time slices from those turns is their length.
    taken = CpuTaken()
    os.sched_setaffinity(0, {one_cpu})
    with short_turns(one_cpu) as wake:
        taken.look()
        runq, slices = _waited()
        t0 = time.monotonic_ns()
        while time.monotonic_ns() - t0 < 100_000_000:  # 100 ms of answers
            os.write(wake, b"x")
            end = time.perf_counter_ns() + 40_000
            while time.perf_counter_ns() < end:
                pass
        waited, got_back = (a - b for a, b in zip(_waited(), (runq, slices)))
        elapsed = time.monotonic_ns() - t0
        _short_turns_taken_a_share(waited, got_back, elapsed)
        assert not taken.look()


def _spin_beside_short_turns(impl, handle, cpu, queue):
    os.sched_setaffinity(0, {cpu})
    ring = _impl(impl).attach(handle)
    ring.spin_us = 1e5  # a spinner: 100 ms, longer than each wait
    before, t0 = _waited(), time.monotonic_ns()
    for _ in range(20):  # 1 s
        with contextlib.suppress(RingTimeout):
            ring.get(timeout=0.05)
    waited, got_back = (a - b for a, b in zip(_waited(), before))
    queue.put((ring.backoffs, waited, got_back, time.monotonic_ns() - t0))


def test_a_spinning_waiter_beside_a_peer_that_takes_short_turns_spins_on(Ring, one_cpu):
    # As a worker beside its client (the scheduler's other placement): the
    # turns take a third of its waits, but none is a time slice.
    cpu = one_cpu  # (the waiter's, in its own process)
    ring = Ring.create(4096)
    queue = SPAWN.Queue()
    child = SPAWN.Process(target=_spin_beside_short_turns,
                          args=(_name(Ring), ring.handle, cpu, queue))
    try:
        with short_turns(cpu, paced=True):
            child.start()
            backoffs, waited, got_back, elapsed = queue.get(timeout=60)
            # First: backing off, it waits less, and the turns' share would
            # say so (a skip would hide the back-offs).
            assert backoffs == (0, 0), (backoffs, waited, got_back, elapsed)
            _short_turns_taken_a_share(waited, got_back, elapsed)
            child.join(30)
            assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        ring.close()


def test_where_a_socket_took_in_its_last_segment_and_this_thread_runs_twins_agree():
    # The TCP server's linger compares the two (server/tcp.py): over
    # loopback a segment is taken in on its sender's CPU.
    if NativeRing is None:
        pytest.skip("native ring not built")
    from mmengine import ring

    cpu, before = max(os.sched_getaffinity(0)), os.sched_getaffinity(0)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    r, w = os.pipe()
    try:
        os.sched_setaffinity(0, {cpu})
        client.sendall(b"x")
        assert server.recv(1) == b"x"
        fd = server.fileno()
        assert ring._native_incoming_cpu(fd) == ring._py_incoming_cpu(fd) == cpu
        assert ring._native_this_cpu() == ring._py_this_cpu() == cpu
        for not_a_socket in (r, -1):
            assert ring._native_incoming_cpu(not_a_socket) == -1
            assert ring._py_incoming_cpu(not_a_socket) == -1
    finally:
        os.sched_setaffinity(0, before)
        for sock in (client, server, listener):
            sock.close()
        os.close(r)
        os.close(w)


def _publish_from(handle, cpu):
    os.sched_setaffinity(0, {cpu})
    ring = NativeRing.attach(handle)
    ring.put(b"from cpu %d" % cpu, timeout=5)


def test_each_side_says_in_the_header_which_cpu_it_last_ran_on():
    # Where a ring's two processes share one CPU, a waiter spinning for the
    # other only holds it off: each side writes 1 + its CPU beside its
    # counter (ring.py's layout), and a waiter on that CPU yields at once.
    if NativeRing is None:
        pytest.skip("native ring not built")
    import struct

    cpus, before = sorted(os.sched_getaffinity(0)), os.sched_getaffinity(0)
    ring = NativeRing.create(4096)
    header = PyRing.attach(ring.handle)  # the twin maps the same bytes
    producer_cpu, consumer_cpu = (lambda: struct.unpack_from("<I", header._seg.map, 72)[0],
                                  lambda: struct.unpack_from("<I", header._seg.map, 136)[0])
    try:
        assert (producer_cpu(), consumer_cpu()) == (0, 0)  # nothing yet: not known
        os.sched_setaffinity(0, {cpus[0]})
        for cpu in dict.fromkeys((cpus[-1], cpus[0])):  # one CPU: only once
            child = SPAWN.Process(target=_publish_from, args=(ring.handle, cpu))
            child.start()
            child.join(60)
            assert bytes(ring.get(timeout=5)[0]) == b"from cpu %d" % cpu
            ring.release()
            assert (producer_cpu(), consumer_cpu()) == (cpu + 1, cpus[0] + 1)
    finally:
        os.sched_setaffinity(0, before)
        header.close()
        ring.close()


def test_only_the_creator_unlinks(Ring):
    a = Ring.create(1024)
    path = os.path.join(shm.SHM_DIR, a.name)
    b = Ring.attach(a.handle)
    b.close()
    assert os.path.exists(path)
    a.close()
    assert not os.path.exists(path)


def test_forgotten_ring_is_finalized(Ring):
    a = Ring.create(1024)
    path = os.path.join(shm.SHM_DIR, a.name)
    del a
    assert not os.path.exists(path)


def test_asyncio_consumer_awaits_the_eventfd(Ring):
    """The front-end's way: loop.add_reader on readable_fd, no thread."""
    import uvloop

    a = Ring.create(4096)
    b = Ring.attach(a.handle)
    got = []

    async def consume(n):
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_readable():
            b.disarm_read()
            while True:
                parts = b.try_get()
                if parts is None:
                    if b.arm_read():
                        return  # sleep until the producer signals
                    continue
                got.append(bytes(parts[0]))
                del parts
                b.release()
                if len(got) == n and not done.done():
                    done.set_result(None)

        loop.add_reader(b.readable_fd, on_readable)
        assert b.arm_read()
        producer = threading.Thread(target=lambda: [
            (a.put(b"%d" % i, timeout=5), time.sleep(0.001 if i % 50 == 0 else 0))
            for i in range(n)])
        producer.start()
        await asyncio.wait_for(done, 10)
        loop.remove_reader(b.readable_fd)
        producer.join()

    uvloop.run(consume(500))
    assert got == [b"%d" % i for i in range(500)]
    b.close()
    a.close()


# -- between processes ----------------------------------------------------

def _stress_plan(seed, max_record):
    """The same (record, parts) sequence on both sides of the stress test."""
    rng = random.Random(seed)
    blob = rng.randbytes(2 * max_record)
    while True:
        nparts = rng.choice((1, 1, 1, 2, 3))
        room = max_record - record_size(*([0] * (nparts + 1))) - 8 * (nparts + 1)
        lens = [rng.randrange(0, room + 1)]
        for _ in range(nparts - 1):
            lens.append(rng.randrange(0, max(1, room - sum(lens))))
        offs = [rng.randrange(0, len(blob) - n + 1) for n in lens]
        yield blob, lens, offs


def _stress_producer(impl, handle, seed, count):
    ring = _impl(impl).attach(handle)
    view = None
    plan = _stress_plan(seed, ring.max_record)
    for i in range(count):
        blob, lens, offs = next(plan)
        view = view or memoryview(blob)
        parts = [view[o:o + n] for o, n in zip(offs, lens)]
        crc = 0
        for p in parts:
            crc = zlib.crc32(p, crc)
        ring.put(i.to_bytes(8, "little") + crc.to_bytes(4, "little"), *parts, timeout=30)
    ring.close()


def test_cross_process_stress(Ring):
    seed = int(os.environ.get("MMENGINE_TEST_SEED", random.randrange(1 << 30)))
    print(f"ring stress seed={seed} impl={_name(Ring)}")  # pytest shows it on failure
    count = STRESS_RECORDS
    ring = Ring.create(4096)
    child = SPAWN.Process(target=_stress_producer, args=(_name(Ring), ring.handle, seed, count))
    child.start()
    plan = _stress_plan(seed, ring.max_record)
    batching = random.Random(seed + 1)  # sometimes hold several records at once
    wraps = 0
    used = 0
    for i in range(count):
        blob, lens, offs = next(plan)
        parts = ring.try_get()
        if parts is None:
            if ring.held:
                ring.release()  # never wait while holding
            parts = ring.get(timeout=30)
        assert int.from_bytes(parts[0][:8], "little") == i
        assert [len(p) for p in parts[1:]] == lens
        crc = 0
        for p in parts[1:]:
            crc = zlib.crc32(p, crc)
        assert crc == int.from_bytes(parts[0][8:12], "little")
        size = record_size(12, *lens)
        if used % ring.capacity + size > ring.capacity:
            wraps += 1
        used += size
        del parts
        if batching.random() < 0.5:
            ring.release()
    if ring.held:
        ring.release()
    with pytest.raises(RingClosed):
        ring.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    assert wraps > 10_000
    ring.close()


def _sleep_attached(impl, handle):
    _impl(impl).attach(handle)
    time.sleep(60)


@pytest.mark.parametrize("waiter", ["consumer", "producer"])
def test_peer_killed_while_the_other_waits(Ring, waiter):
    ring = Ring.create(4096)
    child = SPAWN.Process(target=_sleep_attached, args=(_name(Ring), ring.handle))
    child.start()
    deadline = time.monotonic() + 30
    while ring._peer_pid() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if waiter == "producer":
        while ring.try_put(bytes(100)):  # the child never reads: fill it
            pass
    threading.Timer(0.3, os.kill, (child.pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(PeerDied):
        if waiter == "consumer":
            ring.get(timeout=20)
        else:
            ring.put(bytes(100), timeout=20)
    assert time.monotonic() - t0 < 2.0
    child.join(5)
    ring.close()


def _attach_late(impl, handle):
    time.sleep(0.5)  # the creator is waiting by then
    _sleep_attached(impl, handle)


def test_a_wait_begun_before_the_peer_attached_hears_of_its_death(Ring):
    # The wait looked for the peer's pidfd once, when it began: there was
    # none yet, and a peer that attached and died then went unnoticed (a
    # wait with no timeout waited for good).
    ring = Ring.create(4096)
    child = SPAWN.Process(target=_attach_late, args=(_name(Ring), ring.handle))
    child.start()

    def kill_once_attached():
        deadline = time.monotonic() + 30
        while ring._peer_pid() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)

    threading.Thread(target=kill_once_attached, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(PeerDied):
        ring.get(timeout=20)
    assert time.monotonic() - t0 < 10
    child.join(5)
    ring.close()


def test_waits_of_any_length_and_no_nan(pair):
    a, b = pair
    a.put(b"x")
    assert bytes(b.get(timeout=float("inf"))[0]) == b"x"
    b.release()
    a.put(b"y")
    assert bytes(b.get(timeout=1e300)[0]) == b"y"
    b.release()
    with pytest.raises(ValueError, match="timeout"):
        b.get(timeout=float("nan"))
    with pytest.raises(ValueError, match="spin_us"):
        type(a).create(4096, spin_us=-1.0)
    assert a.max_record == a.capacity  # a ring under 4 GiB holds records of its size


def _create_and_hang(impl, queue):
    ring = _impl(impl).create(1024)
    queue.put(ring.name)
    time.sleep(60)


def test_segments_of_a_killed_creator_are_reclaimed(Ring):
    queue = SPAWN.Queue()
    child = SPAWN.Process(target=_create_and_hang, args=(_name(Ring), queue))
    child.start()
    name = queue.get(timeout=30)
    assert name in shm.list_segments()
    os.kill(child.pid, signal.SIGKILL)
    child.join(5)
    assert name in shm.list_segments()  # SIGKILL gave it no chance to clean up
    assert name in shm.reclaim_orphans()
    assert name not in shm.list_segments()


def _shm_file(name: str) -> str:
    path = os.path.join(shm.SHM_DIR, name)
    with open(path, "wb"):
        pass
    return path


def test_segments_of_an_earlier_process_of_the_same_pid_are_reclaimed():
    # A container's server is pid 1 at every restart: its predecessor's
    # segments (270 MB a crash) looked like its own and were never reclaimed.
    mine = shm.Segment.create(4096, "test")
    life = shm.life()
    assert life is not None and mine.name.endswith(f"~{life}")
    pid = os.getpid()
    # The predecessor's life file, left unlocked by its death, and a segment
    # named before lives were (judged by its start time).
    earlier = f"{shm.PREFIX}{pid}-test-0123456789ab~{'0' * 16}"
    start = shm.start_of(pid)
    older = f"{shm.PREFIX}{pid}-test-ba9876543210.{int(start) - 1}"
    made = [_shm_file(n) for n in (earlier, older, shm.LIFE_PREFIX + "0" * 16)]
    try:
        reclaimed = shm.reclaim_orphans()
        assert {earlier, older} <= set(reclaimed) and mine.name not in reclaimed
        assert mine.name in shm.list_segments() and not any(map(os.path.exists, made))
    finally:
        mine.close()
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def test_a_live_creator_whose_pid_means_nothing_here_keeps_its_segments():
    # /dev/shm shared by servers in other pid namespaces: a segment's pid is
    # none of ours (or is one of ours), but its creator lives, and holds its
    # life's lock. Before, a server that looked the pid up removed the
    # segments of its running neighbours.
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that runs nothing here
    token = "f" * 16
    life_path = os.path.join(shm.SHM_DIR, shm.LIFE_PREFIX + token)
    theirs = f"{shm.PREFIX}{gone.pid}-ring-0123456789ab~{token}"
    alive = os.open(life_path, os.O_CREAT | os.O_RDWR, 0o600)  # its own open file: its lock
    made = [_shm_file(theirs), life_path]
    try:
        fcntl.flock(alive, fcntl.LOCK_SH)
        assert theirs not in shm.reclaim_orphans()
        assert theirs in shm.list_segments() and os.path.exists(life_path)
        os.close(alive)  # the neighbour ends
        alive = None
        assert theirs in shm.reclaim_orphans()
        assert not any(map(os.path.exists, made))
    finally:
        if alive is not None:
            os.close(alive)
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def test_a_fifo_named_as_a_life_file_holds_no_reclaim():
    # /dev/shm is anyone's to write in: a FIFO where a life file would be
    # held the reclaim's open (and every engine's start) for ever.
    fifo = os.path.join(shm.SHM_DIR, shm.LIFE_PREFIX + "e" * 16)
    segment = _shm_file(f"{shm.PREFIX}1-ring-0123456789ab~{'e' * 16}")
    os.mkfifo(fifo, 0o600)
    try:
        done = threading.Event()
        threading.Thread(target=lambda: (shm.reclaim_orphans(), done.set()),
                         daemon=True).start()
        assert done.wait(10)
        assert os.path.exists(segment)  # no life file of ours: not judged dead
    finally:
        for path in (fifo, segment):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def test_a_forked_child_has_a_life_of_its_own():
    mine = shm.Segment.create(4096, "test")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a segment of its own, then an end with no clean-up
        try:
            os.write(write, shm.Segment.create(4096, "test").name.encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        theirs = os.read(read, 200).decode()
        os.waitpid(pid, 0)
        assert theirs.rpartition("~")[2] != mine.name.rpartition("~")[2]
        reclaimed = shm.reclaim_orphans()
        assert theirs in reclaimed and mine.name not in reclaimed
    finally:
        os.close(read)
        mine.close()


def _park_then_receive(impl, handle, queue):
    ring = _impl(impl).attach(handle)
    queue.put("parked")
    parts = ring.get(timeout=30)
    queue.put(bytes(parts[0]))


def test_a_parked_consumer_costs_no_cpu(Ring):
    import psutil

    ring = Ring.create(4096)
    queue = SPAWN.Queue()
    child = SPAWN.Process(target=_park_then_receive, args=(_name(Ring), ring.handle, queue))
    child.start()
    assert queue.get(timeout=30) == "parked"
    time.sleep(0.2)
    proc = psutil.Process(child.pid)
    before = sum(proc.cpu_times()[:2])
    time.sleep(1.0)
    used = sum(proc.cpu_times()[:2]) - before
    ring.put(b"wake")
    assert queue.get(timeout=10) == b"wake"
    child.join(10)
    assert used < 0.05, f"a parked consumer used {used:.3f} s of CPU in 1 s"
    ring.close()


def test_a_consumer_parked_for_long_wakes_at_the_put_not_at_its_next_poll(pair):
    # PyRing's polls while parked grow to 200 ms apart: a put must wake the
    # consumer through its eventfd at once, not leave it to the next poll.
    producer, consumer = pair
    for _ in range(3):
        woke = []

        def consume():
            parts = consumer.get(timeout=10)
            woke.append((time.monotonic(), bytes(parts[0])))
            consumer.release()

        thread = threading.Thread(target=consume)
        thread.start()
        time.sleep(1.0)
        put_at = time.monotonic()
        producer.put(b"wake")
        thread.join(10)
        assert woke and woke[0][1] == b"wake"
        assert woke[0][0] - put_at < 0.05, f"woke {woke[0][0] - put_at:.3f} s after the put"


def test_a_signal_during_a_wait_runs_its_handler_and_the_wait_goes_on(pair):
    _, b = pair
    caught = []
    old = signal.signal(signal.SIGUSR1, lambda *_: caught.append(1))
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        t0 = time.monotonic()
        with pytest.raises(RingTimeout):
            b.get(timeout=0.6)
        assert time.monotonic() - t0 >= 0.55  # one deadline, not restarted
        assert caught == [1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def _closed_by_a_handler(ring: str, wait: str) -> float:
    """Runs, in a process of its own, a `wait` ("get" or "put") of 5 s on
    the ring that `ring` makes (of NativeRing or PyRing), which a SIGALRM
    handler closes 0.3 s in; checks that the wait ended saying so, and
    returns the seconds the process took."""
    code = (
        "import signal, sys\n"
        "from mmengine.ring import NativeRing, PyRing\n"
        f"r = {ring}\n"
        "peer = type(r).attach(r.handle)\n"
        "if sys.argv[1] == 'put':\n"
        "    r.put(bytes(40))  # full: the next put waits for room\n"
        "signal.signal(signal.SIGALRM, lambda *_: r.close())\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.3)\n"
        "try:\n"
        "    r.get(timeout=5) if sys.argv[1] == 'get' else r.put(bytes(40), timeout=5)\n"
        "except ValueError as e:\n"
        "    print(e)\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, wait], capture_output=True, text=True,
                         timeout=60, env=environ())
    assert (out.returncode, out.stdout.strip()) == (0, "ring is closed"), out.stderr
    return time.monotonic() - t0


@pytest.mark.parametrize("wait", ["get", "put"])
def test_a_signal_handler_that_closes_the_ring_ends_the_wait_without_touching_it(Ring, wait):
    # The native wait went on after the handler, on the mapping the close
    # had unmapped: SIGSEGV (a review's finding). Apart: a crash is the
    # process's.
    _closed_by_a_handler(f"{Ring.__name__}.create(64)", wait)


@pytest.mark.parametrize("wait", ["get", "put"])
def test_a_signal_that_comes_as_the_py_ring_spins_is_handled_in_the_wait(wait):
    # Compiled, PyRing's wait runs no bytecode: a signal that came between
    # two polls (here, in a long spin) was handled only as the wait timed
    # out, and one that closed the ring mid-spin read as a released view.
    assert _closed_by_a_handler("PyRing.create(64, spin_us=2_000_000)", wait) < 4.5


def test_a_segment_without_room_fails_at_creation_saying_so():
    # Every page is allocated when a ring is made: a /dev/shm too small (a
    # container's 64 MiB) fails there with a message, not later with a
    # SIGBUS where a page is first touched. A file size limit stands in
    # for a small /dev/shm; the process runs apart, as the limit is its own.
    code = (
        "import os, resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "from mmengine.ring import Ring\n"
        "try:\n"
        "    Ring.create(4 << 20)\n"
        "except OSError as e:\n"
        "    print(e)\n"
        "print(sorted(f for f in os.listdir('/dev/shm') if f'-{os.getpid()}-' in f))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=environ())
    assert out.returncode == 0, out.stderr
    message, left = out.stdout.splitlines()
    assert "no room for a shared-memory segment" in message and "ring_bytes" in message
    assert left == "[]"


def test_tensors_past_a_records_parts_share_one_and_bad_places_are_refused():
    from mmengine import messages
    from mmengine.errors import BadRequest
    from mmengine.ring import MAX_PARTS

    arrays = {f"t{i}": np.full(i % 7, i, np.int16 if i % 2 else np.float64)
              for i in range(MAX_PARTS + 10)}
    descs, bufs = messages.describe(arrays)
    assert len(bufs) == MAX_PARTS - 1  # with the header: a record's parts
    got = messages.view(descs, [memoryview(b).cast("B") for b in bufs])
    assert list(got) == list(arrays)
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and np.array_equal(got[name], a), name
    # A record's places are the sender's word: out of range is refused, typed.
    for place in ([99, 0], [-1, 1 << 40], [0, -8]):
        bad = [d[:3] + place if i == 0 else d for i, d in enumerate(descs)]
        with pytest.raises(BadRequest, match="t0"):
            messages.view(bad, bufs)


@pytest.mark.parametrize("ring_bytes, largest", [
    (3 * MiB, 4 * MiB),  # a ring's capacity is a power of two
    (4 * GiB, LARGEST_RECORD),
    (64 * GiB, LARGEST_RECORD),  # a record's size is 32 bits, however large the ring
])
def test_the_largest_request_is_what_one_record_of_the_ring_can_hold(ring_bytes, largest):
    # Past it, a body was read whole and then refused by the ring.
    assert Config(ring_bytes=ring_bytes).max_request_bytes == largest
