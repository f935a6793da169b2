"""The tensorrt backends' plain tier: batch buckets, request limits, direct vs staged binding, and the
2-D copy plans that gather slots into staging buffers and scatter them back (checked by applying them
with cudaMemcpy2D's semantics to host buffers and comparing with numpy indexing)."""
from __future__ import annotations

import numpy as np
import pytest

from mamba_rt.errors import InputError, InternalError
from mamba_rt.runtime.tensorrt_backend import Copy2D, Limits, batch_buckets, binding_plan, bucket_for, slot_copies


def memcpy2d(c: Copy2D, dst: np.ndarray, src: np.ndarray) -> None:
    """cudaMemcpy2D on byte buffers: ``height`` rows of ``width`` bytes, each row at its pitch."""
    for r in range(c.height):
        s = c.src_offset + r * c.src_pitch
        d = c.dst_offset + r * c.dst_pitch
        assert s + c.width <= src.size and d + c.width <= dst.size, "copy out of bounds"
        dst[d:d + c.width] = src[s:s + c.width]


CASES = [  # (slots, max_batch, bucket)
    ([0], 1, 1),
    ([3], 8, 1),
    ([5, 2], 8, 2),
    ([2, 3, 4], 8, 4),       # one run, bucket larger than the batch
    ([7, 0, 1, 6], 8, 4),    # two runs, reordered
    ([1, 2, 3, 4, 5], 6, 6),
]


@pytest.mark.parametrize("slots,max_batch,bucket", CASES)
def test_gather_and_scatter_move_exactly_the_slots(slots, max_batch, bucket):
    n_layer, slot_bytes = 3, 10
    rng = np.random.default_rng(0)
    state = rng.integers(0, 255, (n_layer, max_batch, slot_bytes), dtype=np.uint8)
    staging = np.zeros((n_layer, bucket, slot_bytes), np.uint8)
    flat = staging.reshape(-1)
    for c in slot_copies(slots, max_batch, bucket, n_layer, slot_bytes):
        memcpy2d(c, flat, state.reshape(-1))
    np.testing.assert_array_equal(staging[:, :len(slots)], state[:, slots])
    assert not staging[:, len(slots):].any()  # padding rows are not written

    new = rng.integers(0, 255, staging.shape, dtype=np.uint8)
    after = state.copy()
    for c in slot_copies(slots, max_batch, bucket, n_layer, slot_bytes, scatter=True):
        memcpy2d(c, after.reshape(-1), new.reshape(-1))
    want = state.copy()
    want[:, slots] = new[:, :len(slots)]
    np.testing.assert_array_equal(after, want)  # the slots got their rows, every other slot is untouched


def test_consecutive_slots_share_one_copy():
    assert len(slot_copies([2, 3, 4, 5], 8, 4, 64, 100)) == 1
    assert len(slot_copies([2, 3, 5, 6], 8, 4, 64, 100)) == 2
    assert len(slot_copies([3, 2], 8, 2, 64, 100)) == 2  # descending is two runs
    (c,) = slot_copies([2, 3], 8, 2, 64, 100)
    assert c == Copy2D(src_offset=200, dst_offset=0, width=200, height=64, src_pitch=800, dst_pitch=200)


@pytest.mark.parametrize("slots,bucket", [([], 1), ([1, 1], 2), ([8], 1), ([0, 1, 2], 2)])
def test_bad_plans_are_internal_errors(slots, bucket):
    with pytest.raises(InternalError):
        slot_copies(slots, 8, bucket, 2, 4)


def test_binding_plan():
    assert binding_plan([0, 1, 2, 3], 4) == "direct"
    assert binding_plan(np.arange(4), 4) == "direct"
    assert binding_plan([0, 1, 2], 4) == "staged"   # not every slot
    assert binding_plan([1, 0, 2, 3], 4) == "staged"  # not in order
    assert binding_plan([0], 1) == "direct"


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert [bucket_for(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    with pytest.raises(InputError, match="batch 7 exceeds max_batch 6"):
        bucket_for(7, 6)


def test_limits_choose_the_profile_and_refuse_what_the_engine_cannot_run():
    lim = Limits(max_batch=4, max_prefill=128)
    assert lim.check(4, 1) == "decode"
    assert lim.check(1, 2) == "prefill"
    assert lim.check(2, 128) == "prefill"
    with pytest.raises(InputError, match="batch 5: the engine was built for 1..4 sequences per step; rebuild "
                                         "with `mamba-rt build --max-batch 5`"):
        lim.check(5, 1)
    with pytest.raises(InputError, match="prefill of 129 tokens: the engine was built for at most 128 per call; "
                                         "open the session with prefill_chunk <= 128"):
        lim.check(1, 129)
