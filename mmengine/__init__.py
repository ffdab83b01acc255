"""mmengine: one serving instance for many models."""
from mmengine import _source

_source.install()  # before any compiled module is imported

from mmengine.client import AsyncClient, Client, Models, Outputs  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.engine import Engine  # noqa: E402
from mmengine.errors import (  # noqa: E402
    BadRequest,
    ErrorCode,
    InternalError,
    LoadFailed,
    MMEngineError,
    ModelNotFound,
    Overloaded,
    Timeout,
    TooLarge,
    Unauthorized,
    WorkerDied,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "Config",
    "Engine",
    "ErrorCode",
    "InternalError",
    "LoadFailed",
    "MMEngineError",
    "ModelNotFound",
    "Models",
    "Outputs",
    "Overloaded",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "WorkerDied",
]
