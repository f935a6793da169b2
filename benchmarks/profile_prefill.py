"""Where a prefill's time goes: the torch backend's prompt forward (``run_slots`` over a slot, the body
of ``Session.prefill``) at the published sizes, on the GPU (a development tool for issue 8; the
user-facing numbers come from ``mamba-rt bench`` and ``benchmarks/run_suite.py``).

    python benchmarks/profile_prefill.py [--configs 130m,2.8b] [--dtype fp16] [--lengths 2048]
                                         [--chunks 256,2048] [--kernels] [--out FILE.json]

Per (config, length, chunk): the wall time of feeding a random prompt of ``length`` tokens to a fresh
slot in chunks of ``chunk`` (the state carried, the last position's logits synchronised), median of
``--reps`` after one untimed run; the GPU time of the same work (sum of its kernels, torch profiler)
by kernel family with ``--kernels``; and the matrix-multiply floor, 2 * parameters * tokens at the
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

from profile_decode import gpu_model


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
    ap.add_argument("--chunks", default="256,2048")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from mamba_rt.bench import bench_config
    from mamba_rt.runtime.backend_torch import cuda_ops, run_slots

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
                                ssm=torch.zeros(sh["ssm_state"], device="cuda"))
        idx = torch.zeros(1, dtype=torch.int64, device="cuda")
        for length in (int(x) for x in args.lengths.split(",")):
            floor = 2 * prompt_params(cfg) * length / rate * 1e3
            for chunk in (int(x) for x in args.chunks.split(",")):
                def once():
                    ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, (1, length))).cuda()
                    state.conv.zero_(); state.ssm.zero_()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for a in range(0, length, chunk):
                        logits = run_slots(model, state, idx, ids[:, a:a + chunk])
                    logits.cpu()
                    return (time.perf_counter() - t0) * 1e3

                once()
                wall = statistics.median(once() for _ in range(args.reps))
                row = {"config": name, "length": length, "chunk": chunk, "wall_ms": wall,
                       "matmul_floor_ms": floor, "wall_over_floor": wall / floor}
                if args.kernels:
                    from torch.profiler import ProfilerActivity, profile
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        once()
                    fam, n = {}, 0
                    for ev in prof.events():
                        if ev.device_type.name == "CUDA":
                            t = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
                            f = family(ev.name)
                            fam[f] = fam.get(f, 0.0) + t / 1e3
                            n += 1
                    row["gpu_ms"] = sum(fam.values())
                    row["kernels"] = n
                    row["gpu_ms_by_family"] = dict(sorted(fam.items(), key=lambda kv: -kv[1]))
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model, state
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "dtype": args.dtype, "matmul_tflops": rate / 1e12, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
