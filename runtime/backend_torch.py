"""The torch backend: the reference model built from the package's weights.

Loader: :class:`TorchModelFromPackage` (package -> ``MambaLM``; the weights come from ``weights.bin``
through :func:`~mamba_rt.manifest.read_weights`, memory-mapped on the CPU). Runner:
:class:`TorchBackend`.

* CPU: the reference ops (``REF_OPS``), eager. Slow, exact, and what CI tests.
* CUDA: the ``mamba_rt.plugins_cuda`` kernels (``ops="cuda"``, the default there; ``ops="ref"``
  forces the reference ops) and, for the decode step, one CUDA graph per batch bucket (1, 2, 4, ...,
  max_batch): gather the slots' state, run the model for one token, scatter the new state back and
  write the logits, all in one graph launch. Padding rows of a bucket read and write a scratch slot
  (slot ``max_batch``, never handed out), so no real slot is touched by them. Sampling runs on the
  device (:class:`TorchSampler`): per step the host sends the token ids and receives the sampled ids.
  A sampled step's draw (temperature, top-k, top-p) is a CUDA graph of its own (:class:`_Draws`, its
  settings copied in as a tensor), so sampled steps, like greedy ones, can be queued ahead of the host.

* CUDA, prefill (one slot, L > 1): the prompt chunk as a few pieces (:func:`prompt_pieces`; at most 5
  up to 4096 tokens), each the replay of a CUDA graph of ``run_slots`` of a power-of-two length
  captured at its first use (one-token pieces are decode steps), in a memory pool of their own; a
  piece of fewer tokens than its graph sits behind padding positions that leave the state as it was
  (:class:`_PaddedOps`: the two ops unchanged, their inputs prepared). Like the decode graphs, each
  copies its ids in from pinned host memory and the last position's greedy id back (``_GraphIO``):
  a greedy prompt is one graph launch per piece and one wait. The model's pre-norm residual step is
  ``plugins_cuda``'s fused kernel (``OpSet.add_rms_norm``).

* CUDA, fused decode (the default where the model's shape allows it): the decode step is the fused
  kernels of ``plugins_cuda/decode_step.cu`` (:mod:`~mamba_rt.runtime.fused_decode`), four per layer,
  on the slots' state in place, captured with the input copy and a greedy argmax in one CUDA graph per
  bucket (``fused=False`` keeps the model-based graph above). Its embedding kernel also marks each row's
  token in a per-slot bitmap (``FusedDecoder.seen``), from which a step with a repetition penalty is
  penalised on the device before its argmax or draw (``_Draws.penalized``), so it too can be queued ahead.

This module and ``fused_decode`` are the only ones of ``mamba_rt.runtime`` that import torch.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mamba_rt._gc import collector_paused
from mamba_rt._optional import available, require
from mamba_rt.errors import InternalError, MissingDependencyError, UnsupportedError
from mamba_rt.checkpoint import torch_dtype
from mamba_rt.manifest import ONNX_DTYPES, Manifest, load_manifest, read_weights

from .backend import Backend, batch_bucket, parse_device
from .sampling import HostSampler, SamplingParams
from .state import HOST_DTYPES, StateBuffers

torch = require("torch")



def cuda_ops():
    """The OpSet of the ``plugins_cuda`` kernels (raises a clear error where they are unavailable)."""
    from mamba_rt.exporters.model import OpSet

    try:
        from mamba_rt.plugins_cuda import torch_ops as pc
    except ImportError as e:
        raise MissingDependencyError(f"the plugins_cuda kernels cannot be loaded ({e}); install "
                                     "'mamba-rt[gpu]' or pass ops='ref'") from e
    missing = [n for n in ("causal_conv1d_fn", "selective_scan_fn", "add_rms_norm") if not hasattr(pc, n)]
    if missing:
        raise UnsupportedError(f"mamba_rt.plugins_cuda.torch_ops does not provide {missing} in this build; "
                               "pass ops='ref' to run the reference ops on the GPU")
    return OpSet(pc.causal_conv1d_fn, pc.selective_scan_fn, "cuda", pc.add_rms_norm)


def weights_as_tensors(pkg_dir: str | Path, manifest: Manifest) -> dict:
    """The package's canonical weights as CPU torch tensors sharing the memory map (no copy)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory map: never written to
        for name, a in read_weights(pkg_dir, manifest).items():
            t = torch.from_numpy(a)
            if manifest.weights_index[name]["dtype"] == "bfloat16":
                t = t.view(torch.bfloat16)
            out[name] = t
    if manifest.config.tie_embeddings and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["backbone.embedding.weight"]
    return out


class TorchModelFromPackage:
    """Loader: a model package -> the reference ``MambaLM`` on ``device`` with ``ops``."""

    def __init__(self, pkg_dir: str | Path, device: str = "cpu", ops: str | None = None,
                 manifest: Manifest | None = None):
        self.pkg_dir, self.device = Path(pkg_dir), device
        self.manifest = manifest if manifest is not None else load_manifest(pkg_dir)
        kind, _ = parse_device(device)
        self.ops = ops or ("cuda" if kind == "cuda" else "ref")
        if self.ops not in ("ref", "cuda"):
            raise UnsupportedError(f"ops {ops!r}: expected 'ref' or 'cuda'")

    def __call__(self):
        from mamba_rt.exporters.model import REF_OPS, model_from_weights

        ops = cuda_ops() if self.ops == "cuda" else REF_OPS
        m = self.manifest
        return model_from_weights(m.config, weights_as_tensors(self.pkg_dir, m), m.dtype, self.device, ops)


def torch_model_from_package(pkg_dir, device="cpu", ops=None):
    """One-off twin of :class:`TorchModelFromPackage`."""
    return TorchModelFromPackage(pkg_dir, device, ops)()


class TorchStateBuffers(StateBuffers):
    """State as torch tensors on the backend's device, with one extra scratch slot at index max_batch
    (``conv``/``ssm`` have max_batch + 1 slots; only the first max_batch are handed out)."""

    def __init__(self, manifest: Manifest, max_batch: int, device):
        super().__init__(manifest, max_batch)
        L, _, d, k1 = self.conv_shape
        n = self.ssm_shape[-1]
        self.scratch = max_batch
        self.conv = torch.zeros((L, max_batch + 1, d, k1), dtype=torch_dtype(manifest.dtype), device=device)
        self.ssm = torch.zeros((L, max_batch + 1, d, n), dtype=torch.float32, device=device)

    def zero(self, slot):
        self.conv[:, slot].zero_()
        self.ssm[:, slot].zero_()

    def copy(self, src, dst):
        self.conv[:, dst].copy_(self.conv[:, src])
        self.ssm[:, dst].copy_(self.ssm[:, src])

    def read(self, slot):
        conv = self.conv[:, slot].cpu()
        if conv.dtype == torch.bfloat16:
            conv = conv.view(torch.int16)
        return conv.numpy().view(HOST_DTYPES[self.conv_dtype]).copy(), self.ssm[:, slot].cpu().numpy().copy()

    def write(self, slot, conv, ssm):
        c = torch.from_numpy(np.array(conv))  # a copy: snapshot arrays are read-only views
        if self.conv.dtype == torch.bfloat16:
            c = c.view(torch.bfloat16)
        self.conv[:, slot].copy_(c)
        self.ssm[:, slot].copy_(torch.from_numpy(np.array(ssm, np.float32)))


def sample_knobs(params: SamplingParams, u: np.ndarray, vocab: int) -> np.ndarray:
    """A sampled (not greedy) step's settings per row, (b, 4) float64, as :func:`draw_torch` takes
    them: the temperature, where the k-th largest logit sits in descending order (the last position
    when top-k is off), top_p, and the row's uniform number ``u``."""
    kth = params.top_k - 1 if 0 < params.top_k < vocab else vocab - 1
    u = np.asarray(u, np.float64)
    return np.stack([np.full(u.shape, params.temperature), np.full(u.shape, float(kth)),
                     np.full(u.shape, params.top_p), u], -1)


def needs_sort(params: SamplingParams, vocab: int) -> bool:
    """Whether top-k or top-p is on (the draw then sorts each row once)."""
    return 0 < params.top_k < vocab or params.top_p < 1.0


def draw_torch(x, knobs, sort: bool):
    """Steps 3-6 of :func:`~mamba_rt.runtime.sampling.sample_numpy` on the device: x (b, vocab) float32
    logits (penalised already), ``knobs`` (b, 4) float64 (:func:`sample_knobs`) a tensor, so that one
    CUDA graph serves every setting of its kind (``sort``: top-k or top-p on). Returns (b,) int64.

    One descending sort gives both thresholds: the k-th largest logit, and the probabilities in
    descending order for top-p (exp and the division are elementwise, so those are the very values of
    ``p``, in another order)."""
    t, kth_at, top_p, u = knobs.unbind(-1)
    x = x.double() / t[:, None]
    if sort:
        sx = torch.sort(x, dim=-1, descending=True).values
        kth = sx.gather(1, kth_at.long()[:, None])
        x = x.masked_fill(x < kth, float("-inf"))
        sx = sx.masked_fill(sx < kth, float("-inf"))
        m = sx[:, :1]
    else:
        m = x.amax(-1, keepdim=True)
    e = torch.exp(x - m)
    total = e.sum(-1, keepdim=True)
    p = e / total
    if sort:
        sp = torch.exp(sx - m) / total
        keep = ((torch.cumsum(sp, -1) - sp) < top_p[:, None]).sum(-1, keepdim=True)
        thr = sp.gather(1, keep - 1).masked_fill(top_p[:, None] >= 1.0, 0.0)  # top_p 1: off
        p = torch.where(p >= thr, p, torch.zeros_like(p))
    cdf = torch.cumsum(p, -1)
    idx = (cdf <= (u * cdf[:, -1])[:, None]).sum(-1)
    return idx.clamp_max(x.shape[-1] - 1)


def sample_torch(logits, seen, params: SamplingParams, u):
    """:func:`~mamba_rt.runtime.sampling.sample_numpy` on the device. logits (b, vocab) float32;
    seen (b, vocab) bool or None; u (b,) float64 on the host (None when greedy). Returns (b,) int64
    on the device."""
    x = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        # a tensor on x's device: torch divides by a host scalar as a multiplication by its reciprocal
        r = torch.tensor(params.repetition_penalty, dtype=torch.float32, device=x.device)
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    if params.greedy:
        return x.argmax(-1)
    knobs = torch.from_numpy(sample_knobs(params, u, x.shape[-1])).to(x.device)
    return draw_torch(x, knobs, needs_sort(params, x.shape[-1]))


class StepLogits(NamedTuple):
    """What the torch backend's ``forward`` returns: the logits (b, vocab) on the device; ``greedy()``,
    their argmax ids (b,) on the host (a graph replay already copied them to pinned memory: the call
    waits for the replay); and ``sample(params, u)``, which queues a draw of the rows on the device
    (``forward_next`` then feeds its ids) and returns a call that reads them. Where the fused decoder
    serves (its decode steps, the prompt graphs) also ``penalized(params, u)``, the same with the
    repetition penalty applied on the device first (u None when greedy; float32 logits are penalised in
    place); and ``marked`` (a fused decode step's): its fed tokens are marked in the device's seen-token
    bitmap (``FusedDecoder.seen``) already."""

    logits: "torch.Tensor"
    greedy: Callable[[], np.ndarray]
    sample: Callable[[SamplingParams, np.ndarray], Callable[[], np.ndarray]]
    penalized: Callable[[SamplingParams, "np.ndarray | None"], Callable[[], np.ndarray]] | None = None
    marked: bool = False


class TorchSampler(HostSampler):
    """Sampling on the device where the logits are; only the ids (b,) come back to the host. Steps
    take the ids their ``forward`` call draws on the device (:class:`StepLogits`: the greedy ids a graph
    copied out, or a draw queued in a CUDA graph of its own), so they can also be queued ahead
    (:meth:`queue`); with a repetition penalty, fused decode steps and prompt graphs too
    (``StepLogits.penalized``: the penalty, then the argmax or the draw, in graphs of their own), other
    steps are sampled eagerly with the host's mask. The seen-token mask is the host's (snapshots,
    forks), mirrored on the device by ``seen_bits()`` (the fused decoder's bitmap, or None): the fused
    steps mark their fed tokens there themselves, and the rows the host marked otherwise (prompts,
    restored snapshots) are topped up from the host's before a penalised step reads them."""

    def __init__(self, max_batch: int, vocab: int, device,
                 seen_bits: Callable[[], "torch.Tensor | None"] | None = None):
        self.device = torch.device(device)
        super().__init__(max_batch, vocab)
        self._seen_bits = seen_bits or (lambda: None)
        self._bits = None  # the device bitmap the rows below refer to
        self._stage = None  # pinned staging rows and slot indices for _sync, and the event of their last copies
        self._stale = np.ones(max_batch, bool)  # slots whose host row may hold tokens the device row lacks

    def _device_rows(self):
        """The device bitmap, or None; a new one (a backend activated again) counts every row stale."""
        bits = self._seen_bits()
        if bits is not self._bits:
            self._bits = bits
            self._stale[:] = True
        return bits

    def _sync(self, slots: np.ndarray) -> None:
        """The device rows of ``slots`` ORed with the host's (in stream order, after the steps queued so
        far, whose marks they keep), through pinned staging rows: the host does not wait for the GPU."""
        bits = self._device_rows()
        stale = slots[self._stale[slots]]
        if bits is None or not len(stale):
            return
        k = len(stale)
        if self._stage is None or self._stage[0].shape[1] != bits.shape[1]:
            self._stage = (torch.zeros(self.max_batch, bits.shape[1], dtype=torch.int32).pin_memory(),
                           torch.zeros(self.max_batch, dtype=torch.int64).pin_memory(), torch.cuda.Event())
        rows, at, done = self._stage
        done.synchronize()  # the last top-up's copies have read the staging rows
        packed = rows.numpy()[:k].view(np.uint8)
        packed[:] = 0
        packed[:, :(self.vocab + 7) // 8] = np.packbits(self.seen[stale], axis=1, bitorder="little")
        at.numpy()[:k] = stale
        dev_rows, dev_at = rows[:k].to(bits.device, non_blocking=True), at[:k].to(bits.device, non_blocking=True)
        bits.index_put_((dev_at,), bits.index_select(0, dev_at) | dev_rows)
        done.record()
        self._stale[stale] = False

    def _on_device(self, logits) -> bool:
        """Whether a repetition penalty on this step's logits runs on the device (a fused step's or a prompt
        graph's); else it is applied eagerly with the host's mask."""
        return isinstance(logits, StepLogits) and logits.penalized is not None and self._device_rows() is not None

    def _penalized(self, logits, slots, params, u):
        """Queue the penalty and the draw (u) or the argmax (u None) on the device; a call reads them."""
        self._sync(slots)
        return logits.penalized(params, u)

    # -- the device rows follow the host's (companion protocol, observe) ------------------------------
    def reset_slot(self, slot: int) -> None:
        super().reset_slot(slot)
        bits = self._device_rows()
        if bits is not None:
            bits[slot].zero_()
        self._stale[slot] = False

    def copy_slot(self, src: int, dst: int) -> None:
        super().copy_slot(src, dst)
        bits = self._device_rows()
        if bits is not None:
            bits[dst].copy_(bits[src])
        self._stale[dst] = self._stale[src]

    def load_slot(self, slot: int, meta: dict, arrays: dict) -> None:
        super().load_slot(slot, meta, arrays)
        bits = self._device_rows()
        if bits is not None:
            bits[slot].zero_()
        self._stale[slot] = True

    def observe(self, slots, ids, out=None) -> None:
        super().observe(slots, ids, out)
        if not (isinstance(out, StepLogits) and out.marked):
            self._stale[np.asarray(slots, np.int64)] = True

    def queue(self, logits, slots, params):
        if not isinstance(logits, StepLogits):
            return None
        if params.repetition_penalty != 1.0:
            if not self._on_device(logits):
                return None
            return self._penalized(logits, slots, params, None if params.greedy else self._uniforms(slots))
        return logits.greedy if params.greedy else logits.sample(params, self._uniforms(slots))

    def _sample(self, logits, slots, params, u):
        if isinstance(logits, StepLogits):
            if params.repetition_penalty == 1.0:
                return (logits.greedy if params.greedy else logits.sample(params, u))()
            if self._on_device(logits):
                return self._penalized(logits, slots, params, u)()
            logits = logits.logits
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.from_numpy(self.seen[slots]).to(self.device)
        out = sample_torch(logits, seen, params, u)
        return out.cpu().numpy().astype(np.int64)


@torch.no_grad()
def run_slots(model, state: TorchStateBuffers, idx, ids):
    """Gather the state of slots ``idx`` (b,), run ``ids`` (b, L) through ``model``, scatter the new
    state back; returns the last position's logits (b, vocab). The body of every step, eager or
    captured in a CUDA graph."""
    from mamba_rt.exporters.model import MambaState

    st = MambaState(state.conv.index_select(1, idx), state.ssm.index_select(1, idx))
    logits, new = model(ids, st, last_only=True)
    state.conv.index_copy_(1, idx, new.conv)
    state.ssm.index_copy_(1, idx, new.ssm)
    return logits


def _capture(fn: Callable, dev, pool, warmup: int):
    """Run ``fn`` ``warmup`` times on a side stream (kernel loading, cuBLAS workspaces), then capture
    one call in a CUDA graph drawing on memory ``pool``, with the garbage collector paused
    (collector_paused); returns (graph, what the captured call returned)."""
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with collector_paused(), torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class _Ids:
    """The greedy ids (n,) of one graph replay, in a pinned buffer until first read (a call waits for
    the replay); ``keep()`` copies them out before a later replay reuses the buffer."""

    def __init__(self, event, host: np.ndarray, n: int):
        self.event, self.host, self.n, self.value = event, host, n, None

    def keep(self) -> None:
        if self.value is None:
            self.event.synchronize()
            self.value = self.host[:self.n].copy()
            self.event = self.host = None

    def __call__(self) -> np.ndarray:
        self.keep()
        return self.value.copy()


class _IdsOut:
    """Pinned host memory a graph copies its greedy ids to (``copy_from``, captured in the graph), or
    where the fused decoder's kernels store them themselves (``mapped``), the event of its last replay
    and that replay's ids: ``reuse()`` before a replay (ids nobody read yet are kept), ``launched(n)``
    after it."""

    def __init__(self, rows: int):
        self.pin = torch.zeros(rows, dtype=torch.int64).pin_memory()
        self.host = self.pin.numpy()  # host view, made once
        self.done = torch.cuda.Event()
        self.last: _Ids | None = None
        self._mapped: int | None = None

    def copy_from(self, gid: "torch.Tensor") -> None:
        self.pin.copy_(gid, non_blocking=True)

    def mapped(self, device) -> int:
        """The device address at which a kernel of the fused decoder stores the ids straight into the
        pinned buffer (no copy node after it in the graph; decode_step.IDS_TO_HOST, read at each call),
        or 0 where that is off or the buffer is not mapped into the device's address space (then
        ``copy_from``)."""
        from mamba_rt.plugins_cuda import decode_step, launcher

        if not decode_step.IDS_TO_HOST:
            return 0
        if self._mapped is None:
            self._mapped = launcher.mapped_host_address(self.pin.data_ptr(), torch.device(device).index)
        return self._mapped

    def reuse(self) -> None:
        if self.last is not None:
            self.last.keep()

    def launched(self, n: int) -> _Ids:
        self.done.record()
        self.last = _Ids(self.done, self.host, n)
        return self.last


class _GraphIO:
    """Pinned host memory a graph copies its int64 inputs from and its greedy ids (``gid``, one per
    row, on the device) to (``out``), both copies captured in the graph (``copy_in``, ``copy_out``): a
    call is one graph launch with no separate copy or argmax launch. ``wait()`` before writing
    ``host_in`` (the previous replay may still be reading it, and its ids not read yet are kept);
    ``launched(n, logits)`` after the replay."""

    def __init__(self, shape, rows: int, fill: int, device):
        self.pin_in = torch.full(shape, fill, dtype=torch.int64).pin_memory()
        self.host_in = self.pin_in.numpy()  # host view, made once
        self.gid = torch.zeros(rows, dtype=torch.int64, device=device)
        self.out = _IdsOut(rows)

    def copy_in(self, dst: "torch.Tensor") -> None:
        dst.copy_(self.pin_in, non_blocking=True)

    def copy_out(self) -> None:
        self.out.copy_from(self.gid)

    def wait(self) -> None:
        self.out.done.synchronize()
        self.out.reuse()

    def launched(self, n: int, logits, draws: "_Draws", marked: bool = False) -> StepLogits:
        return draws.step_logits(logits, self.out.launched(n), n, marked)


class _Draws:
    """CUDA graphs that draw a sampled step's tokens on the device (:func:`draw_torch`) from the logits
    (rows, vocab) a graph leaves, writing them to its device ids ``gid`` (where the next queued step
    takes its ids, :meth:`_FusedGraph.run_next`) and copying them out to pinned memory. The knobs
    (:func:`sample_knobs`) are copied in from pinned memory, so a graph serves every setting of its
    kind (sorting or not); two of each kind, used in turn, as two steps may be unread. Captured at
    first use in ``pool`` (intermediates only: every output lives outside it). ``draw_fn``: makes the
    fused decoder's draw kernel (``FusedDecoder.draw_fn``) where there is one; else :func:`draw_torch`.
    With ``penalize`` (``penalize(x, r)``: ``FusedDecoder.penalize`` on float32 logits x, the rows' slots
    bound) and ``argmax_fn`` (``FusedDecoder.argmax_fn``), :meth:`penalized` graphs apply the repetition
    penalty first (the penalties copied in as the knobs are), then draw, or take the argmax where greedy."""

    def __init__(self, logits: "torch.Tensor", gid: "torch.Tensor", pool, draw_fn=None, penalize=None,
                 argmax_fn=None):
        self.logits, self.gid, self.pool = logits, gid, pool
        self.draw_fn, self.draw = draw_fn, None  # the kernel's call, made at first capture
        self.penalize, self.argmax_fn, self.argmax = penalize, argmax_fn, None
        self.vocab = logits.shape[-1]
        self.graphs: dict = {}  # (sort, penalised, greedy, turn) -> (graph, host knobs, host penalties, _IdsOut)
        self.turn = 0

    def _capture(self, sort: bool, pen: bool = False, greedy: bool = False):
        rows, dev = len(self.gid), self.gid.device
        pin = torch.from_numpy(sample_knobs(SamplingParams(temperature=1.0), np.full(rows, 0.5), self.vocab))
        pin = pin.pin_memory()  # padding rows keep these harmless knobs
        knobs = torch.empty_like(pin, device=dev)
        rpin = torch.ones(rows, dtype=torch.float32).pin_memory()  # 1: no penalty (padding rows, the warm-up)
        r = torch.empty_like(rpin, device=dev)
        out = _IdsOut(rows)
        if self.draw is None and self.draw_fn is not None:
            self.draw = self.draw_fn()
        if greedy and self.argmax is None:
            self.argmax = self.argmax_fn()
        kernel = self.argmax if greedy else self.draw
        host = out.mapped(dev) if kernel is not None else 0  # the kernel stores the ids there too

        def body():
            x = self.logits.float().contiguous()  # the logits themselves where they are float32 already
            if pen:
                r.copy_(rpin, non_blocking=True)
                self.penalize(x, r)
            if greedy:
                self.argmax(x, self.gid, host)
            else:
                knobs.copy_(pin, non_blocking=True)
                if self.draw is not None:
                    self.draw(x, knobs, self.gid, host)
                else:
                    self.gid.copy_(draw_torch(x, knobs, sort))
            if not host:
                out.copy_from(self.gid)

        return _capture(body, dev, self.pool, 1)[0], pin.numpy(), rpin.numpy(), out

    def _replay(self, key, n: int, params: SamplingParams, u) -> _Ids:
        key = key + (self.turn,)
        self.turn ^= 1
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key[:3])
        graph, knobs, rp, out = self.graphs[key]
        out.reuse()  # its last replay no longer reads the host buffers
        if u is not None:
            knobs[:n] = sample_knobs(params, u, self.vocab)
        rp[:n] = params.repetition_penalty
        graph.replay()
        return out.launched(n)

    def step_logits(self, logits, greedy: _Ids, n: int, marked: bool = False) -> StepLogits:
        """What a replay of n rows returns: its logits and greedy ids, and these draws (penalised ones where
        there is a penalty kernel). marked: a fused decode step's (its tokens marked in the device's bitmap)."""
        return StepLogits(logits, greedy, functools.partial(self, n),
                          functools.partial(self.penalized, n) if self.penalize is not None else None, marked)

    def __call__(self, n: int, params: SamplingParams, u: np.ndarray) -> _Ids:
        sort = needs_sort(params, self.vocab) or self.draw_fn is not None  # the kernel: one kind
        return self._replay((sort, False, False), n, params, u)

    def penalized(self, n: int, params: SamplingParams, u: "np.ndarray | None") -> _Ids:
        """The rows' repetition penalty (params.repetition_penalty) applied to the logits in place, then
        the draw with u, or the greedy argmax where u is None."""
        if self.penalize is None:
            raise InternalError("penalized draws need the fused decoder's penalty kernel")
        sort = u is not None and (needs_sort(params, self.vocab) or self.draw_fn is not None)
        return self._replay((sort, True, u is None), n, params, u)


class _PaddedOps:
    """The model's ops for a prompt of one slot right-aligned in a longer graph: the first ``start``
    positions (a device scalar the graph reads on every replay) are padding that leaves the state as
    it was. The carried conv state is written into the k-1 positions just before the first real
    token (so the real tokens' windows see it; needs start >= k-1), and delta is -inf on the padding,
    so softplus gives a zero step there: exp(0 · A) = 1 and 0 · B · u = 0 keep h. The outputs at
    padding positions are junk that nothing reads: the rest of the model works per position and the
    graph keeps only the last position's logits. Both ops keep their contracts (DESIGN.md)."""

    def __init__(self, base, start: "torch.Tensor", length: int, k1: int):
        self.base, self.start = base, start
        self.pos = torch.arange(length, device=start.device)
        self.back = torch.arange(-k1, 0, device=start.device)
        self.ops = base._replace(causal_conv1d=self.causal_conv1d, selective_scan=self.selective_scan)

    def prepare(self):
        """The padding mask and the carried state's positions of this replay (kernels in the graph)."""
        self.pad = self.pos < self.start
        self.carry_at = self.start + self.back

    def causal_conv1d(self, x, weight, bias, conv_state, activation):
        x.index_copy_(2, self.carry_at, conv_state)
        return self.base.causal_conv1d(x, weight, bias, conv_state, activation)

    def selective_scan(self, u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, delta_softplus):
        if not delta_softplus:
            raise InternalError("padded prompt graphs need delta_softplus (a zero step is softplus(-inf))")
        delta.masked_fill_(self.pad, float("-inf"))
        return self.base.selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, delta_softplus)


class _ModelGraph:
    """One CUDA graph of the model over ``rows`` slots and ``length`` tokens each: the ids and slot
    indices copied in from pinned memory, gather the slots' state, run the model, scatter the state
    back, the last position's logits and their greedy ids (``argmax(logits, out)``, torch's by
    default) copied back to pinned memory. A decode step of a batch bucket is (bucket, 1), a prompt
    piece of one slot (1, length). Padding rows read and write the scratch slot. ``padded`` (one
    row): prompts of fewer tokens, right-aligned behind padding positions (:class:`_PaddedOps`).
    ``penalize`` (``FusedDecoder.penalize``, with its argmax kernel as ``argmax``): the first token's
    repetition penalty on the device too (:meth:`_Draws.penalized`)."""

    def __init__(self, model, state: TorchStateBuffers, rows: int, length: int, pool, warmup: int, argmax=None,
                 padded: bool = False, draw_fn=None, penalize=None):
        dev = state.conv.device
        self.rows, self.length, self.scratch = rows, length, state.scratch
        self.k1 = state.conv.shape[-1]
        if padded and (rows != 1 or length <= self.k1):
            raise InternalError(f"padded graph of {rows} rows x {length} tokens")
        # warm-up on the scratch slot only (the buffer holds its index until the first run); ids, then
        # the slot of each row, then (padded) the first real position
        n_in = rows * (length + 1) + int(padded)
        self.io = _GraphIO((n_in,), rows, state.scratch, dev)
        if padded:
            self.io.host_in[-1] = self.k1  # the warm-up's start: any value >= k-1
        self.inp = torch.empty(n_in, dtype=torch.int64, device=dev)
        cut = rows * length
        ids, idx = self.inp[:cut].view(rows, length), self.inp[cut:cut + rows]
        # with penalize (FusedDecoder.penalize) and the argmax kernel (FusedDecoder.argmax_fn), the repetition
        # penalty on the device too (:meth:`_Draws.penalized`)
        pen = (lambda x, r: penalize(x, idx, r)) if penalize is not None and argmax is not None else None
        # kept with the graph: the replays use whatever device memory they hold (the kernel's scratch)
        self.argmax = argmax = argmax or (lambda x, out: torch.argmax(x, -1, out=out))
        self.padded = _PaddedOps(model.ops, self.inp[cut + rows:], length, self.k1) if padded else None

        def body():
            self.io.copy_in(self.inp)
            base = model.ops
            if self.padded:
                self.padded.prepare()
                model.ops = self.padded.ops
            try:
                logits = run_slots(model, state, idx, ids)
            finally:
                model.ops = base
            argmax(logits, self.io.gid)
            self.io.copy_out()
            return logits

        self.graph, self.logits = _capture(body, dev, pool, warmup)
        self.draws = _Draws(self.logits, self.io.gid, pool, draw_fn, pen, lambda: self.argmax)

    def run(self, slots: np.ndarray, ids: np.ndarray) -> StepLogits:
        """slots (n,), ids (n, length) with n <= rows: the logits of the n rows and their greedy ids.
        A padded graph takes one row of 1 <= k <= length - (k-1) tokens."""
        n, cut, L = len(slots), self.rows * self.length, ids.shape[1]
        self.io.wait()
        host = self.io.host_in
        if self.padded is None:
            host[:cut].reshape(self.rows, self.length)[:n] = ids
            host[n * self.length:cut] = 0
            host[cut:cut + n], host[cut + n:] = slots, self.scratch
        else:
            start = self.length - L
            if n != 1 or not self.k1 <= start < self.length:
                raise InternalError(f"padded graph of {self.length} tokens given {n} x {L}")
            host[:start] = 0
            host[start:cut] = ids[0]
            host[cut], host[cut + 1] = slots[0], start
        self.graph.replay()
        return self.io.launched(n, self.logits[:n], self.draws)


class _FusedGraph:
    """One CUDA graph per bucket for a fused decode step (runtime/fused_decode.py): copy the token ids
    and slot indices in from pinned host memory, run every layer's fused kernels on the slots' state
    in place, take the argmax and put it in pinned host memory (stored there by the kernel that takes
    it where the buffer is mapped, ``_IdsOut.mapped``; else copied): one graph launch per token.

    ``run_next`` replays one of two more graphs of the same step (captured at its first use) whose
    ids are the ones the last replay left on the device (its argmax, or the draw queued after it,
    :class:`_Draws`), read there by the embedding (decode_step.NEXT_IDS_IN_PLACE; else copied into
    the step's input first), and whose slots are the last replay's: the step after needs nothing from
    the host, so it can be queued before the host has read the ids of the one before. The two put
    their argmax ids in two pinned buffers in turn."""

    def __init__(self, decoder, state: TorchStateBuffers, bucket: int, pool):
        dev = state.conv.device
        self.scratch = state.scratch
        self.bk = decoder.bucket(bucket)
        self.io = _GraphIO((2, bucket), bucket, 0, dev)
        self.io.host_in[1] = self.scratch
        self._decoder, self._pool, self._dev = decoder, pool, dev
        # warm-up (kernel loading, cuBLAS handles) on the scratch slot only
        self.graph, _ = _capture(self._step, dev, pool, 2)
        self.draws = _Draws(self.bk.logits, self.io.gid, pool,
                            functools.partial(decoder.draw_fn, bucket) if decoder.draws else None,
                            lambda x, r: decoder.penalize(x, self.bk.idx, r),
                            functools.partial(decoder.argmax_fn, bucket))
        self._next: list | None = None  # (graph, its _IdsOut) x 2, captured at the first run_next
        self._turn = 0
        self._last: StepLogits | None = None  # what the last replay returned
        self._slots: np.ndarray | None = None  # and its slots

    def _step(self, out: _IdsOut | None = None):
        from mamba_rt.plugins_cuda import decode_step

        bk, ids = self.bk, None
        if out is None:
            self.io.copy_in(bk.inp)
        elif decode_step.NEXT_IDS_IN_PLACE:  # the last replay's ids, read where it left them; its slot
            ids = self.io.gid                # indices are still in bk.idx
        else:
            bk.ids.copy_(self.io.gid)
        out = self.io.out if out is None else out
        host = out.mapped(self._dev)  # the kernel that takes the ids stores them there too
        self._decoder.enqueue(bk, argmax=self.io.gid, host=host, ids=ids)
        if not host:
            out.copy_from(self.io.gid)

    def run(self, slots: np.ndarray, ids: np.ndarray) -> StepLogits:
        n = len(slots)
        self.io.wait()  # the previous replay no longer reads pin_in
        inp = self.io.host_in
        inp[0, :n], inp[0, n:] = ids[:, 0], 0
        inp[1, :n], inp[1, n:] = slots, self.scratch
        self.graph.replay()
        self._slots = slots.copy()
        self._last = self.io.launched(n, self.bk.logits[:n], self.draws, marked=True)
        return self._last

    def run_next(self, slots: np.ndarray, after: StepLogits) -> StepLogits | None:
        """The step after ``after`` (what the last replay returned, for these slots), or None when
        this graph replayed something else since."""
        if after is not self._last:
            return None
        if not np.array_equal(self._slots, slots):
            raise InternalError(f"run_next for slots {slots.tolist()} after a step of {self._slots.tolist()}")
        if self._next is None:  # no warm-up: it would run a step of the last replay's (real) slots
            self._next = []
            for _ in range(2):
                out = _IdsOut(len(self.bk.ids))
                out.mapped(self._dev)  # its driver call before the capture, not during it
                self._next.append((_capture(lambda o=out: self._step(o), self._dev, self._pool, 0)[0], out))
        graph, out = self._next[self._turn]
        self._turn ^= 1
        out.reuse()
        graph.replay()
        n = len(slots)
        self._last = self.draws.step_logits(self.bk.logits[:n], out.launched(n), n, marked=True)
        return self._last


class TorchBackend(Backend):
    """Runner over the reference model. Options: ``ops`` ('ref' | 'cuda'; default 'cuda' on a GPU),
    ``cuda_graph`` (default True on a GPU: decode steps and one slot's prompt chunks replay captured
    graphs), ``fused`` (default True where supported with cuda ops and graphs: the fused decode
    kernels run the decode step)."""

    name = "torch"
    runs_ahead = True  # graphs keep their ids (_Ids); eager steps return logits of their own

    def __init__(self, pkg_dir, device="cpu", max_batch=8, manifest=None, ops: str | None = None,
                 cuda_graph: bool | None = None, fused: bool | None = None):
        super().__init__(pkg_dir, device, max_batch, manifest)
        self.loader = TorchModelFromPackage(pkg_dir, device, ops, self.manifest)
        self.cuda_graph = (self.device_kind == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device_kind != "cuda":
            raise UnsupportedError("cuda_graph=True needs device 'cuda'")
        if not (self.cuda_graph and self.loader.ops == "cuda"):
            why = "fused decode needs ops='cuda' and cuda_graph=True"
        else:
            from .fused_decode import why_unsupported
            why = why_unsupported(self.manifest.config, self.manifest.dtype)
        if fused and why:
            raise UnsupportedError(why)
        self.fused = why is None if fused is None else bool(fused)
        if self.cuda_graph:  # a prompt chunk is a few graph replays: longer chunks cost no host time
            self.prefill_chunk = 2048
        self.decoder = None
        self._graphs: dict[int, _ModelGraph | _FusedGraph] = {}
        self._prefill_graphs: dict[tuple[int, bool], _ModelGraph] = {}
        self._pool = self._prefill_pool = None
        self._eager_last = (None, None, None)  # an eager call's StepLogits, slots, drawn ids (forward_next)

    @classmethod
    def unavailable_reason(cls, manifest, device):
        if not available("torch"):
            return "torch is not installed (pip install 'mamba-rt[export]')"
        kind, idx = parse_device(device)
        if kind == "cuda":
            if not torch.cuda.is_available():
                return "torch sees no CUDA GPU"
            if idx >= torch.cuda.device_count():
                return f"no CUDA device {idx} (torch sees {torch.cuda.device_count()})"
            try:
                ops = cuda_ops()
            except Exception as e:  # noqa: BLE001 -- any failure here means: not usable
                return f"the plugins_cuda kernels are unavailable ({e})"
            major, minor = torch.cuda.get_device_capability(idx)
            dtype = ONNX_DTYPES[manifest.dtype]
            for fn in (ops.causal_conv1d, ops.selective_scan):
                cap = getattr(fn, "capability", None)
                why = cap.why_unsupported(arch=10 * major + minor, dtype=dtype) if cap is not None else None
                if why:
                    return why
        return None

    def _activate_impl(self):
        self.torch_device = torch.device(self.device)
        self.model = self.loader()
        self.state = TorchStateBuffers(self.manifest, self.max_batch, self.torch_device)
        if self.cuda_graph:  # decode and prefill graphs in separate pools: a prefill never clobbers a step's buffers
            self._pool, self._prefill_pool = torch.cuda.graph_pool_handle(), torch.cuda.graph_pool_handle()
        if self.fused:
            from .fused_decode import FusedDecoder
            self.decoder = FusedDecoder(self.model, self.state.conv, self.state.ssm, self.manifest.dtype)

    def _deactivate_impl(self):
        self._graphs.clear()
        self._prefill_graphs.clear()
        self.decoder = None
        self.model = None
        self._pool = self._prefill_pool = None
        self._eager_last = (None, None, None)
        if self.device_kind == "cuda":
            torch.cuda.empty_cache()

    def make_sampler(self):
        return TorchSampler(self.max_batch, self.vocab, self.torch_device,
                            lambda: self.decoder.seen if self.decoder is not None else None)

    def logits_to_host(self, logits):
        if isinstance(logits, StepLogits):
            logits = logits.logits
        return logits.float().cpu().numpy().copy()  # on the CPU, .numpy() would share the graph's buffer

    def describe(self):
        extra = (", fused decode" if self.fused else "") + (", CUDA graphs" if self.cuda_graph else "")
        return f"torch {torch.__version__} on {self.device} ({self.loader.ops} ops{extra})"

    @torch.no_grad()
    def _forward_impl(self, slots, ids):
        if self.cuda_graph and ids.shape[1] == 1:
            return self._decode(slots, ids)
        if self.cuda_graph and len(slots) == 1:
            return self._prefill(int(slots[0]), ids[0])
        dev = self.torch_device
        return self._eager(slots, torch.from_numpy(ids).to(dev))

    def _eager(self, slots, ids) -> StepLogits:
        """A step or chunk run eagerly; ``forward_next`` may feed the ids its ``sample`` drew or its
        argmax (kept on the device)."""
        logits = run_slots(self.model, self.state, torch.from_numpy(slots).to(self.torch_device), ids)
        out = StepLogits(logits, lambda: logits.float().argmax(-1).cpu().numpy(),
                         lambda params, u: self._eager_draw(out, params, u))
        self._eager_last = (out, slots.copy(), None)
        return out

    def _eager_draw(self, out: StepLogits, params, u):
        ids = sample_torch(out.logits, None, params, u)
        if self._eager_last[0] is out:
            self._eager_last = (out, self._eager_last[1], ids)
        return lambda: ids.cpu().numpy()

    def _decode(self, slots, ids):
        b = batch_bucket(len(slots), self.max_batch)
        g = self._graphs.get(b)
        if g is None:
            g = self._graphs[b] = (_FusedGraph(self.decoder, self.state, b, self._pool) if self.fused
                                   else _ModelGraph(self.model, self.state, b, 1, self._pool, 2))
        return g.run(slots, ids)

    @torch.no_grad()
    def forward_next(self, slots, after):
        if not self.active:
            raise InternalError(f"{self.name} backend used before activate()")
        slots = np.asarray(slots, dtype=np.int64)
        if not self.cuda_graph:  # eager: the ids stay on the device
            last, last_slots, drawn = self._eager_last
            if after is not last or not np.array_equal(slots, last_slots):
                return None
            return self._eager(slots, (drawn if drawn is not None else after.logits.float().argmax(-1))[:, None])
        g = self._graphs.get(batch_bucket(len(slots), self.max_batch)) if self.fused else None
        return g.run_next(slots, after) if isinstance(g, _FusedGraph) else None

    def _prefill(self, slot: int, ids: np.ndarray):
        """A prompt (chunk) of one slot as a few pieces (:func:`prompt_pieces`), each the replay of a
        CUDA graph captured at the first use of its (length, padded) pair (a piece of one token is a
        decode step): none runs the model eagerly, whose per-kernel host cost exceeds the GPU time of
        small models, and every piece costs a whole pass over the weights, so there are few."""
        a, slots = 0, np.array([slot], np.int64)
        for take, length, padded in prompt_pieces(len(ids), self.state.conv.shape[-1]):
            piece = ids[None, a:a + take]
            a += take
            if length == 1:
                logits = self._decode(slots, piece)
                continue
            g = self._prefill_graphs.get((length, padded))
            if g is None:
                g = self._prefill_graphs[length, padded] = _ModelGraph(
                    self.model, self.state, 1, length, self._prefill_pool, 1,
                    self.decoder.argmax_fn(1) if self.decoder else None, padded,
                    functools.partial(self.decoder.draw_fn, 1) if self.decoder and self.decoder.draws else None,
                    self.decoder.penalize if self.decoder else None)
            logits = g.run(slots, piece)
        return logits


def prompt_pieces(n: int, k1: int) -> list[tuple[int, int, bool]]:
    """How a prompt (chunk) of ``n`` tokens runs: (tokens, graph length, padded) per piece, in order.
    Graph lengths are powers of two; a power-of-two rest is one exact piece; otherwise the rest
    m goes into the next power of two P as a padded piece when it fills more than 3/4 of it or P <=
    64 (where a piece costs about the same whatever its length), else an exact piece of P/2 goes
    first. A padded piece needs k1 padding positions (:class:`_PaddedOps`): where P - m is fewer, a
    small exact piece goes first. So 2047 tokens are 2 + 2045 in 2048 (eleven pieces before), 1500
    are 1024 + 476 in 512, and a padded piece wastes at most a quarter of its length beyond 64."""
    out, m = [], n
    while m:
        P = 1 << (m - 1).bit_length()
        if P == m:
            out.append((m, m, False))
            break
        if 4 * m > 3 * P or P <= 64:
            if P - m >= max(k1, 1):
                out.append((m, P, True))
                break
            q = 1 << (max(k1, 1) - (P - m) - 1).bit_length()  # then P - (m - q) >= k1
            if q < m:
                out.append((q, q, False))
                m -= q
                continue
        out.append((P // 2, P // 2, False))
        m -= P // 2
    return out
