"""Fixtures of the TensorRT tests: tiny packages written by the real exporter, once per session."""
from __future__ import annotations

import pytest


def export_tiny(out, dtype: str = "fp32", seed: int = 0):
    """(package dir, reference model) of a random tiny model (tests/helpers.tiny_config)."""
    from mamba_rt.exporters.export import export_from_model
    from mamba_rt.exporters.model import model_from_weights, random_weights
    from tests.helpers import tiny_config

    cfg = tiny_config()
    model = model_from_weights(cfg, random_weights(cfg, dtype, seed=seed), dtype)
    export_from_model(model, out)
    return out, model


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory):
    pytest.importorskip("torch", reason="the exporter needs torch (extra 'export')")
    return export_tiny(tmp_path_factory.mktemp("trt") / "pkg_fp32", "fp32")


@pytest.fixture(scope="session")
def tiny_fp16(tmp_path_factory):
    pytest.importorskip("torch", reason="the exporter needs torch (extra 'export')")
    return export_tiny(tmp_path_factory.mktemp("trt") / "pkg_fp16", "fp16")
