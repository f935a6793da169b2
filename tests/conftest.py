"""Shared test configuration.

Markers (declared in pyproject.toml):
  gpu       -- needs an NVIDIA GPU visible to torch; skipped with a reason where there is none.
  tensorrt  -- needs TensorRT importable (and a GPU); skipped with a reason elsewhere.
  slow      -- long on the 2-core CI CPU.
A skip is never a pass: the reason says what was missing.
"""
from __future__ import annotations

import importlib

import pytest


def _gpu_missing_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch on this machine"
    return None


def _tensorrt_missing_reason() -> str | None:
    try:
        importlib.import_module("tensorrt")
    except ImportError as e:
        return f"TensorRT is not importable here ({e}); see README 'TensorRT'"
    return _gpu_missing_reason()


def pytest_collection_modifyitems(config, items):
    gpu_reason = None
    trt_reason = None
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            gpu_reason = gpu_reason or _gpu_missing_reason() or ""
            if gpu_reason:
                item.add_marker(pytest.mark.skip(reason=gpu_reason))
        if item.get_closest_marker("tensorrt") is not None:
            trt_reason = trt_reason or _tensorrt_missing_reason() or ""
            if trt_reason:
                item.add_marker(pytest.mark.skip(reason=trt_reason))
