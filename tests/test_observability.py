"""Observability: /metrics over a real engine and a real HTTP server, the
timing breakdown of one request, and Chrome trace files."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from conftest import SLOW_HANDLER, Server, command, environ, run, until, write_handler
from mmengine import demo, protocol, trace
from mmengine.config import Config
from mmengine.engine import Engine
from mmengine.errors import BadRequest, LoadFailed, ModelNotFound, Timeout
from mmengine.server import metrics
from mmengine.server.http import HttpServer
from mmengine.server.tcp import TcpServer
from mmengine.storage import Repository

DIMS = (16, 64, 8)
MODELS = ("m00", "m01", "m02", "m03")
BROKEN_HANDLER = '''
def load(path, device):
    raise RuntimeError("this model cannot load")

def predict(inputs):
    return inputs
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    for i, name in enumerate(MODELS):
        demo.write_mlp(root / name, "safetensors", *DIMS, seed=i)
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "handler.py").write_text(BROKEN_HANDLER)
    # A load that fails before any worker takes it: a manifest that is not one.
    write_handler(root, "garbled", BROKEN_HANDLER, 'bytes = "lots"\n')
    return root


async def scrape(port: int, accept: str | None = None) -> tuple[str, str]:
    """GET /metrics over a raw socket: (content type, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    if accept:
        head += f"Accept: {accept}\r\n"
    writer.write((head + "\r\n").encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    header, _, body = data.partition(b"\r\n\r\n")
    lines = header.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK", lines[0]
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert int(fields["Content-Length"]) == len(body)
    return fields["Content-Type"], body.decode()


def samples(text: str) -> dict[str, dict[tuple, float]]:
    """sample name -> {sorted label items: value}."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


async def scraped(engine: Engine) -> dict[str, dict[tuple, float]]:
    """samples() of one scrape of `engine`'s /metrics (metrics attached)."""
    server = HttpServer(engine, metrics.ROUTES)
    port = await server.start("127.0.0.1", 0)
    try:
        return samples((await scrape(port))[1])
    finally:
        await server.stop()


def test_metrics_and_trace_follow_the_engine(repo, tmp_path, own_segments):
    nbytes = Repository(repo).resolve("m00").estimated_bytes
    # One worker that holds two of the four models: a round over them evicts.
    budget = 3 * nbytes + 100  # under the high watermark (80%): two models
    config = Config(repo=str(repo), workers=1, device_budget=budget,
                    monitor_interval_s=0.1, request_timeout_s=60)
    path = tmp_path / "trace.json"
    x = {"x": np.ones((2, DIMS[0]), np.float32)}

    async def main():
        async with Engine(config) as engine:
            m = metrics.attach(engine)
            assert metrics.attach(engine) is m and engine.observers.count(m) == 1
            tracer = trace.Trace(path)
            engine.observers.append(tracer)
            server = HttpServer(engine, metrics.ROUTES)
            port = await server.start("127.0.0.1", 0)
            try:
                for _ in range(2):
                    for name in MODELS:
                        await engine.infer(name, x)
                        await engine.infer(name, x)
                await asyncio.gather(*(engine.infer("m03", x) for _ in range(8)))
                with pytest.raises(ModelNotFound):
                    await engine.infer("no-such-model", x)
                # Whatever a stranger's request is answered (here its deadline
                # passes before its name is looked up), its name makes no series.
                with pytest.raises((Timeout, ModelNotFound)):
                    await engine.infer("no-such-model-either", x, timeout=1e-6)
                with pytest.raises(Exception):
                    await engine.infer("broken", x)
                with pytest.raises(LoadFailed):
                    await engine.infer("garbled", x)
                for version in (0, -3, "1", True):  # refused at once: no version of m00
                    with pytest.raises(BadRequest):
                        await engine.infer("m00", x, version=version)
                await engine.unload("m03")
                await engine.infer("m00", x)
                by_version = {(s["name"], s["version"]): s for s in m.version_stats()}
                content_type, text = await scrape(port)
                om_type, om_text = await scrape(port, "application/openmetrics-text; "
                                                "version=1.0.0")
                return engine.stats(), content_type, text, om_type, om_text, by_version
            finally:
                await server.stop()
                engine.observers.remove(tracer)
                tracer.close()

    stats, content_type, text, om_type, om_text, by_version = run(main(), timeout=60)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert om_type.startswith("application/openmetrics-text")
    assert {f.name for f in parse_om(om_text)} >= {"mmengine_requests", "mmengine_loads"}
    got = samples(text)
    rows = {(r["name"], str(r["version"])): r for r in stats["models"]}
    totals = stats["totals"]

    # Requests, by model and code; the unknown name is not a series of its own.
    requests = got["mmengine_requests_total"]
    ok = sum(v for k, v in requests.items() if ("code", "OK") in k)
    # Every request that waited for a load is a miss, served or not: broken's too.
    assert ok + 1 == totals["hits"] + totals["misses"] == 2 * 2 * len(MODELS) + 8 + 1 + 1
    assert requests[(("code", "MODEL_NOT_FOUND"), ("model", ""))] == 1
    assert requests[(("code", "LOAD_FAILED"), ("model", "broken"))] == 1
    assert requests[(("code", "LOAD_FAILED"), ("model", "garbled"))] == 1
    assert not any(dict(k)["model"].startswith("no-such") for k in requests)
    assert sum(v for k, v in requests.items() if ("model", "") in k) == 2
    # Every code from zero, without a model: alerts see the first error.
    responses = got["mmengine_responses_total"]
    assert set(responses) == {(("code", c),) for c in metrics.CODES}
    assert responses[(("code", "UNAUTHORIZED"),)] == 0
    for (code,) in {tuple(v for k, v in key if k == "code") for key in requests}:
        assert responses[(("code", code),)] == sum(
            v for k, v in requests.items() if ("code", code) in k)
    # Latency by code: a model that fails at once must not look fast.
    latency = got["mmengine_request_duration_seconds_count"]
    assert latency == requests
    assert got["mmengine_request_compute_seconds_count"][(("model", "m03"),)] == 12
    # The same requests under Triton's names, by model and version, as its
    # dashboards query them (no _total: Triton's have none).
    m03 = (("model", "m03"), ("version", "1"))
    assert got["nv_inference_request_success"][m03] == 12
    assert got["nv_inference_count"][m03] == got["nv_inference_exec_count"][m03] == 12
    assert got["nv_inference_request_failure"][(("model", "broken"), ("version", "1"))] == 1
    assert sum(got["nv_inference_request_success"].values()) == ok
    assert got["nv_inference_request_duration_us"][m03] > \
        got["nv_inference_compute_infer_duration_us"][m03] > 0
    assert got["nv_inference_compute_input_duration_us"][m03] == 0
    # Before the worker had them (a cold start's load) and on it: the two
    # parts of Triton's queue time (m03's requests were all answered OK).
    wait = got["mmengine_request_load_wait_seconds_total"][(("model", "m03"),)]
    queued = got["mmengine_request_queue_seconds_total"][(("model", "m03"),)]
    assert wait > 0 and queued > 0
    assert abs((wait + queued) * 1e6 - got["nv_inference_queue_duration_us"][m03]) < 2
    assert (("model", ""),) not in got["mmengine_request_load_wait_seconds_total"]
    # A cold start that ended in its load's failure waited all its life
    # (it was left out, and the mean wait read lowest when loads failed).
    assert got["mmengine_request_load_wait_seconds_total"][(("model", "broken"),)] > 0
    # Durations of the requests answered OK only, as Triton's: over the
    # success count, their mean (a failure's time would raise it).
    assert got["nv_inference_request_duration_us"][(("model", "broken"), ("version", "1"))] == 0
    assert not any(dict(k)["model"].startswith("no-such")
                   for k in got["nv_inference_request_failure"])
    # Only versions the repository has: the refused ones name none (they are
    # BAD_REQUEST in mmengine_requests_total), and a model whose files
    # cannot be read counts its failures under its version.
    assert {v for n, v in by_version if n == "m00"} == {"1"}, sorted(by_version)
    assert requests[(("code", "BAD_REQUEST"), ("model", "m00"))] == 4
    assert by_version[("garbled", "1")]["inference_stats"]["fail"]["count"] == 1
    assert by_version[("m03", "1")]["execution_count"] == 12
    assert got["mmengine_cache_hits_total"][()] == totals["hits"]
    assert got["mmengine_cache_misses_total"][()] == totals["misses"]

    # Loads and evictions, as stats() counts them.
    loads = {}  # by model and version, whatever the source
    for key, n in got["mmengine_loads_total"].items():
        labels = dict(key)
        assert labels["source"] in ("disk", "host"), key
        at = (("model", labels["model"]), ("version", labels["version"]))
        loads[at] = loads.get(at, 0) + n
    assert loads == {
        (("model", n), ("version", v)): r["loads"] for (n, v), r in rows.items() if r["loads"]}
    assert sum(n for key, n in got["mmengine_loads_total"].items()
               if ("source", "host") in key) == totals["loads_from_host"]
    assert got["mmengine_load_duration_seconds_count"][()] == totals["loads"]
    # Each failed load that stats() counts, where it failed whatever; every
    # known version has a series from zero, so that its first failure shows.
    assert got["mmengine_load_failures_total"] == {
        (("model", n), ("version", v)): r["failures"] for (n, v), r in rows.items()}
    assert {k for k, v in got["mmengine_load_failures_total"].items() if v} == {
        (("model", "broken"), ("version", "1")), (("model", "garbled"), ("version", "1"))}
    # The models in their back-off say for how long.
    backoff = got["mmengine_model_backoff_seconds"]
    assert set(backoff) == {(("model", "broken"), ("version", "1")),
                            (("model", "garbled"), ("version", "1"))}
    assert all(0 < s <= 5 for s in backoff.values())
    evictions = got["mmengine_evictions_total"]
    assert sum(evictions.values()) == totals["evictions"] >= len(MODELS)
    for (n, v), r in rows.items():
        for reason, count in r["evictions_by_reason"].items():
            assert evictions[(("model", n), ("reason", reason), ("version", v))] == count
    assert evictions[(("model", "m03"), ("reason", "unload"), ("version", "1"))] == 1

    # State, read at scrape time.
    assert totals["resident_models"] >= 1
    assert got["mmengine_resident_models"][()] == totals["resident_models"]
    assert got["mmengine_resident_bytes"][()] == totals["resident_bytes"]
    (w,) = stats["workers"]
    wl = (("device", w["device"]), ("worker", "0"))
    assert got["mmengine_worker_bytes"][wl] == w["used_bytes"] == totals["resident_bytes"]
    assert got["mmengine_worker_budget_bytes"][wl] == w["budget_bytes"] == budget
    assert got["mmengine_worker_in_flight"][wl] == 0
    assert 0.0 <= got["mmengine_worker_busy_ratio"][wl] <= 1.0  # sampled by the monitor
    assert got["mmengine_worker_up"][wl] == 1
    assert set(w["spin_backoffs"]) == {"worker", "front_end"}
    for waiter, n in w["spin_backoffs"].items():  # both sides, from zero; stats() came after
        key = (("device", w["device"]), ("waiter", waiter), ("worker", "0"))
        assert 0 <= got["mmengine_spin_backoffs_total"][key] <= n
    assert got["mmengine_worker_exits_total"] == {(("worker", "0"),): 0}  # from zero
    assert got["mmengine_tier_bytes"][(("tier", "device"),)] == w["used_bytes"]
    assert (("tier", "host"),) in got["mmengine_tier_bytes"]
    state = got["mmengine_model_state"]
    assert {(dict(k)["model"], dict(k)["state"]) for k in state} == {
        (r["name"], r["state"]) for r in stats["models"]}
    assert (("model", "broken"), ("state", "failed"), ("version", "1")) in state
    by_state = got["mmengine_models"]
    assert set(dict(k)["state"] for k in by_state) == set(metrics.STATES)
    assert by_state[(("state", "resident"),)] == totals["resident_models"]
    assert by_state[(("state", "on storage"),)] == sum(
        r["state"] == "on storage" for r in stats["models"])
    # Nothing queued now, for every known model; where eviction begins.
    assert got["mmengine_model_queued_requests"] == {
        (("model", n),): 0 for n in {r["name"] for r in stats["models"]}}
    assert got["mmengine_watermark_ratio"] == {
        (("resource", "device_budget"),): 0.8, (("resource", "host_memory"),): 0.8,
        (("resource", "disk"),): 0.8}
    assert 0 < got["mmengine_host_memory_ratio"][()] < 1

    # The trace: valid JSON once closed, with what happened on its tracks.
    events = json.loads(path.read_text())
    assert events == trace.read(path)
    check_tracks(events)
    assert any(e["ph"] == "M" and e["name"] == "process_name"
               and e["args"]["name"] == "mmengine" for e in events)
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"requests", "worker 0 loads"} <= names
    spans = [e for e in events if e["ph"] == "X"]
    assert sum(e["cat"] == "request" for e in spans) == sum(requests.values())
    load_spans = [e for e in spans if e["cat"] == "load" and e["name"].startswith("load ")]
    assert len(load_spans) == totals["loads"] + 2  # the broken two, with their errors
    failed = {e["args"]["model"]: e for e in load_spans if "error" in e["args"]}
    assert set(failed) == {"broken", "garbled"}
    assert failed["garbled"]["args"]["worker"] is None  # no worker took it
    assert "bytes" in failed["garbled"]["args"]["error"]
    evicts = [e for e in events if e["ph"] == "i" and e["cat"] == "evict"]
    assert len(evicts) == totals["evictions"]
    # An eviction to make room names the model it made room for; one asked
    # for (unload) names none.
    assert all(re.fullmatch(r"m0\d v1", e["args"]["for"]) for e in evicts
               if e["args"]["reason"] == "pressure") and any(
        e["args"]["reason"] == "pressure" for e in evicts), evicts
    assert all(e["args"]["for"] is None for e in evicts if e["args"]["reason"] == "unload")
    ok_requests = [e for e in spans if e["cat"] == "request" and e["args"]["code"] == "OK"]
    assert all(e["args"]["compute_ns"] >= 0 and e["args"]["queue_ns"] >= 0
               and e["args"]["load_wait_ns"] >= 0 for e in ok_requests)
    compute = [e for e in spans if e["cat"] == "compute"]
    assert len(compute) == len(ok_requests) and {e["tid"] for e in compute} == {0}
    assert got["mmengine_load_phase_seconds_count"][(("phase", "deserialize"),)] == \
        totals["loads"]


def check_tracks(events: list[dict]) -> None:
    """Complete events on one track never overlap unless one holds the
    other, which is what the viewers require (to a nanosecond: ts and dur
    are float microseconds)."""
    by_tid: dict[int, list] = {}
    for e in events:
        if e["ph"] == "X":
            by_tid.setdefault(e["tid"], []).append((e["ts"], -e["dur"], e))
    for tid, spans in by_tid.items():
        open_ends: list[float] = []
        for ts, neg_dur, e in sorted(spans, key=lambda s: s[:2]):
            while open_ends and open_ends[-1] <= ts + 1e-3:
                open_ends.pop()
            end = ts - neg_dur
            assert not open_ends or end <= open_ends[-1] + 1e-3, (tid, e)
            open_ends.append(end)


def test_a_model_refused_before_its_look_up_is_counted_under_its_name(repo, own_segments):
    # Refused before the engine had looked it up (bad inputs; a full queue),
    # a model's request was counted as a stranger's: model="", and in none
    # of its nv_* series (a review's finding). A scan's listing names it.
    async def main():
        async with Engine(Config(repo=str(repo), workers=1, repo_scan_s=0.1)) as engine:
            metrics.attach(engine)
            await until(lambda: engine.repo.lists("m01"), 10, "a scan")
            with pytest.raises(BadRequest):
                await engine.infer("m01", {})
            with pytest.raises(BadRequest):
                await engine.infer("stranger", {})
            return await scraped(engine)

    got = run(main(), timeout=60)
    requests = got["mmengine_requests_total"]
    assert requests[(("code", "BAD_REQUEST"), ("model", "m01"))] == 1
    assert requests[(("code", "BAD_REQUEST"), ("model", ""))] == 1  # the stranger's
    assert got["nv_inference_request_failure"][(("model", "m01"), ("version", "1"))] == 1


def test_inputs_a_worker_refuses_are_no_call_of_the_model(repo, own_segments):
    # Refused by the worker's check before the model ran, a request was
    # counted in the compute histogram and traced as a call (a review's
    # finding), and its microseconds taught the worker the model was fast.
    x = np.ones((2, DIMS[0]), np.float32)

    async def main():
        async with Engine(Config(repo=str(repo), workers=1)) as engine:
            metrics.attach(engine)
            for _ in range(2):
                await engine.infer("m02", {"x": x})
            for bad in ({"x": x.astype(np.float64)}, {"x": x[:, :3]}, {"z": x}):
                with pytest.raises(BadRequest):
                    await engine.infer("m02", bad)  # resident: the worker's to refuse
            return await scraped(engine)

    got = run(main(), timeout=60)
    assert got["mmengine_requests_total"][(("code", "BAD_REQUEST"), ("model", "m02"))] == 3
    assert got["mmengine_request_compute_seconds_count"][(("model", "m02"),)] == 2


def test_timing_splits_a_request_into_stages():
    t = trace.timing(1_000, (1_500, 4_500, 4_800), 5_000, t_sent=1_200)
    assert t == {"total_ns": 4_000, "load_wait_ns": 200, "queue_ns": 300,
                 "compute_ns": 3_000, "ring_ns": 300, "encode_ns": 200}
    assert sum(t[k] for k in trace.STAGES) == t["total_ns"]
    # No t_sent: the load wait is counted in the queue.
    t = trace.timing(1_000, (1_500, 4_500, 4_800), 5_000)
    assert (t["load_wait_ns"], t["queue_ns"]) == (0, 500)
    # No stamps from the worker: only the total is known.
    assert trace.timing(1_000, None, 5_000) == {"total_ns": 4_000}
    assert trace.timing(1_000, (None, None, None), 5_000) == {"total_ns": 4_000}
    body = {"t_recv": 1_500, "t_done": 4_500, "t_read": 4_800, "t_sent": 1_200}
    assert trace.body_timing(1_000, body, 5_000) == trace.timing(
        1_000, (1_500, 4_500, 4_800), 5_000, 1_200)
    assert trace.server_timing({"compute_ns": 3_000_000, "total_ns": 4_500_000}) == \
        "compute;dur=3.000, total;dur=4.500"
    # Run alone again after its joined call failed: that call ran it too, in
    # its compute (as the metrics count it), not its queue.
    failed = {"t_recv": 1_250, "t_done": 1_450, "batch": 3}
    t = trace.body_timing(1_000, {**body, "failed_call": failed}, 5_000)
    assert (t["queue_ns"], t["compute_ns"]) == (100, 3_200)
    assert sum(t[k] for k in trace.STAGES) == t["total_ns"]


def test_trace_tracks_and_a_file_cut_short(tmp_path):
    path = tmp_path / "t.json"
    t = trace.Trace(path, pid=7)
    ms = 1_000_000
    # Two workers; requests that overlap, answered out of order.
    t("request", {"model": "a", "version": None, "code": "OK", "start_ns": 0,
                  "end_ns": 10 * ms, "worker_ns": (1 * ms, 2 * ms, 3 * ms), "worker": 0})
    t("request", {"model": "b", "version": 1, "code": "OK", "start_ns": 1 * ms,
                  "end_ns": 5 * ms, "worker_ns": (2 * ms, 4 * ms, 4 * ms), "worker": 1})
    t("request", {"model": "c", "version": None, "code": "OK", "start_ns": 11 * ms,
                  "end_ns": 12 * ms, "worker_ns": (11 * ms, 11 * ms, 12 * ms)})
    t("request", {"model": "x", "version": None, "code": "MODEL_NOT_FOUND",
                  "start_ns": 2 * ms, "end_ns": 3 * ms})
    # A request that timed out at 13 ms, and its call, answered later.
    t("request", {"model": "d", "version": 1, "code": "TIMEOUT", "start_ns": 12 * ms,
                  "end_ns": 13 * ms})
    t("late", {"model": "d", "version": 1, "worker": 0, "t_sent": 12 * ms,
               "worker_ns": (12 * ms, 15 * ms, 16 * ms), "account": None})
    # And one its worker skipped, as it would have timed out too.
    t("skipped", {"model": "d", "version": 1, "worker": 0, "at_ns": 16 * ms})
    # One its worker died under: where, not when.
    t("request", {"model": "e", "version": 2, "code": "WORKER_DIED", "start_ns": 16 * ms,
                  "end_ns": 17 * ms, "worker_ns": (None, None, None), "worker": 1,
                  "t_sent": 16 * ms, "account": None})
    # A load that fetched 1 ms, waited 1 ms for room, and read its files 4.
    t("load", {"model": "a", "version": 1, "worker": 0, "start_ns": 0, "end_ns": 9 * ms,
               "bytes": 10, "phases": {"fetch": 0.001, "deserialize": 0.004, "copy": 0.002,
                                       "warmup": 0.001}})
    t("load", {"model": "b", "version": 1, "worker": 0, "start_ns": 1 * ms,
               "end_ns": 2 * ms, "error": "boom"})
    t("evict", {"model": "a", "version": 1, "worker": 0, "reason": "pressure", "bytes": 10,
                "start_ns": 20 * ms})
    t("worker_exit", {"worker": 1, "pid": 123, "at_ns": 30 * ms})
    t.flush()
    cut = trace.read(path)  # as a killed server leaves it: no closing bracket
    assert not path.read_text().rstrip().endswith("]")
    t.close()
    t("evict", {})  # after close: ignored
    events = json.loads(path.read_text())
    assert events == cut
    check_tracks(events)
    threads = {e["tid"]: e["args"]["name"] for e in events
               if e["ph"] == "M" and e["name"] == "thread_name"}
    assert threads[0] == "worker 0" and threads[1] == "worker 1"
    assert sorted(n for n in threads.values() if n.startswith("requests")) == [
        "requests", "requests (2)", "requests (3)"]
    assert sorted(n for n in threads.values() if "loads" in n) == [
        "worker 0 loads", "worker 0 loads (2)"]
    compute = {e["name"]: e for e in events if e.get("cat") == "compute"}
    assert set(compute) == {"a", "b", "d (late)"}  # c did not say where it ran, e when
    assert (compute["a"]["tid"], compute["a"]["ts"], compute["a"]["dur"]) == (0, 1000, 1000)
    assert compute["b"]["tid"] == 1
    assert (compute["d (late)"]["tid"], compute["d (late)"]["dur"]) == (0, 3000)
    skipped = [e for e in events if e.get("cat") == "skipped"]
    assert [(e["name"], e["tid"], e["ts"], e["ph"]) for e in skipped] == [
        ("d (skipped)", 0, 16_000, "i")]
    reqs = {e["name"]: e for e in events if e.get("cat") == "request"}
    assert reqs["a"]["args"]["compute_ns"] == 1 * ms
    assert reqs["x"]["args"] == {"model": "x", "version": None, "code": "MODEL_NOT_FOUND"}
    assert reqs["e"]["args"] == {"model": "e", "version": 2, "code": "WORKER_DIED",
                                 "worker": 1}
    phases = [e for e in events if e.get("cat") == "load" and not e["name"].startswith("load")]
    assert [(e["name"], e["ts"], e["dur"]) for e in phases] == [
        ("warmup", 8000, 1000), ("copy", 6000, 2000), ("deserialize", 2000, 4000),
        ("fetch", 0, 1000)]  # where the load began, before its wait for room
    assert all(e["pid"] == 7 for e in events)
    (exit_,) = [e for e in events if e["name"] == "worker exit"]
    assert exit_["tid"] == 1 and exit_["ph"] == "i"


def test_a_joined_call_is_one_span_on_its_workers_track(tmp_path):
    path = tmp_path / "t.json"
    t = trace.Trace(path)
    ms = 1_000_000
    # Three requests joined into one call on worker 0 (one of them answered
    # late), then one alone; worker 1 ran a call of two at the same time.
    for i in range(3):
        t("late" if i == 1 else "request",
          {"model": "m", "version": 1, "code": "OK", "start_ns": 0, "end_ns": 5 * ms,
           "worker_ns": (1 * ms, 4 * ms, 5 * ms), "worker": 0, "batch": 3})
    t("request", {"model": "m", "version": 1, "code": "OK", "start_ns": 5 * ms,
                  "end_ns": 7 * ms, "worker_ns": (5 * ms, 6 * ms, 7 * ms), "worker": 0})
    for _ in range(2):
        t("request", {"model": "n", "version": 1, "code": "OK", "start_ns": 0, "end_ns": 5 * ms,
                      "worker_ns": (1 * ms, 4 * ms, 5 * ms), "worker": 1, "batch": 2})
    t.close()
    events = json.loads(path.read_text())
    check_tracks(events)
    calls = [(e["tid"], e["name"], e["ts"], e["args"].get("batch")) for e in events
             if e.get("cat") == "compute"]
    assert sorted(calls) == [(0, "m", 5000, None), (0, "m x3", 1000, 3),
                             (1, "n x2", 1000, 2)]
    requests = [e["args"].get("batch") for e in events if e.get("cat") == "request"]
    assert requests == [3, 3, None, 2, 2]  # each request's own span says its call's size


def test_joined_calls_told_out_of_order_are_each_drawn_once(tmp_path):
    # A late request is told at once, an answered one later: two calls'
    # requests came as B, D (late), then A, C, and each call was drawn
    # twice, named "(late)" by its late member (a review's finding).
    path = tmp_path / "t.json"
    t = trace.Trace(path)
    ms = 1_000_000
    calls = {1: (1 * ms, 4 * ms, 5 * ms), 2: (5 * ms, 8 * ms, 9 * ms)}
    for kind, call in (("late", 1), ("late", 2), ("request", 1), ("request", 2)):
        t(kind, {"model": "m", "version": 1, "code": "OK", "start_ns": 0,
                 "end_ns": calls[call][2], "worker_ns": calls[call], "worker": 0, "batch": 2})
    t.close()
    events = json.loads(path.read_text())
    check_tracks(events)
    drawn = [(e["name"], e["ts"]) for e in events if e.get("cat") == "compute"]
    assert sorted(drawn) == [("m x2", 1000), ("m x2", 5000)]


TRACE_PAST_A_SIZE_LIMIT = """
import resource, sys
from mmengine import trace
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
t = trace.Trace(sys.argv[1], pid=7)
for i in range(2000):  # ~200 KB of events, flushed 512 at a time
    t("request", {"model": f"m{i}", "version": None, "code": "OK", "start_ns": i * 1000,
                  "end_ns": i * 1000 + 500})
t.close()
print("closed", t.closed)
"""


def test_a_trace_past_what_its_disk_takes_stops_once_and_stays_readable(tmp_path):
    # A full disk (here a file size limit) cut an event in two, logged an
    # error every 512 events, and raised from close(): at Ctrl-C a
    # traceback, and exit status 1.
    path = tmp_path / "t.json"
    done = subprocess.run([sys.executable, "-c", TRACE_PAST_A_SIZE_LIMIT, str(path)],
                          capture_output=True, text=True, timeout=60, env=environ())
    assert done.returncode == 0 and done.stdout == "closed True\n", done.stderr
    assert done.stderr.count("tracing stopped") == 1 and "Traceback" not in done.stderr, \
        done.stderr
    events = json.loads(path.read_text())  # whole events, and the bracket that ends them
    assert 0 < len(events) < 2000 and path.stat().st_size <= 20_000
    assert all(e["name"].startswith("m") for e in events if e["ph"] == "X")


def test_trace_tracks_sort_by_worker_however_many_loads_overlap(tmp_path):
    # Ten sort places a worker: its eleventh load track sorted beside the
    # next worker's own, and a viewer mixed the two workers' tracks.
    path = tmp_path / "t.json"
    t = trace.Trace(path)
    for i in range(12):  # twelve loads at once on worker 0
        t("load", {"model": f"m{i}", "version": 1, "worker": 0, "start_ns": 0,
                   "end_ns": 10_000_000, "bytes": 1})
    for worker in (0, 1):  # one after the other: one requests track
        ms = worker * 2_000_000
        t("request", {"model": "a", "version": 1, "code": "OK", "start_ns": ms,
                      "end_ns": ms + 1_000_000, "worker_ns": (ms, ms + 1, ms + 1),
                      "worker": worker})
    t.close()
    events = json.loads(path.read_text())
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    order = sorted(names, key=lambda tid: next(
        e["args"]["sort_index"] for e in events
        if e["name"] == "thread_sort_index" and e["tid"] == tid))
    tracks = [names[tid] for tid in order]
    assert tracks == ["worker 0", "worker 0 loads"] + [
        f"worker 0 loads ({n})" for n in range(2, 13)] + ["worker 1", "requests"], tracks


def test_a_version_of_no_integer_is_a_bad_request_counted_with_metrics_attached(
        tmp_path, own_segments):
    # Observed, the refused request's version was looked up as it came:
    # a list raised TypeError (unhashable) in place of BadRequest, and the
    # request went uncounted (a review's finding).
    demo.write_mlp(tmp_path / "m", "safetensors", 4, 8, 2)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            m = metrics.attach(engine)
            for version in ([1], {"a": 1}, 1.5):
                with pytest.raises(BadRequest, match="version"):
                    await engine.infer("m", {"x": np.zeros((1, 4), np.float32)},
                                       version=version)
            return m.exposition()[0].decode()

    text = run(main())
    assert re.search(r'mmengine_requests_total\{[^}]*code="BAD_REQUEST"[^}]*\} 3', text), text


def test_a_late_answers_time_queued_counts_as_its_call_does(tmp_path, own_segments):
    # One worker: the second request waits behind the first, then runs
    # past its deadline to its end. Its call was counted (compute), its
    # wait before it was not: queue seconds read low for a model whose
    # calls outlive their deadlines.
    write_handler(tmp_path, "slow", SLOW_HANDLER)
    ahead_s = 0.4

    def slow(seconds: float) -> dict:
        return {"seconds": np.array([seconds])}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1,
                                 request_timeout_s=60)) as engine:
            m = metrics.attach(engine)
            late = []
            engine.observers.append(lambda kind, f: kind == "late" and late.append(f))
            await engine.load("slow")
            # The second begins with more time left than the first took:
            # neither the front-end nor the worker skips it.
            done = await asyncio.gather(engine.infer("slow", slow(ahead_s), timeout=10),
                                        engine.infer("slow", slow(1.0), timeout=ahead_s + 0.6),
                                        return_exceptions=True)
            for _ in range(250):  # its answer comes after its Timeout
                if late:
                    break
                await asyncio.sleep(0.02)
            return done, late, m.exposition()[0].decode()

    (first, second), late, body = run(main())
    assert first["y"][0] == 2 * ahead_s and isinstance(second, Timeout), second
    assert len(late) == 1, late
    queued_s = (late[0]["worker_ns"][0] - late[0]["t_sent"]) / 1e9
    assert queued_s > ahead_s / 2  # behind the first call
    got = samples(body)
    model = (("model", "slow"),)
    assert got["mmengine_request_compute_seconds_count"][model] == 2
    assert got["mmengine_request_queue_seconds_total"][model] >= queued_s


def test_metrics_count_load_phases_and_worker_exits(tmp_path):
    """Events the real engine only produces with a worker that reports
    phases, or dies: fed straight to the observer."""

    class FakeEngine:
        observers: list = []
        cache = None
        config = Config()
        repo = Repository(tmp_path)

        def stats(self):
            return {"models": [], "workers": [], "totals": {
                "hits": 0, "misses": 0, "resident_models": 0, "resident_bytes": 0}}

        def flush_observations(self):
            pass  # the events come straight to the observer

    engine = FakeEngine()
    m = metrics.attach(engine)
    m("load", {"model": "a", "version": 1, "worker": 0, "start_ns": 0, "end_ns": 2 * 10**9,
               "bytes": 100, "phases": {"fetch": 0.0, "deserialize": 0.5, "copy": 0.2,
                                        "warmup": 0.03}})
    m("worker_exit", {"worker": 1, "pid": 5, "at_ns": 0})
    m("worker_exit", {"worker": 1, "pid": 6, "at_ns": 0})
    body, _ = m.exposition()
    got = samples(body.decode())
    phase = got["mmengine_load_phase_seconds_sum"]
    assert phase[(("phase", "deserialize"),)] == 0.5
    assert phase[(("phase", "warmup"),)] == 0.03
    assert got["mmengine_load_phase_seconds_count"][(("phase", "fetch"),)] == 1
    le = got["mmengine_load_phase_seconds_bucket"]
    assert le[(("le", "0.25"), ("phase", "copy"))] == 1
    assert le[(("le", "0.1"), ("phase", "copy"))] == 0
    assert got["mmengine_load_duration_seconds_sum"][()] == 2.0
    assert got["mmengine_loaded_bytes_total"][(("worker", "0"),)] == 100
    assert got["mmengine_worker_exits_total"][(("worker", "1"),)] == 2


@pytest.mark.parametrize("account", [False, True])
def test_tcp_answers_with_timing_when_asked(repo, own_segments, account):
    """With account_requests the compute stage is split further by what
    the worker's thread did; the stages still add up."""
    config = Config(repo=str(repo), workers=1, request_timeout_s=60,
                    account_requests=account)
    x = protocol.encode_tensors({"x": np.ones((2, DIMS[0]), np.float32)})

    async def ask(port: int, **fields) -> dict:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(protocol.frame({"id": 1, "op": "infer", "model": "m00", "inputs": x,
                                     **fields}))
        n = protocol.LENGTH.unpack(await reader.readexactly(4))[0]
        answer = protocol.decode(await reader.readexactly(n))
        writer.close()
        await writer.wait_closed()
        return protocol.raise_for(answer)

    async def main():
        async with Engine(config) as engine:
            server = TcpServer(engine)
            port = await server.start("127.0.0.1", 0)
            try:
                cold = await ask(port, timing=True)
                hot = await ask(port, timing=True)
                plain = await ask(port)
            finally:
                await server.stop()
        return cold, hot, plain

    cold, hot, plain = run(main(), timeout=60)
    assert "timing" not in plain
    split = {"compute_cpu_ns", "compute_runq_ns"} if account else set()
    for t in (cold["timing"], hot["timing"]):
        assert set(t) == {"total_ns", *trace.STAGES, *split}
        assert all(v >= 0 for v in t.values())
        assert sum(t[k] for k in trace.STAGES) == t["total_ns"]
        if account:
            assert 0 < t["compute_cpu_ns"] + t["compute_runq_ns"] <= t["compute_ns"] + 20_000
    # The first request waited for the load (milliseconds); the second found
    # m00 resident (microseconds: 71 once, on a machine under load).
    assert cold["timing"]["load_wait_ns"] > 10 * hot["timing"]["load_wait_ns"]


def test_serve_writes_a_trace_and_closes_it_on_sigterm(repo, tmp_path):
    from mmengine.client import Client

    path = tmp_path / "serve.json"
    server = Server("--repo", str(repo), "--workers", "1", "--tcp-port", "0", "--http-port",
                    "-1", "--trace", str(path))
    try:
        port = int(server.wait_for(r"tcp://[\d.]+:(\d+)", 60).group(1))
        server.wait_for("writing a trace", 30)
        with Client(f"127.0.0.1:{port}") as c:
            for name in MODELS:
                c.infer(name, {"x": np.ones((2, DIMS[0]), np.float32)})
        assert server.stop(30) == 0
    finally:
        server.kill()
    events = json.loads(path.read_text())  # valid JSON: closed at shutdown
    check_tracks(events)
    assert sum(e.get("cat") == "request" for e in events) == len(MODELS)
    assert sum(e.get("cat") == "compute" and e["tid"] == 0 for e in events) == len(MODELS)
    assert sum(e["name"].startswith("load ") for e in events) == len(MODELS)


def test_a_second_serve_that_fails_to_start_leaves_the_first_ones_trace_alone(repo, tmp_path):
    # The second emptied the file before it failed on the port: the first
    # server wrote on at its own offset, and its trace was no JSON.
    from mmengine.client import Client

    path = tmp_path / "serve.json"
    args = ("--repo", str(repo), "--workers", "1", "--http-port", "-1", "--trace", str(path))
    first = Server(*args, "--tcp-port", "0")
    try:
        port = int(first.wait_for(r"tcp://[\d.]+:(\d+)", 60).group(1))
        first.wait_for("writing a trace", 30)
        with Client(f"127.0.0.1:{port}") as c:
            c.infer("m00", {"x": np.ones((2, DIMS[0]), np.float32)})
            deadline = time.monotonic() + 10
            while b'"cat":"request"' not in path.read_bytes():  # written (within _FLUSH_S)
                assert time.monotonic() < deadline, path.read_bytes()
                time.sleep(0.05)
            second = subprocess.run(command("serve", *args, "--tcp-port", str(port)),
                                    env=environ(), capture_output=True, text=True, timeout=60)
            assert second.returncode == 1 and "in use" in second.stderr, second.stderr
            c.infer("m01", {"x": np.ones((2, DIMS[0]), np.float32)})
        assert first.stop(30) == 0
    finally:
        first.kill()
    events = json.loads(path.read_text())
    assert sum(e.get("cat") == "request" for e in events) == 2


def test_a_serve_that_fails_to_start_makes_no_trace_file(repo, tmp_path):
    # It left an empty file where none was: no JSON, and read() refused it.
    import socket

    path = tmp_path / "never.json"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        failed = subprocess.run(command("serve", "--repo", str(repo), "--workers", "1",
                                        "--http-port", "-1", "--trace", str(path),
                                        "--tcp-port", str(taken.getsockname()[1])),
                                env=environ(), capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "in use" in failed.stderr, failed.stderr
    assert not path.exists()


def test_kserve_answers_with_server_timing_when_asked(repo, own_segments):
    from mmengine.server import kserve

    config = Config(repo=str(repo), workers=1, request_timeout_s=60)
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, DIMS[0]], "datatype": "FP32",
                                   "data": [1.0] * (2 * DIMS[0])}]}).encode()

    async def post(port: int, timing: bool) -> dict[str, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (f"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
        if timing:
            head += "X-MMEngine-Timing: 1\r\n"
        writer.write((head + "\r\n").encode() + body)
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        lines = data.partition(b"\r\n\r\n")[0].decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 200 OK", data
        return dict(line.split(": ", 1) for line in lines[1:])

    async def main():
        async with Engine(config) as engine:
            server = HttpServer(engine, kserve.ROUTES)
            port = await server.start("127.0.0.1", 0)
            try:
                return await post(port, True), await post(port, False)
            finally:
                await server.stop()

    timed, plain = run(main(), timeout=60)
    assert "Server-Timing" not in plain
    stages = dict(part.split(";dur=") for part in timed["Server-Timing"].split(", "))
    # decode: the body read into tensors before the engine had it (not a
    # stage of total: what happened before the server handed it over).
    assert set(stages) == {"decode", "total", *(s[:-3] for s in trace.STAGES)}
    assert all(float(v) >= 0 for v in stages.values())
    assert list(stages)[0] == "decode" and float(stages["decode"]) > 0


def test_versions_and_models_gone_from_the_repository_take_their_series(tmp_path,
                                                                        own_segments):
    # Every version ever published stayed in every scrape: a model rolled
    # out thirty times had thirty versions' series, for good.
    import shutil

    x = np.ones((1, DIMS[0]), np.float32)
    demo.write_mlp(tmp_path / "gone", "safetensors", *DIMS, seed=9)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            m = metrics.attach(engine)
            await engine.infer("gone", {"x": x})
            for version in (1, 2, 3):
                demo.write_mlp(tmp_path / "churn", "safetensors", *DIMS, seed=version,
                               version=version)
                await engine.infer("churn", {"x": x}, version=version)
                if version > 1:
                    shutil.rmtree(tmp_path / "churn" / str(version - 1))
            shutil.rmtree(tmp_path / "gone")
            for _ in range(200):
                rows = {(r["name"], r["version"]) for r in engine.stats()["models"]}
                if rows == {("churn", 3)}:
                    break
                await asyncio.sleep(0.05)
            assert rows == {("churn", 3)}
            # Nor does the engine keep their entries' generations (a leak of
            # ~200 bytes per version ever served, found by a soak).
            assert set(engine._gen) == {("churn", 3)}, engine._gen
            return m.exposition()[0].decode()

    body = run(main())
    assert 'model="gone"' not in body
    assert 'mmengine_requests_total{code="OK",model="churn"} 3.0' in body
    assert not re.search(r'model="churn",[^}]*version="[12]"', body), body


def test_models_gone_that_never_loaded_take_their_series(tmp_path, own_segments):
    # The engine forgets a version that had a row of stats: one only ever
    # refused (a bad token), or one never asked for beside a removed one,
    # left its model's series in every scrape for good (a review's finding).
    import shutil

    from mmengine import auth
    from mmengine.errors import Unauthorized

    x = np.ones((1, DIMS[0]), np.float32)
    path = demo.write_mlp(tmp_path / "refused", "safetensors", *DIMS)
    (path / "model.toml").write_text(f'token_sha256 = ["{auth.digest("secret").hex()}"]\n'
                                     + (path / "model.toml").read_text())
    demo.write_mlp(tmp_path / "two", "safetensors", *DIMS, version=1)

    async def until_gone(engine, what) -> None:
        for _ in range(200):
            if not what(engine.stats()["models"]):
                return
            await asyncio.sleep(0.05)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            m = metrics.attach(engine)
            with pytest.raises(Unauthorized):
                await engine.infer("refused", {"x": x}, token="wrong")
            await engine.infer("two", {"x": x})
            demo.write_mlp(tmp_path / "two", "safetensors", *DIMS, seed=2, version=2)
            await asyncio.sleep(0.3)  # scanned: version 2 is the default now, never asked for
            shutil.rmtree(tmp_path / "two" / "1")
            await until_gone(engine, lambda rows: any(r["name"] == "two" for r in rows))
            before = m.exposition()[0].decode()
            shutil.rmtree(tmp_path / "refused")
            shutil.rmtree(tmp_path / "two")
            await asyncio.sleep(0.3)  # scanned
            return before, m.exposition()[0].decode(), m.version_stats()

    before, after, stats = run(main())
    assert 'mmengine_requests_total{code="UNAUTHORIZED",model="refused"} 1.0' in before
    assert 'mmengine_requests_total{code="OK",model="two"} 1.0' in before
    assert 'model="refused"' not in after and 'model="two"' not in after, after
    assert stats == [], stats


def test_a_version_asked_for_before_a_scan_lists_it_keeps_its_series(tmp_path, own_segments):
    # Looked for on disk by number before any scan listed it, and only ever
    # refused: a scrape took it for gone and forgot its counts (a review).
    from mmengine import auth
    from mmengine.errors import Unauthorized

    x = np.ones((1, DIMS[0]), np.float32)
    locked = f'token_sha256 = ["{auth.digest("secret").hex()}"]\n'

    def publish(version: int) -> None:
        path = demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=version,
                              version=version)
        (path / "model.toml").write_text(locked + (path / "model.toml").read_text())

    publish(1)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0)) as engine:
            m = metrics.attach(engine)
            await engine.infer("m", {"x": x}, token="secret", version=1)
            publish(2)  # after the repository's last look
            for _ in range(3):
                with pytest.raises(Unauthorized):
                    await engine.infer("m", {"x": x}, token="wrong", version=2)
            return engine.repo.listed("m", 2), m.exposition()[0].decode()

    listed, body = run(main())
    assert not listed  # no scan since: the case
    assert 'nv_inference_request_failure{model="m",version="2"} 3.0' in body, body


def test_a_rollback_to_a_version_never_served_keeps_its_models_series(tmp_path, own_segments):
    import shutil

    x = np.ones((1, DIMS[0]), np.float32)
    for version in (1, 2):
        demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=version, version=version)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            m = metrics.attach(engine)
            for _ in range(5):
                await engine.infer("m", {"x": x})  # version 2
            shutil.rmtree(tmp_path / "m" / "2")
            for _ in range(200):
                if ("m", 2) not in {(r["name"], r["version"]) for r in engine.stats()["models"]}:
                    break
                await asyncio.sleep(0.05)
            return m.exposition()[0].decode()

    assert 'mmengine_requests_total{code="OK",model="m"} 5.0' in run(main())


def test_stats_of_many_models_let_the_loop_turn(tmp_path, own_segments):
    # stats() of thousands of models held the loop for tens of milliseconds,
    # and every request with it: the TCP stats op, a scrape and Triton's
    # statistics build their rows a slice at a time.
    from mmengine.engine import ROWS_PER_TURN

    names = [f"m{i:03d}" for i in range(2 * ROWS_PER_TURN + 10)]
    for name in names:
        write_handler(tmp_path, name, "def load(path, device):\n    pass\n\n"
                      "def predict(inputs):\n    return inputs\n")

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            await asyncio.gather(*(engine.load(name) for name in names))
            turns = 0

            async def count():
                nonlocal turns
                while True:
                    turns += 1
                    await asyncio.sleep(0)
            counter = asyncio.ensure_future(count())
            await asyncio.sleep(0)
            before = turns
            engine.stats()
            held = turns - before
            collected = await engine.collect_stats()
            turned = turns - before
            counter.cancel()
            return held, turned, collected, engine.stats()

    held, turned, collected, stats = run(main())
    assert held == 0 and turned >= 2
    assert [r["name"] for r in collected["models"]] == names
    assert {r["state"] for r in collected["models"]} == {"resident"}
    assert collected["totals"] == stats["totals"]
    assert collected["totals"]["loads"] == len(names)


class _CountingPool(concurrent.futures.ThreadPoolExecutor):
    submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)


def test_scrapes_at_once_share_one_and_each_gets_it_whole(repo, own_segments):
    # Each scrape copied every count and formatted them on a thread of its
    # own: 8 at once at 3,000 models took the front-end past 500 MB.
    x = {"x": np.ones((2, DIMS[0]), np.float32)}

    async def main():
        # (No rescans: they run on the pool the test counts.)
        async with Engine(Config(repo=str(repo), workers=1, repo_scan_s=0)) as engine:
            m = metrics.attach(engine)
            server = HttpServer(engine, metrics.ROUTES)
            port = await server.start("127.0.0.1", 0)
            for name in MODELS:
                await engine.infer(name, x)
            # The formatting thread is held until all eight wait, so that
            # "at once" does not hang on how fast this machine connects.
            loop = asyncio.get_running_loop()
            pool = _CountingPool(1)
            loop.set_default_executor(pool)
            gate = threading.Event()
            held = loop.run_in_executor(None, gate.wait, 30)
            try:
                text = "text/plain"
                om = "application/openmetrics-text; version=1.0.0"
                scrapes = [scrape(port, accept) for accept in [text, om] * 4]
                started = asyncio.ensure_future(asyncio.gather(*scrapes))
                deadline = loop.time() + 20
                while sum(c.answering is not None for c in server.connections) < 8:
                    assert loop.time() < deadline and not started.done()
                    await asyncio.sleep(0.005)
                making = dict(m._scrapes)
                gate.set()
                answers = await started
                return making, pool.submitted - 1, answers, dict(m._scrapes)
            finally:
                gate.set()
                await held
                await server.stop()

    making, formatted, answers, left = run(main())
    assert len(making) == formatted == 2 and left == {}  # one for each format
    plain = [body for kind, body in answers if kind.startswith("text/plain")]
    openmetrics = [body for kind, body in answers if kind.startswith("application/openmetrics")]
    assert len(plain) == len(openmetrics) == 4
    assert len(set(plain)) == 1 and len(set(openmetrics)) == 1  # one scrape each
    assert 'mmengine_requests_total{code="OK",model="m00"} 1.0' in plain[0]
    assert {f.name for f in parse_om(openmetrics[0])} >= {"mmengine_requests"}


def test_operator_lines_carry_their_time_level_and_speaker():
    # A worker's lines and the front-end's meet in one stream (a
    # container's log): each says when, how bad, and which process.
    import io
    import logging

    from mmengine import logs

    stream, log = io.StringIO(), logging.getLogger("mmengine.test-speaker")
    logs.to(log, stream, "mmengine worker 3 (pid 42)", "warning")
    log.info("not at this level")
    log.warning("warming %s failed: %r", "cuda:3", OSError("no"))
    line, = stream.getvalue().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING mmengine worker 3 "
                        r"\(pid 42\): warming cuda:3 failed: OSError\('no'\)", line), line
    assert not log.propagate


def test_an_operator_line_its_reader_is_gone_for_is_dropped(capsys):
    # `mmengine serve | head -1`: once the reader of stdout was gone, each
    # line logged added a "--- Logging error --- BrokenPipeError" traceback
    # on stderr.
    import logging

    from mmengine import logs

    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    log = logging.getLogger("mmengine.test-gone")
    logs.to(log, Gone(), "mmengine", "info")
    log.warning("worker %d ended: %s", 0, "SIGKILL")
    log.info("worker %d is back", 0)
    assert capsys.readouterr().err == ""

    class Broken:  # what is no I/O error is still told
        def write(self, text):
            raise ValueError("not a stream's error")

        def flush(self):
            pass

    logs.to(log, Broken(), "mmengine", "info")
    log.warning("said")
    assert "Logging error" in capsys.readouterr().err


def test_the_scrapes_own_writer_says_what_prometheus_client_would(tmp_path):
    """A scrape is written by our own writer (prometheus-client's took ~10 µs
    a line: 1.4 s a scrape at 2,000 models); read back by prometheus-client's
    parsers, both formats say the same as prometheus-client's writers."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_om
    from prometheus_client.registry import CollectorRegistry

    engine = Engine(Config(repo=str(tmp_path)))
    m = metrics.attach(engine)
    for i, name in enumerate(["a", "b-1", 'odd "name"\\ with\nfeed']):
        for code, took in (("OK", 3_000), ("OK", 40_000_000), ("TIMEOUT", 31 * 10**9)):
            m("request", {"code": code, "model": name, "version": 1, "start_ns": 0,
                          "end_ns": took, "t_sent": 100, "worker_ns": (200, took - 50, took)})
        m("load", {"model": name, "version": 1, "worker": 0, "bytes": 10 + i, "start_ns": 0,
                   "end_ns": 10**9, "phases": {"copy": 0.5}})
        m("evict", {"model": name, "version": 1, "reason": "pressure", "bytes": 10 + i})
    m("request", {"code": "MODEL_NOT_FOUND", "model": "nope", "version": None,
                  "start_ns": 0, "end_ns": 10})
    families = metrics._Scrape(m, engine.stats()).families()

    class Collector:
        def collect(self):
            return [f.metric() for f in families]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())

    def said(parsed) -> list:
        return sorted((f.name, f.type, f.documentation, sorted(
            (s.name, sorted(s.labels.items()), repr(float(s.value))) for s in f.samples))
            for f in parsed)
    for openmetrics, parse, write in ((False, text_string_to_metric_families, generate_latest),
                                      (True, parse_om, generate_om)):
        ours = metrics._encode(families, openmetrics).decode()
        assert said(parse(ours)) == said(parse(write(registry).decode())), openmetrics
    assert ours.endswith("# EOF\n")
    assert 'model="odd \\"name\\"\\\\ with\\nfeed"' in ours


LONG_HANDLER = '''
import numpy as np

def load(path, device):
    pass

def predict(inputs):
    return {"y": np.ones(2, np.longdouble)}  # a number no protocol carries
'''


def test_an_answer_a_protocol_refuses_is_counted_as_its_client_got_it(tmp_path, own_segments):
    """The engine had counted these OK as its worker answered; the client
    got INTERNAL (an output no protocol carries) or BAD_REQUEST (an output
    the request did not name): an alert on errors never saw them (a
    review's finding)."""
    from mmengine.client import AsyncClient
    from mmengine.errors import InternalError
    from mmengine.server import kserve

    demo.write_mlp(tmp_path / "m00", "safetensors", *DIMS)
    write_handler(tmp_path, "long", LONG_HANDLER)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, DIMS[0]], "datatype": "FP32",
                                   "data": [1.0] * DIMS[0]}],
                       "outputs": [{"name": "nope"}]}).encode()

    async def post(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        return data

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1)) as engine:
            m = metrics.attach(engine)
            tcp, http = TcpServer(engine), HttpServer(engine, kserve.ROUTES)
            tcp_port, http_port = await tcp.start("127.0.0.1", 0), await http.start("127.0.0.1", 0)
            try:
                async with AsyncClient(("127.0.0.1", tcp_port)) as client:
                    with pytest.raises(InternalError, match="cannot carry"):
                        await client.infer("long", {"x": np.ones(1)})
                assert (await post(http_port)).startswith(b"HTTP/1.1 400 ")
                await asyncio.sleep(0.1)  # the observers hear of a request a turn later
                return samples(m.exposition()[0].decode())
            finally:
                await tcp.stop()
                await http.stop()

    got = run(main(), timeout=60)
    requests = got["mmengine_requests_total"]
    assert requests == {(("code", "INTERNAL"), ("model", "long")): 1,
                        (("code", "BAD_REQUEST"), ("model", "m00")): 1}, requests
    responses = got["mmengine_responses_total"]
    assert responses[(("code", "OK"),)] == 0 and responses[(("code", "INTERNAL"),)] == 1
    failed = got["nv_inference_request_failure"]
    assert failed == {(("model", "long"), ("version", "1")): 1,
                      (("model", "m00"), ("version", "1")): 1}, failed
