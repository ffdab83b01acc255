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


def decode_tensors(tensors: Any) -> dict[str, np.ndarray]:
    """Arrays viewing the frame's bytes (read-only, no copy)."""
    if not isinstance(tensors, dict) or not tensors:
        raise BadRequest("'inputs' must be a non-empty map of name to tensor")
    out = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, dict):
            raise BadRequest("each tensor must be a map under a string name")
        try:
            dtype = np.dtype(t["dtype"])
            shape = [int(d) for d in t["shape"]]
            data = t["data"]
            if dtype.hasobject or not isinstance(data, bytes):
                raise TypeError("data must be bin and dtype a plain numeric type")
            out[name] = np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape)
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
