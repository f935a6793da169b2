"""``mamba-rt demo``: the one-command tour: shipped checkpoint -> export -> runtime -> streamed text.

The checkpoint is the trained demo model that ships inside the package (``mamba_rt/demo_model/``: a
byte-level Mamba-1 of 5.9 M parameters trained on the Python standard library's source; data, numbers and
how to retrain are in its MODEL_CARD.md). Every stage is the real one — the checkpoint loader, the
exporter, the runtime with the best backend on the machine. The package is kept under
``$MAMBA_RT_CACHE_DIR/demo`` and reused while it was exported from the same shipped weights.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from . import env
from ._optional import default_device
from .errors import CheckpointError

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
COPYING_MODEL_DIR = DEMO_MODEL_DIR / "selective_copying"
DEFAULT_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
PACKAGE = "package-fp32"


def demo_checkpoint() -> Path:
    """The shipped demo checkpoint (mamba_ssm format), read where it is installed."""
    if not (DEMO_MODEL_DIR / "config.json").is_file() or not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise CheckpointError(f"the shipped demo model is missing from {DEMO_MODEL_DIR} (expected config.json and "
                           "model.safetensors: was mamba-rt installed without its package data?)")
    return DEMO_MODEL_DIR


def weights_digest(ckpt: Path) -> str:
    """SHA-256 of the checkpoint's weights file: the stamp that ties an exported package to them."""
    h = hashlib.sha256()
    with open(ckpt / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _model_summary(ckpt: Path) -> str:
    from .config import load_config

    cfg = load_config(ckpt)
    log = ckpt / "train_log.json"
    held = ""
    if log.is_file():
        held = f", held-out {json.loads(log.read_text())['heldout_bits_per_byte']:.2f} bits/byte"
    return (f"{cfg.n_params():,} parameters, byte-level, trained on the Python standard library{held} "
            f"({ckpt / 'MODEL_CARD.md'})")


def add_arguments(p) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to complete")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--backend", default="auto", help="auto | onnxruntime | torch | tensorrt")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dir", default=None, help="working directory (default $MAMBA_RT_CACHE_DIR/demo)")
    p.add_argument("--force", action="store_true", help="re-export even if the package exists")


def run(args) -> int:
    from .exporters.cli import ExportProgress
    from .exporters.export import export_package
    from .runtime import SamplingParams, Session

    root = Path(args.dir) if args.dir else env.cache_dir() / "demo"
    root.mkdir(parents=True, exist_ok=True)
    ckpt = demo_checkpoint()
    print(f"[1/3] demo model: {_model_summary(ckpt)}", file=sys.stderr)
    pkg = root / PACKAGE
    stamp = root / f"{PACKAGE}.source"
    digest = weights_digest(ckpt)
    current = (pkg / "manifest.json").is_file() and stamp.is_file() and stamp.read_text().strip() == digest
    if args.force or not current:
        why = "" if args.force or not (pkg / "manifest.json").is_file() else " (its weights changed)"
        print(f"[2/3] exporting {ckpt} -> {pkg}{why}", file=sys.stderr)
        stamp.unlink(missing_ok=True)
        export_package(ckpt, pkg, dtype="fp32", force=True, progress=ExportProgress())
        stamp.write_text(digest + "\n")
    else:
        print(f"[2/3] reusing the exported package {pkg} (--force re-exports)", file=sys.stderr)
    device = args.device or default_device()
    with Session.open(pkg, backend=args.backend, device=device, max_batch=1) as s:
        print(f"[3/3] generating with {s.describe()}", file=sys.stderr)
        sys.stdout.write(args.prompt)
        t0 = time.perf_counter()
        n = 0
        for tok in s.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                              sampling=SamplingParams(temperature=0.7, top_k=40, seed=0)):
            sys.stdout.write(tok.text)
            sys.stdout.flush()
            n += 1
        dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"{n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s, prefill included)", file=sys.stderr)
    return 0
