"""The garbage collector in mmengine's own processes (mmengine/heap.py): a
worker starts with none and collects once it has started; what a
process's start made is out of every collection's walk, and the
front-end's collections are in its metrics."""
from __future__ import annotations

import subprocess
import sys
import urllib.request

import numpy as np
import psutil
import pytest

from conftest import ROOT, Server, environ, write_handler
from mmengine import Client, heap
from test_observability import samples

# Each call leaves 8 MiB in a cycle that only the collector frees: a cycle
# of 64 dicts, so that young collections come every ~11 calls (they come
# after 700 containers more alive than freed; a cycle of two waited ~350
# calls, and whether 200 calls saw one was down to the count at the start).
CYCLES_HANDLER = """
import numpy as np

def load(path, device):
    pass

def predict(inputs):
    ring = [{} for _ in range(64)]
    for a, b in zip(ring, ring[1:] + ring[:1]):
        a["next"] = b
    ring[0]["bytes"] = np.ones(8 << 20, np.uint8)
    return {"n": np.array([1])}
"""


@pytest.fixture(scope="module")
def served(request, tmp_path_factory) -> tuple[Server, str, str]:
    """A server of CYCLES_HANDLER's model: (it, its TCP address, its HTTP one)."""
    root = tmp_path_factory.mktemp("repo")
    write_handler(root, "cycles", CYCLES_HANDLER)
    server = Server("--repo", str(root), "--workers", "1", "--tcp-port", "0",
                    "--http-port", "0")
    request.addfinalizer(server.stop)
    tcp = server.wait_for(r"on tcp://(\S+:\d+)", 60).group(1)
    return server, tcp, server.wait_for(r"HTTP .* on http://(\S+:\d+)", 60).group(1)


def test_a_worker_frees_the_cycles_its_model_leaves(served):
    # A worker starts with the collector off (heap.OFF_UNTIL_SETTLED): one
    # that never turned it on again kept every call's 8 MiB, 1.6 GiB here
    # (with it on: ~100 MiB, what waits for the next young collection).
    server, tcp, _ = served
    with Client(tcp) as c:
        c.infer("cycles", {"x": np.zeros(1, np.float32)})
        worker = psutil.Process(server.proc.pid).children()[0]
        before = worker.memory_info().rss
        for _ in range(200):
            assert c.infer("cycles", {"x": np.zeros(1, np.float32)})["n"].tolist() == [1]
        grew = worker.memory_info().rss - before
    assert grew < 512 << 20, f"the worker grew by {grew >> 20} MiB over 200 calls"


SETTLE = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
{heap.OFF_UNTIL_SETTLED}
import gc
from mmengine import heap

def cycle():
    a = []
    a.append(a)

assert not gc.isenabled()
cycle()  # the start's: frozen with it
heap.settle(12345)
assert gc.isenabled() and gc.get_threshold()[0] == 12345
assert gc.get_freeze_count() > 1000  # the imports' objects
assert gc.collect() == 0  # the frozen cycle is nobody's to walk
cycle()
assert gc.collect() == 1  # one made since is freed
"""


def test_settle_freezes_the_start_and_collects_what_comes_after():
    done = subprocess.run([sys.executable, "-c", SETTLE], env=environ(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_front_end_freezes_its_start_and_counts_its_collections(served):
    with urllib.request.urlopen(f"http://{served[2]}/metrics", timeout=10) as answer:
        got = samples(answer.read().decode())
    assert got["mmengine_front_end_gc_frozen_objects"][()] > 1000  # its imports', at least
    generations = {(("generation", g),) for g in "012"}
    counts = got["mmengine_front_end_gc_collections_total"]
    paused = got["mmengine_front_end_gc_pause_seconds_total"]
    assert set(counts) == set(paused) == generations
    for g in generations:  # counted from one moment: no pause without its collection
        assert (counts[g] > 0) == (paused[g] > 0), (counts, paused)
