"""``mamba-rt build PKG [--backend tensorrt|tensorrt-rtx] [--precision fp16|bf16|fp32] [--max-batch N]
[--max-prefill L]``: engines inside the package (``PKG/engines``, see :mod:`.tensorrt_build`).

Imports nothing heavy until it runs: TensorRT (or TensorRT-RTX) and onnx load inside :func:`run`, after
every argument has been checked.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .tensorrt_build import (BACKENDS, DEFAULT_MAX_BATCH, DEFAULT_MAX_PREFILL, DEFAULT_OPT_PREFILL, PLUGIN_IMPLS,
                                 PRECISIONS, RTX_DEFAULT_CCS, TENSORRT)

    parser.add_argument("package", metavar="PKG", help="model package directory (from `mamba-rt export`)")
    parser.add_argument("--backend", choices=BACKENDS, default=TENSORRT,
                        help="tensorrt: the plugin graph for this GPU (default); tensorrt-rtx: the portable "
                             "graphs, buildable without a GPU, for Ampere/Ada/Blackwell")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="must be the package's dtype (default: it); the graph's types are built as they are")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                        help=f"most sequences per step (default {DEFAULT_MAX_BATCH})")
    parser.add_argument("--max-prefill", type=int, default=DEFAULT_MAX_PREFILL, metavar="L",
                        help=f"longest prefill chunk in tokens (default {DEFAULT_MAX_PREFILL})")
    parser.add_argument("--opt-batch", type=int, default=1, metavar="N", help="batch size to tune for (default 1)")
    parser.add_argument("--opt-prefill", type=int, default=None, metavar="L",
                        help=f"prefill length to tune for (default min({DEFAULT_OPT_PREFILL}, --max-prefill))")
    parser.add_argument("--compute-capability", action="append", default=None, metavar="X.Y", dest="ccs",
                        help="tensorrt-rtx: target compute capability, repeatable (default "
                             f"{' '.join(RTX_DEFAULT_CCS)})")
    parser.add_argument("--plugin-impl", choices=PLUGIN_IMPLS, default="aot",
                        help="tensorrt: aot embeds the CUDA kernels in the engine (default); jit runs them "
                             "from Python")
    parser.add_argument("--device", type=int, default=0, metavar="I", help="tensorrt: CUDA device to build on")
    parser.add_argument("--workspace", type=int, default=None, metavar="MIB", help="builder workspace limit in MiB")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--verbose", action="store_true", help="TensorRT's own log messages too")


def run(args: argparse.Namespace) -> int:
    from .tensorrt_build import build_engines, print_progress

    path, es = build_engines(
        args.package, backend=args.backend, precision=args.precision, max_batch=args.max_batch,
        max_prefill=args.max_prefill, opt_batch=args.opt_batch, opt_prefill=args.opt_prefill,
        compute_capabilities=args.ccs, plugin_impl=args.plugin_impl, device=args.device,
        workspace_mib=args.workspace, progress=None if args.quiet else print_progress, verbose=args.verbose,
    )
    for e in es.engines:
        print(path.parent / e.file)
    print(path)
    return 0
