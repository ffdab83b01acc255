"""Models that take more room once loaded than their files promised (a
module that makes buffers of its own): the room is made by the others,
and a model larger than a whole budget is refused, not served past it."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import run
from mmengine import demo
from mmengine.backends.safetensors import save_file
from mmengine.config import Config
from mmengine.engine import Engine
from mmengine.errors import TooLarge

BUDGET = 1 << 20
BUFFERED = """\
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("scratch", torch.zeros({floats}), persistent=False)

    def forward(self, x):
        return self.fc(x) + self.scratch[:1]
"""
MANIFEST = """\
backend = "safetensors"
[[inputs]]
name = "x"
dtype = "float32"
shape = [-1, 4]
"""


def write_buffered(root, name: str, nbytes: int) -> None:
    """A model whose file holds 40 bytes and whose module makes `nbytes` more."""
    from torch import nn

    path = root / name / "1"
    path.mkdir(parents=True)
    (path / "model.py").write_text(BUFFERED.format(floats=nbytes // 4))
    fc = nn.Linear(4, 2)
    save_file({"fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()},
              path / "model.safetensors")
    (path / "model.toml").write_text(MANIFEST)


def row(engine: Engine, name: str) -> dict:
    return engine.model_row((name, 1))


def test_a_model_larger_than_its_estimate_makes_room_without_evicting_itself(
        tmp_path, own_segments):
    # Its load evicted the idle models, and then itself (still past the
    # low watermark alone): its waiters found it gone and loaded it again.
    for i in range(4):
        demo.write_mlp(tmp_path / f"small{i}", "safetensors", 64, 256, 32, seed=i)
    write_buffered(tmp_path, "big", 800_000)  # 76% of the budget
    x = np.ones((1, 4), np.float32)

    async def main():
        config = Config(repo=str(tmp_path), workers=1, device_budget=BUDGET,
                        host_tier_bytes=0)
        async with Engine(config) as engine:
            for i in range(4):
                await engine.infer(f"small{i}", {"x": np.ones((1, 64), np.float32)})
            await engine.infer("big", {"x": x})
            assert row(engine, "big")["state"] == "resident"
            assert row(engine, "big")["loads"] == 1 and row(engine, "big")["evictions"] == 0
            worker = engine.stats()["workers"][0]
            assert worker["used_bytes"] <= worker["budget_bytes"]
            await engine.infer("big", {"x": x})
            assert row(engine, "big")["loads"] == 1

    run(main())


def test_a_model_larger_than_a_whole_budget_once_loaded_is_refused_and_not_kept(
        tmp_path, own_segments):
    write_buffered(tmp_path, "huge", 2 * BUDGET)
    x = np.ones((1, 4), np.float32)

    async def main():
        # The host tier on: such a model is not copied there either.
        async with Engine(Config(repo=str(tmp_path), workers=1, device_budget=BUDGET)) as engine:
            events = []
            engine.observers.append(lambda kind, f: events.append((kind, f.get("bytes"))))
            with pytest.raises(TooLarge, match="once loaded"):
                await engine.infer("huge", {"x": x})
            huge = row(engine, "huge")
            assert huge["state"] == "on storage" and huge["host_bytes"] == 0
            # It loaded, and its eviction gave back what it took: the counts
            # agree (an eviction of its reservation, with no load, did not).
            assert huge["evictions_by_reason"] == {"too_large": 1} and huge["loads"] == 1
            (loaded,) = [n for kind, n in events if kind == "load"]
            assert loaded > 2 * BUDGET and ("evict", loaded) in events
            assert "once loaded" in huge["last_error"]
            assert engine.stats()["workers"][0]["used_bytes"] == 0
            with pytest.raises(TooLarge, match=r"needs .*, device_budget\)"):  # at once, no load
                await engine.infer("huge", {"x": x})
            assert engine.stats()["totals"]["evictions"] == 1  # no second load was tried

    run(main())
