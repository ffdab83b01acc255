"""GET /metrics in the Prometheus text format or OpenMetrics.

Two sources, one registry per engine (never the process-wide one, so that
two engines in one process, or a test, never mix their series):

- Events, counted as they happen by an engine observer: requests by model
  and code with their latency, loads and their phases, evictions by reason,
  worker exits. The observer runs once per request on the event loop, so it
  keeps plain dicts and lists (about 1.8 µs a request here for a counter,
  two histograms and a version's sums, where one prometheus-client Counter
  and one Histogram child take 1.7 µs, 6 µs with `.labels()`); they become
  metric families only when scraped.
- State, read from `engine.stats()` when scraped: bytes per worker and per
  tier, resident models, requests in flight per worker (its queue depth),
  whether each worker is up, and each known model's residency state.

A scrape copies both on the loop (a millisecond for hundreds of models),
then formats them on a thread: with a few hundred models the text is
thousands of lines, whose formatting by prometheus-client took the loop
for ~0.3 ms a model (a 200 ms stall of every request at 300 models). The
families are ours (_Family), written by our own writer (_encode, ~0.6 µs
a line, where prometheus-client's took ~10); prometheus-client still
gives them to a registry's own scrape (`Metrics.registry`), and chooses
the format a scraper's Accept asks for.

`attach(engine)` starts the counting; `mmengine serve` calls it at start so
the counters cover the whole run. The handler attaches on first use where
nobody did (counting from then on). Counters start at zero when the engine
does; Prometheus' rate() handles the reset of a restarted server.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import math
import time
from bisect import bisect_left as _bisect_left  # once per request: no attribute look-up

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, UnknownMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from mmengine import heap, resources
from mmengine.engine import STATES, Engine
from mmengine.errors import ErrorCode
from mmengine.server.http import Response

PHASES = ("fetch", "deserialize", "copy", "warmup")
# Every code a request can be answered with: mmengine_responses_total has a
# series for each from the start, so that an alert on its increase sees the
# first error too (a series that appears at 1 shows no increase).
CODES = ("OK", *(c.name for c in ErrorCode), "CANCELLED")

REQUEST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 120.0)


class _Histogram:
    """Counts per bucket (not cumulative) and a sum: one list update per
    observation. Bucket i holds values <= bounds[i]; the last, +Inf."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[_bisect_left(self.bounds, value)] += 1
        self.sum += value

    def copy(self) -> "_Histogram":
        other = _Histogram(self.bounds)
        other.counts, other.sum = self.counts[:], self.sum
        return other

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for le, n in zip(_bounds(self.bounds), self.counts):
            total += n
            out.append((le, total))
        return out


COUNTER, GAUGE, HISTOGRAM, UNTYPED = "counter", "gauge", "histogram", "untyped"
OPENMETRICS = "application/openmetrics-text"


class _Family:
    """A metric family as a scrape makes it: its series, (label values,
    value), a histogram's value a _Histogram. Written by _encode, or as
    prometheus-client's family (metric()) for a registry's own scrape:
    prometheus-client's writer took ~10 µs a line, and a scrape of 2,000
    models is 150,000 lines."""

    __slots__ = ("name", "kind", "doc", "labels", "series")

    def __init__(self, name: str, kind: str, doc: str, labels: tuple[str, ...] = (),
                 value=None):
        self.name, self.kind, self.doc, self.labels = name, kind, doc, labels
        self.series: list[tuple[tuple, object]] = [] if value is None else [((), value)]

    def add(self, values: tuple, value) -> None:
        self.series.append((values, value))

    def metric(self):
        labels = list(self.labels)
        if self.kind == HISTOGRAM:
            family = HistogramMetricFamily(self.name, self.doc, labels=labels)
            for values, hist in self.series:
                family.add_metric(list(values), hist.buckets(), hist.sum)
            return family
        family = _CLASSES[self.kind](self.name, self.doc, labels=labels)
        for values, value in self.series:
            family.add_metric(list(values), value)
        return family


_CLASSES = {COUNTER: CounterMetricFamily, GAUGE: GaugeMetricFamily,
            UNTYPED: UnknownMetricFamily}


def _encode(families: list[_Family], openmetrics: bool) -> bytes:
    """The Prometheus text format (0.0.4), or OpenMetrics 1.0."""
    out = []
    for f in families:
        sample = f.name + "_total" if f.kind == COUNTER else f.name
        head = f.name if openmetrics else sample  # (OpenMetrics names a counter without it)
        kind = "unknown" if openmetrics and f.kind == UNTYPED else f.kind
        out.append(f"# HELP {head} {_escape(f.doc, openmetrics)}\n# TYPE {head} {kind}\n")
        names = f.labels
        order = sorted(range(len(names)), key=names.__getitem__)  # by name, as is usual
        for values, value in f.series:
            labels = ",".join([f'{names[i]}="{_escape(values[i], True)}"' for i in order])
            if f.kind != HISTOGRAM:
                out.append(f"{sample}{{{labels}}} {_number(value)}\n" if labels
                           else f"{sample} {_number(value)}\n")
                continue
            within = f"{sample}_bucket{{{labels}," if labels else f"{sample}_bucket{{"
            total = 0
            for le, n in zip(_bounds(value.bounds), value.counts):
                total += n
                out.append(f'{within}le="{le}"}} {float(total)!r}\n')
            labels = f"{{{labels}}}" if labels else ""
            out.append(f"{sample}_count{labels} {float(total)!r}\n{sample}_sum{labels} "
                       f"{_number(value.sum)}\n")
    if openmetrics:
        out.append("# EOF\n")
    return "".join(out).encode()


def _escape(text: str, quote: bool) -> str:
    """A label value (`quote`), or a HELP text: backslashes and line feeds
    escaped, and double quotes where `quote` (OpenMetrics' HELP too)."""
    if "\\" in text or "\n" in text or quote and '"' in text:
        text = text.replace("\\", "\\\\").replace("\n", "\\n")
        if quote:
            text = text.replace('"', '\\"')
    return text


def _number(value) -> str:
    value = float(value)  # 3.0, not 3: as prometheus-client writes them
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


@functools.lru_cache(maxsize=None)
def _bounds(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """A histogram's `le` values, +Inf last."""
    return (*map(floatToGoString, bounds), "+Inf")


class _ModelRequests:
    """One model's requests: counts and latency by code, compute time, and
    the seconds they waited before a worker had them (resolving the model,
    waiting for its load) and on it (behind its other requests)."""

    __slots__ = ("codes", "latency", "compute", "wait_s", "queue_s")

    def __init__(self):
        self.codes: dict[str, int] = {}
        # By code: errors answered at once must not read as fast answers
        # (series per model: one per code it has answered).
        self.latency: dict[str, _Histogram] = {}
        self.compute = _Histogram(REQUEST_BUCKETS)
        self.wait_s = self.queue_s = 0.0

    def ran(self, t_sent: int, t_recv: int, t_done: int, failed_call: dict | None = None
            ) -> None:
        """Counts a call its worker ran: its time waiting on the worker,
        behind the worker's other calls, and its own. `failed_call`: the
        joined call of it that failed first, which ran it, as Triton's
        queue stage has it (_count_version): no wait."""
        if failed_call:  # its time is the request's compute, as Triton's and the trace's
            t_recv -= failed_call["t_done"] - failed_call["t_recv"]
        self.compute.observe((t_done - t_recv) * 1e-9)
        self.queue_s += (t_recv - t_sent) * 1e-9


class _VersionRequests:
    """One model version's requests as Triton's statistics extension counts
    them (kserve.py's /stats): counts and cumulative nanoseconds. The
    stages of those answered OK, as Triton counts them: queue (from
    submission until the worker took it, a cold model's load included),
    compute (the model's call) and return (its answer back to the
    front-end)."""

    __slots__ = ("success", "success_ns", "fail", "fail_ns", "queue_ns", "compute_ns",
                 "return_ns", "last_ns", "calls")

    def __init__(self):
        self.success = self.success_ns = self.fail = self.fail_ns = 0
        self.queue_ns = self.compute_ns = self.return_ns = 0
        self.last_ns = 0  # time.monotonic_ns() of the last OK answer; 0: none
        # The model's calls: a request alone answered OK adds 1; each of a
        # joined call's n requests (batching.py), answered or late, 1/n,
        # and 1/n more where that call failed and they ran again alone.
        self.calls = 0.0


class Metrics:
    """The engine observer that counts, and the collector that reports."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests: dict[str, _ModelRequests] = {}           # model
        self._responses = dict.fromkeys(CODES, 0)                 # code
        self._versions: dict[tuple[str, int], _VersionRequests] = {}  # (model, version)
        self._loads: dict[tuple[str, str, str], int] = {}        # (model, version, source)
        self._load_failures: dict[tuple[str, str], int] = {}
        self._load_bytes: dict[str, int] = {}                    # worker
        self._load_seconds = _Histogram(LOAD_BUCKETS)
        self._phase_seconds = {p: _Histogram(LOAD_BUCKETS) for p in PHASES}
        self._evictions: dict[tuple[str, str, str], int] = {}    # (model, version, reason)
        self._evicted_bytes: dict[str, int] = {}                 # reason
        self._worker_exits: dict[str, int] = {}                  # worker
        self._resent: dict[str, int] = {}                        # worker
        self._late: dict[tuple[str], int] = {}                   # (model,)
        self._skipped: dict[tuple[str], int] = {}                # (model,)
        # The scrape being made, by content type: scrapers that come while
        # it is made share it (each took a copy of everything and formatted
        # it: 8 at once at 3,000 models took the front-end past 500 MB).
        self._scrapes: dict[str, asyncio.Future] = {}
        self.registry.register(self)

    # -- the observer: once per event, on the loop ------------------------------

    def __call__(self, kind: str, f: dict) -> None:
        if kind == "request":
            self._request(f)
        elif kind == "load":
            key = (f["model"], str(f["version"]))
            if "error" in f:
                self._load_failures[key] = self._load_failures.get(key, 0) + 1
                return
            key += (f.get("from", "disk"),)
            self._loads[key] = self._loads.get(key, 0) + 1
            worker = str(f["worker"])
            self._load_bytes[worker] = self._load_bytes.get(worker, 0) + f["bytes"]
            self._load_seconds.observe((f["end_ns"] - f["start_ns"]) / 1e9)
            for phase, seconds in (f.get("phases") or {}).items():
                if phase in self._phase_seconds:
                    self._phase_seconds[phase].observe(seconds)
        elif kind == "evict":
            reason = f["reason"]
            key = (f["model"], str(f["version"]), reason)
            self._evictions[key] = self._evictions.get(key, 0) + 1
            self._evicted_bytes[reason] = self._evicted_bytes.get(reason, 0) + f["bytes"]
        elif kind == "worker_exit":
            worker = str(f["worker"])
            self._worker_exits[worker] = self._worker_exits.get(worker, 0) + 1
            self._resent[worker] = self._resent.get(worker, 0) + f.get("resent", 0)
        elif kind == "late" or kind == "skipped":
            counts = self._late if kind == "late" else self._skipped
            key = (f["model"],)
            counts[key] = counts.get(key, 0) + 1
            worker_ns, failed_call = f.get("worker_ns"), f.get("failed_call")
            if worker_ns is not None and None not in worker_ns[:2]:
                # The call took its worker's time all the same, having waited
                # its turn there as an answered one does: a model whose calls
                # outlive their deadlines is slow, not missing.
                self._model(f["model"]).ran(f["t_sent"], worker_ns[0], worker_ns[1],
                                           failed_call)
            if f.get("batch") or failed_call:  # its call's others may have been answered
                v = self._version(f["model"], f["version"])
                if f.get("batch"):
                    v.calls += 1 / f["batch"]
                if failed_call:
                    v.calls += 1 / failed_call["batch"]
        elif kind == "forget":
            self._forget(f["model"], f["version"], f["last"])

    def _request(self, f: dict) -> None:
        code = f["code"]
        # A name that is not a model is the client's to choose: it must
        # not become a series of its own.
        model = "" if code == "MODEL_NOT_FOUND" else f["model"]
        m = self._model(model)
        m.codes[code] = m.codes.get(code, 0) + 1
        self._responses[code] = self._responses.get(code, 0) + 1
        latency = m.latency.get(code)
        if latency is None:
            latency = m.latency[code] = _Histogram(REQUEST_BUCKETS)
        latency.observe((f["end_ns"] - f["start_ns"]) * 1e-9)
        t_sent = f.get("t_sent")
        if t_sent is not None:  # a worker was sent it
            m.wait_s += (t_sent - f["start_ns"]) * 1e-9
        elif model:
            # Never sent: all its time was before a worker (a cold start
            # that ended in its TIMEOUT, its load's failure, its cancel):
            # left out, the mean wait read lowest when cold starts went worst.
            m.wait_s += (f["end_ns"] - f["start_ns"]) * 1e-9
        worker_ns = f.get("worker_ns")
        if worker_ns is not None and worker_ns[1] is not None:
            m.ran(t_sent, worker_ns[0], worker_ns[1], f.get("failed_call"))
        if model:
            self._count_version(model, f, worker_ns)

    def _forget(self, model: str, version: int, last: bool) -> None:
        """A version gone for good takes its series with it (every version
        ever published stayed in every scrape); the last one, its model's."""
        self._versions.pop((model, version), None)
        v = str(version)
        self._load_failures.pop((model, v), None)
        for counts in (self._loads, self._evictions):  # by source, by reason
            for key in [k for k in counts if k[:2] == (model, v)]:
                del counts[key]
        if last:
            self._forget_model(model)

    def _forget_model(self, model: str) -> None:
        self._requests.pop(model, None)
        self._late.pop((model,), None)
        self._skipped.pop((model,), None)

    def _prune(self, rows: list[dict]) -> list[dict]:
        """Forgets what the engine never will: its "forget" comes for a
        version that had a row in stats (`rows`: loaded, or failed), and
        requests refused before any load (a bad token) count a version that
        had none. Returns `rows`."""
        counted = {(r["name"], r["version"]) for r in rows}
        repo = self.engine.repo
        # Not listed yet may be there all the same: a version asked for by
        # number is looked for on disk before a scan lists it.
        for key in [k for k in self._versions if k not in counted and not repo.listed(*k)
                    and self.engine.version_of(*k) is None]:
            self._forget(*key, last=False)
        names = {name for name, _ in counted}
        models = {*self._requests, *(k[0] for k in self._late), *(k[0] for k in self._skipped)}
        for model in [m for m in models if m and m not in names and repo.gone(m)]:
            self._forget_model(model)
        return rows

    def _count_version(self, model: str, f: dict, worker_ns: tuple | None) -> None:
        version = f["version"]
        if worker_ns is None:  # no worker took it: the version asked for, which may be none
            version = self.engine.version_of(model, version)
            if version is None:
                return
        v = self._version(model, version)
        batch = f.get("batch")
        if batch:  # one of a joined call's answers, whatever its code: the call ran
            v.calls += 1 / batch
        failed_call = f.get("failed_call")
        if failed_call:  # run alone after its joined call failed, which ran too
            v.calls += 1 / failed_call["batch"]
        end = f["end_ns"]
        if f["code"] != "OK":
            v.fail += 1
            v.fail_ns += end - f["start_ns"]
            return
        v.last_ns = end  # as Triton's: the last inference made
        v.success += 1
        if not batch:
            v.calls += 1
        v.success_ns += end - f["start_ns"]
        if worker_ns is not None and None not in worker_ns:  # an answer always has them
            # Run alone after its joined call failed: that call ran its rows
            # too, after the worker took it. Its compute, as a joined call
            # that answered is each of its requests', not its queue.
            again = failed_call["t_done"] - failed_call["t_recv"] if failed_call else 0
            v.queue_ns += worker_ns[0] - f["start_ns"] - again
            v.compute_ns += worker_ns[1] - worker_ns[0] + again
            v.return_ns += worker_ns[2] - worker_ns[1]

    def _model(self, model: str) -> _ModelRequests:
        m = self._requests.get(model)
        if m is None:
            m = self._requests[model] = _ModelRequests()
        return m

    def _version(self, model: str, version: int) -> _VersionRequests:
        v = self._versions.get((model, version))
        if v is None:
            v = self._versions[(model, version)] = _VersionRequests()
        return v

    def version_stats(self, keys: list[tuple[str, int]] | None = None,
                      rows: list[dict] | None = None) -> list[dict]:
        """Triton's $model_stat for each (model, version) of `keys` (None:
        every one that was requested or is known to the engine, `rows` its
        engine.stats()["models"] if taken already), with its bytes on its
        worker as memory_usage."""
        return triton_stats(self.version_counts(keys, rows))

    def version_counts(self, keys: list[tuple[str, int]] | None = None,
                       rows: list[dict] | None = None) -> list[tuple]:
        """What version_stats() reports, copied on the loop for
        triton_stats() to format on any thread: (key, counts, memory)."""
        if keys is None:
            rows = {(r["name"], r["version"]): r for r in self._prune(
                self.engine.stats()["models"] if rows is None else rows)}
            keys = sorted(set(self._versions) | set(rows))
        else:  # not every model's row for one's (a dashboard asks model by model)
            rows = {key: self.engine.model_row(key) for key in keys}
        devices = {w.index: w.device for w in self.engine.pool.workers} \
            if self.engine.pool is not None else {}
        idle = _VersionRequests()
        out = []
        for key in keys:
            v = self._versions.get(key) or idle
            row = rows.get(key)
            memory = None
            if row is not None and row["state"] == "resident":
                memory = (devices.get(row["worker"], "cpu"), row["bytes"])
            out.append((key, (v.success, v.fail, v.success_ns, v.fail_ns, v.queue_ns,
                              v.compute_ns, v.return_ns, v.last_ns, round(v.calls)), memory))
        return out

    # -- the collector: once per scrape ------------------------------------------

    def snapshot(self) -> "_Scrape":
        """The counts and the engine's state as they are now; on the loop,
        where the observer changes them."""
        stats = self.engine.stats()
        self._prune(stats["models"])
        return _Scrape(self, stats)

    def collect(self):
        yield from self.snapshot().collect()

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape's body and its content type, made here and now."""
        return self.snapshot().exposition(accept)


class _Scrape:
    """One scrape's copy of a Metrics' counts and of engine.stats(), which
    a thread may format while the loop counts on."""

    def __init__(self, m: Metrics, stats: dict):
        self._requests = {model: (dict(r.codes),
                                  {code: h.copy() for code, h in r.latency.items()},
                                  r.compute.copy(), r.wait_s, r.queue_s)
                          for model, r in m._requests.items()}
        self._responses = dict(m._responses)
        self._loads, self._load_failures = dict(m._loads), dict(m._load_failures)
        self._load_bytes = dict(m._load_bytes)
        self._load_seconds = m._load_seconds.copy()
        self._phase_seconds = {p: h.copy() for p, h in m._phase_seconds.items()}
        self._evictions, self._evicted_bytes = dict(m._evictions), dict(m._evicted_bytes)
        self._worker_exits, self._resent = dict(m._worker_exits), dict(m._resent)
        self._late, self._skipped = dict(m._late), dict(m._skipped)
        self._versions = {key: (v.success, v.fail, v.success_ns, v.queue_ns, v.compute_ns,
                                v.return_ns, round(v.calls))
                          for key, v in m._versions.items()}
        self._stats = stats
        self._config = m.engine.config  # never changes: read on the formatting thread
        self._collections, self._paused_s = heap.collections()
        self._frozen = gc.get_freeze_count()

    def families(self) -> list[_Family]:
        return [*self._collect_events(), *self._collect_state(self._stats),
                *self._collect_triton(), *self._collect_heap()]

    def collect(self):
        """As prometheus-client's collectors do (a registry's own scrape)."""
        for family in self.families():
            yield family.metric()

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The body and its content type: the Prometheus text format, or
        OpenMetrics when the scraper asks for it (Prometheus does)."""
        _, content_type = choose_encoder(accept or "")
        return _encode(self.families(), content_type.startswith(OPENMETRICS)), content_type

    def _collect_events(self):
        c = _Family("mmengine_requests", COUNTER, "Inference requests answered, by model "
                    "and code (model is empty for MODEL_NOT_FOUND).", ("model", "code"))
        latency = _Family("mmengine_request_duration_seconds", HISTOGRAM, "Inference "
                          "requests from submission to answer, by model and code.",
                          ("model", "code"))
        compute = _Family("mmengine_request_compute_seconds", HISTOGRAM, "Time the worker "
                          "spent running the model, by model.", ("model",))
        wait = _Family("mmengine_request_load_wait_seconds", COUNTER, "Seconds requests "
                       "waited before they were sent to a worker (resolving the model, "
                       "waiting for its load: cold starts), by model.", ("model",))
        queue = _Family("mmengine_request_queue_seconds", COUNTER, "Seconds requests waited "
                        "on their worker before it ran them (behind its other requests), "
                        "by model.", ("model",))
        for model, (codes, took, ran, wait_s, queue_s) in sorted(self._requests.items()):
            for code, n in sorted(codes.items()):
                c.add((model, code), n)
            for code, hist in sorted(took.items()):
                latency.add((model, code), hist)
            if any(ran.counts):  # none for a model that never ran
                compute.add((model,), ran)
                queue.add((model,), queue_s)
            if model:
                wait.add((model,), wait_s)
        yield from (c, latency, compute, wait, queue)
        yield _counter("mmengine_responses", "Inference requests answered, by code (every "
                       "code from 0: alerts see the first error).", ["code"],
                       {(code,): n for code, n in self._responses.items()})
        yield _counter("mmengine_loads", "Models loaded, by model, version and source "
                       "(disk: the model's files; host: the host tier).",
                       ["model", "version", "source"], self._loads)
        # From 0 for every known version, so that the first failure shows.
        known = {(r["name"], str(r["version"])): 0 for r in self._stats["models"]}
        yield _counter("mmengine_load_failures", "Loads that failed, by model and version.",
                       ["model", "version"], {**known, **self._load_failures})
        yield _counter("mmengine_loaded_bytes", "Bytes of models loaded, by worker.",
                       ["worker"], {(k,): v for k, v in self._load_bytes.items()})
        yield _Family("mmengine_load_duration_seconds", HISTOGRAM, "Loads, from their start "
                      "(a remote model's fetch, the wait for room) to resident.",
                      value=self._load_seconds)
        h = _Family("mmengine_load_phase_seconds", HISTOGRAM, "Load phases as workers report "
                    "them: fetch, deserialize, copy (to the device), warmup.", ("phase",))
        for phase in PHASES:
            h.add((phase,), self._phase_seconds[phase])
        yield h
        yield _counter("mmengine_evictions", "Models evicted, by model, version and reason "
                       "(pressure, idle, unload, host_memory, gpu_memory, worker_exit, "
                       "removed, redeclared, too_large).",
                       ["model", "version", "reason"], self._evictions)
        yield _counter("mmengine_evicted_bytes", "Bytes of models evicted, by reason.",
                       ["reason"], {(k,): v for k, v in self._evicted_bytes.items()})
        # From 0 for every worker, so that the first exit shows.
        exits = {(str(w["index"]),): 0 for w in self._stats["workers"]}
        exits.update({(k,): v for k, v in self._worker_exits.items()})
        yield _counter("mmengine_worker_exits", "Worker processes that exited while "
                       "serving (each is restarted), by worker.", ["worker"], exits)
        resent = {k: 0 for k in exits}
        resent.update({(k,): v for k, v in self._resent.items()})
        yield _counter("mmengine_resent_requests", "Inferences a worker that exited had "
                       "never read, sent again to be served elsewhere (of other models "
                       "than the one it died running), by worker.", ["worker"], resent)
        yield _counter("mmengine_late_answers", "Inferences a worker ran to the end after "
                       "their request had failed (timed out, or cancelled): work nobody "
                       "got, by model.", ["model"], self._late)
        yield _counter("mmengine_skipped_requests", "Inferences a worker did not run: "
                       "their request had failed before it began them (timed out, or "
                       "cancelled), or had less time left than the model's calls take, "
                       "by model.", ["model"], self._skipped)

    def _collect_triton(self):
        """Triton's names, untyped: a counter would be written with a
        `_total` suffix, which Triton's own (and the queries of its
        dashboards) do not have; rate() takes them as they are."""
        for name, doc, index, divisor in TRITON_METRICS:
            family = _Family(name, UNTYPED, doc + " As Triton names it.", ("model", "version"))
            for (model, version), values in sorted(self._versions.items()):
                value = 0 if index is None else values[index]
                family.add((model, str(version)), value // divisor)
            yield family

    def _collect_heap(self):
        """The front-end process's garbage collector (mmengine/heap.py)."""
        generations = {(str(g),): n for g, n in enumerate(self._collections)}
        yield _counter("mmengine_front_end_gc_collections", "The front-end's garbage "
                       "collections since the metrics began, by generation (2: full).",
                       ["generation"], generations)
        yield _counter("mmengine_front_end_gc_pause_seconds", "Seconds the front-end "
                       "stood still in those collections, by generation.", ["generation"],
                       {(str(g),): s for g, s in enumerate(self._paused_s)})
        yield _Family("mmengine_front_end_gc_frozen_objects", GAUGE, "Objects of the "
                      "front-end's start, out of every collection's walk.",
                      value=self._frozen)

    def _collect_state(self, stats: dict):
        totals = stats["totals"]
        yield _Family("mmengine_cache_hits", COUNTER, "Requests whose model was resident.",
                      value=totals["hits"])
        yield _Family("mmengine_cache_misses", COUNTER, "Requests that waited for a load.",
                      value=totals["misses"])
        yield _Family("mmengine_resident_models", GAUGE, "Models resident on a worker.",
                      value=totals["resident_models"])
        yield _Family("mmengine_resident_bytes", GAUGE, "Bytes of the resident models.",
                      value=totals["resident_bytes"])

        labels = ("worker", "device")
        used = _Family("mmengine_worker_bytes", GAUGE, "Bytes of models on each worker, "
                       "loading ones included (their reservation).", labels)
        budget = _Family("mmengine_worker_budget_bytes", GAUGE, "Bytes of models each worker "
                         "may hold.", labels)
        in_flight = _Family("mmengine_worker_in_flight", GAUGE, "Requests sent to each worker "
                            "and not yet answered (its queue depth).", labels)
        waiting = _Family("mmengine_worker_waiting_turn", GAUGE, "Inferences in flight to each "
                          "worker that wait in the front-end for their model's turn.", labels)
        busy = _Family("mmengine_worker_busy_ratio", GAUGE, "Share of the last monitor "
                       "interval each worker spent running inferences.", labels)
        up = _Family("mmengine_worker_up", GAUGE, "1 while a worker's process serves.", labels)
        backoffs = _Family("mmengine_spin_backoffs", COUNTER, "Times a spinning wait "
                           "between the front-end and a worker found its CPU taken by "
                           "another busy process and began or lengthened a back-off (it "
                           "sleeps until woken meanwhile), by worker and by the side that "
                           "waited (worker: for requests; front_end: for answers).",
                           labels + ("waiter",))
        for w in stats["workers"]:
            values = (str(w["index"]), w["device"])
            used.add(values, w["used_bytes"])
            budget.add(values, w["budget_bytes"])
            in_flight.add(values, w["in_flight"])
            waiting.add(values, w["waiting_turn"])
            busy.add(values, w["busy"])
            up.add(values, int(w["alive"]))
            for waiter, n in w["spin_backoffs"].items():
                backoffs.add((*values, waiter), n)
        yield from (used, budget, in_flight, waiting, busy, up, backoffs)

        # Each server's counts (Listener.stats), by its key there.
        by_key = {key: _Family(name, kind, doc, ("server", "port")) for key, name, kind, doc in (
            ("connections", "mmengine_server_connections", GAUGE,
             "Connections open to each server."),
            ("max_connections", "mmengine_server_max_connections", GAUGE,
             "Connections each server takes at most (max_connections)."),
            ("refused", "mmengine_server_connections_refused", COUNTER,
             "Connections each server refused, max_connections being open."),
            ("lingers", "mmengine_server_lingers", COUNTER,
             "Times the loop turned on for up to poll_us after an answer, instead of "
             "sleeping, for a client that sent from another CPU."))}
        for srv in stats.get("servers", ()):
            for key, family in by_key.items():
                family.add((srv["server"], str(srv["port"])), srv[key])
        yield from by_key.values()

        tier_used = _Family("mmengine_tier_bytes", GAUGE, "Bytes of models in each tier "
                            "(device: all workers together).", ("tier",))
        tier_budget = _Family("mmengine_tier_budget_bytes", GAUGE, "Each tier's budget "
                              "(0: none).", ("tier",))
        tier_used.add(("device",), sum(w["used_bytes"] for w in stats["workers"]))
        tier_budget.add(("device",), sum(w["budget_bytes"] for w in stats["workers"]))
        for tier, key in (("host", "host_tier"), ("disk", "disk_cache")):
            tier_books = stats.get(key) or {}
            tier_used.add((tier,), tier_books.get("bytes", 0))
            tier_budget.add((tier,), tier_books.get("budget_bytes", 0))
        yield from (tier_used, tier_budget)

        state = _Family("mmengine_model_state", GAUGE, "1 for the residency state each known "
                        "model is in (one series per model).", ("model", "version", "state"))
        nbytes = _Family("mmengine_model_bytes", GAUGE, "Bytes each model takes (or has "
                         "reserved, while loading) on its worker.",
                         ("model", "version", "worker"))
        backoff = _Family("mmengine_model_backoff_seconds", GAUGE, "Seconds until a model "
                          "whose load failed is tried again (only models in a back-off).",
                          ("model", "version"))
        counts = dict.fromkeys(STATES, 0)
        queued = {}
        for row in stats["models"]:
            version = str(row["version"])
            state.add((row["name"], version, row["state"]), 1)
            counts[row["state"]] = counts.get(row["state"], 0) + 1
            if row["worker"] is not None:
                nbytes.add((row["name"], version, str(row["worker"])), row["bytes"])
            if row["retry_in_s"] > 0:
                backoff.add((row["name"], version), row["retry_in_s"])
            queued[row["name"]] = row["queued"]
        yield from (state, nbytes, backoff)
        family = _Family("mmengine_model_queued_requests", GAUGE, "Inference requests for "
                         "each known model (all its versions) accepted and not yet "
                         "answered: waiting for a load or a worker, or running.", ("model",))
        for name, n in sorted(queued.items()):
            family.add((name,), n)
        yield family
        by_state = _Family("mmengine_models", GAUGE, "Known models in each residency state.",
                           ("state",))
        for name, n in counts.items():
            by_state.add((name,), n)
        yield by_state

        watermarks = _Family(
            "mmengine_watermark_ratio", GAUGE, "Where eviction begins, the configured "
            "fraction of: device_budget (each worker's budget, high_watermark), host_memory "
            "(the memory the server may have: the container's where it has a limit), disk "
            "(the disk cache's disk).", ("resource",))
        c = self._config
        for resource, ratio in (("device_budget", c.high_watermark),
                                ("host_memory", c.host_memory_watermark),
                                ("disk", c.disk_watermark)):
            watermarks.add((resource,), ratio)
        yield watermarks
        yield _Family("mmengine_host_memory_ratio", GAUGE, "The memory in use (a container's "
                      "working set of its limit, where it has one), as the host_memory "
                      "watermark is compared with it.", value=resources.host_memory_fraction())


#: Triton's per-model request metrics, by the names its dashboards query:
#: (name, help, index in a _Scrape's version tuple, divisor to microseconds).
TRITON_METRICS = (
    ("nv_inference_request_success", "Requests answered OK.", 0, 1),
    ("nv_inference_request_failure", "Requests that failed.", 1, 1),
    ("nv_inference_count", "Inferences performed (one a request answered OK).", 0, 1),
    ("nv_inference_exec_count", "Model executions: one a request answered OK, and one "
     "a call that joined requests (a manifest's max_batch_size).", 6, 1),
    ("nv_inference_request_duration_us", "Cumulative time from submission to answer of "
     "requests answered OK, in microseconds.", 2, 1000),
    ("nv_inference_queue_duration_us", "Cumulative time from submission until a worker "
     "took the request (a cold model's load included), of requests answered OK, in "
     "microseconds.", 3, 1000),
    ("nv_inference_compute_input_duration_us", "Always 0: a worker's inputs are views "
     "of its request ring.", None, 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative time of the model's own "
     "calls for requests answered OK, in microseconds.", 4, 1000),
    ("nv_inference_compute_output_duration_us", "Cumulative time of answers through "
     "the response ring for requests answered OK, in microseconds.", 5, 1000),
)


def _counter(name: str, doc: str, labels: list[str], values: dict) -> _Family:
    c = _Family(name, COUNTER, doc, tuple(labels))
    for key, n in sorted(values.items()):
        c.add(key, n)
    return c


def triton_stats(counts: list[tuple]) -> list[dict]:
    """Triton's $model_stat of each of version_counts()."""
    # Wall-clock milliseconds, as Triton gives last_inference.
    wall_offset = time.time_ns() - time.monotonic_ns()

    def stat(count: int, ns: int) -> dict:
        return {"count": count, "ns": ns}
    out = []
    for (name, version), c, memory in counts:
        success, fail, success_ns, fail_ns, queue_ns, compute_ns, return_ns, last_ns, calls = c
        usage = []
        if memory is not None:
            kind, _, index = memory[0].partition(":")
            usage.append({"type": "GPU" if kind == "cuda" else "CPU",
                          "id": int(index or 0), "byte_size": memory[1]})
        out.append({
            "name": name, "version": str(version),
            "last_inference": (last_ns + wall_offset) // 1_000_000 if last_ns else 0,
            "inference_count": success, "execution_count": calls,
            "inference_stats": {
                "success": stat(success, success_ns),
                "fail": stat(fail, fail_ns),
                "queue": stat(success, queue_ns),
                "compute_input": stat(success, 0),
                "compute_infer": stat(success, compute_ns),
                "compute_output": stat(success, return_ns),
                "cache_hit": stat(0, 0), "cache_miss": stat(0, 0)},
            "response_stats": {}, "batch_stats": [], "memory_usage": usage})
    return out


def attach(engine: Engine) -> Metrics:
    """The engine's Metrics: the one among its observers, added on the
    first call."""
    engine.flush_observations()  # what was answered before this asked
    for observer in engine.observers:
        if isinstance(observer, Metrics):
            return observer
    metrics = Metrics(engine)
    engine.observers.append(metrics)
    heap.watch()  # the collector's pauses, from now on
    return metrics


async def handle_metrics(server, request) -> Response:
    m = attach(server.engine)
    accept = request.headers.get("accept")
    _, content_type = choose_encoder(accept or "")
    made = m._scrapes.get(content_type)
    if made is None:
        made = m._scrapes[content_type] = asyncio.ensure_future(_scrape(m, accept))
        made.add_done_callback(functools.partial(_scraped, m._scrapes, content_type))
    body, content_type = await asyncio.shield(made)  # one scraper leaving ends no one's
    return Response(200, body, content_type=content_type)


def _scraped(scrapes: dict, content_type: str, made: asyncio.Future) -> None:
    del scrapes[content_type]  # the next scraper makes a new one
    if not made.cancelled():
        made.exception()  # retrieved, were every scraper gone


async def _scrape(m: Metrics, accept: str | None) -> tuple[bytes, str]:
    """A scrape: copied on the loop, formatted on a thread."""
    stats = await m.engine.collect_stats()
    m._prune(stats["models"])
    scrape = _Scrape(m, stats)
    return await asyncio.get_running_loop().run_in_executor(None, scrape.exposition, accept)


ROUTES = [("GET", "/metrics", handle_metrics)]
