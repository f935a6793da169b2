"""Launch one prefill-scan variant a few times, for Nsight Compute (benchmarks/NOTES.md, Kernels):

    ncu -k regex:mrt_selective_scan --launch-skip 1 --launch-count 1 --section WarpStateStats \\
        python benchmarks/profile_scan.py --variant seq [--batch 1 --seqlen 2048 --dim 5120]

Variants are bench_kernels.SCAN_VARIANTS (compiled with the same NVRTC path, flat entry point).
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="seq")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--launches", type=int, default=3)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).parent / "bench_kernels.py")
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    B, d, n, L = args.batch, args.dim, 16, args.seqlen
    t = bk._prefill_inputs(B, d, n, L, 4, 7)
    y, hs = torch.empty_like(t["u"]), torch.empty_like(t["h0"])
    ptrs = tuple(x.data_ptr() for x in (t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], t["D"], t["z"], t["db"],
                                         t["h0"], y, hs))
    plan = bk._variant_plan(args.variant, B, d, L, n)
    for _ in range(args.launches):
        plan.launch(ptrs, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    print(args.variant, "ok", float(y.float().abs().mean()))


if __name__ == "__main__":
    main()
