"""The engine's device paths on every device this machine has: the CPU
always, and a GPU where torch sees one (CI has none; tools/gpu_check.sh runs
this file on a GPU machine). The same steps on both, so that what the CPU
case proves of the logic, the GPU case proves of the CUDA calls: pinned
staging, the loader's stream, host-tier mappings registered with CUDA, and
the caching allocator's reuse of evicted models' memory."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmengine import demo, resources, shm
from mmengine.backends import load_model, safetensors
from mmengine.config import Config
from mmengine.engine import Engine
from mmengine.storage import Repository
from tests.conftest import environ, run, write_handler
from tests.test_hosttier import restart, row, settle

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU visible"))]
DIMS = (64, 256, 16)  # 83,008 bytes of weights per model
X = {"x": np.random.default_rng(0).standard_normal((3, DIMS[0]), dtype=np.float32)}


def check(y: dict, seed: int) -> None:
    # A GPU's float32 matmuls sum in another order than the CPU's.
    np.testing.assert_allclose(y["y"], demo.reference(X["x"], *DIMS, seed=seed),
                               rtol=1e-4, atol=1e-5)


def loads_of(engine: Engine) -> list[dict]:
    seen: list[dict] = []
    engine.observers.append(lambda kind, fields: kind == "load" and seen.append(fields))
    return seen


@pytest.mark.parametrize("device", DEVICES)
def test_every_backend_serves_right_from_the_device(tmp_path, device, own_segments):
    for seed, backend in enumerate(demo.BACKENDS):
        demo.write_mlp(tmp_path / backend, backend, *DIMS, seed=seed)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=1, device=device)) as engine:
            assert [w["device"] for w in engine.stats()["workers"]] == (
                [f"cuda:{i}" for i in range(resources.gpu_count())] if device == "cuda"
                else ["cpu"])
            for seed, backend in enumerate(demo.BACKENDS):
                for _ in range(2):  # the load's answer, then a warm one
                    check(await engine.infer(backend, X), seed)

    run(main())


@pytest.mark.parametrize("device", DEVICES)
def test_evicted_models_come_back_from_the_host_tier_to_the_device(tmp_path, device,
                                                                   own_segments):
    for i in range(2):
        demo.write_mlp(tmp_path / f"m{i}", "safetensors", *DIMS, seed=i)

    async def main():
        # The budget holds one model: each load demotes the other.
        config = Config(repo=str(tmp_path), workers=1, device=device, device_budget=100_000)
        async with Engine(config) as engine:
            loads = loads_of(engine)
            for i in (0, 1):
                check(await engine.infer(f"m{i}", X), i)
                await settle(engine, f"m{i}", "resident")
            for _ in range(3):
                for i in (0, 1):
                    check(await engine.infer(f"m{i}", X), i)
            assert [f["from"] for f in loads] == ["disk", "disk"] + ["host"] * 6
            assert row(engine, "m0")["loads_from_host"] == 3
            # The allocator's counts come from a GPU worker only.
            assert (loads[-1]["allocator"] is not None) == (device == "cuda")

            await restart(engine)  # a new process, a new CUDA context
            check(await engine.infer("m0", X), 0)
            assert loads[-1]["from"] == "host"

    run(main())


@pytest.mark.parametrize("device", DEVICES)
def test_a_publish_leaves_the_copy_mapped_and_on_a_gpu_registered(tmp_path, device,
                                                                  own_segments):
    # In this process, as a worker's loader does it: the copy goes through a
    # mapping that a GPU registers as pinned when it is made, so that the
    # next load from it is one copy at the link's speed; forgetting the
    # segment unregisters and unmaps it.
    demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=3)
    model = load_model(Repository(tmp_path).resolve("m", None), f"{device}:0"
                       if device == "cuda" else "cpu")
    segment = f"{shm.PREFIX}{os.getpid()}-host-test"
    try:
        assert safetensors.publish(model, segment, []) > model.nbytes
        _, _, pinned = safetensors.HOST_MAPS.get(segment, "m", model.device)
        assert pinned == (device == "cuda")
        check(model.predict(X), 3)
        copy = load_model(Repository(tmp_path).resolve("m", None), model.device, host=segment)
        check(copy.predict(X), 3)
        copy.close()
        model.close()
        safetensors.HOST_MAPS.forget(segment)
        assert segment not in safetensors.HOST_MAPS._maps
    finally:
        with contextlib.suppress(FileNotFoundError):  # (not made: the failure above says why)
            os.unlink(os.path.join(shm.SHM_DIR, segment))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_reloads_reuse_the_device_memory_evictions_left(tmp_path, own_segments):
    sizes = {"small": (64, 256, 16), "mid": (256, 1024, 64), "big": (512, 2048, 256)}
    for seed, (name, dims) in enumerate(sizes.items()):
        demo.write_mlp(tmp_path / name, "safetensors", *dims, seed=seed)

    async def main():
        config = Config(repo=str(tmp_path), workers=1, device="cuda", device_budget=1 << 30)
        async with Engine(config) as engine:
            loads = loads_of(engine)
            for rounds in range(4):
                for name in sizes:
                    await engine.load(name)
                    await settle(engine, name, "resident")
                    await engine.unload(name, keep_host=True)
                if rounds == 0:  # the first round fills the allocator's cache
                    before = loads[-1]["allocator"]
            after = loads[-1]["allocator"]
            assert [f["from"] for f in loads[3:]] == ["host"] * 9
            assert after["device_frees"] == before["device_frees"], (before, after)
            for seed, (name, dims) in enumerate(sizes.items()):
                x = np.ones((2, dims[0]), np.float32)
                y = await engine.infer(name, {"x": x})
                np.testing.assert_allclose(y["y"], demo.reference(x, *dims, seed=seed),
                                           rtol=1e-4, atol=1e-5)

    run(main())


@pytest.mark.parametrize("mask, expected", [
    (None, [0, 1, 2, 3]),
    ("", []),
    ("-1", []),
    ("2,0", [2, 0]),
    ("1, 3", [1, 3]),
    ("1a,2", [1, 2]),       # an index is the entry's leading digits
    ("1,9,2", [1]),         # the list ends at the first entry that names no device
    ("1,²", [1]),
    ("0,0", []),            # and a repeated one hides them all
    ("GPU-8f3a,MIG-77", ["GPU-8f3a", "MIG-77"]),
    ("GPU-8f3a,1", ["GPU-8f3a"]),  # all indices or all UUIDs
])
def test_the_gpus_cuda_sees_are_the_ones_workers_get(mask, expected):
    # NVML counts every GPU of the machine (4 here); a worker's cuda:i is
    # the i-th that CUDA_VISIBLE_DEVICES lets CUDA see.
    assert resources.visible(mask, 4) == expected


class FakeNVML:
    """NVML's calls that resources.py makes, over four GPUs and one MIG
    instance (the driver library, not a part of mmengine)."""

    UUIDS = ["GPU-aa11", "GPU-aa22", "GPU-bb33", "GPU-cc44"]

    def nvmlDeviceGetCount(self):
        return len(self.UUIDS)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.UUIDS[i]

    def nvmlDeviceGetUUID(self, handle):
        return handle.encode()

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid in self.UUIDS or uuid == "MIG-dd55":
            return uuid
        raise RuntimeError("NVML_ERROR_NOT_FOUND")


@pytest.mark.parametrize("mask, handles", [
    (None, FakeNVML.UUIDS),
    ("3,1", ["GPU-cc44", "GPU-aa22"]),
    ("GPU-bb33,GPU-aa11", ["GPU-bb33", "GPU-aa11"]),
    ("GPU-b,GPU-c", ["GPU-bb33", "GPU-cc44"]),  # unique prefixes
    ("GPU-a,GPU-b", []),                       # an ambiguous one ends the list
    ("GPU-bb33,GPU-ff", ["GPU-bb33"]),
    ("MIG-dd55", ["MIG-dd55"]),
])
def test_each_worker_reads_the_memory_of_its_own_gpu(monkeypatch, mask, handles):
    monkeypatch.setattr(resources, "_nvml", FakeNVML)
    if mask is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
    resources._handles.cache_clear()
    try:
        assert list(resources._handles()) == handles
        assert resources.gpu_count() == len(handles)
    finally:
        resources._handles.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_a_refused_host_registration_leaves_no_error_for_the_next_kernel():
    # torch's cudaHostRegister returns the failure and leaves it the
    # thread's last CUDA error, which the next kernel launch's check raised
    # as its own: a load after a refused registration failed its warm-up.
    memory = torch.empty(1 << 20, dtype=torch.uint8)
    assert safetensors._register(memory)  # registered once...
    assert not safetensors._register(memory)  # ...refused the second time
    assert (torch.ones(4, device="cuda") * 2).sum().item() == 8  # launches and is checked
    torch.cuda.cudart().cudaHostUnregister(memory.data_ptr())


WHERE_HANDLER = """\
import numpy as np
import torch

def load(path, device):
    global loaded_on
    loaded_on = torch.cuda.current_device()

def predict(inputs):
    return {"load": np.array([loaded_on]), "predict": np.array([torch.cuda.current_device()])}
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_a_handler_runs_on_its_workers_gpu_in_load_and_in_predict(tmp_path, own_segments):
    # CUDA's current device is per thread, cuda:0 until set: a handler's
    # bare .cuda() on the worker of cuda:1 landed on GPU 0.
    gpus = resources.gpu_count()
    for i in range(gpus):
        write_handler(tmp_path, f"where{i}", WHERE_HANDLER)

    async def main():
        async with Engine(Config(repo=str(tmp_path), workers=gpus, device="cuda")) as engine:
            for i in range(gpus):
                y = await engine.infer(f"where{i}", {"x": np.zeros(1, np.float32)})
                worker = engine.stats()["workers"][row(engine, f"where{i}")["worker"]]
                index = int(worker["device"].split(":")[1])
                assert (int(y["load"][0]), int(y["predict"][0])) == (index, index)

    run(main())


def test_clearing_cuda_errors_is_harmless_without_cuda():
    safetensors._clear_cuda_error()  # no CUDA runtime in the process: nothing to do


def test_the_prepared_gpu_check_runs_its_steps_on_cpu():
    # tools/gpu_check.py runs only where a device machine is lent, rarely:
    # its dry run here keeps it from rotting between (an engine method it
    # called was renamed, and the script failed where it mattered).
    tool = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(tool), "--device", "cpu", "--mb", "2",
                           "--repeats", "1"], env=environ(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["device"] == "cpu" and figures["evict_ms"] > 0
    assert figures["host_to_device_gb_per_s"] > 0 and figures["cold_first_response_ms"] > 0
