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
  * with ``--mamba-ssm SRC`` (a checkout of state-spaces/mamba; never committed here): mamba_ssm's own
    CUDA-graph decode, ``MambaLMHeadModel.generate(cg=True)``, as it imports on the machine. Without its
    CUDA extension (``selective_scan_cuda``) its decode still runs (Triton state update, torch conv);
    only its prefill needs the extension, so the harness routes that prefill through mamba_ssm's own
    ``selective_scan_ref``. Per token = (generate time - prefill time) / decode steps, the graph
    captured by an identical warm-up call first.
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


def bench_mamba_ssm(config: MambaConfig, weights: dict, dtype: torch.dtype, new_tokens: int, src: str) -> dict:
    sys.path.insert(0, src)
    try:
        import mamba_ssm
        import mamba_ssm.modules.mamba_simple as simple
        import mamba_ssm.ops.selective_scan_interface as ssi
        from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        from mamba_ssm.utils.generation import InferenceParams
    except Exception as e:  # noqa: BLE001 -- report, do not fail the other rows
        return {"error": f"mamba_ssm from {src} does not import: {type(e).__name__}: {e}"}
    variant = {"selective_scan_cuda": ssi.selective_scan_cuda is not None,
               "causal_conv1d": simple.causal_conv1d_update is not None,
               "triton_state_update": simple.selective_state_update is not None}
    if ssi.selective_scan_cuda is None:
        simple.selective_scan_fn = ssi.selective_scan_ref  # prefill only; decode takes the step path
    mc = SsmConfig(d_model=config.d_model, n_layer=config.n_layer, vocab_size=config.vocab_size,
                   ssm_cfg={"layer": "Mamba1", "d_state": config.d_state, "d_conv": config.d_conv,
                            "expand": config.expand},
                   rms_norm=True, residual_in_fp32=config.residual_in_fp32, fused_add_norm=True,
                   pad_vocab_size_multiple=config.pad_vocab_size_multiple, tie_embeddings=config.tie_embeddings)
    model = MambaLMHeadModel(mc, device="cuda", dtype=dtype).eval()
    model.load_state_dict({k: v.to("cuda") for k, v in weights.items()}, strict=True)
    prompt = 16
    ids = torch.randint(0, config.vocab_size, (1, prompt), device="cuda")
    kw = dict(max_length=prompt + new_tokens, cg=True, top_k=1, return_dict_in_generate=False)
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up: Triton compilation, graph capture
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(3):
            model(ids, inference_params=InferenceParams(max_seqlen=prompt + new_tokens, max_batch_size=1))
        torch.cuda.synchronize()
        prefill = (time.perf_counter() - t0) / 3
    steps = out.shape[1] - prompt - 1  # the first new token comes from the prefill's logits
    del model
    return {"ms_per_token": (total - prefill) / steps * 1e3, "decode_steps": steps, "prefill_ms": prefill * 1e3,
            "version": mamba_ssm.__version__, "kernels": variant}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="130m,370m,1.4b")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--hf-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--mamba-ssm", default=None, metavar="SRC", help="a state-spaces/mamba checkout to compare with")
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
               "mamba_ssm": {"error": "not measured (no --mamba-ssm)"}, "ours_over_floor": ours["median_ms"] / floor}
        if "ms_per_token" in hf:
            row["hf_over_ours"] = hf["ms_per_token"] / ours["median_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    # mamba_ssm last: once it is importable, transformers' kernel lookup would route HF's Mamba through
    # it too, which is not the baseline the HF rows describe
    for row in rows if args.mamba_ssm else []:
        cfg = published(row["config"])
        ssm = bench_mamba_ssm(cfg, random_weights(cfg, args.dtype, seed=0), torch_dtype(args.dtype), args.steps,
                              args.mamba_ssm)
        torch.cuda.empty_cache()
        row["mamba_ssm"] = ssm
        if "ms_per_token" in ssm:
            row["mamba_ssm_over_ours"] = ssm["ms_per_token"] / row["mamba_rt_torch"]["median_ms"]
        print(json.dumps({"config": row["config"], "mamba_ssm": ssm}), flush=True)
    result = {"device": dev, "dtype": args.dtype, "batch": 1, "copy_bandwidth_TBps": bw / 1e12,
              "torch": torch.__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out = args.out or Path("benchmarks/results") / f"decode-{re.sub(r'[^a-z0-9]+', '-', dev.lower()).strip('-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{dev}, {args.dtype}, batch 1, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'model':>6} {'floor ms':>9} {'mamba-rt ms (p99)':>19} {'x floor':>8} {'mamba_ssm ms':>13} "
          f"{'ssm / rt':>9} {'HF ms':>8} {'HF / rt':>8}")

    def ms(d):
        return f"{d['ms_per_token']:.3f}" if "ms_per_token" in d else "n/a"

    def ratio(r, k):
        return f"{r[k]:.2f}x" if k in r else "n/a"

    for r in rows:
        o = r["mamba_rt_torch"]
        print(f"{r['config']:>6} {r['floor_ms']:9.3f} {o['median_ms']:9.3f} ({o['p99_ms']:.3f}) "
              f"{r['ours_over_floor']:8.2f} {ms(r['mamba_ssm']):>13} {ratio(r, 'mamba_ssm_over_ours'):>9} "
              f"{ms(r['hf']):>8} {ratio(r, 'hf_over_ours'):>8}")
        for k in ("mamba_ssm", "hf"):
            if "error" in r[k]:
                print(f"       {k}: {r[k]['error']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
