"""Single-producer single-consumer rings of records in shared memory.

The front-end and each worker talk through two rings, one per direction.
A ring is one shared-memory segment (mmengine.shm) plus two eventfds::

    offset  size  field             written by
    ------  ----  ----------------  -----------------------------------------
         0     8  magic "MMMRIG01"  creator, once
         8     4  version (1)       creator, once
        12     1  creator closed    creator, when it closes its end (1)
        13     1  attacher closed   attacher, when it closes its end (1)
        16     8  capacity          creator, once; a power of two, >= 64
        24     4  creator_pid       creator, once
        28     4  attacher_pid      attacher, when it attaches
        64     8  tail              producer: bytes ever published  (line 1)
        72     4  producer_cpu      producer: 1 + its CPU at its last publish (*)
       128     8  head              consumer: bytes ever released   (line 2)
       136     4  consumer_cpu      consumer: 1 + its CPU at its last release (*)
       144     8  taken             consumer: records ever got (wrap markers aside)
       192     4  consumer_parked   consumer: 1 while it sleeps     (line 3)
       196     4  consumer_backoffs consumer: its back-offs (**)
       256     4  producer_parked   producer: 1 while it sleeps     (line 4)
       260     4  producer_backoffs producer: its back-offs (**)
      4096   cap  data area         records, at offset (counter % capacity)

(*) 0: not known. A hint for a waiter: where the other side last ran on
the waiter's own CPU, spinning only holds it off, so the waiter yields at
once (the two processes of a ring share one core on a small machine, or
where the scheduler puts them so). This twin writes none: Python cannot
ask which CPU it runs on.

(**) How many times that side, spinning, backed off (BackOff): counted
where the other side can read it (`backoffs`), modulo 2**32.

tail and head only grow; tail - head is the bytes in use. Each record is
8-byte aligned and never wraps around the end of the data area::

    u32 size      the whole record in bytes, padding included
    u32 nparts    number of parts, or 0xffffffff for a wrap marker
    u32 len[n]    each part's length, then padding to 8 bytes
    part 0        the header (msgpack, written by the caller), padded to 8
    part 1..n-1   payload buffers (tensor bytes), each padded to 8

A record that does not fit before the end of the data area is preceded by a
wrap marker whose size is the rest of the area; the consumer skips it. The
marker is published with its record, or on its own when the record then
finds no room, so a record as large as the whole capacity always makes
progress. A record larger than the capacity, or with more than 64 parts,
raises RecordTooLarge and writes nothing. The consumer reads nothing it has
not checked: a size, a part or a tail outside what was published or past
the data area (a peer that writes garbage: a bug, a native library run amok
in a worker) raises RingCorrupt, and the ring is not read on; the parts'
lengths are read from the segment once, as checked.

Publication order: the producer writes the record's bytes, then stores tail
with release semantics; the consumer loads tail with acquire semantics before
it reads, and stores head (release) when it releases the record. A put with
`hold` writes its record but stores no tail: the records so held appear to
the consumer at once, at publish(), close(), or the next put without hold
that writes its record (a sender's requests that the worker should take
together: none is read before the last is in). A put that finds no room
publishes what is held first, since only the consumer, reading it, can make
the room. A record
returned by get() is a list of its parts: memoryviews into the segment, so
that tensors are viewed in place, never copied out, except that the first
part (a message's header) comes as bytes when it is at most
COPY_HEADER_BYTES: copying that little costs less than making a view of it.
Only the header: a tensor part stays a view, writable where the mapping is,
and never a bytes object that something could write through. A consumer may
get several records before it releases; release() hands back the space of all
of them at once, and their views are valid until then. A blocking get() must
not wait while records are held (the producer may need exactly their space):
it raises.

Waking: a waiting side spins for `spin_us`, then stores its parked flag,
fences, re-checks, and sleeps on its eventfd (data_fd for the consumer,
space_fd for the producer). The other side writes the eventfd only when the
flag is set, so a busy ring makes no system call per record. A waiter that
waited for a CPU, runnable, for PREEMPTED_NS and a TAKEN_SHARE-th of the
time since its last wait began, in turns of TURN_NS or more on average
(CpuTaken), twice within CONTENDED_WITHIN
spinning waits, shares the CPU with another busy process: it sleeps without
spinning for a while
(BackOff). Spinning on, it would be runnable but never woken when its
record came, and wait for that process's time slice to end
(milliseconds), where the kernel runs a woken sleeper ahead of a busy
process at once. An asyncio
consumer gives `readable_fd` to loop.add_reader and calls arm_read() before it
returns to the loop, disarm_read() when the reader fires. A blocking wait also
polls a pidfd of the peer process, so a peer that dies (SIGKILL included)
raises PeerDied at once rather than leaving the waiter hanging. `woke_ns`
is when the last get()'s wait ended (time.monotonic_ns(); the native ring
takes it before the GIL is taken back), 0 if it found its record at once:
a waiter's wake-up and its wait for the GIL can then be told apart. A
native waiter can be given work to do between its looks (help_reads: a CPU
worker's serving thread reads its load's parts, csrc/readjob.h): it works
instead of spinning while there is work, and its wait keeps its timeout.

Ownership: only the creator unlinks the segment (at close, or through a
finalizer); a creator that died is reclaimed by the next process that creates
a segment (mmengine.shm.reclaim_orphans). A RingHandle pickles into a spawned
child with its eventfds duplicated for it (multiprocessing's DupFd).

Two implementations share this layout and this API and may even talk to each
other: NativeRing (csrc/ring.h, C11 atomics) and PyRing, its pure-Python twin
and the test oracle. MMENGINE_PURE_PYTHON=1 selects PyRing as `Ring`.
"""
from __future__ import annotations

import ctypes
import os
import select
import socket
import struct
import threading
import time
import weakref
from multiprocessing import reduction

from mmengine import config, shm
from mmengine.errors import (InternalError, PeerDied, RecordTooLarge, RingClosed,
                             RingCorrupt, RingTimeout)

HEADER_BYTES = 4096
MAX_PARTS = 64
# A wait this long or longer (inf included) waits for good: the native
# ring counts its deadline in int64 nanoseconds.
LONGEST_WAIT_S = 1e9
# A record's size is a 32-bit field (csrc/ring.h): a ring over 4 GiB holds
# no larger one.
LARGEST_RECORD = 0xFFFFFFF8
COPY_HEADER_BYTES = 256  # csrc/ring.pyx has the same
CONTROL_BYTES = 1 << 16  # a worker's control ring: loads and unloads, small headers only
MAGIC = 0x31304752494D4D4D
VERSION = 1
WRAP = 0xFFFFFFFF


def rounded_capacity(asked: int) -> int:
    """The data area of a ring made for `asked` bytes: the power of two at
    or above it (a position is then a mask away)."""
    return 1 << (asked - 1).bit_length()


def segment_bytes(asked: int) -> int:
    """The shared memory a ring made for `asked` bytes takes."""
    return HEADER_BYTES + rounded_capacity(asked)


# The two closed bytes read as one little-endian u32 (each side writes only
# its own byte, so closing needs no read-modify-write).
CREATOR_CLOSED = 0x1
ATTACHER_CLOSED = 0x100
MIN_CAPACITY = 64
# Waiting for a record while holding others could wait forever: the
# producer may need exactly their space.
_WAIT_HOLDING = "get: release() the records you hold before waiting for more"
DEFAULT_SPIN_US = 50.0
MAX_SPIN_US = 3.6e9  # an hour: spins are bounded (csrc/ring.pyx has the same)
# PyRing's polls while parked: 5 ms after the flag goes up (a wake-up missed
# then costs no more; see _wait_bound), each after it twice the last, up to
# 200 ms. Polling every 5 ms for good cost a parked consumer 4 % of a CPU here.
_PY_FIRST_PARK_MS, _PY_LAST_PARK_MS = 5, 200
# Runs the signal handlers due now. Compiled, PyRing's waits run no
# bytecode, where CPython would run them: a signal that came between two
# polls (not during one, which it would interrupt) waited for the wait's
# end, and a handler that closes the ring did so only once it timed out.
_run_signal_handlers = ctypes.pythonapi.PyErr_CheckSignals

_OFF_CLOSED_BYTE = {True: 12, False: 13}  # creator?
_OFF_CAPACITY = 16
_OFF_CREATOR_PID = 24
_OFF_ATTACHER_PID = 28
_Q_TAIL = 64 // 8
_Q_HEAD = 128 // 8
_Q_TAKEN = 144 // 8
_W_CLOSED = 12 // 4
_W_CONSUMER_PARKED = 192 // 4
_W_CONSUMER_BACKOFFS = 196 // 4
_W_PRODUCER_PARKED = 256 // 4
_W_PRODUCER_BACKOFFS = 260 // 4
# BackOff's rule, which csrc/ring.h's mm_ring_preempted follows too (its
# MM_RING_* constants are these).
PREEMPTED_NS = 1_000_000
TAKEN_SHARE = 4
TURN_NS = 100_000
CONTENDED_WITHIN = 64
BACKOFF_NS = 50_000_000
MAX_BACKOFF_NS = 1_000_000_000


class CpuTaken:
    """Whether another thread took the calling thread's CPU for
    PREEMPTED_NS or more, for 1/TAKEN_SHARE of the time or more, and for
    TURN_NS or more on average each time the thread got it back, since it
    last looked (a waiter: since its last wait began): the time it waited
    for a CPU while runnable, from the scheduler's statistics (never where
    the kernel keeps none). Between two waits a neighbour's time slices
    take that long and half the time or more, its own peers' turns hardly
    ever; between two looks seconds apart, the waits of the turns it woke
    for meanwhile add up to a millisecond, but of a long while
    (csrc/ring.h, MM_RING_PREEMPTED_NS). A client beside a polling
    front-end takes a quarter of its time or more, but in turns of 10-20 us
    (MM_RING_TURN_NS): waiting those out is not what a back-off spares. Not
    its sleeps (a park, the GIL's), nor a stall of the hypervisor's
    (250-450 us about once a second on these machines), which no back-off
    helps: the kernel counts those as run. (csrc/ring.h's
    mm_ring_cpu_taken)"""

    __slots__ = ("looked", "at", "runq", "slices", "source")

    def __init__(self) -> None:
        self.looked = False
        self.at = self.runq = self.slices = 0
        self.source = None  # whose figures it looked at last (a thread's _Schedstat)

    def look(self, now: int | None = None) -> bool:
        """`now`: time.monotonic_ns(), where the caller has it. A look
        whose figures cannot be read, or are another thread's, starts the
        looks over."""
        now = time.monotonic_ns() if now is None else now
        source, runq, slices = _sched()
        waited = runq - self.runq
        taken = (self.looked and source is self.source and source is not None
                 and waited >= PREEMPTED_NS and waited * TAKEN_SHARE >= now - self.at
                 and waited >= TURN_NS * max(slices - self.slices, 1))
        self.looked, self.at, self.runq, self.slices = True, now, runq, slices
        self.source = source
        return taken


class _Schedstat:
    """A thread's scheduler statistics, a file of its own: held by a
    thread-local, closed with the thread; opened again in a forked child."""

    __slots__ = ("pid", "fd")

    def __init__(self) -> None:
        self.pid = os.getpid()
        try:
            self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = -1

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


_schedstats = threading.local()


def _sched() -> tuple[_Schedstat | None, int, int]:
    """The calling thread's time runnable but waiting for a CPU, in ns, and
    the times it got a CPU (its time slices), with the thread's file they
    came from; (None, 0, 0) where they cannot be read (the kernel keeps no
    scheduler statistics)."""
    own = getattr(_schedstats, "file", None)
    if own is None or own.pid != os.getpid():
        own = _schedstats.file = _Schedstat()
    if own.fd < 0:
        return None, 0, 0
    try:
        _, runq, slices = os.pread(own.fd, 128, 0).split()
        return own, int(runq), int(slices)
    except (OSError, ValueError):
        return None, 0, 0


class BackOff:
    """A spinning waiter's back-off. Its CPU taken (CpuTaken) twice
    within CONTENDED_WITHIN spinning waits, or while it backs off, it
    shares the CPU with another busy process (once is a blip: a daemon's
    burst, the neighbour of a moment). Then it waits without spinning for
    BACKOFF_NS, and twice as long each time it finds its CPU taken again
    during a back-off or within its length after, up to MAX_BACKOFF_NS.
    (csrc/ring.h's mm_ring_preempted; time.monotonic_ns())"""

    __slots__ = ("spin_from", "length", "count", "spun", "spun_taken")

    def __init__(self) -> None:
        self.spin_from = 0  # spins again from then
        self.length = 0  # the last back-off's
        self.count = 0  # back-offs
        self.spun = 0  # waits that spun
        self.spun_taken = 0  # spun when the CPU was last found taken

    def spins(self, now: int) -> bool:
        """Whether a wait beginning `now` spins; one that does counts."""
        if now < self.spin_from:
            return False
        self.spun += 1
        return True

    def spins_looking(self, now: int, cpu: CpuTaken | None) -> bool:
        """Whether a wait beginning `now` spins, having looked first
        whether its CPU was taken (`cpu`; None: no look this time)."""
        if cpu is not None and cpu.look(now):
            self.preempted(now)
        return self.spins(now)

    def preempted(self, now: int) -> bool:
        """Its CPU was found taken at `now`: whether it backs off (else
        it goes on spinning)."""
        contended = self.spun_taken and self.spun - self.spun_taken < CONTENDED_WITHIN
        self.spun_taken = self.spun
        if contended:
            self.back_off(now)
        return bool(contended)

    def back_off(self, now: int) -> None:
        again = self.length and now - self.spin_from < self.length  # (< 0: backing off)
        self.length = min(2 * self.length, MAX_BACKOFF_NS) if again else BACKOFF_NS
        self.spin_from = now + self.length
        self.count += 1


def _align8(n: int) -> int:
    return (n + 7) & ~7


def record_size(*lengths: int) -> int:
    """Bytes a record whose parts have these lengths takes in a ring."""
    return 8 + _align8(4 * len(lengths)) + sum(_align8(n) for n in lengths)


class RingHandle:
    """What a process needs to attach to a ring: picklable into a child."""

    __slots__ = ("name", "data_fd", "space_fd", "spin_us", "__weakref__")

    def __init__(self, name: str, data_fd: int, space_fd: int, spin_us: float):
        self.name = name
        self.data_fd = data_fd
        self.space_fd = space_fd
        self.spin_us = spin_us

    def __reduce__(self):
        return (_rebuild_handle, (self.name, reduction.DupFd(self.data_fd),
                                  reduction.DupFd(self.space_fd), self.spin_us))

    def __repr__(self) -> str:
        return f"RingHandle({self.name!r})"


def _rebuild_handle(name, data_fd, space_fd, spin_us):
    handle = RingHandle(name, data_fd.detach(), space_fd.detach(), spin_us)
    # An unpickled handle owns the duplicates it carries; attach() takes its
    # own, so these close with the handle.
    weakref.finalize(handle, _close_fds, handle.data_fd, handle.space_fd)
    return handle


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _RingLife:
    """The life cycle both implementations share: segment, eventfds, peer."""

    @classmethod
    def create(cls, capacity: int, spin_us: float = DEFAULT_SPIN_US):
        """A new ring with a data area of `capacity` bytes (rounded up to a
        power of two); this process is its creator and will unlink it."""
        if capacity < MIN_CAPACITY:
            raise ValueError(f"ring capacity must be >= {MIN_CAPACITY} bytes")
        if not 0 <= spin_us < MAX_SPIN_US:  # as the setter says (NaN included)
            raise ValueError(f"spin_us must be >= 0 and < {MAX_SPIN_US:g}")
        cap = rounded_capacity(capacity)
        data_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        space_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            seg = shm.Segment.create(HEADER_BYTES + cap, "ring")
        except BaseException:
            _close_fds(data_fd, space_fd)
            raise
        _init_header(seg.map, cap, os.getpid())
        return cls(seg, RingHandle(seg.name, data_fd, space_fd, spin_us), creator=True)

    @classmethod
    def attach(cls, handle: RingHandle):
        """Maps the ring a handle names; this process becomes the attacher."""
        seg = shm.Segment.attach(handle.name)
        if struct.unpack_from("<Q", seg.map, 0)[0] != MAGIC:
            seg.close()
            raise InternalError(f"{handle.name} is not a ring")
        # "@i" stores the pid with one aligned write; "<i" writes byte by byte.
        struct.pack_into("@i", seg.map, _OFF_ATTACHER_PID, os.getpid())
        # Each end owns its descriptors, so either may close first.
        own = RingHandle(handle.name, os.dup(handle.data_fd), os.dup(handle.space_fd),
                         handle.spin_us)
        return cls(seg, own, creator=False)

    def __init__(self, seg: shm.Segment, handle: RingHandle, creator: bool):
        self._seg = seg
        self._handle = handle
        self.creator = creator
        self.capacity = struct.unpack_from("<Q", seg.map, _OFF_CAPACITY)[0]
        self._pidfd_box = [-1]  # shared with the finalizer, which closes it
        # Registered before anything else can fail, so the segment and the
        # descriptors go even if the owner forgets close().
        self._finalizer = weakref.finalize(self, _finalize, seg, handle.data_fd,
                                           handle.space_fd, self._pidfd_box)
        self._bind_ops(seg.map, handle.data_fd, handle.space_fd, creator, handle.spin_us)

    @property
    def handle(self) -> RingHandle:
        return self._handle

    @property
    def name(self) -> str:
        return self._seg.name

    @property
    def readable_fd(self) -> int:
        return self._handle.data_fd

    @property
    def writable_fd(self) -> int:
        return self._handle.space_fd

    @property
    def max_record(self) -> int:
        """The largest record (see record_size) this ring accepts."""
        return min(self.capacity, LARGEST_RECORD)

    def _peer_pid(self) -> int:
        off = _OFF_ATTACHER_PID if self.creator else _OFF_CREATOR_PID
        return struct.unpack_from("@i", self._seg.map, off)[0]

    def _peer_pidfd(self) -> int:
        """A pidfd of the peer, opened on first need; -1 if no peer yet."""
        box = self._pidfd_box
        if box[0] >= 0:
            return box[0]
        pid = self._peer_pid()
        if pid <= 0:
            return -1
        try:
            box[0] = os.pidfd_open(pid)
        except ProcessLookupError:
            raise PeerDied(f"ring {self.name}: peer process {pid} has exited") from None
        return box[0]

    def close(self) -> None:
        """Closes this end: the peer's waits end with RingClosed once it has
        drained what was sent. Only the creator unlinks the segment. Not
        while another thread of this process waits on this end or copies
        into it: the mapping goes at once (the worker joins its threads
        first)."""
        if not self._finalizer.alive:
            return
        self.publish()  # records held back are sent too (nothing, on a consumer's end)
        self._mark_closed()
        for fd in (self._handle.data_fd, self._handle.space_fd):
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass
        self._unbind()
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _finalize(seg: shm.Segment, data_fd: int, space_fd: int, pidfd_box: list) -> None:
    _close_fds(data_fd, space_fd, *[fd for fd in pidfd_box if fd >= 0])
    seg.close()


_NO_RECORD = "get: the peer wrote what is no record"


def _record_lens(m, off: int, pos: int, size: int, nparts: int, cap: int) -> tuple[int, ...]:
    """The lengths of the parts of the record of `size` bytes at `pos` of
    the data area (`off` in the mapping), if it is one a producer could
    have written (csrc/ring.h, mm_ring_record_fits); RingCorrupt if not."""
    need = 8 + _align8(4 * nparts)
    if nparts <= MAX_PARTS and need <= size and pos + size <= cap:
        lens = struct.unpack_from(f"<{nparts}I", m, off + 8)
        if need + sum(_align8(n) for n in lens) == size:
            return lens
    raise RingCorrupt(_NO_RECORD)


def _init_header(m, cap: int, pid: int) -> None:
    m[:HEADER_BYTES] = bytes(HEADER_BYTES)
    struct.pack_into("<QIIQii", m, 0, MAGIC, VERSION, 0, cap, pid, 0)


class PyRing(_RingLife):
    """The pure-Python twin: the same bytes, the same protocol, no C.

    CPython performs each 8-byte struct store into the mapping as one aligned
    store, which x86-64 keeps in program order; that is enough for an oracle.
    """

    def _bind_ops(self, m, data_fd, space_fd, creator, spin_us):
        self._m = m
        self._view = memoryview(m)
        # Counters and flags go through word-sized views: one aligned load or
        # store each (struct's "<Q" writes byte by byte, and a reader could
        # see a torn counter).
        self._q = self._view.cast("Q")
        self._w = self._view.cast("I")
        self._data_fd = data_fd
        self._space_fd = space_fd
        self._peer_bit = ATTACHER_CLOSED if creator else CREATOR_CLOSED
        self._mask = self.capacity - 1
        self._held = 0
        self._corrupt = False  # it found what is no record: it reads no more
        self._unpublished = 0
        self._spin_s = spin_us / 1e6
        self._backoff = BackOff()
        self._cpu = CpuTaken()
        self.woke_ns = 0
        self._bound = True

    def _unbind(self):
        if self._bound:
            self._bound = False
            for view in (self._q, self._w, self._view):
                _release_view(view)

    def _check(self):
        if not self._bound:
            raise ValueError("ring is closed")

    def _peer_closed(self) -> bool:
        return bool(self._w[_W_CLOSED] & self._peer_bit)

    def _mark_closed(self) -> None:
        # A plain store: Python has no release store. On x86-64 every store
        # is one (the native ring's is ordered on any CPU).
        self._seg.map[_OFF_CLOSED_BYTE[self.creator]] = 1

    # -- producer ----------------------------------------------------------

    def _try_put(self, parts, hold: bool = False) -> bool:
        views = [_bytes(p) for p in parts]
        lens = [v.nbytes for v in views]
        if len(views) > MAX_PARTS:
            raise RecordTooLarge(f"put: at most {MAX_PARTS} parts in a record")
        size = record_size(*lens)
        if size > self.max_record:
            raise RecordTooLarge("put: record larger than the ring's largest")
        if self._peer_closed():
            raise RingClosed("put: the peer closed the ring")
        cap = self.capacity
        tail = self._q[_Q_TAIL] + self._unpublished
        head = self._q[_Q_HEAD]
        pos = tail & self._mask
        base = HEADER_BYTES
        if pos + size > cap:
            pad = cap - pos
            if cap - (tail - head) < pad:
                return self._no_room()
            struct.pack_into("<II", self._m, base + pos, pad, WRAP)
            tail += pad
            self._unpublished += pad
            pos = 0
        if cap - (tail - head) < size:
            return self._no_room()
        off = base + pos
        struct.pack_into(f"<II{len(lens)}I", self._m, off, size, len(lens), *lens)
        off += 8 + _align8(4 * len(lens))
        for v, n in zip(views, lens):
            self._view[off:off + n] = v
            off += _align8(n)
        self._unpublished += size
        if not hold:
            self.publish()
        return True

    def _no_room(self) -> bool:
        self.publish()  # only the consumer, reading what is held, makes room
        return False

    def publish(self) -> None:
        self._check()
        if self._unpublished:
            self._q[_Q_TAIL] += self._unpublished  # (one aligned store: the producer's own)
            self._unpublished = 0
            self._wake(_W_CONSUMER_PARKED, self._data_fd)

    def _wake(self, parked: int, fd: int) -> None:
        if self._w[parked]:
            os.eventfd_write(fd, 1)

    def try_put(self, header, *buffers, hold: bool = False) -> bool:
        self._check()
        return self._try_put((header,) + buffers, hold)

    def put(self, header, *buffers, timeout=None) -> None:
        self._check()
        parts = (header,) + buffers
        deadline = _deadline(timeout)
        while not self._try_put(parts):
            need = record_size(*(_bytes(p).nbytes for p in parts))
            self._wait(False, need, deadline)

    def record_size(self, *lengths: int) -> int:
        if len(lengths) > MAX_PARTS:
            raise RecordTooLarge(f"at most {MAX_PARTS} parts in a record")
        return record_size(*lengths)

    # -- consumer ----------------------------------------------------------

    @property
    def spin_us(self) -> float:
        return self._spin_s * 1e6

    @spin_us.setter
    def spin_us(self, us: float) -> None:
        if not 0 <= us < MAX_SPIN_US:
            raise ValueError(f"spin_us must be >= 0 and < {MAX_SPIN_US:g}")
        self._spin_s = us / 1e6

    @property
    def backoffs(self) -> tuple[int, int]:
        """The consumer's back-offs and the producer's (BackOff), modulo 2**32."""
        self._check()
        return self._w[_W_CONSUMER_BACKOFFS], self._w[_W_PRODUCER_BACKOFFS]

    @property
    def taken(self) -> int:
        """Records the consumer has got so far (wrap markers aside)."""
        self._check()
        return self._q[_Q_TAKEN]

    @property
    def held(self) -> int:
        return self._held

    def try_get(self):
        self._check()
        if self._corrupt:
            raise RingCorrupt(_NO_RECORD)
        try:
            return self._try_get()
        except RingCorrupt:
            self._corrupt = True
            raise

    def _try_get(self):
        while True:
            nxt = self._q[_Q_HEAD] + self._held
            if nxt == self._q[_Q_TAIL]:
                if not self._peer_closed():
                    return None
                if self._q[_Q_TAIL] == nxt:  # the peer closes after its last put
                    raise RingClosed("get: the peer closed the ring")
                continue
            # What was published past the records held, and all of it from
            # head: a producer never has more than the capacity in use.
            tail = self._q[_Q_TAIL]
            avail, pos = tail - nxt, nxt & self._mask
            if (tail - self._q[_Q_HEAD] > self.capacity or avail > self.capacity or avail < 8
                    or nxt % 8):
                raise RingCorrupt(_NO_RECORD)
            off = HEADER_BYTES + pos
            size, nparts = struct.unpack_from("<II", self._m, off)
            if size < 8 or size % 8 or size > avail:
                raise RingCorrupt(_NO_RECORD)
            if nparts == WRAP:
                if size != self.capacity - pos or pos == 0:  # to the end, from past the start
                    raise RingCorrupt(_NO_RECORD)
                if self._held:
                    self._held += size  # freed with the records before it
                    continue
                self._q[_Q_HEAD] += size
                self._wake(_W_PRODUCER_PARKED, self._space_fd)
                continue
            lens = _record_lens(self._m, off, pos, size, nparts, self.capacity)
            self._held += size
            self._q[_Q_TAKEN] += 1
            off += 8 + _align8(4 * nparts)
            parts = []
            for n in lens:
                view = self._view[off:off + n]
                parts.append(bytes(view) if not parts and n <= COPY_HEADER_BYTES else view)
                off += _align8(n)
            return parts

    def get(self, timeout=None):
        deadline = _deadline(timeout)
        self.woke_ns = 0
        while True:
            parts = self.try_get()
            if parts is not None:
                return parts
            if self._held:
                raise InternalError(_WAIT_HOLDING)
            self._wait(True, 0, deadline)
            self.woke_ns = time.monotonic_ns()

    def release(self) -> None:
        self._check()
        if not self._held:
            raise InternalError("release: no record is held")
        self._q[_Q_HEAD] += self._held
        self._held = 0
        self._wake(_W_PRODUCER_PARKED, self._space_fd)

    # -- waiting -----------------------------------------------------------

    def _ready(self, for_read: bool, need: int) -> bool:
        if self._peer_closed():
            return True
        used = self._q[_Q_TAIL] - self._q[_Q_HEAD]
        return used > self._held if for_read else self.capacity - used >= need

    def _park(self, for_read: bool, need: int) -> bool:
        flag = _W_CONSUMER_PARKED if for_read else _W_PRODUCER_PARKED
        self._w[flag] = 1
        if self._ready(for_read, need):
            self._w[flag] = 0
            return False
        return True

    def _unpark(self, for_read: bool) -> None:
        self._w[_W_CONSUMER_PARKED if for_read else _W_PRODUCER_PARKED] = 0
        try:
            os.eventfd_read(self._data_fd if for_read else self._space_fd)
        except BlockingIOError:
            pass

    def _wait(self, for_read: bool, need: int, deadline: float | None) -> None:
        try:
            self._wait_bound(for_read, need, deadline)
        except ValueError:  # a view a signal's handler released, closing the ring
            self._check()
            raise

    def _wait_bound(self, for_read: bool, need: int, deadline: float | None) -> None:
        now, spin_end = time.monotonic_ns(), 0.0
        if self._spin_s:
            if self._cpu.look(now) and self._backoff.preempted(now):
                word = _W_CONSUMER_BACKOFFS if for_read else _W_PRODUCER_BACKOFFS
                self._w[word] = (self._w[word] + 1) & 0xFFFFFFFF  # its side's alone
            if self._backoff.spins(now):
                spin_end = now / 1e9 + self._spin_s
        if deadline is not None:
            spin_end = min(spin_end, deadline)
        while time.monotonic() < spin_end:
            _run_signal_handlers()
            if self._ready(for_read, need):
                return
        pidfd, parked, park_ms = -1, False, _PY_FIRST_PARK_MS
        poller = select.poll()
        poller.register(self._data_fd if for_read else self._space_fd, select.POLLIN)
        while True:
            if pidfd < 0:  # a peer that attaches while this waits is watched from then on
                pidfd = self._peer_pidfd()
                if pidfd >= 0:
                    poller.register(pidfd, select.POLLIN)
            left_ms = None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    if parked:
                        self._unpark(for_read)
                    if self._ready(for_read, need):
                        return
                    raise RingTimeout(f"{'get' if for_read else 'put'}: timed out")
                left_ms = max(1, int(left * 1000 + 0.999))
            if not parked:
                if not self._park(for_read, need):
                    return
                parked, park_ms = True, _PY_FIRST_PARK_MS
            # Python's stores give no full fence between the parked flag and
            # the re-check, so the other side may miss the flag as it goes up:
            # the first poll is short. It stays up through the polls after
            # (a side that puts sees it then, and writes the eventfd), which
            # grow longer: a parked side wakes a few times a second.
            events = poller.poll(park_ms if left_ms is None else min(left_ms, park_ms))
            park_ms = min(park_ms * 2, _PY_LAST_PARK_MS)
            _run_signal_handlers()
            self._check()  # a signal's handler may have closed it meanwhile
            if events:
                self._unpark(for_read)
                parked = False
            if self._ready(for_read, need):
                if parked:
                    self._unpark(for_read)
                return
            if any(fd == pidfd for fd, _ in events):
                raise PeerDied(f"ring {self.name}: the process at the other end exited")

    def arm_read(self) -> bool:
        self._check()
        return self._park(True, 0)

    def disarm_read(self) -> None:
        self._check()
        self._unpark(True)

    def arm_write(self, need: int) -> bool:
        self._check()
        return self._park(False, need)

    def disarm_write(self) -> None:
        self._check()
        self._unpark(False)


def _bytes(part) -> memoryview:
    """A part's bytes as the native ring takes them: a simple buffer,
    whatever its items (numpy cannot describe datetime64 to a memoryview:
    ValueError) and whatever its shape (an empty one of two dimensions or
    more cannot be cast: TypeError)."""
    try:
        return memoryview(part).cast("B")
    except (ValueError, TypeError):
        import numpy as np

        return memoryview(np.ascontiguousarray(part).reshape(-1).view(np.uint8))


def _release_view(view: memoryview) -> None:
    try:
        view.release()
    except BufferError:
        pass  # something still exports it; the mapping lives until that goes


def _deadline(timeout) -> float | None:
    if timeout is None or timeout >= LONGEST_WAIT_S:
        return None
    if not timeout >= 0:  # NaN too
        raise ValueError("timeout must be >= 0 or None")
    return time.monotonic() + timeout


# glibc's, called holding the GIL (PyDLL): a call per answer must not
# hand the loop's GIL to another thread.
_sched_getcpu = getattr(ctypes.PyDLL(None), "sched_getcpu", None)


def _py_this_cpu() -> int:
    """The CPU the calling thread runs on; -1 where it cannot be told."""
    return _sched_getcpu() if _sched_getcpu is not None else -1


def _py_incoming_cpu(fd: int) -> int:
    """The CPU that last took in a segment that came to socket `fd`
    (SO_INCOMING_CPU: over loopback, the sender's); -1 where it cannot be
    told."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, fileno=fd)
    except (OSError, ValueError):
        return -1
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_INCOMING_CPU)
    except OSError:
        return -1
    finally:
        sock.detach()


try:
    from mmengine._ring import RingCore as _RingCore
    from mmengine._ring import incoming_cpu as _native_incoming_cpu
    from mmengine._ring import this_cpu as _native_this_cpu

    class NativeRing(_RingCore, _RingLife):
        """The native ring: csrc/ring.h under the shared life cycle."""

except ImportError:  # not built: only the pure twin is available
    NativeRing = _native_this_cpu = _native_incoming_cpu = None

Ring = PyRing if config.pure_python() or NativeRing is None else NativeRing
# Where a process runs beside the peer it waits for (the front-end beside
# its clients: server/tcp.py).
this_cpu, incoming_cpu = (_py_this_cpu, _py_incoming_cpu) if Ring is PyRing \
    else (_native_this_cpu, _native_incoming_cpu)
