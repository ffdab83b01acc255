"""Every message that crosses the front-end <-> worker boundary.

Both sides import this module and nothing else to speak to each other. A
message is one ring record: a msgpack header (part 0) followed by the raw
bytes of its tensors (parts 1..n), in the order the header lists them.

Request header (front-end -> worker), a msgpack array:

    [op, id, model, version, tensors, params]
      op       Op.INFER | Op.LOAD | Op.UNLOAD | Op.PUBLISH | Op.FORGET | Op.RELEASE
      id       int, unique among the requests in flight to this worker
      model    str, the model name
      version  int
      tensors  [[name, dtype, shape], ...] describing parts 1..n (INFER)
      params   map, op-specific (INFER: {"deadline": time.monotonic() past
               which nobody waits for its answer}, or {} for none; LOAD:
               {"path": the version directory, "estimate": its spec's
               estimated_bytes, "host": the host-tier
               segment to load from, or nil, "manifest": for a disk cache
               copy, the model.toml to read instead of its own (its stub's
               keys as they are now), else nil}; PUBLISH: {"segment": the name
               of the host-tier segment to create}; FORGET: {"segment": a segment
               the front-end unlinked}; RELEASE: {})

Response header (worker -> front-end):

    [id, code, body, tensors]
      code     0 for success, else an mmengine.errors.ErrorCode
      body     INFER: {"t_recv", "t_done"}: time.monotonic_ns() when the worker
               took the request and when it finished (the front-end adds
               "t_read", when it read the answer, "t_sent", "worker" and
               "version", the one served), and with
               Config.account_requests "account": {"t_woke": when its wait
               for the request ended, "wait_runq_ns": its time runnable
               and off a CPU since its last answer, "cpu_ns" and "runq_ns":
               its time on a CPU and runnable off one in the model}, and
               where the worker joined it with others into one call
               (batching.py) "batch": how many; where it ran alone again
               after such a call failed, "failed_call": that call's
               {"t_recv", "t_done", "batch"} (each of the call's requests
               counts 1/batch of it); LOAD: {"bytes": measured,
               "phases": {phase: seconds}, "from": "host" | "disk",
               "publishable": whether PUBLISH can copy it to the host tier};
               PUBLISH: {"bytes": the segment's size}; RELEASE: {"bytes":
               what it gave back};
               READY (id 0): {"pid", "device"}; error: the message (str),
               or, where an INFER failed once the worker had taken it (its
               inputs refused, its model raised, its answer refused), the
               INFER body with "message" added (with no "t_done" where its
               inputs were refused: its model never ran)
      tensors  [[name, dtype, shape], ...] describing parts 1..n (INFER)

A response whose code is SKIPPED (not an ErrorCode) answers an INFER the
worker did not run: the front-end had marked it abandoned (below), or it
would have ended past its "deadline" (worker.WorkerLogic.would_miss). Its
body is nil, or {"failed_call": ...} (as above) where the worker skipped it
after a joined call of it failed.

Tensors are C-contiguous arrays; dtype is numpy's typestr for it ("<f4"),
which numpy reads back without a lookup (dtype.name is computed in Python). A worker views request tensors in place in the
ring; the front-end copies response tensors out once, since their record
is released right after.

Where a message's tensors are plain (numeric C-contiguous numpy arrays),
its header is packed and its tensors viewed or copied out by a C twin of
these functions, csrc/records.pyx (`native`), byte for byte as here;
anything else goes this module's way.
"""
from __future__ import annotations

import enum
import math
import mmap
import os
from typing import Any

import msgpack
import numpy as np

from mmengine import config, errors
from mmengine.errors import BadRequest
from mmengine.ring import MAX_PARTS

OK = 0
SKIPPED = -1  # an INFER's answer: abandoned before it ran, so not run (Abandoned)
READY_ID = 0  # the id of the READY message a worker sends once it can serve


class Op(enum.IntEnum):
    INFER = 1
    LOAD = 2
    UNLOAD = 3
    PUBLISH = 4  # copy a resident model's bytes into a host-tier segment
    FORGET = 5   # a host-tier segment is gone: unmap it
    RELEASE = 6  # give back the memory kept for reuse (the device runs short)


# The operations that keep a worker's loader busy for long: where the
# worker's cores are few, while one runs, the worker's main thread may park
# instead of spinning, and the front-end not poll that worker's answers
# (resources.spins_during_loads says for each). The others are answered
# within microseconds.
HEAVY_OPS = frozenset({Op.LOAD, Op.PUBLISH})


_packb = msgpack.Packer(use_bin_type=True).pack


def _unpackb(buf) -> Any:
    return msgpack.unpackb(buf, raw=False, use_list=True, strict_map_key=False)


# -- tensors ----------------------------------------------------------------

def describe(arrays: dict[str, np.ndarray]) -> tuple[list, list]:
    """(descriptors, buffers) for a dict of contiguous native arrays."""
    descs, bufs = [], []
    for name, a in arrays.items():
        descs.append([name, a.dtype.str, list(a.shape)])
        bufs.append(a if a.ndim else a.reshape(1))  # 0-d arrays export no buffer
    if len(bufs) >= MAX_PARTS:  # the header is a part too
        return _pack(descs, bufs)
    return descs, bufs


def _pack(descs: list, bufs: list) -> tuple[list, list]:
    """More tensors than a record has parts (a detection head's outputs,
    a layer's each): the largest keep parts of their own, the rest are
    copied into one last part, 8-byte aligned. Each descriptor then says
    where its bytes are: [name, dtype, shape, part, offset], part -1 being
    the shared one."""
    by_size = sorted(range(len(bufs)), key=lambda i: bufs[i].nbytes)
    shared_by = set(by_size[:len(bufs) - (MAX_PARTS - 2)])
    parts, shared = [], bytearray()
    for i, (desc, buf) in enumerate(zip(descs, bufs)):
        if i in shared_by:
            shared += bytes(-len(shared) % 8)
            desc += [-1, len(shared)]
            shared += memoryview(buf)
        else:
            desc += [len(parts), 0]
            parts.append(buf)
    return descs, parts + [shared]


def view(descs: list, parts: list) -> dict[str, np.ndarray]:
    """Arrays viewing `parts` as `descs` describe them; no copy."""
    arrays = native.view(descs, parts) if native is not None else None
    return arrays if arrays is not None else _view(descs, parts)


def _view(descs: list, parts: list) -> dict[str, np.ndarray]:
    if descs and len(descs[0]) == 5:
        return _view_packed(descs, parts)
    if len(descs) != len(parts):
        raise BadRequest("message lists a different number of tensors than it carries")
    out = {}
    for (name, dtype, shape), part in zip(descs, parts):
        try:
            out[name] = np.frombuffer(part, dtype=dtype).reshape(shape)
        except (TypeError, ValueError) as e:
            raise BadRequest(f"tensor {name!r}: {e}") from None
    return out


def _view_packed(descs: list, parts: list) -> dict[str, np.ndarray]:
    out = {}
    for desc in descs:
        try:
            name, dtype, shape, part, offset = desc
            out[name] = np.frombuffer(parts[part], dtype=dtype, count=math.prod(shape),
                                      offset=offset).reshape(shape)
        except (TypeError, ValueError, IndexError) as e:
            raise BadRequest(f"tensor {desc[0]!r}: {e}") from None
    return out


def copy_out(descs: list, parts: list) -> dict[str, np.ndarray]:
    """Arrays owning a copy of `parts`: for records about to be released."""
    arrays = native.copy_out(descs, parts) if native is not None else None
    return arrays if arrays is not None else _copy_out(descs, parts)


def _copy_out(descs: list, parts: list) -> dict[str, np.ndarray]:
    return {name: a.copy() for name, a in _view(descs, parts).items()}


# -- requests ---------------------------------------------------------------

def request(op: Op, rid: int, model: str, version: int, tensors: list = (),
            params: dict | None = None) -> bytes:
    return _packb([int(op), rid, model, version, list(tensors), params or {}])


def request_record(op: Op, rid: int, model: str, version: int,
                   arrays: dict[str, np.ndarray] | None = None,
                   params: dict | None = None) -> tuple[bytes, list]:
    """A request's header and its tensors' buffers (parts 1..n)."""
    record = None if native is None else native.request_record(op, rid, model, version,
                                                                arrays, params)
    return record if record is not None else _request_record(op, rid, model, version,
                                                             arrays, params)


def _request_record(op, rid, model, version, arrays, params) -> tuple[bytes, list]:
    descs, bufs = describe(arrays or {})
    return request(op, rid, model, version, descs, params), bufs


_OPS = {int(op): op for op in Op}  # Op(n) costs ~0.5 us a call; a dict lookup ~40 ns
_NUMBERS = (float, int)


class Malformed(Exception):
    """A request header that is no request a worker can serve (a front-end
    bug, or the ring's memory damaged): `rid` is its id where that could
    be read (its request can be answered), else None."""

    def __init__(self, rid: int | None, why: str):
        super().__init__(why)
        self.rid = rid


def parse_request(header) -> tuple[Op, int, str, int, list, dict]:
    """A request's header, its fields of the types above (what the worker
    takes for granted: a list for params, or a deadline of text, ended it
    from deep in its serving); Malformed where it is none."""
    fields = None if native is None else native.parse_request(header)
    if fields is None:
        try:
            fields = _unpackb(header)
        except Exception as e:  # noqa: BLE001 - no msgpack, or more than one value
            raise Malformed(None, f"its header is no msgpack: {type(e).__name__}: {e}") from None
    try:
        op, rid, model, version, tensors, params = fields
        op = _OPS[op]
    except (KeyError, TypeError, ValueError):
        _malformed(fields)
    if type(rid) is not int or type(model) is not str or type(version) is not int \
            or type(tensors) is not list or type(params) is not dict:
        _malformed(fields)
    if params:  # (dict.get and two types: Cython's C, where params.get and a tuple cost ~100 ns)
        deadline = dict.get(params, "deadline", 0.0)
        if type(deadline) is not float and type(deadline) is not int:
            _malformed(fields)
    return op, rid, model, version, tensors, params


def _malformed(fields) -> None:
    """Raises Malformed for request header `fields`, saying which field is
    wrong (off the path of a request that is well)."""
    shown = errors.shown
    if type(fields) not in (list, tuple) or len(fields) != 6:
        rid = fields[1] if type(fields) in (list, tuple) and len(fields) > 1 else None
        why = f"its header {shown(fields)} is no array of 6 fields"
    else:
        op, rid, model, version, tensors, params = fields
        known = type(op) in _NUMBERS and op in _OPS  # (a list is no key)
        why = (f"its op {shown(op)} is none" if not known else
               f"its id {shown(rid)} is no int" if type(rid) is not int else
               f"its model {shown(model)} is no str" if type(model) is not str else
               f"its version {shown(version)} is no int" if type(version) is not int else
               f"its tensors {shown(tensors)} are no array" if type(tensors) is not list else
               f"its params {shown(params)} are no map" if type(params) is not dict else
               f"its deadline {shown(params.get('deadline'))} is no number")
    raise Malformed(rid if type(rid) is int else None, why)


class Abandoned:
    """The inferences the front-end gave up on before their worker ran
    them (their deadline passed, or their caller went away), in shared
    memory: a worker looks before it runs one, and skips it. Queued work
    nobody waits for would otherwise hold the worker from the requests
    behind it, which then time out in turn.

    A table of SLOTS ids, the id at slot id % SLOTS: a lookup is one
    load, and ids are never reused, so a stale slot matches nothing. A
    mark overwritten by a later one (two abandoned requests SLOTS apart,
    both in flight) only means that one of them runs: skipping is an
    economy, never what an answer depends on. The front-end creates it
    (a memfd: no name that could outlive it), the worker inherits the
    descriptor.

    One more slot says which inference the worker is running (`serving`,
    0: none; set before it looks at the id's slot, so that a front-end that
    marks an id and then finds it not serving knows it will be skipped): a worker that dies or hangs there was taken down by that
    model; one that dies or hangs between requests (stopped, say) by none.
    The oldest in flight may not have begun."""

    SLOTS = 4096

    def __init__(self, fd: int):
        self.fd = fd
        self._map = mmap.mmap(fd, (self.SLOTS + 1) * 8)
        self._ids = memoryview(self._map).cast("q")

    @classmethod
    def create(cls) -> "Abandoned":
        fd = os.memfd_create("mmengine-abandoned", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, (cls.SLOTS + 1) * 8)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def mark(self, rid: int) -> None:
        self._ids[rid % self.SLOTS] = rid

    def __contains__(self, rid: int) -> bool:
        return self._ids[rid % self.SLOTS] == rid

    @property
    def serving(self) -> int:
        return self._ids[self.SLOTS]

    @serving.setter
    def serving(self, rid: int) -> None:
        self._ids[self.SLOTS] = rid

    def close(self) -> None:
        if self.fd >= 0:
            self._ids.release()
            self._map.close()
            os.close(self.fd)
            self.fd = -1


# -- responses --------------------------------------------------------------

def response(rid: int, code: int = OK, body: Any = None, tensors: list = ()) -> bytes:
    return _packb([rid, int(code), body, list(tensors)])


def plain_response_record(rid: int, code: int, body: Any,
                          arrays: dict[str, np.ndarray] | None) -> tuple[bytes, list] | None:
    """A response's header and its tensors' buffers in one C call, where
    the arrays are plain (C-contiguous numpy arrays of a numeric dtype, as
    a model's outputs nearly always are); None where they are not, or
    where the C twin is off: the caller then makes them so, and takes
    response_record."""
    return None if native is None else native.response_record(rid, code, body, arrays)


def response_record(rid: int, code: int, body: Any,
                    arrays: dict[str, np.ndarray]) -> tuple[bytes, list]:
    descs, bufs = describe(arrays)
    return response(rid, code, body, descs), bufs


def ran(body: Any) -> dict | None:
    """The INFER run's body in an answer's or an error's body, else None."""
    return body if type(body) is dict and "t_recv" in body else None


def parse_response(header) -> tuple[int, int, Any, list]:
    parsed = None if native is None else native.parse_response(header)
    rid, code, body, tensors = _unpackb(header) if parsed is None else parsed
    return rid, code, body, tensors


# -- the hot steps in C --------------------------------------------------------

#: csrc/records.pyx: headers packed with their tensors' descriptors, and
#: tensors viewed or copied out of records, as this module does them where
#: they are plain; its functions return None for anything else, which goes
#: this module's way. None where it is not built, or pure Python is asked for.
native = config.native("records")
