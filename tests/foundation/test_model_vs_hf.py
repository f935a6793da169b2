"""The reference model against Hugging Face transformers' MambaForCausalLM (its pure-PyTorch path).

Checkpoints are written by the tests (no binary checkpoints in the repo) with random weights at the
scales of a trained Mamba; every test draws fresh inputs.
"""
import pytest
import torch

from mamba_rt.checkpoint import save_checkpoint
from mamba_rt.exporters.model import load_model, random_weights
from tests.helpers import rel_err, tiny_config, varied_prompt

transformers = pytest.importorskip("transformers", reason="transformers is needed for the HF oracle tests")

# Base case plus rows that each change one field (awkward sizes on purpose).
CONFIGS = {
    "base": {},
    "d_state16": dict(d_state=16),
    "conv2": dict(d_conv=2),
    "conv4": dict(d_conv=4),
    "dmodel50_default_dt_rank": dict(d_model=50, dt_rank="auto"),
    "biases": dict(bias=True, conv_bias=False),
    "untied": dict(tie_embeddings=False),
    "no_fp32_residual": dict(residual_in_fp32=False),
    "three_layers_expand3": dict(n_layer=3, expand=3),
}


def _hf_pair(tmp_path, name, seed):
    cfg = tiny_config(**CONFIGS[name])
    w = random_weights(cfg, "fp32", seed=seed)
    d = tmp_path / name
    save_checkpoint(cfg, w, d, fmt="hf")
    ours = load_model(d, "fp32")
    hf = transformers.MambaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return cfg, ours, hf


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf_fp32(tmp_path, name):
    seed = int(torch.randint(0, 2**31, ()).item())
    cfg, ours, hf = _hf_pair(tmp_path, name, seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        a, _ = ours(ids)
        b = hf(ids).logits
    assert a.shape == b.shape == (2, 19, cfg.vocab_size)
    assert rel_err(a, b) < 1e-4, f"seed {seed}"


@pytest.mark.parametrize("name", ["base", "conv4", "biases"])
def test_greedy_generation_matches_hf(tmp_path, name):
    seed = int(torch.randint(0, 2**31, ()).item())
    cfg, ours, hf = _hf_pair(tmp_path, name, seed)
    prompt, mine = varied_prompt(lambda p: ours.generate_greedy(p, 32), cfg.vocab_size)
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)[:, 7:]
    assert len(set(mine[0].tolist())) >= 4, "degenerate sequence: the comparison would not discriminate"
    assert torch.equal(mine, theirs), f"seed {seed}\nours   {mine.tolist()}\nhf     {theirs.tolist()}"


@pytest.mark.parametrize("name", ["base", "conv2", "d_state16"])
def test_prefill_then_steps_equals_one_forward(tmp_path, name):
    cfg = tiny_config(**CONFIGS[name])
    model = load_model(_save(tmp_path, cfg), "fp32")
    ids = torch.randint(0, cfg.vocab_size, (3, 23))
    with torch.no_grad():
        full, full_state = model(ids)
        # an arbitrary non-zero starting state must be carried through both paths alike
        init = model.zero_state(3)
        init = init._replace(conv=torch.randn_like(init.conv), ssm=torch.randn_like(init.ssm))
        full_i, full_state_i = model(ids, init)
        logits_p, state = model(ids[:, :11], init)
        steps = [logits_p[:, -1]]
        for t in range(11, 23):
            lg, state = model(ids[:, t:t + 1], state)
            steps.append(lg[:, -1])
    assert rel_err(torch.stack(steps[:-1], 1), full_i[:, 10:22]) < 1e-5
    assert rel_err(steps[-1], full_i[:, -1]) < 1e-5
    assert rel_err(state.conv, full_state_i.conv) < 1e-6
    assert rel_err(state.ssm, full_state_i.ssm) < 1e-5
    # and the initial state matters (the test above would be vacuous otherwise)
    assert rel_err(full_i, full) > 1e-3


def _save(tmp_path, cfg, fmt="hf", seed=None, **kw):
    seed = int(torch.randint(0, 2**31, ()).item()) if seed is None else seed
    d = tmp_path / f"{fmt}-{seed}"
    save_checkpoint(cfg, random_weights(cfg, "fp32", seed=seed), d, fmt=fmt, **kw)
    return d


@pytest.mark.parametrize("kind", ["safetensors", "pickle"])
def test_mamba_ssm_format_loads_the_identical_model(tmp_path, kind):
    cfg = tiny_config(pad_vocab_size_multiple=8)  # vocabulary 101 padded to 104
    w = random_weights(cfg, "fp32", seed=3)
    save_checkpoint(cfg, w, tmp_path / "hf", fmt="hf")
    save_checkpoint(cfg, w, tmp_path / "ssm", fmt="mamba_ssm", kind=kind)
    a = load_model(tmp_path / "hf")
    b = load_model(tmp_path / "ssm")
    assert b.config.source_format == "mamba_ssm" and a.config.source_format == "hf"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        la, _ = a(ids)
        lb, _ = b(ids)
    # the HF-format config has the padded vocabulary; the mamba_ssm one knows the real size (101)
    assert lb.shape[-1] == 101 and la.shape[-1] == 104
    assert torch.equal(la[..., :101], lb)


def test_sharded_safetensors_load(tmp_path):
    cfg = tiny_config()
    w = random_weights(cfg, "fp32", seed=5)
    save_checkpoint(cfg, w, tmp_path / "one", fmt="hf")
    save_checkpoint(cfg, w, tmp_path / "sharded", fmt="hf", shards=3)
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) == 3
    a, b = load_model(tmp_path / "one"), load_model(tmp_path / "sharded")
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        assert torch.equal(a(ids)[0], b(ids)[0])


@pytest.mark.parametrize("dtype, tol", [("fp16", 2e-2), ("bf16", 6e-2)])
def test_low_precision_models_stay_close_to_fp32(tmp_path, dtype, tol):
    """fp16/bf16 weights and activations, fp32 residual stream, SSM state and A/D/dt bias.
    Tolerances: ~10 rounding steps of 2^-11 (fp16) / 2^-8 (bf16) through 2 layers and the head."""
    cfg = tiny_config()
    d = _save(tmp_path, cfg)
    ref = load_model(d, "fp32")
    low = load_model(d, dtype)
    assert low.backbone.layers[0].mixer.A_log.dtype == torch.float32
    assert low.backbone.layers[0].mixer.dt_proj.bias.dtype == torch.float32
    assert low.backbone.layers[0].mixer.in_proj.weight.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        a, sa = low(ids)
        b, sb = ref(ids)
    assert sa.ssm.dtype == torch.float32 and sa.conv.dtype == low.dtype
    assert rel_err(a, b) < tol
    assert rel_err(sa.ssm, sb.ssm) < tol
