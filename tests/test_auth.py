"""Tokens end to end: `mmengine serve` as a real process with a control token
and a repository whose manifests list token digests, driven through the SDK
(TCP) and raw HTTP (KServe v2 and SageMaker)."""
from __future__ import annotations

import asyncio
import http.client
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import Server, command, environ, run, write_handler
from mmengine import auth, demo
from mmengine.client import AsyncClient, Client
from mmengine.errors import BadRequest, LoadFailed, Unauthorized

DIMS = (4, 8, 2)
CONTROL = "control-secret"
MODEL_TOKEN = "model-secret"
ROTATED = "model-secret-next"   # the second digest of a list: both are accepted
WRONG = "not-the-secret"
TOL = dict(rtol=1e-5, atol=1e-5)
X = np.arange(2 * DIMS[0], dtype=np.float32).reshape(2, DIMS[0]) / 10

# name -> seed. "locked-*" list MODEL_TOKEN and ROTATED; each cold one is
# requested cold by exactly one test, so that it is still on storage there.
SEEDS = {"open": 0, "locked-warm": 1, "locked-cold-tcp": 2, "locked-cold-http": 3,
         "locked-control": 4, "bad-digest": 5, "locked-broken": 6, "locked-badkey": 7,
         "utf8-locked": 8}
UTF8_TOKEN = "clé-€uro"  # an operator's choice: TCP carries it as UTF-8, and so does curl
# Its last byte, a0, read as latin-1 (as HTTP reads a header), is white space to str.strip().
ENDS_IN_A0 = "voilà"


ENV_READER = '''
import os
import numpy as np

def load(path, device):
    pass

def predict(inputs):
    seen = os.environ.get("MMENGINE_CONTROL_TOKEN", "")
    return {"y": np.frombuffer(seen.encode() or b"-", np.uint8).copy()}
'''


def locked(version_dir: Path, digests: str) -> None:
    # Top-level keys before the manifest's tables, as TOML requires.
    manifest = version_dir / "model.toml"
    manifest.write_text(f"token_sha256 = {digests}\n" + manifest.read_text())


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("auth")
    repo, roots = base / "repo", base / "roots"
    both = json.dumps([auth.digest(MODEL_TOKEN).hex(), auth.digest(ROTATED).hex()])
    for name, seed in SEEDS.items():
        path = demo.write_mlp(repo / name, "safetensors", *DIMS, seed=seed)
        if name.startswith("locked"):
            locked(path, both)
    locked(repo / "bad-digest" / "1", '"not a digest"')
    # (MODEL_TOKEN too: `mmengine bench` below opens every model with it)
    locked(repo / "utf8-locked" / "1", json.dumps([auth.digest(UTF8_TOKEN).hex(),
                                                   auth.digest(ENDS_IN_A0).hex(),
                                                   auth.digest(MODEL_TOKEN).hex()]))
    # Its header cannot be read: the model cannot even be described.
    (repo / "locked-broken" / "1" / "model.safetensors").write_bytes(b"\xff" * 64)
    manifest = repo / "locked-badkey" / "1" / "model.toml"  # a key no manifest has
    manifest.write_text(manifest.read_text().replace("token_sha256", "colour = 1\ntoken_sha256", 1))
    # Model code: what it can read of the server's secrets.
    write_handler(repo, "env-reader", ENV_READER)
    demo.write_mlp(roots / "sm-open", "safetensors", *DIMS, seed=0)
    locked(demo.write_mlp(roots / "sm-locked", "safetensors", *DIMS, seed=1),
           f'"{auth.digest(MODEL_TOKEN).hex()}"')
    return {"repo": repo, "roots": roots}


@pytest.fixture(scope="module")
def server(request, disk) -> dict[str, tuple[str, int]]:
    proc = Server("--repo", str(disk["repo"]), "--workers", "1", "--tcp-port", "0",
                  "--http-port", "0", "--device-budget", "64MiB",
                  env=environ(MMENGINE_CONTROL_TOKEN=CONTROL,
                              MMENGINE_MODEL_ROOTS=str(disk["roots"])))
    request.addfinalizer(lambda: proc.proc.poll() is None and proc.stop())
    tcp = proc.wait_for(r"serving .* on tcp://(\S+):(\d+)", 60)
    web = proc.wait_for(r"HTTP .* on http://(\S+):(\d+)", 10)
    return {"tcp": (tcp[1], int(tcp[2])), "http": (web[1], int(web[2]))}


def reference(name: str, x: np.ndarray = X) -> np.ndarray:
    return demo.reference(x, *DIMS, seed=SEEDS[name])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(address, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """One request on a fresh connection (`body` as JSON, or `raw` bytes):
    (status, headers, JSON body or None)."""
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        data = raw if raw is not None else None if body is None else json.dumps(body)
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        payload = r.read()
        return r.status, dict(r.getheaders()), json.loads(payload) if payload else None
    finally:
        conn.close()


def kserve_infer(address, name: str, headers=None):
    body = {"inputs": [{"name": "x", "shape": list(X.shape), "datatype": "FP32",
                        "data": X.ravel().tolist()}]}
    return call(address, "POST", f"/v2/models/{name}/infer", body, headers)


def raw_infer(address, name: str, headers: dict):
    """A raw binary infer (the body the input's bytes alone)."""
    return call(address, "POST", f"/v2/models/{name}/infer", headers=headers, raw=X.tobytes())


def assert_401(answer) -> None:
    status, headers, body = answer
    assert status == 401, answer
    assert headers.get("WWW-Authenticate") == "Bearer", headers
    assert body["code"] == "UNAUTHORIZED"


def state(tcp, name: str) -> str:
    with Client(tcp) as c:
        return next(r["state"] for r in c.list() if r["name"] == name)


# -- infer: the model's tokens ------------------------------------------------------

def test_why_a_protected_model_cannot_be_served_is_told_only_to_its_callers(server):
    # Its error names its files; a caller without its token learns nothing
    # more than that it needs one, before the failure and during its back-off.
    with Client(server["tcp"]) as c:
        for _ in range(2):
            with pytest.raises(Unauthorized, match="needs a token"):
                c.infer("locked-broken", {"x": X})
        with pytest.raises(Unauthorized, match="not valid"):
            c.infer("locked-broken", {"x": X}, token=WRONG)
        for _ in range(2):  # the failure, then its back-off
            with pytest.raises(LoadFailed, match="safetensors"):
                c.infer("locked-broken", {"x": X}, token=MODEL_TOKEN)
        with pytest.raises(Unauthorized, match="needs a token"):
            c.infer("locked-broken", {"x": X})
    assert_401(kserve_infer(server["http"], "locked-broken"))
    # Triton's raw binary request looked the model up first: its failure,
    # naming the file, went to a caller without the token (a review).
    raw = {"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"}
    assert_401(raw_infer(server["http"], "locked-broken", raw))
    status, _, body = raw_infer(server["http"], "locked-broken", {**raw, **bearer(MODEL_TOKEN)})
    assert status == 500 and body["code"] == "LOAD_FAILED", body
    with Client(server["tcp"]) as c:  # a manifest that cannot be read, but for its tokens
        with pytest.raises(Unauthorized, match="needs a token"):
            c.infer("locked-badkey", {"x": X})
        with pytest.raises(LoadFailed, match="unknown key 'colour'"):
            c.infer("locked-badkey", {"x": X}, token=ROTATED)


@pytest.mark.parametrize("name", ["locked-cold-tcp", "locked-warm"])
def test_tcp_infer_needs_one_of_the_models_tokens(server, name):
    tcp = server["tcp"]
    if name == "locked-warm":
        with Client(tcp, token=CONTROL) as c:
            c.load(name)
    expected = "resident" if name == "locked-warm" else "on storage"
    assert state(tcp, name) == expected
    with Client(tcp) as c:
        with pytest.raises(Unauthorized, match="needs a token"):
            c.infer(name, {"x": X})
        with pytest.raises(Unauthorized, match="not valid"):
            c.infer(name, {"x": X}, token=WRONG)
        # The control token is not a model token.
        with pytest.raises(Unauthorized):
            c.infer(name, {"x": X}, token=CONTROL)
        # A refused request neither loads nor runs the model.
        assert state(tcp, name) == expected
        for token in (MODEL_TOKEN, ROTATED):
            np.testing.assert_allclose(c.infer(name, {"x": X}, token=token)["y"],
                                       reference(name), **TOL)
    # A client's token goes with every request; a call's own token wins.
    with Client(tcp, token=MODEL_TOKEN) as c:
        np.testing.assert_allclose(c.infer(name, {"x": X})["y"], reference(name), **TOL)
    with Client(tcp, token=WRONG) as c:
        np.testing.assert_allclose(c.infer(name, {"x": X}, token=ROTATED)["y"],
                                   reference(name), **TOL)
        with pytest.raises(Unauthorized):
            c.infer(name, {"x": X})


def test_async_client_sends_its_token(server):
    async def main():
        async with AsyncClient(server["tcp"], token=MODEL_TOKEN) as c:
            out = await c.infer("locked-warm", {"x": X})
            with pytest.raises(Unauthorized):
                await c.infer("locked-warm", {"x": X}, token=WRONG)
        return out

    np.testing.assert_allclose(run(main())["y"], reference("locked-warm"), **TOL)


@pytest.mark.parametrize("name", ["locked-cold-http", "locked-warm"])
def test_kserve_infer_needs_one_of_the_models_tokens(server, name):
    tcp, web = server["tcp"], server["http"]
    if name == "locked-warm":
        with Client(tcp, token=CONTROL) as c:
            c.load(name)
    expected = "resident" if name == "locked-warm" else "on storage"
    assert_401(kserve_infer(web, name))
    assert_401(kserve_infer(web, name, bearer(WRONG)))
    # Another scheme is no token at all.
    assert_401(kserve_infer(web, name, {"Authorization": f"Basic {MODEL_TOKEN}"}))
    assert state(tcp, name) == expected
    # The scheme is case-insensitive.
    for headers in (bearer(MODEL_TOKEN), {"Authorization": f"bearer {ROTATED}"}):
        status, _, body = kserve_infer(web, name, headers)
        assert status == 200, body
        np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(2, -1),
                                   reference(name), **TOL)


def test_a_model_without_token_sha256_is_open(server):
    with Client(server["tcp"]) as c:
        np.testing.assert_allclose(c.infer("open", {"x": X})["y"], reference("open"), **TOL)
        # A token where none is needed is ignored, not refused.
        np.testing.assert_allclose(c.infer("open", {"x": X}, token=WRONG)["y"],
                                   reference("open"), **TOL)
    for headers in (None, bearer(WRONG)):
        status, _, body = kserve_infer(server["http"], "open", headers)
        assert status == 200, body


def test_a_token_that_is_not_a_string_is_a_bad_request(server):
    with Client(server["tcp"]) as c:
        with pytest.raises(BadRequest, match="'token' must be a string"):
            c.call({"op": "infer", "model": "open", "token": 7,
                    "inputs": {"x": {"dtype": "float32", "shape": [1, 4],
                                     "data": bytes(16)}}})
        with pytest.raises(BadRequest, match="'token' must be a string"):
            c.call({"op": "load", "model": "open", "token": b"bytes"})


def test_a_bad_token_sha256_is_load_failed_naming_the_key(server):
    with Client(server["tcp"], token=MODEL_TOKEN) as c:
        with pytest.raises(LoadFailed, match="token_sha256"):
            c.infer("bad-digest", {"x": X})
    status, _, body = kserve_infer(server["http"], "bad-digest", bearer(MODEL_TOKEN))
    assert (status, body["code"]) == (500, "LOAD_FAILED")
    assert "token_sha256" in body["error"]
    # The rest of the repository is untouched by it.
    with Client(server["tcp"]) as c:
        np.testing.assert_allclose(c.infer("open", {"x": X})["y"], reference("open"), **TOL)


# -- control operations: the control token ---------------------------------------------

def test_tcp_control_ops_need_the_control_token(server):
    tcp, name = server["tcp"], "locked-control"
    with Client(tcp) as c:
        for token in (None, WRONG, MODEL_TOKEN):
            for op in (c.load, c.pin, c.unpin, c.unload):
                with pytest.raises(Unauthorized, match="^a control operation"):
                    op(name, token=token)
        assert state(tcp, name) == "on storage"
        # Reading needs no token.
        assert c.health()["status"] == "serving"
        assert any(r["name"] == name for r in c.list())
        assert "totals" in c.stats()
    with Client(tcp, token=CONTROL) as c:
        assert c.pin(name)["pinned"] is True
        c.unpin(name)
        assert c.load(name)["state"] == "resident"
        c.unload(name)
    assert state(tcp, name) == "on storage"


def test_kserve_repository_load_and_unload_need_the_control_token(server):
    web, name = server["http"], "locked-control"
    for headers in (None, bearer(WRONG), bearer(MODEL_TOKEN)):
        assert_401(call(web, "POST", f"/v2/repository/models/{name}/load", headers=headers))
        assert_401(call(web, "POST", f"/v2/repository/models/{name}/unload",
                        headers=headers))
    assert state(server["tcp"], name) == "on storage"
    status, _, index = call(web, "POST", "/v2/repository/index")  # reading: open
    assert status == 200 and any(r["name"] == name for r in index)
    assert call(web, "POST", f"/v2/repository/models/{name}/load",
                headers=bearer(CONTROL))[0] == 200
    assert state(server["tcp"], name) == "resident"
    assert call(web, "POST", f"/v2/repository/models/{name}/unload",
                headers=bearer(CONTROL))[0] == 200
    assert state(server["tcp"], name) == "on storage"


def test_sagemaker_add_and_delete_need_the_control_token(server, disk):
    web = server["http"]
    add = {"model_name": "sm-open", "url": str(disk["roots"] / "sm-open" / "1")}
    for headers in (None, bearer(WRONG)):
        assert_401(call(web, "POST", "/models", add, headers))
    assert call(web, "GET", "/models")[2] == {"models": []}
    assert call(web, "POST", "/models", add, bearer(CONTROL))[0] == 200
    locked_add = {"model_name": "sm-locked",
                  "url": str(disk["roots"] / "sm-locked" / "1")}
    assert call(web, "POST", "/models", locked_add, bearer(CONTROL))[0] == 200

    body = {"inputs": {"x": X.tolist()}}
    status, _, out = call(web, "POST", "/models/sm-open/invoke", body)
    assert status == 200, out
    np.testing.assert_allclose(out["outputs"]["y"], reference("open"), **TOL)
    assert_401(call(web, "POST", "/models/sm-locked/invoke", body))
    assert_401(call(web, "POST", "/invocations", body,
                    {"X-Amzn-SageMaker-Target-Model": "sm-locked", **bearer(WRONG)}))
    status, _, out = call(web, "POST", "/invocations", body,
                          {"X-Amzn-SageMaker-Target-Model": "sm-locked",
                           **bearer(MODEL_TOKEN)})
    assert status == 200, out
    np.testing.assert_allclose(out["outputs"]["y"], reference("locked-warm"), **TOL)

    for name in ("sm-open", "sm-locked"):
        assert_401(call(web, "DELETE", f"/models/{name}", headers=bearer(MODEL_TOKEN)))
        assert call(web, "GET", f"/models/{name}")[0] == 200  # still added
        assert call(web, "DELETE", f"/models/{name}", headers=bearer(CONTROL))[0] == 200
    assert call(web, "GET", "/models")[2] == {"models": []}


# -- floods -------------------------------------------------------------------------

FLOOD = 600  # unauthorized requests per protocol; bounded, and enough to matter


def test_the_server_keeps_serving_through_unauthorized_floods(server):
    """Pipelined unauthorized requests on TCP and keep-alive ones on HTTP,
    while another client's requests keep getting right answers."""
    tcp, web = server["tcp"], server["http"]

    def http_flood() -> list[int]:
        infer = json.dumps({"inputs": [{"name": "x", "shape": list(X.shape),
                                        "datatype": "FP32", "data": X.ravel().tolist()}]})
        conn = http.client.HTTPConnection(*web, timeout=30)
        statuses = []
        try:
            for i in range(FLOOD // 3):
                path, body = (("/v2/repository/models/open/load", "{}") if i % 2
                              else ("/v2/models/locked-warm/infer", infer))
                conn.request("POST", path, body=body, headers=bearer(WRONG))
                r = conn.getresponse()
                r.read()
                statuses.append(r.status)
        finally:
            conn.close()
        return statuses

    async def main():
        loop = asyncio.get_running_loop()
        http_task = loop.run_in_executor(None, http_flood)
        async with AsyncClient(tcp, connections=2, token=WRONG) as bad, \
                AsyncClient(tcp) as good:
            floods = [bad.infer("locked-warm", {"x": X}) if i % 2
                      else bad.load("open") for i in range(FLOOD)]
            honest = [good.infer("open", {"x": X}) for _ in range(20)]
            results = await asyncio.gather(*floods, *honest, return_exceptions=True)
            statuses = await http_task
            after = await good.infer("locked-warm", {"x": X}, token=MODEL_TOKEN)
            health = await good.health()
        return results, statuses, after, health

    results, statuses, after, health = run(main(), timeout=120)
    refused, answered = results[:FLOOD], results[FLOOD:]
    assert all(isinstance(r, Unauthorized) for r in refused), \
        {type(r).__name__ for r in refused}
    for r in answered:
        assert isinstance(r, dict), r
        np.testing.assert_allclose(r["y"], reference("open"), **TOL)
    assert statuses == [401] * (FLOOD // 3)
    np.testing.assert_allclose(after["y"], reference("locked-warm"), **TOL)
    assert health["status"] == "serving"


# -- the command line and the configuration -----------------------------------------

def test_mmengine_token_prints_a_token_and_its_manifest_line():
    out = subprocess.run(command("token"), capture_output=True, text=True, env=environ(),
                         timeout=60, check=True).stdout.splitlines()
    assert len(out) == 2, out
    token, line = out
    assert len(token) >= 32
    assert line == f'token_sha256 = "{auth.digest(token).hex()}"'
    # `python -m mmengine` is the same command.
    again = subprocess.run([sys.executable, "-m", "mmengine", "token"], capture_output=True,
                           text=True, env=environ(), timeout=60, check=True).stdout.splitlines()[0]
    assert again != token


def test_mmengine_bench_sends_its_token_read_from_stdin(server):
    host, port = server["tcp"]

    def bench(*token_args: str, failed: bool, stdin: str = "") -> str:
        done = subprocess.run(
            command("bench", "--url", f"{host}:{port}", "--zipf", "0", "--requests", "24",
                    "--concurrency", "2", "--timeout", "20", *token_args),
            input=stdin, capture_output=True, text=True, env=environ(), timeout=120)
        assert done.returncode == int(failed), done.stderr  # 1: requests failed
        return done.stdout

    # Every model of the list that declares its inputs is asked for: the
    # locked ones answer only with the token.
    assert re.search(r"errors Unauthorized\s+\d+", bench(failed=True))
    assert "Unauthorized" not in bench("--token", "-", failed=False, stdin=MODEL_TOKEN + "\n")


def test_the_control_token_stays_out_of_the_configurations_repr():
    from mmengine.config import ConfigError, load

    config = load(env={"MMENGINE_CONTROL_TOKEN": CONTROL})
    assert config.control_token == CONTROL
    assert CONTROL not in repr(config)
    # Nor in the message that refuses a value of the wrong kind.
    with pytest.raises(ConfigError, match="control_token: its value is not a valid str") as e:
        load(env={}, overrides={"control_token": 987654321987654321})
    assert "987654321987654321" not in str(e.value)
    # Nor in the one that refuses a token read with its file's newline.
    with pytest.raises(ConfigError, match="control_token: its value has white space") as e:
        load(env={"MMENGINE_CONTROL_TOKEN": CONTROL + "\n"})
    assert CONTROL not in str(e.value)


@pytest.mark.parametrize("token", [UTF8_TOKEN, ENDS_IN_A0])
def test_a_token_that_is_no_ascii_opens_its_model_on_every_protocol(server, token):
    # HTTP read the header's UTF-8 bytes as latin-1 and hashed that: such a
    # token worked over TCP and never over HTTP (a review's finding). Then
    # its strip() cut a last byte 0x85 or 0xa0 off.
    with Client(server["tcp"], token=token) as c:
        assert c.infer("utf8-locked", {"x": X})["y"].shape == (2, DIMS[2])
    status, _, body = kserve_infer(server["http"], "utf8-locked",
                                   {"Authorization": b"Bearer " + token.encode()})
    assert status == 200, body
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(2, DIMS[2]),
                               reference("utf8-locked"), **TOL)
    assert_401(kserve_infer(server["http"], "utf8-locked",
                            {"Authorization": b"Bearer " + UTF8_TOKEN.encode("latin-1",
                                                                             "replace")}))


@pytest.mark.parametrize("token", ["a\nb", "a\x00b", "a\x7fb"])
def test_a_control_token_no_header_can_carry_is_refused(token):
    from mmengine.config import ConfigError, load

    with pytest.raises(ConfigError, match="control_token: its value has a control character"):
        load(env={"MMENGINE_CONTROL_TOKEN": token})


@pytest.mark.parametrize("token", ["a\u00a0b", "a\tb", "a\u200db", "a\x85b", "ab\u00a0"])
def test_a_control_token_a_header_can_carry_is_taken(token):
    # str.isprintable() refused these too, which HTTP carries as any byte
    # of a UTF-8 character, and a tab as itself.
    from mmengine.config import load

    assert load(env={"MMENGINE_CONTROL_TOKEN": token}).control_token == token


def test_a_variable_is_read_by_its_one_spelling_only(capsys):
    # MMENGINE_control_token was the control token too, but the workers'
    # environment was scrubbed of MMENGINE_CONTROL_TOKEN alone: every
    # model's code could read it (a review's finding).
    from mmengine.config import load

    config = load(env={"MMENGINE_control_token": CONTROL})
    assert not config.control_token
    assert "MMENGINE_control_token is no configuration key; ignored" in capsys.readouterr().err
    assert load(env={"MMENGINE_CONTROL_TOKEN": CONTROL}).control_token == CONTROL


def test_a_number_past_any_float_is_refused_naming_its_key():
    # 1 and 400 zeros went through float(): an OverflowError's traceback.
    from mmengine.config import ConfigError, load

    with pytest.raises(ConfigError, match="request_timeout_s: .* is not a valid float"):
        load(env={}, overrides={"request_timeout_s": 10 ** 400})


def test_model_code_cannot_read_the_control_token(server):
    # Set as a variable (the documented way), it was in every worker's
    # environment: any model's code could read it, then load, unload and
    # pin whatever it liked.
    with Client(server["tcp"]) as c:
        seen = c.infer("env-reader", {"x": np.ones(1, np.float32)})["y"]
    assert bytes(seen) == b"-", bytes(seen)
