"""HTTP end to end: `mmengine serve` as a real process, KServe v2 through
tritonclient unchanged, and raw HTTP for the protocol's error paths and the
core's limits (body and header sizes, keep-alive, pipelining, idle close)."""
from __future__ import annotations

import gzip
import http.client
import json
import re
import select
import socket
import threading
import time
import zlib

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from conftest import Server, environ, send_in_background
from mmengine import demo
from mmengine.config import Config
from mmengine.errors import MAX_MESSAGE, BadRequest, ModelNotFound
from mmengine.server import kserve
from mmengine.server.http import (FORMAT_ON_THREAD, MAX_PIPELINED, PARSE_ON_THREAD,
                                  array_from_json)

DIMS = (16, 64, 8)
MODELS = ("m00", "m01", "m02", "m03")
TOL = dict(rtol=1e-5, atol=1e-5)
IDLE_TIMEOUT_S = 1.0
# A model whose output no HTTP protocol can carry.
COMPLEX_HANDLER = """
import numpy as np

def load(path, device):
    pass

def predict(inputs):
    return {"z": inputs["x"].astype(np.complex64)}
"""
COMPLEX_MANIFEST = """
backend = "handler"
[[outputs]]
name = "z"
dtype = "complex64"
shape = [-1, 16]
"""


@pytest.fixture(scope="module")
def address(request, tmp_path_factory) -> tuple[str, int]:
    root = tmp_path_factory.mktemp("repo")
    for i, name in enumerate(MODELS):
        demo.write_mlp(root / name, "safetensors", *DIMS, seed=i)
    (root / "complex" / "1").mkdir(parents=True)
    (root / "complex" / "1" / "handler.py").write_text(COMPLEX_HANDLER)
    (root / "complex" / "1" / "model.toml").write_text(COMPLEX_MANIFEST)
    server = Server("--repo", str(root), "--workers", "1", "--tcp-port", "0",
                    "--http-port", "0",
                    env=environ(MMENGINE_HTTP_IDLE_TIMEOUT_S=str(IDLE_TIMEOUT_S)))
    request.addfinalizer(server.stop)
    m = server.wait_for(r"HTTP .* on http://(\S+):(\d+)", 60)
    return m.group(1), int(m.group(2))


@pytest.fixture
def client(request, address):
    c = triton.InferenceServerClient(f"{address[0]}:{address[1]}")
    request.addfinalizer(c.close)
    return c


def reference(name: str, x: np.ndarray) -> np.ndarray:
    return demo.reference(x, *DIMS, seed=MODELS.index(name))


def x_for(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIMS[0])).astype(np.float32)


def call(address, method: str, path: str, body=None, headers=None):
    """One request on a fresh connection: (status, headers, body)."""
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def infer_body(x: np.ndarray, datatype: str = "FP32", name: str = "x", **extra) -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                        "data": x.ravel().tolist()}], **extra}


def recv_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until the server closes the connection."""
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- tritonclient, unchanged -----------------------------------------------------

@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_infer(client, binary):
    x = x_for(0)
    tin = triton.InferInput("x", list(x.shape), "FP32")
    tin.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("y", binary_data=binary)
    result = client.infer("m00", [tin], outputs=[out], request_id="r1")
    np.testing.assert_allclose(result.as_numpy("y"), reference("m00", x), **TOL)
    assert result.get_response()["id"] == "r1"
    assert result.get_response()["model_name"] == "m00"


def test_tritonclient_infer_defaults_to_binary_outputs(client):
    x = x_for(1, n=1)
    tin = triton.InferInput("x", list(x.shape), "FP32")
    tin.set_data_from_numpy(x)
    result = client.infer("m00", [tin], model_version="1")  # binary_data_output
    y = result.as_numpy("y")
    assert y.dtype == np.float32 and y.shape == (1, DIMS[2])
    np.testing.assert_allclose(y, reference("m00", x), **TOL)
    assert result.get_response()["model_version"] == "1"


def test_tritonclient_edge_cases_answer_as_triton_does(client, address):
    # An empty batch with binary outputs (tritonclient's default) was a 500;
    # "outputs": [] names none, so every one is answered (as Triton does).
    empty = np.zeros((0, DIMS[0]), np.float32)
    tin = triton.InferInput("x", [0, DIMS[0]], "FP32")
    tin.set_data_from_numpy(empty)
    y = client.infer("m00", [tin]).as_numpy("y")
    assert y.shape == (0, DIMS[2]) and y.dtype == np.float32
    status, _, raw = call(address, "POST", "/v2/models/m00/infer",
                          infer_body(x_for(6), outputs=[]))
    assert status == 200 and [o["name"] for o in json.loads(raw)["outputs"]] == ["y"], raw
    # What the server does not do is said, not misread: a tensor in shared memory.
    shm_in = triton.InferInput("x", [1, DIMS[0]], "FP32")
    shm_in.set_shared_memory("region0", 4 * DIMS[0])
    with pytest.raises(InferenceServerException, match="shared-memory extension"):
        client.infer("m00", [shm_in])


def test_long_json_is_parsed_off_the_loop_with_the_same_answers(address):
    # Past PARSE_ON_THREAD the JSON is parsed on a thread: the same answer,
    # the same typed errors (what the loop gains is measured by
    # benchmarks/beside.py).
    x = x_for(9, n=8192)
    body = json.dumps(infer_body(x)).encode()
    assert len(body) > PARSE_ON_THREAD
    status, headers, raw = call(address, "POST", "/v2/models/m00/infer", body,
                                {"X-MMEngine-Timing": "1"})
    assert status == 200, raw[:200]
    np.testing.assert_allclose(np.array(json.loads(raw)["outputs"][0]["data"]).reshape(-1, 8),
                               reference("m00", x), **TOL)
    assert "decode;dur=" in headers["Server-Timing"], headers
    for bad, why in ((body[:-1], "not valid JSON"),
                     (body.replace(b'"FP32"', b'"FP99"'), "unknown datatype")):
        status, _, raw = call(address, "POST", "/v2/models/m00/infer", bad)
        assert status == 400 and why in json.loads(raw)["error"], raw[:200]


def test_an_errors_message_is_cut_where_it_quotes_a_long_name(address):
    # Quoted as repr, up to four characters a byte: a 1 MiB input name made
    # a 4 MiB answer (a 64 MiB one, 256 MiB, held until the client read it).
    body = infer_body(x_for(9), datatype="FP99", name="\x01" * (1 << 20))
    status, _, raw = call(address, "POST", "/v2/models/m00/infer", body)
    message = json.loads(raw)["error"]
    assert status == 400 and len(message) <= 4096, len(raw)
    assert "characters in all) ..." in message and "unknown datatype" in message


def test_an_unsupported_content_coding_is_415_and_the_connection_goes_on(address):
    body = json.dumps(infer_body(x_for(8))).encode()
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                  + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = recv_all(s)
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 415 ") and \
        b"Accept-Encoding: gzip, deflate, identity" in first, raw
    assert b"HTTP/1.1 200 " in rest, raw
    # A coding repeated on a later line is still read (this body is no
    # gzip: 400); a transfer coding other than chunked is not implemented
    # (RFC 9112 6.1).
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                  b"Content-Encoding: identity\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body)
                  + b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Transfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                  % (len(body), body))
        raw = recv_all(s)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) == [b"400", b"501"], raw
    assert b"not valid gzip" in raw, raw
    # Identity is no coding at all; a field's value has no whitespace
    # around it (RFC 9110 5.5), though a client may send some.
    status, _, raw = call(address, "POST", "/v2/models/m00/infer", body,
                          {"Content-Encoding": "identity",
                           "Inference-Header-Content-Length": f"{len(body)} \t"})
    assert status == 200, raw
    # Nor do leading zeros make a length longer than it is (past int()'s
    # 4,300 digits, too).
    for zeros in (20, 5000):
        status, _, raw = call(address, "POST", "/v2/models/m00/infer", body,
                              {"Inference-Header-Content-Length": "0" * zeros + str(len(body))})
        assert status == 200, raw


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("rows", [3, 40_000])  # inflated at once; on a parse thread
def test_tritonclient_compressed_requests_are_inflated(client, algorithm, rows):
    x = x_for(11, rows)
    for binary in (False, True):
        tin = triton.InferInput("x", list(x.shape), "FP32")
        tin.set_data_from_numpy(x, binary_data=binary)
        # An answer is not compressed, whatever the client accepts.
        result = client.infer("m00", [tin], request_compression_algorithm=algorithm,
                              response_compression_algorithm=algorithm)
        np.testing.assert_allclose(result.as_numpy("y"), reference("m00", x), **TOL)


def raw_deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def test_a_bad_compressed_body_is_refused_and_the_connection_goes_on(address):
    body = json.dumps(infer_body(x_for(9))).encode()
    packed = gzip.compress(body)
    bomb = gzip.compress(b" " * (65 << 20))  # a megabyte or so that inflates past the limit
    sent = [(packed[:-8], "gzip", 400, b"ends inside its gzip stream"),
            (zlib.compress(body) + b"junk", "deflate", 400, b"follow the request body"),
            (bomb, "gzip", 413, b"more than the maximum"),
            (gzip.compress(packed), "gzip, x-gzip", 200, b""),  # two layers
            (gzip.compress(gzip.compress(packed)), "gzip, gzip, gzip", 415, b"2 codings at most"),
            (raw_deflate(body), "deflate", 200, b""),  # no zlib header, as some send it
            (packed + bytes(64), "gzip", 200, b""),  # zeros after it: padding, as gzip(1) reads
            (gzip.compress(b"") * 100_000, "gzip", 400, b"more than 64 gzip members"),
            (gzip.compress(body) * 2, "gzip", 400, b"not valid JSON")]  # two members: body twice
    with socket.create_connection(address, timeout=30) as s:
        for data, coding, _, _ in sent:
            s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s"
                      % (coding.encode(), len(data), data))
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = recv_all(s, 30)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) == [
        str(status).encode() for _, _, status, _ in sent] + [b"200"], raw
    for _, _, _, why in sent:
        assert why in raw, why


def test_server_health_and_metadata(client, address):
    assert client.is_server_live()
    assert client.is_server_ready()
    # KServe's own SDK reads these bodies (its server sends them); Triton's
    # clients read only the status.
    for path, body in (("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True})):
        status, headers, raw = call(address, "GET", path)
        assert (status, headers["Content-Type"], json.loads(raw)) == \
            (200, "application/json", body)
    meta = client.get_server_metadata()
    assert meta["name"] == "mmengine"
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])


def test_model_metadata(client):
    meta = client.get_model_metadata("m01")
    assert meta["name"] == "m01" and meta["versions"] == ["1"]
    assert meta["platform"] == "safetensors"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, DIMS[0]]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, DIMS[2]]}]
    assert client.get_model_metadata("m01", "1") == meta
    with pytest.raises(InferenceServerException, match="not found"):
        client.get_model_metadata("nope")


def test_model_config_as_triton_writes_it(client):
    # tritonclient's get_model_config, which tools read a model's tensors from.
    config = client.get_model_config("m00")
    assert config == {"name": "m00", "platform": "safetensors", "backend": "safetensors",
                      "max_batch_size": 0,
                      "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, DIMS[0]]}],
                      "output": [{"name": "y", "data_type": "TYPE_FP32",
                                  "dims": [-1, DIMS[2]]}]}, config
    assert client.get_model_config("m00", model_version="1") == config
    with pytest.raises(InferenceServerException, match="nope"):
        client.get_model_config("nope")
    # A dtype Triton has no type for is its enum's TYPE_INVALID, not a
    # name a client cannot parse (the metadata names it).
    assert client.get_model_config("complex")["output"] == [
        {"name": "z", "data_type": "TYPE_INVALID", "dims": [-1, 16]}]


def test_inference_statistics_as_triton_reports_them(client, address):
    # tritonclient's get_inference_statistics (Triton's statistics
    # extension); m03 is no other test's.
    assert "statistics" in client.get_server_metadata()["extensions"]
    empty = client.get_inference_statistics("m03")["model_stats"]
    assert [(s["name"], s["version"], s["inference_count"]) for s in empty] == [("m03", "1", 0)]
    assert empty[0]["inference_stats"]["success"] == {"count": 0, "ns": 0}
    assert empty[0]["last_inference"] == 0 and empty[0]["memory_usage"] == []
    before_ms = time.time() * 1000
    x = x_for(3)
    tin = triton.InferInput("x", list(x.shape), "FP32")
    tin.set_data_from_numpy(x)
    for _ in range(3):
        client.infer("m03", [tin])
    bad = triton.InferInput("x", [2, 3], "FP32")  # the wrong shape: the model fails it
    bad.set_data_from_numpy(np.zeros((2, 3), np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("m03", [bad])
    stats = client.get_inference_statistics("m03", "1")["model_stats"]
    assert len(stats) == 1
    s = stats[0]
    assert (s["name"], s["version"], s["inference_count"]) == ("m03", "1", 3)
    assert before_ms - 1 <= s["last_inference"] <= time.time() * 1000 + 1
    counts = s["inference_stats"]
    assert counts["success"]["count"] == 3 and counts["fail"]["count"] == 1
    assert counts["success"]["ns"] > counts["compute_infer"]["ns"] > 0
    # As Triton counts them: executions and stages of the requests answered OK.
    assert s["execution_count"] == counts["compute_infer"]["count"] == 3
    assert counts["queue"]["count"] == counts["compute_output"]["count"] == 3
    assert counts["queue"]["ns"] > 0
    # Resident on the one CPU worker: its bytes, as Triton lists a model's memory.
    assert s["memory_usage"] == [{"type": "CPU", "id": 0,
                                  "byte_size": s["memory_usage"][0]["byte_size"]}]
    assert s["memory_usage"][0]["byte_size"] > 0
    everything = client.get_inference_statistics()["model_stats"]
    assert s["inference_count"] == next(e["inference_count"] for e in everything
                                        if e["name"] == "m03")
    for path in ("/v2/models/nope/stats", "/v2/models/m03/versions/2/stats",
                 "/v2/models/m03/versions/01/stats"):
        status, _, raw = call(address, "GET", path)
        assert status == 404, (path, raw)


def test_model_ready_only_once_resident(client):
    assert not client.is_model_ready("m01")  # never asked for: on storage
    assert not client.is_model_ready("m01", "1")
    assert not client.is_model_ready("nope")
    x = x_for(2)
    tin = triton.InferInput("x", list(x.shape), "FP32")
    tin.set_data_from_numpy(x)
    client.infer("m01", [tin])  # a cold model loads on its first request
    assert client.is_model_ready("m01")
    assert client.is_model_ready("m01", "1")


def test_repository_index_load_unload(client, address):
    index = {r["name"]: r for r in client.get_model_repository_index()}
    assert set(index) == {*MODELS, "complex"}
    assert all(r["version"] == "1" for r in index.values())
    client.load_model("m02")
    assert client.is_model_ready("m02")
    status, _, body = call(address, "POST", "/v2/repository/index", {"ready": True})
    assert status == 200
    rows = json.loads(body)
    assert "m02" in {r["name"] for r in rows} and all(r["state"] == "READY" for r in rows)
    client.unload_model("m02")
    assert not client.is_model_ready("m02")
    index = {r["name"]: r for r in client.get_model_repository_index()}
    assert index["m02"]["state"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException, match="not found"):
        client.load_model("nope")
    with pytest.raises(InferenceServerException, match="not supported"):
        client.load_model("m02", config="{}")
    # null parameters are no parameters, as in an infer request (400 before).
    status, _, body = call(address, "POST", "/v2/repository/models/m02/load",
                           {"parameters": None})
    assert status == 200 and client.is_model_ready("m02"), body
    status, _, body = call(address, "POST", "/v2/repository/models/m02/load", {"parameters": 5})
    assert status == 400, body


# -- raw HTTP: the protocol's edges ----------------------------------------------

def test_json_data_may_be_nested_and_answers_json(address):
    x = x_for(3)
    body = infer_body(x)
    body["inputs"][0]["data"] = x.tolist()  # nested, as the protocol allows
    status, headers, raw = call(address, "POST", "/v2/models/m00/infer", body)
    assert status == 200, raw
    assert headers["Content-Type"] == "application/json"
    # Not asked for a version: the answer names the one that served it.
    assert json.loads(raw)["model_version"] == "1"
    out = json.loads(raw)["outputs"][0]
    assert out["name"] == "y" and out["datatype"] == "FP32"
    assert out["shape"] == [3, DIMS[2]]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(out["shape"]),
                               reference("m00", x), **TOL)


def test_binary_request_and_response_on_the_wire(address):
    x = x_for(4)
    head = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    status, headers, raw = call(address, "POST", "/v2/models/m00/versions/1/infer",
                                head + x.tobytes(),
                                {"Inference-Header-Content-Length": str(len(head))})
    assert status == 200, raw
    assert headers["Content-Type"] == "application/octet-stream"
    n = int(headers["Inference-Header-Content-Length"])
    meta = json.loads(raw[:n])
    out = meta["outputs"][0]
    assert out["parameters"]["binary_data_size"] == len(raw) - n == 3 * DIMS[2] * 4
    assert "data" not in out
    y = np.frombuffer(raw[n:], "<f4").reshape(out["shape"])
    np.testing.assert_allclose(y, reference("m00", x), **TOL)


def test_raw_binary_request(address):
    """Triton's raw binary request: the body is the one declared input's
    bytes, its -1 sized by them; the outputs come back binary."""
    x = x_for(5, n=4)
    status, headers, raw = call(address, "POST", "/v2/models/m01/infer", x.tobytes(),
                                {"Inference-Header-Content-Length": "0"})
    assert status == 200, raw
    n = int(headers["Inference-Header-Content-Length"])
    out = json.loads(raw[:n])["outputs"][0]
    assert out["name"] == "y" and out["shape"] == [4, DIMS[2]]
    y = np.frombuffer(raw[n:], "<f4").reshape(out["shape"])
    np.testing.assert_allclose(y, reference("m01", x), **TOL)


@pytest.mark.parametrize("model, body, status, fragment", [
    ("m00", bytes(4 * DIMS[0] + 4), 400, "not a whole number"),  # a row and a float
    ("complex", bytes(64), 400, "declares 0"),      # its manifest declares no input
    ("nope", bytes(64), 404, "nope"),
])
def test_raw_binary_request_refused(address, model, body, status, fragment):
    got, _, raw = call(address, "POST", f"/v2/models/{model}/infer", body,
                       {"Inference-Header-Content-Length": "0"})
    assert got == status, raw
    assert fragment in json.loads(raw)["error"]


def test_raw_inputs_sizes_from_the_declared_shape():
    meta = {"name": "m", "inputs": [{"name": "a", "dtype": "int16", "shape": [2, 3]}]}
    body = memoryview(np.arange(6, dtype="<i2").tobytes())
    np.testing.assert_array_equal(kserve._raw_inputs(meta, body)["a"],
                                  np.arange(6).reshape(2, 3))
    with pytest.raises(BadRequest, match="which takes 12"):
        kserve._raw_inputs(meta, body[:10])
    for shape in ([-1, -1], [-1, 0]):  # nothing says how the bytes divide
        meta["inputs"][0]["shape"] = shape
        with pytest.raises(BadRequest, match="cannot size"):
            kserve._raw_inputs(meta, body)
    meta["inputs"] = [{"name": "b", "dtype": "bool", "shape": [-1]}]
    with pytest.raises(BadRequest, match="0 or 1"):
        kserve._raw_inputs(meta, memoryview(b"\x00\x02"))


@pytest.mark.parametrize("body, headers, fragment", [
    (b"{not json", {}, "not valid JSON"),
    (b"[1, 2]", {}, "JSON object"),
    ({"inputs": []}, {}, "non-empty list"),
    (infer_body(np.zeros((2, 15), np.float32)), {}, "shape"),               # wrong shape
    (infer_body(np.zeros((2, 16)), "FP64"), {}, "float32"),                # wrong dtype
    (infer_body(np.zeros((2, 16), np.float32), name="z"), {}, "missing"),  # missing input
    (infer_body(np.zeros((2, 16), np.float32), "BYTES"), {}, "not supported"),
    (infer_body(np.zeros((2, 16), np.float32), "FP99"), {}, "unknown datatype"),
    (infer_body(np.zeros((2, 16), np.float32), []), {}, "unknown datatype"),  # tools/fuzz.py
    ({"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": [1.0, 2.0]}]},
     {}, "2 elements"),
    ({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": ["a"] * 16}]},
     {}, "only numbers"),
    # JSON numbers that would change meaning on the way in are refused, not cast
    ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "INT32", "data": [1, 2.5]}]},
     {}, "must be int32, not float64"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "BOOL", "data": [1, 0]}]},
     {}, "must be bool, not int64"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 300]}]},
     {}, "out of range for int8"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT64",
                  "data": [18446744073709551616]}]}, {}, "out of range for int64"),  # a float
    ({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                  "parameters": {"binary_data_size": 60}}]}, {"x": "y"}, "no Inference"),
    (b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", '
     b'"parameters": {"binary_data_size": 64}}]}' + bytes(32), {"hlen": True}, "ends before"),
    (infer_body(np.zeros((1, 16), np.float32), outputs=[{"name": "nope"}]), {},
     "requested output"),
    (infer_body(np.zeros((1, 16), np.float32), outputs=[{"name": "y"}, {"name": "y"}]), {},
     "requested twice"),
    (infer_body(np.zeros((1, 16), np.float32), outputs=[{"name": "y", "parameters": {
        "binary_data": "yes"}}]), {}, "'binary_data' must be true or false"),
    (infer_body(np.zeros((1, 16), np.float32), parameters={"binary_data_output": "false"}),
     {}, "'binary_data_output' must be true or false"),
    (infer_body(np.zeros((1, 16), np.float32), parameters=[]), {}, "must be a JSON object"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                             "data": [0.0] * 16, "parameters": {"binary_data_size": 64}}]}
                ).encode() + bytes(64), {"hlen": True}, "both 'data'"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "BOOL", '
     b'"parameters": {"binary_data_size": 2}}]}\x01\x02', {"hlen": True}, "0 or 1"),
    (b'{"inputs": []}\x00\x01', {}, "needs the Inference-Header-Content-Length"),
    # Shapes numpy cannot make (a security review found them answered 500).
    ({"inputs": [{"name": "x", "shape": [0, 2 ** 63 - 1], "datatype": "FP32", "data": []}]},
     {}, "cannot be made"),
    ({"inputs": [{"name": "x", "shape": [1] * 65, "datatype": "FP32", "data": [1.0]}]},
     {}, "cannot be made"),
    # Text that parses to ~30x its size, holding the loop meanwhile (a
    # security review's), and one array per row past the limit.
    (b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": ['
     + b"[]," * 100_000 + b"[]]}]}", {}, "more than 65536 JSON arrays"),
    ({"inputs": [{"name": "x", "shape": [70_000, 1], "datatype": "FP32",
                  "data": [[0.0]] * 70_000}]}, {}, "send a tensor of many rows flat"),
])
def test_bad_infer_requests_answer_400(address, body, headers, fragment):
    if headers.pop("hlen", False):
        headers["Inference-Header-Content-Length"] = str(body.index(b"}]}") + 3)
    status, _, raw = call(address, "POST", "/v2/models/m00/infer", body, headers)
    assert status == 400, raw
    error = json.loads(raw)
    assert fragment in error["error"], error
    assert error["code"] == "BAD_REQUEST"


@pytest.mark.parametrize("data, datatype, expected", [
    ([1, 2], "UINT8", [1, 2]),
    ([2 ** 64 - 1], "UINT64", [2 ** 64 - 1]),
    ([0, 2 ** 63], "UINT64", [0, 2 ** 63]),   # numpy alone reads these as floats
    ([0, 2 ** 64], "UINT64", "out of range for 64 bits"),
    ([-1, 2 ** 63], "UINT64", "out of range for uint64"),
    ([0.5, 2 ** 63], "UINT64", "must be uint64, not float64"),
    ([[1, 2], [3, 4]], "INT16", [[1, 2], [3, 4]]),
    ([1, 2.5], "FP32", [1.0, 2.5]),
    ([65504.0, -1], "FP16", [65504.0, -1.0]),
    ([True, False], "BOOL", [True, False]),
    ([], "INT32", []),
    ([-1], "UINT8", "out of range for uint8"),
    ([2 ** 63], "INT64", "out of range for int64"),
    ([-1, 2 ** 64 - 1], "INT64", "out of range for int64"),  # numpy read floats
    ([2.0], "INT64", "must be int64, not float64"),
    ([1, 1e20], "INT64", "out of range for int64"),  # orjson's 100000000000000000000
    ([1.5, 1e20], "INT64", "must be int64, not float64"),
    ([70000.0], "FP16", "out of range for float16"),
    ([1e300], "FP32", "out of range for float32"),
    ([1, 0], "BOOL", "must be bool, not int64"),
    ([True, False], "FP32", "must be float32, not bool"),
    ([1.5, True], "FP32", "mixes booleans with numbers"),  # numpy made True 1.0
    ([[1], [True]], "INT32", "mixes booleans with numbers"),
    ([True, 2 ** 64 - 1], "UINT64", "mixes booleans with numbers"),
    ([True, 1], "BOOL", "mixes booleans with numbers"),
])
def test_json_tensor_data_keep_their_meaning(data, datatype, expected):
    dtype = kserve.DATATYPES[datatype]
    if isinstance(expected, str):
        with pytest.raises(BadRequest, match=expected):
            array_from_json("input 'x'", data, dtype)
        return
    array = array_from_json("input 'x'", data, dtype)
    assert array.dtype == dtype and array.tolist() == expected


def test_unknown_model_version_route_and_method(address):
    body = infer_body(np.zeros((1, 16), np.float32))
    for path in ("/v2/models/nope/infer", "/v2/models/m00/versions/7/infer",
                 "/v2/models/m00/versions/x/infer", "/v2/models/m00/versions/0/infer"):
        status, _, raw = call(address, "POST", path, body)
        assert status == 404, (path, raw)
        assert "error" in json.loads(raw)
    status, _, raw = call(address, "GET", "/v2/nothing/here")
    assert status == 404 and "no route" in json.loads(raw)["error"]
    status, headers, raw = call(address, "GET", "/v2/models/m00/infer")
    assert status == 405 and headers["Allow"] == "OPTIONS, POST", (raw, headers)
    status, headers, raw = call(address, "DELETE", "/v2/health/live")
    assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS", (raw, headers)


def test_405_and_415_answer_as_every_error_does(address):
    # Built beside error_response, their bodies quoted the whole path or
    # Content-Encoding (up to the 64 KiB header block) where every other
    # error's message is cut (errors.told): one way to answer an error.
    name = "n" * 6000
    status, headers, raw = call(address, "GET", f"/v2/models/{name}/infer")
    assert (status, headers["Allow"]) == (405, "OPTIONS, POST"), headers
    _assert_cut_error(raw, f"GET is not allowed on /v2/models/{name[:100]}")
    body = json.dumps(infer_body(x_for(8))).encode()
    status, headers, raw = call(address, "POST", "/v2/models/m00/infer", body,
                                {"Content-Encoding": "x" * 6000})
    assert (status, headers["Accept-Encoding"]) == (415, "gzip, deflate, identity"), headers
    _assert_cut_error(raw, "Content-Encoding 'xxx")


def _assert_cut_error(raw: bytes, starts: str) -> None:
    """`raw` is an error's body as error_response writes it, its message
    starting with `starts` and cut in the middle (errors.told)."""
    answer = json.loads(raw)
    assert set(answer) == {"error", "code"} and answer["code"] == "BAD_REQUEST", answer
    message = answer["error"]
    assert message.startswith(starts) and len(message) <= MAX_MESSAGE, len(message)
    assert "characters in all) ..." in message


def test_options_says_what_a_path_takes(address):
    """RFC 9110 9.3.7: OPTIONS is answered with the methods a path takes (a
    client or a proxy asks before it sends), not refused with 405."""
    status, headers, raw = call(address, "OPTIONS", "/v2/models/m00/infer")
    assert (status, raw, headers["Allow"]) == (200, b"", "OPTIONS, POST"), headers
    assert headers["Content-Length"] == "0"
    status, headers, _ = call(address, "OPTIONS", "/v2/health/live")
    assert (status, headers["Allow"]) == (200, "GET, HEAD, OPTIONS")
    status, headers, _ = call(address, "OPTIONS", "*")  # the server as a whole
    assert status == 200 and {"GET", "POST", "DELETE"} <= set(headers["Allow"].split(", "))
    status, _, raw = call(address, "OPTIONS", "/v2/nothing/here")
    assert status == 404, raw


def test_head_is_get_without_the_body(address):
    status, get_headers, body = call(address, "GET", "/v2/models/m00")
    assert status == 200 and body
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"HEAD /v2/models/m00 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = recv_all(s)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Length: {len(body)}".encode() in head
    # No body after HEAD's headers: the next answer follows at once.
    assert rest.startswith(b"HTTP/1.1 200 "), rest[:100]
    assert re.match(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$", get_headers["Date"])


def test_expect_100_continue_is_answered_before_the_body(address):
    body = json.dumps(infer_body(x_for(2))).encode()
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        interim = s.recv(4096)  # the body is not sent until this comes
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        s.sendall(body)
        raw = recv_all(s)
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
    np.testing.assert_allclose(_json_output(raw), reference("m00", x_for(2)).ravel(), **TOL)
    # A request its head dooms gets its final answer instead (RFC 9110
    # 10.1.1): its client, which sends no body until told to, reads why at
    # once, and the connection closes, since the body may still come.
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Encoding: br\r\nContent-Length: 100000\r\n\r\n")
        raw = recv_all(s)
    assert raw.startswith(b"HTTP/1.1 415 ") and b"Connection: close" in raw, raw[:300]


def test_a_request_whose_100_continue_is_owed_waits_for_it_past_the_idle_timeout(tmp_path):
    # Pipelined behind an answer slower than the idle timeout, its body
    # (which its client sends only once told to) counted as late: 408.
    from conftest import SLOW_HANDLER, write_handler

    def slow(seconds: float) -> bytes:
        return json.dumps({"inputs": [{"name": "seconds", "shape": [1], "datatype": "FP64",
                                       "data": [seconds]}]}).encode()

    write_handler(tmp_path, "slow", SLOW_HANDLER)
    server = Server("--repo", str(tmp_path), "--workers", "1", "--tcp-port", "0",
                    "--http-port", "0", env=environ(MMENGINE_HTTP_IDLE_TIMEOUT_S="1"))
    try:
        host, port = server.wait_for(r"HTTP .* on http://(\S+):(\d+)", 60).groups()
        head = b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
        with socket.create_connection((host, int(port)), timeout=15) as s:
            s.sendall(head % len(slow(2.5)) + b"\r\n" + slow(2.5)
                      + head % len(slow(0.0)) + b"Expect: 100-continue\r\n\r\n")
            seen = b""
            while b"100 Continue" not in seen:  # bounded by the socket's timeout
                chunk = s.recv(65536)
                assert chunk and b" 408 " not in seen + chunk, seen + chunk
                seen += chunk
            assert seen.startswith(b"HTTP/1.1 200 "), seen[:100]
            s.sendall(slow(0.0))
            rest = seen.partition(b"100 Continue\r\n\r\n")[2]
            while b"\r\n\r\n" not in rest:
                rest += s.recv(65536)
        assert rest.startswith(b"HTTP/1.1 200 "), rest[:200]
    finally:
        server.stop()


def _json_output(raw: bytes) -> np.ndarray:
    return np.array(json.loads(raw.partition(b"\r\n\r\n")[2])["outputs"][0]["data"])


def test_an_http_1_1_request_without_host_is_400_and_the_connection_goes_on(address):
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\n\r\n"
                  b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = recv_all(s)
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 400 ") and b"Host header" in rest, raw
    assert b"HTTP/1.1 200 " in rest, raw


def test_a_version_is_any_canonical_int64():
    assert kserve._version("9223372036854775807") == 2 ** 63 - 1  # 19 digits
    for bad in ("0", "01", "1" * 20, "9" * 5000, "-1", "١"):  # the last: an Arabic-Indic one
        with pytest.raises(ModelNotFound):
            kserve._version(bad)


def test_an_encoded_slash_stays_inside_its_path_segment(address):
    # "m00/versions/1", encoded, is a name (no such model), not m00's version 1.
    status, _, raw = call(address, "GET", "/v2/models/m00%2Fversions%2F1")
    assert status == 404 and b"m00/versions/1" in raw, raw


def test_an_input_given_twice_and_a_ready_that_is_not_a_bool_are_refused(address):
    x = np.zeros((1, 16), np.float32)
    twice = infer_body(x)
    twice["inputs"] *= 2
    status, _, raw = call(address, "POST", "/v2/models/m00/infer", twice)
    assert status == 400 and "given twice" in json.loads(raw)["error"], raw
    status, _, raw = call(address, "POST", "/v2/repository/index", {"ready": "false"})
    assert status == 400 and "'ready'" in json.loads(raw)["error"], raw
    status, _, raw = call(address, "POST", "/v2/repository/index", {"ready": False})
    assert status == 200, raw


def test_oversized_body_refused_from_content_length(address):
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 1000000000000\r\n\r\n")  # and no body at all
        raw = recv_all(s)  # answered, then closed, without waiting for the body
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in raw
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["code"] == "TOO_LARGE"


def test_a_client_sending_an_oversized_body_reads_the_413(address):
    # Refused from Content-Length; the server then drops the body unread as
    # it comes before it closes. Closed at once, the connection was reset
    # under the client's send (http.client sends the whole body first) and
    # the 413 was lost with it.
    body = bytes(Config().max_request_bytes + 1)
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("POST", "/v2/models/m00/infer", body=body,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["code"] == "TOO_LARGE"
    finally:
        conn.close()


@pytest.mark.parametrize("one_line", [False, True])
def test_header_block_over_the_limit_431(address, one_line):
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        # The server answers, then drops what still comes until we close:
        # sending on after the refusal resets nothing.
        if one_line:  # one header that never ends, sent in pieces
            s.sendall(b"X-Big: ")
            for _ in range(100):
                s.sendall(b"a" * 4096)
                time.sleep(0.001)
        else:
            s.sendall(b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 1000) for i in range(100)))
        raw = recv_all(s)
    assert raw.startswith(b"HTTP/1.1 431 "), raw[:200]


def test_a_header_block_of_many_short_lines_in_one_read_is_431(address):
    # Each line was counted without its ":" and CRLF: 200 KB of "A:" lines
    # in one read were served.
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"A:\r\n" * 50_000
                  + b"\r\n")
        raw = recv_all(s)
    assert raw.startswith(b"HTTP/1.1 431 "), raw[:200]


def test_pipelined_requests_in_reads_past_the_header_limit_are_all_served(address):
    # A read that began inside one head, held the rest of it and 64 KiB of
    # requests after, and ended inside another's head was counted whole as
    # that last head's bytes: 431, and the requests behind it were lost.
    n = 20_000
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n"
    raw = bytearray()
    with socket.create_connection(address, timeout=30) as s:
        sender = send_in_background(s, request * n)
        deadline = time.monotonic() + 60
        # To the last answer's end, or the server's close (after a 431).
        while not raw.endswith(b"true}") or raw.count(b"HTTP/1.1 ") < n:
            assert time.monotonic() < deadline, raw.count(b"HTTP/1.1 ")
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            raw += chunk
        sender.join(30)
    assert raw.count(b"HTTP/1.1 200 ") == n, bytes(raw[raw.find(b"HTTP/1.1 4"):][:200])


def test_a_trailer_line_that_never_ends_is_431_and_others_are_served(address):
    # A chunked body's trailer line was held unbounded, and not counted:
    # hundreds of MiB went in, and the loop stood still for seconds.
    started = time.monotonic()
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Big: ")
        for _ in range(100):  # 400 KiB: past the 64 KiB limit
            try:
                s.sendall(b"a" * 4096)
            except OSError:  # refused and closed under us: the answer is read below
                break
            time.sleep(0.001)
        raw = recv_all(s)
        assert raw.startswith(b"HTTP/1.1 431 ") and b"trailers" in raw, raw[:200]
    assert time.monotonic() - started < 10
    assert call(address, "GET", "/v2/health/live")[0] == 200


def test_trailers_do_not_change_what_the_head_said(address):
    body = gzip.compress(json.dumps(infer_body(x_for(5))).encode())
    head = (b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n"
            % (len(body), body))
    # A trailer that would have made the body brotli (or gzip five times
    # over, past the layers allowed) is no part of the head: the body is
    # read as the head said.
    for trailer in (b"Content-Encoding: br\r\n", b"Content-Encoding: gzip, gzip, gzip, gzip\r\n"):
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(head + trailer + b"\r\n")
            raw = recv_all(s)
        assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]
        np.testing.assert_allclose(_json_output(raw), reference("m00", x_for(5)).ravel(), **TOL)


@pytest.mark.parametrize("where", ["datatype", "parameter", "binary_data_size", "ready"])
def test_a_value_nested_as_deep_as_json_allows_is_a_bad_request(address, where):
    # repr() of a value nested ~1,000 deep is past Python's recursion: the
    # answer was 500 INTERNAL, not 400.
    value = "NESTED"  # in the text below: json.dumps() has the recursion limit too
    x = x_for(8)
    body = infer_body(x)
    if where == "datatype":
        body["inputs"][0]["datatype"] = value
    elif where == "parameter":
        body["parameters"] = {"binary_data_output": value}
    elif where == "binary_data_size":
        del body["inputs"][0]["data"]
        body["inputs"][0]["parameters"] = {"binary_data_size": value}
    path = "/v2/repository/index" if where == "ready" else "/v2/models/m00/infer"
    payload = json.dumps({"ready": value} if where == "ready" else body).encode().replace(
        b'"NESTED"', b"[" * 1000 + b"1" + b"]" * 1000)
    headers = {"Content-Type": "application/json"}
    if where == "binary_data_size":
        payload += b"\0" * 4
        headers["Inference-Header-Content-Length"] = str(len(payload) - 4)
    status, _, raw = call(address, "POST", path, payload, headers)
    assert status == 400 and json.loads(raw)["code"] == "BAD_REQUEST", raw[:300]


def test_white_space_after_a_header_value_is_no_part_of_it(address):
    body = json.dumps(infer_body(x_for(6))).encode()
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Expect: 100-continue \t\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                  % len(body))
        interim = s.recv(4096)  # the body is not sent until this comes
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        s.sendall(body)
        raw = recv_all(s)
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]


@pytest.mark.parametrize("head, status, words", [
    # An absolute form's empty path is "/" (RFC 9112 3.2.2): routed, not "callback error".
    (b"GET http://x HTTP/1.1\r\nHost: x\r\n", 404, "no route for GET /"),
    (b"GET http://x/v2/health/live?a=1 HTTP/1.1\r\nHost: x\r\n", 200, ""),
    (b"CONNECT x:80 HTTP/1.1\r\nHost: x\r\n", 501, "no proxy"),
    (b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nHost: b\r\n", 400, "one Host header"),
    (b"GET /v2/health/live HTTP/2.0\r\nHost: x\r\n", 505, "HTTP/2.0 is not served"),
])
def test_request_lines_and_hosts_http_refuses_say_why(address, head, status, words):
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(head + b"Connection: close\r\n\r\n")
        raw = recv_all(s)
    assert raw.startswith(b"HTTP/1.1 %d " % status), raw[:300]
    assert words in raw.decode("latin-1"), raw[:300]
    assert len(split_answers(raw)) == 1  # CONNECT was answered twice (a review's finding)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_request_asking_to_upgrade_is_served_as_http_1_1(address, chunked):
    """RFC 9110 7.8: Upgrade may be ignored. httptools handed the body and
    what followed back as the other protocol's: curl --http2 got its infer
    answered 400 without its body, then a second answer read as the next
    request's (a review's finding)."""
    x = x_for(40)
    body = json.dumps(infer_body(x, id="up")).encode()
    framing = (b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
               if chunked else b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    upgrade = (b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\n"
               b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
               b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n" + framing)
    live = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(upgrade + live + upgrade[:40])  # the next one's head split across reads
        time.sleep(0.1)
        s.sendall(upgrade[40:] + last)
        answers = split_answers(recv_all(s))
    assert [head.split(b"\r\n")[0] for head, _ in answers] == [b"HTTP/1.1 200 OK"] * 4
    for _, answer in (answers[0], answers[2]):
        out = json.loads(answer)
        assert out["id"] == "up"
        y = np.array(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
        np.testing.assert_allclose(y, reference("m00", x), **TOL)
    assert json.loads(answers[1][1]) == {"live": True}


def test_inference_header_content_length_given_twice_is_refused(address):
    """Which one was meant? The last won, unsaid (a review's finding)."""
    x = x_for(41)
    head = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    body = head + x.tobytes()
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Inference-Header-Content-Length: 0\r\n"
                  b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(head), len(body), body))
        [(status, answer)] = split_answers(recv_all(s))
    assert status.startswith(b"HTTP/1.1 400 ") and b"is not a length" in answer, answer


@pytest.mark.parametrize("field, values", [
    (b"Authorization", (b"Bearer first", b"Bearer second")),
    (b"Content-Type", (b"application/octet-stream", b"application/json")),
    (b"Expect", (b"100-continue", b"nothing")),
])
def test_a_singleton_header_given_twice_is_refused(address, field, values):
    """RFC 9110 5.3: a field of one value is not combined. The last line
    won, unsaid, where a proxy in front may have acted on the first (the
    token it checked, whether the client waits for 100 Continue)."""
    body = json.dumps(infer_body(x_for(42))).encode()
    lines = b"%s: %s\r\n%s: %s\r\n" % (field, values[0], field.lower(), values[1])
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  + lines + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        [(head, answer)] = split_answers(recv_all(s))
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head, head
    assert json.loads(answer)["error"].startswith(
        "a request carries one %s header, not two" % field.decode()), answer
    # Once each (or Content-Length twice, which llhttp refuses), as before.
    status, _, answer = call(address, "POST", "/v2/models/m00/infer", body,
                             {field.decode(): values[1].decode()})
    assert status == 200, answer
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), len(body), body))
        [(head, answer)] = split_answers(recv_all(s))
    assert head.startswith(b"HTTP/1.1 400 ") and b"Duplicate Content-Length" in answer


def test_an_http_1_0_request_with_transfer_encoding_closes_after_its_answer(address):
    """RFC 9112 6.1: its framing is faulty, and what follows it on the
    connection is not read as requests (a smuggling guard)."""
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.0\r\nConnection: keep-alive\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                  b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = split_answers(recv_all(s))
    assert len(answers) == 1
    assert b"Connection: close" in answers[0][0], answers[0][0]


@pytest.mark.parametrize("last", [b"HTTP/1.1\r\nHost: x\r\nConnection: close",
                                  b"HTTP/1.0"])
def test_the_answer_that_ends_a_connection_is_read_whole_whatever_follows_it(address, last):
    """A connection's last answer (Connection: close, or HTTP/1.0 without
    keep-alive) was followed by a close with the client's next bytes
    unread, and the kernel answered them with a reset: its client read
    ECONNRESET after the answer (or in place of it, when it was still in
    flight), not the end of the stream. (Whether bytes are unread at that
    close depends on the reads' timing: a few tries, each of which met it
    most times.)"""
    body = b"x" * (2 << 20)  # more than one read of the server's
    for _ in range(5):
        with socket.create_connection(address, timeout=10) as s:
            sender = send_in_background(s, b"GET /v2/health/live %s\r\n\r\n" % last
                                        + b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\n"
                                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            answers = split_answers(recv_all(s))  # a reset: ConnectionResetError
            sender.join(10)
        assert len(answers) == 1 and answers[0][0].startswith(b"HTTP/1.1 200 "), answers
        assert b"Connection: close" in answers[0][0]
        assert json.loads(answers[0][1]) == {"live": True}


def test_a_connection_past_max_connections_reads_its_whole_503(tmp_path):
    """The 503 was written and the connection closed at once, whatever
    the client had sent by then: unread, its request reset the connection,
    and the client read ECONNRESET where the answer ended (a client still
    sending its body met the reset in its send, and never read the 503).
    A server that has max_connections open is busy: its loop accepts the
    next connection late, when the client's request has come."""
    server = Server("--repo", str(tmp_path), "--workers", "1", "--tcp-port", "0",
                    "--http-port", "0", env=environ(MMENGINE_MAX_CONNECTIONS="1"))
    try:
        host, port = server.wait_for(r"HTTP .* on http://(\S+):(\d+)", 60).groups()
        address = host, int(port)
        live = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        with socket.create_connection(address, timeout=10) as held:
            held.sendall(live)
            assert held.recv(65536).startswith(b"HTTP/1.1 200 ")  # admitted: the one open
            # Keeps the loop busy: a body of a million one-byte chunks, a
            # call of the parser's each.
            busy = send_in_background(held, b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n"
                                      + b"1\r\nx\r\n" * 1_000_000 + b"0\r\n\r\n")
            body = b"x" * (2 << 20)
            tries = 0
            while tries < 20 and not select.select([held], [], [], 0)[0]:  # until answered
                tries += 1
                with socket.create_connection(address, timeout=10) as s:
                    sender = send_in_background(
                        s, b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    answers = split_answers(recv_all(s))  # a reset: ConnectionResetError
                    sender.join(10)
                assert len(answers) == 1 and answers[0][0].startswith(b"HTTP/1.1 503 "), answers
                assert b"Retry-After: 1" in answers[0][0]
                assert json.loads(answers[0][1])["code"] == "OVERLOADED"
            assert tries, "the busy request was answered before any try"
            busy.join(10)
            assert held.recv(65536).startswith(b"HTTP/1.1 400 ")  # not JSON
            held.sendall(live)  # still served
            assert held.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        server.stop()


def test_a_body_of_many_tiny_chunks_arrives_whole(address):
    # Each chunk was kept as a bytes object of its own (~28 times its size;
    # a 64 MB body of 2-byte chunks took 1.8 GB and held the loop 8 s to join).
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    body = json.dumps(infer_body(x)).encode()
    chunks = b"".join(b"1\r\n%c\r\n" % c for c in body) + b"0\r\n\r\n"
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + chunks)
        raw = recv_all(s, timeout=30)
    head, _, answer = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), raw[:300]
    assert json.loads(answer)["outputs"][0]["name"] == "y"


def test_keep_alive_serves_many_requests_on_one_connection(address):
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.connect()
        sock = conn.sock
        for i in range(5):
            x = x_for(10 + i, n=1)
            conn.request("POST", "/v2/models/m00/infer", json.dumps(infer_body(x)))
            r = conn.getresponse()
            out = json.loads(r.read())["outputs"][0]
            assert r.status == 200
            np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(1, -1),
                                       reference("m00", x), **TOL)
            conn.request("GET", "/v2/health/live")
            r = conn.getresponse()
            r.read()
            assert r.status == 200
        assert conn.sock is sock  # never reconnected
    finally:
        conn.close()


def split_answers(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(head, body) of each answer in a connection's bytes."""
    answers = []
    while raw:
        head, rest = raw.split(b"\r\n\r\n", 1)
        n = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        answers.append((head, rest[:n]))
        raw = rest[n:]
    return answers


def test_long_json_answers_come_whole_and_in_order_among_pipelined_ones(address):
    # An answer of FORMAT_ON_THREAD JSON numbers or more is formatted on a
    # parse thread (an output of 2M float32s held the loop for 145 ms):
    # it arrives whole, in its place, beside answers made at once.
    rows = FORMAT_ON_THREAD // DIMS[2] + 1
    xs = [x_for(31, n=rows), x_for(32), x_for(33, n=rows)]
    requests = []
    for i, x in enumerate(xs):
        body = json.dumps(infer_body(x, id=str(i))).encode()
        requests.append(b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    requests.append(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(b"".join(requests))
        raw = recv_all(s)
    answers = split_answers(raw)
    assert len(answers) == 4 and answers[3][0].startswith(b"HTTP/1.1 200 ")
    for i, (x, (head, body)) in enumerate(zip(xs, answers)):
        assert head.startswith(b"HTTP/1.1 200 "), body[:200]
        out = json.loads(body)
        assert out["id"] == str(i)
        y = np.array(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
        np.testing.assert_allclose(y, reference("m00", x), **TOL)


@pytest.mark.parametrize("count", [8, 3 * MAX_PIPELINED])
def test_pipelined_requests_are_answered_in_order(address, count):
    # Past MAX_PIPELINED unanswered requests the connection is not read
    # until half are answered: every request is still answered, in order,
    # whether its handler answers at once (a bad request), through the
    # engine's future (infer) or through a task (metadata).
    xs = [x_for(20 + i, n=1 + i % 3) for i in range(count)]
    requests = []
    for i, x in enumerate(xs):
        body = json.dumps(infer_body(x, id=str(i))).encode()
        model = MODELS[i % 2]
        if i % 7 == 3:
            body = body.replace(b'"inputs"', b'"inputz"')
        if i % 5 == 4:
            requests.append(b"GET /v2/models/%s HTTP/1.1\r\nHost: x\r\n\r\n" % model.encode())
            continue
        requests.append(b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (model.encode(), len(body), body))
    requests.append(b"GET /v2/models/m00/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with socket.create_connection(address, timeout=30) as s:
        def send() -> None:  # in many reads of the server's, before any answer is read
            for request in requests:
                s.sendall(request)

        sender = threading.Thread(target=send)
        sender.start()
        raw = recv_all(s)
        sender.join()
    answers = split_answers(raw)
    assert len(answers) == len(xs) + 1
    for i, (x, (head, body)) in enumerate(zip(xs, answers)):
        r = json.loads(body)
        if i % 5 == 4:
            assert head.startswith(b"HTTP/1.1 200 ") and r["name"] == MODELS[i % 2], body
            continue
        if i % 7 == 3:
            assert head.startswith(b"HTTP/1.1 400 ") and "inputs" in r["error"], body
            continue
        assert head.startswith(b"HTTP/1.1 200 "), body
        assert r["id"] == str(i)
        y = np.array(r["outputs"][0]["data"], np.float32).reshape(r["outputs"][0]["shape"])
        np.testing.assert_allclose(y, reference(MODELS[i % 2], x), **TOL)
    assert answers[-1][0].startswith(b"HTTP/1.1 200 ")


def test_idle_connection_is_closed(address):
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        t0 = time.monotonic()
        assert recv_all(s) == b""  # closed by the server
        waited = time.monotonic() - t0
    assert IDLE_TIMEOUT_S * 0.8 < waited < IDLE_TIMEOUT_S + 5


def test_partial_request_is_closed_when_idle(address):
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"POST /v2/models/m00/infer HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        assert recv_all(s).startswith(b"HTTP/1.1 408 ")  # said, then closed


def test_blank_lines_between_requests_keep_no_connection_open(address):
    # The parser skips them, so no request began (and none timed out), and
    # each counted as activity: a CRLF now and then held the connection.
    with socket.create_connection(address, timeout=10) as s:
        s.settimeout(IDLE_TIMEOUT_S / 4)
        t0 = time.monotonic()
        closed = False
        while time.monotonic() - t0 < IDLE_TIMEOUT_S * 5 and not closed:
            try:
                s.sendall(b"\r\n")
                closed = s.recv(65536) == b""
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        waited = time.monotonic() - t0
    assert closed and waited < IDLE_TIMEOUT_S * 3, waited


@pytest.mark.parametrize("start", [b"GET /v2/health/live HTTP/1.1\r\nHo",
                                   b"POST /v2/models/m00/infer HTTP/1.1\r\nHost: x\r\n"
                                   b"Content-Length: 100\r\n\r\n{"])
def test_a_trickled_request_is_answered_408_and_closed(address, start):
    # Each byte is activity, so the idle timer alone kept a request whose
    # head or body came a byte at a time open for ever (a few such clients
    # hold every connection): a request must arrive whole within the timeout.
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(start)
        t0 = time.monotonic()
        s.settimeout(IDLE_TIMEOUT_S / 4)
        answer = b""
        while time.monotonic() - t0 < IDLE_TIMEOUT_S * 5 and not answer:
            try:
                s.sendall(b"x")
                answer = s.recv(65536)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        waited = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert b"not received whole" in answer
    assert waited < IDLE_TIMEOUT_S * 3


def test_path_is_percent_decoded_once(address):
    assert call(address, "GET", "/v2/models/m%30%30")[0] == 200       # "m00"
    assert call(address, "GET", "/v2/models/m0%2530")[0] == 404       # "m0%30", not "m00"
    # A route's own words escaped are those words (RFC 3986 6.2.2.2): 404 before.
    assert call(address, "GET", "/v2/%68ealth/%72eady")[0] == 200
    assert call(address, "GET", "/v2/models/m00/%52EADY")[0] == 404   # case is not escaping's
    assert call(address, "GET", "/v2/models%2Fm00")[0] == 404         # "/" stays a name's


@pytest.mark.parametrize("method, path", [
    ("POST", "/v2/models/%E9/infer"), ("GET", "/v2/models/%E9"),
    ("GET", "/v2/models/m%FF0/ready"), ("GET", "/v2/models/m00/versions/%C3/config"),
    ("POST", "/v2/repository/models/%E9/load"), ("GET", "/v2/models/%ED%A0%80/stats")])
def test_a_path_whose_escapes_are_not_utf_8_is_400(address, method, path):
    # Decoded with replacement, each named a model "\ufffd" (a 404 that
    # named it, or the answer of a model so named; %ED%A0%80 is a
    # surrogate, which UTF-8 cannot carry).
    status, _, raw = call(address, method, path, b"{}" if method == "POST" else None)
    assert status == 400, raw
    error = json.loads(raw)
    assert error["code"] == "BAD_REQUEST" and "not UTF-8" in error["error"], error
    assert call(address, "GET", "/v2/models/m%30%30")[0] == 200  # UTF-8: as ever


def test_an_overloaded_answer_says_when_to_retry():
    from mmengine.errors import Overloaded, PinnedFull
    from mmengine.server.http import error_response

    r = error_response(Overloaded("busy"))
    assert r.status == 503
    assert ("Retry-After", "1") in r.headers
    assert json.loads(r.body) == {"error": "busy", "code": "OVERLOADED"}
    # Where only an unpin makes room, waiting is no advice.
    r = error_response(PinnedFull("pinned models hold every worker's budget"))
    assert r.status == 503 and not any(k == "Retry-After" for k, _ in r.headers)


def test_non_finite_outputs_are_written_as_numbers_not_null(address):
    # Inputs near float32's largest overflow the model: its outputs are
    # infinities and NaN, which JSON has no words for. They come back as
    # NaN / Infinity / -Infinity, as Python's json reads them, never null.
    x = np.full((1, DIMS[0]), 3e38, np.float32)
    status, _, body = call(address, "POST", "/v2/models/m00/infer", infer_body(x))
    assert status == 200, body
    data = json.loads(body)["outputs"][0]["data"]
    assert None not in data
    assert not np.isfinite(np.array(data, np.float64)).all()


def test_an_output_kserve_cannot_carry_is_the_models_error_not_the_callers(address):
    status, _, body = call(address, "POST", "/v2/models/complex/infer", infer_body(x_for(1)))
    assert status == 500, body
    assert json.loads(body)["code"] == "INTERNAL" and b"KServe v2 cannot carry" in body
    assert json.loads(body)["error"].startswith("complex: ")  # which model, for its operator


def test_a_request_id_that_is_not_a_string_is_refused(address):
    for rid in ([[["nested"]]], 42, 0, False):
        status, _, body = call(address, "POST", "/v2/models/m00/infer",
                               infer_body(x_for(1), id=rid))
        assert status == 400 and b"'id' must be a string" in body, (rid, body)
    status, _, body = call(address, "POST", "/v2/models/m00/infer",
                           infer_body(x_for(1), id="r-7"))
    assert status == 200 and json.loads(body)["id"] == "r-7"
    # null is none, as for the other optional fields (clients that write an
    # unset field as null were refused for this one alone: a review).
    status, _, body = call(address, "POST", "/v2/models/m00/infer",
                           infer_body(x_for(1), id=None))
    assert status == 200 and "id" not in json.loads(body), body


def test_json_is_written_whatever_orjson_refuses():
    from mmengine.server.http import dumps, finite

    arrays = [np.array([1.5, -np.inf, np.nan], np.float32), np.arange(3)]
    assert not finite(arrays) and finite(arrays[1:])
    assert json.loads(dumps({"d": arrays[0]}, finite=False))["d"][:2] == [1.5, -np.inf]
    # A lone surrogate (from a file name) and an integer past 64 bits.
    assert json.loads(dumps({"name": "m\udc80", "n": 1 << 70})) == {"name": "m\udc80",
                                                                   "n": 1 << 70}
