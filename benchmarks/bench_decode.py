"""Per-token decode latency of whole models on the GPU, beside the weight-read floor and Hugging Face
transformers, all measured in one run on one device (see benchmarks/NOTES.md, "Decode").

    python benchmarks/bench_decode.py [--configs 130m,370m,1.4b] [--dtype fp16] [--steps 200]
                                      [--out benchmarks/results/decode-<device>.json]

For each published Mamba-1 size (random weights: latency does not depend on their values):
  * floor: bytes of weights one decode step reads / measured device-to-device copy bandwidth;
  * mamba-rt torch backend (plugins_cuda kernels, decode step replayed as one CUDA graph), through the
    public Session API: wall time of ``Session.step`` per token at batch 1, host round trip included
    (the sampled token id comes back every step); median and p99 over ``--steps`` steps after warm-up;
  * Hugging Face transformers ``MambaForCausalLM.generate`` (greedy, its cache, whatever kernels it
    finds; without mamba_ssm/causal_conv1d it uses its PyTorch path): wall time / new tokens.
mamba_ssm itself is not installed on the lent GPU machine, so it is not in this table (issue 7).
Absolute times are only meaningful from a GPU; the script refuses to run without one.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mamba_rt.config import MambaConfig
from mamba_rt.inspect import decode_bytes

SIZES = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}


def published(name: str) -> MambaConfig:
    dm, nl = SIZES[name]
    return MambaConfig(d_model=dm, n_layer=nl, vocab_size=50277, pad_vocab_size_multiple=8)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy (median of 20)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n / statistics.median(times)


def bench_ours(model_cpu, steps: int, workdir: Path) -> dict:
    from mamba_rt.exporters.export import export_weights_only
    from mamba_rt.runtime import Session

    pkg = export_weights_only(model_cpu, workdir / "pkg", force=True)
    with Session.open(pkg, backend="torch", device="cuda", max_batch=1) as s:
        slot = s.alloc()
        prompt = torch.randint(0, model_cpu.config.vocab_size, (16,)).tolist()
        tok = s.prefill(slot, prompt)
        for _ in range(20):  # warm-up: kernel load, graph capture
            tok = s.step([slot], [tok])[0]
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tok = s.step([slot], [tok])[0]
            times.append((time.perf_counter() - t0) * 1e3)
        desc = s.describe()
    times.sort()
    return {"median_ms": statistics.median(times), "p99_ms": times[int(0.99 * (len(times) - 1))],
            "steps": steps, "backend": desc}


def bench_hf(config: MambaConfig, weights: dict, dtype: torch.dtype, new_tokens: int) -> dict:
    try:
        import transformers
    except ImportError as e:
        return {"error": f"transformers not importable: {e}"}
    hf_cfg = transformers.MambaConfig(
        vocab_size=config.padded_vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
        state_size=config.d_state, conv_kernel=config.d_conv, expand=config.expand,
        time_step_rank=config.dt_rank, intermediate_size=config.d_inner, use_bias=config.bias,
        use_conv_bias=config.conv_bias, residual_in_fp32=config.residual_in_fp32,
        layer_norm_epsilon=config.norm_epsilon, tie_word_embeddings=config.tie_embeddings)
    with torch.device("cuda"):
        hf = transformers.MambaForCausalLM(hf_cfg).to(dtype).eval()
    sd = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v for k, v in weights.items()}
    hf.load_state_dict(sd, strict=True)
    ids = torch.randint(0, config.vocab_size, (1, 16), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    del hf
    return {"ms_per_token": dt / n * 1e3, "new_tokens": n, "transformers": transformers.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="130m,370m,1.4b")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--hf-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode: no CUDA GPU; absolute times are only taken on a GPU", file=sys.stderr)
        return 2
    from mamba_rt.checkpoint import torch_dtype
    from mamba_rt.exporters.model import model_from_weights, random_weights

    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    rows = []
    for name in args.configs.split(","):
        cfg = published(name)
        weights = random_weights(cfg, args.dtype, seed=0)
        model = model_from_weights(cfg, weights, args.dtype, "cpu")
        floor = decode_bytes(cfg, args.dtype) / bw * 1e3
        with tempfile.TemporaryDirectory() as td:
            ours = bench_ours(model, args.steps, Path(td))
        hf = bench_hf(cfg, weights, torch_dtype(args.dtype), args.hf_tokens)
        del model, weights
        torch.cuda.empty_cache()
        row = {"config": name, "params": cfg.n_params(), "floor_ms": floor, "mamba_rt_torch": ours, "hf": hf,
               "ours_over_floor": ours["median_ms"] / floor}
        if "ms_per_token" in hf:
            row["hf_over_ours"] = hf["ms_per_token"] / ours["median_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": dev, "dtype": args.dtype, "batch": 1, "copy_bandwidth_TBps": bw / 1e12,
              "torch": torch.__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out = args.out or Path("benchmarks/results") / f"decode-{re.sub(r'[^a-z0-9]+', '-', dev.lower()).strip('-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{dev}, {args.dtype}, batch 1, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'model':>6} {'floor ms':>9} {'mamba-rt ms (p99)':>19} {'x floor':>8} {'HF ms':>8} {'HF / mamba-rt':>14}")
    for r in rows:
        o, h = r["mamba_rt_torch"], r["hf"]
        hf_ms = f"{h['ms_per_token']:.2f}" if "ms_per_token" in h else "n/a"
        ratio = f"{r['hf_over_ours']:.1f}x" if "hf_over_ours" in r else "n/a"
        print(f"{r['config']:>6} {r['floor_ms']:9.3f} {o['median_ms']:9.3f} ({o['p99_ms']:.3f}) "
              f"{r['ours_over_floor']:8.2f} {hf_ms:>8} {ratio:>14}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
