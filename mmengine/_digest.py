"""What a compiled module was compiled from, as one sha256: setup.py records
it for each module it compiles, and mmengine/_source.py runs a module's
source wherever the record does not match. The standard library only:
setup.py loads this file by its path, before the package can be imported.

A module is compiled from its source and the .pxd beside it (the extension
types it declares), and from the .pxd files of the mmengine modules that
.pxd cimports, whose classes' C layout it is built against (tcp.pxd
cimports listener's BudgetedReading): a listener edited since the build
must run tcp as source too, or tcp's extension type would meet a source
class of another size and fail to import."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

_CIMPORTS = re.compile(rb"^[ \t]*(?:from[ \t]+(mmengine(?:\.\w+)+)[ \t]+cimport|"
                       rb"cimport[ \t]+(mmengine(?:\.\w+)+))", re.M)


def digest(source: Path) -> str:
    """The sha256 of the files that compiling the module `source` (its .py)
    reads, in a fixed order."""
    sha = hashlib.sha256()
    for path in compiled_from(source):
        sha.update(path.read_bytes())
    return sha.hexdigest()


def compiled_from(source: Path) -> list[Path]:
    """`source`, the .pxd beside it if there is one, and the same of each
    mmengine module that .pxd cimports, theirs in turn (each once)."""
    root = source.resolve().parent
    while (root.parent / "__init__.py").is_file():  # up to the top package's parent
        root = root.parent
    root = root.parent
    out: list[Path] = []
    todo = [source.resolve()]
    while todo:
        path = todo.pop(0)
        if path in out:
            continue
        out.append(path)
        pxd = path.with_suffix(".pxd")
        if not pxd.is_file():
            continue
        out.append(pxd)
        for match in _CIMPORTS.finditer(pxd.read_bytes()):
            name = (match.group(1) or match.group(2)).decode()
            todo.append(root.joinpath(*name.split(".")).with_suffix(".py"))
    return out
