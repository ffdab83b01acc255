"""Worker processes and the channels to them, owned by one object.

`WorkerPool` spawns the workers, creates their rings, holds the READY
handshake to a deadline, watches each process's sentinel so that a death is
noticed at once, and shuts everything down against one deadline. Every child
and every segment is released through a finalizer registered before
anything can fail.

`Worker` is the front-end's end of one worker: an RPC channel over its two
rings on the event loop. `call` writes a request (or queues it while the
request ring is full, without blocking the loop) and returns a future that
the response reader resolves; a death fails every future in flight with
WorkerDied, and a request's deadline fails its future with Timeout (one
timer per worker, armed for the nearest deadline: most requests arm none).
Past `worker_backlog_ms` of its models' time in the ring, inferences wait
in a queue per model and go to the worker in turns: a flooded model does
not keep the others on its worker waiting for its whole queue.
For `poll_us` after an inference the reader polls the response ring once
per turn of the loop rather than waiting to be woken (not while the worker
loads, where its cores are few: its load needs them then). Control calls
are answered by the worker's loader thread, which parks between them: their
answers wake the reader.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref
from typing import Callable

import mmengine

from mmengine import batching, heap, messages, resources
from mmengine.calltimes import CallTimes
from mmengine.config import SECRET_VARS, Config
from mmengine.errors import (ErrorCode, InternalError, MMEngineError, RecordTooLarge,
                             RingClosed, Timeout, TooLarge, WorkerDied, error_for)
from mmengine.messages import Op
from mmengine.ring import CONTROL_BYTES, BackOff, CpuTaken, Ring
from mmengine.stop_signals import STOP_SIGNALS, ignoring_stop_signals

_BURST = 64  # responses handled before the response ring's space is handed back
# uvloop's clock counts milliseconds: a deadline this close is due now
# (else its timer, firing a hair early, would be armed again and again).
_CLOCK_S = 1e-3
#: How long stop() waits for workers to exit of their own however late it
#: is: an idle one takes milliseconds once its request ring is closed.
EXIT_GRACE_S = 0.2
# A worker process's first lines ignore the stop signals, before it imports
# anything (a second of it), where one sent to the whole process group
# (Ctrl-C, systemd's stop) killed it and failed the server's start. It
# begins with them blocked (_start), so that one sent before those lines
# run waits, and is dropped there.
WORKER_ENTRY = ignoring_stop_signals(
    heap.OFF_UNTIL_SETTLED + "from mmengine.worker import run; run()")


class _Outlet:
    """One request ring as the loop writes it: records go in order, and
    while the ring is full they wait in an outbox (holding references to
    the caller's arrays, not copies) until the worker frees space."""

    def __init__(self, ring, worker: "Worker"):
        self.ring = ring
        self._worker = worker
        self._outbox: collections.deque = collections.deque()
        self._waiting = False
        # Records sent, into the ring or its outbox, which keeps their
        # order: against the ring's `taken`, which of them the worker read.
        self.sent = 0

    def size(self, header: bytes, bufs: list) -> int:
        """The record's bytes in the ring; TooLarge if it can never fit."""
        need = self.ring.record_size(len(header), *(memoryview(b).nbytes for b in bufs))
        if need > self.ring.max_record:
            raise TooLarge(f"request of {need} bytes exceeds the ring's {self.ring.max_record}")
        return need

    def send(self, header: bytes, bufs: list, need: int = 0, hold: bool = False) -> None:
        """Writes a record, or queues it behind those waiting for room;
        `need`, its size() where the caller has it. `hold`: the worker sees
        it at the next send without hold or publish(), with the others
        held: a call's requests are there together when it takes the
        first, none left behind for the next call."""
        if not self._outbox:
            try:
                if self._try_put(header, bufs, hold):
                    self.sent += 1
                    return  # the common case, with no size() first: it cost as much as the put
            except RecordTooLarge:
                need = 0  # size(), below, raises TooLarge saying how large (no ring error chained)
        self._outbox.append((header, bufs, need or self.size(header, bufs)))
        self.sent += 1
        if not self._waiting:
            self._wait_for_room()

    def publish(self) -> None:
        """Lets the worker see the records sent with `hold`."""
        if self._worker.alive:  # (else its ring is closed, and nobody reads it)
            self.ring.publish()

    def _try_put(self, header: bytes, bufs: list, hold: bool = False) -> bool:
        try:
            return self.ring.try_put(header, *bufs, hold=hold)
        except RingClosed:
            raise WorkerDied(f"worker {self._worker.index} closed its ring") from None

    def _wait_for_room(self) -> None:
        loop = self._worker.loop
        self._waiting = True
        if self.ring.arm_write(self._outbox[0][2]):
            loop.add_reader(self.ring.writable_fd, self._on_writable)
        else:
            loop.call_soon(self._on_writable)

    def _on_writable(self) -> None:
        self._waiting = False
        if not self._worker.alive:
            return
        _remove_reader(self._worker.loop, self.ring.writable_fd)
        self.ring.disarm_write()
        try:
            # Held, and published together: one call's requests waiting
            # here go in as they would have (a put that finds no room
            # publishes those before it).
            while self._outbox:
                header, bufs, _ = self._outbox[0]
                if not self._try_put(header, bufs, hold=True):
                    self._wait_for_room()
                    return
                self._outbox.popleft()
        except WorkerDied as e:
            self._worker._died(str(e))
        finally:
            self.publish()

    def clear(self) -> None:
        self._outbox.clear()


def _remove_reader(loop, fd: int) -> None:
    try:
        loop.remove_reader(fd)
    except (ValueError, OSError):
        pass


class Worker:
    """The front-end's channel to one worker process: an inference ring
    (read by the worker's main thread), a control ring for loads and
    unloads (read by its loader thread, so they never queue behind a long
    inference) and one response ring."""

    def __init__(self, index: int, device: str, config: Config):
        self.index = index
        self.device = device
        rings = []
        try:
            # The loader thread reads the control ring: it parks at once, as
            # control records are rare and a spin there takes a core from
            # inference for nothing.
            for size, spin_us in ((config.ring_bytes, config.spin_us), (CONTROL_BYTES, 0),
                                  (config.ring_bytes, config.spin_us)):
                rings.append(Ring.create(size, spin_us=spin_us))
            self.abandoned = messages.Abandoned.create()
        except BaseException:
            for ring in rings:
                ring.close()
            raise
        self.req, self.ctl, self.resp = rings
        self._config = config
        self.process: subprocess.Popen | None = None
        self._pidfd = -1
        self._released = False
        self.pid: int | None = None
        self.alive = True
        self.stopped_why: str | None = None  # set when the pool ends it: its requests say why
        self.died_serving: tuple[str, int] | None = None  # the inference it died in
        # ...with a load or publish in flight: then its loader thread, running
        # another model's code, may have been what ended it.
        self.died_loading = False
        self.died_with = 0  # the inferences it failed when it died (orphans aside)
        self.died_why = ""  # what its failed requests say
        # The inferences of other models than the one it died in that it
        # never read (they waited their turn, or were in its ring still),
        # as _pending's entries, their on_done run: the engine sends them
        # again (take_orphan); any it does not take fail as the rest.
        self.orphans: list[tuple] = []
        self.stuck = False  # killed by the engine, stuck in a model's code
        # Its loader thread does one load or publish at a time. The engine
        # sends loads in turn (a future per load, from when it waits to when
        # the worker is done with it, or it was never sent) and notes what
        # the loader has to do (a future per load or publish sent, done when
        # the worker is done with it: answered, or died).
        self.load_turns: list[asyncio.Future] = []
        self.loader_busy: list[asyncio.Future] = []
        self.ready: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        # id -> (future, on_done, t_sent, deadline, model, then, served,
        # inputs, place): on_done runs when the worker is finished with the
        # request (answered, or dead), even if the caller gave up; then, when
        # the future is done; served is (model, version) for an inference,
        # else None; inputs, an inference's arrays (held, not copied: sent
        # again elsewhere if the worker dies before it reads them: orphans),
        # or None where it is no inference or was sent again once already;
        # place, the caller's (call), handed back with an orphan.
        self._pending: dict[int, tuple] = {}
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # the deadline it is armed for
        self._infer = _Outlet(self.req, self)
        self._control = _Outlet(self.ctl, self)
        self.on_death: Callable[["Worker"], None] | None = None
        # The t_sent of the last call: where a caller cancels its request,
        # its future carries none, and its observers are told this.
        self.sent_ns = 0
        # on_unserved(served, ran, worker, failed_call): an inference whose
        # answer nobody got: it ran after its future was done (a deadline or
        # its caller came first; `ran` is the worker's account of the run),
        # or the worker (its index) skipped it (ran None): abandoned, or its
        # deadline would pass before it could finish; skipped after a joined
        # call of it failed, that call (`failed_call`, messages.py).
        self.on_unserved: Callable[[tuple, dict | None, int, dict | None], None] | None = None
        self._poll_ns = int(config.poll_us * 1e3)
        self._poll_until = 0  # time.monotonic_ns(): polling the answers until then
        self._polling = False
        # The books of the inferences whose answers their server wrote out
        # (`then`), kept in the loop's next turn (_keep_books): [(on_done,
        # served, the call's seconds or None, t_read)].
        self._unbooked: list = []
        # The last joined call booked ((model, version), its t_recv): each of
        # its requests' answers carries the call's time, which counts once
        # (as each of a failed one's carries it, as `failed_call`).
        self._joined: tuple | None = None
        # The polls' back-off (_poll_answers): as a ring waiter's (ring.py);
        # and the loop thread's looks whether its CPU was taken (first in
        # start(): its statistics are open from then on, one file a thread).
        self._poll_backoff = BackOff()
        self._cpu_taken = CpuTaken()
        self._worker_backoffs = 0  # the worker's, as the polls last saw them
        # spin_backoffs' counts never go down: the worker's as last read,
        # past its wraps (its ring counts modulo 2**32), and both sides'
        # counts of the workers that died in this place before it (restart).
        self._backoffs_seen = 0
        self.backoffs_before = {"worker": 0, "front_end": 0}
        self._loading: set[int] = set()  # ids of loads and publishes in flight
        # Those of them during which polling stops (its cores are few:
        # resources.spins_during_loads).
        self._quiet: set[int] = set()
        self._spins = resources.spins_during_loads(config, device)
        # Busy: one inference or more in flight on it. busy_ns counts the
        # busy spells that ended, _busy_from is when the one under way began;
        # busy_share, the share of the time between the engine monitor's last
        # two samples that it was busy (placement prefers the idle).
        self._inferring = 0
        self._busy_from = 0
        # Fair turns (Config.worker_backlog_ms): the inferences in the ring,
        # by id, with the time each is expected to take (ns; 0 once one not
        # begun is abandoned: it will be skipped), and their sum;
        # each model's expected time, from its recent calls here; the
        # inferences waiting for the ring, a queue per model (id, header,
        # buffers, record size), with their ids. The turns are start-time
        # fair queueing over the expected times: each model's finish tag
        # (the virtual time by which the worker will have run what it was
        # sent) and the virtual time (the start tag of the last one sent).
        self._backlog_ns = int(config.worker_backlog_ms * 1e6)
        self._sent_ns: dict[int, int] = {}
        self._ring_ns = 0
        # A call of requests let in together (_send_call): its first's id ->
        # the others', booked 0 (the first carries the call's time).
        self._calls: dict[int, list[int]] = {}
        # When the front-end saw the call under way begin (sent into an
        # empty ring, or as the one before it was answered): a little late.
        self._began_ns = 0
        self._room_timer: asyncio.TimerHandle | None = None
        self._room_at = 0  # when the room timer is due (ns)
        self._finish_ns: dict[tuple, int] = {}
        self._virtual_ns = 0
        self._times = CallTimes()
        self._held: dict[tuple, collections.deque] = {}
        self._held_ids: set[int] = set()
        self.busy_ns = 0
        self.busy_share = 0.0
        self._sampled = (0, time.monotonic_ns())

    @property
    def rings(self) -> tuple:
        return self.req, self.ctl, self.resp

    # -- life ----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts the process: a fresh interpreter running mmengine.worker,
        which inherits the rings' eventfds and reads its arguments from
        stdin. (multiprocessing's spawn would re-import the embedding
        program's __main__ in every worker.)"""
        self.loop = loop
        self.ready = loop.create_future()
        try:
            self._start(loop)
        except BaseException:
            # (No descriptors left, say.) Its rings, descriptors and process
            # go now: a restart tried again and again leaked them each time.
            if self.is_running():
                self.process.kill()
                self.process.wait()  # milliseconds: it had barely begun
            self.release()
            raise

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        fds = [fd for r in self.rings for fd in (r.handle.data_fd, r.handle.space_fd)]
        fds.append(self.abandoned.fd)
        # Model code runs there: it gets no secret of the front-end's
        # (the control token, set as a variable, would be its to read).
        env = {k: v for k, v in os.environ.items() if k.upper() not in SECRET_VARS}
        env.setdefault(*resources.DEVICE_ORDER)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(mmengine.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root,
                                                          env.get("PYTHONPATH")]))
        # Blocked while it starts (the child inherits the mask): a stop
        # signal meanwhile reaches the front-end as soon as they are
        # unblocked here, never the worker (WORKER_ENTRY).
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.process = subprocess.Popen([sys.executable, "-c", WORKER_ENTRY],
                                            stdin=subprocess.PIPE, pass_fds=fds, env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
        self.pid = self.process.pid
        # A worker needs no secret of the front-end's: it never sees one.
        config = self._config.replace(control_token="") if self._config.control_token \
            else self._config
        args = (config, self.device, self.index, *(_plain(r.handle) for r in self.rings),
                self.abandoned.fd)
        self.process.stdin.write(pickle.dumps(args))
        self.process.stdin.close()
        self._pidfd = os.pidfd_open(self.pid)
        loop.add_reader(self.resp.readable_fd, self._on_readable)
        loop.add_reader(self._pidfd, self._on_exit)
        self._cpu_taken.look()
        if self.resp.arm_read() is False:
            loop.call_soon(self._on_readable)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def up(self) -> bool:
        """Alive, and past its READY: what health and the books report (a
        restarted worker is alive for seconds before it serves)."""
        ready = self.ready
        return self.alive and ready is not None and ready.done() and not ready.cancelled() \
            and ready.exception() is None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def waiting_turn(self) -> int:
        """Inferences in flight that wait in the front-end for their turn
        in the ring (Config.worker_backlog_ms)."""
        return len(self._held_ids)

    def running(self) -> tuple[float, tuple[str, int], bool, bool] | None:
        """The deadline and (model, version) of the oldest inference sent
        to it (it runs them in the order sent; one may wait its turn in the
        front-end still), whether it is running it (one not begun waits
        for the worker), and whether the deadline is another request's: one
        that asked for none (timeout=inf) is judged by the earliest deadline
        of the other models' inferences it holds up (its own model's may be
        its joined call's), or a hang held the worker for good."""
        for rid in self._sent_ns:
            entry = self._pending[rid]
            deadline, served = entry[3], entry[6]
            # A batching model's worker may run a later one first (a call
            # of others it joined): what it runs is what would hang.
            running = self._pending.get(self.abandoned.serving)
            begun = running is not None
            if begun:
                deadline, served = running[3], running[6]
            if deadline != math.inf:
                return deadline, served, begun, False
            held_up = min((p[3] for p in self._pending.values()
                           if p[6] is not None and p[6] != served), default=math.inf)
            return held_up, served, begun, True
        return None

    def busiest(self) -> tuple[tuple[str, int], int] | None:
        """The (model, version) with the most inferences in flight here,
        and how many: the one that floods it (a scan, made only to say who
        filled it)."""
        counts = collections.Counter(entry[6] for entry in self._pending.values()
                                     if entry[6] is not None)
        return counts.most_common(1)[0] if counts else None

    def sample_busy(self) -> None:
        """busy_share: the share of the time since the last sample that it
        had an inference in flight."""
        now = time.monotonic_ns()
        busy = self.busy_ns + (now - self._busy_from if self._inferring else 0)
        before, then = self._sampled
        self.busy_share = min(1.0, (busy - before) / max(now - then, 1))
        self._sampled = (busy, now)

    def _inferences_done(self, n: int) -> None:
        """`n` inferences in flight are over; the busy spell ends with the last."""
        self._inferring -= n
        if not self._inferring:
            self.busy_ns += time.monotonic_ns() - self._busy_from

    def _on_exit(self) -> None:
        # Answers it wrote before it exited are still in the ring: deliver
        # them before failing whatever is left.
        self._on_readable()
        self._died(self.stopped_why or f"worker {self.index} (pid {self.pid}) ended: "
                                       f"{self.exit_status()}")

    def exit_status(self) -> str:
        """How its process ended, in words: "exit code 3", "SIGKILL"."""
        code = self.process.poll() if self.process is not None else None
        if code is None:
            return "its rings broke"  # declared dead while its process still ran
        return exit_words(code)

    def _died(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        self._keep_books()
        self._detach()
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(WorkerDied(why))
        unread = self._unread()  # before the books it reads from are cleared
        pending, self._pending = self._pending, {}
        if self._inferring:
            self._inferences_done(self._inferring)
        running = pending.get(self.abandoned.serving)  # what took it down, if any did
        self.died_serving = running[6] if running is not None else None
        self.died_loading = bool(self._loading)
        if self.died_serving is not None and not self.stopped_why:
            # An end of its own: each caller hears what it was running (a
            # restart's reason names it already).
            why = (f"{why}, running {self.died_serving[0]} v{self.died_serving[1]}"
                   f"{' beside a load' if self.died_loading else ''}")
        self.died_why = why
        self._loading.clear()
        self._quiet.clear()
        self._sent_ns.clear()
        self._ring_ns = 0
        self._calls.clear()
        self._finish_ns.clear()
        self._held.clear()
        self._held_ids.clear()
        self._disarm_deadlines()
        if self._room_timer is not None:
            self._room_timer.cancel()
            self._room_timer = None
        self.died_with = 0
        for rid, entry in pending.items():
            fut, on_done, t_sent, _, _, then, served, _, _ = entry
            if rid in unread and served != self.died_serving and entry[7] is not None \
                    and not fut.done():
                self.orphans.append(entry)
                if on_done is not None:  # the pin on this worker's model
                    on_done()
                continue
            self.died_with += served is not None and not fut.done()
            died = self._unanswered(WorkerDied(why), t_sent, served)
            # Their `then` runs after on_death below, as a done callback
            # would: a server's next request finds the pool's view of the
            # death, not this worker.
            _finish(fut, on_done, died,
                    then and functools.partial(self.loop.call_soon, then))
        self._infer.clear()
        self._control.clear()
        try:
            if self.on_death is not None:
                self.on_death(self)
        finally:
            self._fail_orphans()  # those the engine did not send again: none waits for good

    def _unread(self) -> set[int]:
        """The inferences it has never read, which it cannot have begun:
        those waiting their turn in the front-end, and the last of those
        sent that its ring's count of records taken falls short of (not
        while its process runs: declared dead for what it wrote, it may
        read on until it is killed; nor where the count is past belief)."""
        unread = set(self._held_ids)
        if self.process is None or self.process.poll() is None:
            return unread
        try:
            left = self._infer.sent - self.req.taken
        except (ValueError, RingClosed):  # its ring is closed: the pool is stopping
            return unread
        if 0 < left <= len(self._sent_ns):  # (in the order sent, the answered gone)
            unread.update(itertools.islice(reversed(self._sent_ns), left))
        return unread

    def take_orphan(self) -> tuple[asyncio.Future, float, tuple, dict, Callable | None,
                                   object] | None:
        """The next inference it never read, to be sent again elsewhere:
        (future, deadline, (model, version), inputs, then, place); None when
        none is left. Whoever takes one settles its future, and runs `then` as
        it does; one at a time, so that what a failure leaves is failed
        by _died as the rest."""
        if not self.orphans:
            return None
        fut, _, _, deadline, _, then, served, inputs, place = self.orphans.pop(0)
        return fut, deadline, served, inputs, then, place

    def _fail_orphans(self) -> None:
        for fut, _, t_sent, _, _, then, served, _, _ in self.orphans:
            _finish(fut, None, self._unanswered(WorkerDied(self.died_why), t_sent, served),
                    then and functools.partial(self.loop.call_soon, then))
        self.orphans = []

    def _detach(self) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        for fd in (self.resp.readable_fd, self._pidfd, self.req.writable_fd,
                   self.ctl.writable_fd):
            _remove_reader(self.loop, fd)

    def close_requests(self) -> None:
        """No more requests: the worker serves what it has, then exits.
        Those waiting their turn fail now (the server's drain has given
        them its time already)."""
        why = (f"the server stopped before worker {self.index} ran this request (it was "
               f"waiting its turn)")
        self._drop_waiting(set(self._held_ids), lambda: WorkerDied(why))
        if self.loop is not None and not self.loop.is_closed():
            for ring in (self.req, self.ctl):  # before their descriptors close
                _remove_reader(self.loop, ring.writable_fd)
        self.req.close()
        self.ctl.close()

    def release(self) -> None:
        """Frees the rings and the descriptors, and reaps the process (call
        once it has exited). A request still in flight fails with
        WorkerDied: none is left waiting for ever. Once: a restart that
        failed to start the next worker releases this one again as it
        tries anew, and the loop's readers go by descriptor number, which
        another worker's rings or process may have been given since."""
        if self._released:
            return
        self._released = True
        if self.ready is not None and not self.ready.done():
            self.ready.cancel()  # nobody waits for it any more
        # Why the pool ended it, where it did: its exit's own callback, which
        # says so too, may not have run yet (the kill and the reaping can
        # both fall between two turns of the loop). The answers it wrote
        # before it exited go to their callers first, as there (_on_exit).
        self._on_readable()
        self._died(self.stopped_why or f"worker {self.index} was stopped")
        self._detach()
        for ring in self.rings:
            ring.close()
        self.abandoned.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        if self.process is not None:
            self.process.poll()

    # -- requests ------------------------------------------------------------

    def call(self, op: Op, model: str, version: int, arrays: dict | None = None,
             params: dict | None = None, on_done: Callable | None = None,
             deadline: float = math.inf,
             then: Callable[[asyncio.Future], None] | None = None,
             batch: int = 0, resendable: bool = True, place: object = None) -> asyncio.Future:
        """Sends one request; the future resolves to (body, outputs) or a typed
        error. `on_done()` runs once the worker is finished with the request
        (it answered or died), whether or not anyone still awaits the future.
        Past `deadline` (time.monotonic()) the future fails with Timeout and
        an inference is abandoned (messages.Abandoned): one already running
        runs to its end; on_done waits for the worker's answer either way.
        Never blocks: past worker_backlog_ms of calls in the ring an
        inference waits in the front-end for its model's turn (_send_held);
        where the ring is full, what is sent waits for its room in order.

        `then(future)` runs as the future is done, in the same turn of the
        loop: a server writes the answer out before asyncio would run the
        future's callbacks (a turn later, behind the engine's metrics). It
        is not run for a future its caller cancels.

        `batch`: the model's max_batch_size. Waiting inferences of a model
        that takes batches go in together, as one call (_send_held).
        `resendable`: an inference the worker dies before reading may be
        sent again elsewhere (an orphan): not one that is such a resend.
        `place`: the caller's, handed back with the orphan (take_orphan):
        the engine's record of where its request went, which the resend
        moves."""
        if not self.alive:
            raise WorkerDied(f"worker {self.index} is not running")
        rid = next(self._ids)
        if op == Op.INFER and deadline < math.inf:  # the worker skips what cannot make it
            params = {"deadline": deadline}
        header, bufs = messages.request_record(op, rid, model, version, arrays, params)
        t_sent = self.sent_ns = time.monotonic_ns()  # before: the worker may start it at once
        served = (model, version) if op == Op.INFER else None
        if served is None:
            if op == Op.UNLOAD:  # as the worker does: a reload's first call is a warm-up again
                self._times.forget((model, version))
                self._finish_ns.pop((model, version), None)
            self._control.send(header, bufs)
        elif self._held or not self._ring_has_room(t_sent):
            need = self._infer.size(header, bufs)  # refused now, not in its turn
            held = self._held.get(served)
            if held is None:
                held = self._held[served] = collections.deque()
            # A batching model's: what the worker joins it by (batching.form).
            form = batching.form(arrays) if batch > 1 else None
            held.append((rid, header, bufs, need, batch, form))
            self._held_ids.add(rid)
            self._arm_room()
        else:
            self._send_inference(rid, served, header, bufs)
        fut = self.loop.create_future()
        self._pending[rid] = (fut, on_done, t_sent, deadline, model, then, served,
                              arrays if served is not None and resendable else None, place)
        if op == Op.INFER:
            if not self._inferring:
                self._busy_from = t_sent
            self._inferring += 1
        if deadline < self._timer_at:
            self._arm_deadline(deadline)
        if op in messages.HEAVY_OPS:
            self._loading.add(rid)
            if not self._spins[op]:
                self._quiet.add(rid)
        if served is not None:
            # Polled for: the main thread, spinning, answers in microseconds.
            # A control op's answer comes from the parked loader thread,
            # which a poll would keep off this core while it wakes.
            self._poll_answers()
        return fut

    def _poll_answers(self) -> None:
        """Polls the answers for poll_us from now, where they come by
        polling (not while it loads where its cores are few, nor while the
        polls back off).

        Polling, the loop is runnable all along (it never sleeps): beside
        another busy process on its CPU, an answer waits out that process's
        time slice. So the polls back off as a ring waiter's spin does
        (ring.BackOff), and the loop sleeps until woken (the kernel runs a
        woken sleeper first), where their worker's waits back off (no core
        is spare, and polling takes one from the worker and its neighbours
        alike), and where the loop finds its own CPU taken (ring.CpuTaken)
        as a window of polls begins: since its last look, polling or not.
        (Not between two polls: the answer of a window it was preempted in
        is there when it runs again, and that window ends at once. Nor as
        each inference is sent within a window: a loop that polls on
        without a gap has work all along, and would not sleep anyway.)"""
        if self._poll_ns and not self._quiet:
            now = time.monotonic_ns()
            backoff = self._poll_backoff
            backoffs = self.req.backoffs[0]
            if backoffs != self._worker_backoffs:
                self._worker_backoffs = backoffs
                backoff.back_off(now)
            if not backoff.spins_looking(now, None if self._polling else self._cpu_taken):
                return
            self._poll_until = now + self._poll_ns
            if not self._polling:
                self._polling = True
                self.resp.disarm_read()  # answers come by polling: no wake-ups
                self.loop.call_soon(self._poll)

    def _ring_left_ns(self, now: int) -> int:
        """The worker's time left on the calls in its request ring: what
        is left of the call under way (the oldest sent: it runs them in
        order), by its expected time, and the others'."""
        if not self._sent_ns:
            return 0
        under_way = next(iter(self._sent_ns.values()))
        return self._ring_ns - min(under_way, now - self._began_ns)

    def _ring_has_room(self, now: int) -> bool:
        """Whether the request ring may take another inference: it holds
        less than worker_backlog_ms of its models' time, counting what is
        left of the call under way (or the backlog is not bounded). So a
        model's next call goes in as its call under way nears its end, in
        time for the worker to go on without waiting for the front-end, and
        not sooner: a neighbour's request coming meanwhile goes in before
        it, and waits for the call under way alone."""
        return not self._backlog_ns or self._ring_left_ns(now) < self._backlog_ns

    def _arm_room(self) -> None:
        """Arms a timer for when the ring will have room, where only the
        call under way keeps it full: no answer would come by then to let
        the next in (one that comes sooner does)."""
        if not (self._backlog_ns and self._sent_ns and self._held):
            return
        under_way = next(iter(self._sent_ns.values()))
        if self._ring_ns - under_way >= self._backlog_ns:
            return  # the call under way's answer comes first
        at = self._began_ns + self._ring_ns - self._backlog_ns
        if self._room_timer is not None:
            if self._room_at <= at:
                return
            self._room_timer.cancel()  # a call ended early: the room comes sooner
        self._room_at = at
        self._room_timer = self.loop.call_at(
            self.loop.time() + (at - time.monotonic_ns()) / 1e9, self._on_room)

    def _on_room(self) -> None:
        self._room_timer = None
        if self.alive and self._held:
            # uvloop's clock counts milliseconds: the timer may fire up to
            # one early, and the room due within it is taken now.
            self._send_held(early_ns=int(_CLOCK_S * 1e9))

    def _send_inference(self, rid: int, served: tuple, header: bytes, bufs: list,
                        need: int = 0, joins: bool = False, hold: bool = False) -> None:
        """Sends an inference; `joins`: it joins the call of the one sent
        before it (_send_held), which counted that call's time; `hold`: the
        worker sees it with the rest of its call (_Outlet.send)."""
        self._infer.send(header, bufs, need, hold)
        mean = self._times.expected(served)
        expected = 0 if joins else self._backlog_ns if mean is None else int(mean * 1e9)
        if not self._sent_ns:
            self._began_ns = time.monotonic_ns()
        self._sent_ns[rid] = expected
        self._ring_ns += expected
        start = max(self._virtual_ns, self._finish_ns.get(served, 0))  # no credit for idling
        self._finish_ns[served] = start + expected
        self._virtual_ns = start

    def _send_held(self, early_ns: int = 0) -> None:
        """Lets waiting inferences into the ring while it has room, a model
        at a time: the one with the least finish tag, which has had the
        least of the worker's time lately. A fast model's request goes
        ahead of a flooded slow model's next call; two floods share the
        worker's time evenly, not its calls. One that nobody waits for (its
        deadline passed, or its caller went away), or whose deadline would
        pass before its model's call could end, begun after the calls in the
        ring, is dropped unsent, as the worker would skip it. (Sent, it
        would be skipped only once the worker reached it, while the worker
        waited for the next; or run late, where the worker had waited for
        it: a worker runs a request it waited for whatever its time left,
        since it cannot tell one sent in time from one sent late.)

        `early_ns`: the room due that much from now is taken now. A model
        that takes batches sends what its worker will join into one call
        at once (the same form, up to its max_batch_size rows: worker.
        _serve_batch), the first counted as the call and the rest as
        joining it."""
        now = time.monotonic_ns()
        while self._held and self._ring_has_room(now + early_ns):
            served = min(self._held, key=lambda m: self._finish_ns.get(m, 0))
            try:
                self._send_call(served, now)
            finally:  # (a callback that raised must not leave them unseen)
                self._infer.publish()  # the call's requests, together
            if not self.alive:
                return
            self._poll_answers()  # its answer may come after the window of the last call
        self._arm_room()

    def _send_call(self, served: tuple, now: int) -> None:
        """_send_held's sends of one call of `served`'s held requests, with
        `hold`: the worker sees them once the caller publishes them."""
        sent, rows, kinds, first = 0, 0, None, 0
        while served in self._held:
            held = self._held[served]
            batch, form = held[0][4:]
            # (A call holds max_batch_size requests at most, as the
            # worker takes them, however few rows they have: none.)
            if sent and (form is None or form[1] != kinds or rows + form[0] > batch
                         or sent == batch):
                return  # a call of its own
            rid, header, bufs, need, _, _ = held.popleft()
            if not held:
                del self._held[served]
            self._held_ids.discard(rid)
            fut, on_done, t_sent, deadline, _, then, _, _, _ = self._pending[rid]
            if not sent:
                # It begins once the ring's calls are done: its time is
                # what is left then (the rest join its call: the same).
                begins = self._ring_left_ns(now) / 1e9
            if fut.done() or self._times.would_miss(served, deadline - begins,
                                                    time.monotonic()):
                del self._pending[rid]
                self._inferences_done(1)
                _finish(fut, on_done, self._not_run(t_sent, served), then)
                if self.on_unserved is not None:
                    self.on_unserved(served, None, self.index)
                continue
            try:
                self._send_inference(rid, served, header, bufs, need, joins=sent > 0,
                                     hold=True)
            except WorkerDied as e:
                self._died(str(e))
                return
            if sent:
                self._calls.setdefault(first, []).append(rid)
            else:
                first = rid
            if form is None:
                return  # joins nothing
            sent, rows, kinds = sent + 1, rows + form[0], form[1]

    def _arm_deadline(self, deadline: float) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._timer_at = deadline
        self._deadline_timer = self.loop.call_at(
            self.loop.time() + (deadline - time.monotonic()), self._expire_due)

    def _disarm_deadlines(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._timer_at = math.inf

    def _expire_due(self) -> None:
        """Fails the requests whose deadline passed and arms the timer for
        the nearest one left: a scan of what is in flight, each time the
        nearest deadline known when the timer was armed comes (a timer and
        its cancel per request cost 2.7 us; with one timeout for all, most
        requests find the timer armed for an earlier deadline)."""
        self._deadline_timer, self._timer_at = None, math.inf
        due, nearest, expired = time.monotonic() + _CLOCK_S, math.inf, []
        for rid, (fut, _, t_sent, deadline, model, then, served, _, _) in self._pending.items():
            if fut.done():
                continue
            if deadline <= due:
                expired.append((rid, fut, model, then, t_sent, served))
                self._abandon(rid)
            elif deadline < nearest:
                nearest = deadline
        if nearest < math.inf:
            self._arm_deadline(nearest)
        # Settled last: a `then` may send a request (into _pending, and
        # arming the timer for an earlier deadline than `nearest`). Then
        # those waiting their turn leave their queues (their pins go).
        waiting = {rid for rid, *_ in expired if rid in self._held_ids}
        for _, fut, model, then, t_sent, served in expired:
            late = Timeout(f"{model}: no answer within the request's deadline")
            settle(fut, self._unanswered(late, t_sent, served), then)
        self._drop_waiting(waiting)
        self._use_room()

    def _drop_waiting(self, rids: set,
                      error: Callable[[], MMEngineError] | None = None) -> None:
        """Takes `rids`, inferences waiting their turn, out of their queues
        unsent: each is done (its on_done runs: its pin goes), failing with
        an error `error` makes, one each (it says where the request was),
        where its future is not done yet (without one, each must be), and
        observers hear that it was skipped."""
        if not rids:
            return
        for served, held in list(self._held.items()):
            kept = collections.deque(entry for entry in held if entry[0] not in rids)
            if not kept:
                del self._held[served]
            elif len(kept) < len(held):
                self._held[served] = kept
        self._held_ids -= rids
        for rid in rids:
            fut, on_done, t_sent, _, _, then, served, _, _ = self._pending.pop(rid)
            self._inferences_done(1)
            _finish(fut, on_done, error and self._unanswered(error(), t_sent, served), then)
            if self.on_unserved is not None:
                self.on_unserved(served, None, self.index)

    def _unanswered(self, e: MMEngineError, t_sent: int, served: tuple | None) -> MMEngineError:
        """`e`, for a request this worker never answered; an inference's
        says where it was, and when it was sent, to observers (`ran`)."""
        if served is not None:
            e.ran = {"worker": self.index, "t_sent": t_sent, "version": served[1]}
        return e

    def _not_run(self, t_sent: int, served: tuple) -> MMEngineError:
        """The failure of an inference skipped, by the worker or before
        its turn: abandoned, or sure to end past its deadline."""
        return self._unanswered(Timeout(f"{served[0]}: not run: it could not have finished "
                                        f"within the request's deadline"), t_sent, served)

    def _abandon(self, rid: int) -> None:
        """Tells the worker to skip inference `rid` if it has not begun it,
        and takes its time out of the ring's: a skip costs next to none.
        (One waiting its turn was never sent: _drop_waiting.)"""
        expected = self._sent_ns.get(rid)
        if expected is None:
            return
        self.abandoned.mark(rid)
        if expected and self.abandoned.serving != rid:
            self._ring_ns -= expected
            self._sent_ns[rid] = 0
            if self._calls:
                self._pass_on(rid, expected)

    def _pass_on(self, rid: int, expected: int) -> None:
        """`rid`, the first of a call let in together, will not run
        (abandoned, or skipped or refused by the worker): the worker runs
        the call's others all the same, as one call, whose time (`expected`)
        goes to the first of them still wanted. Gone with `rid`, the call
        ran uncounted, and the ring looked empty under it: more calls went
        in, and a neighbour's request waited behind them all."""
        members = self._calls.pop(rid, None)
        for i, other in enumerate(members or ()):
            if other in self._sent_ns and other not in self.abandoned:
                self._sent_ns[other] = expected
                self._ring_ns += expected
                if i + 1 < len(members):
                    self._calls[other] = members[i + 1:]
                return

    def abandon_cancelled(self) -> None:
        """Marks the inferences whose callers cancelled them as abandoned:
        those not yet run are skipped (a scan of what is in flight, made
        once per turn of the loop that cancelled any)."""
        for rid, (fut, *_) in self._pending.items():
            if fut.cancelled():
                self._abandon(rid)
        self._drop_waiting({rid for rid in self._held_ids if self._pending[rid][0].cancelled()})
        self._use_room()

    def _use_room(self) -> None:
        """Lets waiting inferences into the room that abandoned ones made
        in the ring, now rather than at the next answer."""
        if self._held and self.alive:
            self._send_held()

    # -- responses -----------------------------------------------------------

    def _on_readable(self) -> None:
        """Drains the response ring, woken by the worker. Never raises: an
        error is set on the future it concerns (a read callback must not
        break the loop)."""
        if not self.alive:
            return
        ring = self.resp
        ring.disarm_read()
        while self._drain() and not self._polling:
            if ring.arm_read():
                break
        if self._unbooked and not self._polling:  # (polling, _poll keeps them)
            self.loop.call_soon(self._keep_books)

    def _poll(self) -> None:
        """Drains the response ring without being woken, once per turn of
        the loop, until nothing is in flight or the poll window closes (and
        a turn after answers their servers wrote: their books); then
        sleeps until woken. A turn of the loop costs less than waking a
        sleeping process, and the loop still serves every socket between
        turns. Not while the worker loads where its cores are few: its
        loader needs the CPU this would take, and the worker answers as
        soon as it is woken; nor while the polls back off
        (_poll_answers)."""
        if self._unbooked:  # the last turn's answers': the I/O since is read
            self._keep_books()
        if not self.alive or not self._drain():
            return
        if self._unbooked or self._pending and not self._quiet \
                and time.monotonic_ns() < self._poll_until:
            self.loop.call_soon(self._poll)
            return
        self._polling = False
        if not self.resp.arm_read():
            self.loop.call_soon(self._on_readable)

    @property
    def spin_backoffs(self) -> dict[str, int]:
        """How many times each side's wait for the other found its CPU
        taken by another busy process and began or lengthened a back-off
        (ring.BackOff): the worker's for requests, the front-end's polls for
        answers; counted on from the workers before it in its place."""
        try:
            worker = self.req.backoffs[0]
        except ValueError:  # closed with the worker: its last count stands
            worker = self._backoffs_seen & 0xFFFFFFFF
        self._backoffs_seen += (worker - self._backoffs_seen) & 0xFFFFFFFF
        before = self.backoffs_before
        return {"worker": before["worker"] + self._backoffs_seen,
                "front_end": before["front_end"] + self._poll_backoff.count}

    def _drain(self) -> bool:
        """Handles every answer in the response ring; False if the worker
        is dead (or unreadable) and was declared so."""
        ring = self.resp
        try:
            while True:
                for _ in range(_BURST):
                    parts = ring.try_get()
                    if parts is None:
                        break
                    self._on_response(parts)
                    del parts
                if not ring.held:
                    return True
                ring.release()
        except RingClosed:
            self._died(f"worker {self.index} closed its response ring")
        except Exception as e:  # noqa: BLE001 - the engine must survive this
            self._died(f"worker {self.index}: unreadable response: {e!r}")
        return False

    def _on_response(self, parts: list) -> None:
        rid, code, body, descs = messages.parse_response(parts[0])
        if rid == messages.READY_ID:
            if not self.ready.done():
                self.ready.set_result(body)
            return
        fut, on_done, t_sent, _, _, then, served, _, _ = self._pending.pop(rid, _NOT_PENDING)
        if fut is None:
            return
        t_read = time.monotonic_ns()
        late, ran, seconds = fut.done(), None, None  # done: its deadline (or its caller) came first
        failed_s = None
        try:
            ran = messages.ran(body)
            if ran is not None:
                ran["t_read"] = t_read
                ran["t_sent"] = t_sent
                ran["worker"] = self.index
                ran["version"] = served[1]  # the one served, asked for or not
            if code == messages.SKIPPED:  # its future is done, or due to fail
                result = self._not_run(t_sent, served)
            else:
                # Its call's time, for its books, where the model ran, failing
                # or not, as the worker's own books have it (WorkerLogic.noted;
                # none where its inputs were refused). A joined call's
                # (batching) once: its answers come one after another, and a
                # warm-up counted twice was taken for the model's time
                # (CallTimes skips one first call).
                if ran is not None and "t_done" in ran:
                    call = (served, ran["t_recv"]) if ran.get("batch") else None
                    if call is None or call != self._joined:
                        self._joined = call or self._joined
                        seconds = (ran["t_done"] - ran["t_recv"]) / 1e9
                if code != messages.OK:
                    result = error_for(code, body if ran is None else ran.pop("message", ""))
                    result.ran = ran
                    if code == ErrorCode.OVERLOADED and served is not None:
                        # An inference's run out of memory (backends.base): no
                        # room, as a load's (SageMaker's 507).
                        result.no_room = True
                else:  # late: its caller gave up (timeout): nothing to copy
                    result = None if late else (body, messages.copy_out(descs, parts[1:]))
            # A joined call that failed took its worker's time as one that
            # answered does, and the worker's own books count it
            # (worker.WorkerLogic.noted): so do these, once, though each
            # request run again after it carries it, whatever its answer.
            failed = body.get("failed_call") if type(body) is dict else None
            if failed is not None and (served, failed["t_recv"]) != self._joined:
                self._joined = (served, failed["t_recv"])
                failed_s = (failed["t_done"] - failed["t_recv"]) / 1e9
        except Exception as e:  # noqa: BLE001 - one bad answer fails one request
            result = InternalError(f"worker {self.index}: unreadable answer: {e!r}")
        # The answer first (a server writes it out in `then`), the books
        # after: nothing below changes what its caller gets.
        try:
            settle(fut, result, then)
        finally:
            if failed_s is not None:  # before the rerun's own call, which came after it
                self._times.ran(served, failed_s, t_read / 1e9)
            if then is None:
                self._book(on_done, served, seconds, t_read)
            else:
                # A server's answer, written: its pin and its call's time wait
                # for a later turn of the loop. Polled (_poll), that turn
                # comes after the I/O that reads the client's next request
                # and sends it to its worker, whose run leaves the loop the
                # time; kept now, they would come between the answer and
                # that request, where a client on this CPU runs within the
                # answer's write. (Not every kernel runs it then: on some it
                # waits until the loop sleeps, after this turn and the next.)
                # Woken (_on_readable), it is the next.
                self._unbooked.append((on_done, served, seconds, t_read))
        if served is not None:
            self._inferences_done(1)
            expected = self._sent_ns.pop(rid, 0)
            self._ring_ns -= expected
            self._began_ns = t_read  # the next one's, if any
            if self._calls:  # a call's first, skipped or refused alone: its others run
                if expected and not (ran and "t_done" in ran):
                    self._pass_on(rid, expected)
                else:
                    self._calls.pop(rid, None)
        self._loading.discard(rid)
        self._quiet.discard(rid)
        if (code == messages.SKIPPED or late and ran is not None) \
                and self.on_unserved is not None:
            self.on_unserved(served, ran, self.index,
                             body.get("failed_call") if code == messages.SKIPPED and body else None)
        if self._held:
            self._send_held()

    def _book(self, on_done: Callable | None, served: tuple | None, seconds: float | None,
              t_read: int) -> None:
        """An answered request's books: an inference's call time (`seconds`,
        where it ran), and its on_done (the pin on its model given back).
        In that order: a stale model's last request, unpinned, sends its
        unload at once, which forgets the model's figure; counted after, the
        call made it anew, and the model's next load took its first call,
        a warm-up, for its time."""
        try:
            if seconds is not None:
                self._times.ran(served, seconds, t_read / 1e9)
        finally:
            if on_done is not None:
                on_done()

    def _keep_books(self) -> None:
        """The books of the answers their servers wrote out (_unbooked).
        A failing one is reported as a failing callback would be, and
        stops nothing else."""
        unbooked, self._unbooked = self._unbooked, []
        for on_done, served, seconds, t_read in unbooked:
            try:
                self._book(on_done, served, seconds, t_read)
            except Exception as e:  # noqa: BLE001 - one request's books must not stop the rest
                self.loop.call_exception_handler(
                    {"message": f"worker {self.index}: a request's books failed",
                     "exception": e})


_NOT_PENDING = (None, None, 0, math.inf, "", None, None, None, None)


def _finish(fut: asyncio.Future, on_done: Callable | None, result, then) -> None:
    """Completes one request: its future, with a result or an exception
    (its `then` answers the caller at once), then its on_done (which runs
    whatever happens: pins are released)."""
    try:
        settle(fut, result, then)
    finally:
        if on_done is not None:
            on_done()


def settle(fut: asyncio.Future, result, then) -> None:
    """Completes a future not done yet (a deadline, or its caller, may
    have been first) and runs its `then`; a failing `then` is reported as
    a failing callback would be, and stops nothing else."""
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)
    if then is not None:
        try:
            then(fut)
        except Exception as e:  # noqa: BLE001 - one caller's bug must not stop the drain
            fut.get_loop().call_exception_handler(
                {"message": f"callback {then!r} of a worker's answer failed",
                 "exception": e, "future": fut})


class WorkerPool:
    """Every worker process of an engine, and their shared life cycle."""

    def __init__(self, config: Config):
        self.config = config
        self.devices = resources.plan_devices(config)
        self.workers: list[Worker] = []
        self.on_death: Callable[[Worker], None] | None = None
        self.on_unserved: Callable[[tuple, dict | None, int], None] | None = None  # Worker's
        self._restarts: dict[int, list[float]] = collections.defaultdict(list)
        self._restart_count = 0
        self.restart_delays: dict[int, float] = {}  # index -> the last restart's back-off
        self._stopping = False
        self._forsaken = False  # a forked child's copy (_after_fork_in_child)
        # Set by the finalizer, which holds no reference to the pool: a
        # program that exits without stop() (its loop still running on a
        # thread) saw the workers it killed restarted, their rings leaked.
        self._exiting = threading.Event()
        self._finalizer = weakref.finalize(self, _kill_all, self.workers, os.getpid(),
                                           self._exiting)
        _POOLS.add(self)

    @property
    def stopping(self) -> bool:
        """Whether its workers are going for good (stop(), or the exit of a
        program that never called it): a death is no worker to restart."""
        return self._stopping or self._exiting.is_set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for index, device in enumerate(self.devices):
            self.workers.append(self._spawn(index, device, loop))
        await self._await_ready(self.workers)

    def _spawn(self, index: int, device: str, loop) -> Worker:
        w = Worker(index, device, self.config)
        w.on_death, w.on_unserved = self._on_death, self._on_unserved
        w.start(loop)
        return w

    async def _await_ready(self, workers: list[Worker]) -> None:
        ready = asyncio.gather(*(w.ready for w in workers))
        try:
            await asyncio.wait_for(ready, self.config.ready_timeout_s)
        except asyncio.TimeoutError:
            raise WorkerDied(f"workers not ready within {self.config.ready_timeout_s} s") \
                from None
        finally:
            # A cancel (the engine stopping during a restart) ends a gather
            # with a CancelledError set, not cancelled: taken here, it is not
            # logged as "never retrieved" when collected.
            if ready.done() and not ready.cancelled():
                ready.exception()

    def _on_death(self, w: Worker) -> None:
        if self.on_death is not None:
            self.on_death(w)

    def _on_unserved(self, served: tuple, ran: dict | None, worker: int,
                     failed_call: dict | None = None) -> None:
        if self.on_unserved is not None:
            self.on_unserved(served, ran, worker, failed_call)

    async def restart(self, index: int) -> Worker:
        """A fresh worker (new process, new rings) in the place of a dead one.
        Repeated crashes back off: the first restart in a minute is at once,
        each further one waits twice as long (0.2 s, 0.4 s, ... up to 30 s).
        WorkerDied if the new one does not come up; the caller tries again
        (and so backs off further)."""
        old = self.workers[index]
        if old.is_running():  # declared dead but still running (a bad answer)
            old.process.kill()
        await _reaped(old.process, 5.0)
        backoffs = old.spin_backoffs  # read while its ring is there
        old.release()
        now = time.monotonic()
        recent = [t for t in self._restarts[index] if now - t < 60]
        self._restarts[index] = recent + [now]
        self._restart_count += 1
        delay = min(30.0, 0.1 * 2 ** len(recent)) if recent else 0.0
        self.restart_delays[index] = delay
        await asyncio.sleep(delay)
        if self.stopping:
            raise WorkerDied(f"worker {index}: not restarted, the pool is stopping")
        w = Worker(index, old.device, self.config)
        w.backoffs_before = backoffs
        w.on_unserved = self._on_unserved
        w.start(asyncio.get_running_loop())
        self.workers[index] = w  # from here on stop() owns it, whatever happens
        if self._exiting.is_set():  # the exit's finalizer ran since the look above
            w.process.kill()
            await _reaped(w.process, 5.0)
            w.release()
            raise WorkerDied(f"worker {index}: not restarted, the program is exiting")
        await self._await_ready([w])
        # Watched only once up: a death in the handshake is this call's
        # failure, not a second restart running beside this one.
        w.on_death = self._on_death
        if not w.alive:  # it died after its READY, before this call went on:
            self._on_death(w)  # told as any later death is (it went untold for good)
        return w

    @property
    def restarts(self) -> int:
        """Restarts since the pool started (the back-off looks at the last minute)."""
        return self._restart_count

    async def stop(self, deadline: float | None = None) -> None:
        """Close every request ring (workers drain and exit), then wait for
        them against one deadline (time.monotonic(); by default
        shutdown_timeout_s from now); whoever is left is killed (a worker
        ignores SIGTERM). One not yet READY (starting, or restarting) has
        nothing to drain: it is killed at once. Leaves no process and no
        segment behind."""
        if self._forsaken:
            return  # they are the parent's, and go with it
        self._stopping = True
        if deadline is None:
            deadline = time.monotonic() + self.config.shutdown_timeout_s
        for w in self.workers:
            w.on_death = None
            if w.up:
                w.close_requests()
            elif w.is_running():
                # Starting (or declared dead): nothing to drain, and nothing
                # to wait the deadline for (it did). Killed before its rings
                # go, which it would find gone and log as an error.
                w.stopped_why = f"the server stopped before worker {w.index} was ready"
                w.process.kill()
        # A deadline already spent (the servers' drain took it) still lets an
        # idle worker exit of its own, in a few milliseconds.
        deadline = max(deadline, time.monotonic() + EXIT_GRACE_S)
        for w in self.workers:
            await _reaped(w.process, deadline - time.monotonic())
        for w in self.workers:
            if w.is_running():
                w.stopped_why = (f"the server stopped before worker {w.index} finished "
                                 f"this request (its shutdown deadline passed: "
                                 f"shutdown_timeout_s)")
                w.process.kill()
                await _reaped(w.process, 5.0)
            w.release()
        self._finalizer.detach()


_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A child forked while a pool runs (os.fork in a coroutine, say) holds a
    copy of it, and of the loop whose readers and timers drive it. Whatever
    that loop runs in the child (its exit cancels every task, and `async
    with` stops the engine), the copy leaves the parent's rings, requests
    and processes alone: it read the parent's answers, which the parent
    then lost."""
    for pool in list(_POOLS):
        pool._stopping = pool._forsaken = True
        for w in pool.workers:
            w.alive = False  # what reads a ring, sends, or dies looks at it first
            w._disarm_deadlines()  # its timer marks requests abandoned, in shared memory


os.register_at_fork(after_in_child=_after_fork_in_child)


def _plain(handle) -> tuple:
    # The child inherits the descriptors under the same numbers.
    return handle.name, handle.data_fd, handle.space_fd, handle.spin_us


async def _reaped(process: subprocess.Popen | None, timeout: float) -> bool:
    """Waits, without blocking the loop, until `process` has exited (and is
    reaped); False if it is still running after `timeout` seconds."""
    end = time.monotonic() + max(0.0, timeout)
    while process is not None and process.poll() is None:
        if time.monotonic() >= end:
            return False
        await asyncio.sleep(0.01)
    return True


def _kill_all(workers: list[Worker], pid: int, exiting: threading.Event) -> None:
    """Last resort for a pool that was never stopped: no orphans, no segments."""
    if os.getpid() != pid:  # a forked child, exiting: they are its parent's
        return
    exiting.set()  # before the kills: their deaths are no workers to restart
    for w in workers:
        if w.process is not None and w.process.poll() is None:
            w.process.kill()
            w.process.wait(5)
        for ring in w.rings:
            ring.close()


def exit_words(code: int) -> str:
    """A child process's exit status (Popen's returncode), in words:
    "exit code 3", "SIGKILL"."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
