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


def varied_prompt(greedy, vocab: int, length: int = 7, min_distinct: int = 4, tries: int = 20):
    """(prompt (1, length) int64, greedy(prompt)) for the first of up to ``tries`` random prompts whose
    greedy continuation (ids: a list, or a tensor of one row) has at least ``min_distinct`` different tokens, else the last one
    drawn: a random prompt of a random model now and then settles on one token (CI saw [5, 44, 44, 94, 94,
    ...]), and a comparison of such sequences would not discriminate. The caller still asserts the count."""
    import torch

    for _ in range(tries):
        prompt = torch.randint(0, vocab, (1, length))
        out = greedy(prompt)
        if len(set(torch.as_tensor(out).reshape(-1).tolist())) >= min_distinct:
            break
    return prompt, out
