"""StateCache over each kind of host-testable StateBuffers: slots, reset, fork, snapshots."""
import json
import struct

import numpy as np
import pytest

from mamba_rt.errors import InputError
from mamba_rt.manifest import Manifest
from mamba_rt.runtime.sampling import HostSampler
from mamba_rt.runtime.state import SNAPSHOT_MAGIC, HostStateBuffers, SnapshotError, StateCache
from tests.helpers import tiny_config

MAX_BATCH = 4


def _manifest(dtype="fp32", sha="ab" * 32, **over):
    return Manifest(config=tiny_config(**over), dtype=dtype, graphs={}, weights_file="weights.bin",
                    weights_sha256=sha, weights_bytes=0)


def _host(m):
    return HostStateBuffers(m, MAX_BATCH)


def _torch(m):
    pytest.importorskip("torch", reason="TorchStateBuffers are torch tensors")
    from mamba_rt.runtime.backend_torch import TorchStateBuffers

    return TorchStateBuffers(m, MAX_BATCH, "cpu")


BUFFERS = {"host": _host, "torch": _torch}


def _cache(kind, dtype="fp32", sha="ab" * 32):
    m = _manifest(dtype, sha)
    c = StateCache(BUFFERS[kind](m), m)
    c.add_companion(HostSampler(MAX_BATCH, m.config.vocab_size))
    return c


def _fill(cache, slot, rng):
    """Random state in ``slot`` (through the public write path)."""
    shapes = cache.buffers.slot_shapes()
    conv = rng.normal(size=shapes["conv_state"]).astype(np.float32)
    if cache.buffers.conv_dtype == "float16":
        conv = conv.astype(np.float16)
    elif cache.buffers.conv_dtype == "bfloat16":
        conv = (conv.view(np.uint32) >> 16).astype(np.uint16)
    cache.buffers.write(slot, conv, rng.normal(size=shapes["ssm_state"]).astype(np.float32))


def _two_filled(kind):
    """A cache with two allocated slots holding fresh random state."""
    rng = np.random.default_rng()
    c = _cache(kind)
    a, b = c.alloc(2)
    _fill(c, a, rng)
    _fill(c, b, rng)
    return c, a, b


def _all(cache):
    return [cache.buffers.read(s) for s in range(MAX_BATCH)]


def _same(a, b):
    return all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", list(BUFFERS))
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_slots_reset_fork_and_snapshot_roundtrip(kind, dtype, tmp_path):
    rng = np.random.default_rng()
    c = _cache(kind, dtype)
    slots = c.alloc(MAX_BATCH)
    assert slots == [0, 1, 2, 3] and c.n_free == 0
    for s in slots:
        _fill(c, s, rng)
    c._companions[0].seed(2, 77)
    c._companions[0].observe([2], [[5, 9]])
    before = _all(c)
    # fork 2 -> 0
    c.copy(2, 0)
    after = _all(c)
    assert _same(after[1:], before[1:]) and _same([after[0]], [before[2]])
    # snapshot 2, overwrite it, restore into 3 and 2
    blob = c.snapshot(2)
    path = c.save(2, tmp_path / "s.state")
    c.reset(2)
    assert not np.any(c.buffers.read(2)[1]) and c._companions[0].counters[2] == 0
    c.restore(3, blob)
    c.load(2, path)
    final = _all(c)
    for s in (2, 3):
        assert _same([final[s]], [before[2]])
        assert c._companions[0].seeds[s] == 77 and set(np.flatnonzero(c._companions[0].seen[s])) == {5, 9}
    assert _same([final[1]], [before[1]])
    # alloc refuses when full, free returns the lowest slot first
    with pytest.raises(InputError, match="only 0 of max_batch=4 slots are free"):
        c.alloc()
    c.free(1)
    assert c.alloc() == 1 and not np.any(c.buffers.read(1)[1])  # a fresh slot is zeroed


@pytest.mark.parametrize("kind", list(BUFFERS))
def test_bad_slot_calls_refused_and_touch_nothing(kind):
    c, a, b = _two_filled(kind)
    before = _all(c)
    for call, match in [(lambda: c.reset(2), "not allocated"), (lambda: c.copy(a, 7), "out of range"),
                        (lambda: c.snapshot(-1), "out of range"), (lambda: c.free(True), "integer slot id"),
                        (lambda: c.fork(3), "not allocated"), (lambda: c.alloc(0), "count >= 1")]:
        with pytest.raises(InputError, match=match):
            call()
    assert _same(_all(c), before)


def test_check_slots_matches_check_slot():
    """The batched check (every decode step) accepts what check_slot accepts and refuses with the
    error check_slot gives for the first bad entry, whatever the container and integer type."""
    c, a, b = _two_filled(next(iter(BUFFERS)))
    assert (a, b) == (0, 1) and c.max_batch == MAX_BATCH == 4
    for good in ([a, b], np.array([b, a], np.int32), np.array([[a], [b]], np.uint8), (np.int64(a),)):
        got = c.check_slots(good)
        assert got.dtype == np.int64 and got.tolist() == [int(x) for x in np.asarray(good).reshape(-1)]
    for bad, first in [([a, 2], 2), (np.array([a, 9]), 9), (np.array([-1, a]), -1),
                       (np.array([a, 2**63 + 5], np.uint64), 2**63 + 5), ([a, True], True), ([1.0], 1.0),
                       (["0"], "0"), ([b, 3, 2], 3)]:
        with pytest.raises(InputError) as want:
            c.check_slot(first)
        with pytest.raises(InputError) as got:
            c.check_slots(bad)
        assert str(got.value) == str(want.value), (bad, str(got.value), str(want.value))


def _corrupt(blob, **header_changes):
    n = len(SNAPSHOT_MAGIC)
    (hlen,) = struct.unpack("<Q", blob[n:n + 8])
    h = json.loads(blob[n + 8:n + 8 + hlen])
    for k, v in header_changes.items():
        if k == "shape0":
            h["tensors"][0]["shape"][0] += 1
            h["tensors"][0]["nbytes"] = int(np.prod(h["tensors"][0]["shape"])) * 4
        else:
            h[k] = v
    hb = json.dumps(h).encode()
    return blob[:n] + struct.pack("<Q", len(hb)) + hb + blob[n + 8 + hlen:]


@pytest.mark.parametrize("kind", list(BUFFERS))
def test_snapshots_from_elsewhere_are_refused_and_touch_nothing(kind):
    c, a, b = _two_filled(kind)
    blob = c.snapshot(a)
    other_model = _cache(kind, sha="cd" * 32)
    other_model.alloc()
    other_dtype = _cache(kind, dtype="fp16")
    other_dtype.alloc()
    before = _all(c)
    cases = [
        (other_model.snapshot(0), "belongs to model"),
        (other_dtype.snapshot(0), "belongs to model"),
        (blob[:-5], "truncated"),
        (b"PK\x03\x04" + blob[4:], "bad magic"),
        (_corrupt(blob, version=2), "version 2"),
        (_corrupt(blob, shape0=True), "this session expects"),
        (_corrupt(blob, format="npz"), "expected format"),
        ("not bytes", "expected bytes"),
    ]
    for data, match in cases:
        with pytest.raises(SnapshotError, match=match):
            c.restore(b, data)
    assert _same(_all(c), before)


def test_state_nbytes_matches_config():
    m = _manifest("fp16")
    buf = HostStateBuffers(m, MAX_BATCH)
    assert buf.nbytes == MAX_BATCH * m.config.state_bytes_per_sequence(2)
    assert buf.nbytes == buf.conv.nbytes + buf.ssm.nbytes
