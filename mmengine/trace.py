"""Where a request's time went, and a Chrome trace of an engine's life.

`timing()` splits one request's life into the stages a profiling session
asks about; the servers add it to a response when the request asks for it
(`"timing": true` over TCP, `X-MMEngine-Timing: 1` over HTTP). Every
timestamp is `time.monotonic_ns()`: CLOCK_MONOTONIC is one clock for every
process of the machine, so the worker's stamps and the front-end's compare.

    t_submit   the server hands the request to Engine.submit
    t_sent     the engine hands it to the worker's request ring
    t_recv     the worker starts it (the tensors are views of the ring)
    t_done     the model has returned its outputs
    t_read     the front-end has read and copied the answer out of the ring
    t_encoded  the server has converted the outputs for its wire format

`Trace` is an engine observer that writes Chrome trace events (the JSON
array format; open the file in https://ui.perfetto.dev or chrome://tracing):
one process, "mmengine", and per worker a track of the model calls it ran
(tid = the worker's index) and tracks of its loads and evictions, plus
tracks of whole requests as the front-end saw them. Events are written in
whole-event chunks, so a file cut short (the server was killed) still opens
in the viewers, which accept an array without its closing bracket; `read()`
parses one too. After a clean stop (`close()`) the file is valid JSON.
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import stat
import time
from typing import Any, Mapping

#: The stages of `timing()`, in the order they happen; they sum to total_ns.
STAGES = ("load_wait_ns", "queue_ns", "compute_ns", "ring_ns", "encode_ns")
#: The joined calls of a worker remembered as drawn: far more than come
#: between the first and the last of one call's requests told.
JOINED_CALLS_KEPT = 256
#: An HTTP request with this header set to 1 gets a Server-Timing header back
#: (lower case, as the HTTP core keeps header names).
HTTP_HEADER = "x-mmengine-timing"


def timing(t_submit: int, worker_ns: tuple, t_encoded: int,
           t_sent: int | None = None, account: Mapping | None = None,
           batch: int | None = None, failed_call: Mapping | None = None) -> dict[str, int]:
    """One request's stages in nanoseconds, from the stamps above;
    `worker_ns` is (t_recv, t_done, t_read) as the engine reports it.

        load_wait  t_submit..t_sent   resolving the model, waiting for its load
                                      (microseconds for a resident model)
        queue      t_sent..t_recv     the request ring: writing it, waiting
                                      behind other requests, the worker waking
        compute    t_recv..t_done     the model itself
        ring       t_done..t_read     the answer through the response ring and
                                      copied out of it
        encode     t_read..t_encoded  outputs into the wire format

    Without t_sent, the load wait is counted in the queue. Without the
    worker's stamps (an answer that carries none) only total_ns is known.
    With the worker's `account` (Config.account_requests), compute is
    split further: compute_cpu_ns and compute_runq_ns, its serving
    thread's time on a CPU and runnable off one (not stages: the rest of
    compute is time it slept). `batch`, where the worker joined the
    request with others into one call (batching.py): how many.
    `failed_call`, where it ran alone again after such a call failed: that
    call ran it too, once the worker had taken it, and counts in its
    compute, not its queue (as the metrics count it).
    """
    out = {"total_ns": t_encoded - t_submit}
    t_recv, t_done, t_read = worker_ns if worker_ns else (None, None, None)
    if t_recv is None or t_done is None or t_read is None:
        return out
    t_sent = t_submit if t_sent is None else t_sent
    again = failed_call["t_done"] - failed_call["t_recv"] if failed_call else 0
    out.update(load_wait_ns=t_sent - t_submit, queue_ns=t_recv - t_sent - again,
               compute_ns=t_done - t_recv + again, ring_ns=t_read - t_done,
               encode_ns=t_encoded - t_read)
    if account:
        out.update(compute_cpu_ns=account["cpu_ns"], compute_runq_ns=account["runq_ns"])
    if batch:
        out["batch"] = batch
    return out


def body_timing(t_submit: int, body: Mapping, t_encoded: int | None = None) -> dict[str, int]:
    """timing() from the body of an engine answer (what Engine.submit's
    future gives: it carries the worker's stamps, t_read and t_sent)."""
    return timing(t_submit, (body.get("t_recv"), body.get("t_done"), body.get("t_read")),
                  time.monotonic_ns() if t_encoded is None else t_encoded,
                  body.get("t_sent"), body.get("account"), body.get("batch"),
                  body.get("failed_call"))


def durations(t: Mapping[str, int]) -> dict[str, int]:
    """timing()'s durations by stage name ("queue_ns" -> "queue"), in
    nanoseconds: not what is no duration (`batch`)."""
    return {k[:-3]: v for k, v in t.items() if k.endswith("_ns")}


def server_timing(t: Mapping[str, int]) -> str:
    """A `Server-Timing` header value (durations in milliseconds), which
    browsers' developer tools and most HTTP tooling show as they are."""
    return ", ".join(f"{k};dur={v / 1e6:.3f}" for k, v in durations(t).items())


# -- Chrome trace events -------------------------------------------------------

log = logging.getLogger("mmengine")

_FLUSH_EVENTS = 512      # write at least this often...
_FLUSH_S = 1.0           # ...and at most this long after an event arrived
# Track order: worker i's tracks sort from i * _TRACKS (its own, then its
# loads'), the requests' after every worker's (ten apart, a worker with ten
# load tracks sorted among the next worker's).
_TRACKS = 1 << 20
_REQUESTS = 1 << 40


class Trace:
    """An engine observer that writes Chrome trace events to `path`.

        trace = Trace("serve.trace.json")
        engine.observers.append(trace)
        ...
        engine.flush_observations(); engine.observers.remove(trace); trace.close()

    A track ("thread") holds spans that never overlap, as the viewers
    require: the calls of worker i are serial on its main thread and go to
    tid i; loads, and the spans of whole requests, overlap, so each goes to
    a track of its group that is free at its start, and a group grows a
    track when none is. Evictions and worker exits are instant
    events. Runs on the event loop: events are joined in memory and written
    with one os.write per chunk. About 20 µs a request (JSON encoding): a
    tool for profiling sessions, not for every server.
    """

    def __init__(self, path: str | os.PathLike, pid: int | None = None, begin: bool = True):
        """`begin=False`: `path` is opened (what is wrong with it raised
        here) and left as it is, the events kept, until begin(). A server
        begins once its ports are bound: a start that fails on them leaves
        alone the file of the server that has them."""
        self.path = os.fspath(path)
        self.pid = os.getpid() if pid is None else pid
        try:  # made here: a trace never begun leaves no file (close)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._made = True
        except FileExistsError:  # begin() empties it
            self._fd = os.open(self.path, os.O_WRONLY, 0o644)
            self._made = False
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        # group -> a heap of (busy until, tid) over the group's tracks
        self._lanes: dict[str, list[tuple[int, int]]] = {}
        self._next_tid = 1000                               # tids past the workers'
        self._calls: dict[int, dict[tuple[int, int], None]] = {}  # worker -> joined calls drawn
        self._first = True
        self._begun = False
        self._whole = 0  # the file's length up to its last whole event
        self.closed = False
        self._add({"ph": "M", "name": "process_name", "pid": self.pid, "tid": 0,
                   "args": {"name": "mmengine"}})
        if begin:
            self.begin()

    def begin(self) -> None:
        """Empties the file and writes the events so far."""
        if stat.S_ISREG(os.fstat(self._fd).st_mode):  # a FIFO or a terminal has none to empty
            os.ftruncate(self._fd, 0)
        self._begun = True
        self._write(b"[\n")
        self.flush()

    # -- the observer ------------------------------------------------------------

    def __call__(self, kind: str, f: dict) -> None:
        if self.closed:
            return
        if kind == "request":
            self._on_request(f)
        elif kind == "load":
            self._on_load(f)
        elif kind == "evict":
            self._instant(self._group_tid(f"worker {f['worker']} loads", f["start_ns"]),
                          f"evict {f['model']}", "evict", f["start_ns"],
                          {"model": f["model"], "version": f["version"],
                           "reason": f["reason"], "bytes": f["bytes"],
                           "for": f.get("for")})
        elif kind == "late":  # the call of a request that timed out meanwhile
            self._compute_span(f, f"{f['model']} (late)")
            self._failed_call_span(f)
        elif kind == "skipped":  # one its worker did not run: nobody would get it
            self._failed_call_span(f)
            self._instant(self._worker_tid(f["worker"]), f"{f['model']} (skipped)", "skipped",
                          f["at_ns"], {"model": f["model"], "version": f["version"]})
        elif kind == "worker_exit":
            self._instant(self._worker_tid(f["worker"]), "worker exit", "worker",
                          f["at_ns"], {"worker": f["worker"], "pid": f["pid"],
                                       "exit": f.get("exit"), "resent": f.get("resent", 0)})

    def _on_request(self, f: dict) -> None:
        args = {"model": f["model"], "version": f["version"], "code": f["code"]}
        worker_ns = f.get("worker_ns")
        if worker_ns and worker_ns[0] is not None and worker_ns[1] is not None:
            t = timing(f["start_ns"], worker_ns, f["end_ns"], f.get("t_sent"), f.get("account"),
                       f.get("batch"), f.get("failed_call"))
            args.update(t)
            self._failed_call_span(f)
            self._compute_span(f, f["model"])
        if f.get("worker") is not None:
            args["worker"] = f["worker"]
        self._span(self._group_tid("requests", f["start_ns"], f["end_ns"]), f["model"],
                   "request", f["start_ns"], f["end_ns"], args)

    def _compute_span(self, f: dict, name: str) -> None:
        """The model call on its worker's track, where the worker says when.
        A call that joined requests (`batch`) is one span, `model xN`, drawn
        with the first of them told here, late or not (each request's own
        end is on the requests' tracks). Its requests are told apart in
        time (a late one at once, an answered one later, OBSERVE_WITHIN_S
        at most), and another call's between them: the calls drawn are
        remembered, the last JOINED_CALLS_KEPT of each worker."""
        worker, worker_ns, batch = f.get("worker"), f.get("worker_ns"), f.get("batch")
        if worker is None or not worker_ns or None in worker_ns[:2]:
            return
        args = {"model": f["model"]}
        if batch:
            if not self._first_of_call(worker, worker_ns[0], worker_ns[1]):
                return
            name, args["batch"] = f"{f['model']} x{batch}", batch
        self._span(self._worker_tid(worker), name, "compute", worker_ns[0], worker_ns[1], args)

    def _failed_call_span(self, f: dict) -> None:
        """A joined call that failed, its requests then run alone (the
        `failed_call` of each), as _compute_span draws one that answered:
        `model xN (failed)`, with the first of them told."""
        call, worker = f.get("failed_call"), f.get("worker")
        if not call or worker is None or not self._first_of_call(worker, call["t_recv"],
                                                                  call["t_done"]):
            return
        self._span(self._worker_tid(worker), f"{f['model']} x{call['batch']} (failed)",
                   "compute", call["t_recv"], call["t_done"],
                   {"model": f["model"], "batch": call["batch"]})

    def _first_of_call(self, worker: int, t_recv: int, t_done: int) -> bool:
        """Whether the joined call of `worker` that ran from `t_recv` to
        `t_done` is told here for the first time: not drawn yet."""
        call = (t_recv, t_done)
        drawn = self._calls.setdefault(worker, {})
        if call in drawn:
            return False
        drawn[call] = None
        if len(drawn) > JOINED_CALLS_KEPT:
            del drawn[next(iter(drawn))]  # the oldest (a dict keeps their order)
        return True

    def _on_load(self, f: dict) -> None:
        start, end = f["start_ns"], f["end_ns"]
        # A load that failed before any worker took it goes to "loads".
        group = "loads" if f["worker"] is None else f"worker {f['worker']} loads"
        tid = self._group_tid(group, start, end)
        args = {"model": f["model"], "version": f["version"], "worker": f["worker"]}
        if "error" in f:
            args["error"] = f["error"]
        else:
            args.update(bytes=f["bytes"], phases=f.get("phases") or {}, source=f.get("from"))
        self._span(tid, f"load {f['model']}", "load", start, end, args)
        # The worker reports how long each phase took, not when: they are
        # laid end to end, ending with the load (off by the answer's trip);
        # but for the fetch, which began the load, before its wait for room.
        phases = f.get("phases") or {}
        t = end
        for phase in ("warmup", "copy", "deserialize"):
            seconds = phases.get(phase)
            if seconds:
                begin = max(start, t - int(seconds * 1e9))
                self._span(tid, phase, "load", begin, t, {})
                t = begin
        if phases.get("fetch"):
            self._span(tid, "fetch", "load", start, min(t, start + int(phases["fetch"] * 1e9)), {})

    # -- tracks --------------------------------------------------------------------

    def _worker_tid(self, index: int) -> int:
        group = f"worker {index}"
        if group not in self._lanes:
            self._lanes[group] = [(0, index)]
            self._name_thread(index, group, index * _TRACKS)
        return index

    def _group_tid(self, group: str, start: int, end: int | None = None) -> int:
        """A track of `group` free at `start` (the one free the longest),
        busy until `end` from now on; a new track when none is free. The
        tracks are a heap of (busy until, tid): O(log tracks) per span. An
        instant event (end None) takes no time: any track will do."""
        lanes = self._lanes.setdefault(group, [])
        if lanes and lanes[0][0] <= start:
            tid = lanes[0][1]
            if end is not None:
                heapq.heapreplace(lanes, (end, tid))
            return tid
        if end is None and lanes:
            return lanes[0][1]
        tid, n = self._next_tid, len(lanes)
        self._next_tid += 1
        words = group.split()
        base = int(words[1]) * _TRACKS + 1 if words[0] == "worker" else _REQUESTS
        self._name_thread(tid, group if n == 0 else f"{group} ({n + 1})", base + n)
        heapq.heappush(lanes, (end or 0, tid))
        return tid

    def _name_thread(self, tid: int, name: str, sort: int) -> None:
        self._add({"ph": "M", "name": "thread_name", "pid": self.pid, "tid": tid,
                   "args": {"name": name}})
        self._add({"ph": "M", "name": "thread_sort_index", "pid": self.pid, "tid": tid,
                   "args": {"sort_index": sort}})

    # -- events ----------------------------------------------------------------------

    def _span(self, tid: int, name: str, cat: str, start_ns: int, end_ns: int,
              args: dict) -> None:
        self._add({"ph": "X", "name": name, "cat": cat, "pid": self.pid, "tid": tid,
                   "ts": start_ns / 1e3, "dur": max(0, end_ns - start_ns) / 1e3,
                   "args": args})

    def _instant(self, tid: int, name: str, cat: str, at_ns: int, args: dict) -> None:
        self._add({"ph": "i", "s": "t", "name": name, "cat": cat, "pid": self.pid,
                   "tid": tid, "ts": at_ns / 1e3, "args": args})

    def _add(self, event: dict) -> None:
        text = json.dumps(event, separators=(",", ":"), default=str)
        self._pending.append(text if self._first else ",\n" + text)
        self._first = False
        if len(self._pending) >= _FLUSH_EVENTS:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # not on a loop (a test, a tool): flush() or close() writes
            self._timer = loop.call_later(_FLUSH_S, self.flush)

    def flush(self) -> None:
        """Writes what is pending, whole events only."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending and self._begun and self._fd >= 0:
            data = "".join(self._pending).encode()
            self._pending.clear()
            self._write(data)

    def _write(self, data: bytes) -> None:
        """Writes `data` whole. A write that fails (a full disk, a file size
        limit) ends the trace, said once: the file is cut back to its last
        whole event and closed, so that it still opens."""
        written = 0
        try:
            while written < len(data):  # a regular file takes it all at once, short of a full disk
                written += os.write(self._fd, data[written:])
        except OSError as e:
            self._give_up(e)
            return
        self._whole += written

    def _give_up(self, e: OSError) -> None:
        log.error("trace_file %s: %s: tracing stopped, the file keeps what came before",
                  self.path, e)
        self.closed = True
        self._pending.clear()
        try:
            if stat.S_ISREG(os.fstat(self._fd).st_mode):
                os.ftruncate(self._fd, self._whole)
                if self._whole:  # (its "[" is there)
                    os.pwrite(self._fd, b"\n]\n", self._whole)  # room: the cut gave some back
        except OSError:
            pass  # still the events' file: read() takes one cut short
        finally:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Writes the rest and the closing bracket: a valid JSON file (one
        never begun is left as it was, or not made)."""
        if self.closed:
            return
        if self._begun:
            self.flush()
            if not self.closed:  # (a write that failed closed it)
                self._write(b"\n]\n")
        if not self.closed:
            self.closed = True
            os.close(self._fd)
            self._fd = -1
            if not self._begun and self._made:  # an empty file is no trace
                with contextlib.suppress(OSError):
                    os.unlink(self.path)


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The events of a trace file, also one cut short (no closing bracket)."""
    with open(path, encoding="utf-8") as f:
        text = f.read().rstrip()
    if not text.endswith("]"):
        text = text.rstrip(",") + "]"
    return json.loads(text)
