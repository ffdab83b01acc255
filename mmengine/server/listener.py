"""What the TCP and HTTP servers share: a listening socket on the engine's
loop, the connections it has open, the control token's digest, the bytes of
large requests they hold, and a stop that lets them finish."""
from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import math
import struct
import termios
import time
import weakref
from typing import Callable, Sequence

from mmengine import auth, ring
from mmengine.engine import Engine
from mmengine.errors import Timeout


#: What a connection's unsent answers may buffer before it is read no
#: further (asyncio's flow control calls pause_writing): far above a batch of
#: usual answers, so a client that reads as it goes never meets it, and far
#: below what an unread stream of large answers would pile up. The low mark
#: is where reading resumes (uvloop's default of 16 bytes would wait for the
#: last byte).
WRITE_HIGH_WATER = 1 << 20
WRITE_LOW_WATER = 256 << 10
DRAIN_POLL_S = 0.01  # how often a stopping server looks at unsent answers
PORT_TRIES = 8  # port 0 on a name of several addresses: ports tried for all of them


def allow_writes(transport: asyncio.Transport) -> None:
    transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)


class WatchedWrites:
    """A connection's unsent answers, watched by its idle timer: a client
    that reads them, however slowly, is active; one that reads nothing for
    an idle timeout (two at most) is cut off with an abort, since a close
    waits for them to be read and would keep the connection for ever. The
    protocol calls `_note_reading(now)` on each tick of its idle timer (and
    `_watch_closed` once it has closed), defines `_arm(when)`, which arms
    that timer, and `flush()`, which writes what it holds back until the end
    of a turn of the loop (nothing, unless it coalesces its writes). Its
    `transport` is the protocol's, from connection_made on; `last_active`,
    the loop time its client was last active."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.last_active = 0.0
        self.unsent_seen = 0  # the unsent bytes at the last tick

    def flush(self) -> None:
        pass

    def _watch_closed(self, now: float, unsent: int, timeout: float) -> None:
        """A tick of a closed connection whose last answers go out as its
        client reads them: cut off once it has read nothing for `timeout`."""
        if not unsent:
            return  # all sent: the transport is closing by itself
        if now >= self.last_active + timeout:
            self.transport.abort()
        else:
            self._arm(self.last_active + timeout)

    def _note_reading(self, now: float) -> int:
        """Counts the client reading answers since the last tick as
        activity, and so the first tick that finds answers unsent (it has
        nothing to compare with); returns the bytes still unsent. The
        kernel's share counts too: a slow reader drains it long before the
        transport's own buffer moves."""
        unsent = self.transport.get_write_buffer_size() + _kernel_unsent(self.transport)
        if unsent and (unsent < self.unsent_seen or not self.unsent_seen):
            self.last_active = now
        self.unsent_seen = unsent
        return unsent


def _kernel_unsent(transport: asyncio.Transport) -> int:
    """Bytes in the socket's send queue that its peer has not acknowledged
    (Linux's SIOCOUTQ); 0 where that is not known."""
    sock = transport.get_extra_info("socket")
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)))[0]
    except (AttributeError, OSError, ValueError):
        return 0


class Listener:
    """Each connection protocol it makes registers itself with `admit` and
    answers `pending()`: the futures of the requests it has in flight.

    At most `max_connections` are open at once (config `max_connections`);
    `admit` refuses the next, and the protocol answers it with its own
    OVERLOADED error, before reading anything, and ends it, lingering
    first (`linger_refused`).

    Control operations (loading, unloading, pinning) call `check_control`
    with the token the request carries. Reading operations (list, stats,
    health, metadata, /metrics, /ping) need no token: they change nothing,
    and health checks and metric scrapers must reach them without a secret.

    Once listening it is among the engine's `servers`, whose counts
    (`stats`) the engine's stats() and /metrics report."""

    #: What stats() and /metrics call this kind of server.
    KIND = ""

    def __init__(self, engine: Engine, factory: Callable[[], asyncio.Protocol],
                 max_connections: int | None = None):
        self.engine = engine
        self._factory = factory
        self._server: asyncio.AbstractServer | None = None
        self.connections: set = set()
        self.max_connections = max_connections or engine.config.max_connections
        self.refused = 0  # connections refused past max_connections
        self.refusing: set = set()  # those of them lingering after their answer
        self.stopping = False  # draining: a connection closes after its last answer
        # Hashed once: a request's token is compared with the digest only.
        token = engine.config.control_token
        self.control_digests: tuple[bytes, ...] = (auth.digest(token),) if token else ()
        self.receiving = receive_budget(engine)
        # The loop's linger after an answer (linger; TCP and HTTP alike):
        # until then, and its back-off, as the workers' polls have theirs.
        self._linger_ns = int(engine.config.poll_us * 1e3)
        self._linger_until = 0
        self._lingering = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the one it listens on (start)
        self._linger_backoff = ring.BackOff()
        self._cpu_taken = ring.CpuTaken()
        self.lingers = 0  # times the loop began to linger
        self.port = 0  # once listening

    def stats(self) -> dict:
        """What it counts: its connections open now, those refused past
        max_connections, and the lingers its answers began."""
        return {"server": self.KIND, "port": self.port, "connections": len(self.connections),
                "max_connections": self.max_connections, "refused": self.refused,
                "lingers": self.lingers}

    def linger(self, connection) -> None:
        """After an answer that leaves `connection` with nothing in flight:
        where the client runs on another CPU, the loop
        turns on without sleeping for poll_us, so that its next request is
        read without waking this CPU. On a virtual machine a sleeping CPU wakes
        slowly (the echo across two CPUs: 66-98 us, on one: 8-19), and the
        front-end would sleep between every two requests of a client that
        the scheduler put beside the spinning worker. On the client's own
        CPU it sleeps: a turning loop only holds the client off; and where
        that cannot be told. The kernel says which CPU took in the last
        segment that came (SO_INCOMING_CPU): over loopback, the client's
        own, where it sent from (a bare ACK now and then excepted, which
        errs towards sleeping); from another machine, the one that took in
        the network card's packets, whose wake-up the linger spares too.
        Not while it backs off, as the workers' polls do (ring.BackOff):
        its CPU found taken as a linger begins.

        Asked in the loop's next turn, of a connection still quiet then
        (its `quiet()`: nothing to answer, and open): where the answer came
        by a poll, that turn comes after the I/O that reads the client's
        next request, which a client on this CPU has sent by then where it
        runs within the answer's write (where it waits until the loop
        sleeps, the connection is quiet, and the look finds it on this CPU);
        a loop with a request in flight has no need."""
        if self._linger_ns and not self.stopping:
            # (Its own loop, not asyncio's running one: that look-up is a
            # getpid() call, a system call after each answer.)
            self._loop.call_soon(self._look, connection)

    def _look(self, connection) -> None:
        if self.stopping or not connection.quiet():
            return
        client_cpu = ring.incoming_cpu(connection.fd)
        if client_cpu < 0 or client_cpu == ring.this_cpu():
            return
        now = time.monotonic_ns()
        lingering = self._lingering
        if not self._linger_backoff.spins_looking(now, None if lingering else self._cpu_taken):
            return
        self._linger_until = now + self._linger_ns
        if not lingering:
            self._lingering = True
            self.lingers += 1
            self._loop.call_soon(self._turn)

    def _turn(self) -> None:
        if time.monotonic_ns() < self._linger_until and not self.stopping:
            self._loop.call_soon(self._turn)
        else:
            self._lingering = False

    def admit(self, connection) -> bool:
        """Registers a new connection; False (and not registered) when
        `max_connections` are open already."""
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            return False
        self.connections.add(connection)
        return True

    def linger_refused(self, connection) -> bool:
        """Whether `connection`, refused past max_connections, may linger
        after its answer (its client may have sent its request already:
        closed with it unread, the connection is reset, and the answer goes
        with it); it is kept among `refusing` until it is lost. Past
        REFUSED_LINGERING of them one is closed at once: a flood of refused
        connections that never close would hold a descriptor each for
        LINGER_S."""
        if len(self.refusing) >= REFUSED_LINGERING:
            return False
        self.refusing.add(connection)
        return True

    def check_control(self, token: object) -> None:
        """Unauthorized unless `token` is the control token (if one is set)."""
        auth.check(self.control_digests, token, "a control operation")

    async def start(self, host: str | Sequence[str], port: int) -> int:
        """Listens on every address of `host`; returns the bound port
        (useful with port 0: the same on every address)."""
        loop = asyncio.get_running_loop()
        self._loop, self._lingering = loop, False  # (a chain of another loop died with it)
        for _ in range(PORT_TRIES):
            self._server = await loop.create_server(self._factory, host, port,
                                                    reuse_address=True)
            bound = self._server.sockets[0].getsockname()[1]
            if port or len({s.getsockname()[1] for s in self._server.sockets}) == 1:
                return self._listening(bound)
            # Port 0 gave each address (localhost's 127.0.0.1 and ::1) a port
            # of its own, and the one announced reached one of them alone:
            # all on the first's, if it is free on the others.
            self._server.close()
            try:
                self._server = await loop.create_server(self._factory, host, bound,
                                                        reuse_address=True)
                return self._listening(bound)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, f"no port free on every address of {host!r} "
                                        f"in {PORT_TRIES} tries")

    def _listening(self, port: int) -> int:
        self.port = port
        self.engine.servers.add(self)
        return port

    async def stop(self) -> None:
        """Stops accepting, lets requests in flight finish (to the shutdown
        deadline), then closes every connection."""
        deadline = time.monotonic() + self.engine.config.shutdown_timeout_s
        await self.drain(deadline)
        await self.close(deadline)

    async def drain(self, deadline: float) -> None:
        """Stops accepting, and waits until the requests of every
        connection are answered, or until `deadline` (time.monotonic())."""
        if self._server is None:
            return
        self.stopping = True
        self._server.close()
        # An answered request may start the next one its connection has
        # queued: look again until none is left or the time is up.
        while (pending := [f for c in self.connections for f in c.pending()]):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait(pending, timeout=left)

    async def close(self, deadline: float) -> None:
        """Closes every connection once its answers are sent, or at
        `deadline`."""
        if self._server is None:
            return
        self.engine.servers.discard(self)  # closing: no longer one of its servers
        # Answers still unsent go out while their clients read them (the
        # loop would stop under a closing transport before it flushed);
        # past the deadline, those nobody has read are dropped.
        while True:
            for c in self.connections:
                c.flush()
            if time.monotonic() >= deadline or not any(
                    c.transport.get_write_buffer_size() for c in self.connections):
                break
            await asyncio.sleep(DRAIN_POLL_S)
        # (The refused ones too: the server's wait_closed waits for them.)
        for c in [*self.connections, *self.refusing]:
            (c.transport.abort if c.transport.get_write_buffer_size() else c.transport.close)()
        await self._server.wait_closed()


#: A request body at least this large is received only against the budget;
#: smaller ones are bounded by each connection's own limits.
RESERVE_ABOVE = 1 << 20
#: While connections wait for the budget, the pace of the bodies holding it
#: is judged this often, each once it has been read this long (its first
#: seconds are TCP's slow start and its client's own).
PACE_CHECK_S = 1.0
PACE_GRACE_S = 2.0
#: A body not read while the server answers its client's requests (its
#: answers back up, too many in flight) is not judged meanwhile, for this
#: long at most: past it, a client that reads its answers a byte at a time
#: would hold its part of the budget for ever.
SERVED_FIRST_MAX_S = 10.0
#: How long a connection refused mid-request drops what its client still
#: sends before it closes (see _HttpConnection._linger).
LINGER_S = 5.0
#: Connections refused past max_connections that linger at once, at most
#: (Listener.linger_refused).
REFUSED_LINGERING = 1024


class ReceiveBudget:
    """The bytes of large requests that the servers of one engine hold at
    once: bodies being received, and on HTTP bodies waiting in a pipeline
    for their answer. Without it every open connection could hold a request
    of the maximum size (max_connections x max_request_bytes); with it, a
    connection that announces a large body past the budget stops being read
    (its bytes wait in the kernel, and its client is slowed by TCP itself)
    until others are done. The budget never refuses a body when nothing else
    holds any of it, so a request of the maximum size is always received.

    Announced is not sent: a few clients that announce large bodies and
    trickle them would hold the whole budget for as long as a body may take.
    So while others wait, a body that holds bytes of the budget must arrive
    at `min_rate` bytes a second or more, averaged from when its bytes were
    taken (PACE_GRACE_S at least); a slower one is cut off, and its bytes
    go to those waiting. Nobody waiting, nobody is hurried."""

    def __init__(self, limit: int, min_rate: int = 0) -> None:
        self.limit = limit
        self.min_rate = min_rate
        self.held = 0
        self._waiting: collections.deque[Callable[[], None]] = collections.deque()
        self._holders: weakref.WeakSet[BudgetedReading] = weakref.WeakSet()
        self._judging: asyncio.TimerHandle | None = None

    def take(self, nbytes: int) -> bool:
        if self.held and self.held + nbytes > self.limit:
            return False
        self.held += nbytes
        return True

    def grow(self, held: int, nbytes: int) -> bool:
        """take(nbytes) for a request that holds `held` bytes already: it is
        not refused for want of what it holds itself."""
        if self.held > held and self.held + nbytes > self.limit:
            return False
        self.held += nbytes
        return True

    def take_or_wait(self, nbytes: int, callback: Callable[[], None]) -> bool:
        """take(nbytes), or else `callback` is called once bytes come back."""
        if self.take(nbytes):
            return True
        self.wait(callback)
        return False

    def wait(self, callback: Callable[[], None]) -> None:
        """Calls `callback` (once) when bytes are given back: it takes again."""
        self._waiting.append(callback)
        if self.min_rate and self._judging is None:
            self._judging = asyncio.get_running_loop().call_later(PACE_CHECK_S, self._judge)

    def hold(self, reading: "BudgetedReading") -> None:
        """`reading`'s body being received holds bytes: its pace is watched."""
        self._holders.add(reading)

    def _judge(self) -> None:
        self._judging = None
        if not self._waiting:
            return
        now = asyncio.get_running_loop().time()
        for reading in list(self._holders):
            if not reading.reserved or reading._gone():  # received, or gone
                self._holders.discard(reading)
            else:
                reading._judge_pace(now, self.min_rate)
        if self._waiting and self._judging is None:
            self._judging = asyncio.get_running_loop().call_later(PACE_CHECK_S, self._judge)

    def cancel(self, callback: Callable[[], None]) -> None:
        try:
            self._waiting.remove(callback)
        except ValueError:
            pass

    def give(self, nbytes: int) -> None:
        self.held -= nbytes
        waiting, self._waiting = self._waiting, collections.deque()
        for callback in waiting:  # each takes what it needs or waits again
            callback()


class BudgetedReading(WatchedWrites):
    """A connection's side of the receive budget, for the protocols of both
    servers: `reserved`, the bytes its large body being received holds, or
    `awaiting`, the bytes it waits for, not reading meanwhile. The protocol
    defines `_gone()`, whether it is closed or closing, and `_budget_came()`,
    what it does once its wait is over (resume reading, if nothing else
    holds it). For the pace of its body (see ReceiveBudget) it defines
    `_received()`, the bytes of it read so far, `_served_first()`, whether
    it is not read while the server answers its requests, and
    `_too_slow(error)`, which gives its bytes back and ends the stream
    with `error`. Its answers are watched as WatchedWrites says."""

    def __init__(self, server: "Listener") -> None:
        super().__init__()
        self.server = server
        self.reserved = 0
        self.awaiting = 0
        self.paced_from = 0.0  # loop time the pace of the body holding `reserved` counts from
        self.paced_base = 0    # its bytes read by then
        self.served_since = 0.0  # loop time it was not read for its own requests since; 0: read
        self.ending: asyncio.TimerHandle | None = None  # a lingering close's bound (_close_in)

    def _close_in(self, seconds: float) -> None:
        """Closes the connection (`_close`, the protocol's) in `seconds`: the
        bound of a lingering close, whose client may close it first (an
        infinite one: only then). The timer goes as the connection is lost
        (_stop_ending): left, it held a closed connection, its parser and
        buffers, that long, and a client that connects, sends an oversized
        frame's header and closes, in a loop, held thousands."""
        self._stop_ending()
        if math.isfinite(seconds):
            self.ending = asyncio.get_running_loop().call_later(seconds, self._close)

    def _stop_ending(self) -> None:
        if self.ending is not None:
            self.ending.cancel()
            self.ending = None

    def _reserve(self, nbytes: int) -> None:
        """Takes the budget for a large body that has begun, or stops
        reading this connection until the budget has room for it."""
        self.served_since = 0.0  # the exemption of a body before it is not this one's
        if self.server.receiving.take_or_wait(nbytes, self._on_budget):
            self.reserved = nbytes
            self._pace_from_now()
        else:
            self.awaiting = nbytes
            self.transport.pause_reading()

    def _on_budget(self) -> None:
        if self._gone() or not self.awaiting or \
                not self.server.receiving.take_or_wait(self.awaiting, self._on_budget):
            return
        self.reserved, self.awaiting = self.awaiting, 0
        self._pace_from_now()
        self._budget_came()

    def _pace_from_now(self) -> None:
        self.paced_from = asyncio.get_running_loop().time()
        self.paced_base = self._received()
        self.server.receiving.hold(self)

    def _judge_pace(self, now: float, min_rate: int) -> None:
        if not self._served_first():
            self.served_since = 0.0
        elif not self.served_since or now - self.served_since < SERVED_FIRST_MAX_S:
            self.served_since = self.served_since or now
            self._pace_from_now()  # its wait is the server's: it counts from after it
            return
        elapsed = now - self.paced_from
        rate = (self._received() - self.paced_base) / elapsed if elapsed > 0 else 0.0
        if elapsed >= PACE_GRACE_S and rate < min_rate:
            self._too_slow(Timeout(
                f"a request body arrived at {rate:.0f} bytes/s, below receive_min_rate "
                f"({min_rate}), holding {self.reserved} bytes of the receive budget (its "
                f"length, or the largest a body of no declared length may be) while "
                f"others waited for it"))

    def _drop_budget(self) -> None:
        """The body being received is taken no more: the budget it holds,
        or waits for, is others' now."""
        if self.reserved:
            self.server.receiving.give(self.reserved)
            self.reserved = 0
        self._stop_awaiting()

    def _stop_awaiting(self) -> bool:
        """Stops waiting for the budget; whether it was waiting."""
        if not self.awaiting:
            return False
        self.server.receiving.cancel(self._on_budget)
        self.awaiting = 0
        return True


_budgets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def receive_budget(engine: Engine) -> ReceiveBudget:
    """The one budget of all the servers of `engine`."""
    budget = _budgets.get(engine)
    if budget is None:
        budget = _budgets[engine] = ReceiveBudget(engine.config.receive_bytes,
                                                  engine.config.receive_min_rate)
    return budget
