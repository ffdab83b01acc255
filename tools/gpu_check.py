"""The load path on a GPU, measured against the link it runs on, in one run.

    python tools/gpu_check.py [--device cpu] [--mb 100]

Run by tools/gpu_check.sh on a GPU machine; `--device cpu` runs the same
steps on a machine without one (the figures then say nothing of PCIe, but
every code path except the CUDA calls runs). Prints one JSON object:

- pinned_h2d_gb_per_s: a plain host-to-device copy from pinned memory (the
  baseline: the link's speed as torch sees it);
- disk_to_device_gb_per_s: a worker's load of a model read from its file
  (in the page cache) through the pinned stager;
- host_to_device_gb_per_s: a worker's load of the same model from the host
  tier (after an eviction demoted it);
- cold_first_response_ms against transfer_ms: the first answer of a model
  that was never loaded, on a server that has answered once (another
  model: first_response_after_start_ms), against the time the link needs
  for its bytes; cold_load_phases_ms says where its load went;
- evict_ms: an eviction (demotion) of the big model;
- device_frees_during_churn: cudaFree calls in the worker while models of
  several sizes are evicted and reloaded again and again (0 is the goal:
  freed device memory stays in torch's caching allocator and is reused).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: How long a load's copy may take to reach the host tier (it is published after).
PUBLISH_WAIT_S = 20
sys.path.insert(0, str(ROOT))

from mmengine.config import Config  # noqa: E402

MODEL_PY = '''\
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self, width: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x
'''


def write_model(root: Path, name: str, nbytes: int) -> None:
    """A safetensors + module model of about `nbytes` (4 square layers)."""
    import torch

    from mmengine.backends.safetensors import save_file

    width = max(16, int((nbytes / 4 / 4) ** 0.5))
    version = root / name / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(MODEL_PY)
    (version / "model.toml").write_text(
        f'backend = "safetensors"\n[options]\nmodule_kwargs = {{width = {width}, layers = 4}}\n'
        f'[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, {width}]\n')
    g = torch.Generator().manual_seed(len(name))
    state = {}
    for i in range(4):
        state[f"layers.{i}.weight"] = torch.randn(width, width, generator=g) / width
        state[f"layers.{i}.bias"] = torch.zeros(width)
    save_file(state, version / "model.safetensors")


def pinned_h2d_gb_per_s(device: str, nbytes: int, repeats: int = 5) -> float:
    import torch

    if device == "cpu":  # the baseline here: a plain copy into reused memory
        src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        return nbytes / statistics.median(times) / 1e9
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times) / 1e9


async def engine_figures(root: Path, device: str, sizes: dict[str, int], repeats: int) -> dict:
    from mmengine.engine import Engine

    loads: list[dict] = []

    def observe(kind: str, fields: dict) -> None:
        if kind == "load" and "phases" in fields:
            loads.append(fields)

    config = Config(repo=str(root), workers=1, device=device,
                    device_budget=4 * sum(sizes.values()))
    async with Engine(config) as engine:
        engine.observers.append(observe)
        def x(name: str) -> dict:
            return {"x": np.ones((1, max(16, int((sizes[name] / 16) ** 0.5))), np.float32)}

        # The first request of a fresh server also pays for the code paths'
        # first use (imports, CUDA's lazily loaded kernels); a cold model on
        # a live server pays for its own bytes and kernels alone.
        t0 = time.perf_counter()
        await engine.infer("mid", x("mid"))
        first_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        await engine.infer("cold", x("cold"))
        cold_ms = (time.perf_counter() - t0) * 1e3
        cold_phases = {k: v * 1e3 for k, v in loads[-1]["phases"].items()}

        disk, host, evict = [], [], []
        for _ in range(repeats):
            await engine.load("big")
            disk.append(loads[-1])
            published = time.monotonic() + PUBLISH_WAIT_S
            while not engine.model_row(("big", 1))["host_bytes"]:
                if time.monotonic() > published:  # say so, not wait out the run's timeout
                    raise RuntimeError(f"big's copy was not in the host tier "
                                       f"{PUBLISH_WAIT_S} s after its load: "
                                       f"{engine.model_row(('big', 1))['last_error']}")
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            await engine.unload("big", keep_host=True)
            evict.append((time.perf_counter() - t0) * 1e3)
            await engine.load("big")
            host.append(loads[-1])
            assert host[-1]["from"] == "host", host[-1]
            await engine.unload("big")  # drops the host copy: the next load reads the file
        before = loads[-1].get("allocator", {})
        for _ in range(repeats):  # several sizes in and out of the same worker
            for name in ("big", "cold", "mid"):
                await engine.load(name)
                await engine.unload(name, keep_host=True)
        after = loads[-1].get("allocator", {})

    def rate(fields: dict) -> float:
        return fields["bytes"] / sum(fields["phases"].values()) / 1e9

    return {
        "disk_to_device_gb_per_s": statistics.median(rate(f) for f in disk),
        "host_to_device_gb_per_s": statistics.median(rate(f) for f in host),
        "disk_load_phases_ms": {k: v * 1e3 for k, v in disk[-1]["phases"].items()},
        "host_load_phases_ms": {k: v * 1e3 for k, v in host[-1]["phases"].items()},
        "first_response_after_start_ms": first_ms,
        "cold_first_response_ms": cold_ms,
        "cold_load_phases_ms": cold_phases,
        "evict_ms": statistics.median(evict),
        "device_frees_during_churn": (after.get("device_frees", 0)
                                      - before.get("device_frees", 0)) if after else None,
        "device_allocs_during_churn": (after.get("device_allocs", 0)
                                       - before.get("device_allocs", 0)) if after else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--mb", type=int, default=100, help="the cold model's size")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    mb = 1 << 20
    sizes = {"cold": args.mb * mb, "big": 4 * args.mb * mb, "mid": args.mb * mb // 2}
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_check: no GPU visible (run with --device cpu for a dry run)")
    with tempfile.TemporaryDirectory(prefix="mmengine-gpu-check-") as tmp:
        root = Path(tmp)
        for name, nbytes in sizes.items():
            write_model(root, name, nbytes)
        link = pinned_h2d_gb_per_s("cuda:0" if args.device == "cuda" else "cpu", sizes["big"])
        figures = asyncio.run(engine_figures(root, args.device, sizes, args.repeats))
    transfer_ms = sizes["cold"] / (link * 1e9) * 1e3
    out = {
        "device": args.device,
        "pinned_h2d_gb_per_s": link,
        **figures,
        "transfer_ms": transfer_ms,
        "ratios": {
            "host_vs_link": figures["host_to_device_gb_per_s"] / link,
            "disk_vs_link": figures["disk_to_device_gb_per_s"] / link,
            "cold_vs_transfer": figures["cold_first_response_ms"] / transfer_ms,
        },
        "model_bytes": sizes,
        "pid": os.getpid(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
