"""Where the persistent layers kernel's time goes (a development tool for issue 8): one batch-1 step of
the torch backend's fused decode graph, fp16, random weights, compiled with ``MRT_LY_TRACE`` so that each
block records clock64 at the end of every phase of every layer (decode_step.cu, ``layers``).

    cd benchmarks && python trace_layers.py [--configs 1.4b,2.8b] [--ghz 1.98] [--knob NAME=VAL]
                                            [--out trace.json] [--raw DIR]

Per config: for each phase (waiting for out_proj's partial sums "sums_in", the norm, in_proj's x rows
with the conv "in_x", x_proj's share and the barrier's arrival "xproj", in_proj's z rows "in_z", the rest
of the wait at the barrier "barrier", the state update, waiting for y "y_in", out_proj; with
LY_XFIRST=0 "in_x" is all of in_proj and "in_z" empty) the median, 90th percentile and largest duration
in microseconds over blocks and layers (the first layer left out);
a layer's duration; the time consumer warp 0 waited for in_proj and out_proj stages; and when the
producer warp had issued the layer's in_proj and out_proj stages, after the end of its "sums_in". Times
are clock64 cycles at the given clock (the SM clock is not fixed here, so read them as shares). --raw
keeps every block's slots; the SMs' clocks are offset from each other by up to ~0.25 s (in groups), so to
compare blocks, align each on an event every block sees at once (the end of the barrier's wait, slot 6).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mamba_rt._gc import collector_paused
from mamba_rt.plugins_cuda import decode_step, launcher
from profile_decode import gpu_model, parse_knob

TRACE_LAYERS = 64  # .cu: layers recorded (LY_MARK)
TRACE_SLOTS = 32  # .cu: LY_AT
PHASES = ["sums_in", "norm", "in_x", "xproj", "in_z", "barrier", "ssm", "y_in", "out_proj"]  # slots 0-9


def trace(name: str, ghz: float, raw_out: str | None = None) -> dict:
    from mamba_rt.bench import bench_config
    from mamba_rt.runtime.fused_decode import FusedDecoder

    cfg = bench_config(name)
    model = gpu_model(cfg, "fp16")
    sh = cfg.state_shapes(2)
    conv = torch.zeros(sh["conv_state"], dtype=torch.float16, device="cuda")
    ssm = torch.zeros(sh["ssm_state"], dtype=torch.float32, device="cuda")
    dec = FusedDecoder(model, conv, ssm, "fp16")
    bk = dec.bucket(1)
    if bk.ly is None:
        raise SystemExit(f"{name}: the persistent layers kernel does not serve this model on this GPU")
    drv = launcher._driver()
    _, ptr, size = drv.cuModuleGetGlobal(dec.k.module, b"mrt_ly_trace")
    dec.enqueue(bk)
    graph = torch.cuda.CUDAGraph()
    with collector_paused(), torch.cuda.graph(graph):
        dec.enqueue(bk)
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    drv.cuMemsetD8(ptr, 0, size)
    graph.replay()
    torch.cuda.synchronize()
    words = np.zeros(size // 8, dtype=np.int64)
    drv.cuMemcpyDtoH(words.ctypes.data, ptr, size)
    L = min(cfg.n_layer, TRACE_LAYERS)
    t = words.reshape(-1, TRACE_LAYERS, TRACE_SLOTS)[:bk.ly.grid, :L].astype(np.float64) / (ghz * 1e3)  # us
    if raw_out:
        np.save(raw_out, t)

    def stats(x):
        return [round(float(np.median(x)), 2), round(float(np.percentile(x, 90)), 2), round(float(x.max()), 2)]

    out = {p: stats(t[:, 1:, i + 1] - t[:, 1:, i]) for i, p in enumerate(PHASES)}
    out["layer"] = stats(t[:, 1:, 0] - t[:, :-1, 0])
    out["wait_in"], out["wait_out"] = stats(t[:, 1:, 10]), stats(t[:, 1:, 11])
    out["producer_in_issued_after_sums_in"] = stats(t[:, 1:, 12] - t[:, 1:, 1])
    out["producer_out_issued_after_sums_in"] = stats(t[:, 1:, 13] - t[:, 1:, 1])
    out["arrival_after_xproj"] = stats(t[:, 1:, 14] - t[:, 1:, 4])
    # warp 0 (and warp 1) inside in_proj / out_proj: loading + multiplying stages, the reductions across
    # warps (their barrier's wait included), in_proj's epilogue (conv update, z)
    for k, i in (("w0_in_mma", 16), ("w0_out_mma", 17), ("w0_in_reduce", 18), ("w0_in_epilogue", 19),
                 ("w0_out_reduce", 20), ("w1_wait_in", 22), ("w1_wait_out", 23), ("w1_in_reduce", 24),
                 ("w1_out_reduce", 25), ("w0_head_wait", 15), ("w0_head_reduce", 28), ("w1_head_reduce", 29)):
        out[k] = stats(t[:, 1:, i])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="1.4b,2.8b")
    ap.add_argument("--ghz", type=float, default=1.98)
    ap.add_argument("--knob", action="append", default=[], help="NAME=VAL: a launch constant of decode_step "
                    "(e.g. LY_STAGES=4,8), set before the decoder is made; repeatable")
    ap.add_argument("--define", action="append", default=[], help="NAME=VAL: a preprocessor define of the "
                    "kernels (e.g. MRT_LY_NOSYNC=1: no waits on other blocks, wrong results); repeatable")
    ap.add_argument("--out", default=None)
    ap.add_argument("--raw", default=None, help="DIR: also save each config's slots as recorded "
                    "(blocks x layers x slots, us at --ghz; each SM's own clock) as DIR/NAME.npy")
    args = ap.parse_args()
    for d in args.knob:
        setattr(decode_step, *parse_knob(ap, d))
    for d in args.define:
        name, _, val = d.partition("=")
        decode_step.DEFINES[name] = val
    decode_step.DEFINES["MRT_LY_TRACE"] = 132 * TRACE_LAYERS * TRACE_SLOTS  # blocks (one per SM) x layers x slots
    res = {}
    for name in args.configs.split(","):
        res[name] = trace(name, args.ghz, args.raw and f"{args.raw}/{name}.npy")
        print(name)
        for k, v in res[name].items():
            print(f"  {k:30s} " + " ".join(f"{x:7.2f}" for x in v))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
