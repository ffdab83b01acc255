"""Soak: Zipf traffic against a real `mmengine serve` whose memory budget
keeps it loading and evicting, while a random worker is SIGKILLed every few
seconds; most senders use the TCP SDK, `--http` of them KServe v2 over
keep-alive HTTP. Prints one JSON object; exits 1 if any request was lost (no
answer, or a failure that is not one of the engine's typed errors), any
answer was wrong, the server died, or it left segments or workers behind.

    python tools/soak.py --json --minutes 1
    python tools/soak.py --json --minutes 30 --models 32 --workers 2 --kill-every 20

What it measures, besides the counts of requests:

- rss: resident set size (psutil) of the front-end and of the worker at each
  index, after a warm-up ("start") and after the traffic stopped, before
  shutdown ("end"). A killed worker is replaced by a new process at the same
  index: `same_process` says whether start and end are one process.
- segments: the server's shared-memory segments (/dev/shm/mmengine-<pid>-*,
  for the front-end's pid and every worker pid seen) at start, at end, and
  what is left once the server has exited (must be none).
- fds: the front-end's open file descriptors at start and at end.
- A kill is survived when a new process is alive at the killed index and a
  model was loaded onto it after the kill, within RESTART_WINDOW_S.

The server is started and its output kept as the tests do (tests/conftest.py
`Server`), the models are the demo MLPs (mmengine/demo.py); the seed is in
the report, and --seed repeats a run's choices of models and victims.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
import uvloop  # noqa: E402

from conftest import Server, environ, live_pids  # noqa: E402
from mmengine import demo, shm  # noqa: E402
from mmengine.client import AsyncClient  # noqa: E402
from mmengine.errors import ErrorCode, MMEngineError, error_for  # noqa: E402

DIMS = (64, 256, 16)          # every model the same shape: ~83 KB of float32 weights
REQUEST_TIMEOUT_S = 10.0      # the server's deadline of a request
# A request with no answer this long after it was sent is lost: the server
# answers TIMEOUT at REQUEST_TIMEOUT_S, so only a dropped request waits this long.
ANSWER_WAIT_S = 2 * REQUEST_TIMEOUT_S + 5
RESTART_WINDOW_S = 30.0       # a killed worker must be back and loading within this
KILL_MARGIN_S = 5.0           # no kill in the last seconds of traffic
RESIDENT_FRACTION = 0.25      # the budgets together hold about this share of the models
TOL = dict(rtol=1e-4, atol=1e-4)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true",
                    help="print the report as JSON (the only form there is)")
    ap.add_argument("--minutes", type=float, default=1.0, help="traffic time (fractions too)")
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kill-every", type=float, default=10.0, metavar="S",
                    help="SIGKILL a random worker every S seconds (0: never)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    ap.add_argument("--http", type=int, default=2, metavar="N",
                    help="of the requests in flight, N go over KServe v2 HTTP (JSON, "
                         "keep-alive), the others over the TCP SDK")
    ap.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    ap.add_argument("--seed", type=int, default=None, help="default: a random one")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.models < 2 or args.workers < 1 or args.concurrency < 1 \
            or args.kill_every < 0 or not 0 <= args.http <= args.concurrency:
        ap.error("--minutes > 0, --models >= 2, --workers >= 1, --concurrency >= 1, "
                 "--kill-every >= 0, 0 <= --http <= --concurrency")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    return args


def write_repository(root: Path, n: int, workers: int) -> tuple[list[str], int]:
    """n demo models; the per-worker budget so that all workers together hold
    about RESIDENT_FRACTION of them (at the default high watermark)."""
    names = [f"m{i:03d}" for i in range(n)]
    for i, name in enumerate(names):
        demo.write_mlp(root / name, "safetensors", *DIMS, seed=i)
    model_bytes = (root / names[0] / "1" / "model.safetensors").stat().st_size
    per_worker = max(1, round(n * RESIDENT_FRACTION / workers))
    return names, int(per_worker * model_bytes / 0.8) + model_bytes // 2


class HttpClient:
    """One keep-alive KServe v2 connection, JSON both ways: infer() answers
    like the SDK's, a typed error (from the answer's code) included."""

    def __init__(self, address: tuple[str, int]):
        self.address = address
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def infer(self, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (key, x), = inputs.items()
        body = json.dumps({"inputs": [{"name": key, "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        if self.streams is None:
            self.streams = await asyncio.open_connection(*self.address)
        reader, writer = self.streams
        try:
            writer.write(b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: soak\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (name.encode(), len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            answer = json.loads(await reader.readexactly(length))
        except BaseException:
            self.close()  # the stream's state is unknown: the next call reconnects
            raise
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            code = ErrorCode.__members__.get(answer.get("code", ""))
            if code is None:
                raise RuntimeError(f"HTTP {status} without a typed error: {answer}")
            raise error_for(code, answer.get("error", ""))
        out = answer["outputs"][0]
        return {out["name"]: np.array(out["data"], np.float32).reshape(out["shape"])}

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


class Soak:
    def __init__(self, args: argparse.Namespace, server: Server, address, http_address,
                 names: list[str]):
        self.args = args
        self.server = server
        self.front_end = psutil.Process(server.proc.pid)
        self.address = address
        self.http_address = http_address
        self.names = names
        self.rng = random.Random(args.seed)
        self.weights = [1 / k ** args.zipf for k in range(1, len(names) + 1)]
        self.x = np.random.default_rng(args.seed).standard_normal(
            (2, DIMS[0])).astype(np.float32)
        self.expected = {name: demo.reference(self.x, *DIMS, seed=i)
                         for i, name in enumerate(names)}
        self.sent = self.answered = self.wrong = 0
        self.http_sent = self.http_answered = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.lost: collections.Counter[str] = collections.Counter()
        self.kills = self.survived = 0
        self.kill_log: list[dict] = []
        self.worker_pids: set[int] = set()
        self.server_died = False
        self.t0 = self.deadline = 0.0
        self.killing = True  # senders keep going while a kill is being checked

    # -- traffic ------------------------------------------------------------------

    async def _send_loop(self, client: AsyncClient | HttpClient) -> None:
        http = isinstance(client, HttpClient)
        while not self.server_died and (time.monotonic() < self.deadline or self.killing):
            name = self.rng.choices(self.names, self.weights)[0]
            self.sent += 1
            self.http_sent += http
            try:
                async with asyncio.timeout(ANSWER_WAIT_S) as waited:
                    out = await client.infer(name, {"x": self.x})
            except Exception as e:  # noqa: BLE001 - every outcome is counted
                if waited.expired():
                    self.lost["no answer"] += 1
                elif isinstance(e, MMEngineError):
                    self.failed[e.code.name] += 1
                else:
                    self.lost[type(e).__name__] += 1
                    await asyncio.sleep(0.05)  # a refused connection must not spin
                continue
            if np.allclose(out["y"], self.expected[name], **TOL):
                self.answered += 1
                self.http_answered += http
            else:
                self.wrong += 1

    async def _watch_server(self) -> None:
        while time.monotonic() < self.deadline or self.killing:
            if self.server.proc.poll() is not None:
                self.server_died = True
                return
            await asyncio.sleep(0.2)

    # -- kills --------------------------------------------------------------------

    async def _workers(self, control: AsyncClient) -> list[dict]:
        workers = (await control.stats(limit=0))["workers"]
        self.worker_pids.update(w["pid"] for w in workers if w["pid"])
        return workers

    async def _kill_loop(self, control: AsyncClient, t0: float) -> None:
        try:
            if not self.args.kill_every:
                return
            next_kill = t0 + self.args.kill_every
            while next_kill <= self.deadline - KILL_MARGIN_S and not self.server_died:
                await asyncio.sleep(max(0.0, next_kill - time.monotonic()))
                alive = [w for w in await self._workers(control) if w["alive"] and w["pid"]]
                if not alive:  # all restarting: try again shortly
                    next_kill = time.monotonic() + 0.5
                    continue
                victim = self.rng.choice(alive)
                killed_at = time.time()
                try:
                    os.kill(victim["pid"], 9)
                except ProcessLookupError:
                    continue  # died on its own meanwhile: not our kill
                self.kills += 1
                ok, why = await self._survived(control, victim, killed_at)
                self.survived += ok
                self.kill_log.append({"index": victim["index"], "pid": victim["pid"],
                                      "at_s": round(time.monotonic() - t0, 1),
                                      "survived": ok, **({} if ok else {"why": why})})
                next_kill = max(next_kill + self.args.kill_every, time.monotonic())
        finally:
            self.killing = False

    async def _survived(self, control: AsyncClient, victim: dict,
                        killed_at: float) -> tuple[bool, str]:
        """A new process at the victim's index, and a model loaded onto it."""
        index, limit = victim["index"], time.monotonic() + RESTART_WINDOW_S
        why = "not restarted"
        while time.monotonic() < limit and not self.server_died:
            now = next(w for w in await self._workers(control) if w["index"] == index)
            if now["alive"] and now["pid"] not in (None, victim["pid"]):
                why = "restarted, but nothing was loaded onto it"
                rows = (await control.stats())["models"]
                if any(r["worker"] == index and r["state"] == "resident"
                       and r["last_load_time"] > killed_at for r in rows):
                    return True, ""
            await asyncio.sleep(0.1)
        return False, why

    # -- measurements -------------------------------------------------------------

    async def _all_alive(self, control: AsyncClient, timeout: float) -> list[dict]:
        limit = time.monotonic() + timeout
        while True:
            workers = await self._workers(control)
            if all(w["alive"] for w in workers) or time.monotonic() > limit:
                return workers
            await asyncio.sleep(0.1)

    def _sample(self, workers: list[dict]) -> dict:
        per_worker = {}
        for w in workers:
            try:
                rss = psutil.Process(w["pid"]).memory_info().rss if w["pid"] else None
            except psutil.NoSuchProcess:
                rss = None
            per_worker[str(w["index"])] = {"pid": w["pid"], "rss": rss}
        return {"rss": self.front_end.memory_info().rss,
                "fds": self.front_end.num_fds(),
                "segments": len(segments_of({self.front_end.pid, *self.worker_pids})),
                "workers": per_worker}

    async def run(self) -> dict:
        duration = self.args.minutes * 60
        connections = min(self.args.concurrency, 4)
        async with AsyncClient(self.address, timeout=ANSWER_WAIT_S + 5,
                               connections=connections) as client, \
                AsyncClient(self.address, timeout=30) as control:
            await self._all_alive(control, 60)
            t0 = self.t0 = time.monotonic()
            self.deadline = t0 + duration
            https = [HttpClient(self.http_address) for _ in range(self.args.http)]
            tasks = [asyncio.ensure_future(self._send_loop(c)) for c in
                     [*https, *[client] * (self.args.concurrency - self.args.http)]]
            tasks += [asyncio.ensure_future(self._kill_loop(control, t0)),
                      asyncio.ensure_future(self._watch_server())]
            # The baseline after a warm-up: the first loads and the
            # allocators' first growth are not a leak.
            await asyncio.sleep(min(10.0, duration * 0.1))
            start = self._sample(await self._all_alive(control, RESTART_WINDOW_S))
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - t0
            for c in https:
                c.close()
            if self.server_died:
                return self._report(elapsed, start, None, None)
            end = self._sample(await self._all_alive(control, RESTART_WINDOW_S))
            stats = await control.stats()
        return self._report(elapsed, start, end, stats)

    def _report(self, elapsed: float, start: dict, end: dict | None,
                stats: dict | None) -> dict:
        report = {
            "seed": self.args.seed, "minutes": self.args.minutes,
            "models": len(self.names), "workers": self.args.workers,
            "kill_every_s": self.args.kill_every, "concurrency": self.args.concurrency,
            "duration_s": round(elapsed, 1),
            "sent": self.sent, "answered": self.answered,
            "http_sent": self.http_sent, "http_answered": self.http_answered,
            "failed_typed": dict(sorted(self.failed.items())),
            "lost": sum(self.lost.values()), "lost_by_reason": dict(self.lost),
            "wrong": self.wrong,
            "worker_kills": self.kills, "kills_survived": self.survived,
            "kills": self.kill_log,
            "server_died": self.server_died,
        }
        if end is None:
            return report
        workers = {}
        for index, s in start["workers"].items():
            e = end["workers"].get(index, {"pid": None, "rss": None})
            workers[index] = {
                "pid_start": s["pid"], "pid_end": e["pid"],
                "same_process": s["pid"] == e["pid"],
                "rss_start": s["rss"], "rss_end": e["rss"],
                "rss_growth": None if None in (s["rss"], e["rss"]) else e["rss"] - s["rss"]}
        totals = stats["totals"]
        report.update({
            "rss": {"front_end": {"pid": self.front_end.pid, "rss_start": start["rss"],
                                  "rss_end": end["rss"],
                                  "rss_growth": end["rss"] - start["rss"]},
                    "workers": workers},
            "segments_start": start["segments"], "segments_end": end["segments"],
            "fds_start": start["fds"], "fds_end": end["fds"],
            "loads": totals["loads"], "evictions": totals["evictions"],
            "hits": totals["hits"], "misses": totals["misses"],
            "worker_restarts": totals["worker_restarts"],
        })
        return report


def segments_of(pids) -> list[str]:
    """The segments whose names say one of `pids` created them (shm.py's
    naming); other servers on the machine have their own."""
    prefixes = tuple(f"{shm.PREFIX}{pid}-" for pid in pids)
    return [s for s in shm.list_segments() if s.startswith(prefixes)]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="mmengine-soak-") as tmp:
        names, budget = write_repository(Path(tmp), args.models, args.workers)
        server = Server("--repo", tmp, "--workers", str(args.workers), "--tcp-port", "0",
                        "--http-port", "0" if args.http else "-1",
                        "--device-budget", str(budget),
                        env=environ(MMENGINE_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S)))
        pid, soak = server.proc.pid, None
        try:
            try:
                m = server.wait_for(r"serving .* on tcp://(\S+):(\d+)", 120)
                h = server.wait_for(r"HTTP .* on http://(\S+):(\d+)", 60) if args.http else None
            except pytest.fail.Exception:  # conftest's way to say it never served
                report = {"seed": args.seed, "server_died": True, "lost": 0}
            else:
                soak = Soak(args, server, (m.group(1), int(m.group(2))),
                            h and (h.group(1), int(h.group(2))), names)
                try:
                    report = uvloop.run(soak.run())
                    report["device_budget"] = budget
                except (OSError, MMEngineError) as e:  # the server went away mid-run
                    soak.server_died = True
                    report = soak._report(time.monotonic() - soak.t0, None, None, None)
                    report["error"] = f"{type(e).__name__}: {e}"
        finally:
            died_before_stop = server.proc.poll() is not None
            try:
                code = server.stop(timeout=60)
            except Exception:  # noqa: BLE001 - it was killed; that is the report
                code = None
        report["server_died"] = report["server_died"] or died_before_stop
        report["server_exit_code"] = code
        worker_pids = soak.worker_pids if soak else set()
        left = segments_of({pid, *worker_pids})
        report["segments_after_stop"] = len(left)
        report["workers_left_after_stop"] = live_pids(worker_pids)
    failed = (report["lost"] or report.get("wrong") or report["server_died"] or code != 0
              or left or report["workers_left_after_stop"])
    if failed:
        sys.stderr.write("".join(server.output[-50:]))
    print(json.dumps(report, indent=None if args.json else 2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
