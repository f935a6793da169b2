"""Compile the kernels with NVRTC (cuda-python) and cache the cubins on disk. Torch-free, GPU-free.

One NVRTC program per :class:`KernelSpec` (op family, activation dtype, specialisation, architecture)
holds the four entry points of that specialisation (sequence and single-step kernels, each as a flat
TensorRT-order entry and a strided one). The cubin is cached under ``env.cache_dir() / "kernels"`` in
a file named by :func:`cache_key`, e.g.::

    selective_scan-bfloat16-n16-sm90-src3f9c0a1b2d4e-nvrtc13.0.cubin

so a second process loads it without compiling. The key holds everything the bytes depend on: the
op, dtype, specialisation, architecture, a hash of the sources and compile options, and the NVRTC
version. CUBIN generation needs no GPU, so CI compiles every specialisation (tests/plugins_cuda).

The sources include no CUDA header (see common.cuh), so NVRTC needs no include path.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mamba_rt import env
from mamba_rt._optional import require
from mamba_rt.errors import InternalError, UnsupportedError

# activation dtype name -> (tag in entry-point names, C++ type in common.cuh, bytes per element)
DTYPES: dict[str, tuple[str, str, int]] = {
    "float32": ("f32", "float", 4),
    "float16": ("f16", "mrt::half_t", 2),
    "bfloat16": ("bf16", "mrt::bf16_t", 2),
}


@dataclass(frozen=True)
class _Family:
    source: str          # the .cu file
    macro: str           # the entry-point macro it defines
    spec_prefix: str     # "k" (conv width) or "n" (padded state size)
    specs: tuple[int, ...]
    entries: tuple[str, ...]  # entry-point name stems, completed by _<tag>_<prefix><spec>
    only: tuple = ()  # (stem, the specs that have it) pairs; a stem not named here is in every spec

    def entries_of(self, spec: int) -> tuple[str, ...]:
        """The stems a specialisation's program has."""
        only = dict(self.only)
        return tuple(e for e in self.entries if spec in only.get(e, (spec,)))


FAMILIES: dict[str, _Family] = {
    "causal_conv1d": _Family(
        "causal_conv1d.cu", "MRT_CONV_ENTRIES", "k", (2, 3, 4),
        ("mrt_causal_conv1d_fwd", "mrt_causal_conv1d_fwd_strided",
         "mrt_causal_conv1d_update", "mrt_causal_conv1d_update_strided"),
    ),
    "selective_scan": _Family(
        "selective_scan.cu", "MRT_SCAN_ENTRIES", "n", (8, 16, 32, 64),
        ("mrt_selective_scan_fwd", "mrt_selective_scan_fwd_strided",
         "mrt_selective_scan_wide_fwd", "mrt_selective_scan_wide_fwd_strided",
         "mrt_selective_scan_tp_fwd", "mrt_selective_scan_tp_fwd_strided",
         "mrt_selective_state_update", "mrt_selective_state_update_strided",
         "mrt_selective_scan_ws_fwd"),
        (("mrt_selective_scan_ws_fwd", (8, 16)),),  # selective_scan.cu WsCfg: n <= 16 only
    ),
}

HEADERS = ("common.cuh",)
# Architectures CI compiles for. Any compute capability >= 8.0 that the installed NVRTC knows is
# accepted at run time (the bf16 conversion instruction needs sm_80).
CI_ARCHS = (80, 86, 89, 90)
MIN_ARCH = 80
OPTIONS = ("-std=c++17",)


@dataclass(frozen=True)
class KernelSpec:
    """One compiled program: op family, activation dtype, specialisation (k or padded n), arch."""

    op: str
    dtype: str
    spec: int
    arch: int

    def __post_init__(self) -> None:
        if self.op not in FAMILIES:
            raise UnsupportedError(f"unknown kernel op {self.op!r}; expected one of {sorted(FAMILIES)}")
        fam = FAMILIES[self.op]
        if self.dtype not in DTYPES:
            raise UnsupportedError(
                f"{self.op}: activation dtype {self.dtype!r} is not supported; expected one of "
                f"{sorted(DTYPES)}"
            )
        if self.spec not in fam.specs:
            raise UnsupportedError(
                f"{self.op}: specialisation {fam.spec_prefix}={self.spec} does not exist; expected "
                f"one of {fam.specs}"
            )
        if not isinstance(self.arch, int) or self.arch < MIN_ARCH:
            raise UnsupportedError(
                f"{self.op}: compute capability {self.arch} is not supported; the kernels need "
                f"sm_{MIN_ARCH} or newer"
            )

    @property
    def family(self) -> _Family:
        return FAMILIES[self.op]

    @property
    def spec_name(self) -> str:
        return f"{self.family.spec_prefix}{self.spec}"

    def entry(self, stem: str) -> str:
        """Full entry-point name for one of the family's stems (e.g. 'mrt_selective_scan_fwd')."""
        if stem not in self.family.entries_of(self.spec):
            raise InternalError(f"{stem!r} is not an entry point of {self.op} {self.spec_name}")
        return f"{stem}_{DTYPES[self.dtype][0]}_{self.spec_name}"

    def source(self) -> str:
        tag, ctype, _ = DTYPES[self.dtype]
        return (
            _read(self.family.source)
            + f"\n{self.family.macro}({tag}, {ctype}, {self.spec})\n"
        )

    def options(self) -> tuple[str, ...]:
        return (f"--gpu-architecture=sm_{self.arch}",) + OPTIONS


@functools.lru_cache(maxsize=None)
def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _nvrtc():
    return require("cuda.bindings.nvrtc")


def _check(result, what: str, prog=None):
    """Unpack a cuda.bindings (err, *values) tuple; raise with the NVRTC log on failure."""
    nvrtc = _nvrtc()
    err, *values = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = _log(prog) if prog is not None else ""
        _, msg = nvrtc.nvrtcGetErrorString(err)
        raise InternalError(f"NVRTC {what} failed: {msg.decode(errors='replace')}\n{log}".rstrip())
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _log(prog) -> str:
    nvrtc = _nvrtc()
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS or size <= 1:
        return ""
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.rstrip(b"\x00").decode(errors="replace")


def nvrtc_version() -> tuple[int, int]:
    return _check(_nvrtc().nvrtcVersion(), "nvrtcVersion")


def source_digest(source: str, options: tuple[str, ...] | list[str]) -> str:
    """12 hex digits of a program's source, the headers it may include and its NVRTC options."""
    h = hashlib.sha256()
    h.update(source.encode())
    for name in HEADERS:
        h.update(b"\0" + name.encode() + b"\0" + _read(name).encode())
    h.update("\0".join(options).encode())
    return h.hexdigest()[:12]


def source_hash(spec: KernelSpec) -> str:
    return source_digest(spec.source(), spec.options())


def cache_key(spec: KernelSpec) -> str:
    major, minor = nvrtc_version()
    return (
        f"{spec.op}-{spec.dtype}-{spec.spec_name}-sm{spec.arch}-src{source_hash(spec)}"
        f"-nvrtc{major}.{minor}"
    )


def cache_path(spec: KernelSpec) -> Path:
    return env.cache_dir() / "kernels" / f"{cache_key(spec)}.cubin"


def compile_spec(spec: KernelSpec, *, output: str = "cubin") -> bytes:
    """Compile one specialisation with NVRTC; ``output`` "cubin" (SASS for spec.arch) or "ptx"
    (what TensorRT embeds). No caching here: see :func:`get_cubin`."""
    data = compile_program(spec.source(), spec.family.source, spec.arch, output=output)
    _stats["compiled"] += 1
    return data


def compile_program(source: str, filename: str, arch: int, *, output: str = "cubin",
                    extra_options: tuple[str, ...] = ()) -> bytes:
    """Compile CUDA C++ ``source`` (which may include common.cuh) for sm_<arch>: a cubin, or PTX for
    compute_<arch>. Raises InternalError with NVRTC's log if it does not compile."""
    return _compile(source, filename, arch, output, tuple(extra_options))[0]


@dataclass(frozen=True)
class EntryUsage:
    """What ptxas reports for one entry point: registers per thread, bytes of stack frame (local memory
    the code addresses, e.g. an array indexed at run time) and of register spills."""

    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int


_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)\s+ptxas\s+\.\s+(\d+) bytes stack frame, (\d+) bytes spill "
                    r"stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_USAGE_PROBE = "mrt_usage_probe_"


def compile_with_usage(source: str, filename: str, arch: int,
                       extra_options: tuple[str, ...] = ()) -> tuple[bytes, dict[str, EntryUsage]]:
    """compile_program's cubin, and ptxas's resource report of every entry point in it (from its log
    with --ptxas-options=-v): for the tests that keep hot kernels free of local memory, and for tuning."""
    options = tuple(extra_options) + ("--ptxas-options=-v",)
    cubin, log = _compile(source, filename, arch, "cubin", options)
    if not _ENTRY.search(log):
        # On a machine with a GPU driver NVRTC serves a program it compiled before (in any process)
        # from the CUDA compute cache, and a cached cubin comes with no ptxas report. An empty kernel
        # with a fresh name makes the program new; its entry is left out of the report.
        probe = f"{_USAGE_PROBE}{os.urandom(8).hex()}"
        cubin, log = _compile(f'{source}\nextern "C" __global__ void {probe}() {{}}\n', filename, arch, "cubin",
                              options)
    usage: dict[str, EntryUsage] = {}
    # ptxas reports each entry as a block: "Compiling entry function 'E'", its (and its callees')
    # "Function properties for ...", then "Used R registers"
    blocks = _ENTRY.split(log)
    for name, text in zip(blocks[1::2], blocks[2::2]):
        if name.startswith(_USAGE_PROBE):
            continue
        props = {m.group(1): tuple(map(int, m.groups()[1:])) for m in _PROPS.finditer(text)}
        regs = _REGS.search(text)
        if name not in props or regs is None:
            raise InternalError(f"ptxas report of {filename} for sm_{arch}: no properties for {name!r}\n{text}")
        usage[name] = EntryUsage(int(regs.group(1)), *props[name])
    if not usage:
        raise InternalError(f"ptxas report of {filename} for sm_{arch}: no entry points in\n{log}")
    return cubin, usage


def _compile(source: str, filename: str, arch: int, output: str, extra_options: tuple[str, ...]) -> tuple[bytes, str]:
    """(cubin or PTX, NVRTC's log)."""
    if output not in ("cubin", "ptx"):
        raise InternalError(f"output must be 'cubin' or 'ptx', got {output!r}")
    nvrtc = _nvrtc()
    headers = [_read(n).encode() for n in HEADERS]
    prog = _check(
        nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), len(headers), headers,
                                 [n.encode() for n in HEADERS]),
        "nvrtcCreateProgram",
    )
    try:
        target = f"sm_{arch}" if output == "cubin" else f"compute_{arch}"
        opts = [f"--gpu-architecture={target}".encode()]
        opts += [o.encode() for o in OPTIONS + extra_options]
        _check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), f"compiling {filename} for {target}", prog)
        if output == "cubin":
            size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            buf = b" " * size
            _check(nvrtc.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
        else:
            size = _check(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
            buf = b" " * size
            _check(nvrtc.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
        return bytes(buf), _log(prog)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


_memo: dict[str, bytes] = {}
_memo_lock = threading.Lock()
_stats = {"compiled": 0, "disk_hits": 0}


def stats() -> dict[str, int]:
    """How many programs this process compiled and how many cubins it read from the disk cache."""
    return dict(_stats)


def _looks_like_cubin(data: bytes) -> bool:
    return len(data) > 64 and data[:4] == b"\x7fELF"


def get_cubin(spec: KernelSpec) -> bytes:
    """The cubin of ``spec``: from this process's memory, else the disk cache, else NVRTC (and then
    written to the disk cache atomically, so concurrent processes never read a partial file)."""
    return cached_cubin(cache_key(spec), lambda: compile_spec(spec))


def cached_cubin(key: str, build) -> bytes:
    """The cubin cached under ``key`` (memory, then disk), else ``build()``'s, written to the disk
    cache atomically."""
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    path = env.cache_dir() / "kernels" / f"{key}.cubin"
    data = None
    try:
        data = path.read_bytes()
        if _looks_like_cubin(data):
            _stats["disk_hits"] += 1
        else:  # truncated or foreign file: rebuild it
            data = None
    except FileNotFoundError:
        pass
    if data is None:
        data = build()
        _write_atomic(path, data)
    with _memo_lock:
        _memo[key] = data
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        # An unwritable cache costs a recompile in the next process, never a failure here.
        try:
            os.unlink(tmp)  # type: ignore[possibly-undefined]
        except (OSError, NameError):
            pass


def all_specs(arch: int) -> list[KernelSpec]:
    """Every specialisation of every op for one architecture."""
    return [
        KernelSpec(op, dtype, spec, arch)
        for op, fam in FAMILIES.items()
        for dtype in DTYPES
        for spec in fam.specs
    ]
