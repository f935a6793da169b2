"""Runs shared by the bench tests, made once per session on the CPU: ``mamba-rt bench --config tiny``
and ``benchmarks/run_suite.py`` on the tiny config (both export the same package into one cache)."""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE_CPU = ["--device", "cpu", "--configs", "tiny", "--dtypes", "fp32", "--cpu-configs", "tiny",
             "--onnx-configs", "tiny", "--quick", "--steps", "12", "--warmup", "2",
             "--prefill-reps", "2", "--hf-tokens", "4"]


def run_suite_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_suite

    return run_suite


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory):
    """One MAMBA_RT_CACHE_DIR for every bench test: the tiny package is exported once."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture
def bench_env(bench_cache, monkeypatch):
    """MAMBA_RT_CACHE_DIR set to the shared bench cache for one test."""
    monkeypatch.setenv("MAMBA_RT_CACHE_DIR", str(bench_cache))
    return bench_cache


@pytest.fixture(scope="session")
def bench_run(bench_cache, tmp_path_factory):
    """(result JSON, terminal output) of ``mamba-rt bench --config tiny ... --json out.json``."""
    pytest.importorskip("onnxruntime", reason="the CPU bench runs on the onnxruntime backend")
    from mamba_rt.cli import main

    out = tmp_path_factory.mktemp("bench") / "out.json"
    argv = ["bench", "--config", "tiny", "--backend", "onnxruntime", "--device", "cpu", "--quick",
            "--batch", "1,3", "--prompt-len", "16,64", "--json", str(out)]
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setenv("MAMBA_RT_CACHE_DIR", str(bench_cache))
        assert main(argv) == 0
    return json.loads(out.read_text()), buf.getvalue()


@pytest.fixture(scope="session")
def suite_run(bench_cache, tmp_path_factory):
    """Path of the results of a CPU suite run: decode, prefill and long-context rows of the tiny config."""
    pytest.importorskip("onnxruntime", reason="the CPU suite runs on the onnxruntime backend")
    out = tmp_path_factory.mktemp("suite") / "cpu.json"
    rs = run_suite_module()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAMBA_RT_CACHE_DIR", str(bench_cache))
        assert rs.main(SUITE_CPU + ["--batches", "1,2", "--prompt-lens", "32", "--long-context", "--lc-config", "tiny",
                                    "--lc-dtype", "fp32", "--contexts", "64,256", "--lc-steps", "12", "--out", str(out)]) == 0
    return out
