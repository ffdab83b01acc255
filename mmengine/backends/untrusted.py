"""What a program not marked trusted may call: torch's tensor operators.

TorchScript and torch.export archives are programs, and their graphs may
call any operator torch has registered, among them aten::from_file and
aten::save (which read and write any file the server can), the RPC
operators and the collectives (which reach other processes and hosts).
Unless its manifest says `trusted = true`, a program may call only
operators of ALLOWED_NAMESPACES that are not REFUSED:

- a TorchScript archive's code (the source torch compiles it from) is read
  before torch.jit.load, which runs the program's own `__setstate__` as it
  unpickles (check_script_source); its compiled graphs are checked again
  once loaded (check_script);
- a torch.export program's graphs, once loaded, before anything of it runs
  (check_export: loading only builds them).

This keeps the server's files and other processes out of a model's reach;
it is no sandbox against a flaw in an operator's own code.
"""
from __future__ import annotations

import ast
import re
from typing import Any, Iterator

import torch

from mmengine.errors import LoadFailed

#: Tensor operators, TorchScript's own instructions, and the profiler's
#: marks (torch.autograd.profiler.record_function).
ALLOWED_NAMESPACES = frozenset({"aten", "prim", "prims", "quantized", "_quantized",
                                "profiler"})
REFUSED = frozenset({
    "aten::from_file", "aten::save",                             # files
    "prim::rpc_async", "prim::rpc_sync", "prim::rpc_remote",     # other processes
})
#: Names TorchScript's source gives the RPC operators, and the refused
#: operators' own names.
_REFUSED_NAMES = frozenset({"rpc_async", "rpc_sync", "remote"})
_REFUSED_OPS = frozenset(name.partition("::")[2] for name in REFUSED
                         if name.startswith("aten::"))
_REFUSED_WORDS = re.compile(rb"(?<![A-Za-z0-9_])(%s)(?![A-Za-z0-9_])" % b"|".join(
    sorted(name.encode() for name in _REFUSED_OPS | _REFUSED_NAMES)))
#: Classes registered with torch whose methods a program may call: the
#: packed weights of quantized modules and RNNs, and the profiler's marks.
_TORCH_CLASSES = frozenset({"quantized", "rnn", "profiler"})
#: torch.export's control flow, whose branches are graphs audited with the rest.
ALLOWED_HIGHER_ORDER = frozenset({"cond", "while_loop", "map_impl", "scan",
                                  "wrap_with_set_grad_enabled", "wrap_with_autocast"})
#: Python functions a torch.export graph may call on sizes and scalars.
_PLAIN_MODULES = frozenset({"_operator", "operator", "math"})


def torch_records(archive) -> tuple[Any, list[str]]:
    """torch's own reader of zip archive `archive` (a path, or a binary
    file that seeks) and the names of its records (under the archive's
    folder): what torch.jit.load and torch.export.load read, each record
    found by name as they find it (get_record, without regard to case).
    Python's zipfile is no stand-in: one file can hold two archives, each
    reader finding its own (a second central directory, which zipfile
    takes the first for data before the archive), and an audit through
    zipfile then reads another program than torch loads. RuntimeError
    for what is no archive."""
    reader = torch._C.PyTorchFileReader(archive)
    return reader, reader.get_all_records()


def check_script_source(archive, where: str) -> None:
    """LoadFailed unless the code of TorchScript archive `archive` (a path,
    or a binary file that seeks), read as torch reads it (torch_records),
    names only allowed operators: `torch.<op>` (aten's and prim's),
    `ops.<ns>.<op>`, and no RPC. Every name counts, called or not (a
    function may be assigned before it is called). An archive that is
    none raises RuntimeError."""
    reader, names = torch_records(archive)
    # Every record that could be code: torch finds records by name without
    # regard to case (CODE/ and .PY are read as code/ and .py).
    sources = [reader.get_record(name) for name in names if name.lower().endswith(".py")]
    for source in sources:
        try:
            tree = _Getattrs().visit(ast.parse(source))
        except (SyntaxError, ValueError, RecursionError) as e:  # (nested past Python's stack)
            raise LoadFailed(f"{where}: its program's code cannot be read: {e}") from e
        for node in ast.walk(tree):
            name = _source_name(node)
            if name is not None and not _allowed(name):
                raise _refused(name, where)
        # A backstop for what the names read above miss (a spelling torch
        # resolves that this reading does not, or that parses otherwise
        # here): the refused operators' names appear nowhere in the code as
        # words. Generated code keeps a model's own names and strings (an
        # assert's message): one with these words is refused, though it
        # may be harmless, until its manifest vouches for it (trusted).
        if word := _REFUSED_WORDS.search(source):
            raise _refused(f"the word {word[1].decode()!r} (a refused operator's name, "
                           f"as a name or in a string)", where)


class _Getattrs(ast.NodeTransformer):
    """getattr(x, "name") as the x.name it is: TorchScript takes only a
    string literal there, and resolves it as the attribute (getattr(torch,
    "save") is torch.save, which a quoted name hid from the names read)."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)  # the inner ones first: getattr(getattr(torch, "ops"), ...)
        if isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str):
            return ast.Attribute(value=node.args[0], attr=node.args[1].value, ctx=ast.Load())
        return node


def _source_name(node: ast.AST) -> str | None:
    """The operator `node` names in TorchScript's source, if it may name a
    refused one. Torch's importer resolves more spellings than the printer
    writes (torch.autograd.save is aten::save): any name of a refused
    operator counts, wherever it stands in a chain."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return f"prim::{node.func.id}" if node.func.id in _REFUSED_NAMES else None
    if isinstance(node, ast.Name):
        return f"aten::{node.id}" if node.id in _REFUSED_OPS else None
    if not isinstance(node, ast.Attribute):
        return None
    if node.attr in _REFUSED_OPS:
        return f"aten::{node.attr}"
    chain = [node.attr]
    base = node.value
    while isinstance(base, ast.Attribute):
        chain.append(base.attr)
        base = base.value
    if isinstance(base, ast.Name):
        chain.append(base.id)
    chain.reverse()
    if "classes" in chain[:-1] and chain[chain.index("classes") + 1] not in _TORCH_CLASSES:
        return f"{'.'.join(chain)} (a class registered with torch)"
    if chain[0] == "ops" and len(chain) == 3:
        return f"{chain[1]}::{chain[2]}"
    return None


def check_script(module: torch.jit.ScriptModule, where: str) -> None:
    """LoadFailed unless every method and hook of `module` and of its
    submodules, with what they call inlined (forked and awaited functions
    too), calls only allowed operators."""
    seen = set()
    for _, sub in module.named_modules():
        c = sub._c
        kind = c._type().qualified_name()  # its methods and hooks are its type's
        if kind in seen:
            continue
        seen.add(kind)
        graphs = [c._get_method(name).graph for name in c._method_names()]
        graphs += [hook.graph for hook in c._get_forward_hooks() + c._get_forward_pre_hooks()]
        for graph in graphs:
            for name, allowed in _calls(graph):
                if not allowed:
                    raise _refused(name, where)


def check_export(program: Any, where: str) -> None:
    """LoadFailed unless each graph of `program` (control flow's branches
    included) calls only allowed operators and plain functions of sizes."""
    for gm in program.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op == "call_function":
                name, allowed = _export_target(node.target)
            else:  # what torch.export's own graphs never call
                name, allowed = f"{node.op} {node.target}", node.op not in (
                    "call_module", "call_method")
            if not allowed:
                raise _refused(name, where)


def _calls(graph) -> Iterator[tuple[str, bool]]:
    """What an inlined copy of `graph` calls, and whether it may: its
    nodes' kinds, in every block and every forked or awaited function. A
    call left after inlining goes through an interface (refused: the audit
    cannot follow it) or to a method of a class of torch's own."""
    graph = graph.copy()
    torch._C._jit_pass_inline(graph)
    todo = [graph.nodes()]
    while todo:
        for node in todo.pop():
            kind = node.kind()
            if kind in ("prim::CallMethod", "prim::CallFunction"):
                callee = str(node.inputsAt(0).type())
                method = node.s("name") if node.hasAttribute("name") else ""
                yield (f"{callee}.{method} through an interface",
                       kind == "prim::CallMethod"
                       and callee.split(".")[:4] in ([["__torch__", "torch", "classes", c]
                                                      for c in _TORCH_CLASSES]))
                continue
            yield kind, _allowed(kind)
            todo.extend(block.nodes() for block in node.blocks())
            if node.hasAttribute("Subgraph"):  # prim::fork, prim::awaitable
                sub = node.g("Subgraph")
                torch._C._jit_pass_inline(sub)
                todo.append(sub.nodes())


def _allowed(name: str) -> bool:
    return name.partition("::")[0] in ALLOWED_NAMESPACES and name not in REFUSED


def _export_target(target: Any) -> tuple[str, bool]:
    """A call_function's target: its name, and whether it is allowed."""
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
        return name, _allowed(name)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order::{target.name()}", target.name() in ALLOWED_HIGHER_ORDER
    module = getattr(target, "__module__", None)
    name = getattr(target, "__name__", repr(target))
    plain = module in _PLAIN_MODULES or (module == "torch" and name.startswith(("sym_",
                                                                               "_sym_")))
    return f"{module}.{name}", plain


def _refused(name: str, where: str) -> LoadFailed:
    return LoadFailed(f"{where}: its program calls {name}, which a model not marked "
                      f"trusted may not call (only torch's tensor operators; set "
                      f"trusted = true in model.toml only for a source you trust)")
