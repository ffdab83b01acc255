"""Versions rolled out and rolled back while an Engine serves: what a
request gets is what the repository holds now, never a version's
predecessor under the same number, nor a spec the worker did not load."""
from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time

import numpy as np
import pytest

from conftest import run, until, write_handler
from mmengine import demo
from mmengine.config import Config
from mmengine.engine import Engine
from mmengine.errors import InternalError, LoadFailed, ModelNotFound, Timeout
from mmengine.storage import Repository, parse_version

DIMS = (16, 64, 8)
X = np.random.default_rng(0).standard_normal((2, DIMS[0])).astype(np.float32)


def check(y: np.ndarray, seed: int) -> None:
    np.testing.assert_allclose(y, demo.reference(X, *DIMS, seed=seed), rtol=1e-5, atol=1e-5)


def held(engine: Engine, key) -> bool:
    return key in engine.cache or key in engine.host.keys()


def listed(engine: Engine, name: str) -> tuple:
    """The versions of `name` as the engine's last look at the repository found them."""
    return engine.repo._versions.get(name, ())


def rows(engine: Engine) -> set:
    """The model versions that have a row in stats."""
    return {(r["name"], r["version"]) for r in engine.stats()["models"]}


def redeclare(version_dir) -> None:
    """Replaces a handler's manifest whole: its one output is now "z"."""
    new = version_dir / ".model.toml.new"
    new.write_text('backend = "handler"\n[[outputs]]\nname = "z"\ndtype = "float32"\n'
                   'shape = [1]\n')
    os.rename(new, version_dir / "model.toml")


SLOW = """\
import time

import numpy as np

VALUE = {value}


def load(path, device):
    time.sleep({load_s})


def predict(inputs):
    time.sleep(float(inputs["seconds"][0]))
    return {{"y": np.full(1, VALUE, np.float32)}}
"""


def write_slow(root, name: str, version: int, value: float, load_s: float = 0.0,
               manifest: str = "") -> None:
    """A handler that answers `value` after inputs["seconds"], loaded in `load_s`."""
    path = root / name / str(version)
    path.mkdir(parents=True)
    (path / "handler.py").write_text(SLOW.format(value=value, load_s=load_s))
    if manifest:
        (path / "model.toml").write_text(manifest)


def seconds(s: float) -> dict:
    return {"seconds": np.array([s], np.float32)}


def answer(y: dict) -> float:
    return float(y["y"][0])


def test_a_version_removed_while_resident_is_unloaded_and_its_successor_serves(
        tmp_path, own_segments):
    # A removed version stayed on its worker until evicted; once a new one
    # was published under its number, requests got the removed one's
    # weights, with no error, until something evicted it.
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=2, version=2)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            evictions = []
            engine.observers.append(
                lambda kind, f: kind == "evict" and evictions.append((f["version"], f["reason"])))
            check((await engine.infer("m", {"x": X}))["y"], 2)
            shutil.rmtree(tmp_path / "m" / "2")  # rolled back
            await until(lambda: not held(engine, ("m", 2)))
            assert evictions == [(2, "removed")]
            check((await engine.infer("m", {"x": X}))["y"], 1)
            demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=22, version=2)
            check((await engine.infer("m", {"x": X}, version=2))["y"], 22)  # looked for at once
            await until(lambda: listed(engine, "m") == (1, 2))
            check((await engine.infer("m", {"x": X}))["y"], 22)

    run(main())


def test_a_new_version_is_the_default_from_the_moment_it_is_listed(tmp_path, own_segments):
    # The scan ran in a thread and made the repository list the new version
    # there; the engine forgot its old default once the loop had its turn.
    # A request in between was listed the new version and served the old
    # (about one version in ten here, with the threads taking turns often).
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.01)) as engine:
            check((await engine.infer("m", {"x": X}))["y"], 1)
            for version in range(2, 22):
                demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=version,
                               version=version)
                deadline = time.monotonic() + 10
                while listed(engine, "m")[-1] != version:  # each turn of the loop looks
                    assert time.monotonic() < deadline, f"version {version} was never listed"
                    await asyncio.sleep(0)
                check((await engine.infer("m", {"x": X}))["y"], version)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns often: a window shows
    try:
        run(main())
    finally:
        sys.setswitchinterval(interval)


def test_a_pinned_version_removed_goes_with_its_pin(tmp_path, own_segments):
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=2, version=2)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.pin("m", 1)
            shutil.rmtree(tmp_path / "m" / "1")
            await until(lambda: not held(engine, ("m", 1)))
            assert ("m", 1) not in engine._pinned
            await until(lambda: ("m", 1) not in rows(engine))
            with pytest.raises(ModelNotFound):
                await engine.infer("m", {"x": X}, version=1)
            check((await engine.infer("m", {"x": X}))["y"], 2)

    run(main())


def test_a_repository_gone_for_a_while_keeps_its_models_and_their_pins(tmp_path, own_segments,
                                                                       caplog):
    """A mount gone for a moment read as a repository of no models: every
    model was unloaded and its pin dropped for good, and nothing was said
    (a review's finding)."""
    root = tmp_path / "repo"
    demo.write_mlp(root / "m", "safetensors", *DIMS, seed=1)

    async def main():
        async with Engine(Config(repo=str(root), workers=1, repo_scan_s=0.05)) as engine:
            await engine.pin("m", 1)
            os.rename(root, tmp_path / "away")
            await until(lambda: "is not a directory (any more)" in caplog.text)
            await asyncio.sleep(0.2)  # scans that found nothing
            assert ("m", 1) in engine._pinned and held(engine, ("m", 1))
            check((await engine.infer("m", {"x": X}))["y"], 1)
            os.rename(tmp_path / "away", root)
            demo.write_mlp(root / "m", "safetensors", *DIMS, seed=2, version=2)
            await until(lambda: listed(engine, "m") == (1, 2))  # scanning again
            assert ("m", 1) in engine._pinned
            check((await engine.infer("m", {"x": X}))["y"], 2)

    run(main())


@pytest.mark.parametrize("call", ["unpin", "unload"])
def test_a_call_naming_no_version_reaches_the_one_pinned_before_a_newer_came(
        tmp_path, own_segments, call):
    # It acted on the new default version, answered OK, and version 1 stayed
    # pinned and resident: a pin its operator believed released (a review).
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.pin("m")
            demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=2, version=2)
            await until(lambda: listed(engine, "m") == (1, 2))
            check((await engine.infer("m", {"x": X}))["y"], 2)  # the new default
            await getattr(engine, call)("m")
            row = next(r for r in engine.stats()["models"] if r["version"] == 1)
            return row, ("m", 1) in engine._pinned

    row, pinned = run(main())
    assert not pinned and not row["pinned"]
    assert row["state"] == ("on storage" if call == "unload" else "resident"), row


def test_a_model_whose_last_version_went_is_forgotten_though_its_directory_stays(
        tmp_path, own_segments):
    # The name's directory still listed it, so its copy in host memory and
    # its row stayed for good, and a new version 1 was served from that
    # copy: the old weights.
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.infer("m", {"x": X})
            await until(lambda: ("m", 1) in engine.host.keys())  # published
            await engine.unload("m", keep_host=True)
            os.rename(tmp_path / "m" / "1", tmp_path / "m" / "1.old")
            await until(lambda: ("m", 1) not in engine.host.keys())
            await until(lambda: ("m", 1) not in rows(engine))
            assert await engine.models() == []
            demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=11)
            check((await engine.infer("m", {"x": X}))["y"], 11)

    run(main())


@pytest.mark.parametrize("pinned", [False, True])
def test_a_manifest_edited_to_declare_other_tensors_has_its_model_loaded_again(
        tmp_path, own_segments, pinned):
    # The worker checks and names tensors by the spec it loaded: the
    # server advertised the edited outputs while answering with the old.
    manifest = demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1) / "model.toml"

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            if pinned:
                await engine.pin("m")
            assert set(await engine.infer("m", {"x": X})) == {"y"}
            text = manifest.read_text().replace('name = "y"', 'name = "z"')
            manifest.write_text(text)
            await until(lambda: engine.model_row(("m", 1))["evictions"] == 1)
            if pinned:  # loaded again at once, and pinned again
                await until(lambda: engine.model_row(("m", 1))["state"] == "resident")
            answer = await engine.infer("m", {"x": X})
            assert set(answer) == {"z"}
            check(answer["z"], 1)
            row = engine.model_row(("m", 1))
            assert row["evictions_by_reason"] == {"redeclared": 1} and row["loads"] == 2
            assert row["pinned"] == pinned

    run(main())


def test_a_default_version_removed_as_it_loads_is_served_by_the_one_before(
        tmp_path, own_segments):
    # A rollback renamed version 2 away before a scan saw it: its load
    # failed for its files, the model was backed off, and every request
    # for the default failed (LOAD_FAILED, HTTP 500) until the next scan.
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=2, version=2)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=600)) as engine:
            assert (await engine.metadata("m"))["version"] == 2  # what it knows: 2 is the default
            os.rename(tmp_path / "m" / "2", tmp_path / "m" / "rolled-back-2")
            check((await engine.infer("m", {"x": X}))["y"], 1)
            row = engine.model_row(("m", 2))
            assert row["failures"] == 0 and row["retry_in_s"] == 0
            with pytest.raises(ModelNotFound):
                await engine.infer("m", {"x": X}, version=2)
            os.rename(tmp_path / "m" / "rolled-back-2", tmp_path / "m" / "2")
            check((await engine.infer("m", {"x": X}, version=2))["y"], 2)  # asked for by number

    run(main())


def test_unload_all_unloads_every_version_held_though_the_default_is_broken(
        tmp_path, own_segments):
    # KServe's repository unload read the default version's manifest first:
    # a version being copied in failed it (500), and nothing was unloaded.
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.infer("m", {"x": X})
            (tmp_path / "m" / "2").mkdir()  # half-written: no model file yet
            await until(lambda: listed(engine, "m") == (1, 2))
            await engine.unload_all("m")
            assert not held(engine, ("m", 1))
            with pytest.raises(ModelNotFound):
                await engine.unload_all("nope")

    run(main())


def test_a_version_is_an_int64_in_canonical_decimal(tmp_path):
    # A directory of 2^64 was a version that msgpack could not carry: the
    # whole server's list and stats answered INTERNAL.
    for name in ("1", "9223372036854775807", "9223372036854775808",
                 "18446744073709551616", "01", "0"):
        (tmp_path / "m" / name).mkdir(parents=True)
    assert Repository(tmp_path).versions("m") == (1, (1 << 63) - 1)
    assert parse_version("9223372036854775807") == (1 << 63) - 1
    for bad in ("9223372036854775808", "01", "0", 1 << 63, 0, True):
        with pytest.raises(ModelNotFound):
            parse_version(bad)


def test_a_removed_version_in_use_is_given_no_new_request_and_blocks_no_other_version(
        tmp_path, own_segments):
    # A removed version in use waited for its name's control lock: requests
    # for the number published again got the removed one meanwhile, and
    # an operator's pin of another version of the name timed out behind it.
    write_slow(tmp_path, "m", 1, 1.0)
    write_slow(tmp_path, "m", 2, 2.0)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=2, repo_scan_s=0.1)) as engine:
            busy = asyncio.ensure_future(engine.infer("m", seconds(5.0), version=1))
            await until(lambda: engine.model_row(("m", 1))["pins"] == 1)
            shutil.rmtree(tmp_path / "m" / "1")
            await until(lambda: ("m", 1) in engine._stale)
            t0 = time.monotonic()
            await engine.pin("m", 2, timeout=2.5)
            assert time.monotonic() - t0 < 2.0
            write_slow(tmp_path, "m", 1, 11.0)  # the number published again
            await until(lambda: listed(engine, "m") == (1, 2))
            await asyncio.sleep(0.3)  # the scans have settled: a spec read now is kept
            first = asyncio.ensure_future(engine.infer("m", seconds(0), version=1))
            await asyncio.sleep(0.2)  # it read the spec, and waits: the next one finds it read
            second = asyncio.ensure_future(engine.infer("m", seconds(0), version=1))
            assert [answer(y) for y in await asyncio.gather(first, second)] == [11.0, 11.0]
            assert answer(await busy) == 1.0  # the request in flight ended as it began

    run(main())


def test_a_failed_load_does_not_hide_a_version_published_meanwhile(tmp_path, own_segments):
    # The failed load's look at the repository stored the versions it saw,
    # so no scan told of the new one: the broken default stayed for good.
    write_slow(tmp_path, "m", 1, 1.0)
    (tmp_path / "m" / "1" / "handler.py").write_text("def load(path, device):\n"
                                                   "    raise RuntimeError('bad build')\n\n\n"
                                                   "def predict(inputs):\n    pass\n")

    async def main():
        config = Config(repo=str(tmp_path), workers=1, repo_scan_s=0.5,
                        load_failure_backoff_s=0.1, load_failure_backoff_max_s=0.1)
        async with Engine(config) as engine:
            assert (await engine.metadata("m"))["version"] == 1
            write_slow(tmp_path, "m", 2, 2.0)  # the fix
            with pytest.raises(LoadFailed, match="bad build"):
                await engine.infer("m", seconds(0))
            await until(lambda: listed(engine, "m") == (1, 2))
            await asyncio.sleep(0.2)
            assert answer(await engine.infer("m", seconds(0))) == 2.0

    run(main())


@pytest.mark.parametrize("how", ["infer", "pin"])
def test_a_default_version_removed_with_a_copy_in_host_memory_gives_way(tmp_path, own_segments,
                                                                         how):
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=2, version=2)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=600)) as engine:
            check((await engine.infer("m", {"x": X}))["y"], 2)
            await until(lambda: ("m", 2) in engine.host.keys())  # published
            await engine.unload("m", 2, keep_host=True)
            os.rename(tmp_path / "m" / "2", tmp_path / "m" / "rolled-back-2")
            if how == "pin":  # and load: the same path
                assert (await engine.pin("m"))["version"] == 1
            check((await engine.infer("m", {"x": X}))["y"], 1)
            assert engine.model_row(("m", 2))["failures"] == 0

    run(main())


def test_a_token_edit_keeps_a_model_resident_whatever_its_size_estimate(tmp_path,
                                                                         own_segments):
    # A handler's estimate is its directory's size, the manifest's own
    # bytes included: a token added was taken for a new declaration.
    from mmengine import auth

    write_slow(tmp_path, "m", 1, 1.0, manifest='backend = "handler"\n')
    manifest = tmp_path / "m" / "1" / "model.toml"

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.infer("m", seconds(0))
            text = f'token_sha256 = ["{auth.digest("t").hex()}"]\n' + manifest.read_text()
            (tmp_path / "m" / "1" / ".model.toml.new").write_text(text)
            os.rename(tmp_path / "m" / "1" / ".model.toml.new", manifest)
            await until(lambda: engine.repo.resolve("m").token_digests != ())
            await asyncio.sleep(0.5)  # scans
            assert answer(await engine.infer("m", seconds(0), token="t")) == 1.0
            assert engine.model_row(("m", 1))["loads"] == 1

    run(main())


def test_a_manifest_edited_while_its_model_loads_is_taken_once_it_has(tmp_path, own_segments):
    write_slow(tmp_path, "m", 1, 1.0, load_s=1.5, manifest='backend = "handler"\n')

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            loading = asyncio.ensure_future(engine.infer("m", seconds(0)))
            await asyncio.sleep(0.5)  # under way
            redeclare(tmp_path / "m" / "1")
            assert set(await loading) == {"y"}  # loaded as it read it
            await until(lambda: engine.model_row(("m", 1))["evictions"] == 1)
            # Loaded again, it is held to the manifest as it reads now.
            with pytest.raises(InternalError, match=r"missing \['z'\]"):
                await engine.infer("m", seconds(0))

    run(main())


def test_a_stale_models_last_call_leaves_no_call_time_behind_its_unload(tmp_path,
                                                                           own_segments):
    # Its last request's books gave its pin back first, which sent its
    # unload and forgot its call time; the call's time, booked after, made
    # the figure anew, and the model's next load took its first call (a
    # warm-up, which the figure passes over) for its time.
    write_slow(tmp_path, "m", 1, 1.0, manifest='backend = "handler"\n')

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.infer("m", seconds(0))
            busy = asyncio.ensure_future(engine.infer("m", seconds(1.0)))
            await asyncio.sleep(0.3)
            redeclare(tmp_path / "m" / "1")
            await until(lambda: engine._stale.get(("m", 1)) == "redeclared")
            await busy
            await until(lambda: engine.model_row(("m", 1))["evictions"] == 1)
            return ("m", 1) in engine.pool.workers[0]._times._calls

    assert not run(main())


def test_a_pinned_version_edited_then_removed_loses_its_pin(tmp_path, own_segments):
    write_slow(tmp_path, "m", 1, 1.0, manifest='backend = "handler"\n')
    write_slow(tmp_path, "m", 2, 2.0)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.pin("m", 1)
            busy = asyncio.ensure_future(engine.infer("m", seconds(2.0), version=1))
            await asyncio.sleep(0.3)
            redeclare(tmp_path / "m" / "1")
            await until(lambda: engine._stale.get(("m", 1)) == "redeclared")
            shutil.rmtree(tmp_path / "m" / "1")
            await busy
            await until(lambda: not held(engine, ("m", 1)))
            assert ("m", 1) not in engine._pinned
            await until(lambda: ("m", 1) not in rows(engine))

    run(main())


def test_unload_all_drops_a_copy_in_host_memory_whose_manifest_went_bad(tmp_path,
                                                                        own_segments):
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=1)
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=2, version=2)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=600)) as engine:
            await engine.infer("m", {"x": X}, version=1)
            await until(lambda: ("m", 1) in engine.host.keys())
            await engine.unload("m", 1, keep_host=True)
            await engine.infer("m", {"x": X}, version=2)
            (tmp_path / "m" / "1" / "model.toml").write_text("not = [toml")
            await engine._rescan()  # the scan that sees the edit
            await engine.unload_all("m")
            assert not held(engine, ("m", 1)) and not held(engine, ("m", 2))
            assert engine.model_row(("m", 1))["failures"] == 0

    run(main())


def test_a_name_whose_last_version_went_can_be_added_at_run_time(tmp_path, own_segments):
    demo.write_mlp(tmp_path / "x", "safetensors", *DIMS, seed=1)
    demo.write_mlp(tmp_path / "elsewhere" / "x", "safetensors", *DIMS, seed=5)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            shutil.rmtree(tmp_path / "x" / "1")
            await engine.add_model("x", str(tmp_path / "elsewhere" / "x" / "1"))
            check((await engine.infer("x", {"x": X}))["y"], 5)

    run(main())


def test_an_unload_that_times_out_gives_no_pin_back_to_a_stale_model(tmp_path, own_segments):
    # The timed-out unload put the explicit pin back on a model marked
    # stale meanwhile: it was never evicted, and every request waited for
    # it to its deadline.
    write_slow(tmp_path, "m", 1, 1.0, manifest='backend = "handler"\n')

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.pin("m", 1)
            busy = asyncio.ensure_future(engine.infer("m", seconds(2.5), version=1))
            await asyncio.sleep(0.3)
            unloading = asyncio.ensure_future(engine.unload("m", 1, timeout=1.5))
            await asyncio.sleep(0.3)
            redeclare(tmp_path / "m" / "1")
            with pytest.raises(Timeout):
                await unloading
            await busy
            await until(lambda: engine.model_row(("m", 1))["evictions"] == 1)
            await until(lambda: engine.model_row(("m", 1))["state"] == "resident")  # pinned
            assert engine.model_row(("m", 1))["pinned"]

    run(main())


def test_a_version_evicted_while_a_scan_reads_another_is_not_left_stale(tmp_path,
                                                                       own_segments):
    # The scan marked it removed after an unload had taken it: nothing
    # was left to evict, and the number published again waited for good.
    write_slow(tmp_path, "a", 1, 1.0, manifest='backend = "handler"\n')
    write_slow(tmp_path, "b", 1, 1.0)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, repo_scan_s=0.1)) as engine:
            await engine.infer("a", seconds(0))
            await engine.infer("b", seconds(0))
            resolve = engine.repo.resolve

            def slow(name, version=None):
                if name == "a":
                    time.sleep(1.0)
                return resolve(name, version)
            engine.repo.resolve = slow
            manifest = tmp_path / "a" / "1" / "model.toml"
            manifest.write_text(manifest.read_text() + "# edited\n")
            shutil.rmtree(tmp_path / "b" / "1")
            await asyncio.sleep(0.4)  # a scan saw both, and reads a's spec, slowly
            await engine.unload("b", 1)
            await asyncio.sleep(1.5)
            engine.repo.resolve = resolve
            assert ("b", 1) not in engine._stale
            write_slow(tmp_path, "b", 1, 11.0)
            assert answer(await engine.infer("b", seconds(0), version=1, timeout=5)) == 11.0

    run(main())


def test_a_redeclared_model_reserves_its_estimate_not_what_the_old_one_measured(
        tmp_path, own_segments):
    # What a load measured stood for the model's next reservation after its
    # manifest was edited to declare another model: m took 6 MiB, then was
    # declared to take 1 MiB, and its next load evicted q1 and q2 for 6.
    handler = ("import tomllib\nimport numpy as np\nheld = None\n\n"
               "def load(path, device):\n    global held\n"
               "    with open(f'{path}/model.toml', 'rb') as f:\n"
               "        held = np.ones(tomllib.load(f)['options']['mib'] << 20, np.uint8)\n\n"
               "def predict(inputs):\n    return {'y': inputs['x']}\n")
    manifest = write_handler(tmp_path, "m", handler, "[options]\nmib = 6\n") / "model.toml"
    for name in ("q1", "q2"):
        write_handler(tmp_path, name, handler, "[options]\nmib = 3\n")
    one = {"x": np.ones(1)}

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, device_budget=10 << 20,
                                 repo_scan_s=0.1)) as engine:
            await engine.infer("m", one)
            manifest.write_text("[options]\nmib = 1\n")
            await until(lambda: engine.model_row(("m", 1))["evictions"] == 1,
                        what="m evicted as redeclared")
            await engine.infer("q1", one)
            await engine.infer("q2", one)
            await engine.infer("m", one)
            return {k: (engine.model_row((k, 1))["state"], engine.model_row((k, 1))["evictions"])
                    for k in ("m", "q1", "q2")}

    rows = run(main(), timeout=60)
    assert rows == {"m": ("resident", 1), "q1": ("resident", 0), "q2": ("resident", 0)}, rows
