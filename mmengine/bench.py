"""`mmengine bench`: Zipf-distributed traffic against a running server.

    mmengine bench --url 127.0.0.1:8081 --models 32 --zipf 1.1 --requests 5000

The k-th model of the server's `list()` (k = 1, 2, ...) is requested with a
probability proportional to 1 / k**s, so a few models are hot and the long
tail forces loads and evictions. Requests go through `AsyncClient` over a
few connections with `--concurrency` of them in flight. The run is bounded
by the request count, each request by `--timeout` and the whole run by
`--duration`. Hit rate, loads and evictions are the change in the server's
own `stats()` totals over the run. `--token` (added by the command line,
mmengine/cli.py) goes with every request.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import random
import sys
import time
from collections.abc import Iterator

import numpy as np
import uvloop

from mmengine.client import AsyncClient
from mmengine.config import integer, number
from mmengine.errors import BadRequest, MMEngineError

MAX_CONNECTIONS = 4
SCHEDULE_CHUNK = 4096  # names drawn at a time (_schedule)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="127.0.0.1:8081",
                        help="the server's TCP address (default 127.0.0.1:8081)")
    parser.add_argument("--models", type=integer, default=0, metavar="N",
                        help="use the first N models of the server's list (default: all)")
    parser.add_argument("--zipf", type=number, default=1.0, metavar="S",
                        help="Zipf exponent of model popularity (default 1.0; 0: uniform)")
    parser.add_argument("--requests", type=integer, default=2000, metavar="M",
                        help="requests to send (default 2000)")
    parser.add_argument("--concurrency", type=integer, default=16, metavar="C",
                        help="requests in flight at once (default 16)")
    parser.add_argument("--seed", type=integer, default=0,
                        help="seed of the traffic's order and of the inputs (default 0)")
    parser.add_argument("--timeout", type=number, default=30.0, metavar="S",
                        help="deadline of each request, in seconds (default 30)")
    parser.add_argument("--duration", type=number, default=600.0, metavar="S",
                        help="stop sending new requests after S seconds (default 600)")


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.concurrency < 1 or args.models < 0 or args.seed < 0 \
            or not args.zipf >= 0 or not args.timeout > 0 or not args.duration > 0:
        print("mmengine bench: --requests and --concurrency must be >= 1, "
              "--models, --seed and --zipf >= 0, --timeout and --duration > 0",
              file=sys.stderr)
        return 2
    try:
        report, failed, stopped = uvloop.run(_bench(args))
    except KeyboardInterrupt:  # before the traffic began, or a second Ctrl-C
        print("\nmmengine bench: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, MMEngineError) as e:
        print(f"mmengine bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(report)
    if stopped == INTERRUPTED:
        return 130  # as a shell's Ctrl-C, after the report of what was done
    return 1 if failed or stopped else 0  # a script that runs it learns that requests failed


INTERRUPTED = "interrupted (Ctrl-C)"


async def _bench(args: argparse.Namespace) -> tuple[str, int, str | None]:
    """The report's table, how many requests failed, and why the traffic
    stopped short of its count, if it did: Ctrl-C (the loop cancels this
    task; what finished is reported all the same) or a server gone away.
    A stop at --duration is the table's alone: that bound is no failure."""
    connections = min(args.concurrency, MAX_CONNECTIONS)
    async with AsyncClient(args.url, timeout=args.timeout, connections=connections,
                           token=getattr(args, "token", None)) as client:
        # One row per version, ascending: the last one is what a request
        # without a version gets.
        latest = {row["name"]: row for row in await client.list()}
        rng = np.random.default_rng(args.seed)
        inputs = {}
        for name, row in latest.items():
            specs = row.get("inputs")
            if specs:
                inputs[name] = {s["name"]: _array(s["dtype"], s["shape"], rng) for s in specs}
            else:
                why = row.get("error") or "it declares no inputs"
                print(f"mmengine bench: skipping {name}: {why}", file=sys.stderr)
        names = list(inputs)[:args.models or None]  # the first N that can be sent
        if not names:
            raise BadRequest("no model the server lists can be benchmarked")
        if args.models > len(names):
            print(f"mmengine bench: --models {args.models}: the server has "
                  f"{len(names)} that can be sent; using those", file=sys.stderr)
        schedule = _schedule(names, args.zipf, args.seed, args.requests)

        before = (await client.stats(limit=0))["totals"]  # the totals alone
        latencies: list[float] = []
        errors: collections.Counter[str] = collections.Counter()
        deadline = time.monotonic() + args.duration
        stopped: list[str] = []

        async def sender() -> None:
            for name in schedule:  # one shared iterator: each request is sent once
                if time.monotonic() > deadline or stopped:
                    return
                t0 = time.perf_counter()
                try:
                    await client.infer(name, inputs[name], timeout=args.timeout)
                except (MMEngineError, OSError) as e:  # ConnectionError is an OSError
                    errors[type(e).__name__] += 1
                    if isinstance(e, ConnectionRefusedError) and not stopped:
                        # Nothing listens there now: the rest would fail as fast.
                        stopped.append(f"the server went away ({e})")
                else:
                    latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        progress = asyncio.ensure_future(_progress(latencies, errors, args.requests, t0))
        try:
            await asyncio.gather(*(sender() for _ in range(args.concurrency)))
        except asyncio.CancelledError:  # Ctrl-C (asyncio.Runner cancels this task)
            asyncio.current_task().uncancel()  # taken: what follows is not cancelled
            stopped.insert(0, INTERRUPTED)
        finally:
            progress.cancel()
        elapsed = time.perf_counter() - t0
        _draw(len(latencies), sum(errors.values()), args.requests, elapsed, final=True)
        try:
            after = (await client.stats(limit=0))["totals"]
        except (MMEngineError, OSError):  # gone: the rest of the report stands
            after = None
    why = stopped[0] if stopped else None
    sent = len(latencies) + sum(errors.values())
    shown = why
    if why is None and sent < args.requests:
        shown = f"by --duration after {args.duration:g} s: {sent} of {args.requests} sent"
    return (_table(names, args, latencies, errors, elapsed, before, after, shown),
            sum(errors.values()), why)


def _schedule(names: list[str], zipf: float, seed: int, n: int) -> Iterator[str]:
    """`n` names drawn by Zipf weights, a chunk at a time as they are sent:
    drawn all at once, a billion took minutes and gigabytes before the
    first request, whatever --duration said. Each name takes one random()
    of the seeded generator, in order, so that a seed draws the same names
    as one choices() over all `n` would."""
    # k ** -s, not 1 / k ** s: a steep s underflows to 0, where k ** s
    # overflowed (--zipf 2000 ended in a traceback).
    cum_weights = list(itertools.accumulate(k ** -zipf for k in range(1, len(names) + 1)))
    rng = random.Random(seed)
    for start in range(0, n, SCHEDULE_CHUNK):
        yield from rng.choices(names, cum_weights=cum_weights, k=min(SCHEDULE_CHUNK, n - start))


def _array(dtype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    shape = [1 if d == -1 else d for d in shape]  # a batch of one
    if np.issubdtype(np.dtype(dtype), np.floating):
        return rng.standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype)


async def _progress(latencies: list, errors: collections.Counter, total: int,
                    t0: float) -> None:
    if not sys.stderr.isatty():  # a log's (CI): each redraw would be a line of its own
        return
    while True:
        _draw(len(latencies), sum(errors.values()), total, time.perf_counter() - t0)
        await asyncio.sleep(0.2)


def _draw(done: int, failed: int, total: int, elapsed: float, final: bool = False) -> None:
    n = done + failed
    width = 30
    bar = "#" * (width * n // total)
    rate = done / elapsed if elapsed > 0 else 0.0
    sys.stderr.write(f"\r[{bar:<{width}}] {n}/{total} requests  {rate:,.0f} req/s  "
                     f"{failed} errors" + ("\n" if final else ""))
    sys.stderr.flush()


def _table(names: list[str], args: argparse.Namespace, latencies: list[float],
           errors: collections.Counter, elapsed: float, before: dict, after: dict | None,
           stopped: str | None = None) -> str:
    """`after`: the server's totals at the end; None if it did not answer."""
    if after is None:
        hit_rate = loads = evictions = "- (the server did not answer for its totals)"
    else:
        hits = after["hits"] - before["hits"]  # served without waiting for a load
        misses = after["misses"] - before["misses"]
        loads = str(after["loads"] - before["loads"])
        evictions = str(after["evictions"] - before["evictions"])
        hit_rate = f"{hits / (hits + misses):.1%}" if hits + misses else "-"
    rows = [("models", f"{len(names)} (zipf s={args.zipf:g})"),
            ("requests", f"{len(latencies)} ok, {sum(errors.values())} failed "
                         f"of {args.requests}, concurrency {args.concurrency}"),
            ("duration", f"{elapsed:.2f} s")]
    if stopped:
        rows.append(("stopped", stopped))
    if latencies:
        ms = np.percentile(np.array(latencies) * 1e3, [50, 90, 99, 100])
        rows += [("latency p50", f"{ms[0]:.2f} ms"), ("latency p90", f"{ms[1]:.2f} ms"),
                 ("latency p99", f"{ms[2]:.2f} ms"), ("latency max", f"{ms[3]:.2f} ms")]
    rows += [("throughput", f"{len(latencies) / elapsed:,.1f} req/s"),
             ("hit rate", hit_rate), ("loads", loads), ("evictions", evictions)]
    # Always there, 0 included: a reader (or a script) looks for the row by name.
    rows += [("errors", str(sum(errors.values())))]
    rows += [(f"errors {name}", str(n)) for name, n in sorted(errors.items())]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
