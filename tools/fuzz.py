"""The fuzzers of tests/test_fuzz.py with a large budget, for long runs
outside CI: the frame decoder and tensor schema in process, then random
frames, wrong requests and random HTTP requests against a `mmengine serve`
it starts. Prints a summary JSON; exits 1 if any property failed.

    python tools/fuzz.py --examples 100000 --minutes 30
    python tools/fuzz.py --only http --minutes 5 --seed 7

Each property runs in rounds of fresh random examples (seeded from --seed)
until its share of --examples or of --minutes is spent; a failure is
shrunk by hypothesis and reported with its smallest example.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import test_fuzz as fz  # noqa: E402
from mmengine import demo  # noqa: E402

ROUND = 1000


def properties(target):
    """name -> (strategy, the check of one example)."""
    frames = st.lists(fz.requests | fz.near_valid_requests() | fz.near_valid_requests(),
                      min_size=1, max_size=6)
    http = (fz.http_requests(target.root) | fz.near_valid_http(target.root)
            | fz.near_valid_http(target.root))

    def served(check):
        def run(x):
            check(x)
            target.assert_serving()
            target.assert_bounded()
        return run

    return {
        "decode": (fz.bodies, fz.check_decode),
        "decode_tensors": (st.dictionaries(st.text(max_size=6), fz.tensors, min_size=1,
                                           max_size=3) | fz.values, fz.check_decode_tensors),
        "requests": (frames, served(lambda ms: target.send_requests(
            [{k: v for k, v in m.items() if k != "id"} for m in ms]))),
        "frames": (fz.bodies, served(target.send_body)),
        "http": (http, served(target.send_http)),
    }


def run_property(name, strategy, check, examples: int, deadline: float, rng) -> dict:
    done, failure = 0, None
    while done < examples and time.monotonic() < deadline and failure is None:
        n = min(ROUND, examples - done)
        counted = [0]

        def one(x):
            counted[0] += 1
            check(x)

        test = seed(rng.getrandbits(64))(settings(
            max_examples=n, deadline=None, database=None, derandomize=False,
            suppress_health_check=list(HealthCheck))(given(strategy)(one)))
        try:
            test()
        except Exception as e:  # noqa: BLE001 - a failed property, reported in the summary
            failure = _failure(e)
        done += counted[0]
    return {"examples": done, "failure": failure}


INNER_FRAMES = 12


def _failure(e: Exception) -> dict:
    """A failed property as the summary says it: the error, hypothesis'
    notes (the smallest example), and the innermost frames, where it was
    raised. A traceback's last characters were hypothesis' own frames and
    the strategy's repr that it prints, not the check that failed."""
    frames = traceback.extract_tb(e.__traceback__)[-INNER_FRAMES:]
    return {"error": f"{type(e).__name__}: {e}"[:4000],
            "notes": [note[:4000] for note in getattr(e, "__notes__", [])],
            "traceback": "".join(traceback.format_list(frames))[-8000:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=100_000, help="per property")
    p.add_argument("--minutes", type=float, default=10.0, help="for all properties together")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--only", action="append", help="a property to run (repeatable)")
    args = p.parse_args(argv)
    seed_ = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed_)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mmengine-fuzz-") as tmp:
        tmp = Path(tmp)
        (tmp / "repo").mkdir()
        roots = tmp / "roots"
        demo.write_mlp(roots / "m00", "safetensors", *fz.DIMS, seed=0)
        target = fz.Target(fz.make_repo(tmp / "repo"), roots)
        target.root = str(roots)
        results = {}
        try:
            props = properties(target)
            names = [n for n in props if not args.only or n in args.only]
            for i, name in enumerate(names):
                left = t0 + args.minutes * 60 - time.monotonic()
                deadline = time.monotonic() + left / (len(names) - i)  # an even share
                results[name] = run_property(name, *props[name], args.examples, deadline, rng)
            rss_end = target.rss()
            alive = target.server.proc.poll() is None
        finally:
            target.stop()
    summary = {
        "seed": seed_, "seconds": round(time.monotonic() - t0, 1),
        "properties": results, "server_alive_at_end": alive,
        "server_rss_start_mib": round(target.rss0 / 2**20, 1),
        "server_rss_end_mib": round(rss_end / 2**20, 1),
        "frames_answered": target.stats["frames"], "error_codes": target.stats["errors"],
        "connections_closed_after_bad_frame": target.stats["closed"],
        "http_statuses": {str(k): v for k, v in target.stats["http"].items()},
    }
    print(json.dumps(summary, indent=2))
    return 0 if alive and not any(r["failure"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
