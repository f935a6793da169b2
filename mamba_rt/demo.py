"""``mamba-rt demo``: the one-command tour: checkpoint -> export -> runtime -> streamed text.

Until the trained demo model ships (issue 9), the checkpoint is a small byte-level Mamba-1 with random
weights that this command writes itself (seeded, so every machine gets the same model): its text is
gibberish, but every stage is the real one — the checkpoint loader, the exporter, the runtime with the
best backend on the machine. Everything is kept under ``$MAMBA_RT_CACHE_DIR/demo`` and reused.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from . import env
from .config import MambaConfig

DEMO_CONFIG = MambaConfig(d_model=128, n_layer=4, vocab_size=256, d_state=16, d_conv=4, expand=2,
                          pad_vocab_size_multiple=8)
DEMO_SEED = 0
DEFAULT_PROMPT = "def fibonacci(n):\n"


def demo_checkpoint(root: Path) -> Path:
    """Write (once) the demo checkpoint in mamba_ssm format and return its directory."""
    from .checkpoint import save_checkpoint
    from .exporters.model import random_weights

    ckpt = root / "checkpoint"
    if not (ckpt / "config.json").is_file():
        tmp = root / "checkpoint.tmp"
        save_checkpoint(DEMO_CONFIG, random_weights(DEMO_CONFIG, "fp32", seed=DEMO_SEED), tmp, fmt="mamba_ssm")
        tmp.replace(ckpt)
    return ckpt


def _default_device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_arguments(p) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to complete")
    p.add_argument("--max-new-tokens", type=int, default=64)
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
    print(f"[1/3] demo checkpoint: {DEMO_CONFIG.n_params():,} parameters, byte-level, random weights "
          f"(the trained demo model is not shipped yet)", file=sys.stderr)
    ckpt = demo_checkpoint(root)
    pkg = root / "package-fp32"
    if args.force or not (pkg / "manifest.json").is_file():
        print(f"[2/3] exporting {ckpt} -> {pkg}", file=sys.stderr)
        export_package(ckpt, pkg, dtype="fp32", force=True, progress=ExportProgress())
    else:
        print(f"[2/3] reusing the exported package {pkg} (--force re-exports)", file=sys.stderr)
    device = args.device or _default_device()
    with Session.open(pkg, backend=args.backend, device=device, max_batch=1) as s:
        print(f"[3/3] generating with {s.describe()}", file=sys.stderr)
        sys.stdout.write(args.prompt)
        t0 = time.perf_counter()
        n = 0
        for tok in s.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                              sampling=SamplingParams(temperature=0.8, top_k=40, seed=0)):
            sys.stdout.write(tok.text)
            sys.stdout.flush()
            n += 1
        dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"{n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s, prefill included)", file=sys.stderr)
    return 0
