"""The onnxruntime backend: the package's portable graphs (``decode.onnx``, ``prefill.onnx``).

Loader: :class:`OrtSessionsFromPackage` (package -> ONNX Runtime sessions for the decode and the
prefill graph). Both sessions get the weights from one memory map of ``weights.bin`` (ONNX Runtime's
external initializers), so they are held once; if the graphs' initializers do not match the
manifest's weight index, each session loads its own copy and ``describe()`` says so. Runner:
:class:`OnnxRuntimeBackend`. Needs no torch.

* CPU (``CPUExecutionProvider``): state in host numpy buffers (:class:`HostStateBuffers`); each call
  gathers the slots' state into preallocated work buffers, runs with IO binding (outputs written
  into preallocated buffers: no allocation per token), and scatters the new state back.
* CUDA (``CUDAExecutionProvider``, onnxruntime-gpu): state in device memory
  (:class:`OrtCudaStateBuffers`), gathered and scattered with device-to-device copies (cuda-python),
  so it never crosses to the host. Decode steps use one IO binding per batch bucket (1, 2, 4, ...,
  max_batch) with fixed device buffers, and replay a CUDA graph per bucket (``enable_cuda_graph``,
  run option ``gpu_graph_id``) unless ``cuda_graph=False``. The logits (b, vocab) are copied to the
  host and sampled there: ONNX Runtime has no on-device sampling, so this backend moves
  b x vocab x 4 bytes per step (the torch backend moves only token ids).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mamba_rt._optional import available, require
from mamba_rt.errors import MambaRTError, UnsupportedError
from mamba_rt.manifest import (CONV_STATE, CONV_STATE_OUT, GRAPH_DECODE, GRAPH_PREFILL, INPUT_IDS, LOGITS,
                               SSM_STATE, SSM_STATE_OUT, Manifest, PackageError, load_manifest, read_weights)

from . import cuda_rt
from .backend import Backend, batch_bucket, parse_device, portable_graphs_reason
from .state import HOST_DTYPES, HostStateBuffers, StateBuffers

ort = require("onnxruntime")

# ONNX TensorProto element types
ONNX_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16, "int64": 7}


class OrtSessionsFromPackage:
    """Loader: a package -> ``{"decode": InferenceSession | None, "prefill": InferenceSession}``.

    ``decode`` is None when the package has no decode graph (the prefill graph then serves L = 1).
    ``shared_weights`` (after the call) says whether the sessions share one copy of the weights.
    """

    def __init__(self, pkg_dir: str | Path, device: str = "cpu", manifest: Manifest | None = None,
                 cuda_graph: bool = False, threads: int | None = None):
        self.pkg_dir = Path(pkg_dir)
        self.manifest = manifest if manifest is not None else load_manifest(pkg_dir)
        self.device_kind, self.device_index = parse_device(device)
        self.cuda_graph = cuda_graph
        self.threads = threads
        self.shared_weights: str = "not loaded"

    def _providers(self, graph_capture: bool):
        if self.device_kind == "cpu":
            return ["CPUExecutionProvider"]
        opts = {"device_id": str(self.device_index)}
        if graph_capture:
            opts["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", opts)]

    def _options(self, initializers):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
        if initializers is not None:
            so.add_external_initializers(*initializers)
        return so

    def _session(self, kind: str, initializers, graph_capture: bool):
        path = self.pkg_dir / self.manifest.graphs[kind].file
        if not path.is_file():
            raise PackageError(f"{self.pkg_dir}: graph {kind!r} file {path.name!r} is missing")
        return ort.InferenceSession(str(path), self._options(initializers), providers=self._providers(graph_capture))

    def __call__(self) -> dict:
        m = self.manifest
        reason = portable_graphs_reason(m)
        if reason:
            raise PackageError(f"{self.pkg_dir}: {reason}; the onnxruntime backend runs the portable graphs")
        weights = read_weights(self.pkg_dir, m)
        inits = (list(weights), [ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a, ONNX_TYPES[m.weights_index[n]["dtype"]])
                                 for n, a in weights.items()])
        kinds = [k for k in (GRAPH_PREFILL, GRAPH_DECODE) if k in m.graphs]
        out: dict = {GRAPH_DECODE: None, GRAPH_PREFILL: None}
        try:
            for k in kinds:
                out[k] = self._session(k, inits, self.cuda_graph and k == GRAPH_DECODE)
            self.shared_weights = "one memory-mapped copy shared by the sessions"
        except Exception as e:  # noqa: BLE001 -- ORT raises its own types; retry without sharing
            if isinstance(e, MambaRTError):
                raise
            for k in kinds:
                out[k] = self._session(k, None, self.cuda_graph and k == GRAPH_DECODE)
            self.shared_weights = f"each session loads its own copy ({type(e).__name__}: {str(e)[:120]})"
        if out[GRAPH_PREFILL] is None:
            out[GRAPH_PREFILL] = out[GRAPH_DECODE]  # seq = 1 only: prefill then runs one token at a time
        return out


def ort_sessions_from_package(pkg_dir, device="cpu"):
    """One-off twin of :class:`OrtSessionsFromPackage`."""
    return OrtSessionsFromPackage(pkg_dir, device)()


class OnnxRuntimeBackend(Backend):
    """Runner over ONNX Runtime sessions. Options: ``cuda_graph`` (default True on CUDA),
    ``threads`` (intra-op threads on the CPU; ONNX Runtime's default otherwise)."""

    name = "onnxruntime"

    def __init__(self, pkg_dir, device="cpu", max_batch=8, manifest=None, cuda_graph: bool | None = None,
                 threads: int | None = None):
        super().__init__(pkg_dir, device, max_batch, manifest)
        self.cuda_graph = (self.device_kind == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device_kind != "cuda":
            raise UnsupportedError("cuda_graph=True needs device 'cuda'")
        self.loader = OrtSessionsFromPackage(pkg_dir, device, self.manifest, self.cuda_graph, threads)
        self.conv_type = ONNX_TYPES[self.manifest.state_specs()[CONV_STATE].dtype]
        self.decode_seq1 = GRAPH_DECODE in self.manifest.graphs

    @classmethod
    def unavailable_reason(cls, manifest, device):
        if not available("onnxruntime"):
            return "onnxruntime is not installed (pip install 'mamba-rt[onnx]')"
        reason = portable_graphs_reason(manifest)
        if reason:
            return reason
        kind, _ = parse_device(device)
        if kind == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return (f"this onnxruntime has no CUDAExecutionProvider (providers: "
                        f"{ort.get_available_providers()}); install onnxruntime-gpu")
            if not (available("cuda.bindings") or available("cuda.cudart")):
                return "cuda-python is not installed (pip install 'mamba-rt[gpu]')"
        return None

    def describe(self):
        where = "CPUExecutionProvider" if self.device_kind == "cpu" else f"CUDAExecutionProvider:{self.device_index}"
        graphs = ", CUDA graphs for decode" if self.cuda_graph else ""
        return f"onnxruntime {ort.__version__} on {where}{graphs}; weights: {self.loader.shared_weights}"

    # -- lifecycle ----------------------------------------------------------------------------------
    def _activate_impl(self):
        self.sessions = self.loader()
        m, mb = self.manifest, self.max_batch
        if self.device_kind == "cpu":
            self.state = HostStateBuffers(m, mb)
            st = self.state
            self._work = {n: np.empty(int(np.prod(shape)), dt) for n, shape, dt in (
                ("conv_in", st.conv_shape, st.conv.dtype), ("conv_out", st.conv_shape, st.conv.dtype),
                ("ssm_in", st.ssm_shape, np.float32), ("ssm_out", st.ssm_shape, np.float32),
                ("logits", (mb, self.vocab), np.float32))}
        else:
            self.state = OrtCudaStateBuffers(m, mb, self.device_index)
            self._buckets: dict[int, _CudaBucket] = {}

    def _deactivate_impl(self):
        if self.device_kind == "cuda":
            for b in self._buckets.values():
                b.release()
            self._buckets.clear()
        self.sessions = None
        self._work = None

    # -- running ------------------------------------------------------------------------------------
    def _forward_impl(self, slots, ids):
        if self.device_kind == "cuda":
            return self._forward_cuda(slots, ids)
        b, L = ids.shape
        seq1 = L == 1 and self.decode_seq1
        sess = self.sessions[GRAPH_DECODE if seq1 else GRAPH_PREFILL]
        st, w = self.state, self._work
        conv_shape = (st.conv_shape[0], b) + st.conv_shape[2:]
        ssm_shape = (st.ssm_shape[0], b) + st.ssm_shape[2:]
        views = {n: w[n][:int(np.prod(conv_shape if n.startswith("conv") else ssm_shape))].reshape(
            conv_shape if n.startswith("conv") else ssm_shape) for n in ("conv_in", "conv_out", "ssm_in", "ssm_out")}
        np.take(st.conv, slots, axis=1, out=views["conv_in"])
        np.take(st.ssm, slots, axis=1, out=views["ssm_in"])
        io = sess.io_binding()
        logits = None
        if not self.manifest.all_logits:
            logits = w["logits"][:b * self.vocab].reshape(b, self.vocab)
            io.bind_output(LOGITS, "cpu", 0, 1, logits.shape, logits.ctypes.data)
        else:
            io.bind_output(LOGITS, "cpu")  # first: copy_outputs_to_cpu()[0]
        io.bind_input(INPUT_IDS, "cpu", 0, ONNX_TYPES["int64"], ids.shape, ids.ctypes.data)
        for name, arr, t in ((CONV_STATE, views["conv_in"], self.conv_type), (SSM_STATE, views["ssm_in"], 1)):
            io.bind_input(name, "cpu", 0, t, arr.shape, arr.ctypes.data)
        for name, arr, t in ((CONV_STATE_OUT, views["conv_out"], self.conv_type), (SSM_STATE_OUT, views["ssm_out"], 1)):
            io.bind_output(name, "cpu", 0, t, arr.shape, arr.ctypes.data)
        sess.run_with_iobinding(io)
        if logits is None:  # all_logits graphs: (b, L, vocab), keep the last position
            logits = io.copy_outputs_to_cpu()[0][:, -1]
        st.conv[:, slots] = views["conv_out"]
        st.ssm[:, slots] = views["ssm_out"]
        return logits

    def _forward_cuda(self, slots, ids):
        b, L = ids.shape
        bucket = batch_bucket(b, self.max_batch)
        if L == 1 and self.decode_seq1:
            bk = self._buckets.get(bucket)
            if bk is None:
                bk = self._buckets[bucket] = _CudaBucket(self, bucket, len(self._buckets))
            return bk.decode(slots, ids)
        return _CudaBucket.prefill(self, slots, ids)


# -- CUDA ---------------------------------------------------------------------------------------------
class _Cudart:
    """The few CUDA runtime calls the ORT CUDA path needs (cuda-python), with checked errors."""

    def __init__(self, device_index: int):
        self.rt = rt = cuda_rt.rt()
        self.D2D = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.D2H = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.H2D = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(rt.cudaSetDevice(device_index), "cudaSetDevice")

    check = staticmethod(cuda_rt.check)

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind):
        self.check(self.rt.cudaMemcpy2D(dst, dpitch, src, spitch, width, height, kind), "cudaMemcpy2D")

    def zero2d(self, dst: int, pitch: int, width: int, height: int):
        self.check(self.rt.cudaMemset2D(dst, pitch, 0, width, height), "cudaMemset2D")

    def sync(self):
        # device-to-device copies and memsets return before completion; ORT runs on its own stream
        self.check(self.rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")


class OrtCudaStateBuffers(StateBuffers):
    """State in CUDA device memory held by ONNX Runtime values (graph layout, slot rows strided by
    ``max_batch``). Slot operations are 2-D copies: one row of ``row_bytes`` per layer."""

    def __init__(self, manifest: Manifest, max_batch: int, device_index: int):
        super().__init__(manifest, max_batch)
        self.cuda = _Cudart(device_index)
        self.device_index = device_index
        self.values = {
            "conv": ort.OrtValue.ortvalue_from_shape_and_type(list(self.conv_shape), ONNX_TYPES[self.conv_dtype], "cuda", device_index),
            "ssm": ort.OrtValue.ortvalue_from_shape_and_type(list(self.ssm_shape), ONNX_TYPES["float32"], "cuda", device_index),
        }
        isz = np.dtype(HOST_DTYPES[self.conv_dtype]).itemsize
        self.row_bytes = {"conv": int(np.prod(self.conv_shape[2:])) * isz, "ssm": int(np.prod(self.ssm_shape[2:])) * 4}
        self.layers = self.conv_shape[0]
        for k in ("conv", "ssm"):
            self.cuda.zero2d(self.ptr(k), self.row_bytes[k], self.row_bytes[k], self.layers * max_batch)
        self.cuda.sync()

    def ptr(self, k: str) -> int:
        return self.values[k].data_ptr()

    def _pitch(self, k):
        return self.row_bytes[k] * self.max_batch

    def zero(self, slot):
        for k in ("conv", "ssm"):
            r = self.row_bytes[k]
            self.cuda.zero2d(self.ptr(k) + slot * r, self._pitch(k), r, self.layers)
        self.cuda.sync()

    def copy(self, src, dst):
        for k in ("conv", "ssm"):
            r = self.row_bytes[k]
            self.cuda.copy2d(self.ptr(k) + dst * r, self._pitch(k), self.ptr(k) + src * r, self._pitch(k), r,
                             self.layers, self.cuda.D2D)
        self.cuda.sync()

    def read(self, slot):
        shapes = self.slot_shapes()
        out = {"conv": np.empty(shapes["conv_state"], HOST_DTYPES[self.conv_dtype]),
               "ssm": np.empty(shapes["ssm_state"], np.float32)}
        for k, a in out.items():
            r = self.row_bytes[k]
            self.cuda.copy2d(a.ctypes.data, r, self.ptr(k) + slot * r, self._pitch(k), r, self.layers, self.cuda.D2H)
        return out["conv"], out["ssm"]

    def write(self, slot, conv, ssm):
        for k, a in (("conv", np.ascontiguousarray(conv, HOST_DTYPES[self.conv_dtype])),
                     ("ssm", np.ascontiguousarray(ssm, np.float32))):
            r = self.row_bytes[k]
            self.cuda.copy2d(self.ptr(k) + slot * r, self._pitch(k), a.ctypes.data, r, r, self.layers, self.cuda.H2D)
        self.cuda.sync()

    def gather(self, k: str, slots, dst: int, bucket: int):
        """Copy the slots' rows into a (layers, bucket, ...) buffer at ``dst``; rows past len(slots)
        repeat the first slot (their results are never scattered back)."""
        r = self.row_bytes[k]
        padded = list(slots) + [slots[0]] * (bucket - len(slots))
        for j, s in enumerate(padded):
            self.cuda.copy2d(dst + j * r, bucket * r, self.ptr(k) + int(s) * r, self._pitch(k), r, self.layers,
                             self.cuda.D2D)

    def scatter(self, k: str, slots, src: int, bucket: int):
        r = self.row_bytes[k]
        for j, s in enumerate(slots):
            self.cuda.copy2d(self.ptr(k) + int(s) * r, self._pitch(k), src + j * r, bucket * r, r, self.layers,
                             self.cuda.D2D)


class _CudaBucket:
    """Fixed device buffers and one IO binding for decode steps of ``bucket`` rows (CUDA graph id
    ``graph_id`` when graphs are on)."""

    def __init__(self, be: OnnxRuntimeBackend, bucket: int, graph_id: int):
        self.be, self.bucket, self.graph_id = be, bucket, graph_id
        st: OrtCudaStateBuffers = be.state
        dev = be.device_index
        self.work = _work_values(st, bucket)
        lshape = [bucket, 1, be.vocab] if be.manifest.all_logits else [bucket, be.vocab]
        self.ids = ort.OrtValue.ortvalue_from_shape_and_type([bucket, 1], ONNX_TYPES["int64"], "cuda", dev)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type(lshape, ONNX_TYPES["float32"], "cuda", dev)
        self.sess = be.sessions[GRAPH_DECODE]
        io = self.io = self.sess.io_binding()
        io.bind_ortvalue_input(INPUT_IDS, self.ids)
        io.bind_ortvalue_input(CONV_STATE, self.work["conv_in"])
        io.bind_ortvalue_input(SSM_STATE, self.work["ssm_in"])
        io.bind_ortvalue_output(CONV_STATE_OUT, self.work["conv_out"])
        io.bind_ortvalue_output(SSM_STATE_OUT, self.work["ssm_out"])
        io.bind_ortvalue_output(LOGITS, self.logits)
        self.run_options = ort.RunOptions()
        if be.cuda_graph:
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def decode(self, slots, ids):
        st: OrtCudaStateBuffers = self.be.state
        n = len(slots)
        tok = np.zeros((self.bucket, 1), np.int64)
        tok[:n] = ids
        tok[n:] = ids[0]
        self.ids.update_inplace(tok)
        for k in ("conv", "ssm"):
            st.gather(k, slots, self.work[f"{k}_in"].data_ptr(), self.bucket)
        st.cuda.sync()
        self.sess.run_with_iobinding(self.io, self.run_options)
        self.io.synchronize_outputs()
        for k in ("conv", "ssm"):
            st.scatter(k, slots, self.work[f"{k}_out"].data_ptr(), self.bucket)
        st.cuda.sync()
        logits = self.logits.numpy()
        return (logits[:, -1] if logits.ndim == 3 else logits)[:n]

    @staticmethod
    def prefill(be: OnnxRuntimeBackend, slots, ids):
        """Any length, no graph: state gathered into transient device buffers, logits to the host."""
        st: OrtCudaStateBuffers = be.state
        b = len(slots)
        work = _work_values(st, b)
        sess = be.sessions[GRAPH_PREFILL]
        io = sess.io_binding()
        io.bind_output(LOGITS, "cuda", be.device_index)  # first: get_outputs()[0]
        io.bind_cpu_input(INPUT_IDS, ids)
        for k in ("conv", "ssm"):
            st.gather(k, slots, work[f"{k}_in"].data_ptr(), b)
        st.cuda.sync()
        io.bind_ortvalue_input(CONV_STATE, work["conv_in"])
        io.bind_ortvalue_input(SSM_STATE, work["ssm_in"])
        io.bind_ortvalue_output(CONV_STATE_OUT, work["conv_out"])
        io.bind_ortvalue_output(SSM_STATE_OUT, work["ssm_out"])
        ro = ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", "-1")  # never capture the prefill
        sess.run_with_iobinding(io, ro)
        io.synchronize_outputs()
        for k in ("conv", "ssm"):
            st.scatter(k, slots, work[f"{k}_out"].data_ptr(), b)
        st.cuda.sync()
        logits = io.get_outputs()[0].numpy()  # bound first
        return logits[:, -1] if logits.ndim == 3 else logits

    def release(self):
        if self.be.cuda_graph:
            try:
                self.sess.release_captured_graph(self.graph_id)
            except Exception:  # noqa: BLE001 -- older ORT: graphs go with the session
                pass


def _work_values(st: OrtCudaStateBuffers, rows: int) -> dict:
    dev = st.device_index
    conv = [st.conv_shape[0], rows] + list(st.conv_shape[2:])
    ssm = [st.ssm_shape[0], rows] + list(st.ssm_shape[2:])
    ct = ONNX_TYPES[st.conv_dtype]
    return {"conv_in": ort.OrtValue.ortvalue_from_shape_and_type(conv, ct, "cuda", dev),
            "conv_out": ort.OrtValue.ortvalue_from_shape_and_type(conv, ct, "cuda", dev),
            "ssm_in": ort.OrtValue.ortvalue_from_shape_and_type(ssm, ONNX_TYPES["float32"], "cuda", dev),
            "ssm_out": ort.OrtValue.ortvalue_from_shape_and_type(ssm, ONNX_TYPES["float32"], "cuda", dev)}


