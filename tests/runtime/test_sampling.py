"""Sampling: the numpy reference, its rules, and the torch (device) implementation against it."""
import numpy as np
import pytest

from mamba_rt.errors import InputError
from mamba_rt.runtime.sampling import HostSampler, SamplingParams, derive_seed, sample_numpy, uniforms


def _rng():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    return np.random.default_rng(seed), seed


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-1),
                                dict(top_k=1.5), dict(top_p=0.0), dict(top_p=1.2), dict(repetition_penalty=0),
                                dict(seed=-1), dict(temperature=True)])
def test_params_are_validated(kw):
    with pytest.raises(InputError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_greedy_is_argmax_and_top_k_1_is_greedy_at_any_temperature():
    rng, seed = _rng()
    logits = rng.normal(size=(5, 37)).astype(np.float32)
    u = rng.random(5)
    want = logits.argmax(-1)
    assert (sample_numpy(logits, None, SamplingParams(), u) == want).all(), seed
    assert (sample_numpy(logits, None, SamplingParams(temperature=3.0, top_k=1), u) == want).all(), seed


def test_draws_follow_the_tempered_distribution():
    rng, seed = _rng()
    logits = rng.normal(size=(1, 6)).astype(np.float32)
    n = 40000
    u = uniforms(np.full(n, 1234 + seed, np.uint64), np.arange(n))
    ids = sample_numpy(np.repeat(logits, n, 0), None, SamplingParams(temperature=0.7), u)
    freq = np.bincount(ids, minlength=6) / n
    want = _softmax(logits[0].astype(np.float64) / 0.7)
    # 5 standard errors of a binomial proportion
    assert np.all(np.abs(freq - want) < 5 * np.sqrt(want * (1 - want) / n) + 1e-9), (seed, freq, want)


def test_top_k_and_top_p_keep_exactly_their_set():
    rng, seed = _rng()
    vocab, n = 50, 20000
    logits = rng.normal(size=(1, vocab)).astype(np.float32) * 2
    u = uniforms(np.full(n, seed, np.uint64), np.arange(n))
    rows = np.repeat(logits, n, 0)
    ids = sample_numpy(rows, None, SamplingParams(temperature=1.0, top_k=7), u)
    assert set(ids.tolist()) == set(np.argsort(-logits[0])[:7].tolist()), seed
    p = _softmax(logits[0].astype(np.float64))
    order = np.argsort(-p)
    cum = np.cumsum(p[order])
    top_p = (cum[2] + cum[3]) / 2  # the mass before the 4th token is below it, before the 5th above
    ids = sample_numpy(rows, None, SamplingParams(temperature=1.0, top_p=float(top_p)), u)
    assert set(ids.tolist()) == set(order[:4].tolist()), seed


def test_repetition_penalty_follows_hf_rule():
    logits = np.array([[2.0, 1.9, -0.5, -0.6]], np.float32)
    seen = np.array([[True, False, True, False]])
    u = np.zeros(1)
    assert sample_numpy(logits, seen, SamplingParams(), u)[0] == 0
    # 2.0 / 1.2 < 1.9: the seen token loses greedy decoding
    assert sample_numpy(logits, seen, SamplingParams(repetition_penalty=1.2), u)[0] == 1
    # negative seen logits are multiplied: -0.5 * 1.5 = -0.75 < -0.6
    only_neg = np.array([[-0.5, -0.6]], np.float32)
    assert sample_numpy(only_neg, np.array([[True, False]]), SamplingParams(repetition_penalty=1.5), u)[0] == 1


def test_uniforms_are_reproducible_and_streams_differ():
    seeds = np.array([derive_seed(7, i) for i in range(3)], np.uint64)
    a = uniforms(seeds, np.array([0, 5, 9]))
    b = uniforms(seeds[[2, 0, 1]], np.array([9, 0, 5]))
    assert np.array_equal(a[[2, 0, 1]], b)  # one row's draw does not depend on its batch position
    assert len({derive_seed(7, i) for i in range(100)} | {derive_seed(8, 0)}) == 101
    u = uniforms(np.full(100000, 3, np.uint64), np.arange(100000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005


def test_host_sampler_counts_draws_per_slot_and_greedy_draws_none():
    s = HostSampler(4, 10)
    s.seed(1, 99)
    logits = np.random.default_rng().normal(size=(1, 10)).astype(np.float32)
    s.sample(logits, [1], SamplingParams())
    assert s.counters[1] == 0
    s.sample(logits, [1], SamplingParams(temperature=1.0))
    s.sample(logits, [1], SamplingParams(temperature=1.0))
    assert s.counters.tolist() == [0, 2, 0, 0]



def test_observe_marks_exactly_the_fed_tokens():
    """A decode step (one id per slot) and a prompt chunk (several) mark exactly their ids as seen, and
    a greedy step through sample() is the argmax of each row."""
    rng = np.random.default_rng()
    s = HostSampler(4, 50)
    step = rng.integers(0, 50, (3, 1))
    chunk = rng.integers(0, 50, (1, 6))
    s.observe([0, 2, 3], step)
    s.observe([1], chunk)
    want = np.zeros((4, 50), bool)
    want[[0, 2, 3], step[:, 0]] = True
    want[1, chunk[0]] = True
    assert np.array_equal(s.seen, want)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    assert np.array_equal(s.sample(logits, [0, 2, 3], SamplingParams()), logits.argmax(-1))


PARAMS = {
    "greedy": SamplingParams(),
    "temperature": SamplingParams(temperature=0.8),
    "top_k": SamplingParams(temperature=1.3, top_k=5),
    "top_p": SamplingParams(temperature=1.0, top_p=0.7),
    "all": SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3),
    "penalty_greedy": SamplingParams(repetition_penalty=1.5),
    "top_k_and_p": SamplingParams(temperature=0.7, top_k=50, top_p=0.95),
    "top_k_past_vocab": SamplingParams(temperature=1.2, top_k=400),  # off, as top_k=0
    "top_p_tight": SamplingParams(temperature=2.0, top_p=0.02),  # usually the first token only
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_torch_sampler_equals_numpy_reference(name):
    torch = pytest.importorskip("torch", reason="the device sampler is torch code")
    from mamba_rt.runtime.backend_torch import sample_torch

    rng, seed = _rng()
    b, vocab = 64, 257
    logits = (rng.normal(size=(b, vocab)) * 3).astype(np.float32)
    seen = rng.random((b, vocab)) < 0.1
    u = rng.random(b)
    want = sample_numpy(logits, seen, PARAMS[name], u)
    got = sample_torch(torch.from_numpy(logits), torch.from_numpy(seen), PARAMS[name], u)
    assert got.dtype == torch.int64 and np.array_equal(got.numpy(), want), seed


def test_one_draw_serves_every_setting_row_by_row():
    """draw_torch takes its settings as a tensor (what one CUDA graph replays with any SamplingParams):
    rows with different settings in one call each equal the reference with their own."""
    torch = pytest.importorskip("torch", reason="the device sampler is torch code")
    from mamba_rt.runtime.backend_torch import draw_torch, needs_sort, sample_knobs

    rng, seed = _rng()
    vocab = 301
    params = [p for p in PARAMS.values() if not p.greedy and p.repetition_penalty == 1.0]
    params += [SamplingParams(temperature=0.5, top_k=1), SamplingParams(temperature=3.0, top_p=1.0, top_k=vocab)]
    rows = 8
    logits = (rng.normal(size=(rows * len(params), vocab)) * 3).astype(np.float32)
    u = rng.random(len(logits))
    knobs = np.concatenate([sample_knobs(p, u[i * rows:(i + 1) * rows], vocab) for i, p in enumerate(params)])
    got = draw_torch(torch.from_numpy(logits), torch.from_numpy(knobs), True).numpy()
    want = np.concatenate([sample_numpy(logits[i * rows:(i + 1) * rows], None, p, u[i * rows:(i + 1) * rows])
                           for i, p in enumerate(params)])
    assert np.array_equal(got, want), seed
    # without top-k / top-p the draw need not sort
    plain = [i for i, p in enumerate(params) if not needs_sort(p, vocab)]
    assert plain, "no setting without top-k or top-p"
    for i in plain:
        sl = slice(i * rows, (i + 1) * rows)
        assert np.array_equal(draw_torch(torch.from_numpy(logits[sl]), torch.from_numpy(knobs[sl]), False).numpy(),
                              want[sl]), (seed, params[i])
