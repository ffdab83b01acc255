"""The cyclic garbage collector in mmengine's own processes: the front-end
of `mmengine serve` and every worker (never an application that embeds the
Engine: its heap is its own).

Why: the objects of the requests in flight when a young collection runs
(futures, buffers, answers on their way) are promoted, die old, and count
toward a full collection, which walks every object of the process. Under
HTTP load the front-end made eight of them in nine seconds, 13-28 ms each
on the loop, walking the 41,000 objects of its imports; a worker's walk of
torch's 175,000 takes 74 ms on its serving thread (benchmarks/RESULTS.md,
session 40).
"""
from __future__ import annotations

import gc
import time

# A worker process's first lines after its signals' (workers.WORKER_ENTRY):
# no collection until settle(). A start's imports are objects that live as
# long as the process, and torch's cost a worker's start ~180 ms of
# collections here, three of them full.
OFF_UNTIL_SETTLED = "import gc\ngc.disable()\n"

# The front-end's allocations of containers between two young collections
# (CPython's default: 700, which a worker keeps). A young collection walks
# the young objects still alive, about as many however long it waits (the
# requests in flight), so fewer of them cost less in all. Not in a worker:
# there a model's garbage in cycles (an exception's traceback holding its
# tensors) would wait for it, megabytes a request.
FRONT_END_YOUNG = 10_000


def settle(young: int | None = None) -> None:
    """Once a process has started (its imports done, its long-lived state
    made): what exists now is taken out of every collection's walk for
    good (gc.freeze), young collections come every `young` allocations
    (None: as they did), and collections come at all where the start had
    none (OFF_UNTIL_SETTLED). The start's few cycles of garbage (an
    argument parser's) stay with it: collecting them first would hold up a
    worker's start by a full walk (74 ms)."""
    gc.freeze()
    if young is not None:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(young, older, oldest)
    gc.enable()
    watch()


# By generation, since watch(): collections, and the ns they took.
_collections = [0] * len(gc.get_stats())
_paused_ns = [0] * len(gc.get_stats())
_began_ns = 0


def _timed(phase: str, info: dict) -> None:
    # A collection runs in one thread, holding the GIL, from start to stop.
    global _began_ns
    if phase == "start":
        _began_ns = time.perf_counter_ns()
    else:
        _collections[info["generation"]] += 1
        _paused_ns[info["generation"]] += time.perf_counter_ns() - _began_ns


def watch() -> None:
    """Counts and times this process's collections from now on, once."""
    if _timed not in gc.callbacks:
        gc.callbacks.append(_timed)


def collections() -> tuple[list[int], list[float]]:
    """The collections since watch(), by generation, and the seconds they
    took: all the process's threads stood still for them."""
    return list(_collections), [ns / 1e9 for ns in _paused_ns]
