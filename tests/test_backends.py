"""Every backend on real files: answers, request checks, load failures, trust."""
from __future__ import annotations

import gc
import importlib.util
import io
import json
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_sparse_model
from mmengine import backends, demo
from mmengine.backends import load_model
from mmengine.backends.base import SKELETONS, TorchModel, module_bytes
from mmengine.backends.handler import held_bytes
from mmengine.backends.safetensors import DTYPES, load_file, save_file
from mmengine.errors import BadRequest, InternalError, LoadFailed, Overloaded
from mmengine.storage import Repository

DIMS = (4, 8, 2)  # one architecture: torch.export traces it once per run


def load(root: Path, name: str, version: int | None = None):
    return load_model(Repository(root).resolve(name, version), "cpu")


def x(batch: int = 3, features: int = DIMS[0], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, features), dtype=np.float32)


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "detected"])
@pytest.mark.parametrize("backend", demo.BACKENDS)
def test_every_backend_answers_like_the_model(tmp_path, backend, manifest):
    demo.write_mlp(tmp_path / "m", backend, *DIMS, seed=7, manifest=manifest)
    model = load(tmp_path, "m")
    assert model.spec.backend == backend
    for batch in (1, 5):
        out = model.predict({"x": x(batch)})
        assert list(out) == (["y"] if manifest or backend == "handler" else ["output"])
        np.testing.assert_allclose(next(iter(out.values())), demo.reference(x(batch), *DIMS, 7),
                                   rtol=1e-5, atol=1e-6)
    model.close()


def test_versions_load_their_own_weights(tmp_path):
    for version, seed in ((1, 1), (2, 2)):
        demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, seed=seed, version=version)
    for version, seed in ((1, 1), (2, 2), (None, 2)):
        out = load(tmp_path, "m", version).predict({"x": x()})["y"]
        np.testing.assert_allclose(out, demo.reference(x(), *DIMS, seed), rtol=1e-5, atol=1e-6)


def test_onnx_without_onnxruntime_is_load_failed(tmp_path):
    if importlib.util.find_spec("onnxruntime") is not None:
        pytest.skip("onnxruntime is installed")
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"\x08\x07")
    assert Repository(tmp_path).resolve("m").backend == "onnx"
    with pytest.raises(LoadFailed, match="onnxruntime.*not installed"):
        load(tmp_path, "m")


# -- requests ---------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same MLP declared by a manifest (safetensors) and derived from a
    torch.export signature (export, no manifest)."""
    root = tmp_path_factory.mktemp("repo")
    demo.write_mlp(root / "declared", "safetensors", *DIMS, seed=3)
    demo.write_mlp(root / "derived", "export", *DIMS, seed=3, manifest=False)
    demo.write_mlp(root / "unchecked", "torchscript", *DIMS, seed=3, manifest=False)
    repo = Repository(root)
    return {name: load_model(repo.resolve(name)) for name in repo.names()}


@pytest.mark.parametrize("name", ["declared", "derived"])
@pytest.mark.parametrize("inputs, message", [
    ({"x": x(3, 5)}, "shape"),
    ({"x": x()[0]}, "shape"),
    ({"x": x().astype(np.float64)}, "float32, not float64"),
    ({"x": torch.from_numpy(x()).to(torch.int64)}, "float32, not int64"),
    ({}, "missing \\['x'\\]"),
    ({"x": x(), "z": x()}, "unexpected \\['z'\\]"),
    ({"x": x().tolist()}, "numpy array or a torch tensor"),
])
def test_bad_requests(models, name, inputs, message):
    with pytest.raises(BadRequest, match=message):
        models[name].predict(inputs)


def test_unchecked_model_errors_are_bad_requests(models):
    with pytest.raises(BadRequest, match="unchecked"):
        models["unchecked"].predict({"x": x(3, 5)})
    with pytest.raises(BadRequest):
        models["unchecked"].predict({"z": x()})


def test_inputs_in_any_layout(models):
    expected = demo.reference(x(), *DIMS, 3)
    readonly = x()
    readonly.flags.writeable = False
    layouts = [torch.from_numpy(x()), readonly, x()[::-1][::-1], np.asfortranarray(x()),
               x().astype(">f4")]
    for name in ("declared", "derived", "unchecked"):
        for value in layouts:
            out = models[name].predict({"x": value})
            np.testing.assert_allclose(next(iter(out.values())), expected,
                                       rtol=1e-5, atol=1e-6)


def test_a_torch_model_answers_in_inference_mode_as_it_does_outside(models):
    # A worker calls its models in inference mode, where a CPU model with
    # declared tensors answers in one pass (base._Plain): what that pass
    # takes, and what it leaves to the general way, answer alike.
    from mmengine.backends.base import LoadedModel

    reversed_rows = x()[::-1]  # negative strides: torch cannot wrap them
    for value, rows in ((x(), x()), (x(1), x(1)), (reversed_rows, reversed_rows),
                        (np.asfortranarray(x()), x()), (x().astype(">f4"), x()),
                        (torch.from_numpy(x()), x())):
        expected = demo.reference(np.ascontiguousarray(rows), *DIMS, 3)
        for name in ("declared", "derived", "unchecked"):
            model = models[name]
            with torch.inference_mode():
                fast = model.predict({"x": value})
                general = LoadedModel.predict(model, {"x": value})
            outside = model.predict({"x": value})
            for out in (fast, general, outside):
                assert list(out) == list(outside)
                np.testing.assert_allclose(next(iter(out.values())), expected,
                                           rtol=1e-5, atol=1e-6)
    for inputs, message in (({"x": x(3, 5)}, "shape"), ({"x": x().astype(np.float64)},
                                                        "float32, not float64")):
        with torch.inference_mode(), pytest.raises(BadRequest, match=message):
            models["declared"].predict(inputs)


def test_a_torch_model_gets_its_inputs_in_the_callers_order_either_way(tmp_path):
    # A forward(**inputs) may go by their order: the one pass keeps the
    # caller's, as the general way does (not the manifest's).
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(
        "import torch\n\nclass Cat(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.register_buffer('unused', torch.zeros(1))\n\n"
        "    def forward(self, **inputs):\n"
        "        return torch.cat(list(inputs.values()), dim=1)\n")
    save_file({"unused": torch.zeros(1)}, version / "model.safetensors")
    (version / "model.toml").write_text(
        'backend = "safetensors"\n[options]\nmodule = "Cat"\n'
        + "".join(f'[[inputs]]\nname = "{n}"\ndtype = "float32"\nshape = [-1, 1]\n'
                  for n in "ab")
        + '[[outputs]]\nname = "y"\ndtype = "float32"\nshape = [-1, 2]\n')
    model = load(tmp_path, "m")
    a, b = np.zeros((1, 1), np.float32), np.ones((1, 1), np.float32)
    try:
        with torch.inference_mode():
            np.testing.assert_array_equal(model.predict({"b": b, "a": a})["y"], [[1, 0]])
            np.testing.assert_array_equal(model.predict({"a": a, "b": b})["y"], [[0, 1]])
    finally:
        model.close()


@pytest.mark.parametrize("declared, message", [
    ('dtype = "float64"\nshape = [-1, 2]', r"output 'y' is float32 \[3, 2\]; its manifest "
                                            r"declares float64 \[-1, 2\]"),
    ('dtype = "float32"\nshape = [-1, 3]', r"output 'y' is float32 \[3, 2\]; its manifest "
                                            r"declares float32 \[-1, 3\]"),
    ('dtype = "float32"\nshape = [2]', r"output 'y' is float32 \[3, 2\]"),
])
def test_a_torch_models_undeclared_answer_is_internal_in_inference_mode(tmp_path, declared,
                                                                         message):
    path = demo.write_mlp(tmp_path / "m", "safetensors", *DIMS)
    toml = path / "model.toml"
    toml.write_text(toml.read_text().replace('dtype = "float32"\nshape = [-1, 2]', declared))
    model = load(tmp_path, "m")
    try:
        with torch.inference_mode(), pytest.raises(InternalError, match=message):
            model.predict({"x": x()})
    finally:
        model.close()


# -- load failures ----------------------------------------------------------

def test_corrupt_safetensors_is_load_failed(tmp_path):
    path = demo.write_mlp(tmp_path / "m", "safetensors", *DIMS)
    data = (path / "model.safetensors").read_bytes()
    for corrupt in (b"", data[:5], data[:-4], b"\x10" + b"\0" * 7 + b"{not json}......",
                    data.replace(b'"F32"', b'"X32"', 1)):
        (path / "model.safetensors").write_bytes(corrupt)
        with pytest.raises(LoadFailed, match="model.safetensors"):
            load(tmp_path, "m")


@pytest.mark.parametrize("manifest_options, message", [
    ('module = "Missing"', "no torch.nn.Module class 'Missing'"),
    ('colour = 1', "unknown option 'colour'"),
    ('module = "MLP"\nmodule_kwargs = {in_features = 4, hidden = 9, out_features = 2}',
     "size mismatch"),
    ('module = "MLP"\nmodule_kwargs = {width = 4}',
     r"MLP\(\.\.\.\): .*width.* \(its keyword arguments are model.toml's "
     r"\[options.module_kwargs\]\)"),
])
def test_bad_module_is_load_failed(tmp_path, manifest_options, message):
    path = demo.write_mlp(tmp_path / "m", "safetensors", *DIMS, manifest=False)
    (path / "model.toml").write_text("[options]\n" + manifest_options)
    with pytest.raises(LoadFailed, match=message):
        load(tmp_path, "m")


def test_corrupt_torchscript_is_load_failed(tmp_path):
    path = demo.write_mlp(tmp_path / "m", "torchscript", *DIMS)
    data = (path / "model.pt").read_bytes()
    for corrupt in (b"", b"not a zip archive", data[: len(data) // 2]):
        (path / "model.pt").write_bytes(corrupt)
        with pytest.raises(LoadFailed, match="not a loadable TorchScript archive"):
            load(tmp_path, "m")


def test_a_checkpoint_saved_as_torchscript_says_so(tmp_path):
    # torch's own words ("failed locating file constants.pkl") did not say
    # that the file is torch.save's, which the author mistook for TorchScript.
    path = demo.write_mlp(tmp_path / "m", "torchscript", *DIMS)
    torch.save({"w": torch.ones(2)}, path / "model.pt")
    with pytest.raises(LoadFailed, match=r"a torch.save checkpoint, not TorchScript\?"):
        load(tmp_path, "m")


def test_corrupt_export_program_is_load_failed(tmp_path):
    path = demo.write_mlp(tmp_path / "m", "export", *DIMS)
    (path / "model.pt2").write_bytes(b"garbage")
    with pytest.raises(LoadFailed, match="model.pt2"):
        load(tmp_path, "m")


@pytest.mark.parametrize("declared, message", [
    ('name = "features"\ndtype = "float32"\nshape = [-1, 4]',
     r"\(features float32 \[-1, 4\]\) are not the program's \(x float32 \[-1, 4\]\)"),
    ('name = "x"\ndtype = "float64"\nshape = [-1, 4]', r"\(x float64 \[-1, 4\]\)"),
    ('name = "x"\ndtype = "float32"\nshape = [-1, 5]', r"\(x float32 \[-1, 5\]\)"),
])
def test_export_inputs_the_program_does_not_take_are_load_failed(tmp_path, declared, message):
    # Requests are checked against the manifest's inputs and the program is
    # called by its own names: a name of the manifest's alone loaded fine,
    # then failed every request as the caller's ("KeyError: 'x'").
    path = demo.write_mlp(tmp_path / "m", "export", *DIMS, manifest=False)
    (path / "model.toml").write_text(f"[[inputs]]\n{declared}\n")
    with pytest.raises(LoadFailed, match=f"m v1: the manifest's inputs {message}"):
        load(tmp_path, "m")
    (path / "model.toml").write_text('[[inputs]]\nname = "x"\ndtype = "float32"\n'
                                     'shape = [2, 4]\n')  # fewer than the program takes
    model = load(tmp_path, "m")
    assert model.predict({"x": x(2)})["output"].shape == (2, DIMS[2])


@pytest.mark.parametrize("source, message", [
    ("def load(path, device):\n    raise OSError('weights gone')\n"
     "def predict(inputs):\n    return inputs\n", "load\\(\\) raised OSError: weights gone"),
    ("def load(path, device):\n    pass\n", "no predict"),
    ("raise ImportError('no such lib')\n", "handler.py raised ImportError: no such lib"),
    ("def load(:\n", "handler.py raised SyntaxError"),
])
def test_broken_handler_is_load_failed(tmp_path, source, message):
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "handler.py").write_text(source)
    before = set(sys.modules)
    with pytest.raises(LoadFailed, match=message):
        load(tmp_path, "m")
    assert set(sys.modules) == before


def test_a_handler_that_exits_as_it_is_measured_is_closed(tmp_path):
    # Measured after its load, an object of its own raised SystemExit: the
    # exit went on (the worker's loader answers LOAD_FAILED), and the
    # handler's module stayed imported, for good (a review).
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "handler.py").write_text(
        "class Exits:\n    def __sizeof__(self):\n        raise SystemExit(3)\n\n"
        "held = Exits()\n\n"
        "def load(path, device):\n    pass\n\n"
        "def predict(inputs):\n    return inputs\n")
    before = set(sys.modules)
    with pytest.raises(SystemExit):
        load(tmp_path, "m")
    assert set(sys.modules) == before


def handler_model(tmp_path: Path, source: str, manifest: str = "") -> Path:
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    (path / "handler.py").write_text("import numpy as np\ncalls = 0\n"
                                     "def load(path, device):\n    pass\n" + source)
    (path / "model.toml").write_text(manifest)
    return path


def test_an_unloaded_handler_frees_what_it_holds_without_a_full_collection(tmp_path):
    # Its functions and its globals hold each other: what its load() kept
    # (here 4 MiB, on a GPU the weights) lived on after the unload until a
    # full collection, which a worker serving steadily may not make for
    # hours: the next load ran out of memory.
    import weakref

    handler_model(tmp_path, """
def load(path, device):
    global weights
    weights = np.ones(1 << 20, np.float32)

def predict(inputs):
    return {"y": inputs["x"] + weights[0]}
""")
    model = load(tmp_path, "m")
    assert model.predict({"x": np.zeros(2, np.float32)})["y"].tolist() == [1.0, 1.0]
    held = weakref.ref(model.handler.weights)
    gc.collect()  # old now, as a model that served a while is
    gc.disable()
    try:
        model.close()
        assert held() is None
    finally:
        gc.enable()


def test_a_manifest_declares_every_dtype_the_wire_carries(tmp_path):
    # uint16/32/64 travel on every front door; a manifest that declared
    # them was refused, so such a model's inputs went unchecked.
    handler_model(tmp_path, """
def predict(inputs):
    return {"y": inputs["x"].astype(np.uint64) << 40}
""", '[[inputs]]\nname = "x"\ndtype = "uint32"\nshape = [-1]\n'
     '[[outputs]]\nname = "y"\ndtype = "uint64"\nshape = [-1]\n')
    model = load(tmp_path, "m")
    try:
        out = model.predict({"x": np.array([1, 2], np.uint32)})
        assert out["y"].dtype == np.uint64 and out["y"].tolist() == [1 << 40, 2 << 40]
        with pytest.raises(BadRequest, match="must be uint32, not int32"):
            model.predict({"x": np.array([1, 2], np.int32)})
    finally:
        model.close()


def test_torch_outputs_of_every_kind_are_their_values(tmp_path):
    # numpy() refuses a conjugate or negative view and a sparse tensor: a
    # model's answer of one was INTERNAL.
    handler_model(tmp_path, """
import torch

def predict(inputs):
    x = torch.from_numpy(inputs["x"])
    z = torch.complex(x, 2 * x).conj()
    return {"conj": z, "neg": z.imag, "sparse": x.to_sparse(),
            "bf16": x.to(torch.bfloat16), "grad": x.clone().requires_grad_()}
""")
    x = np.arange(4, dtype=np.float32)
    model = load(tmp_path, "m")
    try:
        out = model.predict({"x": x})
        np.testing.assert_array_equal(out["conj"], x - 2j * x)
        for name, want in (("neg", -2 * x), ("sparse", x), ("bf16", x), ("grad", x)):
            assert out[name].dtype == np.float32, name
            np.testing.assert_array_equal(out[name], want, err_msg=name)
    finally:
        model.close()


def test_handler_errors_and_output_shapes(tmp_path):
    handler_model(tmp_path, """
def predict(inputs):
    global calls
    calls += 1
    if "boom" in inputs:
        raise ValueError("the model says no")
    return inputs["a"] * 2, np.float32(calls)
""", '[[outputs]]\nname = "double"\ndtype = "float32"\nshape = [-1]\n'
     '[[outputs]]\nname = "calls"\ndtype = "float32"\nshape = []\n')
    model = load(tmp_path, "m")
    out = model.predict({"a": np.ones(2, np.float32)})
    assert out == {"double": pytest.approx(np.full(2, 2.0)), "calls": 1.0}
    with pytest.raises(BadRequest, match="the model says no"):
        model.predict({"boom": np.ones(1)})
    module_name = model.handler.__name__
    model.close()
    assert module_name not in sys.modules


@pytest.mark.parametrize("returns, message", [
    ('{"y": a.astype(np.float64)}', r"output 'y' is float64 \[3\]; its manifest declares float32"),
    ('{"y": a.reshape(1, 3)}', r"output 'y' is float32 \[1, 3\]; its manifest declares"),
    ('{"z": a}', r"missing \['y'\], unexpected \['z'\]"),
    ('{"y": a, "z": a}', r"missing \[\], unexpected \['z'\]"),
])
def test_outputs_other_than_the_manifest_declares_are_internal_errors(tmp_path, returns,
                                                                       message):
    # The protocols' metadata advertise the declared outputs: no answer may differ.
    handler_model(tmp_path, f"""
def predict(inputs):
    a = inputs["a"]
    return {returns}
""", '[[outputs]]\nname = "y"\ndtype = "float32"\nshape = [-1]\n')
    model = load(tmp_path, "m")
    with pytest.raises(InternalError, match=message):
        model.predict({"a": np.ones(3, np.float32)})
    model.close()


def test_declared_outputs_in_the_other_byte_order_are_the_declared_ones(tmp_path):
    handler_model(tmp_path, """
def predict(inputs):
    return {"y": inputs["a"].astype(">f4")}
""", '[[outputs]]\nname = "y"\ndtype = "float32"\nshape = [-1]\n')
    model = load(tmp_path, "m")
    np.testing.assert_array_equal(model.predict({"a": np.arange(3, dtype=np.float32)})["y"],
                                  [0, 1, 2])
    model.close()


def test_a_handler_runs_outside_inference_mode(tmp_path):
    # A worker's serving thread is in inference mode; a handler may use autograd.
    handler_model(tmp_path, """
import torch
def predict(inputs):
    x = torch.from_numpy(inputs["a"].copy()).requires_grad_()
    with torch.enable_grad():
        (x * x).sum().backward()
    return x.grad
""")
    model = load(tmp_path, "m")
    with torch.inference_mode():
        out = model.predict({"a": np.arange(3, dtype=np.float32)})
    np.testing.assert_array_equal(out["output"], [0, 2, 4])


def test_warmup_runs_once_at_load(tmp_path):
    inputs = '[[inputs]]\nname = "a"\ndtype = "int64"\nshape = [-1, 3]\n'
    handler_model(tmp_path, """
def predict(inputs):
    global calls
    calls += 1
    assert inputs["a"].shape == (1, 3) and inputs["a"].dtype == np.int64
    return inputs
""", "warmup = true\n" + inputs)
    assert load(tmp_path, "m").handler.calls == 1


def test_failed_warmup_is_load_failed(tmp_path):
    handler_model(tmp_path, "def predict(inputs):\n    raise RuntimeError('cold')\n",
                  'warmup = true\n[[inputs]]\nname = "a"\ndtype = "int64"\nshape = [2]\n')
    with pytest.raises(LoadFailed, match="warm-up failed.*cold"):
        load(tmp_path, "m")


@pytest.mark.parametrize("rows, error, message", [
    (1 << 55, Overloaded, "out of memory while warming up: MemoryError"),  # 512 PiB
    (1 << 62, LoadFailed, "warm-up failed: ValueError: array is too big"),
])
def test_a_warmup_input_that_cannot_be_allocated_closes_the_model(tmp_path, rows, error,
                                                                  message):
    # np.zeros' MemoryError or ValueError escaped load_model as itself, and
    # the loaded model was never closed: its handler module stayed in
    # sys.modules with all its load() kept, one more for every retry.
    handler_model(tmp_path, "def predict(inputs):\n    return inputs\n",
                  f'warmup = true\n[[inputs]]\nname = "a"\ndtype = "float32"\n'
                  f'shape = [{rows}, 4]\n')
    before = set(sys.modules)
    with pytest.raises(error, match=f"m v1: {message}"):
        load(tmp_path, "m")
    assert set(sys.modules) == before


def test_device_the_manifest_requires(tmp_path):
    path = demo.write_mlp(tmp_path / "m", "torchscript", *DIMS, manifest=False)
    (path / "model.toml").write_text('device = "cuda"')
    with pytest.raises(LoadFailed, match="requires device 'cuda'"):
        load(tmp_path, "m")


# -- pickles are refused unless trusted -------------------------------------

class Evil:
    """Unpickling this creates a file: proof that the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickled(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("trusted", [False, True])
def test_pickle_as_torchscript_is_never_unpickled(tmp_path, trusted):
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(pickled({"weights": Evil(tmp_path / "pwned")}))
    (path / "model.toml").write_text(f"trusted = {str(trusted).lower()}")
    with pytest.raises(LoadFailed, match="TorchScript"):
        load(tmp_path, "m")
    assert not (tmp_path / "pwned").exists()


def test_a_handler_runs_its_source_never_a_cached_pyc_beside_it(tmp_path):
    # An unchecked-hash .pyc is never compared with its source: a remote
    # source whose handler.py has a digest could send other code in one.
    import py_compile

    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    handler = path / "handler.py"
    handler.write_text("def load(path, device):\n    return None\n\n"
                       "def predict(inputs):\n    return {'y': inputs['x'] + 1}\n")
    other = tmp_path / "other.py"
    other.write_text("def load(path, device):\n    return None\n\n"
                     "def predict(inputs):\n    return {'y': inputs['x'] * 0 + 666}\n")
    py_compile.compile(str(other), cfile=importlib.util.cache_from_source(str(handler)),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    model = load(tmp_path, "m")
    out = model.predict({"x": np.ones(2, np.float32)})
    np.testing.assert_array_equal(out["y"], [2, 2])


# -- programs are held to tensor operators unless trusted ----------------------

@torch.jit.script
def peek(name: str, n: int) -> torch.Tensor:
    return torch.from_file(name, False, n, dtype=torch.float32)


class Reads(torch.nn.Module):
    """Reads the file `name` (4 float32s) with torch.from_file, in forward."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        return x + torch.from_file(self.name, False, 4, dtype=torch.float32).sum()


class Calls(Reads):
    """... from a function forward calls."""

    def forward(self, x):
        return x + peek(self.name, 4).sum()


class Forks(Reads):
    """... from a function forward forks (a subgraph of the fork, not a block)."""

    def forward(self, x):
        return x + torch.jit.wait(torch.jit.fork(peek, self.name, 4)).sum()


class Outer(torch.nn.Module):
    """... from a method of a submodule that forward never calls."""

    def __init__(self, name: str):
        super().__init__()
        self.inner = Hidden(name)

    def forward(self, x):
        return self.inner(x)


class Hidden(torch.nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        return x

    @torch.jit.export
    def peek(self) -> torch.Tensor:
        return peek(self.name, 4)


@pytest.mark.parametrize("how", [Reads, Calls, Forks, Outer],
                         ids=["forward", "calls", "forks", "hidden"])
def test_an_untrusted_torchscript_program_reads_no_file(tmp_path, how):
    # aten::from_file in a program not marked trusted read any file the
    # server could (its config, its control token), and aten::save wrote
    # one: another model's handler.py, run next by its own worker.
    secret = tmp_path / "secret"
    np.arange(4, dtype=np.float32).tofile(secret)
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    torch.jit.script(how(str(secret))).save(str(path / "model.pt"))
    with pytest.raises(LoadFailed, match="calls aten::from_file, which a model not marked "
                                         "trusted may not call"):
        load(tmp_path, "m")
    (path / "model.toml").write_text("trusted = true\n")
    model = load(tmp_path, "m")  # the operator vouches for it
    if how is not Outer:
        out = model.predict({"x": np.zeros(1, np.float32)})
        np.testing.assert_array_equal(out[next(iter(out))], [6.0])


class Saves(torch.nn.Module):
    """Writes its weight to the file `name` as it is unpickled."""

    def __init__(self, name: str):
        super().__init__()
        self.w, self.name = torch.ones(2), name

    def forward(self, x):
        return x + self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return self.w, self.name, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.w, self.name, self.training = state
        torch.save(self.w, self.name)


def respelled(name: str, data: bytes) -> tuple[str, bytes]:
    """Spellings torch's importer reads as the printer's (found by a review)."""
    return name, data.replace(b"torch.save(", b"torch.autograd.save(")


def renamed(name: str, data: bytes) -> tuple[str, bytes]:
    return name.replace("/code/", "/CODE/"), data  # torch finds records whatever their case


def quoted(name: str, data: bytes) -> tuple[str, bytes]:
    """The operator named by a string, which TorchScript's getattr resolves
    (a review's finding: the file was written before the graphs' audit)."""
    return name, data.replace(b"torch.save(", b'getattr(torch, "save")(')


def quoted_op(name: str, data: bytes) -> tuple[str, bytes]:
    return name, data.replace(b"torch.save(", b'getattr(ops.aten, "save")(')


@pytest.mark.parametrize("change", [None, respelled, renamed, quoted, quoted_op])
def test_an_untrusted_torchscript_program_runs_nothing_as_it_loads(tmp_path, change):
    # torch.jit.load runs the program's own __setstate__ as it unpickles:
    # an audit of the loaded graphs came after it had written the file.
    marker = tmp_path / "written"
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    torch.jit.script(Saves(str(marker))).save(str(path / "model.pt"))
    if change is not None:
        with zipfile.ZipFile(path / "model.pt") as archive:
            members = [change(info.filename, archive.read(info))
                       for info in archive.infolist()]
        with zipfile.ZipFile(path / "model.pt", "w") as archive:
            for name, data in members:
                archive.writestr(name, data)
    assert not marker.exists()
    with pytest.raises(LoadFailed, match="calls aten::save, which a model not marked"):
        load(tmp_path, "m")
    assert not marker.exists()
    (path / "model.toml").write_text("trusted = true\n")
    load(tmp_path, "m")  # the operator vouches for it: it runs
    assert marker.exists()


def test_an_untrusted_torchscripts_code_names_no_refused_operator_even_in_a_string(tmp_path):
    # The backstop behind the names read from its code: a spelling that
    # reading misses is refused by the word itself (generated code never
    # has it; an operator vouches for one that does with trusted = true).
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    torch.jit.script(Saves(str(tmp_path / "written"))).save(str(path / "model.pt"))
    with zipfile.ZipFile(path / "model.pt") as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    assert any(b"torch.save(w, name)" in data for _, data in members)
    with zipfile.ZipFile(path / "model.pt", "w") as archive:
        for name, data in members:
            archive.writestr(name, data.replace(b"torch.save(w, name)", b'print("save")'))
    with pytest.raises(LoadFailed, match=r"calls the word 'save' \(a refused operator's name"):
        load(tmp_path, "m")
    (path / "model.toml").write_text("trusted = true\n")
    load(tmp_path, "m")


def test_untrusted_code_nested_past_pythons_stack_is_refused_as_unreadable():
    # Its reading recursed past the stack (a chain of 2,000 terms): a
    # RecursionError, where a LoadFailed says why.
    from mmengine.backends.untrusted import check_script_source

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("m/version", "3\n")  # (torch's reader opens no archive without it)
        z.writestr("m/code/__torch__/m.py", "def f(y):\n    return " + "+".join(["y"] * 2000))
    archive.seek(0)
    with pytest.raises(LoadFailed, match="its program's code cannot be read"):
        check_script_source(archive, "m v1")


def test_an_untrusted_export_program_reads_no_file(tmp_path):
    # A pt2 archive holds no pickle and passes the audit of its members,
    # but its graph may name any operator: this one's first node is
    # rewritten to read a file.
    secret = tmp_path / "secret"
    np.arange(4, dtype=np.float32).tofile(secret)
    path = demo.write_mlp(tmp_path / "m", "export", *DIMS) / "model.pt2"

    def change(name, data):
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        node = program["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.ops.aten.from_file.default"
        node["inputs"] = [
            {"name": "filename", "arg": {"as_string": str(secret)}, "kind": 1},
            {"name": "shared", "arg": {"as_bool": False}, "kind": 1},
            {"name": "size", "arg": {"as_int": 4}, "kind": 1},
            {"name": "dtype", "arg": {"as_scalar_type": 7}, "kind": 2}]
        return json.dumps(program).encode()
    rewrite_pt2(path, change)
    with pytest.raises(LoadFailed, match="calls aten::from_file, which a model not marked"):
        load(tmp_path, "m")
    manifest = path.parent / "model.toml"
    manifest.write_text("trusted = true\n" + manifest.read_text())
    load(tmp_path, "m")  # the operator vouches for it


def rewrite_pt2(path: Path, change) -> None:
    """Rewrite the members of a pt2 archive: change(name, data) -> data or None (drop)."""
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            data = change(info.filename, data)
            if data is not None:
                archive.writestr(info, data)


def evil_sample_inputs(marker: Path):
    return lambda name, data: pickled(Evil(marker)) if "sample_inputs" in name else data


def pickled_weights(name, data):
    if name.endswith("_weights_config.json"):
        config = json.loads(data)
        for entry in config["config"].values():
            entry["use_pickle"] = True
        return json.dumps(config).encode()
    return data


@pytest.mark.parametrize("change, message", [
    ("sample_inputs", "sample inputs that are not plain tensors"),
    (pickled_weights, "pickled payloads"),
    ("extra_member", "may be pickled"),
])
def test_untrusted_export_program_unpickles_nothing(tmp_path, change, message):
    path = demo.write_mlp(tmp_path / "m", "export", *DIMS) / "model.pt2"
    marker = tmp_path / "pwned"
    if change == "sample_inputs":
        change = evil_sample_inputs(marker)
    elif change == "extra_member":
        with zipfile.ZipFile(path, "a") as archive:
            root = archive.namelist()[0].split("/")[0]
            archive.writestr(f"{root}/data/constants/opaque_obj_0", pickled(Evil(marker)))
        change = lambda name, data: data  # noqa: E731
    rewrite_pt2(path, change)
    with pytest.raises(LoadFailed, match=message):
        load(tmp_path, "m")
    assert not marker.exists()


class WithAttributes(torch.nn.Module):
    """Tensors a scripted module keeps as plain attributes: no parameter,
    buffer or state dict entry."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.mean = torch.ones(1 << 18)  # 1 MiB
        self.table = [torch.ones(1 << 16), torch.ones(1 << 16)]  # 512 KiB

    def forward(self, x):
        return self.lin(x) + self.mean[0] + self.table[1][0]


def test_a_torchscripts_tensor_attributes_count_and_are_not_kept_after_it(tmp_path):
    # They went uncounted (the model said 40 bytes), and stayed in memory
    # (a GPU's) after its eviction, in the skeleton kept for its next load.
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    torch.jit.script(WithAttributes()).save(str(path / "model.pt"))
    model = load(tmp_path, "m")
    assert model.nbytes >= (1 << 20) + (1 << 19)
    kept = len(SKELETONS)
    model.close()
    assert len(SKELETONS) == kept


class WithConstants(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.shift = torch.nn.Linear(4, 2), torch.ones(2)  # (no parameter or buffer)

    def forward(self, x):
        return self.lin(x) + self.shift + torch.tensor([1.0, 2.0])


def test_an_export_programs_constants_go_to_its_device(tmp_path):
    # module().to(device) moved its parameters and buffers, not its
    # constants (a tensor made in forward, one that is neither): on a GPU
    # every call failed on them. The meta device stands in for a GPU here.
    from mmengine.backends.export import ExportModel

    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    eager = WithConstants()
    torch.export.save(torch.export.export(eager, (torch.ones(3, 4),)), str(path / "model.pt2"))
    spec = Repository(tmp_path).resolve("m")
    model = ExportModel(spec, torch.device("meta"), torch.export.load(str(path / "model.pt2")))
    tensors = [v for m in model.module.modules() for v in vars(m).values()
               if isinstance(v, torch.Tensor)] + list(model.module.state_dict().values())
    assert len(tensors) >= 4 and all(t.is_meta for t in tensors)
    model = load(tmp_path, "m")  # and on the CPU, as it was
    (got,) = model.predict({"x": np.ones((3, 4), np.float32)}).values()
    np.testing.assert_allclose(got, eager(torch.ones(3, 4)).detach().numpy(), rtol=1e-6)


def two_faced(for_torch: bytes, for_zipfile: bytes) -> bytes:
    """One file holding two zip archives: torch's reader (miniz) takes the
    central directory the end record points at, `for_torch`'s; Python's
    zipfile, finding another just before the end record, takes the bytes
    between for data put before an archive and reads `for_zipfile`'s."""
    def split(z: bytes) -> tuple[bytes, list[bytearray], int]:
        end = z.rfind(b"PK\x05\x06")
        n, size, at = struct.unpack("<HII", z[end + 10:end + 20])
        entries, p = [], at
        while p < at + size:
            name, extra, comment = struct.unpack("<HHH", z[p + 28:p + 34])
            entries.append(bytearray(z[p:p + 46 + name + extra + comment]))
            p += 46 + name + extra + comment
        return z[:at], entries, n

    def padded(entries: list[bytearray], to: int) -> bytes:
        short = to - sum(map(len, entries))  # a comment on the last entry
        last = entries[-1]
        last[32:34] = struct.pack("<H", struct.unpack("<H", last[32:34])[0] + short)
        return b"".join(entries) + b" " * short

    local_t, dir_t, n = split(for_torch)
    local_z, dir_z, _ = split(for_zipfile)
    size = max(sum(map(len, dir_t)), sum(map(len, dir_z)))
    for entry in dir_z:  # zipfile adds what it took for prepended data: `size`
        at = struct.unpack("<I", entry[42:46])[0]
        entry[42:46] = struct.pack("<I", at + len(local_t) - size)
    return (local_t + local_z + padded(dir_t, size) + padded(dir_z, size) + b"PK\x05\x06"
            + struct.pack("<HHHHIIH", 0, 0, n, n, size, len(local_t) + len(local_z), 0))


def test_an_untrusted_torchscript_is_audited_as_torch_reads_it(tmp_path):
    # Its code was read through zipfile, which one file can show another
    # archive than torch reads: the audit read a harmless program, and the
    # one that loaded wrote a file as it was unpickled (a review).
    marker = tmp_path / "written"
    torch.jit.script(Saves(str(marker))).save(str(tmp_path / "saves.pt"))
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "harmless.pt"))
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(two_faced((tmp_path / "saves.pt").read_bytes(),
                                              (tmp_path / "harmless.pt").read_bytes()))
    with zipfile.ZipFile(path / "model.pt") as archive:  # what zipfile shows
        assert not any(b"save" in archive.read(n) for n in archive.namelist()
                       if n.endswith(".py"))
    with pytest.raises(LoadFailed, match="calls aten::save, which a model not marked"):
        load(tmp_path, "m")
    assert not marker.exists()


def test_an_untrusted_export_program_is_audited_as_torch_reads_it(tmp_path):
    # As the TorchScript above: zipfile read a program of plain weights,
    # torch one whose weights are a pickle, which it unpickled (a review).
    marker = tmp_path / "pwned"
    path = demo.write_mlp(tmp_path / "m", "export", *DIMS) / "model.pt2"
    harmless = path.read_bytes()

    def evil(name, data):
        if "/data/weights/weight_" in name:
            return pickled(Evil(marker))
        return pickled_weights(name, data)
    rewrite_pt2(path, evil)
    path.write_bytes(two_faced(path.read_bytes(), harmless))
    with pytest.raises(LoadFailed, match="pickled payloads"):
        load(tmp_path, "m")
    assert not marker.exists()


@pytest.mark.parametrize("stored", ["none", "one value"])
def test_an_untrusted_export_program_makes_no_tensor_larger_than_its_bytes(tmp_path, stored):
    # A 4 KB archive whose weight's record is empty while its config says
    # 64M values: torch made them as zeros, 256 MiB past what the load had
    # reserved (the file's size); one value spread by a stride of 0 is as
    # large once copied to a GPU (a review).
    path = demo.write_mlp(tmp_path / "m", "export", *DIMS) / "model.pt2"
    values = 1 << 26

    def change(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            entry = next(iter(config["config"].values()))
            entry["tensor_meta"]["sizes"] = [{"as_int": values}]
            entry["tensor_meta"]["strides"] = [{"as_int": 0 if stored == "one value" else 1}]
            return json.dumps(config).encode()
        if name.endswith("/data/weights/weight_0"):
            return b"" if stored == "none" else data[:4]
        return data
    rewrite_pt2(path, change)
    said = (rf"declares '.*' over {4 * values} bytes, past the 0 of its record"
            if stored == "none" else r"has tensors of \d+ bytes in a file of \d+ \(spread")
    with pytest.raises(LoadFailed, match=said):
        load(tmp_path, "m")


class Broadcast(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.zeros(1).expand(4))  # 4 bytes, 4 values

    def forward(self, x):
        return x + self.bias


# torch's loader, of a buffer that views less than its storage's whole: its
# own note, not mmengine's.
@pytest.mark.filterwarnings("ignore:No complete tensor found in the group:UserWarning")
def test_an_untrusted_export_program_of_a_small_broadcast_buffer_loads(tmp_path):
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    torch.export.save(torch.export.export(Broadcast(), (torch.ones(4),)),
                      str(path / "model.pt2"))
    (got,) = load(tmp_path, "m").predict({"x": np.ones(4, np.float32)}).values()
    assert got.tolist() == [1.0] * 4


def test_an_untrusted_export_program_of_compressed_records_is_refused(tmp_path):
    # Held to its file's size, the load made 256 MiB of a record deflated
    # to 256 KB (a review).
    path = demo.write_mlp(tmp_path / "m", "export", *DIMS) / "model.pt2"
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data + bytes(1 << 20) if "weight_0" in info.filename
                             else data)
    with pytest.raises(LoadFailed, match=r"holds \d+ bytes of records in a file of \d+ "
                                         r"\(compressed\)"):
        load(tmp_path, "m")


def test_an_untrusted_export_program_is_never_read_as_the_old_format(tmp_path):
    # Where its reader fails on an archive, torch.export.load reads it again
    # as the old format, through zipfile, and unpickles its state dict: one
    # file showed the audit (torch's reader) a bare archive and the old
    # format a pickle (a review of the fix above).
    from torch._export.serde.schema import SCHEMA_VERSION
    from torch._export.serde.serialize import serialize

    marker = tmp_path / "pwned"
    bare = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(bare)
    writer.set_min_version(6)  # (its version record then .data/version, as the new format's)
    writer.write_record("archive_format", b"pt2", 3)
    writer.write_end_of_file()
    program = serialize(torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),)))
    old = io.BytesIO()
    with zipfile.ZipFile(old, "w") as archive:
        archive.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        archive.writestr("serialized_exported_program.json", program.exported_program)
        archive.writestr("serialized_state_dict.pt", pickled(Evil(marker)))
        archive.writestr("serialized_constants.pt", program.constants)
        archive.writestr("serialized_example_inputs.pt", program.example_inputs)
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    (path / "model.pt2").write_bytes(two_faced(bare.getvalue(), old.getvalue()))
    with pytest.raises(LoadFailed, match="not a loadable torch.export program"):
        load(tmp_path, "m")
    assert not marker.exists()


def test_an_untrusted_export_programs_sizes_run_no_python(tmp_path):
    # torch.export.load hands each symbolic size's expression to
    # sympy.sympify, which is eval: one rewritten to call os.system ran it
    # as the program loaded (found by a review).
    path = demo.write_mlp(tmp_path / "m", "export", *DIMS) / "model.pt2"
    marker = tmp_path / "pwned"
    payload = f"(__import__('os').system('touch {marker}'), Symbol("

    def change(name, data):
        if name.endswith("models/model.json"):
            assert b"Symbol(" in data  # its batch size is symbolic
            return data.replace(b"Symbol(", payload.encode(), 1).replace(
                b"integer=True)", b"integer=True))[1]", 1)
        return data
    rewrite_pt2(path, change)
    with pytest.raises(LoadFailed, match="size expression that is not one"):
        load(tmp_path, "m")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["octal-escapes", "fullwidth-attribute", "power-tower",
                                 "left-tower", "xor-tower", "huge-float"])
def test_an_untrusted_export_programs_sizes_hide_no_python(tmp_path, how):
    # The audit read the text's letters: a string of octal escapes, which
    # floor() hands to sympify again, had none, and a fullwidth attribute
    # name (which Python folds to ASCII) no ASCII one (a review's finding).
    # Nor may a size take the loader's memory: 10 ** 10 ** 10 is 4 GB.
    path = demo.write_mlp(tmp_path / "m", "export", *DIMS) / "model.pt2"
    marker = tmp_path / "pwned"
    code = f"(__import__('os').system('touch {marker}'), Integer(0))[1]"
    octal = "".join("\\%03o" % ord(c) for c in code)
    if how == "octal-escapes":
        prefix = f"floor('{octal}') + "
    elif how in ("power-tower", "left-tower", "xor-tower", "huge-float"):
        prefix = {"power-tower": "Pow(Integer(10), Pow(Integer(10), Integer(10)))",
                  "left-tower": "((((10**64)**64)**64)**64)**64",
                  "xor-tower": "10^10^10",  # sympify reads ^ as **
                  "huge-float": "floor(1e1000000)"}[how] + " + "
    else:  # .subs, in fullwidth letters: a method that evaluates its string
        prefix = f"Integer(0).\uff53\uff55\uff42\uff53('{octal}', 0) + "

    def change(name, data):
        if name.endswith("models/model.json"):
            graph = json.loads(data)
            pending, done = [graph], False
            while pending and not done:  # the first size expression
                value = pending.pop()
                if isinstance(value, dict):
                    if isinstance(value.get("expr_str"), str):
                        value["expr_str"] = prefix + value["expr_str"]
                        done = True
                    pending.extend(value.values())
                elif isinstance(value, list):
                    pending.extend(value)
            assert done  # its batch size is symbolic
            return json.dumps(graph).encode()
        return data
    rewrite_pt2(path, change)
    with pytest.raises(LoadFailed, match="size expression that is not one"):
        load(tmp_path, "m")
    assert not marker.exists()


def test_an_untrusted_export_program_with_a_member_twice_is_refused(tmp_path):
    # Python's zipfile reads the last of two members of one name, torch's
    # reader the first: a pickling config first and a plain one last ran
    # the pickle behind an audit that read the plain one.
    path = demo.write_mlp(tmp_path / "m", "export", *DIMS) / "model.pt2"
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    config = next(info for info, _ in members if info.filename.endswith("_weights_config.json"))
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            if info is config:
                root = info.filename.split("/")[0]
                evil = json.loads(data)
                entry = next(iter(evil["config"].values()))
                entry.update(use_pickle=True, path_name="weight_99")
                archive.writestr(f"{root}/data/weights/weight_99", pickled(Evil(marker)))
                archive.writestr(info, json.dumps(evil).encode())  # torch's reader takes this
                with pytest.warns(UserWarning, match="Duplicate name"):
                    archive.writestr(info, data)  # zipfile's takes this
            else:
                archive.writestr(info, data)
    with pytest.raises(LoadFailed, match="twice"):
        load(tmp_path, "m")
    assert not marker.exists()


def test_an_untrusted_export_program_whose_payload_is_no_tensor_file_is_refused(tmp_path):
    # torch unpickles a constant whose file is named opaque_obj*, whatever
    # use_pickle says.
    path = demo.write_mlp(tmp_path / "m", "export", *DIMS) / "model.pt2"

    def opaque(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["path_name"] = "opaque_obj_0"
            return json.dumps(config).encode()
        return data
    rewrite_pt2(path, opaque)
    with pytest.raises(LoadFailed, match="pickled payloads"):
        load(tmp_path, "m")


def test_trusted_export_program_is_loaded_as_it_is(tmp_path):
    path = demo.write_mlp(tmp_path / "m", "export", *DIMS)
    marker = tmp_path / "pwned"
    rewrite_pt2(path / "model.pt2", evil_sample_inputs(marker))
    (path / "model.toml").write_text("trusted = true\n")
    with pytest.raises(LoadFailed, match="model.pt2"):
        load(tmp_path, "m")  # an open file is no sample input
    assert marker.exists()  # the operator's trust was honoured: the pickle ran


# -- bytes --------------------------------------------------------------------

@pytest.mark.parametrize("backend", demo.BACKENDS)
def test_nbytes_covers_the_weights(tmp_path, backend):
    dims = (64, 256, 16) if backend != "export" else DIMS
    demo.write_mlp(tmp_path / "m", backend, *dims)
    model = load(tmp_path, "m")
    weights = module_bytes(demo.mlp(*dims, seed=0))
    assert model.nbytes >= weights
    if backend != "handler":
        assert model.tensor_bytes() == weights
    else:  # its arrays, by what its globals reach, and their dict's few objects
        held = held_bytes(model.handler, torch.device("cpu"))
        assert weights <= held < weights + (4 << 10)
        assert model.tensor_bytes() == max(held, model.spec.estimated_bytes)  # its file's


def test_a_handler_is_measured_by_what_its_globals_reach(tmp_path):
    # A handler counted its file's bytes: five that each kept 60 MiB sat in
    # a budget of 100 MiB as 910 bytes. Each buffer counts once, through
    # views and torch.from_numpy; its own classes' and functions' state
    # counts; a file it maps into memory, the modules it imports and what
    # another model holds do not.
    np.save(tmp_path / "mapped.npy", np.zeros(1 << 20, np.float64))  # 8 MiB on disk
    handler_model(tmp_path, f"""
import torch
weights = view = shared = net = scratch = mapped = None
class Cache:
    rows = None
def scaled(x, by=np.ones(1000, np.float32)):  # 4,000 bytes
    return x * by
def load(path, device):
    global weights, view, shared, net, scratch, mapped
    weights = np.zeros((1024, 1024), np.float32)                 # 4 MiB
    view, shared = weights[:10], torch.from_numpy(weights)       # the same 4 MiB
    shared = [torch.from_numpy(weights[512:]), shared]           # and its second half
    net = torch.nn.Linear(256, 1000)                             # 1,028,000 bytes
    scratch = {{"rows": [np.ones(2500, np.float64) for _ in range(4)]}}  # 80,000 bytes
    Cache.rows = torch.zeros(50_000, dtype=torch.int16)          # 100,000 bytes
    mapped = np.load({str(tmp_path / "mapped.npy")!r}, mmap_mode="r")
def predict(inputs):
    return inputs
""")
    model = load(tmp_path, "m")
    held = (4 << 20) + 1_028_000 + 80_000 + 100_000 + 4_000
    assert held <= model.nbytes < held + (16 << 10)
    assert model.nbytes == model.tensor_bytes()
    model.close()


def test_a_handler_walk_finds_the_arrays_first_and_never_fails_a_load(tmp_path):
    # Depth first, a list of 250,000 strings met first took the whole walk
    # and a 40 MiB array beside it was not counted; an object that cannot
    # say its size (or a sparse tensor, which has no storage) failed the load,
    # and the loaded handler was never closed.
    handler_model(tmp_path, """
import torch
class Odd:
    def __sizeof__(self):
        raise RuntimeError("no size")
def load(path, device):
    global words, weights, odd, adjacency, vocabulary
    words = [f"token{i}" for i in range(250_000)]
    weights = np.zeros(10 << 20, np.float32)                     # 40 MiB
    odd = Odd()
    adjacency = torch.eye(1000).to_sparse()                      # 1,000 values, 2,000 indices
    vocabulary = {"a" * 1000: 1}                                 # str keys: gc gives none
def predict(inputs):
    return inputs
""")
    model = load(tmp_path, "m")
    assert model.nbytes >= (40 << 20) + 1_000 * 4 + 2_000 * 8 + 1_000
    model.close()


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # mkldnn's
def test_a_handler_walk_counts_what_bound_methods_and_shared_buffers_hold_once():
    # Found by a review of the walk: a bound method hid the object it is
    # bound to (0 bytes); an mkldnn module's tensors (no storage) counted
    # nothing; a buffer viewed through bytes and a tensor was
    # counted twice; a sparse tensor's parts, made by the walk and freed,
    # left their addresses to the next one's, which passed for seen.
    import types

    def sparse():  # 1,000 values, 2,000 indices: 20,000 bytes
        return torch.eye(1000).to_sparse()

    from torch.utils import mkldnn

    handler = types.ModuleType("a_handler")
    handler.forward = torch.nn.Linear(1000, 1000).forward       # 4,004,000 bytes
    handler.fast = mkldnn.to_mkldnn(torch.nn.Linear(100, 100))  # 40,400 bytes, opaque
    handler.lookup = {i: float(i) for i in range(1000)}.get
    blob = bytearray(1 << 20)
    handler.array = np.frombuffer(blob, np.uint8)
    handler.tensor = torch.frombuffer(blob, dtype=torch.uint8)
    handler.first, handler.box = sparse(), [sparse()]
    held = held_bytes(handler, torch.device("cpu"))
    lookup = 1000 * (28 + 24) + 36_000  # its keys and values, and the dict
    wanted = 4_004_000 + 40_400 + (1 << 20) + 2 * 20_000 + lookup
    assert wanted <= held < wanted + (16 << 10), (held, wanted)


def test_a_handler_counts_no_less_than_its_manifest_says(tmp_path):
    handler_model(tmp_path, "def predict(inputs):\n    return inputs\n", f"bytes = {50 << 20}\n")
    assert load(tmp_path, "m").nbytes == 50 << 20


def test_a_module_with_a_sparse_tensor_is_measured_by_its_parts(tmp_path):
    # A sparse tensor has no storage: counting its module's bytes raised
    # NotImplementedError out of load_model, and again as it closed.
    write_sparse_model(tmp_path / "s" / "1")
    model = load(tmp_path, "s")
    assert model.nbytes == module_bytes(model.module) == 40 + 4 * 4 + 8 * 8
    assert model.predict({"x": np.ones((1, 4), np.float32)})["output"].shape == (1, 2)
    model.close()


class _Hollow(torch.Tensor):
    """A tensor subclass with no storage behind it (a wrapper of nothing)."""

    @staticmethod
    def __new__(cls):
        return torch.Tensor._make_wrapper_subclass(cls, (4,), dtype=torch.float32)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # mkldnn's
def test_an_opaque_tensor_counts_its_elements_and_one_without_storage_is_dropped(tmp_path):
    # An mkldnn tensor (torch.utils.mkldnn's CPU modules) has no storage:
    # counting its bytes raised. And a tensor of no storage at all, in a
    # TorchScript or export model (which keeps a skeleton's key), raised
    # again as its model closed, and the model kept its module, where
    # load_model says LoadFailed.
    from torch.utils import mkldnn

    opaque = mkldnn.to_mkldnn(torch.nn.Linear(256, 256))
    assert module_bytes(opaque) == (256 * 256 + 256) * 4
    demo.write_mlp(tmp_path / "m", "torchscript", *DIMS)
    module = torch.nn.Module()
    module.register_buffer("w", _Hollow())
    model = TorchModel(Repository(tmp_path).resolve("m", None), torch.device("cpu"), module)
    model.skeleton_key = ("m", 1)
    with pytest.raises(RuntimeError, match="invalid python storage"):
        model.tensor_bytes()
    kept = len(SKELETONS)
    model.close()
    assert model.module is None and len(SKELETONS) == kept


class _WithConstant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(10, 1000)  # 44,000 bytes of parameters
        self.scale = torch.full((1000,), 2.0)    # 4,000 bytes, neither parameter nor buffer

    def forward(self, x):
        return self.linear(x) * self.scale


def test_nbytes_counts_what_no_state_dict_holds(tmp_path):
    # torch.export lifts a plain tensor attribute into a constant that its
    # module keeps as an attribute; a frozen TorchScript module keeps its
    # weights in its graph, where only the artifact's estimate counts them.
    # Neither is kept as an empty skeleton when closed: it would keep those.
    (tmp_path / "c" / "1").mkdir(parents=True)
    program = torch.export.export(_WithConstant(), (torch.ones(1, 10),))
    torch.export.save(program, tmp_path / "c" / "1" / "model.pt2")
    model = load(tmp_path, "c")
    assert model.nbytes == module_bytes(model.module) == 44_000 + 4_000
    kept = len(SKELETONS)
    model.close()
    assert len(SKELETONS) == kept
    (tmp_path / "f" / "1").mkdir(parents=True)
    frozen = torch.jit.freeze(torch.jit.script(demo.mlp(64, 256, 16, seed=0)).eval())
    frozen.save(str(tmp_path / "f" / "1" / "model.pt"))
    model = load(tmp_path, "f")
    assert module_bytes(model.module) == 0
    assert model.nbytes == model.spec.estimated_bytes >= module_bytes(demo.mlp(64, 256, 16, 0))
    model.close()
    assert len(SKELETONS) == kept


# -- the safetensors format ---------------------------------------------------

def test_a_module_with_buffers_not_in_its_file_keeps_the_files_tensors(tmp_path):
    # Built for real (its buffer is no file's), the module copied the file
    # into float32 weights of its own: the model held the file's bytes and
    # the copy, and read float16 weights as float32 until its host-tier
    # copy rebound them as they are (its requests failed then: a review).
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    (path / "model.py").write_text(
        "import torch\n\n"
        "class Model(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(256, 256)\n"
        "        self.register_buffer('scale', torch.full((1,), 2.0), persistent=False)\n\n"
        "    def forward(self, x):\n"
        "        return self.lin(x) * self.scale\n")
    weights = {"lin.weight": torch.randn(256, 256).half(), "lin.bias": torch.zeros(256).half()}
    save_file(weights, path / "model.safetensors")
    model = load_model(Repository(tmp_path).resolve("m"), "cpu")
    try:
        assert model.module.lin.weight.dtype == torch.float16
        assert model.nbytes < 1.5 * sum(t.nbytes for t in weights.values())  # not twice
        x = np.ones((1, 256), np.float16)
        np.testing.assert_allclose(model.predict({"x": x})["output"],
                                   2 * x.astype(np.float32) @ weights["lin.weight"].float()
                                   .numpy().T, rtol=1e-2, atol=1e-1)
    finally:
        model.close()


def test_safetensors_round_trip(tmp_path):
    tensors = {f"t_{name}": (torch.arange(6) % 2).to(dtype).reshape(2, 3)
               for name, dtype in DTYPES.items()}
    tensors |= {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
                "strided": torch.arange(12.0).reshape(3, 4).t()}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    data = (tmp_path / "t.safetensors").read_bytes()
    assert int.from_bytes(data[:8], "little") % 8 == 0
    loaded = load_file(tmp_path / "t.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name


def test_demo_repository_serves_every_model(tmp_path):
    models = demo.write_demo_repository(tmp_path, n_models=20, seed=5)
    repo = Repository(tmp_path)
    assert repo.names() == tuple(sorted(m.name for m in models))
    assert {m.backend for m in models} == set(demo.BACKENDS)
    for m in models:
        assert repo.versions(m.name) == m.versions
        model = load_model(repo.resolve(m.name))
        inputs = x(2, m.in_features)
        np.testing.assert_allclose(model.predict({"x": inputs})["y"], m.reference(inputs),
                                   rtol=1e-5, atol=1e-5)
        model.close()


def test_header_reader_knows_the_backends_dtypes():
    from mmengine.tensorfile import ITEMSIZE

    assert {k: v.itemsize for k, v in DTYPES.items()} == ITEMSIZE


def test_warm_imports_ahead_only_for_backends_the_repository_holds(tmp_path):
    # A worker warms on a thread of its own at start: torch.export's
    # serializer is what a first export load spent most of its 1.6 s on.
    demo.write_mlp(tmp_path / "plain", "safetensors", 4, 8, 2)
    assert backends.warm(str(tmp_path)) == []
    assert backends.warm("") == []
    demo.write_mlp(tmp_path / "exported", "export", 4, 8, 2)
    assert backends.warm(str(tmp_path)) == ["export"]
    assert backends.SLOW_FIRST_IMPORTS["export"][0] in sys.modules


def test_a_model_out_of_device_memory_is_overloaded_not_its_callers_fault(tmp_path):
    # Caught by torch.OutOfMemoryError, an alias that torch 2.3 and 2.4
    # (both within the declared range) lack: every model exception was then
    # an AttributeError there.
    handler_model(tmp_path, """
import torch

def predict(inputs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
""")
    model = load(tmp_path, "m")
    try:
        with pytest.raises(Overloaded, match="out of memory"):
            model.predict({"x": np.ones(2, np.float32)})
    finally:
        model.close()
