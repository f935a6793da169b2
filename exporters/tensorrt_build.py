"""Engines from a model package: TensorRT (the plugin graph) and TensorRT-RTX (the portable graphs).

``mamba-rt build PKG`` (:mod:`.build_cli`) calls :func:`build_engines`. What it writes, inside the
package::

    PKG/engines/<stem>.engine              backend "tensorrt": model.onnx, ONE engine, two profiles
                                           (0 = decode: seq 1; 1 = prefill: seq 2..max_prefill), so
                                           the weights exist once on the GPU
    PKG/engines/<stem>.decode.engine       backend "tensorrt-rtx": decode.onnx (seq 1) and
    PKG/engines/<stem>.prefill.engine      prefill.onnx (seq 1..max_prefill), one profile each
    PKG/engines/<stem>.json                the sidecar (:class:`EngineSet`): versions, GPU, compute
                                           capabilities, precision, limits, profiles, engine I/O,
                                           sha256 of each engine file; written last
    PKG/engines/timing-<target>.cache      backend "tensorrt": the timing cache, reused by the next build
                                           (TensorRT-RTX has none: its timing-cache calls are no-ops)

``<stem>`` names what an engine is tied to (:meth:`Target.stem`)::

    model-fp16-nvidia-h100-80gb-hbm3-sm90-trt10.13.3.9
    portable-fp16-any-sm80.86.89.120-rtx1.7.1.116

An engine runs only with the TensorRT version that built it, on a GPU of the compute capability it was
built for; :func:`check_compatible` refuses anything else with an error that names both sides, before
any device work.

Tiers: everything here but :func:`build_engines`' TensorRT calls is plain code tested in CI (profile
ranges, naming, sidecar, mismatch checks, I/O checks, the plugin-graph rewrite); TensorRT-RTX builds
run on a CPU in CI. Nothing heavy is imported at module import; this module is torch-free, so the
runtime's tensorrt backend reads sidecars through it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from mamba_rt import __version__
from mamba_rt._optional import require
from mamba_rt.errors import InputError, MambaRTError, MissingDependencyError, UnsupportedError
from mamba_rt.manifest import (GRAPH_DECODE, GRAPH_PLUGIN, GRAPH_PREFILL, GraphSpec, Manifest, PackageError,
                               load_manifest)

TENSORRT, TENSORRT_RTX = "tensorrt", "tensorrt-rtx"
BACKENDS = (TENSORRT, TENSORRT_RTX)
PRECISIONS = ("fp32", "fp16", "bf16")
ENGINE_DIR = "engines"
SIDECAR_FORMAT = "mamba-rt-engines"
SIDECAR_VERSION = 1
DECODE, PREFILL = "decode", "prefill"  # profile names
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_PREFILL = 2048
DEFAULT_OPT_PREFILL = 256  # the Session's default prefill chunk: the length most prefill calls have
MAX_BATCH_LIMIT = 65535  # the scan kernel puts the batch on grid.y
# TensorRT-RTX targets when building without a GPU: Ampere, Ada, Blackwell (what TensorRT-RTX runs on)
RTX_DEFAULT_CCS = ("8.0", "8.6", "8.9", "12.0")
PLUGIN_IMPLS = ("aot", "jit")

Progress = Callable[[str], None]


class EngineBuildError(MambaRTError):
    """An engine cannot be built from this package with these options."""


class EngineMismatchError(MambaRTError):
    """An engine was built for another GPU, compute capability, TensorRT version or package."""


# --------------------------------------------------------------------------------------------------
# targets and names


@dataclasses.dataclass(frozen=True)
class Target:
    """What an engine is tied to: backend, library version, GPU name and compute capabilities.

    ``gpu_name`` is "any" for TensorRT-RTX engines built for a list of compute capabilities (on a CPU).
    """

    backend: str
    version: str
    gpu_name: str
    compute_capabilities: tuple[str, ...]  # "9.0", ...

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise InputError(f"backend {self.backend!r}: expected one of {BACKENDS}")
        if not self.compute_capabilities:
            raise InputError("a build target needs at least one compute capability")
        for cc in self.compute_capabilities:
            parse_cc(cc)

    def stem(self, precision: str) -> str:
        kind = "model" if self.backend == TENSORRT else "portable"
        lib = "trt" if self.backend == TENSORRT else "rtx"
        return f"{kind}-{precision}-{self.tag()}-{lib}{self.version}"

    def tag(self) -> str:
        ccs = ".".join(cc.replace(".", "") for cc in self.compute_capabilities)
        return f"{slug(self.gpu_name)}-sm{ccs}"

    def describe(self) -> str:
        lib = "TensorRT" if self.backend == TENSORRT else "TensorRT-RTX"
        ccs = ", ".join(self.compute_capabilities)
        return f"{self.gpu_name} (compute capability {ccs}), {lib} {self.version}"


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (safe in a file name)."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown-gpu"


def parse_cc(cc: str) -> tuple[int, int]:
    """'8.6' -> (8, 6); anything else is an InputError."""
    m = re.fullmatch(r"(\d+)\.(\d+)", str(cc))
    if not m:
        raise InputError(f"compute capability {cc!r}: expected MAJOR.MINOR, e.g. '8.6'")
    return int(m.group(1)), int(m.group(2))


def resolve_precision(requested: str | None, manifest: Manifest) -> str:
    """The engine precision. The networks are strongly typed (TensorRT runs the graph's own types), so
    it is the package's dtype; asking for another one is an error that says how to get it."""
    if requested is None:
        return manifest.dtype
    if requested not in PRECISIONS:
        raise InputError(f"precision {requested!r}: expected one of {PRECISIONS}")
    if requested != manifest.dtype:
        raise EngineBuildError(
            f"precision {requested} requested, but the package was exported in {manifest.dtype}: its graphs' "
            f"types are fixed and the engine is built strongly typed. Re-export with `mamba-rt export "
            f"--dtype {requested}`, or build with --precision {manifest.dtype}")
    return requested


# --------------------------------------------------------------------------------------------------
# profiles


@dataclasses.dataclass(frozen=True)
class Profile:
    """One optimization profile: (min, opt, max) of the batch and the sequence, and every input's
    resulting shapes."""

    name: str
    batch: tuple[int, int, int]
    seq: tuple[int, int, int]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_dict(self) -> dict:
        return {"name": self.name, "batch": list(self.batch), "seq": list(self.seq),
                "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        return cls(str(d["name"]), tuple(d["batch"]), tuple(d["seq"]),
                   {k: tuple(tuple(int(x) for x in s) for s in v) for k, v in d["shapes"].items()})


def _check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InputError(f"{name}: expected an integer {rng}, got {v!r}")
    return v


def profile_shapes(graph: GraphSpec, batch: tuple[int, int, int], seq: tuple[int, int, int]) -> dict:
    """(min, opt, max) shape of every input of ``graph``: its symbolic dims "batch" and "seq" take the
    ranges, its fixed dims stay."""
    out = {}
    for t in graph.inputs:
        mins, opts, maxs = [], [], []
        for d in t.shape:
            if isinstance(d, int):
                rng = (d, d, d)
            elif d == "batch":
                rng = batch
            elif d == "seq":
                rng = seq
            else:
                raise EngineBuildError(f"graph {graph.file}: input {t.name} has dimension {d!r}; expected an "
                                       "integer, 'batch' or 'seq'")
            mins.append(rng[0]), opts.append(rng[1]), maxs.append(rng[2])
        out[t.name] = (tuple(mins), tuple(opts), tuple(maxs))
    return out


def plan_profiles(manifest: Manifest, backend: str, max_batch: int = DEFAULT_MAX_BATCH,
                  max_prefill: int = DEFAULT_MAX_PREFILL, opt_batch: int = 1,
                  opt_prefill: int | None = None) -> dict[str, list[Profile]]:
    """Graph name -> its optimization profiles, for ``backend``.

    tensorrt: the plugin graph with profile 0 "decode" (seq 1) and profile 1 "prefill" (seq
    2..max_prefill). tensorrt-rtx: the decode graph (seq 1) and the prefill graph (seq 1..max_prefill:
    TensorRT-RTX 1.7 fails to build the fp16/bf16 prefill graph when the sequence range starts above 1,
    "Myelin ... failed to refine intervals"). Batch is 1..max_batch everywhere.
    """
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r}: expected one of {BACKENDS}")
    max_batch = _check_int("max_batch", max_batch, 1, MAX_BATCH_LIMIT)
    max_prefill = _check_int("max_prefill", max_prefill, 2)
    opt_batch = _check_int("opt_batch", opt_batch, 1, max_batch)
    if opt_prefill is None:
        opt_prefill = min(DEFAULT_OPT_PREFILL, max_prefill)
    opt_prefill = _check_int("opt_prefill", opt_prefill, 2 if backend == TENSORRT else 1, max_prefill)
    batch = (1, opt_batch, max_batch)
    need = (GRAPH_PLUGIN,) if backend == TENSORRT else (GRAPH_DECODE, GRAPH_PREFILL)
    missing = [g for g in need if g not in manifest.graphs]
    if missing:
        raise EngineBuildError(f"backend {backend} builds the graph(s) {list(need)}, but the package has no "
                               f"{missing} (its graphs: {sorted(manifest.graphs)}); re-export it")
    if backend == TENSORRT:
        g = manifest.graphs[GRAPH_PLUGIN]
        return {GRAPH_PLUGIN: [Profile(DECODE, batch, (1, 1, 1), profile_shapes(g, batch, (1, 1, 1))),
                               Profile(PREFILL, batch, (2, opt_prefill, max_prefill),
                                       profile_shapes(g, batch, (2, opt_prefill, max_prefill)))]}
    dg, pg = manifest.graphs[GRAPH_DECODE], manifest.graphs[GRAPH_PREFILL]
    if dg.seq not in (None, 1):
        raise EngineBuildError(f"graph {dg.file}: decode graph has seq {dg.seq}, expected 1")
    seq = (1, opt_prefill, max_prefill)
    return {GRAPH_DECODE: [Profile(DECODE, batch, (1, 1, 1), profile_shapes(dg, batch, (1, 1, 1)))],
            GRAPH_PREFILL: [Profile(PREFILL, batch, seq, profile_shapes(pg, batch, seq))]}


# --------------------------------------------------------------------------------------------------
# I/O checks


@dataclasses.dataclass(frozen=True)
class IOTensor:
    """An engine (or network) I/O tensor: name, "input"/"output", dtype name, shape (-1 = dynamic)."""

    name: str
    mode: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "mode": self.mode, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "IOTensor":
        return cls(str(d["name"]), str(d["mode"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]))


def expected_io(graph: GraphSpec) -> list[IOTensor]:
    """The I/O the manifest promises for ``graph``, symbolic dims as -1."""
    def conv(t, mode):
        return IOTensor(t.name, mode, t.dtype, tuple(d if isinstance(d, int) else -1 for d in t.shape))
    return [conv(t, "input") for t in graph.inputs] + [conv(t, "output") for t in graph.outputs]


def check_io(actual: Iterable[IOTensor], graph: GraphSpec, what: str) -> None:
    """``actual`` (a parsed network's or a deserialized engine's I/O) must be the manifest's I/O of
    ``graph``: same names, directions, dtypes and shapes (-1 where the manifest is symbolic)."""
    want = {t.name: t for t in expected_io(graph)}
    got = {t.name: t for t in actual}
    problems = []
    for name in want.keys() - got.keys():
        problems.append(f"{want[name].mode} {name!r} is missing")
    for name in got.keys() - want.keys():
        problems.append(f"unexpected {got[name].mode} {name!r}")
    for name in want.keys() & got.keys():
        w, g = want[name], got[name]
        if g.mode != w.mode:
            problems.append(f"{name!r} is an {g.mode}, expected an {w.mode}")
        if g.dtype != w.dtype:
            problems.append(f"{name!r} has dtype {g.dtype}, expected {w.dtype}")
        if len(g.shape) != len(w.shape) or any(ws != gs for ws, gs in zip(w.shape, g.shape)):
            problems.append(f"{name!r} has shape {list(g.shape)}, expected {list(w.shape)}")
    if problems:
        raise EngineMismatchError(f"{what}: I/O does not match the manifest's graph {graph.file!r}: "
                                  + "; ".join(sorted(problems)))


# --------------------------------------------------------------------------------------------------
# the sidecar


@dataclasses.dataclass
class EngineFile:
    file: str
    graph: str  # manifest graph name: plugin | decode | prefill
    profiles: list[Profile]
    io: list[IOTensor]
    sha256: str = ""
    bytes: int = 0

    def to_dict(self) -> dict:
        return {"file": self.file, "graph": self.graph, "profiles": [p.to_dict() for p in self.profiles],
                "io": [t.to_dict() for t in self.io], "sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "EngineFile":
        return cls(str(d["file"]), str(d["graph"]), [Profile.from_dict(p) for p in d["profiles"]],
                   [IOTensor.from_dict(t) for t in d["io"]], str(d.get("sha256", "")), int(d.get("bytes", 0)))


@dataclasses.dataclass
class EngineSet:
    """The sidecar ``<stem>.json``: what was built, for what, from which package."""

    target: Target
    precision: str
    max_batch: int
    max_prefill: int
    model_id: str
    engines: list[EngineFile]
    plugin_impl: str | None = None  # tensorrt: "aot" (kernels inside the engine) or "jit" (Python)
    mamba_rt_version: str = __version__
    build_seconds: float = 0.0
    format_version: int = SIDECAR_VERSION

    @property
    def stem(self) -> str:
        return self.target.stem(self.precision)

    def engine(self, graph: str) -> EngineFile:
        for e in self.engines:
            if e.graph == graph:
                return e
        raise PackageError(f"engine set {self.stem}: no engine for graph {graph!r} "
                           f"(has {[e.graph for e in self.engines]})")

    def to_dict(self) -> dict:
        t = self.target
        return {"format": SIDECAR_FORMAT, "format_version": self.format_version, "backend": t.backend,
                "version": t.version, "gpu_name": t.gpu_name, "compute_capabilities": list(t.compute_capabilities),
                "precision": self.precision, "max_batch": self.max_batch, "max_prefill": self.max_prefill,
                "model_id": self.model_id, "plugin_impl": self.plugin_impl,
                "mamba_rt_version": self.mamba_rt_version, "build_seconds": round(self.build_seconds, 3),
                "engines": [e.to_dict() for e in self.engines]}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "EngineSet":
        if not isinstance(d, dict) or d.get("format") != SIDECAR_FORMAT:
            raise PackageError(f"{where}: not a mamba-rt engine sidecar (expected format {SIDECAR_FORMAT!r})")
        if d.get("format_version") != SIDECAR_VERSION:
            raise PackageError(f"{where}: sidecar format version {d.get('format_version')!r}, this mamba-rt "
                               f"reads {SIDECAR_VERSION}; rebuild with `mamba-rt build`")
        try:
            target = Target(str(d["backend"]), str(d["version"]), str(d["gpu_name"]),
                            tuple(str(c) for c in d["compute_capabilities"]))
            return cls(target, str(d["precision"]), int(d["max_batch"]), int(d["max_prefill"]),
                       str(d["model_id"]), [EngineFile.from_dict(e) for e in d["engines"]],
                       d.get("plugin_impl"), str(d.get("mamba_rt_version", "")),
                       float(d.get("build_seconds", 0.0)), int(d["format_version"]))
        except (KeyError, TypeError, ValueError, InputError) as e:
            raise PackageError(f"{where}: malformed engine sidecar ({type(e).__name__}: {e})") from None

    def save(self, engine_dir: Path) -> Path:
        p = engine_dir / f"{self.stem}.json"
        _write_atomic(p, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return p


def load_engine_sets(pkg_dir: str | Path, backend: str | None = None) -> list[tuple[Path, EngineSet]]:
    """Every sidecar in ``PKG/engines`` (optionally of one backend), sorted by file name."""
    d = Path(pkg_dir) / ENGINE_DIR
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise PackageError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
        es = EngineSet.from_dict(data, str(p))
        if backend is None or es.target.backend == backend:
            out.append((p, es))
    return out


def check_compatible(es: EngineSet, current: Target, manifest: Manifest, where: str = "engine") -> None:
    """Refuse an engine set that does not run here: another backend, library version, compute
    capability or GPU, or another export of the package. The error names both sides."""
    built = es.target
    if built.backend != current.backend:
        raise EngineMismatchError(f"{where} was built for backend {built.backend}, not {current.backend}")
    if built.version != current.version:
        raise EngineMismatchError(
            f"{where} was built with {built.describe()}; this machine has {current.describe()}. TensorRT "
            "engines run only with the version that built them: rebuild with `mamba-rt build`")
    (cc,) = current.compute_capabilities
    if cc not in built.compute_capabilities:
        raise EngineMismatchError(
            f"{where} was built for {built.describe()}; this GPU is {current.describe()}. Rebuild with "
            "`mamba-rt build` on this GPU")
    if built.backend == TENSORRT and built.gpu_name != current.gpu_name:
        raise EngineMismatchError(
            f"{where} was built on {built.describe()}; this GPU is {current.describe()}. TensorRT tunes an "
            "engine for the GPU that built it: rebuild with `mamba-rt build` on this GPU")
    if es.model_id != manifest.model_id():
        raise EngineMismatchError(
            f"{where} was built from model {es.model_id}, the package now holds {manifest.model_id()} "
            "(re-exported since): rebuild with `mamba-rt build`")


def find_engine_set(pkg_dir: str | Path, current: Target, manifest: Manifest,
                    precision: str | None = None) -> tuple[Path, EngineSet]:
    """The engine set of ``PKG/engines`` that runs on ``current``; a clear error when none does."""
    sets = load_engine_sets(pkg_dir, current.backend)
    if precision is not None:
        sets = [(p, es) for p, es in sets if es.precision == precision]
    if not sets:
        raise PackageError(f"{pkg_dir}: no {current.backend} engine"
                           f"{' in ' + precision if precision else ''} (expected {ENGINE_DIR}/*.json from "
                           f"`mamba-rt build {pkg_dir} --backend {current.backend}`)")
    errors = []
    for p, es in sets:
        try:
            check_compatible(es, current, manifest, where=f"engine {p.name}")
            return p, es
        except EngineMismatchError as e:
            errors.append(str(e))
    raise EngineMismatchError("; ".join(errors))


def verify_engine_file(engine_dir: Path, ef: EngineFile) -> bytes:
    """The engine's bytes, refused when missing or not the bytes the sidecar recorded."""
    p = engine_dir / ef.file
    if not p.is_file():
        raise PackageError(f"{p}: engine file is missing (named by the sidecar); rebuild with `mamba-rt build`")
    data = p.read_bytes()
    if len(data) != ef.bytes or hashlib.sha256(data).hexdigest() != ef.sha256:
        raise PackageError(f"{p}: {len(data)} bytes with another hash than the {ef.bytes} bytes the sidecar "
                           "recorded (truncated or replaced); rebuild with `mamba-rt build`")
    return data


# --------------------------------------------------------------------------------------------------
# the plugin graph, as TensorRT's ONNX parser wants it


def tag_plugin_nodes(model, aot: bool = True) -> int:
    """Give every ``mamba_rt`` node of an ONNX ModelProto (in place) the attributes TensorRT's parser
    maps to a registered plugin: ``plugin_namespace`` = "mamba_rt" (the node's op type is already the
    plugin name) and ``aot`` (1: embed the kernels, 0: the Python implementation). Returns how many
    nodes were tagged; any other custom domain is refused (no plugin would serve it)."""
    import onnx

    from mamba_rt.plugins_cuda.tensorrt_plugins import CONV_NAME, NAMESPACE, SCAN_NAME

    n = 0
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            continue
        if node.domain != NAMESPACE or node.op_type not in (CONV_NAME, SCAN_NAME):
            raise EngineBuildError(f"node {node.name!r}: op {node.domain}::{node.op_type} has no TensorRT "
                                   f"plugin; expected {NAMESPACE}::{CONV_NAME} or {NAMESPACE}::{SCAN_NAME}")
        for a in [a for a in node.attribute if a.name in ("plugin_namespace", "aot")]:
            node.attribute.remove(a)
        node.attribute.append(onnx.helper.make_attribute("plugin_namespace", NAMESPACE))
        node.attribute.append(onnx.helper.make_attribute("aot", int(bool(aot))))
        n += 1
    return n


# --------------------------------------------------------------------------------------------------
# progress


class ProgressPrinter:
    """Turns TensorRT's progress-monitor callbacks into a few lines: phases down to ``max_depth``
    levels, and for each of those at most ``updates`` step lines (``[1/2 model.onnx]   Building engine
    3/7``). Never cancels the build."""

    def __init__(self, emit: Progress, prefix: str = "", max_depth: int = 2, updates: int = 4):
        self.emit, self.prefix = emit, prefix
        self.max_depth, self.updates = max_depth, updates
        self.stack: list[str] = []
        self.steps: dict[str, int] = {}

    def phase_start(self, phase: str, parent: str | None, num_steps: int) -> None:
        self.stack.append(phase)
        self.steps[phase] = num_steps
        if len(self.stack) <= self.max_depth:
            self.emit(f"{self.prefix}{'  ' * (len(self.stack) - 1)}{phase} (0/{num_steps})")

    def step_complete(self, phase: str, step: int) -> bool:
        total = self.steps.get(phase, 0)
        depth = self.stack.index(phase) + 1 if phase in self.stack else len(self.stack) + 1
        done = step + 1
        if depth <= self.max_depth and total > 1:
            every = max(1, -(-total // self.updates))
            if done == total or done % every == 0:
                self.emit(f"{self.prefix}{'  ' * (depth - 1)}{phase} {done}/{total}")
        return True

    def phase_finish(self, phase: str) -> None:
        if phase in self.stack:
            del self.stack[self.stack.index(phase):]


# --------------------------------------------------------------------------------------------------
# building (the TensorRT-only tier)


def library(backend: str):
    """The Python module of ``backend``'s library, or a MissingDependencyError naming how to get it."""
    if backend == TENSORRT:
        return require("tensorrt")
    if backend == TENSORRT_RTX:
        try:
            import tensorrt_rtx
        except ImportError as e:
            raise MissingDependencyError(f"tensorrt_rtx is not installed, and is needed for the tensorrt-rtx "
                                         f"backend: pip install tensorrt-rtx-cu13 (import failed: {e})") from e
        return tensorrt_rtx
    raise InputError(f"backend {backend!r}: expected one of {BACKENDS}")


def gpu_target(backend: str, version: str, device: int = 0) -> Target:
    """The Target of the GPU ``device`` (name and compute capability through the CUDA driver)."""
    drv = require("cuda.bindings.driver")

    def ok(res, what):
        err, *vals = res if isinstance(res, tuple) else (res,)
        if err != drv.CUresult.CUDA_SUCCESS:
            raise EngineBuildError(f"{what} failed ({err.name}): the {backend} backend builds for and runs on a "
                                   "CUDA GPU" + ("; use --backend tensorrt-rtx to build on a machine without one"
                                                 if backend == TENSORRT else ""))
        return vals[0] if len(vals) == 1 else vals

    ok(drv.cuInit(0), "cuInit")
    dev = ok(drv.cuDeviceGet(device), f"cuDeviceGet({device})")
    name = ok(drv.cuDeviceGetName(256, dev), "cuDeviceGetName")
    name = bytes(name).split(b"\0", 1)[0].decode(errors="replace").strip()
    attr = drv.CUdevice_attribute
    major = ok(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cc major")
    minor = ok(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cc minor")
    return Target(backend, version, name, (f"{major}.{minor}",))


def rtx_target(version: str, compute_capabilities: Iterable[str] | None) -> Target:
    ccs = tuple(compute_capabilities or RTX_DEFAULT_CCS)
    return Target(TENSORRT_RTX, version, "any", ccs)


def _dtype_name(trt, dt) -> str:
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
             "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}
    return names.get(getattr(dt, "name", str(dt)), str(dt))


def network_io(trt, network) -> list[IOTensor]:
    ins = [network.get_input(i) for i in range(network.num_inputs)]
    outs = [network.get_output(i) for i in range(network.num_outputs)]
    return ([IOTensor(t.name, "input", _dtype_name(trt, t.dtype), tuple(t.shape)) for t in ins]
            + [IOTensor(t.name, "output", _dtype_name(trt, t.dtype), tuple(t.shape)) for t in outs])


def engine_io(trt, engine) -> list[IOTensor]:
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        out.append(IOTensor(name, mode, _dtype_name(trt, engine.get_tensor_dtype(name)),
                            tuple(engine.get_tensor_shape(name))))
    return out


def _make_logger(trt, verbose: bool, emit: Progress):
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg.strip())
            if verbose:  # errors are kept for the exception; a CPU-only build logs harmless CUDA errors
                emit(f"  [{str(severity).rsplit('.', 1)[-1]}] {msg.strip()}")

    return _Logger()


def _make_monitor(trt, printer: ProgressPrinter):
    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            printer.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return printer.step_complete(phase_name, step)

        def phase_finish(self, phase_name):
            printer.phase_finish(phase_name)

    return _Monitor()


def build_engines(pkg_dir: str | Path, backend: str = TENSORRT, precision: str | None = None,
                  max_batch: int = DEFAULT_MAX_BATCH, max_prefill: int = DEFAULT_MAX_PREFILL,
                  opt_batch: int = 1, opt_prefill: int | None = None,
                  compute_capabilities: Iterable[str] | None = None, plugin_impl: str = "aot",
                  device: int = 0, workspace_mib: int | None = None, progress: Progress | None = None,
                  verbose: bool = False) -> tuple[Path, EngineSet]:
    """Build ``backend``'s engine(s) for the package at ``pkg_dir`` into ``PKG/engines``; returns the
    sidecar path and its content. Every argument is checked before TensorRT is imported."""
    emit = progress or (lambda line: None)
    manifest = load_manifest(pkg_dir)
    precision = resolve_precision(precision, manifest)
    plans = plan_profiles(manifest, backend, max_batch, max_prefill, opt_batch, opt_prefill)
    if plugin_impl not in PLUGIN_IMPLS:
        raise InputError(f"plugin_impl {plugin_impl!r}: expected one of {PLUGIN_IMPLS}")
    if backend == TENSORRT and compute_capabilities:
        raise InputError("compute capabilities are chosen for tensorrt-rtx only; the tensorrt backend builds "
                         "for the GPU it runs on")
    if compute_capabilities is not None:
        for cc in compute_capabilities:
            parse_cc(cc)
    if workspace_mib is not None:
        _check_int("workspace_mib", workspace_mib, 1)

    trt = library(backend)
    if backend == TENSORRT:
        from mamba_rt.plugins_cuda.tensorrt_plugins import register_plugins

        reg = register_plugins()
        if plugin_impl == "aot" and not reg.aot:
            raise UnsupportedError(f"TensorRT {trt.__version__} has no ahead-of-time Python plugins "
                                   "(tensorrt.plugin.aot_impl); build with --plugin-impl jit")
        target = gpu_target(TENSORRT, trt.__version__, device)
    else:
        target = rtx_target(trt.__version__, compute_capabilities)
    pkg = Path(pkg_dir)
    engine_dir = pkg / ENGINE_DIR
    engine_dir.mkdir(exist_ok=True)
    stem = target.stem(precision)
    emit(f"building {backend} engine(s) {stem} for {target.describe()}")
    logger = _make_logger(trt, verbose, emit)
    builder = trt.Builder(logger)
    cache_path = engine_dir / f"timing-{target.tag()}-trt{target.version}.cache"
    t0 = time.monotonic()
    engines, timing_cache = [], None
    for i, (graph_name, profiles) in enumerate(plans.items()):
        graph = manifest.graphs[graph_name]
        file = f"{stem}.engine" if backend == TENSORRT else f"{stem}.{graph_name}.engine"
        prefix = f"[{i + 1}/{len(plans)} {graph.file}] "
        emit(f"{prefix}parsing")
        network, parser = _parse(trt, builder, pkg / graph.file, backend, plugin_impl, logger)
        io = network_io(trt, network)
        check_io(io, graph, f"{graph.file} as parsed by {backend}")
        config = builder.create_builder_config()
        if workspace_mib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
        if backend == TENSORRT_RTX:
            config.num_compute_capabilities = len(target.compute_capabilities)
            for j, cc in enumerate(target.compute_capabilities):
                config.set_compute_capability(_rtx_cc(trt, cc), j)
        for p in profiles:
            prof = builder.create_optimization_profile()
            for name, (mn, op, mx) in p.shapes.items():
                prof.set_shape(name, mn, op, mx)
            config.add_optimization_profile(prof)
        if backend == TENSORRT:  # TensorRT-RTX: timing cache operations are no-ops (deprecated since 1.2)
            if timing_cache is None:
                blob = cache_path.read_bytes() if cache_path.is_file() else b""
                timing_cache = config.create_timing_cache(blob)
            config.set_timing_cache(timing_cache, False)
        config.progress_monitor = _make_monitor(trt, ProgressPrinter(emit, prefix))
        emit(f"{prefix}building ({', '.join(f'{p.name}: batch {p.batch[0]}..{p.batch[2]}, seq {p.seq[0]}..{p.seq[2]}' for p in profiles)})")
        logger.errors.clear()
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise EngineBuildError(f"{backend} could not build {graph.file}: "
                                   + (" | ".join(logger.errors[-5:]) or "no error message from the builder"))
        data = bytes(memoryview(blob))
        _write_atomic(engine_dir / file, data)
        engines.append(EngineFile(file, graph_name, profiles, io, hashlib.sha256(data).hexdigest(), len(data)))
        emit(f"{prefix}wrote {ENGINE_DIR}/{file} ({len(data) / 2**20:.1f} MiB)")
        del parser, network
    if timing_cache is not None:
        _write_atomic(cache_path, bytes(memoryview(timing_cache.serialize())))
    es = EngineSet(target, precision, max_batch, max_prefill, manifest.model_id(), engines,
                   plugin_impl if backend == TENSORRT else None, build_seconds=time.monotonic() - t0)
    path = es.save(engine_dir)
    emit(f"wrote {ENGINE_DIR}/{path.name} in {es.build_seconds:.1f}s")
    return path, es


def _parse(trt, builder, onnx_path: Path, backend: str, plugin_impl: str, logger):
    flags = 0
    names = trt.NetworkDefinitionCreationFlag.__members__
    if "STRONGLY_TYPED" in names:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if backend == TENSORRT:
        pref = "PREFER_AOT_PYTHON_PLUGINS" if plugin_impl == "aot" else "PREFER_JIT_PYTHON_PLUGINS"
        if pref in names:
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, pref))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if backend == TENSORRT:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        tag_plugin_nodes(model, aot=plugin_impl == "aot")
        ok = parser.parse(model.SerializeToString(), str(onnx_path))
    else:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{backend}'s ONNX parser refused {onnx_path.name}: " + " | ".join(errs[:5]))
    return network, parser


def _rtx_cc(trt, cc: str):
    major, minor = parse_cc(cc)
    member = f"SM{major}{minor}"
    if member not in trt.ComputeCapability.__members__:
        have = sorted(m for m in trt.ComputeCapability.__members__ if m.startswith("SM"))
        raise UnsupportedError(f"TensorRT-RTX {trt.__version__} cannot target compute capability {cc}; it "
                               f"knows {', '.join(h[2:-1] + '.' + h[-1] for h in have)}")
    return getattr(trt.ComputeCapability, member)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
