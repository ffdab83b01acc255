"""TorchScript archives (`model.pt`, `model.jit`), opened with torch.jit.load.

Only torch.jit.load: its unpickler rebuilds TorchScript types and tensors,
never arbitrary Python objects, so no artifact here is passed to torch.load
whatever the manifest says. A `model.pt` saved with torch.save is refused.
The program itself may call only torch's tensor operators unless the
manifest says `trusted = true` (see untrusted.py). The scripted forward
takes the inputs as keyword arguments.
"""
from __future__ import annotations

import torch

from mmengine.backends import untrusted
from mmengine.backends.base import TorchModel, load_kept
from mmengine.errors import LoadFailed
from mmengine.storage import ModelSpec, open_artifact


def load(spec: ModelSpec, device: torch.device, host: str | None = None) -> TorchModel:
    return load_kept(spec, device, host, lambda: _parse(spec, device))


def _parse(spec: ModelSpec, device: torch.device) -> TorchModel:
    path = spec.path / spec.artifact
    try:
        f, _ = open_artifact(path)
        with f:
            # By name torch reads a file ~10x faster than from a stream; a
            # stream that cannot seek is a compressed copy in the disk cache.
            module = torch.jit.load(str(path) if f.seekable() else f, map_location=device)
    except Exception as e:
        raise LoadFailed(f"{spec.name} v{spec.version}: {path.name} is not a loadable "
                         f"TorchScript archive: {e}") from e
    if not spec.trusted:
        untrusted.check_script(module, f"{spec.name} v{spec.version}")
    module.eval()
    return TorchModel(spec, device, module)
