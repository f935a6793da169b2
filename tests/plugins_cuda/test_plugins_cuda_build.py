"""CPU tests of the kernels' build layer (no GPU): every specialisation compiles with NVRTC for every
CI architecture, the cubin cache key and disk cache work across processes, and the host-side params
structs mirror the CUDA ones."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python is not installed (extra 'gpu')")

from mamba_rt.errors import UnsupportedError  # noqa: E402
from mamba_rt.plugins_cuda import compiler, launcher  # noqa: E402
from mamba_rt.plugins_cuda.compiler import CI_ARCHS, KernelSpec  # noqa: E402

PKG = Path(compiler.__file__).parent


def _compile_one(spec: KernelSpec) -> tuple[KernelSpec, bytes]:
    return spec, compiler.compile_spec(spec)


def test_every_specialisation_compiles_for_every_ci_arch():
    """Every specialisation for sm_80 and sm_90 (42 NVRTC programs), and for sm_86 and sm_89 every op's
    specialisations in one dtype (14 more). The sources branch on __CUDA_ARCH__ only as
    `__CUDA_ARCH__ >= 900` (checked here: sm_90 is compiled in full), so sm_86 and sm_89 compile the same
    code as sm_80 and differ only in what ptxas targets; the other dtypes there would add a minute of CI
    time and no code. NVRTC holds the GIL, so the work is spread over processes; about a minute and a
    half on a 2-core machine."""
    for name in {fam.source for fam in compiler.FAMILIES.values()} | set(compiler.HEADERS):
        text = compiler._read(name)
        assert text.count("__CUDA_ARCH__") == text.count("__CUDA_ARCH__ >= 900"), (
            f"{name} branches on the architecture below sm_90: compile every dtype for every CI arch again")
    full = (min(CI_ARCHS), max(CI_ARCHS))
    specs = [s for arch in CI_ARCHS for s in compiler.all_specs(arch)
             if arch in full or s.dtype == "bfloat16"]
    assert len(specs) == 2 * (3 * 3 + 3 * 4) + 2 * (3 + 4)
    assert {s.arch for s in specs} == set(CI_ARCHS)
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with ProcessPoolExecutor(workers) as ex:
        results = list(ex.map(_compile_one, specs))
    for spec, cubin in results:
        assert cubin[:4] == b"\x7fELF", f"{spec}: NVRTC did not produce an ELF cubin"
        for stem in spec.family.entries_of(spec.spec):
            name = spec.entry(stem).encode()
            assert name in cubin, f"{spec}: entry point {name!r} missing from the cubin"


def test_ptx_output_for_tensorrt():
    ptx = compiler.compile_spec(KernelSpec("selective_scan", "float16", 16, 90), output="ptx")
    text = ptx.decode()
    assert ".target sm_90" in text
    assert ".entry mrt_selective_state_update_f16_n16(" in text
    assert ".entry mrt_selective_scan_fwd_f16_n16(" in text


def test_hot_kernels_do_not_spill():
    """The scan keeps state, prefetch buffers and the chunk loop in registers; a spill (local memory
    traffic) would make it several times slower. The time-parallel kernel is capped at 128 registers
    (4 blocks per SM) and spills a few values that are used once per 512-step chunk, outside the state
    loop (checked in its SASS; measured faster than 2 blocks per SM without spills, NOTES item 21): it
    may spill at most 192 bytes. The warp-specialized kernel (flat only) uses no local memory at all in
    any dtype (its register slots are indexed by constants only)."""
    spec = KernelSpec("selective_scan", "bfloat16", 16, 90)
    _, usage = compiler.compile_with_usage(spec.source(), spec.family.source, spec.arch)
    assert len(usage) == 9, usage  # seq, wide, tp and step, each flat and strided; ws
    for name, u in usage.items():
        assert u.spill_stores <= (192 if "_tp_" in name else 0), f"{name}: {u}"
    for dtype in ("bfloat16", "float16", "float32"):
        for n in (8, 16):
            spec = KernelSpec("selective_scan", dtype, n, 90)
            _, usage = compiler.compile_with_usage(spec.source(), spec.family.source, spec.arch)
            u = usage[spec.entry("mrt_selective_scan_ws_fwd")]
            assert u.stack_frame == 0 and u.spill_stores == 0, f"{spec}: {u}"


_PROBE = """
extern "C" __global__ void probe_local(float* o, const int* idx, int n) {
  float a[8];  // indexed by data: ptxas must give it a stack frame
#pragma unroll
  for (int j = 0; j < 8; ++j) a[j] = o[j];
  float s = 0.f;
  for (int i = 0; i < n; ++i) { const int q = idx[i]; s += a[q]; a[q] = s; }
  o[8] = s;
}
extern "C" __global__ void probe_regs(float* o) { o[threadIdx.x] *= 2.f; }
"""


def test_ptxas_report_sees_local_memory():
    """compile_with_usage's report (what the no-local-memory checks of the scan and decode kernels rest
    on) reports the stack frame of an array indexed by data, and none for a kernel without one."""
    cubin, usage = compiler.compile_with_usage(_PROBE, "probe.cu", 90)
    assert cubin[:4] == b"\x7fELF"
    assert set(usage) == {"probe_local", "probe_regs"}
    assert usage["probe_local"].stack_frame == 8 * 4
    assert usage["probe_regs"].stack_frame == 0 and usage["probe_regs"].spill_stores == 0
    assert 0 < usage["probe_regs"].registers <= usage["probe_local"].registers


def test_ptxas_report_survives_the_compute_cache(monkeypatch):
    """Where a GPU driver is present NVRTC serves a program compiled before (by any process) from the
    CUDA compute cache, with an empty log. compile_with_usage then compiles the program once more with
    an empty kernel of a fresh name (so it is new), and reports the program's own entries only."""
    real, calls = compiler._compile, []

    def compile_then_cached(source, *args):
        calls.append(source)
        cubin, log = real(source, *args)
        return (cubin, "") if len(calls) == 1 else (cubin, log)  # the first compile: a cache hit

    monkeypatch.setattr(compiler, "_compile", compile_then_cached)
    _, usage = compiler.compile_with_usage(_PROBE, "probe.cu", 90)
    assert len(calls) == 2 and calls[0] == _PROBE and calls[1].startswith(_PROBE) and calls[1] != _PROBE
    assert set(usage) == {"probe_local", "probe_regs"}
    assert usage["probe_local"].stack_frame == 8 * 4


def test_cache_key_is_readable_and_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBA_RT_CACHE_DIR", str(tmp_path))
    spec = KernelSpec("selective_scan", "bfloat16", 16, 90)
    key = compiler.cache_key(spec)
    major, minor = compiler.nvrtc_version()
    assert re.fullmatch(rf"selective_scan-bfloat16-n16-sm90-src[0-9a-f]{{12}}-nvrtc{major}\.{minor}", key)
    # every field that changes the bytes changes the key
    others = [KernelSpec("selective_scan", "float16", 16, 90), KernelSpec("selective_scan", "bfloat16", 32, 90),
              KernelSpec("selective_scan", "bfloat16", 16, 89), KernelSpec("causal_conv1d", "bfloat16", 4, 90)]
    assert len({key, *map(compiler.cache_key, others)}) == 5
    assert compiler.cache_path(spec) == tmp_path / "kernels" / f"{key}.cubin"


def test_source_change_changes_key(monkeypatch):
    spec = KernelSpec("causal_conv1d", "float32", 4, 80)
    before = compiler.source_hash(spec)
    real = compiler._read

    def edited(name):
        text = real(name)
        return text + "\n// edited\n" if name == "common.cuh" else text

    monkeypatch.setattr(compiler, "_read", edited)
    assert compiler.source_hash(spec) != before


_CHILD = """
import json, sys
from mamba_rt.plugins_cuda import compiler
spec = compiler.KernelSpec("causal_conv1d", "float16", 3, 86)
data = compiler.get_cubin(spec)
print(json.dumps({"stats": compiler.stats(), "size": len(data)}))
"""


def test_second_process_loads_cubin_without_compiling(tmp_path):
    import json

    import mamba_rt

    # the child imports mamba_rt from where this process did, whatever the install layout
    path = [str(Path(mamba_rt.__file__).parent.parent)] + sys.path
    env = dict(os.environ, MAMBA_RT_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join(path))

    def run():
        out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["stats"] == {"compiled": 1, "disk_hits": 0}
    assert second["stats"] == {"compiled": 0, "disk_hits": 1}
    assert first["size"] == second["size"] > 0
    files = list((tmp_path / "kernels").iterdir())
    assert [f.name for f in files] == [compiler.cache_key(KernelSpec("causal_conv1d", "float16", 3, 86)) + ".cubin"]


def test_corrupt_cache_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBA_RT_CACHE_DIR", str(tmp_path))
    spec = KernelSpec("causal_conv1d", "bfloat16", 2, 80)
    path = compiler.cache_path(spec)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    monkeypatch.setattr(compiler, "_memo", {})
    data = compiler.get_cubin(spec)
    assert data[:4] == b"\x7fELF"
    assert path.read_bytes() == data


@pytest.mark.parametrize("kwargs, match", [
    (dict(op="selective_scan", dtype="float64", spec=16, arch=90), "dtype 'float64'"),
    (dict(op="selective_scan", dtype="float16", spec=12, arch=90), "n=12"),
    (dict(op="causal_conv1d", dtype="float16", spec=5, arch=90), "k=5"),
    (dict(op="causal_conv1d", dtype="float16", spec=4, arch=75), "compute capability 75"),
    (dict(op="mamba2_scan", dtype="float16", spec=4, arch=90), "unknown kernel op"),
])
def test_kernel_spec_rejects_unsupported(kwargs, match):
    with pytest.raises(UnsupportedError, match=match):
        KernelSpec(**kwargs)


def _c_struct_fields(source: str, struct: str) -> list[str]:
    body = re.search(rf"struct {struct} \{{(.*?)\n\}};", source, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    names = []
    for decl in body.split(";"):
        decl = decl.strip()
        if decl:
            names += [n.strip().lstrip("*") for n in re.sub(r"^(const )?(void\*|long long) ?", "", decl).split(",")]
    return names


@pytest.mark.parametrize("source, struct, mirror", [
    ("causal_conv1d.cu", "ConvParams", launcher._ConvParams),
    ("selective_scan.cu", "ScanParams", launcher._ScanParams),
])
def test_params_structs_mirror_the_cuda_ones(source, struct, mirror):
    """The strided entry points take the struct by value: the ctypes mirror must match it field for
    field (every field is 8 bytes, so matching names and order means matching layout)."""
    c_fields = _c_struct_fields((PKG / source).read_text(), struct)
    assert c_fields == [f for f, _ in mirror._fields_]
    import ctypes
    assert ctypes.sizeof(mirror) == 8 * len(c_fields)
