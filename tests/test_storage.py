"""The model repository: layout, detection, manifests, names and versions."""
from __future__ import annotations

import collections
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from mmengine import demo
from mmengine.backends.safetensors import save_file
from mmengine.errors import LoadFailed, MMEngineError, ModelNotFound
from mmengine.storage import ModelSpec, Repository, TensorSpec, check_name


def make_version(root: Path, name: str, version: int, files: dict[str, str | bytes]) -> Path:
    path = root / name / str(version)
    path.mkdir(parents=True, exist_ok=True)
    for file, content in files.items():
        if file == "model.safetensors":
            save_file({"w": torch.zeros(3, 5)}, path / file)
        elif isinstance(content, bytes):
            (path / file).parent.mkdir(exist_ok=True)
            (path / file).write_bytes(content)
        else:
            (path / file).write_text(content)
    return path


ALL = ("handler.py", "model.pt2", "model.safetensors", "model.py", "model.pt",
       "model.jit", "model.onnx", "notes.txt")


@pytest.mark.parametrize("files, backend, artifact", [
    (ALL, "handler", "handler.py"),
    (ALL[1:], "export", "model.pt2"),
    (ALL[2:], "safetensors", "model.safetensors"),
    (("model.safetensors", "model.pt", "notes.txt"), "torchscript", "model.pt"),
    (("model.py", "model.jit", "model.onnx"), "torchscript", "model.jit"),
    (("model.onnx", "notes.txt"), "onnx", "model.onnx"),
])
def test_detection_order_first_match_wins(tmp_path, files, backend, artifact):
    make_version(tmp_path, "m", 1, {f: "" for f in files})
    spec = Repository(tmp_path).resolve("m")
    assert (spec.backend, spec.artifact) == (backend, artifact)
    assert spec.inputs == () and spec.trusted is False and spec.options == {}


def test_no_model_file_is_load_failed(tmp_path):
    make_version(tmp_path, "m", 1, {"notes.txt": "", "model.py": ""})
    with pytest.raises(LoadFailed, match="no model file"):
        Repository(tmp_path).resolve("m")


def test_manifest_names_the_backend(tmp_path):
    make_version(tmp_path, "m", 1, {"handler.py": "", "model.pt": "",
                                    "model.toml": 'backend = "torchscript"'})
    make_version(tmp_path, "n", 1, {"model.pt": "", "model.toml": 'backend = "export"'})
    repo = Repository(tmp_path)
    assert repo.resolve("m").backend == "torchscript"
    with pytest.raises(LoadFailed, match="model.pt2"):
        repo.resolve("n")


FULL_MANIFEST = """
backend = "safetensors"
bytes = 1234
device = "cpu"
trusted = true
warmup = true
[[inputs]]
name = "x"
dtype = "float32"
shape = [-1, 4]
[[inputs]]
name = "mask"
dtype = "bool"
shape = [3]
[[outputs]]
name = "y"
dtype = "float64"
shape = [-1]
[options]
module = "Net"
[options.module_kwargs]
width = 4
"""


def test_manifest_fields(tmp_path):
    make_version(tmp_path, "m", 1, {"model.safetensors": "", "model.py": "",
                                    "model.toml": FULL_MANIFEST})
    spec = Repository(tmp_path).resolve("m")
    assert spec == ModelSpec(
        name="m", version=1, path=tmp_path / "m" / "1", backend="safetensors",
        artifact="model.safetensors", estimated_bytes=1234,
        inputs=(TensorSpec("x", "float32", (-1, 4)), TensorSpec("mask", "bool", (3,))),
        outputs=(TensorSpec("y", "float64", (-1,)),), device="cpu", trusted=True,
        warmup=(("x", (1, 4)), ("mask", (3,))),
        options={"module": "Net", "module_kwargs": {"width": 4}})
    hash(spec)


def test_warmup_table_gives_concrete_shapes(tmp_path):
    manifest = ('warmup = {x = [8, 4]}\n'
                '[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, 4]\n')
    make_version(tmp_path, "m", 1, {"model.pt": "", "model.toml": manifest})
    assert Repository(tmp_path).resolve("m").warmup == (("x", (8, 4)),)


X = '[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, 4]\n'


@pytest.mark.parametrize("manifest, bad", [
    ("colour = 1", "colour"),
    ('backend = "tensorflow"', "backend"),
    ('bytes = "many"', "bytes"),
    ("bytes = true", "bytes"),
    ("bytes = -1", "bytes"),
    ('device = "tpu"', "device"),
    ("trusted = 1", "trusted"),
    ("options = 3", "options"),
    ("inputs = 3", "inputs"),
    ('[[inputs]]\nname = "x"\nshape = [1]\n', "inputs[0]"),
    ('[[inputs]]\nname = "x"\ndtype = "float8"\nshape = [1]\n', "inputs[0].dtype"),
    ('[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-2]\n', "inputs[0].shape"),
    # tomllib reads any int; the list op could not carry this one.
    (f'[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, {2 ** 63}]\n',
     "inputs[0].shape"),
    ('[[outputs]]\nname = ""\ndtype = "float32"\nshape = [1]\n', "outputs[0].name"),
    (X + X, "inputs"),
    ("warmup = true", "warmup"),
    ("warmup = {x = [0, 5]}\n" + X, "warmup.x"),
    ("warmup = {y = [1, 4]}\n" + X, "warmup"),
    ("backend = ", "model.toml"),
    ('[[inputs]]\nname = "x"\ndtype = ["float32"]\nshape = [1]\n', "inputs[0].dtype"),
    ("a = " + "[" * 5000 + "]" * 5000, "cannot be read"),  # tomllib's RecursionError
])
def test_bad_manifest_names_the_key(tmp_path, manifest, bad):
    make_version(tmp_path, "m", 1, {"model.pt": "", "model.toml": manifest})
    with pytest.raises(LoadFailed, match="model.toml") as raised:
        Repository(tmp_path).resolve("m")
    assert bad in str(raised.value)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../etc", ".hidden", "", "a\\b",
                                  "nul\x00", "x" * 256, "\u00e9" * 128, None, 3])
def test_invalid_names_are_model_not_found(tmp_path, name):
    (tmp_path / ".hidden" / "1").mkdir(parents=True)
    with pytest.raises(ModelNotFound):
        check_name(name)
    with pytest.raises(ModelNotFound):
        Repository(tmp_path).resolve(name)


def test_unknown_name_is_model_not_found(tmp_path):
    (tmp_path / "empty").mkdir()
    repo = Repository(tmp_path)
    for name in ("nope", "empty"):
        with pytest.raises(ModelNotFound):
            repo.resolve(name)
    with pytest.raises(ModelNotFound):
        Repository(tmp_path / "missing-root").resolve("nope")


def test_names_lists_valid_model_directories(tmp_path):
    for name in ("b", "a.v2", ".hidden"):
        make_version(tmp_path, name, 1, {"model.pt": ""})
    # A name whose bytes are no UTF-8: no client can name it, and a listing
    # that held it could not be sent (the TCP list op answered INTERNAL).
    undecodable = os.fsdecode(b"caf\xe9")
    make_version(tmp_path, undecodable, 1, {"model.pt": ""})
    with pytest.raises(ModelNotFound):
        check_name(undecodable)
    (tmp_path / "file.txt").write_text("")
    assert Repository(tmp_path).names() == ("a.v2", "b")
    assert Repository(tmp_path / "missing").names() == ()


def test_an_unreadable_model_directory_fails_that_model_only(tmp_path, monkeypatch):
    # Its PermissionError failed every rescan (so no model was added or
    # removed any more) and the TCP list, and its requests were INTERNAL.
    # (Root reads any directory: its refusal is made here.)
    for name in ("a", "b"):
        make_version(tmp_path, name, 1, {"model.pt": ""})
    scandir = os.scandir

    def refusing(path):
        if Path(path) == tmp_path / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    repo = Repository(tmp_path)
    assert repo.names() == ("a", "b")
    monkeypatch.setattr(os, "scandir", refusing)
    make_version(tmp_path, "c", 1, {"model.pt": ""})
    assert repo.rescan() >= {"c"}
    assert repo.names() == ("a", "b", "c") and repo.versions("c") == (1,)
    with pytest.raises(LoadFailed, match=r"directory 'b' cannot be read \(Permission denied\)"):
        repo.resolve("b")
    assert repo.resolve("a").version == 1


def test_highest_version_is_the_default(tmp_path):
    for version in (0, 1, 2, 10):  # 0 is no version: the engine refuses it as one
        make_version(tmp_path, "m", version, {"model.pt": ""})
    for junk in ("latest", "03", "-1"):
        (tmp_path / "m" / junk).mkdir()
    repo = Repository(tmp_path)
    assert repo.versions("m") == (1, 2, 10)
    assert repo.resolve("m").version == 10
    assert repo.resolve("m", 2).path == tmp_path / "m" / "2"
    assert repo.resolve("m", "1").version == 1
    for version in (3, -1, 0, "0", "01", "3", "x", True, 2.0):
        with pytest.raises(ModelNotFound):
            repo.resolve("m", version)


def test_scan_is_cached_until_rescan(tmp_path):
    make_version(tmp_path, "m", 1, {"model.pt": ""})
    make_version(tmp_path, "gone", 1, {"model.pt": ""})
    repo = Repository(tmp_path)
    assert repo.resolve("m").version == 1
    assert repo.resolve("gone").version == 1
    assert repo.names() == ("gone", "m")
    make_version(tmp_path, "m", 2, {"model.pt": ""})
    make_version(tmp_path, "new", 1, {"model.pt": ""})
    (tmp_path / "gone" / "1" / "model.pt").unlink()
    (tmp_path / "gone" / "1").rmdir()
    (tmp_path / "gone").rmdir()
    assert repo.resolve("m").version == 1
    assert repo.resolve("new").version == 1  # a name never seen is looked up at once
    assert repo.names() == ("gone", "m")
    assert repo.rescan() == {"m", "new", "gone"}  # what changed: the engine forgets them
    assert repo.resolve("m").version == 2
    assert repo.names() == ("m", "new")
    with pytest.raises(ModelNotFound):
        repo.resolve("gone")
    assert repo.rescan() == set()


def test_a_scan_changes_nothing_until_it_is_taken(tmp_path):
    # The engine scans in a thread and takes the scan on its loop, in the
    # step that forgets what it read of the changed names.
    make_version(tmp_path, "m", 1, {"model.pt": ""})
    repo = Repository(tmp_path)
    assert repo.resolve("m").version == 1
    make_version(tmp_path, "m", 2, {"model.pt": ""})
    scan = repo.scan()
    assert scan.versions["m"] == (1, 2)
    assert repo.versions("m") == (1,) and repo.resolve("m").version == 1
    assert repo.take(scan) == {"m"}
    assert repo.versions("m") == (1, 2) and repo.resolve("m").version == 2
    assert repo.take(repo.scan()) == set()


def test_a_look_at_the_disk_during_a_scan_is_not_undone_by_taking_it(tmp_path):
    # A scan is read in one thread while requests look at the disk in
    # others; taken whole, it put back what it had read before them.
    root = tmp_path / "repo"
    for name in ("m", "r"):
        make_version(root, name, 1, {"model.pt": ""})
    make_version(root, "r", 2, {"model.pt": ""})
    repo = Repository(root)
    assert repo.versions("m") == (1,) and repo.versions("r") == (1, 2)
    scan = repo.scan()
    make_version(root, "m", 2, {"model.pt": ""})  # published, and asked for by number
    assert repo.check_version("m", 2) == 2
    shutil.rmtree(root / "r" / "2")  # rolled back, and found gone by a failed load
    assert not repo.look_again("r", 2)
    assert repo.take(scan) == {"m"}  # ("r": its failed load forgot what was read of it)
    assert repo.listed("m", 2) and repo.versions("m") == (1, 2)  # its pin stays
    assert repo.resolve("m").version == 2
    assert not repo.listed("r", 2) and repo.versions("r") == (1,)
    # A model added at run time while a scan read the root, and removed.
    added = make_version(tmp_path, "added", 1, {"model.pt": ""})
    scan = repo.scan()
    repo.add("x", added)
    repo.take(scan)
    assert repo.listed("x", 1) and not repo.gone("x") and "x" in repo.names()
    scan = repo.scan()
    repo.remove("x")
    repo.take(scan)
    assert "x" not in repo.names()
    assert repo.take(repo.scan()) == set()


def test_a_look_that_read_the_disk_before_a_scan_was_taken_keeps_the_scan(tmp_path):
    make_version(tmp_path, "m", 1, {"model.pt": ""})
    repo = Repository(tmp_path)
    read = repo._scan_versions

    def read_then_a_scan_is_taken(name):  # the look's thread loses the CPU after its read
        found = read(name)
        repo._scan_versions = read
        make_version(tmp_path, "m", 2, {"model.pt": ""})
        repo.take(repo.scan())
        return found

    repo._scan_versions = read_then_a_scan_is_taken
    assert repo.versions("m") == (1,)  # what it read
    assert repo.listed("m", 2) and repo.resolve("m").version == 2  # what the scan read after
    assert repo.take(repo.scan()) == set()


def test_estimated_bytes(tmp_path):
    make_version(tmp_path, "declared", 1, {"model.pt": "x" * 100, "model.toml": "bytes = 7"})
    make_version(tmp_path, "files", 1, {"model.pt": "x" * 100, "extra/more.bin": b"y" * 50})
    path = demo.write_mlp(tmp_path / "st", "safetensors", 4, 8, 2)
    repo = Repository(tmp_path)
    assert repo.resolve("declared").estimated_bytes == 7
    assert repo.resolve("files").estimated_bytes == 150
    params = (4 * 8 + 8 + 8 * 2 + 2) * 4
    assert repo.resolve("st").estimated_bytes == params
    assert (path / "model.safetensors").stat().st_size > params


def safetensors_with(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


@pytest.mark.parametrize("data", [
    b"\xff" * 64,
    safetensors_with(b"[" * 100000),  # json's RecursionError
    safetensors_with(b'{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}')
    + bytes(4),
])
def test_corrupt_safetensors_header_fails_at_resolve(tmp_path, data):
    make_version(tmp_path, "m", 1, {"model.py": ""})
    (tmp_path / "m" / "1" / "model.safetensors").write_bytes(data)
    with pytest.raises(LoadFailed, match="not a valid safetensors file"):
        Repository(tmp_path).resolve("m")


def test_a_worker_keeps_parsed_manifests_and_reads_everything_else_again(tmp_path):
    """Manifests: a manifest's parse is kept by its bytes, each reader gets
    its own copy; any change to the files shows in the next spec."""
    from mmengine.storage import Manifests, read_spec

    demo.write_mlp(tmp_path / "m", "safetensors", 8, 4, 2, seed=0)
    path = tmp_path / "m" / "1"
    manifests = Manifests()
    first = read_spec("m", 1, path, manifests=manifests)
    assert first == read_spec("m", 1, path)
    # A worker is told the size the front-end's spec gives; the files are not asked.
    assert read_spec("m", 1, path, estimate=7).estimated_bytes == 7 != first.estimated_bytes
    first.options["module_kwargs"]["hidden"] = 99  # a reader's copy, not the kept parse
    assert read_spec("m", 1, path, manifests=manifests).options["module_kwargs"]["hidden"] == 4
    manifest = (path / "model.toml").read_text()
    # The same size, written within the same tick: seen, since the bytes differ.
    (path / "model.toml").write_text(manifest.replace("hidden = 4", "hidden = 5"))
    assert read_spec("m", 1, path, manifests=manifests).options["module_kwargs"]["hidden"] == 5
    weights = path / "model.safetensors"
    save_file({k: torch.zeros(3) for k in ("a", "b")}, weights)  # rewritten in place
    assert read_spec("m", 1, path, manifests=manifests).estimated_bytes == 24
    (path / "model.toml").unlink()  # the files are read again: no model is left
    (path / "model.py").unlink()
    with pytest.raises(LoadFailed, match="no model file"):
        read_spec("m", 1, path, manifests=manifests)
    (path / "model.toml").write_text("backend = [")
    with pytest.raises(LoadFailed, match="cannot be read"):
        read_spec("m", 1, path, manifests=manifests)


def test_a_page_of_the_listing_is_of_models_not_of_folders(tmp_path):
    """A folder with no version took a place on a page: limit=1 gave an
    empty page before the first model (a review's finding)."""
    (tmp_path / "aaa").mkdir()
    demo.write_mlp(tmp_path / "m00", "safetensors")
    demo.write_mlp(tmp_path / "m01", "safetensors")
    (tmp_path / "m005").mkdir()
    repo = Repository(tmp_path)
    rows, more = repo.listing(limit=1)
    assert [key for key, _ in rows] == [("m00", 1)] and more == "m00"
    rows, more = repo.listing(after=more, limit=1)
    assert [key for key, _ in rows] == [("m01", 1)] and more is None
    with pytest.raises(ValueError):
        repo.listing(limit=0)


def test_a_link_that_cannot_be_followed_fails_no_other_model(tmp_path):
    """DirEntry.is_dir()/is_file() raise for a looping link (not for a
    missing target): one in the root failed names(), listing() and every
    rescan, so no change (a token revoked) was seen any more; one in a
    version directory made resolve raise OSError (a review's finding)."""
    make_version(tmp_path, "a", 1, {"model.pt": ""})
    make_version(tmp_path, "b", 1, {"model.pt": ""})
    os.symlink("loop", tmp_path / "loop")
    os.symlink("2", tmp_path / "a" / "2")
    os.symlink("notes", tmp_path / "b" / "1" / "notes")
    repo = Repository(tmp_path)
    assert repo.names() == ("a", "b") and repo.versions("a") == (1,)
    with pytest.raises(LoadFailed, match=r"b v1: cannot be read: 'notes' \(Too many levels"):
        repo.resolve("b")
    rows, _ = repo.listing()
    assert [key for key, _ in rows] == [("a", 1), ("b", 1)]
    assert isinstance(rows[1][1], LoadFailed)
    make_version(tmp_path, "c", 1, {"model.pt": ""})
    assert repo.rescan() == {"c"} and repo.names() == ("a", "b", "c")


@pytest.mark.parametrize("kind", ["dangling-link", "directory"])
def test_a_manifest_that_is_no_file_fails_its_model(tmp_path, kind):
    """Read as no manifest, it served its model to every client: a model
    whose tokens lay behind a link (a ConfigMap's mount) lost them when the
    link broke (a review's finding)."""
    path = make_version(tmp_path, "m", 1, {"model.pt": ""})
    if kind == "dangling-link":
        os.symlink(tmp_path / "gone.toml", path / "model.toml")
    else:
        (path / "model.toml").mkdir()
    repo = Repository(tmp_path)
    assert repo.names() == ("m",)
    with pytest.raises(LoadFailed, match=r"m v1: cannot be read: 'model.toml' \(not a file"):
        repo.resolve("m")


def test_a_root_gone_is_an_error_of_the_scan_not_an_empty_repository(tmp_path):
    root = tmp_path / "repo"
    make_version(root, "a", 1, {"model.pt": ""})
    repo = Repository(root)
    assert repo.names() == ("a",) and repo.versions("a") == (1,)
    os.rename(root, tmp_path / "away")
    with pytest.raises(LoadFailed, match="is not a directory"):
        repo.scan()
    assert repo.names() == ("a",) and repo.versions("a") == (1,)  # what is known stands
    os.rename(tmp_path / "away", root)
    make_version(root, "b", 1, {"model.pt": ""})
    assert repo.rescan() == {"b"} and repo.names() == ("a", "b")


def test_a_root_gone_as_a_scan_reads_its_models_is_an_error_of_that_scan(tmp_path,
                                                                          monkeypatch):
    # Checked only as the scan began, the models read after it went read as
    # removed (a review's finding).
    root = tmp_path / "repo"
    for name in ("a", "b"):
        make_version(root, name, 1, {"model.pt": ""})
    repo = Repository(root)
    assert repo.versions("a") == (1,) and repo.versions("b") == (1,)
    scandir = os.scandir

    def going(path):
        if Path(path) == root / "a":  # the first model read: the root goes after it
            os.rename(root, tmp_path / "away")
            return scandir(tmp_path / "away" / "a")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", going)
    with pytest.raises(LoadFailed, match="is not a directory"):
        repo.scan()
    assert repo.versions("b") == (1,)


def test_a_version_whose_files_change_as_it_is_read_fails_typed(tmp_path):
    # A file removed between the folder's listing and its stat (a rollback,
    # an rm -rf) escaped as a bare FileNotFoundError: a 500 that named the
    # server's path, a listing page failed, a rescan cut short (a review).
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"x")  # sized by its files, not a header
    names = [version / f"f{i}" for i in range(300)]
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            for p in names:
                try:
                    p.unlink()
                except FileNotFoundError:
                    p.touch()
    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    outcomes = collections.Counter()
    try:
        deadline = time.monotonic() + 3
        for _ in range(5000):
            if time.monotonic() > deadline:
                break
            try:
                Repository(tmp_path).resolve("m", 1)
                outcomes["ok"] += 1
            except MMEngineError as e:
                outcomes[type(e).__name__] += 1
    finally:
        stop.set()
        thread.join(5)
    assert outcomes["ok"] > 0, outcomes
