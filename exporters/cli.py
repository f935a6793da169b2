"""``mamba-rt export CKPT_DIR -o PKG_DIR [--dtype fp32|fp16|bf16] [--force] [--all-logits]``.

Imports nothing heavy until it runs (torch and onnx load inside :func:`run`).
"""
from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT_DIR", help="checkpoint directory (mamba_ssm or Hugging Face format)")
    parser.add_argument("-o", "--output", metavar="PKG_DIR", required=True, help="model package directory to create")
    parser.add_argument("--dtype", default="fp32", help="model dtype: fp32 (default), fp16 or bf16")
    parser.add_argument("--force", action="store_true", help="replace PKG_DIR if it exists")
    parser.add_argument("--all-logits", action="store_true",
                        help="graphs return the logits of every position (default: the last one)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


class ExportProgress:
    """One status line on stderr: redrawn in place on a terminal, one line per stage otherwise."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr  # looked up now, not at import
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.last = None

    def __call__(self, what: str, frac: float) -> None:
        line = f"export: {what:<28} {100 * frac:5.1f}%  {time.monotonic() - self.t0:6.1f}s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if frac >= 1.0 else ""))
            self.stream.flush()
        elif what != self.last:
            self.stream.write(line + "\n")
            self.stream.flush()
        self.last = what


def run(args: argparse.Namespace) -> int:
    from mamba_rt.checkpoint import parse_dtype

    from mamba_rt._optional import require

    dtype = parse_dtype(args.dtype)  # a bad dtype fails before torch is imported
    for module in ("torch", "onnx", "onnxscript"):
        require(module)  # a missing one: MissingDependencyError naming the 'export' extra
    from .export import export_package

    out = export_package(args.checkpoint, args.output, dtype=dtype, force=args.force,
                         all_logits=args.all_logits, progress=None if args.quiet else ExportProgress())
    print(out)
    return 0
