"""The reference Mamba-1 language model: the only PyTorch definition of the network.

It is the numerical oracle, the tracing source for every exported graph and the model of the torch
backend. The state is explicit: ``logits, state = model(input_ids, state)`` for any length L >= 1,
``state=None`` meaning zeros. Parameter names are the canonical (mamba_ssm) ones, so
``model.load_state_dict(checkpoint.load_weights(dtype))`` loads a checkpoint of either format.

The two custom ops are called through an :class:`OpSet`, so one definition serves every purpose:
``REF_OPS`` (pure PyTorch, the default), the torch.library custom ops used for ONNX export, and the
CUDA kernels of ``mamba_rt.plugins_cuda`` in the torch backend.

Numerics follow mamba_ssm: the residual stream is float32 when ``residual_in_fp32``; RMSNorm is
computed in float32 and rounded once to the model dtype; A = -exp(A_log), D and dt_proj.bias are
float32; the SSM state is float32.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from mamba_rt.config import MambaConfig

from .ops_ref import add_rms_norm_ref, causal_conv1d_ref, selective_scan_ref


class OpSet(NamedTuple):
    """The two custom ops, with the signatures of ``ops_ref``, and the pre-norm residual step (not an
    exported op; the reference unless a backend has a faster twin)."""

    causal_conv1d: Callable
    selective_scan: Callable
    name: str = "ref"
    add_rms_norm: Callable = add_rms_norm_ref


REF_OPS = OpSet(causal_conv1d_ref, selective_scan_ref, "ref")


class MambaState(NamedTuple):
    """Recurrent state of every layer, stacked layer-major.

    conv: (n_layer, batch, d_inner, d_conv - 1) in the model dtype;
    ssm:  (n_layer, batch, d_inner, d_state) float32.
    """

    conv: torch.Tensor
    ssm: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_rms_norm_ref(x, None, self.weight, self.eps, False)[0]


class MambaMixer(nn.Module):
    def __init__(self, config: MambaConfig, dtype=None, device=None):
        super().__init__()
        c = config
        d, n, r = c.d_inner, c.d_state, c.dt_rank
        kw = dict(dtype=dtype, device=device)
        self.d_inner, self.d_state, self.dt_rank = d, n, r
        self.in_proj = nn.Linear(c.d_model, 2 * d, bias=c.bias, **kw)
        self.conv1d = nn.Conv1d(d, d, c.d_conv, groups=d, bias=c.conv_bias, padding=c.d_conv - 1, **kw)
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False, **kw)
        self.dt_proj = nn.Linear(r, d, bias=True, dtype=dtype, device=device)
        self.A_log = nn.Parameter(torch.zeros(d, n, dtype=torch.float32, device=device))
        self.D = nn.Parameter(torch.ones(d, dtype=torch.float32, device=device))
        self.out_proj = nn.Linear(d, c.d_model, bias=c.bias, **kw)
        with torch.no_grad():
            self.dt_proj.bias.data = self.dt_proj.bias.data.float()
        self._A, self._A_key = None, None

    def A(self) -> torch.Tensor:
        """A = -exp(A_log), float32 (d_inner, d_state). Computed on every call, and so a node of every
        trace (export runs on the meta device) and of autograd; on a CUDA device without autograd it
        is kept until A_log changes (its storage or version), so the prompt graphs of the torch
        backend (captured after a warm-up call) do not re-run two elementwise kernels per layer. A
        graph capture never stores it: a tensor made inside a capture holds its values only once
        the graph runs."""
        a = self.A_log
        if a.device.type != "cuda" or (a.requires_grad and torch.is_grad_enabled()):
            return -torch.exp(a.float())
        key = (a.data_ptr(), a._version)
        if self._A_key != key:
            A = -torch.exp(a.float())
            if torch.cuda.is_current_stream_capturing():
                return A
            self._A, self._A_key = A, key
        return self._A

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, ops: OpSet):
        """x: (batch, seqlen, d_model) model dtype; conv_state (batch, d_inner, d_conv-1);
        ssm_state (batch, d_inner, d_state) float32. Returns (out, conv_state_out, ssm_state_out).

        The projections feeding the two ops are computed transposed, ``W @ x^T`` over the batch's
        tokens (as mamba_ssm does), so their outputs are channel-major with time-contiguous rows, the
        ops' layout (DESIGN.md), without a copy: ``linear(x).transpose(1, 2)`` would hand the kernels
        rows with a time stride of 2d, which they read an element at a time."""
        batch, seqlen, _ = x.shape
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        xz = channel_major(self.in_proj.weight, x.reshape(batch * seqlen, -1).t(), self.in_proj.bias)
        xs, z = xz[:d], xz[d:]
        conv_w = self.conv1d.weight.reshape(d, -1)
        xs, conv_state_out = ops.causal_conv1d(tokens_view(xs, batch), conv_w, self.conv1d.bias, conv_state, "silu")
        x_dbl = channel_major(self.x_proj.weight, xs.transpose(0, 1).reshape(d, batch * seqlen))  # (r+2n, BL)
        delta = channel_major(self.dt_proj.weight, x_dbl[:r])  # the bias goes to the scan
        y, ssm_state_out = ops.selective_scan(
            xs, tokens_view(delta, batch), self.A(), tokens_view(x_dbl[r:r + n], batch),
            tokens_view(x_dbl[r + n:], batch), self.D.float(), tokens_view(z, batch),
            self.dt_proj.bias.float(), ssm_state, True,
        )
        return self.out_proj(y.transpose(1, 2)), conv_state_out, ssm_state_out


def channel_major(weight: torch.Tensor, xt: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight @ xt (+ bias)``: a linear layer applied to the columns of ``xt`` (in_features, tokens),
    giving (out_features, tokens) with contiguous rows."""
    return torch.mm(weight, xt) if bias is None else torch.addmm(bias[:, None], weight, xt)


def tokens_view(m: torch.Tensor, batch: int) -> torch.Tensor:
    """(channels, batch * seqlen) -> the (batch, channels, seqlen) view (time-contiguous rows)."""
    return m.unflatten(1, (batch, -1)).transpose(0, 1)


class MambaBlock(nn.Module):
    def __init__(self, config: MambaConfig, dtype=None, device=None):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_epsilon, dtype=dtype, device=device)
        self.mixer = MambaMixer(config, dtype=dtype, device=device)


class MambaBackbone(nn.Module):
    def __init__(self, config: MambaConfig, dtype=None, device=None):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, dtype=dtype, device=device)
        self.layers = nn.ModuleList(MambaBlock(config, dtype, device) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_epsilon, dtype=dtype, device=device)


class MambaLM(nn.Module):
    """Mamba-1 language model with explicit recurrent state.

    ``forward(input_ids (batch, seqlen) int64, state: MambaState | None, last_only=False)`` returns
    ``(logits, new_state)``; logits are ``(batch, seqlen, vocab_size)`` float32, or ``(batch,
    vocab_size)`` for the last position with ``last_only``. Logits cover ``config.vocab_size``: the
    rows that only pad the vocabulary are never scored.
    """

    def __init__(self, config: MambaConfig, dtype: torch.dtype = torch.float32, device=None,
                 ops: OpSet = REF_OPS):
        super().__init__()
        self.config = config
        self.ops = ops
        self.backbone = MambaBackbone(config, dtype, device)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, dtype=dtype, device=device)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embedding.weight.dtype

    def zero_state(self, batch: int, device=None) -> MambaState:
        c = self.config
        device = device if device is not None else self.backbone.embedding.weight.device
        shapes = c.state_shapes(batch)
        return MambaState(
            torch.zeros(shapes["conv_state"], dtype=self.dtype, device=device),
            torch.zeros(shapes["ssm_state"], dtype=torch.float32, device=device),
        )

    def forward(self, input_ids: torch.Tensor, state: MambaState | None = None, last_only: bool = False):
        if state is None:
            state = self.zero_state(input_ids.shape[0], input_ids.device)
        ops = self.ops
        h = self.backbone.embedding(input_ids)
        residual_fp32 = self.config.residual_in_fp32
        residual = None  # the residual stream: the embedding plus every block's output so far
        conv_out, ssm_out = [], []
        for i, layer in enumerate(self.backbone.layers):
            x, residual = ops.add_rms_norm(h, residual, layer.norm.weight, layer.norm.eps, residual_fp32)
            h, c_i, s_i = layer.mixer(x, state.conv[i], state.ssm[i], ops)
            conv_out.append(c_i)
            ssm_out.append(s_i)
        if last_only:
            h, residual = h[:, -1], residual[:, -1]
        norm_f = self.backbone.norm_f
        x, _ = ops.add_rms_norm(h, residual, norm_f.weight, norm_f.eps, residual_fp32)
        logits = self.lm_head(x).float()
        if logits.shape[-1] != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        return logits, MambaState(torch.stack(conv_out), torch.stack(ssm_out))

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Prefill ``input_ids`` then decode ``max_new_tokens`` greedily, one step at a time.
        Returns the generated ids (batch, max_new_tokens). A plain reference loop for tests."""
        logits, state = self(input_ids, None, last_only=True)
        out = []
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1)
            out.append(nxt)
            logits, state = self(nxt[:, None], state, last_only=True)
        return torch.stack(out, dim=1)


def load_model(path, dtype: str = "fp32", device="cpu", ops: OpSet = REF_OPS) -> MambaLM:
    """Open a checkpoint directory (either format) and build the reference model from it."""
    from mamba_rt.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    return model_from_weights(ckpt.config, ckpt.load_weights(dtype), dtype, device, ops)


def model_from_weights(config: MambaConfig, weights: dict, dtype: str = "fp32", device="cpu",
                       ops: OpSet = REF_OPS) -> MambaLM:
    """Build the model around already-loaded canonical weights without copying them (on CPU)."""
    from mamba_rt.checkpoint import torch_dtype

    with torch.device("meta"):
        model = MambaLM(config, torch_dtype(dtype), ops=ops)
    model.load_state_dict(weights, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    model = model.to(device)
    return model.eval()


def random_weights(config: MambaConfig, dtype: str = "fp32", seed: int = 0) -> dict:
    """Canonical weights drawn at random with the scales of a trained Mamba (for tests and
    benchmarks): dt in [1e-3, 1e-1], A_log = log(1..n), D near 1."""
    import math

    from mamba_rt.checkpoint import is_fp32_param, torch_dtype

    g = torch.Generator().manual_seed(seed)
    tdt = torch_dtype(dtype)
    out = {}
    for name, shape in config.param_shapes().items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if name.endswith("A_log"):
            t = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).repeat(shape[0], 1)
        elif name.endswith("mixer.D"):
            t = torch.ones(shape) + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("dt_proj.bias"):
            dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            t = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            # small embeddings and a strong mixer output keep greedy decoding from settling on one
            # token, so token-for-token comparisons in the tests actually discriminate
            std = 0.1 if name == "backbone.embedding.weight" else 1.0 / math.sqrt(fan_in)
            if name.endswith("out_proj.weight"):
                std *= 3.0
            t = std * torch.randn(shape, generator=g)
        out[name] = t.to(torch.float32 if is_fp32_param(name) else tdt)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["backbone.embedding.weight"]
    return out
