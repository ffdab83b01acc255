"""Zipf traffic over more model bytes than fit, against LRU and the offline optimum, in one run.

    python benchmarks/zipf.py [--json] [--quick] [--zipf S] [--concurrency C]
                              [--host-tier F] [--plot [PNG]]

200 MLPs of 1-16 MB (safetensors; generated once into the user's cache),
served by `mmengine serve` with 2 workers whose device budgets together
hold about 10% of the bytes. Clients keep 32 requests in flight through
the AsyncClient over a Zipf-distributed trace of 20,000 requests (--quick:
the first 60 models, 3,000 requests). Loads, evictions and hits come from
the server's stats; the same trace is replayed offline through an LRU and
a Belady (furthest next use) cache of the bytes the engine may fill, and
through LRU caches split as the engine's budgets are (lru_split_sim_loads).
Prints one JSON object (the last line) with --json.

The replays take the trace one request at a time, where the server has
`concurrency` in flight: requests for a model that is loading share its
load, which no replay can, so loads_vs_lru (and loads_vs_belady) under 1
owe much to that. With --concurrency 1 the comparison is like for like but
for the cache's shape: the engine's two budgets are apart where the pooled
replays are one (the split LRU replay has that shape too).
"""
from __future__ import annotations

import asyncio
import collections
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import uvloop

import report  # benchmarks/report.py: the script's own folder is on sys.path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import server  # noqa: E402  (it also puts the project on sys.path)
from mmengine import AsyncClient, MMEngineError  # noqa: E402
from mmengine.config import Config  # noqa: E402

MODELS, QUICK_MODELS = 200, 60
REQUESTS, QUICK_REQUESTS = 20_000, 3_000
WORKERS, CONCURRENCY, CONNECTIONS = 2, 32, 4
BUDGET_FRACTION = 0.10
IN, OUT = 64, 16
CACHE_VERSION = 1  # bump when the generated models change
SEED = 0


# -- the models ----------------------------------------------------------------

def model_bytes(hidden: int) -> int:
    return 4 * (IN * hidden + hidden + hidden * OUT + OUT)  # float32 weights and biases


def hiddens() -> list[int]:
    sizes = np.random.default_rng(SEED).uniform(1 << 20, 16 << 20, MODELS)
    return [round((s / 4 - OUT) / (IN + 1 + OUT)) for s in sizes]


def repository() -> Path:
    """The models, written once; a marker file says the set is whole."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = Path(base) / "mmengine" / f"bench-zipf-v{CACHE_VERSION}"
    if (root / ".complete").exists():
        return root
    from mmengine.demo import write_mlp

    print(f"zipf: writing {MODELS} models into {root} (once)...", file=sys.stderr, flush=True)
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    for i, hidden in enumerate(hiddens()):
        write_mlp(tmp / f"m{i:03d}", "safetensors", IN, hidden, OUT, seed=i)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(root, ignore_errors=True)  # a half-written one from an interrupted run
    tmp.rename(root)
    return root


def zipf_trace(n_models: int, n_requests: int, s: float) -> list[int]:
    """Model indices; popularity ranks are shuffled so that they do not
    follow size."""
    rng = np.random.default_rng(SEED + 1)
    p = 1.0 / np.arange(1, n_models + 1) ** s
    ranks = rng.permutation(n_models)
    return ranks[rng.choice(n_models, n_requests, p=p / p.sum())].tolist()


# -- offline replays -------------------------------------------------------------

def lru_loads(trace: list[int], sizes: list[int], capacity: int, caches: int = 1) -> int:
    """`capacity` split into `caches` LRU caches (a worker's budget each): a
    model loads into the one with the most room, evicting there."""
    resident = [collections.OrderedDict() for _ in range(caches)]  # model -> its size
    used, where, loads = [0] * caches, {}, 0
    for m in trace:
        if m in where:
            resident[where[m]].move_to_end(m)
            continue
        loads += 1
        k = min(range(caches), key=used.__getitem__)
        while used[k] + sizes[m] > capacity // caches:
            gone, size = resident[k].popitem(last=False)
            used[k] -= size
            del where[gone]
        resident[k][m], where[m] = sizes[m], k
        used[k] += sizes[m]
    return loads


def belady_loads(trace: list[int], sizes: list[int], capacity: int) -> int:
    """Evicts whatever is next used furthest ahead (never: first)."""
    next_use, seen = [0] * len(trace), {}
    for i in range(len(trace) - 1, -1, -1):
        next_use[i] = seen.get(trace[i], len(trace))
        seen[trace[i]] = i
    resident: dict[int, int] = {}  # model -> its next use
    used = loads = 0
    for i, m in enumerate(trace):
        if m not in resident:
            loads += 1
            while used + sizes[m] > capacity:
                victim = max(resident, key=resident.__getitem__)
                del resident[victim]
                used -= sizes[victim]
            used += sizes[m]
        resident[m] = next_use[i]
    return loads


# -- the run ---------------------------------------------------------------------

async def _drive(address: str, names: list[str], concurrency: int) -> dict:
    x = np.ones((1, IN), np.float32)
    latencies, errors, timeline = [], 0, []
    async with AsyncClient(address, connections=CONNECTIONS) as c:
        before = (await c.stats(limit=0))["totals"]  # the totals alone
        # Every client takes the next request from one iterator, so the
        # trace is issued in order.
        todo = iter(names)

        async def client():
            nonlocal errors
            for name in todo:
                t0 = time.perf_counter()
                try:
                    await c.infer(name, {"x": x})
                except (MMEngineError, ConnectionError) as e:
                    # Not a latency, and not in the rate: a fast refusal
                    # would make both look better.
                    errors += 1
                    print(f"zipf: {name}: {e!r}", file=sys.stderr)
                    continue
                latencies.append(time.perf_counter() - t0)

        async def watch():
            while True:
                await asyncio.sleep(0.5)
                now = (await c.stats(limit=0))["totals"]
                timeline.append((time.perf_counter() - t0, now["hits"] - before["hits"],
                                 now["misses"] - before["misses"]))

        t0 = time.perf_counter()
        watcher = asyncio.get_running_loop().create_task(watch())
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        watcher.cancel()
        after = (await c.stats(limit=0))["totals"]
    timeline.append((elapsed, after["hits"] - before["hits"],
                     after["misses"] - before["misses"]))
    return {"latencies": latencies, "elapsed": elapsed, "errors": errors,
            "timeline": timeline, **{k: after[k] - before[k] for k in
                                     ("hits", "misses", "loads", "evictions", "failures",
                                      "loads_from_host")}}


def run(quick: bool, s: float, host_tier: float | None = None,
        concurrency: int = CONCURRENCY) -> tuple[dict, dict]:
    repo = repository()
    n_models = QUICK_MODELS if quick else MODELS
    sizes = [model_bytes(h) for h in hiddens()[:n_models]]
    budget = int(BUDGET_FRACTION * sum(sizes) / WORKERS)
    if host_tier is not None:  # the server reads it from its environment, as deployed
        os.environ["MMENGINE_HOST_TIER_BYTES"] = str(int(host_tier * sum(sizes)))
    # The engine evicts once a worker would pass its high watermark, so
    # that is what the offline caches get to fill.
    capacity = int(WORKERS * budget * Config().high_watermark)
    trace = zipf_trace(n_models, QUICK_REQUESTS if quick else REQUESTS, s)
    with server(repo, "--workers", str(WORKERS), "--device-budget", str(budget)) as (address, _):
        got = uvloop.run(_drive(address, [f"m{i:03d}" for i in trace], concurrency))
    if not got["latencies"]:
        raise RuntimeError(f"no request was answered ({got['errors']} errors)")
    lat_ms = np.array(got["latencies"]) * 1e3
    lru, belady = lru_loads(trace, sizes, capacity), belady_loads(trace, sizes, capacity)
    lru_split = lru_loads(trace, sizes, capacity, WORKERS)
    out = {
        "models": n_models, "requests": len(trace), "zipf_s": s, "concurrency": concurrency,
        "total_mb": sum(sizes) / 2**20, "budget_mb_per_worker": budget / 2**20,
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "rps": len(got["latencies"]) / got["elapsed"],  # answered ones
        # A miss is a request that waited for a load, its own or another's.
        "hit_rate": got["hits"] / max(got["hits"] + got["misses"], 1),
        "loads": got["loads"],
        "loads_from_host": got["loads_from_host"],
        "host_tier_fraction": host_tier,
        "evictions": got["evictions"],
        "errors": got["errors"] + got["failures"],
        "lru_sim_loads": lru,
        "lru_split_sim_loads": lru_split,  # as the engine's budgets are: one a worker
        "belady_sim_loads": belady,
        "ratios": {"loads_vs_lru": got["loads"] / lru, "loads_vs_belady": got["loads"] / belady,
                   "loads_vs_lru_split": got["loads"] / lru_split},
    }
    return out, {"latencies_ms": lat_ms, "timeline": got["timeline"]}


def plot(path: str, out: dict, series: dict) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("zipf: matplotlib is not installed; no plot (pip install -e '.[plot]')",
              file=sys.stderr)
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (cdf, hits) = plt.subplots(1, 2, figsize=(11, 4))
    lat = np.sort(series["latencies_ms"])
    cdf.plot(lat, np.arange(1, len(lat) + 1) / len(lat))
    cdf.set(xscale="log", xlabel="latency (ms)", ylabel="fraction of requests",
            title=f"latency CDF: p50 {out['p50_ms']:.1f} ms, p99 {out['p99_ms']:.1f} ms")
    t, hit, miss = (np.array(c, dtype=float) for c in zip(*series["timeline"]))
    hit, miss = np.diff(hit, prepend=0), np.diff(miss, prepend=0)
    hits.plot(t, hit / np.maximum(hit + miss, 1))
    hits.set(ylim=(0, 1), xlabel="time (s)", ylabel="hits / requests",
             title=f"hit rate per 0.5 s (overall {out['hit_rate']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    ap = report.arguments(__doc__, quick="60 models, 3,000 requests")
    ap.add_argument("--zipf", type=float, default=1.0, metavar="S", help="Zipf exponent")
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY, metavar="C",
                    help=f"requests in flight (default {CONCURRENCY}; 1: as the replays take "
                         f"the trace)")
    ap.add_argument("--plot", nargs="?", const="zipf.png", metavar="PNG",
                    help="write a latency CDF and hit rate over time (default zipf.png)")
    ap.add_argument("--host-tier", type=float, metavar="F",
                    help="the host tier's bytes as a fraction of all the models' (default: "
                         "the server's own, a quarter of its memory)")
    args = ap.parse_args()
    if args.concurrency < 1:
        ap.error("--concurrency must be at least 1")
    out, series = run(args.quick, args.zipf, args.host_tier, args.concurrency)
    if args.plot and plot(args.plot, out, series):
        out["plot"] = os.path.abspath(args.plot)
    report.emit(out, args.json)


if __name__ == "__main__":
    main()
