"""The fused decode step (runtime/fused_decode.py, plugins_cuda/decode_step.cu) against its reference
twin, the reference model's forward at L = 1, computed in higher precision (float64 for fp32 models,
float32 for half-precision ones, from the same weights), on random weights, random state and random
slots; outputs poisoned with NaN before every step; untouched slots checked bit for bit. The first
step runs eagerly, the next two replay it captured in a CUDA graph.

Relative L2 tolerances: fp32 1e-4 (observed ~1e-6), fp16 2e-2, bf16 6e-2 (the half-precision model
rounds every intermediate to its dtype, as the reference in that dtype does).
"""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch", reason="the fused decode step runs through torch on a GPU")

from mamba_rt.config import MambaConfig  # noqa: E402
from mamba_rt.exporters.model import REF_OPS, MambaState, model_from_weights, random_weights  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2}
CASES = {
    # scalar paths everywhere: d_model 36, d_inner 72 (not multiples of the 16-byte vector), n 4, k 3
    "tiny": dict(d_model=36, n_layer=2, vocab_size=101, d_state=4, d_conv=3, dt_rank=5, pad_vocab_size_multiple=1),
    # vector paths, the published shape family (n 16, k 4), 3 x_proj chunks with a partial last one
    "mid": dict(d_model=160, n_layer=3, vocab_size=1000, d_state=16, d_conv=4),
    # biases everywhere, residual in the model dtype, n 8, k 2
    "bias": dict(d_model=128, n_layer=2, vocab_size=500, d_state=8, d_conv=2, bias=True, conv_bias=True,
                 residual_in_fp32=False),
}


def _models(cfg, dtype, seed):
    w = random_weights(cfg, dtype, seed=seed)
    model = model_from_weights(cfg, w, dtype, "cuda", REF_OPS)
    hi = model_from_weights(cfg, {k: v.float() for k, v in w.items()}, "fp32", "cuda", REF_OPS)
    if dtype == "fp32":
        hi = hi.double()
    return model, hi


@pytest.mark.parametrize("batch", [1, 2, 3, 16])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_steps_match_reference(case, dtype, batch):
    _check_steps(case, dtype, batch, mma=None)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_steps_fma_gemv(case, dtype, batch):
    """The GEMV buckets of 1 and 2 rows with the FMA matrix-vector kernels in every dtype (the default
    for 16-bit models, whose rows are whole 16-byte vectors, is the tensor-core one tested above)."""
    _check_steps(case, dtype, batch, mma=False)


def _check_steps(case, dtype, batch, mma):
    from mamba_rt.runtime.backend import batch_bucket
    from mamba_rt.runtime.fused_decode import FusedDecoder

    seed = int(np.random.SeedSequence().entropy % 2**31)
    cfg = MambaConfig(**CASES[case])
    model, hi = _models(cfg, dtype, seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    n_slots = 2 * batch + 3
    shapes = cfg.state_shapes(n_slots)
    conv = (0.5 * torch.randn(shapes["conv_state"], generator=g, device="cuda")).to(model.dtype)
    ssm = 0.5 * torch.randn(shapes["ssm_state"], generator=g, device="cuda")
    dec = FusedDecoder(model, conv, ssm, dtype, mma=mma)
    bucket = batch_bucket(batch, 16)
    bk = dec.bucket(bucket)
    assert bk.gemv == (bucket <= 2), "buckets of 1 and 2 rows take the GEMV path, larger ones the GEMM path"
    if bk.gemv:  # which matrix-vector kernels run: tensor cores for 16-bit models, rows of 16-byte vectors
        names = [ln.name for ln in bk.launches if not callable(ln)]
        for kind, k in (("norm_gemv", cfg.d_model), ("gemv_residual", cfg.d_inner)):
            mma_expected = mma is not False and dtype != "fp32" and k % 8 == 0
            got = {"_mma_" in n for n in names if n.startswith(kind)}
            assert got == {mma_expected}, (kind, names)
    slots = torch.randperm(n_slots, generator=g, device="cuda")[:bucket]
    conv0, ssm0 = conv.clone(), ssm.clone()
    h_conv = conv[:, slots].to(hi.dtype if dtype != "fp32" else torch.float64)
    h_ssm = ssm[:, slots].to(torch.float64 if dtype == "fp32" else torch.float32)
    for step in range(3):
        ids = torch.randint(0, cfg.vocab_size, (bucket,), generator=g, device="cuda")
        if step == 2:  # the largest and smallest ids
            ids[0], ids[-1] = cfg.vocab_size - 1, 0
        for buf in (bk.logits, bk.h, bk.u, bk.y):
            buf.fill_(float("nan"))
        bk.ids.copy_(ids)
        bk.idx.copy_(slots)
        if step == 0:  # eagerly, then captured in a CUDA graph as the backend runs it
            dec.enqueue(bk)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                dec.enqueue(bk)
        else:
            graph.replay()
        with torch.no_grad():
            ref, st = hi(ids[:, None], MambaState(h_conv, h_ssm), last_only=True)
        h_conv, h_ssm = st.conv, st.ssm
        got = bk.logits.double()
        assert torch.isfinite(got).all(), f"step {step}: non-finite logits"
        assert rel_err(got, ref.double()) < TOL[dtype], f"step {step}: logits"
    assert rel_err(ssm[:, slots].double(), h_ssm.double()) < TOL[dtype], "ssm state"
    assert rel_err(conv[:, slots].double(), h_conv.double()) < TOL[dtype], "conv state"
    other = torch.ones(n_slots, dtype=torch.bool, device="cuda")
    other[slots] = False
    assert torch.equal(conv[:, other], conv0[:, other]) and torch.equal(ssm[:, other], ssm0[:, other]), \
        "a slot outside the batch was written"


def test_backend_uses_fused_decode_and_gemm_bucket(tmp_path):
    """Through the Session: the torch backend decodes with the fused kernels by default, for the GEMV
    buckets and the GEMM one alike, and its fp32 greedy tokens equal the reference model's."""
    from mamba_rt.runtime import Session
    from tests.runtime.packages import weights_only_package

    seed = int(np.random.SeedSequence().entropy % 2**31)
    pkg, _ = weights_only_package(tmp_path / "pkg", seed=seed, dtype="fp32", d_conv=4, d_state=16)
    rng = np.random.default_rng(seed)
    with Session.open(pkg, backend="torch", device="cuda", max_batch=16) as fused, \
            Session.open(pkg, backend="torch", device="cuda", max_batch=16, fused=False) as plain:
        assert "fused decode" in fused.describe() and "fused decode" not in plain.describe()
        for n in (1, 12):  # bucket 1 (GEMV) and bucket 16 (GEMM)
            prompts = [rng.integers(0, fused.vocab, int(rng.integers(1, 9))).tolist() for _ in range(n)]
            a = [g.ids for g in fused.generate(prompts, max_new_tokens=24, stream=False)]
            b = [g.ids for g in plain.generate(prompts, max_new_tokens=24, stream=False)]
            assert a == b
