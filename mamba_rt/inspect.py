"""``mamba-rt inspect CKPT_DIR``: what a checkpoint is and what decoding it costs at best.

The decode floor is the time to read, once per generated token, every weight a decode step touches
(all parameters, the embedding table once as the output head; the embedding lookup reads a single
row) at the given memory bandwidth. The state read and written per sequence is reported separately.
"""
from __future__ import annotations

import json
import math
import re
import sys

from .checkpoint import DTYPES, is_fp32_param, open_checkpoint, parse_dtype
from .config import MambaConfig
from .errors import InputError

_ACT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def parse_bandwidth(text: str) -> float:
    """'3.0TB/s' | '3000 GB/s' | '3e12' -> bytes per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKMGT]?)(?:B/s|B|)\s*", text)
    if not m:
        raise InputError(f"--bandwidth {text!r}: expected a rate such as '3.0TB/s', '900GB/s' or '3e12'")
    scale = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)]
    value = float(m.group(1)) * scale
    if value <= 0:
        raise InputError(f"--bandwidth {text!r}: expected a positive rate")
    return value


def decode_bytes(config: MambaConfig, dtype: str) -> int:
    """Weight bytes one decode step reads (batch-independent)."""
    act = _ACT_BYTES[parse_dtype(dtype)]
    total = 0
    for name, shape in config.param_shapes().items():
        if name == "backbone.embedding.weight":
            total += shape[1] * act  # one row looked up (the head reads the table below)
            continue
        total += math.prod(shape) * (4 if is_fp32_param(name) else act)
    return total


def describe(path, dtype: str = "fp16", bandwidth: float = 3.0e12) -> dict:
    ckpt = open_checkpoint(path)
    c = ckpt.config
    dtype = parse_dtype(dtype)
    act = _ACT_BYTES[dtype]
    wbytes = decode_bytes(c, dtype)
    state = c.state_bytes_per_sequence(act)
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "weights": {"kind": ckpt.kind, "files": [f.name for f in ckpt.weight_files],
                    "stored_bytes_by_dtype": ckpt.bytes_by_dtype() if ckpt.kind == "safetensors" else None},
        "config": c.to_dict(),
        "derived": {"d_inner": c.d_inner, "dt_rank": c.dt_rank, "padded_vocab_size": c.padded_vocab_size},
        "parameters": c.n_params(),
        "dtype": dtype,
        "decode": {
            "weight_bytes_per_token": wbytes,
            "state_bytes_per_sequence": state,
            "bandwidth_bytes_per_s": bandwidth,
            "floor_ms_per_token": wbytes / bandwidth * 1e3,
            "state_read_write_ms_per_sequence": 2 * state / bandwidth * 1e3,
        },
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (mamba_ssm or Hugging Face format)")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="deployment dtype for the floor (default fp16)")
    p.add_argument("--bandwidth", default="3.0TB/s", help="memory bandwidth for the floor (default 3.0TB/s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    info = describe(args.checkpoint, args.dtype, parse_bandwidth(args.bandwidth))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c, d = info["config"], info["decode"]
    out = sys.stdout
    print(f"checkpoint   {info['path']}", file=out)
    print(f"format       {info['format']} ({info['weights']['kind']}: {', '.join(info['weights']['files'])})", file=out)
    print(f"model        Mamba-1, d_model {c['d_model']}, {c['n_layer']} layers, d_inner {c['d_inner']}, "
          f"d_state {c['d_state']}, d_conv {c['d_conv']}, dt_rank {c['dt_rank']}", file=out)
    print(f"vocabulary   {c['vocab_size']} (padded to {info['derived']['padded_vocab_size']}), "
          f"tied head: {c['tie_embeddings']}", file=out)
    print(f"parameters   {info['parameters']:,}", file=out)
    stored = info["weights"]["stored_bytes_by_dtype"]
    if stored:
        print("stored       " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(stored.items())), file=out)
    print(f"state        {_fmt_bytes(d['state_bytes_per_sequence'])} per sequence ({info['dtype']} conv, fp32 ssm)", file=out)
    print(f"decode floor {d['floor_ms_per_token']:.4f} ms/token at {d['bandwidth_bytes_per_s'] / 1e12:.3g} TB/s "
          f"({_fmt_bytes(d['weight_bytes_per_token'])} of {info['dtype']} weights read per step)", file=out)
    return 0
