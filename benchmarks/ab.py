"""Two or more checkouts' servers, timed in turns: an A/B of the serving path.

    python benchmarks/ab.py [--json] [--quick] [--unpinned | --beside-worker] [--rps]
        [--hogs N] [--http] BASE TREE [TREE ...]

Each argument is a checkout of mmengine with its compiled modules built (a
`git worktree` of another commit, built with `python setup.py build_ext
--inplace`); the first is the baseline. Every tree's `mmengine serve` runs
the same tiny MLP (64->32->16, one CPU worker) at once, and a raw-socket
client (one prebuilt frame, the answer read whole: no SDK work) sends each
server a round of requests in turn, one at a time, so that the machine's
drift falls on every tree alike. On these noisy two-core machines
overhead.py's runs, one server after another, moved by more than what a
change of a few microseconds does; in turns, two servers of one tree agreed
within 0.3-1.4 µs (0.5-2.6%): a difference smaller than that is noise.

Pinned by default: the client and the front-ends on the first CPU, the
workers on the last, where a client shares the front-end's CPU (anything
the front-end does after an answer, the client's next request waits for).
--beside-worker pins the client to the workers' CPU instead (where the
front-end, alone on its CPU, would sleep between requests: the scheduler's
other choice). --unpinned leaves them to the scheduler. --rps adds requests per second
with 64 in flight over 4 connections (the AsyncClient), in turns too.
--hogs N runs N busy processes (a Python loop each, left to the
scheduler), started before the servers: a machine shared with busy
neighbours. --http times KServe v2 over HTTP instead (the binary tensor
extension over a keep-alive connection, as overhead.py's http_binary);
--rps stays on the TCP protocol.

Keys: per tree (by its path), `p50_us`, `p90_us`, `p99_us` and
`round_p50s_us` (each round's median), and `spin_backoffs` where its
server counts them (its worker's `stats`); `ratios` = each tree's p50 (and
rps) over the baseline's, and `p50_paired`: the median of its rounds' p50s
over the baseline's in the same round (each pair ran a moment apart), with
`p50_paired_ci95`, a bootstrap 95% interval of that median (rough with
--quick's 8 rounds). The trees take the rounds in an order that turns, so
that none is always first. On these hosts one run's p50 ratio moved by ±3%
from run to run with no change (session 57): a change is shown where the
interval leaves out 1.
Prints one JSON object (the last line) with --json.
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop

import report  # benchmarks/report.py: the script's own folder is on sys.path
# overhead also puts the project on sys.path.
from overhead import (DIMS, MODEL, _answer, _p, _rps, http_exchange, kserve_request,
                      pin_server, server)

from mmengine import protocol  # noqa: E402
from mmengine.client import Client  # noqa: E402
from mmengine.demo import write_mlp  # noqa: E402


@contextlib.contextmanager
def hogs(n: int):
    """`n` busy processes while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _http_answer(sock: socket.socket, request: bytes) -> tuple[int, None]:
    """As overhead._answer, over HTTP/1.1 keep-alive: one whole request
    sent, its response read whole."""
    t0 = time.perf_counter_ns()
    http_exchange(sock, request, bytearray())
    return time.perf_counter_ns() - t0, None


def run(trees: list[Path], quick: bool, pinned: bool, rps: bool, busy: int = 0,
        beside_worker: bool = False, http: bool = False) -> dict:
    rounds, per_round = (8, 500) if quick else (24, 1000)
    x = np.random.default_rng(0).standard_normal((1, DIMS[0]), dtype=np.float32)
    if http:
        frame, exchange = kserve_request(x, binary=True), _http_answer
    else:
        frame = protocol.frame({"op": "infer", "model": MODEL, "id": 1,
                                "inputs": protocol.encode_tensors({"x": x})})
        exchange = _answer
    cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="mmengine-ab-") as tmp, \
            contextlib.ExitStack() as stack:
        stack.enter_context(hogs(busy))
        repo = Path(tmp)
        write_mlp(repo / MODEL, "safetensors", *DIMS)
        servers = [stack.enter_context(server(repo, "--workers", "1", root=tree))
                   for tree in trees]
        socks = []
        for address, proc in servers:
            if pinned:
                pin_server(proc.pid, cpus[0], cpus[-1])
            host, port = (proc.http_address if http else address).rsplit(":", 1)
            sock = stack.enter_context(socket.create_connection((host, int(port))))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
        if pinned:
            os.sched_setaffinity(0, {cpus[-1] if beside_worker else cpus[0]})
        samples: list[list[int]] = [[] for _ in trees]
        for sock in socks:  # warm: the model loaded, the paths taken
            for _ in range(per_round):
                exchange(sock, frame)
        pairs = list(zip(socks, samples))
        for r in range(rounds):  # in an order that turns: none always first
            turn = r % len(pairs)
            for sock, got in pairs[turn:] + pairs[:turn]:
                got += [exchange(sock, frame)[0] for _ in range(per_round)]
        rates: list[list[float]] = [[] for _ in trees]
        if rps:
            os.sched_setaffinity(0, set(cpus))
            for address, _ in servers:
                uvloop.run(_rps(address, x, 2_000))
            for _ in range(3 if quick else 6):
                for (address, _), got in zip(servers, rates):
                    got.append(uvloop.run(_rps(address, x, 5_000)))
        backoffs = []
        for address, _ in servers:
            with Client(address) as client:
                backoffs.append(client.stats()["workers"][0].get("spin_backoffs"))
    out: dict = {"pinned": pinned, "rounds": rounds, "requests_per_round": per_round,
                 "protocol": "http" if http else "tcp"}
    if pinned:
        out["client"] = "beside the worker" if beside_worker else "beside the front-end"
    base = None
    ratios = {}
    for tree, got, rate, backoff in zip(trees, samples, rates, backoffs):
        p50 = _p(got, 50) / 1e3
        row = {"p50_us": p50, "p90_us": _p(got, 90) / 1e3, "p99_us": _p(got, 99) / 1e3,
               "round_p50s_us": [round(statistics.median(got[i:i + per_round]) / 1e3, 2)
                                 for i in range(0, len(got), per_round)]}
        if rate:
            row["rps_c64"] = statistics.median(rate)
        if backoff is not None:
            row["spin_backoffs"] = backoff
        if base is None:
            base = row
        else:
            paired = [a / b for a, b in zip(row["round_p50s_us"], base["round_p50s_us"])]
            ratios[str(tree)] = {"p50": p50 / base["p50_us"],
                                 "p50_paired": statistics.median(paired),
                                 "p50_paired_ci95": median_ci95(paired)}
            if rate:
                ratios[str(tree)]["rps_c64"] = row["rps_c64"] / base["rps_c64"]
        out[str(tree)] = row
    out["ratios"] = ratios
    return out


def median_ci95(values: list[float], resamples: int = 2_000) -> list[float]:
    """A bootstrap 95% interval of the median of `values` (seeded: the
    same rounds give the same interval)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(resamples))
    return [round(medians[int(0.025 * resamples)], 4), round(medians[int(0.975 * resamples)], 4)]


def main() -> None:
    ap = report.arguments(__doc__)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--unpinned", action="store_true",
                       help="leave the client, front-ends and workers to the scheduler")
    where.add_argument("--beside-worker", action="store_true",
                       help="pin the client to the workers' CPU, not the front-ends'")
    ap.add_argument("--rps", action="store_true", help="also 64 in flight, in turns")
    ap.add_argument("--hogs", type=int, default=0, metavar="N",
                    help="N busy processes while the rounds run")
    ap.add_argument("--http", action="store_true",
                    help="time KServe v2 over HTTP keep-alive, not the TCP protocol")
    ap.add_argument("trees", nargs="+", type=Path, help="checkouts, the baseline first")
    args = ap.parse_args()
    trees = [t.resolve() for t in args.trees]
    for tree in trees:
        if not (tree / "mmengine" / "__init__.py").is_file():
            sys.exit(f"{tree}: not a checkout of mmengine")
    report.emit(run(trees, args.quick, not args.unpinned, args.rps, args.hogs,
                    args.beside_worker, args.http), args.json)


if __name__ == "__main__":
    main()
