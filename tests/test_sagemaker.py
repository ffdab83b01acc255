"""The SageMaker multi-model container contract end to end: `mmengine serve`
as a real process with model roots, driven over raw HTTP (http.client)."""
from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmengine import demo
from mmengine.client import Client
from mmengine.errors import MAX_MESSAGE, BadRequest, Overloaded
from mmengine.server import sagemaker
from mmengine.server.http import PARSE_ON_THREAD
from conftest import Server, environ

DIMS = (4, 8, 2)
SEEDS = 5  # models m0..m4 under the root, m<i> with weights of seed i
TOL = dict(rtol=1e-5, atol=1e-5)
TARGET = "X-Amzn-SageMaker-Target-Model"


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> dict[str, Path]:
    """An allowed root of model directories, and things around it that
    must not be served."""
    base = tmp_path_factory.mktemp("sagemaker")
    root, outside, repo = base / "root", base / "outside", base / "repo"
    paths = {"root": root, "outside_dir": outside, "repo": repo}
    for i in range(SEEDS):
        paths[f"m{i}"] = demo.write_mlp(root / f"m{i}", "safetensors", *DIMS, seed=i)
    huge = paths["huge"] = demo.write_mlp(root / "huge", "safetensors", *DIMS)
    (huge / "model.toml").write_text("bytes = 1000000000000\n"
                                     + (huge / "model.toml").read_text())
    paths["outside"] = demo.write_mlp(outside / "evil", "safetensors", *DIMS)
    paths["escape_link"] = root / "escape"
    paths["escape_link"].symlink_to(paths["outside"], target_is_directory=True)
    # A directory inside whose files are links to a model outside.
    paths["file_links"] = root / "links"
    paths["file_links"].mkdir()
    for f in paths["outside"].iterdir():
        (paths["file_links"] / f.name).symlink_to(f)
    # ... or through a link to a directory inside that holds a link out.
    inner = root / "inner"
    inner.mkdir()
    (inner / "helper.py").symlink_to(paths["outside"] / "model.py")
    paths["nested_links"] = root / "nested"
    paths["nested_links"].mkdir()
    (paths["nested_links"] / "sub").symlink_to(inner, target_is_directory=True)
    paths["inside_link"] = root / "alias"
    paths["inside_link"].symlink_to(paths["m3"], target_is_directory=True)
    paths["empty"] = root / "empty"
    paths["empty"].mkdir()
    paths["looping"] = root / "looping"  # a link to itself: it raised untyped (a review)
    paths["looping"].mkdir()
    (paths["looping"] / "loop").symlink_to("loop")
    paths["file"] = paths["m0"] / "model.toml"
    paths["bare"] = demo.write_mlp(root / "bare", "torchscript", *DIMS, seed=4, manifest=False)
    # torch.export in float64, without a manifest: the backend reads its inputs.
    paths["bare64"] = root / "bare64" / "1"
    paths["bare64"].mkdir(parents=True)
    program = torch.export.export(
        demo.mlp(*DIMS, seed=1).double(), (torch.zeros(2, DIMS[0], dtype=torch.float64),),
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    torch.export.save(program, paths["bare64"] / "model.pt2")
    paths["complex"] = root / "complex"
    paths["complex"].mkdir()
    (paths["complex"] / "handler.py").write_text(
        "import numpy as np\n\ndef load(path, device):\n    pass\n\n"
        "def predict(inputs):\n    return {'z': inputs['x'].astype(np.complex64)}\n")
    paths["echo"] = root / "echo"  # its input, undeclared: as JSON's are read
    paths["echo"].mkdir()
    (paths["echo"] / "handler.py").write_text(
        "def load(path, device):\n    pass\n\n"
        "def predict(inputs):\n    return {'y': inputs['x']}\n")
    paths["wide"] = root / "wide"  # one more value than a text/csv answer holds
    paths["wide"].mkdir()
    (paths["wide"] / "handler.py").write_text(
        "import numpy as np\n\ndef load(path, device):\n    pass\n\n"
        "def predict(inputs):\n"
        f"    return {{'y': np.zeros({sagemaker.MAX_CSV_VALUES + 1}, np.float32)}}\n")
    for dtype, shape in (("int64", [-1, -1]), ("uint64", [-1, -1]), ("float16", [-1, -1]),
                         ("float32", [-1])):
        # A handler that answers its input, declared: what JSON and CSV cast to.
        paths[f"echo_{dtype}"] = root / f"echo-{dtype}"
        paths[f"echo_{dtype}"].mkdir()
        (paths[f"echo_{dtype}"] / "model.toml").write_text(
            f'backend = "handler"\n[[inputs]]\nname = "x"\ndtype = "{dtype}"\n'
            f'shape = {shape}\n')
        (paths[f"echo_{dtype}"] / "handler.py").write_text(
            "def load(path, device):\n    pass\n\n"
            "def predict(inputs):\n    return {'y': inputs['x']}\n")
    paths["oom"] = root / "oom"
    paths["oom"].mkdir()
    (paths["oom"] / "handler.py").write_text(
        "def load(path, device):\n    raise MemoryError('no room for the weights')\n\n"
        "def predict(inputs):\n    return inputs\n")
    # A model of the repository root: not SageMaker's to see or take over.
    demo.write_mlp(repo / "repo-model", "safetensors", *DIMS)
    return paths


@pytest.fixture(scope="module")
def server(request, disk) -> tuple[tuple[str, int], tuple[str, int]]:
    """(HTTP address, TCP address) of one server for the module."""
    proc = Server("--repo", str(disk["repo"]), "--tcp-port", "0", "--http-port", "0",
                  "--workers", "1", "--device-budget", "64MiB",
                  env=environ(MMENGINE_MODEL_ROOTS=str(disk["root"])))
    request.addfinalizer(lambda: proc.proc.poll() is None and proc.stop())
    tcp = proc.wait_for(r"serving .* on tcp://(\S+):(\d+)", 60)
    web = proc.wait_for(r"HTTP .* on http://(\S+):(\d+)", 10)
    return (web[1], int(web[2])), (tcp[1], int(tcp[2]))


@pytest.fixture(scope="module")
def address(server) -> tuple[str, int]:
    return server[0]


def call(address, method: str, path: str, body: Any = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        payload = response.read()
        # An empty body says no type (it is no JSON).
        assert response.getheader("Content-Type") == ("application/json" if payload else None)
        return response.status, json.loads(payload) if payload else None
    finally:
        conn.close()


def add(address, name: str, url: str | Path) -> tuple[int, Any]:
    return call(address, "POST", "/models", {"model_name": name, "url": str(url)})


def x_for(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIMS[0])).astype(np.float32)


def reference(seed: int, x: np.ndarray) -> np.ndarray:
    return demo.reference(x, *DIMS, seed=seed)


def residency(server, name: str) -> str | None:
    with Client(server[1]) as c:
        rows = [r for r in c.stats()["models"] if r["name"] == name]
    return rows[0]["state"] if rows else None


# -- health -----------------------------------------------------------------------------

def test_ping(address):
    assert call(address, "GET", "/ping") == (200, {"status": "healthy"})


# -- load ---------------------------------------------------------------------------------

def test_load_makes_the_model_resident_before_answering(server, disk):
    address = server[0]
    assert add(address, "load-a", disk["m0"]) == (200, {"modelName": "load-a",
                                                        "modelUrl": str(disk["m0"])})
    assert residency(server, "load-a") == "resident"
    assert call(address, "GET", "/models/load-a") == (
        200, {"modelName": "load-a", "modelUrl": str(disk["m0"])})
    # Loaded already: 409, whatever the url, every time.
    for url in (disk["m0"], disk["m1"]):
        status, body = add(address, "load-a", url)
        assert status == 409, body
        assert "already loaded" in body["error"]
    assert call(address, "GET", "/models/load-a")[1]["modelUrl"] == str(disk["m0"])


def test_concurrent_loads_of_one_name_load_it_once(address, disk):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: add(address, "load-race", disk[f"m{i}"]), range(4)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200, 409, 409, 409], answers
    winner = next(body for status, body in answers if status == 200)
    assert call(address, "GET", "/models/load-race") == (200, winner)


def test_file_urls_and_symlinks_inside_the_root_load(address, disk):
    url = "file://" + str(disk["m1"])
    assert add(address, "load-file", url) == (200, {"modelName": "load-file", "modelUrl": url})
    url = "file://LocalHost" + str(disk["m2"])  # a host's name has no case (RFC 3986)
    assert add(address, "load-file-host", url)[0] == 200
    assert add(address, "load-alias", disk["inside_link"])[0] == 200
    x = x_for(0)
    status, body = call(address, "POST", "/models/load-alias/invoke", x.tolist())
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"]["y"], reference(3, x), **TOL)


def test_no_room_even_after_eviction_is_507_and_leaves_nothing(address, disk):
    for _ in range(2):  # not 409 the second time: the failed load was forgotten
        status, body = add(address, "load-huge", disk["huge"])
        assert status == 507, body
        assert body["code"] == "TOO_LARGE"
    assert call(address, "GET", "/models/load-huge")[0] == 404


def test_a_load_out_of_memory_is_507(address, disk):
    # The contract: "Any time a model cannot be loaded due to lack of memory
    # or to any other resource, this API should return a 507", SageMaker's
    # cue to unload unused models and try again.
    for _ in range(2):  # removed, it is not backed off: the next add loads it again
        status, body = add(address, "load-oom", disk["oom"])
        assert status == 507, body
        assert body["code"] == "OVERLOADED" and "out of memory while loading" in str(body)
        assert "next try" not in str(body)  # the back-off of a model that is gone
    assert call(address, "GET", "/models/load-oom")[0] == 404


@pytest.mark.parametrize("case, status, words", [
    ("outside", 403, "outside the allowed model roots"),
    ("dotdot", 403, "outside the allowed model roots"),
    ("escape_link", 403, "outside the allowed model roots"),
    ("escape_link_file_url", 403, "outside the allowed model roots"),
    ("file_links", 403, "outside the allowed model roots"),
    ("nested_links", 403, "outside the allowed model roots"),
    ("http", 400, "only local paths and file:// URLs"),
    ("s3", 400, "only local paths and file:// URLs"),
    ("file_host", 400, "must name a local path"),
    ("bracket", 400, "is not a URL"),  # urlsplit's ValueError: it was a 500
    ("relative", 400, "must be absolute"),
    ("nul", 400, "NUL character"),
    ("latin_escape", 400, "%-escapes must be UTF-8"),  # was a directory named U+FFFD
    ("missing", 400, "is not a directory"),
    ("file", 400, "is not a directory"),
    ("empty", 500, "no model file found"),
    ("looping", 400, "loop cannot be read (Too many levels of symbolic links)"),
])
def test_urls_that_may_not_be_loaded_are_refused(address, disk, case, status, words):
    url = {
        "outside": str(disk["outside"]),
        "dotdot": f"{disk['root']}/m0/../../{disk['outside_dir'].name}/evil/1",
        "escape_link": str(disk["escape_link"]),
        "escape_link_file_url": "file://" + str(disk["escape_link"]),
        "file_links": str(disk["file_links"]),
        "nested_links": str(disk["nested_links"]),
        "http": "http://127.0.0.1:1/model.tar.gz",
        "s3": "s3://bucket/models/m0",
        "file_host": "file://elsewhere" + str(disk["m0"]),
        "bracket": "file://[::1" + str(disk["m0"]),
        "relative": os.path.relpath(disk["m0"]),
        "nul": "file://" + str(disk["root"]) + "/m0%00/1",
        "latin_escape": "file://" + str(disk["root"]) + "/m%E9",
        "missing": str(disk["root"] / "nope"),
        "file": str(disk["file"]),
        "empty": str(disk["empty"]),
        "looping": str(disk["looping"]),
    }[case]
    name = f"refused-{case.replace('_', '-')}"
    code, body = add(address, name, url)
    assert code == status, body
    assert words in body["error"]
    assert call(address, "GET", f"/models/{name}")[0] == 404
    assert name not in {m["modelName"] for m in list_all(address)}


def test_malformed_loads_are_refused(address, disk):
    for raw in (b"not json", b"[]", b'{"model_name": "x"}', b'{"url": "/a"}',
                json.dumps({"model_name": 5, "url": str(disk["m0"])}).encode(),
                json.dumps({"model_name": "../x", "url": str(disk["m0"])}).encode(),
                json.dumps({"model_name": ".hidden", "url": str(disk["m0"])}).encode()):
        status, body = call(address, "POST", "/models", raw=raw)
        assert status == 400, (raw, body)
    # A name the repository root already serves cannot be taken over.
    status, body = add(address, "repo-model", disk["m0"])
    assert status == 409, body


def test_no_model_roots_refuses_every_url(disk):
    with pytest.raises(BadRequest, match="no model roots are configured") as info:
        sagemaker.resolve_url(str(disk["m0"]), "")
    assert info.value.http_status == 403
    # Several roots, separated by os.pathsep: any one of them will do.
    roots = os.pathsep.join([str(disk["outside_dir"]), str(disk["root"])])
    assert sagemaker.resolve_url(str(disk["outside"]), roots) == os.path.realpath(
        disk["outside"])
    assert sagemaker.resolve_url(str(disk["m0"]), roots) == os.path.realpath(disk["m0"])


# -- list and get -------------------------------------------------------------------------

def list_all(address, max_results: int | None = None) -> list[dict]:
    """Every model, walking the pages; each page is checked on the way."""
    models, token = [], None
    while True:
        query = []
        if max_results is not None:
            query.append(f"max_results={max_results}")
        if token is not None:
            query.append(f"next_page_token={token}")
        status, body = call(address, "GET", "/models" + ("?" + "&".join(query) if query else ""))
        assert status == 200, body
        if max_results is not None:
            assert len(body["models"]) <= max_results
        models += body["models"]
        token = body.get("nextPageToken")
        if token is None:
            return models
        assert len(body["models"]) == max_results  # only a full page has a next one


def test_list_walks_pages_to_the_end(address, disk):
    for i in range(SEEDS):
        assert add(address, f"page-{i}", disk[f"m{i}"])[0] == 200
    whole = list_all(address)
    names = [m["modelName"] for m in whole]
    assert names == sorted(set(names))
    assert "repo-model" not in names  # only what SageMaker added
    urls = {m["modelName"]: m["modelUrl"] for m in whole}
    for i in range(SEEDS):
        assert urls[f"page-{i}"] == str(disk[f"m{i}"])
    for size in (1, 2, len(whole), len(whole) + 1, 10 ** 30):
        assert list_all(address, size) == whole
    status, body = call(address, "GET", "/models?max_results=" + "9" * 5000)  # past int()'s
    assert status == 200 and body["models"] == whole[:len(body["models"])], body
    # Leading zeros say nothing of a number's size: 1, not "no limit".
    status, body = call(address, "GET", "/models?max_results=" + "0" * 20 + "1")
    assert status == 200 and body["models"] == whole[:1] and "nextPageToken" in body, body


def test_list_refuses_bad_parameters(address):
    for query in ("max_results=0", "max_results=-1", "max_results=abc", "max_results=",
                  "max_results=1&max_results=2", "next_page_token=!!!",
                  "next_page_token=_w"):  # not base64 of UTF-8
        status, body = call(address, "GET", f"/models?{query}")
        assert status == 400, (query, body)
    # A query's escapes are UTF-8 as a path's are: decoded with replacement,
    # the token was read as U+FFFD. A route that reads no query reads none.
    status, body = call(address, "GET", "/models?next_page_token=%E9")
    assert status == 400 and "not UTF-8" in body["error"], body
    assert call(address, "GET", "/ping?x=%FF")[0] == 200


def test_get_unknown_model_is_404(address):
    assert call(address, "GET", "/models/never-added")[0] == 404
    assert call(address, "GET", "/models/repo-model")[0] == 404


# -- invoke -------------------------------------------------------------------------------

def test_invoke_answers_the_reference(address, disk):
    assert add(address, "inv", disk["m2"])[0] == 200
    x = x_for(1)
    expected = reference(2, x)
    for path, body, headers in [
        ("/models/inv/invoke", {"inputs": {"x": x.tolist()}}, {}),
        ("/models/inv/invoke", x.tolist(), {TARGET: "ignored-here"}),
        ("/invocations", {"inputs": {"x": x.tolist()}}, {TARGET: "inv"}),
        ("/invocations", x.tolist(), {TARGET: "inv"}),
    ]:
        status, answer = call(address, "POST", path, body, headers=headers)
        assert status == 200, (path, answer)
        assert list(answer) == ["outputs"] and list(answer["outputs"]) == ["y"]
        np.testing.assert_allclose(answer["outputs"]["y"], expected, **TOL)
    # Integers are numbers too: they become the declared float32.
    status, answer = call(address, "POST", "/models/inv/invoke", [[1, 2, 3, 4]])
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"]["y"],
                               reference(2, np.array([[1, 2, 3, 4]], np.float32)), **TOL)


def test_a_long_json_answer_is_the_reference(address, disk):
    # FORMAT_ON_THREAD numbers or more are formatted on a parse thread.
    from mmengine.server.http import FORMAT_ON_THREAD

    assert add(address, "long", disk["m3"])[0] == 200
    x = x_for(2, n=FORMAT_ON_THREAD // DIMS[2] + 1)
    status, answer = call(address, "POST", "/models/long/invoke", {"inputs": {"x": x.tolist()}})
    assert status == 200, str(answer)[:200]
    np.testing.assert_allclose(answer["outputs"]["y"], reference(3, x), **TOL)


def raw_call(address, path: str, body: bytes, headers: dict) -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of a POST whose answer may not be JSON."""
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


def test_a_vectors_csv_is_a_value_a_line(address, disk):
    # docs/sagemaker.md: a row a line, its first axis; a batch of scalars is
    # a record each (as SageMaker's toolkit writes one), not one row.
    assert add(address, "vector", disk["echo_float32"])[0] == 200
    status, content_type, raw = raw_call(address, "/models/vector/invoke", b"[0, 2.5, 3]",
                                         {"Content-Type": "application/json",
                                          "Accept": "text/csv"})
    assert (status, content_type, raw) == (200, "text/csv", b"0\n2.5\n3\n")
    # No rows: an empty body, still of its type.
    status, content_type, raw = raw_call(address, "/models/vector/invoke",
                                         npy(np.zeros(0, np.float32)),
                                         {"Content-Type": "application/x-npy",
                                          "Accept": "text/csv"})
    assert (status, content_type, raw) == (200, "text/csv", b"")


def test_whole_numbers_reach_integer_models_exactly(address, disk):
    # Past 2^53 a float64 rounds them: JSON's beside larger ones, and CSV's,
    # were read as floats, and refused (or, undeclared, served as floats).
    for dtype in ("int64", "uint64"):
        assert add(address, f"exact-{dtype}", disk[f"echo_{dtype}"])[0] == 200
    assert add(address, "undeclared", disk["complex"])[0] == 200
    big = 2 ** 53 + 1
    for name, raw, media, expected in (
            ("exact-uint64", f"[[{2 ** 63}, 1]]", "application/json", [[2 ** 63, 1]]),
            ("exact-uint64", f"{2 ** 64 - 1},{big}\n", "text/csv", [[2 ** 64 - 1, big]]),
            ("exact-int64", f"{big},-1\n2,3\n", "text/csv", [[big, -1], [2, 3]]),
            ("exact-int64", "1.0,2e3\n", "text/csv", [[1, 2000]])):  # whole, as floats
        status, _, answer = raw_call(address, f"/models/{name}/invoke", raw.encode(),
                                     {"Content-Type": media})
        assert status == 200, (name, raw, answer)
        assert json.loads(answer)["outputs"]["y"] == expected, (name, raw, answer)
    for name, raw, media, words in (
            ("exact-int64", f"[[{2 ** 63}, 1]]", "application/json", "out of range for int64"),
            ("exact-int64", f"{2 ** 63},1\n", "text/csv", "out of range for int64"),
            ("exact-uint64", "-1,1\n", "text/csv", "out of range for uint64"),
            ("exact-int64", "1.5\n", "text/csv", "must be int64"),
            ("undeclared", json.dumps({"inputs": {"x": [2 ** 63, 1]}}), "application/json",
             "beyond int64's range"),  # undeclared: it was served as float32
            # Past 64 bits orjson reads floats: they were served as float32.
            ("undeclared", json.dumps({"inputs": {"x": [10 ** 20]}}), "application/json",
             "beyond int64's range"),
            ("undeclared", json.dumps({"inputs": {"x": [[1], [-2 ** 63 - 1]]}}),
             "application/json", "beyond int64's range")):
        status, _, answer = raw_call(address, f"/models/{name}/invoke", raw.encode(),
                                     {"Content-Type": media})
        assert status == 400 and words in json.loads(answer)["error"], (name, raw, answer)
    # A float that large is a float (as torch.tensor() reads it), among
    # integers too.
    assert add(address, "undeclared-echo", disk["echo"])[0] == 200
    for raw in ('{"inputs": {"x": [1e20]}}', '{"inputs": {"x": [1.5, %d]}}' % 10 ** 20):
        status, _, answer = raw_call(address, "/models/undeclared-echo/invoke", raw.encode(),
                                     {"Content-Type": "application/json"})
        assert status == 200 and json.loads(answer)["outputs"]["y"][-1] == 1e20, (raw, answer)
    # Read again as written, by json: before 3.12 it nests less deep than
    # orjson (a 400, not a 500); from 3.12 it reads whatever orjson does.
    deep = '{"inputs": {"x": [1e20]}, "j": %s1%s}' % ("[" * 1020, "]" * 1020)
    status, _, answer = raw_call(address, "/models/undeclared-echo/invoke", deep.encode(),
                                 {"Content-Type": "application/json"})
    if sys.version_info < (3, 12):
        assert status == 400 and "nested too deeply" in json.loads(answer)["error"], answer
    else:
        assert status == 200, answer


def test_int64s_least_is_out_of_a_float16s_range(address, disk):
    # Its absolute value, in numpy, is itself: below zero, so in range, and
    # it was served as -inf.
    assert add(address, "half", disk["echo_float16"])[0] == 200
    for value, status in ((-2 ** 63, 400), (-(2 ** 63 - 1), 400), (-60000, 200)):
        got, _, answer = raw_call(address, "/models/half/invoke", f"[[{value}]]".encode(),
                                  {"Content-Type": "application/json"})
        assert got == status, (value, answer)
        if status == 400:
            assert "out of range for float16" in json.loads(answer)["error"], answer


def test_an_answer_too_long_for_csv_is_counted_as_the_406_its_client_got(address, disk):
    # It was counted OK: the size was judged as the answer was written,
    # after the engine had counted it (a review's finding).
    assert add(address, "wide", disk["wide"])[0] == 200
    for accept, status in (("text/csv", 406), ("application/json", 200)):
        got, _, raw = raw_call(address, "/models/wide/invoke", b'{"inputs": {"x": [1]}}',
                               {"Content-Type": "application/json", "Accept": accept})
        assert got == status and (status == 200 or b"more than a text/csv" in raw), raw[:200]
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    counted = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line.startswith("mmengine_requests_total{")}
    assert counted['mmengine_requests_total{code="BAD_REQUEST",model="wide"}'] == 1
    assert counted['mmengine_requests_total{code="OK",model="wide"}'] == 1


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def test_invoke_takes_and_answers_csv_and_npy(address, disk):
    # What SageMaker's own examples send (text/csv), and numpy's file
    # format, for a model of one input; the answer in the type Accept asks.
    assert add(address, "inv-csv", disk["m2"])[0] == 200
    x = x_for(5)
    expected = reference(2, x)
    csv = "\n".join(",".join(repr(float(v)) for v in row) for row in x).encode()
    for body, media in ((csv, "text/csv"), (npy(x), "application/x-npy"),
                        (npy(x.astype(">f4")), "application/x-npy")):  # big-endian too
        for accept, answer_type in (("", "application/json"),
                                    ("text/csv", "text/csv"),
                                    ("text/csv;q=0.9, application/x-npy", "application/x-npy"),
                                    ("image/png, */*", "application/json")):
            status, content_type, raw = raw_call(
                address, "/models/inv-csv/invoke", body,
                {"Content-Type": media, **({"Accept": accept} if accept else {})})
            assert status == 200 and content_type == answer_type, (media, accept, raw[:200])
            y = (np.array(json.loads(raw)["outputs"]["y"]) if answer_type == "application/json"
                 else np.loadtxt(io.StringIO(raw.decode()), delimiter=",", ndmin=2)
                 if answer_type == "text/csv" else np.load(io.BytesIO(raw)))
            np.testing.assert_allclose(y, expected, **TOL)
    # Long enough to be parsed on a thread: the same answer.
    x = x_for(7, n=60_000)
    long_csv = "\n".join(",".join(repr(float(v)) for v in row) for row in x).encode()
    assert len(long_csv) > PARSE_ON_THREAD
    status, _, raw = raw_call(address, "/models/inv-csv/invoke", long_csv,
                              {"Content-Type": "text/csv", "Accept": "application/x-npy"})
    assert status == 200, raw[:200]
    np.testing.assert_allclose(np.load(io.BytesIO(raw)), reference(2, x), **TOL)
    status, _, raw = raw_call(address, "/models/inv-csv/invoke", long_csv[:-1] + b",",
                              {"Content-Type": "text/csv"})
    assert status == 400 and b"rows of numbers" in raw, raw[:200]
    status, _, raw = raw_call(address, "/models/inv-csv/invoke", csv,
                              {"Content-Type": "text/csv", "Accept": "image/png"})
    assert status == 406 and b"text/csv" in raw, raw  # before the model runs
    # Accept on two lines is one list (RFC 9110 5.3): the last line hid the
    # first, and the answer came as CSV where .npy weighed more.
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.putrequest("POST", "/models/inv-csv/invoke")
        for name, value in (("Content-Type", "text/csv"), ("Content-Length", str(len(csv))),
                            ("Accept", "application/x-npy"), ("Accept", "text/csv;q=0.5")):
            conn.putheader(name, value)
        conn.endheaders(csv)
        response = conn.getresponse()
        assert (response.status, response.getheader("Content-Type")) == (200, "application/x-npy")
        response.read()
    finally:
        conn.close()
    # A spreadsheet's byte-order mark is no number; an empty batch answers
    # an empty table; q=0 is "not this one".
    status, _, raw = raw_call(address, "/models/inv-csv/invoke", b"\xef\xbb\xbf" + csv,
                              {"Content-Type": "text/csv", "Accept": "text/csv;q=0, */*"})
    assert status == 200 and json.loads(raw)["outputs"]["y"], raw[:200]
    status, content_type, raw = raw_call(
        address, "/models/inv-csv/invoke", npy(np.zeros((0, 4), np.float32)),
        {"Content-Type": "application/x-npy", "Accept": "text/csv"})
    # An empty table, of its type: a client that branches on it finds it.
    assert (status, content_type, raw) == (200, "text/csv", b""), raw
    # q=0 refuses a type for the wildcards too, whatever the case of its q;
    # otherwise the highest q wins, from the most specific range (RFC 9110).
    for accept, answer_type in (("application/json;q=0, */*", "text/csv"),
                                ("text/csv;Q=0, application/json", "application/json"),
                                ("text/csv;q=0.5, application/json", "application/json"),
                                ("*/*;q=0.1, application/x-npy;q=0.2", "application/x-npy"),
                                ("text/*;q=0.9, text/csv;q=0.1, application/*;q=0.5",
                                 "application/json"),
                                ("application/json;q=0.8, text/csv;q=0.8", "application/json"),
                                ("text/csv;q=0.8, application/json;q=0.8", "text/csv")):
        status, content_type, raw = raw_call(address, "/models/inv-csv/invoke", csv,
                                             {"Content-Type": "text/csv", "Accept": accept})
        assert (status, content_type) == (200, answer_type), (accept, raw[:200])
    # A 1 MiB chunk of the text that holds only comments is no rows.
    commented = csv + b"\n" + b"# a note\n" * (2 << 18) + csv
    status, _, raw = raw_call(address, "/models/inv-csv/invoke", commented,
                              {"Content-Type": "text/csv"})
    assert status == 200 and len(json.loads(raw)["outputs"]["y"]) == 2 * (csv.count(b"\n") + 1)

    def npy_header(shape: str) -> bytes:
        header = b"{'descr': '|u1', 'fortran_order': False, 'shape': %s, }" % shape.encode()
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + header.ljust(117) + b"\n"
    giant = npy_header("(35184372088832,)")
    zipped = io.BytesIO()
    np.savez(zipped, x=x)
    for body, media, why, code in (
            (b"1,2,3,4\n5,6\n", "text/csv", b"rows of numbers", 400),
            (b"1,x,3,4\n", "text/csv", b"rows of numbers", 400),
            (b"1,2,nan,4\n", "text/csv", b"not finite", 400),
            (b"\n" * 100, "text/csv", b"no numbers", 400),
            (b"1,2,3,4\n" * ((2 << 20) + 1), "text/csv", b"at most", 413),
            (npy(x.astype(np.float64)), "application/x-npy", b"float32", 400),  # the declared
            (npy(np.array([["a"] * 4])), "application/x-npy", b"only numbers", 400),
            (b"\x93NUMPY garbage", "application/x-npy", b".npy file", 400),
            (giant + bytes(16), "application/x-npy", b"header says", 400),  # not 32 TiB
            (npy_header("(-1, -1)") + bytes(1), "application/x-npy", b"shape", 400),
            (npy_header("(0, " + "1" + "0" * 30 + ")"), "application/x-npy", b"shape", 400),
            (zipped.getvalue(), "application/x-npy", b".npy file", 400),
            # RFC 9110 15.5.16 (a review found it 400)
            (b"[[1, 2, 3, 4]]", "application/octet-stream", b"unsupported Content-Type", 415)):
        status, _, raw = raw_call(address, "/models/inv-csv/invoke", body,
                                  {"Content-Type": media})
        assert status == code and why in raw, (body[:30], raw)


def test_405_and_415_are_errors_as_the_contracts_others(address):
    # As every error of the contract (docs/sagemaker.md): {"error", "code"},
    # the message cut as any other's (errors.told), with the header the
    # status calls for (RFC 9110: 405's Allow, 415's Accept-Encoding).
    name = "n" * 6000
    for method, path, headers, status, header in (
            ("GET", f"/models/{name}/invoke", {}, 405, ("Allow", "OPTIONS, POST")),
            ("POST", "/invocations", {"Content-Encoding": "x" * 6000}, 415,
             ("Accept-Encoding", "gzip, deflate, identity"))):
        conn = http.client.HTTPConnection(*address, timeout=30)
        try:
            conn.request(method, path, body=b"[[1, 2, 3, 4]]" if method == "POST" else None,
                         headers={"Content-Type": "application/json", **headers})
            response = conn.getresponse()
            answer = json.loads(response.read())
        finally:
            conn.close()
        assert (response.status, response.getheader(header[0])) == (status, header[1])
        assert set(answer) == {"error", "code"} and answer["code"] == "BAD_REQUEST", answer
        assert len(answer["error"]) <= MAX_MESSAGE and "characters in all" in answer["error"]


def test_a_model_without_a_manifest_takes_json_as_torch_would(address, disk):
    # No declared inputs: fractions become float32 (numpy's float64 would
    # meet a float32 TorchScript model's weights and fail), as torch.tensor()
    # and SageMaker's PyTorch container make them.
    assert add(address, "bare", disk["bare"])[0] == 200
    x = x_for(4)
    status, answer = call(address, "POST", "/models/bare/invoke", {"inputs": {"x": x.tolist()}})
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"]["output"], reference(4, x), **TOL)
    status, answer = call(address, "POST", "/models/bare/invoke",
                          {"inputs": {"x": [[1e39, 0, 0, 0]]}})
    assert status == 400 and "out of range for float32" in answer["error"], answer
    status, answer = call(address, "POST", "/models/bare/invoke",
                          {"inputs": {"x": [[2 ** 63] * 4]}})  # torch.tensor() refuses it
    assert status == 400 and "beyond int64" in answer["error"], answer
    status, answer = call(address, "POST", "/models/bare/invoke",
                          {"inputs": {"x": [[1.5, True, 2, 3]]}})  # not [[1.5, 1.0, 2, 3]]
    assert status == 400 and "mixes booleans with numbers" in answer["error"], answer
    # Inputs the backend read from the artifact count as declared: float64 here.
    assert add(address, "bare64", disk["bare64"])[0] == 200
    status, answer = call(address, "POST", "/models/bare64/invoke", {"inputs": {"x": x.tolist()}})
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"]["output"], reference(1, x), **TOL)


def test_an_output_json_cannot_carry_is_the_models_error_not_the_callers(address, disk):
    assert add(address, "complex", disk["complex"])[0] == 200
    status, answer = call(address, "POST", "/models/complex/invoke",
                          {"inputs": {"x": x_for(1).tolist()}})
    assert status == 500 and answer["code"] == "INTERNAL", answer
    assert answer["error"].startswith("complex: ") and "JSON cannot carry" in answer["error"]


def test_invocations_names_a_model_in_utf_8(address, disk):
    # A header's bytes are read as latin-1: a UTF-8 name was not found.
    assert add(address, "é-名", disk["m1"])[0] == 200
    x = x_for(6)
    status, answer = call(address, "POST", "/invocations", x.tolist(),
                          headers={TARGET: "é-名".encode()})
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"]["y"], reference(1, x), **TOL)


def header_call(address, path: str, head: bytes, method: str = "POST") -> tuple[int, Any]:
    """A JSON invoke whose header lines `head` are sent as these bytes
    (http.client sends a str header as latin-1, and no repeats)."""
    body = json.dumps(x_for(8).tolist()).encode()
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
                  % (method.encode(), path.encode(), head, len(body), body))
        s.settimeout(30)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    status, _, rest = raw.partition(b"\r\n\r\n")
    return int(status.split(b" ")[1]), json.loads(rest)


def test_a_target_model_header_that_is_not_utf_8_is_400(address, disk):
    # Read as latin-1 it named another model: byte e9 invoked the model "é"
    # (c3 a9 in UTF-8), where the path's %E9 is no UTF-8 either (400).
    assert add(address, "é", disk["m1"])[0] == 200
    status, answer = header_call(address, "/invocations", b"%s: \xe9\r\n" % TARGET.encode())
    assert status == 400 and "not UTF-8" in answer["error"], answer
    assert header_call(address, "/models/%E9/invoke", b"")[0] == 400  # not UTF-8 either
    for path, head in (("/invocations", b"%s: \xc3\xa9\r\n" % TARGET.encode()),
                       ("/models/%C3%A9/invoke", b"")):
        status, answer = header_call(address, path, head)
        assert status == 200, (path, answer)
    # The header is the name as written, as POST /models took it: no
    # %-decoding, which only the path's syntax needs.
    assert add(address, "a%41", disk["m1"])[0] == 200
    for path, head in (("/invocations", b"%s: a%%41\r\n" % TARGET.encode()),
                       ("/models/a%2541/invoke", b"")):
        assert header_call(address, path, head)[0] == 200, path
    for path, head in (("/invocations", b"%s: aA\r\n" % TARGET.encode()),
                       ("/models/a%41/invoke", b"")):
        assert header_call(address, path, head)[0] == 404, path


def test_a_path_whose_escapes_are_not_utf_8_is_400(address, disk):
    # Decoded with replacement, %E9 named the model "\ufffd": a model so
    # named served an invoke of /models/%E9/invoke.
    assert add(address, "\ufffd", disk["m1"])[0] == 200
    for method, path in (("POST", "/models/%E9/invoke"), ("GET", "/models/%E9"),
                         ("DELETE", "/models/%FF%FE")):
        status, answer = header_call(address, path, b"", method)
        assert status == 400 and "not UTF-8" in answer["error"], (path, answer)
    status, answer = header_call(address, "/models/%EF%BF%BD/invoke", b"")  # its name
    assert status == 200, answer


RUNS_OUT = """
import torch

def load(path, device):
    pass

def predict(inputs):
    if inputs["x"][0, 0] < 0:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return {"y": inputs["x"]}
"""


def test_an_invoke_whose_call_runs_out_of_memory_is_507(server, disk):
    # The contract: "on GPU instances, if InvokeEndpoint fails due to a lack
    # of memory or other resources, this API should return a 507". A
    # resident model's call out of memory was OVERLOADED's 503, which
    # SageMaker retries as it is, to the same full container.
    address = server[0]
    model = handler_model(disk["root"] / "runs-out", RUNS_OUT)
    assert add(address, "runs-out", model)[0] == 200
    for path, headers in (("/models/runs-out/invoke", {}),
                          ("/invocations", {TARGET: "runs-out"})):
        status, _, answer = raw_call(address, path, b'{"inputs": {"x": [[-1.0]]}}', headers)
        assert status == 507, (path, answer)
        assert json.loads(answer)["code"] == "OVERLOADED" and b"out of memory" in answer, answer
        assert call(address, "POST", path, {"inputs": {"x": [[2.0]]}},
                    headers=headers) == (200, {"outputs": {"y": [[2.0]]}}), path
    # Elsewhere it is OVERLOADED as ever: the SDK's class, KServe's 503.
    with Client(server[1]) as c, pytest.raises(Overloaded, match="out of memory"):
        c.infer("runs-out", {"x": np.full((1, 1), -1, np.float32)})
    assert call(address, "DELETE", "/models/runs-out")[0] == 200


def test_a_target_model_header_given_twice_is_400(address, disk):
    # The last line won, unsaid, and chose the model that served, where a
    # proxy in front may have routed (or authorized) by the first.
    assert add(address, "first", disk["m1"])[0] == 200
    assert add(address, "second", disk["m2"])[0] == 200
    head = b"%s: first\r\n%s: second\r\n" % (TARGET.encode(), TARGET.lower().encode())
    status, answer = header_call(address, "/invocations", head)
    assert status == 400, answer
    assert answer["error"].startswith(
        "a request carries one X-Amzn-SageMaker-Target-Model header, not two"), answer
    for name in ("first", "second"):  # once, as ever
        assert header_call(address, "/invocations", b"%s: %s\r\n" % (
            TARGET.encode(), name.encode()))[0] == 200, name


def test_a_target_model_header_names_its_model_without_trailing_white_space(address, disk):
    assert add(address, "spaced", disk["m2"])[0] == 200
    x = x_for(7)
    status, answer = call(address, "POST", "/invocations", x.tolist(),
                          headers={TARGET: "spaced \t"})
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"]["y"], reference(2, x), **TOL)


def handler_model(model: Path, source: str) -> Path:
    """A handler model at `model` (`source`, its handler.py) of one float32
    input "x" of two dimensions, any size."""
    model.mkdir()
    (model / "handler.py").write_text(source)
    (model / "model.toml").write_text('backend = "handler"\n[[inputs]]\nname = "x"\n'
                                      'dtype = "float32"\nshape = [-1, -1]\n')
    return model


FILLS_UP = """
import os

def load(path, device):
    if os.path.exists(os.path.join(path, "full")):
        raise MemoryError("no room for the weights")

def predict(inputs):
    return {"y": inputs["x"]}
"""


def test_an_invoke_whose_model_cannot_be_loaded_again_for_memory_is_507(server, disk):
    # The contract: "on GPU instances, if InvokeEndpoint fails due to a lack
    # of memory or other resources, this API should return a 507", as the
    # load does: SageMaker unloads unused models and tries again. It was a
    # 503, which it retries as it is, to the same full container.
    address = server[0]
    model = handler_model(disk["root"] / "fills-up", FILLS_UP)
    assert add(address, "fills-up", model)[0] == 200
    with Client(server[1]) as c:
        c.unload("fills-up")  # evicted, as room for others would have it
    (model / "full").touch()
    body = {"inputs": {"x": [[1.0]]}}
    # Its load ran out of memory, then (backed off) the same answer at once;
    # a text/csv answer is made on a parse thread, its failure too.
    for path, headers in (("/models/fills-up/invoke", {}), ("/invocations", {TARGET: "fills-up"}),
                          ("/models/fills-up/invoke", {"Content-Type": "text/csv",
                                                       "Accept": "text/csv"})):
        raw = b"1" if headers.get("Content-Type") == "text/csv" else json.dumps(body).encode()
        status, _, answer = raw_call(address, path, raw, headers)
        assert status == 507, (path, answer)
        assert json.loads(answer)["code"] == "OVERLOADED", answer
        assert b"out of memory while loading" in answer, answer
    assert call(address, "GET", "/models/fills-up")[0] == 200  # still loaded: only evicted
    (model / "full").unlink()  # SageMaker made room: the next try past the back-off loads it
    deadline = time.monotonic() + 60
    while (answer := call(address, "POST", "/models/fills-up/invoke", body))[0] != 200:
        assert answer[0] == 507 and time.monotonic() < deadline, answer
        time.sleep(0.2)
    assert answer[1] == {"outputs": {"y": [[1.0]]}}
    assert call(address, "DELETE", "/models/fills-up")[0] == 200


def test_invoke_unknown_model_is_404(address):
    x = x_for(2).tolist()
    assert call(address, "POST", "/models/never-added/invoke", x)[0] == 404
    assert call(address, "POST", "/invocations", x, headers={TARGET: "never-added"})[0] == 404
    assert call(address, "POST", "/models/repo-model/invoke", x)[0] == 404


def test_invoke_refuses_bad_bodies(address, disk):
    assert add(address, "inv-bad", disk["m0"])[0] == 200
    x = x_for(3)
    cases = [
        (b"not json", {}),
        (b"5", {}),
        (b"{}", {}),
        (b'{"inputs": {}}', {}),
        (b'{"inputs": [[1, 2, 3, 4]]}', {}),
        (json.dumps({"inputs": {"z": x.tolist()}}).encode(), {}),       # no such input
        (json.dumps(x[:, :3].tolist()).encode(), {}),                    # wrong shape
        (json.dumps(x[0].tolist()).encode(), {}),                        # wrong rank
        (b"[[1, 2, 3, 4], [1, 2]]", {}),                                 # ragged
        (b'[["a", "b", "c", "d"]]', {}),                                 # not numbers
        (b"[[1, 2, null, 4]]", {}),
        (json.dumps(x.tolist()).encode(), {"Content-Type": "text/csv"}),
    ]
    for raw, headers in cases:
        status, body = call(address, "POST", "/models/inv-bad/invoke", raw=raw, headers=headers)
        assert status == 400, (raw[:40], body)
        assert body["code"] == "BAD_REQUEST"
    status, body = call(address, "POST", "/invocations", x.tolist())  # no header
    assert status == 400 and TARGET in body["error"], body
    # The model still answers after all that.
    status, body = call(address, "POST", "/models/inv-bad/invoke", x.tolist())
    assert status == 200, body


# -- unload -------------------------------------------------------------------------------

def test_delete_unloads_and_forgets(server, disk):
    address = server[0]
    assert add(address, "del", disk["m4"])[0] == 200
    assert residency(server, "del") == "resident"
    assert call(address, "DELETE", "/models/del") == (200, {"modelName": "del"})
    assert residency(server, "del") is None
    assert call(address, "DELETE", "/models/del")[0] == 404
    assert call(address, "GET", "/models/del")[0] == 404
    x = x_for(4)
    assert call(address, "POST", "/models/del/invoke", x.tolist())[0] == 404
    assert call(address, "POST", "/invocations", x.tolist(), headers={TARGET: "del"})[0] == 404
    assert "del" not in {m["modelName"] for m in list_all(address)}
    # Forgotten whole: the name can be loaded again, from another directory.
    assert add(address, "del", disk["m1"])[0] == 200
    status, body = call(address, "POST", "/models/del/invoke", x.tolist())
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"]["y"], reference(1, x), **TOL)
    assert call(address, "DELETE", "/models/del")[0] == 200


def test_delete_unknown_model_is_404(address):
    assert call(address, "DELETE", "/models/never-added")[0] == 404
    assert call(address, "DELETE", "/models/repo-model")[0] == 404


@pytest.mark.parametrize("body", [
    b"1,2,3,4\n5,6,7,8\n",
    b"1.5,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20\n",    # one line of many pieces
    b"1,2,3,4,5,6,7,8,9,10,11,12,13,14 # a note\r\n" * 3,          # and a comment
    b"1,2\n3,4\n" + b"10,20\n" * 9 + b"-1e3,2.5e-3\n",
])
def test_csv_lines_longer_than_a_chunk_read_as_rows(monkeypatch, body):
    """A line longer than CSV_CHUNK is parsed a piece at a time (at once,
    a 16 MiB line held the server's loop for a second): the same rows."""
    expected = np.loadtxt(io.StringIO(body.decode()), delimiter=",", ndmin=2)
    monkeypatch.setattr(sagemaker, "CSV_CHUNK", 16)
    np.testing.assert_array_equal(sagemaker._from_csv(body), expected)


@pytest.mark.parametrize("body, why", [
    (b"1,2,3,4,5,6,7,8,9,10,\n", "rows of numbers"),             # an empty last field
    (b"1,2\n3,4,5,6,7,8,9,10,11,12\n", "rows of numbers"),        # rows of unequal length
    (b"12345678901234567890,1\n", "a field longer than 16"),
])
def test_csv_long_lines_refused_as_short_ones_are(monkeypatch, body, why):
    monkeypatch.setattr(sagemaker, "CSV_CHUNK", 16)
    with pytest.raises(BadRequest, match=why):
        sagemaker._from_csv(body)


SLOW_HANDLER = """
import time

def load(path, device):
    pass

def predict(inputs):
    time.sleep(float(inputs["x"].reshape(-1)[0]))
    return {"y": inputs["x"]}
"""


def test_a_model_added_while_its_delete_runs_is_loaded_after_it(tmp_path, disk):
    # The POST came while the DELETE waited for the model's call in flight:
    # 409, "already loaded", and SageMaker took it as loaded, sending it
    # requests that were each a 404 once the DELETE ended (a review).
    root = tmp_path / "root"
    (root / "slow").mkdir(parents=True)
    started = tmp_path / "started"
    (root / "slow" / "handler.py").write_text(
        SLOW_HANDLER.replace("def predict(inputs):\n",
                             f"def predict(inputs):\n    open({str(started)!r}, 'w').close()\n"))
    proc = Server("--repo", str(disk["repo"]), "--tcp-port", "0", "--http-port", "0",
                  "--workers", "1", env=environ(MMENGINE_MODEL_ROOTS=str(root)))
    try:
        web = proc.wait_for(r"HTTP .* on http://(\S+):(\d+)", 60)
        address = (web[1], int(web[2]))
        assert add(address, "slow", root / "slow")[0] == 200
        results = {}
        invoking = threading.Thread(target=lambda: results.setdefault(
            "invoke", call(address, "POST", "/models/slow/invoke", {"inputs": {"x": [2.0]}})))
        invoking.start()
        deadline = time.monotonic() + 30
        while not started.exists():  # its call runs: the DELETE waits for it
            assert time.monotonic() < deadline
            time.sleep(0.02)
        deleting = threading.Thread(target=lambda: results.setdefault(
            "delete", call(address, "DELETE", "/models/slow")))
        deleting.start()
        while call(address, "GET", "/models/slow")[0] != 404:  # the DELETE is under way
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not results  # (both still wait for the call)
        assert add(address, "slow", root / "slow")[0] == 200
        invoking.join(30)
        deleting.join(30)
        assert results["invoke"][0] == 200 and results["delete"][0] == 200, results
        assert call(address, "GET", "/models/slow")[0] == 200  # loaded, as the 200 said
        status, body = call(address, "POST", "/models/slow/invoke", {"inputs": {"x": [0.0]}})
        assert status == 200, body
        assert proc.stop() == 0
    finally:
        proc.kill()


def test_a_load_asked_of_a_stopping_server_is_503_not_507(tmp_path, disk):
    # 507 tells SageMaker to unload models and try again here; a server
    # that is shutting down has room, and says 503, as its /ping does.
    root = tmp_path / "root"
    (root / "slow").mkdir(parents=True)
    (root / "slow" / "handler.py").write_text(SLOW_HANDLER)
    proc = Server("--repo", str(disk["repo"]), "--tcp-port", "0", "--http-port", "0",
                  "--workers", "1", env=environ(MMENGINE_MODEL_ROOTS=str(root),
                                                MMENGINE_SHUTDOWN_TIMEOUT_S="30"))
    try:
        web = proc.wait_for(r"HTTP .* on http://(\S+):(\d+)", 60)
        address = (web[1], int(web[2]))
        assert add(address, "slow", root / "slow")[0] == 200
        invoke = b'{"inputs": {"x": [2.0]}}'
        load = json.dumps({"model_name": "late", "url": str(root / "slow")}).encode()
        with socket.create_connection(address, timeout=30) as s:
            # Pipelined: the load is taken once the slow call is answered,
            # after the stop began (its connection, busy, stays open).
            s.sendall(b"POST /models/slow/invoke HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                      b"POST /models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(invoke), invoke, len(load), load))
            time.sleep(1.0)
            proc.proc.send_signal(signal.SIGTERM)
            s.settimeout(30)
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)
        assert statuses == [b"200", b"503"], raw
        assert b'"code":"OVERLOADED"' in raw.replace(b" ", b""), raw
        assert b"Retry-After" not in raw.partition(b"HTTP/1.1 503")[2], raw  # not here: elsewhere
        assert proc.proc.wait(30) == 0
    finally:
        proc.kill()
