"""The cache's books under an engine's call mix: native vs a plain Python LRU.

    python benchmarks/cache.py [--json] [--quick] [--seed N]

One seeded stream of operations over 10,000 entries (keys are (name,
version) tuples, picked Zipf-like) that models the engine: mostly requests,
each the request path's acquire + release (pin and touch a READY entry and
answer its worker; then unpin), then explicit pin/unpin pairs, remove +
insert + set_bytes churn and victims on the host tier near its watermark. An
op is one request or one other API call (churn is three). The same stream
runs through the native Cache, through a straightforward LRU over
collections.OrderedDict with the same semantics (the baseline), and through
the pure twin PyCache (for information). Request-only and touch-only streams
are timed too, for information: the touch-only ratio is the old headline,
the one least helped by victims' walks. Each figure is the median of several
runs of the whole stream on fresh caches; set-up is not timed. The baseline
and the twin must give the same victims, misses and final books as the
native cache, or the run fails.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import random
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# mmengine imports numpy; idle BLAS threads would only add noise to the
# process CPU time measured here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from mmengine.cache import HOST, OK, PINNED, READY, PyCache  # noqa: E402
from report import emit  # noqa: E402 - benchmarks/report.py: the script's own folder

ENTRIES = 10_000
MIX = {"request": 0.85, "pin": 0.04, "unpin": 0.04, "churn": 0.05,
       "victims": 0.02}
# The host tier holds a constant total just under HIGH (churn swaps a model
# for one of the same size), so a victims call names about a dozen keys.
HIGH, LOW = 0.9, 0.899


class ODCache:
    """The baseline: what one would write first in Python. Only the calls
    the stream makes, with the same semantics as Cache under LRU."""

    class Entry:
        __slots__ = ("state", "worker", "bytes", "pins", "hits", "last_use")

        def __init__(self, state, worker):
            self.state, self.worker = state, worker
            self.bytes = [0, 0, 0]
            self.pins = self.hits = 0
            self.last_use = 0.0

    def __init__(self, workers):
        self.lru = OrderedDict()
        self._used = [0] * (2 + workers)
        self._cap = [0] * (2 + workers)

    def set_capacity(self, tier, worker, nbytes):
        self._cap[tier] = nbytes

    def insert(self, key, state, worker):
        if key in self.lru:
            raise KeyError(key)
        self.lru[key] = self.Entry(state, worker)

    def remove(self, key):
        e = self.lru.pop(key)
        for tier in (0, 1):
            self._used[tier] -= e.bytes[tier]
        self._used[2 + e.worker] -= e.bytes[2]

    def acquire(self, key, now):
        e = self.lru[key]
        if e.state != READY:
            return -1
        self.lru.move_to_end(key)
        e.pins += 1
        e.hits += 1
        e.last_use = now
        return e.worker

    def touch(self, key, now):
        e = self.lru[key]
        self.lru.move_to_end(key)
        e.last_use = now

    def pin(self, key):
        e = self.lru[key]
        e.pins += 1
        return e.pins

    def unpin(self, key):
        e = self.lru[key]
        if e.pins == 0:
            raise ValueError("entry is not pinned")
        e.pins -= 1
        return e.pins

    release = unpin

    def set_bytes(self, key, tier, nbytes):
        e = self.lru[key]
        k = 2 + e.worker if tier == 2 else tier
        self._used[k] += nbytes - e.bytes[tier]
        e.bytes[tier] = nbytes

    def victims(self, tier, worker, need, high, low):
        used, cap = self._used[tier], self._cap[tier]  # host or disk
        if need > cap:
            return [], 1
        if used + need <= high * cap:
            return [], OK
        keys, freed = [], 0
        for key, e in self.lru.items():
            if e.state == READY and e.pins == 0 and e.bytes[tier] > 0:
                keys.append(key)
                freed += e.bytes[tier]
                if used + need - freed <= low * cap:
                    return keys, OK
        return (keys, OK) if used + need - freed <= cap else ([], PINNED)

    def used(self, tier, worker):
        return self._used[tier]  # host only in this stream

    def lru_keys(self):
        return list(self.lru)


def make_stream(seed, n_ops):
    """The initial entries (key, host bytes) and the calls, as
    (op, key, arg) with op 0 request, 1 pin, 2 unpin, 3 churn, 4 victims
    (and 5 touch, for the touch-only stream)."""
    rng = random.Random(seed)
    names = (f"model-{i}" for i in itertools.count())
    live = [((next(names), 1), rng.randrange(1, 1 << 20))
            for _ in range(ENTRIES)]
    initial = list(live)
    total = sum(n for _, n in live)
    cum = list(itertools.accumulate(1.0 / (i + 1) ** 0.9
                                    for i in range(ENTRIES)))
    ops, pinned = [], []
    kinds = rng.choices(range(5), weights=list(MIX.values()), k=n_ops)
    slots = rng.choices(range(ENTRIES), cum_weights=cum, k=n_ops)
    for i, (kind, slot) in enumerate(zip(kinds, slots)):
        key, nbytes = live[slot]
        if kind == 2 and not pinned or kind == 3 and key in pinned:
            kind = 0
        if kind == 0:
            ops.append((0, key, i * 1e-3))
        elif kind == 1:
            pinned.append(key)
            ops.append((1, key, None))
        elif kind == 2:
            ops.append((2, pinned.pop(0), None))
        elif kind == 3:
            live[slot] = new = (next(names), 1), nbytes
            ops.append((3, key, new))
        else:
            ops.append((4, None, rng.randrange(1, 1 << 20)))
    return initial, ops, int(total / HIGH)


def calls(ops):
    """Ops in the stream: a request (acquire + release) is one, churn
    (remove + insert + set_bytes) three, any other call one."""
    return sum(3 if op == 3 else 1 for op, _, _ in ops)


def setup(cls, initial, capacity):
    cache = cls(1)
    cache.set_capacity(HOST, 0, capacity)
    for key, nbytes in initial:
        cache.insert(key, READY, 0)
        cache.set_bytes(key, HOST, nbytes)
    return cache


def drive(cache, ops):
    """Runs the stream; returns the victims answers and the requests that
    found their entry not READY (none in this stream: all are READY)."""
    acquire, release = cache.acquire, cache.release
    touch, pin, unpin = cache.touch, cache.pin, cache.unpin
    insert, remove, set_bytes = cache.insert, cache.remove, cache.set_bytes
    victims, answers, misses = cache.victims, [], 0
    for op, key, arg in ops:
        if op == 0:
            if acquire(key, arg) < 0:
                misses += 1
            else:
                release(key)
        elif op == 1:
            pin(key)
        elif op == 2:
            unpin(key)
        elif op == 3:
            remove(key)
            insert(arg[0], READY, 0)
            set_bytes(arg[0], HOST, arg[1])
        elif op == 4:
            answers.append(victims(HOST, 0, arg, HIGH, LOW))
        else:
            touch(key, arg)
    return answers, misses


def measure(impls, initial, capacity, ops, repeats):
    """Calls per second of each implementation, median over repeats. The
    runs take turns, so drift on a shared machine hits all alike, and count
    CPU time, so time stolen by other processes is not counted."""
    times = {cls: [] for cls in impls}
    books = {}
    for _ in range(repeats):
        for cls in impls:
            cache = setup(cls, initial, capacity)
            gc.collect()
            t0 = time.process_time()
            answers = drive(cache, ops)
            times[cls].append(time.process_time() - t0)
            books[cls] = answers, cache.lru_keys(), cache.used(HOST, 0)
    rates = {cls: calls(ops) / statistics.median(t) for cls, t in times.items()}
    return rates, books


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        from mmengine._cache import NativeCache
    except ImportError:
        sys.exit("mmengine._cache is not built: see setup.py")

    n_ops, repeats = (200_000, 5) if args.quick else (1_000_000, 7)
    initial, ops, capacity = make_stream(args.seed, n_ops)
    impls = (NativeCache, ODCache, PyCache)
    rates, books = measure(impls, initial, capacity, ops, repeats)
    if not books[NativeCache] == books[ODCache] == books[PyCache]:
        sys.exit("the implementations disagree: the benchmark is void")
    native, baseline, twin = (rates[cls] for cls in impls)
    first = {key for key, _ in initial}
    requests = [op for op in ops if op[0] == 0 and op[1] in first]
    touches = [(5, key, now) for _, key, now in requests]
    request_rates, _ = measure((NativeCache, ODCache), initial, capacity,
                               requests, repeats)
    touch_rates, _ = measure((NativeCache, ODCache), initial, capacity,
                             touches, repeats)
    native_books = books[NativeCache]
    answers, misses = native_books[0]
    evicted = sum(len(keys) for keys, _ in answers)
    report = {
        "entries": ENTRIES, "calls": calls(ops), "repeats": repeats,
        "seed": args.seed, "mix": MIX,
        "requests": sum(op == 0 for op, _, _ in ops), "misses": misses,
        "victims_calls": len(answers), "victims_keys": evicted,
        "native_ops_per_s": round(native),
        "ordereddict_ops_per_s": round(baseline),
        "pure_twin_ops_per_s": round(twin),
        "ratios": {"vs_ordereddict": round(native / baseline, 2),
                   "vs_pure_twin": round(native / twin, 2),
                   "request_only_vs_ordereddict": round(
                       request_rates[NativeCache] / request_rates[ODCache], 2),
                   "touch_only_vs_ordereddict": round(
                       touch_rates[NativeCache] / touch_rates[ODCache], 2)},
    }
    if args.json:
        emit(report, True)
        return
    print(f"{report['calls']:,} ops ({report['requests']:,} requests) over "
          f"{ENTRIES:,} entries, median of "
          f"{repeats}; victims: {report['victims_calls']:,} calls naming "
          f"{evicted:,} keys")
    for name in ("native", "ordereddict", "pure_twin"):
        print(f"  {name:<12} {report[name + '_ops_per_s']:>12,} ops/s")
    ratios = report["ratios"]
    print(f"  native / ordereddict = {ratios['vs_ordereddict']} "
          f"(requests only: {ratios['request_only_vs_ordereddict']}, "
          f"touch only: {ratios['touch_only_vs_ordereddict']})")


if __name__ == "__main__":
    main()
