"""mamba-rt: a compiled deployment runtime for Mamba language models.

``import mamba_rt`` is light: it never imports torch, onnxruntime or TensorRT.
"""
__version__ = "0.1.0"

import os as _os

# In a source checkout (tests, the GPU machine's copy of the tree) the subpackages live in sibling
# folders: exporters/, plugins_cuda/, runtime/. pyproject's package-dir maps them into mamba_rt for
# installs; this line does the same when mamba_rt is imported straight from the checkout, so that a
# checkout on sys.path can never hide mamba_rt.runtime & co.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "runtime")):
    __path__.append(_root)  # noqa: F821 (package __path__)

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
