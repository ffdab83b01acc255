"""The Engine: many models, one set of workers, memory that never overflows.

    async with Engine(Config(repo="models", workers=2)) as engine:
        outputs = await engine.infer("resnet", {"x": batch})

The engine is the one authority over where a model lives. A request for a
model that is not resident starts its load (one load however many requests
wait for it); the bytes it will take are reserved before the load starts,
making room by evicting the least recently used models that no request is
using; the reservation is corrected to the measured bytes once it is loaded.
Every request pins its model until the worker has answered, so nothing is
unloaded under a request. A monitor evicts models that have been idle too
long, and the least recently used ones while host or GPU memory is above its
watermark. Every request has a deadline; waiting for a load counts against
it, while the load itself runs to a deadline of its own.

Everything here runs on the event loop; the only blocking work (a first
look at a model's files) runs in the default executor.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import functools
import itertools
import logging
import math
import numbers
import os
import shutil
import signal
import time
import weakref
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import numpy as np

from mmengine import auth
from mmengine import cache as books
from mmengine import diskcache, errors, fetch, hosttier, resources, shm, storage
from mmengine.config import Config, ConfigError, check_paths, parse_pins
from mmengine.declared import check_inputs
from mmengine.diskcache import DiskCache
from mmengine.errors import (BadRequest, LoadFailed, MMEngineError, ModelNotFound, Overloaded,
                             PinnedFull, ShuttingDown, Timeout, TooLarge, WorkerDied)
from mmengine.messages import Op
from mmengine.messages import native as _records
from mmengine.protocol import from_torch
from mmengine.storage import ModelSpec, Repository, TensorSpec
from mmengine.workers import Worker, WorkerPool, settle

Key = tuple[str, int]
# What an operator is told (a failed load, a worker's end): `mmengine serve`
# writes it to stdout; an embedding process routes it as it routes its own.
log = logging.getLogger("mmengine")
STATE_NAMES = {books.LOADING: "loading", books.READY: "resident",
               books.UNLOADING: "evicting", books.FAILED: "failed"}
#: A model's residency, from storage to device, as stats() and metadata name it.
STATES = ("on storage", "fetching", "on disk", "in host memory", "loading", "resident",
          "evicting", "failed")
# How long a load past its deadline may still take before its worker is
# taken for stuck and restarted (_unstick).
STUCK_LOAD_GRACE_S = 5.0
# A worker's loader runs one load at a time. Room is made for the load it
# runs and the next (ready when its turn comes), not for every load queued
# behind them: those held their bytes from the start of their wait, and
# under Zipf traffic half a worker's budget was loads waiting their turn,
# its hot models evicted for them (benchmarks/RESULTS.md, Zipf, session 41).
LOADS_AHEAD = 2
# A model whose requests end their worker twice within this is backed off (_blame).
CRASH_WINDOW_S = 60.0
# A model that has not ended a worker for this long after its last crash
# back-off ended starts its crash back-offs from the shortest again.
CRASH_QUIET_S = 600.0
# Rows of stats() and models() built between two turns of the loop (~1 ms).
ROWS_PER_TURN = 128
# A request answered through a server is told to the observers at the next
# request sent to a worker, or within this (Engine.flush_observations).
OBSERVE_WITHIN_S = 0.01


@dataclasses.dataclass
class ModelStats:
    loads: int = 0
    evictions: int = 0
    evictions_by_reason: dict = dataclasses.field(default_factory=dict)
    failures: int = 0
    last_error: str = ""
    last_load_time: float = 0.0      # wall clock
    load_duration_s: float = 0.0
    measured_bytes: int = 0          # what the last load really took
    measured_of: tuple = ()          # of what declaration (_declared): another's is no guide
    host_loads: int = 0              # loads that mapped the host tier's copy
    failed_in_a_row: int = 0         # failed loads since the last good one
    backoffs_in_a_row: int = 0       # of them, those that backed it off
    retry_at: float = 0.0            # monotonic; until then a load is not tried
    # The last load ran out of memory (OVERLOADED): the machine's state, so
    # its back-off answers OVERLOADED (retry later), not LOAD_FAILED.
    out_of_memory: bool = False
    crashed_at: float = -math.inf    # monotonic; its request's worker last ended itself
    crash_backoffs: int = 0          # back-offs for crashes in a row (CRASH_QUIET_S apart at most)
    crash_backoff_until: float = -math.inf  # monotonic; when the last ended


_NEVER_LOADED = ModelStats()  # model_row's, read only
_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()  # started, in this process
_FORKED = object()  # Engine._loop in a child forked while it ran: none of its own


def _after_fork_in_child() -> None:
    # Its workers' copies leave the parent's alone (workers._after_fork_in_child,
    # the host tier by its pid); the engine refuses every call, and its stop()
    # (at the child's exit, say) does nothing.
    for engine in list(_ENGINES):
        engine._loop = _FORKED
        engine._closing = True


os.register_at_fork(after_in_child=_after_fork_in_child)


class Engine:
    """The in-process engine. Use `async with Engine(config)` or start/stop."""

    def __init__(self, config: Config | None = None, **overrides: Any):
        config = config or Config()
        self.config = config.replace(**overrides) if overrides else config
        self.repo = Repository(self.config.repo, config=self.config)
        self.disk: DiskCache | None = None  # scanned at start()
        # Downloads block a thread each for as long as they take: their own
        # threads, so that looking a model up never waits behind one, and
        # daemons, so that a stalled one never holds the process's exit.
        # Four: two large downloads on a slow link leave room for small
        # models' (and a source too slow for fetch_min_rate gives its up).
        self._fetchers = fetch.Threads(4, "mmengine-fetch")
        self.pool: WorkerPool | None = None
        self.cache = None
        self.host = hosttier.HostTier(self.config)
        self.host.on_drop = self._forget_segment
        self._load_gate = _ByteGate(self.config.load_bytes_in_flight)
        self._specs: dict[tuple[str, Any], ModelSpec] = {}
        self._busy: dict[Key, tuple[Op, asyncio.Task]] = {}  # a load or unload under way
        # The requests waiting for each load task, and the pin that a load
        # which ended holds for them: a waiter resumes turns of the loop
        # after its load, and meanwhile another load's room was made of the
        # model it waited for (a second load for the same miss), whenever
        # every other model was in use. The last waiter to resume drops it.
        self._load_waiters: collections.Counter[asyncio.Task] = collections.Counter()
        self._handed: dict[asyncio.Task, tuple[Key, int]] = {}
        # Each entry's generation, from one count for all: unique, so that
        # a forgotten model's is dropped (_forget_stats) and never matched again.
        self._gen: dict[Key, int] = {}
        self._gens = itertools.count(1)  # 0: no entry (an explicit pin's, _pinned)
        self._stats: dict[Key, ModelStats] = {}
        # (name, version asked for) -> key, for models whose files could not
        # even be read: their back-off is checked before the files are read.
        self._bad_specs: dict[tuple[str, Any], tuple[Key, tuple[bytes, ...]]] = {}
        # (name, version asked for) -> the repository's resolve under way
        self._resolving: dict[tuple[str, Any], asyncio.Future] = {}
        # name -> the repository scans that found it changed: a spec read
        # before the last of them is used once, not kept.
        self._name_changes: collections.Counter[str] = collections.Counter()
        # The counts of the model versions forgotten (removed from the
        # repository): the totals are counters, and must not go backwards.
        self._forgotten: collections.Counter[str] = collections.Counter()
        # Workers told at the last monitor turn to give back the memory they
        # keep for reuse, their device being over the watermark (_relieve).
        self._released: set[int] = set()
        # A watermark's evictions under way, by what is over it ("host", or
        # a worker's index): each waits for its unloads' answers, which wait
        # behind the worker's loads, while the monitor goes on (_relieve_in).
        self._relieving: dict = {}
        # Explicit pins: key -> the generation of the entry that carries the
        # pin. A key whose entry went (its worker died) stays, and the pin is
        # taken again whenever the model is loaded again.
        self._pinned: dict[Key, int] = {}
        # Models pinned by configuration (pin_models) that have not been
        # resident since start: the engine is not ready while any is left.
        self._shrinking: set[int] = set()  # workers the monitor makes room on (_monitor_once)
        self._warming: set[Key] = set()
        self._warmed = asyncio.Event()
        self._rewarming: set[Key] = set()  # pinned models _keep_pinned_warm is loading
        # A pinned model's next try and its wait after a try that failed with
        # no back-off of its own (no room, too large once its size is known).
        self._rewarm_after: dict[Key, tuple[float, float]] = {}
        self._control_order: dict[str, list] = {}  # name -> [Lock, holders and waiters]
        # Pins or bytes dropped: a version to compare, and an Event for waiters.
        self._room_version = 0
        self._room = asyncio.Event()
        self._room_waiters = 0
        self._short_of_room: set[Key] = set()  # loads waiting for room on every worker
        self._fetching: set[Key] = set()  # remote models being downloaded for a load
        self._locks: list[asyncio.Lock] = []
        self._tasks: set[asyncio.Task] = set()
        # Requests that had to wait for their model's look or load: not
        # cancelled with the engine's own tasks at stop's deadline, since
        # one already on a worker ends as the worker does (WORKER_DIED).
        self._requests: set[asyncio.Task] = set()
        # Answers a server could not send as they were (refused()), by future.
        self._refused: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._closing = False  # refusing new requests (shutting down)
        self._started = False
        self._stopped = False  # stop() was called
        self._cut_off = False  # stop() cancels the requests left at its deadline
        self._starting: asyncio.Future | None = None  # done once start() has ended
        self._stopping: asyncio.Task | None = None  # the one shutdown, which stop() awaits
        self._loop: asyncio.AbstractEventLoop | None = None  # the one start() ran on
        # Inputs a backend read from an artifact whose manifest declares none
        # (torch.export, ONNX), known once it has loaded: metadata shows them.
        self._derived_inputs: dict[Key, tuple[TensorSpec, ...]] = {}
        # Unloads waiting for a model's requests to finish: key -> a future
        # done when the unload is. New requests wait for it, then load again.
        self._draining: dict[Key, asyncio.Future] = {}
        # unload()s that drop the host copy: an unload already under way
        # when one is asked for drops it too, rather than demote it (which,
        # for a CPU worker's model, makes room for it by dropping others).
        self._copy_goes: set[Key] = set()
        # The answers of the host-tier copies being made (_publish): an
        # unload of the model waits for its copy's, so that the copy it
        # demotes (or drops) is whole when the unload returns.
        self._publishing: dict[Key, asyncio.Future] = {}
        # The spec each model on a worker was loaded with (those loaded
        # since the last scan are compared with the repository's at it), and
        # the ones that serve nothing as they are: removed from the
        # repository, or their manifest edited to declare otherwise (the
        # worker checks what it read). key -> why; unloaded once their
        # requests are done, and no request is given them meanwhile
        # (_retire_stale).
        self._loaded_specs: dict[Key, ModelSpec] = {}
        self._loaded_since_scan: set[Key] = set()
        self._stale: dict[Key, str] = {}
        self._queued: dict[str, int] = {}  # model name -> requests not yet answered
        # Callables observer(kind, fields) told of every "request", "load",
        # "evict", "worker_exit", "late" (an answer that came after its
        # request had failed: timed out, or cut off), "skipped" (one the
        # worker did not run for that reason) and "forget" (a version gone
        # from the repository and from every tier: `last` when its model has
        # no other) (metrics, traces); they must not raise nor block.
        self.observers: list = []
        # The servers listening for it (server/listener.py), whose counts
        # stats() reports: added as each listens, gone as it closes.
        self.servers: weakref.WeakSet = weakref.WeakSet()
        # Requests that ended with a server's answer, told to the observers
        # later (flush_observations): [(place, future, end_ns)].
        self._unobserved: list = []
        self._observe_timer: asyncio.TimerHandle | None = None
        self._hits = 0
        self._used_since = 0.0  # monotonic; the disk copies of what was used since are touched
        self._misses = 0  # requests that had to wait for a load
        self._abandoning = False  # _mark_cancelled is due this turn

    # -- life ------------------------------------------------------------------

    async def start(self) -> "Engine":
        if self._stopped:
            raise RuntimeError("an engine that stopped does not start again: make a new one")
        if self._started:
            raise RuntimeError("this engine has started already")
        check_paths(self.config)
        # Sized before a worker starts: a size that cannot be made is the
        # start's error, with nothing to stop.
        self.host.size(self.config)
        devices = resources.plan_devices(self.config)
        budgets = {d: resources.device_budget(self.config, d) for d in devices}
        if too_much := resources.overcommitted(
                self.config, [budgets[d] if d == "cpu" else 0 for d in devices],
                self.host.budget()):
            log.warning("%s", too_much)
        self._started = True  # before the first await: a second start() is refused too
        loop = self._loop = asyncio.get_running_loop()
        _ENGINES.add(self)
        self._starting = loop.create_future()
        try:
            await self._bring_up(loop, budgets)
        except BaseException:
            if self.disk is not None:  # it may be tried again, with a cache of its own
                self.disk.close()
                self.disk = None
            raise
        finally:
            self._starting.set_result(None)
        if self._stopped:  # stop() waited for this start, and now undoes it
            raise RuntimeError("the engine was stopped while it started")
        return self

    async def _bring_up(self, loop: asyncio.AbstractEventLoop, budgets: dict[str, int]) -> None:
        """Starts the workers; `budgets`, each device's bytes of models."""
        try:
            pins, broken = await self._configured_pins()
            self.disk = await loop.run_in_executor(self._fetchers, DiskCache, self.config)
        except BaseException:
            self._started = False
            raise
        self.pool = WorkerPool(self.config)
        self.pool.on_death = self._on_worker_death
        self.pool.on_unserved = self._on_unserved
        try:
            await self.pool.start()
        except BaseException:
            await self.pool.stop()
            self.pool, self._started = None, False  # not started: it may be tried again
            raise
        policy = books.GDSF if self.config.policy == "gdsf" else books.LRU
        self.cache = books.Cache(len(self.pool.workers), policy)
        for w in self.pool.workers:
            self.cache.set_capacity(books.DEVICE, w.index, budgets[w.device])
        self._locks = [asyncio.Lock() for _ in self.pool.workers]
        caps = [self.cache.capacity(books.DEVICE, w.index) for w in self.pool.workers]
        pins = list({(s.name, s.version): s for s in pins}.values())  # "m" and "m:1" are one
        too_large = [s for s in pins if s.estimated_bytes > max(caps)]
        if too_large or not _fit_together([s.estimated_bytes for s in pins], caps):
            # They could never all be resident: the server would never be ready.
            await self.pool.stop()
            self.pool, self.cache, self._started = None, None, False
            if too_large:
                s = too_large[0]
                raise ConfigError(f"pin_models: {s.name} v{s.version} needs "
                                  f"{s.estimated_bytes} bytes, more than a worker's whole "
                                  f"budget ({max(caps)}, device_budget)")
            named = ", ".join(f"{s.name} v{s.version} ({s.estimated_bytes})" for s in pins)
            raise ConfigError(f"pin_models: {named} do not fit together in the workers' "
                              f"budgets ({', '.join(map(str, caps))} bytes, device_budget)")
        self._spawn(self._monitor())
        for w in self.pool.workers:
            if not w.alive:  # died after its READY, while there was no cache to tell
                self._on_worker_death(w)
        if self.config.repo_scan_s:
            self._spawn(self._watch_repository())
        pins = [(s.name, s.version) for s in pins] + broken
        for key in pins:
            self._pinned.setdefault(key, 0)  # taken by the entry of its first load
        self._warming.update(pins)
        if not self._warming:
            self._warmed.set()
        self._keep_pinned_warm()

    async def _configured_pins(self) -> tuple[list[ModelSpec], list[Key]]:
        """The specs of the models pin_models names, and the keys of those
        that are there but cannot be read as they stand: those fail as loads
        do, and are tried again after their back-off (their files may be
        mended). A name or version the repository does not have is the
        configuration's error."""
        specs, broken = [], []
        loop = asyncio.get_running_loop()
        for name, version in parse_pins(self.config.pin_models):
            try:
                specs.append(await self._spec(name, version, record=False))
            except LoadFailed:
                versions = await loop.run_in_executor(None, self.repo.versions, name)
                broken.append((name, version or versions[-1]))
            except MMEngineError as e:
                raise ConfigError(f"pin_models: {e}") from None
        return specs, broken

    def health(self) -> dict:
        """`status`: "serving"; "warming" while a model pinned by
        configuration has not yet been resident (the protocols' readiness
        waits for it: `warming` lists them); "down" while no worker is up;
        "stopping" once the engine refuses new requests (a balancer must
        send them elsewhere while it drains)."""
        alive = sum(w.up for w in self.pool.workers) if self.pool is not None else 0
        status = "down" if not alive else "stopping" if self._closing \
            else "warming" if self._warming else "serving"
        return {"status": status, "workers_alive": alive,
                "warming": sorted([name, version] for name, version in self._warming)}

    async def warmed(self) -> None:
        """Returns once every model pinned by configuration has been
        resident (at once if none is configured); RuntimeError if the engine
        stops first, or has not started (it would wait for ever)."""
        if not self._started and not self._stopped:
            raise RuntimeError("this engine has not started: start() it first")
        self._check_loop()  # its event is its loop's: a wait from another bound it there
        await self._warmed.wait()
        if self._warming:
            raise RuntimeError("the engine stopped before its pinned models were resident")

    def refuse_new(self) -> None:
        """Stops taking requests: from now on each new one gets OVERLOADED
        ("shutting down") at once, while those accepted go on. stop() begins
        with this; a server calls it as soon as its own shutdown begins, so
        that a request arriving on an open connection while it drains gets
        that answer instead of being accepted and then cut off."""
        self._closing = True

    async def stop(self, deadline: float | None = None) -> None:
        """Stops accepting, lets every accepted request finish (those
        waiting for a load included) to one deadline (time.monotonic();
        default: shutdown_timeout_s from now), then stops the workers against
        what is left of it. A request still unanswered at the deadline
        fails, typed: OVERLOADED if it was waiting for a load, WORKER_DIED if
        it was on a worker.

        One shutdown, however many call: each call returns once it is done
        (one called while start() runs waits for it, then undoes it); a
        caller that is cancelled stops waiting, not the shutdown."""
        if self._loop is _FORKED:
            return  # a forked child's copy: the engine is its parent's to stop
        self._check_loop()
        if self._stopping is None:
            self._stopped = True
            self.refuse_new()
            self._warmed.set()  # warmed() waits no more: it raises if they are not
            if deadline is None:
                deadline = time.monotonic() + self.config.shutdown_timeout_s
            self._stopping = asyncio.get_running_loop().create_task(self._stop(deadline))
        await asyncio.shield(self._stopping)

    async def _stop(self, deadline: float) -> None:
        if self._starting is not None:
            await self._starting
        if self.pool is None:  # never started, or its start failed
            return
        while (self._queued or any(w.in_flight for w in self.pool.workers)) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await _cancel(self._tasks)
        await self.pool.stop(deadline)
        # A turn first: the requests whose futures the pool's stop failed
        # last (WORKER_DIED, with why) take that now. Cancelled in the same
        # turn, a task whose wake-up is still queued raises CancelledError
        # instead, and its caller never hears why.
        await asyncio.sleep(0)
        self._cut_off = True
        await _cancel(self._requests)  # any still waiting, for nothing now
        await _cancel(self._tasks)  # begun meanwhile
        await asyncio.sleep(0)  # the done callbacks of the last
        self.flush_observations()
        if self._observe_timer is not None:
            self._observe_timer.cancel()
            self._observe_timer = None
        # (No cache where the start failed and its cleanup was cut short: a
        # stop signal as its pool stopped, which this has stopped again.)
        for key in list(self.cache.lru_keys()) if self.cache is not None else ():
            self.cache.remove(key)  # the workers took their models with them
        self.host.clear()
        self._fetchers.shutdown(wait=False, cancel_futures=True)
        if self.disk is not None:  # its folder of downloads in progress goes
            await asyncio.get_running_loop().run_in_executor(None, self.disk.close)

    async def __aenter__(self) -> "Engine":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _spawn(self, coro, tasks: set | None = None) -> asyncio.Task:
        tasks = self._tasks if tasks is None else tasks
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    # -- the request path --------------------------------------------------------

    async def infer(self, name: str, inputs: Mapping[str, Any], version: int | None = None,
                    timeout: float | None = None, token: str | None = None
                    ) -> dict[str, np.ndarray]:
        """Runs a model on named arrays (numpy, or torch on any device) and
        returns its named outputs as numpy arrays. `token`: one of the
        model's tokens, if its manifest lists any (else Unauthorized)."""
        return (await self.submit(name, inputs, version, timeout, token))[1]

    def submit(self, name: str, inputs: Mapping[str, Any], version: int | None = None,
               timeout: float | None = None, token: str | None = None,
               then: Callable[[asyncio.Future], None] | None = None) -> asyncio.Future:
        """infer() as a future of (timing body, outputs), for servers. A
        request for a resident model is sent before this returns, with no
        task and no coroutine in between; any other goes through a task that
        resolves the model, loads it if needed, then sends. Bad input (and
        a bad token, where the model is known) raises here, at once.

        `then(future)` runs once the future is done: for a resident model,
        in the turn of the loop that reads the worker's answer, ahead of the
        engine's metrics (a server's answer goes out first); else as a done
        callback; not for a resident model's future its caller cancels.
        The request's place in its model's queue is free when `then` runs:
        a client's next request may come in the same turn.

        Cancelling the future abandons the request: if its worker has not
        begun it, the worker skips it (observers hear "skipped"); the
        deadline's passing does the same."""
        t_submit = time.monotonic_ns()
        try:
            return self._submit(name, inputs, version, timeout, token, then, t_submit)
        except MMEngineError as e:  # refused at once: observed as any answer is
            if self.observers:
                # A version that is no integer (a list, refused for it) is
                # none the books can key: the model's default stands in.
                try:
                    version = None if version is None else _version(version)
                except BadRequest:
                    version = None
                # Named only if it is a model: a stranger's names make no series.
                known = type(name) is str and self._looked_up(name, version)
                self._emit("request", _request_fields(name if known else "", version,
                                                      t_submit, e))
            raise

    def _submit(self, name: str, inputs: Mapping[str, Any], version: int | None,
                timeout: float | None, token: str | None,
                then: Callable[[asyncio.Future], None] | None, t_submit: int) -> asyncio.Future:
        deadline = self._deadline(timeout)
        if type(name) is not str:  # None would be queued under None, for good
            raise BadRequest(f"a model name is a string, not {type(name).__name__}")
        if version is not None:
            version = _version(version)
        spec = self._specs.get((name, version))
        # Before anything else: a stranger learns nothing more. (Asked only
        # where there are tokens: the message is a repr and a join.)
        if spec is not None and spec.token_digests:
            auth.check(spec.token_digests, token, f"model {spec.name!r}")
        arrays = _as_arrays(inputs)
        queued = self._queued.get(name, 0)
        if queued >= self.config.max_queue_per_model:
            raise Overloaded(f"{name}: {queued} requests already queued; retry later")
        fut = None
        place = _Place(self, name, version, t_submit, then)
        if then is not None:
            then = place.leave_then
        if spec is not None:
            key = (spec.name, spec.version)
            if key in self.cache and not (self._draining and key in self._draining) \
                    and not (self._stale and key in self._stale):
                index = self.cache.acquire(key, time.monotonic())  # pin + touch if READY
                if index >= 0:
                    self._hits += 1
                    fut = self._send_infer(key, self.pool.workers[index], arrays, deadline,
                                           then, True, place if self.observers else None)
                    if self._unobserved:  # while the worker runs this one
                        self.flush_observations()
        if fut is None:
            fut = self._spawn(self._infer_cold(name, version, arrays, deadline, token,
                                               place=place if self.observers else None),
                              self._requests)
            if then is not None:
                fut.add_done_callback(then)
        self._queued[name] = queued + 1
        # One callback (each is a handle of the loop's): the place given
        # back if `then` did not, or there is none; the observers told, or
        # for a server's request (`then`) told later.
        if not self.observers:
            fut.add_done_callback(place.leave)
        else:
            fut.add_done_callback(place.end if then is None else place.end_later)
        return fut

    def flush_observations(self) -> None:
        """Tells the observers of the requests that ended with a server's
        answer (`then`) since the last call. Those are told late, so that
        their books are kept while a worker runs the next request, not
        between an answer and its client's next request (~3.5 µs a request
        with the metrics): at the next request sent to a worker, or within
        OBSERVE_WITHIN_S. Whoever reads what the observers keep calls this
        first (metrics.attach does)."""
        ended, self._unobserved = self._unobserved, []
        for place, fut, end_ns in ended:
            self._emit_request(place.name, place.version, place.t_submit, fut, end_ns,
                               place.sent)

    def _observe_later(self, place: "_Place", fut: asyncio.Future) -> None:
        self._unobserved.append((place, fut, time.monotonic_ns()))
        if self._observe_timer is None:  # never cancelled: one a period, at most
            self._observe_timer = self._loop.call_later(OBSERVE_WITHIN_S, self._observe_due)

    def _observe_due(self) -> None:
        self._observe_timer = None
        self.flush_observations()

    def refused(self, fut: asyncio.Future, error: MMEngineError) -> None:
        """Says that the answer `fut` (submit's) brought could not be sent as
        it was: its client got `error` instead (an output its protocol
        cannot carry, or that its request did not name). The request is
        counted with `error`'s code, as its client saw it. Said from
        submit's `then`, before the observers hear of the request."""
        if self.observers:
            self._refused[fut] = error

    def _dequeue(self, name: str) -> None:
        left = self._queued[name] - 1
        if left:
            self._queued[name] = left
        else:
            del self._queued[name]  # unknown names must not pile up here

    def _emit_request(self, name: str, version: int | None, t_submit: int,
                      fut: asyncio.Future, end_ns: int = 0, sent: dict | None = None) -> None:
        """`sent`: where and when the request was sent (_Place.sent), told
        where its end carries no account of that: its caller cancelled it."""
        cancelled = fut.cancelled()
        e = None if cancelled else fut.exception()
        refused = self._refused.pop(fut, None) if e is None and not cancelled else None
        if not self._looked_up(name, version):
            name = ""  # no model: a stranger's names make no series, whatever its code
        fields = _request_fields(name, version, t_submit, e or refused, end_ns)
        if cancelled:  # by its caller: stop() fails what it cuts off, typed
            fields["code"] = "CANCELLED"
        # The worker's account of the run: an answer's, or that of a
        # failure once a worker took the request (MMEngineError.ran).
        ran = fut.result()[0] if e is None and not cancelled else getattr(e, "ran", None)
        if ran is None:  # cancelled, or failed with no account: where it went, if it did
            ran = sent
        if ran is not None:
            _add_ran(fields, ran)
        self._emit("request", fields)

    def version_of(self, name: str, version: Any) -> int | None:
        """The version of `name` that a request asking for `version` (None:
        the default) is for, if the engine has looked it up and the
        repository has it, servable or not, or the last scan listed it;
        None otherwise (a request refused before its look-up may name
        anything)."""
        if isinstance(version, np.integer):  # as _version takes it
            version = int(version)
        if version is not None and type(version) is not int:  # (name, True) finds (name, 1)
            return None
        spec = self._specs.get((name, version))
        if spec is not None:
            return spec.version
        bad = self._bad_specs.get((name, version))
        if bad is not None:
            return bad[0][1]
        if not self.repo.lists(name):  # as the last scan saw it (no disk access)
            return None
        if version is None:
            return self.repo.versions(name)[-1]
        return version if self.repo.listed(name, version) else None

    def _looked_up(self, name: str, version: int | None) -> bool:
        """Whether `name` is a model: the repository was asked for it (by
        this version, or its default) and had it, servable or not, or its
        last scan listed it; without a look on the loop (a request refused
        before its look is a stranger's only where no scan knows the name)."""
        return ((name, version) in self._specs or (name, None) in self._specs
                or (name, version) in self._bad_specs or (name, None) in self._bad_specs
                or self.repo.lists(name))

    def _on_unserved(self, served: tuple, ran: dict | None, worker: int,
                     failed_call: dict | None = None) -> None:
        """An inference whose answer nobody got. If it ran (`ran`), it did
        after its request had failed (its deadline came first, or its
        caller went away): the call still took that worker's time, which
        the next requests waited for, so observers hear of it ("late").
        Else the worker skipped it, abandoned or sure to miss its deadline
        ("skipped"; with `failed_call` where a joined call of it had failed
        first, messages.py)."""
        if self.observers:
            fields = {"model": served[0], "version": served[1]}
            if ran is None:
                self._emit("skipped", {**fields, "worker": worker,
                                       "at_ns": time.monotonic_ns(),
                                       "failed_call": failed_call})
            else:
                self._emit("late", _add_ran(fields, ran))

    def _abandon_cancelled(self) -> None:
        """Tells the workers, once per turn of the loop, which of their
        requests were cancelled by their callers: what has not run yet is
        skipped."""
        if not self._abandoning:
            self._abandoning = True
            self._loop.call_soon(self._mark_cancelled)

    def _mark_cancelled(self) -> None:
        self._abandoning = False
        if self.pool is not None:
            for worker in self.pool.workers:
                worker.abandon_cancelled()

    def _emit(self, kind: str, fields: dict) -> None:
        for observer in self.observers:
            try:
                observer(kind, fields)
            except Exception as e:  # noqa: BLE001 - an observer must not break serving
                log.error("observer %r failed on %s: %r", observer, kind, e)

    async def _infer_cold(self, name: str, version: int | None, arrays: dict,
                          deadline: float, token: str | None,
                          resent: bool = False, place: "_Place | None" = None
                          ) -> tuple[dict, dict]:
        """`resent`: sent again after its worker died (_resend): its token
        was checked, and its hit or miss counted, when it was first sent.
        `place`: its request's, told where it is sent (for observers)."""
        async def look(name: str, version: int | None) -> ModelSpec:
            try:
                async with asyncio.timeout_at(self._loop_deadline(deadline)):
                    spec = await self._spec(name, version)
            except LoadFailed as e:  # why, only to a caller it would serve
                if not resent:
                    auth.check(getattr(e, "token_digests", ()), token, f"model {name!r}")
                raise
            except TimeoutError:  # the look goes on, for the next request
                raise Timeout(f"{name}: its manifest was not read within the request's "
                              f"deadline") from None
            if not resent:
                auth.check(spec.token_digests, token, f"model {spec.name!r}")
            # Before a load: a request its model would refuse loads nothing
            # for it (and evicts nothing).
            check_inputs(spec.inputs, arrays)
            return spec

        try:
            key, worker = await self._acquire_named(name, version, deadline,
                                                    request=not resent, look=look)
            return await self._send_infer(key, worker, arrays, deadline, None, not resent,
                                          place)
        except asyncio.CancelledError:
            # Cancelled by stop() at its deadline: say so. (By its caller,
            # though stop() has begun: cancelled, so that its worker skips it.)
            if self._cut_off:
                raise ShuttingDown(f"{name}: the engine shut down before this request "
                                 f"was served") from None
            raise

    def _send_infer(self, key: Key, worker: Worker, arrays: dict, deadline: float,
                    then: Callable[[asyncio.Future], None] | None = None,
                    resendable: bool = True, place: "_Place | None" = None) -> asyncio.Future:
        """Sends a request for a model the caller has pinned. The pin is
        dropped when the worker is done with the request (ran it, or skipped
        it as abandoned), not when the caller stops waiting. `resendable`:
        sent again if its worker dies before reading it (Worker.call).
        `place`: its request's, told where and when it was sent."""
        gen = self._gen[key]
        try:
            if worker.in_flight >= self.config.max_queue_per_worker:
                # Named: a model that floods its worker refuses its neighbours.
                busiest = worker.busiest()
                ahead = (f", {busiest[1]} of them for {busiest[0][0]} v{busiest[0][1]}"
                         if busiest else "")
                raise Overloaded(f"worker {worker.index} has {worker.in_flight} requests "
                                 f"in flight{ahead}; retry later")
            spec = self._loaded_specs.get(key)
            # (Positional: compiled, it is a C call, which takes no keyword
            # past a default it skips.)
            fut = worker.call(Op.INFER, key[0], key[1], arrays, None,
                              functools.partial(self._unpin_request, key, gen, True),
                              deadline, then, spec.max_batch_size if spec is not None else 0,
                              resendable, place)
        except BaseException:
            self._unpin_request(key, gen)
            raise
        if place is not None:
            place.sent = {"worker": worker.index, "t_sent": worker.sent_ns, "version": key[1]}
        return fut

    @staticmethod
    def _loop_deadline(deadline: float) -> float:
        # Deadlines are time.monotonic(); the loop's clock may differ.
        loop = asyncio.get_running_loop()
        return loop.time() + (deadline - time.monotonic())

    def _deadline(self, timeout: float | None) -> float:
        if self.pool is None:  # a caller's bug, not a load to retry later
            raise RuntimeError("the engine has not started: await engine.start(), or use "
                               "`async with Engine(...)`")
        self._check_loop()
        self._check_open()
        if timeout is None:
            return time.monotonic() + self.config.request_timeout_s
        if type(timeout) is float and timeout > 0:  # the usual case: no ABC check
            return time.monotonic() + timeout
        if isinstance(timeout, bool) or not (isinstance(timeout, numbers.Real)
                                             and timeout > 0):  # NaN is no deadline
            raise BadRequest(f"timeout must be a positive number of seconds, not {timeout!r}")
        return time.monotonic() + float(timeout)  # numpy's scalars too, as the SDK takes

    def _check_open(self) -> None:
        if self._closing:
            raise ShuttingDown("the engine is shutting down; retry on another instance")

    def _check_loop(self) -> None:
        """Futures, locks and the workers' readers belong to the loop that
        started the engine: a call from another would break them (a load
        begun there fails, and its model stays backed off; a model whose
        directory it read is left with a future of that loop, and fails on
        this one ever after). Asked of asyncio's running loop, though that
        costs a getpid() system call in CPython 3.11: the thread the engine
        started in, with its loop running, cannot stand in for it, as the
        loop may have moved to another thread since."""
        loop = self._loop
        if loop is not None and asyncio._get_running_loop() is not loop:
            if loop is _FORKED:
                raise RuntimeError("this Engine is the process's that forked this one: a "
                                   "forked child cannot use it; make a new Engine here")
            raise RuntimeError("this Engine serves on the event loop that started it; "
                               "call it there (from another thread: "
                               "asyncio.run_coroutine_threadsafe(coro, loop))")

    async def _spec(self, name: str, version: int | None, record: bool = True) -> ModelSpec:
        """The model's spec, read once; a model that cannot be served is a
        failed load (`record`: a listing only looks, and counts nothing)."""
        if version is not None:  # before the look-up: (name, True) finds (name, 1)
            version = _version(version)
        spec = self._specs.get((name, version))
        if spec is None:
            bad = self._bad_specs.get((name, version))
            if bad is not None:
                try:
                    self._check_backoff(bad[0])
                except MMEngineError as e:  # OVERLOADED too: out of memory
                    e.token_digests = bad[1]
                    raise
            # The first look at a model reads its directory: off the loop,
            # once however many requests ask meanwhile.
            changes = self._name_changes[name]
            resolving = self._resolving.get((name, version))
            if resolving is None:
                resolving = self._resolving[(name, version)] = \
                    asyncio.get_running_loop().run_in_executor(None, self.repo.resolve,
                                                               name, version)
                resolving.add_done_callback(functools.partial(self._resolved, (name, version)))
            try:
                spec = await asyncio.shield(resolving)
            except ModelNotFound as e:
                if not getattr(e, "removed", False):
                    raise
                self._names_changed({name})  # what was read of it may be the gone version's
                if version is None:  # the default is another now
                    return await self._spec(name, version, record)
                raise
            except LoadFailed as e:  # it exists but cannot be served: say so in stats
                # One failed look is one failure, however many waited for it
                # (they share the exception).
                if not record or getattr(e, "counted", False):
                    raise
                e.counted = True
                try:
                    latest = self.repo.versions(name)[-1]  # cached by the failed resolve
                except MMEngineError:  # its directory cannot be read: no version is known
                    latest = 1
                bad = (name, version or latest)
                # Under each way to ask for it: a request for it by number
                # after one for the default read it again.
                asked_as = {(name, version), bad} | ({(name, None)} if bad[1] == latest else set())
                for asked in asked_as:
                    self._bad_specs[asked] = (bad, getattr(e, "token_digests", ()))
                self._load_failed(bad, e)
                raise
            if self._bad_specs:  # each way it was asked for: it reads well now
                self._bad_specs = {k: v for k, v in self._bad_specs.items()
                                   if v[0] != (spec.name, spec.version)}
            if self._name_changes[name] == changes:  # else it may be the old manifest's
                self._specs[(name, version)] = spec
        return spec

    async def _acquire_named(self, name: str, version: int | None, deadline: float,
                             request: bool = True, look=None) -> tuple[Key, Worker]:
        """_acquire of `name` at `version` (None: its default), its spec
        read by `look` (default: _spec). A default version removed as it
        loaded (a rollback the last scan had not seen) gives way to the
        one that is the default now. OVERLOADED or TOO_LARGE from here is
        no room for the model (MMEngineError.no_room): a request's own
        bounds (its model's queue, its worker's) are asked elsewhere."""
        try:
            while True:
                changes = self._name_changes[name]  # before the look: a removal meanwhile shows
                spec = await (look or self._spec)(name, version)
                key = (spec.name, spec.version)
                try:
                    return key, await self._acquire(key, spec, deadline, request=request,
                                                    changes=changes)
                except ModelNotFound as e:
                    if version is not None or not getattr(e, "removed", False):
                        raise
        except (Overloaded, TooLarge) as e:
            # Not a server that is going, nor one whose workers are all down
            # (restarting: the room comes back with them).
            if not isinstance(e, ShuttingDown) and any(w.alive for w in self.pool.workers):
                e.no_room = True
            raise

    def _waits(self, waited: bool, request: bool) -> bool:
        """True, for a request that waits for a load; an inference's first
        wait counts its miss, whether or not the wait ends in time (a miss
        counted only once served left the timed-out out of the hit rate)."""
        if request and not waited:
            self._misses += 1
        return True

    async def _acquire(self, key: Key, spec: ModelSpec, deadline: float,
                       request: bool = True, changes: int | None = None) -> Worker:
        """The worker on which `key` is resident, pinned for one request;
        loads it (once, however many requests wait) if needed. For an
        inference (`request`), counts a hit, or a miss when it had to wait
        for a load; a load or a pin counts neither. `changes`: the name's
        count of changes (_name_changes) before `spec` was read; a change
        since has it read again before a load."""
        waited = False
        loaded = False  # the load this request waited for has just ended
        if changes is None:
            changes = self._name_changes[key[0]]
        while True:
            drained = self._draining.get(key)
            # An unload asked for while this request waited for the load
            # waits for it in turn (the request was in flight first): it
            # takes the model before the unload, woken after it, looks.
            if drained is not None and not loaded:  # its unload first; then it loads again
                waited = self._waits(waited, request)
                try:
                    async with asyncio.timeout_at(self._loop_deadline(deadline)):
                        await asyncio.shield(drained)
                except TimeoutError:
                    raise Timeout(f"{key[0]}: still unloading at the request's "
                                  f"deadline") from None
                continue
            if key in self._stale:
                # It goes once the requests on it are done: this one takes
                # what the repository holds now (the same number published
                # again, the manifest as it now reads).
                waited = self._waits(waited, request)
                try:
                    await self._wait_for_room(self._room_version, deadline)
                except TimeoutError:
                    raise Timeout(f"{key[0]}: its copy as it was is still in use at the "
                                  f"request's deadline") from None
                continue
            if key in self.cache:
                index = self.cache.acquire(key, time.monotonic())  # pin + touch if READY
                if index >= 0:
                    if request and not waited:
                        self._hits += 1
                    return self.pool.workers[index]
            loaded = False
            # Before any wait: a load that timed out is being unloaded from its
            # worker, and its back-off answers at once all the same.
            self._check_backoff(key)
            busy = self._busy.get(key)
            if busy is None or busy[1].done():  # done: its callback has not run yet
                if self._stopped:  # nothing begins once the engine stops
                    raise ShuttingDown(f"{key[0]}: the engine shut down before it was "
                                     f"loaded")
                if self._name_changes[key[0]] != changes:
                    # Removed (SageMaker's DELETE) or changed while this
                    # request waited: what it read then loads no more (a
                    # removed model came back, and a name added again served
                    # the old one's weights).
                    changes = self._name_changes[key[0]]
                    try:
                        async with asyncio.timeout_at(self._loop_deadline(deadline)):
                            spec = await self._spec(*key)
                    except TimeoutError:
                        raise Timeout(f"{key[0]}: its manifest was not read again within "
                                      f"the request's deadline") from None
                    continue
                busy = self._start(key, Op.LOAD, self._load(key, spec))
            op, task = busy
            if op == Op.LOAD:
                waited = self._waits(waited, request)
                self._load_waiters[task] += 1
            try:
                async with asyncio.timeout_at(self._loop_deadline(deadline)):
                    await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled() or asyncio.current_task().cancelling():
                    raise  # this caller's own
                if self._stopped:  # stop() cancelled the load
                    raise ShuttingDown(f"{key[0]}: the engine shut down before it was "
                                     f"loaded") from None
                continue  # another's task, cancelled: look again
            except TimeoutError:
                if key in self._short_of_room:  # the truth, and what SageMaker acts on (507)
                    raise self._no_room(key, "it by the request's deadline") from None
                raise Timeout(f"{key[0]}: not loaded within the request's deadline") from None
            except MMEngineError:
                if op == Op.LOAD:
                    raise  # the load failed: every waiter hears why
            else:
                loaded = op == Op.LOAD
            finally:
                if op == Op.LOAD:
                    # Safe to drop before this request pins it: nothing
                    # awaits between here and its look.
                    self._stop_waiting(task)
            # loaded or unloaded: look again (it may have gone meanwhile)

    def _start(self, key: Key, op: Op, coro) -> tuple[Op, asyncio.Task]:
        """Runs the one load or unload of `key` that others can wait for."""
        busy = (op, self._spawn(coro))
        self._busy[key] = busy

        def done(task: asyncio.Task) -> None:
            if self._busy.get(key) is busy:
                del self._busy[key]
            errors.retrieved(task)  # an eviction may have nobody waiting on it

        busy[1].add_done_callback(done)
        return busy

    def _hand_over(self, key: Key) -> None:
        """At the end of a load that made `key` resident, pins it for the
        requests waiting for it until they have looked (_load_waiters).
        Run by _load itself: its task is the one they wait on (_start's)."""
        task = asyncio.current_task()
        if self._load_waiters[task] and key in self.cache \
                and self.cache.entry(key).state == books.READY:
            self.cache.pin(key)
            self._handed[task] = key, self._gen[key]

    def _stop_waiting(self, task: asyncio.Task) -> None:
        left = self._load_waiters[task] - 1
        if left:
            self._load_waiters[task] = left
            return
        del self._load_waiters[task]
        handed = self._handed.pop(task, None)
        if handed is not None:
            self._unpin_request(*handed)

    def _unpin_request(self, key: Key, gen: int, ran: bool = False) -> None:
        # A request pinned this generation of the entry; if the worker died
        # and the model was loaded again since, the pin died with the old one.
        if self._has_entry(key, gen):
            if self.cache.release(key) == 0 and ran or ran and key in self._pinned:
                # Its last use ends now: idle_unload_s counts from here (a
                # request longer than it was unloaded at once after; and,
                # once unpinned, one that ran while its model was pinned).
                self.cache.touch(key, time.monotonic())
            self._room_changed()
            if self._stale:  # its last request may have ended
                self._retire_stale()

    def _room_changed(self) -> None:
        self._room_version += 1
        if self._room_waiters:  # this runs per request: no new Event unless needed
            self._room.set()
            self._room = asyncio.Event()

    async def _wait_for_room(self, version: int, deadline: float | None) -> None:
        """Until the room changes after `_room_version` was `version` (at
        once if it already has); TimeoutError at the deadline, if any."""
        if self._room_version != version:
            return
        self._room_waiters += 1
        try:
            async with asyncio.timeout_at(
                    None if deadline is None else self._loop_deadline(deadline)):
                await self._room.wait()
        finally:
            self._room_waiters -= 1

    # -- loads -------------------------------------------------------------------

    async def _load(self, key: Key, spec: ModelSpec) -> None:
        t0 = time.monotonic()
        path, fetch_s = await self._fetch(key, spec, t0)
        if spec.source and not spec.estimated_bytes:  # sized as it was fetched
            spec = dataclasses.replace(spec, estimated_bytes=self.disk.estimate(*key))
        unloadable = False
        try:
            await self._load_from(key, spec, path, t0, fetch_s)
        except LoadFailed as e:
            # Not a timeout (the worker may still read them), nor a load
            # from the host tier: its worker read the files and failed.
            unloadable = getattr(e, "from_files", False)
            raise
        else:
            self._hand_over(key)
        finally:
            if spec.source:  # the worker is done with the disk cache's copy
                self.disk.release(path)
                if unloadable:  # its copy may be damaged, or the model's code may raise
                    asyncio.get_running_loop().run_in_executor(
                        self._fetchers, self.disk.check_after_failed_load, spec, path
                    ).add_done_callback(errors.retrieved)

    async def _load_from(self, key: Key, spec: ModelSpec, path: Path, t0: float,
                         fetch_s: float) -> None:
        if spec.warmup_bytes > self.config.max_request_bytes:
            # No request that large could reach it: a manifest's mistake,
            # not a lack of memory to retry (it would load on each retry).
            # Counted, said and backed off as any failed load: an operator
            # saw no line, no row and no metric of it.
            e = LoadFailed(f"{key[0]} v{key[1]}: its warm-up inputs take "
                           f"{spec.warmup_bytes} bytes, more than any request can "
                           f"({self.config.max_request_bytes}, ring_bytes)")
            self._load_failed(key, e, None, t0)
            raise e
        stats = self._stats.setdefault(key, ModelStats())
        declared = _declared(spec)
        need = (stats.measured_bytes if stats.measured_of == declared else 0) \
            or spec.estimated_bytes
        # Room is waited for within load_timeout_s of the files being here
        # (a download is bounded by its own stall timeouts); the load itself
        # has its own load_timeout_s from when it is sent (_load_on).
        deadline = time.monotonic() + self.config.load_timeout_s
        if self.host.segment(key) is not None and self.host.origin(key) != declared:
            self.host.drop(key)  # made from what the manifest no longer says: it would serve that
        # Its host copy is held from here: the room made for the load (the
        # models it evicts, demoted, need room in the tier) never drops it.
        self.host.set_resident(key, True, time.monotonic())
        try:
            worker = await self._reserve(key, need, deadline)
        except BaseException:
            self.host.set_resident(key, False)
            raise
        gen = self._gen[key]
        segment = self.host.segment(key)  # still there, unless a rescan dropped it meanwhile
        try:
            body = await self._load_on(worker, key, need, {
                # bytes: a path need not be UTF-8, which msgpack's strings are
                "path": os.fsencode(path), "estimate": spec.estimated_bytes,
                "host": segment,
                # A disk cache copy's serving keys are its stub's as it is now.
                "manifest": diskcache.manifest(spec).encode() if spec.source else None})
        except _NotRun:
            self.host.set_resident(key, False)
            self._forget(key, gen)
            return  # its waiters look again, and load it on a worker that is up
        except BaseException as e:
            if isinstance(e, LoadFailed) and segment is None:
                e.from_files = True  # the worker read the files and failed: they may be bad
            if isinstance(e, TimeoutError) and worker.alive and self._gen.get(key) == gen:
                # The worker may still finish the load: its bytes stay reserved
                # (and its host copy held) until the unload queued behind it
                # has answered.
                self.cache.set_state(key, books.UNLOADING)
                _, unload = self._start(key, Op.UNLOAD, self._unload(
                    key, gen, self._send_unload(key, worker.index), answered=True))
                self._spawn(self._unstick(worker, key, unload))
                e = LoadFailed(f"{key[0]}: load exceeded {self.config.load_timeout_s} s "
                               f"(load_timeout_s)")
            else:
                self.host.set_resident(key, False)
                self._forget(key, gen)
            if isinstance(e, asyncio.CancelledError):
                raise  # the engine is stopping: no fault of the model's
            if isinstance(e, WorkerDied):
                e = WorkerDied(f"{key[0]}: worker {worker.index} died during the load ({e})")
            if isinstance(e, LoadFailed) and not spec.source \
                    and not await self._still_there(key):
                raise storage.removed(*key) from None  # nothing backs it off
            self._load_failed(key, e, worker.index, t0)
            if isinstance(e, MMEngineError):
                e.ran = _load_ran(key, worker.index)
                raise e from None
            raise
        # Its worker died meanwhile: its answer came, then the death, in one
        # turn of the loop (forgotten, the entry kept its generation).
        if not self._has_entry(key, gen):
            died = WorkerDied(f"{key[0]}: the worker died during the load")
            died.ran = _load_ran(key, worker.index)
            raise died
        source = body.get("from", "disk")
        body.setdefault("phases", {})["fetch"] = fetch_s
        stats.measured_bytes, stats.measured_of = int(body["bytes"]), declared
        self._emit("load", {"model": key[0], "version": key[1], "worker": worker.index,
                            "start_ns": int(t0 * 1e9), "end_ns": time.monotonic_ns(),
                            "bytes": stats.measured_bytes, "phases": body["phases"],
                            "from": source, "allocator": body.get("allocator")})
        stats.loads += 1
        stats.host_loads += source == "host"
        budget = self.cache.capacity(books.DEVICE, worker.index)
        if stats.measured_bytes > budget:  # refused before it loads from now on (_reserve)
            too_large = TooLarge(f"{key[0]}: takes {stats.measured_bytes} bytes once loaded, "
                                 f"more than its worker's whole budget ({budget}, "
                                 f"device_budget)")
            stats.last_error = str(too_large)
            # Loaded, it holds what it measured until its eviction gives it
            # back (the counts say so: loads, evictions, their bytes).
            self.cache.set_bytes(key, books.DEVICE, stats.measured_bytes)
            # Never loaded again, its copy in the tier serves nothing.
            await asyncio.shield(self._evict(key, "too_large", drop_host=True))
            raise too_large
        if body.get("inputs"):  # what the backend read from the artifact
            self._derived_inputs[key] = tuple(TensorSpec(n, d, tuple(shape))
                                              for n, d, shape in body["inputs"])
        if segment is not None and source != "host":
            self.host.drop(key)  # the worker could not use it: neither can anyone
        self._loaded_specs[key] = spec
        self._loaded_since_scan.add(key)
        stats.failed_in_a_row = stats.backoffs_in_a_row = 0
        stats.retry_at = 0.0
        stats.last_load_time = time.time()
        stats.load_duration_s = time.monotonic() - t0
        self.cache.set_bytes(key, books.DEVICE, stats.measured_bytes)
        self.cache.set_state(key, books.READY)
        self.cache.touch(key, time.monotonic())
        if key in self._pinned:  # a hot model is pinned again whenever it loads
            self.cache.pin(key)
            self._pinned[key] = gen
            self._warm_now(key)
        if source == "disk" and body.get("publishable"):
            self._spawn(self._publish(key, spec, worker, gen, stats.measured_bytes))
        if stats.measured_bytes > need:  # the estimate was short
            # The room is made by the others: evicted itself, it cost its
            # waiters a second load.
            self.cache.pin(key)
            try:
                await self._shrink(worker.index, "pressure", cause=key)
            finally:
                self._unpin_request(key, gen)

    async def _still_there(self, key: Key) -> bool:
        """Whether the repository still has this version, read from the disk
        now (a load that failed for its files may have lost them to a
        rollback); if not, what was read of the name is read anew."""
        try:
            there = await asyncio.get_running_loop().run_in_executor(
                None, self.repo.look_again, *key)
        except (MMEngineError, OSError):  # it cannot be read: the load's failure stands
            return True
        if not there:
            self._names_changed({key[0]})
        return there

    async def _unstick(self, worker: Worker, key: Key, unload: asyncio.Task) -> None:
        """A load past its deadline holds its worker's loader, and every load
        and unload queued behind it. If the unload queued behind it has not
        answered within STUCK_LOAD_GRACE_S, the load is stuck in the model's
        own code (which no thread can be made to leave): the worker is
        killed, and comes back as a dead worker does."""
        done, _ = await asyncio.wait([unload], timeout=STUCK_LOAD_GRACE_S)
        if not done and worker.alive and self.pool.workers[worker.index] is worker:
            log.error("worker %d is stuck loading %s v%d (past its load_timeout_s, then "
                      "%g s more); restarting it", worker.index, key[0], key[1],
                      STUCK_LOAD_GRACE_S)
            worker.process.kill()

    def _forget_segment(self, segment: str) -> None:
        """Tells every worker that a host-tier segment is gone, so that its
        memory goes once they unmap it. Nobody waits for the answers."""
        for w in self.pool.workers if self.pool else []:
            if w.alive:
                try:
                    fut = w.call(Op.FORGET, "", 0, params={"segment": segment})
                except MMEngineError:
                    continue  # it is dying: its mappings go with it
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _fetch(self, key: Key, spec: ModelSpec, t0: float) -> tuple[Path, float]:
        """The local directory of a model, fetched into the disk cache first
        if its source is remote (before any device bytes are reserved: a
        download can take long), and the seconds that took."""
        if not spec.source:
            return spec.path, 0.0
        loop = asyncio.get_running_loop()
        try:
            path = self.disk.cached(spec)  # a hit waits behind no download
            if path is None:
                # Its room is made of the least recently used copies: the
                # models used since the monitor's last look are not those.
                self._touch_disk_copies()
                fetched = loop.run_in_executor(self._fetchers, self.disk.ensure, spec)
                self._fetching.add(key)
                try:
                    path = await asyncio.shield(fetched)
                except asyncio.CancelledError:  # the copy it hands over is nobody's to read
                    fetched.add_done_callback(
                        lambda f: f.cancelled() or f.exception() or self.disk.release(f.result()))
                    raise
                finally:
                    self._fetching.discard(key)
        except MMEngineError as e:
            self._load_failed(key, e, None, t0)
            raise
        return path, time.monotonic() - t0

    async def _publish(self, key: Key, spec: ModelSpec, worker: Worker, gen: int,
                       nbytes: int) -> None:
        """Copies a model just loaded from its files (as `spec` said) into
        the host tier, so that its next load, on any worker, maps it instead.
        Off the request path: the load has answered; a failure only means no
        host copy."""
        # The segment adds a header, page-aligned, to the tensor bytes.
        resident = self._has_entry(key, gen)
        on_cpu = worker.device == "cpu"
        segment = self.host.reserve(key, nbytes + hosttier.HEADER_ALLOWANCE,
                                    on_cpu=resident and on_cpu, origin=_declared(spec))
        if segment is None:
            return
        if resident:
            self.host.set_resident(key, True, time.monotonic(), on_cpu=on_cpu)
        answer = None
        try:
            # Sent at once, ahead of any unload of the model that comes later.
            _, answer = self._send_to_loader(worker, Op.PUBLISH, key, {"segment": segment})
            self._publishing[key] = answer
            body, _ = await answer
        except Exception as e:  # noqa: BLE001 - the model is served either way
            self.host.abandon(key, segment)
            self._stats.setdefault(key, ModelStats()).last_error = f"host tier: {e}"
            return
        finally:
            if answer is not None and self._publishing.get(key) is answer:
                del self._publishing[key]
        self.host.published(key, segment, int(body["bytes"]), time.monotonic())

    async def _load_on(self, worker: Worker, key: Key, need: int, params: dict) -> dict:
        """One load on `worker`, in its turn. The worker's loader does one
        load or publish at a time: this load waits for the loads before it,
        then for its bytes' place in the gate, and only then is sent; its
        load_timeout_s counts from then, or from the end of the publishes
        sent before it (which the loader runs first). Queued behind another
        model's slow load, or a restarted worker's start-up, it is not that
        load's failure. _NotRun if the worker died before it began."""
        turn = asyncio.get_running_loop().create_future()
        ahead = [t for t in worker.load_turns if not t.done()]
        worker.load_turns.append(turn)

        def end_turn() -> None:  # the worker is done with it, or it was never sent
            if not turn.done():
                turn.set_result(None)
                worker.load_turns.remove(turn)
                self._room_changed()  # a load waiting for its turn to reserve (LOADS_AHEAD)
        sent = False
        try:
            if ahead:
                await asyncio.wait(ahead)
            ready = worker.ready
            if not ready.done():
                # A restarted worker takes its place before it is up: its
                # start-up is no part of this load's time.
                await asyncio.wait([ready])
            if not worker.alive or ready.cancelled() or ready.exception() is not None:
                raise _NotRun  # (cancelled: it did not come up in ready_timeout_s)
            await self._load_gate.acquire(need)
            try:
                if not worker.alive:
                    raise _NotRun
                busy, answer = self._send_to_loader(worker, Op.LOAD, key, params, end_turn)
                sent = True
                answer.add_done_callback(errors.retrieved)  # if its waiter goes first
                if busy:
                    await asyncio.wait(busy)
                    if not worker.alive and not all(f.result() for f in busy):
                        raise _NotRun  # it died in a publish ahead of this load
                    # Answered, the loader went on to this load: a death
                    # from here on is one during it (its answer says so).
                async with asyncio.timeout(self.config.load_timeout_s):
                    body, _ = await answer
                return body
            finally:
                self._load_gate.release(need)
        finally:
            if not sent:
                end_turn()

    @staticmethod
    def _send_to_loader(worker: Worker, op: Op, key: Key, params: dict,
                        then: Callable[[], None] | None = None
                        ) -> tuple[list[asyncio.Future], asyncio.Future]:
        """Sends a load or publish to `worker`'s loader thread at once;
        returns what that thread has to finish first (futures done when the
        worker is done with each: True where it answered, False where it
        died first, whether or not their callers still wait) and the
        answer's future. `then()` runs when the worker is done with this one."""
        busy = [f for f in worker.loader_busy if not f.done()]
        finished = asyncio.get_running_loop().create_future()

        def done() -> None:  # (a death fails what it left after marking the worker dead)
            finished.set_result(worker.alive)
            worker.loader_busy.remove(finished)
            if then is not None:
                then()
        answer = worker.call(op, key[0], key[1], params=params, on_done=done)
        worker.loader_busy.append(finished)
        return busy, answer

    def _load_failed(self, key: Key, e: BaseException, worker: int | None = None,
                     t0: float | None = None, at_least: float = 0.0) -> None:
        """Counts a failed load, tells observers (one that began at `t0`,
        time.monotonic(), on `worker`; else one that failed as it was asked
        for: a spec that cannot be read, a model that crashes its worker),
        and backs the model off: until its retry time every request for it
        gets LOAD_FAILED at once, and harms no other model by loading it
        again and again. The back-off doubles with each failure in a row. A
        worker that died during a load may have died of something else:
        that backs off only if the model's previous load failed too (a model
        that kills its worker twice is the cause). `at_least`: the least
        back-off, in seconds (a crash's, which doubles by its own count)."""
        now = time.monotonic_ns()
        self._emit("load", {"model": key[0], "version": key[1], "worker": worker,
                            "start_ns": now if t0 is None else int(t0 * 1e9), "end_ns": now,
                            "error": str(e)})
        stats = self._stats.setdefault(key, ModelStats())
        stats.failures += 1
        stats.last_error = str(e)
        stats.failed_in_a_row += 1
        stats.out_of_memory = isinstance(e, Overloaded)
        where = "" if worker is None else f" on worker {worker}"
        if isinstance(e, WorkerDied) and stats.failed_in_a_row < 2:
            log.warning("%s v%d failed to load%s: %s", key[0], key[1], where, e)
            return
        # Doubles per back-off, from the first: a death that was spared one
        # does not double the next.
        stats.backoffs_in_a_row += 1
        doublings = min(stats.backoffs_in_a_row - 1, 30)
        delay = max(min(self.config.load_failure_backoff_s * 2 ** doublings,
                        self.config.load_failure_backoff_max_s), at_least)
        stats.retry_at = time.monotonic() + delay
        # One line a failure: the back-off bounds how often a model can fail
        # (and how often one that runs out of memory makes room for nothing).
        log.warning("%s v%d failed to load%s: %s; requests for it fail at once for %g s%s",
                    key[0], key[1], where, e, delay,
                    " (OVERLOADED: retry later)" if stats.out_of_memory else "")
        # The requests that waited for this load hear of the back-off too,
        # as those refused during it do (_check_backoff).
        if isinstance(e, MMEngineError) and e.args:
            e.failure = stats.last_error  # the failure itself, said once (_rewarm)
            e.args = (f"{e.args[0]} (failed {stats.failed_in_a_row} "
                      f"time{'s' * (stats.failed_in_a_row > 1)} in a row; next try in "
                      f"{delay:g} s)", *e.args[1:])
            if isinstance(e, Overloaded):
                e.retry_after_s = math.ceil(delay)

    def _resolved(self, asked: tuple[str, Any], fut: asyncio.Future) -> None:
        if self._resolving.get(asked) is fut:  # not one begun after a scan dropped it
            del self._resolving[asked]
        errors.retrieved(fut)  # every request that waited for it may have gone

    def _check_backoff(self, key: Key) -> None:
        """LoadFailed, at once, for a model in its back-off after a failed load
        (OVERLOADED after one that ran out of memory: retry later)."""
        stats = self._stats.get(key)
        if stats is not None:
            left = stats.retry_at - time.monotonic()
            if left > 0:
                # A crash's back-off counts the crashes' back-offs: loads that
                # succeed in between end a run of failed loads, not of those.
                crashes = stats.retry_at == stats.crash_backoff_until
                n = stats.crash_backoffs if crashes else stats.failed_in_a_row
                what = "backed off for crashes" if crashes else "failed"
                error = Overloaded if stats.out_of_memory and not crashes else LoadFailed
                refused = error(f"{stats.last_error} ({what} {n} time{'s' * (n > 1)} in a "
                                f"row; next try in {math.ceil(left * 10) / 10:.1f} s)")
                refused.failure = stats.last_error
                if error is Overloaded:
                    refused.retry_after_s = math.ceil(left)  # HTTP's Retry-After
                raise refused

    async def _reserve(self, key: Key, need: int, deadline: float) -> Worker:
        """Makes room for `need` bytes and reserves them under a new LOADING
        entry: on the least busy worker where they fit as it stands (fewest
        requests and loads in flight, then the lowest busy share), else on
        the one whose evictions would lose the least (evicting there). Only
        on a worker with fewer than LOADS_AHEAD loads to do: while the
        others have no room, it waits for one, with no deadline."""
        caps = [self.cache.capacity(books.DEVICE, w.index) for w in self.pool.workers]
        if need > max(caps):
            raise TooLarge(f"{key[0]}: needs {need} bytes, more than a worker's "
                           f"whole budget ({max(caps)}, device_budget)")

        def order(w: Worker) -> tuple:
            # A worker runs its inferences one at a time, and its loads one
            # at a time: a model placed beside busy ones waits behind them.
            # What it has in flight now, then how busy it was of late.
            free = caps[w.index] - self._staying(w.index)
            if need <= free - (1 - self.config.high_watermark) * caps[w.index]:
                return (False, w.in_flight, w.busy_share, -free)
            return (True, self._worth_of_victims(w.index, need), -free)

        try:
            while True:
                version = self._room_version
                worker = await self._reserve_on_a_worker(key, need, caps, order, deadline)
                if worker is not None:
                    return worker
                self._check_pinned_full(key, need, caps)
                if any(_loads_ahead(w) for w in self.pool.workers if w.alive):
                    # Its turn, which is no part of its deadline (as the
                    # loads ahead of it on the loader are not: _load_on).
                    await self._wait_for_room(version, None)
                    deadline = max(deadline, time.monotonic() + self.config.load_timeout_s)
                    continue
                # Every worker's room is held by models in use: wait for a
                # request to finish (or a worker to come back), up to the
                # load's deadline.
                self._short_of_room.add(key)  # until the room is made or refused
                try:
                    await self._wait_for_room(version, deadline)
                except TimeoutError:
                    # Pins taken meanwhile (the loads it waited behind) may
                    # hold the room now: that answer, not "retry later".
                    self._check_pinned_full(key, need, caps)
                    raise self._no_room(key, f"{need} bytes") from None
        finally:
            self._short_of_room.discard(key)

    def _worth_of_victims(self, index: int, need: int) -> float:
        """What making room for `need` bytes on worker `index` would evict,
        as the policy ranks it: the last use of its most recently used
        victim (LRU), or its highest H (GDSF). The worker where that is
        least is where the budgets, split per worker, evict as one pooled
        cache would (the worker with the most free budget instead: 6% more
        loads on benchmarks/zipf.py's trace, one request at a time)."""
        victims, reason = self.cache.victims(
            books.DEVICE, index, need, self.config.high_watermark,
            self.config.low_watermark, peek=True)
        if reason != books.OK or not victims:
            # Pinned or in use: no room to make there now, or none but
            # past the watermark, beside models in use: where others have none.
            return math.inf
        last = victims[-1]  # the policy's order: the one it would keep longest
        if self.config.policy == "gdsf":
            return self.cache.priority(last)
        return self.cache.entry(last).last_use

    async def _reserve_on_a_worker(self, key: Key, need: int, caps: list[int], order,
                                   deadline: float) -> Worker | None:
        """One pass of _reserve over the live workers, best first (`order`):
        the first with room, or room that evicting unused models makes,
        gets the LOADING entry; None if none has."""
        for w in sorted((w for w in self.pool.workers if w.alive), key=order):
            # One reservation at a time per worker: its victims are chosen
            # against books that no other reservation is changing.
            async with self._locks[w.index]:
                if _loads_ahead(w):
                    continue  # its loader has enough to do (its turns end with a room change)
                victims, reason = self.cache.victims(
                    books.DEVICE, w.index, need, self.config.high_watermark,
                    self.config.low_watermark)
                if reason != books.OK:
                    continue
                # A CPU worker runs on the model's host copy: charged to it,
                # not to the tier, from the reservation on (its victims,
                # demoted, take the tier's room it leaves); while the load
                # waits for room, the tier's (its room is no one else's).
                self.host.run_on(key, w.device == "cpu")
                # The room is made as their unloads are sent: the books count
                # them leaving, and the loader frees each before it reads this
                # load. An eviction still running waits for its model's host
                # copy, being written, to be booked (_unload), behind whatever
                # the loader does: up to the deadline, as this lock must not be
                # held by a stuck one; past it the load goes on all the same
                # (giving up there lost the evicted models for nothing: their
                # next requests loaded them again). Not cancelled: each is the
                # unload that its model's requests wait on.
                evictions = [self._evict(v, "pressure", key) for v in victims]
                if evictions:
                    await asyncio.wait(evictions,
                                       timeout=max(0.0, deadline - time.monotonic()))
                if self._staying(w.index) + need > caps[w.index] or not w.alive:
                    self.host.run_on(key, False)
                    continue  # lost what we made room for; try elsewhere
                self._gen[key] = next(self._gens)
                self.cache.insert(key, books.LOADING, w.index)
                self.cache.set_bytes(key, books.DEVICE, need)
                self.cache.touch(key, time.monotonic())
                return w
        return None

    def _staying(self, index: int) -> int:
        """The device bytes booked on worker `index` less those of models
        being evicted: their unloads are sent, and its loader frees each
        before it reads the next record (cache.victims counts them so)."""
        return self.cache.used(books.DEVICE, index) - self.cache.leaving(index)

    def _no_room(self, key: Key, what: str) -> Overloaded:
        """OVERLOADED for a load that waited for room in vain."""
        why = ("every resident model is in use" if any(w.alive for w in self.pool.workers)
               else "no worker is up")
        return Overloaded(f"{key[0]}: no room for {what}: {why}")

    def _check_pinned_full(self, key: Key, need: int, caps: list[int]) -> None:
        """PinnedFull if models pinned with pin() hold too much of every
        worker's budget for `need` more bytes: no request's end can make the
        room, only an unpin."""
        if all(self._pinned_bytes(w.index) + need > caps[w.index]
               for w in self.pool.workers):
            raise PinnedFull(f"{key[0]}: no room for {need} bytes: pinned models "
                             f"hold every worker's budget (unpin one)")

    def _pinned_bytes(self, index: int) -> int:
        """Device bytes that resident models pinned with pin() hold on worker
        `index` (one still loading may fail, and give its room back)."""
        total = 0
        for key in self._pinned:
            if key in self.cache:
                entry = self.cache.entry(key)
                if entry.worker == index and entry.state == books.READY:
                    total += entry.device_bytes
        return total

    def _has_entry(self, key: Key, gen: int) -> bool:
        """Whether the cache still holds generation `gen` of `key`'s entry
        (a forgotten entry's generation stays until the next is made)."""
        return self._gen.get(key) == gen and key in self.cache

    def _forget(self, key: Key, gen: int) -> None:
        if self._has_entry(key, gen):
            self.cache.remove(key)
            self._loaded_specs.pop(key, None)
            self._stale.pop(key, None)
            self._room_changed()

    # -- unloads -----------------------------------------------------------------

    def _evict(self, key: Key, reason: str, cause: Key | None = None,
               drop_host: bool = False, answered: bool = False) -> asyncio.Task:
        """Starts unloading a resident model that no request holds (to make
        room for `cause`, where one model's load needs it); its copy in the
        host tier stays (demoted) unless `drop_host`; done once the worker
        has the unload, or has answered it where `answered` (_unload). The
        state changes at once, so no one else can choose it meanwhile."""
        entry = self.cache.entry(key)
        self.cache.set_state(key, books.UNLOADING)
        event = {"model": key[0], "version": key[1], "worker": entry.worker,
                 "reason": reason, "bytes": entry.device_bytes, "start_ns": time.monotonic_ns()}
        if cause is not None:
            event["for"] = f"{cause[0]} v{cause[1]}"
        self._emit("evict", event)
        # One line an eviction, at debug: under churn there are thousands.
        log.debug("evicting %s v%d from worker %d (%s%s, %d bytes)", key[0], key[1],
                  entry.worker, reason, f": room for {event['for']}" if cause else "",
                  entry.device_bytes)
        self._count_eviction(key, reason)
        return self._start(key, Op.UNLOAD,
                           self._unload(key, self._gen[key],
                                        self._send_unload(key, entry.worker),
                                        drop_host, answered))[1]

    def _count_eviction(self, key: Key, reason: str) -> None:
        stats = self._stats.setdefault(key, ModelStats())
        stats.evictions += 1
        stats.evictions_by_reason[reason] = stats.evictions_by_reason.get(reason, 0) + 1

    def _send_unload(self, key: Key, index: int) -> asyncio.Future | None:
        """Sends `key`'s unload to worker `index` now, in the same turn as its
        state becomes UNLOADING: from then on the books count its bytes gone
        (cache.leaving), so no load may be sent to the worker ahead of it.
        None where the worker is gone (its memory went with it)."""
        worker = self.pool.workers[index]
        if not worker.alive:
            return None
        try:
            fut = worker.call(Op.UNLOAD, key[0], key[1])
        except (MMEngineError, ValueError):  # dying, or its rings closed as the pool stops
            return None  # (raised, it left the entry UNLOADING with nothing to forget it)
        fut.add_done_callback(errors.retrieved)  # awaited only where answered
        return fut

    async def _unload(self, key: Key, gen: int, sent: asyncio.Future | None,
                      drop_host: bool = False, answered: bool = False) -> None:
        """Ends the unload of `key` that _send_unload sent (`sent`): done at
        once, or once the worker has answered it where `answered`. Its
        loader thread takes control records in order and frees the model
        before it reads the next, so whatever is sent to it after (a load
        that needs the room) finds the room made: nobody waits for the round
        trip but those who must see the memory freed (the monitor's
        readings) or the loader free (a load past its deadline: _unstick).
        Behind the model's own host-tier copy, it waits for that copy to be
        booked."""
        try:
            if sent is not None:
                if answered:
                    await sent
                else:
                    publishing = self._publishing.get(key)
                    if publishing is not None:  # its loader answers it first
                        # (and _publish, awaiting it since before, takes the
                        # answer before this wait ends: the copy is booked).
                        await asyncio.wait([publishing])
        except WorkerDied:
            pass  # its memory went with it
        finally:
            if self._gen.get(key) == gen:
                if drop_host or key in self._copy_goes:
                    self.host.drop(key)
                else:
                    self.host.set_resident(key, False)  # demoted: its bytes stay there
            self._forget(key, gen)

    async def _shrink(self, index: int, reason: str, need: int = 0,
                      cause: Key | None = None) -> None:
        victims, reason_code = self.cache.victims(
            books.DEVICE, index, need, self.config.high_watermark, self.config.low_watermark)
        if reason_code == books.OK and victims:
            await asyncio.gather(*[self._evict(v, reason, cause) for v in victims],
                                 return_exceptions=True)

    async def _back_within_budget(self, index: int) -> None:
        # Spawned: its unloads may wait behind a load, the monitor must not.
        # Under the worker's reservation lock, and looked at again there: a
        # reservation's evictions (or an idle unload's) may have made the room.
        try:
            async with self._locks[index]:
                if self._staying(index) > self.cache.capacity(books.DEVICE, index):
                    await self._shrink(index, "pressure")
        except Exception as e:  # noqa: BLE001 - the monitor's own, told as its others are
            log.error("monitor: making room on worker %d: %r", index, e)
        finally:
            self._shrinking.discard(index)

    async def _monitor(self) -> None:
        """Idle unloads and memory watermarks, once per interval."""
        while True:
            await asyncio.sleep(self.config.monitor_interval_s)
            try:
                await self._monitor_once()
            except Exception as e:  # noqa: BLE001 - keep watching
                log.error("monitor: %r", e)

    async def _monitor_once(self) -> None:
        self._retire_stale()
        self._keep_pinned_warm()
        self._touch_disk_copies()
        if self.config.stuck_inference_s:
            self._restart_stuck()
        for w in self.pool.workers:
            w.sample_busy()
        if self.config.idle_unload_s:
            for key in self.cache.idle(time.monotonic(), self.config.idle_unload_s):
                if self.cache.entry(key).state == books.READY:
                    self._evict(key, "idle")
        self._relieve_in("host", self._relieve_host_memory)
        for w in self.pool.workers:
            # Past its whole budget only where loads measured more than
            # their estimates while the models that would make the room were
            # in use: the load's own _shrink found none to evict. (Between
            # the watermark and the budget it stays: README, "Device".)
            if w.alive and w.index not in self._shrinking and \
                    self._staying(w.index) > self.cache.capacity(books.DEVICE, w.index):
                self._shrinking.add(w.index)
                self._spawn(self._back_within_budget(w.index))
        for w in self.pool.workers:
            memory = resources.gpu_memory(int(w.device.split(":")[1])) \
                if w.device.startswith("cuda") else None
            if memory is not None:  # (None: NVML will not say; the budget still holds)
                self._relieve_in(w.index, functools.partial(self._relieve, w, *memory))

    def _relieve_in(self, what, relieve: Callable[[], Awaitable[None]]) -> None:
        """Runs `relieve()` in a task of its own, unless the last one for
        `what` still waits for its evictions' answers. Awaited in the
        monitor's turn, an eviction on a worker busy with a long load held
        every other duty of the monitor (idle unloads, stuck workers, the
        other devices' watermarks) until that load ended, up to its
        load_timeout_s; and a turn meanwhile would have taken more, for
        memory whose going the last had not yet shown."""
        task = self._relieving.get(what)
        if task is None or task.done():
            self._relieving[what] = self._spawn(_logged(relieve()))

    async def _relieve_host_memory(self) -> None:
        """Host memory past host_memory_watermark: about what it is over by
        goes at once, least recently used first: copies in the host tier
        that no worker holds, then models resident on CPU workers, their
        copies too (a CPU worker's model loaded from the tier is the tier's
        pages: evicted alone, it freed nothing). A model a turn was too
        slow: a container near its limit had its workers killed first.
        What went shows at the first reading after its unloads are answered
        (_relieve_in); what is going meanwhile counts as gone (_going_from_host)."""
        used, total = resources.host_memory()
        over = used - self.config.host_memory_watermark * total - self._going_from_host()
        short = self._drop_demoted(over, log.debug, "host memory is past host_memory_watermark")
        evictions = []
        while short > 0 and (victim := self._least_recent(lambda w: w.device == "cpu")):
            # Counted once: on CPU a published model is its host copy's
            # pages (safetensors.publish); what went shows at the next turn.
            short -= max(1, self.cache.entry(victim).device_bytes, self.host.bytes(victim))
            # Answered: the next reading must not find its memory in use
            # still, and take more (its worker may be busy with a long load).
            evictions.append(self._evict(victim, "host_memory", drop_host=True,
                                         answered=True))
        if evictions:
            await asyncio.gather(*evictions, return_exceptions=True)

    def _going_from_host(self) -> int:
        """Host memory on its way back: the bytes of the CPU workers' models
        being unloaded (cache.leaving), which an unload waiting for its
        worker's answer holds until the worker gets to it (behind a long
        load, or a publish of the model's copy). A reading meanwhile finds
        them in use still: counted as over, they cost as many other models,
        evicted for memory that was already going. (A model that runs on its
        host copy's pages leaves them there, demoted, unless its eviction
        drops the copy: a later turn drops it before it evicts any model.)"""
        return sum(self.cache.leaving(w.index) for w in self.pool.workers if w.device == "cpu")

    def _drop_demoted(self, short: float, say, why: str) -> float:
        """Drops the copies in host memory of models no worker holds, least
        recently used first, until `short` bytes have gone or none is left;
        what is still short. `say` (a log method) tells each, with `why`."""
        while short > 0 and (demoted := self.host.least_recent()) is not None:
            say("dropping %s v%d's copy in host memory: %s", *demoted, why)
            short -= max(1, self.host.bytes(demoted))
            self.host.drop(demoted)
        return short

    async def _relieve(self, w: Worker, used: int, total: int) -> None:
        """A device over the watermark as its driver counts (`used` of
        `total` bytes). The driver counts the memory torch keeps cached for
        the next loads as used, so an eviction alone lowered nothing, and
        every idle model went, one a monitor turn, for good: the worker
        first gives back what it keeps, and only a device still over at the
        next turn loses its least recently used model (whose memory is
        given back at the turn after)."""
        if used <= self.config.high_watermark * total:
            self._released.discard(w.index)
            return
        if w.index not in self._released:
            self._released.add(w.index)
            try:
                fut = w.call(Op.RELEASE, "", 0)
            except MMEngineError:
                return  # it is dying: its memory goes with it
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            return
        self._released.discard(w.index)
        victim = self._least_recent(lambda x: x is w)
        if victim is not None:
            await self._evict(victim, "gpu_memory", answered=True)  # as above

    def _restart_stuck(self) -> None:
        """A model's code that never returns holds its worker, and every
        request behind it times out, for good: a worker whose running
        inference is unanswered stuck_inference_s past its request's
        deadline (one with none: the earliest of those it holds up) is
        killed, and comes back as a dead worker does."""
        now = time.monotonic()
        for w in self.pool.workers:
            running = w.running() if w.alive and w.stopped_why is None else None
            if running is None or now < running[0] + self.config.stuck_inference_s:
                continue  # (a worker killed a turn ago is not killed, nor said, again)
            deadline, (name, version), begun, held_up = running
            late = now - deadline
            past = ("the deadline of a request it held up" if held_up
                    else "its request's deadline" if begun else "its deadline")
            # One that never began it hangs outside any model's code (a
            # SIGSTOP, say): restarted all the same, blaming no model.
            what = (f"{name} v{version} ran {late:.0f} s past {past}" if begun else
                    f"it has not begun a request of {name} v{version} {late:.0f} s past {past}")
            w.stopped_why = (f"worker {w.index} was restarted: {what} "
                             f"(stuck_inference_s={self.config.stuck_inference_s:g})")
            log.error("%s", w.stopped_why)
            w.stuck = begun
            w.process.kill()

    def _touch_disk_copies(self) -> None:
        """The disk cache's copies of the models used since the last look
        are its most recently used, in the order of their use: a model that
        stays resident and serves is not its least recently used copy (the
        first to go), however long ago it was loaded."""
        now = time.monotonic()
        since, self._used_since = self._used_since, now
        if self.disk is None or self.cache is None:
            return
        for key in self.cache.lru_keys():  # least recently used first
            if self.cache.entry(key).last_use >= since:
                self.disk.touch(*key)

    async def _watch_repository(self) -> None:
        """Models and versions added to or removed from the repository while
        it serves, and manifests edited, every repo_scan_s: a new version
        becomes the default one, a removed model is not found any more (a
        resident copy is unloaded once its requests are done), an edited
        manifest is read again (a token rotated there is taken from then
        on; a model that must now check other tensors is loaded again)."""
        while True:
            await asyncio.sleep(self.config.repo_scan_s)
            try:
                await self._rescan()
            except (OSError, MMEngineError) as e:  # its disk, its permissions, no fds left:
                log.error("reading the repository: %s", e)  # serve what is known, look again
            except Exception:  # a bug: said, and the watch goes on (it ended, for good)
                log.exception("reading the repository")

    async def _rescan(self) -> None:
        scan = await asyncio.get_running_loop().run_in_executor(None, self.repo.scan)
        changed = self.repo.take(scan)  # with what follows, in one step of the loop
        if changed:
            self._names_changed(changed, keep_backed_off=True)
        for key in [k for k in self._pinned if not self.repo.listed(*k)]:
            self._drop_pin(key)  # resident or not: nothing can load it again
        # A load that began before an edit may have read the old manifest.
        looked, self._loaded_since_scan = self._loaded_since_scan, set()
        for key, spec in list(self._loaded_specs.items()):
            if self._loaded_specs.get(key) is not spec:
                continue  # gone (or loaded again) while an earlier key's spec was read
            if not self.repo.listed(*key):
                self._mark_stale(key, "removed")
            elif (key[0] in changed or key in looked) and key not in self._stale:
                try:
                    now = await self._spec(*key, record=False)
                except MMEngineError:  # requests fail before they reach it
                    now = None
                if self._loaded_specs.get(key) is spec \
                        and (now is None or _declared(now) != _declared(spec)):
                    self._mark_stale(key, "redeclared")
        self._retire_stale()
        # A removed version's copy in host memory can serve nothing again
        # (demoted as its worker unloads it, it goes at the next scan).
        for key in self.host.keys():
            if key not in self.cache and not self.repo.listed(*key):
                self.host.drop(key)
        # Nor does its row in stats (its state in /metrics), once nothing
        # of it is left: else every version ever removed stays listed.
        in_host = set(self.host.keys())
        for key in [k for k in self._stats if not self.repo.listed(*k)]:
            if key not in self.cache and key not in self._busy \
                    and key not in self._pinned and key not in in_host:
                self._forget_stats(key)
                self._derived_inputs.pop(key, None)

    def _mark_stale(self, key: Key, why: str) -> None:
        """`key` serves nothing as it is (_stale): a removed version's pin
        goes; a redeclared one's explicit pin waits for its next entry."""
        if why == "removed":
            self._drop_pin(key)
        elif self._pinned.get(key) == self._gen.get(key):
            gen, self._pinned[key] = self._pinned[key], 0  # no entry carries it now
            self._unpin_request(key, gen)
        if self._stale.get(key) != "removed":
            self._stale[key] = why

    def _retire_stale(self) -> None:
        """Evicts the stale models that no request holds any more (run at
        each scan, each monitor turn, and as requests on them end)."""
        for key in list(self._stale):
            if key not in self.cache:  # gone already: nothing is left to wait for
                del self._stale[key]
                continue
            entry = self.cache.entry(key)
            if entry.state == books.READY and entry.pins == 0 and key not in self._busy:
                # Removed, or loaded from what its manifest no longer says:
                # its copy serves nothing again.
                self._evict(key, self._stale.pop(key), drop_host=True)

    def _names_changed(self, names: set[str], keep_backed_off: bool = False) -> None:
        """What was read of these names is read anew at the next look, and
        a request that read it before loads nothing from it (_acquire).
        `keep_backed_off` (a scan's news): a version read as unservable
        stays so for the rest of its back-off where the scan still lists it
        as the one asked for (a model's first scan read it again, and
        counted a second failure, within the first's back-off)."""
        self._name_changes.update(names)
        self._specs = {k: v for k, v in self._specs.items() if k[0] not in names}
        self._bad_specs = {k: v for k, v in self._bad_specs.items() if k[0] not in names
                           or keep_backed_off and self._still_backed_off(k, v[0])}
        self._resolving = {k: v for k, v in self._resolving.items() if k[0] not in names}

    def _still_backed_off(self, asked: tuple[str, int | None], bad: Key) -> bool:
        """Whether `bad`, read as unservable for a request of `asked`, is in
        its back-off still and is what `asked` names now (no disk access)."""
        stats = self._stats.get(bad)
        if stats is None or stats.retry_at <= time.monotonic() or not self.repo.lists(bad[0]) \
                or not self.repo.listed(*bad):  # (lists first: listed may take an unread name)
            return False
        try:
            return asked[1] is not None or self.repo.versions(bad[0])[-1] == bad[1]
        except MMEngineError:  # no version of it now
            return False

    def _forget_stats(self, key: Key) -> None:
        stats = self._stats.pop(key)
        if key not in self.cache:
            self._gen.pop(key, None)
        self._forgotten.update(loads=stats.loads, evictions=stats.evictions,
                               failures=stats.failures, loads_from_host=stats.host_loads)
        self._emit("forget", {"model": key[0], "version": key[1],
                              "last": not self.repo.lists(key[0])
                              and not any(k[0] == key[0] for k in self._stats)})

    def _least_recent(self, where) -> Key | None:
        for key in self.cache.lru_keys():
            e = self.cache.entry(key)
            if e.state == books.READY and e.pins == 0 and where(self.pool.workers[e.worker]):
                return key
        return None

    def _on_worker_death(self, worker: Worker) -> None:
        if self.cache is None:  # died during start(): start() raises
            return
        how = worker.exit_status()
        serving, going = worker.died_serving, self._closing or self.pool.stopping
        # What it never read is sent again once its models are forgotten
        # below; left to fail with the rest where nothing will serve it.
        resent = 0 if going else len(worker.orphans)
        self._emit("worker_exit", {"worker": worker.index, "pid": worker.pid, "exit": how,
                                   "resent": resent, "at_ns": time.monotonic_ns()})
        log.warning("worker %d (pid %s) ended: %s%s; %d inferences failed (WORKER_DIED)%s%s",
                    worker.index, worker.pid, how,
                    f", running {serving[0]} v{serving[1]}" if serving else "",
                    worker.died_with + len(worker.orphans) - resent,
                    f", {resent} it never read sent again" if resent else "",
                    "" if going else "; restarting it")
        self._blame(worker)
        # Each demoted copy may need room in the host tier, and the last to
        # come are kept: the pinned models', loaded again at once, last.
        for key in sorted(self.cache.lru_keys(), key=self._pinned.__contains__):
            entry = self.cache.entry(key)
            if entry.worker == worker.index:
                self.host.set_resident(key, False)  # its host copy serves the reload
                if entry.state == books.READY:  # resident, and gone with its worker
                    self._emit("evict", {"model": key[0], "version": key[1],
                                         "worker": worker.index, "reason": "worker_exit",
                                         "bytes": entry.device_bytes,
                                         "start_ns": time.monotonic_ns()})
                    self._count_eviction(key, "worker_exit")
                self._forget(key, self._gen[key])
        if not going:
            while (orphan := worker.take_orphan()) is not None:
                self._resend(*orphan)
            self._spawn(self._revive(worker.index))

    def _resend(self, fut: asyncio.Future, deadline: float, served: Key, inputs: dict,
                then: Callable[[asyncio.Future], None] | None, place: "_Place | None") -> None:
        """Sends again an inference whose worker died before reading it (it
        cannot have begun): as a request for a model not resident, loaded
        on the dead one's replacement or another worker, its token checked
        already; once: if that worker dies too, it fails (a crash loop
        fails it at once, as before, rather than at its deadline). Its
        caller's future gets the answer; cancelled, it cancels the resend.
        `place`: its request's, told where the resend goes: where its end
        carries no account of its run, observers hear of the worker that
        had it last, not of the dead one."""
        if place is not None:  # unsent again until the resend is (its load may fail)
            place.sent = None
        resend = self._spawn(self._infer_cold(*served, inputs, deadline, None, resent=True,
                                              place=place),
                             self._requests)
        resend.add_done_callback(functools.partial(_answer_resent, fut, then))
        fut.add_done_callback(lambda _: resend.cancel())

    def _blame(self, worker: Worker) -> None:
        """A worker that ended itself while running a model's request (an
        exit, a crash; not SIGKILL, which comes from outside: an operator,
        the OOM killer) twice within CRASH_WINDOW_S, or once stuck in it
        (_restart_stuck), puts that model in the back-off of a failed load:
        every request for it is LOAD_FAILED at once, instead of each one
        taking its worker, and the requests of every model there, down
        with it."""
        key = worker.died_serving
        code = worker.process.poll() if worker.process is not None else None
        # Beside a load, the loader thread may have ended it, running another
        # model's code: that model's load is backed off by its own rule
        # (_load_failed), and the model served is not blamed for it.
        if key is None or code is None or (code == -signal.SIGKILL or worker.died_loading) \
                and not worker.stuck:
            return
        stats = self._stats.setdefault(key, ModelStats())
        now = time.monotonic()
        again = worker.stuck or now - stats.crashed_at < CRASH_WINDOW_S
        stats.crashed_at = now
        if again:
            why = ("a request of it ran stuck_inference_s past its deadline (one with "
                   "none: that of a request it held up), and its "
                   "worker was restarted" if worker.stuck else
                   f"its requests ended its worker twice within {CRASH_WINDOW_S:g} s "
                   f"({worker.exit_status()})")
            # Its loads succeed, and a successful load ends a run of failed
            # ones: the back-off doubles with each crash's in a row instead.
            quiet = now - stats.crash_backoff_until > CRASH_QUIET_S
            stats.crash_backoffs = 1 if quiet else stats.crash_backoffs + 1
            delay = min(self.config.load_failure_backoff_s * 2 ** min(stats.crash_backoffs - 1, 30),
                        self.config.load_failure_backoff_max_s)
            self._load_failed(key, LoadFailed(f"{key[0]}: {why}"), worker.index, at_least=delay)
            stats.crash_backoff_until = stats.retry_at

    async def _revive(self, index: int) -> None:
        while True:  # each try backs off further
            try:
                await self.pool.restart(index)
                log.info("worker %d is back (pid %s)", index, self.pool.workers[index].pid)
                break
            except (WorkerDied, OSError) as e:  # it died at start, or could not start
                if self._closing or self.pool.stopping:
                    return
                log.warning("worker %d did not come back (%s); trying again", index, e)
                if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                    self._make_room_for_rings()
        self._room_changed()
        self._keep_pinned_warm()

    def _make_room_for_rings(self) -> None:
        """/dev/shm had no room for a restarting worker's rings: the copies
        of models no worker holds (demoted) go, least recently used first,
        until the rings fit. A worker serves; a copy only speeds a reload
        (the dead one stayed down for good while they held the room)."""
        self._drop_demoted(resources.rings_bytes(self.config)
                           - shutil.disk_usage(shm.SHM_DIR).free,
                           log.warning, "a worker's rings need the room")

    def _keep_pinned_warm(self) -> None:
        """Loads every pinned model that is not resident (its worker died,
        it has not loaded since start, or its load failed and its back-off
        is over; the monitor looks again each interval): hot models must not
        stay cold. Its load takes the pin again."""
        now = time.monotonic()
        for key in self._pinned:
            if self._closing or key in self.cache or key in self._busy \
                    or key in self._rewarming:
                continue
            stats = self._stats.get(key)
            if (stats is None or stats.retry_at <= now) \
                    and self._rewarm_after.get(key, (0.0,))[0] <= now:
                self._rewarming.add(key)
                self._spawn(self._rewarm(key))

    async def _rewarm(self, key: Key) -> None:
        # Not in the name's order of control operations: an operator's
        # unpin or unload does not wait for it (the load drops no pin it
        # does not find; an unload waits for the load, then unloads).
        try:
            spec = await self._spec(*key)
            if key not in self._pinned or key in self._draining:
                return  # unpinned or being unloaded meanwhile: the operator's call
            await self._acquire(key, spec, self._deadline(self.config.load_timeout_s),
                                request=False)
            self._unpin_request(key, self._gen[key])
            self._rewarm_after.pop(key, None)
        except MMEngineError as e:
            if not isinstance(e, LoadFailed):  # a failed load backs off by itself
                last = self._rewarm_after.get(key, (0.0, self.config.load_failure_backoff_s / 2))
                wait = min(2 * last[1], self.config.load_failure_backoff_max_s)
                self._rewarm_after[key] = (time.monotonic() + wait, wait)
            stats = self._stats.setdefault(key, ModelStats())
            # A failed load's was said, and kept, by _load_failed (its
            # message carries the back-off: kept, it would be said at every
            # try and carry a stale back-off in the next refusal).
            failure = e.failure or str(e)  # set on a refusal during a back-off only
            if failure != stats.last_error:  # once, not every interval of a retry
                log.warning("pinned model %s v%d is not resident: %s; trying again",
                            key[0], key[1], e)
            stats.last_error = failure
        finally:
            self._rewarming.discard(key)

    # -- explicit control --------------------------------------------------------

    # Control operations on one model name run one at a time, in the order
    # they were called: a pin and an unload sent back to back leave the model
    # unloaded, as their sender meant, whichever task the loop runs first.

    # A control operation's timeout counts from its call: the wait behind
    # the ones before it on the name included (a client waits that long).

    async def load(self, name: str, version: int | None = None,
                   timeout: float | None = None) -> dict:
        """Makes a model resident now; returns its row of `stats()`."""
        deadline = self._deadline(self.config.load_timeout_s if timeout is None else timeout)
        async with self._in_order(name, deadline):
            return await self._load_now(name, version, deadline)

    async def unload(self, name: str, version: int | None = None,
                     timeout: float | None = None, keep_host: bool = False) -> None:
        """Unloads a model (dropping an explicit pin), once the requests in
        flight on it have finished, and drops its host-tier copy unless
        `keep_host` (as an eviction would). No `version`: the default one,
        and any other pinned (pinned before a newer one became the default,
        it stayed, pinned)."""
        deadline = self._deadline(timeout)
        async with self._in_order(name, deadline):
            await self._unload_now(name, version, deadline, keep_host)
            pinned = [key for key in self._pinned if key[0] == name] if version is None else ()
            for key in pinned:
                await self._unload_now(name, key[1], deadline, keep_host)

    async def unload_all(self, name: str, timeout: float | None = None) -> None:
        """Unloads every version of a model held here (on a worker, loading,
        pinned, in host memory), as unload() does each, whether or not the
        repository still lists it; ModelNotFound for a name that is neither
        held nor in the repository."""
        held = set(self._busy) | set(self._pinned) | set(self.host.keys())
        if self.cache is not None:
            held.update(self.cache.lru_keys())
        versions = sorted(v for n, v in held if n == name)
        if not versions:
            self._check_loop()
            await asyncio.get_running_loop().run_in_executor(None, self.repo.versions, name)
        for version in versions:
            key = (name, version)
            if not self._holds(key):
                self.host.drop(key)  # in host memory alone: its manifest need not be read
                continue
            try:
                await self.unload(name, version, timeout)
            except ModelNotFound:  # gone meanwhile (removed, and unloaded by a scan)
                pass

    async def pin(self, name: str, version: int | None = None,
                  timeout: float | None = None) -> dict:
        """Loads a model if needed and keeps it resident until unpin()."""
        deadline = self._deadline(self.config.load_timeout_s if timeout is None else timeout)
        async with self._in_order(name, deadline):
            return await self._pin_now(name, version, deadline)

    async def unpin(self, name: str, version: int | None = None) -> None:
        """Makes a pinned model evictable again; no `version`: every pinned
        version of it (a version pinned before a newer one became the
        default stayed pinned, and the call answered OK)."""
        self._deadline(None)  # refused as the other calls are: not started, stopped, off its loop
        async with self._in_order(name):
            pinned = [key for key in self._pinned if key[0] == name] if version is None else ()
            for key in pinned:
                self._drop_pin(key)
            if not pinned:
                self._drop_pin(await self._held_key(name, version))

    def _holds(self, key: Key) -> bool:
        """Whether a worker has `key`, or loads it, or it is pinned."""
        return key in self._pinned or key in self._busy \
            or (self.cache is not None and key in self.cache)

    async def _held_key(self, name: str, version: int | None) -> Key:
        """The model version a control call names. One still held here
        (pinned, resident, loading) is taken as named, though the
        repository no longer lists it: a pin on a removed version was
        released by nothing but a restart."""
        if version is not None:
            version = _version(version)
            key = (name, version)
            if self._holds(key):
                return key
        try:
            spec = await self._spec(name, version)
        except MMEngineError:
            # A pinned model whose manifest or files cannot be read (a
            # configured pin keeps the server warming): its one pin, by name.
            pinned = [key for key in self._pinned if key[0] == name]
            if version is None and len(pinned) == 1:
                return pinned[0]
            raise
        return spec.name, spec.version

    @contextlib.asynccontextmanager
    async def _in_order(self, name: str, deadline: float | None = None):
        if self.pool is not None:
            self._check_loop()
        entry = self._control_order.get(name)
        if entry is None:
            entry = self._control_order[name] = [asyncio.Lock(), 0]
        entry[1] += 1
        lock = entry[0]  # asyncio.Lock serves its waiters first come, first served
        try:
            try:
                async with asyncio.timeout_at(None if deadline is None
                                              else self._loop_deadline(deadline)):
                    await lock.acquire()
            except TimeoutError:
                raise Timeout(f"{name}: still behind other load, unload or pin calls at "
                              f"the deadline") from None
            try:
                yield
            finally:
                lock.release()
        finally:
            entry[1] -= 1
            if not entry[1]:  # names nobody controls now must not pile up here
                del self._control_order[name]

    async def _load_now(self, name: str, version: int | None, deadline: float) -> dict:
        key, _ = await self._acquire_named(name, version, deadline, request=False)
        self._unpin_request(key, self._gen[key])
        return self.model_row(key)

    async def _unload_now(self, name: str, version: int | None, deadline: float,
                          keep_host: bool) -> None:
        key = await self._held_key(name, version)
        pinned, warming = self._pinned.get(key), key in self._warming
        self._drop_pin(key)
        drained = self._draining[key] = asyncio.get_running_loop().create_future()
        if not keep_host:
            self._copy_goes.add(key)
        try:
            await self._drain(key, name, deadline)
        except (Timeout, asyncio.CancelledError):
            # Its caller gave up. An unload that began ends as asked; else
            # the model stays as it was, its pin too.
            busy = self._busy.get(key)
            if busy is not None and busy[0] == Op.UNLOAD:
                if not keep_host:
                    self.host.drop(key)
            elif pinned is not None:
                self._pinned[key] = pinned
                if warming:  # the server waits for it again, as before
                    self._warming.add(key)
                    self._warmed.clear()
                # Its entry carries the pin again; or one that loaded while
                # the pin was dropped does now, as a load's would (_load).
                if key in self.cache and (self._gen.get(key) == pinned
                                          or self.cache.entry(key).state == books.READY):
                    self.cache.pin(key)
                    self._pinned[key] = self._gen[key]
                    self._warm_now(key)
                if key in self._stale:  # marked meanwhile: the pin is not its to hold
                    self._mark_stale(key, self._stale[key])
            raise
        finally:
            del self._draining[key]
            self._copy_goes.discard(key)
            drained.set_result(None)
        if not keep_host:
            self.host.drop(key)

    async def _drain(self, key: Key, name: str, deadline: float) -> None:
        """Evicts `key` once the requests in flight on it are done (new ones
        wait for the unload: `_draining`); its host copy goes with it if it
        is in `_copy_goes`, else is demoted."""
        while key in self.cache or key in self._busy:
            busy = self._busy.get(key)
            if busy is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"{name}: its {busy[0].name.lower()} was still under way "
                                  f"at the deadline")
                await asyncio.wait([busy[1]], timeout=left)
                continue
            entry = self.cache.entry(key)
            if entry.pins == 0 and entry.state == books.READY:
                # Begun, it ends, whether its caller waits (above: until the
                # deadline, as it may wait for the model's host copy) or not.
                self._evict(key, "unload")
                continue
            try:
                await self._wait_for_room(self._room_version, deadline)
            except TimeoutError:
                raise Timeout(f"{name}: still in use at the deadline") from None

    async def _pin_now(self, name: str, version: int | None, deadline: float) -> dict:
        key, _ = await self._acquire_named(name, version, deadline, request=False)
        gen = self._gen[key]
        if self._pinned.get(key) == gen:
            self._unpin_request(key, gen)  # this entry already carries the pin
        else:
            self._pinned[key] = gen  # the request's pin becomes the explicit one
            # Loads waiting for room look again: pinned room is refused at
            # once (PinnedFull), not waited for to their deadline.
            self._room_changed()
        return self.model_row(key)

    def _drop_pin(self, key: Key) -> None:
        gen = self._pinned.pop(key, None)
        if gen is not None:
            self._unpin_request(key, gen)  # a no-op if that entry is gone
        self._warm_now(key)  # its operator's choice: the engine waits for it no more

    def _warm_now(self, key: Key) -> None:
        if key in self._warming:
            self._warming.discard(key)
            if not self._warming:
                self._warmed.set()

    # -- models added at run time ---------------------------------------------------

    async def add_model(self, name: str, path: str) -> None:
        """Serves the model in directory `path` as `name` (version 1); it
        loads on its first request. The caller checks that `path` may be
        served (allowed roots); BadRequest if the name is taken; OVERLOADED
        once the engine is shutting down, as a request is."""
        self._check_loop()
        self._check_open()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.repo.add, name, path)

    async def remove_model(self, name: str, timeout: float | None = None) -> None:
        """Unloads a model added with add_model and forgets it. A model of
        the repository's directory is refused as it stands (BadRequest)."""
        self._check_loop()
        if not self.repo.added(name):  # before the unload, which a refusal would not undo
            # ModelNotFound where the repository has no such model either.
            await asyncio.get_running_loop().run_in_executor(None, self.repo.versions, name)
            raise BadRequest(f"model {name!r} is the repository's, not added at run time: "
                             f"remove its directory to remove it")
        await self.unload(name, None, timeout)
        self.repo.remove(name)
        self._names_changed({name})  # requests that waited for the unload load nothing
        for key in [k for k in self._stats if k[0] == name]:
            self._forget_stats(key)
        self._derived_inputs = {k: v for k, v in self._derived_inputs.items() if k[0] != name}

    # -- what is where -------------------------------------------------------------

    async def metadata(self, name: str, version: int | None = None) -> dict:
        """What a client needs to know of a model: its versions, backend,
        declared tensors and residency ("ready" only once resident). A
        model that cannot be served raises as a request's load would, but
        a look is not a failed load: it neither counts nor backs off (a
        dashboard polling it pushed the back-off of a manifest since fixed
        to its maximum)."""
        self._check_loop()
        spec = await self._spec(name, version, record=False)
        loop = asyncio.get_running_loop()
        versions = await loop.run_in_executor(None, self.repo.versions, spec.name)
        row = self.model_row((spec.name, spec.version))
        return {
            "name": spec.name, "version": spec.version, "versions": list(versions),
            "backend": spec.backend,
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                       for t in spec.inputs
                       or self._derived_inputs.get((spec.name, spec.version), ())],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                        for t in spec.outputs],
            "state": row["state"], "ready": row["state"] == "resident",
            "last_error": row["last_error"],
        }

    async def models(self) -> list[dict]:
        """Every model of the repository with its versions and residency."""
        return (await self.models_page())[0]

    async def models_page(self, after: str | None = None, limit: int | None = None
                          ) -> tuple[list[dict], str | None]:
        """models() of the `limit` models (None: all) whose names sort after
        `after`, each with all its versions, and the name the next page
        starts after (None: this was the last)."""
        self._check_loop()
        # One look on a thread, the manifests not read yet read there: a
        # thread hop per model and a task per version held the loop for
        # seconds at thousands of models.
        listing, more = await asyncio.get_running_loop().run_in_executor(
            None, self.repo.listing, after, limit)
        rows = await self._rows([key for key, _ in listing])
        for row, (_, spec) in zip(rows, listing):
            if isinstance(spec, BaseException):  # its manifest, say, cannot be read
                row["inputs"], row["error"] = [], str(spec)
            else:
                row["inputs"] = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                                 for t in spec.inputs]
        return rows, more

    async def _rows(self, keys: list[Key]) -> list[dict]:
        """model_row() of each of `keys`, a slice at a time with a turn of
        the loop between: thousands of rows at once held it for tens of
        milliseconds, and every request with it. Each row is of its own
        moment; a model forgotten meanwhile reads as on storage."""
        rows = []
        for start in range(0, len(keys), ROWS_PER_TURN):
            if start:
                await asyncio.sleep(0)
            rows.extend(map(self.model_row, keys[start:start + ROWS_PER_TURN]))
        return rows

    def model_row(self, key: Key) -> dict:
        """The row of stats() of one model version."""
        stats = self._stats.get(key) or _NEVER_LOADED
        backoff_left = self._backed_off(key, time.monotonic())
        row = {"name": key[0], "version": key[1], "state": "on storage", "worker": None,
               "bytes": 0, "hits": 0, "pins": 0, "pinned": key in self._pinned,
               "loads": stats.loads, "evictions": stats.evictions,
               "evictions_by_reason": dict(stats.evictions_by_reason),
               "failures": stats.failures, "last_error": stats.last_error,
               "last_load_time": stats.last_load_time,
               "load_duration_s": stats.load_duration_s,
               "loads_from_host": stats.host_loads,
               # Rounded up: 0 only where a request for it is no longer refused.
               "retry_in_s": math.ceil(backoff_left * 1e3) / 1e3,
               "host_bytes": self.host.bytes(key),
               # By name, as max_queue_per_model bounds it: all its versions.
               "queued": self._queued.get(key[0], 0)}
        cached = self.cache is not None and key in self.cache
        if cached:
            e = self.cache.entry(key)
            row.update(state=STATE_NAMES[e.state], worker=e.worker, bytes=e.device_bytes,
                       hits=e.hits, pins=e.pins)
        if backoff_left > 0:  # refused until then: its last load failed (one that
            row["state"] = "failed"  # timed out may still be leaving its worker)
        elif not cached:
            if key in self._fetching:
                row["state"] = "fetching"
            elif self.host.segment(key) is not None:
                row["state"] = "in host memory"
            elif self.disk is not None and self.disk.has(*key):
                row["state"] = "on disk"
        return row

    def stats(self) -> dict:
        """Every model version this engine holds or has counted, its workers
        and its tiers, now. On the loop, collect_stats() lets requests run
        while it builds the rows of thousands of models."""
        return self._stats_of([self.model_row(k) for k in self._counted()])

    async def collect_stats(self, after: str | None = None, limit: int | None = None) -> dict:
        """stats(), its rows built a slice at a time (see _rows); with
        `after` and `limit`, the rows of the `limit` models (each with all
        its versions) whose names sort after `after`, and under "next" the
        name the next page starts after (None: this was the last). The
        totals, workers and tiers are always the whole engine's; `limit` 0:
        they alone. A version forgotten meanwhile has no row."""
        self._check_loop()
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be at least 0, not {limit}")
        keys, more = self._counted(), None
        if limit == 0:  # the totals alone
            keys = []
        elif after is not None or limit is not None:
            names, more = storage.page(sorted({name for name, _ in keys}), after, limit)
            keys = [k for k in keys if names and names[0] <= k[0] <= names[-1]]
        rows = await self._rows(keys)
        counted = set(self._counted())
        out = self._stats_of([r for r in rows if (r["name"], r["version"]) in counted])
        if limit != 0 and (after is not None or limit is not None):
            out["next"] = more
        return out

    def _backed_off(self, key: Key, now: float) -> float:
        """Seconds left of `key`'s back-off after a failed load (0: none)."""
        stats = self._stats.get(key)
        return max(0.0, stats.retry_at - now) if stats is not None else 0.0

    def _resident_bytes(self) -> list[int]:
        """The device bytes of each version whose row says resident."""
        if self.cache is None:
            return []
        now = time.monotonic()
        out = []
        for key in self.cache.lru_keys():
            e = self.cache.entry(key)
            if e.state == books.READY and not self._backed_off(key, now):
                out.append(e.device_bytes)
        return out

    def _counted(self) -> list[Key]:
        """The keys stats() has a row for."""
        keys = set(self._stats) | set(self.host.book.lru_keys()) | self._fetching
        if self.cache is not None:
            keys.update(self.cache.lru_keys())
        return sorted(keys)

    def _stats_of(self, rows: list[dict]) -> dict:
        workers = []
        for w in self.pool.workers if self.pool else []:
            workers.append({
                "index": w.index, "device": w.device, "pid": w.pid, "alive": w.up,
                "in_flight": w.in_flight,
                "waiting_turn": w.waiting_turn,
                "busy": round(w.busy_share, 3),
                "spin_backoffs": w.spin_backoffs,
                "restart_delay_s": self.pool.restart_delays.get(w.index, 0.0),
                # `is not None`: a Cache with no entries is falsy (it has a len).
                "used_bytes": (self.cache.used(books.DEVICE, w.index)
                               if self.cache is not None else 0),
                "budget_bytes": (self.cache.capacity(books.DEVICE, w.index)
                                 if self.cache is not None else 0),
            })
        # The totals from the counts themselves, not from the rows: a page
        # of rows is not all of them, and rows built over several turns of
        # the loop are each of their own moment.
        counts = self._stats.values()
        resident = self._resident_bytes()
        return {
            "models": rows,
            "workers": workers,
            "totals": {
                "hits": self._hits,
                "misses": self._misses,
                "loads": sum(s.loads for s in counts) + self._forgotten["loads"],
                "evictions": sum(s.evictions for s in counts) + self._forgotten["evictions"],
                "failures": sum(s.failures for s in counts) + self._forgotten["failures"],
                "resident_models": len(resident),
                "resident_bytes": sum(resident),
                "worker_restarts": self.pool.restarts if self.pool else 0,
                "loads_from_host": sum(s.host_loads for s in counts)
                + self._forgotten["loads_from_host"],
            },
            "servers": sorted((s.stats() for s in self.servers),
                              key=lambda s: (s["server"], s["port"])),
            "host_tier": self.host.stats(),
            "disk_cache": {**(self.disk.stats() if self.disk is not None else {}),
                           "budget_bytes": self.config.disk_cache_bytes},
        }


class _ByteGate:
    """Bounds the bytes that loads move at once: a load waits while others
    hold the gate and its bytes would pass the limit. A load never waits
    for an empty gate, so a model larger than the limit loads, alone.
    First come, first in: a load that arrives while others wait goes behind
    them, though it would fit. Small loads let past a waiting large one
    kept the gate from ever emptying enough for it: under steady traffic of
    small cold models a large one waited for good."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no bound
        self.held = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    def _fits(self, nbytes: int) -> bool:
        return not self.limit or not self.held or self.held + nbytes <= self.limit

    async def acquire(self, nbytes: int) -> None:
        if not self._waiters and self._fits(nbytes):
            self.held += nbytes
            return
        waiter = asyncio.get_running_loop().create_future()
        place = (nbytes, waiter)
        self._waiters.append(place)
        try:
            await waiter  # its bytes are counted as it is let in (_admit)
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # let in, then given up before it ran
                self.release(nbytes)
            else:  # given up in the line: those behind it may fit now
                waiter.cancel()
                if place in self._waiters:  # (not if _admit passed over it already)
                    self._waiters.remove(place)
                self._admit()
            raise

    def release(self, nbytes: int) -> None:
        self.held -= nbytes
        self._admit()

    def _admit(self) -> None:
        """Lets in the waiters at the head of the line that fit now, in
        the order they came; the first that does not fit holds the rest."""
        while self._waiters:
            nbytes, waiter = self._waiters[0]
            if waiter.cancelled():  # its caller is leaving the line (acquire)
                self._waiters.popleft()
                continue
            if not self._fits(nbytes):
                return
            self._waiters.popleft()
            self.held += nbytes
            waiter.set_result(None)


def _add_ran(fields: dict, ran: dict) -> dict:
    """Adds a worker's account of a request's run to an observer's fields:
    where (worker), when (t_sent, worker_ns: t_recv, t_done, t_read; None
    where the worker died first) and how (account, batch, failed_call)."""
    fields["version"] = ran.get("version", fields["version"])  # None asks for the default
    fields["worker_ns"] = (ran.get("t_recv"), ran.get("t_done"), ran.get("t_read"))
    fields["t_sent"] = ran.get("t_sent")
    fields["worker"] = ran.get("worker")
    fields["account"] = ran.get("account")  # with Config.account_requests
    fields["batch"] = ran.get("batch")  # joined with others into one call: how many
    fields["failed_call"] = ran.get("failed_call")  # run alone after a joined call failed
    return fields


class _NotRun(Exception):
    """A load its worker died before beginning: no failure of its model's."""


async def _cancel(tasks: set[asyncio.Task]) -> None:
    """Cancels `tasks` and waits for them, and for any added meanwhile."""
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _declared(spec: ModelSpec) -> tuple:
    """What a worker loads and checks of a spec: not its tokens (the
    front-end checks those at each request) nor its size estimate (a
    directory's size, the manifest's own bytes included)."""
    return (spec.backend, spec.artifact, spec.inputs, spec.outputs, spec.device, spec.trusted,
            spec.warmup, spec.options, spec.source, spec.files, spec.compress,
            spec.max_batch_size)


def _version(version: object) -> int:
    """A request's version as the int the engine keys by: a numpy integer
    (read from an array) is taken, as the SDK takes it."""
    if isinstance(version, np.integer):
        version = int(version)
    if type(version) is not int or version < 1:  # True is 1: refused with the rest
        raise BadRequest(f"version must be a positive integer, not {version!r}")
    return version


def _load_ran(key: Key, worker: int) -> dict:
    """The account of a request whose model's load failed on `worker`: it
    never reached the worker's ring, but observers learn which version and
    worker it waited for."""
    return {"version": key[1], "worker": worker}


def _fit_together(sizes: list[int], caps: list[int], tries: int = 100_000) -> bool:
    """Whether models of these sizes can all be placed at once in workers of
    these budgets: a search, biggest first, whose first descent is first
    fit, and which says yes when it gives up after `tries` placements past
    that descent's: only a sure no refuses a configuration."""
    if sum(sizes) > sum(caps):
        return False
    sizes = sorted((n for n in sizes if n), reverse=True)
    if not sizes:
        return True
    tries += len(sizes)  # the first descent's placements are no part of the budget
    # Depth first, with a stack (pins may be many): choices[i] holds the
    # workers left to try for sizes[i], one per distinct room, the first
    # worker's last (popped first: first fit).
    room, chosen, choices = list(caps), [], [_rooms_for(sizes[0], caps)]
    while choices:
        if not choices[-1]:  # none left for this one: undo the one before
            choices.pop()
            if chosen:
                w = chosen.pop()
                room[w] += sizes[len(chosen)]
            continue
        tries -= 1
        if tries < 0:
            return True
        w = choices[-1].pop()
        room[w] -= sizes[len(chosen)]
        chosen.append(w)
        if len(chosen) == len(sizes):
            return True
        choices.append(_rooms_for(sizes[len(chosen)], room))
    return False


def _rooms_for(size: int, room: list[int]) -> list[int]:
    """The workers that `size` fits in, one per distinct room left (equal
    rooms are one choice), the first last: popped first."""
    first: dict[int, int] = {}
    for w, left in enumerate(room):
        if size <= left:
            first.setdefault(left, w)
    return sorted(first.values(), reverse=True)


def _loads_ahead(worker: Worker) -> bool:
    """Whether `worker`'s loader has LOADS_AHEAD loads to do: no room is
    made there for another until one ends."""
    return len(worker.load_turns) >= LOADS_AHEAD


def _request_fields(name: str, version: int | None, t_submit: int,
                    e: BaseException | None, end_ns: int = 0) -> dict:
    """What observers are told of a request's end ("request"), at `end_ns`
    (0: now)."""
    return {"model": name, "version": version, "start_ns": t_submit,
            "end_ns": end_ns or time.monotonic_ns(),
            "code": "OK" if e is None else getattr(getattr(e, "code", None), "name",
                                                   "INTERNAL")}


async def _logged(relief: Awaitable[None]) -> None:
    """A monitor's task: its error said, as the monitor's own are."""
    try:
        await relief
    except Exception as e:  # noqa: BLE001 - keep watching
        log.error("monitor: %r", e)


class _Place:
    """A request's place in its model's queue (Engine._queued), given back
    once: before the server's `then` answers, or when the future is done;
    and where the engine has observers, its end told to them then."""

    __slots__ = ("engine", "name", "version", "t_submit", "then", "left", "sent")

    def __init__(self, engine: Engine, name: str, version: int | None, t_submit: int,
                 then: Callable[[asyncio.Future], None] | None):
        self.engine = engine
        self.name, self.version, self.t_submit, self.then = name, version, t_submit, then
        self.left = False
        # Where and when it was sent (worker, t_sent, version), as an
        # error's `ran` says it: what observers are told of a request its
        # caller cancelled, whose future carries nothing. None: not sent,
        # or no observers were there to tell.
        self.sent = None

    def leave(self, fut: asyncio.Future | None = None) -> None:
        if not self.left:
            self.left = True
            self.engine._dequeue(self.name)
            if fut is not None and fut.cancelled():
                self.engine._abandon_cancelled()

    def leave_then(self, fut: asyncio.Future) -> None:
        self.leave(fut)  # a cold request's task, cancelled: its worker skips it
        self.then(fut)

    def end(self, fut: asyncio.Future) -> None:
        self.leave(fut)
        self.engine._emit_request(self.name, self.version, self.t_submit, fut, 0, self.sent)

    def end_later(self, fut: asyncio.Future) -> None:
        self.leave(fut)
        self.engine._observe_later(self, fut)


def _answer_resent(fut: asyncio.Future, then: Callable[[asyncio.Future], None] | None,
                   resend: asyncio.Task) -> None:
    """The answer of a resent inference (Engine._resend), to its caller."""
    if resend.cancelled():  # its caller's future was done first, or the engine stopped
        result = errors.cancelled()
    else:
        result = resend.exception() or resend.result()
    settle(fut, result, then)


def _as_arrays(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Contiguous native-order numpy arrays, copied only where they are not."""
    plain = _records.plain_arrays(inputs) if _records is not None else None
    if plain is not None:  # numeric numpy arrays already: looked at in C
        return plain
    # type() first: an isinstance() against the Mapping ABC costs a microsecond.
    if not (type(inputs) is dict or isinstance(inputs, Mapping)) or not inputs:
        raise BadRequest("inputs must be a non-empty mapping of name to array")
    out = {}
    for name, value in inputs.items():
        if not isinstance(name, str):
            raise BadRequest(f"input names must be strings, not {type(name).__name__}")
        value = from_torch(value)
        if not isinstance(value, np.ndarray):
            raise BadRequest(f"input {name!r} must be a numpy array or a torch tensor, "
                             f"not {type(value).__name__}")
        if value.dtype.hasobject or value.dtype.fields is not None or value.dtype.kind in "Mm":
            raise BadRequest(f"input {name!r}: dtype {value.dtype} cannot be sent")
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        # Not ascontiguousarray always: it makes a 0-d array 1-d.
        out[name] = value if value.flags.c_contiguous else np.ascontiguousarray(value)
    return out
