"""The binary TCP server: the SDK's fast path, a thin layer over the Engine.

One asyncio Protocol per connection, on the engine's loop. Frames are cut
from the byte stream as they arrive; a frame longer than the configured
maximum is refused from its 4-byte length alone, and its body is dropped
unread as it comes (see _linger). Many
requests are in flight per connection and answers go back as they
complete, in any order: an infer is a future of the engine with a callback
that writes the answer (no task on the hot path), every other operation a
task. A malformed frame gets a typed error and the connection is ended
(the stream can no longer be trusted); other connections are untouched. An
error that ends a connection is followed by the end of our side of the
stream, and what the client still sends is dropped until it closes (see
_linger): closed at once, the connection would be reset, and the error lost.
A large frame (protocol.BIG bytes or more) that is still arriving goes to a
buffer of its own (protocol.LargeFrame), so that its tensors are decoded as
views of it and reach the worker's ring with no copy in between.

Hostile and forgotten clients are bounded: past `max_connections` open
connections a new one gets an OVERLOADED frame (nil id) and is ended; a
client that does not read its answers is not read either (once its answers
back up past the write allowance (listener.py), no frame of it is taken
until they drain, so what waits for it is its requests in flight); a
connection with nothing in flight and no bytes for `tcp_idle_timeout_s` is
closed (one whose frame waits for the receive budget is told OVERLOADED
first), and so is one whose frame, once begun, is not complete that long
after its first byte (a TIMEOUT frame with nil id says so first).

A request may carry a `token`: an infer hands it to the engine (the model's
manifest decides), a control operation checks it against the configured
control token before anything else happens.
"""
from __future__ import annotations

import asyncio
import functools
import math
import time
from typing import Any

from mmengine import errors, protocol, trace
from mmengine.engine import Engine
from mmengine.errors import (BadRequest, InternalError, MMEngineError, Overloaded, Timeout,
                             TooLarge)
from mmengine.server import listener
from mmengine.server.listener import BudgetedReading, Listener

_wire = protocol.native  # infer requests read and their answers packed in C

MAX_IN_FLIGHT = 1024  # per connection; past it the server stops reading


class TcpServer(Listener):
    KIND = "tcp"

    def __init__(self, engine: Engine, max_frame: int | None = None,
                 max_connections: int | None = None, idle_timeout_s: float | None = None):
        super().__init__(engine, lambda: _Connection(self), max_connections)
        # No longer than a frame's length can say: a ring of 4 GiB or more
        # would make a limit that no header is above, so never refused.
        self.max_frame = min(max_frame or max(protocol.DEFAULT_MAX_FRAME,
                                              engine.config.max_request_bytes),
                             protocol.MAX_LENGTH)
        self.idle_timeout_s = idle_timeout_s or engine.config.tcp_idle_timeout_s


class _Connection(BudgetedReading):
    """One connection's protocol (asyncio's Protocol interface: an
    extension type where compiled, tcp.pxd, which cannot derive from
    asyncio.Protocol, a Python class)."""

    def __init__(self, server: TcpServer):
        super().__init__(server)
        self.engine = server.engine
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fd = -1  # the socket's, where linger reads where the client runs
        self.buf = bytearray()
        # What is in flight -> None, or for an inference, the receive budget
        # its frame holds until it is answered (a large one's: its tensors are
        # views of the frame). A client that goes away cancels the
        # inferences (a load or a pin it asked for completes).
        self.tasks: dict[asyncio.Future, int | None] = {}
        self.paused = False      # too many requests in flight: not read until fewer
        self.write_blocked = False  # answers backed up: not read, no frame taken
        # (reserved: bytes of the frame being received, held in the budget;
        # awaiting: bytes of a frame waiting for the budget, unread;
        # last_active: loop time of the last bytes read or last answer.)
        self.closing = False
        self.idle: asyncio.TimerHandle | None = None
        self.frame_began = 0.0   # loop time the unfinished frame in buf began; 0: none
        self.eof = False         # the client half-closed: close once its answers are out
        self.unsent: list[bytes] | None = None  # answers to write at the end of this turn
        self.lingering = False   # ended after an error: what comes is dropped unread
        self.big: protocol.LargeFrame | None = None  # a large frame arriving, not in buf

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.last_active = self.loop.time()
        if not self.server.admit(self):
            transport.write(protocol.frame(protocol.error_response(None, Overloaded(
                f"the server has {self.server.max_connections} connections open; "
                f"retry later"))))
            if self.server.linger_refused(self):
                self._linger()
            else:
                self.closing = True
                transport.close()
            return
        listener.allow_writes(transport)
        self.fd = transport.get_extra_info("socket").fileno()
        self._arm(self.last_active + self.server.idle_timeout_s)

    def pending(self) -> list:
        return list(self.tasks)

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.server.refusing.discard(self)
        self._drop_budget()
        self.big = None
        self._stop_ending()
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self._cancel_inferences()

    def _cancel_inferences(self) -> None:
        """Cancels the inferences in flight, whose answers nobody will read:
        their workers skip those not begun. They are in flight no more: the
        engine runs no `then` (_on_answer) for a future its caller cancels,
        and left, they held a stopping server's drain, which found them done
        and looked again, busy, until its deadline."""
        for fut, held in list(self.tasks.items()):
            if held is not None:
                fut.cancel()
                del self.tasks[fut]
                self._give(held)

    def eof_received(self) -> bool | None:
        # A client that half-closes after its last frame still gets its answers.
        self.flush()  # those of this turn: a close now would drop them
        # A frame begun can never end now (a whole one was taken as it came:
        # a connection that takes none is not read, and finds no end). The
        # budget it holds, or waits for, is others' at once, not once the
        # requests in flight are answered, or (the transport's own close)
        # their answers read; and no idle timeout ends it as unfinished,
        # cancelling the requests its client waits for.
        self._drop_unfinished()
        self.frame_began = 0.0
        if not self.tasks or self.lingering:  # (lingering: it waited for this)
            self._close()  # ours, not the transport's: it waits for the answers to be read
            return True
        self.eof = True
        return True

    # -- idle connections and unfinished frames: one timer that moves itself

    def _arm(self, when: float) -> None:
        if math.isfinite(when):  # an infinite timeout: never
            self.idle = self.loop.call_at(when, self._on_idle)

    def _on_idle(self) -> None:
        self.idle = None
        now = self.loop.time()
        timeout = self.server.idle_timeout_s
        unsent = self._note_reading(now)
        if self.closing:
            self._watch_closed(now, unsent, timeout)
            return
        if self.lingering:  # closed when its linger ends, and watched from then
            return
        # An unfinished frame counts only while its connection is read: one
        # waiting for the receive budget, for fewer requests in flight or for
        # its client to read its answers is not the client's slow frame
        # (counting it would also make a due time in the past, and this
        # timer fire again at once).
        unfinished = self.frame_began and not (self.paused or self.awaiting
                                               or self.write_blocked)
        if unfinished and now >= self.frame_began + timeout:
            # (Its client may be trickling the frame's next bytes.)
            self._end(Timeout(f"a frame was begun and not finished within {timeout:g} s"))
        elif self.tasks:  # requests in flight: the last answer touches it again
            # (an unfinished frame is still due a timeout after its first bytes)
            self._arm(self.frame_began + timeout if unfinished else now + timeout)
        elif self.awaiting and now >= self.last_active + timeout:
            self._end(Overloaded(
                f"a frame waited {timeout:g} s for the receive budget (receive_bytes), "
                f"held by other large frames; retry later"))
        elif now >= self.last_active + timeout:
            self._close()
        else:
            due = self.last_active + timeout
            if unfinished:
                due = min(due, self.frame_began + timeout)
            self._arm(due)

    def data_received(self, data: bytes) -> None:
        if self.closing or self.lingering:
            return
        self.last_active = self.loop.time()
        if self.big is not None:
            data = self.big.fill(data)
            if not self.big.whole:
                return
        self.buf += data
        self._take_frames()

    def _take_frames(self) -> None:
        """Dispatches the whole frames in buf; while the answers back up
        (write_blocked) or MAX_IN_FLIGHT requests are in flight (paused),
        the rest waits in buf for _go_on(): one read may hold thousands of
        small frames, which past the limit met the model's queue instead."""
        now = self.loop.time()
        buf = self.buf
        start = 0
        took = False  # a frame: what is left began now
        try:
            if self.big is not None:  # filled by data_received; first in line
                if not self.big.whole or self.write_blocked or self.paused:
                    return
                big, self.big = self.big, None
                took = True
                self._take(big.decode())
            while len(buf) - start >= 4 and not (self.write_blocked or self.paused):
                n = protocol.LENGTH.unpack_from(buf, start)[0]
                if n > self.server.max_frame:
                    # Its client may send it whole first: that may take as
                    # long as any frame may.
                    self._end(TooLarge(f"frame of {n} bytes exceeds the maximum of "
                                       f"{self.server.max_frame}"), self.server.idle_timeout_s)
                    return
                if len(buf) - start - 4 < n:
                    if n >= listener.RESERVE_ABOVE and not (self.reserved or self.awaiting):
                        self._reserve(n)
                    if n >= protocol.BIG and (self.reserved or n < listener.RESERVE_ABOVE):
                        # (within the budget, where it needs one)
                        self.big = protocol.LargeFrame(n, buf[start + 4:],
                                                       protocol.MAX_REQUEST_ENTRIES)
                        start = len(buf)
                    break
                if n >= protocol.BIG:  # whole in buf: a copy of its own to view
                    message = protocol.decode(buf[start + 4:start + 4 + n],
                                              protocol.MAX_REQUEST_ENTRIES)
                else:
                    # An infer, read in C (a tuple), where it is plain; else
                    # protocol.py's map.
                    message = _wire.request(buf, start + 4, n) if _wire else None
                    if message is None:
                        with memoryview(buf) as view:
                            message = protocol.decode(view[start + 4:start + 4 + n])
                start += 4 + n
                took = True
                self._take(message)
        except MMEngineError as e:  # the stream cannot be trusted any more
            self._end(e)
            return
        except Exception as e:  # noqa: BLE001 - a bug: say so, never a silent close
            self._end(InternalError(f"{type(e).__name__}: {e}"))
            return
        finally:
            del buf[:start]
        # A frame begins when its first bytes stay after a read (moved into
        # a LargeFrame, it goes on from when it began).
        if not buf and self.big is None:
            self.frame_began = 0.0
        elif took or not self.frame_began:
            self.frame_began = now

    def _take(self, message: dict | tuple) -> None:
        """A request: a map, or an infer _wire.request read (a tuple). The
        budget a large frame holds goes with its inference until it is
        answered, as an HTTP body's does: its tensors are views of the
        frame, which lives until a worker's ring has them (a cold model's
        load later, or a busy worker's turn); given back as the frame was
        whole, it let one connection hold a frame's bytes for each request
        in flight, past receive_bytes."""
        held, self.reserved = self.reserved, 0
        if type(message) is tuple:
            self._infer(*message, held)
        else:
            self._dispatch(message, held)

    def _give(self, held: int | None) -> None:
        """Gives back the budget a request held (_take)."""
        if held:
            self.server.receiving.give(held)

    def _gone(self) -> bool:
        return self.closing or self.lingering

    def _budget_came(self) -> None:
        self.frame_began = self.last_active = self.loop.time()
        self._resume()

    def _received(self) -> int:
        # Before its LargeFrame is made, buf may hold other frames' bytes:
        # the frame's own count from 0 (its first read is then its pace's).
        return 0 if self.big is None else len(self.big.buf)

    def _served_first(self) -> bool:
        # Not read while its requests in flight or its answers back up: the
        # frame's own timeout does not count those waits either.
        return self.paused or self.write_blocked

    def _too_slow(self, error: MMEngineError) -> None:
        self._end(error)

    def _end(self, error: MMEngineError, seconds: float = listener.LINGER_S) -> None:
        """Ends the connection with `error` (nil id), lingering `seconds`:
        the stream can no longer be read as frames (one malformed, too
        large, unfinished, or not received)."""
        self._send(protocol.error_response(None, error))
        self._linger(seconds)

    def _linger(self, seconds: float = listener.LINGER_S) -> None:
        """Ends our side of the stream after the error that ends it, and
        drops what the client still sends until it closes, `seconds` at
        most (as HTTP's _linger does). Closed at once with bytes unread, the
        connection would be reset, and the reset would take the error with
        it: a client still sending a frame refused from its header, or one
        pipelined after a malformed frame, or its request before its
        connection was refused, read ECONNRESET after the error or in its
        place."""
        if self.closing or self.lingering:
            return
        self.flush()
        self.lingering = True  # no answer goes out from now on (_write): its requests end with it
        self._drop_unfinished()
        self.transport.write_eof()
        self.transport.resume_reading()  # read, to drop
        # Nobody reads their answers: run on, they held the workers, and a
        # stopping server's drain waited for them.
        self._cancel_inferences()
        self._close_in(seconds)

    def _drop_unfinished(self) -> None:
        """A frame being received is taken no more: the budget it holds, or
        waits for, is others' now, and its bytes go."""
        self._drop_budget()
        self.big = None
        # A new one, not cleared: an error being raised may still view it.
        self.buf = bytearray()

    def _resume(self) -> None:
        if not (self.paused or self.awaiting or self.write_blocked or self.closing):
            self.transport.resume_reading()

    # -- asyncio's write flow control: answers above the high-water mark

    def pause_writing(self) -> None:
        self.write_blocked = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_blocked = False
        self._go_on()

    def _go_on(self) -> None:
        """Takes the frames read before a pause, then reads again."""
        if not self.closing and not self.transport.is_closing():  # stop() closes it too
            if self.buf or self.big is not None:
                self.frame_began = self.loop.time()  # a frame begun before the pause
            self._take_frames()
            self._resume()

    def _dispatch(self, message: dict, held: int = 0) -> None:
        rid, op = message.get("id"), message.get("op")
        if op != "infer" or rid is None:  # (no frame of theirs is held: _take)
            self._give(held)
            held = 0
        if rid is None:  # its answer could not be told from one about the connection
            raise BadRequest("a request needs an id, and not nil")
        if op == "health":  # answered inline: no task, no engine round trip
            self._send({"id": rid, "ok": True, **self.engine.health(),
                        "max_frame": self.server.max_frame})
            return
        if op == "infer":
            try:
                model, version = _model_args(message)
                inputs = protocol.decode_tensors(message.get("inputs"))
                timing = message.get("timing")
                if timing is not None and type(timing) is not bool:  # "yes" is not no
                    raise BadRequest("'timing' must be true or false")
                timeout, token = _timeout(message), _token(message)
            except MMEngineError as e:
                self._give(held)
                self._send(protocol.error_response(rid, e))
                return
            self._infer(rid, model, inputs, version, timeout, token, timing, held)
            return
        handler = _HANDLERS.get(op) if type(op) is str else None
        if handler is None:
            self._send(protocol.error_response(
                rid, BadRequest(f"unknown op {errors.shown(op)}; "
                                f"one of {', '.join(protocol.OPS)}")))
            return
        if op in _CONTROL:  # refused before a task exists: unauthorized floods stay cheap
            try:
                self.server.check_control(_token(message))
            except MMEngineError as e:
                self._send(protocol.error_response(rid, e))
                return
        self._track(asyncio.get_running_loop().create_task(self._run(handler, rid, message)),
                    None)

    def _infer(self, rid: Any, model: str, inputs: dict, version: int | None,
               timeout: float | None, token: str | None, timing: bool | None,
               held: int = 0) -> None:
        """The hot path, once a request is read: a future and a callback,
        no task."""
        # 0: no timing asked for; else the stamp timing() starts from.
        t_submit = time.monotonic_ns() if timing else 0
        try:
            fut = self.engine.submit(model, inputs, version, timeout, token,
                                     then=functools.partial(self._on_answer, rid, t_submit,
                                                            model))
        except MMEngineError as e:
            self._give(held)
            self._send(protocol.error_response(rid, e))
            return
        self._track(fut, held)

    def _track(self, fut: asyncio.Future, held: int | None) -> None:
        """A request in flight until `fut` is done (`held`: None, or an
        inference's budget: tasks); past MAX_IN_FLIGHT, the connection is
        not read. An inference's answer (_on_answer) ends it in the same
        turn, with no callback: the engine runs `then` however its future
        is done, but for a cancel of ours (_cancel_inferences)."""
        self.tasks[fut] = held
        if held is None:
            fut.add_done_callback(self._task_done)
        if len(self.tasks) >= MAX_IN_FLIGHT and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _on_answer(self, rid: Any, t_submit: int, model: str, fut: asyncio.Future) -> None:
        try:
            self._answer(rid, t_submit, model, fut)
        finally:  # after the write: _task_done closes a connection that has ended
            self._task_done(fut)
            if not self.tasks and not self.closing:
                self.server.linger(self)

    def quiet(self) -> bool:
        """Nothing in flight, and open (the listener's linger asks)."""
        return not (self.tasks or self.closing or self.lingering or self.transport.is_closing())

    def _answer(self, rid: Any, t_submit: int, model: str, fut: asyncio.Future) -> None:
        if fut.cancelled():
            self._send(protocol.error_response(rid, errors.cancelled()))
            return
        e = fut.exception()
        if e is None:
            body, outputs = fut.result()
            frame = _wire.answer_frame(rid, outputs) if _wire and not t_submit else None
            if frame is not None:
                self._write([frame])
                return
            try:  # a model may answer what the wire cannot carry: say so
                tensors = protocol.encode_tensors(outputs, answer=model)
                response = {"id": rid, "ok": True, "outputs": tensors}
                if t_submit:
                    response["timing"] = trace.body_timing(t_submit, body)
                parts = protocol.frames(response, tensors)  # 4 GiB or more: no frame
            except MMEngineError as error:
                self.engine.refused(fut, error)
                self._send(protocol.error_response(rid, error))
                return
            self._write(parts)
        elif isinstance(e, MMEngineError):
            self._send(protocol.error_response(rid, e))
        else:
            self._send(protocol.error_response(rid, InternalError(f"{type(e).__name__}: {e}")))

    def _task_done(self, fut: asyncio.Future) -> None:
        self._give(self.tasks.pop(fut, None))
        if not self.tasks:  # idle from now on
            self.last_active = self.loop.time()
            if self.eof:
                self._close()
        if self.paused and len(self.tasks) < MAX_IN_FLIGHT // 2 and not self.closing:
            self.paused = False
            # In a turn of its own: an answer's end runs inside its worker's
            # drain, which the frames read meanwhile (hundreds) must not hold.
            self.loop.call_soon(self._go_on)

    async def _run(self, handler, rid: Any, message: dict) -> None:
        try:
            result = await handler(self.engine, message)
            result["id"] = rid
            result["ok"] = True
            self._send(result)
        except MMEngineError as e:
            self._send(protocol.error_response(rid, e))
        except Exception as e:  # noqa: BLE001 - a bug answers INTERNAL, never a hang
            self._send(protocol.error_response(rid, InternalError(f"{type(e).__name__}: {e}")))

    def _send(self, message: dict, tensors: dict | None = None) -> None:
        """Writes an answer; `tensors`, its encoded tensors, if it has any
        (large ones are written from where they lie: protocol.frames)."""
        self._write(protocol.frames(message, tensors))

    def _write(self, parts: list) -> None:
        """Writes an answer framed (protocol.frames)."""
        if self.closing or self.lingering or self.transport.is_closing():
            return
        if self.unsent is not None:
            self.unsent += parts
        elif len(self.tasks) > 1:
            # More answers are coming: those of this turn of the loop go out
            # in one write (a write to a socket costs more than the answer).
            self.unsent = parts
            self.loop.call_soon(self.flush)
        elif len(parts) == 1:
            self.transport.write(parts[0])
        else:
            self.transport.writelines(parts)

    def flush(self) -> None:
        unsent, self.unsent = self.unsent, None
        if unsent and not self.transport.is_closing():
            self.transport.writelines(unsent)

    def _close(self) -> None:
        """Closes once the answers written are read; the idle timer goes on
        watching them go out (see listener.WatchedWrites)."""
        if self.closing:  # closed before, or lost
            return
        self.flush()
        self.closing = True
        self._drop_unfinished()  # now, not once the answers written are read
        self.transport.close()
        if self.idle is None:
            self._arm(self.last_active + self.server.idle_timeout_s)


def _model_args(message: dict) -> tuple[str, int | None]:
    model, version = message.get("model"), message.get("version")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise BadRequest("'version' must be an integer")
    return model, version


def _timeout(message: dict) -> float | None:
    timeout = message.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(
            timeout, (int, float)) or not timeout > 0):  # NaN is not > 0 either
        raise BadRequest("'timeout' must be a positive number of seconds")
    return timeout


def _token(message: dict) -> str | None:
    token = message.get("token")
    if token is not None and type(token) is not str:
        raise BadRequest("'token' must be a string")
    return token


async def _load(engine: Engine, m: dict) -> dict:
    return {"model": await engine.load(*_model_args(m), timeout=_timeout(m))}


async def _unload(engine: Engine, m: dict) -> dict:
    await engine.unload(*_model_args(m), timeout=_timeout(m))
    return {}


async def _pin(engine: Engine, m: dict) -> dict:
    return {"model": await engine.pin(*_model_args(m), timeout=_timeout(m))}


async def _unpin(engine: Engine, m: dict) -> dict:
    await engine.unpin(*_model_args(m))
    return {}


def _page(message: dict, least: int) -> tuple[str | None, int | None]:
    """A page's `after` (a model name, or nil: from the first) and `limit`
    (models, at least `least`; nil: all of them)."""
    after, limit = message.get("after"), message.get("limit")
    if after is not None and type(after) is not str:
        raise BadRequest("'after' must be a model name")
    if limit is not None and (type(limit) is not int or limit < least):
        raise BadRequest(f"'limit' must be an integer >= {least}")
    return after, limit


async def _list(engine: Engine, m: dict) -> dict:
    after, limit = _page(m, 1)
    if after is None and limit is None:
        return {"models": await engine.models()}
    rows, more = await engine.models_page(after, limit)
    return {"models": rows, "next": more}


async def _stats(engine: Engine, m: dict) -> dict:
    return {"stats": await engine.collect_stats(*_page(m, 0))}


_HANDLERS = {"load": _load, "unload": _unload, "pin": _pin,
             "unpin": _unpin, "list": _list, "stats": _stats}
# The operations that change what is resident need the control token (if
# one is configured); list, stats and health only read (see Listener).
_CONTROL = frozenset({"load", "unload", "pin", "unpin"})
