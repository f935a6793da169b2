"""Checkpoint -> model package (see :mod:`mamba_rt.manifest` for the layout).

How a package is made, and why it needs about one copy of the weights in memory:

1. The weights are written once to ``weights.bin``, in canonical order, names and layout (each tensor at a
   4096-byte aligned offset, which the manifest's 64-byte rule allows), hashing as they go.
2. Every graph is traced from a *meta-device* twin of the reference model (same class, no values) with the
   torch.library custom ops of :mod:`.torch_ops` as its ops: ``torch.export`` once for any length (prefill
   and plugin graphs) and once with seq = 1 (decode graph), then ``torch.onnx.export`` of those programs
   with the translation tables of :mod:`.onnx_ops`.
3. Each initializer is renamed to its canonical parameter name and pointed at its bytes in
   ``weights.bin`` (ONNX external data), so the three graphs share one copy. The graph is then simplified
   with onnxscript's optimizer passes while the weights are hidden from them as graph inputs: layout
   changes (transposes, the conv-weight reshape, A = -exp(A_log)) stay graph nodes and no derived copy
   of a weight is ever stored. The graphs are serialised without reading a single weight byte.
4. Everything is written into a temporary directory beside the target, which is renamed into place at the
   end; a failure leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mamba_rt import __version__
from mamba_rt._optional import require
from mamba_rt.checkpoint import CheckpointWarning, count_nonfinite, open_checkpoint, parse_dtype, torch_dtype
from mamba_rt.config import MambaConfig
from mamba_rt.errors import InternalError, MambaRTError
from mamba_rt.manifest import (CONV_STATE, CONV_STATE_OUT, GRAPH_DECODE, GRAPH_PLUGIN, GRAPH_PREFILL,
                               INPUT_IDS, LOGITS, ONNX_DTYPES, SSM_STATE, SSM_STATE_OUT, GraphSpec, Manifest,
                               TensorSpec)

from .model import MambaLM, MambaState
from .torch_ops import EXPORT_OPS

WEIGHTS_FILE = "weights.bin"
TOKENIZER_FILE = "tokenizer.json"
GRAPH_FILES = {GRAPH_PLUGIN: "model.onnx", GRAPH_DECODE: "decode.onnx", GRAPH_PREFILL: "prefill.onnx"}
ALIGN = 4096  # offset alignment in weights.bin (the manifest requires 64; 4096 lets runtimes mmap pages)
CHUNK = 1 << 22  # elements per step of the NaN/Inf check (bounds its temporaries to a few MB)
SMALL_CONSTANT = 4096  # elements: a non-parameter initializer above this is a folded weight copy (a bug)

Progress = Callable[[str, float], None]  # (what is happening, fraction done in [0, 1])


class ExportError(MambaRTError):
    """The export cannot proceed with what it was given (output exists, weights do not fit the config)."""


# -- public API -----------------------------------------------------------------------------------------
def export_package(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "fp32",
                   force: bool = False, all_logits: bool = False, progress: Progress | None = None) -> Path:
    """Export the checkpoint in ``ckpt_dir`` (mamba_ssm or Hugging Face format) to a model package at
    ``out_dir`` in ``dtype`` (fp32 | fp16 | bf16). Returns the package path.

    Refuses an existing ``out_dir`` unless ``force``. ``all_logits`` makes the graphs return the logits of
    every position instead of the last one. The checkpoint's tokenizer.json, if any, is copied.
    """
    dtype = parse_dtype(dtype)
    out = _check_target(out_dir, force)
    _report(progress, "reading checkpoint", 0.0)
    ckpt = open_checkpoint(ckpt_dir)
    tok = Path(ckpt.path) / TOKENIZER_FILE
    # the weights are held only by _export, which drops them once weights.bin is written
    # (finiteness is checked while writing, chunk by chunk: load_weights' whole-tensor check would
    # allocate temporaries the size of the embedding, +12% peak memory on mamba-2.8b)
    return _export(ckpt.config, ckpt.load_weights(dtype, check_finite=False), dtype, out, force, all_logits, progress,
                   tok if tok.is_file() else None)


def export_from_model(model: MambaLM, out_dir: str | os.PathLike, force: bool = False, all_logits: bool = False,
                      progress: Progress | None = None, tokenizer: str | os.PathLike | None = None) -> Path:
    """Export an in-memory reference model (e.g. one built from ``random_weights``) to a package. The
    model is not modified; its dtype is the package dtype."""
    dtype = _model_dtype(model)
    out = _check_target(out_dir, force)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ExportError(f"tokenizer {tokenizer}: no such file; expected a tokenizer.json to copy into the package")
    weights = {k: v.detach().cpu() for k, v in model.state_dict(keep_vars=True).items()}
    return _export(model.config, weights, dtype, out, force, all_logits, progress,
                   Path(tokenizer) if tokenizer else None)


def export_weights_only(model: MambaLM, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """A package with ``weights.bin`` and the manifest but no ONNX graph: enough for the torch backend
    (tests, benchmarks, and machines without the ONNX exporter's dependencies). Seconds, not minutes."""
    dtype = _model_dtype(model)
    out = _check_target(out_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        weights = {k: v.detach().cpu() for k, v in model.state_dict(keep_vars=True).items()}
        index, sha, nbytes = write_weights(model.config, weights, dtype, tmp / WEIGHTS_FILE)
        Manifest(config=model.config, dtype=dtype, graphs={}, weights_file=WEIGHTS_FILE, weights_sha256=sha,
                 weights_bytes=nbytes, weights_index=index, mamba_rt_version=__version__).save(tmp)
        _replace(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _model_dtype(model: MambaLM) -> str:
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(model.dtype)
    if dtype is None:
        raise ExportError(f"model dtype {model.dtype}: expected float32, float16 or bfloat16")
    return dtype


# -- driver ---------------------------------------------------------------------------------------------
def _report(progress: Progress | None, what: str, frac: float) -> None:
    if progress is not None:
        progress(what, frac)


def _check_target(out_dir, force: bool) -> Path:
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        kind = "directory" if out.is_dir() else "file"
        raise ExportError(f"output {out}: a {kind} already exists; expected a new path (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out}: is a file; expected a directory path (not replaced even with --force)")
    return out


def _export(config: MambaConfig, weights: dict, dtype: str, out: Path, force: bool, all_logits: bool,
            progress: Progress | None, tokenizer: Path | None) -> Path:
    for module in ("onnx", "onnxscript"):
        require(module)  # before any file is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _report(progress, "writing weights", 0.05)
        index, sha, nbytes = write_weights(config, weights, dtype, tmp / WEIGHTS_FILE,
                                           lambda f: _report(progress, "writing weights", 0.05 + 0.45 * f))
        del weights
        graphs = {}
        traced = None  # the plugin and prefill graphs translate one trace (any length)
        for i, kind in enumerate((GRAPH_PLUGIN, GRAPH_PREFILL, GRAPH_DECODE)):
            _report(progress, f"exporting {GRAPH_FILES[kind]}", 0.5 + 0.15 * i)
            if kind != GRAPH_PREFILL:
                traced = trace(config, dtype, seq=1 if kind == GRAPH_DECODE else None, last_only=not all_logits)
            graphs[kind] = export_graph(config, dtype, kind, tmp / GRAPH_FILES[kind], index, all_logits, traced)
        tok_name = None
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            tok_name = TOKENIZER_FILE
        Manifest(config=config, dtype=dtype, graphs=graphs, weights_file=WEIGHTS_FILE, weights_sha256=sha,
                 weights_bytes=nbytes, weights_index=index, all_logits=all_logits, tokenizer=tok_name,
                 mamba_rt_version=__version__).save(tmp)
        _report(progress, "finishing", 0.97)
        _replace(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report(progress, "done", 1.0)
    return out


def _replace(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:  # appeared while we were exporting
            raise ExportError(f"output {out}: created by someone else during the export; not replaced")
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{int(time.time())}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


# -- weights.bin ----------------------------------------------------------------------------------------
def stored_params(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    """The parameters stored in weights.bin, in file order: canonical names, lm_head omitted when tied."""
    shapes = config.param_shapes()
    if config.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _expected_dtype(name: str, dtype: str) -> torch.dtype:
    from mamba_rt.checkpoint import is_fp32_param

    return torch.float32 if is_fp32_param(name) else torch_dtype(dtype)


def write_weights(config: MambaConfig, weights: dict, dtype: str, path: Path,
                  progress: Callable[[float], None] | None = None) -> tuple[dict, str, int]:
    """Write the canonical weights once, in canonical layout; return (index, sha256, bytes)."""
    shapes = stored_params(config)
    extra = sorted(set(weights) - set(shapes) - {"lm_head.weight"})
    if extra:
        raise ExportError(f"weights: unexpected tensor {extra[0]!r}; the config describes {len(shapes)} "
                          "stored tensors (is the config from another model?)")
    total = sum(_nbytes(shape, _expected_dtype(n, dtype)) for n, shape in shapes.items())
    index: dict[str, dict] = {}
    h = hashlib.sha256()
    offset = 0
    done = 0
    with open(path, "wb") as f:
        for name, shape in shapes.items():
            t = weights.get(name)
            if t is None:
                raise ExportError(f"weights: missing tensor {name!r} (expected shape {shape})")
            want = _expected_dtype(name, dtype)
            if tuple(t.shape) != tuple(shape):
                raise ExportError(f"weights: tensor {name!r} has shape {tuple(t.shape)}, expected {shape} from the config")
            if t.dtype != want:
                raise ExportError(f"weights: tensor {name!r} has dtype {t.dtype}, expected {want} for a {dtype} export")
            pad = -offset % ALIGN
            if pad:
                f.write(b"\0" * pad)
                h.update(b"\0" * pad)
                offset += pad
            flat = t.detach().contiguous().reshape(-1)
            bad = count_nonfinite(flat, CHUNK)
            if bad:
                warnings.warn(f"weights: tensor {name!r} contains {bad} NaN/Inf values", CheckpointWarning,
                              stacklevel=3)
            buf = flat.view(torch.uint8).numpy()
            f.write(memoryview(buf))
            h.update(memoryview(buf))
            index[name] = {"offset": offset, "nbytes": buf.nbytes, "shape": list(shape),
                           "dtype": ONNX_DTYPES["fp32" if want == torch.float32 else dtype]}
            offset += buf.nbytes
            done += buf.nbytes
            if progress is not None:
                progress(done / max(total, 1))
    return index, h.hexdigest(), offset


def _nbytes(shape, dt: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dt).element_size()


# -- graphs ---------------------------------------------------------------------------------------------
class _GraphIO(nn.Module):
    """Flat tensors in and out around the reference model (the fixed I/O names of the manifest)."""

    def __init__(self, model: MambaLM, last_only: bool):
        super().__init__()
        self.model = model
        self.last_only = last_only

    def forward(self, input_ids, conv_state, ssm_state):
        logits, state = self.model(input_ids, MambaState(conv_state, ssm_state), last_only=self.last_only)
        return logits, state.conv, state.ssm


def trace(config: MambaConfig, dtype: str, seq: int | None, last_only: bool) -> tuple[torch.export.ExportedProgram, dict]:
    """torch.export the meta-device twin of the model with the custom ops; seq=None: symbolic length, else
    fixed. Returns the program and {exported initializer name: canonical parameter name}."""
    with torch.device("meta"):
        model = MambaLM(config, torch_dtype(dtype), ops=EXPORT_OPS).eval()
    # exported initializer name -> canonical name (a tied lm_head is the embedding)
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), name)
    aliases = {f"model.{name}": first_name[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    batch = 2
    length = 3 if seq is None else seq
    shapes = config.state_shapes(batch)
    args = (torch.zeros(batch, length, dtype=torch.int64, device="meta"),
            torch.zeros(shapes["conv_state"], dtype=torch_dtype(dtype), device="meta"),
            torch.zeros(shapes["ssm_state"], dtype=torch.float32, device="meta"))
    b = torch.export.Dim("batch")
    dyn = {"input_ids": {0: b} if seq is not None else {0: b, 1: torch.export.Dim("seq")},
           "conv_state": {1: b}, "ssm_state": {1: b}}
    with torch.no_grad():
        ep = torch.export.export(_GraphIO(model, last_only), args, dynamic_shapes=dyn, strict=False)
    return ep, aliases


def export_graph(config: MambaConfig, dtype: str, kind: str, path: Path, index: dict, all_logits: bool,
                 traced: tuple | None = None) -> GraphSpec:
    """Translate a trace (made here unless ``traced`` is given) into graph ``kind`` and write it to
    ``path``; its weights are the entries of ``index`` in weights.bin beside it. Returns its manifest entry."""
    from .onnx_ops import translation_table

    seq = 1 if kind == GRAPH_DECODE else None
    ep, aliases = traced if traced is not None else trace(config, dtype, seq, last_only=not all_logits)
    with _quiet():
        program = torch.onnx.export(ep, (), dynamo=True, verbose=False, optimize=False,
                                    custom_translation_table=translation_table(kind), opset_version=_opset())
    model = program.model
    _finish_graph(model, aliases, index, WEIGHTS_FILE, path.parent)
    spec = _graph_spec(config, dtype, kind, path.name, seq, all_logits)
    _save(model, path)
    return spec


@contextlib.contextmanager
def _quiet():
    """Silence torch.onnx's chatter that is not about our model (missing torchvision, pytree deprecations)."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        log.setLevel(level)


def _opset() -> int:
    from .onnx_ops import OPSET_VERSION

    return OPSET_VERSION


def _finish_graph(model, aliases: dict, index: dict, weights_file: str, base_dir: Path) -> None:
    """Name the I/O, point initializers at weights.bin, simplify without folding weights."""
    import onnx_ir as ir

    g = model.graph
    # -- I/O names and symbolic dims
    if [v.name for v in g.inputs] != [INPUT_IDS, CONV_STATE, SSM_STATE]:
        raise InternalError(f"traced inputs {[v.name for v in g.inputs]}, expected {[INPUT_IDS, CONV_STATE, SSM_STATE]}")
    if len(g.outputs) != 3:
        raise InternalError(f"traced {len(g.outputs)} outputs, expected 3")
    dims = {}
    ids_shape = g.inputs[0].shape
    for i, name in enumerate(("batch", "seq")):
        d = ids_shape[i]
        if isinstance(d, ir.SymbolicDim) and d.value:
            dims[d.value] = name
    for v, name in zip(g.outputs, (LOGITS, CONV_STATE_OUT, SSM_STATE_OUT)):
        v.name = name
    # -- initializers: canonical names, external data in weights.bin
    weight_values = set()
    for old in list(g.initializers):
        v = g.initializers.pop(old)
        canonical = aliases.get(old)
        if canonical is None:
            tensor = v.const_value
            if tensor is None or tensor.size > SMALL_CONSTANT:
                raise InternalError(f"initializer {old!r} ({v.shape}) is not a model parameter")
            g.initializers[old] = v
            continue
        e = index.get(canonical)
        if e is None:
            raise InternalError(f"initializer {old!r} -> {canonical!r} is not in the weights index")
        if list(v.shape) != list(e["shape"]):
            raise InternalError(f"initializer {canonical!r} has shape {v.shape}, the index {e['shape']}")
        v.name = canonical
        v.const_value = ir.ExternalTensor(weights_file, e["offset"], e["nbytes"], v.dtype, shape=v.shape,
                                          name=canonical, base_dir=base_dir)
        g.initializers[canonical] = v
        weight_values.add(v)

    _optimize(model, weight_values)
    for name, v in g.initializers.items():
        if v not in weight_values and (v.const_value is None or v.const_value.size > SMALL_CONSTANT):
            raise InternalError(f"the optimizer produced initializer {name!r} {v.shape}: a folded weight copy")
    for node in ir.traversal.RecursiveGraphIterator(g):
        node.metadata_props.clear()  # torch's stack traces and fx dumps: large, and paths of this machine
    _rename_dims(g, dims)
    model.ir_version = _ir_version()
    model.producer_name, model.producer_version = "mamba-rt", __version__


def _optimize(model, weights: set) -> None:
    """onnxscript's optimizer passes (constant folding, dead code, CSE) with the weights
    hidden as graph inputs while they run, so no pass can fold, deduplicate or even read a weight.
    (``optimize_ir`` itself would also deduplicate initializers by content, merging e.g. equal A_log of
    two layers: the graphs must reference every canonical parameter by its own name. Its pattern rewriter
    is left out: it took 2/3 of the export time of a 64-layer model for a few removed no-ops.)"""
    import onnx_ir.passes.common as common
    from onnxscript import optimizer

    g = model.graph
    hidden = [g.initializers.pop(v.name) for v in list(g.initializers.values()) if v in weights]
    g.inputs.extend(hidden)
    try:
        optimizer.inline(model)
        optimizer.fold_constants_ir(model, input_size_limit=SMALL_CONSTANT, output_size_limit=SMALL_CONSTANT)
        optimizer.remove_unused_nodes(model)
        common.CommonSubexpressionEliminationPass()(model)
        optimizer.remove_unused_nodes(model)
    finally:
        for v in hidden:
            g.inputs.remove(v)
            g.initializers.add(v)


def _ir_version() -> int:
    from .onnx_ops import IR_VERSION

    return IR_VERSION


def _rename_dims(graph, dims: dict[str, str]) -> None:
    """Torch's symbolic dim names (s18, s70 + 3, ...) -> batch / seq everywhere in the graph."""
    import onnx_ir as ir

    if not dims:
        return
    pat = re.compile(r"\b(" + "|".join(map(re.escape, dims)) + r")\b")

    def fix(v):
        if v.shape is None:
            return
        new = [ir.SymbolicDim(pat.sub(lambda m: dims[m.group(1)], d.value))
               if isinstance(d, ir.SymbolicDim) and d.value else d for d in v.shape]
        v.shape = ir.Shape(new)

    for v in graph.inputs:
        fix(v)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for v in node.outputs:
            fix(v)


def _save(model, path: Path) -> None:
    """Serialise the graph; initializers are external references, so no weight byte is copied here."""
    import onnx
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    proto.ir_version = _ir_version()
    onnx.save_model(proto, str(path))


def _graph_spec(config: MambaConfig, dtype: str, kind: str, file: str, seq: int | None, all_logits: bool) -> GraphSpec:
    act = ONNX_DTYPES[dtype]
    L, d, n, k = config.n_layer, config.d_inner, config.d_state, config.d_conv
    s = seq if seq is not None else "seq"
    conv = [L, "batch", d, k - 1]
    ssm = [L, "batch", d, n]
    logits = ["batch", s, config.vocab_size] if all_logits else ["batch", config.vocab_size]
    return GraphSpec(
        file=file, kind="plugin" if kind == GRAPH_PLUGIN else "portable", seq=seq,
        inputs=[TensorSpec(INPUT_IDS, ["batch", s], "int64"), TensorSpec(CONV_STATE, conv, act),
                TensorSpec(SSM_STATE, ssm, "float32")],
        outputs=[TensorSpec(LOGITS, logits, "float32"), TensorSpec(CONV_STATE_OUT, conv, act),
                 TensorSpec(SSM_STATE_OUT, ssm, "float32")],
    )
