"""torch.export programs (`model.pt2`), opened with torch.export.load.

torch.export.load unpickles in several places: weights and constants saved
with pickle, custom and opaque objects, and the sample inputs, which it
retries with weights_only=False when the safe load fails. Unless the
manifest says `trusted = true`, the archive is read into memory once and
audited, then loaded from those same bytes (the file cannot change in
between): every member must be one that holds no pickle, no payload config
may ask for pickle, and the sample inputs must load with weights_only=True,
so the unsafe retry never runs. Archives that need more must be trusted.
The program may then call only torch's tensor operators (untrusted.py).

Inputs are passed the way the program was exported: positionally for its
args, by keyword for its kwargs, named as the program names them. Without
declared inputs, requests are checked against the program's signature;
declared ones must be its names, dtypes and ranks (a load fails else).
"""
from __future__ import annotations

import ast
import io
import json
import math
import re
from typing import Any

import torch

from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE as _DTYPES
from torch.export.passes import move_to_device_pass
from torch.export.pt2_archive._package import load_pt2

from mmengine.backends import untrusted
from mmengine.backends.base import OUT_OF_MEMORY, TorchModel, load_kept
from mmengine.errors import LoadFailed
from mmengine.storage import DTYPES, ModelSpec, TensorSpec, open_artifact

# Records of a pt2 archive (under its one root folder, which torch's reader
# leaves out of their names) that hold no pickle, except the sample inputs,
# which are checked with weights_only=True.
_PLAIN_MEMBER = re.compile(r"""(?:
      archive_format | archive_version | byteorder | \.data/version | \.data/serialization_id
    | models/[^/]+\.json
    | data/weights/(?:weight_\d+ | [^/]+_weights_config\.json)
    | data/constants/(?:tensor_\d+ | [^/]+_constants_config\.json)
    | data/sample_inputs/[^/]+\.pt
    | extra/[^/]+
)""", re.X)
_PAYLOAD_CONFIG = re.compile(r"data/(?:weights|constants)/[^/]+_config\.json")
_SAMPLE_INPUTS = re.compile(r"data/sample_inputs/[^/]+\.pt")
_PLAIN_PAYLOAD = re.compile(r"weight_\d+|tensor_\d+")  # a payload config's path_name
_GRAPH = re.compile(r"models/[^/]+\.json")
# What a symbolic size's expression may name: torch.export.load hands each
# to sympy.sympify, which is eval (a size rewritten to run os.system ran as
# the program loaded). Symbols are a letter or few and digits (s77, u0).
_SIZE_NAMES = frozenset("""
    Symbol Integer Rational Float Number Mul Add Pow Mod Max Min Abs Eq Ne Lt Le Gt Ge
    And Or Not floor ceiling sqrt oo nan zoo true false
    FloorDiv CleanDiv CeilDiv ModularIndexing PythonMod Where LShift RShift
    PowByNatural FloatPow FloatTrueDiv IntTrueDiv CeilToInt FloorToInt TruncToInt
    TruncToFloat RoundToInt RoundDecimal ToFloat Identity BitwiseFn_bitwise_and
    BitwiseFn_bitwise_or IsNonOverlappingAndDenseIndicator
""".split())
_ASSUMPTIONS = frozenset("""
    positive negative integer nonnegative nonpositive real finite zero even odd
""".split())
_SYMBOL = re.compile(r"[a-z]{1,3}\d+")
MAX_SIZE_EXPRESSION = 1 << 16  # characters: torch writes tens
# What raises a number to (or shifts it by) its second argument, and the
# operators of Python's that an expression may use (not ^, which sympify
# reads as **, nor shifts).
_GROWERS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift"})
_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
MAX_EXPONENT = 64


class ExportModel(TorchModel):
    def __init__(self, spec: ModelSpec, device: torch.device, program: Any) -> None:
        where = f"{spec.name} v{spec.version}"
        args_spec, kwargs_spec = program.call_spec.in_spec.children()
        names = list(program.graph_signature.user_inputs)
        if (args_spec.num_leaves != args_spec.num_children
                or kwargs_spec.num_leaves != kwargs_spec.num_children
                or len(names) != args_spec.num_children + kwargs_spec.num_children):
            raise LoadFailed(f"{where}: the program takes nested inputs; mmengine passes a "
                             f"flat set of named tensors")
        signature = _signature(program, names)
        if spec.inputs:
            _check_declared(spec.inputs, names, signature, where)
        # The pass moves its constants too (a tensor made in forward, or one
        # that is no parameter or buffer), which module().to() leaves where
        # they were loaded: every call on a GPU failed on them.
        module = move_to_device_pass(program, device).module()
        super().__init__(spec, device, module, inputs=signature)
        self._args = names[:args_spec.num_children]
        self._kwargs = names[args_spec.num_children:]

    def _forward(self, tensors: dict[str, torch.Tensor]) -> Any:
        return self.module(*(tensors[n] for n in self._args),
                           **{n: tensors[n] for n in self._kwargs})


def load(spec: ModelSpec, device: torch.device, host: str | None = None) -> ExportModel:
    return load_kept(spec, device, host, lambda: _parse(spec, device))


def _parse(spec: ModelSpec, device: torch.device) -> ExportModel:
    where = f"{spec.name} v{spec.version}"
    path = spec.path / spec.artifact
    try:
        f, _ = open_artifact(path)
        with f:
            if spec.trusted:  # (a compressed copy in the disk cache cannot seek)
                program = torch.export.load(f if f.seekable() else io.BytesIO(f.read()))
            else:
                data = f.read()
                _audit(data, where)
                # Not torch.export.load: where its reader fails, it reads
                # the bytes again as the old format, through zipfile, and
                # unpickles its weights (the audit's reader is its new one).
                program = load_pt2(io.BytesIO(data)).exported_programs.get("model")
                if program is None:
                    raise LoadFailed(f"{where}: model.pt2 holds no program named 'model' "
                                     f"(torch.export.save's)")
                untrusted.check_export(program, where)
    except (LoadFailed, *OUT_OF_MEMORY):  # out of memory: said as such by load_model
        raise
    except Exception as e:
        raise LoadFailed(f"{where}: {path.name} is not a loadable torch.export "
                         f"program: {type(e).__name__}: {e}") from e
    return ExportModel(spec, device, program)


def _audit(data: bytes, where: str) -> None:
    """LoadFailed unless loading `data` can unpickle nothing but tensors,
    and makes none larger than its bytes."""
    def refuse(why: str) -> LoadFailed:
        return LoadFailed(f"{where}: model.pt2 {why}; it is not marked trusted, so "
                          f"it is not loaded (set trusted = true in model.toml "
                          f"only for a source you trust)")

    try:  # as torch.export.load reads it (untrusted.torch_records: not zipfile)
        archive, members = untrusted.torch_records(io.BytesIO(data))
    except RuntimeError as e:
        raise LoadFailed(f"{where}: model.pt2 is not a pt2 archive: {e}") from e
    # What the archive's tensors take: the load reserved the file's size.
    # Its records as they are read (one stored compressed is larger), and
    # each tensor whole (a copy to a GPU makes one spread over a stride of
    # 0 whole), each record's once (tied weights share one).
    records = sum(archive.get_record_size(member) for member in members)
    if records > len(data):
        raise refuse(f"holds {records} bytes of records in a file of {len(data)} "
                     f"(compressed)")
    tensors: dict[str, int] = {}
    # A record is found by its name without regard to case, the first of
    # that name: two are refused, as one of them would go unread here.
    seen = set()
    for member in members:
        if member.casefold() in seen:
            raise refuse(f"holds {member!r} twice")
        seen.add(member.casefold())
        if not _PLAIN_MEMBER.fullmatch(member):
            raise refuse(f"holds {member!r}, which may be pickled")
        if _PAYLOAD_CONFIG.fullmatch(member):
            try:
                config = json.loads(archive.get_record(member))["config"]
                entries = [(e.get("use_pickle"), e.get("path_name")) for e in config.values()]
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise refuse(f"has a payload config that is not one ({member})") from None
            # torch unpickles what use_pickle marks, and any payload whose
            # file name is not a plain tensor's.
            if any(pickled or not (isinstance(name, str) and _PLAIN_PAYLOAD.fullmatch(name))
                   for pickled, name in entries):
                raise refuse(f"stores pickled payloads ({member})")
            _check_payload_sizes(archive, member, config, refuse, tensors)
        elif _GRAPH.fullmatch(member):
            _check_expressions(archive.get_record(member), refuse)
        elif _SAMPLE_INPUTS.fullmatch(member):
            try:
                torch.load(io.BytesIO(archive.get_record(member)), weights_only=True)
            except Exception as e:
                raise refuse(f"has sample inputs that are not plain tensors "
                             f"({type(e).__name__})") from e
    whole = sum(tensors.values())
    if whole > len(data):
        raise refuse(f"has tensors of {whole} bytes in a file of {len(data)} (spread over "
                     f"strides of 0)")


def _check_payload_sizes(archive: Any, member: str, config: dict, refuse,
                         tensors: dict[str, int]) -> None:
    """Refuses a payload whose tensor, as its config describes it, reaches
    past its record: torch makes an empty record's tensor as zeros of the
    size said, memory that the load's reservation (the file's size) leaves
    out. Adds each record's tensor bytes, whole, to `tensors`."""
    folder = member.rpartition("/")[0]
    for key, entry in config.items():
        try:
            meta = entry["tensor_meta"]
            sizes = [size["as_int"] for size in meta["sizes"]]
            strides = [stride["as_int"] for stride in meta["strides"]]
            offset = meta["storage_offset"]["as_int"]
            dtype = _DTYPES[meta["dtype"]]
            record = f"{folder}/{entry['path_name']}"
        except (KeyError, TypeError, AttributeError):
            raise refuse(f"has a payload config that is not one ({member})") from None
        numbers = [*sizes, *strides, offset]
        if not all(type(n) is int and n >= 0 for n in numbers) or len(strides) != len(sizes):
            raise refuse(f"declares {key!r} of sizes {sizes}, strides {strides}, offset "
                         f"{offset}")
        reach = 0 if 0 in sizes else (
            offset + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1) * dtype.itemsize
        held = archive.get_record_size(record) if archive.has_record(record) else 0
        if reach > held:
            raise refuse(f"declares {key!r} over {reach} bytes, past the {held} of its record")
        tensors[record] = max(tensors.get(record, 0), math.prod(sizes) * dtype.itemsize)


def _check_expressions(graph: bytes, refuse) -> None:
    """Refuses a graph whose symbolic sizes' expressions name anything but
    sympy's and torch's size functions and symbols, or reach attributes."""
    try:
        pending = [json.loads(graph)]
    except (ValueError, RecursionError):
        raise refuse("has a graph that is not JSON") from None
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            text = value.get("expr_str")
            if isinstance(text, str) and not _size_expression(text):
                raise refuse(f"has a size expression that is not one ({text[:80]!r}), "
                             f"which torch would evaluate as Python")
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def _size_expression(text: str) -> bool:
    """Whether `text` is sympy arithmetic over sizes, read as the Python
    that sympify evaluates: calls of _SIZE_NAMES (keywords only the
    assumptions, True or False), those names and symbols, finite numbers,
    arithmetic and comparisons. A string only as Symbol's name: sympy
    evaluates a string argument again (floor('...') is eval of what the
    text's escapes spell), so the text's letters alone told nothing.
    ASCII only: Python folds other letters into names (.ｓｕｂｓ is .subs).
    No ^ (sympify reads it as **) or shift operators, and powers bounded
    (_bounded_power): a number evaluated as the program loads must not
    take the loader's memory."""
    if not text.isascii() or len(text) > MAX_SIZE_EXPRESSION:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    names = set()  # Symbol's name constants, the only strings
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, _OPERATORS) or isinstance(node.op, ast.Pow) \
                    and not _bounded_power(node.left, node.right):
                return False
        elif isinstance(node, ast.operator):
            if not isinstance(node, _OPERATORS):
                return False
        elif isinstance(node, (ast.Expression, ast.UnaryOp, ast.Compare, ast.BoolOp,
                               ast.unaryop, ast.cmpop, ast.boolop, ast.Load, ast.keyword)):
            continue  # (a keyword: checked with its call)
        elif isinstance(node, ast.Name):
            if node.id not in _SIZE_NAMES and not _SYMBOL.fullmatch(node.id):
                return False
        elif isinstance(node, ast.Constant):
            if type(node.value) is str:
                if id(node) not in names:
                    return False
            elif type(node.value) is float:
                if not math.isfinite(node.value):  # 1e1000000 parses as inf; sympy reads it whole
                    return False
            elif type(node.value) not in (int, bool) and node.value is not None:
                return False
        elif isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SIZE_NAMES):
                return False
            if node.func.id in _GROWERS and (len(node.args) != 2
                                             or not _bounded_power(*node.args)):
                return False
            if any(k.arg not in _ASSUMPTIONS or not (isinstance(k.value, ast.Constant)
                                                     and type(k.value.value) is bool)
                   for k in node.keywords):
                return False
            first = node.args[0] if node.args else None
            if node.func.id == "Symbol" and isinstance(first, ast.Constant) \
                    and type(first.value) is str and _SYMBOL.fullmatch(first.value):
                names.add(id(first))
        else:
            return False
    return True


def _bounded_power(base: ast.AST, exponent: ast.AST) -> bool:
    """Whether base ** exponent (or a shift by it) is bounded as sympy
    evaluates it at load: no power in either (towers: (10**64)**64... is
    10**(64**k)), and an exponent that holds a size (not known at load,
    so not evaluated then) or is a number of at most MAX_EXPONENT."""
    if any(_is_power(node) for part in (base, exponent) for node in ast.walk(part)):
        return False
    if any(isinstance(node, ast.Name) and _SYMBOL.fullmatch(node.id)
           or isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
           and node.func.id == "Symbol" for node in ast.walk(exponent)):
        return True
    number = _number(exponent)
    return number is not None and abs(number) <= MAX_EXPONENT


def _is_power(node: ast.AST) -> bool:
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) \
        or isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
        and node.func.id in _GROWERS


def _number(node: ast.AST) -> int | float | None:
    """The number `node` writes (-3, Integer(3), Integer(-3)), if it is one."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id in ("Integer", "Float") and len(node.args) == 1:
        return _number(node.args[0])
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    return None


def _check_declared(declared: tuple[TensorSpec, ...], names: list[str],
                    signature: tuple[TensorSpec, ...], where: str) -> None:
    """LoadFailed unless every request the manifest's [[inputs]] let
    through is one the program takes: it is called by its own names, so a
    name of the manifest's alone failed every request as the caller's."""
    theirs = {t.name: t for t in signature}
    if sorted(t.name for t in declared) == sorted(names) and all(
            not theirs or _takes(theirs[t.name], t) for t in declared):
        return
    program = ", ".join(map(_describe, signature)) if signature else ", ".join(names)
    raise LoadFailed(f"{where}: the manifest's inputs ({', '.join(map(_describe, declared))}) "
                     f"are not the program's ({program})")


def _takes(program: TensorSpec, declared: TensorSpec) -> bool:
    return (declared.dtype == program.dtype and len(declared.shape) == len(program.shape)
            and all(p in (-1, d) for d, p in zip(declared.shape, program.shape)))


def _describe(t: TensorSpec) -> str:
    return f"{t.name} {t.dtype} {list(t.shape)}"


def _signature(program: Any, names: list[str]) -> tuple[TensorSpec, ...]:
    """The program's inputs as TensorSpecs; () when one is not a plain tensor."""
    placeholders = {n.name: n.meta.get("val") for n in program.graph.nodes
                    if n.op == "placeholder"}
    specs = []
    for name in names:
        val = placeholders.get(name)
        dtype = str(getattr(val, "dtype", "")).removeprefix("torch.")
        if dtype not in DTYPES:
            return ()
        # A symbolic size is a dynamic dimension: any size.
        shape = tuple(d if isinstance(d, int) else -1 for d in val.shape)
        specs.append(TensorSpec(name, dtype, shape))
    return tuple(specs)
