"""Shared test helpers: an event loop that fails the test on any error that
reached its exception handler, and model repositories made of real files."""
from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvloop

from mmengine.config import PURE_PYTHON_VAR

ROOT = Path(__file__).resolve().parents[1]

# The start of a handler that waits, where it calls wait_for_go(path) (its
# version directory), until the file "go" there exists (20 s at most): a
# test writes it once what it needs in flight is.
GATED = """
import os
import time

def wait_for_go(path):
    go = os.path.join(path, "go")
    end = time.monotonic() + 20
    while not os.path.exists(go) and time.monotonic() < end:
        time.sleep(0.005)
"""


# A handler model that sleeps as long as its input says: requests that stay
# in flight on demand (pins, reordering, timeouts, drains).
SLOW_HANDLER = '''
import time

def load(path, device):
    pass

def predict(inputs):
    time.sleep(float(inputs["seconds"][0]))
    return {"y": inputs["seconds"] * 2}
'''


def slow_loading(seconds: float) -> str:
    """A handler that takes `seconds` to load and answers its input x as y."""
    return (f"import time\n\ndef load(path, device):\n    time.sleep({seconds})\n\n"
            f"def predict(inputs):\n    return {{'y': inputs['x']}}\n")


async def until(condition, timeout: float = 20.0, what: str = "the condition") -> None:
    """Polls `condition` on the running loop until it holds; AssertionError
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def eventually(check, timeout: float = 20.0, what: str = "the condition") -> None:
    """until() for a check that is a coroutine function (one that asks the
    engine): awaited until it returns true; AssertionError after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def run(coro, timeout: float = 120.0, max_stall: float = 1.0):
    """Runs `coro` on a fresh uvloop with a deadline. Fails if anything
    reached the loop's exception handler (a callback that raised, a task
    whose error nobody retrieved), or if the loop stalled for longer than
    `max_stall` seconds: something blocked it (generous, for 2 noisy cores)."""
    errors = []
    stalls = []

    async def watchdog():
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.01)
            if loop.time() - t0 > max_stall:
                stalls.append(loop.time() - t0)

    async def main():
        dog = asyncio.ensure_future(watchdog())
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            dog.cancel()

    loop = uvloop.new_event_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        result = loop.run_until_complete(main())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
    assert not errors, f"errors reached the event loop: {errors}"
    assert not stalls, f"the event loop was blocked for {max(stalls):.2f} s"
    return result


def write_handler(root: Path, name: str, source: str, manifest: str = "") -> Path:
    """Version 1 of model `name` under `root`: a Python handler of `source`,
    with `manifest` as its model.toml if given."""
    version = root / name / "1"
    version.mkdir(parents=True)
    (version / "handler.py").write_text(source)
    if manifest:
        (version / "model.toml").write_text(manifest)
    return version


def write_sparse_model(version: Path):
    """A TorchScript model.pt in `version` whose module keeps a sparse
    buffer (4 values, 8 indices) beside a Linear(4, 2) (40 bytes); returns
    the module."""
    import torch

    class WithSparse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)
            self.register_buffer("adjacency", torch.eye(4).to_sparse())

        def forward(self, x):
            return self.linear(torch.sparse.mm(self.adjacency, x.T).T)

    module = WithSparse()
    version.mkdir(parents=True)
    torch.jit.script(module).save(str(version / "model.pt"))
    return module


def write_problem_models(root) -> None:
    """Beside the good models of a test repository: "slow" (SLOW_HANDLER),
    "corrupt" (a safetensors file that is not one) and "huge" (a manifest
    that declares a terabyte)."""
    from mmengine import demo

    write_handler(root, "slow", SLOW_HANDLER)
    (root / "corrupt" / "1").mkdir(parents=True)
    (root / "corrupt" / "1" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00not json")
    (root / "corrupt" / "1" / "model.py").write_text("class Model: pass\n")
    huge = demo.write_mlp(root / "huge", "safetensors", 4, 8, 2)
    (huge / "model.toml").write_text("bytes = 1000000000000\n"
                                     + (huge / "model.toml").read_text())


def live_pids(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except (ProcessLookupError, FileNotFoundError):
            pass
    return alive


@pytest.fixture
def own_segments():
    """The shared-memory segments this test process creates must be gone by
    the end of the test."""
    from mmengine import shm

    prefix = f"{shm.PREFIX}{os.getpid()}-"
    before = {s for s in shm.list_segments() if s.startswith(prefix)}
    yield
    left = {s for s in shm.list_segments() if s.startswith(prefix)} - before
    assert not left, f"segments left behind: {sorted(left)}"


# -- `mmengine serve` in a subprocess ------------------------------------------

@contextlib.contextmanager
def busy_process(cpu: int):
    """A process that spins on `cpu` while the block runs: a busy
    neighbour, for the spin back-offs (ring.BackOff)."""
    proc = subprocess.Popen([sys.executable, "-c", "import os\n"
                             f"os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmengine.cli", *args]


def environ(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MMENGINE_") or k == PURE_PYTHON_VAR}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **changes}


def send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    """Sends `data` on a thread, as a client that pipelines does while it
    reads; the server may end the connection under it (OSError: ignored)."""
    def send() -> None:
        try:
            sock.sendall(data)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


class Server:
    """`mmengine serve` in a subprocess; its output is read by a thread so
    that the pipe never fills, and kept for failure messages."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 own_group: bool = False, preexec_fn=None):
        self.proc = subprocess.Popen(command("serve", *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env=env or environ(), start_new_session=own_group,
                                     preexec_fn=preexec_fn)
        self.output: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"no {pattern!r} from the server:\n{''.join(self.output)}")
            if m := re.search(pattern, line):
                return m

    def kill(self) -> None:
        """Kills it if it still runs: a test's cleanup, whatever happened."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
