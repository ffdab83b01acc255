"""Where a process's CPU goes for one request at a time, by function.

    python tools/perf_profile.py [--process front-end|worker|client] [--http]
                                 [--unpinned] [--seconds 4] [--focus NAME ...] [--json]

Serves the tiny MLP of benchmarks/overhead.py (one worker, as `mmengine serve`
runs it), sends it one SDK request at a time (with --http, one KServe v2
request at a time over a keep-alive connection, its tensors in the binary
extension, as overhead.py's http_binary), the client and the front-end on
the first CPU and the worker on the last as overhead.py and ab.py time them
(--unpinned: where the scheduler puts them), and records one of its
processes, or the client (this one), with `perf record --call-graph
dwarf` on the cpu-clock (virtual machines without hardware counters have
it; perf must be installed). The compiled
modules' functions carry their Cython names, so each one's share of the
process's samples is known: inclusive (it and all it calls) and its own.
`--focus NAME` (a substring of a function's name, `Worker.call`) also
splits that function's samples among the nearest named functions it calls.

The figures are shares of one process's samples, not times: perf's
unwinding slows every process several-fold (~4,000 requests a second here
against ~8,000 without it). The waiting is in them too: a worker's ring
get spins, the front-end's poll of the answers turns. Prints one JSON
object with --json.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent

WARM_UP = 2_000  # requests before perf starts
# Frames other than our functions that are worth a name: the socket's write
# and the wait for events.
NAMED_C = {"__GI___libc_write": "write(2)", "epoll_pwait": "epoll_pwait(2)"}


@functools.lru_cache(maxsize=None)
def python_name(symbol: str) -> str | None:
    """`mmengine.workers.Worker.call` from `__pyx_pw_8mmengine_7workers_6Worker_37call`;
    None for a symbol that is no Cython function of ours or uvloop's.

    Cython names each module and class by its length and then its name, and
    a function by its index and then its name: which one a number is, only
    the names that exist tell (`_Place_5leave_then` is `_Place.leave_then`,
    not `_Place.leave.then`), so each is looked up in what it names."""
    m = re.match(r"__pyx_(?:pw|pf|f)_(\d+(?:mmengine|uvloop)_.*)", symbol.split(".")[0])
    if not m:
        return NAMED_C.get(symbol)
    rest, parts, where = m.group(1), [], None
    while rest:
        tail = rest.lstrip("0123456789")
        if where is not None and hasattr(where, tail):  # an index, then the function's name
            parts.append(tail)
            break
        digits = len(rest) - len(tail)
        n = int(rest[:digits] or 0)
        name, after = tail[:n], tail[n:]
        if not digits or len(name) < n or after[:1] not in ("", "_"):
            parts.append(tail)  # a function no lookup finds (a cdef method, a lambda)
            break
        parts.append(name)
        rest = after[1:]
        where = _member(where, parts)
    return ".".join(parts).replace("__pyx_lambda_funcdef_", "")


def _member(where, parts: list[str]):
    """What `parts` name: a module (imported), or `where`'s attribute; None
    where neither is."""
    try:
        return importlib.import_module(".".join(parts))
    except ImportError:
        return getattr(where, parts[-1], None)


def stacks(data: Path) -> list[list[str]]:
    """Each sample's named frames, innermost first, each once."""
    # --no-inline: resolving inlined frames (addr2line over libtorch) took
    # a worker's 5,000 samples 15 minutes, against 3 s without.
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,sym", "--no-inline"],
                         capture_output=True, text=True, check=True).stdout
    samples = []
    for block in out.split("\n\n"):
        names = []
        for line in block.splitlines():
            fields = line.split(None, 1)
            name = python_name(fields[1].strip()) if len(fields) == 2 else None
            if name and name not in names:
                names.append(name)
        if block.strip():
            samples.append(names)
    return samples


def shares(samples: list[list[str]], focus: list[str]) -> dict:
    total = len(samples) or 1
    inclusive, own = collections.Counter(), collections.Counter()
    callees = {f: collections.Counter() for f in focus}
    for names in samples:
        inclusive.update(names)
        if names:
            own[names[0]] += 1
        for f in focus:
            at = [i for i, n in enumerate(names) if f in n]
            if at:  # the outermost frame that matches, and the nearest named one below it
                i = max(at)
                callees[f][names[i - 1] if i else "(its own)"] += 1
    pct = lambda c, n=30: {k: round(100 * v / total, 1) for k, v in c.most_common(n)}  # noqa: E731
    return {"samples": len(samples), "inclusive_pct": pct(inclusive), "own_pct": pct(own),
            "callees_pct": {f: pct(c, 12) for f, c in callees.items()}}


def record(process: str, seconds: float, frequency: int, data: Path, http: bool,
           pinned: bool) -> float:
    """Requests a second under perf, one at a time."""
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import overhead  # benchmarks/overhead.py: the server and its model

    from mmengine import Client
    from mmengine.demo import write_mlp

    x = np.random.default_rng(0).standard_normal((1, overhead.DIMS[0]), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="mmengine-profile-") as tmp:
        write_mlp(Path(tmp) / overhead.MODEL, "safetensors", *overhead.DIMS)
        with overhead.server(Path(tmp), "--workers", "1") as (address, proc), \
                contextlib.ExitStack() as stack:
            if http:
                host, port = proc.http_address.rsplit(":", 1)
                sock = stack.enter_context(socket.create_connection((host, int(port))))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                request, buf = overhead.kserve_request(x, binary=True), bytearray()

                def call():
                    overhead.http_exchange(sock, request, buf)
            else:
                client = stack.enter_context(Client(address))

                def call():
                    client.infer(overhead.MODEL, {"x": x})
            for _ in range(WARM_UP):  # the model loaded, every path warm
                call()
            workers = psutil.Process(proc.pid).children()
            away = None  # perf's own CPU: not the recorded process's, where it can
            if pinned:  # as overhead.py and ab.py time it
                cpus = sorted(os.sched_getaffinity(0))
                stack.enter_context(overhead.arranged(proc.pid, cpus[0], cpus[-1]))
                stack.enter_context(overhead.pinned(cpus[0]))
                if shutil.which("taskset"):
                    away = cpus[0] if process == "worker" else cpus[-1]
            pid = {"front-end": proc.pid, "worker": workers[0].pid, "client": os.getpid()}[process]
            # (taskset, not a preexec_fn: this process has threads by now)
            perf = subprocess.Popen([*(["taskset", "-c", str(away)] if away is not None else []),
                                     "perf", "record", "-q", "-F", str(frequency), "-e",
                                     "cpu-clock", "--call-graph", "dwarf,8192", "-o", str(data),
                                     "-p", str(pid)], stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # perf attached
            n, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < seconds:
                call()
                n += 1
            rate = n / (time.monotonic() - t0)
            perf.send_signal(2)
            perf.wait()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--process", choices=("front-end", "worker", "client"),
                    default="front-end")
    ap.add_argument("--http", action="store_true", help="KServe v2 over HTTP, not the SDK")
    ap.add_argument("--unpinned", action="store_true",
                    help="leave the processes to the scheduler (default: the client and the "
                         "front-end on the first CPU, the worker on the last)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--frequency", type=int, default=4000, help="samples a second")
    ap.add_argument("--focus", action="append", default=[], metavar="NAME")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if shutil.which("perf") is None:
        sys.exit("perf_profile.py: perf is not installed (apt-get install linux-perf)")
    with tempfile.TemporaryDirectory(prefix="mmengine-perf-") as tmp:
        data = Path(tmp) / "perf.data"
        rate = record(args.process, args.seconds, args.frequency, data, args.http,
                      not args.unpinned)
        result = {"process": args.process, "http": args.http,
                  "requests_per_s_under_perf": round(rate),
                  **shares(stacks(data), args.focus)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.process}: {result['samples']} samples, {rate:.0f} requests/s under perf")
    print("\n  incl %  own %  function")
    for name, p in result["inclusive_pct"].items():
        print(f"  {p:6.1f} {result['own_pct'].get(name, 0.0):6.1f}  {name}")
    for f, callees in result["callees_pct"].items():
        print(f"\n  {f}, by what it calls (% of all samples):")
        for name, p in callees.items():
            print(f"  {p:6.1f}  {name}")


if __name__ == "__main__":
    main()
