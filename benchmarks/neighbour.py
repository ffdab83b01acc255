"""A model beside a flooded one on the same worker: does it wait its turn or the flood?

    python benchmarks/neighbour.py [--json] [--quick]

One CPU worker, embedded Engine, two models: "flood", a handler whose call
takes FLOOD_MS (a sleep: the worker's time, not the machine's CPU), kept
busy by FLOODERS closed-loop callers, so that its queue holds about
FLOODERS calls; and "fast", a small MLP, asked one request at a time by one
caller that pauses PAUSE_MS between requests.

Measured in one run: fast's latency alone (`fast_idle_p50_ms`,
`fast_idle_p99_ms`); then beside the flood with the default fair turns
(`worker_backlog_ms` 2: the flood waits in the front-end, a queue per model,
and fast goes in at the next turn), and beside the same flood in one queue
in arrival order (`worker_backlog_ms` 0: the baseline, how a worker fed in
order behaves). For each: the flood's rate alone (`*_flood_alone_rps`),
then fast's p50 and p99 beside it and the flood's rate then
(`*_flood_rps`: less where fast's calls take their turns, `*_fast_n` of
them). Ratios: `fair_vs_one_queue_p99` (fast's p99, fair over one queue),
`fair_p99_in_flood_calls` (fast's p99 under the fair flood in flood calls:
up to 2, where fast comes in a call's last worker_backlog_ms, as the
flood's next call goes in; its p50 is about half a call) and
`flood_alone_rps_fair_vs_one_queue` (what the turns cost a flood: about 1).
"""
from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop

import report  # benchmarks/report.py: the script's own folder is on sys.path
# The flood is overload.py's model: a handler that sleeps SERVICE_MS. (That
# module also puts the project on sys.path.)
from overload import HANDLER, SERVICE_MS as FLOOD_MS

from mmengine import Config, Engine, demo  # noqa: E402

FLOODERS = 32
PAUSE_MS = 2.0
DIMS = (64, 32, 16)
FLOOD_X = {"x": np.ones((1, 4), np.float32)}
FAST_X = {"x": np.random.default_rng(0).standard_normal((1, DIMS[0]), dtype=np.float32)}


def _ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(samples, q)) * 1e3, 3)


async def fast_calls(engine: Engine, seconds: float) -> list[float]:
    samples, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await engine.infer("fast", FAST_X)
        samples.append(time.perf_counter() - t0)
        await asyncio.sleep(PAUSE_MS / 1e3)
    return samples


async def beside_flood(engine: Engine, seconds: float) -> dict:
    done = asyncio.Event()
    answered = 0

    async def flooder() -> None:
        nonlocal answered
        while not done.is_set():
            await engine.infer("flood", FLOOD_X)
            answered += 1

    flooders = [asyncio.ensure_future(flooder()) for _ in range(FLOODERS)]
    await asyncio.sleep(FLOODERS * FLOOD_MS / 1e3)  # the queue fills
    t0, before = time.perf_counter(), answered
    await asyncio.sleep(seconds / 2)
    alone = (answered - before) / (time.perf_counter() - t0)
    t0, before = time.perf_counter(), answered
    fast = await fast_calls(engine, seconds)
    rate = (answered - before) / (time.perf_counter() - t0)
    done.set()
    await asyncio.gather(*flooders)
    return {"p50_ms": _ms(fast, 50), "p99_ms": _ms(fast, 99), "fast_n": len(fast),
            "flood_alone_rps": round(alone, 1), "flood_rps": round(rate, 1)}


async def measure(repo: Path, seconds: float) -> dict:
    out = {"flood_ms": FLOOD_MS, "flooders": FLOODERS}
    for name, backlog_ms in (("fair", 2.0), ("one_queue", 0.0)):
        config = Config(repo=str(repo), workers=1, http_port=-1, worker_backlog_ms=backlog_ms)
        async with Engine(config) as engine:
            await engine.load("flood")
            await engine.load("fast")
            await fast_calls(engine, 0.3)  # warm
            if name == "fair":  # alone, once: the same engine
                idle = await fast_calls(engine, seconds)
                out.update(fast_idle_p50_ms=_ms(idle, 50), fast_idle_p99_ms=_ms(idle, 99))
            for k, v in (await beside_flood(engine, seconds)).items():
                out[f"{name}_{k}"] = v
    out["ratios"] = {
        "fair_vs_one_queue_p99": round(out["fair_p99_ms"] / out["one_queue_p99_ms"], 4),
        "fair_p99_in_flood_calls": round(out["fair_p99_ms"] / FLOOD_MS, 2),
        "flood_alone_rps_fair_vs_one_queue": round(out["fair_flood_alone_rps"]
                                                   / out["one_queue_flood_alone_rps"], 3)}
    return out


def main() -> None:
    args = report.arguments(__doc__).parse_args()
    with tempfile.TemporaryDirectory(prefix="mmengine-neighbour-") as tmp:
        repo = Path(tmp)
        (repo / "flood" / "1").mkdir(parents=True)
        (repo / "flood" / "1" / "handler.py").write_text(HANDLER)
        demo.write_mlp(repo / "fast", "safetensors", *DIMS)
        result = uvloop.run(measure(repo, 3.0 if args.quick else 10.0))
    report.emit(result, args.json)


if __name__ == "__main__":
    main()
