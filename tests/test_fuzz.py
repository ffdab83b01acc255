"""Hostile input, property-based: the frame decoder and the tensor schema in
process, then a real `mmengine serve` fed random frames and random HTTP
requests, and the connection limits (count, idle, unfinished frames, sizes
before allocation).

Every bad input must get a typed error; INTERNAL is a bug wherever it
appears. Each property runs a bounded, derandomized number of examples
(`EXAMPLES`); tools/fuzz.py runs the same properties with a large budget.
"""
from __future__ import annotations

import gzip
import http.client
import itertools
import json
import re
import socket
import struct
import time
import zlib
from pathlib import Path

import msgpack
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import Server, environ
from mmengine import demo, protocol
from mmengine.errors import BadRequest, ErrorCode, MMEngineError

EXAMPLES = 200
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
DIMS = (16, 32, 4)
MODELS = ("m00", "m01")
MAX_CONNECTIONS = 24
TCP_IDLE_S = 1.0
RSS_GROWTH = 50 << 20
SLOW_HANDLER = '''
import time
import zlib

def load(path, device):
    pass

def predict(inputs):
    time.sleep(float(inputs["seconds"].ravel()[0]))
    return {"y": inputs["seconds"] * 2}
'''

# -- strategies -------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.binary(max_size=24))
values = st.recursive(scalars, lambda inner: (
    st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=4)),
    max_leaves=12)
dims = st.sampled_from([0, 1, 2, 16, -1, -2, 1 << 31, (1 << 63) - 1, (1 << 64) - 1]) | st.integers(-9, 40)
dtype_names = st.sampled_from([
    "float32", "float64", "float16", "int64", "int32", "uint8", "bool", "complex64",
    "object", "O", "V8", "V0", "<U4", "S4", "S0", "M8[s]", "m8", "f16", ">f4", "(2,)i4",
    "(1099511627776,)i4", "i4\0", "", "float128", "U", "a"])
shapes = (st.lists(dims, max_size=4) | st.lists(st.floats(), max_size=3)
          | st.just([float("inf")]) | values)
tensors = st.fixed_dictionaries({}, optional={
    "dtype": dtype_names | values,
    "shape": shapes,
    "data": st.binary(max_size=96) | values})
# A tensor the demo models accept, so that fuzzing reaches the success path too.
good_tensors = st.integers(1, 3).map(lambda n: protocol.encode_tensors(
    {"x": np.ones((n, DIMS[0]), np.float32)})["x"])
inputs = (st.dictionaries(st.just("x") | st.text(max_size=6), tensors | good_tensors,
                          max_size=3)
          | values)
model_names = st.sampled_from([*MODELS, "anything", "nope", "../m00", "", "m00/../m01", "x" * 300]) | values
requests = st.fixed_dictionaries({}, optional={
    "op": st.sampled_from([*protocol.OPS, "explode"]) | values,
    "model": model_names,
    "version": st.sampled_from([None, 0, 1, 2, -1, (1 << 64) - 1, True, "1", 1.0]) | values,
    "inputs": inputs,
    "timeout": (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, (1 << 64) - 1)
                | values),
    "timing": st.booleans() | values,
    "after": model_names,
    "limit": st.integers(-3, (1 << 64) - 1) | values})


@st.composite
def near_valid_requests(draw) -> dict:
    """A valid request with one or two of its fields (or its tensor's) made
    wrong: most of them get past the first checks and reach the engine."""
    op = draw(st.sampled_from(protocol.OPS))
    m: dict = {"op": op}
    if op not in ("list", "stats", "health"):
        m["model"] = draw(st.sampled_from([*MODELS, "anything"]))
    if op == "infer":
        m["inputs"] = {"x": dict(draw(good_tensors))}
    fields = ["op", "model", "version", "inputs", "timeout", "timing", "tensor", "after",
              "limit"]
    for field in draw(st.lists(st.sampled_from(fields), max_size=2, unique=True)):
        t = m.get("inputs", {}).get("x") if isinstance(m.get("inputs"), dict) else None
        if field == "tensor" and isinstance(t, dict):
            key = draw(st.sampled_from(["dtype", "shape", "data"]))
            if draw(st.booleans()):
                # (A tensor drawn whole from `requests` may lack the key.)
                t.pop(key, None)
            else:
                t[key] = draw(tensors.map(lambda w: w.get(key, None)))
        elif field != "tensor":
            m[field] = draw(requests.map(lambda w: w.get(field, None)))
    return m


ids = st.integers(0, (1 << 64) - 1) | st.text(max_size=8) | st.binary(max_size=8)
# Bodies: random bytes, and msgpack values cut short or with bytes after them.
bodies = (st.binary(max_size=300)
          | st.tuples(values, st.integers(0, 40)).map(
              lambda v: msgpack.packb(v[0], use_bin_type=True)[:-v[1] or None])
          | st.tuples(requests, st.binary(min_size=1, max_size=8)).map(
              lambda v: msgpack.packb(v[0], use_bin_type=True) + v[1]))


def _pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


# -- in process: the decoder and the tensor schema ------------------------------------

def check_decode(body: bytes) -> None:
    """protocol.decode takes a map or raises BadRequest; nothing else."""
    try:
        message = protocol.decode(body)
    except BadRequest:
        return
    assert isinstance(message, dict)


def check_decode_tensors(obj) -> None:
    """decode_tensors returns arrays of a numeric dtype that hold exactly
    their data, or raises a typed error; nothing else."""
    try:
        arrays = protocol.decode_tensors(obj)
    except MMEngineError as e:
        assert e.code != ErrorCode.INTERNAL, e
        return
    for name, a in arrays.items():
        t = obj[name]
        assert not a.dtype.hasobject
        assert a.nbytes == len(t["data"])


@FUZZ
@given(bodies)
def test_decode_takes_any_bytes(body):
    check_decode(body)


def _plain(obj):
    """obj with the views that decode gives for large bins made bytes."""
    if isinstance(obj, memoryview):
        return bytes(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


@FUZZ
@given(values, st.integers(0, 60), st.binary(max_size=4), st.integers(0, 1 << 20))
def test_decode_of_a_large_frame_is_msgpacks_with_views(value, cut, extra, flip):
    # A body of protocol.BIG bytes or more is read by decode's own reader,
    # which views large bins: it must agree with msgpack on every value,
    # and on every body cut short, corrupted or followed by more bytes
    # (NaN != NaN: compared packed again).
    whole = msgpack.packb({"pad": bytes(protocol.BIG), "v": value}, use_bin_type=True)
    bodies = [whole, whole[:len(whole) - cut] if cut else whole + extra]
    corrupt = bytearray(whole)
    corrupt[flip % len(corrupt)] ^= 0x5A
    bodies.append(bytes(corrupt))
    for body in bodies:
        try:
            expected = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception:  # noqa: BLE001 - msgpack's many types: decode says BadRequest
            with pytest.raises(BadRequest):
                protocol.decode(body)
            continue
        if not isinstance(expected, dict):
            with pytest.raises(BadRequest):
                protocol.decode(body)
            continue
        got = protocol.decode(body)
        assert _pack(_plain(got)) == _pack(expected)
        if body is whole:
            assert isinstance(got["pad"], memoryview) and got["pad"].readonly


def _tensor(dtype="float32", shape=(1,), data=b"\0" * 4) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data": data}


# Found by fuzzing: kept as examples that always run.
KNOWN = [_tensor(shape=[float("inf")]), _tensor("M8[s]", data=b"\0" * 8),
         _tensor("m8", data=b"\0" * 8), _tensor("f16", data=b"\0" * 16),
         _tensor("<U4", data=b"\0" * 16), _tensor("V8", data=b"\0" * 8),
         _tensor(shape=[-1], data=b"\0" * 8), _tensor(shape={"1": 0})]


@FUZZ
@given(st.dictionaries(st.text(max_size=6), tensors, min_size=1, max_size=3) | values)
@example({"x": KNOWN[0]})
def test_decode_tensors_wrong_fields(obj):
    check_decode_tensors(obj)


# -- against `mmengine serve` -------------------------------------------------------------

def make_repo(root: Path) -> Path:
    for i, name in enumerate(MODELS):
        demo.write_mlp(root / name, "safetensors", *DIMS, seed=i)
    (root / "slow" / "1").mkdir(parents=True)
    (root / "slow" / "1" / "handler.py").write_text(SLOW_HANDLER)
    (root / "anything" / "1").mkdir(parents=True)  # declares no inputs: takes any dtype
    (root / "anything" / "1" / "handler.py").write_text(
        "def load(path, device):\n    pass\n\n"
        "def predict(inputs):\n    return {k: v for k, v in inputs.items()}\n")
    return root


class Target:
    """A serving process, its two ports and its pid; `ids` numbers requests."""

    def __init__(self, repo: Path, roots: Path, **env: str):
        self.server = Server(
            "--repo", str(repo), "--workers", "1", "--tcp-port", "0", "--http-port", "0",
            env=environ(MMENGINE_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
                        MMENGINE_TCP_IDLE_TIMEOUT_S=str(TCP_IDLE_S),
                        MMENGINE_HTTP_IDLE_TIMEOUT_S="5",
                        MMENGINE_MODEL_ROOTS=str(roots), **env))
        try:  # a server that never came up is not left running
            m = self.server.wait_for(r"on tcp://(\S+):(\d+)", 60)
            self.tcp = m.group(1), int(m.group(2))
            m = self.server.wait_for(r"HTTP .* on http://(\S+):(\d+)", 30)
            self.http = m.group(1), int(m.group(2))
            self.process = psutil.Process(self.server.proc.pid)
            self.ids = itertools.count(1)
            self.stats = {"frames": 0, "errors": {}, "closed": 0, "http": {}}
            self.assert_serving()
            self.rss0 = self.rss()
        except BaseException:
            self.server.kill()
            raise

    def rss(self) -> int:
        return self.process.memory_info().rss

    def stop(self) -> None:
        if self.server.proc.poll() is None:
            self.server.stop()

    # -- the checks after every batch

    def assert_serving(self) -> None:
        assert self.server.proc.poll() is None, "".join(self.server.output)
        x = np.ones((2, DIMS[0]), np.float32)
        rid = next(self.ids)
        with connect(self.tcp) as s:
            s.sendall(protocol.frame({"id": rid, "op": "infer", "model": "m00",
                                      "inputs": protocol.encode_tensors({"x": x})}))
            r = read_frame(s)
        assert r["id"] == rid and r["ok"], r
        status, _, _ = http_call(self.http, b"GET /v2/health/ready HTTP/1.1\r\n"
                                            b"Host: x\r\nConnection: close\r\n\r\n")
        assert status == 200

    def assert_bounded(self) -> None:
        grown = self.rss() - self.rss0
        assert grown < RSS_GROWTH, f"the server's RSS grew by {grown / 2**20:.1f} MiB"

    # -- TCP

    def send_requests(self, messages: list[dict]) -> None:
        """Well-formed maps, pipelined on one connection: each gets an answer
        with its id, never INTERNAL, and the connection stays open."""
        # Ids of our own for those without: none that a request of the
        # batch carries (Hypothesis drew 458, and the counter gave it too).
        taken = {_key(m["id"]) for m in messages if m.get("id") is not None}
        for m in messages:
            if m.get("id") is None:
                m["id"] = next(rid for rid in self.ids if _key(rid) not in taken)
                taken.add(_key(m["id"]))
        with connect(self.tcp) as s:
            s.sendall(b"".join(protocol.frame(m) for m in messages))
            want = {_key(m["id"]) for m in messages}
            while want:
                r = read_frame(s)
                assert r is not None, f"the server closed the connection on {messages!r}"
                assert _key(r["id"]) in want, (r, messages)
                want.discard(_key(r["id"]))
                self._note(r)

    def send_body(self, body: bytes) -> None:
        """One frame of any body: a map with an id is answered with it;
        anything else (a map without one too) gets a nil-id BAD_REQUEST and
        the connection is closed."""
        try:
            message = protocol.decode(body)
        except BadRequest:
            message = None
        if message is not None and message.get("id") is None:
            message = None
        with connect(self.tcp) as s:
            s.sendall(protocol.LENGTH.pack(len(body)) + body)
            r = read_frame(s)
            assert r is not None, f"no answer to {body!r}"
            self._note(r)
            if message is None:
                assert r["id"] is None and r["error"]["code"] == ErrorCode.BAD_REQUEST, r
                assert read_frame(s) is None, "the connection stayed open after a bad frame"
                self.stats["closed"] += 1
            else:
                assert _key(r["id"]) == _key(message.get("id")), (r, message)

    def _note(self, r: dict) -> None:
        self.stats["frames"] += 1
        if not r["ok"]:
            code = r["error"]["code"]
            assert code in set(ErrorCode) and code != ErrorCode.INTERNAL, r
            name = ErrorCode(code).name
            self.stats["errors"][name] = self.stats["errors"].get(name, 0) + 1

    # -- HTTP

    def send_http(self, raw: bytes) -> None:
        """Any request: a well-formed response (or, for a request that is not
        HTTP, a 4xx or a closed connection); a JSON error body for 4xx/5xx
        and never INTERNAL."""
        status, headers, body = http_call(self.http, raw)
        self.stats["http"][status] = self.stats["http"].get(status, 0) + 1
        if status is None:  # closed without an answer
            return
        assert 100 <= status < 600
        # Readiness is said by the status alone (KServe: 400, no body).
        not_ready = status == 400 and not body and raw.split(b" ", 2)[1].endswith(b"/ready")
        if status >= 400 and not raw.startswith(b"HEAD ") and not not_ready:
            error = json.loads(body)
            assert isinstance(error, dict) and isinstance(error.get("error"), str), body
            assert error.get("code") in ErrorCode.__members__, body
            assert error["code"] != "INTERNAL", (raw[:2000], body)


def _key(rid):
    return repr(rid)


def connect(address) -> socket.socket:
    s = socket.create_connection(address, timeout=15)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_frame(sock: socket.socket) -> dict | None:
    """The next frame, or None when the server closed the connection."""
    def exactly(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = sock.recv(n - len(data))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not data, "the server closed the connection mid-frame"
                return None
            data += chunk
        return data

    head = exactly(4)
    if head is None:
        return None
    return protocol.decode(exactly(protocol.LENGTH.unpack(head)[0]))


def http_call(address, raw: bytes):
    """(status, headers, body) of the one answer to `raw`, or (None, {}, b"")
    when the server closed the connection without one."""
    with socket.create_connection(address, timeout=15) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # closed already (refused): its answer may still be there
            pass
        # A HEAD's answer has no body: read as its method says.
        r = http.client.HTTPResponse(s, method="HEAD" if raw.startswith(b"HEAD ") else "GET")
        try:
            r.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None, {}, b""
        return r.status, dict(r.getheaders()), r.read()


# HTTP requests: the routes' shapes with random parts.
segments = st.sampled_from([*MODELS, "nope", "..", "%2e%2e", "a%2Fb", "%00", "x" * 300,
                            "anything", "slow", "1", "-1", "99999999999999999999"]) \
    | st.text(st.characters(codec="ascii", exclude_characters="/?# \r\n"), max_size=10)
paths = st.one_of(
    st.tuples(st.sampled_from([
        "/v2/models/{}/infer", "/v2/models/{}/versions/{}/infer", "/v2/models/{}",
        "/v2/models/{}/versions/{}", "/v2/models/{}/ready", "/v2/repository/models/{}/load",
        "/v2/repository/models/{}/unload", "/models/{}", "/models/{}/invoke"]),
        segments, segments).map(lambda t: t[0].format(t[1], t[2])),
    st.sampled_from(["/v2", "/v2/health/live", "/v2/health/ready", "/v2/repository/index",
                     "/ping", "/models", "/invocations", "/metrics", "/", "*", "//",
                     "/models?max_results=0", "/models?max_results=2&next_page_token=%ff",
                     "/models?next_page_token=!!", "/models?max_results=1&max_results=2"]),
    st.text(st.characters(codec="ascii", exclude_characters=" \r\n"), max_size=40)
    .map(lambda t: "/" + t))
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS",
                           "TRACE", "FOO"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
kserve_tensor = st.fixed_dictionaries({}, optional={
    "name": st.just("x") | json_values,
    "shape": st.lists(st.integers(-2, 20) | st.sampled_from([1 << 40, 1 << 63]), max_size=3)
    | json_values,
    "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BOOL", "BYTES", "BF16", "UINT8",
                                 "fp32", ""]) | json_values,
    "data": st.lists(st.floats(allow_nan=False) | st.integers(-300, 300) | st.booleans(),
                     max_size=40) | json_values,
    "parameters": st.fixed_dictionaries({}, optional={
        "binary_data_size": st.integers(-1, 200) | json_values}) | json_values})
kserve_body = st.fixed_dictionaries({}, optional={
    "id": json_values, "inputs": st.lists(kserve_tensor, max_size=3) | json_values,
    "outputs": st.lists(st.fixed_dictionaries({}, optional={
        "name": st.just("y") | json_values, "parameters": json_values}), max_size=2)
    | json_values,
    "parameters": st.fixed_dictionaries({}, optional={
        "timeout": st.floats() | st.integers(-1, 1 << 70) | json_values,
        "binary_data_output": json_values}) | json_values})
sagemaker_body = st.fixed_dictionaries({}, optional={
    "model_name": st.sampled_from(["added", "m00", "../x", ""]) | json_values,
    "url": st.sampled_from(["ROOT/m00", "ROOT", "file://ROOTX/m00", "/etc", "http://x/y",
                            "file://host/x", "relative", "ROOT/m00\0"]) | json_values,
    "inputs": st.dictionaries(st.just("x") | st.text(max_size=4),
                              st.lists(st.lists(st.floats(allow_nan=False), max_size=16),
                                       max_size=3) | json_values, max_size=2) | json_values})
http_bodies = st.one_of(
    kserve_body.map(lambda b: json.dumps(b).encode()),
    sagemaker_body.map(lambda b: json.dumps(b).encode()),
    json_values.map(lambda b: json.dumps(b).encode()),
    st.sampled_from([b"[" * 5000, b'{"inputs":' * 3000, b"NaN", b'{"a":Infinity}',
                     b"\xff\xfe", b"1e999999"]),
    st.binary(max_size=200))
header_names = st.sampled_from([
    "Content-Type", "Inference-Header-Content-Length", "X-Amzn-SageMaker-Target-Model",
    "Transfer-Encoding", "Expect", "Connection", "X-Mmengine-Timing", "Accept"]) \
    | st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8)
header_values = st.sampled_from(["application/json", "text/plain", "0", "-1", "10", "999999",
                                 "m00", "anything", "added", "1", "keep-alive", "close",
                                 "100-continue", "chunked", "x" * 100]) \
    | st.text(st.characters(codec="ascii", exclude_characters="\r\n"), max_size=12)


def _kserve_infer(n: int = 1, **extra) -> dict:
    return {"inputs": [{"name": "x", "shape": [n, DIMS[0]], "datatype": "FP32",
                        "data": [0.5] * (n * DIMS[0])}], **extra}


# Valid requests, each to be sent as is or with one part made wrong.
VALID_HTTP = [
    ("POST", "/v2/models/m00/infer", json.dumps(_kserve_infer()).encode()),
    ("POST", "/v2/models/m01/versions/1/infer",
     json.dumps(_kserve_infer(2, outputs=[{"name": "y"}])).encode()),
    ("POST", "/v2/models/anything/infer", json.dumps(_kserve_infer()).encode()),
    ("GET", "/v2/models/m00", b""), ("GET", "/v2/models/m00/ready", b""),
    ("POST", "/v2/repository/models/m01/load", b"{}"),
    ("POST", "/v2/repository/index", b"{}"),
    ("POST", "/models", b'{"model_name": "added", "url": "ROOT/m00"}'),
    ("POST", "/models/added/invoke", json.dumps({"inputs": {"x": [[0.5] * DIMS[0]]}}).encode()),
    ("GET", "/models/added", b""), ("GET", "/models?max_results=1", b""),
    ("GET", "/metrics", b""),
]


@st.composite
def near_valid_http(draw, root: str = "ROOT") -> bytes:
    method, path, body = draw(st.sampled_from(VALID_HTTP))
    part = draw(st.sampled_from(["none", "method", "path", "body", "json", "timeout",
                                 "coding"]))
    coding = None
    if part == "method":
        method = draw(methods)
    elif part == "path":
        path = draw(paths)
    elif part == "body":
        body = draw(http_bodies)
    elif part == "json" and body.startswith(b"{"):
        obj = json.loads(body)
        key = draw(st.sampled_from(sorted(obj) or ["inputs"]))
        obj[key] = draw(json_values | kserve_body | st.lists(kserve_tensor, max_size=2))
        body = json.dumps(obj).encode()
    elif part == "timeout" and body.startswith(b"{"):
        obj = json.loads(body)
        obj["parameters"] = {"timeout": draw(st.floats() | st.integers(-1, 1 << 70))}
        body = json.dumps(obj).encode()  # NaN and Infinity as Python writes them
    body = body.replace(b"ROOT", root.encode())
    if part == "coding":  # compressed, as named or not, whole or cut short
        coding = draw(st.sampled_from(["gzip", "deflate", "x-gzip", "gzip, deflate", "br"]))
        for c in coding.split(", "):
            body = zlib.compress(body) if c == "deflate" else gzip.compress(body)
        body = body[:draw(st.integers(0, len(body)))] if draw(st.booleans()) else body
    return _http_bytes(draw, method, path, body, coding)


def _http_bytes(draw, method: str, path: str, body: bytes, coding: str | None = None) -> bytes:
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=3))
    if coding is not None:
        headers.append(("Content-Encoding", coding))
    lines = [f"{method} {path} HTTP/1.1", "Host: fuzz"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in
              ("content-length", "transfer-encoding", "connection")]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@st.composite
def http_requests(draw, root: str = "ROOT") -> bytes:
    method, path, body = draw(methods), draw(paths), draw(http_bodies)
    body = body.replace(b"ROOT", root.encode())
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=4))
    lines = [f"{method} {path} HTTP/1.1", "Host: fuzz"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in
              ("content-length", "transfer-encoding", "connection")]
    if draw(st.booleans()):  # sometimes no body framing at all
        lines.append(f"Content-Length: {len(body)}")
    else:
        body = b""
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("repo"))
    roots = tmp_path_factory.mktemp("roots")
    demo.write_mlp(roots / "m00", "safetensors", *DIMS, seed=0)
    t = Target(repo, roots)
    t.root = str(roots)
    yield t
    t.stop()


@FUZZ
@given(st.lists(requests | near_valid_requests() | near_valid_requests()
                | st.tuples(requests, ids).map(lambda v: {**v[0], "id": v[1]}),
                min_size=1, max_size=6))
@example([{"op": []}, {"op": {"a": 1}}])
@example([{"op": "infer", "model": "anything", "inputs": {"x": t}} for t in KNOWN])
@example([{"op": op, "model": "m00", "timeout": float("nan"),
           "inputs": {"x": _tensor(shape=(1, DIMS[0]), data=b"\0" * 4 * DIMS[0])}}
          for op in ("infer", "load", "pin", "unload")])
def test_server_answers_wrong_requests_with_typed_errors(target, messages):
    # A random id might repeat one in this batch; keep them distinct.
    seen = set()
    for m in messages:
        if "id" in m and (m["id"] is None or _key(m["id"]) in seen or not m["id"]):
            del m["id"]
        if "id" in m:
            seen.add(_key(m["id"]))
    target.send_requests(messages)
    target.assert_serving()
    target.assert_bounded()


@FUZZ
@given(bodies)
def test_server_survives_random_frames(target, body):
    target.send_body(body)
    target.assert_serving()
    target.assert_bounded()


@FUZZ
@given(st.data())
def test_http_routes_answer_typed_errors(target, data):
    target.send_http(data.draw(http_requests(target.root) | near_valid_http(target.root)
                               | near_valid_http(target.root)))
    target.assert_serving()
    target.assert_bounded()


# Found by fuzzing: always sent.
KNOWN_HTTP = [
    ("POST", "/v2/models/m00/infer", b"[" * 5000),
    ("POST", "/models", b'{"model_name":' * 3000),
    ("POST", "/v2/models/m00/infer",
     json.dumps(_kserve_infer(outputs=[{"name": []}])).encode()),
    ("POST", "/v2/models/m00/infer",
     json.dumps(_kserve_infer(parameters={"timeout": float("nan")})).encode()),
]


@pytest.mark.parametrize("method, path, body", KNOWN_HTTP)
def test_http_known_bad_requests(target, method, path, body):
    target.send_http(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
                     f"\r\nConnection: close\r\n\r\n".encode() + body)
    target.assert_serving()


# -- connection limits -----------------------------------------------------------------------

def wait_for_idle_server(target) -> None:
    """Connections closed by earlier tests may still count for a moment."""
    time.sleep(0.2)
    target.assert_serving()


def test_connections_past_the_maximum_are_refused(target):
    wait_for_idle_server(target)
    opened, refused = [], None
    try:
        for i in range(MAX_CONNECTIONS + 4):
            s = connect(target.tcp)
            s.sendall(protocol.frame({"id": i + 1, "op": "health"}))
            r = read_frame(s)
            if r["id"] is None:
                refused = r
                assert read_frame(s) is None, "a refused connection stayed open"
                s.close()
                break
            opened.append(s)
        assert refused is not None, "no connection was refused"
        assert refused["error"]["code"] == ErrorCode.OVERLOADED
        assert MAX_CONNECTIONS - 2 <= len(opened) <= MAX_CONNECTIONS
        # Counted, in stats and in /metrics.
        opened[0].sendall(protocol.frame({"id": 99, "op": "stats", "limit": 0}))
        servers = {s["server"]: s for s in read_frame(opened[0])["stats"]["servers"]}
        tcp = servers["tcp"]
        assert (tcp["port"], tcp["max_connections"]) == (target.tcp[1], MAX_CONNECTIONS)
        assert len(opened) <= tcp["connections"] <= MAX_CONNECTIONS and tcp["refused"] >= 1
        assert servers["http"]["port"] == target.http[1]
        _, _, body = http_call(target.http, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
                                            b"Connection: close\r\n\r\n")
        series = f'{{port="{target.tcp[1]}",server="tcp"}} '
        refused_total = re.search(r"^mmengine_server_connections_refused_total"
                                  + re.escape(series) + r"(\S+)$", body.decode(), re.M)
        assert refused_total and float(refused_total.group(1)) >= tcp["refused"]
        # HTTP has its own count; TCP's full does not refuse it.
        status, _, _ = http_call(target.http, b"GET /ping HTTP/1.1\r\nHost: x\r\n"
                                              b"Connection: close\r\n\r\n")
        assert status == 200
    finally:
        for s in opened:
            s.close()
    wait_for_idle_server(target)


def test_http_connections_past_the_maximum_get_503(target):
    wait_for_idle_server(target)
    opened = []
    try:
        for _ in range(MAX_CONNECTIONS):
            s = socket.create_connection(target.http, timeout=15)
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            r = http.client.HTTPResponse(s)
            r.begin()
            r.read()
            assert r.status == 200
            opened.append(s)
        status, headers, body = http_call(target.http, b"GET /ping HTTP/1.1\r\nHost: x\r\n"
                                                       b"Connection: close\r\n\r\n")
        assert status == 503 and headers.get("Retry-After") == "1"
        assert json.loads(body)["code"] == "OVERLOADED"
    finally:
        for s in opened:
            s.close()
    wait_for_idle_server(target)


def test_idle_tcp_connection_is_closed(target):
    with connect(target.tcp) as s:
        t0 = time.monotonic()
        assert read_frame(s) is None
        assert TCP_IDLE_S * 0.9 <= time.monotonic() - t0 < TCP_IDLE_S + 3


def test_unfinished_frame_is_dropped(target):
    with connect(target.tcp) as s:
        s.sendall(protocol.LENGTH.pack(100) + b"\x81" * 10)
        t0 = time.monotonic()
        # A trickle of bytes does not keep an unfinished frame alive.
        for _ in range(3):
            time.sleep(TCP_IDLE_S / 3)
            try:
                s.sendall(b"\x81")
            except (BrokenPipeError, ConnectionResetError):
                break
        r = read_frame(s)
        assert r["id"] is None and r["error"]["code"] == ErrorCode.TIMEOUT, r
        assert read_frame(s) is None
        assert time.monotonic() - t0 < TCP_IDLE_S + 3


def test_a_frame_begun_as_a_large_one_ends_has_its_own_idle_time(target):
    # A large frame (a buffer of its own) ends in the read that begins the
    # next frame: the next one's time starts then, not with the large one.
    big = protocol.frame({"id": 1, "op": "health", "pad": b"z" * (200 << 10)})
    small = protocol.frame({"id": 2, "op": "health"})
    with connect(target.tcp) as s:
        s.sendall(big[:1000])
        # Each wait leaves nearly half the idle time to a slow machine's
        # stalls (which only lengthen the two together).
        time.sleep(TCP_IDLE_S * 0.55)
        s.sendall(big[1000:] + small[:3])
        time.sleep(TCP_IDLE_S * 0.55)  # past the large frame's idle time, not the small's
        s.sendall(small[3:])
        answers = [read_frame(s), read_frame(s)]
    assert [(r["id"], r["ok"]) for r in answers] == [(1, True), (2, True)], answers


def test_a_request_in_flight_keeps_its_connection(target):
    seconds = np.array([TCP_IDLE_S * 2], np.float64)
    with connect(target.tcp) as s:
        s.sendall(protocol.frame({"id": 7, "op": "infer", "model": "slow",
                                  "inputs": protocol.encode_tensors({"seconds": seconds})}))
        r = read_frame(s)
        assert r["id"] == 7 and r["ok"], r
        t0 = time.monotonic()
        assert read_frame(s) is None  # idle again, then closed
        assert time.monotonic() - t0 < TCP_IDLE_S + 3


def test_a_half_closed_connection_still_gets_its_answers(target):
    seconds = np.array([0.3], np.float64)
    with connect(target.tcp) as s:
        s.sendall(protocol.frame({"id": 8, "op": "infer", "model": "slow",
                                  "inputs": protocol.encode_tensors({"seconds": seconds})}))
        s.shutdown(socket.SHUT_WR)
        r = read_frame(s)
        assert r["id"] == 8 and r["ok"], r
        assert read_frame(s) is None


def test_frame_and_body_sizes_are_checked_before_allocation(target):
    """Connections that declare the largest allowed frame or body and send
    a few bytes of it cost the server those bytes, not the declared size."""
    wait_for_idle_server(target)
    rss0 = target.rss()
    largest = max(protocol.DEFAULT_MAX_FRAME, 64 << 20)
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS // 3):
            s = connect(target.tcp)
            s.sendall(protocol.LENGTH.pack(largest) + b"\x80" * 100)
            socks.append(s)
            h = socket.create_connection(target.http, timeout=15)
            h.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: %d\r\n\r\n{" % (largest - 1))
            socks.append(h)
        time.sleep(0.3)
        assert target.rss() - rss0 < RSS_GROWTH
        target.assert_serving()
        # One over the limit is refused from its length alone.
        with connect(target.tcp) as s:
            s.sendall(struct.pack("<I", 0xFFFFFFFF))
            r = read_frame(s)
            assert r["id"] is None and r["error"]["code"] == ErrorCode.TOO_LARGE
    finally:
        for s in socks:
            s.close()
    wait_for_idle_server(target)


def test_server_memory_stayed_bounded(target):
    target.assert_serving()
    target.assert_bounded()
    assert target.server.proc.poll() is None
    print(f"\nfuzz: {json.dumps(target.stats, default=str)}, RSS grew by "
          f"{(target.rss() - target.rss0) / 2**20:.1f} MiB")
