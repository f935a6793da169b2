"""Where a prefill's time goes: the torch backend's prompt forward (``run_slots`` over a slot, the body
of ``Session.prefill``) at the published sizes, on the GPU (a development tool for issue 8; the
user-facing numbers come from ``mamba-rt bench`` and ``benchmarks/run_suite.py``).

    python benchmarks/profile_prefill.py [--configs 130m,2.8b] [--dtype fp16] [--lengths 2048]
                                         [--eager] [--kernels] [--out FILE.json]

Per (config, length): the backend's CUDA graph of a prompt of ``length`` tokens (``_ModelGraph``):
wall time of one prefill of a random prompt (ids in, graph, the greedy id of the last position on the host),
median of ``--reps`` after one untimed run, and its GPU time (graph replays, CUDA events); with
``--eager`` the same forward run eagerly; with ``--kernels`` one replay's kernel time by kernel family
(torch profiler); and the matrix-multiply floor, 2 * parameters * tokens at the
fp16 matmul rate measured in the same run (a large square ``torch.matmul``), with the parameters
the prompt multiplies (the embedding is a lookup and the LM head runs once).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from profile_decode import gpu_model, kernel_times, replay_ms


def matmul_rate(n: int = 8192, dtype=torch.float16, reps: int = 20) -> float:
    """Dense matmul FLOP/s of an n^3 product on the current GPU: the best of ``reps`` after ~0.2 s of
    warm-up (an idle GPU starts at low clocks; the floor takes the fastest rate seen)."""
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    for _ in range(200):
        a @ b
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); a @ b; e.record(); e.synchronize()
        out.append(s.elapsed_time(e) / 1e3)
    return 2 * n ** 3 / min(out)


def prompt_params(cfg) -> int:
    """Parameters a prompt token multiplies: every layer's projections (the LM head runs once per
    prompt, the embedding is a lookup)."""
    per = cfg.d_model * 2 * cfg.d_inner + cfg.d_inner * (cfg.dt_rank + 2 * cfg.d_state) \
        + cfg.dt_rank * cfg.d_inner + cfg.d_inner * cfg.d_model
    return cfg.n_layer * per


def family(name: str) -> str:
    n = name.lower()
    for key, fam in (("selective_scan", "scan"), ("causal_conv1d", "conv"), ("residual_norm", "norm"), ("gemm", "gemm"),
                     ("gemv", "gemm"), ("cutlass", "gemm"), ("sm90_xmma", "gemm"), ("nvjet", "gemm"),
                     ("index", "gather/scatter"), ("copy", "copy"), ("elementwise", "elementwise"),
                     ("reduce", "reduce")):
        if key in n:
            return fam
    return "other: " + name[:50]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="130m,2.8b")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--eager", action="store_true", help="also time the eager forward (no graph)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from mamba_rt.bench import bench_config
    from mamba_rt.runtime.backend_torch import _ModelGraph, cuda_ops, run_slots

    rate = matmul_rate()
    dev = torch.cuda.get_device_name()
    print(f"{dev}: fp16 matmul {rate / 1e12:.0f} TFLOP/s (8192^3)", flush=True)
    rows = []
    rng = np.random.default_rng(0)
    for name in args.configs.split(","):
        cfg = bench_config(name)
        model = gpu_model(cfg, args.dtype)
        model.ops = cuda_ops()
        sh = cfg.state_shapes(2)
        state = SimpleNamespace(conv=torch.zeros(sh["conv_state"], dtype=model.dtype, device="cuda"),
                                ssm=torch.zeros(sh["ssm_state"], device="cuda"), scratch=1)
        pool = torch.cuda.graph_pool_handle()
        for length in (int(x) for x in args.lengths.split(",")):
            row = {"config": name, "length": length,
                   "matmul_floor_ms": 2 * prompt_params(cfg) * length / rate * 1e3}
            prompts = [rng.integers(0, cfg.vocab_size, length) for _ in range(args.reps + 1)]
            g = _ModelGraph(model, state, 1, length, pool, 1)

            def graphed(ids):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                g.run(np.zeros(1, np.int64), ids[None]).greedy()
                return (time.perf_counter() - t0) * 1e3

            graphed(prompts[0])
            row["wall_ms"] = statistics.median(graphed(p) for p in prompts[1:])
            row["gpu_ms"] = replay_ms(g.graph, reps=10, rounds=3)
            row["gpu_over_floor"] = row["gpu_ms"] / row["matmul_floor_ms"]
            if args.eager:
                idx = torch.zeros(1, dtype=torch.int64, device="cuda")

                def eager(ids):
                    ids = torch.from_numpy(ids[None]).cuda()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    run_slots(model, state, idx, ids).cpu()
                    return (time.perf_counter() - t0) * 1e3

                eager(prompts[0])
                row["eager_wall_ms"] = statistics.median(eager(p) for p in prompts[1:])
            if args.kernels:
                fam = kernel_times(g.graph, family)
                row["kernels"] = sum(len(v) for v in fam.values())
                row["kernel_ms_by_family"] = dict(sorted(((f, sum(v) / 1e3) for f, v in fam.items()),
                                                         key=lambda kv: -kv[1]))
            rows.append(row)
            print(json.dumps(row), flush=True)
            g = None
        model = state = None
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "dtype": args.dtype, "matmul_tflops": rate / 1e12, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
