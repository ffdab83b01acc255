"""The binary TCP protocol: frames, operations, tensors. docs/protocol.md is
its specification for other languages; this module is its one implementation,
used by the server and the SDK alike.

A frame is a 4-byte little-endian unsigned length N, then N bytes of one
msgpack map. Requests carry an "id" chosen by the client; responses carry the
same id and may come back in any order.

    request   {"id": int, "op": str, ...op fields}
    response  {"id": int, "ok": true, ...result fields}
              {"id": int, "ok": false, "error": {"code": int, "name": str,
                                                 "message": str}}

A tensor is a map {"dtype": numpy dtype name, "shape": [int...],
"data": bin (C order, little-endian)}.
"""
from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np

from mmengine.errors import BadRequest, ErrorCode, MMEngineError, error_for

OPS = ("infer", "load", "unload", "pin", "unpin", "list", "stats", "health")
LENGTH = struct.Struct("<I")
DEFAULT_MAX_FRAME = 64 << 20


def frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return LENGTH.pack(len(body)) + body


def decode(body) -> dict:
    """The map of one frame body; BadRequest if it is not one."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise BadRequest(f"malformed frame: {type(e).__name__}: {e}") from None
    if not isinstance(message, dict):
        raise BadRequest("a frame must hold a msgpack map")
    return message


# -- tensors -----------------------------------------------------------------

_names: dict[np.dtype, str] = {}


def _dtype_name(dtype: np.dtype) -> str:
    # dtype.name is computed in Python on every access; this runs per tensor.
    name = _names.get(dtype)
    if name is None:
        name = _names[dtype] = dtype.name
    return name


def encode_tensors(arrays: dict[str, np.ndarray]) -> dict:
    out = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        out[name] = {"dtype": _dtype_name(a.dtype), "shape": list(a.shape), "data": a.data}
    return out


#: The dtypes a tensor may have on the wire (docs/protocol.md), little-endian.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64",
                 "int64", "float16", "float32", "float64", "complex64", "complex128")}


def decode_tensors(tensors: Any) -> dict[str, np.ndarray]:
    """Arrays viewing the frame's bytes (read-only, no copy)."""
    if not isinstance(tensors, dict) or not tensors:
        raise BadRequest("'inputs' must be a non-empty map of name to tensor")
    out = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, dict):
            raise BadRequest("each tensor must be a map under a string name")
        try:
            dtype, shape, data = t["dtype"], t["shape"], t["data"]
            if type(dtype) is not str or dtype not in DTYPES:
                raise TypeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
            if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
                raise TypeError("shape must be a list of non-negative integers")
            if not isinstance(data, bytes):
                raise TypeError("data must be bin")
            out[name] = np.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)
        except (KeyError, TypeError, ValueError) as e:
            raise BadRequest(f"tensor {name!r}: {type(e).__name__}: {e}") from None
    return out


# -- errors ------------------------------------------------------------------

def error_response(rid: Any, e: MMEngineError) -> dict:
    return {"id": rid, "ok": False,
            "error": {"code": int(e.code), "name": e.code.name, "message": str(e)}}


def raise_for(response: dict) -> dict:
    """The response if it succeeded; else the typed error it carries."""
    if response.get("ok"):
        return response
    err = response.get("error") or {}
    raise error_for(err.get("code", ErrorCode.INTERNAL), err.get("message", "no message"))
