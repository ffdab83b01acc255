"""KServe v2 / Open Inference Protocol routes, with the binary tensor data
and model repository extensions, so that tritonclient and other standard
clients work unchanged.

Infer is the hot path: the request's JSON is decoded once, binary inputs
are numpy views of the request body (no copy), the engine is called with
`submit` from the connection's own callback (no task when the model is
resident), and the response is built from one small JSON header plus, for
binary outputs, the outputs' raw bytes. JSON `data` is parsed into Python
floats and written from the array by orjson; clients that care about speed
ask for binary outputs (tritonclient does by default).

Datatypes map one to one to numpy (BOOL, UINT8..UINT64, INT8..INT64, FP16,
FP32, FP64); BYTES and BF16 are refused with 400, since mmengine's models
take numeric tensors only. Binary tensors are little-endian, row-major.

Tokens come as `Authorization: Bearer <token>`: infer hands it to the
engine (for models whose manifest lists tokens), repository load and
unload check it against the control token, if one is configured.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
from typing import Callable

import numpy as np

import mmengine
from mmengine import auth
from mmengine.errors import (BadRequest, LoadFailed, MMEngineError, ModelNotFound,
                             cannot_carry, shown)
from mmengine.server import metrics
from mmengine.server.http import (Later, Request, Response, array_from_json, dumps, finite,
                                  formatted, loads, parsed, submitted, vetted)
from mmengine.storage import parse_version

HEADER_LENGTH = "inference-header-content-length"  # request headers are lower-case

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
# Keyed by dtype objects: equal dtypes hash equal, whatever their spelling.
_DATATYPE_OF: dict[np.dtype, str] = {dt: name for name, dt in DATATYPES.items()}
_UNSUPPORTED = {"BYTES", "BF16"}


def datatype_of(dtype: np.dtype | str) -> str:
    """The KServe name of a numpy dtype (its numpy name where KServe has none)."""
    dtype = np.dtype(dtype)
    return _DATATYPE_OF.get(dtype) or dtype.name


def _version(version: str | None) -> int | None:
    return None if version is None else parse_version(version)  # "0": 404, as "01" is


# -- health and metadata ---------------------------------------------------------

# The protocol asks for an empty body, and its clients read only the status
# (tritonclient); KServe's own SDK reads {"live": ...} / {"ready": ...}, as
# KServe's server sends: both are satisfied.
_LIVE = dumps({"live": True})


async def live(server, request: Request) -> Response:
    return Response(200, _LIVE)


async def ready(server, request: Request) -> Response:
    # Not while a model pinned by configuration is cold, nor while draining.
    serving = server.engine.health()["status"] == "serving"
    return Response(200 if serving else 400, dumps({"ready": serving}))


async def server_metadata(server, request: Request) -> Response:
    return Response(200, dumps({
        "name": "mmengine", "version": mmengine.__version__,
        "extensions": ["binary_tensor_data", "model_repository", "statistics"]}))


async def model_metadata(server, request: Request, name: str,
                         version: str | None = None) -> Response:
    meta = await server.engine.metadata(name, _version(version))
    return Response(200, dumps({
        "name": meta["name"],
        "versions": [str(v) for v in meta["versions"]],
        "platform": meta["backend"],
        "inputs": [_tensor_metadata(t) for t in meta["inputs"]],
        "outputs": [_tensor_metadata(t) for t in meta["outputs"]],
    }))


def _tensor_metadata(t: dict) -> dict:
    return {"name": t["name"], "datatype": datatype_of(t["dtype"]), "shape": t["shape"]}


async def model_config(server, request: Request, name: str,
                       version: str | None = None) -> Response:
    """Triton's model configuration (tritonclient's get_model_config), for
    the clients and tools that read a model's tensors there: what the
    metadata says, as Triton writes it: max_batch_size 0, and dims are
    whole shapes (-1: any size). A model that takes batches (its manifest's
    max_batch_size) is joined with others by its worker, out of the
    client's sight: each request keeps its whole shape."""
    meta = await server.engine.metadata(name, _version(version))

    def tensors(ts: list[dict]) -> list[dict]:
        # Triton's enum has no value for a dtype KServe lacks (complex64):
        # TYPE_INVALID there, where a client parses the enum; the metadata
        # names it.
        return [{"name": t["name"], "data_type": "TYPE_" + _DATATYPE_OF.get(
                    np.dtype(t["dtype"]), "INVALID"), "dims": t["shape"]} for t in ts]
    return Response(200, dumps({
        "name": meta["name"], "platform": meta["backend"], "backend": meta["backend"],
        "max_batch_size": 0, "input": tensors(meta["inputs"]),
        "output": tensors(meta["outputs"])}))


async def model_ready(server, request: Request, name: str,
                      version: str | None = None) -> Response:
    """200 once the model is resident, 400 before (and while it loads);
    404 for a model the repository does not have."""
    try:
        meta = await server.engine.metadata(name, _version(version))
    except ModelNotFound:
        raise
    except MMEngineError:  # it exists but cannot be served: not ready
        return Response(400, b"")
    return Response(200 if meta["ready"] else 400, b"")


async def model_stats(server, request: Request, name: str | None = None,
                      version: str | None = None) -> Response:
    """Triton's statistics extension (tritonclient's
    get_inference_statistics): every model version the engine knows, one
    model's versions, or one version; 404 for what the repository lacks.
    Counted since the server started (since the first /metrics or /stats
    for an embedded engine that never attached its metrics)."""
    counts = metrics.attach(server.engine)
    repo, loop = server.engine.repo, asyncio.get_running_loop()
    if name is None:  # thousands of them: formatted off the loop
        copied = counts.version_counts(rows=(await server.engine.collect_stats())["models"])
    else:
        if version is None:
            versions = await loop.run_in_executor(None, repo.versions, name)
        else:
            versions = (await loop.run_in_executor(None, repo.check_version, name, version),)
        copied = counts.version_counts([(name, v) for v in versions])
    body = await loop.run_in_executor(
        None, lambda: dumps({"model_stats": metrics.triton_stats(copied)}))
    return Response(200, body)


# -- the repository extension ------------------------------------------------------

_STATES = {"resident": "READY", "loading": "LOADING", "fetching": "LOADING",
           "evicting": "UNLOADING"}  # any other: UNAVAILABLE


async def repository_index(server, request: Request) -> Response:
    body = request.json()
    if body is not None and not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object, e.g. {\"ready\": true}")
    only_ready = (body or {}).get("ready", False)
    if type(only_ready) is not bool:  # "false" is true to bool()
        raise BadRequest(f"'ready' must be true or false, not {shown(only_ready)}")
    rows = []
    for row in await server.engine.models():
        state = _STATES.get(row["state"], "UNAVAILABLE")
        if only_ready and state != "READY":
            continue
        rows.append({"name": row["name"], "version": str(row["version"]), "state": state,
                     "reason": row["last_error"] if state == "UNAVAILABLE" else ""})
    return Response(200, dumps(rows))


async def repository_load(server, request: Request, name: str) -> Response:
    server.check_control(request.token)
    params = _load_params(request)
    if params:
        raise BadRequest(f"load parameters are not supported ({', '.join(sorted(params))}): "
                         f"mmengine loads models from its repository as they are")
    await server.engine.load(name)
    return Response(200, b"")


async def repository_unload(server, request: Request, name: str) -> Response:
    server.check_control(request.token)
    _load_params(request)  # unload_dependents: there are no dependents
    await server.engine.unload_all(name)  # a model is unloaded whole, every version
    return Response(200, b"")


def _load_params(request: Request) -> dict:
    """The request's parameters other than unload_dependents (the body may be empty)."""
    body = request.json()
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object, with 'parameters' an object")
    parameters = body.get("parameters")
    if parameters is None:  # absent, or null: as in an infer request
        parameters = {}
    if not isinstance(parameters, dict):
        raise BadRequest("the body must be a JSON object, with 'parameters' an object")
    return {k: v for k, v in parameters.items() if k != "unload_dependents"}


# -- infer: the hot path ----------------------------------------------------------

def infer(server, request: Request, name: str, version: str | None = None) -> Later:
    """No task: the request is sent before this returns (for a resident
    model), unless its JSON is long enough to be parsed on a thread first."""
    v = _version(version)
    header, binary = _split_body(request)

    def send(infer: _Infer) -> Later:
        # A partial, not a closure over `infer`: one made per request left the
        # front-end's RSS 25 MiB higher after a burst of refusals (tests/test_overload).
        check = functools.partial(_check_answer, infer.wanted, model=name)
        return submitted(
            request,
            lambda then: server.engine.submit(name, infer.inputs, v, infer.timeout,
                                              request.token,
                                              vetted(server.engine, check, then)),
            lambda outputs, served: _infer_response(
                infer.req, infer.wanted, infer.binary_default, name,
                version if served is None else str(served), outputs))
    if binary is not None and not header:
        return _raw_infer(server, name, v, binary, request.token, send)
    return parsed(len(header), lambda: _parse_infer(header, binary), send)


def _raw_infer(server, name: str, version: int | None, body: memoryview,
               token: str | None, send: Callable[[_Infer], Later]) -> Later:
    """Triton's raw binary request (Inference-Header-Content-Length: 0):
    the whole body is the data of the model's one input, whose name,
    datatype and shape its manifest declares (one -1 is sized by the
    body). The outputs come back binary: a client that sends no JSON
    reads none."""
    async def look_then_send() -> Response:
        try:
            meta = await server.engine.metadata(name, version)
        except LoadFailed as e:  # why, only to a caller it would serve (as infer says it)
            auth.check(getattr(e, "token_digests", ()), token, f"model {name!r}")
            raise
        later = send(_Infer({}, _raw_inputs(meta, body), None, True, None))
        return later.finish(await later.future)  # cancelled with this task
    later = Later.of(asyncio.get_running_loop().create_task(look_then_send()))
    later.inference = True
    return later


def _raw_inputs(meta: dict, body: memoryview) -> dict[str, np.ndarray]:
    declared = meta["inputs"]
    if len(declared) != 1:
        raise BadRequest(f"a raw binary request (Inference-Header-Content-Length 0) is for "
                         f"a model that declares one input; {meta['name']} declares "
                         f"{len(declared)}: send the JSON header first")
    t = declared[0]
    name, dtype, shape = t["name"], np.dtype(t["dtype"]), list(t["shape"])
    if _DATATYPE_OF.get(dtype) is None:
        raise BadRequest(f"input {name!r} is {dtype}, which KServe v2 cannot carry")
    row = math.prod(d for d in shape if d != -1) * dtype.itemsize  # bytes of the known dims
    free = shape.count(-1)
    if free > 1 or free and not row:
        raise BadRequest(f"a raw binary request cannot size input {name!r} of shape {shape} "
                         f"from its bytes alone: send the JSON header first")
    if free:
        if len(body) % row:
            raise BadRequest(f"input {name!r}: {len(body)} bytes are not a whole number of "
                             f"{row}-byte rows of shape {shape} {dtype}")
        shape[shape.index(-1)] = len(body) // row
    elif len(body) != row:
        raise BadRequest(f"input {name!r}: {len(body)} bytes for shape {shape} {dtype}, "
                         f"which takes {row}")
    return {name: _binary_input(name, body, dtype, shape)}


@dataclasses.dataclass(frozen=True)
class _Infer:
    req: dict
    inputs: dict[str, np.ndarray]
    timeout: float | None
    binary_default: bool
    wanted: list[tuple[str, bool]] | None


def _parse_infer(header: bytes, binary: memoryview | None) -> _Infer:
    try:
        req = loads(header, "the inference request")
    except BadRequest as e:
        # What binary data after the JSON looks like to the parser.
        if binary is not None or not any(w in str(e) for w in ("after document", "UTF-8")):
            raise
        raise BadRequest(f"{e} (a body with binary tensor data needs the "
                         f"Inference-Header-Content-Length header)") from None
    if type(req) is not dict:
        raise BadRequest("the inference request must be a JSON object")
    params = _parameters(req, "the inference request")
    if type(req.get("id", "")) not in (str, type(None)):  # null: none, as other optional fields
        raise BadRequest("'id' must be a string")
    inputs = _parse_inputs(req.get("inputs"), binary)
    binary_default = _flag(params, "binary_data_output", False)
    return _Infer(req, inputs, _timeout(params), binary_default,
                  _parse_outputs(req.get("outputs"), binary_default))


def _parameters(obj: dict, what: str) -> dict:
    """`obj`'s "parameters": a JSON object, or absent (null: absent)."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if type(params) is not dict:
        raise BadRequest(f"{what}: 'parameters' must be a JSON object")
    return params


def _flag(params: dict, key: str, default: bool) -> bool:
    """A boolean parameter: JSON true or false ("false" is true to bool())."""
    value = params.get(key)
    if value is None:  # absent, or null: as "parameters" themselves
        return default
    if type(value) is not bool:
        raise BadRequest(f"parameter {key!r} must be true or false, not {shown(value)}")
    return value


def _split_body(request: Request) -> tuple[bytes, memoryview | None]:
    """The JSON header and the binary tensor data after it (a view, no copy)."""
    body = request.body
    length = request.headers.get(HEADER_LENGTH)
    if length is None:
        return body, None
    length = length.strip(" \t")  # a field's value has none around it (RFC 9110 5.5)
    digits = length.lstrip("0") or "0"  # "0074" is 74: leading zeros say nothing of its size
    if not (length.isascii() and length.isdigit() and len(digits) <= 19) \
            or int(digits) > len(body):
        raise BadRequest(f"Inference-Header-Content-Length {length[:40]!r} is not a length "
                         f"within the body of {len(body)} bytes")
    n = int(digits)
    return body[:n], memoryview(body)[n:]  # n = 0: a raw binary request (_raw_infer)


def _parse_inputs(tensors, binary: memoryview | None) -> dict[str, np.ndarray]:
    if type(tensors) is not list or not tensors:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    arrays = {}
    offset = 0
    for t in tensors:
        if type(t) is not dict:
            raise BadRequest("each input must be a JSON object")
        name, shape, dtype = _tensor_header(t)
        if name in arrays:  # which one was meant? (the last used to win, unsaid)
            raise BadRequest(f"input {name!r} is given twice")
        count = math.prod(shape)
        params = _parameters(t, f"input {name!r}")
        _no_shared_memory(params, f"input {name!r}")
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in t:
                raise BadRequest(f"input {name!r} has both 'data' and binary_data_size: "
                                 f"which one is meant?")
            if binary is None:
                raise BadRequest(f"input {name!r} has binary_data_size but the request has "
                                 f"no Inference-Header-Content-Length header")
            if type(size) is not int or size != count * dtype.itemsize:
                raise BadRequest(f"input {name!r}: binary_data_size {shown(size)} is not "
                                 f"{count} x {dtype.itemsize} bytes of shape {shape}")
            if offset + size > len(binary):
                raise BadRequest(f"input {name!r}: the body ends before its binary data")
            arrays[name] = _binary_input(name, binary, dtype, shape, count, offset)
            offset += size
        else:
            arrays[name] = _from_json(name, t.get("data"), dtype, shape, count)
    if binary is not None and offset != len(binary):
        raise BadRequest(f"the body has {len(binary) - offset} bytes of binary data that "
                         f"no input claims")
    return arrays


def _no_shared_memory(params: dict, what: str) -> None:
    if "shared_memory_region" in params:  # Triton's extension: its data is not in the body
        raise BadRequest(f"{what}: the shared-memory extension is not supported; send the "
                         f"tensor's data in the body (binary_data)")


def _tensor_header(t: dict) -> tuple[str, list, np.dtype]:
    name, shape, datatype = t.get("name"), t.get("shape"), t.get("datatype")
    if type(name) is not str:
        raise BadRequest("each input needs a string 'name'")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of non-negative integers")
    dtype = DATATYPES.get(datatype) if type(datatype) is str else None
    if dtype is None:
        if type(datatype) is str and datatype in _UNSUPPORTED:
            raise BadRequest(f"input {name!r}: datatype {datatype} is not supported; "
                             f"mmengine's models take numeric tensors only")
        raise BadRequest(f"input {name!r}: unknown datatype {shown(datatype)}; one of "
                         f"{', '.join(DATATYPES)}")
    return name, shape, dtype


def _from_json(name: str, data, dtype: np.dtype, shape: list, count: int) -> np.ndarray:
    if type(data) is not list:
        raise BadRequest(f"input {name!r} has neither 'data' (a list) nor binary data")
    arr = array_from_json(f"input {name!r}", data, dtype)  # flat or nested, as the protocol allows
    if arr.size != count:
        raise BadRequest(f"input {name!r}: {arr.size} elements of data for shape {shape}")
    return _shaped(name, arr, shape)


def _binary_input(name: str, data: memoryview, dtype: np.dtype, shape: list,
                  count: int = -1, offset: int = 0) -> np.ndarray:
    """Input `name` viewed in the body's binary data (no copy)."""
    arr = _shaped(name, np.frombuffer(data, dtype, count, offset), shape)
    if dtype.kind == "b" and arr.view(np.uint8).max(initial=0) > 1:
        raise BadRequest(f"input {name!r}: a BOOL is one byte, 0 or 1")
    return arr


def _shaped(name: str, arr: np.ndarray, shape: list) -> np.ndarray:
    try:  # numpy's limits: 64 dimensions, and no more than its index can count
        return arr.reshape(shape)
    except ValueError as e:
        raise BadRequest(f"input {name!r}: shape {shape} cannot be made: {e}") from None


def _timeout(params: dict) -> float | None:
    timeout = params.get("timeout")  # microseconds, as Triton has it
    if timeout is None:
        return None
    if type(timeout) not in (int, float) or not timeout > 0:  # NaN is not > 0 either
        raise BadRequest("parameter 'timeout' must be a positive number of microseconds")
    return timeout / 1e6


def _infer_response(req: dict, wanted: list[tuple[str, bool]] | None, binary_default: bool,
                    name: str, version: str | None,
                    outputs: dict[str, np.ndarray]) -> Response | Later:
    _check_answer(wanted, outputs, name)
    if wanted is None:
        wanted = [(k, binary_default) for k in outputs]
    tensors, buffers = [], []
    for out, binary in wanted:
        arr = outputs[out]
        if not arr.dtype.isnative:  # a model's big-endian output: the same values, native
            arr = arr.astype(arr.dtype.newbyteorder("="))
        t = {"name": out, "datatype": _DATATYPE_OF[arr.dtype], "shape": list(arr.shape)}
        if binary:
            arr = np.ascontiguousarray(arr)  # the engine's outputs already are: no copy
            t["parameters"] = {"binary_data_size": arr.nbytes}
            # (flat first: a view of a shape with a 0 in it cannot be cast)
            buffers.append(memoryview(arr.reshape(-1)).cast("B"))
        else:
            t["data"] = arr.ravel()  # written by dumps() straight from the array
        tensors.append(t)
    head = {"model_name": name, "outputs": tensors}
    if version is not None:
        head["model_version"] = version
    rid = req.get("id")
    if rid is not None:
        head["id"] = rid
    in_json = [outputs[out] for out, binary in wanted if not binary]

    def make() -> Response:
        header = dumps(head, finite(in_json))
        if not buffers:
            return Response(200, header)
        # The outputs go out as they are: the core writes the buffers in order.
        return Response(200, [header, *buffers],
                        [("Inference-Header-Content-Length", str(len(header)))],
                        "application/octet-stream")
    return formatted(sum(arr.size for arr in in_json), make)


def _check_answer(wanted: list[tuple[str, bool]] | None, outputs: dict[str, np.ndarray],
                  model: str) -> None:
    """Whether the outputs asked for (None: all) are the model's, of a
    datatype the protocol has."""
    for out, _ in wanted or ():
        if out not in outputs:
            raise BadRequest(f"requested output {out!r} is not one of the model's: "
                             f"{sorted(outputs)}")
    for out in outputs if wanted is None else (out for out, _ in wanted):
        dtype = outputs[out].dtype
        if _DATATYPE_OF.get(dtype if dtype.isnative else dtype.newbyteorder("=")) is None:
            raise cannot_carry("KServe v2", out, dtype, model)


def _parse_outputs(requested, binary_default: bool) -> list[tuple[str, bool]] | None:
    """The outputs a request asks for, each with whether it goes binary,
    checked before the model runs (their names, after); None: every one."""
    if requested is None:
        return None
    if type(requested) is not list:
        raise BadRequest("'outputs' must be a list")
    if not requested:  # as Triton takes it: none named, every one
        return None
    wanted: dict[str, bool] = {}
    for o in requested:
        name = o.get("name") if type(o) is dict else None
        if type(name) is not str:
            raise BadRequest("each requested output needs a string 'name'")
        if name in wanted:
            raise BadRequest(f"output {name!r} is requested twice")
        p = _parameters(o, f"output {name!r}")
        if "classification" in p:
            raise BadRequest("the classification extension is not supported")
        _no_shared_memory(p, f"output {name!r}")
        wanted[name] = _flag(p, "binary_data", binary_default)
    return list(wanted.items())


# The infer routes first: the router tries routes in order.
ROUTES: list = [
    ("POST", "/v2/models/{name}/infer", infer),
    ("POST", "/v2/models/{name}/versions/{version}/infer", infer),
    ("GET", "/v2/health/live", live),
    ("GET", "/v2/health/ready", ready),
    ("GET", "/v2", server_metadata),
    ("GET", "/v2/models/stats", model_stats),  # before {name}: as Triton, "stats" is this
    ("GET", "/v2/models/{name}/stats", model_stats),
    ("GET", "/v2/models/{name}/versions/{version}/stats", model_stats),
    ("GET", "/v2/models/{name}", model_metadata),
    ("GET", "/v2/models/{name}/versions/{version}", model_metadata),
    ("GET", "/v2/models/{name}/ready", model_ready),
    ("GET", "/v2/models/{name}/versions/{version}/ready", model_ready),
    ("GET", "/v2/models/{name}/config", model_config),
    ("GET", "/v2/models/{name}/versions/{version}/config", model_config),
    ("POST", "/v2/repository/index", repository_index),
    ("POST", "/v2/repository/models/{name}/load", repository_load),
    ("POST", "/v2/repository/models/{name}/unload", repository_unload),
]
