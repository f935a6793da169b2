"""The benchmark suite: mamba-rt and its baselines measured in one process on one GPU, every timing a
ratio to baselines of the same run. Results go to ``benchmarks/results/<device>.json``; ``plots.py``
draws them.

    python benchmarks/run_suite.py [--configs 130m,370m,790m,1.4b,2.8b] [--dtypes fp16,bf16]
        [--batches 1,8,32,64,128] [--backends torch:cuda,onnxruntime:cuda,...]
        [--mamba-ssm SRC [--mamba-ssm-ext DIR --causal-conv1d SRC]] [--long-context] [--out PATH] [--merge [PATH]]

Per published size and dtype, with random weights (latency does not depend on their values), exported
once to a package that every implementation loads:

* ``hf generate``: transformers ``MambaForCausalLM.generate`` at batch 1, measured before mamba_ssm is
  importable (transformers would route through its kernels otherwise; see ``baselines.py``);
* ``mamba-rt <backend> (<device>)``: :func:`mamba_rt.bench.measure` for every backend available here
  (``--backends``): decode per ``--batches``, prefill of ``--prompt-lens`` (TTFT). CPU backends only for
  ``--cpu-configs`` at batch 1 and 128-token prompts; backends that run ONNX graphs only for ``--onnx-configs``
  (exporting the graphs of a large model takes minutes of CPU);
* ``mamba_ssm no-ext`` / ``mamba_ssm full``: its CUDA-graph decode step per batch and its prefill, as it
  imports without its CUDA extensions and with them compiled for this GPU (``build_mamba_ssm_ext.py``);
* the floor: weight bytes one decode step reads / the measured copy bandwidth.

``--long-context``: decode tokens/s at ``--contexts`` (2k, 8k, 32k) of mamba-rt against a Llama-style
Transformer of the same parameter count (``baselines.Llama``: SDPA, static KV cache; HF ``generate`` and a
CUDA-graph step), at batch 1 and at the largest batch each fits in memory, with the memory of both.
The default size is 1.4b: the Mamba paper's own throughput comparison is Mamba-1.4B against a 1.3B
Transformer, and at 32k its KV cache (~6.7 GB per sequence in fp16) still leaves a batch of several
sequences on an 80 GB GPU, so "largest batch" means something at every context.

Rows carry the run that measured them; ``time_vs`` (this row's time / the baseline's: < 1 is faster) and
``throughput_vs`` (tokens/s over the baseline's: > 1 is faster) only compare rows of one run. ``--merge``
combines runs (e.g. one GPU call per dtype and one for the long context) into one file: a row measured
again replaces the old one. The file is rewritten after every model, so a run cut short keeps what it did.
Progress lines carry the time since the start.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # baselines.py beside this file
from mamba_rt.exporters.tensorrt_build import slug  # noqa: E402  (torch-free)

RESULTS = HERE / "results"
BASELINE_IMPLS = ("mamba_ssm full", "mamba_ssm no-ext", "hf generate")
CPU_BATCHES, CPU_PROMPTS = [1], [128]  # a CPU backend on a large model: minutes per extra point
DECODE_FIELDS = ("median_ms", "p99_ms", "wall_per_call_ms", "timer", "steps", "memory_trace", "first_attempt", "host_paced")


def csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]


class Log:
    def __init__(self):
        self.t0 = time.time()

    def elapsed(self) -> float:
        return time.time() - self.t0

    def __call__(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():5.0f}s] {msg}", flush=True)


# -- the results file -------------------------------------------------------------------------------------
def row_key(r: dict) -> tuple:
    return r["kind"], r.get("config"), r.get("dtype"), r["impl"], r.get("batch"), r.get("length"), r.get("largest")


def merge(base: dict | None, new: dict) -> dict:
    """``new`` (the document of one run) added to ``base``: its runs renumbered after base's, and every
    row (or skip) of base that ``new`` measured again replaced."""
    if base is None:
        return new
    if base["device"].get("name") != new["device"].get("name"):
        raise SystemExit(f"--merge: {base['device'].get('name')!r} results cannot take rows measured on "
                         f"{new['device'].get('name')!r}; write them to another file")
    offset = len(base["runs"])
    runs = base["runs"] + [dict(r, id=r["id"] + offset) for r in new["runs"]]
    rows = [dict(r, run=r["run"] + offset) for r in new["rows"]]
    measured = {row_key(r) for r in rows if "median_ms" in r}
    groups = {row_key(r)[:4] for r in rows if "median_ms" in r}  # kind, config, dtype, impl
    # old rows measured again go; so do old skips and errors of what the new run measured or skipped
    old = [r for r in base["rows"] if row_key(r) not in measured and ("median_ms" in r or (
        row_key(r)[:4] not in groups and row_key(r) not in {row_key(x) for x in rows}))]
    # a new skip or error never hides an old measurement of the same implementation
    kept = {row_key(r)[:4] for r in old if "median_ms" in r}
    rows = [r for r in rows if "median_ms" in r or row_key(r)[:4] not in kept]
    return {**base, "updated": new["updated"], "runs": runs, "rows": old + rows}


def add_ratios(rows: list[dict]) -> None:
    """time_vs on decode/prefill rows: own time / each baseline's, same run, config, dtype, batch and
    length. throughput_vs on mamba-rt long-context rows: own tokens/s / each Transformer row's at the
    same context and batch kind (1, or the largest that fits for each)."""
    timed = [r for r in rows if r.get("median_ms")]
    for r in timed:
        if r["kind"] in ("decode", "prefill"):
            r["time_vs"] = {p["impl"]: r["median_ms"] / p["median_ms"] for p in timed
                            if p["impl"] in BASELINE_IMPLS and p["impl"] != r["impl"]
                            and row_key(p)[:3] == row_key(r)[:3] and row_key(p)[4:] == row_key(r)[4:]
                            and p["run"] == r["run"]}
        elif r["kind"] == "long_context" and r["impl"].startswith("mamba-rt"):
            r["throughput_vs"] = {p["impl"]: r["tokens_per_s"] / p["tokens_per_s"] for p in timed
                                  if p["kind"] == "long_context" and p["impl"].startswith("llama")
                                  and p["run"] == r["run"] and p["length"] == r["length"]
                                  and p["largest"] == r["largest"]}


def timing_row(base: dict, batch: int, r: dict, floor_ms: float | None = None, **extra) -> dict:
    """A row from a Timer result (or a dict with median_ms): tokens/s from the sustained wall time per step."""
    row = {**base, "batch": batch, **{k: r[k] for k in DECODE_FIELDS if k in r}, **extra}
    row["tokens_per_s"] = batch * 1e3 / (r.get("wall_per_call_ms") or r["median_ms"])
    if floor_ms:
        row.update(floor_ms=floor_ms, x_floor=r["median_ms"] / floor_ms)
    return row


def prefill_row(base: dict, length: int, median_ms: float, p99_ms: float, timer: str, steps: int, detail) -> dict:
    """A prefill row (batch 1): time to first token and prompt tokens/s."""
    return {**base, "kind": "prefill", "batch": 1, "length": length, "median_ms": median_ms, "p99_ms": p99_ms,
            "timer": timer, "steps": steps, "tokens_per_s": length / (median_ms / 1e3), "detail": detail}


def rows_from_measure(m: dict, base: dict) -> list[dict]:
    """The decode and prefill rows of one :func:`mamba_rt.bench.measure` result."""
    detail = {"backend": m["backend"]["describe"], "prefill_chunk": m["backend"]["prefill_chunk"],
              "memory_trace_kind": m["memory"]["trace_kind"], "state_bytes_per_sequence": m["model"]["state_bytes_per_sequence"]}
    rows = [timing_row({**base, "kind": "decode", "length": None}, d["batch"], d, d["floor_ms"],
                       peak_memory_bytes=m["memory"]["peak_bytes"],
                       detail={**detail, "floor_with_state_ms": d["floor_with_state_ms"]}) for d in m["decode"]]
    rows += [prefill_row(base, p["prompt_len"], p["ttft_ms"], p["ttft_p99_ms"], p["timer"], p["reps"], detail)
             for p in m["prefill"]]
    return rows


class Suite:
    """One run: its document, its rows, the budget, and the file rewritten after every model."""

    def __init__(self, args, log: Log):
        from mamba_rt.bench import copy_bandwidth, device_info

        self.args, self.log = args, log
        dev = device_info(args.device)
        self.out = Path(args.out) if args.out else RESULTS / f"{slug(dev['name'])}.json"
        merge_from = Path(args.merge) if args.merge not in (None, "") else (self.out if args.merge == "" else None)
        self.base = json.loads(merge_from.read_text()) if merge_from and merge_from.is_file() else None
        self.bandwidth, how = copy_bandwidth(dev["kind"])
        log(f"{dev['name']}: copy bandwidth {self.bandwidth / 1e12:.3f} TB/s")
        self.run = {"id": 0, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
                    "bandwidth": {"bytes_per_s": self.bandwidth, "method": how}, "versions": versions()}
        self.doc = {"format": "mamba-rt benchmark suite", "format_version": 1, "device": dev,
                    "updated": self.run["date"], "runs": [self.run], "rows": []}

    @property
    def rows(self) -> list[dict]:
        return self.doc["rows"]

    def add(self, row: dict) -> None:
        self.rows.append({"run": 0, **row})

    def skip(self, base: dict, why: str, **where) -> None:
        self.add({**base, **where, "skipped": why})
        self.log(f"skipped {base['impl']} {base.get('config', '')} {base.get('dtype', '')}: {why}")

    def over_budget(self) -> str | None:
        b = self.args.budget_s
        return f"time budget of this run spent (--budget-s {b})" if b and self.log.elapsed() > b else None

    def attempt(self, base: dict, fn, **where) -> object:
        """Run one measurement; a failure becomes an error row (the other rows still run)."""
        import baselines

        why = self.over_budget()
        if why:
            return self.skip(base, why, **where)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 -- recorded in the results, the suite goes on
            self.add({**base, **where, "error": baselines.error_text(e)})
            self.log(f"ERROR {base['impl']} {base.get('config', '')}: {baselines.error_text(e)}")
        finally:
            baselines.free_cuda()

    def save(self) -> dict:
        add_ratios(self.rows)
        doc = merge(self.base, self.doc)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(doc, indent=1) + "\n")
        return doc


def versions() -> dict:
    import platform

    import torch

    import mamba_rt

    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "mamba_rt": mamba_rt.__version__}
    for name in ("transformers", "onnxruntime"):
        try:
            v[name] = __import__(name).__version__
        except ImportError:
            v[name] = None
    return v


# -- backends ---------------------------------------------------------------------------------------------
def discover_backends(requested: list[str], device: str, cache_root: Path | None, log) -> tuple[list, list]:
    """([(backend, device)] to run, [(spec, why not)]): every mamba-rt backend on every device here,
    asked of the backend itself (``unavailable_reason``) on a tiny package with graphs."""
    from mamba_rt._optional import available
    from mamba_rt.bench import config_package
    from mamba_rt.manifest import load_manifest
    from mamba_rt.runtime.backend import BACKENDS, backend_class

    no_graphs = None if available("onnxruntime") else "onnxruntime is not installed"
    try:  # a package with graphs, so that the backends that run them can say whether they could
        probe = load_manifest(config_package("tiny", "fp32", graphs=not no_graphs, root=cache_root, log=log))
    except Exception as e:  # noqa: BLE001 -- e.g. no ONNX exporter here: those backends are out
        no_graphs = f"the ONNX graphs cannot be exported here ({type(e).__name__}: {e})"
        probe = load_manifest(config_package("tiny", "fp32", graphs=False, root=cache_root, log=log))
    run, skipped = [], []
    for name in BACKENDS:
        for dev in (["cuda", "cpu"] if device == "cuda" else ["cpu"]):
            spec = f"{name}:{dev}"
            if (requested and spec not in requested) or (name.startswith("tensorrt") and dev == "cpu"):
                continue
            if name.startswith("tensorrt"):
                skipped.append((spec, "needs engines built by `mamba-rt build` for this GPU; the suite builds none "
                                      "(README 'TensorRT': none runs on compute capability 9.0)"))
                continue
            if spec == "torch:cpu" and not requested:
                skipped.append((spec, "the reference ops, eager: a correctness path (ask with --backends torch:cpu)"))
                continue
            try:
                why = backend_class(name).unavailable_reason(probe, dev)
            except ImportError as e:
                why = str(e)
            why = why or (no_graphs if name != "torch" else None)
            (skipped.append((spec, why)) if why else run.append((name, dev)))
    return run, skipped


def measure_models(suite: Suite) -> None:
    """HF first (before mamba_ssm can be imported), then every mamba-rt backend, then mamba_ssm."""
    import baselines
    from mamba_rt.bench import bench_config, config_package, measure
    from mamba_rt.checkpoint import torch_dtype
    from mamba_rt.inspect import decode_bytes

    a, log = suite.args, suite.log
    cache_root = Path(a.cache_dir) if a.cache_dir else None
    models = [(n, d) for d in csv(a.dtypes) for n in csv(a.configs)]
    floors, packages = {}, {}
    for name, dtype in models:
        cfg = bench_config(name)
        floors[name, dtype] = decode_bytes(cfg, dtype) / suite.bandwidth * 1e3
        packages[name, dtype] = config_package(name, dtype, graphs=False, root=cache_root, log=log)
        base = {"kind": "decode", "config": name, "dtype": dtype, "params": cfg.n_params(), "impl": "hf generate",
                "length": None}
        if "error" in suite.run["hf"]:
            suite.skip(base, suite.run["hf"]["error"], batch=1)
            continue
        log(f"hf generate {name} {dtype}")
        w = baselines.package_weights(packages[name, dtype])
        r = suite.attempt(base, lambda: baselines.hf_mamba_decode(cfg, w, torch_dtype(dtype), a.hf_tokens,
                                                                  device=a.device), batch=1)
        if r:
            suite.add(timing_row(base, 1, r, floors[name, dtype], peak_memory_bytes=r["peak_memory_bytes"],
                                 detail={"step_ms": r["step_ms"], "new_tokens": r["steps"], "hf": suite.run["hf"]}))
        w = None  # the next model's weights, not both
        suite.save()

    backends, skipped = discover_backends(csv(a.backends), a.device, cache_root, log)
    for spec, why in skipped:
        be, dev = spec.split(":")
        for name, dtype in models:
            suite.skip({"kind": "decode", "config": name, "dtype": dtype, "impl": f"mamba-rt {be} ({dev})"}, why)
    onnx_ok, cpu_ok = set(csv(a.onnx_configs)), set(csv(a.cpu_configs))
    for name, dtype in models:
        cfg = bench_config(name)
        for be, dev in backends:
            base = {"config": name, "dtype": dtype, "params": cfg.n_params(), "impl": f"mamba-rt {be} ({dev})"}
            why = (f"a {dev} backend is measured for --cpu-configs {a.cpu_configs} only" if dev == "cpu" and name not in cpu_ok
                   else f"ONNX graphs are exported for --onnx-configs {a.onnx_configs} only (minutes of CPU for "
                        "the large sizes)" if be != "torch" and name not in onnx_ok
                   else "ONNX Runtime's CPU provider has no bfloat16 MatMul" if (be, dev, dtype) == ("onnxruntime", "cpu", "bf16")
                   else None)
            if why:
                suite.skip({**base, "kind": "decode"}, why)
                continue
            log(f"mamba-rt {be} on {dev}: {name} {dtype}")
            small = dev == "cpu" and a.device == "cuda"  # a CPU backend beside the GPU: fewer points
            m = suite.attempt({**base, "kind": "decode"}, lambda: measure(
                packages[name, dtype] if be == "torch" else config_package(name, dtype, True, cache_root, log),
                be, dev, CPU_BATCHES if small else a.batch_list, CPU_PROMPTS if small else a.prompt_list,
                a.steps, a.warmup, a.prefill_reps, suite.bandwidth, a.prefill_chunk, log))
            for row in rows_from_measure(m, base) if m else []:
                suite.add(row)
            suite.save()

    if not a.mamba_ssm:
        for name, dtype in models:
            suite.skip({"kind": "decode", "config": name, "dtype": dtype, "impl": "mamba_ssm no-ext"},
                       "not measured (no --mamba-ssm SRC)")
        return
    ssm = suite.attempt({"kind": "decode", "impl": "mamba_ssm no-ext"},
                        lambda: baselines.MambaSsm(a.mamba_ssm, a.mamba_ssm_ext, a.causal_conv1d))
    if ssm is None:
        return
    suite.run["mamba_ssm"] = {"version": ssm.version, "src": ssm.src, "variants": ssm.variants(),
                              "unavailable": ssm.unavailable}
    log(f"mamba_ssm {ssm.version} from {a.mamba_ssm}: variants {ssm.variants()}; {ssm.unavailable}")
    for name, dtype in models:
        cfg = bench_config(name)
        cfg_base = {"config": name, "dtype": dtype, "params": cfg.n_params()}
        if "full" in ssm.unavailable:
            suite.skip({**cfg_base, "kind": "decode", "impl": "mamba_ssm full"}, ssm.unavailable["full"])
        w = baselines.package_weights(packages[name, dtype])
        model = suite.attempt({**cfg_base, "kind": "decode", "impl": "mamba_ssm"},
                              lambda: ssm.model(cfg, w, torch_dtype(dtype)))
        w = None
        for variant in ssm.variants() if model is not None else []:
            kernels = ssm.use(variant)
            base = {**cfg_base, "impl": f"mamba_ssm {variant}"}
            detail = {"version": ssm.version, "kernels": kernels}
            for b in a.batch_list:
                log(f"mamba_ssm {variant} decode {name} {dtype} batch {b}")
                r = suite.attempt({**base, "kind": "decode", "length": None}, lambda: ssm.decode(model, b, a.steps, a.warmup),
                                  batch=b)
                if r:
                    suite.add(timing_row({**base, "kind": "decode", "length": None}, b, r, floors[name, dtype],
                                         detail=detail))
            for n in a.prompt_list:
                log(f"mamba_ssm {variant} prefill {name} {dtype} {n} tokens")
                r = suite.attempt({**base, "kind": "prefill", "batch": 1}, lambda: ssm.prefill(model, n, a.prefill_reps),
                                  length=n)
                if r:
                    suite.add(prefill_row(base, n, r["median_ms"], r["p99_ms"], r["timer"], r["steps"], detail))
        model = None
        baselines.free_cuda()
        suite.save()


# -- long context -------------------------------------------------------------------------------------------
def long_context(suite: Suite) -> None:
    """mamba-rt against a same-size Llama (static KV cache) at each context: batch 1 and the largest batch."""
    import numpy as np
    import torch

    import baselines
    from mamba_rt.bench import Timer, bench_config, config_package, sequence_bytes, time_decode
    from mamba_rt.checkpoint import torch_dtype
    from mamba_rt.runtime import Session

    a, log = suite.args, suite.log
    name, dtype, dev, cuda = a.lc_config, a.lc_dtype, a.device, a.device == "cuda"
    cfg = bench_config(name)
    backend = "torch" if cuda else "onnxruntime"
    pkg = config_package(name, dtype, graphs=backend != "torch", root=Path(a.cache_dir) if a.cache_dir else None, log=log)
    contexts, steps, warmup = a.context_list, a.lc_steps, a.warmup
    rng = np.random.default_rng(0)
    lc = {"kind": "long_context", "config": name, "dtype": dtype, "params": cfg.n_params()}

    def lc_row(impl, ctx, batch, largest, r, peak, **detail):
        suite.add(timing_row({**lc, "impl": impl, "length": ctx, "largest": largest}, batch, r,
                             peak_memory_bytes=peak, detail=detail))
        return suite.rows[-1]

    # mamba-rt: slot 0 prefilled with `ctx` tokens, the other slots forked from it (the same state)
    impl, timer = f"mamba-rt {backend} ({dev})", Timer(cuda=cuda)

    def mamba_at(s, ctx, batch, largest, **detail):
        slot0 = s.alloc()
        t0 = time.perf_counter()
        tok = s.prefill(slot0, rng.integers(0, cfg.vocab_size, ctx))
        prefill_s = time.perf_counter() - t0
        slots = [slot0] + [s.fork(slot0) for _ in range(batch - 1)]
        try:
            baselines.reset_peak(dev)
            r = time_decode(s, slots, steps, warmup, timer, toks=[tok] * batch)
            lc_row(impl, ctx, batch, largest, r, baselines.peak_memory(dev) if backend == "torch" else None,
                   prefill_s=prefill_s, **detail)
        finally:
            for x in slots:
                s.free(x)

    chunk = a.prefill_chunk or 2048

    def mamba_batch_1():
        with Session.open(pkg, backend=backend, device=dev, max_batch=1, prefill_chunk=chunk) as s:
            for ctx in contexts:
                log(f"long context: {impl} {name} at {ctx} tokens, batch 1")
                suite.attempt({**lc, "impl": impl}, lambda: mamba_at(s, ctx, 1, False), length=ctx, batch=1,
                              largest=False)

    def mamba_largest():
        per_seq = sequence_bytes(cfg, dtype)

        def fits(b):
            with Session.open(pkg, backend=backend, device=dev, max_batch=b) as s2:
                slots = s2.alloc(b)
                for _ in range(2):
                    s2.step(slots, np.zeros(b, np.int64))

        free = torch.cuda.mem_get_info()[0]
        log(f"long context: {impl} largest batch (guess from {free / 1e9:.0f} GB free)")
        best, tried = baselines.largest_fitting(fits, free // (3 * per_seq), a.max_batch_cap)
        with Session.open(pkg, backend=backend, device=dev, max_batch=best, prefill_chunk=chunk) as s:
            for ctx in contexts:
                log(f"long context: {impl} at {ctx} tokens, batch {best}")
                suite.attempt({**lc, "impl": impl}, lambda: mamba_at(s, ctx, best, True, search=tried,
                                                                      cap=a.max_batch_cap),
                              length=ctx, batch=best, largest=True)

    suite.attempt({**lc, "impl": impl}, mamba_batch_1, largest=False)
    if cuda:
        suite.attempt({**lc, "impl": impl}, mamba_largest, largest=True)
    else:
        suite.skip({**lc, "impl": impl}, "the largest-batch search measures GPU memory", largest=True)
    suite.save()

    # the Transformer
    lcfg = baselines.llama_config_like(cfg, cfg.n_params(), max(contexts) + 64, a.kv_heads)
    llama = suite.attempt({**lc, "impl": "llama"}, lambda: baselines.Llama(lcfg, torch_dtype(dtype), dev))
    if llama is None:
        return suite.save()
    desc = llama.describe()
    suite.run["llama"] = desc
    log(f"long context: Llama {desc['parameters'] / 1e9:.2f}B ({desc['layers']} layers) against Mamba "
        f"{cfg.n_params() / 1e9:.2f}B")
    valid = {"ok": False, "why": "CUDA graphs need a GPU"}
    if cuda:
        try:
            valid = llama.validate_graph()
        except Exception as e:  # noqa: BLE001 -- e.g. a transformers version whose step cannot be captured
            valid = {"ok": False, "why": f"capture failed: {baselines.error_text(e)}"}
            baselines.free_cuda()
    suite.run["llama_graph_validation"] = valid
    graph_why = None if valid["ok"] else f"CUDA-graph step not used: {valid}"
    g_impl, e_impl = "llama cuda-graph", "llama eager generate"

    def graph_at(cache, ctx, batch, start, largest, **detail):
        baselines.reset_peak(dev)
        r = llama.graph_decode(cache, batch, start, steps, warmup)
        return lc_row(g_impl, ctx, batch, largest, r, baselines.peak_memory(dev), **detail)

    def eager_at(cache, ctx, batch, largest, **detail):
        baselines.reset_peak(dev)
        r = llama.eager_generate(cache, batch, a.hf_tokens)
        lc_row(e_impl, ctx, batch, largest, r, baselines.peak_memory(dev), **detail)

    for ctx in contexts:
        where = {"length": ctx, "batch": 1, "largest": False}
        cache = llama.cache(ctx)
        start = max(0, ctx - steps - warmup - 8)
        log(f"long context: Llama at {ctx} tokens, batch 1 (prefill of {start})")
        prefill_s = suite.attempt({**lc, "impl": g_impl}, lambda: llama.prefill(cache, start), **where)
        if graph_why:
            suite.skip({**lc, "impl": g_impl}, graph_why, **where)
        elif prefill_s is not None:
            row = suite.attempt({**lc, "impl": g_impl}, lambda: graph_at(
                cache, ctx, 1, start, False, prefill_s=prefill_s, from_position=start), **where)
            # a static cache makes a step cost the same at any position (the largest-batch rows rely on
            # it): checked here, from position 0 of the same cache
            if row:
                try:
                    row["detail"]["same_cache_from_position_0_ms"] = llama.graph_decode(cache, 1, 0, steps, warmup)["median_ms"]
                except Exception as e:  # noqa: BLE001 -- the check failed, the row stands without it
                    row["detail"]["same_cache_from_position_0_ms"] = baselines.error_text(e)
        suite.attempt({**lc, "impl": e_impl}, lambda: eager_at(cache, ctx, 1, False), **where)
        cache = None
        baselines.free_cuda()
        if not cuda:
            suite.skip({**lc, "impl": g_impl}, "the largest-batch search measures GPU memory", length=ctx, largest=True)
            continue

        def llama_fits(b):
            c = llama.cache(ctx)
            ids = torch.zeros((b, 1), dtype=torch.long, device=dev)
            llama.forward(c, ids, 0)
            llama.forward(c, ids, 1)

        guess = (torch.cuda.mem_get_info()[0]) // (llama.kv_bytes_per_token * ctx * 1.15)
        log(f"long context: Llama largest batch at {ctx} tokens (guess {int(guess)})")
        found = suite.attempt({**lc, "impl": e_impl}, lambda: baselines.largest_fitting(llama_fits, int(guess), a.max_batch_cap),
                              length=ctx, largest=True)
        best, tried = found or (None, [])
        if not best:
            continue
        where = {"length": ctx, "batch": best, "largest": True}
        cache = llama.cache(ctx)
        log(f"long context: Llama at {ctx} tokens, batch {best}")
        if not graph_why:  # from position 0: the same cost, and no prefill of batch x ctx tokens
            suite.attempt({**lc, "impl": g_impl}, lambda: graph_at(cache, ctx, best, 0, True, search=tried), **where)
        suite.attempt({**lc, "impl": e_impl}, lambda: eager_at(cache, ctx, best, True, search=tried), **where)
        cache = None
        baselines.free_cuda()
        suite.save()
    suite.save()


# -- the command ------------------------------------------------------------------------------------------
def print_summary(doc: dict, run: int) -> None:
    rows = [r for r in doc["rows"] if r["run"] == run]
    print(f"\n{doc['device']['name']} ({doc['runs'][run]['date']}); copy bandwidth "
          f"{doc['runs'][run]['bandwidth']['bytes_per_s'] / 1e12:.2f} TB/s")
    print(f"{'kind':<12} {'config':>6} {'dtype':>5} {'impl':<28} {'batch':>5} {'len':>6} {'median ms':>10} "
          f"{'p99 ms':>9} {'tok/s':>10} {'x floor':>7}  vs")
    for r in rows:
        if "median_ms" not in r:
            print(f"{r['kind']:<12} {r.get('config', ''):>6} {r.get('dtype', ''):>5} {r['impl']:<28} "
                  f"{r.get('skipped') and 'skipped: ' + r['skipped'] or 'error: ' + r.get('error', '')}")
            continue
        vs = r.get("time_vs") or r.get("throughput_vs") or {}
        p99 = f"{r['p99_ms']:.3f}" if r.get("p99_ms") is not None else "n/a"
        print(f"{r['kind']:<12} {r['config']:>6} {r['dtype']:>5} {r['impl']:<28} {r['batch']:>5} "
              f"{r.get('length') or '':>6} {r['median_ms']:>10.3f} {p99:>9} {r['tokens_per_s']:>10.1f} "
              f"{format(r['x_floor'], '7.1f') if 'x_floor' in r else '':>7}  " + ", ".join(f"{k} {v:.2f}x" for k, v in vs.items())
              + (f"  (host-paced: wall {r['host_paced']:.2f}x the GPU's median)" if r.get("host_paced") else ""))


def parse_args(argv=None):
    from mamba_rt.bench import CONFIG_NAMES, MIN_STEPS, bench_config, parse_counts
    from mamba_rt.errors import InputError

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(c for c in CONFIG_NAMES if c != "tiny"),
                    help="published sizes (or tiny); 'none' for none (e.g. a --long-context-only run)")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--batches", default="1,64", help="decode batch sizes (throughput against batch: 1,8,32,64,128)")
    ap.add_argument("--prompt-lens", default="2048", help="prefill lengths (TTFT), batch 1")
    ap.add_argument("--backends", default="", help="backend:device list (default: every mamba-rt backend available)")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu runs the CPU parts only (tests)")
    ap.add_argument("--onnx-configs", default="130m", help="sizes whose ONNX graphs are exported for onnxruntime")
    ap.add_argument("--cpu-configs", default="130m", help="sizes measured on CPU backends")
    ap.add_argument("--mamba-ssm", default=None, metavar="SRC", help="state-spaces/mamba checkout (never committed)")
    ap.add_argument("--mamba-ssm-ext", default=None, metavar="DIR", help="build_mamba_ssm_ext.py's --build-dir")
    ap.add_argument("--causal-conv1d", default=None, metavar="SRC", help="Dao-AILab/causal-conv1d checkout")
    ap.add_argument("--long-context", action="store_true", help="the Transformer comparison at --contexts")
    ap.add_argument("--lc-config", default="1.4b", help="model size for --long-context (default 1.4b)")
    ap.add_argument("--lc-dtype", default="fp16")
    ap.add_argument("--contexts", default="2048,8192,32768")
    ap.add_argument("--lc-steps", type=int, default=100, help="timed decode steps per long-context point")
    ap.add_argument("--kv-heads", type=int, default=None, help="Llama key/value heads (default: as many as heads)")
    ap.add_argument("--max-batch-cap", type=int, default=4096, help="largest batch tried in the batch search")
    ap.add_argument("--steps", type=int, default=MIN_STEPS, help=f"timed decode steps (at least {MIN_STEPS})")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--prefill-reps", type=int, default=10, help="timed prefills per point (after one untimed)")
    ap.add_argument("--prefill-chunk", type=int, default=2048, help="mamba-rt prefill chunk (session option)")
    ap.add_argument("--hf-tokens", type=int, default=32, help="tokens per timed HF generate")
    ap.add_argument("--quick", action="store_true", help=f"allow fewer than {MIN_STEPS} steps (tests)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip (and record) what starts after this many s")
    ap.add_argument("--cache-dir", default=None, help="where the exported packages go (default $MAMBA_RT_CACHE_DIR/bench)")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/<device>.json)")
    ap.add_argument("--merge", nargs="?", const="", default=None, metavar="PATH",
                    help="add this run to the results in PATH (default: the --out file) when it exists")
    a = ap.parse_args(argv)
    try:
        a.batch_list = parse_counts(a.batches, "--batches")
        a.prompt_list = parse_counts(a.prompt_lens, "--prompt-lens")
        a.context_list = parse_counts(a.contexts, "--contexts")
        for name in csv(a.configs) + [a.lc_config]:
            bench_config(name)
    except InputError as e:
        ap.error(str(e))
    if min(a.steps, a.lc_steps) < MIN_STEPS // 2 and not a.quick:  # long-context points: >= 100 steps
        ap.error(f"--steps {a.steps} / --lc-steps {a.lc_steps}: expected >= {MIN_STEPS} / {MIN_STEPS // 2} (--quick for tests)")
    need = max(a.lc_steps + a.warmup + 16, a.hf_tokens + 24)  # a static cache must hold every step written
    if a.long_context and min(a.context_list) < need:
        ap.error(f"--contexts {a.contexts}: expected contexts of at least {need} tokens for --lc-steps {a.lc_steps}, "
                 f"--warmup {a.warmup} and --hf-tokens {a.hf_tokens}")
    if a.steps < MIN_STEPS and not a.quick:
        ap.error(f"--steps {a.steps}: expected at least {MIN_STEPS} (--quick for tests)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    log = Log()
    # transformers' Mamba first: it binds mamba_ssm kernels at import when it can find them
    import baselines

    hf = baselines.import_hf_mamba()
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("run_suite: no CUDA GPU visible; absolute times are taken on a GPU (--device cpu runs the CPU "
              "parts, for tests)", file=sys.stderr)
        return 2
    suite = Suite(a, log)
    suite.run["hf"] = hf
    if csv(a.configs):
        measure_models(suite)
    if a.long_context:
        long_context(suite)
    doc = suite.save()
    print_summary(doc, len(doc["runs"]) - 1)
    log(f"wrote {suite.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
