"""The worker: resident models, a loader thread, inference on the main thread.

`WorkerLogic` holds the models and does the work, with no I/O of its own, so
tests can drive it in-process. `main` is the process shell around it: it
attaches the two rings, says READY, and serves requests until the
front-end closes the request ring (or dies).

Inference runs on the main thread straight from the ring: request tensors
are numpy views of the record, which is released only after the response
(that may alias them) has been written. Loads and unloads run on a loader
thread, on a CUDA stream of its own on a GPU, so a load never stalls
inference of the models already resident. Both threads write responses; a
lock makes them one producer of the response ring.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
from pathlib import Path
import sys
import threading
import time
from typing import Iterator

import numpy as np

from mmengine import batching, heap, logs, messages, resources
from mmengine.calltimes import CallTimes
from mmengine.config import Config
from mmengine.declared import check_inputs
from mmengine.errors import (InputsRefused, InternalError, LoadFailed, MMEngineError,
                             ModelNotFound, PeerDied, RecordTooLarge, RingClosed, TooLarge,
                             cannot_carry)
from mmengine.messages import Op
from mmengine.ring import Ring, RingHandle
from mmengine.stop_signals import STOP_SIGNALS
from mmengine.storage import Manifests, read_spec

Key = tuple[str, int]
LOADER_NICE = 10  # 19 starves loads; 10 yields to inference and still loads at speed

log = logging.getLogger("mmengine.worker")


class _Terminal:
    """A worker's stdout or stderr on a terminal. Once the terminal is gone
    (closed: every write fails, EIO) what a model prints is dropped: its
    requests, which the front-end drains, must not fail of it."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class WorkerLogic:
    """The models resident on one device, and what can be done with them."""

    def __init__(self, config: Config, device: str):
        import torch  # only workers pay for torch

        from mmengine import staging

        self._torch = torch
        self.device = device
        self.models: dict[Key, object] = {}
        # The resident models that take batches: their max_batch_size.
        self.batching: dict[Key, int] = {}
        self._manifests = Manifests()
        self._stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
        self.bind_thread()
        # Written by the serving thread, read by the loader's and its readers.
        self.serving = staging.Serving()
        self.times = CallTimes()  # would_miss
        # What the loader thread serves ("idle" or an op's name), for the
        # serving thread's account of its requests; and its readers.
        self.loader_op = "idle"
        self.readers = None
        # On CPU, the host-tier segment whose private mapping a resident
        # model's weights view: what it writes is given back as it closes.
        self._views_of: dict[Key, str] = {}
        # Storages a publish moved weights off while a call ran: the
        # serving thread lets them go between calls.
        self.retired: list = []

    def bind_thread(self) -> None:
        """Makes the worker's GPU the calling thread's current device. CUDA
        keeps one per thread, cuda:0 until set: without this a handler's bare
        `.cuda()` or `device="cuda"` on the worker of cuda:1 lands on GPU 0."""
        if self._stream is not None:
            self._torch.cuda.set_device(self.device)

    def loader_state(self) -> str:
        """What the loader thread is doing: "idle", the control op it
        serves ("load", "unload", ...), or "read" while a load's readers
        read a file (the GIL free: what the op does besides holds it)."""
        readers = self.readers
        return "read" if readers is not None and readers.reading else self.loader_op

    def load(self, name: str, version: int, path: str, host: str | None = None,
             estimate: int | None = None, manifest: bytes | None = None) -> tuple[int, str]:
        """Loads the model in version directory `path` (on the loader
        thread), its bytes from the host-tier segment `host` if given (else,
        or if that fails, from its files); returns the bytes it takes and
        where they came from. The front-end says where the model lives (it
        may have been added at run time, outside the root), how large its
        spec says it is (`estimate`), and for a disk cache copy its
        `manifest` (its stub's keys as they are now: read_spec's `text`)."""
        key = (name, version)
        if key in self.models:
            return self.models[key].nbytes, "resident"
        spec = read_spec(name, version, Path(path), manifests=self._manifests,
                         estimate=estimate, text=manifest)
        from mmengine.backends import load_model

        model, source = None, "disk"
        if host is not None:
            try:
                model, source = self._on_stream(load_model, spec, self.device, host), "host"
            except BaseException as e:
                if self._stream is None:
                    # Its model (closed) may have written to its private
                    # mapping of the copy, a warm-up's buffers: given back,
                    # as close() does, or the next load of it starts there.
                    from mmengine.backends import safetensors

                    safetensors.HOST_MAPS.revert(host)
                if not isinstance(e, LoadFailed):
                    raise
                log.warning("%s; loading from the files", e)  # the files may still serve
        if model is None:
            model = self._on_stream(load_model, spec, self.device)
        elif self._stream is None:
            self._views_of[key] = host
        if model.spec.max_batch_size > 1:
            self.batching[key] = model.spec.max_batch_size
        self.models[key] = model  # published only once whole
        return model.nbytes, source

    def _on_stream(self, work, *args):
        """work(*args) on the loader's own CUDA stream, finished before it
        returns (on CPU: simply work(*args))."""
        if self._stream is None:
            return work(*args)
        try:
            with self._torch.cuda.stream(self._stream):
                return work(*args)
        finally:  # failed too: its copies queued so far are done before their memory goes
            self._stream.synchronize()

    def warm_device(self, loader: bool) -> None:
        """On a GPU, pays before any model waits for it what CUDA charges
        once per thread and stream: cuBLAS's handle and workspace, the first
        kernels; on the loader's thread (`loader`), on its stream, with the
        pinned staging buffers too. A cold model's first answer then waits
        for its own bytes and kernels alone."""
        if self._stream is None:
            return
        torch = self._torch

        def linear() -> float:
            a = torch.ones((64, 64), device=self.device)
            return torch.nn.functional.linear(a, a, a[0]).sum().item()  # .item() waits

        try:
            if loader:
                from mmengine import staging

                staging.stager(torch.device(self.device))
                self._on_stream(linear)
            else:
                linear()
        except Exception as e:  # noqa: BLE001 - only a head start: the first load pays
            log.warning("warming %s failed: %r", self.device, e)

    def publishable(self, model) -> bool:
        """Whether `model`'s bytes can go to the host tier (`publish`): a
        module whose weights can be laid out flat, of a backend that can
        load from there. Asked before the front-end makes room for a copy."""
        from mmengine import hosttier
        from mmengine.backends import safetensors
        from mmengine.backends.base import TorchModel

        if not isinstance(model, TorchModel) or model.spec.backend not in hosttier.BACKENDS:
            return False
        if isinstance(model, safetensors.ModuleModel):
            # Its file's one region: of no bytes (a file of no tensors), a
            # copy would hold nothing, as host_tensors says of other modules.
            return model.flat is not None and model.flat.numel() > 0
        try:
            safetensors.host_tensors(model.module, model.spec.name)
        except LoadFailed:
            return False
        return True

    def forget(self, segment: str) -> None:
        """Unmaps a host-tier segment the front-end has unlinked, once no
        model of this worker uses it."""
        from mmengine.backends import safetensors

        safetensors.HOST_MAPS.forget(segment)

    def allocator(self) -> dict:
        """On a GPU, how often torch's allocator called cudaMalloc and
        cudaFree: evictions and reloads should reuse cached memory, not
        free it (tools/gpu_check.py watches this)."""
        if self._stream is None:
            return {}
        stats = self._torch.cuda.memory_stats(self.device)
        return {"allocator": {"device_allocs": stats.get("num_device_alloc", 0),
                              "device_frees": stats.get("num_device_free", 0)}}

    def release(self) -> int:
        """Gives back the memory kept for the next loads (evicted models'):
        on a GPU torch's cached blocks (cudaFree: asked for only when the
        device runs short, since NVML counts them used and an eviction alone
        lowers nothing), on CPU the arena pool's. Returns the bytes."""
        if self._stream is not None:
            cuda = self._torch.cuda
            before = cuda.memory_reserved(self.device)
            cuda.empty_cache()
            return before - cuda.memory_reserved(self.device)
        from mmengine import staging

        freed = staging.POOL.free_bytes()
        staging.POOL.clear()
        return freed

    def publish(self, name: str, version: int, segment: str) -> int:
        """Copies a resident model's bytes into the new host-tier segment
        `segment`; returns the segment's size."""
        from mmengine.backends import safetensors
        from mmengine.backends.base import TorchModel

        model = self.models.get((name, version))
        if not isinstance(model, TorchModel):
            raise LoadFailed(f"{name} v{version}: not resident, or not a model the host "
                             f"tier can hold")
        retired: list = []
        size = self._on_stream(safetensors.publish, model, segment, retired)
        if self._stream is None:  # its weights moved onto the mapping
            self._views_of[(name, version)] = segment
        # Its call may run on the storages its weights left: they go once
        # the serving thread is between calls (_serve_requests), not while
        # a kernel reads them (freed under it, a call crashed the worker).
        if self.serving.busy():
            self.retired.append(retired)
            if not self.serving.busy():  # its call ended as this was said
                self.retired.clear()
        return size

    def unload(self, name: str, version: int):
        """Stops serving a model and returns it, to be closed by the caller
        (`close`): closing frees its memory, which need not delay the
        answer."""
        key = (name, version)
        model = self.models.pop(key, None)  # before its figure goes: noted() looks after
        self.batching.pop(key, None)
        self.times.forget(key)
        return model

    def close(self, key: Key, model) -> None:
        """Closes an unloaded model whose unload was already answered (a
        failure can only be reported here), and gives back the pages of
        the host-tier mapping it wrote to."""
        segment = self._views_of.pop(key, None)
        if model is None:
            return
        try:
            model.close()
        except BaseException as e:  # noqa: BLE001 - a backend bug, a module's sys.exit():
            log.error("closing %s failed: %r", model.spec.name, e)  # the worker goes on
        finally:
            if segment is not None:
                from mmengine.backends import safetensors

                safetensors.HOST_MAPS.revert(segment)

    def ran(self, key: Key, seconds: float, now: float) -> None:
        """Notes that a call of `key` took `seconds`, ending at `now`
        (time.monotonic()): CallTimes.ran."""
        self.times.ran(key, seconds, now)

    def noted(self, key: Key, ran: dict | None) -> None:
        """ran() of a call by its run's body (t_recv, t_done; None: it never
        began). Called once its answers are out: the client waits for the
        front-end, not for these books."""
        if ran is not None and "t_done" in ran:  # (none: its inputs were refused)
            self.ran(key, (ran["t_done"] - ran["t_recv"]) / 1e9, ran["t_done"] / 1e9)
            # Its answer out, the model may be unloaded meanwhile, on the
            # loader thread (the answer unpinned it, and the front-end sent
            # the unload), its figure forgotten: counted after that, the
            # figure came back for a model no longer here (one for each
            # model ever served, for good), and the model's next load took
            # its first call, a warm-up, for its time. Looked at once
            # counted, as unload() forgets once the model is gone: either
            # way the figure goes. (A reload begun meanwhile keeps it: the
            # loader would have unloaded, closed and loaded it again within
            # this thread's few steps.)
            if key not in self.models:
                self.times.forget(key)

    def would_miss(self, key: Key, deadline: float, queued: bool) -> bool:
        """Whether a call of `key` begun now would end past its request's
        `deadline` (time.monotonic()): then nobody gets its answer, and the
        requests behind it wait for nothing.

        Past its deadline, surely. Else only a request that `queued` (it
        was in the ring before the worker looked) is judged by the model's recent calls
        (CallTimes.would_miss): where a worker keeps up, a request goes to
        the model whatever the figure says, since a model's calls are not
        all alike (a larger input)."""
        now = time.monotonic()
        if not queued:
            return now >= deadline
        return self.times.would_miss(key, deadline, now)

    def infer(self, name: str, version: int, inputs: dict[str, np.ndarray]):
        model = self.models.get((name, version))
        if model is None:
            raise ModelNotFound(f"{name} v{version} is not resident on this worker")
        return model.predict(inputs)


class _Responder:
    """The response ring's one producer, shared by two threads."""

    def __init__(self, ring):
        self._ring = ring
        self._lock = threading.Lock()

    def send(self, rid: int, code: int = messages.OK, body=None,
             outputs: dict[str, np.ndarray] | None = None, model: str = "") -> None:
        record = messages.plain_response_record(rid, code, body, outputs)
        if record is None:
            arrays = {k: v if v.flags.c_contiguous else np.ascontiguousarray(v)  # keeps 0-d
                      for k, v in (outputs or {}).items()}
            for k, v in arrays.items():
                if v.dtype.hasobject or v.dtype.fields is not None:
                    raise cannot_carry("mmengine", k, v.dtype, model)
            record = messages.response_record(rid, code, body, arrays)
        header, bufs = record
        with self._lock:
            try:
                self._ring.put(header, *bufs)
            except RecordTooLarge:
                # An INFER's answer: its failure keeps the run's body (messages.py).
                message = "the response is larger than the response ring"
                self._ring.put(messages.response(rid, TooLarge.code, {**body, "message": message}
                                                 if messages.ran(body) else message))

    def fail(self, rid: int, e: BaseException, ran: dict | None = None) -> None:
        """Answers an error; `ran`, the run's body where the request ran."""
        if not isinstance(e, MMEngineError):
            e = InternalError(f"{type(e).__name__}: {e}")
        # A model's text may hold what no UTF-8 can (a file name's bytes as
        # surrogate escapes): msgpack refuses it, and the refusal would end
        # the thread that answers.
        message = str(e).encode("utf-8", "backslashreplace").decode()
        self.send(rid, e.code, message if ran is None else {**ran, "message": message})


@contextlib.contextmanager
def _main_thread_parks(req) -> Iterator[None]:
    """While the loader works, the main thread parks as soon as it has no
    request instead of spinning (where cores are few): a spinning thread is
    never woken, so it does not preempt the loader when a request comes, and
    waits for the end of the loader's time slice (milliseconds). A thread
    that helps with the load's reads (Readers.slot) still reads its parts
    before it parks."""
    spin = req.spin_us
    req.spin_us = 0
    try:
        yield
    finally:
        req.spin_us = spin


def _serve_control(ctl, req, out: _Responder, logic: WorkerLogic, spins: dict) -> None:
    """The loader thread: loads and unloads from the control ring; while
    it runs a heavy op, the main thread parks unless `spins` says otherwise
    for that op (resources.spins_during_loads)."""
    # A load's copies must not take the CPU from inference: at a higher nice
    # value the kernel lets the main thread preempt this one (a small
    # model's p99 during loads: 6.8 ms -> ~0.5 ms on 2 cores, loads as fast).
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
    except (AttributeError, OSError):
        pass
    logic.bind_thread()
    logic.warm_device(loader=True)
    while True:
        try:
            parts = ctl.get()
        except (RingClosed, PeerDied):
            return
        try:
            op, rid, name, version, _, params = messages.parse_request(parts[0])
        except messages.Malformed as e:
            _refuse(out, e)
            continue
        finally:
            del parts
            ctl.release()
        parks = (_main_thread_parks(req)
                 if op in messages.HEAVY_OPS and not spins[op]
                 else contextlib.nullcontext())
        logic.loader_op = op.name.lower()
        try:
            if op == Op.LOAD:
                with parks, _ends_a_forked_child():  # a load runs the model's code
                    nbytes, source = logic.load(name, version, os.fsdecode(params["path"]),
                                                params.get("host"), params.get("estimate"),
                                                params.get("manifest"))
                model = logic.models.get((name, version))
                try:
                    body = {"bytes": nbytes, "phases": getattr(model, "phases", {}),
                            "from": source, "inputs": _derived(model),
                            "publishable": source == "disk" and logic.publishable(model),
                            **logic.allocator()}
                except BaseException:
                    # Answered as failed, it may not stay: the front-end
                    # counts no bytes for it here, and loads it elsewhere.
                    del model
                    logic.close((name, version), logic.unload(name, version))
                    raise
                out.send(rid, body=body)
                del model, body
            elif op == Op.PUBLISH:
                with parks:
                    nbytes = logic.publish(name, version, params["segment"])
                out.send(rid, body={"bytes": nbytes})
            elif op == Op.FORGET:
                logic.forget(params["segment"])
                out.send(rid)
            elif op == Op.RELEASE:
                out.send(rid, body={"bytes": logic.release()})
            elif op == Op.UNLOAD:
                model = logic.unload(name, version)
                out.send(rid)  # nothing can reach the model any more
                # Before the next control message: a load may need the room.
                with _ends_a_forked_child():
                    logic.close((name, version), model)
                del model
            else:
                raise InternalError(f"op {op!r} on the control ring")
        except MMEngineError as e:
            out.fail(rid, e)
        except BaseException as e:  # a backend's bug, a handler's sys.exit(): the loader goes on
            out.fail(rid, LoadFailed(f"{name} v{version}: {type(e).__name__}: {e}"))
        finally:
            logic.loader_op = "idle"


def _derived(model) -> list:
    """The inputs a model's backend read from its artifact, where its
    manifest declares none (the front-end knows those), as [name, dtype,
    shape] lists."""
    if model is None or model.spec.inputs:
        return []
    return [[t.name, t.dtype, list(t.shape)] for t in model.inputs]


def _warm(repo: str) -> None:
    """Imports ahead, at the loader's priority, what the first loads of the
    repository's backends would import slowly (backends.warm)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
    except (AttributeError, OSError):
        pass
    from mmengine import backends

    try:
        backends.warm(repo)
    except Exception as e:  # noqa: BLE001 - only a head start: loads still work without
        log.warning("warming the backends failed: %r", e)


def _serve(req, out: _Responder, logic: WorkerLogic, abandoned: messages.Abandoned,
           clock: "_ThreadClock | None") -> None:
    """The main thread: inference, straight from the ring, in inference
    mode throughout (models do not enter it per request)."""
    import torch

    with torch.inference_mode():
        logic.warm_device(loader=False)
        _serve_requests(req, out, logic, abandoned, clock)


class _ThreadClock:
    """The calling thread's time on a CPU and its time runnable but waiting
    for one, in ns. The first is the thread's CPU clock: the scheduler's
    statistics bring a running thread's up to date only at ticks and
    switches. The second comes from them: a wait ends with a switch."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        self.last = self.read()

    def read(self) -> tuple[int, int]:
        return time.thread_time_ns(), int(os.pread(self._fd, 128, 0).split()[1])

    @classmethod
    def open(cls) -> "_ThreadClock | None":
        """The calling thread's clock; None, said once, where the kernel
        keeps no scheduler statistics (a sandbox without /proc's)."""
        try:
            return cls()
        except (OSError, ValueError, IndexError) as e:
            log.warning("account_requests: no scheduler statistics (%s); answers carry "
                        "no account", e)
            return None

    def account(self, woke: int, t_recv: int, start: tuple[int, int],
                loader: str) -> dict:
        """How the thread spent a request, read as its call has returned:
        `woke` when its wait for it ended (0: it did not wait), `start` the
        reading as the call began, `loader` what the loader thread was
        doing then (WorkerLogic.loader_state)."""
        end = self.read()
        out = {"t_woke": woke or t_recv, "wait_runq_ns": start[1] - self.last[1],
               "cpu_ns": end[0] - start[0], "runq_ns": end[1] - start[1], "loader": loader}
        self.last = end
        return out


def _serve_requests(req, out: _Responder, logic: WorkerLogic, abandoned: messages.Abandoned,
                    clock: _ThreadClock | None) -> None:
    serving = logic.serving
    while True:
        try:
            parts = req.get()
        except RingClosed:
            return  # the front-end is shutting down: everything sent is served
        # From the record's read to its answer's send: a load's reads wait
        # it out (staging.Readers), its Python steps included.
        serving.begin()
        try:
            request = _parse(parts, out)
            del parts
            if request is not None:
                if request[0] is Op.INFER and (request[2], request[3]) in logic.batching:
                    _serve_batch(req, out, logic, abandoned, clock, request)
                else:
                    _serve_one(req.woke_ns, out, logic, abandoned, clock, request)
                request = None
            req.release()
        finally:
            serving.end(time.monotonic_ns())
            if logic.retired:  # between calls: nothing runs on them now
                logic.retired.clear()


def _parse(parts: list, out: _Responder) -> tuple | None:
    """(op, id, model, version, tensors, params, parts) of a record; None
    for one that is no request (_refuse)."""
    try:
        return (*messages.parse_request(parts[0]), parts)
    except messages.Malformed as e:
        _refuse(out, e)
        return None


def _refuse(out: _Responder, e: messages.Malformed) -> None:
    """A record that is no request (a front-end bug, or its memory
    damaged): one whose id can be read is answered INTERNAL, and the
    worker serves on. One whose id cannot be read ends the worker: its
    request, never answered, would stay the oldest the engine has in
    flight there until it took the worker for stuck, stuck_inference_s
    past its deadline (never, without one); gone at once, the worker has
    its requests fail WORKER_DIED now, and another starts in its place."""
    if e.rid is None:
        log.critical("read a request record whose id cannot be read (%s): the worker ends, "
                     "and its requests fail", e)
        os._exit(1)
    log.error("refused request %d, which is no request: %s", e.rid, e)
    out.fail(e.rid, InternalError(f"the worker could not read request {e.rid}: {e}"))


def _skips(rid: int, key: Key, params: dict, queued: bool, logic: WorkerLogic,
           abandoned: messages.Abandoned) -> bool:
    """Whether nobody waits for inference `rid`'s answer, or nobody will
    by its end; `queued`: it was in the ring before the worker looked."""
    deadline = params.get("deadline")
    return rid in abandoned or deadline is not None and logic.would_miss(key, deadline, queued)


def _begins(rid: int, key: Key, params: dict, queued: bool, logic: WorkerLogic,
            abandoned: messages.Abandoned, out: _Responder, skipped: dict | None = None) -> bool:
    """Whether inference `rid` runs now; else it is answered SKIPPED, with
    the body `skipped`. Said before it looks: the front-end, marking it
    abandoned, then reads whether it runs (and counts its time as still
    ahead)."""
    abandoned.serving = rid
    if _skips(rid, key, params, queued, logic, abandoned):
        abandoned.serving = 0
        out.send(rid, messages.SKIPPED, skipped)
        return False
    return True


def _serve_one(woke: int, out: _Responder, logic: WorkerLogic, abandoned: messages.Abandoned,
               clock: _ThreadClock | None, request: tuple) -> None:
    op, rid, name, version, tensors, params, parts = request
    if not _begins(rid, (name, version), params, not woke, logic, abandoned, out):
        return
    try:
        if op != Op.INFER:
            raise InternalError(f"op {op!r} on the inference ring")
        inputs = messages.view(tensors, parts[1:])
    except Exception as e:  # every failure goes back typed
        abandoned.serving = 0  # (an op that is no inference never ran)
        out.fail(rid, e)
        return
    _run(woke, out, logic, abandoned, clock, name, version, inputs, rid)


def _serve_batch(req, out: _Responder, logic: WorkerLogic, abandoned: messages.Abandoned,
                 clock: _ThreadClock | None, head: tuple) -> None:
    """Serves `head`, an inference of a model that takes batches, joined
    with those of the same model and version queued right behind it
    (batching.py), up to the model's max_batch_size rows. Each record
    stays held until the caller releases them all. Requests of another
    form (batching.form), or past the limit, make calls of their own; the
    first record that is no such inference is served after them: as the
    head of its own joined call where its model takes batches too (it ran
    alone, its own batch queued behind it), while what is held leaves the
    front-end half the ring to go on sending into."""
    woke = req.woke_ns
    while head is not None:
        head = _serve_batch_from(req, out, logic, abandoned, clock, head, woke)
        woke = 0
        if head is not None and req.held > req.capacity // 2:
            _serve_one(0, out, logic, abandoned, clock, head)
            return


def _serve_batch_from(req, out: _Responder, logic: WorkerLogic, abandoned: messages.Abandoned,
                      clock: _ThreadClock | None, head: tuple, woke: int) -> tuple | None:
    """_serve_batch's call of `head` and what joins it; the record after
    them where it heads a batch in its turn (else it is served here)."""
    key = (head[2], head[3])
    limit = logic.batching.get(key, 0)  # (0: unloaded meanwhile, by the loader thread)
    queued, after = [head], None
    while len(queued) < limit:
        try:
            parts = req.try_get()
        except RingClosed:  # the front-end stops: what is queued is served, then get() ends
            break
        if parts is None:
            break
        request = _parse(parts, out)
        del parts
        if request is None:
            continue
        if request[0] is not Op.INFER or (request[2], request[3]) != key:
            after = request
            break
        if _skips(request[1], key, request[5], True, logic, abandoned):
            out.send(request[1], messages.SKIPPED)  # takes no place in a call
            continue
        queued.append(request)
    if len(queued) == 1:  # nothing to join: as any request
        _serve_one(woke, out, logic, abandoned, clock, head)
    else:
        _serve_joined(out, logic, abandoned, clock, queued, woke, limit)
    if after is None:
        return None
    if after[0] is Op.INFER and (after[2], after[3]) in logic.batching:
        return after
    _serve_one(0, out, logic, abandoned, clock, after)
    return None


def _serve_joined(out: _Responder, logic: WorkerLogic, abandoned: messages.Abandoned,
                  clock: _ThreadClock | None, queued: list, woke: int, limit: int) -> None:
    """_serve_batch's calls of `queued`, the first taken as woken at
    `woke`: in the order of their first requests, as the front-end reads
    what a worker runs (Worker.running)."""
    head = queued[0]
    key = (head[2], head[3])
    model = logic.models.get(key)
    # Each call: [form, rows, [(id, rows, params)], [inputs]]; a request
    # that cannot join any (batching.form): its record, served alone.
    calls, groups = [], []
    for request in queued:
        rid = request[1]
        try:
            if model is None:
                raise ModelNotFound(f"{key[0]} v{key[1]} is not resident on this worker")
            arrays = messages.view(request[4], request[6][1:])
            check_inputs(model.inputs, arrays)
        except Exception as e:  # its own failure, no other's
            # Its run, as alone (_call): taken, and no call made for it.
            out.fail(rid, e, {"t_recv": time.monotonic_ns()})
            continue
        shape = batching.form(arrays)
        if shape is None:
            calls.append(request)
            continue
        n, kinds = shape
        for group in groups:
            if group[0] == kinds and group[1] + n <= limit:
                break
        else:
            group = [kinds, 0, [], []]
            groups.append(group)
            calls.append(group)
        group[1] += n
        group[2].append((rid, n, request[5]))
        group[3].append(arrays)
    ran = False  # whether a call ahead of this one has run
    for call in calls:
        if type(call) is tuple:  # (the one it woke for, if it did, is still that)
            _serve_one(woke if call is head else 0, out, logic, abandoned, clock, call)
            ran = True
            continue
        _, _, members, inputs = call
        if ran:  # looked at as they were taken, before the calls ahead ran: again
            members, inputs = _still_wanted(key, members, inputs, logic, abandoned, out)
        ran = True
        # The call's first is looked at as _serve_one does (the rest were
        # just now, or as they were taken); one skipped leaves the call to the next.
        while members:
            rid, _, params = members[0]
            first_woke = woke if rid == head[1] else 0
            if _begins(rid, key, params, not first_woke, logic, abandoned, out):
                break
            del members[0], inputs[0]
        if len(members) == 1:
            _run(first_woke, out, logic, abandoned, clock, *key, inputs[0], members[0][0])
        elif members:
            _run_joined(first_woke, out, logic, abandoned, clock, key, members, inputs)


def _still_wanted(key: Key, members: list, inputs: list, logic: WorkerLogic,
                  abandoned: messages.Abandoned, out: _Responder) -> tuple[list, list]:
    """The members [(id, rows, params)] of a joined call, and their
    inputs, less those that nobody waits for now or will by the call's end
    (each answered SKIPPED): the calls that ran ahead of it took time."""
    kept_members, kept_inputs = [], []
    for member, one in zip(members, inputs):
        if _skips(member[0], key, member[2], True, logic, abandoned):
            out.send(member[0], messages.SKIPPED)
        else:
            kept_members.append(member)
            kept_inputs.append(one)
    return kept_members, kept_inputs


_forked = False  # this process is a child that a model's call forked


def _note_forked() -> None:
    global _forked
    _forked = True


@contextlib.contextmanager
def _ends_a_forked_child():
    """Around a model's code on the loader thread (its load, its warm-up,
    its close): a child it forked ends as it comes out (_call's own check
    is inline: a context costs the request path half a microsecond)."""
    try:
        yield
    except BaseException as e:
        if _forked:
            _leave_forked(e)
        raise
    if _forked:
        _leave_forked(None)


def _leave_forked(error: BaseException | None) -> None:
    """A model's code that forked returns twice: the child's return (or its
    exit(), which the call answers as an error: `error`) ends the child.
    Else it went on as a second worker on this one's rings (a call's on the
    serving thread, a load's on the loader's), and the first waited for it."""
    try:
        cause = error if isinstance(error, SystemExit) else getattr(error, "__cause__", None)
        if isinstance(cause, SystemExit):
            code = 0 if cause.code is None else cause.code if type(cause.code) is int else 1
        else:
            code = 0 if error is None else 1
        os._exit(code & 0xFF)  # as the kernel keeps it: sys.exit(256) is 0
    finally:
        os._exit(1)  # nothing of it may go on


def _call(woke: int, logic: WorkerLogic, abandoned: messages.Abandoned,
          clock: _ThreadClock | None, name: str, version: int, inputs: dict,
          batch: int = 0) -> tuple:
    """One call of the model, whose serving the front-end was told of
    (Abandoned.serving): (outputs, the run's body, None), or (None, the
    run's body or None, the exception); `batch`, the requests it joins."""
    ran = None  # the call's run in this worker, once it has one
    try:
        # One clock for every process: timings cross.
        t0 = time.monotonic_ns()
        start = clock.read() if clock else None
        loader = logic.loader_state() if clock else ""
        raised = None
        try:
            outputs = logic.infer(name, version, inputs)
        except BaseException as e:
            raised = e
            raise
        finally:
            if _forked:  # first: the table is the worker's, and it is still serving
                _leave_forked(raised)
            abandoned.serving = 0
            # Read before t_done: a preemption due during the call lands
            # at the first system call after it, which must count in it.
            account = clock.account(woke, t0, start, loader) if clock else None
            ran = {"t_recv": t0, "t_done": time.monotonic_ns()}  # (its books: the caller's)
            if account:
                ran["account"] = account
            if batch:
                ran["batch"] = batch
        return outputs, ran, None
    except Exception as e:  # every failure goes back typed
        abandoned.serving = 0
        if ran is not None and isinstance(e, InputsRefused):
            del ran["t_done"]  # the model never ran: no call, to count or to time
        return None, ran, e


def _run(woke: int, out: _Responder, logic: WorkerLogic, abandoned: messages.Abandoned,
         clock: _ThreadClock | None, name: str, version: int, inputs: dict, rid: int,
         failed_call: dict | None = None) -> None:
    """Inference `rid`, begun (_begins), answered; `failed_call`, the joined
    call of it that failed, to go with its answer (_run_joined)."""
    outputs, ran, error = _call(woke, logic, abandoned, clock, name, version, inputs)
    if failed_call is not None and ran is not None:
        ran["failed_call"] = failed_call
    try:
        if error is None:
            try:
                out.send(rid, body=ran, outputs=outputs, model=name)
                return
            except Exception as e:  # an answer that cannot be carried
                error = e
        out.fail(rid, error, ran)
    finally:
        logic.noted((name, version), ran)


def _run_joined(woke: int, out: _Responder, logic: WorkerLogic,
                abandoned: messages.Abandoned, clock: _ThreadClock | None, key: Key,
                members: list, inputs: list) -> None:
    """One call of `members` [(id, rows, params)], the first begun
    (_begins) and taken as woken at `woke`, their `inputs` joined; each
    answered its rows. A call that fails is made again request by
    request: no request's answer depends on the others' (a value that
    makes the model raise)."""
    name, ran = key[0], None
    try:
        joined = batching.join(inputs)
    except Exception as e:  # noqa: BLE001 - the memory to join them: alone, they may fit
        joined, error = None, e
    if joined is not None:
        outputs, ran, error = _call(woke, logic, abandoned, clock, *key, joined, len(members))
        joined = None
        try:
            if error is None:
                _answer_joined(out, name, members, outputs, ran)
                return
        finally:
            logic.noted(key, ran)
    abandoned.serving = 0
    log.info("%s v%d: a call of %d joined requests failed (%s); each runs alone",
             *key, len(members), error)
    # The model ran all the same: an execution, that each request's answer
    # counts its share of as the answers of a call that succeeded do
    # (messages.py). None where no call was made (its inputs were refused).
    failed_call = None
    if ran is not None and "t_done" in ran:
        failed_call = {"t_recv": ran["t_recv"], "t_done": ran["t_done"], "batch": len(members)}
    skipped = None if failed_call is None else {"failed_call": failed_call}
    for (rid, _, params), one in zip(members, inputs):
        if _begins(rid, key, params, not woke, logic, abandoned, out, skipped):
            _run(woke, out, logic, abandoned, clock, *key, one, rid, failed_call)
        woke = 0  # (the first only)


def _answer_joined(out: _Responder, name: str, members: list, outputs: dict, ran: dict) -> None:
    """Each of a joined call's `members` answered its rows of `outputs`."""
    try:
        answers = batching.split(outputs, [rows for _, rows, _ in members], name)
    except InternalError as e:  # its answer is not row by row: said to each
        for rid, _, _ in members:
            out.fail(rid, e, ran)
        return
    for (rid, _, _), answer in zip(members, answers):
        try:
            out.send(rid, body=ran, outputs=answer, model=name)
        except Exception as e:  # one answer that cannot be carried fails alone
            out.fail(rid, e, ran)


def _attach(name: str, data_fd: int, space_fd: int, spin_us: float):
    ring = Ring.attach(RingHandle(name, data_fd, space_fd, spin_us))
    os.close(data_fd)  # inherited; the ring holds duplicates of its own
    os.close(space_fd)
    return ring


def main(config: Config, device: str, index: int, req_handle: tuple, ctl_handle: tuple,
         resp_handle: tuple, abandoned_fd: int) -> None:
    """The worker process; each handle is (name, data_fd, space_fd, spin_us)
    with descriptors inherited from the front-end, as is abandoned_fd (the
    messages.Abandoned table)."""
    # The front-end decides when a worker stops: a signal to the whole
    # process group (Ctrl-C; systemd's SIGTERM to every process of a unit)
    # must not end it under the requests the front-end is draining. It ends
    # when its rings close, or its front-end dies. (A worker the pool starts
    # ignores them from its first line, workers.WORKER_ENTRY: again here.)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    os.register_at_fork(after_in_child=_note_forked)
    for stream in ("stdout", "stderr"):
        if getattr(sys, stream).isatty():
            setattr(sys, stream, _Terminal(getattr(sys, stream)))
    logs.to(log, sys.stderr, f"mmengine worker {index} (pid {os.getpid()})", config.log_level)
    sys.setswitchinterval(config.gil_switch_us / 1e6)
    import torch

    if device == "cpu":
        torch.set_num_threads(resources.torch_threads(config))
    from mmengine import staging

    try:
        req, ctl, resp = _attach(*req_handle), _attach(*ctl_handle), _attach(*resp_handle)
    except FileNotFoundError as e:  # unlinked before we came: nobody waits for us
        log.error("its rings are gone (the front-end stopped, or gave up on this "
                  "worker): %s", e)
        sys.exit(1)
    out = _Responder(resp)
    abandoned = messages.Abandoned(abandoned_fd)
    logic = WorkerLogic(config, device)
    clock = _ThreadClock.open() if config.account_requests else None  # the serving thread's
    # Only a CPU worker's loads give way to its requests: there the copy
    # and the model share the cores and the memory bus (staging.Readers).
    staging.READERS = logic.readers = staging.Readers(
        *resources.load_readers(config, device), logic.serving, device == "cpu")
    if resources.helps_loads(device):
        # Between requests the serving thread reads the load's parts instead
        # of only spinning (csrc/readjob.h); the front-end polls meanwhile.
        req.help_reads(logic.readers.slot)
    loader = threading.Thread(target=_serve_control,
                              args=(ctl, req, out, logic,
                                    resources.spins_during_loads(config, device)),
                              name=f"mmengine-loader-{index}", daemon=True)
    loader.start()
    heap.settle()  # started: torch's objects and ours live as long as the process
    out.send(messages.READY_ID, body={"pid": os.getpid(), "device": device})
    threading.Thread(target=_warm, args=(config.repo,), name=f"mmengine-warm-{index}",
                     daemon=True).start()
    try:
        _serve(req, out, logic, abandoned, clock)
    except PeerDied:
        os._exit(0)  # the front-end is gone: nobody is left to answer
    loader.join()
    for ring in (req, ctl, resp):
        ring.close()

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def run() -> None:
    """The worker process's entry (workers.py starts it): main's arguments
    come pickled on stdin. Not `python -m`: runpy cannot run a compiled
    module."""
    import pickle

    _die_with_front_end()
    main(*pickle.load(sys.stdin.buffer))


def _die_with_front_end() -> None:
    """Has the kernel kill this process when the front-end that started it
    dies (Linux: PR_SET_PDEATHSIG). Its rings say so too, but only to a
    main thread that gets back to them: one inside a model's predict, or
    stuck there, never would. SIGKILL: workers ignore SIGTERM."""
    front_end = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the rings still tell an idle worker
        return
    if os.getppid() != front_end:  # it died before the request could be made
        os._exit(0)
