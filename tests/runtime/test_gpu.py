"""GPU backends end to end (``pytest -m gpu``): torch (plugins_cuda kernels + CUDA graphs) and the
onnxruntime CUDA provider, against the reference model; constant device and host memory.

Tolerances for half precision (logits, relative L2 error per step, teacher-forced so both sides see
the same tokens): fp16 2e-2, bf16 6e-2. fp32 must give identical greedy tokens.
"""
import os

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch", reason="the GPU tests drive the GPU through torch")

from mamba_rt.runtime import SamplingParams, Session  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.runtime.packages import diverse_prompts, export_tiny  # noqa: E402

HALF_TOL = {"fp16": 2e-2, "bf16": 6e-2}


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    root = tmp_path_factory.mktemp("gpu")
    return {dt: export_tiny(root / dt, seed=seed, dtype=dt, d_conv=4, d_state=16)[0] for dt in ("fp32", "fp16", "bf16")}, seed


def _reference(pkg):
    from mamba_rt.runtime.backend_torch import torch_model_from_package

    return torch_model_from_package(pkg, "cuda", ops="ref")


def _prompts(vocab, lengths):
    rng = np.random.default_rng()
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _ort_cuda_or_skip():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no CUDAExecutionProvider ({ort.get_available_providers()}); "
                    "install onnxruntime-gpu for the CUDA 13 of this machine")


BACKENDS = {"torch": dict(backend="torch"), "onnxruntime": dict(backend="onnxruntime")}


def _open(name, pkg, **kw):
    if name == "onnxruntime":
        _ort_cuda_or_skip()
    return Session.open(pkg, device="cuda", **BACKENDS[name], **kw)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_fp32_greedy_tokens_identical_to_reference_batched(packages, name):
    pkgs, seed = packages
    ref = _reference(pkgs["fp32"])
    prompts = _prompts(ref.config.vocab_size, [3, 17, 8])
    with _open(name, pkgs["fp32"], max_batch=4) as s:
        assert s.backend.cuda_graph and "CUDA graphs" in s.describe()
        out = s.generate(prompts, 64, stream=False)
    for p, g in zip(prompts, out):
        want = ref.generate_greedy(torch.tensor([p], device="cuda"), 64)[0].tolist()
        assert g.ids == want, (name, seed, p)


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("dtype", list(HALF_TOL))
def test_half_logits_within_tolerance_teacher_forced(packages, name, dtype):
    pkgs, seed = packages
    ref = _reference(pkgs[dtype])
    vocab = ref.config.vocab_size
    prompt, forced = _prompts(vocab, [11, 32])
    with _open(name, pkgs[dtype], max_batch=2) as s:
        slot = s.alloc()
        got = [s.prefill(slot, prompt, return_logits=True)]
        for t in forced:
            got.append(s.step([slot], [t], return_logits=True)[0])
    with torch.no_grad():
        lg, st = ref(torch.tensor([prompt], device="cuda"), None, last_only=True)
        want = [lg[0]]
        for t in forced:
            lg, st = ref(torch.tensor([[t]], device="cuda"), st, last_only=True)
            want.append(lg[0])
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_err(torch.from_numpy(g), w.cpu()) < HALF_TOL[dtype], (name, dtype, seed, i)


def test_torch_cuda_graph_equals_eager_and_sampling_matches_host(packages):
    pkgs, seed = packages
    sp = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=seed)
    prompts = _prompts(100, [5, 9, 2])
    outs = {}
    for graph in (True, False):
        with Session.open(pkgs["fp32"], backend="torch", device="cuda", max_batch=4, cuda_graph=graph) as s:
            outs[graph] = [g.ids for g in s.generate(prompts, 48, sp, stream=False)]
    assert outs[True] == outs[False], seed
    with Session.open(pkgs["fp32"], backend="onnxruntime", device="cpu", max_batch=4) as s:
        assert [g.ids for g in s.generate(prompts, 48, sp, stream=False)] == outs[True], seed


@pytest.mark.parametrize("chunk", [None, 5])
def test_torch_prefill_graphs_match_reference_and_touch_only_their_slot(packages, chunk):
    """Prompts run as a few pieces, each a CUDA graph captured once per (length, padded), a padded one
    taking fewer tokens behind padding positions that leave the state as it was: logits, the greedy
    id and the state carried into the next step match the reference model, graphs are reused across
    prompts, and another slot's state is untouched."""
    pkgs, seed = packages
    ref = _reference(pkgs["fp32"])
    lengths = [13, 13, 2, 37, 1, 70, 100, 6]
    prompts = _prompts(ref.config.vocab_size, lengths)
    with Session.open(pkgs["fp32"], backend="torch", device="cuda", max_batch=2, prefill_chunk=chunk) as s:
        assert s.prefill_chunk == (chunk or 2048)
        other = s.alloc()
        s.prefill(other, prompts[0])
        other_state = s.cache.buffers.read(other)
        slot = s.alloc()
        for i, p in enumerate(prompts):
            s.reset(slot)
            got = [s.prefill(slot, p, return_logits=True), s.step([slot], [p[0]], return_logits=True)[0]]
            with torch.no_grad():
                lg, st = ref(torch.tensor([p], device="cuda"), None, last_only=True)
                lg2, _ = ref(torch.tensor([[p[0]]], device="cuda"), st, last_only=True)
            for g, w in zip(got, (lg[0], lg2[0])):
                assert rel_err(torch.from_numpy(g), w.cpu()) < 1e-4, (seed, chunk, i, len(p))
            s.reset(slot)  # greedy: the id the last piece's graph computed and copied back
            assert s.prefill(slot, p) == int(lg[0].argmax()), (seed, chunk, i, len(p))
        pieces = sorted(s.backend._prefill_graphs)
        after = s.cache.buffers.read(other)
    # (graph length, padded): 13 in 16, 2, 37 in 64, 70 = 64 + 1 + 5 in 8, 100 in 128, 6 = 1 + 5 in 8;
    # chunks of 5: 5 in 8, 3 = 2 + 1, 2; one-token pieces are decode steps
    want = [(2, False), (8, True)] if chunk == 5 else [(2, False), (8, True), (16, True), (64, False), (64, True),
                                                       (128, True)]
    assert pieces == want, pieces
    assert np.array_equal(other_state[0], after[0]) and np.array_equal(other_state[1], after[1])


@pytest.mark.parametrize("name", list(BACKENDS))
def test_device_state_fork_snapshot_and_untouched_slots(packages, name):
    pkgs, seed = packages
    prompt = _prompts(100, [7])[0]
    with _open(name, pkgs["bf16"], max_batch=3) as s:
        a = s.alloc()
        whole = s.generate(prompt, 30, stream=False, slots=[a])[0].ids
        s.reset(a)
        first = s.generate(prompt, 10, stream=False, slots=[a])[0].ids
        blob = s.snapshot(a)
        b = s.fork(a)
        c = s.alloc()
        s.restore(c, blob)
        before_a = s.cache.buffers.read(a)
        with pytest.raises(Exception, match="outside the vocabulary"):
            s.step([b, c], [1, 10**6])
        rest = s.generate([[], []], 20, stream=False, slots=[b, c])
        after_a = s.cache.buffers.read(a)
    assert first == whole[:10] and rest[0].ids == rest[1].ids == whole[10:], (name, seed)
    assert np.array_equal(before_a[0], after_a[0]) and np.array_equal(before_a[1], after_a[1])


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_torch_decode_queues_fused_steps_ahead_exactly(packages, dtype):
    """Session.decode on the fused decode graphs: every step after the first queued ahead (fed the ids
    the step before left on the device), the same tokens and pending tokens as step() at a time and the
    same state within run_ahead.FUSED_STATE_TOL (its float atomics: run_ahead.assert_same_snapshot), at
    bucket 1 (GEMV kernels) and bucket 8 (GEMM path, 6 rows); generate likewise, also with two streams
    whose steps alternate on one graph."""
    from tests.runtime.run_ahead import check_decode_equals_steps, check_generate_ahead_equals_waiting

    pkgs, seed = packages
    with Session.open(pkgs[dtype], backend="torch", device="cuda", max_batch=16) as s:
        assert s.backend.fused
        prompts = diverse_prompts(s, [1, 5, 11, 3, 8, 2], 40)
        check_decode_equals_steps(s, prompts[:1], 40)
        check_decode_equals_steps(s, prompts, 40)
        check_generate_ahead_equals_waiting(s, prompts, 40)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_torch_graph_draws_equal_the_numpy_reference(packages, dtype):
    """Sampled steps are drawn inside CUDA graphs (fused decode at bucket 1 and at bucket 4 with a
    padding row, and the prompt graphs); each picks the tokens of sample_numpy on the same logits and
    uniform numbers. Then decode (steps queued ahead) and generate give the same as step() at a time."""
    from mamba_rt.runtime.sampling import sample_numpy, uniforms
    from tests.runtime.run_ahead import check_decode_equals_steps, check_generate_ahead_equals_waiting

    pkgs, seed = packages
    settings = [SamplingParams(temperature=0.8), SamplingParams(temperature=1.3, top_k=20),
                SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0.7, top_k=50, top_p=0.95)]
    rng = np.random.default_rng(seed)
    off_argmax = 0
    with Session.open(pkgs[dtype], backend="torch", device="cuda", max_batch=6) as s:
        assert s.backend.fused
        prompts = diverse_prompts(s, [1, 5, 11], 12)
        for n in (1, 3):
            slots = s.alloc(n)
            for x in slots:
                s.seed(x, int(rng.integers(2**63)))
            for sp in settings:
                for x, p in zip(slots, prompts):
                    blob = s.snapshot(x)
                    logits = s.prefill(x, p, return_logits=True)
                    s.restore(x, blob)
                    u = uniforms(s.sampler.seeds[[x]], s.sampler.counters[[x]])
                    assert s.prefill(x, p, sp) == sample_numpy(logits[None], None, sp, u)[0], (seed, sp)
                toks = np.array([s.pending(x) for x in slots])
                for _ in range(4):
                    blobs = [s.snapshot(x) for x in slots]
                    logits = s.step(slots, toks, return_logits=True)
                    for x, b in zip(slots, blobs):
                        s.restore(x, b)
                    want = sample_numpy(logits, None, sp, uniforms(s.sampler.seeds[slots], s.sampler.counters[slots]))
                    toks = s.step(slots, toks, sp)
                    np.testing.assert_array_equal(toks, want, err_msg=f"seed {seed}, {sp}")
                    off_argmax += int((toks != logits.argmax(-1)).sum())
            for x in slots:
                s.free(x)
        assert off_argmax >= 4, "the draws all but matched the argmax: the comparison would not discriminate"
        sp = SamplingParams(temperature=1.1, top_k=30, top_p=0.9, seed=seed)
        check_decode_equals_steps(s, prompts[:1], 30, sp)
        check_decode_equals_steps(s, prompts, 30, sp)
        check_generate_ahead_equals_waiting(s, prompts, 30, sp)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_torch_penalty_on_the_device_equals_the_numpy_reference(packages, dtype):
    """With a repetition penalty a fused step's logits are penalised on the device (the tokens seen: the
    prompt's, topped up from the host's mask before the first such step, then those the steps were fed,
    marked by their embedding kernels), then the argmax or the draw runs in a graph of its own, and so do
    the prompt graphs' for the first token: each picks the tokens of sample_numpy on the same logits, host
    mask and uniform numbers (prompts of 1, 5 and 11 tokens: a decode step and prompt graphs), at bucket 1 and at
    bucket 4 with a padding row (the logits from a fork of each slot, whose mask the fork copies on the
    device too); a restored snapshot goes on as its slot did. Then decode (every step after the first queued
    ahead) and generate give the same as step() at a time."""
    from mamba_rt.runtime.sampling import sample_numpy, uniforms
    from tests.runtime.run_ahead import check_decode_equals_steps, check_generate_ahead_equals_waiting

    pkgs, seed = packages
    settings = [SamplingParams(repetition_penalty=3.0), SamplingParams(repetition_penalty=0.3),
                SamplingParams(temperature=0.9, top_k=30, repetition_penalty=1.5),
                SamplingParams(temperature=1.2, top_p=0.9, repetition_penalty=2.0)]
    rng = np.random.default_rng(seed)
    changed = 0
    with Session.open(pkgs[dtype], backend="torch", device="cuda", max_batch=6) as s:
        assert s.backend.fused
        prompts = diverse_prompts(s, [1, 5, 11], 12)
        for n in (1, 3):
            for sp in settings:
                slots = s.alloc(n)
                for x, p in zip(slots, prompts):  # the first token: the prompt graphs' penalty
                    s.seed(x, int(rng.integers(2**63)))
                    y = s.fork(x)
                    logits = s.prefill(y, p, return_logits=True)[None]
                    seen = s.sampler.seen[[y]].copy()
                    s.free(y)
                    u = None if sp.greedy else uniforms(s.sampler.seeds[[x]], s.sampler.counters[[x]])
                    want = sample_numpy(logits, seen, sp, u)
                    assert s.prefill(x, p, sp) == want[0], (seed, sp, len(p))
                    changed += int((want != sample_numpy(logits, None, sp, u)).sum())
                toks = np.array([s.pending(x) for x in slots])
                for _ in range(6):
                    forks = [s.fork(x) for x in slots]
                    logits = s.step(forks, toks, return_logits=True)
                    seen = s.sampler.seen[forks].copy()  # the prompt and the tokens fed, this step's too
                    for y in forks:
                        s.free(y)
                    u = None if sp.greedy else uniforms(s.sampler.seeds[slots], s.sampler.counters[slots])
                    want = sample_numpy(logits, seen, sp, u)
                    toks = s.step(slots, toks, sp)
                    np.testing.assert_array_equal(toks, want, err_msg=f"seed {seed}, {sp}")
                    changed += int((want != sample_numpy(logits, None, sp, u)).sum())
                for x in slots:
                    s.free(x)
        assert changed >= 4, "the penalty all but never changed a token: the comparison would not discriminate"
        # a snapshot restored into another slot (its device row zeroed, then topped up from the host's) goes on
        # as the slot it came from did
        sp = SamplingParams(temperature=1.0, top_k=40, repetition_penalty=1.6)
        a = s.alloc()
        s.seed(a, seed)
        whole = s.generate(prompts[1], 24, sp, stream=False, slots=[a])[0].ids
        s.reset(a)
        s.seed(a, seed)
        first = s.generate(prompts[1], 12, sp, stream=False, slots=[a])[0].ids
        b = s.alloc()
        s.restore(b, s.snapshot(a))
        assert first + s.generate([], 12, sp, stream=False, slots=[b])[0].ids == whole, seed
        s.free(a)
        s.free(b)
        for sp in (SamplingParams(repetition_penalty=1.4), SamplingParams(temperature=1.1, top_k=30, top_p=0.9,
                                                                        repetition_penalty=1.3, seed=seed)):
            check_decode_equals_steps(s, prompts[:1], 30, sp)
            check_decode_equals_steps(s, prompts, 30, sp)
            check_generate_ahead_equals_waiting(s, prompts, 30, sp)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_fused_steps_store_their_tokens_in_pinned_memory(packages, dtype, monkeypatch):
    """The kernels that take a fused step's tokens (the head's argmax, the argmax kernel, the draw
    kernel) store them straight into the graph's pinned buffer (decode_step.IDS_TO_HOST), with no copy
    node after them: each buffer the graphs use is mapped on this GPU and poisoned before every
    replay, and decode (steps queued ahead), greedy at buckets 1 and 8 (6 rows: the GEMM path's argmax
    kernel) and sampled, gives the tokens it gives with the copy nodes (IDS_TO_HOST = 0)."""
    from mamba_rt.plugins_cuda import decode_step
    from mamba_rt.runtime import backend_torch

    used = []
    reuse = backend_torch._IdsOut.reuse

    def poisoned(self):
        reuse(self)  # the ids not read yet are kept first
        self.host[:] = -7
        used.append(self)

    monkeypatch.setattr(backend_torch._IdsOut, "reuse", poisoned)
    pkgs, seed = packages
    runs, prompts = {}, None
    for flag in (1, 0):
        monkeypatch.setattr(decode_step, "IDS_TO_HOST", flag)
        with Session.open(pkgs[dtype], backend="torch", device="cuda", max_batch=8) as s:
            assert s.backend.fused
            prompts = prompts or diverse_prompts(s, [1, 5, 11, 3, 8, 2], 30)  # the same for both
            out = []
            for group, sp in ((prompts[:1], None), (prompts, None),
                              (prompts[:1], SamplingParams(temperature=1.1, top_p=0.9, seed=seed))):
                slots = s.alloc(len(group))
                for x, p in zip(slots, group):
                    s.prefill(x, p, sp)
                out.append(np.asarray(s.decode(slots, 30, sampling=sp)))
                for x in slots:
                    s.free(x)
            runs[flag] = out
            if flag:
                assert used and all(o.mapped("cuda") for o in used), "a graph's pinned buffer is not mapped"
                used.clear()
    for a, b in zip(runs[1], runs[0]):
        assert (a >= 0).all() and np.array_equal(a, b), (seed, a, b)


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


SETTINGS = {"greedy": None, "sampled": SamplingParams(temperature=1.0, top_p=0.9, seed=1),
            "penalty": SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.1, seed=1)}


@pytest.mark.parametrize("name,setting", [("torch", "sampled"), ("torch", "greedy"), ("torch", "penalty"),
                                          ("onnxruntime", "sampled")])
def test_constant_device_and_host_memory_over_20000_tokens(packages, name, setting):
    """Greedy and sampled (the torch backend queues steps ahead, drawn in CUDA graphs), and with a
    repetition penalty (applied on the device, queued ahead as well)."""
    pkgs, _ = packages
    n = 20000
    sp = SETTINGS[setting]
    with _open(name, pkgs["fp16"], max_batch=1) as s:
        list(s.generate([1, 2, 3], 150, sp))  # warm-up: graphs captured, arenas settled
        mark = {}
        for i, _ in enumerate(s.generate([4, 5], n, sp)):
            if i in (99, n - 1):
                torch.cuda.synchronize()
                free, total = torch.cuda.mem_get_info()
                mark[i] = (total - free, torch.cuda.memory_allocated(), _rss())
    (dev0, alloc0, rss0), (dev1, alloc1, rss1) = mark[99], mark[n - 1]
    assert abs(dev1 - dev0) <= 1 << 20, f"device memory changed by {(dev1 - dev0) / 1024:.0f} KiB"
    assert alloc1 == alloc0
    assert abs(rss1 - rss0) <= 1 << 20, f"host RSS changed by {(rss1 - rss0) / 1024:.0f} KiB"
