"""The binary TCP protocol: frames, operations, tensors. docs/protocol.md is
its specification for other languages; this module is its implementation,
used by the server and the SDK alike. Its hot frames (an infer request and
its answer, where they are plain) also have a C twin, `native`
(csrc/wire.pyx), that packs and reads them as this module does, byte for
byte, and leaves every other frame to it.

A frame is a 4-byte little-endian unsigned length N, then N bytes of one
msgpack map. Requests carry an "id" chosen by the client; responses carry the
same id and may come back in any order.

    request   {"id": int, "op": str, ...op fields}
    response  {"id": int, "ok": true, ...result fields}
              {"id": int, "ok": false, "error": {"code": int, "name": str,
                                                 "message": str}}

A tensor is a map {"dtype": numpy dtype name, "shape": [int...],
"data": bin (C order, little-endian)}. Tensors of BIG bytes or more are not
copied by this codec: frame_parts() lays a frame out around their memory,
and decode() gives them back as views of the frame they came in.
"""
from __future__ import annotations

import struct
import sys
import threading
from typing import Any

import msgpack
import numpy as np

from mmengine import config
from mmengine.errors import (BadRequest, ErrorCode, MMEngineError, Overloaded, TooLarge,
                             cannot_carry, error_for, shown, told)

OPS = ("infer", "load", "unload", "pin", "unpin", "list", "stats", "health")
LENGTH = struct.Struct("<I")
MAX_LENGTH = (1 << 32) - 1  # the longest body LENGTH can say
DEFAULT_MAX_FRAME = 64 << 20


#: Tensor data of this many bytes or more is never copied by the codec: a
#: frame carrying it is written as a list of buffers with the data as the
#: caller's own (frame_parts), and decoded with the data viewed where it
#: lies in the received frame (decode). Packing copies every byte, and
#: msgpack's buffer grows by copying: 16 MiB took 15-20 ms to pack.
BIG = 64 << 10
_BIN32 = struct.Struct(">BI")
#: The entries (a map's keys and values, an array's items) that a request
#: frame of BIG bytes or more may hold in all, where _Viewer cannot read it:
#: a request holds tens, and a frame of one-byte empty maps costs ~75 bytes
#: of memory, and time, for each byte of it (a security review's 64 MiB
#: frame would have taken ~4.8 GB). A smaller frame holds too few to matter.
MAX_REQUEST_ENTRIES = 1 << 16
#: The entries an answer frame of BIG bytes or more may hold in all, as the
#: SDK decodes it: a peer that is no server of ours (or a broken one) could
#: make its client build ~75 bytes of maps for each byte it sends, ~300 GB
#: for a 4 GiB frame. An infer's answer holds tens; a list or stats row ~60
#: (a version's; each input it declares adds a few), so this is ~280,000
#: versions in one answer (~80 MB; more are paged: docs/protocol.md, Pages).
#: Decoded, such an answer takes ~350 MB; one of empty maps, ~1.2 GB.
MAX_ANSWER_ENTRIES = 1 << 24


_packers = threading.local()  # msgpack.packb makes a Packer per call: 0.6 us of 1.5


def frame(message: dict) -> bytes:
    try:
        pack = _packers.pack
    except AttributeError:  # this thread's first frame
        pack = _packers.pack = msgpack.Packer(use_bin_type=True).pack
    body = pack(message)
    if len(body) >= BIG:  # a Packer keeps its largest buffer: not this one
        del _packers.pack
    try:
        return LENGTH.pack(len(body)) + body
    except struct.error:
        raise _too_long(len(body)) from None


def frame_parts(message: dict) -> list:
    """frame() as buffers to write in order (writev, sendmsg), for messages
    that carry tensors of BIG bytes or more: each such bin is a view of the
    caller's buffer after its header, the rest is packed around them."""
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    parts: list = [b""]  # the length, once known
    _pack(message, packer, parts)
    parts.append(packer.bytes())
    size = sum(memoryview(part).nbytes for part in parts)
    if size > MAX_LENGTH:
        raise _too_long(size)
    parts[0] = LENGTH.pack(size)
    return [part for part in parts if len(part)]  # (a frame may end with a bin)


def _too_long(size: int) -> TooLarge:
    return TooLarge(f"a frame of {size} bytes or more cannot be sent: a frame's 4-byte "
                    f"length says {MAX_LENGTH} at most")


def _pack(obj: Any, packer: msgpack.Packer, parts: list) -> None:
    if type(obj) is dict:
        # (A map that has a PAD_KEY of its own is not padded: a tensor's
        # keys are fixed, and no other map carries large bins.)
        big = [] if PAD_KEY in obj else [key for key, value in obj.items() if _is_big(value)]
        packer.pack_map_header(len(obj) + len(big))
        for key, value in obj.items():
            if big and key in big:
                _pad_before(key, packer, parts)
            packer.pack(key)
            _pack(value, packer, parts)
    elif type(obj) is list:
        packer.pack_array_header(len(obj))
        for value in obj:
            _pack(value, packer, parts)
    elif _is_big(obj):
        view = memoryview(obj).cast("B")  # a C-contiguous buffer (encode_tensors)
        if view.nbytes > MAX_LENGTH:  # nor can a bin32's length
            raise _too_long(view.nbytes)
        parts.append(packer.bytes() + _BIN32.pack(0xc6, view.nbytes))
        packer.reset()
        parts.append(view)
    else:
        packer.pack(obj)


def _is_big(obj: Any) -> bool:
    return isinstance(obj, (bytes, bytearray, memoryview)) and memoryview(obj).nbytes >= BIG


def _pad_before(key: Any, packer: msgpack.Packer, parts: list) -> None:
    """An entry PAD_KEY: bin of as many zero bytes as make the large bin of
    `key`, which follows, begin ALIGN-aligned in the frame body. A receiver
    (LargeFrame: a buffer of its own, malloc's) then views it aligned for
    any dtype, where numpy's fast paths want it; else where the other keys'
    lengths put it (decode_tensors copies a misaligned output)."""
    at = sum(memoryview(part).nbytes for part in parts[1:]) + len(packer.bytes())
    head = len(_PAD_HEAD) + 2 + len(msgpack.packb(key)) + _BIN32.size  # bin8: 2 bytes
    packer.pack(PAD_KEY)
    packer.pack(bytes(-(at + head) % ALIGN))


#: Tensor data of a large frame begins aligned to this (frame_parts).
ALIGN = 16
PAD_KEY = "pad"
_PAD_HEAD = msgpack.packb(PAD_KEY)


def frames(message: dict, tensors: dict | None = None) -> list:
    """The frame of `message` as buffers to write in order: frame_parts if
    `tensors` (its tensors, as encode_tensors made them) hold BIG bytes or
    more, else one packed frame."""
    if tensors:
        size = 0
        for t in tensors.values():  # a loop: sum() of a generator costs twice as much
            size += t["data"].nbytes
        if size >= BIG:
            return frame_parts(message)
    return [frame(message)]


class LargeFrame:
    """A frame of BIG bytes or more that is still arriving: its bytes go to
    a buffer of its own, where decode() views its tensors once it is whole
    (a stream's shared buffer is resized, which views forbid). It grows as
    bytes come: a frame declared and not sent costs what was sent."""

    __slots__ = ("buf", "size", "max_entries")

    def __init__(self, size: int, first, max_entries: int | None = None) -> None:
        self.size = size
        self.buf = bytearray(first)
        self.max_entries = max_entries

    def fill(self, data) -> memoryview:
        """Takes what `data` has of the frame; returns the rest."""
        view = memoryview(data)
        take = min(len(view), self.size - len(self.buf))
        self.buf += view[:take]
        return view[take:]

    @property
    def whole(self) -> bool:
        return len(self.buf) == self.size

    def decode(self) -> dict:
        return decode(self.buf, self.max_entries)


def decode(body, max_entries: int | None = None) -> dict:
    """The map of one frame body; BadRequest if it is not one. A body of
    BIG bytes or more has its large bin values decoded as read-only views
    of it (no copy): they keep `body` alive; one that holds more than
    `max_entries` entries in all (None: no limit) is BadRequest."""
    limits = {}
    if len(body) >= BIG:
        try:
            message = _Viewer(memoryview(body).toreadonly()).frame()
        except _Unviewable:
            if max_entries is not None:
                limits = _limits(max_entries)
        else:
            if not isinstance(message, dict):
                raise BadRequest("a frame must hold a msgpack map")
            return message
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False, **limits)
    except Exception as e:  # msgpack raises several unrelated types
        # _TooMany, or one map or array past the limit
        if isinstance(e, _TooMany) or limits and "exceeds max_" in str(e):
            raise BadRequest(f"a frame of {len(body)} bytes holds more than {max_entries} "
                             f"entries (a map's keys and values, an array's items, each "
                             f"map and array itself): more than this protocol's frames "
                             f"hold (tensor data are bins)") from None
        why = str(e) or "not msgpack"  # some of them say nothing more
        raise BadRequest(f"malformed frame: {type(e).__name__}: {why}") from None
    if not isinstance(message, dict):
        raise BadRequest("a frame must hold a msgpack map")
    return message


class _TooMany(Exception):
    """Raised by _limits' hooks: the frame holds more entries than allowed."""


def _limits(max_entries: int) -> dict:
    """msgpack.unpackb's keywords that stop it once the maps and arrays it
    has built hold more than `max_entries` entries in all: a map's keys and
    values (its pairs as sent, duplicates too), an array's items, and each
    map or array once more for itself. Each is counted when it ends, so no
    one of them may be longer than the limit either; and counted for
    itself, an empty one costs what it takes to build (at no cost, arrays
    nested a thousand deep each held 65,535 empty maps, 64 M in all)."""
    left = max_entries

    def take(n: int) -> None:
        nonlocal left
        left -= n
        if left < 0:
            raise _TooMany

    def array(items):
        take(1 + len(items))
        return items

    def map_(pairs):
        take(1 + 2 * len(pairs))
        return dict(pairs)
    return {"object_pairs_hook": map_, "list_hook": array,
            "max_array_len": max_entries, "max_map_len": max_entries // 2}


class _Unviewable(Exception):
    """A frame _Viewer leaves to msgpack: malformed, or of a kind it does
    not read (ext types, deep nesting, many small values)."""


_FIXED = {0xca: struct.Struct(">f"), 0xcb: struct.Struct(">d"),
          0xcc: struct.Struct(">B"), 0xcd: struct.Struct(">H"), 0xce: struct.Struct(">I"),
          0xcf: struct.Struct(">Q"), 0xd0: struct.Struct(">b"), 0xd1: struct.Struct(">h"),
          0xd2: struct.Struct(">i"), 0xd3: struct.Struct(">q")}
_LENGTHS = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}
# type byte -> (kind, bytes of its length) for the sized kinds
_SIZED = {0xc4: ("bin", 1), 0xc5: ("bin", 2), 0xc6: ("bin", 4),
          0xd9: ("str", 1), 0xda: ("str", 2), 0xdb: ("str", 4),
          0xdc: ("array", 2), 0xdd: ("array", 4), 0xde: ("map", 2), 0xdf: ("map", 4)}


class _Viewer:
    """Decodes a frame as msgpack.unpackb would, but with bin values of BIG
    bytes or more as views of the frame. It reads the frames of this
    protocol (a few maps of a few values) and gives up on anything else,
    or on more than MAX_VALUES values (Python's pace, not C's)."""

    MAX_VALUES = 1024  # ~1.7 ms of Python at most; a request has tens
    MAX_DEPTH = 16

    def __init__(self, view: memoryview):
        self.view = view
        self.pos = 0
        self.left = self.MAX_VALUES

    def frame(self) -> Any:
        try:
            value = self.value(0)
        except (IndexError, struct.error, UnicodeDecodeError, TypeError) as e:
            raise _Unviewable from e  # truncated, invalid text, an unhashable key
        if self.pos != len(self.view):
            raise _Unviewable  # extra bytes after the value
        return value

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.view):
            raise _Unviewable
        out = self.view[self.pos:end]
        self.pos = end
        return out

    def value(self, depth: int) -> Any:
        self.left -= 1
        if self.left < 0 or depth > self.MAX_DEPTH:
            raise _Unviewable
        b = self.view[self.pos]
        self.pos += 1
        if b <= 0x7f:
            return b
        if b >= 0xe0:
            return b - 0x100
        if b <= 0x8f:
            return self._map(b & 0x0f, depth)
        if b <= 0x9f:
            return [self.value(depth + 1) for _ in range(b & 0x0f)]
        if b <= 0xbf:
            return str(self._take(b & 0x1f), "utf-8")
        if b == 0xc0:
            return None
        if b in (0xc2, 0xc3):
            return b == 0xc3
        fixed = _FIXED.get(b)
        if fixed is not None:
            return fixed.unpack(self._take(fixed.size))[0]
        kind, width = _SIZED.get(b, (None, 0))
        if kind is None:
            raise _Unviewable  # ext types, and 0xc1 (never used)
        n = _LENGTHS[width].unpack(self._take(width))[0]
        if kind == "bin":
            data = self._take(n)
            return data if n >= BIG else bytes(data)
        if kind == "str":
            return str(self._take(n), "utf-8")
        if n > self.left:
            raise _Unviewable
        if kind == "array":
            return [self.value(depth + 1) for _ in range(n)]
        return self._map(n, depth)

    def _map(self, n: int, depth: int) -> dict:
        out = {}
        for _ in range(n):
            key = self.value(depth + 1)
            out[key] = self.value(depth + 1)
        return out


# -- tensors -----------------------------------------------------------------

_names: dict[np.dtype, str] = {}


def from_torch(value: Any) -> Any:
    """A torch tensor as a numpy array (bfloat16, which numpy lacks, as
    float32, which holds each of its values); anything else as it is.
    torch is imported only by those who pass its tensors."""
    if type(value) is np.ndarray:  # the common case, at once
        return value
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):  # subclasses too (MONAI's)
        if value.is_meta:  # a shape with no values
            raise BadRequest("a torch tensor on the meta device has no values to send")
        if str(value.layout) != "torch.strided":  # sparse: its values, as a dense array
            value = value.to_dense()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        # A conjugate or negative view (x.conj(), a lazy -x) is resolved
        # to its values: numpy() refuses them.
        value = value.detach().cpu().resolve_conj().resolve_neg()
        try:
            return value.numpy()
        except TypeError as e:  # a dtype numpy lacks (the float8s)
            raise BadRequest(f"a torch tensor of {value.dtype} cannot travel: {e}") from None
    return value


def _dtype_name(dtype: np.dtype) -> str:
    # dtype.name is computed in Python on every access; this runs per tensor.
    name = _names.get(dtype)
    if name is None:
        name = _names[dtype] = dtype.name
    return name


def encode_tensors(arrays: dict[str, np.ndarray], answer: str = "") -> dict:
    """Named arrays as the wire's tensors (their data viewed, not copied).
    A dtype the protocol does not carry (DTYPES) is the caller's
    BadRequest, or where the arrays are model `answer`'s answer, that
    model's InternalError."""
    out = {}
    for name, a in arrays.items():
        if not a.flags.c_contiguous:  # not ascontiguousarray always: it makes 0-d 1-d
            a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        dtype = _dtype_name(a.dtype)
        if dtype not in DTYPES:
            if answer:
                raise cannot_carry("the TCP protocol", name, a.dtype, answer)
            raise BadRequest(f"tensor {name!r}: dtype {a.dtype} cannot travel; one of "
                             f"{', '.join(DTYPES)}")
        out[name] = {"dtype": dtype, "shape": list(a.shape), "data": a.data}
    return out


#: The dtypes a tensor may have on the wire (docs/protocol.md), little-endian.
#: Made from their strs ("<f4"): on a little-endian machine numpy takes that
#: for its own order, so an array of it is native, as the C twins' fast
#: paths take it (csrc/arrays.pxd's plain_type).
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(np.dtype(name).newbyteorder("<").str)
    for name in ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64",
                 "int64", "float16", "float32", "float64", "complex64", "complex128")}


def decode_tensors(tensors: Any, outputs: bool = False) -> dict[str, np.ndarray]:
    """Arrays viewing the frame's bytes (read-only, no copy). Inputs are
    at least one; a model's outputs may be none, and are aligned for their
    dtype (a large one is a view at whatever offset it has in its frame,
    and numpy's fast paths skip misaligned data: a copy then)."""
    if not isinstance(tensors, dict) or not (tensors or outputs):
        raise BadRequest("'inputs' must be a non-empty map of name to tensor")
    out = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, dict):
            raise BadRequest("each tensor must be a map under a string name")
        try:
            dtype, shape, data = t["dtype"], t["shape"], t["data"]
            if type(dtype) is not str or dtype not in DTYPES:
                raise TypeError(f"dtype {shown(dtype)} is not one of {', '.join(DTYPES)}")
            if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
                raise TypeError("shape must be a list of non-negative integers")
            if not isinstance(data, (bytes, memoryview)):  # a view: a large one (decode)
                raise TypeError("data must be bin")
            array = np.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)
            # Any other byte is a bool numpy and torch compute with as they
            # please (2 & 1 is 0, 2 is True).
            if dtype == "bool" and array.view(np.uint8).max(initial=0) > 1:
                raise ValueError("a bool is one byte, 0 or 1")
            if outputs and not array.flags.aligned:
                array = array.copy()
            out[name] = array
        except (KeyError, TypeError, ValueError) as e:
            raise BadRequest(f"tensor {name!r}: {type(e).__name__}: {e}") from None
    return out


# -- errors ------------------------------------------------------------------

def error_response(rid: Any, e: MMEngineError) -> dict:
    error = {"code": int(e.code), "name": e.code.name, "message": told(e)}
    # OVERLOADED's wait, as HTTP's Retry-After: none where waiting alone
    # does not help (pinned models hold every budget).
    if isinstance(e, Overloaded) and e.retry_after_s is not None:
        error["retry_after_s"] = e.retry_after_s
    return {"id": rid, "ok": False, "error": error}


def raise_for(response: dict) -> dict:
    """The response if it succeeded; else the typed error it carries."""
    if response.get("ok"):
        return response
    err = response.get("error") or {}
    if type(err) is not dict:  # a peer that is not quite a server of ours
        raise error_for(ErrorCode.INTERNAL, f"an error answer of no code: {err!r}")
    e = error_for(err.get("code", ErrorCode.INTERNAL), err.get("message", "no message"))
    if isinstance(e, Overloaded):  # the server's wait, or none
        retry = err.get("retry_after_s")
        e.retry_after_s = retry if type(retry) is int and retry >= 0 else None
    raise e


# -- the hot frames in C -------------------------------------------------------

#: csrc/wire.pyx: infer requests and their answers packed and read as this
#: module does them, byte for byte, where they are plain (small, of numpy
#: arrays); its functions return None for anything else, which goes this
#: module's way. None where it is not built, or pure Python is asked for.
native = config.native("wire")
