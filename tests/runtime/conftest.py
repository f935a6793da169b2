"""Packages shared by the runtime tests (built once per test session: an ONNX export takes ~25 s)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import tiny_config


@pytest.fixture(scope="session")
def hf_package(tmp_path_factory):
    """A random tiny model written as a Hugging Face checkpoint and exported with ``export_package``.

    Returns (package dir, checkpoint dir, config, seed). Fresh weights every session (the seed is in
    failure messages).
    """
    pytest.importorskip("torch", reason="exporting needs torch")
    from mamba_rt.checkpoint import save_checkpoint
    from mamba_rt.exporters.export import export_package
    from mamba_rt.exporters.model import random_weights

    seed = int(np.random.SeedSequence().entropy % 2**31)
    cfg = tiny_config(d_conv=4)
    root = tmp_path_factory.mktemp("hf")
    save_checkpoint(cfg, random_weights(cfg, "fp32", seed=seed), root / "ckpt", fmt="hf")
    export_package(root / "ckpt", root / "pkg", dtype="fp32")
    return root / "pkg", root / "ckpt", cfg, seed


@pytest.fixture(scope="session")
def torch_only_package(tmp_path_factory):
    """A second model (weights + manifest, no graphs) for the torch backend."""
    pytest.importorskip("torch", reason="the torch backend needs torch")
    from tests.runtime.packages import weights_only_package

    seed = int(np.random.SeedSequence().entropy % 2**31)
    pkg, model = weights_only_package(tmp_path_factory.mktemp("w") / "pkg", seed=seed)
    return pkg, model, seed
