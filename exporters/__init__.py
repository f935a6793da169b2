"""Exporters: the reference model, ONNX export and engine building (``import mamba_rt.exporters``).

Importing this package is light (no torch): the entry points below load their modules on first use.

    export_package(ckpt_dir, out_dir, dtype="fp32", force=False, all_logits=False, progress=None)
    export_from_model(model, out_dir, force=False, all_logits=False, progress=None, tokenizer=None)
    build_engines(pkg_dir, backend="tensorrt", ...)      (TensorRT / TensorRT-RTX)
"""
from __future__ import annotations

import importlib

_LAZY = {
    "export_package": "mamba_rt.exporters.export",
    "export_from_model": "mamba_rt.exporters.export",
    "export_weights_only": "mamba_rt.exporters.export",
    "build_engines": "mamba_rt.exporters.tensorrt_build",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mamba_rt.exporters' has no attribute {name!r}")
