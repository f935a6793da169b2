"""Lazy imports of heavy optional libraries, with an error that names the extra to install."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# module name -> (pip extra of mamba-rt, what it is needed for)
_EXTRAS = {
    "torch": ("export", "the reference model, export and the torch backend"),
    "safetensors": ("export", "reading safetensors checkpoints"),
    "onnx": ("export", "writing ONNX graphs"),
    "onnxscript": ("export", "translating the custom ops into ONNX"),
    "onnxruntime": ("onnx", "the onnxruntime backend"),
    "tokenizers": ("onnx", "reading tokenizer.json"),
    "cuda": ("gpu", "compiling and launching the CUDA kernels"),
    "cuda.bindings": ("gpu", "compiling and launching the CUDA kernels"),
    "tensorrt": ("tensorrt", "building and running TensorRT engines"),
    "tensorrt_rtx": ("tensorrt-rtx", "building TensorRT-RTX engines of the portable graphs"),
    "transformers": ("test", "the Hugging Face oracle"),
    "matplotlib": ("bench", "benchmark plots"),
}


def require(name: str) -> ModuleType:
    """Import ``name`` or raise MissingDependencyError naming the mamba-rt extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        root = name.split(".")[0]
        extra, why = _EXTRAS.get(name, _EXTRAS.get(root, ("", "")))
        hint = f"pip install 'mamba-rt[{extra}]'" if extra else f"pip install {root}"
        raise MissingDependencyError(
            f"{name} is not installed, and is needed for {why or 'this feature'}: {hint}"
            f" (import failed: {e})"
        ) from e


def available(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def default_device() -> str:
    """"cuda" when torch is installed and sees a GPU, else "cpu": the default of every command that runs a model."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
