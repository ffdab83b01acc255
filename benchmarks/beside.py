"""What the front-end's heavy work costs the requests it runs beside:
/metrics scrapes, the SDK's stats op, and long JSON request bodies.

    python benchmarks/beside.py [--json] [--quick] [--models N]

`mmengine serve` (one CPU worker) knows MODELS small models, each of which
has answered a request, so a scrape reports per-model counters and two
histograms for each (thousands of lines). One client sends requests to
one model over the SDK, one at a time: first alone (the baseline,
`idle_*`), then while another thread scrapes /metrics back to back
(`during_*`), then while another SDK client asks for stats back to back
(`during_stats_*`: a row per model), then while another thread sends
KServe infer requests of JSON_MB of JSON tensor data back to back
(`during_json_*`). Each used to run on the event loop and stall every
request for its whole length (a scrape ~150 ms at 300 models; stats ~11
ms at 2,000; a JSON body parses at ~120 MB/s); a scrape is now copied on
the loop and formatted on a thread, stats rows are built a slice at a
time, and a JSON body of
PARSE_ON_THREAD bytes or more is parsed on a thread. Keys: models,
scrape_lines, scrape_ms (median), scrapes, stats_rows, stats_ms,
stats_calls, json_mb, json_ms (median of a
whole JSON request), json_requests, idle_p50_us, idle_p99_us, idle_max_us,
during_{p50,p99,max}_us, during_stats_{p50,p99,max}_us,
during_json_{p50,p99,max}_us, writer_models, writer_lines, writer_ms,
prometheus_client_writer_ms, ratios = {p99_during_vs_idle,
max_during_vs_idle_p99, p99_during_stats_vs_idle,
max_during_stats_vs_idle_p99, p99_during_json_vs_idle,
max_during_json_vs_idle_p99, writer_vs_prometheus_client}.

The writer keys time, in this process, the formatting of a scrape of
2,000 models that have each answered (150,000 lines) by mmengine's own
writer, against prometheus-client's writer of the same families (which
mmengine used until session 27: ~10 µs a line).
"""
from __future__ import annotations

import http.client
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from overhead import server  # the script's own folder is on sys.path; it adds the project's
from report import arguments, emit

from mmengine import Client, demo  # on sys.path since overhead was imported

X = {"x": np.ones((1, 4), np.float32)}
JSON_MB = 8


def json_body(mb: float) -> bytes:
    """A KServe infer request for m001 of about `mb` MB of JSON data."""
    rows = int(mb * 1e6 / (4 * 21))  # a float32 in JSON: ~20 characters and a comma
    x = np.random.default_rng(0).standard_normal((rows, 4)).astype(np.float32)
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def latencies(client: Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.infer("m000", X)
        out.append(time.perf_counter() - t0)
    return sorted(out)


def http_call(address: str, method: str, path: str, body: bytes | None = None):
    """A call of `method` `path` over one keep-alive connection: the lines
    of its answer."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def call() -> int:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        answer = response.read()
        assert response.status == 200, answer[:200]
        return answer.count(b"\n")
    return call


def stats_call(client: Client):
    """The SDK's stats op: the rows of its answer."""
    return lambda: len(client.stats()["models"])


def repeat_until(call, stop: threading.Event, took: list[float], sizes: list[int],
                 failed: list[BaseException]) -> None:
    """One call after another until `stop`: each one's seconds and size;
    a failure ends it, kept in `failed`."""
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            size = call()
            took.append(time.perf_counter() - t0)
            sizes.append(size)
    except BaseException as e:  # noqa: BLE001 - raised again by beside()
        failed.append(e)


def beside(client: Client, requests: int, call) -> tuple[list[float], list[float], list[int]]:
    """The client's latencies while `call` repeats: (latencies, the
    calls' seconds, their sizes)."""
    stop, took, sizes, failed = threading.Event(), [], [], []
    worker = threading.Thread(target=repeat_until, args=(call, stop, took, sizes, failed))
    worker.start()
    try:
        out = latencies(client, requests)
        # Measured beside nothing, "during" would look like a success.
        if failed or not worker.is_alive():
            raise RuntimeError(f"the work beside the requests failed: {failed[:1]!r}")
        return out, took, sizes
    finally:
        stop.set()
        worker.join(120)
        if worker.is_alive():
            raise RuntimeError("the work beside the requests did not stop in 120 s")


def measure(repo: Path, models: int, requests: int) -> dict:
    with server(repo, "--workers", "1", "--device-budget", "256MiB") as (address, proc), \
            Client(address, timeout=60) as client:
        for i in range(models):  # each model a series of its own
            client.infer(f"m{i:03d}", X)
        latencies(client, requests // 4)  # warm
        idle = latencies(client, requests)
        during, took, lines = beside(client, requests,
                                     http_call(proc.http_address, "GET", "/metrics"))
        with Client(address, timeout=60) as other:
            during_stats, stats_took, rows = beside(client, requests, stats_call(other))
        body = json_body(JSON_MB)
        during_json, json_took, _ = beside(client, requests // 4, http_call(
            proc.http_address, "POST", "/v2/models/m001/infer", body))

    def us(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1e6, 1)

    return {"models": models, "scrape_lines": max(lines), "scrapes": len(took),
            "scrape_ms": round(statistics.median(took) * 1e3, 1),
            "idle_p50_us": us(idle, 0.5), "idle_p99_us": us(idle, 0.99),
            "idle_max_us": us(idle, 1.0),
            "during_p50_us": us(during, 0.5), "during_p99_us": us(during, 0.99),
            "during_max_us": us(during, 1.0),
            "stats_rows": max(rows), "stats_calls": len(stats_took),
            "stats_ms": round(statistics.median(stats_took) * 1e3, 1),
            "during_stats_p50_us": us(during_stats, 0.5),
            "during_stats_p99_us": us(during_stats, 0.99),
            "during_stats_max_us": us(during_stats, 1.0),
            "json_mb": round(len(body) / 1e6, 1), "json_requests": len(json_took),
            "json_ms": round(statistics.median(json_took) * 1e3, 1),
            "during_json_p50_us": us(during_json, 0.5),
            "during_json_p99_us": us(during_json, 0.99),
            "during_json_max_us": us(during_json, 1.0),
            "ratios": {"p99_during_vs_idle": round(us(during, 0.99) / us(idle, 0.99), 2),
                       "max_during_vs_idle_p99": round(us(during, 1.0) / us(idle, 0.99), 2),
                       "p99_during_stats_vs_idle":
                           round(us(during_stats, 0.99) / us(idle, 0.99), 2),
                       "max_during_stats_vs_idle_p99":
                           round(us(during_stats, 1.0) / us(idle, 0.99), 2),
                       "p99_during_json_vs_idle":
                           round(us(during_json, 0.99) / us(idle, 0.99), 2),
                       "max_during_json_vs_idle_p99":
                           round(us(during_json, 1.0) / us(idle, 0.99), 2)}}


def writers(models: int, repeats: int = 3) -> dict:
    """A scrape of `models` models that have each answered (three codes'
    histograms, a load, an eviction), written by mmengine's writer and by
    prometheus-client's from the same families, in this process: the
    formatting the scrape thread does, without the server around it."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from mmengine.config import Config
    from mmengine.engine import Engine
    from mmengine.server import metrics

    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Config(repo=tmp))
        m = metrics.attach(engine)
        for i in range(models):
            name = f"model-{i:05d}"
            for code, took in (("OK", 40_000), ("OK", 3_000_000), ("TIMEOUT", 30 * 10**9)):
                m("request", {"code": code, "model": name, "version": 1, "start_ns": 0,
                              "end_ns": took, "t_sent": 1000,
                              "worker_ns": (2000, took - 500, took)})
            m("load", {"model": name, "version": 1, "worker": 0, "bytes": 10**6,
                       "start_ns": 0, "end_ns": 10**7})
            m("evict", {"model": name, "version": 1, "reason": "pressure", "bytes": 10**6})
        families = metrics._Scrape(m, engine.stats()).families()

    class Families:
        def collect(self):
            return [f.metric() for f in families]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())

    def ms(write) -> float:
        took = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            body = write()
            took.append(time.perf_counter() - t0)
        return round(statistics.median(took) * 1e3, 1), body
    ours, body = ms(lambda: metrics._encode(families, False))
    theirs, _ = ms(lambda: generate_latest(registry))
    return {"writer_models": models, "writer_lines": body.count(b"\n"), "writer_ms": ours,
            "prometheus_client_writer_ms": theirs,
            "writer_vs_prometheus_client": round(theirs / ours, 2)}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--models", type=int, help="models known to the server "
                        "(default 300; 150 with --quick)")
    args = parser.parse_args()
    models, requests = (150, 1500) if args.quick else (300, 5000)
    models = args.models or models
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(models):
            demo.write_mlp(Path(tmp) / f"m{i:03d}", "safetensors", 4, 8, 2, seed=i)
        result = measure(Path(tmp), models, requests)
    # What formatting a scrape costs where it hurts: thousands of models.
    written = writers(2000)
    result["ratios"]["writer_vs_prometheus_client"] = written.pop("writer_vs_prometheus_client")
    emit({**result, **written}, args.json)


if __name__ == "__main__":
    main()
