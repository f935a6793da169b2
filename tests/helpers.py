"""Small shared test utilities (no fixtures that hide what a test checks)."""
from __future__ import annotations

import math


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64; NaN anywhere gives inf so it never passes a tolerance."""
    import torch

    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def tiny_config(**over):
    """A deliberately awkward tiny config (d_model not a multiple of 8, short dt_rank)."""
    from mamba_rt.config import MambaConfig

    base = dict(d_model=36, n_layer=2, vocab_size=101, d_state=4, d_conv=3, dt_rank=5,
                pad_vocab_size_multiple=1)
    base.update(over)
    return MambaConfig(**base)
