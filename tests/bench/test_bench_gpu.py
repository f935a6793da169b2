"""The GPU side of the benchmarks (``pytest -m gpu``): CUDA-event timing and device memory in
``mamba-rt bench``, the Transformer baseline's CUDA-graph step against eager, and a tiny suite run."""
from __future__ import annotations

import json

import pytest

from tests.bench.conftest import run_suite_module

pytestmark = pytest.mark.gpu


def test_bench_on_the_gpu_times_with_events_and_reads_device_memory(bench_env, tmp_path):
    from mamba_rt.cli import main

    out = tmp_path / "gpu.json"
    assert main(["bench", "--config", "tiny", "--device", "cuda", "--backend", "torch", "--dtype", "fp16", "--quick",
                 "--steps", "50", "--batch", "1,4", "--prompt-len", "32", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"]["kind"] == "cuda" and r["backend"]["name"] == "torch"
    assert r["bandwidth"]["method"].startswith("device-to-device")
    for d in r["decode"]:
        assert d["timer"] == "cuda_event" and 0 < d["median_ms"] <= d["p99_ms"]
        mem = [m for _, m in d["memory_trace"]]
        assert min(mem) == max(mem) > 0  # constant device memory while decoding
    assert r["memory"]["peak_bytes"] >= r["memory"]["after_open_bytes"] > 0


def test_llama_cuda_graph_step_matches_eager():
    run_suite_module()  # puts benchmarks/ on sys.path
    import torch

    import baselines
    from mamba_rt.bench import bench_config

    cfg = bench_config("tiny")
    llama = baselines.Llama(baselines.llama_config_like(cfg, cfg.n_params(), 512), torch.float16)
    v = llama.validate_graph()
    assert v["ok"], v


def test_suite_long_context_on_the_gpu(bench_env, tmp_path):
    rs = run_suite_module()
    out = tmp_path / "gpu-suite.json"
    assert rs.main(["--configs", "none", "--long-context", "--lc-config", "tiny", "--lc-dtype", "fp16",
                    "--contexts", "128,512", "--lc-steps", "20", "--warmup", "3", "--hf-tokens", "32", "--quick",
                    "--max-batch-cap", "64", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = [r for r in doc["rows"] if r["kind"] == "long_context" and "median_ms" in r]
    got = {(r["impl"], r["length"], r["largest"]) for r in rows}
    for ctx in (128, 512):
        for impl in ("mamba-rt torch (cuda)", "llama cuda-graph", "llama eager generate"):
            assert (impl, ctx, False) in got and (impl, ctx, True) in got, (impl, ctx, got)
    for r in rows:
        assert r["peak_memory_bytes"] > 0 and r["tokens_per_s"] > 0
        if r["impl"] == "mamba-rt torch (cuda)":
            assert set(r["throughput_vs"]) == {"llama cuda-graph", "llama eager generate"}
