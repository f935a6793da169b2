"""Token sampling: greedy, temperature, top-k, top-p, repetition penalty; seeded and reproducible.

One algorithm, its reference :func:`sample_numpy` (numpy, :class:`HostSampler`, for host backends)
and the torch backend's device implementations (``TorchSampler``; only token ids cross to the host):
``draw_torch`` (torch ops, captured in CUDA graphs where there is no fused decoder) and the fused
decoder's draw kernel (``plugins_cuda/decode_step.cu``). Given the same logits, history and seed they
pick the same tokens; the device ones sum in another order and multiply by 1/temperature, so a token
can differ only where u or a top-p boundary falls within rounding (~1e-15) of a threshold.

For each row (one sequence), in this order:

1. repetition penalty ``r`` (Hugging Face's rule): every token already seen in the sequence (prompt
   and generated) has its logit divided by ``r`` when positive, multiplied by ``r`` when negative;
2. ``temperature == 0``: the arg-max (the first one on ties) -- greedy, no randomness;
3. logits / temperature (float64 from here on);
4. top-k (``k > 0``): tokens below the k-th largest logit are dropped (ties with it are kept);
5. softmax; top-p (``p < 1``): keep the most probable tokens while the mass *before* each is < p
   (the smallest set whose mass reaches p; ties with the last kept probability are kept);
6. inverse-CDF draw over the kept tokens, in vocabulary order, with one uniform number ``u``.

Randomness is counter-based: ``u = uniform(seed_of_sequence, n)`` for the sequence's n-th sampled
token (SplitMix64), computed on the host for every implementation. A sequence's tokens therefore do
not depend on which other sequences share its batch, and a snapshot that records (seed, n) resumes
the exact same random stream. Sequence i of a ``generate`` call with seed s uses
``derive_seed(s, i)``.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from mamba_rt.errors import InputError

_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. ``temperature=0`` is greedy (the default)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int = 0

    def __post_init__(self):
        def bad(field, want):
            raise InputError(f"sampling {field}: expected {want}, got {getattr(self, field)!r}")

        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            bad("top_p", "a number in (0, 1] (1 = off)")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            bad("repetition_penalty", "a finite number > 0 (1 = off)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed <= _M64:
            bad("seed", "an integer in [0, 2**64)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = z.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def derive_seed(seed: int, index: int) -> int:
    """The seed of sequence ``index`` of a generate call seeded with ``seed``."""
    with np.errstate(over="ignore"):
        z = np.array([seed & _M64], np.uint64) ^ _mix64(np.array([index + 1], np.uint64))
    return int(_mix64(z)[0])


def uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """u in [0, 1) for each (seed, counter) pair: float64, 53 random bits."""
    with np.errstate(over="ignore"):
        z = np.asarray(seeds, np.uint64) + (np.asarray(counters, np.uint64) + np.uint64(1)) * _GOLDEN
    return (_mix64(z) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_numpy(logits: np.ndarray, seen: np.ndarray | None, params: SamplingParams,
                 u: np.ndarray | None) -> np.ndarray:
    """The reference implementation. logits (b, vocab) float32; seen (b, vocab) bool or None;
    u (b,) float64 in [0, 1) (None when ``params.greedy``: no draw). Returns (b,) int64 token ids."""
    x = np.asarray(logits, np.float32)
    if params.repetition_penalty != 1.0 and seen is not None:
        r = np.float32(params.repetition_penalty)
        x = np.where(seen, np.where(x > 0, x / r, x * r), x)
    if params.greedy:
        return x.argmax(-1).astype(np.int64)
    b, vocab = x.shape
    x = x.astype(np.float64) / params.temperature
    if 0 < params.top_k < vocab:
        kth = np.partition(x, vocab - params.top_k, axis=-1)[:, vocab - params.top_k, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if params.top_p < 1.0:
        sp = -np.sort(-p, axis=-1)
        keep = ((np.cumsum(sp, -1) - sp) < params.top_p).sum(-1)
        thr = sp[np.arange(b), keep - 1, None]
        p = np.where(p >= thr, p, 0.0)
    cdf = np.cumsum(p, -1)
    idx = (cdf <= (u * cdf[:, -1])[:, None]).sum(-1)
    return np.minimum(idx, vocab - 1).astype(np.int64)


class Sampler:
    """Per-slot sampling state (seed, draw counter, tokens seen) plus the sampling itself.

    A :class:`~mamba_rt.runtime.state.StateCache` companion: it follows the state through reset, fork
    and snapshot/restore. Seeds, counters and the seen-token mask live on the host in every
    implementation (the uniform numbers are computed here; marking seen tokens costs no device work);
    subclasses implement ``_sample`` where the logits are.
    """

    snapshot_key = "sampler"

    def __init__(self, max_batch: int, vocab: int):
        self.max_batch, self.vocab = max_batch, vocab
        self.seeds = np.zeros(max_batch, np.uint64)
        self.counters = np.zeros(max_batch, np.int64)
        self.seen = np.zeros((max_batch, vocab), bool)

    # -- companion protocol (see StateCache.add_companion) ----------------------------------------------
    def reset_slot(self, slot: int) -> None:
        self.seeds[slot] = 0
        self.counters[slot] = 0
        self.seen[slot] = False

    def copy_slot(self, src: int, dst: int) -> None:
        self.seeds[dst], self.counters[dst] = self.seeds[src], self.counters[src]
        self.seen[dst] = self.seen[src]

    def save_slot(self, slot: int):
        meta = {"seed": int(self.seeds[slot]), "counter": int(self.counters[slot]), "vocab": self.vocab}
        return meta, {"seen": np.packbits(self.seen[slot])}

    def check_slot_state(self, meta: dict, arrays: dict) -> None:
        from .state import SnapshotError

        try:
            ok = int(meta["vocab"]) == self.vocab and int(meta["seed"]) >= 0 and int(meta["counter"]) >= 0
        except (KeyError, TypeError, ValueError):
            ok = False
        seen = arrays.get("seen")
        if not ok or seen is None or seen.dtype != np.uint8 or seen.size != (self.vocab + 7) // 8:
            raise SnapshotError(f"state snapshot: malformed sampler section {meta!r} (vocab {self.vocab})")

    def load_slot(self, slot: int, meta: dict, arrays: dict) -> None:
        self.seeds[slot], self.counters[slot] = np.uint64(int(meta["seed"])), int(meta["counter"])
        self.seen[slot] = np.unpackbits(arrays["seen"], count=self.vocab).astype(bool)

    # -- use --------------------------------------------------------------------------------------------
    def seed(self, slot: int, seed: int) -> None:
        """Start a new random stream for ``slot``."""
        self.seeds[slot], self.counters[slot] = np.uint64(seed & _M64), 0

    def observe(self, slots, ids, out=None) -> None:
        """Mark the tokens ``ids`` (b, L) fed to ``slots`` as seen (for the repetition penalty). ``out``:
        what the backend's ``forward`` returned for them, where a sampler keeps a copy of the mask on the
        device and the step may have marked them there already (the torch backend's fused steps)."""
        self.seen[np.asarray(slots, np.int64)[:, None], np.asarray(ids, np.int64)] = True

    def sample(self, logits, slots, params: SamplingParams) -> np.ndarray:
        """Pick one token for each row of ``logits`` (b, vocab) (row i belongs to ``slots[i]``);
        returns host int64 ids (b,)."""
        slots = np.asarray(slots, np.int64)
        if params.greedy:  # no draw: the random stream stays where it is
            return self._sample(logits, slots, params, None)
        return self._sample(logits, slots, params, self._uniforms(slots))

    def queue(self, logits, slots, params: SamplingParams):
        """Like :meth:`sample` (the same draws, in the same order), but the tokens may stay on the
        device: returns a call that reads them (b,), or None where this sampler cannot (then call
        :meth:`sample`). Until that call the backend may queue the next step fed those tokens
        (``Backend.forward_next``). Host samplers cannot."""
        return None

    def _uniforms(self, slots: np.ndarray) -> np.ndarray:
        """The next uniform number of each slot's stream (the streams advance by one)."""
        u = uniforms(self.seeds[slots], self.counters[slots])
        self.counters[slots] += 1
        return u

    # -- implementation hook ----------------------------------------------------------------------------
    def _sample(self, logits, slots: np.ndarray, params: SamplingParams, u: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


class HostSampler(Sampler):
    """numpy sampling on host logits."""

    def _sample(self, logits, slots, params, u):
        seen = self.seen[slots] if params.repetition_penalty != 1.0 else None
        return sample_numpy(logits, seen, params, u)
