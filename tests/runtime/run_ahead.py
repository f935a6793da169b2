"""Checks of decoding a step ahead (Session.decode, generate on slots of its own), shared by the CPU
tests (the eager torch backend) and the GPU ones (fused decode graphs): the same tokens, state,
pending tokens and seen-token masks as one step() at a time, with the steps really queued ahead."""
from __future__ import annotations

import numpy as np

from mamba_rt.runtime import SamplingParams
from tests.helpers import rel_err

# The fused decode step adds some partial sums with float atomics (x_proj's in conv_xproj and conv_xproj_rows, out_proj's
# in ssm_out, x_proj's in the persistent kernel), in an order that varies from run to run, so two slots fed the same
# tokens can end in states that differ in their last bits (benchmarks/NOTES.md item 91: a few slot pairs in a hundred
# at batches 1-2, at most 1.8e-5 apart (relative L2) after 30 fp16 steps). Their states are compared within
# FUSED_STATE_TOL (relative L2 over a slot's state, about 50x that in 16 bits), everything else in a snapshot bit for
# bit; other backends' snapshots bit for bit.
FUSED_STATE_TOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 5e-3}


def _floats(a: np.ndarray, dtype: str) -> np.ndarray:
    """A snapshot's state array as float32 (bfloat16 is kept as its 16-bit patterns, runtime/state.py HOST_DTYPES)."""
    return (a.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else a.astype(np.float32)


def assert_same_snapshot(s, x, y) -> None:
    """Slots x and y of session s hold the same snapshot: bit for bit, except the states of the fused decode step
    (FUSED_STATE_TOL)."""
    a, b = s.snapshot(x), s.snapshot(y)
    if getattr(s.backend, "decoder", None) is None:
        assert a == b
        return
    (ta, ea), (tb, eb) = s.cache._parse(a), s.cache._parse(b)
    assert ea == eb and ta.keys() == tb.keys(), (ea, eb, ta.keys(), tb.keys())
    dtype = s.cache.buffers.conv_dtype
    for k in ta:
        if k in ("conv_state", "ssm_state"):
            err = rel_err(_floats(ta[k], dtype), _floats(tb[k], dtype))
            assert err <= FUSED_STATE_TOL[dtype], (k, err)
        else:
            assert np.array_equal(ta[k], tb[k]), k


def _spy_forward_next(s):
    """Count the steps the backend queued ahead (forward_next calls that queued one)."""
    inner, queued = s.backend.forward_next, []

    def spy(slots, after):
        out = inner(slots, after)
        queued.append(out is not None)
        return out

    s.backend.forward_next = spy
    return queued


def _prefilled(s, prompts):
    slots = s.alloc(len(prompts))
    first = [int(s.prefill(x, p)) for x, p in zip(slots, prompts)]
    return slots, first


def check_decode_equals_steps(s, prompts, steps: int, sampling: SamplingParams | None = None) -> None:
    """``decode`` of fresh slots against ``step`` called ``steps`` times on others with the same
    prompts: tokens, then snapshots (state, pending token, sampler) bit for bit (the fused decode step's
    states within FUSED_STATE_TOL: assert_same_snapshot). Without a repetition
    penalty (greedy or sampled on the device) decode must queue every step after the first ahead; with
    one, so must the fused decode steps (the penalty on the device), and other backends none."""
    a, first = _prefilled(s, prompts)
    b, first_b = _prefilled(s, prompts)
    assert first == first_b
    if sampling is not None:
        for i, (x, y) in enumerate(zip(a, b)):
            s.seed(x, 1000 + i)
            s.seed(y, 1000 + i)
    want, toks = [], np.array(first)
    for _ in range(steps):
        toks = s.step(a, toks, sampling)
        want.append(toks)
    queued = _spy_forward_next(s)
    try:
        got = s.decode(b, steps, sampling=sampling)  # the pending tokens: the prefills' ones
    finally:
        del s.backend.forward_next
    assert got.shape == (steps, len(prompts)) and got.dtype == np.int64
    np.testing.assert_array_equal(got, np.stack(want))
    assert len({int(t) for t in got.ravel()}) >= 4, "degenerate sequences: the comparison would not discriminate"
    for x, y in zip(a, b):
        assert s.pending(x) == s.pending(y)
        assert_same_snapshot(s, x, y)
    ahead = sampling is None or sampling.repetition_penalty == 1.0 or getattr(s.backend, "decoder", None) is not None
    assert queued == ([True] * (steps - 1) if ahead else []), queued
    for x in (*a, *b):
        s.free(x)


def check_generate_ahead_equals_waiting(s, prompts, new_tokens: int, sampling: SamplingParams | None = None) -> None:
    """generate on slots of its own, with a stop token hit mid-way by one sequence, run ahead and
    not; then two generate streams interleaved by their consumer, each equal to itself alone."""
    full = s.generate(prompts, new_tokens, sampling, stream=False)
    stop = full[0].ids[new_tokens // 2]  # sequence 0 stops there (or earlier, on the same token)
    out = {}
    for ahead in (True, False):
        s.run_ahead = ahead
        queued = _spy_forward_next(s)
        try:
            out[ahead] = list(s.generate(prompts, new_tokens, sampling, stop=[stop]))
        finally:
            del s.run_ahead, s.backend.forward_next
        assert any(queued) == ahead, (ahead, queued)
    assert out[True] == out[False]
    assert [t.finish for t in out[True] if t.index == 0][-1] == "stop"
    assert s.cache.n_free == s.max_batch

    alone = [s.generate(p, new_tokens, sampling, stream=False)[0].ids for p in prompts[:2]]
    g0, g1 = (s.generate(p, new_tokens, sampling) for p in prompts[:2])
    got: list[list[int]] = [[], []]
    for t0, t1 in zip(g0, g1):  # one token of each in turn: their steps share the backend's graphs
        got[0].append(t0.id)
        got[1].append(t1.id)
    g0.close()
    g1.close()  # (suspended after its last token: its slots are freed on exhaustion or close)
    assert got == alone
    assert s.cache.n_free == s.max_batch
