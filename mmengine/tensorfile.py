"""The safetensors file format, without torch (the front-end reads headers
to size a model before its load; only workers import torch):

    8 bytes    N, the header length, unsigned little-endian
    N bytes    JSON: {tensor name: {"dtype": "F32", "shape": [...],
               "data_offsets": [begin, end]}, optional "__metadata__": {str: str}}
    the rest   raw little-endian tensor data; offsets count from here
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from mmengine.errors import LoadFailed

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "F16": 2,
            "BF16": 2, "F32": 4, "F64": 8}
# A larger header is not weights metadata but a corrupt or hostile file.
MAX_HEADER_BYTES = 100 << 20


def read_header(path: Path, where: str) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensor entries of a safetensors file and where its data starts;
    LoadFailed for anything that is not a well-formed file."""
    try:
        with open(path, "rb") as f:
            return parse_header(f, os.fstat(f.fileno()).st_size)
    except OSError as e:
        raise LoadFailed(f"{where}: cannot read {path.name}: {e}") from e
    except ValueError as e:
        raise LoadFailed(f"{where}: {path.name} is not a valid safetensors file: {e}") from e


def parse_header(f: BinaryIO, size: int) -> tuple[dict[str, dict[str, Any]], int]:
    prefix = f.read(8)
    if len(prefix) != 8:
        raise ValueError("shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise ValueError(f"header length {length} exceeds the file")
    try:
        header = json.loads(f.read(length))
    except RecursionError:  # not a ValueError: said as one, as any bad header is
        raise ValueError("header nests too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + length
    for name, entry in header.items():
        _check_entry(name, entry, size - data_start)
    _check_apart(header)
    return header, data_start


def _check_entry(name: str, entry: Any, data_bytes: int) -> None:
    if not isinstance(entry, dict) or type(entry.get("dtype")) is not str \
            or entry["dtype"] not in ITEMSIZE:
        raise ValueError(f"tensor {name!r} has no supported dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"tensor {name!r} has a bad shape {shape!r}")
    # An empty tensor's other dimensions are still a tensor's: torch takes
    # none past int64, whatever the product.
    if math.prod(d for d in shape if d) * ITEMSIZE[entry["dtype"]] >= 1 << 63:
        raise ValueError(f"tensor {name!r} has a shape {shape!r} no tensor can have")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise ValueError(f"tensor {name!r} has data offsets {offsets!r} outside the file")
    if offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[entry["dtype"]]:
        raise ValueError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes do not hold "
                         f"shape {shape} of {entry['dtype']}")


def _check_apart(header: dict[str, dict[str, Any]]) -> None:
    """Refuses tensors whose bytes overlap (the format forbids it): aliased
    weights would be counted once per name, and a write to one would
    change the others."""
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name)
                   for name, e in header.items() if e["data_offsets"][1] > e["data_offsets"][0])
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(f"tensors {name!r} and {other!r} overlap")


def region(header: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """Where the tensors a header describes lie in its data, from the first
    one's begin to the last one's end: what a load reads, gaps and all."""
    spans = [e["data_offsets"] for e in header.values()]
    return min((b for b, _ in spans), default=0), max((e for _, e in spans), default=0)


def data_bytes(header: dict[str, dict[str, Any]]) -> int:
    """Bytes a load takes for the tensors a header describes (`region`)."""
    lo, hi = region(header)
    return hi - lo
