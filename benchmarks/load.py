"""How fast a model loads and unloads, against the speed of its links, in one run.

    python benchmarks/load.py [--json] [--quick]

One 256 MiB model (--quick: 64 MiB): four square float32 Linear layers as
safetensors weights with a module class, written once into the user's
cache. Baselines, each timed in this process with the file in the page
cache: a plain copy into reused memory (numpy, one thread), reading the
file's bytes into a preallocated buffer, torch.load of the same weights
saved with torch.save then load_state_dict into a module built beforehand,
and the safetensors package's load_file (which maps the file and reads
nothing until a tensor is touched: not a read rate). mmengine loads the model through
a real Engine with one worker: disk_gb_per_s and load_ms are the worker's
own load (the phases it reports: read, build, place), engine_load_ms is
engine.load() as the caller sees it, evict_ms is engine.unload() (done once
the worker has the unload: its loader frees the model before it reads the
next control record, so a load sent after it finds the room). A small
resident model's p99 latency through the same Engine is measured while
nothing loads, then while the big model is loaded and unloaded over and
over on the same worker, and last (the baseline of interference) while
another process only copies as many bytes as each load, as often, with no
load at all (copy_interference). busy_load_ms is engine.load() of the big
model while the small one's requests run (busy_load_vs_load: against
engine_load_ms, with nothing else running): what a load's giving way to
requests costs it, so that interference cannot be bought by starving loads.
Medians of repeated runs.

The host tier is measured by a second Engine, whose evictions demote the
model to shared memory (demote_ms) and whose loads map it from there
(host_gb_per_s, host_load_ms); the first Engine has no host tier, so each
of its loads reads the file (disk_gb_per_s, load_ms, evict_ms).
MMENGINE_* variables set the engines' other keys, as for a server
(MMENGINE_LOAD_THREADS=1, say). MMENGINE_ACCOUNT_REQUESTS=1 splits the
slowest requests' stages (hot_slowest_stages_us), but the system calls it
makes in each request change how the worker's threads take turns: take the
other figures from a run without it. Prints one JSON object (the last line)
with --json.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import statistics
from collections import Counter
import sys
import time
from pathlib import Path

import numpy as np
import uvloop

import report  # benchmarks/report.py: the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mmengine.config import load as load_config  # noqa: E402

CACHE_VERSION = 1  # bump when the generated models change
BIG, HOT = "big", "hot"
WIDTH, QUICK_WIDTH, LAYERS = 4096, 2048, 4   # 4 x 4096^2 x 4 B = 256 MiB
HOT_DIMS = (64, 32, 16)
CHURN_PERIOD_S = 0.02  # the big model is loaded and evicted 50 times a second at most

_MODEL_PY = '''\
import torch
from torch import nn


class Model(nn.Module):
    """{layers} square Linear layers of width {width} with ReLUs between."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear({width}, {width}) for _ in range({layers}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.relu(x))
        return x
'''

_MANIFEST = '''\
backend = "safetensors"
[[inputs]]
name = "x"
dtype = "float32"
shape = [-1, {width}]
[[outputs]]
name = "y"
dtype = "float32"
shape = [-1, {width}]
'''


# -- the models ------------------------------------------------------------------

def repository(width: int) -> Path:
    """The big model (safetensors + model.py, and the same weights through
    torch.save) and the small hot one, written once; a marker says whole."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = Path(base) / "mmengine" / f"bench-load-v{CACHE_VERSION}" / f"w{width}"
    if (root / ".complete").exists():
        return root
    import torch

    from mmengine.backends.safetensors import save_file
    from mmengine.demo import write_mlp

    print(f"load: writing the models into {root} (once)...", file=sys.stderr, flush=True)
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    version = tmp / BIG / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(_MODEL_PY.format(width=width, layers=LAYERS))
    (version / "model.toml").write_text(_MANIFEST.format(width=width))
    generator = torch.Generator().manual_seed(0)
    state = {}
    for i in range(LAYERS):
        state[f"layers.{i}.weight"] = torch.randn(width, width, generator=generator) / width
        state[f"layers.{i}.bias"] = torch.randn(width, generator=generator) / width
    save_file(state, version / "model.safetensors")
    torch.save(state, tmp / "big.pt")
    write_mlp(tmp / HOT, "safetensors", *HOT_DIMS, seed=0)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(root, ignore_errors=True)  # a half-written one from an interrupted run
    tmp.rename(root)
    return root


# -- the baselines -----------------------------------------------------------------

def _median_s(fn, repeats: int) -> float:
    fn()  # once to warm up (page cache, allocator, imports)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def memcpy_s(nbytes: int, repeats: int) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    return _median_s(lambda: np.copyto(dst, src), repeats)


def read_s(path: Path, repeats: int) -> float:
    """The file's bytes from the page cache into one preallocated buffer."""
    buf = np.zeros(path.stat().st_size, np.uint8)
    view = memoryview(buf)

    def read():
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < len(view):
                done += f.readinto(view[done:])

    return _median_s(read, repeats)


def torch_load_s(root: Path, repeats: int) -> float:
    import torch

    sys.path.insert(0, str(root / BIG / "1"))
    try:
        from model import Model  # the big model's own model.py
    finally:
        sys.path.pop(0)
    module = Model()

    def load():
        module.load_state_dict(torch.load(root / "big.pt", weights_only=True))

    return _median_s(load, repeats)


def safetensors_s(path: Path, repeats: int) -> float | None:
    try:
        from safetensors.torch import load_file
    except ImportError:
        print("load: the safetensors package is not installed; no baseline",
              file=sys.stderr)
        return None
    return _median_s(lambda: load_file(path), repeats)


# -- mmengine --------------------------------------------------------------------------

_COPY_HOG = """
import sys, time
import numpy as np
src = np.ones(int(sys.argv[1]), np.uint8)
dst = np.empty_like(src)
while True:
    t0 = time.perf_counter()
    np.copyto(dst, src)
    time.sleep(max(0.0, float(sys.argv[2]) - (time.perf_counter() - t0)))
"""


async def _engine(root: Path, repeats: int, idle_n: int, cycles: int, host: bool,
                  copy_bytes: int = 0) -> dict:
    """Loads and evictions of the big model through a real Engine, and a
    small resident model's latency while nothing loads and while the big
    one loads and unloads again and again. host=False: no host tier, every
    load reads the file. host=True: the model is published to the host
    tier once, and then every eviction demotes it and every load maps it."""
    from mmengine.engine import Engine

    seen = []
    engine_ms, evict_ms = [], []
    x = np.random.default_rng(0).standard_normal((1, HOT_DIMS[0]), dtype=np.float32)

    hot_during: list[dict] = []  # the small model's requests while the big one churns
    churning = False

    def observe(kind: str, fields: dict) -> None:
        if kind == "load" and fields["model"] == BIG and "phases" in fields:
            seen.append((fields["from"], fields["phases"]))
        elif kind == "request" and churning and fields["model"] == HOT:
            hot_during.append(fields)

    config = load_config(overrides=dict(repo=str(root), workers=1, device_budget=4 << 30,
                                        host_tier_bytes=-1 if host else 0))
    async with Engine(config) as engine:
        engine.observers.append(observe)
        await engine.infer(HOT, {"x": x})

        async def published() -> None:
            while not engine.model_row((BIG, 1))["host_bytes"] > (1 << 20):
                await asyncio.sleep(0.01)

        first_map_s = None
        if host:
            await engine.load(BIG)
            await published()
            await engine.unload(BIG, keep_host=True)
            first_map_s = _first_map_s(engine.host.segment((BIG, 1)), repeats)
        for _ in range(repeats + 1):  # the first: a cold start of the worker's code paths
            t0 = time.perf_counter()
            await engine.load(BIG)
            t1 = time.perf_counter()
            await engine.unload(BIG, keep_host=host)
            t2 = time.perf_counter()
            engine_ms.append((t1 - t0) * 1e3)
            evict_ms.append((t2 - t1) * 1e3)
        loads = [phases for source, phases in seen[-repeats:]
                 if source == ("host" if host else "disk")]
        assert len(loads) == repeats, seen
        del engine_ms[0], evict_ms[0]

        async def hot(n: int, until: asyncio.Event | None = None) -> list[float]:
            samples = []
            while len(samples) < n or (until is not None and not until.is_set()):
                t0 = time.perf_counter_ns()
                await engine.infer(HOT, {"x": x})
                samples.append((time.perf_counter_ns() - t0) / 1e3)
            return samples

        await hot(idle_n // 10)
        idle = await hot(idle_n)
        done, started = asyncio.Event(), asyncio.Event()

        busy_load_ms = []  # the big model's loads beside the small one's requests

        async def churn():  # at least `cycles`, and for as long as the samples take
            n = 0
            while n < cycles or not enough.is_set():
                t0 = time.perf_counter()
                await engine.load(BIG)
                if started.is_set():  # the first began before the requests
                    busy_load_ms.append((time.perf_counter() - t0) * 1e3)
                started.set()
                await engine.unload(BIG, keep_host=host)
                n += 1
                # At most one cycle per CHURN_PERIOD_S: a reload from the host
                # tier takes under a millisecond, and back-to-back cycles would
                # measure a worker doing nothing but swap one model.
                await asyncio.sleep(max(0.0, CHURN_PERIOD_S - (time.perf_counter() - t0)))
            done.set()

        enough = asyncio.Event()
        task = asyncio.ensure_future(churn())
        await started.wait()
        churning = True
        during = await hot(idle_n)
        enough.set()
        during += await hot(0, done)  # to the end of the last cycle
        churning = False
        await task
        beside_copies = []
        if copy_bytes:
            # The baseline of interference: no load at all, only another
            # process copying as many bytes as a load does, as often.
            hog = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _COPY_HOG, str(copy_bytes), str(CHURN_PERIOD_S))
            try:
                await asyncio.sleep(0.2)
                beside_copies = await hot(idle_n)
            finally:
                hog.kill()
                await hog.wait()
    phases = {k: statistics.median(p[k] for p in loads) * 1e3 for k in loads[0]}
    return {"worker_load_ms": statistics.median(sum(p.values()) for p in loads) * 1e3,
            "phases_ms": phases,
            "engine_load_ms": statistics.median(engine_ms),
            "busy_load_ms": statistics.median(busy_load_ms),
            "evict_ms": statistics.median(evict_ms),
            "hot_p99_idle_us": float(np.percentile(idle, 99)),
            "hot_p50_idle_us": float(np.percentile(idle, 50)),
            "hot_p99_during_loads_us": float(np.percentile(during, 99)),
            "hot_p50_during_loads_us": float(np.percentile(during, 50)),
            "hot_samples_during_loads": len(during),
            "hot_slowest_stages_us": _slowest_stages(hot_during),
            "hot_loader_states": _loader_states(hot_during),
            "hot_p99_beside_copies_us": (float(np.percentile(beside_copies, 99))
                                         if beside_copies else None),
            "first_map_s": first_map_s}


def _slowest_stages(requests: list[dict]) -> dict:
    """Where the slowest 1% of the small model's requests during loads spent
    their time (the median of each stage among them): in the front-end
    before the ring, waiting for the worker to take it, in the model, in
    the answer's way back to the front-end's loop, and after it.

    With MMENGINE_ACCOUNT_REQUESTS=1 the worker's stages are split by what
    its serving thread did (docs/observability.md): to_worker into the time
    until its wait ended (to_worker_wake) and from then on (to_worker_gil:
    taking the GIL back, the return to Python and the header's decode; tens
    of microseconds after a wake-up even with nothing else running); the
    model into time on a CPU (model_cpu), runnable and off one (model_runq),
    and neither (model_blocked: the GIL, locks, page faults that sleep).
    to_worker_runq is the thread's time runnable and off a CPU since its
    previous answer: its wake-up's wait for a core where it parked, and
    also the preemptions of its spinning where it spun (so it may exceed
    to_worker_wake). Each figure is the median over the slowest 1%, in µs:
    they need not add up."""
    timed = sorted((r for r in requests if r.get("t_sent") and all(r["worker_ns"])),
                   key=lambda r: r["end_ns"] - r["start_ns"])
    slowest = _slowest(timed)
    stages = {
        "front_end": lambda r: r["t_sent"] - r["start_ns"],
        "to_worker": lambda r: r["worker_ns"][0] - r["t_sent"],
        "model": lambda r: r["worker_ns"][1] - r["worker_ns"][0],
        "to_front_end": lambda r: r["worker_ns"][2] - r["worker_ns"][1],
        "answer": lambda r: r["end_ns"] - r["worker_ns"][2],
    }
    if slowest and all(r.get("account") for r in slowest):
        stages.update({
            "to_worker_wake": lambda r: r["account"]["t_woke"] - r["t_sent"],
            "to_worker_runq": lambda r: r["account"]["wait_runq_ns"],
            "to_worker_gil": lambda r: r["worker_ns"][0] - r["account"]["t_woke"],
            "model_cpu": lambda r: r["account"]["cpu_ns"],
            "model_runq": lambda r: r["account"]["runq_ns"],
            "model_blocked": lambda r: (r["worker_ns"][1] - r["worker_ns"][0]
                                        - r["account"]["cpu_ns"] - r["account"]["runq_ns"]),
        })
    return {k: statistics.median(f(r) for r in slowest) / 1e3 if slowest else None
            for k, f in stages.items()}


def _loader_states(requests: list[dict]) -> dict | None:
    """What the worker's loader thread was doing as the small model's
    requests during loads began (MMENGINE_ACCOUNT_REQUESTS=1: the account's
    `loader`), as fractions of all of them and of the slowest 1%: a state
    the slowest hold more of than all do is the one that delays them
    ("read": the load's readers copying a file, the GIL free; "load",
    "unload": the rest of those ops, which holds it)."""
    timed = sorted((r for r in requests if (r.get("account") or {}).get("loader")),
                   key=lambda r: r["end_ns"] - r["start_ns"])
    if not timed:
        return None

    def fractions(rs: list[dict]) -> dict[str, float]:
        counts = Counter(r["account"]["loader"] for r in rs)
        return {k: round(n / len(rs), 3) for k, n in counts.most_common()}

    return {"all": fractions(timed), "slowest": fractions(_slowest(timed))}


def _slowest(timed: list[dict]) -> list[dict]:
    """The slowest 1% (at least one) of requests sorted by duration."""
    return timed[-max(1, len(timed) // 100):]


def _first_map_s(segment: str, repeats: int) -> float:
    """How long a worker that has not mapped a host-tier segment yet takes
    to map it (what a load on another worker, or after a restart, costs
    beyond building the module): timed here, with the worker's function."""
    from mmengine.backends.safetensors import _map_host

    samples = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        flat, _ = _map_host(segment, "benchmark")
        samples.append(time.perf_counter() - t0)
        del flat  # unmapped once the last view is gone (not timed: a worker does it later)
    return statistics.median(samples[1:])


# -- the run -------------------------------------------------------------------------

def run(quick: bool) -> dict:
    root = repository(QUICK_WIDTH if quick else WIDTH)
    weights = root / BIG / "1" / "model.safetensors"
    nbytes = weights.stat().st_size
    repeats = 5 if quick else 10
    gb = nbytes / 1e9
    read_s(weights, 1)  # into the page cache
    memcpy = memcpy_s(nbytes, repeats)
    read = read_s(weights, repeats)
    torch_load = torch_load_s(root, repeats)
    st = safetensors_s(weights, repeats)
    idle_n, cycles = (2_000, 8) if quick else (5_000, 20)
    eng = uvloop.run(_engine(root, repeats, idle_n, cycles, host=False, copy_bytes=nbytes))
    tier = uvloop.run(_engine(root, repeats, idle_n, cycles, host=True))
    disk = gb / (eng["worker_load_ms"] / 1e3)
    host = gb / (tier["worker_load_ms"] / 1e3)
    return {
        "model_bytes": nbytes,
        "memcpy_gb_per_s": gb / memcpy,
        "read_gb_per_s": gb / read,
        "torch_load_gb_per_s": gb / torch_load,
        "safetensors_gb_per_s": gb / st if st else None,
        "disk_gb_per_s": disk,
        "host_gb_per_s": host,
        "host_first_map_gb_per_s": gb / tier["first_map_s"],
        "load_ms": eng["worker_load_ms"],
        "host_load_ms": tier["worker_load_ms"],
        "engine_load_ms": eng["engine_load_ms"],
        "busy_load_ms": eng["busy_load_ms"],
        "host_busy_load_ms": tier["busy_load_ms"],
        "load_phases_ms": eng["phases_ms"],
        "evict_ms": eng["evict_ms"],
        "demote_ms": tier["evict_ms"],
        "host_engine_load_ms": tier["engine_load_ms"],
        "hot_p50_idle_us": eng["hot_p50_idle_us"],
        "hot_p99_idle_us": eng["hot_p99_idle_us"],
        "hot_p50_during_loads_us": eng["hot_p50_during_loads_us"],
        "hot_p99_during_loads_us": eng["hot_p99_during_loads_us"],
        "hot_samples_during_loads": eng["hot_samples_during_loads"],
        "hot_p99_during_host_loads_us": tier["hot_p99_during_loads_us"],
        "hot_p99_beside_copies_us": eng["hot_p99_beside_copies_us"],
        "hot_slowest_stages_us": eng["hot_slowest_stages_us"],
        "hot_loader_states": eng["hot_loader_states"],
        "hot_host_slowest_stages_us": tier["hot_slowest_stages_us"],
        "hot_host_loader_states": tier["hot_loader_states"],
        "ratios": {
            "host_vs_memcpy": host / (gb / memcpy),
            "host_first_map_vs_memcpy": gb / tier["first_map_s"] / (gb / memcpy),
            "disk_vs_read": disk / (gb / read),
            "vs_torch_load": disk / (gb / torch_load),
            "evict_vs_load": eng["evict_ms"] / eng["worker_load_ms"],
            "interference": eng["hot_p99_during_loads_us"] / eng["hot_p99_idle_us"],
            "busy_load_vs_load": eng["busy_load_ms"] / eng["engine_load_ms"],
            "host_interference": tier["hot_p99_during_loads_us"] / tier["hot_p99_idle_us"],
            "copy_interference": eng["hot_p99_beside_copies_us"] / eng["hot_p99_idle_us"],
        },
        "note": "disk: loads with no host tier (each reads the file); host: loads of "
                "a model demoted to the host tier, which a CPU worker maps in place; "
                "safetensors.torch.load_file maps the file and reads no byte until a "
                "tensor is used, so its figure is not a read rate",
    }


def main() -> None:
    args = report.arguments(__doc__, quick="a 64 MiB model, fewer repeats").parse_args()
    report.emit(run(args.quick), args.json)


if __name__ == "__main__":
    main()
