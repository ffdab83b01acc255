"""Small real models for tests, benchmarks and `mmengine serve --demo`.

Every demo model is the same two-layer perceptron, `MLP`, whose weights
follow from (in_features, hidden, out_features, seed), so a test can compute
the expected answer in-process with `reference` and compare it with what a
backend returns. It takes one input "x" (float32, [-1, in_features]) and
gives one output "y".
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmengine.backends.safetensors import save_file

#: Backends `write_mlp` can write (onnx needs an exporter this package
#: does not depend on).
BACKENDS = ("handler", "export", "safetensors", "torchscript")


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _model_py(in_features: int, hidden: int, out_features: int) -> str:
    """A safetensors model's model.py: MLP's own source, so what is served is
    what `reference` computes. `Model`, the class found without a manifest,
    takes no constructor arguments, which only a manifest could give."""
    return ("import torch\nfrom torch import nn\n\n\n" + inspect.getsource(MLP)
            + "\n\nclass Model(MLP):\n    def __init__(self):\n"
            + f"        super().__init__({in_features}, {hidden}, {out_features})\n")


_HANDLER_PY = '''\
"""A numpy-only MLP: weights.npz holds w1, b1, w2, b2."""
import os

import numpy as np

weights = None


def load(path, device):
    global weights
    with np.load(os.path.join(path, "weights.npz"), allow_pickle=False) as f:
        weights = {name: f[name] for name in f.files}


def predict(inputs):
    h = np.maximum(inputs["x"] @ weights["w1"].T + weights["b1"], 0)
    return {"y": h @ weights["w2"].T + weights["b2"]}
'''


def mlp(in_features: int, hidden: int, out_features: int, seed: int) -> MLP:
    """The demo model with its deterministic weights, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    model = MLP(in_features, hidden, out_features)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
    return model.eval()


def reference(x: np.ndarray, in_features: int, hidden: int, out_features: int,
              seed: int) -> np.ndarray:
    """What every backend should answer for input `x`."""
    with torch.inference_mode():
        return mlp(in_features, hidden, out_features, seed)(torch.from_numpy(x)).numpy()


def write_mlp(model_dir: str | Path, backend: str, in_features: int = 4, hidden: int = 8,
              out_features: int = 2, seed: int = 0, version: int = 1,
              manifest: bool = True) -> Path:
    """Write the demo MLP as `<model_dir>/<version>/` for `backend`; returns
    the version directory. `manifest=False` leaves backend detection to
    the files."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown demo backend {backend!r}; choose from {BACKENDS}")
    path = Path(model_dir) / str(version)
    path.mkdir(parents=True, exist_ok=True)
    model = mlp(in_features, hidden, out_features, seed)
    _WRITERS[backend](path, model)
    if manifest:
        (path / "model.toml").write_text(_manifest(backend, in_features, hidden, out_features))
    return path


def _write_handler(path: Path, model: MLP) -> None:
    (path / "handler.py").write_text(_HANDLER_PY)
    np.savez(path / "weights.npz", w1=model.fc1.weight.detach().numpy(),
             b1=model.fc1.bias.detach().numpy(), w2=model.fc2.weight.detach().numpy(),
             b2=model.fc2.bias.detach().numpy())


def _write_safetensors(path: Path, model: MLP) -> None:
    (path / "model.py").write_text(_model_py(
        model.fc1.in_features, model.fc1.out_features, model.fc2.out_features))
    save_file(model.state_dict(), path / "model.safetensors")


def _write_torchscript(path: Path, model: MLP) -> None:
    torch.jit.script(model).save(str(path / "model.pt"))


# torch.export traces for a second or more; one program per architecture
# is exported once per process, and later models only swap its weights.
_programs: dict[tuple[int, int, int], torch.export.ExportedProgram] = {}


def _write_export(path: Path, model: MLP) -> None:
    key = (model.fc1.in_features, model.fc1.out_features, model.fc2.out_features)
    program = _programs.get(key)
    if program is None:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (torch.zeros(2, key[0]),),
                                      dynamic_shapes={"x": {0: batch}})
        _programs[key] = program
    with torch.no_grad():
        for name, value in model.state_dict().items():
            program.state_dict[name].copy_(value)
    torch.export.save(program, path / "model.pt2")


_WRITERS = {"handler": _write_handler, "export": _write_export,
            "safetensors": _write_safetensors, "torchscript": _write_torchscript}


def _manifest(backend: str, in_features: int, hidden: int, out_features: int) -> str:
    options = ('\n[options]\nmodule = "MLP"\n[options.module_kwargs]\n'
               f"in_features = {in_features}\nhidden = {hidden}\n"
               f"out_features = {out_features}\n") if backend == "safetensors" else ""
    return (f'backend = "{backend}"\n'
            f'[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, {in_features}]\n'
            f'[[outputs]]\nname = "y"\ndtype = "float32"\nshape = [-1, {out_features}]\n'
            + options)


@dataclasses.dataclass(frozen=True)
class DemoModel:
    name: str
    backend: str
    in_features: int
    hidden: int
    out_features: int
    seed: int
    versions: tuple[int, ...] = (1,)

    def reference(self, x: np.ndarray, version: int | None = None) -> np.ndarray:
        version = self.versions[-1] if version is None else version
        return reference(x, self.in_features, self.hidden, self.out_features,
                         self.seed + version - 1)


# (in_features, hidden, out_features): from under 1 KB to about 3 MB of weights.
_SIZES = ((4, 8, 2), (16, 64, 4), (64, 256, 16), (128, 512, 32), (512, 1024, 256))


def write_demo_repository(root: str | Path, n_models: int = 64, seed: int = 0) -> list[DemoModel]:
    """A repository of `n_models` demo MLPs: mostly safetensors, with every
    other backend present, sizes from bytes to megabytes, and every tenth
    model with a second version (weights of seed + 1)."""
    root = Path(root)
    models = []
    for i in range(n_models):
        backend = _demo_backend(i)
        # One architecture for every export model: it is traced only once.
        dims = _SIZES[1] if backend == "export" else _SIZES[(i + seed) % len(_SIZES)]
        versions = (1, 2) if i % 10 == 9 else (1,)
        model = DemoModel(f"{backend}-{i:03d}", backend, *dims, seed=seed + i,
                          versions=versions)
        for version in versions:
            write_mlp(root / model.name, backend, *dims, seed=model.seed + version - 1,
                      version=version)
        models.append(model)
    return models


def _demo_backend(i: int) -> str:
    if i % 16 == 3:
        return "export"
    if i % 8 == 5:
        return "torchscript"
    if i % 8 == 7:
        return "handler"
    return "safetensors"

