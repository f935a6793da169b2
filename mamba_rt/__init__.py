"""mamba-rt: a compiled deployment runtime for Mamba language models.

``import mamba_rt`` is light: it never imports torch, onnxruntime or TensorRT.
"""
__version__ = "0.1.0"

from .config import MambaConfig, load_config  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    InputError,
    InternalError,
    MambaRTError,
    MissingDependencyError,
    UnsupportedError,
)

__all__ = [
    "__version__",
    "MambaConfig",
    "load_config",
    "MambaRTError",
    "ConfigError",
    "CheckpointError",
    "UnsupportedError",
    "InputError",
    "MissingDependencyError",
    "InternalError",
]
