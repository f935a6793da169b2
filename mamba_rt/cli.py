"""The ``mamba-rt`` command line.

Each subcommand lives in the package that owns the job and exposes ``add_arguments(parser)`` and
``run(args) -> int``; those modules import nothing heavy at import time. A user error
(:class:`~mamba_rt.errors.MambaRTError`) prints one line ``mamba-rt: error: ...`` and exits 2; a
traceback is printed only with ``--debug`` (or MAMBA_RT_DEBUG=1). Anything else is a bug: exit 1
with the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from . import __version__, env
from .errors import MambaRTError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("mamba_rt.inspect", "describe a checkpoint: format, config, parameters, state, decode floor"),
    "export": ("mamba_rt.exporters.cli", "export a checkpoint to a model package (ONNX graphs + manifest)"),
    "build": ("mamba_rt.exporters.build_cli", "build TensorRT / TensorRT-RTX engines inside a model package"),
    "generate": ("mamba_rt.runtime.cli", "generate text from a model package"),
    "bench": ("mamba_rt.bench", "decode latency, prefill speed, memory and the weight-read floor of a model"),
    "demo": ("mamba_rt.demo", "export the embedded demo model and complete a prompt (the one-command tour)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mamba-rt", description="Compiled deployment runtime for Mamba models.")
    parser.add_argument("--version", action="version", version=f"mamba-rt {__version__}")
    parser.add_argument("--debug", action="store_true", help="print tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue  # a subcommand whose module is not part of this install
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print tracebacks for errors")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False)) or env.debug()
    try:
        return int(args._run(args) or 0)
    except MambaRTError as e:
        if debug:
            traceback.print_exc()
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"mamba-rt: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mamba-rt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
