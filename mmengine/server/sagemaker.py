"""The SageMaker multi-model container contract (docs/sagemaker.md).

    GET    /ping                       200 while a worker is alive, once pinned models are warm
    POST   /models                     {"model_name", "url"}: add and load
    GET    /models                     ?max_results=&next_page_token=
    GET    /models/{name}              {"modelName", "modelUrl"}
    DELETE /models/{name}              unload and forget
    POST   /models/{name}/invoke       JSON {"inputs": {...}} -> {"outputs": {...}};
                                       text/csv and application/x-npy for one tensor
    POST   /invocations                the same, the model named by the
                                       X-Amzn-SageMaker-Target-Model header

These routes see only the models SageMaker added with POST /models, kept in
a registry per engine; a model of the repository root is not one of them.
"Loaded" in the contract's sense means added: the engine may evict an
added model under memory pressure and loads it again on its next request,
which the caller never notices. A url is a local path or a file:// URL that
must resolve (symlinks and `..` followed) to a directory under one of the
configured `model_roots`; everything else is refused before the disk is
touched beyond resolving the path.

With a control token configured, POST /models and DELETE /models/{name}
need it as `Authorization: Bearer <token>`; invoke and /invocations hand
their bearer token to the engine, for models whose manifest lists tokens.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import binascii
import dataclasses
import functools
import io
import json
import math
import os
import warnings
import sys
import weakref
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from mmengine.engine import Engine
from mmengine.engine import log as engine_log
from mmengine.errors import (BadRequest, MMEngineError, ModelNotFound, Overloaded,
                             ShuttingDown, TooLarge, cannot_carry, shown)
from mmengine.server.http import (Later, Request, Response, array_from_json, cast_json_array,
                                  dumps, error_response, finite, formatted, json_response,
                                  parsed, StatusError, submitted, vetted)
from mmengine.fetch import under_roots
from mmengine.storage import check_name

TARGET_MODEL_HEADER = "x-amzn-sagemaker-target-model"
DEFAULT_PAGE_SIZE = 1000


# -- the registry of added models -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Added:
    url: str                                    # as POST /models gave it
    path: str                                   # the directory it resolved to
    inputs: tuple[tuple[str, str], ...]         # declared (name, dtype), in order


class _Registry:
    """What SageMaker added. A name is `pending` while its POST /models
    loads it: a POST of the name meanwhile is a conflict, and the routes
    that serve models do not see it. One `unloading` (its DELETE under
    way) is no model either: a POST of it waits for the DELETE to end."""

    def __init__(self) -> None:
        self.models: dict[str, _Added] = {}
        self.pending: set[str] = set()
        self.unloading: dict[str, asyncio.Future] = {}


# One registry per engine: every HTTP server over an engine shares its repository.
_registries: weakref.WeakKeyDictionary[Engine, _Registry] = weakref.WeakKeyDictionary()


def _registry(server) -> _Registry:
    registry = _registries.get(server.engine)
    if registry is None:
        registry = _registries[server.engine] = _Registry()
    return registry


def _added(server, name: str) -> _Added:
    model = _registry(server).models.get(name)
    if model is None:
        raise ModelNotFound(f"model {name!r} is not loaded")
    return model


# -- errors with the contract's own statuses ------------------------------------------

class _Forbidden(StatusError):
    """403: a url outside the allowed model roots."""

    status = 403


class _Conflict(StatusError):
    """409: the name is already loaded (or being loaded)."""

    status = 409


class _UnsupportedMedia(StatusError):
    """415: a body of a media type the contract does not read (RFC 9110 15.5.16)."""

    status = 415


class _NotAcceptable(StatusError):
    """406: no media type that Accept allows can hold the answer."""

    status = 406


def _insufficient_storage(e: MMEngineError) -> Response:
    """507 tells SageMaker to unload unused models and try again."""
    response = error_response(e)
    response.status = 507
    return response


def _invoke_error(e: MMEngineError) -> Response:
    """An invoke's error: no room to load its model again (evicted since
    POST /models), or for its call (out of memory), is the load's 507,
    where OVERLOADED's 503 would have SageMaker retry as it is, against the
    same full container."""
    return _insufficient_storage(e) if e.no_room else error_response(e)


# -- routes -------------------------------------------------------------------------

async def ping(server, request: Request) -> Response:
    health = server.engine.health()
    if health["status"] == "down":
        return json_response({"status": "unhealthy"}, 503)
    if health["status"] == "stopping":  # draining: new requests are refused
        return json_response({"status": "stopping"}, 503)
    if health["status"] == "warming":  # a model pinned by configuration is not resident yet
        return json_response({"status": "warming", "warming": health["warming"]}, 503)
    return json_response({"status": "healthy"})


async def load_model(server, request: Request) -> Response:
    server.check_control(request.token)
    body = request.json()
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object {"model_name": ..., "url": ...}')
    name, url = body.get("model_name"), body.get("url")
    if not isinstance(name, str) or not isinstance(url, str):
        raise BadRequest('"model_name" and "url" must both be strings')
    try:
        check_name(name)
    except ModelNotFound as e:
        raise BadRequest(str(e)) from None
    registry = _registry(server)
    unloading = registry.unloading.get(name)
    if unloading is not None:
        # 409 would say it is loaded, where it is going: SageMaker would
        # send it requests, and each would be a 404.
        await asyncio.shield(unloading)
    if name in registry.models or name in registry.pending:
        raise _Conflict(f"model {name!r} is already loaded"
                        + (" (or being loaded)" if name in registry.pending else ""))
    engine: Engine = server.engine
    registry.pending.add(name)
    try:
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(None, resolve_url, url, engine.config.model_roots)
        if await loop.run_in_executor(None, engine.repo.holds, name):
            raise _Conflict(f"model {name!r} already exists in the repository")
        await engine.add_model(name, path)
        try:
            await engine.load(name)
            metadata = await engine.metadata(name)
        except BaseException as e:
            try:
                await engine.remove_model(name)
            except MMEngineError as removal:  # the load's error is the one to answer
                engine_log.error("sagemaker: could not remove %r after a failed load: %r",
                                 name, removal)
            failure = getattr(e, "failure", None)
            if failure is not None:  # removed, it is not backed off: the next add loads
                raise type(e)(failure) from None
            raise
        registry.models[name] = _Added(
            url, path, tuple((t["name"], t["dtype"]) for t in metadata["inputs"]))
    except ShuttingDown:  # no room is not the trouble: 503, as /ping says
        raise
    except (Overloaded, TooLarge) as e:
        return _insufficient_storage(e)
    finally:
        registry.pending.discard(name)
    return json_response({"modelName": name, "modelUrl": url})


async def list_models(server, request: Request) -> Response:
    limit = _query_one(request, "max_results")
    if limit is None:
        limit = DEFAULT_PAGE_SIZE
    elif not (limit.isascii() and limit.isdigit()) or not limit.strip("0"):
        raise BadRequest(f"max_results must be a positive integer, not {limit!r}")
    else:  # a limit past int64's is no limit (slices take ssize_t)
        digits = limit.lstrip("0")  # "0001" is 1: its length says nothing
        limit = int(digits) if len(digits) <= 18 else sys.maxsize
    token = _query_one(request, "next_page_token")
    # The token is the last name of the previous page: a page never repeats
    # or skips a model that stayed added while the caller walked the pages.
    names = sorted(_registry(server).models)
    if token is not None:
        after = _decode_token(token)
        names = [n for n in names if n > after]
    page = names[:limit]
    models = _registry(server).models
    body: dict[str, Any] = {"models": [{"modelName": n, "modelUrl": models[n].url}
                                       for n in page]}
    if len(names) > limit:
        body["nextPageToken"] = _encode_token(page[-1])
    return json_response(body)


async def get_model(server, request: Request, name: str) -> Response:
    return json_response({"modelName": name, "modelUrl": _added(server, name).url})


async def unload_model(server, request: Request, name: str) -> Response:
    server.check_control(request.token)
    registry = _registry(server)
    model = _added(server, name)
    # Gone from the registry first: no new request reaches it while it
    # unloads (the engine lets the ones in flight finish); a POST /models
    # of the name meanwhile waits for the unload.
    del registry.models[name]
    registry.unloading[name] = done = asyncio.get_running_loop().create_future()
    try:
        await server.engine.remove_model(name)
    except ModelNotFound:
        pass  # forgotten already
    except BaseException:
        registry.models[name] = model  # still there: still served
        raise
    finally:
        del registry.unloading[name]
        done.set_result(None)
    return json_response({"modelName": name})


def invoke(server, request: Request, name: str) -> Later:
    """No task: the request is sent before this returns (for a resident model)."""
    request.answer_error = _invoke_error
    model = _added(server, name)
    accepted = _accepted(request)  # before the model runs: a 406 costs nothing
    answer, check = _ANSWERS[accepted], _CHECKS[accepted]
    media = _media(request)
    return parsed(
        len(request.body), lambda: _parse_inputs(request, media, name, model),
        lambda inputs: submitted(
            request, lambda then: server.engine.submit(
                name, inputs, token=request.token,
                then=vetted(server.engine, functools.partial(check, model=name), then)),
            lambda outputs, _: answer(outputs, name)),  # the contract names no version
        finish_on_thread=answer is _answer_csv)  # formatted a row at a time


def _check_json(outputs: dict[str, np.ndarray], model: str) -> None:
    for out, arr in outputs.items():
        if arr.dtype.kind not in "biuf":  # JSON holds numbers and booleans
            raise cannot_carry("JSON", out, arr.dtype, model)


def _answer_json(outputs: dict[str, np.ndarray], model: str) -> Response | Later:
    _check_json(outputs, model)
    return formatted(sum(arr.size for arr in outputs.values()),
                     lambda: Response(200, dumps({"outputs": outputs}, finite(outputs.values()))))


def _only_output(outputs: dict[str, np.ndarray], media: str, model: str) -> np.ndarray:
    if len(outputs) != 1:
        raise _NotAcceptable(f"{media} holds one tensor and the model answered "
                             f"{len(outputs)} ({sorted(outputs)}); accept {JSON}")
    (arr,) = outputs.values()
    if arr.dtype.kind not in "biuf":
        raise cannot_carry(media, next(iter(outputs)), arr.dtype, model)
    return arr


def _check_csv(outputs: dict[str, np.ndarray], model: str) -> np.ndarray:
    arr = _only_output(outputs, CSV, model)
    if arr.size > MAX_CSV_VALUES:
        raise _NotAcceptable(f"the answer's {arr.size} values are more than a text/csv "
                             f"answer holds ({MAX_CSV_VALUES}); accept {NPY} or {JSON}")
    return arr


def _answer_csv(outputs: dict[str, np.ndarray], model: str) -> Response:
    """One row a line: a batch's first axis; the rest of each row flattened.
    Made on a parse thread (numpy writes it a row at a time, ~2 us a row)."""
    arr = _check_csv(outputs, model)
    # A vector is a value a line (a batch of scalars: a record each, as
    # SageMaker's Batch Transform joins lines); a scalar, one line.
    rows = arr.reshape(arr.shape[0], math.prod(arr.shape[1:])) if arr.ndim else arr.reshape(1, 1)
    text = io.StringIO()
    # Enough digits for each float type to read back as itself.
    fmt = {2: "%.5g", 4: "%.9g", 8: "%.17g"}[arr.itemsize] if arr.dtype.kind == "f" else "%d"
    np.savetxt(text, rows.astype(np.uint8) if arr.dtype.kind == "b" else rows,
               delimiter=",", fmt=fmt)
    return Response(200, text.getvalue().encode(), content_type=CSV)


def _answer_npy(outputs: dict[str, np.ndarray], model: str) -> Response:
    out = io.BytesIO()
    np.save(out, _only_output(outputs, NPY, model), allow_pickle=False)
    return Response(200, out.getvalue(), content_type=NPY)


JSON, CSV, NPY = "application/json", "text/csv", "application/x-npy"
_ANSWERS = {JSON: _answer_json, CSV: _answer_csv, NPY: _answer_npy}
# Whether an answer can be written as the media type: asked as it comes
# (http.vetted), so that one that cannot is counted as refused.
_CHECKS = {JSON: _check_json, CSV: _check_csv,
           NPY: lambda outputs, model: _only_output(outputs, NPY, model)}
#: CSV is for small tables: its parser holds the GIL for each call and
#: takes ten times the text's bytes, and its writer goes a row at a time.
#: Larger tensors travel as .npy.
MAX_CSV_BYTES = 16 << 20
MAX_CSV_VALUES = 1 << 20
CSV_CHUNK = 1 << 20  # text parsed per call, so that the GIL changes hands between calls


def _accepted(request: Request) -> str:
    """The answer's media type: of those served, the one Accept weighs
    most (its q from the most specific range that matches it, RFC 9110
    12.5.1; q=0 refuses it), the earlier range on a tie, then JSON, CSV,
    .npy; JSON without an Accept."""
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return JSON
    ranges: dict[str, tuple[float, int]] = {}  # media range -> (q, position)
    for position, item in enumerate(accept.split(",")):
        media, _, params = item.partition(";")
        ranges.setdefault(media.strip().lower(), (_quality(params), position))
    best, best_rank = None, None
    for served in _ANSWERS:
        for media in (served, served.partition("/")[0] + "/*", "*/*"):
            if media in ranges:
                q, position = ranges[media]
                if q > 0 and (best_rank is None or (q, -position) > best_rank):
                    best, best_rank = served, (q, -position)
                break
    if best is None:
        raise _NotAcceptable(f"Accept {accept!r}: the answer can be {', '.join(_ANSWERS)}")
    return best


def _quality(params: str) -> float:
    """A media range's q (RFC 9110 12.4.2); one that is no number in [0, 1]
    counts as the default, 1."""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 1.0
            return q if 0 <= q <= 1 else 1.0
    return 1.0


def invocations(server, request: Request) -> Later:
    value = request.headers.get(TARGET_MODEL_HEADER)
    if not value:
        raise BadRequest("/invocations needs the X-Amzn-SageMaker-Target-Model header "
                         "naming a model loaded with POST /models")
    # Its bytes were read as latin-1; read so, one that is no UTF-8 named
    # another model (byte e9 the model "é"). Taken as written otherwise: a
    # name, as POST /models's, not a piece of a URL to %-decode.
    try:
        name = value.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"the X-Amzn-SageMaker-Target-Model header {shown(value)} is not "
                         f"UTF-8: send the model_name as POST /models was given it") from None
    return invoke(server, request, name)


ROUTES = [
    ("GET", "/ping", ping),
    ("POST", "/models", load_model),
    ("GET", "/models", list_models),
    ("GET", "/models/{name}", get_model),
    ("DELETE", "/models/{name}", unload_model),
    ("POST", "/models/{name}/invoke", invoke),
    ("POST", "/invocations", invocations),
]


# -- urls -----------------------------------------------------------------------------

def resolve_url(url: str, model_roots: str) -> str:
    """The real directory `url` names, if it lies under an allowed root.

    A url is an absolute local path or a file:// URL. The path is resolved
    (symlinks, `..`) before it is compared with the roots, themselves
    resolved, so no spelling of a path outside them gets in. Blocking (it
    touches the disk): run it off the loop."""
    path = _local_path(url)
    real = under_roots(path, model_roots, url, _Forbidden)
    # Only now, inside the roots, may the answer say what is on the disk.
    if not os.path.isdir(real):
        raise BadRequest(f"{url!r} is not a directory")
    _check_links(real, url, model_roots)
    return real


#: Entries of a model directory looked at for links, at most.
MAX_ENTRIES = 10_000


def _check_links(real: str, url: str, model_roots: str) -> None:
    """Refuses a directory holding a symlink, at any depth, whose target
    lies outside the roots: the model would read (and run) what it points
    to. Links to directories are followed (each directory once), so a link
    to a directory inside the roots cannot hide links out in it."""
    seen, stack, entries = {real}, [real], 0
    while stack:
        top = stack.pop()
        try:
            it = os.scandir(top)
        except OSError as e:  # what cannot be read cannot be vouched for
            raise _unreadable(url, os.path.relpath(top, real), e) from None
        with it:
            for entry in it:
                entries += 1
                if entries > MAX_ENTRIES:
                    raise BadRequest(f"{url!r} holds more than {MAX_ENTRIES} files")
                if entry.is_symlink():
                    under_roots(entry.path, model_roots,
                                f"{url}: {os.path.relpath(entry.path, real)}", _Forbidden)
                try:
                    is_dir = entry.is_dir()  # through a link too: a looping one raises
                except OSError as e:
                    raise _unreadable(url, os.path.relpath(entry.path, real), e) from None
                if is_dir:
                    target = os.path.realpath(entry.path)
                    if target not in seen:
                        seen.add(target)
                        stack.append(entry.path)


def _unreadable(url: str, where: str, e: OSError) -> BadRequest:
    return BadRequest(f"{url!r}: {where} cannot be read ({e.strerror})")


def _local_path(url: str) -> str:
    if url.startswith("/"):
        return _absolute(url)  # a plain path is taken literally: no %-decoding
    try:
        parts = urlsplit(url)
    except ValueError as e:  # "file://[::1/x": a bracket left open
        raise BadRequest(f"{url!r} is not a URL: {e}") from None
    if parts.scheme == "file":
        if parts.netloc.lower() not in ("", "localhost"):  # a host's name has no case
            raise BadRequest(f"{url!r}: a file:// URL must name a local path (file:///...)")
        if parts.query or parts.fragment:
            raise BadRequest(f"{url!r}: a file:// URL takes no query or fragment")
        try:
            path = unquote(parts.path, errors="strict")
        except UnicodeDecodeError:  # decoded with replacement, %E9 named a directory U+FFFD
            raise BadRequest(f"{url!r}: a file:// URL's %-escapes must be UTF-8") from None
        return _absolute(path, url)
    if parts.scheme == "":
        return _absolute(url)
    raise BadRequest(f"{url!r}: only local paths and file:// URLs can be loaded, "
                     f"not {parts.scheme}:// (remote storage is not supported)")


def _absolute(path: str, url: str | None = None) -> str:
    if "\0" in path:  # as sent, or %00
        raise BadRequest("the url contains a NUL character")
    if not os.path.isabs(path):
        raise BadRequest(f"{url or path!r}: the path must be absolute")
    return path


# -- pages ----------------------------------------------------------------------------

def _query_one(request: Request, key: str) -> str | None:
    values = request.query.get(key)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"{key} is given {len(values)} times")
    return values[0]


def _encode_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _decode_token(token: str) -> str:
    try:
        return base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_",
                                validate=True).decode()
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"next_page_token {token!r} is not one this server gave") from None


# -- request bodies -------------------------------------------------------------------

def _media(request: Request) -> str:
    content_type = request.headers.get("content-type", JSON)
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in (JSON, CSV, NPY):
        raise _UnsupportedMedia(f"unsupported Content-Type {content_type!r}: send {JSON}, "
                                f"{CSV} or {NPY}")
    return media


def _parse_inputs(request: Request, media: str, name: str,
                  model: _Added) -> dict[str, np.ndarray]:
    declared = dict(model.inputs)
    if media in (CSV, NPY):  # one tensor, for the model's one input
        if len(declared) != 1:
            raise BadRequest(f"{name}: {media} holds one tensor, for a model that declares "
                             f"exactly one input (inputs: {sorted(declared)}); send "
                             f"{JSON}")
        key = next(iter(declared))
        dtype = np.dtype(declared[key])
        if media == NPY:  # typed already: the engine refuses a dtype that does not match
            return {key: _from_npy(request.body)}
        # Numbers in text, as JSON's are: cast as those are, or refused.
        return {key: cast_json_array(f"input {key!r}", _csv_input(request.body, dtype), dtype)}
    body = request.json()
    if isinstance(body, list):
        if len(declared) != 1:
            raise BadRequest(f"{name}: a bare list is accepted only by a model with "
                             f"exactly one declared input; send "
                             f'{{"inputs": {{name: list}}}} (inputs: {sorted(declared)})')
        values = {next(iter(declared)): body}
    elif isinstance(body, dict) and isinstance(body.get("inputs"), dict) and body["inputs"]:
        values = body["inputs"]
    else:
        raise BadRequest('the body must be {"inputs": {name: nested list}}, or a bare '
                         'nested list for a model with one input')
    arrays, exact = {}, []  # exact: the body read again as written, once (_past_64_bits)
    for key, value in values.items():
        if declared and key not in declared:
            raise BadRequest(f"{name} has no input {key!r} (inputs: {sorted(declared)})")
        what = f"input {key!r}"
        dtype = declared.get(key)
        if dtype is not None:
            arrays[key] = array_from_json(what, value, np.dtype(dtype))
            continue
        array = array_from_json(what, value, None)
        if array.dtype.kind == "u" or _past_64_bits(request, body, key, array, exact):
            # torch.tensor() refuses integers past int64 (beside no fraction)
            raise BadRequest(f"{what}: an integer beyond int64's range")
        # Undeclared, fractions become float32 (as torch.tensor() makes them,
        # and SageMaker's PyTorch container): numpy's float64 fits no float32
        # model. Integers stay int64, booleans bool.
        arrays[key] = cast_json_array(what, array, _FLOAT32 if array.dtype.kind == "f" else None)
    return arrays


def _past_64_bits(request: Request, body: Any, key: str, array: np.ndarray,
                  exact: list) -> bool:
    """Whether `array`, JSON's numbers for input `key` read as floats, were
    written as integers: orjson reads one past 64 bits as a float. `exact`
    keeps the body read as written (by json, a rare body's second read)."""
    if array.dtype.kind != "f" or not array.size or np.abs(array).max() < 2.0 ** 63:
        return False
    if not exact:
        try:
            exact.append(json.loads(request.body))
        except RecursionError:  # orjson reads deeper than json
            raise BadRequest("the body's JSON is nested too deeply") from None
    value = exact[0] if isinstance(body, list) else exact[0]["inputs"][key]
    return all(type(v) is int for v in np.array(value, dtype=object).flat)


_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)
_INT64, _UINT64 = np.dtype(np.int64), np.dtype(np.uint64)
# The types a text/csv body is read as for a model of a whole-number input,
# the first that reads every number: whole numbers read whole (a float64
# holds 53 bits), the model's own 64-bit type first (the other reads what
# is out of its range, and the cast says so); a fraction or "1e3", float64.
_WHOLE_FIRST = {"i": (_INT64, _UINT64, _FLOAT64), "u": (_UINT64, _INT64, _FLOAT64)}


def _csv_input(body: bytes, dtype: np.dtype) -> np.ndarray:
    """A text/csv body's numbers for an input of `dtype`, to cast: a
    whole-number model's read whole where they are (_WHOLE_FIRST), or as
    float64 numbers that are whole and exact, as int64."""
    if dtype.kind not in "iu":
        return _from_csv(body)
    array = _from_csv(body, _WHOLE_FIRST[dtype.kind])
    if array.dtype.kind == "f" and np.array_equal(array, np.trunc(array)) \
            and np.abs(array).max(initial=0) < 2 ** 53:  # whole, and exact in a float64
        array = array.astype(np.int64)
    return array


def _from_csv(body: bytes, dtypes: tuple = (_FLOAT64,)) -> np.ndarray:
    """Numbers separated by commas, a row a line: a 2-D array of the first
    of `dtypes` that reads every number (BadRequest with the last one's
    error where none does), parsed once, CSV_CHUNK of lines at a time. (A
    body read whole as each type in turn took three parses to find that
    its last number was a fraction.)"""
    text = _csv_text(body)
    parts = []  # [chunk, long, array] of each chunk that holds numbers, and each long one
    level = 0  # the index in `dtypes` of the type that has read every chunk so far
    try:
        for chunk, long in _csv_chunks(text):
            array, at = _first_read(chunk, long, dtypes, level)
            if array.size or long:
                parts.append([chunk, long, array])
            if at > level:  # the chunks before, as that type would read them
                level = _read_as(parts, dtypes, at)
        array = np.concatenate([part[2] for part in parts]) if parts else None
    except ValueError as e:  # a field that is no number, rows of unequal length
        raise BadRequest(f"the text/csv body is not rows of numbers separated by commas: "
                         f"{e}") from None
    if array is None or not array.size:
        raise BadRequest("the text/csv body holds no numbers")
    if not np.isfinite(array).all():  # as JSON, which has no NaN or infinity
        raise BadRequest("the text/csv body holds a number that is not finite")
    return array


def _csv_text(body: bytes) -> str:
    if len(body) > MAX_CSV_BYTES:
        raise TooLarge(f"a text/csv body is at most {MAX_CSV_BYTES} bytes, not {len(body)}; "
                       f"send a larger tensor as {NPY}")
    try:
        return body.removeprefix(b"\xef\xbb\xbf").decode("ascii")  # a spreadsheet's BOM
    except UnicodeDecodeError:
        raise BadRequest("the text/csv body is not ASCII") from None


def _csv_chunks(text: str):
    """(chunk, long) for each chunk of `text` to parse in one call: whole
    lines, up to CSV_CHUNK; one line longer than that alone, `long`, to
    parse in pieces (_long_row): parsed at once, a 16 MiB line held the
    loop's GIL for a second. Chunks of white space alone are left out."""
    at = 0
    while at < len(text):
        end = len(text) if at + CSV_CHUNK >= len(text) else \
            text.rfind("\n", at, at + CSV_CHUNK) + 1
        if not end:
            end = text.find("\n", at + CSV_CHUNK) + 1 or len(text)
            yield text[at:end], True
        elif text[at:end].strip():
            yield text[at:end], False
        at = end


def _first_read(chunk: str, long: bool, dtypes: tuple, level: int) -> tuple[np.ndarray, int]:
    """`chunk` read as the first of `dtypes[level:]` that reads it, and
    that type's index; the last one's ValueError where none does."""
    last = len(dtypes) - 1
    for at in range(level, last):
        with contextlib.suppress(ValueError):
            return _read(chunk, long, dtypes[at]), at
    return _read(chunk, long, dtypes[last]), last


def _read(chunk: str, long: bool, dtype: np.dtype) -> np.ndarray:
    if long:
        return _long_row(chunk, dtype)
    with warnings.catch_warnings():  # of a chunk of comments: no rows
        warnings.simplefilter("ignore", UserWarning)
        return np.loadtxt(io.StringIO(chunk), delimiter=",", dtype=dtype, ndmin=2)


def _read_as(parts: list, dtypes: tuple, level: int) -> int:
    """`parts`' arrays, each chunk's, as `dtypes[level]` reads them, or as
    a later type where one of them is not read by it (a later chunk read
    as a later type first): the type's index."""
    while True:
        arrays = [_converted(*part, dtypes[level]) for part in parts]
        if all(array is not None for array in arrays):
            for part, array in zip(parts, arrays):
                part[2] = array
            return level
        level += 1


def _converted(chunk: str, long: bool, array: np.ndarray,
               dtype: np.dtype) -> np.ndarray | None:
    """`array`, `chunk` as one type read it, as `dtype` (a later one of
    _WHOLE_FIRST's) reads `chunk`; None where it does not. Converted
    where that is what the parse gives: the whole-number parsers read the
    same text (a sign, digits, blanks), the unsigned one no sign "-", not
    even "-0"; and the float64 a whole number reads as is used only if whole
    and below 2^53 (_csv_input), where the conversion is exact."""
    if array.dtype == dtype or dtype.kind == "f" or not array.size:
        return array.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    if int(array.min()) < info.min or int(array.max()) > info.max:
        return None
    if dtype.kind == "u" and "-" in chunk and not array.all():  # a "-0", maybe
        try:
            return _read(chunk, long, dtype)
        except ValueError:
            return None
    return array.astype(dtype)


def _long_row(line: str, dtype) -> np.ndarray:
    """One row of a line longer than CSV_CHUNK, parsed a piece of up to
    CSV_CHUNK at a time, each piece cut at a comma."""
    line = line.partition("#")[0].rstrip("\r\n")  # a comment, as np.loadtxt reads one
    pieces = []
    at = 0
    while at <= len(line):
        end = len(line) if at + CSV_CHUNK >= len(line) else line.rfind(",", at, at + CSV_CHUNK)
        if end < at:
            raise ValueError(f"a field longer than {CSV_CHUNK} characters")
        pieces.append(np.loadtxt(io.StringIO(line[at:end]), delimiter=",", dtype=dtype,
                                 ndmin=1))
        at = end + 1
    return np.concatenate(pieces)[None, :]


def _from_npy(body: bytes) -> np.ndarray:
    """A .npy file's array of numbers or booleans, a view of the body where
    it is in C order: its header is checked against the bytes that follow
    before anything is made (a shape of terabytes is only a header)."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"version {version} is not taken")
        shape, fortran, dtype = read_header(stream)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise BadRequest(f"the application/x-npy body is not a .npy file: {e}") from None
    if dtype.kind not in "biuf" or dtype.fields or dtype.subdtype:
        raise BadRequest(f"the application/x-npy body holds {dtype}: only numbers and "
                         f"booleans are taken")
    if len(shape) > 32 or not all(type(d) is int and 0 <= d < 1 << 62 for d in shape):
        raise BadRequest(f"the application/x-npy array's shape {shape} is not one numpy "
                         f"makes (32 axes at most, each of 0 or more)")
    count = math.prod(shape)
    if len(body) - stream.tell() != count * dtype.itemsize:
        raise BadRequest(f"the application/x-npy body has {len(body) - stream.tell()} bytes "
                         f"of data; its header says {count} x {dtype.itemsize}")
    try:
        array = np.frombuffer(body, dtype, count, stream.tell()).reshape(
            shape, order="F" if fortran else "C")
    except (ValueError, OverflowError) as e:  # a dimension past numpy's
        raise BadRequest(f"the application/x-npy array cannot be made: {e}") from None
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    # (np.ascontiguousarray would make a 0-d array 1-d)
    return array if array.flags.c_contiguous else array.copy(order="C")

