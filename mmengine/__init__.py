"""mmengine: one serving instance for many models."""
from mmengine.client import AsyncClient, Client
from mmengine.config import Config
from mmengine.engine import Engine
from mmengine.errors import (
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
    "Overloaded",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "WorkerDied",
]
