"""Goodput under overload: work nobody waits for is skipped.

    python benchmarks/overload.py [--json] [--quick]

One CPU worker serves a handler model whose call takes SERVICE_MS (a
sleep: the worker's time, not the machine's CPU). The baseline, measured
first in the same run, is its capacity: requests per second one at a time
(`capacity_rps`). Then CALLERS closed-loop callers, each sending its next
request as soon as its last one is answered or has timed out (after
TIMEOUT_MS), keep the worker's queue far longer than a timeout's worth of
work. `goodput_rps` counts the answers that came within their timeout.

A worker that ran everything queued would spend its time on requests whose
callers had given up, and goodput would fall toward zero (congestion
collapse); mmengine's workers skip the requests abandoned before they
began (`skipped`), so goodput stays near capacity. `late`: requests that
were running when their deadline came (they run to their end).
`refused`: OVERLOADED answers, once a worker's queue holds
max_queue_per_worker requests (its callers then wait a timeout's length).
Keys: capacity_rps, callers, timeout_ms, goodput_rps, answered, timeouts,
refused, skipped, late, ratios = {goodput_vs_capacity}.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmengine import Config, Engine  # noqa: E402
from mmengine.errors import Overloaded, Timeout  # noqa: E402
from report import emit  # noqa: E402 - benchmarks/report.py: the script's own folder

SERVICE_MS = 5.0
TIMEOUT_MS = 50.0
CALLERS = 64
HANDLER = f'''
import time

def load(path, device):
    pass

def predict(inputs):
    time.sleep({SERVICE_MS / 1e3})
    return {{"y": inputs["x"]}}
'''
X = {"x": np.ones((1, 4), np.float32)}


async def capacity(engine: Engine, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        await engine.infer("work", X)
        n += 1
    return n / (time.perf_counter() - t0)


async def overload(engine: Engine, seconds: float) -> dict:
    answered = timeouts = refused = 0
    end = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal answered, timeouts, refused
        while time.perf_counter() < end:
            try:
                await engine.infer("work", X, timeout=TIMEOUT_MS / 1e3)
                answered += 1
            except Timeout:
                timeouts += 1
            except Overloaded:  # the worker's queue is full: it fell that far behind
                refused += 1
                await asyncio.sleep(TIMEOUT_MS / 1e3)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    elapsed = time.perf_counter() - t0
    return {"goodput_rps": answered / elapsed, "answered": answered, "timeouts": timeouts,
            "refused": refused}


async def measure(repo: Path, seconds: float) -> dict:
    counts = {"skipped": 0, "late": 0}

    def observe(kind: str, _fields: dict) -> None:
        if kind in counts:
            counts[kind] += 1

    async with Engine(Config(repo=str(repo), workers=1, http_port=-1)) as engine:
        engine.observers.append(observe)
        await engine.load("work")
        await capacity(engine, 0.5)  # warm
        cap = await capacity(engine, seconds)
        over = await overload(engine, seconds)
        await asyncio.sleep(CALLERS * SERVICE_MS / 1e3 + 0.5)  # the queue's last answers
    return {"capacity_rps": round(cap, 1), "callers": CALLERS, "timeout_ms": TIMEOUT_MS,
            "service_ms": SERVICE_MS, **{k: round(v, 1) if isinstance(v, float) else v
                                         for k, v in over.items()},
            **counts, "ratios": {"goodput_vs_capacity": round(over["goodput_rps"] / cap, 3)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        version = Path(tmp) / "work" / "1"
        version.mkdir(parents=True)
        (version / "handler.py").write_text(HANDLER)
        result = uvloop.run(measure(Path(tmp), 3.0 if args.quick else 10.0))
    emit(result, args.json)


if __name__ == "__main__":
    main()
