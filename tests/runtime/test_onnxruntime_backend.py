"""The onnxruntime backend (CPU) on a package exported by ``export_package`` from an HF checkpoint.

Oracles: Hugging Face transformers' MambaForCausalLM (greedy tokens), the same session decoding
other arrangements of the same work (alone vs batched, uninterrupted vs snapshot/restore, fork), and
the torch backend on the same package (sampled tokens: the two samplers share one definition).
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime")

from mamba_rt.errors import InputError  # noqa: E402
from mamba_rt.manifest import PackageError, load_manifest  # noqa: E402
from mamba_rt.runtime import SamplingParams, Session, SnapshotError, derive_seed  # noqa: E402
from tests.runtime.packages import diverse_prompts  # noqa: E402

SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.15, seed=11)


def _rng():
    return np.random.default_rng()


def _prompt(rng, vocab, n):
    return rng.integers(0, vocab, n).tolist()


def _all_states(s):
    return [s.cache.buffers.read(i) for i in range(s.max_batch)]


def _same_states(a, b):
    return all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


def test_greedy_equals_hugging_face_for_64_tokens(hf_package):
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle")
    import torch

    pkg, ckpt, cfg, seed = hf_package
    hf = transformers.MambaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with Session.open(pkg, backend="onnxruntime") as s:
        assert s.backend.name == "onnxruntime" and "CPUExecutionProvider" in s.describe()
        (prompt,) = diverse_prompts(s, [7], 64, min_distinct=8)
        mine = s.generate(prompt, 64, stream=False)[0].ids
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, min_new_tokens=64)[0, 7:].tolist()
    assert len(set(theirs)) >= 8, "degenerate sequence: the comparison would not discriminate"
    assert mine == theirs, f"seed {seed}\nours {mine}\nhf   {theirs}"


@pytest.mark.parametrize("sampling", [None, SAMPLED], ids=["greedy", "sampled"])
def test_three_prompts_in_one_batch_equal_each_alone(hf_package, sampling):
    pkg, _, cfg, seed = hf_package
    with Session.open(pkg, backend="onnxruntime", max_batch=4) as s:
        prompts = diverse_prompts(s, [3, 17, 8], 40)
        together = s.generate(prompts, 40, sampling, stream=False)
        sp = sampling or SamplingParams()
        for i, p in enumerate(prompts):
            slot = s.alloc()
            s.seed(slot, derive_seed(sp.seed, i))
            alone = s.generate(p, 40, sampling, stream=False, slots=[slot])[0]
            s.free(slot)
            assert alone.ids == together[i].ids, (seed, i)
    assert len({tuple(g.ids) for g in together}) == 3


def test_sequences_finishing_early_leave_the_batch(hf_package):
    pkg, _, cfg, seed = hf_package
    rng = _rng()
    prompts = [_prompt(rng, cfg.vocab_size, n) for n in (5, 2, 12)]
    with Session.open(pkg, backend="onnxruntime", max_batch=3) as s:
        full = s.generate(prompts, 30, stream=False)
        stop = full[1].ids[6]  # sequence 1 stops at its 7th token (or earlier if it repeats)
        events = list(s.generate(prompts, 30, stop=[stop]))
    first = full[1].ids.index(stop)
    ids = {i: [e.id for e in events if e.index == i] for i in range(3)}
    assert ids[1] == full[1].ids[:first + 1] and [e.finish for e in events if e.index == 1][-1] == "stop"
    for i in (0, 2):  # the others go on unaffected, unless they met the stop token themselves
        n = full[i].ids.index(stop) + 1 if stop in full[i].ids else 30
        assert ids[i] == full[i].ids[:n], seed


@pytest.mark.parametrize("sampling", [None, SAMPLED], ids=["greedy", "sampled"])
def test_snapshot_then_restore_continues_exactly(hf_package, tmp_path, sampling):
    pkg, _, cfg, seed = hf_package
    with Session.open(pkg, backend="onnxruntime", max_batch=2) as s:
        (prompt,) = diverse_prompts(s, [9], 48)
        slot = s.alloc()
        s.seed(slot, 5)
        uninterrupted = s.generate(prompt, 48, sampling, stream=False, slots=[slot])[0].ids
        s.reset(slot)
        s.seed(slot, 5)
        first = s.generate(prompt, 20, sampling, stream=False, slots=[slot])[0].ids
        s.cache.save(slot, tmp_path / "conv.state")
        blob = s.snapshot(slot)
    with Session.open(pkg, backend="onnxruntime", max_batch=3) as s2:
        other = s2.alloc()  # restore into a slot that is not slot 0, next to a busy one
        s2.prefill(other, prompt[:4])
        a, b = s2.alloc(2)
        s2.cache.load(a, tmp_path / "conv.state")
        s2.restore(b, blob)
        rest_a = s2.generate([], 28, sampling, stream=False, slots=[a])[0].ids
        rest_b = s2.generate([[]], 28, sampling, stream=False, slots=[b])[0].ids
    assert first == uninterrupted[:20]
    assert rest_a == rest_b == uninterrupted[20:], seed


def test_fork_gives_identical_continuations(hf_package):
    pkg, _, cfg, seed = hf_package
    with Session.open(pkg, backend="onnxruntime", max_batch=3) as s:
        (prompt,) = diverse_prompts(s, [6], 33)
        a = s.alloc()
        s.prefill(a, prompt)
        b = s.fork(a)
        assert s.pending(b) == s.pending(a) is not None
        out = s.generate([[], []], 32, stream=False, slots=[a, b])
        c = s.fork(a)  # forks diverge when given different next tokens
        s.step([a, c], [1, 2])
        assert not np.array_equal(s.cache.buffers.read(a)[1], s.cache.buffers.read(c)[1])
    assert out[0].ids == out[1].ids and len(set(out[0].ids)) >= 4, seed


def test_chunked_prefill_equals_one_pass(hf_package):
    pkg, _, cfg, seed = hf_package
    prompt = _prompt(_rng(), cfg.vocab_size, 23)
    logits, states = [], []
    for chunk in (1, 5, 256):
        with Session.open(pkg, backend="onnxruntime", prefill_chunk=chunk, max_batch=1) as s:
            slot = s.alloc()
            logits.append(s.prefill(slot, prompt, return_logits=True))
            states.append(s.cache.buffers.read(slot))
    for lg, st in zip(logits[1:], states[1:]):
        np.testing.assert_allclose(lg, logits[0], rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
        np.testing.assert_allclose(st[1], states[0][1], rtol=1e-5, atol=1e-6)


def _teacher_forced(session, prompt, forced):
    slot = session.alloc()
    out = [session.prefill(slot, prompt, return_logits=True)]
    out += [session.step([slot], [t], return_logits=True)[0] for t in forced]
    session.free(slot)
    return out


def _reference_teacher_forced(pkg, prompt, forced):
    import torch

    from mamba_rt.runtime.backend_torch import torch_model_from_package

    model = torch_model_from_package(pkg)
    with torch.no_grad():
        lg, st = model(torch.tensor([prompt]), None, last_only=True)
        out = [lg[0]]
        for t in forced:
            lg, st = model(torch.tensor([[t]]), st, last_only=True)
            out.append(lg[0])
    return [o.float().numpy() for o in out]


def test_logits_of_consecutive_steps_equal_reference(hf_package):
    pytest.importorskip("torch", reason="the reference model is torch")
    pkg, _, cfg, seed = hf_package
    rng = _rng()
    prompt, forced = _prompt(rng, cfg.vocab_size, 9), _prompt(rng, cfg.vocab_size, 6)
    with Session.open(pkg, backend="onnxruntime") as s:
        got = _teacher_forced(s, prompt, forced)
    for i, (g, w) in enumerate(zip(got, _reference_teacher_forced(pkg, prompt, forced))):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"seed {seed}, step {i}")


@pytest.mark.slow
def test_fp16_package_logits_within_tolerance(tmp_path):
    """fp16 state (conv state bound as float16) through ONNX Runtime on the CPU; rel. L2 error < 1e-2
    against the reference model at fp16. (bf16 packages do not run on ORT's CPU provider: it has no
    bfloat16 MatMul.)"""
    pytest.importorskip("torch", reason="exporting needs torch")
    import torch

    from tests.helpers import rel_err
    from tests.runtime.packages import export_tiny

    seed = int(np.random.SeedSequence().entropy % 2**31)
    pkg, _ = export_tiny(tmp_path / "p", seed=seed, dtype="fp16")
    rng = _rng()
    prompt, forced = _prompt(rng, 101, 12), _prompt(rng, 101, 8)
    with Session.open(pkg, backend="onnxruntime", prefill_chunk=5) as s:
        assert s.cache.buffers.conv.dtype == np.float16
        got = _teacher_forced(s, prompt, forced)
    for i, (g, w) in enumerate(zip(got, _reference_teacher_forced(pkg, prompt, forced))):
        assert rel_err(torch.from_numpy(g), torch.from_numpy(w)) < 1e-2, (seed, i)


def test_onnxruntime_and_torch_backends_sample_the_same_tokens(hf_package):
    pytest.importorskip("torch", reason="compares with the torch backend")
    pkg, _, cfg, seed = hf_package
    rng = _rng()
    prompts = [_prompt(rng, cfg.vocab_size, n) for n in (4, 10)]
    outs = {}
    for backend in ("onnxruntime", "torch"):
        with Session.open(pkg, backend=backend, max_batch=2) as s:
            outs[backend] = [g.ids for g in s.generate(prompts, 24, SAMPLED, stream=False)]
    assert outs["onnxruntime"] == outs["torch"], seed


def test_bad_input_is_refused_before_any_work_and_other_slots_stay(hf_package, torch_only_package):
    pkg, _, cfg, seed = hf_package
    v = cfg.vocab_size
    with Session.open(pkg, backend="onnxruntime", max_batch=3) as s:
        a, b = s.alloc(2)
        s.prefill(a, _prompt(_rng(), v, 5))
        s.prefill(b, _prompt(_rng(), v, 3))
        before = _all_states(s)
        pending = [s.pending(a), s.pending(b)]
        cases = [
            (lambda: s.step([a, b], [1, v]), InputError, f"token id {v} at position 1 is outside the vocabulary"),
            (lambda: s.step([a, b], [-1, 0]), InputError, "token id -1 at position 0"),
            (lambda: s.prefill(a, [3, 4, 1000]), InputError, "token id 1000 at position 2"),
            (lambda: s.prefill(a, [1.0, 2.0]), InputError, "integer token ids"),
            (lambda: s.prefill(a, []), InputError, "empty"),
            (lambda: s.generate("", 4), InputError, "empty"),
            (lambda: s.generate([[1], [2, 3]], 4), InputError, "2 prompts but only 1 free slots"),
            (lambda: s.generate([[1]] * 4, 4), InputError, "4 prompts but only 1 free slots"),
            (lambda: s.generate([[1], [2, v + 5]], 4), InputError, f"prompt 1: token id {v + 5}"),
            (lambda: s.generate([5], 0), InputError, "max_new_tokens"),
            (lambda: s.step([a, a], [1, 2]), InputError, "once per step"),
            (lambda: s.step([a, 2], [1, 2]), InputError, "slot 2: not allocated"),
            (lambda: s.step([a], [1, 2]), InputError, "one id per slot"),
            (lambda: s.alloc(2), InputError, "2 sequence"),
        ]
        for call, exc, match in cases:
            with pytest.raises(exc, match=match):
                call()
        # a snapshot of another model is refused
        with Session.open(torch_only_package[0], backend="torch", max_batch=1) as other:
            theirs = other.snapshot(other.alloc())
        with pytest.raises(SnapshotError, match="belongs to model"):
            s.restore(b, theirs)
        assert _same_states(_all_states(s), before)
        assert [s.pending(a), s.pending(b)] == pending


def test_unknown_backend_and_broken_packages(hf_package, tmp_path):
    pkg = hf_package[0]
    with pytest.raises(InputError, match="unknown backend 'tensorflow'"):
        Session.open(pkg, backend="tensorflow")
    with pytest.raises(InputError, match="device"):
        Session.open(pkg, device="gpu0")
    with pytest.raises(InputError, match="max_batch"):
        Session.open(pkg, max_batch=0)
    for missing, match in (("decode.onnx", "graph 'decode' file 'decode.onnx' is missing"),
                           ("weights.bin", "weights file 'weights.bin' is missing")):
        broken = tmp_path / missing
        shutil.copytree(pkg, broken)
        (broken / missing).unlink()
        with pytest.raises(PackageError, match=match):
            Session.open(broken, backend="onnxruntime")
    truncated = tmp_path / "truncated"
    shutil.copytree(pkg, truncated)
    with open(truncated / "weights.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(PackageError, match="truncated"):
        Session.open(truncated)
    with pytest.raises(PackageError, match="not a directory"):
        Session.open(tmp_path / "nothing")


def test_package_tokenizer_text_in_text_out(hf_package, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    pkg, _, cfg, seed = hf_package
    words = [f"w{i}" for i in range(cfg.vocab_size - 1)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                                           unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    with_tok = tmp_path / "pkg"
    shutil.copytree(pkg, with_tok)
    tok.save(str(with_tok / "tokenizer.json"))
    m = load_manifest(with_tok)
    m.tokenizer = "tokenizer.json"
    m.save(with_tok)
    with Session.open(with_tok) as s:
        assert s.tokenizer.kind == "tokenizer.json"
        g = s.generate("w5 w17 w3", 12, stream=False)[0]
        assert g.prompt_ids == [6, 18, 4]
        # the random model may draw id 0 ([UNK]) as well as any word
        assert g.text == tok.decode(g.ids) and g.text.split() == [("[UNK]" if i == 0 else f"w{i - 1}") for i in g.ids]
        streamed = "".join(t.text for t in s.generate("w5 w17 w3", 12))
        assert streamed == g.text


def test_cli_generate_json_and_stream(hf_package, capsys):
    from mamba_rt.cli import main

    pkg, _, cfg, seed = hf_package
    prompt = _prompt(_rng(), cfg.vocab_size, 5)
    with Session.open(pkg, backend="onnxruntime") as s:
        want = s.generate(prompt, 10, stream=False)[0]
    ids = ",".join(map(str, prompt))
    assert main(["generate", str(pkg), "--prompt-ids", ids, "--max-new-tokens", "10", "--json", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    obj = json.loads(out.out)
    assert obj["prompt_ids"] == prompt and obj["generated_ids"] == want.ids and obj["text"] == want.text
    assert obj["tokens_per_s"] > 0 and obj["backend"] == "onnxruntime"
    assert "auto chose onnxruntime" in out.err
    assert main(["generate", str(pkg), "--prompt", "HA", "--max-new-tokens", "6", "--temperature", "0.8",
                 "--top-k", "5", "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "tokens/s" in out.err and out.out.endswith("\n")
    r = subprocess.run([sys.executable, "-m", "mamba_rt.cli", "generate", str(pkg), "--prompt-ids", f"1,{cfg.vocab_size}"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "outside the vocabulary" in r.stderr and "Traceback" not in r.stderr


def test_cli_generate_runs_where_the_other_commands_do_by_default(hf_package, capsys, monkeypatch):
    """Without --device, generate takes the device `mamba-rt demo` and `bench` take (cuda when torch sees a
    GPU): here the default is made a GPU this machine does not have, and the error names it."""
    import mamba_rt._optional
    from mamba_rt.cli import main

    monkeypatch.setattr(mamba_rt._optional, "default_device", lambda: "cuda:7")
    assert main(["generate", str(hf_package[0]), "--prompt-ids", "1,2", "--max-new-tokens", "2"]) == 2
    assert "on cuda:7" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["generate", str(hf_package[0]), "--prompt-ids", "1,2", "--max-new-tokens", "2"]) == 0
    assert f"on {mamba_rt._optional.default_device()}" in capsys.readouterr().err


def test_onnxruntime_backend_runs_without_torch(hf_package):
    """The onnxruntime path must work where torch is not installed (torch imports are made to fail)."""
    pkg = hf_package[0]
    code = f"""
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
from mamba_rt.runtime import Session
from mamba_rt.errors import MissingDependencyError
with Session.open({str(pkg)!r}) as s:
    assert s.backend.name == "onnxruntime", s.backend.choice
    assert len(s.generate([1, 2, 3], 5, stream=False)[0].ids) == 5
try:
    Session.open({str(pkg)!r}, backend="torch")
except MissingDependencyError as e:
    assert "mamba-rt[export]" in str(e), e
else:
    raise SystemExit("torch backend opened without torch")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_host_memory_is_constant_while_generating(hf_package):
    """Host memory does not grow with the generated length. A leak grows across every stretch of
    tokens; the allocators may take one step of a few MB at any time (in CI with onnxruntime 1.32:
    once 2 MB, once 5.4 MB in one stretch of 8,000 tokens; < 100 KB in other runs). So of four
    stretches of ~2,000 tokens, the three that grew least may grow by 512 KiB together (a leak of ~90
    bytes per token would not stay under it), and the one step may be at most 16 MiB."""
    pkg, _, cfg, seed = hf_package
    n = 4000
    marks = (200, n // 2, n, 3 * n // 2, 2 * n - 1)  # tokens of both sequences counted together
    with Session.open(pkg, backend="onnxruntime", max_batch=2) as s:
        list(s.generate([[1, 2], [3]], 120, SAMPLED))  # warm-up: allocator arenas settle
        rss = {}
        for i, tok in enumerate(s.generate([[4, 5, 6], [7]], n, SAMPLED)):
            if i in marks:
                rss[i] = _rss_bytes()
    assert sorted(rss) == list(marks)
    steps = [rss[b] - rss[a] for a, b in zip(marks, marks[1:])]
    kib = [g // 1024 for g in steps]
    assert sum(sorted(steps)[:-1]) <= 512 << 10, f"host RSS grew across the stretches of tokens: {kib} KiB"
    assert max(map(abs, steps)) <= 16 << 20, f"host RSS changed by {kib} KiB in stretches of {n // 2} tokens"
