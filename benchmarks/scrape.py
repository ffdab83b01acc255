"""What a /metrics scrape costs the requests it runs beside.

    python benchmarks/scrape.py [--json] [--quick]

`mmengine serve` (one CPU worker) knows MODELS small models, each of which
has answered a request, so a scrape reports per-model counters and two
histograms for each (thousands of lines). One client sends requests to
one model, one at a time: first alone (the baseline, `idle_*`), then while
another thread scrapes /metrics back to back (`during_*`). A scrape used to
be formatted on the event loop, which stalled every request for its whole
length (~150 ms at 300 models); it is now copied on the loop and formatted
on a thread. Keys: models, scrape_lines, scrape_ms (median), scrapes,
idle_p50_us, idle_p99_us, idle_max_us, during_p50_us, during_p99_us,
during_max_us, ratios = {p99_during_vs_idle, max_during_vs_idle_p99}.
"""
from __future__ import annotations

import http.client
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


def latencies(client: Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.infer("m000", X)
        out.append(time.perf_counter() - t0)
    return sorted(out)


def scrape_until(address: str, stop: threading.Event, took: list[float], lines: list[int]):
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    while not stop.is_set():
        t0 = time.perf_counter()
        conn.request("GET", "/metrics")
        body = conn.getresponse().read()
        took.append(time.perf_counter() - t0)
        lines.append(body.count(b"\n"))
    conn.close()


def measure(repo: Path, models: int, requests: int) -> dict:
    with server(repo, "--workers", "1", "--device-budget", "256MiB") as (address, proc), \
            Client(address, timeout=60) as client:
        for i in range(models):  # each model a series of its own
            client.infer(f"m{i:03d}", X)
        latencies(client, requests // 4)  # warm
        idle = latencies(client, requests)
        stop, took, lines = threading.Event(), [], []
        scraper = threading.Thread(target=scrape_until,
                                   args=(proc.http_address, stop, took, lines))
        scraper.start()
        try:
            during = latencies(client, requests)
        finally:
            stop.set()
            scraper.join(60)

    def us(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1e6, 1)

    return {"models": models, "scrape_lines": max(lines), "scrapes": len(took),
            "scrape_ms": round(statistics.median(took) * 1e3, 1),
            "idle_p50_us": us(idle, 0.5), "idle_p99_us": us(idle, 0.99),
            "idle_max_us": us(idle, 1.0),
            "during_p50_us": us(during, 0.5), "during_p99_us": us(during, 0.99),
            "during_max_us": us(during, 1.0),
            "ratios": {"p99_during_vs_idle": round(us(during, 0.99) / us(idle, 0.99), 2),
                       "max_during_vs_idle_p99": round(us(during, 1.0) / us(idle, 0.99), 2)}}


def main() -> None:
    args = arguments(__doc__).parse_args()
    models, requests = (150, 1500) if args.quick else (300, 5000)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(models):
            demo.write_mlp(Path(tmp) / f"m{i:03d}", "safetensors", 4, 8, 2, seed=i)
        emit(measure(Path(tmp), models, requests), args.json)


if __name__ == "__main__":
    main()
