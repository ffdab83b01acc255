"""Host memory for loads: one arena per model, recycled after eviction; and
the pipeline that moves a model's bytes to a device through pinned buffers.

A load reads a model's tensor bytes with a few large `readinto`s into one
arena, and every weight is a view of it. Fresh anonymous memory costs a
page fault per 4 KiB page on first touch (a 256 MiB load spends more time
faulting than reading), so arenas are:

- mapped with MADV_HUGEPAGE: 2 MiB pages fault 512 times less often, and
  unmapping them is as cheap;
- recycled: when nothing references a model's weights any more (its
  module was closed and the last view died), its arena goes back to this
  worker's pool, marked MADV_FREE. The kernel may take those pages back
  under memory pressure (and counts them as available meanwhile, so the
  host-memory watermark does not see them as used); while it has not, the
  next load of a model of at most that size writes into pages that are
  already mapped, at the speed of the copy.

The pool never hands out memory that a tensor still references: an arena
returns only when the memoryview torch wraps is deallocated, which is when
the last tensor over it is freed.
"""
from __future__ import annotations

import array
import errno
import io
import mmap
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable
from typing import BinaryIO

import torch

from mmengine import config

#: Free arenas kept for reuse, in bytes, at most; the oldest are unmapped first.
POOL_LIMIT = 2 << 30
#: An arena serves a load that needs at least this fraction of it.
MIN_FILL = 0.5
#: Bytes per readinto: large enough that the syscalls cost nothing, small
#: enough that the loader drops the GIL between chunks.
CHUNK = 16 << 20

#: While the worker serves, a load reads in parts this small (~12 µs of
#: copying here), giving way to requests between them (Readers).
GIVE_WAY_CHUNK = 64 << 10
#: How long a read may wait for requests before it has read anything, and
#: how long it sleeps between looks (the timer's slack makes it ~0.1 ms).
GIVE_WAY_GRACE_NS = 1_000_000
GIVE_WAY_NAP_NS = 20_000
#: A worker that has served nothing for this long is idle: its loads read
#: in large parts, with all its readers.
IDLE_NS = 100_000_000
#: The part the serving thread reads between its requests (Readers.slot):
#: a request that comes meanwhile waits for it (~5 µs here). Smaller parts
#: steal less of the requests' time and leave the load less of the gaps:
#: beside a small model's requests, 16 KiB parts gave its p99 1.2 times its
#: idle p99 and loads 1.45 times as long as 64 KiB parts, which gave 1.2-1.6
#: (benchmarks/RESULTS.md, Loads, session 38).
HELP_CHUNK = 32 << 10
#: While the serving thread has read a part of the load within this long,
#: the reader thread claims none and sleeps this long between looks.
HELP_NS = 200_000
HELP_NAP_NS = 1_000_000

_PAGE = mmap.PAGESIZE
_HUGE = 2 << 20


class ArenaPool:
    """Arenas: anonymous mappings wrapped as flat uint8 tensors."""

    def __init__(self, limit: int = POOL_LIMIT) -> None:
        self.limit = limit
        self._free: list[mmap.mmap] = []  # oldest first
        # Arenas return from whichever thread frees them, and a garbage
        # collection inside a locked section may free one: reentrant.
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of exactly `nbytes` over an arena that nothing
        else references; its arena returns to the pool once the tensor and
        every view of it are gone."""
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        arena = self._reuse(nbytes)
        if arena is None:
            self.misses += 1
            size = -(-nbytes // _HUGE) * _HUGE if nbytes >= _HUGE else -(-nbytes // _PAGE) * _PAGE
            try:
                arena = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            except OSError as e:  # the machine's state, not the file's (a load's OVERLOADED)
                if e.errno != errno.ENOMEM:
                    raise
                raise MemoryError(f"no memory for {size} bytes: {e}") from e
            if hasattr(mmap, "MADV_HUGEPAGE"):
                arena.madvise(mmap.MADV_HUGEPAGE)
        else:
            self.hits += 1
        # torch keeps a reference to the memoryview for as long as any
        # storage over it lives; its deallocation gives the arena back.
        view = memoryview(arena)
        weakref.finalize(view, self._give, arena)
        return torch.frombuffer(view, dtype=torch.uint8, count=nbytes)

    def free_bytes(self) -> int:
        with self._lock:
            return sum(len(a) for a in self._free)

    def clear(self) -> None:
        with self._lock:
            arenas, self._free = self._free, []
        for arena in arenas:
            arena.close()

    def _reuse(self, nbytes: int) -> mmap.mmap | None:
        with self._lock:
            fits = [a for a in self._free if nbytes <= len(a) and nbytes >= MIN_FILL * len(a)]
            if not fits:
                return None
            arena = min(fits, key=len)
            self._free.remove(arena)
            return arena

    def _give(self, arena: mmap.mmap) -> None:
        if hasattr(mmap, "MADV_FREE"):
            arena.madvise(mmap.MADV_FREE)
        with self._lock:
            self._free.append(arena)
            total = sum(len(a) for a in self._free)
            dropped = []
            while total > self.limit and self._free:
                dropped.append(self._free.pop(0))
                total -= len(dropped[-1])
        for old in dropped:  # the view released its buffer before this callback ran
            old.close()


#: The process's pool (a worker loads on one loader thread).
POOL = ArenaPool()


def _chunk() -> int:
    return CHUNK


def _fill(view: memoryview, read, size: Callable[[], int] = _chunk) -> None:
    """Fills `view` in reads of at most `size()` bytes each (asked before
    each): `read(part, at)` reads into `part`, which starts `at` bytes into
    the view, and says how many it read (0: the file has ended)."""
    done, n = 0, len(view)
    while done < n:
        got = read(view[done:min(n, done + size())], done)
        if not got:
            raise ValueError("file ends inside its tensor data")
        done += got


def _fill_from(f: BinaryIO, out: torch.Tensor) -> None:
    """Fills `out` from a stream's position on, in order (a zstd stream)."""
    _fill(memoryview(out.numpy()), lambda part, _: f.readinto(part))


class Serving:
    """Whether a worker's serving thread is serving a request (1) or not
    (0), and when its last one ended, in time.monotonic_ns(): written by
    that thread, read by its loads' readers between their parts. In an
    array, so that the readers' C twin (csrc/reads.pyx) reads them with the
    GIL released."""

    __slots__ = ("marks",)

    def __init__(self) -> None:
        self.marks = array.array("q", [0, 0])

    def begin(self) -> None:
        self.marks[0] = 1

    def end(self, now: int) -> None:
        self.marks[1] = now
        self.marks[0] = 0

    def busy(self) -> bool:
        """Whether a request is being served now."""
        return self.marks[0] != 0

    def idle(self) -> bool:
        """Whether no request is being served, nor was for IDLE_NS."""
        return not self.marks[0] and time.monotonic_ns() - self.marks[1] > IDLE_NS


class _GiveWay:
    """Sizes each part of one thread's read, called before it. While the
    worker is idle, parts are large (CHUNK). While it serves, they are
    small (GIVE_WAY_CHUNK), and each waits first while a request is being
    served, for at most as long, in all, as the read has spent reading (and
    a head start of GIVE_WAY_GRACE_NS): a request then shares the memory
    bus with one small part's copy at most, and the load still moves at
    about half its speed or more however busy the worker is. A nap that
    overslept (the timer's slack) is a debt the next parts' reading repays
    before the read waits again. csrc/reads.pyx is its C twin."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.credit = GIVE_WAY_GRACE_NS  # how long the read may still wait
        self.last = time.monotonic_ns()

    def __call__(self) -> int:
        now = time.monotonic_ns()
        self.credit += now - self.last  # the part just read
        if self.serving.idle():
            self.last = now
            return CHUNK
        if self.credit > 0 and self.serving.busy():
            until = now + self.credit
            while now < until and self.serving.busy():
                time.sleep(GIVE_WAY_NAP_NS / 1e9)
                now = time.monotonic_ns()
            self.credit = until - now
        self.last = now
        return GIVE_WAY_CHUNK


class Readers:
    """Positional reads of one file range by several threads at once:
    `threads` while the worker serves, `idle_threads` while `serving` says
    it has served nothing for a while (a load then takes the cores
    inference is not using; each read decides when it starts).

    With `give_way` (a CPU worker's), each thread's parts are sized as the
    read goes (_GiveWay): while the worker serves, small, each after the
    request being served has ended. On two cores a 16 MiB read beside a
    small model's call made the call several times slower, by the copy's
    traffic through the caches and memory, whatever the threads' priorities.

    With `slot` (a CPU worker's, where csrc/reads.pyx is built), the read
    of the calling thread (the whole file, or the first thread's part) is
    also put where the worker's serving thread, waiting for its next
    request, reads parts of it (NativeRing.help_reads, csrc/readjob.h): the
    load moves in the gaps between requests without taking a core from
    them, and this thread sleeps while that help comes. Without help (the
    serving thread busy, or asleep on an idle worker) it reads every part
    itself.

    Reading from the page cache is a copy by the kernel on the reading
    thread: one thread moves ~5.5 GB/s here, two ~9.5 (as fast as memcpy).
    Each thread reads its own contiguous part, in C with the GIL released
    for the whole part where csrc/reads.pyx is built (else preadv, which
    drops it for each read); threads are made by the loader thread and so
    inherit its nice value: they give way to inference as it does."""

    #: A part smaller than this is not worth a thread's wake-up.
    MIN_PART = 4 << 20

    def __init__(self, threads: int = 1, idle_threads: int = 0,
                 serving: Serving | None = None, give_way: bool = False) -> None:
        self.threads = max(1, threads)
        self.idle_threads = max(self.threads, idle_threads)
        self.serving = serving  # None: never idle, nothing to give way to
        self.give_way = give_way and serving is not None
        self._pool: ThreadPoolExecutor | None = None
        # Where a load's read waits for the serving thread's help, which
        # reads its parts between requests (NativeRing.help_reads).
        self.slot = _native.Slot() if self.give_way and _native is not None else None
        self.reading = False  # read by the serving thread's account of its requests

    def read(self, fd: int, offset: int, out: torch.Tensor) -> None:
        """Fills the flat uint8 tensor `out` from `fd` at `offset`;
        ValueError if the file ends first."""
        self.reading = True
        try:
            self._read(fd, offset, out)
        finally:
            self.reading = False

    def _read(self, fd: int, offset: int, out: torch.Tensor) -> None:
        view = memoryview(out.numpy())
        n = len(view)
        wide = (self.idle_threads > self.threads and self.serving is not None
                and self.serving.idle())
        k = min(self.idle_threads if wide else self.threads, max(1, n // self.MIN_PART))
        serving = self.serving if self.give_way else None

        def read(view: memoryview, offset: int, slot=None) -> None:
            if _native is not None:
                _native.read(fd, view, offset, None if serving is None else serving.marks,
                             CHUNK, GIVE_WAY_CHUNK, GIVE_WAY_GRACE_NS, GIVE_WAY_NAP_NS,
                             IDLE_NS, slot, HELP_CHUNK, HELP_NS, HELP_NAP_NS)
            elif serving is None:
                _pread_into(fd, view, offset)
            else:
                _pread_into(fd, view, offset, _GiveWay(serving))

        if k == 1:
            read(view, offset, self.slot)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.idle_threads - 1, "mmengine-reader")
        cuts = [n * i // k // _PAGE * _PAGE for i in range(k)] + [n]
        parts = []
        try:
            for a, b in zip(cuts[1:-1], cuts[2:]):
                parts.append(self._pool.submit(read, view[a:b], offset + a))
            # This thread reads the first part, which the serving thread
            # helps with once requests come (the slot takes one read).
            read(view[:cuts[1]], offset, self.slot)
        except BaseException:
            if len(parts) < k - 1:
                # A submit failed (no thread could start: a container's
                # pids limit) with its part queued, and no future to wait
                # for: the pool's end waits for it.
                pool, self._pool = self._pool, None
                pool.shutdown(wait=True)
            raise
        finally:
            # Every part finished, failed or not, before the caller may close
            # fd or reuse `out` (a pinned staging buffer is the next chunk's).
            wait(parts)
        for part in parts:
            part.result()


def _pread_into(fd: int, view: memoryview, offset: int,
                size: Callable[[], int] = _chunk) -> None:
    _fill(view, lambda part, at: os.preadv(fd, [part], offset + at), size)


#: The process's readers (a worker's main() replaces them, from its config).
READERS = Readers()
_native = config.native("reads")


class Stager:
    """Moves bytes to a device in chunks through `depth` staging buffers
    allocated once (pinned on a GPU): while the device copies chunk k from
    one buffer, the next is filled (read from a file, or copied from the
    host tier), so a load runs at the speed of the slower of the two links.

    Device copies are queued on the caller's current stream (the loader's
    own stream on a GPU); an event per buffer says when it may be refilled.
    Where `dst` is host memory the copies are synchronous, and unless
    `staged` is asked for, chunks are filled straight into `dst`: the same
    loop, without the detour (tests ask for it to run the GPU's logic here).
    """

    def __init__(self, device: torch.device, chunk: int = CHUNK, depth: int = 2) -> None:
        self.device = device
        self.chunk = chunk
        pin = device.type == "cuda"
        self._bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=pin)
                      for _ in range(depth)]
        self._done: list = [None] * depth  # the event of each buffer's last copy
        self.chunks = 0                    # chunks that went through a buffer

    def copy(self, fill, n: int, dst: torch.Tensor, staged: bool = False) -> None:
        """Fills the first `n` bytes of the flat uint8 tensor `dst`: `fill(buf,
        offset)` must write bytes [offset, offset + len(buf)) of the source
        into the host tensor `buf`."""
        direct = dst.device.type == "cpu" and not staged
        for k, offset in enumerate(range(0, n, self.chunk)):
            size = min(self.chunk, n - offset)
            if direct:
                fill(dst[offset:offset + size], offset)
                continue
            i = k % len(self._bufs)
            if self._done[i] is not None:
                self._done[i].synchronize()  # its previous copy has left the buffer
            buf = self._bufs[i][:size]
            fill(buf, offset)
            dst[offset:offset + size].copy_(buf, non_blocking=dst.device.type == "cuda")
            if dst.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
                self._done[i] = event
            self.chunks += 1

    def from_file(self, f: BinaryIO, offset: int, n: int, dst: torch.Tensor,
                  staged: bool = False, readers: Readers | None = None) -> None:
        """`n` bytes of `f` from `offset` into `dst`; ValueError if the file
        ends first. A plain file is read by `readers` (default READERS) in
        parallel; a stream (zstd) in order."""
        if not isinstance(f, io.FileIO):
            f.seek(offset)
            self.copy(lambda buf, _: _fill_from(f, buf), n, dst, staged)
            return
        readers = readers or READERS
        fd = f.fileno()
        if dst.device.type == "cpu" and not staged:  # one range: the largest parts
            readers.read(fd, offset, dst[:n])
            return
        self.copy(lambda buf, at: readers.read(fd, offset + at, buf), n, dst, staged)

    def from_host(self, src: torch.Tensor, dst: torch.Tensor, staged: bool = False) -> None:
        """The flat uint8 host tensor `src` into `dst`."""
        self.copy(lambda buf, at: buf.copy_(src[at:at + len(buf)]), src.numel(), dst, staged)


_stagers: dict[torch.device, Stager] = {}


def stager(device: torch.device) -> Stager:
    """The process's stager for `device`, allocated on first use (one
    loader thread per worker uses it)."""
    s = _stagers.get(device)
    if s is None:
        s = _stagers[device] = Stager(device)
    return s
