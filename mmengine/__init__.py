"""mmengine: one serving instance for many models."""
import importlib

from mmengine import stop_signals

stop_signals.quiet_interrupts()  # first: `python -m mmengine`'s Ctrl-C while it imports

from mmengine import _source  # noqa: E402

_source.install()  # before any compiled module is imported

__version__ = "0.1.0"

# What the package exports, from the module that holds each, imported when
# first named: `mmengine serve` blocks its stop signals before any import
# starts a thread (numpy's; cli.main), and a client imports no engine.
_EXPORTS = {
    **dict.fromkeys(("AsyncClient", "Client", "Models", "Outputs"), "mmengine.client"),
    "Config": "mmengine.config",
    "Engine": "mmengine.engine",
    **dict.fromkeys(("BadRequest", "ErrorCode", "InternalError", "LoadFailed", "MMEngineError",
                     "ModelNotFound", "Overloaded", "Timeout", "TooLarge", "Unauthorized",
                     "WorkerDied"), "mmengine.errors"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mmengine' has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(module), name)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
