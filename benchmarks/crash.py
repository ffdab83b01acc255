"""Models that crash their worker beside steady traffic: what do the neighbours lose?

    python benchmarks/crash.py [--json] [--quick]

One CPU worker, embedded Engine. "fast", a small MLP, is asked by
NEIGHBOURS closed-loop callers, so that about that many of its requests
are in flight on the worker at any time. Measured in one run: fast alone
(the baseline: `alone_p50_ms`, `alone_p99_ms`, `alone_rps`); then the same
callers while CRASHES other models, one after another, each end the worker
with a request (a handler that sleeps CRASH_MS, then `os._exit`): each
crash takes the request that ran it, and the worker is restarted (the
restarts back off: 0, 0.2, 0.4 s ... within a minute). Each crashing model
is another: a model that ends its worker twice within a minute is backed
off instead.

Keys: `crashes`; `neighbour_requests` (fast's, during the crashes),
`neighbour_failures` (of them: must be 0) and `resent` (fast's requests
that a dying worker had never read, sent again to its replacement: until
session 52 each failed WORKER_DIED with its worker); fast's latency and
rate beside the crashes (`beside_p50_ms`, `beside_p99_ms`, `beside_rps`,
with its slowest request, `beside_max_ms`: the restart and the reload it
waited out) and `recovery_ms` (from each crash's WORKER_DIED to the next
answer of fast, median: the restart, its back-off and fast's reload). Ratios: `failed_of_resent` (0),
`p50_beside_vs_alone`, `rps_beside_vs_alone`.
"""
from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop

import report  # benchmarks/report.py: the script's own folder is on sys.path

from mmengine import Config, Engine, demo  # noqa: E402
from mmengine.errors import MMEngineError, WorkerDied  # noqa: E402

NEIGHBOURS = 4
CRASH_MS = 50
DIMS = (64, 32, 16)
FAST_X = {"x": np.random.default_rng(0).standard_normal((1, DIMS[0]), dtype=np.float32)}
CRASH_X = {"x": np.zeros(1, np.float32)}
# Sleeps CRASH_MS, then ends its worker (os._exit: nothing to catch).
HANDLER = ("import os\nimport time\n\ndef load(path, device):\n    pass\n\n"
           f"def predict(inputs):\n    time.sleep({CRASH_MS / 1e3})\n    os._exit(3)\n")


def _ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(samples, q)) * 1e3, 3)


class Neighbours:
    """NEIGHBOURS closed-loop callers of fast: each answer's latency and
    end time, and the failures, until stopped."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.samples: list[tuple[float, float]] = []  # (end, latency)
        self.failures: list[str] = []
        self._done = asyncio.Event()
        self._callers: list[asyncio.Future] = []

    def start(self) -> None:
        self._callers = [asyncio.ensure_future(self._call()) for _ in range(NEIGHBOURS)]

    async def stop(self) -> None:
        self._done.set()
        await asyncio.gather(*self._callers)

    async def _call(self) -> None:
        while not self._done.is_set():
            t0 = time.perf_counter()
            try:
                await self.engine.infer("fast", FAST_X)
            except MMEngineError as e:
                self.failures.append(f"{type(e).__name__}: {e}")
                continue
            t1 = time.perf_counter()
            self.samples.append((t1, t1 - t0))


async def measure(repo: Path, crashes: int, seconds: float) -> dict:
    resent = []
    config = Config(repo=str(repo), workers=1, http_port=-1)
    async with Engine(config) as engine:
        engine.observers.append(lambda kind, f: kind == "worker_exit"
                                and resent.append(f["resent"]))
        for _ in range(200):  # warm
            await engine.infer("fast", FAST_X)
        alone = Neighbours(engine)
        alone.start()
        await asyncio.sleep(seconds)
        await alone.stop()
        t_alone = alone.samples[-1][0] - alone.samples[0][0]

        beside = Neighbours(engine)
        beside.start()
        await asyncio.sleep(0.2)
        recovery = []
        t0 = time.perf_counter()
        for i in range(crashes):
            await engine.load(f"crashes-{i}")  # resident first: its request only crashes
            await asyncio.sleep(0.2)
            try:
                await engine.infer(f"crashes-{i}", CRASH_X)
                raise AssertionError("a crashing model answered")
            except WorkerDied:
                died = time.perf_counter()
            while beside.samples[-1][0] < died:
                await asyncio.sleep(0.001)
            recovery.append(beside.samples[-1][0] - died)
        await asyncio.sleep(0.2)
        await beside.stop()
        t_beside = time.perf_counter() - t0
        n_beside = sum(1 for end, _ in beside.samples if end >= t0)
        latency = [lat for end, lat in beside.samples if end >= t0]
    out = {
        "neighbours": NEIGHBOURS, "crash_ms": CRASH_MS, "crashes": len(resent),
        "alone_p50_ms": _ms([lat for _, lat in alone.samples], 50),
        "alone_p99_ms": _ms([lat for _, lat in alone.samples], 99),
        "alone_rps": round(len(alone.samples) / t_alone, 1),
        "neighbour_requests": n_beside + len(beside.failures),
        "neighbour_failures": len(beside.failures),
        "resent": sum(resent),
        "beside_p50_ms": _ms(latency, 50), "beside_p99_ms": _ms(latency, 99),
        "beside_max_ms": _ms(latency, 100),
        "beside_rps": round(n_beside / t_beside, 1),
        "recovery_ms": round(float(np.median(recovery)) * 1e3, 3),
        "failures_said": sorted(set(beside.failures))[:3],
    }
    out["ratios"] = {
        "failed_of_resent": round(out["neighbour_failures"] / max(out["resent"], 1), 4),
        "p50_beside_vs_alone": round(out["beside_p50_ms"] / out["alone_p50_ms"], 3),
        "rps_beside_vs_alone": round(out["beside_rps"] / out["alone_rps"], 3)}
    return out


def main() -> None:
    args = report.arguments(__doc__).parse_args()
    crashes = 3 if args.quick else 6
    with tempfile.TemporaryDirectory(prefix="mmengine-crash-") as tmp:
        repo = Path(tmp)
        demo.write_mlp(repo / "fast", "safetensors", *DIMS)
        for i in range(crashes):
            (repo / f"crashes-{i}" / "1").mkdir(parents=True)
            (repo / f"crashes-{i}" / "1" / "handler.py").write_text(HANDLER)
        result = uvloop.run(measure(repo, crashes, 2.0 if args.quick else 5.0))
    report.emit(result, args.json)


if __name__ == "__main__":
    main()
