"""The soak of tools/soak.py as a test: a minute of Zipf traffic against a
real `mmengine serve` that loads and evicts all the time, with a worker
SIGKILLed every ten seconds. SOAK_MINUTES shortens (or lengthens) the run;
CI runs the one-minute default."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, environ

MINUTES = float(os.environ.get("SOAK_MINUTES", "1"))
KILL_EVERY_S = min(10.0, MINUTES * 60 / 5)  # at least a few kills in a shorter run
FD_SLACK = 8  # sockets or pidfds still closing when the end is sampled
ANSWERS_PER_S = 5  # the floor: a soak run answers hundreds a second on 2 cores


@pytest.mark.timeout(MINUTES * 60 + 300)
def test_soak_loses_nothing_and_leaks_nothing():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "soak.py"), "--json", "--minutes", str(MINUTES),
         "--kill-every", str(KILL_EVERY_S)],
        capture_output=True, text=True, env=environ(), timeout=MINUTES * 60 + 240)
    assert done.stdout.strip(), done.stderr
    report = json.loads(done.stdout)
    print(json.dumps(report, indent=2))  # the seed and the numbers, for a failure
    assert done.returncode == 0, (report, done.stderr[-5000:])
    assert report["lost"] == 0, report["lost_by_reason"]
    assert report["wrong"] == 0
    assert not report["server_died"] and report["server_exit_code"] == 0
    assert report["kills_survived"] >= 2, report["kills"]
    assert report["segments_after_stop"] == 0
    assert report["workers_left_after_stop"] == []
    assert report["fds_end"] <= report["fds_start"] + FD_SLACK
    assert report["answered"] >= ANSWERS_PER_S * report["duration_s"]
    assert report["http_answered"] > 0  # two of the senders go through KServe HTTP
    # Only the kills may fail requests, and only those they caught in flight.
    assert set(report["failed_typed"]) <= {"WORKER_DIED", "LOAD_FAILED"}
    assert report["answered"] >= 0.95 * report["sent"]
    # The budget holds a quarter of the models: the traffic kept evicting.
    assert report["evictions"] > 0 and report["loads"] > report["models"]
