"""mmengine: one serving instance for many models."""
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
    "BadRequest",
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
