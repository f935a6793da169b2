"""The torch backend on the CPU (reference ops) against the reference model it is built from."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch backend needs torch")

from mamba_rt.runtime import SamplingParams, Session, derive_seed  # noqa: E402
from tests.runtime.packages import diverse_prompts, weights_only_package  # noqa: E402


def _prompts(rng, vocab, lengths):
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def test_greedy_equals_reference_model_with_chunked_prefill(torch_only_package):
    pkg, model, seed = torch_only_package
    with Session.open(pkg, backend="torch", max_batch=2, prefill_chunk=4) as s:
        assert "torch" in s.describe() and "ref ops" in s.describe()
        for prompt in diverse_prompts(s, [1, 4, 11], 24):
            want = model.generate_greedy(torch.tensor([prompt]), 24)[0].tolist()
            got = s.generate(prompt, 24, stream=False)[0].ids
            assert len(set(want)) >= 4, "degenerate sequence: the comparison would not discriminate"
            assert got == want, (seed, prompt)
        assert s.cache.n_free == 2  # generate frees the slots it took


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_dtypes_equal_reference_model(tmp_path, dtype):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    pkg, model = weights_only_package(tmp_path / "p", seed=seed, dtype=dtype)
    prompt = np.random.default_rng().integers(0, model.config.vocab_size, 7).tolist()
    with Session.open(pkg, backend="torch", max_batch=3) as s:
        got = s.generate([prompt, prompt[:3]], 12, stream=False)
        slot = s.alloc()
        s.prefill(slot, prompt)
        blob = s.snapshot(slot)  # bf16/fp16 state through TorchStateBuffers.read
        s.restore(slot, blob)
        assert s.snapshot(slot) == blob
    for p, g in zip([prompt, prompt[:3]], got):
        assert g.ids == model.generate_greedy(torch.tensor([p]), 12)[0].tolist(), seed


def test_batch_of_three_equals_each_alone_with_sampling(torch_only_package):
    pkg, model, seed = torch_only_package
    prompts = _prompts(np.random.default_rng(), model.config.vocab_size, [2, 9, 5])
    sp = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.2, seed=seed)
    with Session.open(pkg, backend="torch", max_batch=3) as s:
        together = s.generate(prompts, 16, sp, stream=False)
        # alone: each prompt with the seed it had at its batch index
        for i, p in enumerate(prompts):
            slot = s.alloc()
            s.seed(slot, derive_seed(seed, i))
            alone = s.generate(p, 16, sp, stream=False, slots=[slot])[0]
            s.free(slot)
            assert alone.ids == together[i].ids, (seed, i)


def test_decode_runs_ahead_and_equals_steps(torch_only_package):
    """The eager backend queues each step ahead, its argmax or draw on the device (CPU here); with a
    repetition penalty (the seen-token mask is the host's) each step is read first."""
    from tests.runtime.run_ahead import check_decode_equals_steps, check_generate_ahead_equals_waiting

    pkg, model, seed = torch_only_package
    penalty = SamplingParams(temperature=0.9, top_k=30, repetition_penalty=1.2, seed=seed)
    sampled = SamplingParams(temperature=1.1, top_k=40, top_p=0.9, seed=seed)
    with Session.open(pkg, backend="torch", max_batch=6) as s:
        prompts = diverse_prompts(s, [3, 8, 1], 16)
        check_decode_equals_steps(s, prompts[:2], 16)
        check_decode_equals_steps(s, prompts[:3], 12, penalty)
        check_decode_equals_steps(s, prompts[:3], 12, sampled)
        check_decode_equals_steps(s, prompts[:1], 12, SamplingParams(temperature=1.5, seed=seed))
        check_generate_ahead_equals_waiting(s, prompts, 16)
        check_generate_ahead_equals_waiting(s, prompts, 16, sampled)


def test_decode_errors(torch_only_package):
    from mamba_rt.errors import InputError

    with Session.open(torch_only_package[0], backend="torch", max_batch=2) as s:
        a, b = s.alloc(2)
        s.prefill(a, [1, 2])
        before = s.snapshot(a)
        for call, match in [
            (lambda: s.decode([a, b], 3), rf"slots \[{b}\] have no pending token"),
            (lambda: s.decode([a], 0), "steps: expected an integer >= 1, got 0"),
            (lambda: s.decode([a], True), "steps: expected an integer >= 1, got True"),
            (lambda: s.decode([a], 2, [1, 2]), r"token_ids: expected one id per slot \(1\), got 2"),
            (lambda: s.decode([a], 2, [s.vocab]), f"token id {s.vocab} at position 0 is outside"),
            (lambda: s.decode([a, a], 2), "each slot may appear once"),
            (lambda: s.decode([a], 2, sampling="greedy"), "sampling: expected SamplingParams, got str"),
        ]:
            with pytest.raises(InputError, match=match):
                call()
        assert s.snapshot(a) == before  # nothing ran
        assert s.decode([a], 2, [5]).shape == (2, 1)


def test_backend_option_errors(torch_only_package):
    from mamba_rt.errors import MambaRTError, UnsupportedError

    pkg = torch_only_package[0]
    with pytest.raises(UnsupportedError, match="cuda_graph=True needs device 'cuda'"):
        Session.open(pkg, backend="torch", cuda_graph=True)
    with pytest.raises(UnsupportedError, match="ops 'triton'"):
        Session.open(pkg, backend="torch", ops="triton")
    # the package has no graphs: onnxruntime refuses by name, auto falls back to torch and says so
    with pytest.raises(MambaRTError, match="no portable graph"):
        Session.open(pkg, backend="onnxruntime")
    with Session.open(pkg, backend="auto") as s:
        assert s.backend.name == "torch" and "onnxruntime: the package has no portable graph" in s.backend.choice


@pytest.mark.parametrize("k1", [1, 2, 3])
def test_prompt_pieces_cover_the_prompt_with_few_graphs(k1):
    """Every prompt length up to 4096 is covered in order by at most 5 pieces (at most 11 before:
    one per set bit); graph lengths are powers of two; a padded piece has at least k1 padding
    positions and, past 64 tokens, fills more than 3/4 of its graph."""
    from mamba_rt.runtime.backend_torch import prompt_pieces

    for n in range(1, 4097):
        pieces = prompt_pieces(n, k1)
        assert sum(t for t, _, _ in pieces) == n and len(pieces) <= 5, (n, pieces)
        for t, length, padded in pieces:
            assert length & (length - 1) == 0, (n, pieces)
            if padded:
                assert length - t >= k1 and (length <= 64 or 4 * t > 3 * length), (n, pieces)
            else:
                assert t == length, (n, pieces)
    assert prompt_pieces(2047, 3) == [(2, 2, False), (2045, 2048, True)]
    assert prompt_pieces(2048, 3) == [(2048, 2048, False)]


def test_graph_captures_pause_the_garbage_collector():
    """collector_paused (around every CUDA graph capture): no automatic collection inside, however many
    objects are made there, so the destructors of unreachable objects run after the capture; the collector's
    state comes back as it was, after an exception too."""
    import gc
    import weakref

    from mamba_rt._gc import collector_paused

    class Node:
        pass

    was, thresholds = gc.isenabled(), gc.get_threshold()
    try:
        gc.enable()
        gc.set_threshold(1, 1, 1)
        with collector_paused():
            assert not gc.isenabled()
            a, b = Node(), Node()
            a.other, b.other = b, a  # a cycle: only a collection frees it
            alive = weakref.ref(a)
            del a, b
            junk = [[i] for i in range(10_000)]  # allocations that would trigger collections
            assert alive() is not None, "a collection ran inside the paused block"
        assert gc.isenabled()
        del junk
        gc.collect()
        assert alive() is None
        gc.disable()
        with pytest.raises(RuntimeError, match="inside"):
            with collector_paused():
                raise RuntimeError("inside")
        assert not gc.isenabled(), "a collector disabled before stays disabled"
    finally:
        gc.set_threshold(*thresholds)
        (gc.enable if was else gc.disable)()
