"""Per-token decode latency at batch 1 of the published sizes: mamba-rt's torch backend, the floor, HF
transformers and (with ``--mamba-ssm SRC``) mamba_ssm. Kept for the commands in README.md and NOTES.md: it is
``run_suite.py`` restricted to that (one dtype, batch 1, the torch backend, prefill of 128 tokens), its
rows merged into the suite's results file (``--merge``: the other rows stay) or written to ``--out``.

    python benchmarks/bench_decode.py [--configs 130m,370m,1.4b] [--dtype fp16] [--steps 200] [--out PATH]
                                      [--mamba-ssm SRC]
"""
from __future__ import annotations

import argparse
import sys

import run_suite

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="130m,370m,1.4b")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--steps", default="200")
    ap.add_argument("--out", default=None)
    ap.add_argument("--mamba-ssm", default=None, metavar="SRC")
    a = ap.parse_args()
    sys.exit(run_suite.main(["--configs", a.configs, "--dtypes", a.dtype, "--batches", "1", "--prompt-lens", "128",
                             "--backends", "torch:cuda", "--steps", a.steps, "--merge"]
                            + (["--out", a.out] if a.out else []) + (["--mamba-ssm", a.mamba_ssm] if a.mamba_ssm else [])))
