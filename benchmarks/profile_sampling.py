"""What sampled decoding costs against greedy, on the GPU (a development tool for issue 8; benchmarks/
NOTES.md, item 37).

    python benchmarks/profile_sampling.py [--configs 130m,2.8b] [--batches 1,8]
    python benchmarks/profile_sampling.py --draw [--batches 1,8,64]

Default: per model (random weights, fp16) and batch, 50 steps of ``Session.decode`` (queued ahead where
the sampler allows) and 50 ``step()`` calls ("/step") with each of SETTINGS, in turn for 3 timed
rounds after one; wall ms per step, medians. Also ``sample_torch`` called eagerly on random logits
(GPU ms per call, CUDA events), and (batch 1) the time to the first token of a prompt of PROMPT tokens
with each setting (``Session.prefill`` into a reset slot, wall ms, median of 10 after 2).

``--draw``: the draw alone on logits of vocabulary 50,280 (random, and shaped like a language model's:
``LOGITS``), as CUDA-graph replays (µs per replay): the draw kernel with each sampled setting,
``draw_torch`` with and without its sort, and the torch operations it is made of.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from profile_decode import replay_ms

from mamba_rt.runtime.sampling import SamplingParams

SETTINGS = {
    "greedy": None,
    "t0.8": SamplingParams(temperature=0.8, seed=1),
    "t0.8_k50": SamplingParams(temperature=0.8, top_k=50, seed=1),
    "t0.8_p0.95": SamplingParams(temperature=0.8, top_p=0.95, seed=1),
    "t0.8_k50_p0.95": SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=1),
    "rp1.2_greedy": SamplingParams(repetition_penalty=1.2),
    "rp1.2_t0.8_k50_p0.95": SamplingParams(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=1),
}
VOCAB = 50280
PROMPT = 512


def _zipf(B: int) -> "torch.Tensor":
    """Logits shaped like a language model's: probability ~ rank^-1.1 over a shuffled vocabulary
    (temperature 0.8 makes it rank^-1.375), with a little noise."""
    rank = torch.argsort(torch.rand(B, VOCAB, device="cuda"), dim=-1).float() + 1
    return -1.1 * torch.log(rank) + 0.1 * torch.randn(B, VOCAB, device="cuda")


# --draw: random logits (N(0, 9): a flat-ish head, most of the vocabulary inside top-p 0.95's cut) and
# language-model-like ones
LOGITS = {"randn3": lambda B: torch.randn(B, VOCAB, device="cuda") * 3, "zipf": _zipf}


def session_rows(name: str, batches, steps=50, rounds=3) -> None:
    from mamba_rt.bench import config_package
    from mamba_rt.runtime import Session
    from mamba_rt.runtime.backend_torch import sample_torch

    with Session.open(config_package(name, "fp16", graphs=False), backend="torch", device="cuda",
                      max_batch=max(batches)) as s:
        for B in batches:
            slots = s.alloc(B)
            toks = np.zeros(B, np.int64)
            res: dict[str, list] = {}
            for r in range(rounds + 1):  # round 0: graphs captured, not timed
                for k, p in SETTINGS.items():
                    t0 = time.perf_counter()
                    toks = s.decode(slots, steps, toks, sampling=p)[-1]
                    t1 = time.perf_counter()
                    for _ in range(steps):
                        toks = s.step(slots, toks, p)
                    t2 = time.perf_counter()
                    if r:
                        res.setdefault(k, []).append((t1 - t0) * 1e3 / steps)
                        res.setdefault(k + "/step", []).append((t2 - t1) * 1e3 / steps)
            ttft = {}
            if B == 1:
                prompt = np.random.default_rng(0).integers(0, s.vocab, PROMPT)
                for k, p in SETTINGS.items():
                    times = []
                    for i in range(12):
                        s.reset(slots[0])
                        t0 = time.perf_counter()
                        s.prefill(slots[0], prompt, p)
                        times.append(time.perf_counter() - t0)
                    ttft[k] = round(statistics.median(times[2:]) * 1e3, 4)
            for x in slots:
                s.free(x)
            logits = torch.randn(B, s.vocab, device="cuda")
            u = np.random.default_rng(0).random(B)
            eager = {}
            for k, p in SETTINGS.items():
                if p is None or p.repetition_penalty != 1.0:
                    continue
                for _ in range(3):
                    sample_torch(logits, None, p, u)
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                e0.record()
                for _ in range(steps):
                    sample_torch(logits, None, p, u)
                e1.record()
                torch.cuda.synchronize()
                eager[k] = round(e0.elapsed_time(e1) / steps, 4)
            print(json.dumps({"config": name, "batch": B,
                              "ms_per_step": {k: round(statistics.median(v), 4) for k, v in res.items()},
                              f"ttft_ms_{PROMPT}": ttft,
                              "sample_torch_eager_ms": eager}), flush=True)


def draw_rows(batches) -> None:
    from mamba_rt.config import MambaConfig
    from mamba_rt.exporters.model import REF_OPS, model_from_weights, random_weights
    from mamba_rt.runtime.backend_torch import _capture, draw_torch, sample_knobs
    from mamba_rt.runtime.fused_decode import FusedDecoder

    def us(fn):
        graph, _ = _capture(fn, torch.device("cuda"), None, 2)
        return round(replay_ms(graph) * 1e3, 1)

    # a one-layer model: the decoder's draw kernel needs only its vocabulary
    cfg = MambaConfig(d_model=160, n_layer=1, vocab_size=VOCAB, d_state=16, d_conv=4, pad_vocab_size_multiple=1)
    model = model_from_weights(cfg, random_weights(cfg, "fp16", seed=0), "fp16", "cuda", REF_OPS)
    sh = cfg.state_shapes(max(batches) + 1)
    dec = FusedDecoder(model, torch.zeros(sh["conv_state"], dtype=model.dtype, device="cuda"),
                       torch.zeros(sh["ssm_state"], device="cuda"), "fp16")
    for B, kind in ((B, kind) for B in batches for kind in LOGITS):
        x = LOGITS[kind](B)
        xd = x.double()
        knobs = {k: torch.from_numpy(sample_knobs(p, np.full(B, 0.5), VOCAB)).cuda()
                 for k, p in SETTINGS.items() if p is not None and not p.greedy}
        draw, out = dec.draw_fn(B), torch.empty(B, dtype=torch.int64, device="cuda")
        row = {"batch": B, "logits": kind}
        for k, kn in knobs.items():
            row["kernel_" + k] = us(lambda kn=kn: draw(x, kn, out))
        kn = knobs["t0.8_k50_p0.95"]
        row["draw_torch_sort"] = us(lambda: draw_torch(x, kn, True))
        row["draw_torch_nosort"] = us(lambda: draw_torch(x, kn, False))
        row["sort_f64"] = us(lambda: torch.sort(xd, dim=-1, descending=True))
        row["sort_f32"] = us(lambda: torch.sort(x, dim=-1, descending=True))
        row["topk50"] = us(lambda: torch.topk(x, 50, dim=-1))
        row["cumsum_f64"] = us(lambda: torch.cumsum(xd, -1))
        row["exp_f64"] = us(lambda: torch.exp(xd))
        row["argmax"] = us(lambda: x.argmax(-1))
        print(json.dumps(row), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="130m,2.8b")
    ap.add_argument("--batches", default=None, help="default 1,8 (1,8,64 with --draw)")
    ap.add_argument("--draw", action="store_true", help="the draw alone (CUDA-graph replays)")
    args = ap.parse_args()
    batches = [int(b) for b in (args.batches or ("1,8,64" if args.draw else "1,8")).split(",")]
    if args.draw:
        draw_rows(batches)
    else:
        for name in args.configs.split(","):
            session_rows(name, batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
