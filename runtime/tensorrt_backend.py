"""The ``tensorrt`` and ``tensorrt-rtx`` backends: engines built by ``mamba-rt build``, run through
TensorRT's Python API with cuda-python for memory, streams and CUDA graphs (no torch).

Loader: :class:`EnginesFromPackage` (package -> the engine set that runs on this GPU, checked against
the GPU, the library version, the package and the manifest's I/O before any device work). Runners:
:class:`TensorRTBackend` (one engine, profile 0 = decode, profile 1 = prefill, one execution context
each) and :class:`TensorRTRTXBackend` (decode and prefill engines).

State and binding (:func:`binding_plan`, :func:`slot_copies`):

* The state lives in :class:`DeviceStateBuffers`: two device copies of ``conv (n_layer, max_batch,
  d_inner, d_conv-1)`` and ``ssm (n_layer, max_batch, d_inner, d_state)``, "current" and "other".
* A step over every slot in order (``slots == 0..max_batch-1``) binds them directly, ping-pong: state in
  = current, state out = other, then the two swap. No copy.
* Any other set of slots is staged: the slots' rows are gathered into a staging buffer laid out
  ``(n_layer, bucket, ...)`` with one 2-D copy per run of consecutive slots, the engine runs on the
  staging buffers, and the new state is scattered back. Other slots are never touched.
* Decode steps run as CUDA graphs, one per (batch bucket 1, 2, 4, ..., max_batch; binding), each captured
  on first use from its own execution context (a captured enqueue keeps the shapes and addresses it was
  bound with): the token ids are copied into a fixed buffer and the graph is launched once per token.
  Bucket rows past the real batch compute on zeros in the staging buffers and are discarded.

Requests above what the engine was built for (batch, prefill length) are refused with an InputError
before any device work.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mamba_rt.errors import InputError, InternalError, MambaRTError
from mamba_rt.exporters import tensorrt_build as tb
from mamba_rt.manifest import CONV_STATE, CONV_STATE_OUT, INPUT_IDS, LOGITS, SSM_STATE, SSM_STATE_OUT, Manifest

from . import cuda_rt
from .backend import Backend, batch_bucket, parse_device
from .state import HOST_DTYPES, StateBuffers

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

# --------------------------------------------------------------------------------------------------
# plain planning (tested in CI)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and always including max_batch: the decode CUDA-graph sizes."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def bucket_for(n: int, max_batch: int) -> int:
    """:func:`~mamba_rt.runtime.backend.batch_bucket`, refusing a batch over ``max_batch``."""
    if n > max_batch:
        raise InputError(f"batch {n} exceeds max_batch {max_batch}")
    return batch_bucket(n, max_batch)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the engine set accepts: batch 1..max_batch and, for a prefill, 2..max_prefill tokens."""

    max_batch: int
    max_prefill: int

    def check(self, batch: int, seqlen: int) -> str:
        """"decode" (seqlen 1) or "prefill"; an InputError naming the limit otherwise."""
        if batch < 1 or batch > self.max_batch:
            raise InputError(f"batch {batch}: the engine was built for 1..{self.max_batch} sequences per step; "
                             f"rebuild with `mamba-rt build --max-batch {batch}`")
        if seqlen < 1:
            raise InputError(f"sequence length {seqlen}: expected at least 1 token")
        if seqlen > self.max_prefill:
            raise InputError(f"prefill of {seqlen} tokens: the engine was built for at most {self.max_prefill} "
                             f"per call; open the session with prefill_chunk <= {self.max_prefill} or rebuild "
                             f"with `mamba-rt build --max-prefill {seqlen}`")
        return tb.DECODE if seqlen == 1 else tb.PREFILL


def binding_plan(slots: Sequence[int], max_batch: int) -> str:
    """"direct" when the step covers every slot in order (the state buffers are bound as they are,
    ping-pong), else "staged" (gather, run on staging buffers, scatter back)."""
    s = [int(x) for x in slots]
    return "direct" if s == list(range(max_batch)) else "staged"


@dataclasses.dataclass(frozen=True)
class Copy2D:
    """One cudaMemcpy2D: ``height`` rows of ``width`` bytes, from ``src_offset`` (pitch ``src_pitch``)
    to ``dst_offset`` (pitch ``dst_pitch``); offsets are relative to the two buffers."""

    src_offset: int
    dst_offset: int
    width: int
    height: int
    src_pitch: int
    dst_pitch: int


def slot_copies(slots: Sequence[int], max_batch: int, bucket: int, n_layer: int, slot_bytes: int,
                scatter: bool = False) -> list[Copy2D]:
    """Copies between the state buffer ``(n_layer, max_batch, slot_bytes)`` and a staging buffer
    ``(n_layer, bucket, slot_bytes)``: staging row i <-> slot ``slots[i]``. Gather (state -> staging)
    by default, ``scatter`` for the way back. Consecutive slots in consecutive rows share one copy."""
    s = [int(x) for x in slots]
    if not s or len(s) > bucket or bucket > max_batch:
        raise InternalError(f"slot_copies: {len(s)} slots, bucket {bucket}, max_batch {max_batch}")
    if len(set(s)) != len(s) or min(s) < 0 or max(s) >= max_batch:
        raise InternalError(f"slot_copies: slots {s} must be distinct and in 0..{max_batch - 1}")
    runs, start = [], 0
    for i in range(1, len(s) + 1):
        if i == len(s) or s[i] != s[i - 1] + 1:
            runs.append((start, s[start], i - start))  # (staging row, slot, count)
            start = i
    out = []
    for row, slot, count in runs:
        state_off, stage_off = slot * slot_bytes, row * slot_bytes
        state_pitch, stage_pitch = max_batch * slot_bytes, bucket * slot_bytes
        if scatter:
            out.append(Copy2D(stage_off, state_off, count * slot_bytes, n_layer, stage_pitch, state_pitch))
        else:
            out.append(Copy2D(state_off, stage_off, count * slot_bytes, n_layer, state_pitch, stage_pitch))
    return out


def state_layout(manifest: Manifest) -> dict[str, tuple[int, int]]:
    """Per state tensor: (n_layer, bytes of one slot in one layer)."""
    c = manifest.config
    act = _ITEMSIZE[manifest.state_specs()[CONV_STATE].dtype]
    return {CONV_STATE: (c.n_layer, c.d_inner * (c.d_conv - 1) * act), SSM_STATE: (c.n_layer, c.d_inner * c.d_state * 4)}


# --------------------------------------------------------------------------------------------------
# CUDA (cuda-python runtime API)


_rt = cuda_rt.rt
_ck = cuda_rt.check


class _DeviceMemory:
    """Device allocations freed together."""

    def __init__(self):
        self.ptrs: list[int] = []

    def alloc(self, nbytes: int, what: str) -> int:
        p = int(_ck(_rt().cudaMalloc(max(1, nbytes)), f"cudaMalloc({nbytes}) for {what}"))
        self.ptrs.append(p)
        _ck(_rt().cudaMemset(p, 0, max(1, nbytes)), f"cudaMemset for {what}")
        return p

    def free(self) -> None:
        while self.ptrs:
            _rt().cudaFree(self.ptrs.pop())


def _copy2d(c: Copy2D, dst_base: int, src_base: int, kind, stream) -> None:
    _ck(_rt().cudaMemcpy2DAsync(dst_base + c.dst_offset, c.dst_pitch, src_base + c.src_offset, c.src_pitch,
                                c.width, c.height, kind, stream), "cudaMemcpy2DAsync")


class DeviceStateBuffers(StateBuffers):
    """The state on the GPU, twice (ping-pong): ``ptr(name)`` is the current copy, ``other(name)`` the
    one a direct step writes; :meth:`swap` makes it current."""

    def __init__(self, manifest: Manifest, max_batch: int, memory: _DeviceMemory, stream):
        super().__init__(manifest, max_batch)
        self.stream = stream
        self.layout = state_layout(manifest)
        self.bytes = {n: L * max_batch * sb for n, (L, sb) in self.layout.items()}
        self._bufs = [{n: memory.alloc(b, f"{n} ({i})") for n, b in self.bytes.items()} for i in range(2)]
        self.cur = 0

    def ptr(self, name: str) -> int:
        return self._bufs[self.cur][name]

    def other(self, name: str) -> int:
        return self._bufs[1 - self.cur][name]

    def swap(self) -> None:
        self.cur = 1 - self.cur

    def _slot(self, name: str, slot: int) -> tuple[int, int, int, int]:
        L, sb = self.layout[name]
        return self.ptr(name) + slot * sb, self.max_batch * sb, sb, L

    def zero(self, slot):
        for name in self.layout:
            p, pitch, w, h = self._slot(name, slot)
            _ck(_rt().cudaMemset2DAsync(p, pitch, 0, w, h, self.stream), "cudaMemset2DAsync")
        self._sync()

    def copy(self, src, dst):
        kind = _rt().cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for name, (L, sb) in self.layout.items():
            pitch = self.max_batch * sb
            _copy2d(Copy2D(src * sb, dst * sb, sb, L, pitch, pitch), self.ptr(name), self.ptr(name), kind, self.stream)
        self._sync()

    def read(self, slot):
        out = {}
        kind = _rt().cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, dt in ((CONV_STATE, HOST_DTYPES[self.conv_dtype]), (SSM_STATE, np.float32)):
            p, pitch, w, h = self._slot(name, slot)
            shape = self.slot_shapes()[name]
            host = np.empty(shape, dt)
            _ck(_rt().cudaMemcpy2DAsync(host.ctypes.data, w, p, pitch, w, h, kind, self.stream), "read state")
            out[name] = host
        self._sync()
        return out[CONV_STATE], out[SSM_STATE]

    def write(self, slot, conv, ssm):
        kind = _rt().cudaMemcpyKind.cudaMemcpyHostToDevice
        shapes = self.slot_shapes()
        for name, a, dt in ((CONV_STATE, conv, HOST_DTYPES[self.conv_dtype]), (SSM_STATE, ssm, np.float32)):
            host = np.ascontiguousarray(a, dtype=dt).reshape(shapes[name])
            p, pitch, w, h = self._slot(name, slot)
            _ck(_rt().cudaMemcpy2DAsync(p, pitch, host.ctypes.data, w, w, h, kind, self.stream), "write state")
            self._sync()

    def _sync(self):
        _ck(_rt().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


# --------------------------------------------------------------------------------------------------
# loader


def current_target(backend: str, device_index: int) -> tb.Target:
    trt = tb.library(backend)
    return tb.gpu_target(backend, trt.__version__, device_index)


class EnginesFromPackage:
    """Loader: package -> (sidecar path, EngineSet) that runs on this GPU with this library, checked."""

    def __init__(self, pkg_dir: str | Path, backend: str, device_index: int = 0, manifest: Manifest | None = None,
                 precision: str | None = None):
        from mamba_rt.manifest import load_manifest

        self.pkg_dir = Path(pkg_dir)
        self.backend, self.device_index = backend, device_index
        self.manifest = manifest if manifest is not None else load_manifest(pkg_dir)
        self.precision = precision

    def __call__(self) -> tuple[Path, tb.EngineSet]:
        target = current_target(self.backend, self.device_index)
        return tb.find_engine_set(self.pkg_dir, target, self.manifest, self.precision)


# --------------------------------------------------------------------------------------------------
# runners


class _Context:
    """One execution context and what it is bound to (the engine's graph, its profile index)."""

    def __init__(self, engine, profile_index: int, stream, graph_name: str):
        self.engine = engine
        self.ctx = engine.create_execution_context()
        if self.ctx is None:
            raise MambaRTError(f"TensorRT could not create an execution context for graph {graph_name!r} "
                               "(out of GPU memory?)")
        self.graph_name = graph_name
        self.profile = profile_index
        if profile_index:
            self.ctx.set_optimization_profile_async(profile_index, stream)


class TensorRTBackend(Backend):
    """Runner for the ``tensorrt`` backend (the plugin graph, one engine with two profiles)."""

    name = tb.TENSORRT
    library_backend = tb.TENSORRT

    def __init__(self, pkg_dir: str | Path, device: str = "cuda", max_batch: int = 8,
                 manifest: Manifest | None = None, engine: str | Path | None = None, cuda_graphs: bool = True):
        super().__init__(pkg_dir, device, max_batch, manifest)
        if self.device_kind != "cuda":
            raise InputError(f"the {self.name} backend runs on a CUDA device, got device {device!r}")
        self.cuda_graphs = bool(cuda_graphs)
        if engine is not None:
            p = Path(engine)
            es = tb.EngineSet.from_dict(json.loads(p.read_text()), str(p))
            tb.check_compatible(es, current_target(self.library_backend, self.device_index), self.manifest,
                                where=f"engine {p.name}")
            self.sidecar, self.engines = p, es
        else:
            self.sidecar, self.engines = EnginesFromPackage(pkg_dir, self.library_backend, self.device_index,
                                                            self.manifest)()
        self.limits = Limits(self.engines.max_batch, self.engines.max_prefill)
        if max_batch > self.limits.max_batch:
            raise InputError(f"max_batch {max_batch}: engine {self.sidecar.name} was built for at most "
                             f"{self.limits.max_batch} sequences; open with max_batch <= {self.limits.max_batch} "
                             f"or rebuild with `mamba-rt build --max-batch {max_batch}`")
        self.max_prefill = self.limits.max_prefill

    @classmethod
    def unavailable_reason(cls, manifest: Manifest, device: str) -> str | None:
        kind, _ = parse_device(device)
        if kind != "cuda":
            return "needs a CUDA device"
        try:
            tb.library(cls.library_backend)
        except Exception as e:  # ImportError, or a library that loads but finds no driver
            return f"{cls.library_backend} cannot be loaded here ({type(e).__name__}: {e})"
        return None

    # -- lifecycle ----------------------------------------------------------------------------------
    def _activate_impl(self) -> None:
        rt = _rt()
        trt = tb.library(self.library_backend)
        _ck(rt.cudaSetDevice(self.device_index), f"cudaSetDevice({self.device_index})")
        self._trt = trt
        self._mem = _DeviceMemory()
        self._stream = _ck(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        try:
            self._load(trt)
            self._allocate()
        except BaseException:
            self._deactivate_impl()
            raise

    def _load(self, trt) -> None:
        if self.library_backend == tb.TENSORRT:
            from mamba_rt.plugins_cuda.tensorrt_plugins import register_plugins

            register_plugins()  # a JIT engine calls back into these; an AOT one needs nothing
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine_dir = self.sidecar.parent
        self._trt_engines, self._contexts, self._graphs = {}, {}, {}
        for ef in self.engines.engines:
            data = tb.verify_engine_file(engine_dir, ef)
            engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise MambaRTError(f"{self.name} could not deserialize {engine_dir / ef.file} (see the log above)")
            tb.check_io(tb.engine_io(trt, engine), self.manifest.graphs[ef.graph], f"engine {ef.file}")
            self._trt_engines[ef.graph] = engine
            for i, prof in enumerate(ef.profiles):
                self._contexts[prof.name] = _Context(engine, i, self._stream, ef.graph)
        missing = {tb.DECODE, tb.PREFILL} - set(self._contexts)
        if missing:
            raise MambaRTError(f"engine set {self.sidecar.name} has no {sorted(missing)} profile")

    def _allocate(self) -> None:
        m, mb = self.manifest, self.max_batch
        self.state = DeviceStateBuffers(m, mb, self._mem, self._stream)
        self._stage_in = {n: self._mem.alloc(b, f"staging {n}") for n, b in self.state.bytes.items()}
        self._stage_out = {n: self._mem.alloc(b, f"staging {n} out") for n, b in self.state.bytes.items()}
        seq_logits = self.limits.max_prefill if m.all_logits else 1
        self._ids = self._mem.alloc(mb * self.limits.max_prefill * 8, "input_ids")
        self._logits = self._mem.alloc(mb * seq_logits * self.vocab * 4, "logits")
        self._ids_host = np.zeros(mb * self.limits.max_prefill, np.int64)

    def _deactivate_impl(self) -> None:
        rt = _rt()
        for _, g in getattr(self, "_graphs", {}).values():
            rt.cudaGraphExecDestroy(g)
        self._graphs, self._contexts, self._trt_engines = {}, {}, {}
        if getattr(self, "_stream", None) is not None:
            rt.cudaStreamSynchronize(self._stream)
        if getattr(self, "_mem", None) is not None:
            self._mem.free()
        if getattr(self, "_stream", None) is not None:
            rt.cudaStreamDestroy(self._stream)
            self._stream = None

    # -- running ------------------------------------------------------------------------------------
    def _forward_impl(self, slots: np.ndarray, ids: np.ndarray):
        b, L = ids.shape
        kind = self.limits.check(b, L)
        if b > self.max_batch:
            raise InputError(f"batch {b} exceeds this session's max_batch {self.max_batch}")
        rt = _rt()
        ctx = self._contexts[kind]
        plan = binding_plan(slots, self.max_batch)
        bucket = self.max_batch if plan == "direct" else (bucket_for(b, self.max_batch) if kind == tb.DECODE else b)
        # token ids (bucket rows; padding rows are token 0)
        n = bucket * L
        self._ids_host[:n] = 0
        self._ids_host[:b * L] = ids.reshape(-1)
        _ck(rt.cudaMemcpyAsync(self._ids, self._ids_host.ctypes.data, n * 8, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                               self._stream), "copy input_ids")
        if plan == "direct":
            ins = {n_: self.state.ptr(n_) for n_ in self.state.layout}
            outs = {n_: self.state.other(n_) for n_ in self.state.layout}
        else:
            ins, outs = self._stage_in, self._stage_out
            if bucket > b:  # padding rows of a bucket compute on zeros
                for n_, (layers, sb) in self.state.layout.items():
                    _ck(rt.cudaMemset2DAsync(ins[n_] + b * sb, bucket * sb, 0, (bucket - b) * sb, layers,
                                             self._stream), "zero padding rows")
            for n_, (layers, sb) in self.state.layout.items():
                for c in slot_copies(slots, self.max_batch, bucket, layers, sb):
                    _copy2d(c, ins[n_], self.state.ptr(n_), rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream)
        if kind == tb.DECODE and self.cuda_graphs:
            # one context per graph: a captured enqueue keeps the shapes and addresses it was bound with
            key = (bucket, plan, self.state.cur if plan == "direct" else -1)
            if key not in self._graphs:
                gctx = _Context(ctx.engine, ctx.profile, self._stream, ctx.graph_name)
                self._bind(gctx, bucket, L, ins, outs)
                self._graphs[key] = (gctx, self._capture(gctx))
            _ck(rt.cudaGraphLaunch(self._graphs[key][1], self._stream), "cudaGraphLaunch")
        else:
            self._bind(ctx, bucket, L, ins, outs)
            self._execute(ctx)
        if plan == "direct":
            self.state.swap()
        else:
            for n_, (layers, sb) in self.state.layout.items():
                for c in slot_copies(slots, self.max_batch, bucket, layers, sb, scatter=True):
                    _copy2d(c, self.state.ptr(n_), outs[n_], rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream)
        rows = L if self.manifest.all_logits else 1
        host = np.empty((bucket, rows, self.vocab), np.float32)
        _ck(rt.cudaMemcpyAsync(host.ctypes.data, self._logits, host.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                               self._stream), "copy logits")
        _ck(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return host[:b, -1].copy()

    def _bind(self, ctx: _Context, bucket: int, L: int, ins: dict, outs: dict) -> None:
        c = self.config
        k1, d, n = c.d_conv - 1, c.d_inner, c.d_state
        shapes = {INPUT_IDS: (bucket, L), CONV_STATE: (c.n_layer, bucket, d, k1), SSM_STATE: (c.n_layer, bucket, d, n)}
        for name, shape in shapes.items():
            if not ctx.ctx.set_input_shape(name, shape):
                raise InternalError(f"engine refused input shape {name} {shape}")
        addrs = {INPUT_IDS: self._ids, CONV_STATE: ins[CONV_STATE], SSM_STATE: ins[SSM_STATE], LOGITS: self._logits,
                 CONV_STATE_OUT: outs[CONV_STATE], SSM_STATE_OUT: outs[SSM_STATE]}
        for name, ptr in addrs.items():
            if not ctx.ctx.set_tensor_address(name, ptr):
                raise InternalError(f"engine refused the address of {name}")

    def _execute(self, ctx: _Context) -> None:
        if not ctx.ctx.execute_async_v3(int(self._stream)):
            raise MambaRTError(f"{self.name}: enqueue of graph {ctx.graph_name!r} failed (see the TensorRT log)")

    def _capture(self, ctx: _Context) -> int:
        """Run the bound step once (TensorRT's lazy set-up happens outside the capture; the inputs are
        left as they were, so the graph launched next recomputes the same outputs), then capture it."""
        rt = _rt()
        self._execute(ctx)
        _ck(rt.cudaStreamBeginCapture(self._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture")
        try:
            self._execute(ctx)
        finally:
            graph = _ck(rt.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        try:
            return _ck(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            rt.cudaGraphDestroy(graph)

    def describe(self) -> str:
        t = self.engines.target
        return f"{self.name} on {self.device} ({self.sidecar.stem}, {t.version})"


class TensorRTRTXBackend(TensorRTBackend):
    """Runner for ``tensorrt-rtx``: the portable graphs' decode and prefill engines (Ampere, Ada,
    Blackwell; TensorRT-RTX refuses compute capability 9.0)."""

    name = tb.TENSORRT_RTX
    library_backend = tb.TENSORRT_RTX
