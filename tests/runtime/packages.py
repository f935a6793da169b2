"""Model packages for the runtime tests.

``export_tiny`` writes a real package through the exporter (``export_from_model``): every ONNX
Runtime test uses it. ``weights_only_package`` writes just ``weights.bin`` and a manifest with no
graphs, laid out as the manifest contract says: a fixture for the torch backend only (it needs no
graph), kept so the torch-backend tests do not depend on ONNX export.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers import tiny_config


def tiny_model(seed: int, dtype: str = "fp32", **over):
    from mamba_rt.exporters.model import model_from_weights, random_weights

    cfg = tiny_config(**over)
    return model_from_weights(cfg, random_weights(cfg, dtype, seed=seed), dtype)


def export_tiny(out: Path, seed: int, dtype: str = "fp32", tokenizer=None, **over):
    """(package dir, reference model) for a random tiny model exported by the real exporter."""
    from mamba_rt.exporters.export import export_from_model

    model = tiny_model(seed, dtype, **over)
    export_from_model(model, out, tokenizer=tokenizer)
    return Path(out), model


def weights_only_package(out: Path, seed: int, dtype: str = "fp32", **over):
    """(package dir, reference model): weights.bin + manifest, no graphs (torch backend only)."""
    from mamba_rt.exporters.export import export_weights_only

    model = tiny_model(seed, dtype, **over)
    return export_weights_only(model, out), model


def diverse_prompts(session, lengths, new_tokens: int = 32, min_distinct: int = 6, tries: int = 20):
    """Random prompts (one per length) whose greedy continuation in ``session`` has at least
    ``min_distinct`` different tokens: for a rare (random model, prompt) pair greedy decoding settles
    on one token, and a comparison of such sequences would not discriminate."""
    rng = np.random.default_rng()
    out = []
    for n in lengths:
        for _ in range(tries):
            p = rng.integers(0, session.vocab, n).tolist()
            if len(set(session.generate(p, new_tokens, stream=False)[0].ids)) >= min_distinct:
                out.append(p)
                break
        else:
            raise AssertionError(f"no prompt of length {n} in {tries} tries has a varied greedy continuation")
    return out
