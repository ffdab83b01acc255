"""The HTTP server: httptools on the engine's loop, no framework.

Routes come from the protocol modules (kserve.py, sagemaker.py, metrics.py)
as (method, pattern, handler) with `{name}` placeholders; a handler is
`async def handler(server, request, **params) -> Response`, run as a task,
or, on the hot paths, a plain function that returns a Response or a `Later`
(the engine's future and how its result becomes the Response): such a
request is answered from the future's callback, with no task and no loop
turn between the bytes coming in and the worker getting the request.
Requests on a connection are answered in order (HTTP/1.1 keep-alive; a
pipelining client gets its answers in the order it asked). Limits are
applied before anything is buffered: the header block (431), the declared
body length (413), a large body past the servers' receive budget waits
unread (listener.py), a connection with MAX_PIPELINED requests unanswered
(or MAX_QUEUED_BYTES of their bodies, each too short to hold the budget) is
not read, one whose client does not read its answers (they back up past
the connection's write allowance) is neither read nor answered further
until they drain, and an idle connection is closed. Past `max_connections`
open connections a new one is answered 503 (Retry-After) before anything is
read, and what its client sends is dropped until it closes. Any
typed error becomes JSON `{"error": message, "code": NAME}` with its HTTP
status; a 401 also carries `WWW-Authenticate: Bearer` (RFC 6750), since
tokens travel as `Authorization: Bearer <token>`.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import email.utils
import functools
import inspect
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, unquote

import httptools
import numpy as np
import orjson

from mmengine import errors, trace
from mmengine.engine import Engine
from mmengine.errors import (BadRequest, ErrorCode, InternalError, MMEngineError,
                             ModelNotFound, Overloaded, TooLarge)
from mmengine.server import codings, listener
from mmengine.server.listener import RESERVE_ABOVE, BudgetedReading, Listener

MAX_HEADER_BYTES = 64 << 10
OWS = " \t"  # HTTP's white space about a header's parts (RFC 9110)
# Requests read ahead of their answers on one connection; past it the
# connection is not read until half of them are answered.
MAX_PIPELINED = 64
#: Nor one whose queued requests' bodies, each too short to hold the receive
#: budget (listener.RESERVE_ABOVE), add up to this: 64 of 1 MiB less a byte,
#: behind one slow answer, were held by no budget (~64 GiB at the default
#: max_connections).
MAX_QUEUED_BYTES = RESERVE_ABOVE
#: Body pieces smaller than this (a chunked body's chunks) are gathered into
#: one buffer as they come, not kept a bytes object each.
COALESCE_BELOW = 64 << 10
IDLE_TIMEOUT_S = 60.0
_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            406: "Not Acceptable", 409: "Conflict",
            408: "Request Timeout", 413: "Payload Too Large", 415: "Unsupported Media Type",
            431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout",
            505: "HTTP Version Not Supported", 507: "Insufficient Storage"}


@dataclass
class Request:
    method: str
    path: str                        # as sent: percent-encoded (Router.match decodes)
    query_string: bytes              # as sent (`query` decodes it)
    headers: dict[str, str]          # lower-case names
    body: bytes
    keep_alive: bool = True
    reserved: int = 0                # bytes of the receive budget its body holds
    refused: MMEngineError | None = None  # answered with this, in its turn
    coded: tuple[str, ...] = ()      # its body's content codings, to undo before it is read
    t_received: int = 0              # monotonic_ns when it was whole, if it asks for timing
    # How a handler's protocol answers this request's errors, where it has
    # statuses of its own for the engine's (SageMaker's 507); else error_response.
    answer_error: Callable[[MMEngineError], Response] | None = None

    @property
    def query(self) -> dict[str, list[str]]:
        """The query's values by name (_query), read where a route asks:
        one that reads none is not refused for escapes it never reads."""
        return _query(self.query_string) if self.query_string else {}

    @property
    def token(self) -> str | None:
        """The bearer token of the Authorization header; None without one
        (or with another scheme, which the engine then treats as none)."""
        # Only HTTP's white space is stripped: the value is read as latin-1,
        # where str.strip() also takes the bytes 0x85 and 0xa0, the last byte
        # of many a UTF-8 character ("à" is c3 a0).
        scheme, _, token = self.headers.get("authorization", "").strip(OWS).partition(" ")
        if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 9110)
            return None
        return utf8_header(token.strip(OWS)) or None

    def json(self) -> Any:
        return loads(self.body or b"null", "the body")


def utf8_header(value: str) -> str:
    """A header's text as its sender wrote it: its bytes are read as latin-1,
    and a name or a token (as TCP carries it) is UTF-8; one that is not
    stays as it was read."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


@dataclass
class Response:
    status: int = 200
    body: bytes | memoryview | list = b""  # a list: buffers written in order, not joined
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"


# JSON through orjson: a tensor's data parses ten times faster than with the
# json module and numpy arrays are written without a Python float each,
# which is most of a small request's time. It is strict: NaN, Infinity and
# nesting deeper than 1024 are not JSON, and are refused as such.

#: The arrays and objects one JSON body may hold. Each empty one, two bytes
#: of text, is ~60 bytes of memory once parsed and orjson holds the GIL
#: for the whole parse, on a parse thread too: a security review's 32 MiB
#: of `[],` took 1.2 GB and held every connection for 8 s. Nested tensor
#: data takes one array per row; a tensor of more rows travels flat.
MAX_JSON_CONTAINERS = 1 << 16


def loads(data: bytes | memoryview, what: str) -> Any:
    if len(data) > MAX_JSON_CONTAINERS:  # a shorter text cannot hold more
        text = data if isinstance(data, bytes) else bytes(data)  # count() at C speed
        if text.count(b"[") + text.count(b"{") > MAX_JSON_CONTAINERS:
            raise BadRequest(f"{what} holds more than {MAX_JSON_CONTAINERS} JSON arrays "
                             f"and objects: send a tensor of many rows flat (row-major "
                             f"order) or as binary data")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from None


def dumps(obj: Any, finite: bool = True) -> bytes:
    """JSON of obj, numpy arrays and scalars included. `finite=False`: obj
    may hold NaN or infinities, which orjson writes as null; they are
    written as NaN, Infinity and -Infinity instead, as the json module
    does and most JSON readers read (a model's -inf stays -inf)."""
    if finite:
        try:
            return orjson.dumps(obj, default=_plain, option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError:
            pass  # a lone surrogate (a file name), an integer past 64 bits: json writes them
    return json.dumps(obj, default=_plain, separators=(",", ":")).encode()


def finite(arrays) -> bool:
    """Whether every float in `arrays` is finite (dumps' fast path)."""
    return all(a.dtype.kind not in "fc" or np.isfinite(a).all() for a in arrays)


def _plain(obj: Any) -> Any:
    # What orjson does not write itself: arrays of other dtypes or layouts.
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON")


def array_from_json(what: str, value: Any, dtype: np.dtype | None) -> np.ndarray:
    """A tensor's JSON data (a nested list, or one number) as an array of
    `dtype` (None: numpy's own choice), by json_array and cast_json_array."""
    array = json_array(what, value)
    if array.dtype.kind == "f" and (dtype is None or dtype.kind in "iu") and array.size \
            and np.abs(array).max() >= 2.0 ** 63:
        # Integers past int64's range beside smaller ones: numpy reads floats
        # (for a uint64, values; for an int64, one out of its range; with no
        # dtype, the uint64 they are if they are one).
        exact = np.array(value, dtype=object)
        if all(type(v) is int for v in exact.flat):
            try:
                return exact.astype(dtype or _UINT64)
            except OverflowError:
                raise BadRequest(f"{what}: a value is out of range for "
                                 f"{dtype.name if dtype else '64 bits'}") from None
        if dtype is not None and np.array_equal(array, np.trunc(array)):
            # Whole, and past 64 bits: orjson reads such an integer as a
            # float, and "must be int64, not float64" misled its sender.
            raise BadRequest(f"{what}: a value is out of range for {dtype.name}")
    return cast_json_array(what, array, dtype)


_UINT64 = np.dtype(np.uint64)


def json_array(what: str, value: Any) -> np.ndarray:
    """A tensor's JSON data as numpy reads it: numbers or booleans, rectangular."""
    if type(value) not in (list, int, float, bool):
        raise BadRequest(f"{what} must be a nested list of numbers")
    try:
        array = np.array(value)
    except ValueError as e:  # ragged
        raise BadRequest(f"{what} is not a rectangular nested list: {e}") from None
    if array.dtype.kind not in "biuf":
        if array.dtype.kind == "O" and all(type(v) is int for v in array.flat):
            raise BadRequest(f"{what}: an integer is out of range for 64 bits")
        raise BadRequest(f"{what} must hold only numbers (or booleans)")
    if array.dtype.kind != "b" and _has_bool(value, array.ndim):  # numpy made them numbers
        raise BadRequest(f"{what} mixes booleans with numbers: a tensor holds one or the "
                         f"other")
    return array


def _has_bool(value: Any, depth: int) -> bool:
    """Whether a rectangular nested list of `depth` holds a bool (in C's
    loops: ~30 ns an element)."""
    if not depth:
        return type(value) is bool
    for _ in range(depth - 1):
        value = list(itertools.chain.from_iterable(value))
    return bool in set(map(type, value))


def cast_json_array(what: str, array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """json_array's result as `dtype`; refused where JSON's numbers would
    change meaning on the way (2.5 as an integer, 300 as an int8, 1e300 as
    a float32, 1 as a bool, all-boolean data as numbers; json_array refused
    booleans mixed with numbers)."""
    if dtype is None or array.dtype == dtype:
        return array
    if array.size:
        kinds = array.dtype.kind + dtype.kind
        if kinds in ("ii", "iu", "ui", "uu"):  # numpy's casting rules know no values
            info = np.iinfo(dtype)
            if array.min() < info.min or array.max() > info.max:
                raise BadRequest(f"{what}: a value is out of range for {dtype.name}")
        elif not np.can_cast(array.dtype, dtype, "same_kind") or kinds[0] == "b" != kinds[1]:
            raise BadRequest(f"{what} must be {dtype.name}, not {array.dtype.name} values")
        elif dtype.kind == "f" and dtype.itemsize < array.dtype.itemsize \
                and max(-float(array.min()), float(array.max())) > float(np.finfo(dtype).max):
            # JSON has no infinities. In Python's floats: numpy's abs or minus
            # of int64's least is itself, below zero.
            raise BadRequest(f"{what}: a value is out of range for {dtype.name}")
    return array.astype(dtype)


def json_response(obj: Any, status: int = 200, headers=None) -> Response:
    return Response(status, dumps(obj), headers or [])


def error_response(e: MMEngineError) -> Response:
    # An overloaded server says when to come back (RFC 9110 Retry-After); a
    # 401 says how to authenticate (RFC 9110 requires WWW-Authenticate on it);
    # a status of HTTP's own may need a header of its own (StatusError.headers:
    # 405's Allow).
    retry_after = getattr(e, "retry_after_s", None)  # Overloaded has one
    headers = list(getattr(e, "headers", ()))
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    elif e.code == ErrorCode.UNAUTHORIZED:
        headers.append(("WWW-Authenticate", "Bearer"))
    return json_response({"error": errors.told(e), "code": e.code.name}, e.http_status, headers)


class Later:
    """A handler's answer still to come: `future`'s result, through
    `finish`. The connection waits for it with `wait(answer)`; `done` is
    the future's one callback, run where the future is done (Engine.submit's
    `then`: in the turn its answer is read) or as a done callback."""

    __slots__ = ("future", "finish", "inference", "_answer")

    def __init__(self, finish: Callable[[Any], Response], inference: bool = False):
        self.future: asyncio.Future | None = None
        self.finish = finish
        # An inference: a client that goes away cancels it (a load or an
        # unload it asked for completes).
        self.inference = inference
        self._answer: Callable[[asyncio.Future], None] | None = None

    @classmethod
    def of(cls, future: asyncio.Future) -> "Later":
        """The answer a task will return."""
        later = cls(_same)
        later.future = future
        future.add_done_callback(later.done)
        return later

    def done(self, future: asyncio.Future) -> None:
        answer, self._answer = self._answer, None  # once, whoever calls first
        if answer is not None:
            answer(future)

    def wait(self, answer: Callable[[asyncio.Future], None]) -> None:
        self._answer = answer
        if self.future.done():  # done before anyone waited: done() found nobody
            self.done(self.future)


def _same(response: Response) -> Response:
    return response


def submitted(request: Request,
              submit: Callable[[Callable[[asyncio.Future], None]], asyncio.Future],
              respond: Callable[[dict, int | None], Response]) -> Later:
    """An inference, sent: `submit(then)` is the engine's submit, `respond`
    makes the response of its outputs and the version that served it. With
    the trace header the response carries the request's stages as
    Server-Timing."""
    t_submit = time.monotonic_ns() if request.headers.get(trace.HTTP_HEADER) == "1" else 0

    def finish(result: tuple[dict, dict]) -> Response | Later:
        body, outputs = result
        response = respond(outputs, body.get("version"))
        if t_submit:
            # Before the stages: the request's body read into tensors (a
            # JSON body's parse, most of all), which no stage counts.
            decode = {"decode_ns": t_submit - request.t_received} if request.t_received else {}

            def timed(made: Response) -> Response:  # once made: its encoding is a stage
                made.headers.append(("Server-Timing", trace.server_timing(
                    {**decode, **trace.body_timing(t_submit, body)})))
                return made
            if isinstance(response, Later):  # being formatted (`formatted`) on a thread
                response.finish = timed
            else:
                timed(response)
        return response
    later = Later(finish, inference=True)
    later.future = submit(later.done)
    return later


def vetted(engine: Engine, check: Callable[[dict], None],
           then: Callable[[asyncio.Future], None]) -> Callable[[asyncio.Future], None]:
    """`then` for Engine.submit, first asking `check(outputs)` of an
    answer whether the protocol can send it: one it cannot (it raises) is
    counted as its client will see it (Engine.refused), not as OK."""
    def vet(fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            try:
                check(fut.result()[1])
            except MMEngineError as e:
                engine.refused(fut, e)
        then(fut)
    return vet


#: A request body at least this long is parsed on a thread: JSON or CSV
#: tensor data parses at 50-120 MB/s, and on the loop a 64 MiB body would
#: stall every other connection for up to a second. On a thread the loop
#: gets the GIL back between the parser's calls (orjson and numpy hold it
#: for each whole call: benchmarks/beside.py).
PARSE_ON_THREAD = 1 << 20
#: A compressed body at least this long is inflated on a parse thread at
#: once (it inflates to at least as much, at 0.3-1 GB/s); a shorter one is
#: inflated on the loop unless it inflates past PARSE_ON_THREAD.
INFLATE_ON_THREAD = 256 << 10
#: An answer of at least this many JSON numbers is formatted on a parse
#: thread: orjson writes one in ~70 ns here (an output of 2M float32s,
#: 145 ms, all other connections waiting on the loop meanwhile).
FORMAT_ON_THREAD = 1 << 16
#: The threads that parse bodies and format long answers: two at a time,
#: whatever the cores (a parse may take ten times its body's bytes while it
#: runs), and not the loop's default executor, which reads the repository.
_PARSERS = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="mmengine-parse")


def parsed(nbytes: int, parse: Callable[[], Any], send: Callable[[Any], Later],
           finish_on_thread: bool = False) -> Later:
    """send(parse()): at once for a body shorter than PARSE_ON_THREAD
    (`nbytes`), else with parse() run on a parse thread first; and with the
    answer made on one too if `finish_on_thread` (a long one is slow to
    format). Either way a client that goes away abandons the inference."""
    if nbytes < PARSE_ON_THREAD and not finish_on_thread:
        return send(parse())

    async def parse_then_send() -> Response:
        loop = asyncio.get_running_loop()
        later = send(await _on_thread(loop, parse) if nbytes >= PARSE_ON_THREAD else parse())
        result = await later.future  # cancelled with this task
        if finish_on_thread:
            return await _on_thread(loop, functools.partial(later.finish, result))
        return later.finish(result)
    later = Later.of(asyncio.get_running_loop().create_task(parse_then_send()))
    later.inference = True
    return later


def formatted(numbers: int, make: Callable[[], Response]) -> Response | Later:
    """make(), at once for an answer of fewer than FORMAT_ON_THREAD JSON
    numbers or one already made off the loop (`parsed`'s finish_on_thread),
    else on a parse thread."""
    if numbers < FORMAT_ON_THREAD:
        return make()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # on a parse thread already
        return make()
    return Later.of(loop.create_task(_on_thread(loop, make)))


async def _on_thread(loop: asyncio.AbstractEventLoop, work: Callable[[], Any]) -> Any:
    """work() on a parse thread. Cancelled meanwhile, it still waits for
    the thread: the body it parses is held (and counted in the receive
    budget, until its request ends) until the thread lets go of it."""
    running = loop.run_in_executor(_PARSERS, work)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait([running])
        errors.retrieved(running)  # nobody wants it
        raise


Handler = Callable[..., Awaitable[Response] | Response | Later]
# An escaped character that needs none: a route's words may come so.
_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")


def _unescaped(m: re.Match) -> str:
    return chr(int(m[1], 16))


class Router:
    def __init__(self):
        # (method, regex, handler, whether it is a coroutine function)
        self._routes: list[tuple[str, re.Pattern, Handler, bool]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$"
        self._routes.append((method, re.compile(regex), handler,
                             inspect.iscoroutinefunction(handler)))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str], bool]:
        """The handler, its decoded parameters, and whether it is run as a
        task. `path` is matched as sent, so that an encoded "/" (%2F) stays
        inside its parameter; HEAD is answered as GET, without the body."""
        allowed = []
        wanted = "GET" if method == "HEAD" else method
        if "%" in path:  # "%69nfer" is "infer" (RFC 3986 6.2.2.2); "%2F" stays as sent
            path = _UNRESERVED_ESCAPE.sub(_unescaped, path)
        for m, regex, handler, is_async in self._routes:
            found = regex.match(path) if path != "*" else None
            if found:
                if m == wanted:
                    return handler, _params(found), is_async
                allowed.append(m)
        if method == "OPTIONS" and (allowed or path == "*"):
            # What the path takes (RFC 9110 9.3.7); "*": what the server takes.
            methods = allowed or [m for m, *_ in self._routes]
            return functools.partial(_options, _allow(methods)), {}, False
        if allowed:
            raise _MethodNotAllowed(f"{method} is not allowed on {path}", _allow(allowed))
        raise ModelNotFound(f"no route for {method} {path}")


def _query(raw: bytes) -> dict[str, list[str]]:
    """A query string's values by name, %-decoded as UTF-8, blank values
    kept ("max_results=" is a bad value, not an absent one). Escapes that
    are no UTF-8 are refused, as a path's are (_params): decoded with
    replacement, a page token of %E9 was read as U+FFFD."""
    try:
        return parse_qs(raw.decode("latin-1"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest(f"the query {errors.shown(raw.decode('latin-1'))} has %-escapes "
                         f"that are not UTF-8 (text is sent as its UTF-8 bytes, "
                         f"%-encoded)") from None


def _params(found: re.Match) -> dict[str, str]:
    """A route's parameters, %-decoded as UTF-8. Escapes that are no UTF-8
    are refused: decoded with replacement, %E9 named the model U+FFFD."""
    params = {}
    for k, v in found.groupdict().items():
        if v is None:
            continue
        try:
            params[k] = unquote(v, errors="strict")
        except UnicodeDecodeError:
            raise BadRequest(f"the path's {k} {errors.shown(v)} has %-escapes that are not "
                             f"UTF-8 (text is sent as its UTF-8 bytes, %-encoded)") from None
    return params


def _allow(methods: list[str]) -> str:
    """An Allow header's value: GET brings HEAD, and every path takes OPTIONS."""
    methods = set(methods) | {"OPTIONS"}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def _options(allow: str, server, request) -> Response:
    return Response(200, b"", [("Allow", allow)])


class StatusError(BadRequest):
    """A caller's error that HTTP answers with a status of its own, not
    BAD_REQUEST's 400 (the wire's code stays BAD_REQUEST)."""

    status = 400
    headers: tuple[tuple[str, str], ...] = ()  # that its status calls for

    @property
    def http_status(self) -> int:
        return self.status


class _MethodNotAllowed(StatusError):
    """405: a known path with another method."""

    status = 405

    def __init__(self, message: str, allowed: str):
        super().__init__(message)
        self.headers = (("Allow", allowed),)  # a 405 says which (RFC 9110 15.5.6)


class HttpServer(Listener):
    KIND = "http"

    def __init__(self, engine: Engine, routes: list[tuple[str, str, Handler]],
                 max_body: int | None = None, max_header: int = MAX_HEADER_BYTES,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, max_connections: int | None = None):
        super().__init__(engine, lambda: _HttpConnection(self), max_connections)
        self.router = Router()
        for method, pattern, handler in routes:
            self.router.add(method, pattern, handler)
        self.max_body = max_body or engine.config.max_request_bytes
        self.max_header = max_header
        self.idle_timeout_s = idle_timeout_s


class _HttpConnection(BudgetedReading):
    """One connection: parses with httptools, answers requests in order
    (an asyncio protocol by its methods: the loop calls them)."""

    def __init__(self, server: HttpServer):
        super().__init__(server)
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Request | MMEngineError] = collections.deque()
        self.answering: Later | None = None  # the request being answered
        self.fd = -1  # the socket's, where the server's linger reads where the client runs
        self.idle: asyncio.TimerHandle | None = None
        self.dead = False
        self.eof = False  # the client half-closed: close once its answers are out
        self.pipeline_full = False  # MAX_PIPELINED requests await answers: not read
        # (or their bodies, none held by the receive budget, take MAX_QUEUED_BYTES)
        self.queued_bytes = 0  # of the queued requests' bodies that hold no budget
        self.write_blocked = False  # answers backed up: not read, nothing more answered
        self._reset()

    def _reset(self) -> None:
        self.began = 0.0  # loop time the request being received began; 0: none
        self.url = b""
        self.in_head = False     # between on_message_begin and on_headers_complete
        self.head_begun = False  # a head began within the read being fed
        self.head_raw = 0        # bytes fed while in a header block, from its second read
        # on; after it, in the reads in a row that gave nothing (trailers)
        self.headers: dict[str, str] = {}
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.reserved = 0         # the budget the body being received holds
        self.refused: MMEngineError | None = None
        # Its answer, known from its head (415, 501, no Host): its body is
        # read past, not kept, and no 100 Continue asks the client for it.
        self.doomed: MMEngineError | None = None
        self.continue_owed = False  # asked for 100 Continue, not yet sent
        self.upgrade = False  # its head asks for another protocol (read again without)

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.server.admit(self):
            self.dead = True
            self._write(error_response(Overloaded(
                f"the server has {self.server.max_connections} connections open; "
                f"retry later")), keep_alive=False)
            if self.server.linger_refused(self):
                self._linger()
            else:
                transport.close()
            return
        listener.allow_writes(transport)
        self.fd = transport.get_extra_info("socket").fileno()
        self._touch()

    def pending(self) -> list:
        return [] if self.answering is None else [self.answering.future]

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        self.server.refusing.discard(self)
        self._stop_ending()
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        # Nobody is left to read the answers of the requests still queued:
        # they are dropped, and their bytes go back with the one being read.
        # The request being answered gives its own back when it is done.
        self._drop_budget()
        self._drop_queued()
        answering = self.answering
        if answering is not None and answering.inference:
            answering.future.cancel()
            if answering.future.done():  # a task is done a turn later, by itself
                # Engine.submit runs no `then` for a future its caller
                # cancels: the answer (with nowhere to go) gives its
                # bytes back here.
                answering.done(answering.future)

    def _drop_queued(self) -> None:
        """Forgets the requests queued, unanswered, giving back the budget
        their bodies hold."""
        held = sum(r.reserved for r in self.queue if isinstance(r, Request))
        self.queue.clear()
        self.queued_bytes = 0
        if held:
            self.server.receiving.give(held)

    def eof_received(self) -> bool | None:
        # A client that half-closes after its last request still gets its answers.
        self.dead = True
        # A body being received can never end now: its budget is others' at
        # once, not once the answers written are read (the transport closes
        # only then) or the one being made is written.
        self._drop_budget()
        if self.answering is None and not self.queue:
            return None  # close now
        self.eof = True
        return True

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return
        if self.began or self.in_head or data[0] not in b"\r\n" or data.strip(b"\r\n"):
            # Blank lines between requests, which the parser skips (RFC
            # 9112 2.2), are no activity: a CRLF a minute held a
            # connection for ever.
            self._touch()
        continued, self.head_begun = self.in_head, False
        # What this read finds, known without a callback of its own (the
        # body's list is a new one for each request).
        body, heard = self.body, self.body_bytes + self.header_bytes
        try:
            while True:
                try:
                    self.parser.feed_data(data)
                    break
                except httptools.HttpParserUpgrade as e:
                    data = self._without_upgrade(data[e.args[0]:])
                    if data is None:
                        return
        except httptools.HttpParserError as e:
            if not self.dead:  # (dead: its last answer came within this read)
                self._fail(self.refused or BadRequest(f"malformed HTTP request: {e}"))
            return
        # httptools holds a header line until it ends, before on_header can
        # count it: bound what it holds by counting the reads of an
        # unfinished header block (its first read is at most one read more).
        if self.in_head:
            # The same head's: one that began within this read (past others,
            # pipelined) is counted from its next read, as any is. A read
            # that ended one head and, 64 KiB of requests later, began
            # another was counted whole as the last one's: 431, and the
            # pipeline after it lost.
            if continued and not self.head_begun:
                self.head_raw += len(data)
                if self.head_raw > self.server.max_header:
                    self._fail(_HeaderTooLarge(
                        f"request headers exceed {self.server.max_header} bytes"))
        elif self.began and body is self.body and heard == self.body_bytes + self.header_bytes:
            # After the head, a read that gave nothing: a chunked body's
            # trailer line (or a chunk's size line) that has not ended,
            # which httptools holds, as it does a header line. Bounded as
            # the head is; a read that gives anything starts the count again.
            self.head_raw += len(data)
            if self.head_raw > self.server.max_header:
                self._fail(_HeaderTooLarge(
                    f"request trailers exceed {self.server.max_header} bytes"))
        else:
            self.head_raw = 0

    def _without_upgrade(self, rest: bytes) -> bytes | None:
        """The request whose head asked for another protocol (curl
        --http2's h2c, a WebSocket), again without asking, followed by
        `rest`, the bytes after its head, for a new parser to read. A
        server may ignore Upgrade (RFC 9110 7.8); httptools would hand its
        body and everything after it back as the other protocol's. None
        for CONNECT, which is answered once and the connection closed."""
        if not self.upgrade or self.parser.get_method() == b"CONNECT":
            self._fail(_NotImplemented("CONNECT is not served: this server is no proxy"))
            return None
        head = [b"%s %s HTTP/%s\r\n" % (self.parser.get_method(), self.url,
                                         self.parser.get_http_version().encode())]
        for key, value in self.headers.items():
            if key == "connection":
                value = ", ".join(t.strip() for t in value.split(",")
                                  if t.strip().lower() != "upgrade")
            if key != "upgrade" and value:
                head.append(f"{key}: {value}\r\n".encode("latin-1"))
        self._reset()
        self.parser = httptools.HttpRequestParser(self)
        return b"".join(head) + b"\r\n" + rest

    def _touch(self) -> None:
        # Runs twice per request: note the time, and arm a timer only when
        # none is armed; the timer moves itself to the last activity.
        if self.transport.is_closing():  # an answer that came after the close
            return
        self.last_active = asyncio.get_running_loop().time()
        if self.idle is None:
            self._arm(self.last_active + self.server.idle_timeout_s)

    def _arm(self, when: float) -> None:
        self.idle = asyncio.get_running_loop().call_at(when, self._on_idle)

    def _on_idle(self) -> None:
        self.idle = None
        now = asyncio.get_running_loop().time()
        unsent = self._note_reading(now)
        timeout = self.server.idle_timeout_s
        due = self.last_active + timeout
        # A request must arrive whole within the timeout, however its bytes
        # trickle (each one counts as activity): else a few clients sending
        # a byte a minute hold every connection. Counted only while it is
        # read: one waiting for the receive budget, or behind answers, is not
        # the client's slow request (and each resume starts it anew).
        unfinished = self.began and not (self.awaiting or self.pipeline_full
                                         or self.write_blocked or self.dead
                                         or self.continue_owed)
        if unfinished and now >= self.began + timeout:
            self._fail(_RequestTimeout(f"the request was not received whole within "
                                       f"{timeout:g} s"))
        elif self.transport.is_closing():
            self._watch_closed(now, unsent, timeout)
        elif now < due:
            self._arm(min(due, self.began + timeout) if unfinished else due)
        elif self.awaiting:  # said, not reset: a close with its bytes unread resets
            self._stop_awaiting()
            self._arm(now + timeout)  # if the answer cannot go out, the next tick closes
            self._fail(Overloaded(f"the request waited {timeout:g} s for the receive "
                                  f"budget (receive_bytes), held by other large bodies; "
                                  f"retry later"))
        elif self.answering is None:  # a request in progress re-arms it when answered
            self._close()

    def _close(self) -> None:
        """Closes once the answers written are read; the idle timer goes on
        watching them go out (see listener.WatchedWrites)."""
        if self.transport.is_closing():  # closed before, or lost
            return
        self.transport.close()
        if self.idle is None:
            self._arm(self.last_active + self.server.idle_timeout_s)

    def _linger(self) -> None:
        """Ends our side of the stream after the answer that ends it, and
        drops what the client still sends until it closes, LINGER_S at
        most. Closed at once with bytes unread, the connection would be
        reset, and the reset would take the answer with it: a client
        sending a body it was refused (413) could not read why, nor one
        that pipelined past its `Connection: close` read its answer's end."""
        if self.transport.is_closing():
            return
        self._drop_budget()  # what the request being received holds is nobody's now
        self._reset()
        if self.eof:  # the client has sent all it will
            self._close()
            return
        self.transport.write_eof()
        self.transport.resume_reading()  # read, to drop
        self._close_in(listener.LINGER_S)

    def _fail(self, e: MMEngineError) -> None:
        """An unusable stream: answer after what is queued, then close; read
        nothing more from it."""
        self.dead = True
        self.queue.append(e)
        self._kick()

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self.dead:
            # Past the answer that ended the connection, in the read that
            # brought its request: nothing more is read, or answered after
            # the end of our side of the stream.
            raise httptools.HttpParserError("a request after the connection's last")
        self.in_head = self.head_begun = True
        self.began = asyncio.get_running_loop().time()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_header(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header(len(name) + len(value) + 3)  # its line: with ":" and CRLF
        if not self.in_head:
            # A chunked body's trailer: counted with the head, not merged
            # into it (RFC 9110 6.5.1), where checks made at the head's end
            # (Content-Encoding's codings) would miss it.
            return
        # llhttp strips the white space before a value, not after it,
        # which is no part of it either (RFC 9110 5.5): "m0 " names m0.
        key, text = name.decode("latin-1").lower(), value.decode("latin-1").rstrip(OWS)
        if key in self.headers:
            if key in _LIST_FIELDS:  # repeated: one list (RFC 9110 5.3)
                text = f"{self.headers[key]}, {text}"
            elif key in _SINGLE_FIELDS:
                self.refused = BadRequest(
                    f"a request carries one {_SINGLE_FIELDS[key]} header, not two: which "
                    f"one was meant? (RFC 9110 5.3)")
                raise httptools.HttpParserError("a singleton field repeated")
        self.headers[key] = text

    def _count_header(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > self.server.max_header:
            self.refused = _HeaderTooLarge(
                f"request headers exceed {self.server.max_header} bytes")
            raise httptools.HttpParserError("header block too large")

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_raw = 0  # from here, the count of reads that give nothing (data_received)
        if self.parser.should_upgrade():  # read again without it (_without_upgrade)
            self.upgrade = True
            return
        length = self.headers.get("content-length", "").strip(" \t") or None
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            # Refused from the declared length, before any of the body is read.
            self.refused = TooLarge(f"request body of {length} bytes exceeds the "
                                    f"maximum of {self.server.max_body}")
            raise httptools.HttpParserError("body too large")
        self.doomed = self._refused_by_head()
        if self.doomed is not None:
            if self._expects_continue():  # its client sends no body but waits for a word
                self.refused = self.doomed  # this one, and the connection closes after it
                raise httptools.HttpParserError("refused by its head")
            return
        if length is not None and length.isdigit() and int(length) >= RESERVE_ABOVE:
            self._reserve(int(length))
        self._continue()

    def _continue(self) -> None:
        """`100 Continue`, for a request that asked for it: the client waits
        for it before it sends the body (curl, a second; RFC 9110 lets it
        wait for ever). Not behind pipelined answers: it would read as
        theirs; nor while the body waits for the receive budget. It is owed
        then, and sent once they are out or the budget comes."""
        if not self._expects_continue():
            return
        self.continue_owed = bool(self.queue or self.answering is not None or self.awaiting)
        if not self.continue_owed:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _expects_continue(self) -> bool:
        return self.headers.get("expect", "").lower() == "100-continue" \
            and self.parser.get_http_version() == "1.1"

    def _gone(self) -> bool:
        return self.dead

    def _budget_came(self) -> None:
        self._touch()
        if self.continue_owed:
            self._continue()  # its body's pace counts from now, when it may come
        self._resume()

    def _received(self) -> int:
        return self.body_bytes

    def _served_first(self) -> bool:
        # (A body whose 100 Continue is owed does not come until it is sent.)
        return self.pipeline_full or self.write_blocked or self.continue_owed

    def _too_slow(self, error: MMEngineError) -> None:
        self._drop_budget()
        self.body = []  # its bytes are not held either while earlier answers go out
        self._fail(_RequestTimeout(str(error)))

    def _resume(self) -> None:
        if not (self.awaiting or self.pipeline_full or self.write_blocked or self.dead):
            if self.began:  # its time counts from now: the wait was not the client's
                self.began = asyncio.get_running_loop().time()
            self.transport.resume_reading()

    # -- asyncio's write flow control: answers above the high-water mark

    def pause_writing(self) -> None:
        self.write_blocked = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_blocked = False
        self._kick()
        self._resume()

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.server.max_body:  # chunked: no declared length
            self.refused = TooLarge(f"request body exceeds {self.server.max_body} bytes")
            raise httptools.HttpParserError("body too large")
        if self.doomed is not None:
            return
        pieces = self.body
        if pieces and len(body) < COALESCE_BELOW:
            # Small pieces (a chunked body's chunks) are gathered: a bytes
            # object each took ~28 times their size, and joining millions of
            # them held the loop for seconds.
            last = pieces[-1]
            if type(last) is bytearray:
                last += body
            elif len(last) < COALESCE_BELOW:
                pieces[-1] = bytearray(last) + body
            else:
                pieces.append(bytearray(body))
        else:
            pieces.append(body)
        if self.body_bytes >= RESERVE_ABOVE and not (self.reserved or self.awaiting):
            # Chunked, of no declared length: it holds the most a body may
            # be, from when it is large (else every connection could hold one).
            self._reserve(self.server.max_body)

    def _keep_received(self) -> int:
        """The budget a body received whole keeps until its answer: its own
        bytes (a chunked body held the most a body may be while it came)."""
        if self.reserved > self.body_bytes:
            self.server.receiving.give(self.reserved - self.body_bytes)
            self.reserved = self.body_bytes
        return self.reserved

    def on_message_complete(self) -> None:
        if self.upgrade:  # its body is still to come (_without_upgrade)
            return
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:  # CONNECT's authority, say
            url, self.doomed = None, self.doomed or BadRequest(
                f"request target {bytes(self.url)[:100]!r} is not a path")
        encoding = self.headers.get("content-encoding")
        request = Request(
            method=self.parser.get_method().decode(),
            # An absolute form's empty path is "/" (RFC 9112 3.2.2).
            path=(url.path or b"/").decode("latin-1") if url else "/",
            query_string=(url.query or b"") if url else b"",
            headers=self.headers,
            body=b"".join(self.body),
            # An HTTP/1.0 message with Transfer-Encoding has faulty framing:
            # the connection closes after its answer (RFC 9112 6.1).
            keep_alive=self.parser.should_keep_alive() and not (
                "transfer-encoding" in self.headers and self.parser.get_http_version() == "1.0"),
            reserved=self._keep_received(),
            refused=self.doomed,
            coded=tuple(codings.codings(encoding)) if encoding else (),
            t_received=time.monotonic_ns() if self.headers.get(trace.HTTP_HEADER) == "1"
            else 0)
        if self._stop_awaiting():  # the whole body came in the read that announced it
            self._resume()
        self._reset()
        self.queue.append(request)
        if not request.reserved:
            self.queued_bytes += len(request.body)
        if not self.pipeline_full and (len(self.queue) >= MAX_PIPELINED
                                       or self.queued_bytes >= MAX_QUEUED_BYTES):
            self.pipeline_full = True
            self.transport.pause_reading()
        self._kick()

    def _refused_by_head(self) -> MMEngineError | None:
        """Why a request is answered with an error whatever its body, if it is.
        (Each header looked at once, the codings only where there are any:
        this runs for every request.)"""
        headers = self.headers
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            return _VersionNotSupported(f"HTTP/{version} is not served: HTTP/1.1 or 1.0")
        host = headers.get("host")
        if host is None:
            if version == "1.1":
                return BadRequest("an HTTP/1.1 request must carry a Host header (RFC 9112)")
        elif "," in host:
            return BadRequest("a request carries one Host header (RFC 9112 3.2)")
        encoding = headers.get("content-encoding")
        if encoding:
            applied = codings.codings(encoding)
            if set(applied) - codings.DECODED - {"identity"}:
                return _UnsupportedEncoding(
                    f"Content-Encoding {encoding!r} is not supported; "
                    f"send the body as {codings.ACCEPTED}")
            if codings.layers(applied) > codings.MAX_LAYERS:
                return _UnsupportedEncoding(
                    f"a body compressed {codings.layers(applied)} times is not taken: "
                    f"{codings.MAX_LAYERS} codings at most")
        transfer = headers.get("transfer-encoding")
        if transfer and set(codings.codings(transfer)) - {"chunked"}:
            return _NotImplemented(f"Transfer-Encoding {transfer!r}"
                                   f" is not supported: only chunked (RFC 9112 6.1)")
        return None

    # -- answering, in order --------------------------------------------------

    def _kick(self) -> None:
        """Answers what is queued, in order: at once where the handler
        answers at once, else from the done callback of its future."""
        while self.answering is None and self.queue and not self.write_blocked \
                and not self.transport.is_closing():
            item = self.queue.popleft()
            if isinstance(item, Request) and not item.reserved:
                self.queued_bytes -= len(item.body)
            if self.pipeline_full and len(self.queue) < MAX_PIPELINED // 2 \
                    and self.queued_bytes < MAX_QUEUED_BYTES // 2:
                self.pipeline_full = False
                self._resume()
            if isinstance(item, MMEngineError):  # the stream is unusable
                self._write(_response_for(item), keep_alive=False)
                self._linger()
                return
            try:
                answer = self._start(item)
            except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - answered
                answer = _response_for(e, item)
            if isinstance(answer, Later):
                self.answering = answer
                answer.wait(functools.partial(self._on_answered, item, answer.finish))
                return
            if not self._respond(item, answer):
                return
        if self.answering is None and not self.queue:
            if self.eof:
                self._close()
            elif self.continue_owed and not self.dead:  # the answers before it are out
                self._continue()
                if self.began:  # its body may come from now: its time counts from now
                    self.began = asyncio.get_running_loop().time()
                if self.reserved:  # and so does its pace
                    self._pace_from_now()

    def _start(self, request: Request) -> Response | Later:
        if request.refused is not None:
            raise request.refused
        handler, params, is_async = self.server.router.match(request.method, request.path)
        if request.coded:  # a short one inflated at once; a long one on a parse thread
            inflated = None
            if len(request.body) < INFLATE_ON_THREAD:
                try:
                    inflated = codings.decode(request.body, request.coded,
                                              self.server.max_body, PARSE_ON_THREAD)
                except codings.Longer:
                    pass
            if inflated is None:
                later = Later.of(asyncio.get_running_loop().create_task(
                    self._inflate_then_call(request, handler, params, is_async)))
                later.inference = True  # an inference it makes is abandoned with it
                return later
            request.body = inflated
            self._hold_inflated(request)
        return self._call(request, handler, params, is_async)

    def _call(self, request: Request, handler: Handler, params: dict[str, str],
              is_async: bool) -> Response | Later:
        if is_async:
            return Later.of(asyncio.get_running_loop().create_task(
                handler(self.server, request, **params)))
        return handler(self.server, request, **params)

    async def _inflate_then_call(self, request: Request, handler: Handler,
                                 params: dict[str, str], is_async: bool) -> Response:
        request.body = await _on_thread(asyncio.get_running_loop(), functools.partial(
            codings.decode, request.body, request.coded, self.server.max_body))
        self._hold_inflated(request)
        answer = self._call(request, handler, params, is_async)
        if not isinstance(answer, Later):
            return answer
        # Cancelled (its client gone), this abandons an inference, as the
        # connection does; a load or unload the request asked for completes.
        result = await (answer.future if answer.inference else asyncio.shield(answer.future))
        return answer.finish(result)

    def _hold_inflated(self, request: Request) -> None:
        """An inflated body holds the receive budget as a body received
        that long does (it was inflated first: two parse threads, each
        bounded by the largest body, at most)."""
        grown = len(request.body) - request.reserved
        if len(request.body) >= RESERVE_ABOVE and grown > 0:
            if not self.server.receiving.grow(request.reserved, grown):
                raise Overloaded(f"the request body inflates to {len(request.body)} bytes, "
                                 f"more than the receive budget (receive_bytes) has free "
                                 f"now; retry later")
            request.reserved += grown

    def _on_answered(self, request: Request, finish: Callable[[Any], Response],
                     future: asyncio.Future) -> None:
        self.answering = None
        try:
            response = finish(future.result())
        except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - answered
            response = _response_for(e, request)
        if isinstance(response, Later):  # being formatted on a thread: answered once made
            self.answering = response
            response.wait(functools.partial(self._on_answered, request, response.finish))
            return
        if self._respond(request, response):
            # The next request starts in a turn of its own: not inside a
            # worker's drain or deadline scan (that worker may be dead and
            # not yet known to be), and after the engine's books.
            asyncio.get_running_loop().call_soon(self._kick)

    def _respond(self, request: Request, response: Response) -> bool:
        """Writes a request's answer; False when the connection ends with it."""
        self._touch()
        body = request.method != "HEAD"
        # A stopping server says so with its last answer on each connection,
        # lest its client send the next request to a server gone.
        if not request.keep_alive or self.server.stopping and not self.queue:
            self._write(response, keep_alive=False, body=body)
            self.dead = True
            self._give_back(request)
            # Requests pipelined after the last one (HTTP/1.0 with
            # Transfer-Encoding) have nobody to answer them.
            self._drop_queued()
            self._linger()  # the client may be sending its next request
            return False
        self._write(response, keep_alive=True, body=body)
        self._give_back(request)
        if not self.queue:
            self.server.linger(self)
        return True

    def _give_back(self, request: Request) -> None:
        """The receive budget `request`'s body held, given back once its
        answer is written: the budget may come to a request of this
        connection waiting for it, whose 100 Continue would go out ahead of
        the answer, and read as its (RFC 9110 15.2)."""
        if request.reserved:
            self.server.receiving.give(request.reserved)

    def quiet(self) -> bool:
        """Nothing to answer, and open (the listener's linger asks)."""
        return not self.queue and self.answering is None and not self.dead \
            and not self.transport.is_closing()

    def _write(self, r: Response, keep_alive: bool, body: bool = True) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        parts = r.body if isinstance(r.body, list) else [r.body]
        length = sum(memoryview(p).nbytes for p in parts)
        head = [f"HTTP/1.1 {r.status} {_REASONS.get(r.status, 'Unknown')}",
                f"Date: {_date()}",
                f"Content-Length: {length}",
                "Connection: keep-alive" if keep_alive else "Connection: close"]
        if length or r.content_type != Response.content_type:  # an empty body is no JSON,
            head.append(f"Content-Type: {r.content_type}")  # but is an empty table's CSV
        head += [f"{k}: {v}" for k, v in r.headers]
        head = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        # One system call per response (uvloop: one writev, no copy).
        self.transport.writelines([head, *parts] if body else [head])


_now: list = [0, ""]  # [the second, its IMF-fixdate]


def _date() -> str:
    """The Date header's value (RFC 9110), formatted once a second."""
    second = int(time.time())
    if _now[0] != second:
        _now[:] = second, email.utils.formatdate(second, usegmt=True)
    return _now[1]


def _response_for(e: Exception | asyncio.CancelledError,
                  request: Request | None = None) -> Response:
    """The answer to a request whose handler raised `e`."""
    if isinstance(e, asyncio.CancelledError):
        e = errors.cancelled()
    elif not isinstance(e, MMEngineError):
        e = InternalError(f"{type(e).__name__}: {e}")  # a bug: 500, never a hang
    answer = request.answer_error if request is not None else None
    return error_response(e) if answer is None else answer(e)


class _RequestTimeout(StatusError):
    """408: a request not received whole within the idle timeout."""

    status = 408


#: Header fields whose repeats are one comma-separated list, which the
#: server reads as a whole (a later line must not hide an earlier one).
# (Host: twice is refused; kept as a list, it is told by its comma.)
# (A repeated Inference-Header-Content-Length is a list, no length: 400.)
_LIST_FIELDS = frozenset({"content-encoding", "transfer-encoding", "host",
                          "inference-header-content-length", "accept"})
#: Header fields of one value that the server acts on, whose repeats are
#: refused (400, and the connection closed, as llhttp does two
#: Content-Lengths): the last line won unsaid, where a proxy in front may
#: have read the first (whose token was checked, which type the body is,
#: whether the client waits for 100 Continue, which model SageMaker's
#: /invocations runs). Named as the answer says.
_SINGLE_FIELDS = {"authorization": "Authorization", "content-type": "Content-Type",
                  "expect": "Expect",
                  "x-amzn-sagemaker-target-model": "X-Amzn-SageMaker-Target-Model"}


class _VersionNotSupported(StatusError):
    """505: a request line of another HTTP than 1.1 and 1.0 (RFC 9110 15.6.6)."""

    status = 505


class _NotImplemented(StatusError):
    """501: a transfer coding the server does not decode (RFC 9112 6.1),
    or CONNECT."""

    status = 501


class _UnsupportedEncoding(StatusError):
    """415: a body in a content coding the server does not decode."""

    status = 415
    headers = (("Accept-Encoding", codings.ACCEPTED),)  # what it does (RFC 9110 15.5.16)


class _HeaderTooLarge(StatusError):
    """431: the header block is over its limit."""

    status = 431
