"""csrc/records.pyx against messages.py: the ring records' headers packed
in C are the bytes messages.py packs, with the same buffers, and tensors
viewed or copied out of records in C are the arrays messages.py makes;
whatever C does not take (None) goes messages.py's way, which the engine's
tests drive through real workers."""
from __future__ import annotations

import mmap

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mmengine import messages, protocol
from mmengine.ring import MAX_PARTS

_records = pytest.importorskip("mmengine._records", reason="the native core is not built")

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
NUMERIC = ["<f2", "<f4", "<f8", "<i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1",
           "<c8", "<c16"]
names = st.text(max_size=40)
arrays = st.sampled_from(NUMERIC).flatmap(
    lambda dtype: hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=1, max_dims=4,
                                                               min_side=0, max_side=6)))
tensors = st.dictionaries(names, arrays, max_size=4)
ints = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
scalars = st.none() | st.booleans() | ints | st.floats(allow_nan=False) | st.text(max_size=40) \
    | st.binary(max_size=300)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=20)
                      | st.dictionaries(st.text(max_size=20), inner, max_size=20), max_leaves=40)


def same_record(native, python) -> None:
    assert native is not None  # each of these is the fast path's
    assert native[0] == python[0]
    assert [memoryview(b).tobytes() for b in native[1]] == \
        [memoryview(b).tobytes() for b in python[1]]


def parts_of(bufs: list) -> list:
    """The buffers as a worker's ring hands them over: byte views."""
    return [memoryview(bytearray(np.ascontiguousarray(b).tobytes())) for b in bufs]


@SETTINGS
@given(op=st.sampled_from(list(messages.Op)), rid=ints, model=st.text(max_size=300),
       version=ints, arrays=st.none() | tensors,
       params=st.none() | st.dictionaries(st.text(max_size=20), values, max_size=5))
def test_a_request_record_is_what_messages_packs(op, rid, model, version, arrays, params):
    same_record(_records.request_record(op, rid, model, version, arrays, params),
                messages._request_record(op, rid, model, version, arrays, params))


@SETTINGS
@given(rid=ints, code=st.sampled_from([messages.OK, messages.SKIPPED, 400, 503]), body=values,
       arrays=tensors)
def test_a_response_record_is_what_messages_packs(rid, code, body, arrays):
    same_record(_records.response_record(rid, code, body, arrays),
                messages.response_record(rid, code, body, arrays))


def test_every_length_header_packs_as_msgpack_does():
    for size in (0, 15, 16, 31, 32, 255, 256, 65535, 65536):
        text = "é" * (size // 2) + "x" * (size % 2)
        body = {"s": text, "b": b"x" * size, "l": list(range(size % 70000)),
                "m": {str(i): i for i in range(size % 70000)}, "i": -size - 1}
        arrays = {text: np.zeros((size // 8,), np.uint8)}
        same_record(_records.response_record(size, 0, body, arrays),
                    messages.response_record(size, 0, body, arrays))


@SETTINGS
@given(op=st.sampled_from(list(messages.Op)), rid=ints, model=st.text(max_size=300),
       version=ints, arrays=st.none() | tensors,
       params=st.none() | st.dictionaries(st.text(max_size=20), values, max_size=5))
def test_a_request_header_read_in_c_is_what_msgpack_reads(op, rid, model, version, arrays,
                                                          params):
    header = messages._request_record(op, rid, model, version, arrays, params)[0]
    read = _records.parse_request(memoryview(bytearray(header)))  # as a ring hands it over
    assert read == tuple(messages._unpackb(header))
    assert messages.parse_request(header) == (op, *read[1:])


@SETTINGS
@given(rid=ints, code=st.sampled_from([messages.OK, messages.SKIPPED, 400, 503]), body=values,
       arrays=tensors)
def test_a_response_header_read_in_c_is_what_msgpack_reads(rid, code, body, arrays):
    header = messages.response_record(rid, code, body, arrays)[0]
    read = _records.parse_response(header)
    assert read == tuple(messages._unpackb(header))
    # Value for value: a float stays a float, an int an int (1.0 == 1 == True).
    assert repr(read) == repr(tuple(messages._unpackb(header)))


@SETTINGS
@given(body=values, cut=st.integers(min_value=0), edit=st.integers(min_value=0),
       byte=st.integers(min_value=0, max_value=255))
def test_a_header_c_cannot_read_goes_msgpacks_way(body, cut, edit, byte):
    # A header cut short or with a byte changed: what C reads is what
    # msgpack reads; the rest is msgpack's to read or to refuse (None).
    header = bytearray(messages.response(7, 0, body, []))
    header[edit % len(header)] = byte
    for data in (bytes(header), bytes(header[:cut % len(header)])):
        for fields, parse in ((6, _records.parse_request), (4, _records.parse_response)):
            read = parse(data)
            if read is not None:  # (by repr: a changed byte may make a NaN)
                assert len(read) == fields and repr(read) == repr(tuple(messages._unpackb(data)))


def test_every_cut_of_a_header_is_msgpacks_to_refuse():
    header = messages.response(7, 0, {"s": "text", "b": b"bytes", "i": 1 << 40, "f": 0.5},
                               [["y", "<f4", [1, 16]]])
    for cut in range(len(header)):
        assert _records.parse_response(header[:cut]) is None


@pytest.mark.parametrize("header", [
    msgpack.packb([1, 2, {"f": 0.1, "g": [1.5, -2.25]}, []], use_single_float=True),
    msgpack.packb([(1 << 64) - 1, 2, (1 << 63), [-(1 << 63), -1, -33, 127, 255]]),
    msgpack.packb([1, 2, {1: "int key", None: 0, 2.5: b"x", True: [], -7: {}}, []]),
])
def test_what_no_packer_of_ours_writes_reads_as_msgpack_reads_it(header):
    read = _records.parse_response(header)
    assert repr(read) == repr(tuple(messages._unpackb(header)))


@pytest.mark.parametrize("header", [
    msgpack.packb([1, 2, 3, msgpack.ExtType(5, b"x")]),       # an extension type
    msgpack.packb([1, 2, {"t": msgpack.Timestamp(1)}, []]),    # the timestamp one too
    b"\x94\x01\x02\xa1\xff\x90",                              # a str that is no UTF-8
    msgpack.packb([1, 2, {(1,): 2}, []])[:-1],                 # cut short
    msgpack.packb([1, 2, 3, []]) + b"\x00",                   # something after it
    msgpack.packb([1, 2, 3]),                                  # not its fields
    msgpack.packb({"a": 1}),
])
def test_headers_the_fast_path_does_not_read_go_msgpacks_way(header):
    assert _records.parse_response(header) is None


def test_a_str_that_is_no_utf8_is_msgpacks_error_either_way():
    header = b"\x94\x01\x02\xa1\xff\x90"  # [1, 2, "\xff", []]
    with pytest.raises(UnicodeDecodeError):
        messages.parse_response(header)


DEEP = 0
for _ in range(40):
    DEEP = [DEEP]


@pytest.mark.parametrize("value", [
    1 << 63,                       # past int64: an uint64 in msgpack
    -(1 << 63) - 1,                # msgpack's error
    True.__class__,                # no msgpack type
    "\ud800",                      # a lone surrogate: msgpack's error
    messages.Op.LOAD,              # an int subclass
    {"deep": DEEP},                # deeper than the fast path goes
])
def test_what_the_fast_path_does_not_take_goes_messages_way(value):
    assert _records.response_record(7, 0, value, {}) is None
    assert _records.request_record(messages.Op.LOAD, 7, "m", 1, None, {"x": value}) is None


@pytest.mark.parametrize("arrays", [
    {"x": np.zeros((4, 4), np.float32)[:, ::2]},                 # not contiguous
    {"x": np.zeros((), np.float32)},                               # 0-d: describe reshapes it
    {"x": np.zeros(3, ">f4")},                                     # not native order
    {"x": np.array(["a"], object)},                                # objects
    {"x": np.zeros(2, [("a", "<f4")])},                            # structured
    {"x": np.zeros(2, "<M8[s]")},                                  # not numeric
    {"x": np.zeros(2, np.float32).view(np.recarray)},              # a subclass
    {1: np.zeros(2, np.float32)},                                  # a name that is not a str
    {str(i): np.zeros(1, np.uint8) for i in range(MAX_PARTS)},     # packed into shared parts
    [("x", np.zeros(2, np.float32))],                              # not a dict
])
def test_arrays_the_fast_path_does_not_take_go_messages_way(arrays):
    assert _records.response_record(7, 0, None, arrays) is None
    assert _records.request_record(messages.Op.INFER, 7, "m", 1, arrays, None) is None


def test_the_arrays_a_front_end_reads_off_its_sockets_take_the_fast_path():
    """As the TCP front-end decodes them (protocol.py, and csrc/wire.pyx
    where built), and with their order spelled out (newbyteorder("<")).
    The fast path once took none of these: their buffers' format was "<f"
    where it knew "f", and every request from a socket went messages.py's
    way."""
    sent = {"f": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.arange(4, dtype=np.int64),
            "b": np.array([True, False]), "h": np.arange(3, dtype=np.float16)}
    body = protocol.frame({"op": "infer", "model": "m", "id": 1,
                           "inputs": protocol.encode_tensors(sent)})[4:]
    ways = {"protocol.py": protocol.decode_tensors(protocol.decode(body)["inputs"]),
            "spelled out": {k: v.view(v.dtype.newbyteorder("<")) for k, v in sent.items()}}
    if protocol.native is not None:
        ways["wire.pyx"] = protocol.native.request(bytearray(body), 0, len(body))[2]
    for way, arrays in ways.items():
        params = {"deadline": 2.5}
        native = _records.request_record(messages.Op.INFER, 1, "m", 1, arrays, params)
        assert native is not None, way
        same_record(native, messages._request_record(messages.Op.INFER, 1, "m", 1, arrays,
                                                     params))


def test_a_worker_answers_arrays_the_fast_path_refuses_through_messages_py():
    """Not contiguous and 0-d outputs, through a real ring: the worker's own
    path makes them so."""
    from mmengine.ring import Ring
    from mmengine.worker import _Responder

    ring = Ring.create(1 << 20)
    try:
        outputs = {"x": np.arange(16, dtype=np.float32).reshape(4, 4)[:, ::2],
                   "y": np.asarray(np.float64(3))}
        _Responder(ring).send(5, messages.OK, {"t_recv": 1, "t_done": 2}, outputs)
        parts = ring.get(timeout=5)
        rid, code, body, descs = messages.parse_response(parts[0])
        got = messages.copy_out(descs, parts[1:])
        del parts
        ring.release()
    finally:
        ring.close()
    assert (rid, code, body) == (5, messages.OK, {"t_recv": 1, "t_done": 2})
    np.testing.assert_array_equal(got["x"], outputs["x"])
    assert got["y"].shape == () and got["y"] == 3


def assert_same_arrays(native: dict, python: dict) -> None:
    assert native is not None
    assert list(native) == list(python)
    for name in python:
        a, b = native[name], python[name]
        assert (a.dtype, a.shape, a.flags.writeable) == (b.dtype, b.shape, b.flags.writeable)
        assert a.tobytes() == b.tobytes()


@SETTINGS
@given(arrays=tensors)
def test_views_and_copies_are_the_arrays_messages_makes(arrays):
    descs, bufs = messages.describe(arrays)
    parts = parts_of(bufs)
    view = _records.view(descs, parts)
    assert_same_arrays(view, messages._view(descs, parts))
    for name, part in zip(view, parts):  # views: the record's own bytes
        assert view[name].size == 0 or np.shares_memory(view[name], np.frombuffer(part, np.uint8))
    copies = _records.copy_out(descs, parts)
    assert_same_arrays(copies, messages._copy_out(descs, parts))
    for name in copies:
        assert copies[name].flags.writeable and copies[name].flags.aligned
        assert copies[name].base is None
        assert not any(np.shares_memory(copies[name], np.frombuffer(p, np.uint8)) for p in parts)



def test_views_are_what_frombuffer_makes_of_their_parts():
    # Read-only where the part is, writable where it is, and the part's
    # memory kept while the array lives, as frombuffer's base keeps it.
    descs = [["x", "<f4", [2, 2]]]
    for part in (memoryview(bytes(16)), memoryview(bytearray(16)), bytearray(16), bytes(16),
                 memoryview(bytearray(32))[8:24]):
        view = _records.view(descs, [part])["x"]
        numpy_s = np.frombuffer(part, np.float32).reshape(2, 2)
        assert view.flags.writeable == numpy_s.flags.writeable, part
        assert np.shares_memory(view, numpy_s)
    grown = bytearray(16)
    view = _records.view(descs, [grown])["x"]
    with pytest.raises(BufferError):
        grown.extend(b"more")  # would move the memory under the array
    # The base was the mmap itself, which holds no export: a worker's ring
    # closed at exit unmapped the memory of inputs a model had kept (a
    # review read one after and crashed).
    mapping = mmap.mmap(-1, 4096)
    part = memoryview(mapping)[64:80]
    view = _records.view(descs, [part])["x"]
    del part
    with pytest.raises(BufferError):
        mapping.close()
    del view
    mapping.close()


def test_copies_own_their_memory():
    # Over a bytearray that was their base, which anyone could resize.
    descs = [["x", "<f4", [2, 2]]]
    copy = _records.copy_out(descs, [memoryview(np.arange(4, dtype=np.float32))])["x"]
    assert copy.base is None and copy.flags.owndata
    assert copy.tolist() == [[0, 1], [2, 3]]


@pytest.mark.parametrize("descs, sizes", [
    ([["x", "<f4", [2, 2]]], [15]),            # fewer bytes than the shape's
    ([["x", "<f4", [2, 2]]], [17]),            # more
    ([["x", "<f4", [-1]]], [16]),              # reshape's -1: numpy's path takes it
    ([["x", "<f4", [1 << 62, 1 << 62]]], [0]),  # past memory
    ([["x", "<f4", [1 << 70]]], [0]),
    ([["x", "<f4", [0, 1 << 62, 1 << 62]]], [0]),  # no bytes, a size past numpy's
    ([["x", ">f4", [4]]], [16]),               # not native order: numpy's path takes it
    ([["x", "<f4", [4], 0, 0]], [16]),         # a packed record's descriptor
    ([["x", "<f4", [4]]], [16, 16]),           # more parts than descriptors
    ([["x", "<f4", (4,)]], [16]),              # not a list
    ([["x", "<f4", [4.0]]], [16]),
    ([[b"x", "<f4", [4]]], [16]),
])
def test_records_the_fast_path_does_not_read_go_messages_way(descs, sizes):
    parts = [memoryview(bytearray(n)) for n in sizes]
    assert _records.view(descs, parts) is None
    assert _records.copy_out(descs, parts) is None


@SETTINGS
@given(arrays=tensors, scalar=st.sampled_from(NUMERIC))
def test_plain_inputs_are_taken_as_they_are_in_a_dict_of_their_own(arrays, scalar):
    # Engine._as_arrays keeps C-contiguous numeric arrays in native order as
    # they are, 0-d ones too: the fast path tells those in C.
    arrays = {**arrays, "0-d": np.zeros((), scalar)}
    plain = _records.plain_arrays(arrays)
    assert plain == arrays and plain is not arrays
    assert all(plain[name] is arrays[name] for name in arrays)


@pytest.mark.parametrize("inputs", [
    {"x": np.zeros(3, ">f4")},                                     # not native order
    {"x": np.zeros((4, 4), np.float32)[:, ::2]},                   # not contiguous
    {"x": np.zeros((4, 4), np.float32).T},                         # Fortran order
    {"x": np.array(["a"], object)},                                # objects
    {"x": np.zeros(2, [("a", "<f4")])},                            # structured
    {"x": np.zeros(2, "<M8[s]")},                                  # not numeric
    {"x": np.zeros(2, "S3")},
    {"x": np.zeros(2, np.float32).view(np.recarray)},              # a subclass
    {"x": np.float32(3)},                                          # a scalar, no array
    {"x": [1.0, 2.0]},
    {1: np.zeros(2, np.float32)},                                  # a name that is not a str
    {},
    [("x", np.zeros(2, np.float32))],                              # not a dict
])
def test_any_other_inputs_go_the_engines_way(inputs):
    assert _records.plain_arrays(inputs) is None
