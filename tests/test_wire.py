"""csrc/wire.pyx against protocol.py: the SDK's infer frames packed in C
are the bytes protocol.py packs, and answers read in C are the arrays it
reads; whatever C does not take (None) goes protocol.py's way, which
test_sdk.py and test_tcp.py drive through the real server."""
from __future__ import annotations

import signal
import socket
import struct
import threading
import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mmengine import client, protocol
from mmengine.server import tcp
from mmengine.client import Outputs

_wire = pytest.importorskip("mmengine._wire", reason="the native core is not built")

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
names = st.text(min_size=1, max_size=40)
arrays = st.sampled_from(list(protocol.DTYPES)).flatmap(
    lambda dtype: hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=4,
                                                               min_side=0, max_side=6)))
inputs = st.dictionaries(names, arrays, min_size=1, max_size=4)
ints = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


def python_frame(rid, model, inputs, version, timeout, token, timing, client_token):
    """What Client sends on protocol.py's path (_call_many's steps)."""
    message = client._infer_message(model, inputs, version, timeout, token, timing)
    message["id"] = rid
    if client_token is not None:
        message.setdefault("token", client_token)
    return b"".join(bytes(part) for part in protocol.frames(message, message["inputs"]))


@SETTINGS
@given(rid=st.integers(min_value=1, max_value=(1 << 63) - 1), model=names, inputs=inputs,
       version=st.none() | ints, timeout=st.none() | st.floats(min_value=1e-9, max_value=1e7),
       token=st.none() | st.text(max_size=70), timing=st.booleans(),
       client_token=st.none() | st.text(max_size=300))
def test_an_infer_frame_is_the_bytes_protocol_packs(rid, model, inputs, version, timeout,
                                                     token, timing, client_token):
    args = (rid, model, inputs, version, timeout, token, timing, client_token)
    frame = _wire.infer_frame(*args)
    assert frame is not None  # each of these is the fast path's
    assert frame == python_frame(*args)


def test_arrays_whose_order_is_spelled_out_take_the_fast_path():
    """dtype.newbyteorder("<") on a little-endian machine: its buffer's
    format is "<f", not "f", and it is the same array."""
    spelled = np.dtype(np.float32).newbyteorder("<")
    args = (1, "m", {"x": np.arange(6, dtype=np.float32).view(spelled)}, None, None, None,
            False, None)
    frame = _wire.infer_frame(*args)
    assert frame is not None
    assert frame == python_frame(*args)


def test_an_infer_frame_covers_every_length_header():
    """Each str, bin, array and map length at the edges of msgpack's
    header sizes, and ints at theirs."""
    for size in (0, 15, 16, 31, 32, 255, 256, 65535, 65536):
        text = "é" * (size // 2) + "x" * (size % 2)
        for rid in (1, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32):
            args = (rid, text or "m", {"x": np.zeros(size // 8, np.uint8)}, -size - 1,
                    None, text, False, None)
            assert _wire.infer_frame(*args) == python_frame(*args)
    many = {f"t{i}": np.zeros(i % 3, np.float32) for i in range(17)}  # a map16
    args = (1, "m", many, None, 1.5, None, True, "c")
    assert _wire.infer_frame(*args) == python_frame(*args)
    args = (1, "m", {"x": np.zeros((1,) * 16, np.int8)}, None, None, None, False, None)
    assert _wire.infer_frame(*args) == python_frame(*args)  # an array16 shape


@pytest.mark.parametrize("value", [
    np.zeros(protocol.BIG, np.uint8),  # frame_parts lays it out around the array
    np.zeros((4, 4), np.float32).T,  # not C order
    np.zeros(3, ">f4"),  # big-endian
    np.zeros(3, np.float128) if hasattr(np, "float128") else np.zeros(3, "U1"),  # no wire dtype
    np.zeros(3, "U1"),
    np.zeros(3, object),
    np.ma.masked_array([1.0, 2.0], mask=[0, 1]),
    [1.0, 2.0],
    np.float32(1.0),
])
def test_what_the_fast_path_does_not_take_goes_protocols_way(value):
    assert _wire.infer_frame(1, "m", {"x": value}, None, None, None, False, None) is None


@pytest.mark.parametrize("args", [
    (1, "m", {}, None, None, None, False, None),  # no inputs: the server's BadRequest
    (1, "m", {1: np.zeros(1)}, None, None, None, False, None),  # a name that is no str
    (1, b"m", {"x": np.zeros(1)}, None, None, None, False, None),
    (1, "m", {"x": np.zeros(1)}, True, None, None, False, None),  # a bool version
    (1, "m", {"x": np.zeros(1)}, 1 << 63, None, None, False, None),  # past int64
    (1, "m", {"x": np.zeros(1)}, None, 1, None, False, None),  # a timeout not float
    (1, "\ud800", {"x": np.zeros(1)}, None, None, None, False, None),  # no UTF-8
    (1, "m", {"x": np.zeros(1)}, None, None, 5, False, None),
])
def test_other_arguments_go_protocols_way(args):
    assert _wire.infer_frame(*args) is None


def python_answer(body: bytes) -> dict:
    response = protocol.decode(body)
    return {**response, "outputs": protocol.decode_tensors(response["outputs"], outputs=True)}


def native_answer(body: bytes, pad: int = 3):
    """_wire.answer of `body` lying in the middle of a larger buffer, as a
    stream's buffer holds it."""
    buf = bytearray(b"\xc1" * pad + body + b"\xc1" * pad)
    return _wire.answer(buf, pad, len(body), Outputs)


def assert_same(native: dict, python: dict) -> None:
    assert native.keys() == python.keys() == {"id", "ok", "outputs"}
    assert (native["id"], native["ok"]) == (python["id"], python["ok"])
    assert type(native["outputs"]) is Outputs
    assert list(native["outputs"]) == list(python["outputs"])
    for name, got in native["outputs"].items():
        want = python["outputs"][name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        assert got.tobytes() == want.tobytes()
        assert not got.flags.writeable and got.flags.aligned


@SETTINGS
@given(rid=st.integers(min_value=0, max_value=(1 << 63) - 1),
       outputs=st.dictionaries(names, arrays, max_size=4))
def test_an_answer_reads_as_protocol_reads_it(rid, outputs):
    body = protocol.frame({"id": rid, "ok": True,
                           "outputs": protocol.encode_tensors(outputs)})[4:]
    assert_same(native_answer(body), python_answer(body))
    # The same keys in another order.
    body = msgpack.packb({"outputs": protocol.encode_tensors(outputs), "ok": True, "id": rid})
    assert_same(native_answer(body), python_answer(body))


def _changed(message: dict, tensor: dict, changes: dict) -> bytes:
    """`message`, which holds `tensor`, packed after `changes`: a key of the
    tensor's set there, any other set in the message, or deleted if None."""
    for key, value in changes.items():
        if key in tensor:
            tensor[key] = value
        elif value is None:
            del message[key]
        else:
            message[key] = value
    return msgpack.packb(message)


def _answer_with(**changes) -> bytes:
    tensor = {"dtype": "float32", "shape": [2], "data": bytes(8)}
    return _changed({"id": 7, "ok": True, "outputs": {"y": tensor}}, tensor, changes)


@pytest.mark.parametrize("body", [
    _answer_with(timing={"total_ns": 5}),  # another key
    _answer_with(ok=False),
    _answer_with(id=None),
    _answer_with(id=-1),
    _answer_with(id="7"),
    _answer_with(outputs=None),
    _answer_with(outputs=[]),
    _answer_with(dtype="float128"),
    _answer_with(dtype=b"float32"),
    _answer_with(shape=[3]),  # 12 bytes, not 8
    _answer_with(shape=[-2]),
    _answer_with(shape=[1 << 62, 0]),
    _answer_with(shape=[1 << 40, 1 << 40, 0], data=b""),  # a size past memory's
    _answer_with(shape=[1 << 62, 1 << 62, 1 << 62, 0], data=b""),
    _answer_with(shape=2),
    _answer_with(data="12345678"),
    _answer_with(dtype="bool", shape=[8], data=bytes([0, 1, 2, 0, 0, 0, 0, 0])),
    msgpack.packb({"id": 7, "ok": True, "outputs": {"y": {"dtype": "uint8", "shape": [1],
                                                         "data": b"x", "extra": 1}}}),
    msgpack.packb({"id": 7, "ok": True, "outputs": {1: {"dtype": "uint8", "shape": [1],
                                                       "data": b"x"}}}),
    msgpack.packb({"id": 7, "ok": True, "outputs": {"y": {}}}, use_bin_type=True) + b"\x00",
    msgpack.packb([7, True]),
    b"\x83\xa2id\x07\xa2id\x07\xa2ok\xc3",  # a key twice
    "\x83\xa2id\x07\xa2ok\xc3\xa7outputs\x81\xa1\xff".encode("latin-1"),  # no UTF-8
])
def test_any_other_answer_is_left_to_protocol(body):
    assert native_answer(body) is None


def test_a_cut_answer_is_left_to_protocol_wherever_it_is_cut():
    body = protocol.frame({"id": 300, "ok": True, "outputs": protocol.encode_tensors(
        {"y": np.arange(6, dtype=np.int64).reshape(2, 3), "z": np.array(True)})})[4:]
    assert native_answer(body) is not None
    for end in range(len(body)):
        assert native_answer(body[:end]) is None, end
    assert _wire.answer(bytearray(body), 1, len(body), Outputs) is None  # past its end


ANSWER = protocol.frame({"id": 300, "ok": True, "outputs": protocol.encode_tensors(
    {"y": np.arange(6, dtype=np.int16).reshape(2, 3), "ok": np.array([True, False])})})[4:]


def near(body: bytes) -> st.SearchStrategy:
    """Any bytes, or `body` with one byte changed."""
    return st.binary(max_size=200) | st.tuples(st.integers(0, len(body) - 1),
                                               st.integers(0, 255)).map(
        lambda change: body[:change[0]] + bytes([change[1]]) + body[change[0] + 1:])


@SETTINGS
@given(near(ANSWER))
def test_any_bytes_read_as_protocol_reads_them_or_not_at_all(body):
    got = native_answer(body)
    if got is not None:
        assert_same(got, python_answer(body))


# -- the server's side: requests read, answers packed -------------------------------

def python_request(body: bytes) -> tuple:
    """An infer request as server/tcp.py reads it through protocol.py."""
    message = protocol.decode(body)
    assert message.get("op") == "infer" and message.get("id") is not None
    model, version = tcp._model_args(message)
    inputs = protocol.decode_tensors(message.get("inputs"))
    timing = message.get("timing")
    assert timing is None or type(timing) is bool
    return (message["id"], model, inputs, version, tcp._timeout(message), tcp._token(message),
            bool(timing))


def native_request(body: bytes, pad: int = 2):
    buf = bytearray(b"\x00" * pad + body + b"\x00" * pad)
    return _wire.request(buf, pad, len(body))


def assert_same_request(native: tuple, python: tuple) -> None:
    assert native[:2] == python[:2] and native[3:] == python[3:]
    assert type(native[2]) is dict and list(native[2]) == list(python[2])
    for name, got in native[2].items():
        want = python[2][name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        assert got.tobytes() == want.tobytes()
        assert not got.flags.writeable


@SETTINGS
@given(rid=st.integers(min_value=0, max_value=(1 << 63) - 1), model=names, inputs=inputs,
       version=st.none() | ints, timeout=st.none() | st.floats(min_value=1e-9, max_value=1e7),
       token=st.none() | st.text(max_size=70), timing=st.booleans(),
       client_token=st.none() | st.text(max_size=300), shuffle=st.randoms())
def test_a_request_reads_as_the_server_reads_it(rid, model, inputs, version, timeout, token,
                                                 timing, client_token, shuffle):
    body = python_frame(rid, model, inputs, version, timeout, token, timing, client_token)[4:]
    if len(body) < protocol.BIG:
        assert_same_request(native_request(body), python_request(body))
    message = protocol.decode(body)
    keys = list(message)
    shuffle.shuffle(keys)
    body = msgpack.packb({key: message[key] for key in keys})
    if len(body) < protocol.BIG:
        assert_same_request(native_request(body), python_request(body))


def _request_with(**changes) -> bytes:
    tensor = {"dtype": "int32", "shape": [1], "data": bytes(4)}
    return _changed({"op": "infer", "model": "m", "id": 3, "inputs": {"x": tensor}}, tensor,
                    changes)


@pytest.mark.parametrize("body", [
    _request_with(op="load"),
    _request_with(op=None),
    _request_with(id=None),
    _request_with(id=-3),
    _request_with(id="3"),
    _request_with(model=None),
    _request_with(model=5),
    _request_with(inputs=None),
    _request_with(inputs={}),
    _request_with(inputs={"x": {"dtype": "int32", "shape": [2], "data": bytes(4)}}),
    _request_with(inputs={"x": {"dtype": "int32", "shape": [1], "data": bytes(4), "pad": 0}}),
    _request_with(shape=[1 << 40, 1 << 40, 0], data=b""),
    _request_with(shape=[0, 1 << 62, 1 << 62], data=b""),
    _request_with(version=True),
    _request_with(version="1"),
    _request_with(version=1 << 63),
    _request_with(timeout=5),  # an int: protocol.py's path takes it
    _request_with(timeout=0.0),
    _request_with(timeout=-1.0),
    _request_with(timeout=float("nan")),
    msgpack.packb({"op": "infer", "model": "m", "id": 3, "timeout": 1.5,
                   "inputs": {"x": {"dtype": "int32", "shape": [1], "data": bytes(4)}}},
                  use_single_float=True),
    _request_with(token=5),
    _request_with(timing="yes"),
    _request_with(pad=b"\x00" * 8),  # a key of no request
    _request_with() + b"\xc0",
    _request_with(model="m" * protocol.BIG),  # a large one is tcp.py's own
    b"\x85" + _request_with()[1:] + b"\xa5model\xa1n",  # a key twice
])
def test_any_other_request_is_left_to_protocol(body):
    assert native_request(body) is None


def test_a_cut_request_is_left_to_protocol_wherever_it_is_cut():
    body = python_frame(9, "mlp", {"x": np.ones((2, 3), np.float32), "b": np.array([True])},
                        4, 1.5, "t", True, None)[4:]
    assert native_request(body) is not None
    for end in range(len(body)):
        assert native_request(body[:end]) is None, end


REQUEST = python_frame(9, "mlp", {"x": np.ones((2, 3), np.float32), "b": np.array([True])},
                       -4, 1.5, "t", True, None)[4:]


@SETTINGS
@given(near(REQUEST))
def test_any_bytes_read_as_the_server_reads_them_or_not_at_all(body):
    got = native_request(body)
    if got is not None:
        assert_same_request(got, python_request(body))


@SETTINGS
@given(rid=st.integers(min_value=0, max_value=(1 << 63) - 1),
       outputs=st.dictionaries(names, arrays, max_size=4))
def test_an_answer_frame_is_the_bytes_protocol_packs(rid, outputs):
    frame = _wire.answer_frame(rid, outputs)
    tensors = protocol.encode_tensors(outputs)
    parts = protocol.frames({"id": rid, "ok": True, "outputs": tensors}, tensors)
    if sum(t["data"].nbytes for t in tensors.values()) >= protocol.BIG:
        assert frame is None
    else:
        assert frame == b"".join(bytes(part) for part in parts)


@pytest.mark.parametrize("rid, outputs", [
    ("7", {"y": np.zeros(2)}),
    (None, {"y": np.zeros(2)}),
    (True, {"y": np.zeros(2)}),
    (7, Outputs(y=np.zeros(2))),  # a dict of another type
    (7, {"y": np.zeros(2, "U1")}),  # the server's InternalError: protocol.py says it
    (7, {"y": np.zeros((3, 3))[:, 0]}),
    (7, {"y": [1.0]}),
    (7, {5: np.zeros(2)}),
])
def test_any_other_answer_frame_is_left_to_protocol(rid, outputs):
    assert _wire.answer_frame(rid, outputs) is None


# -- the blocking client's exchange ------------------------------------------------

def test_exchange_sends_the_frame_whole_and_returns_what_came_as_a_read_would():
    a, b = socket.socketpair()
    with a, b:
        inbox = bytearray(16)
        frame = bytes(range(256)) * 1000  # more than one send of a socketpair's buffer
        got = bytearray()

        def peer():
            while len(got) < len(frame):
                got.extend(b.recv(1 << 16))
            b.sendall(b"answer, longer than the inbox")

        t = threading.Thread(target=peer)
        t.start()
        assert _wire.exchange(a.fileno(), frame, inbox) == b"answer, longer t"  # a read's worth
        t.join(10)
        assert bytes(got) == frame
        assert _wire.exchange(a.fileno(), b"", inbox) == b"han the inbox"  # the rest, as recv
        assert not _wire.readable(a.fileno())
        b.shutdown(socket.SHUT_WR)
        assert _wire.readable(a.fileno())  # its peer closed it
        assert _wire.exchange(a.fileno(), b"x", inbox) == b""  # the end, as recv says it


def test_exchange_raises_the_socket_modules_errors():
    a, b = socket.socketpair()
    with a:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 20_000))
        with pytest.raises(BlockingIOError):  # the kernel's bound (Client.set_timeout)
            _wire.exchange(a.fileno(), b"ping", bytearray(8))
        assert b.recv(8) == b"ping"
        b.close()
        with pytest.raises(BrokenPipeError):
            _wire.exchange(a.fileno(), b"x" * 100_000, bytearray(8))


def test_a_signals_handler_runs_during_an_exchanges_wait_and_its_error_ends_it():
    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    before = signal.signal(signal.SIGALRM, handler)
    a, b = socket.socketpair()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted):
            _wire.exchange(a.fileno(), b"ping", bytearray(8))  # no answer comes
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        a.close()
        b.close()


def test_an_exchange_cut_short_by_signals_sends_the_rest_and_reads_on():
    # A handler that returns: each send a signal cuts short (EINTR, or a
    # part sent) goes on from where it stopped, and so does the read.
    hits = []
    before = signal.signal(signal.SIGALRM, lambda signum, frame: hits.append(signum))
    a, b = socket.socketpair()
    frame = bytes(range(256)) * (16 << 10)  # 4 MiB: many times a socketpair's buffer
    got = bytearray()

    def peer():
        while len(got) < len(frame):
            got.extend(b.recv(1 << 16))
            time.sleep(0.0005)  # slowly: the sends wait, and signals come meanwhile
        time.sleep(0.05)  # and the read waits too
        b.sendall(b"done")

    t = threading.Thread(target=peer)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
        t.start()
        assert _wire.exchange(a.fileno(), frame, bytearray(8)) == b"done"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        t.join(30)
        a.close()
        b.close()
    assert bytes(got) == frame
    assert len(hits) > 10  # the signals came during the exchange, and their handler ran
