"""Where a decode step's time goes: the fused decode step of the torch backend at the published sizes,
on the GPU (a development tool for issue 8; the user-facing numbers come from ``mamba-rt bench`` and
``benchmarks/run_suite.py``).

    python benchmarks/profile_decode.py [--configs 130m,1.4b,2.8b] [--dtype fp16] [--batches 1,64]
                                        [--kernels] [--gemv fma|mma|bulk] [--knob NAME=VAL] [--out FILE.json]
                                        [--ab NAME=VAL1/VAL2[/...] [--ab-rounds 8] [--ab-ahead]] [--session]
                                        [--leave-out]

Per (config, batch): the step's graph replayed back to back (GPU time per step, CUDA events, median
of 5 x 100 replays), the same step with the host round trip a token costs (ids in, argmax ids out,
wait), steps queued one ahead as ``Session.decode`` runs them (each fed the ids the step before left
on the device, queued before the host reads those; wall time per step), the weight-read floor (and the
floor with the state read and written, for batch > 1) at the copy bandwidth measured in the same run,
and with ``--kernels`` the per-kernel GPU time from the torch profiler (one replay). Weights are
random (time does not depend on their values).

``--ab NAME=V1/V2``: an A/B comparison in one process: per (config, batch) one graph per value of the
launch constant NAME (set before the graph's bucket is made), replayed in turn for ``--ab-rounds``
rounds of 100; a row per value with the median of its rounds (and its spread). With ``--ab-ahead`` the
graphs timed are those of a step queued ahead (``Session.decode``'s: ids read where the step before left
them) instead of the step graphs that copy their ids in.

``--leave-out`` (GEMM-path buckets, > 2 rows): what each kind of kernel adds to the step: graphs of the step
with that kind left out of every layer ("-in_proj", ...), with only it kept ("=in_proj"), and whole, replayed
in turn for ``--ab-rounds`` rounds; GPU µs per layer. The steps left out of make wrong tokens; their times are
the point (benchmarks/NOTES.md, item 89).

``--session``: instead, through ``Session`` (a package of random weights): 100 greedy steps as
``step()`` calls, each waiting for its tokens, and as one ``decode()``, which queues each step before
reading the one before, in turn for 6 rounds; wall ms per step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

def gpu_model(cfg, dtype):
    """The reference model with random weights (``random_weights``: latency does not depend on their
    values), on the GPU."""
    from mamba_rt.exporters.model import model_from_weights, random_weights

    return model_from_weights(cfg, random_weights(cfg, dtype, seed=0), dtype, "cuda")


def parse_knob(ap, d: str, opt: str = "--knob"):
    """(name, value) of a launch constant of decode_step given as NAME=VAL (VAL an int, or ints joined by
    commas for a tuple); an unknown NAME is the parser's error."""
    from mamba_rt.plugins_cuda import decode_step

    name, _, val = d.partition("=")
    if not hasattr(decode_step, name):
        ap.error(f"{opt} {d!r}: decode_step has no constant {name!r}")
    vals = tuple(int(v) for v in val.split(","))
    return name, vals if "," in val else vals[0]


def kernel_times(graph, key=lambda name: name.split("(")[0][:60]) -> dict:
    """{key(kernel name): [GPU µs of each launch]} of one replay of ``graph`` (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    per = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            per.setdefault(key(ev.name), []).append(ev.device_time if hasattr(ev, "device_time") else ev.cuda_time)
    return per


def replay_ms(graph, reps=100, rounds=5):
    out = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            graph.replay()
        e.record(); e.synchronize()
        out.append(s.elapsed_time(e) / reps)
    return statistics.median(out)


def captured(record):
    """A CUDA graph of what ``record(stream)`` launches (the runtime's capture: the garbage collector paused,
    item 77), replayed once."""
    from mamba_rt.runtime.backend_torch import _capture

    graph, _ = _capture(lambda: record(torch.cuda.current_stream().cuda_stream), torch.cuda.current_device(), None, 0)
    graph.replay()
    torch.cuda.synchronize()
    return graph


def dump_rows(path, args, rows) -> None:
    """A development tool's measurements as JSON at ``path`` (if given): the device, its arguments, its rows."""
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows}, f, indent=2)


def warmed(g, B: int):
    """Graph ``g`` of bucket B after 20 steps of slots 0..B-1 (each fed its last ids): (slots, ids)."""
    slots, ids = np.arange(B, dtype=np.int64), np.zeros((B, 1), np.int64)
    for _ in range(20):
        ids[:, 0] = g.run(slots, ids).greedy()
    return slots, ids


def ab_rows(ab, dec, state, B, config, decode_step, rounds, ahead=False) -> list:
    """One graph per (constant, value) of ``ab`` for bucket B, replayed in turn; a row per value. ahead:
    the graph of a step queued ahead (what ``Session.decode`` replays: its ids those the step before left
    on the device) instead of the step graph that copies its ids in."""
    from mamba_rt.runtime.backend_torch import _FusedGraph

    graphs = []
    for name, val in ab:
        old = getattr(decode_step, name)
        setattr(decode_step, name, val)
        try:
            graphs.append(_FusedGraph(dec, state, B, torch.cuda.graph_pool_handle()))
        finally:
            setattr(decode_step, name, old)
    for g in graphs:
        slots, ids = warmed(g, B)
        if ahead:  # captured at the first run_next
            g.run_next(slots, g.run(slots, ids)).greedy()
    times = [[] for _ in graphs]
    for _ in range(rounds):
        for g, t in zip(graphs, times):
            t.append(replay_ms(g._next[0][0] if ahead else g.graph, rounds=1))
    rows = []
    for (name, val), t in zip(ab, times):
        row = {"config": config, "batch": B, "ab": f"{name}={val}", "ahead": ahead, "gpu_ms": statistics.median(t),
               "gpu_ms_min": min(t), "gpu_ms_max": max(t), "rounds": rounds}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def layer_roles(launches: list, n_layer: int) -> list | None:
    """The kind of each launch between the embedding and the head of a GEMM-path step (the same sequence in every
    layer): the kernel's name, or for the projections (proj_wg, or a cuBLAS call) in_proj, x_proj, dt_proj and out_proj
    by their order in the layer; None where the launches are not n_layer equal sequences."""
    body = launches[1:-1]
    per = len(body) // n_layer
    if per * n_layer != len(body) or per == 0:
        return None
    names = [ln.name if not callable(ln) and ln.name != "proj_wg" else "proj" for ln in body[:per]]
    projs = [i for i, nm in enumerate(names) if nm == "proj"]
    kinds = ["in_proj", *["x_proj", "dt_proj"][: len(projs) - 2], "out_proj"] if len(projs) >= 2 else []
    for i, kind in zip(projs, kinds):
        names[i] = kind
    return names * n_layer


def leave_out_rows(dec, state, B: int, config: str, n_layer: int, rounds: int) -> list:
    """``--leave-out``: graphs of bucket B's step with each kind of kernel left out of every layer, with only that kind
    kept, and whole (each replayed in turn, ``rounds`` rounds of 100); a row per graph, GPU µs per layer."""
    from mamba_rt.runtime.backend_torch import _FusedGraph

    g = _FusedGraph(dec, state, B, torch.cuda.graph_pool_handle())
    warmed(g, B)  # the bucket's ids and slots as a step left them
    launches = g.bk.launches
    roles = layer_roles(launches, n_layer)
    if g.bk.gemv or roles is None:
        print(f"--leave-out: {config} batch {B} is not a GEMM-path step of equal layers; skipped", flush=True)
        return []

    def record(keep):
        def run(stream):
            for i, ln in enumerate(launches):
                if 0 < i < len(launches) - 1 and roles[i - 1] not in keep:
                    continue
                ln() if callable(ln) else dec.k.launch(ln, stream)
        return run

    kinds = list(dict.fromkeys(roles))
    variants = {"whole": set(kinds), **{f"-{k}": set(kinds) - {k} for k in kinds}, **{f"={k}": {k} for k in kinds},
                "=none": set()}
    with torch.no_grad():
        graphs = {v: captured(record(keep)) for v, keep in variants.items()}
    times = {v: [] for v in graphs}
    for _ in range(rounds):
        for v, gr in graphs.items():
            times[v].append(replay_ms(gr, rounds=1))
    whole = statistics.median(times["whole"])
    rows = []
    for v, t in times.items():
        m = statistics.median(t)
        row = {"config": config, "batch": B, "graph": v, "gpu_ms": m, "us_per_layer": m * 1e3 / n_layer,
               "step_less_us_per_layer": (whole - m) * 1e3 / n_layer, "spread_ms": [min(t), max(t)]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def session_rows(name, dtype, batches, rounds=6, steps=100) -> list:
    """Session level, one process: ``steps`` greedy steps of B slots as ``step()`` calls (each waits
    for its tokens) and as one ``decode()`` (steps queued ahead), in turn for ``rounds`` rounds; wall
    ms per step, the median of the rounds."""
    from mamba_rt.bench import config_package
    from mamba_rt.runtime import Session

    rows = []
    with Session.open(config_package(name, dtype, graphs=False), backend="torch", device="cuda",
                      max_batch=max(batches)) as s:
        for B in batches:
            slots = s.alloc(B)
            toks = np.zeros(B, np.int64)
            times = {"wait": [], "ahead": []}
            for r in range(rounds + 1):  # round 0: graphs captured, not timed
                t0 = time.perf_counter()
                for _ in range(steps):
                    toks = s.step(slots, toks)
                t1 = time.perf_counter()
                toks = s.decode(slots, steps, toks)[-1]
                t2 = time.perf_counter()
                if r:
                    times["wait"].append((t1 - t0) * 1e3 / steps)
                    times["ahead"].append((t2 - t1) * 1e3 / steps)
            for x in slots:
                s.free(x)
            row = {"config": name, "batch": B, "session": True, "rounds": rounds,
                   **{f"{k}_ms": statistics.median(v) for k, v in times.items()},
                   **{f"{k}_ms_spread": [min(v), max(v)] for k, v in times.items()}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="130m,1.4b,2.8b")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--no-pdl", action="store_true")
    ap.add_argument("--gemv", choices=("fma", "mma", "bulk"), default=None,
                    help="GEMV kind: FMA loop, tensor cores fed by loads or by the copy engine (default: fastest)")
    ap.add_argument("--mma-blocks", type=int, default=None, help="tensor-core GEMV blocks per SM (0: occupancy)")
    ap.add_argument("--define", action="append", default=[], help="NAME=VALUE: a tuning macro of decode_step.cu")
    ap.add_argument("--knob", action="append", default=[],
                    help="NAME=VALUE: a launch constant of decode_step.py (ints, or comma-separated for tuples)")
    ap.add_argument("--ab", default=None, help="NAME=V1/V2[/...]: graphs of each value of a launch constant, "
                                               "replayed in turn (ints, or comma-separated for tuples)")
    ap.add_argument("--ab-rounds", type=int, default=8)
    ap.add_argument("--ab-ahead", action="store_true",
                    help="--ab times the graph of a step queued ahead (as Session.decode replays it)")
    ap.add_argument("--leave-out", action="store_true",
                    help="GEMM-path buckets: graphs with each kind of kernel left out of every layer, or kept alone")
    ap.add_argument("--session", action="store_true",
                    help="only Session.step at a time against Session.decode (steps queued ahead), per batch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from mamba_rt.bench import bench_config, copy_bandwidth, state_bytes
    from mamba_rt.inspect import decode_bytes
    from mamba_rt.runtime.backend_torch import _FusedGraph
    from mamba_rt.runtime.fused_decode import FusedDecoder

    from mamba_rt.plugins_cuda import decode_step
    if args.mma_blocks is not None:
        decode_step.MMA_BLOCKS_PER_SM = args.mma_blocks

    for d in args.knob:
        setattr(decode_step, *parse_knob(ap, d))
    ab = None
    if args.ab:
        name, _, vals = args.ab.partition("=")
        ab = [parse_knob(ap, f"{name}={v}", "--ab") for v in vals.split("/")]
    for d in args.define:
        name, _, val = d.partition("=")
        decode_step.DEFINES[name] = int(val)
    bw, _ = copy_bandwidth("cuda")
    dev = torch.cuda.get_device_name()
    print(f"{dev}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    for name in args.configs.split(","):
        if args.session:
            rows += session_rows(name, args.dtype, batches)
            continue
        cfg = bench_config(name)
        model = gpu_model(cfg, args.dtype)
        wb = decode_bytes(cfg, args.dtype)
        sh = cfg.state_shapes(max(batches) + 1)  # + the scratch slot that padding rows use
        state = SimpleNamespace(conv=torch.zeros(sh["conv_state"], dtype=model.dtype, device="cuda"),
                                ssm=torch.zeros(sh["ssm_state"], device="cuda"), scratch=max(batches))
        dec = FusedDecoder(model, state.conv, state.ssm, args.dtype, pdl=False if args.no_pdl else None,
                           gemv=args.gemv)
        for B in batches:
            if args.leave_out:
                rows += leave_out_rows(dec, state, B, name, cfg.n_layer, args.ab_rounds)
                continue
            if ab:
                rows += ab_rows(ab, dec, state, B, name, decode_step, args.ab_rounds, args.ab_ahead)
                continue
            g = _FusedGraph(dec, state, B, torch.cuda.graph_pool_handle())
            slots, ids = warmed(g, B)
            gpu = replay_ms(g.graph)
            ts, ahead = [], []
            for _ in range(200):
                t0 = time.perf_counter()
                ids[:, 0] = g.run(slots, ids).greedy()
                ts.append((time.perf_counter() - t0) * 1e3)
            h = g.run(slots, ids)
            for _ in range(200):  # each step queued before the one before is read (Session.decode)
                t0 = time.perf_counter()
                h, ids[:, 0] = g.run_next(slots, h), h.greedy()
                ahead.append((time.perf_counter() - t0) * 1e3)
            h.greedy()
            sb = 2 * B * state_bytes(cfg, args.dtype)
            row = {"config": name, "batch": B, "path": "gemv" if g.bk.gemv else "gemm", "gpu_ms": gpu,
                   "step_ms_median": statistics.median(ts), "step_ms_p99": sorted(ts)[int(0.99 * (len(ts) - 1))],
                   "step_ahead_ms_median": statistics.median(ahead),
                   "floor_ms": wb / bw * 1e3, "floor_with_state_ms": (wb + sb) / bw * 1e3, "pdl": dec.k.pdl,
                   "gemv": dec.k.gemv}
            row["gpu_over_floor"] = gpu / (row["floor_ms"] if B == 1 else row["floor_with_state_ms"])
            if args.kernels:
                per = kernel_times(g.graph)
                row["kernels_us"] = {k: {"n": len(v), "total": sum(v), "mean": sum(v) / len(v)} for k, v in per.items()}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "kernels_us"}), flush=True)
            if args.kernels:
                for k, v in sorted(row["kernels_us"].items(), key=lambda kv: -kv[1]["total"]):
                    print(f"    {k:60s} n={v['n']:4d} total={v['total']:9.1f}us mean={v['mean']:7.2f}us")
            del g
        del model, state, dec
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "dtype": args.dtype, "copy_bandwidth_TBps": bw / 1e12, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
