"""What a program not marked trusted may call: torch's tensor operators.

TorchScript and torch.export archives are programs, and their graphs may
call any operator torch has registered, among them aten::from_file and
aten::save (which read and write any file the server can), the RPC
operators and the collectives (which reach other processes and hosts).
Unless its manifest says `trusted = true`, a program is audited once
parsed, before anything of it runs: every operator it calls must be of
ALLOWED_NAMESPACES and not of REFUSED. This keeps the server's files and
other processes out of a model's reach; it is no sandbox against a flaw in
an operator's own code.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from mmengine.errors import LoadFailed

#: Tensor operators and TorchScript's own instructions.
ALLOWED_NAMESPACES = frozenset({"aten", "prim", "prims", "quantized", "_quantized"})
REFUSED = frozenset({
    "aten::from_file", "aten::save",                             # files
    "prim::rpc_async", "prim::rpc_sync", "prim::rpc_remote",     # other processes
    # Left in an inlined graph only where a call goes through an interface,
    # to code the audit cannot name.
    "prim::CallMethod", "prim::CallFunction",
})
#: torch.export's control flow, whose branches are graphs audited with the rest.
ALLOWED_HIGHER_ORDER = frozenset({"cond", "while_loop", "map_impl", "scan",
                                  "wrap_with_set_grad_enabled", "wrap_with_autocast"})
#: Python functions a torch.export graph may call on sizes and scalars.
_PLAIN_MODULES = frozenset({"_operator", "operator", "math", "builtins"})


def check_script(module: torch.jit.ScriptModule, where: str) -> None:
    """LoadFailed unless every method and hook of `module` and of its
    submodules, with what they call inlined, calls only allowed operators."""
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
            graph = graph.copy()
            torch._C._jit_pass_inline(graph)
            for kind in _kinds(graph.nodes()):
                if not _allowed(kind):
                    raise _refused(kind, where)


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


def _kinds(nodes) -> Iterator[str]:
    for node in nodes:
        yield node.kind()
        for block in node.blocks():
            yield from _kinds(block.nodes())


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
