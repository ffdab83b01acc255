"""The SDK: `Client` (blocking) and `AsyncClient` over the binary TCP protocol.

    with Client("127.0.0.1:8081") as c:
        y = c.infer("resnet", {"x": batch})["y"]

numpy arrays in and out (torch tensors are accepted as inputs). A server
error comes back as the same typed exception the engine raised
(ModelNotFound, BadRequest, ...); a broken connection, or an answer that
is not the protocol's, is ConnectionError.
Both clients pipeline: many requests share one connection and are matched
to their answers by id. `infer(..., timing=True)` says where the request's
time went (`Outputs.timing`).

`token` (a client's, or one call's) travels with every request: a model
whose manifest lists tokens needs one of them, and with a control token
configured on the server, so do load, unload, pin and unpin; a missing or
wrong one raises Unauthorized.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import numbers
import os
import select
import socket
import struct
import time
import weakref
from collections.abc import Mapping
from typing import Any, Iterable

import numpy as np

from mmengine import protocol
from mmengine.errors import BadRequest, MMEngineError, Timeout, TooLarge, retrieved, shown

DEFAULT_PORT = 8081
# A request's timeout is enforced by the server; the client waits this much
# longer, so that the server's typed answer arrives instead of the client
# giving up at the same instant and dropping the connection.
ANSWER_GRACE_S = 1.0
# Both clients' waits are extended by what moves at this rate (_extended): an
# answer the server made in time is read to its end however large it is
# (16 MiB at 8 MiB/s), and a large request sent; one that trickles (a byte a
# second) is not.
ANSWER_MIN_RATE = 1 << 20  # bytes per second
#: A timeout beyond this (11 days) is waited for without a limit: poll()
#: takes at most 2**31 - 1 ms.
FOREVER_S = 1e6
SEND_CHUNK = 256 << 10  # bytes offered to the kernel at once while answers are read
# Bytes a read takes at most. Not 1 MiB: a buffer past malloc's mmap
# threshold costs an mmap and a munmap per call.
RECV_BYTES = 1 << 16
# Reads an idle connection's look takes at most (_read_late): late answers
# are small; past this many the loop reads on, and the connection is used.
_LATE_READS = 16
# A frame larger than this is first checked against the server's maximum
# (health's max_frame, asked once): one the server would refuse is refused
# here, before its bytes travel only to be dropped.
CHECK_FRAMES_ABOVE = 1 << 20
_PREFIX = protocol.LENGTH.size  # a frame's bytes are its body's and its prefix's
_TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds
# uvloop's clock counts milliseconds: a wait due this soon is due now (else
# its timer, firing a hair early, would be armed again and again).
_CLOCK_S = 1e-3


ADDRESS_FORMS = '"host:port", "tcp://host:port" or a ("host", port) tuple'
_wire = protocol.native  # infer's frames packed and its answers read in C


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """("host", port) from "host:port", "tcp://host:port" or a tuple;
    TypeError for another type, ValueError for another form."""
    if isinstance(address, tuple):
        return _address_tuple(address)
    if not isinstance(address, str):
        raise TypeError(f"an address is {ADDRESS_FORMS}, not {type(address).__name__}")
    address = address.removeprefix("tcp://")
    if "://" in address:  # an HTTP URL: that port speaks another protocol
        raise ValueError(f"{address!r}: the SDK speaks mmengine's TCP protocol; give the "
                         f"server's TCP address, host:port (or tcp://host:port)")
    if address.startswith("["):  # [IPv6] or [IPv6]:port
        host, bracket, rest = address[1:].partition("]")
        if not bracket or rest and not rest.startswith(":"):
            raise ValueError(f"{address!r} is not host:port: an address is {ADDRESS_FORMS}")
        port = rest[1:] if rest else None
    else:
        host, colon, port = address.rpartition(":")
        if not colon or ":" in host:  # no port, or a bare IPv6 address (::1)
            host, port = address, None
    if not _host(host) or port is not None and not (
            port.isascii() and port.isdigit() and int(port) < 65536):
        raise ValueError(f"{address!r} is not host:port: an address is {ADDRESS_FORMS}")
    return host, DEFAULT_PORT if port is None else int(port)


def _host(host: str) -> bool:
    """Whether `host` can name a host: not empty, no white space or
    control characters (" h" is no host)."""
    return bool(host) and host.isprintable() and not any(c.isspace() for c in host)


def _address_tuple(address: tuple) -> tuple[str, int]:
    if len(address) != 2:
        raise ValueError(f"an address tuple is (\"host\", port), not {address!r}")
    host, port = address
    if not isinstance(host, str) or isinstance(port, bool) or not isinstance(
            port, numbers.Integral):
        raise TypeError(f"an address tuple is (\"host\", port), a str and an int, "
                        f"not {address!r}")
    if not _host(host) or not 0 <= port < 65536:
        raise ValueError(f"{address!r} is no (\"host\", port): a host name and a port "
                         f"of 0 to 65535")
    return host, int(port)


def _as_arrays(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(inputs, Mapping):
        raise BadRequest(f"inputs must be a mapping of name to array, not "
                         f"{type(inputs).__name__}")
    out = {}
    for name, value in inputs.items():
        if isinstance(value, np.ma.MaskedArray):  # asarray would send the masked values
            raise BadRequest(f"input {name!r} is a masked array: send its values "
                             f"(filled(), or compressed()) and say which are masked")
        try:
            out[name] = np.asarray(protocol.from_torch(value))
        except (ValueError, TypeError, RuntimeError) as e:  # ragged lists, nested tensors
            raise BadRequest(f"input {name!r} is not an array: {e}") from None
    return out


class Outputs(dict):
    """A model's outputs by name. `timing`, where the request's time went
    in nanoseconds, when infer() was asked for it (else None): the server's
    stages (docs/protocol.md), `round_trip_ns` as this client measured the
    call, and `outside_ns`, the round trip less the server's stages (this
    client, the network, the server reading the frame)."""

    timing: dict | None = None


class Models(list):
    """list()'s rows, a row per model version. `next`, where the call gave
    `after` or `limit`: the name to give as `after` for the next page, None
    once this page was the last."""

    next: str | None = None


def _plain(value: Any) -> Any:
    """A numpy integer (a version read from an array) as the int msgpack
    writes; anything else as it is, for the server to judge."""
    return int(value) if isinstance(value, np.integer) else value


def _count(name: str, value: Any, least: int, meaning: str) -> int:
    """A count the caller gives (a numpy integer is one; True is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} is an int, not {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} is {meaning}, not {value}")
    return int(value)


def _page_message(op: str, after: str | None, limit: int | None) -> dict:
    message: dict[str, Any] = {"op": op}
    if after is not None:
        message["after"] = after
    if limit is not None:
        message["limit"] = _plain(limit)
    return message


def _field(answer: dict, key: str, kind: type) -> Any:
    """`answer[key]`, a `kind`: an answer without it is the server's fault,
    not the caller's (ConnectionError, as any answer the SDK cannot read)."""
    value = answer.get(key)
    if not isinstance(value, kind):
        raise _unreadable(f"its {key!r} is {type(value).__name__}, not {kind.__name__}")
    return value


def _models(answer: dict) -> Models:
    rows = Models(_field(answer, "models", list))
    rows.next = answer.get("next")
    return rows


def _infer_message(model: str, inputs: dict, version: int | None,
                   timeout: float | None, token: str | None = None,
                   timing: bool = False) -> dict:
    message = {"op": "infer", "model": model, "inputs": protocol.encode_tensors(
        _as_arrays(inputs))}
    if version is not None:
        message["version"] = _plain(version)
    if timeout is not None:
        message["timeout"] = timeout
    if token is not None:
        message["token"] = token
    if timing:
        message["timing"] = True
    return message


def _outputs(response: dict, t_start: int = 0) -> Outputs:
    """An infer's Outputs; `t_start`, the call's time.monotonic_ns() where it
    asked for timing."""
    out = response.get("outputs")
    if type(out) is not Outputs:  # not read by _wire.answer: the tensors' maps
        try:
            out = Outputs(protocol.decode_tensors(response["outputs"], outputs=True))
        except (KeyError, MMEngineError) as e:  # the server's fault, not the request's
            raise _unreadable(e) from None
    if t_start:
        round_trip = time.monotonic_ns() - t_start
        timing = response.get("timing") or {}
        total = timing.get("total_ns", 0) if isinstance(timing, dict) else None
        if type(total) is not int:  # the server's fault, not the request's
            raise _unreadable(f"its timing is {shown(timing)}")
        out.timing = {**timing, "round_trip_ns": round_trip, "outside_ns": round_trip - total}
    return out


def _answer(message: dict) -> dict:
    """`message`, an answer: its id is a request's (an int) or nil."""
    rid = message.get("id")
    if rid is not None and type(rid) is not int:
        raise ValueError(f"an answer's id is an int or nil, not {type(rid).__name__}")
    return message


def _readable(fd: int) -> bool:
    """Whether socket `fd` has bytes, or its end, to read now (a poll:
    0.3 us in C, 1 us where _wire is not built)."""
    if _wire is not None:
        return _wire.readable(fd)
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))


def _unreadable(e: Exception) -> ConnectionError:
    """A server's answer that is not the protocol's: neither the request's
    fault (BadRequest) nor one to retry on this connection."""
    return ConnectionError(f"unreadable answer from the server: {e}")


def _body_size(parts: list) -> int:
    """The length of a frame's body, as its prefix (protocol.frames' first
    buffer begins with it) says."""
    return protocol.LENGTH.unpack_from(parts[0])[0]


def _too_large(size: int, max_frame: int | None) -> bool:
    """Whether a frame body of `size` bytes is over `max_frame` (None or
    0: the server did not say)."""
    return bool(max_frame) and size > max_frame


def _refuse(size: int, max_frame: int) -> TooLarge:
    return TooLarge(f"request of {size} bytes exceeds the server's maximum frame of "
                    f"{max_frame} bytes (not sent)")


def _timeout(timeout: float | None, default: float | None) -> float | None:
    """A call's timeout: its own, else its client's (None: the server's
    defaults, and no limit here); ValueError unless a positive number of
    seconds (inf: no deadline at all)."""
    if timeout is None:
        timeout = default
    if timeout is None:
        return None
    if type(timeout) is float and timeout > 0:  # the usual case: no ABC check (~0.5 us)
        return timeout
    if isinstance(timeout, bool) or not (isinstance(timeout, numbers.Real) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds (or None), "
                         f"not {timeout!r}")  # NaN is not > 0 either
    return float(timeout)  # msgpack writes no numpy scalar


def _extended(deadline: float, moved: int) -> float:
    """`deadline`, later by what has moved on the connection since (bytes)
    at ANSWER_MIN_RATE: both clients' waits."""
    return deadline + moved / ANSWER_MIN_RATE


def _wait(timeout: float | None) -> float | None:
    """How long to wait for an answer the server bounds by `timeout`: a
    grace longer, for its TIMEOUT to arrive (None: for ever)."""
    if timeout is None or timeout > FOREVER_S:
        return None
    return timeout + ANSWER_GRACE_S


def _shorter(a: float | None, b: float | None) -> float | None:
    """The shorter of two waits (None: for ever)."""
    return a if b is None else b if a is None else min(a, b)


def _not_connected(address: tuple[str, int]) -> Timeout:
    return Timeout(f"could not connect to {address[0]}:{address[1]} in time")


def _timeval(timeout: float | None) -> bytes:
    """A socket option's struct timeval for a wait of `timeout` seconds
    (None: for ever, which the kernel spells 0); at least a microsecond,
    however little is left."""
    if timeout is None:
        return _TIMEVAL.pack(0, 0)
    micros = max(1, math.ceil(timeout * 1e6))
    return _TIMEVAL.pack(*divmod(micros, 1_000_000))


def _native_frames(rids: list[int], requests: list[tuple], timeout: float | None,
                   token: str | None, timing: bool, client_token: str | None) -> list | None:
    """The infer frames of (model, inputs, version) `requests` as _wire packs
    them (_joined); None where it does not take each (protocol.py packs
    them then, or says what is wrong)."""
    if _wire is None:
        return None
    frames = []
    for rid, (model, inputs, version) in zip(rids, requests):
        frame = _wire.infer_frame(rid, model, inputs, version, timeout, token, timing,
                                  client_token)
        if frame is None:
            return None
        frames.append([frame])
    return _joined(frames)


def _joined(frames: list[list]) -> list[list]:
    """`frames` (each protocol.frames' buffers), joined in one buffer, one
    send, where each is one buffer and all are small (SEND_CHUNK). Not
    larger ones: each request's end in what is sent must be known (_ends),
    and all joined end at its end, so a first answer, read while most of a
    large buffer was still unsent, showed it all read (_receive's heard):
    a wait shorter than none, for ever (poll) or at once (the socket's
    bound)."""
    if len(frames) > 1 and all(len(parts) == 1 for parts in frames) \
            and sum(len(parts[0]) for parts in frames) <= SEND_CHUNK:
        return [[b"".join(parts[0] for parts in frames)]]
    return frames


def _model_inputs_version(request: tuple) -> tuple[str, dict, int | None]:
    if len(request) == 2:
        return (*request, None)
    if len(request) == 3:
        return request
    raise ValueError(f"each request is (model, inputs) or (model, inputs, version), "
                     f"not a tuple of {len(request)}")


_BOUNDED_OPS = frozenset(("infer", "load", "unload", "pin"))  # those a timeout bounds


def _bounded(message: dict, timeout: float | None) -> dict:
    """`message` (a copy of a caller's) with its call's `timeout` where the
    server bounds its op and it carries none, as the typed calls send it:
    a raw load waited out the server's default (load_timeout_s, 120 s)
    where its client gave up after its own, and closed the connection."""
    op = message.get("op")
    if timeout is not None and "timeout" not in message and type(op) is str \
            and op in _BOUNDED_OPS:  # (the server says what is wrong with another)
        message["timeout"] = timeout
    return message


def _model_message(op: str, model: str, version: int | None,
                   token: str | None, timeout: float | None = None) -> dict:
    message = {"op": op, "model": model}
    if version is not None:
        message["version"] = _plain(version)
    if token is not None:
        message["token"] = token
    if timeout is not None:
        message["timeout"] = timeout
    return message


class _Frames:
    """Cuts frames out of a byte stream; a large one arrives in a buffer of
    its own, where its tensors are decoded as views (protocol.LargeFrame)."""

    def __init__(self):
        self.buf = bytearray()
        self.big: protocol.LargeFrame | None = None
        # Whether every answer awaited is an infer's whose caller wants
        # Outputs (infer(), not call()): _wire reads them into arrays.
        self.arrays = False

    def feed(self, data: bytes) -> list[dict]:
        """The answers `data` completes; ConnectionError if the stream
        holds something else (then it cannot be read further)."""
        try:
            return self._feed(data)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - msgpack's, or a frame that is no map
            raise _unreadable(e) from None

    def whole(self, data: bytes) -> dict | None:
        """The infer answer that `data` is, read by _wire where it is one
        whole frame and nothing came before it; else None, and nothing
        taken (feed() reads it then, or says what is wrong)."""
        if self.arrays and not self.buf and self.big is None and len(data) > _PREFIX \
                and protocol.LENGTH.unpack_from(data)[0] == len(data) - _PREFIX:
            try:
                return _wire.answer(data, _PREFIX, len(data) - _PREFIX, Outputs)
            except Exception:  # noqa: BLE001 - feed() raises what a bad answer deserves
                return None
        return None

    def _feed(self, data: bytes) -> list[dict]:
        out = []
        if self.big is not None:
            data = self.big.fill(data)
            if not self.big.whole:
                return out
            big, self.big = self.big, None
            out.append(_answer(big.decode()))
        self.buf += data
        start, buf = 0, self.buf
        while len(buf) - start >= 4:
            n = protocol.LENGTH.unpack_from(buf, start)[0]
            if len(buf) - start - 4 < n:
                # "HTTP" read as a length is 1.3 GB that never comes (and a
                # buffer that large, made for it); so is an SSH or SMTP
                # greeting. A frame's body begins with a map: a large one
                # waits for that byte, not for the rest.
                if len(buf) - start > 4 and not _begins_a_map(buf[start + 4]):
                    if buf.startswith(b"HTTP/", start):
                        raise ConnectionError("the server answered in HTTP: give the SDK the "
                                              "server's TCP port (8081 by default), not its "
                                              "HTTP port")
                    raise ConnectionError(f"the peer is no mmengine server: it sent "
                                          f"{bytes(buf[start:start + 16])!r}, no frame")
                if n >= protocol.BIG and len(buf) - start > 4:
                    self.big = protocol.LargeFrame(n, buf[start + 4:],
                                                   protocol.MAX_ANSWER_ENTRIES)
                    start = len(buf)
                break
            answer = _wire.answer(buf, start + 4, n, Outputs) if self.arrays else None
            if answer is None:
                answer = _answer(protocol.decode(buf[start + 4:start + 4 + n],  # a copy
                                                 protocol.MAX_ANSWER_ENTRIES))
            out.append(answer)
            start += 4 + n
        del buf[:start]
        return out


def _frames(message: dict, encoded: bool) -> list:
    """protocol.frames of a request (`encoded`: an infer's, its inputs as
    encode_tensors made them); BadRequest for what msgpack cannot carry (a
    name with a lone surrogate, an int past 64 bits), not its own error."""
    try:
        return protocol.frames(message, message["inputs"] if encoded else None)
    except (UnicodeEncodeError, OverflowError) as e:
        raise BadRequest(f"the request cannot be sent: {type(e).__name__}: {e}") from None


def _begins_a_map(byte: int) -> bool:
    """Whether a msgpack value beginning with `byte` is a map (fixmap,
    map 16, map 32): every frame's body is one."""
    return byte >> 4 == 0x8 or byte in (0xDE, 0xDF)


class _Outgoing:
    """Buffers to send in order (frames as protocol.frames lays them out),
    as the kernel takes them."""

    IOV_MAX = 512  # buffers per sendmsg (Linux takes 1,024)

    def __init__(self, frames: list[list]):
        self.views = collections.deque(memoryview(part).cast("B")
                                       for parts in frames for part in parts if len(part))

    def __bool__(self) -> bool:
        return bool(self.views)

    def send(self, sock: socket.socket, limit: int = 1 << 62, flags: int = 0) -> int:
        """One sendmsg of up to `limit` bytes; blocks as the socket does.
        The bytes sent."""
        batch, size = [], 0
        for view in self.views:
            if size >= limit or len(batch) == self.IOV_MAX:
                break
            batch.append(view[:limit - size])
            size += len(batch[-1])
        sent = left = sock.sendmsg(batch, (), flags)
        while left:
            first = self.views[0]
            if left < len(first):
                self.views[0] = first[left:]
                break
            left -= len(first)
            self.views.popleft()
        return sent


# -- blocking ------------------------------------------------------------------

def _ends(frames: list[list], ids: list[int]) -> dict[int, int]:
    """Where each request (`ids`) ends in the bytes `frames` send: of
    several joined in one buffer (small, _call_many), all at its end."""
    if len(frames) != len(ids):
        return dict.fromkeys(ids, len(frames[0][0]))
    sizes = (protocol.LENGTH.size + _body_size(parts) for parts in frames)
    return dict(zip(ids, itertools.accumulate(sizes)))


class _Connection:
    """One socket of the blocking client, with its frame buffer."""

    def __init__(self, address: tuple[str, int], timeout: float | None):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Blocking, its waits bounded by the kernel (set_timeout).
        self.sock.settimeout(None)
        self.timeout: float | None = None
        self.set_timeout(timeout)
        self.frames = _Frames()
        self.moved = 0  # bytes sent and read in this exchange
        self.wait = timeout  # the exchange's wait
        self.deadline: float | None = None  # the exchange's, before what moved adds
        # Of an exchange that sends a large frame or several (exchange_one's
        # small path leaves them 0): the bytes sent, and
        # how many of them an answer shows the server has read (an answer
        # comes after its request's last byte, `ends`). The rest, the server
        # may still be reading from the kernel's buffers (megabytes on
        # loopback), and its silence while it does is no silent server's.
        self.sent = 0
        self.heard = 0
        self.ends: dict[int, int] = {}  # id: where its request ends in what is sent
        self.closes = 0  # its client's close() calls when it was made
        self.fd = self.sock.fileno()
        self.inbox = bytearray(RECV_BYTES)  # _wire.exchange's reads

    def alive(self) -> bool:
        """Whether the server has not closed it (a pooled connection: nothing
        is in flight on it, so readable means closed). Asked before every
        use, however recently it was used (a poll, <1 us against a round
        trip of hundreds): a request sent on a connection found closed
        after it was sent fails with ConnectionError, since it may have
        run, where this one never left."""
        return not _readable(self.fd)

    def _ready(self, events: int, timeout: float | None) -> int:
        """The poll events of `events` that the socket has, waiting up to
        `timeout` (None: for ever). poll, not select: no limit on the
        descriptor's number."""
        poller = select.poll()
        poller.register(self.sock, events)
        got = poller.poll(None if timeout is None else timeout * 1e3)
        return got[0][1] if got else 0

    def set_timeout(self, timeout: float | None) -> None:
        """Bounds each send and each read by `timeout` seconds (None: for
        ever), one that outlasts it raising BlockingIOError. The kernel's
        bounds on a blocking socket (SO_SNDTIMEO, SO_RCVTIMEO), not
        Python's socket timeout: that polls before every send and every
        read, a system call more each, and a round trip's wait spent in
        poll rather than in the read (4-6 us of a tiny model's call)."""
        if timeout != self.timeout:
            bound = _timeval(timeout)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
            self.timeout = timeout

    def exchange(self, frames: list[list], ids: list[int]) -> dict[int, dict]:
        """Sends `frames` (each protocol.frames' list of buffers) and returns
        the answers to `ids` by id, within the socket's timeout in all (not
        each read's: an answer that trickles in is cut off as one that does
        not come), longer while bytes move (_left); of several requests,
        within the socket's timeout of the last answer too (the server
        bounds each request: a batch that outlasts one request's wait while
        its answers keep coming is no stalled server). Several requests are
        sent as the server takes them while their answers are read: the
        server stops reading a client whose answers back up, so a client
        that sent a large batch before reading could wait for ever. (One
        request cannot back up: its answer comes after its last byte.)"""
        got: dict[int, dict] = {}
        wanted = set(ids)
        self._begin()
        self.ends = _ends(frames, ids)
        if len(ids) == 1:
            out = _Outgoing(frames)
            while out:
                self._left()
                self._sent(out.send(self.sock))
        else:
            out = _Outgoing(frames)
            while out:
                events = self._ready(select.POLLIN | select.POLLOUT, self._left())
                if not events:
                    raise socket.timeout("timed out")
                if events & ~select.POLLOUT:  # answers, or the end of the stream
                    self._receive(got, wanted)
                if events & select.POLLOUT:
                    # MSG_DONTWAIT: a blocking socket (timeout None) must not
                    # wait here while answers wait to be read.
                    try:
                        self._sent(out.send(self.sock, SEND_CHUNK, socket.MSG_DONTWAIT))
                    except BlockingIOError:
                        pass
        while len(got) < len(ids):
            self._left()
            self._receive(got, wanted)
        return got

    def exchange_one(self, frame: bytes, rid: int) -> dict:
        """exchange() of one request in one buffer (infer's, call's): the
        answer to `rid`. A small answer comes whole in one read, and is
        read with no more ado."""
        self._begin()
        if _wire is not None and len(frame) <= SEND_CHUNK:
            data = _wire.exchange(self.fd, frame, self.inbox)
        else:
            self.sock.sendall(frame)
            if len(frame) > SEND_CHUNK:  # its sends may have taken a while
                self.ends = {rid: len(frame)}
                self._sent(len(frame))
                self._left()
            else:
                self.moved += len(frame)  # what it sent buys time for the answer, as exchange()'s
            data = self.sock.recv(RECV_BYTES)
        answer = self.frames.whole(data)
        if answer is not None and answer["id"] == rid:
            return answer
        got: dict[int, dict] = {}
        wanted = {rid}
        self._receive(got, wanted, data)
        while not got:
            self._left()
            self._receive(got, wanted)
        return got[rid]

    def _begin(self) -> None:
        """An exchange's wait begins: the socket's timeout, from now."""
        self.wait = self.timeout  # each read's bound, at most (the socket's moves below it)
        self.deadline = None if self.wait is None else time.monotonic() + self.wait
        self.moved = 0
        self.sent = self.heard = 0

    def _sent(self, count: int) -> None:
        """`count` more bytes of a large exchange have gone."""
        self.moved += count
        self.sent += count

    def _left(self) -> float | None:
        """How long the socket's next operation may wait: the seconds left to
        the exchange's deadline (None: no limit), extended by what has moved
        (sent or arrived) at ANSWER_MIN_RATE, and no more than the
        exchange's wait; socket.timeout once it has passed."""
        if self.deadline is None:
            return None
        left = _extended(self.deadline, self.moved) - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        # Each read waits what is left, up to the call's wait (what moved
        # buys time for what follows, not a longer wait for a silent server)
        # and the time the bytes the server may still be reading bought; the
        # socket's timeout set only where it is 10 ms off (a system call).
        bound = min(left, self.wait + (self.sent - self.heard) / ANSWER_MIN_RATE)
        if abs(bound - self.timeout) > 0.01:
            self.set_timeout(bound)
        return bound

    def _receive(self, got: dict[int, dict], wanted: set[int], data: bytes | None = None) -> None:
        """Takes the answers of a read (`data`, where it was made already)."""
        if data is None:
            data = self.sock.recv(RECV_BYTES)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.moved += len(data)
        answers = self.frames.feed(data)
        for response in answers:
            rid = response.get("id")
            if rid is None:  # an error about the stream
                try:
                    protocol.raise_for(response)
                except (BadRequest, TooLarge) as e:  # over one frame: whose, if several?
                    if len(wanted) - len(got) > 1:
                        raise _lost_with(e)  # noqa: B904 - its cause is set
                    raise
            if rid not in wanted:  # nothing else is in flight on this connection
                raise _unreadable(f"an answer to id {rid!r}, which was not asked")
            got[rid] = response
            if self.sent:  # (a server that answers before it reads shows no more read)
                self.heard = max(self.heard, min(self.ends[rid], self.sent))
        if answers and self.deadline is not None and len(got) < len(wanted):
            # The rest of a batch waits the exchange's wait from this answer.
            self.deadline = max(self.deadline, time.monotonic() + self.wait)


class Client:
    """A blocking client with a small pool of connections; safe to share
    between threads (each call borrows a connection). `token` goes with
    every request that does not carry its own; `timeout`, with every one
    that the server bounds (infer, load, unload, pin) and does not carry its
    own: the server answers TIMEOUT then, and the client waits a grace
    longer for that answer (None: the server's defaults, and no limit).
    `pool_size`: how many idle connections it keeps (0: none, each call
    connects anew)."""

    def __init__(self, address: str | tuple[str, int] = f"127.0.0.1:{DEFAULT_PORT}",
                 timeout: float = 30.0, pool_size: int = 4, token: str | None = None):
        self.address = parse_address(address)
        self.timeout = _timeout(timeout, None)
        self.token = token
        self.pool_size = _count("pool_size", pool_size, 0, "how many idle connections to keep, "
                                "0 or more (0: none, each call connects anew)")
        # Idle connections, most recently used last; deque's append and pop
        # are atomic, so threads share it without a lock.
        self._pool: collections.deque[_Connection] = collections.deque()
        self._closes = 0  # close() calls: a connection borrowed before one is not pooled
        self._ids = itertools.count(1)  # next() on it is atomic as well
        self._max_frame: int | None = None  # the server's, once asked (CHECK_FRAMES_ABOVE)
        _CLIENTS.add(self)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Closes the pooled connections, and those of calls in flight as
        they end; a later call connects anew."""
        self._closes += 1
        while self._pool:
            try:
                self._pool.pop().sock.close()
            except IndexError:
                return

    def _forget_pool(self) -> None:
        """In a forked child: the pooled sockets are the parent's too, and
        two processes reading one socket get each other's answers. Closed
        here (the parent's stay open), the child connects anew."""
        pool, self._pool = self._pool, collections.deque()
        for conn in pool:
            conn.sock.close()

    def _borrow(self, wait: float | None) -> "_Connection":
        """A pooled connection the server has not closed meanwhile (it closes
        idle ones), else a new one, made within the call's `wait` or the
        client's, the shorter (as AsyncClient's)."""
        while True:
            try:
                conn = self._pool.pop()
            except IndexError:
                conn = _Connection(self.address, _shorter(wait, _wait(self.timeout)))
                conn.closes = self._closes
                return conn
            if conn.alive():
                return conn
            conn.sock.close()
            self._max_frame = None  # closed by a server that may have restarted otherwise

    def _give_back(self, conn: "_Connection") -> None:
        if conn.closes != self._closes:  # the client was closed while it was out
            conn.sock.close()
        elif conn.frames.buf or conn.frames.big is not None:
            # More came than the answers asked for: no call of ours sent
            # it, and the next one's answer would be read behind it.
            conn.sock.close()
        elif len(self._pool) < self.pool_size:
            self._pool.append(conn)
        else:
            conn.sock.close()

    def call_many(self, messages: Iterable[dict], timeout: float | None = None) -> list[dict]:
        """Sends every message at once on one connection (pipelined) and
        returns the responses in the same order; raises the first error."""
        # Copies: the caller's messages keep no id and no token of ours (the
        # same dict twice is two requests, not one id sent twice).
        timeout = _timeout(timeout, self.timeout)
        return self._call_many([_bounded(dict(m), timeout) for m in messages], _wait(timeout))

    def _call_many(self, messages: list[dict], wait: float | None,
                   encoded: bool = False) -> list[dict]:
        """call_many, waiting `wait` seconds for the answers (None: for
        ever); `encoded`: the messages are infers whose inputs encode_tensors
        made (large ones are sent from where they lie)."""
        ids = []
        for m in messages:  # this client's own (call_many copies its caller's)
            m["id"] = next(self._ids)
            if self.token is not None:
                m.setdefault("token", self.token)
            ids.append(m["id"])
        frames = [_frames(m, encoded) for m in messages]
        for parts in frames:
            self._check_size(_body_size(parts))
        return self._exchange(_joined(frames), ids, wait, encoded)

    def _exchange(self, frames: list[list], ids: list[int], wait: float | None,
                  arrays: bool = False) -> list[dict]:
        """Sends `frames` (each protocol.frames' buffers) on a pooled
        connection and returns the answers to `ids` in order, waiting `wait`
        seconds (None: for ever); `arrays`: they are infer()'s, read into
        Outputs where _wire can."""
        try:
            conn = self._borrow(wait)
        except socket.timeout:
            raise _not_connected(self.address) from None
        try:
            conn.set_timeout(wait)
            conn.frames.arrays = arrays and _wire is not None
            one = len(ids) == 1 and len(frames[0]) == 1
            got = conn.exchange_one(frames[0][0], ids[0]) if one else conn.exchange(frames, ids)
        except (socket.timeout, BlockingIOError) as e:  # its bound, or the kernel's (set_timeout)
            conn.sock.close()
            if isinstance(e, Timeout):  # the server's own, about the stream: its words stay
                raise
            raise Timeout("no answer from the server in time") from None
        except BaseException as e:
            conn.sock.close()
            # The stream's (nil id), alone or as several requests' cause
            # (_lost_with): its maximum, asked again.
            if isinstance(e, TooLarge) or isinstance(e.__cause__, TooLarge):
                self._max_frame = None
            raise
        self._give_back(conn)
        if one:
            return [protocol.raise_for(got)]
        return [protocol.raise_for(got[i]) for i in ids]

    def call(self, message: dict, timeout: float | None = None) -> dict:
        return self.call_many([message], timeout)[0]

    def _check_size(self, size: int) -> None:
        if size <= CHECK_FRAMES_ABOVE:
            return
        if self._max_frame is None or _too_large(size, self._max_frame):
            # Asked again before refusing: a restarted server may take more.
            self._max_frame = self.health().get("max_frame", 0)
        if _too_large(size, self._max_frame):
            raise _refuse(size, self._max_frame)

    def infer(self, model: str, inputs: dict, version: int | None = None,
              timeout: float | None = None, token: str | None = None,
              timing: bool = False) -> Outputs:
        t_start = time.monotonic_ns() if timing else 0
        timeout = _timeout(timeout, self.timeout)
        rid = next(self._ids)
        frame = None if _wire is None else _wire.infer_frame(
            rid, model, inputs, version, timeout, token, timing, self.token)
        if frame is not None:
            r = self._exchange([[frame]], [rid], _wait(timeout), arrays=True)[0]
        else:
            r = self._call_many([_infer_message(model, inputs, version, timeout, token,
                                                timing)], _wait(timeout), encoded=True)[0]
        return _outputs(r, t_start)

    def infer_many(self, requests: Iterable[tuple], timeout: float | None = None,
                   token: str | None = None) -> list[Outputs]:
        """Pipelined inference: [(model, inputs), or (model, inputs,
        version), ...] -> [outputs, ...]; `token` goes with each."""
        timeout = _timeout(timeout, self.timeout)
        requests = [_model_inputs_version(r) for r in requests]
        rids = [next(self._ids) for _ in requests]
        frames = _native_frames(rids, requests, timeout, token, False, self.token) \
            if requests else None
        if frames is not None:
            rs = self._exchange(frames, rids, _wait(timeout), arrays=True)
        else:
            rs = self._call_many([_infer_message(*r, timeout, token) for r in requests],
                                 _wait(timeout), encoded=True)
        return [_outputs(r) for r in rs]

    # load, unload and pin, as infer, send the server how long this client
    # waits (`timeout`, else the client's): the server answers TIMEOUT then,
    # where its own default (load_timeout_s) could outlast the client's wait.
    # A load the caller stopped waiting for goes on to its own deadline.

    def load(self, model: str, version: int | None = None, token: str | None = None,
             timeout: float | None = None) -> dict:
        return _field(self._model_op("load", model, version, token, timeout), "model", dict)

    def unload(self, model: str, version: int | None = None,
               token: str | None = None, timeout: float | None = None) -> None:
        self._model_op("unload", model, version, token, timeout)

    def pin(self, model: str, version: int | None = None, token: str | None = None,
            timeout: float | None = None) -> dict:
        return _field(self._model_op("pin", model, version, token, timeout), "model", dict)

    def _model_op(self, op: str, model: str, version: int | None, token: str | None,
                  timeout: float | None) -> dict:
        timeout = _timeout(timeout, self.timeout)
        return self._call_many([_model_message(op, model, version, token, timeout)],
                               _wait(timeout))[0]

    def unpin(self, model: str, version: int | None = None,
              token: str | None = None) -> None:
        self.call(_model_message("unpin", model, version, token))

    def list(self, after: str | None = None, limit: int | None = None) -> Models:
        """The repository's model versions, with their states; a page of them
        with `after` (the name the page starts after) or `limit` (models,
        each with all its versions): walk on with `after=rows.next` until it
        is None."""
        return _models(self.call(_page_message("list", after, limit)))

    def stats(self, after: str | None = None, limit: int | None = None) -> dict:
        """The server's counts: totals, workers, tiers and a row per model
        version counted, paged as list() pages (then with "next"); `limit=0`:
        no rows."""
        return _field(self.call(_page_message("stats", after, limit)), "stats", dict)

    def health(self) -> dict:
        return self.call({"op": "health"})


_CLIENTS: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _after_fork() -> None:
    for client in list(_CLIENTS):
        client._forget_pool()


os.register_at_fork(after_in_child=_after_fork)


# -- asyncio -------------------------------------------------------------------

class _AsyncConnection(asyncio.Protocol):
    def __init__(self):
        self.transport = None
        self.fd = -1
        self.frames = _Frames()
        self.pending: dict[int, asyncio.Future] = {}
        # Ids of calls that stopped waiting (timed out, cancelled) whose
        # answers may still come: bytes to read, not the connection's end.
        self.dropped: set[int] = set()
        self.lost: Exception | None = None
        self.received = 0  # bytes, in all: whether a call's connection went silent
        self.written = 0  # bytes of requests sent, in all (sent(): those the kernel took)
        self.raw = 0  # calls in flight that want the protocol's maps (not infer()'s)
        self.unsent: list | None = None  # this turn's requests, written at its end (send)
        self.unsent_bytes = 0
        # The calls' waits for their answers (watch), by id, and one timer
        # for the soonest: a timer per call (uvloop's: a libuv handle made
        # and closed each) took 10% of a client's time at 64 in flight.
        self.waits: dict[int, list] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.fd = transport.get_extra_info("socket").fileno()

    def closed_idle(self) -> bool:
        """Whether the server closed it while nothing was in flight on it,
        which the loop may not have read yet (a caller held the loop):
        readable with nothing in flight is its end, as Client.alive() reads
        it, unless a call that stopped waiting may still be answered: then
        what is there is read (_read_late). Found so, it is lost (no
        request's error): a call opens another."""
        if self.pending or self.lost is not None:
            return False
        if not self.transport.is_closing():
            if not _readable(self.fd):
                return False
            # (What was read may have been an error about the connection.)
            if self.dropped and not self._read_late() and self.lost is None:
                return False
        self._fail(ConnectionError("the server closed the connection while it was idle"))
        self.transport.abort()
        return True

    def _read_late(self) -> bool:
        """Reads what has come on the socket, here and now, as the loop
        would (the late answers of calls that stopped waiting, dropped),
        up to the connection's end; whether it ended. A look at the first
        bytes alone would not see an end behind them."""
        sock = socket.socket(fileno=self.fd)
        # Never waits: made with socket.setdefaulttimeout()'s timeout, a
        # recv that found nothing polled that long, the loop stood still,
        # and its TimeoutError ended the connection as a reset.
        sock.setblocking(False)
        try:
            for _ in range(_LATE_READS):
                try:
                    data = sock.recv(RECV_BYTES, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return False
                except OSError:  # reset
                    return True
                if not data:
                    return True
                self.data_received(data)
            return False  # more yet: the loop reads on
        finally:
            sock.detach()  # the descriptor stays the transport's

    def send(self, parts: list, n: int) -> None:
        """Writes a request framed in `parts` (`n` bytes). One sent while
        others are in flight joins the requests of this turn of the loop in
        one write at its end: many tasks answered together send their next
        requests together, and a write to a socket costs more than a small
        request (30% of a client's time at 64 in flight, one each)."""
        if self.unsent is not None:
            self.unsent += parts
            self.unsent_bytes += n
        elif len(self.pending) > 1:
            self.unsent = list(parts)
            self.unsent_bytes = n
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            self.transport.writelines(parts)
        self.written += n

    def _flush(self) -> None:
        unsent, self.unsent, self.unsent_bytes = self.unsent, None, 0
        if not self.transport.is_closing():
            self.transport.writelines(unsent)

    def watch(self, rid: int, fut: asyncio.Future, deadline: float, wait: float,
              end: int) -> None:
        """Call `rid` waits for its answer (`fut`) until `deadline`, the
        loop's time (_expire says how bytes that move put it off); `end`:
        its request's last byte, once written. Said before its request is
        written: the bytes counted from here on are those that moved since."""
        self.waits[rid] = [deadline, fut, self.received, self.sent(), end, deadline, wait]
        if deadline < self.timer_at:
            self._arm(deadline)

    def _arm(self, at: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = at
        self.timer = asyncio.get_running_loop().call_at(at, self._due)

    def _due(self) -> None:
        """The soonest wait has come: each call whose time has come is put
        off or times out (_expire); the timer is armed for the next."""
        self.timer, self.timer_at = None, math.inf
        now = asyncio.get_running_loop().time() + _CLOCK_S
        for rid, w in list(self.waits.items()):
            if w[0] <= now:
                _expire(self, rid, w, now)
        if self.waits:
            self._arm(min(w[0] for w in self.waits.values()))

    def sent(self) -> int:
        """Bytes the transport has handed to the kernel, in all: those still
        in its buffer, or not yet written to it, have not moved (a server
        that stopped reading lets them pile up there)."""
        return self.written - self.transport.get_write_buffer_size() - self.unsent_bytes

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.frames.arrays = not self.raw and _wire is not None
        try:
            responses = self.frames.feed(data)
        except ConnectionError as e:  # fail the waiters, not the loop
            self._fail(e)
            self.transport.close()
            return
        for response in responses:
            rid = response.get("id")
            fut = self.pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(response)
            elif rid is None:  # an error about the whole stream
                try:
                    protocol.raise_for(response)
                except (BadRequest, TooLarge) as e:  # over one frame: whose?
                    self._fail(e if len(self.pending) <= 1 else _lost_with(e))
                except Exception as e:  # noqa: BLE001 - the connection's (OVERLOADED): all's
                    self._fail(e)
            elif fut is None:  # a late answer, dropped
                self.dropped.discard(rid)

    def connection_lost(self, exc) -> None:
        self._fail(ConnectionError("the connection to the server was closed" if exc is None
                                   else f"connection to the server lost: {exc}"))

    def close(self) -> None:
        """Closes the transport; one whose loop has ended (asyncio.run()'s
        end) cannot close, and its socket is shut down instead, so that the
        server lets the connection go (the descriptor goes with the
        transport)."""
        try:
            self.transport.close()
        except RuntimeError:  # "Event loop is closed"
            with contextlib.suppress(AttributeError, OSError):
                self.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)

    def abort(self, error: Exception) -> None:
        """Ends the connection at once (unsent bytes dropped): each call in
        flight on it fails with `error`."""
        self._fail(error)
        self.transport.abort()

    def _fail(self, error: Exception) -> None:
        # The first word stays: a server that refuses a connection says why
        # (OVERLOADED), then closes it, and the close is no news.
        self.lost = self.lost or error
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)


def _lost_with(e: Exception) -> ConnectionError:
    """What each of several requests in flight gets when the server ends
    their connection over one frame: which one it was, no answer says, and
    the others' answers are lost (a request that may have run is no
    TooLarge or BadRequest to retry differently)."""
    lost = ConnectionError(f"the server closed the connection over a frame sent on it: {e}")
    lost.__cause__ = e
    return lost


def _expire(conn: _AsyncConnection, rid: int, w: list, now: float) -> None:
    """Call `rid`'s wait on `conn` has come (`w`, as watch() keeps it: its
    due time, future, the connection's counts of bytes received and sent
    then, its request's last byte, its deadline and its wait). Bytes that
    moved on the connection since the call was sent, either way (of those
    sent, only up to its own request's last byte: the requests of calls
    made after it are not its), put it off as Client's (_extended): a large
    answer, or a large request, the call's own or one ahead of it, moves to
    its end, and it is due again then (answers received whole buy one wait
    at most: only the one coming in puts it off for as long as it comes). Else Timeout; and if nothing at all
    came on the connection since the call was sent, and no call sent before
    it still waits, the connection went silent (a peer that vanished, a
    dead upstream behind a proxy, no FIN or RST): it is closed, so that the
    next call connects anew, and the calls in flight on it get
    ConnectionError (they may have run). (A call behind one that still
    waits may rightly hear nothing: an unpin queued behind a long pin of
    its model.) The blocking Client closes a connection on any timeout."""
    _, fut, received, sent, end, deadline, wait = w
    if fut.done():
        del conn.waits[rid]
        return
    came = conn.received - received
    # What came of the answer coming in now (the call's own, maybe) puts it
    # off; what came whole answered other calls (later ones, as the server
    # may), and buys one wait at most: a stream of them put off for ever a
    # call the server never answered.
    big = conn.frames.big
    coming = min(came, len(conn.frames.buf) + (0 if big is None else len(big.buf)))
    came = coming + min(came - coming, int(wait * ANSWER_MIN_RATE))
    later = _extended(deadline, came + min(conn.sent(), end) - sent)
    if later > now:
        w[0] = later
        return
    del conn.waits[rid]
    oldest = next((f for f in conn.pending.values() if not f.done()), None)
    fut.set_exception(Timeout("no answer from the server in time"))
    if conn.received == received and conn.lost is None and oldest is fut:
        conn.abort(ConnectionError(f"nothing came from the server for {wait:g} s: the "
                                   f"connection was closed (a request in flight on it "
                                   f"may have run)"))


class AsyncClient:
    """An asyncio client over `connections` connections, used round-robin;
    any number of requests may be in flight on each. `token` goes with every
    request that does not carry its own."""

    def __init__(self, address: str | tuple[str, int] = f"127.0.0.1:{DEFAULT_PORT}",
                 timeout: float = 30.0, connections: int = 1, token: str | None = None):
        self.address = parse_address(address)
        self.timeout = _timeout(timeout, None)
        self.token = token
        self.size = _count("connections", connections, 1, "how many connections to use, 1 or more")
        self._conns: list[_AsyncConnection | None] = [None] * self.size
        self._opening: dict[int, asyncio.Future] = {}  # slot -> its connection being opened
        self._loop: asyncio.AbstractEventLoop | None = None  # the connections'
        self._ids = itertools.count(1)
        self._next = itertools.count()
        self._max_frame: int | None = None  # as Client's

    async def connect(self) -> "AsyncClient":
        """Opens every connection; on an error, the first one's, the client
        is closed (`async with` closes no client whose connect failed)."""
        self._check_loop()
        conns = self._conns
        # Every connect ends before the error is raised: the others, left
        # going, were cancelled at the loop's end inside uvloop's
        # create_connection, which logged their errors as never retrieved.
        opened = await asyncio.gather(*(self._slot(i, conns) for i in range(self.size)),
                                      return_exceptions=True)
        failed = next((e for e in opened if isinstance(e, BaseException)), None)
        if failed is not None:
            await self.close()
            raise failed
        return self

    def _check_loop(self) -> None:
        """Connections belong to the loop that opened them. Once that loop
        is closed (asyncio.run's end), the next one opens its own; while it
        runs, another loop may not use them."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("this AsyncClient is in use on another event loop: "
                               "make one client per loop")
        self._loop = loop
        for conn in self._conns:  # gone with their loop
            if conn is not None:
                conn.close()
        self._conns = [None] * self.size
        self._opening = {}

    async def _slot(self, i: int, conns: list) -> _AsyncConnection:
        """Connection `i` of `conns` (the client's connections when the
        caller began), opened (again, if it was lost) once, however many
        calls find it so at once; ConnectionError if the client was closed
        since."""
        conn = conns[i]
        if conn is not None and conn.lost is None:
            return conn
        if self._conns is not conns:
            raise ConnectionError("the client was closed")
        opening = self._opening.get(i)
        if opening is None:
            opening = self._opening[i] = asyncio.ensure_future(self._reopen(i, conns))
            opening.add_done_callback(retrieved)  # if all its callers have gone
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            if opening.cancelled() and not asyncio.current_task().cancelling():
                raise ConnectionError("the client was closed") from None  # close() ended it
            raise

    async def _reopen(self, i: int, conns: list) -> _AsyncConnection:
        me, openings = asyncio.current_task(), self._opening
        try:
            # Within the client's timeout, as Client connects: an address
            # that drops packets would hold every caller for minutes.
            _, conn = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                _AsyncConnection, *self.address), _wait(self.timeout))
            if self._conns is not conns:  # closed (or moved to another loop) meanwhile
                conn.transport.close()
                raise ConnectionError("the client was closed while it connected")
            conns[i] = conn
            self._max_frame = None  # a server that restarted may take less, or more
            return conn
        except TimeoutError:
            raise _not_connected(self.address) from None
        except OSError as e:
            # A name of several addresses (localhost's ::1 and 127.0.0.1),
            # each refused: asyncio raises a plain OSError of them all, where
            # Client raises the last one's ConnectionRefusedError.
            if type(e) is OSError and e.errno is None:
                raise ConnectionError(str(e)) from e
            raise
        finally:
            if openings.get(i) is me:  # not a newer one, after a close()
                del openings[i]

    async def close(self) -> None:
        conns, self._conns = self._conns, [None] * self.size
        openings, self._opening = self._opening, {}
        for opening in openings.values():  # one a timed-out call left going on
            with contextlib.suppress(RuntimeError):  # its loop closed: it is gone with it
                opening.cancel()
        for conn in conns:
            if conn is not None:
                conn.close()

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def call(self, message: dict, timeout: float | None = None) -> dict:
        # A copy, as call_many's: the caller's message keeps no id or token.
        timeout = _timeout(timeout, self.timeout)
        return await self._call(_bounded(dict(message), timeout), _wait(timeout))

    async def _call(self, message: dict, wait: float | None,
                    encoded: bool = False) -> dict:
        """call, waiting `wait` seconds for the answer (None: for ever);
        `encoded` as Client._call_many's."""
        rid = next(self._ids)
        message["id"] = rid  # this client's own (call copies its caller's)
        if self.token is not None:
            message.setdefault("token", self.token)
        parts = _frames(message, encoded)
        if len(parts) > 1:
            # The caller's arrays may change once this yields (the size
            # check, a write the socket does not take whole): sent as they
            # are now, copied once (the blocking Client sends before it
            # returns).
            parts = [bytes(part) for part in parts]
        size = _body_size(parts)
        if size > CHECK_FRAMES_ABOVE:
            await self._check_size(size)
        return await self._exchange(rid, parts, size, wait, encoded)

    async def _exchange(self, rid: int, parts: list, size: int, wait: float | None,
                        arrays: bool) -> dict:
        """Sends request `rid`, framed in `parts` (a body of `size` bytes),
        and returns its answer, waiting `wait` seconds (None: for ever);
        `arrays`: it is infer()'s, read into Outputs where _wire can (only
        while no other kind of call waits on its connection)."""
        self._check_loop()
        slot = next(self._next) % self.size
        conn = self._conns[slot]
        # Not yet open, or the server dropped it (the loop has read so, or not yet).
        if conn is None or conn.lost is not None or conn.closed_idle():
            try:  # within this call's wait: the opening, shared, goes on for the others
                conn = await asyncio.wait_for(self._slot(slot, self._conns), wait)
            except TimeoutError:
                raise _not_connected(self.address) from None
            if conn.lost is not None:  # lost again before this call could use it
                raise conn.lost
        loop = self._loop
        fut = loop.create_future()
        if wait is not None:  # its request's last byte, once written: written + its size
            conn.watch(rid, fut, loop.time() + wait, wait, conn.written + _PREFIX + size)
        conn.pending[rid] = fut
        conn.send(parts, _PREFIX + size)
        if not arrays:
            conn.raw += 1
        try:
            response = await fut
        except (Timeout, asyncio.CancelledError):  # its answer, if one comes, is dropped
            if conn.pending.pop(rid, None) is not None and conn.lost is None:
                conn.dropped.add(rid)
            raise
        finally:
            conn.waits.pop(rid, None)
            if not arrays:
                conn.raw -= 1
        return protocol.raise_for(response)

    async def _check_size(self, size: int) -> None:
        if self._max_frame is None or _too_large(size, self._max_frame):
            self._max_frame = (await self.health()).get("max_frame", 0)
        if _too_large(size, self._max_frame):
            raise _refuse(size, self._max_frame)

    async def infer(self, model: str, inputs: dict, version: int | None = None,
                    timeout: float | None = None, token: str | None = None,
                    timing: bool = False) -> Outputs:
        t_start = time.monotonic_ns() if timing else 0
        timeout = _timeout(timeout, self.timeout)
        rid = next(self._ids)
        frame = None if _wire is None else _wire.infer_frame(
            rid, model, inputs, version, timeout, token, timing, self.token)
        if frame is not None:
            r = await self._exchange(rid, [frame], len(frame) - _PREFIX, _wait(timeout), True)
        else:
            r = await self._call(_infer_message(model, inputs, version, timeout, token,
                                                timing), _wait(timeout), encoded=True)
        return _outputs(r, t_start)

    async def load(self, model: str, version: int | None = None,
                   token: str | None = None, timeout: float | None = None) -> dict:
        return _field(await self._model_op("load", model, version, token, timeout), "model",
                      dict)

    async def unload(self, model: str, version: int | None = None,
                     token: str | None = None, timeout: float | None = None) -> None:
        await self._model_op("unload", model, version, token, timeout)

    async def pin(self, model: str, version: int | None = None,
                  token: str | None = None, timeout: float | None = None) -> dict:
        return _field(await self._model_op("pin", model, version, token, timeout), "model",
                      dict)

    async def _model_op(self, op: str, model: str, version: int | None, token: str | None,
                        timeout: float | None) -> dict:
        timeout = _timeout(timeout, self.timeout)  # as Client's
        return await self._call(_model_message(op, model, version, token, timeout),
                                _wait(timeout))

    async def unpin(self, model: str, version: int | None = None,
                    token: str | None = None) -> None:
        await self.call(_model_message("unpin", model, version, token))

    async def list(self, after: str | None = None, limit: int | None = None) -> Models:
        """Client.list()."""
        return _models(await self.call(_page_message("list", after, limit)))

    async def stats(self, after: str | None = None, limit: int | None = None) -> dict:
        """Client.stats()."""
        return _field(await self.call(_page_message("stats", after, limit)), "stats", dict)

    async def health(self) -> dict:
        return await self.call({"op": "health"})
