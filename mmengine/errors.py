"""Every error mmengine reports, typed by what the caller can do about it.

Three families: request errors (the caller can fix the request or retry),
worker death (the engine recovers, this request failed) and internal bugs.
Each class carries its wire code; servers write the code, the SDK maps it
back to the same class with `error_for`.
"""
from __future__ import annotations

import enum
import reprlib


class ErrorCode(enum.IntEnum):
    MODEL_NOT_FOUND = 1
    BAD_REQUEST = 2
    TOO_LARGE = 3
    OVERLOADED = 4
    LOAD_FAILED = 5
    WORKER_DIED = 6
    TIMEOUT = 7
    UNAUTHORIZED = 8
    INTERNAL = 9


HTTP_STATUS = {
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.LOAD_FAILED: 500,
    ErrorCode.WORKER_DIED: 502,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.INTERNAL: 500,
}


class MMEngineError(Exception):
    """Base of every typed error; `code` is what travels on the wire."""

    code = ErrorCode.INTERNAL
    # A request that failed once a worker had taken it (its inputs refused,
    # its model raised, its answer refused): the worker's account of its
    # run, as an answer's body has it (messages.py).
    ran: dict | None = None
    # A failed load's own message, where the engine added its back-off to it.
    failure: str | None = None
    # No memory to make a model resident (a worker's budget, held by models
    # in use or pinned; or the machine's, its load out of memory), or for a
    # resident model to run (its call out of memory): set where a load
    # refuses it, OVERLOADED or TOO_LARGE, and on a worker's OVERLOADED
    # answer to an inference. A protocol may have a status of its own for
    # it (SageMaker's 507, its cue to unload others).
    no_room: bool = False

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


# -- request errors: the caller can fix the request or retry ---------------

class ModelNotFound(MMEngineError):
    code = ErrorCode.MODEL_NOT_FOUND


class BadRequest(MMEngineError):
    code = ErrorCode.BAD_REQUEST


class InputsRefused(BadRequest):
    """A request's inputs refused before its model ran (its call took none
    of the model's time, and is not one of its calls)."""


class TooLarge(MMEngineError):
    code = ErrorCode.TOO_LARGE


class Overloaded(MMEngineError):
    code = ErrorCode.OVERLOADED
    # When to try again (HTTP's Retry-After), in seconds; None where
    # waiting alone does not help.
    retry_after_s: int | None = 1


class ShuttingDown(Overloaded):
    """The server is stopping: it takes no new request, and waiting for
    it does not help (another instance will serve)."""

    retry_after_s = None


class PinnedFull(Overloaded):
    """No room for a model, and none will come until a pinned model is
    unpinned: retrying later does not help by itself."""

    retry_after_s = None


class Timeout(MMEngineError, TimeoutError):
    code = ErrorCode.TIMEOUT


class Unauthorized(MMEngineError):
    code = ErrorCode.UNAUTHORIZED


class LoadFailed(MMEngineError):
    code = ErrorCode.LOAD_FAILED


# -- worker death: the engine recovers, the request failed ----------------

class WorkerDied(MMEngineError):
    code = ErrorCode.WORKER_DIED


# -- bugs -----------------------------------------------------------------

class InternalError(MMEngineError):
    code = ErrorCode.INTERNAL


# -- the shared-memory ring's errors, typed by the same families ----------

class RecordTooLarge(TooLarge):
    """A record larger than the ring's largest; nothing was written."""


class RingTimeout(Timeout):
    """A blocking ring call ran out of time; nothing was written or read."""


class PeerDied(WorkerDied):
    """The process at the other end of a ring has exited."""


class RingClosed(WorkerDied):
    """The other end closed the ring."""


class RingCorrupt(WorkerDied):
    """The other end wrote what is no record (a size or a part outside what
    it published, or past the ring): nothing more of the ring can be read."""


_BY_CODE = {
    ErrorCode.MODEL_NOT_FOUND: ModelNotFound,
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.TOO_LARGE: TooLarge,
    ErrorCode.OVERLOADED: Overloaded,
    ErrorCode.LOAD_FAILED: LoadFailed,
    ErrorCode.WORKER_DIED: WorkerDied,
    ErrorCode.TIMEOUT: Timeout,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.INTERNAL: InternalError,
}


MAX_MESSAGE = 4096  # characters of an error's message in an answer (told)


def told(e: BaseException) -> str:
    """`e`'s message as an answer carries it: cut past MAX_MESSAGE. Messages
    quote what a caller sent (a tensor's name, a model's) as repr, up to four
    characters a byte: a 64 MiB name made a 256 MiB answer, held in the
    server until its caller read it. Only the answer is cut: the worker's
    relay and the server's log keep the whole (a state dict's missing keys,
    then the unexpected ones that say why)."""
    text = str(e)
    if len(text) <= MAX_MESSAGE:
        return text
    keep = MAX_MESSAGE // 2 - 50
    return f"{text[:keep]} ... ({len(text)} characters in all) ... {text[-keep:]}"


def shown(value) -> str:
    """A caller's value in an error message: its repr, shortened. A value
    nested as deep as JSON and msgpack allow (a thousand) is past repr()'s
    recursion, which made a bad request's error an INTERNAL one."""
    return reprlib.repr(value)


def cannot_carry(protocol: str, name: str, dtype, model: str) -> InternalError:
    """The error for output `name` of `model` that `protocol` has no way
    to write: the model's fault (500), never the caller's."""
    return InternalError(f"{model}: its output {name!r} has dtype {dtype}, which {protocol} "
                         f"cannot carry")


def cancelled() -> ShuttingDown:
    """The answer to a request whose future was cancelled under it: only a
    stopping engine cancels, so the client should retry elsewhere."""
    return ShuttingDown("the request was cancelled: the server is shutting down")


def error_for(code: int, message: str) -> MMEngineError:
    """The exception for a wire code; an unknown code is an internal error."""
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except ValueError:
        return InternalError(f"unknown error code {code}: {message}")
    return cls(message)


def retrieved(future) -> None:
    """A done callback that takes a future's exception, if any: for a
    future nobody may be left to await, whose error asyncio would log as
    never retrieved."""
    if not future.cancelled():
        future.exception()
