"""The model cache's books: where each (model, version) lives, how many bytes
it holds on each tier, and what to evict to make room.

`Cache` is the native `mmengine._cache.NativeCache` (csrc/cache.pxd is its
design document), or its pure-Python twin `PyCache` when MMENGINE_PURE_PYTHON
is set or the extension is not built. Both have the same API and semantics
and run through the same tests; `PyCache` is the oracle.

The cache only keeps books. The engine decides policy: it inserts an entry
before a load, reserves bytes with `set_bytes`, pins while requests are in
flight, and unloads what `victims` and `idle` name (`victims` with
`peek=True` names the same and changes nothing, not even GDSF's L: for
comparing workers before one is picked). A request takes one
call each way: `acquire(key, now)` pins, touches and counts a hit of a
READY entry (`touch` alone counts nothing) and returns its worker (else
returns -1 and changes nothing), `release(key)` (= unpin) lets it go.

Arguments: tiers HOST, DISK and DEVICE (one device per worker; for HOST and
DISK the worker argument is ignored), states LOADING..FAILED, byte counts
int64. A missing key raises KeyError, a bad argument ValueError; a call that
raises changes nothing. Checks run in one order in both implementations:
key, byte count, then the other arguments.
"""
from __future__ import annotations

import math
import operator
from collections import OrderedDict
from typing import Hashable, NamedTuple

from mmengine.config import pure_python
from mmengine.errors import InternalError

HOST, DISK, DEVICE = 0, 1, 2
LOADING, READY, UNLOADING, FAILED = 0, 1, 2, 3
LRU, GDSF = 0, 1
MAX_WORKERS = 1 << 20  # csrc/cache.h's MM_MAX_WORKERS: a worker's counter index is an int32
# victims' reasons
OK, TOO_LARGE, PINNED = 0, 1, 2

INT64_MAX = 2**63 - 1

# Error codes of csrc/cache.h (MM_E*), in its order.
(E_TIER, E_WORKER, E_STATE, E_POLICY, E_NEGATIVE, E_NO_WORKER,
 E_DEVICE_BYTES, E_OVERFLOW, E_UNPINNED, E_COST, E_WATERMARK, E_NOMEM,
 E_CORRUPT) = range(1, 14)

_MESSAGES = {
    E_TIER: "tier must be HOST, DISK or DEVICE",
    E_WORKER: "worker out of range",
    E_STATE: "state must be LOADING, READY, UNLOADING or FAILED",
    E_POLICY: "policy must be LRU or GDSF",
    E_NEGATIVE: "byte count out of range",
    E_NO_WORKER: "device bytes need a worker",
    E_DEVICE_BYTES: "an entry with device bytes needs a worker",
    E_OVERFLOW: "byte counter would overflow int64",
    E_UNPINNED: "entry is not pinned",
    E_COST: "cost must be finite and >= 0",
    E_WATERMARK: "watermarks must satisfy 0 <= low <= high < inf",
}


def convert_error(code: int) -> Exception:
    """The exception for an error code of either implementation."""
    if code == E_NOMEM:
        return MemoryError("cache: out of memory")
    if code == E_CORRUPT:
        return InternalError("cache: books are inconsistent")
    return ValueError(_MESSAGES[code])


class Entry(NamedTuple):
    state: int
    worker: int
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    pins: int
    hits: int
    last_use: float


def _over(rest: int, need: int, frac: float, cap: int) -> bool:
    # The same double arithmetic as mm_over, so that both agree to the bit.
    return float(rest) + float(need) > frac * float(cap)


class _Entry:
    __slots__ = ("state", "worker", "bytes", "pins", "hits", "last_use",
                 "cost", "base")

    def __init__(self, state: int, worker: int, base: float) -> None:
        self.state = state
        self.worker = worker
        self.bytes = [0, 0, 0]  # indexed by tier
        self.pins = 0
        self.hits = 0
        self.last_use = 0.0
        self.cost = 1.0
        self.base = base        # GDSF L at insert or last touch

    def priority(self) -> float:
        return self.base + (self.hits + 1) * self.cost / max(*self.bytes, 1)


class PyCache:
    """The pure-Python twin of NativeCache: an OrderedDict in LRU order."""

    def __init__(self, workers: int, policy: int = LRU) -> None:
        workers, policy = operator.index(workers), operator.index(policy)
        if not 0 <= workers <= MAX_WORKERS:
            raise convert_error(E_WORKER)
        if policy not in (LRU, GDSF):
            raise convert_error(E_POLICY)
        self._workers = workers
        self._policy = policy
        self._lru: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._used = [0] * (2 + workers)  # host, disk, device per worker
        self._cap = [0] * (2 + workers)
        self._leaving = [0] * workers  # per worker: its UNLOADING entries' device bytes
        self._inflation = 0.0

    # -- counters -----------------------------------------------------

    def _counter(self, tier: int, worker: int) -> int:
        tier, worker = operator.index(tier), operator.index(worker)
        if tier in (HOST, DISK):
            return tier
        if tier != DEVICE:
            raise convert_error(E_TIER)
        if not 0 <= worker < self._workers:
            raise convert_error(E_WORKER)
        return DEVICE + worker

    def set_capacity(self, tier: int, worker: int, nbytes: int) -> None:
        nbytes = _nbytes(nbytes)
        self._cap[self._counter(tier, worker)] = nbytes

    def capacity(self, tier: int, worker: int) -> int:
        return self._cap[self._counter(tier, worker)]

    def used(self, tier: int, worker: int) -> int:
        return self._used[self._counter(tier, worker)]

    def leaving(self, worker: int) -> int:
        """The device bytes of worker `worker`'s UNLOADING entries: their
        unloads are on their way to it, ahead of any load sent after, so
        `victims` counts them gone."""
        return self._leaving[self._counter(DEVICE, worker) - DEVICE]

    def _leave(self, e: _Entry, sign: int) -> None:
        # Before (-1) and after (+1) a change of an entry's state, worker
        # or device bytes (mm_leave).
        if e.state == UNLOADING and e.worker != -1:
            self._leaving[e.worker] += sign * e.bytes[DEVICE]

    # -- entries ------------------------------------------------------

    def insert(self, key: Hashable, state: int = LOADING,
               worker: int = -1) -> None:
        if key in self._lru:
            raise KeyError(key)
        state, worker = _check_state(state), self._check_worker(worker)
        self._lru[key] = _Entry(state, worker, self._inflation)

    def remove(self, key: Hashable) -> None:
        e = self._lru.pop(key)
        self._leave(e, -1)
        for tier, n in enumerate(e.bytes):
            if n:
                self._used[DEVICE + e.worker if tier == DEVICE else tier] -= n

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def touch(self, key: Hashable, now: float) -> None:
        """Recency only: `acquire` alone counts a use (a hit)."""
        e = self._lru[key]
        self._lru.move_to_end(key)
        e.last_use = float(now)
        e.base = self._inflation

    def acquire(self, key: Hashable, now: float) -> int:
        """The request path's way in. If the entry is READY: pins it,
        touches it, counts a hit and returns its worker (-1 if it has none).
        Otherwise changes nothing and returns -1. KeyError if absent."""
        e = self._lru[key]
        now = float(now)
        if e.state != READY:
            return -1
        e.pins += 1
        self._lru.move_to_end(key)
        e.hits += 1
        e.last_use = now
        e.base = self._inflation
        return e.worker

    def pin(self, key: Hashable, /) -> int:
        e = self._lru[key]
        e.pins += 1
        return e.pins

    def unpin(self, key: Hashable, /) -> int:
        e = self._lru[key]
        if e.pins == 0:
            raise convert_error(E_UNPINNED)
        e.pins -= 1
        return e.pins

    # The request path's way out: unpin under another name, returning the
    # new pin count (ValueError if it was 0).
    release = unpin

    # Each looks the key up first (KeyError before a bad value), and again
    # after converting a value (__index__ may have run code that removed it).

    def set_state(self, key: Hashable, state: int) -> None:
        self._lru[key]
        state = _check_state(state)
        e = self._lru[key]
        self._leave(e, -1)
        e.state = state
        self._leave(e, +1)

    def set_worker(self, key: Hashable, worker: int) -> None:
        self._lru[key]
        worker = self._check_worker(worker)
        e = self._lru[key]
        n = e.bytes[DEVICE]
        if n and worker != e.worker:
            if worker == -1:
                raise convert_error(E_DEVICE_BYTES)
            if self._used[DEVICE + worker] > INT64_MAX - n:
                raise convert_error(E_OVERFLOW)
            self._leave(e, -1)
            self._used[DEVICE + e.worker] -= n
            self._used[DEVICE + worker] += n
            e.worker = worker
            self._leave(e, +1)
        else:
            e.worker = worker

    def set_bytes(self, key: Hashable, tier: int, nbytes: int) -> None:
        self._lru[key]
        nbytes = _nbytes(nbytes)
        tier = operator.index(tier)
        if tier not in (HOST, DISK, DEVICE):
            raise convert_error(E_TIER)
        e = self._lru[key]
        if tier == DEVICE and e.worker == -1:
            if nbytes:
                raise convert_error(E_NO_WORKER)
            return
        k = DEVICE + e.worker if tier == DEVICE else tier
        rest = self._used[k] - e.bytes[tier]
        if rest > INT64_MAX - nbytes:
            raise convert_error(E_OVERFLOW)
        self._leave(e, -1)
        self._used[k] = rest + nbytes
        e.bytes[tier] = nbytes
        self._leave(e, +1)

    def set_cost(self, key: Hashable, cost: float) -> None:
        e = self._lru[key]
        cost = float(cost)
        if not cost >= 0.0 or math.isinf(cost):
            raise convert_error(E_COST)
        e.cost = cost

    def entry(self, key: Hashable) -> Entry:
        e = self._lru[key]
        host, disk, device = e.bytes
        return Entry(e.state, e.worker, device, host, disk, e.pins, e.hits,
                     e.last_use)

    def priority(self, key: Hashable) -> float:
        """GDSF's H of the entry (computed under LRU too, unused there)."""
        return self._lru[key].priority()

    def _check_worker(self, worker: int) -> int:
        worker = operator.index(worker)
        if not -1 <= worker < self._workers:
            raise convert_error(E_WORKER)
        return worker

    # -- walks --------------------------------------------------------

    def lru_keys(self) -> list:
        return list(self._lru)

    def idle(self, now: float, idle_s: float) -> list:
        since = float(now) - float(idle_s)
        keys = []
        for key, e in self._lru.items():
            if e.last_use > since:
                break
            if e.state == READY and e.pins == 0 and (any(e.bytes) or e.worker >= 0):
                keys.append(key)
        return keys

    def victims(self, tier: int, worker: int, bytes_needed: int,
                high: float, low: float, peek: bool = False) -> tuple[list, int]:
        need = _nbytes(bytes_needed)
        k = self._counter(tier, worker)
        high, low = float(high), float(low)
        if not (low >= 0.0 and low <= high) or math.isinf(high):
            raise convert_error(E_WATERMARK)
        used, cap = self._used[k], self._cap[k]
        if k >= DEVICE:
            used -= self._leaving[k - DEVICE]  # gone by the time a load sent now runs
        if need > cap:
            return [], TOO_LARGE
        if not _over(used, need, high, cap):
            return [], OK
        candidates = (
            (key, e) for key, e in self._lru.items()
            if e.state == READY and e.pins == 0 and e.bytes[tier] > 0
            and (tier != DEVICE or e.worker == worker))
        if self._policy == GDSF:
            # Sorting gathers every candidate: O(n log n), unlike LRU's walk.
            ranked = sorted((e.priority(), rank, key, e)
                            for rank, (key, e) in enumerate(candidates))
            candidates = ((key, e) for _, _, key, e in ranked)
        keys, freed = [], 0
        for key, e in candidates:
            keys.append(key)
            freed += e.bytes[tier]
            if not _over(used - freed, need, low, cap):
                break
        else:
            if used - freed > cap - need:
                return [], PINNED
        if self._policy == GDSF and keys and not peek:
            self._inflation = max(self._inflation,
                                  self._lru[keys[-1]].priority())
        return keys, OK

    # -- the whole --------------------------------------------------------

    def stats(self) -> dict:
        return {
            "entries": len(self._lru),
            "policy": self._policy,
            "inflation": self._inflation,
            "host": (self._used[HOST], self._cap[HOST]),
            "disk": (self._used[DISK], self._cap[DISK]),
            "device": [(self._used[DEVICE + w], self._cap[DEVICE + w])
                       for w in range(self._workers)],
        }

    def verify(self) -> None:
        """Checks every counter against the entries, O(n); raises
        InternalError if they disagree."""
        sums, leaving = [0] * len(self._used), [0] * self._workers
        for e in self._lru.values():
            for tier, n in enumerate(e.bytes):
                if n:
                    sums[DEVICE + e.worker if tier == DEVICE else tier] += n
            if e.state == UNLOADING and e.worker != -1:
                leaving[e.worker] += e.bytes[DEVICE]
        if sums != self._used or leaving != self._leaving:
            raise convert_error(E_CORRUPT)


def _nbytes(n: int) -> int:
    n = operator.index(n)
    if not 0 <= n <= INT64_MAX:
        raise convert_error(E_NEGATIVE)
    return n


def _check_state(state: int) -> int:
    state = operator.index(state)
    if state not in (LOADING, READY, UNLOADING, FAILED):
        raise convert_error(E_STATE)
    return state


def _select() -> type:
    if pure_python():
        return PyCache
    try:
        from mmengine._cache import NativeCache
    except ImportError:
        return PyCache
    return NativeCache


Cache = _select()
