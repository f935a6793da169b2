"""``mamba-rt bench PKG | --config NAME``: decode latency, prefill speed, memory and the weight-read floor
of one model on one backend, measured through the runtime API (``Session.open``, ``alloc``,
``prefill``, and the decode steps as ``Session.decode`` runs them).

* **decode**, for each ``--batch`` B: B slots step together, greedy, each step queued before the host
  reads the one before where the backend can (``Session.decode``). Per step (one call that returns a
  step's tokens), CUDA events on torch's current stream around the call (torch backend on a GPU;
  elsewhere ``perf_counter``), median and p99 over ``--steps`` steps after ``--warmup`` steps (the first
  step of a batch size captures its CUDA graph). Also the wall time per step, host work included, and
  tokens/s = B / wall time per step. A point timed by CUDA events whose wall time per step exceeds the
  GPU's median by more than ``HOST_PACED`` is measured once more (:func:`decode_point`).
* **prefill**, for each ``--prompt-len`` L: a fresh slot fed a random prompt of L tokens. TTFT is the time
  of ``Session.prefill`` (it returns the first sampled token); median of ``--prefill-reps`` after one
  untimed run; tokens/s = L / TTFT.
* **memory**: ``torch.cuda.max_memory_allocated`` over the run (torch backend on a GPU; "n/a" elsewhere)
  and, sampled during the decode steps, the allocated device memory (or the host RSS): constant-memory
  decoding shows as a flat trace.
* **state bytes per sequence**: conv + SSM state of all layers, from the package's config and dtype.
* **floor**: weight bytes one decode step reads (``mamba_rt.inspect.decode_bytes``) / bandwidth, the
  bandwidth measured by a large copy (device-to-device on a GPU, host memcpy on the CPU) or ``--bandwidth``.

``--config NAME`` benchmarks a published Mamba-1 size (or ``tiny``) with random weights (latency does
not depend on their values), exported once into ``$MAMBA_RT_CACHE_DIR/bench``. Nothing heavy is
imported until ``run``. ``benchmarks/run_suite.py`` calls :func:`measure` for every backend and
compares with the baselines.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from . import __version__, env
from ._gc import collector_paused
from .errors import InputError, UnsupportedError

# published Mamba-1 sizes (state-spaces/mamba-*): name -> (d_model, n_layer); GPT-NeoX vocabulary
PUBLISHED = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}
PUBLISHED_VOCAB, PUBLISHED_PAD = 50277, 8  # padded to 50280
TINY = dict(d_model=64, n_layer=2, vocab_size=512)  # seconds on a CPU: for CI and a first try
CONFIG_NAMES = [*PUBLISHED, "tiny"]
MIN_STEPS = 200  # the p99 of fewer steps is one or two samples
# wall time per decode step over the GPU's median step beyond which the host, not the GPU, set the pace
# (steps are queued ahead of the host, so on a GPU the two agree within ~2 % unless the host fell behind)
HOST_PACED = 1.15
QUICK_STEPS = 20
RANDOM_SEED = 0


def bench_config(name: str):
    """The MambaConfig of a published size or ``tiny``."""
    from .config import MambaConfig

    if name in PUBLISHED:
        dm, nl = PUBLISHED[name]
        return MambaConfig(d_model=dm, n_layer=nl, vocab_size=PUBLISHED_VOCAB, pad_vocab_size_multiple=PUBLISHED_PAD)
    if name == "tiny":
        return MambaConfig(**TINY)
    raise InputError(f"--config {name!r}: expected one of {', '.join(CONFIG_NAMES)}")


def config_package(name: str, dtype: str, graphs: bool, root: Path | None = None, log=None) -> Path:
    """A package of config ``name`` with random weights (seed 0) in ``dtype``: weights only (enough for
    the torch backend: seconds) or with the ONNX graphs (``graphs``: what onnxruntime runs; minutes for
    the large sizes). Reused while its manifest matches."""
    from .manifest import PackageError, load_manifest

    cfg = bench_config(name)
    pkg = (root or env.cache_dir() / "bench") / f"{name}-{dtype}-{'onnx' if graphs else 'weights'}"
    try:
        m = load_manifest(pkg)
        if (m.config == cfg and m.dtype == dtype and bool(m.graphs) == graphs
                and m.mamba_rt_version == __version__ and (pkg / "bench-stamp.json").is_file()):
            return pkg
    except PackageError:
        pass
    from .exporters.export import export_from_model, export_weights_only
    from .exporters.model import model_from_weights, random_weights

    if log:
        log(f"exporting {name} ({cfg.n_params() / 1e6:.3g}M parameters, {dtype}, random weights"
            f"{', ONNX graphs' if graphs else ''}) to {pkg}")
    model = model_from_weights(cfg, random_weights(cfg, dtype, seed=RANDOM_SEED), dtype)
    (export_from_model if graphs else export_weights_only)(model, pkg, force=True)
    (pkg / "bench-stamp.json").write_text(json.dumps({"config": name, "seed": RANDOM_SEED}) + "\n")
    return pkg


# -- measuring ------------------------------------------------------------------------------------------
def summarize(ms: list[float]) -> dict:
    """Median, p99 (nearest rank: never below the median), mean and min of a list of milliseconds."""
    s = sorted(ms)
    return {"median_ms": statistics.median(s), "p99_ms": s[max(0, math.ceil(0.99 * len(s)) - 1)],
            "mean_ms": statistics.fmean(s), "min_ms": s[0], "n": len(s)}


class Timer:
    """Times repeated calls of a function: ``perf_counter`` around each call always, CUDA events on
    torch's current stream around each call too when ``cuda``. The events time what the GPU did
    between the two records (host work in between included when the GPU waited for it); calls that do
    not synchronise are still timed right, since the events are read only after the loop."""

    def __init__(self, cuda: bool):
        self.torch = None
        if cuda:
            import torch

            self.torch = torch

    def run(self, fn, n: int, probe=None, probe_every: int = 0) -> dict:
        """As ``timeit`` does, the garbage collector runs before the loop and not during it: a collection
        inside would pause a call, and free (or, for the memory probe, count) what the caller left behind."""
        torch, walls, events, trace = self.torch, [], [], []
        gc.collect()
        if torch:
            torch.cuda.synchronize()
        with collector_paused():
            start = time.perf_counter()
            for i in range(n):
                if torch:
                    ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                    ev[0].record()
                t0 = time.perf_counter()
                fn()
                walls.append((time.perf_counter() - t0) * 1e3)
                if torch:
                    ev[1].record()
                    events.append(ev)
                if probe is not None and probe_every and (i % probe_every == 0 or i == n - 1):
                    trace.append([i + 1, probe()])
            if torch:
                torch.cuda.synchronize()
            total_ms = (time.perf_counter() - start) * 1e3
        wall = summarize(walls)
        out = {"timer": "cuda_event" if torch else "wall", "steps": n, "wall_per_call_ms": total_ms / n,
               "wall_median_ms": wall["median_ms"], "wall_p99_ms": wall["p99_ms"]}
        out.update(summarize([a.elapsed_time(b) for a, b in events]) if torch else wall)
        if trace:
            out["memory_trace"] = trace
        return out


def copy_bandwidth(device_kind: str) -> tuple[float, str]:
    """(bytes read + written per second, how): median of 20 copies of 1 GiB device to device on the
    GPU, of 5 copies of 256 MiB in host memory on the CPU (larger than any last-level cache)."""
    if device_kind == "cuda":
        import torch

        n = 1 << 30
        a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        r = Timer(cuda=True).run(lambda: b.copy_(a), 20)
        del a, b
        torch.cuda.empty_cache()
        return 2 * n / (r["median_ms"] / 1e3), "device-to-device copy of 1 GiB (read + write), median of 20"
    import numpy as np

    a = np.ones(1 << 28, np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    r = Timer(cuda=False).run(lambda: np.copyto(b, a), 5)
    return 2 * a.nbytes / (r["median_ms"] / 1e3), "host memcpy of 256 MiB (read + write), median of 5"


def device_info(device: str) -> dict:
    from .runtime.backend import parse_device

    kind, idx = parse_device(device)
    info = {"spec": device, "kind": kind, "python": platform.python_version()}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        info["torch"] = torch.__version__
    if kind == "cuda" and torch is not None:
        p = torch.cuda.get_device_properties(idx)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_bytes=p.total_memory,
                    multiprocessors=p.multi_processor_count, cuda=torch.version.cuda)
    else:
        info.update(name=platform.processor() or platform.machine(), cpus=os.cpu_count())
    return info


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _free_memory(kind: str, idx: int) -> int | None:
    if kind == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info(idx)[0])
        except Exception:  # noqa: BLE001 -- no torch or no driver: the backend will say so
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_device(device: str) -> tuple[str, int]:
    """Refuse --device cuda where no GPU is visible, before anything is loaded."""
    from .runtime.backend import parse_device

    kind, idx = parse_device(device)
    if kind == "cuda":
        try:
            import torch
        except ImportError:
            return kind, idx  # onnxruntime-gpu without torch: the backend checks its own provider
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA GPU is visible here (torch.cuda.is_available() is "
                             "False); expected a machine with an NVIDIA GPU, or --device cpu")
        if idx >= torch.cuda.device_count():
            raise InputError(f"--device {device}: expected cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return kind, idx


def state_bytes(config, dtype: str) -> int:
    """Recurrent state bytes of one sequence (conv state in the activation dtype, ssm state fp32)."""
    from .inspect import _ACT_BYTES

    return config.state_bytes_per_sequence(_ACT_BYTES[dtype])


def sequence_bytes(config, dtype: str) -> int:
    """Device bytes one more sequence costs a session: its state, its logits row (fp32) and its seen-token
    mask (one byte per vocabulary entry)."""
    return state_bytes(config, dtype) + config.padded_vocab_size * 5


def check_batch_fits(config, dtype: str, kind: str, idx: int, max_batch: int) -> None:
    """Refuse a batch whose state (plus the weights) cannot fit in the memory free now on device
    (kind, idx), as check_device returned it."""
    from .inspect import decode_bytes

    weights = decode_bytes(config, dtype)  # about the stored size (the tied head counted once more)
    per_seq = sequence_bytes(config, dtype)
    need = weights + (max_batch + 1) * per_seq
    free = _free_memory(kind, idx)
    if free is not None and need > free:
        most = max(0, (free - weights) // per_seq - 1)
        raise InputError(f"--batch {max_batch}: {max_batch} sequences need at least {need / 1e9:.2f} GB "
                         f"({per_seq / 1e6:.2f} MB each + {weights / 1e9:.2f} GB of weights) but "
                         f"{free / 1e9:.2f} GB of {kind} memory is free; expected a batch of at most {most}")


def time_decode(s, slots, steps: int, warmup: int, timer: Timer, probe=None, toks=None) -> dict:
    """``slots`` of session ``s`` stepping together (greedy, each fed its own last token) ``warmup``
    times, then ``steps`` timed times, as ``Session.decode`` runs them (each step queued before the
    host reads the one before, where the backend can). A timed call returns one step's tokens.
    ``toks``: the first tokens (default random)."""
    import numpy as np

    toks = np.asarray(toks if toks is not None else np.random.default_rng(RANDOM_SEED).integers(
        0, s.vocab, len(slots)), np.int64)
    run = s._step_run(slots, warmup + steps, toks)
    for _ in range(warmup):
        run.next()
    return timer.run(run.next, steps, probe, max(1, steps // 16))


def decode_run(s, batch: int, steps: int, warmup: int, timer: Timer, probe=None) -> dict:
    """:func:`time_decode` on ``batch`` fresh slots (freed afterwards)."""
    slots = s.alloc(batch)
    try:
        return time_decode(s, slots, steps, warmup, timer, probe)
    finally:
        for x in slots:
            s.free(x)


def host_paced(r: dict) -> float | None:
    """For a decode point timed by CUDA events: its wall time per step over the GPU's median step where that
    exceeds HOST_PACED (a host stall during the timed loop, or a host slower than the GPU), else None."""
    if r.get("timer") != "cuda_event":
        return None
    ratio = r["wall_per_call_ms"] / r["median_ms"]
    return ratio if ratio > HOST_PACED else None


def decode_point(s, batch: int, steps: int, warmup: int, timer: Timer, probe=None, log=None) -> dict:
    """:func:`decode_run`, measured once more where the host set the pace (:func:`host_paced`): the second
    measurement is kept whatever it reads, the first's figures go under ``first_attempt``, and
    ``host_paced`` (the ratio) stays on a point whose second measurement is host-paced too."""
    r = decode_run(s, batch, steps, warmup, timer, probe)
    ratio = host_paced(r)
    if ratio is None:
        return r
    if log:
        log(f"decode, batch {batch}: wall time per step {r['wall_per_call_ms']:.4f} ms is {ratio:.2f}x the GPU's "
            f"median {r['median_ms']:.4f} ms (the host fell behind): measuring once more")
    first = {k: r[k] for k in ("median_ms", "p99_ms", "wall_per_call_ms")}
    r = decode_run(s, batch, steps, warmup, timer, probe)
    r["first_attempt"] = first
    ratio = host_paced(r)
    if ratio is not None:
        r["host_paced"] = ratio
    return r


def prefill_run(s, length: int, reps: int, timer: Timer) -> dict:
    """Prefill of a fresh slot with a random prompt of ``length`` tokens, ``reps`` times after one
    untimed run (kernel compilation for new lengths)."""
    import numpy as np

    rng = np.random.default_rng(RANDOM_SEED)
    prompts = [rng.integers(0, s.vocab, length) for _ in range(reps + 1)]
    it = iter(prompts)

    def once():
        slot = s.alloc()
        try:
            s.prefill(slot, next(it))
        finally:
            s.free(slot)

    once()
    return timer.run(once, reps)


def measure(pkg, backend: str = "auto", device: str = "cpu", batches=(1,), prompt_lens=(128,), steps: int = MIN_STEPS,
            warmup: int = 20, prefill_reps: int = 3, bandwidth: float | None = None, prefill_chunk: int | None = None,
            log=None) -> dict:
    """Benchmark package ``pkg`` (see the module docstring); returns the JSON-ready result."""
    from .manifest import load_manifest
    from .inspect import decode_bytes
    from .runtime import Session

    kind, idx = check_device(device)
    manifest = load_manifest(pkg)
    cfg, dtype = manifest.config, manifest.dtype
    check_batch_fits(cfg, dtype, kind, idx, max(batches))
    wbytes, sbytes = decode_bytes(cfg, dtype), state_bytes(cfg, dtype)
    bw_method = "given (--bandwidth)"
    if bandwidth is None:
        bandwidth, bw_method = copy_bandwidth(kind)
    floor_ms = wbytes / bandwidth * 1e3
    opts = {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk}
    torch = None
    if kind == "cuda":
        try:
            import torch
        except ImportError:
            pass
    if torch is not None:
        torch.cuda.set_device(idx)  # events, peak and allocated memory are read on the current device
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with Session.open(pkg, backend=backend, device=device, max_batch=max(batches), **opts) as s:
        open_s = time.perf_counter() - t0
        on_torch_gpu = torch is not None and s.backend.name == "torch"
        timer = Timer(cuda=on_torch_gpu)
        probe = torch.cuda.memory_allocated if on_torch_gpu else _rss_bytes
        after_open = probe()
        decode, prefill = [], []
        for b in sorted(set(batches)):
            if log:
                log(f"decode, batch {b}: {warmup} + {steps} steps")
            r = decode_point(s, b, steps, warmup, timer, probe, log)
            r.update(batch=b, tokens_per_s=b / (r["wall_per_call_ms"] / 1e3), floor_ms=floor_ms,
                     floor_with_state_ms=(wbytes + 2 * b * sbytes) / bandwidth * 1e3,
                     x_floor=r["median_ms"] / floor_ms)
            decode.append(r)
        for n in prompt_lens:
            if log:
                log(f"prefill of {n} tokens, {prefill_reps} + 1 times")
            r = prefill_run(s, n, prefill_reps, timer)
            prefill.append({"prompt_len": n, "ttft_ms": r["median_ms"], "tokens_per_s": n / (r["median_ms"] / 1e3),
                            "ttft_p99_ms": r["p99_ms"], "timer": r["timer"], "reps": prefill_reps})
        backend_info = {"name": s.backend.name, "describe": s.describe(), "choice": getattr(s.backend, "choice", ""),
                        "prefill_chunk": s.prefill_chunk, "open_s": open_s}
        if on_torch_gpu:
            memory = {"kind": "device (torch.cuda.max_memory_allocated)", "peak_bytes": torch.cuda.max_memory_allocated(),
                      "after_open_bytes": after_open, "trace_kind": "torch.cuda.memory_allocated"}
        else:
            memory = {"kind": None, "peak_bytes": None, "after_open_bytes": None, "trace_kind": "host RSS",
                      "why": f"peak device memory is read from torch's allocator: torch backend on a GPU only "
                             f"(here {s.backend.name} on {device})"}
    return {
        "tool": "mamba-rt bench", "mamba_rt": __version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": device_info(device),
        "model": {"package": str(pkg), "config": cfg.to_dict(), "dtype": dtype, "parameters": cfg.n_params(),
                  "weight_bytes_per_step": wbytes, "state_bytes_per_sequence": sbytes},
        "backend": backend_info,
        "bandwidth": {"bytes_per_s": bandwidth, "method": bw_method},
        "floor_ms_per_step": floor_ms,
        "settings": {"steps": steps, "warmup": warmup, "prefill_reps": prefill_reps, "batches": sorted(set(batches)),
                     "prompt_lens": list(prompt_lens)},
        "decode": decode, "prefill": prefill, "memory": memory,
    }


# -- the command ----------------------------------------------------------------------------------------
def format_table(r: dict) -> str:
    from .inspect import _fmt_bytes as fmt

    def _fmt_bytes(n):
        return "n/a" if n is None else fmt(n)

    m, d = r["model"], r["device"]
    lines = [f"mamba-rt bench: {r.get('source', m['package'])}, {m['dtype']}, {r['backend']['describe']}",
             f"device: {d['name']} ({d['kind']}), {r['date']}",
             f"weights read per step {_fmt_bytes(m['weight_bytes_per_step'])}; state {_fmt_bytes(m['state_bytes_per_sequence'])}"
             f" per sequence; bandwidth {r['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s ({r['bandwidth']['method']}); "
             f"floor {r['floor_ms_per_step']:.4f} ms/step",
             f"decode ({r['settings']['steps']} timed steps after {r['settings']['warmup']} warm-up; timer: "
             f"{r['decode'][0]['timer'] if r['decode'] else ''})",
             f"{'batch':>7} {'median ms':>10} {'p99 ms':>9} {'wall ms':>9} {'tokens/s':>10} {'x floor':>8}"]
    for x in r["decode"]:
        lines.append(f"{x['batch']:>7} {x['median_ms']:>10.4f} {x['p99_ms']:>9.4f} {x['wall_per_call_ms']:>9.4f} "
                     f"{x['tokens_per_s']:>10.1f} {x['x_floor']:>8.1f}" + (" *" if x.get("host_paced") else ""))
    if any(x.get("host_paced") for x in r["decode"]):
        lines.append(f"  * the host set the pace (wall time per step more than {HOST_PACED}x the GPU's median, twice): "
                     "tokens/s count the host's time")
    lines += [f"prefill (median of {r['settings']['prefill_reps']}, fresh slot, random prompt)",
              f"{'prompt':>7} {'TTFT ms':>10} {'tokens/s':>10}"]
    lines += [f"{x['prompt_len']:>7} {x['ttft_ms']:>10.3f} {x['tokens_per_s']:>10.0f}" for x in r["prefill"]]
    mem = r["memory"]
    lines.append(f"peak device memory: {_fmt_bytes(mem['peak_bytes'])}" + (f" ({mem['why']})" if mem.get("why") else ""))
    return "\n".join(lines)


def parse_counts(text: str, flag: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64]; anything but positive integers is refused."""
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise InputError(f"{flag} {text!r}: expected positive integers separated by commas, such as '1,8,64'")
    return vals


def _positive(value: int, flag: str) -> None:
    if value < 1:
        raise InputError(f"{flag} {value}: expected an integer >= 1")


def add_arguments(p) -> None:
    p.add_argument("package", metavar="PKG", nargs="?", help="model package directory (or use --config)")
    p.add_argument("--config", metavar="NAME", help=f"a published size with random weights: {', '.join(CONFIG_NAMES)}")
    p.add_argument("--backend", default="auto", help="auto (default), torch, onnxruntime, tensorrt, tensorrt-rtx")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="with --config: weight dtype (default fp16 on a GPU, fp32 on the CPU); with PKG: must match it")
    p.add_argument("--batch", default="1", help="batch sizes for decode, comma-separated (default 1)")
    p.add_argument("--prompt-len", default="128,2048", help="prompt lengths for prefill/TTFT (default 128,2048)")
    p.add_argument("--steps", "--gen", dest="steps", type=int, default=None,
                   help=f"timed decode steps per batch size (default {MIN_STEPS}; at least {MIN_STEPS} without --quick)")
    p.add_argument("--warmup", type=int, default=20, help="untimed decode steps first (default 20)")
    p.add_argument("--prefill-reps", type=int, default=3, help="timed prefills per prompt length (default 3)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="tokens per prefill call (default: the session's)")
    p.add_argument("--bandwidth", default=None, help="memory bandwidth for the floor, e.g. 3.0TB/s (default: measured)")
    p.add_argument("--quick", action="store_true", help=f"allow fewer than {MIN_STEPS} steps (CI smoke runs; "
                   f"default {QUICK_STEPS})")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the result as JSON ('-': stdout only)")


def run(args) -> int:
    from .inspect import parse_bandwidth
    from .manifest import load_manifest

    if (args.package is None) == (args.config is None):
        raise InputError(f"expected a package directory or --config NAME (one of them), got "
                         f"{'both' if args.package else 'neither'}")
    batches = parse_counts(args.batch, "--batch")
    prompt_lens = parse_counts(args.prompt_len, "--prompt-len")
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else MIN_STEPS)
    if steps < (1 if args.quick else MIN_STEPS):
        raise InputError(f"--steps {steps}: expected at least {MIN_STEPS} (a p99 needs them; --quick allows fewer, for smoke tests)" if not args.quick
                         else f"--steps {steps}: expected an integer >= 1")
    _positive(args.warmup, "--warmup")
    _positive(args.prefill_reps, "--prefill-reps")
    if args.prefill_chunk is not None:
        _positive(args.prefill_chunk, "--prefill-chunk")
    bandwidth = parse_bandwidth(args.bandwidth) if args.bandwidth else None
    from ._optional import default_device

    device = args.device or default_device()
    kind, idx = check_device(device)
    out = sys.stderr if args.json == "-" else sys.stdout

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    backend = args.backend
    if args.config is not None:
        dtype = args.dtype or ("fp16" if kind == "cuda" else "fp32")
        check_batch_fits(bench_config(args.config), dtype, kind, idx, max(batches))  # before anything is exported
        if backend == "auto":  # the package kind depends on it: graphs only where a backend runs them
            backend = "torch" if kind == "cuda" else "onnxruntime"
        if backend in ("tensorrt", "tensorrt-rtx"):
            raise UnsupportedError(f"--config with --backend {backend}: engines are built into a package by "
                                   "`mamba-rt build`; export one, build it and pass PKG")
        pkg = config_package(args.config, dtype, graphs=backend != "torch", log=log)
        source = f"config {args.config} (random weights)"
    else:
        pkg, source = Path(args.package), str(args.package)
        m = load_manifest(pkg)
        if args.dtype and args.dtype != m.dtype:
            raise InputError(f"--dtype {args.dtype}: the package {pkg} is {m.dtype}; a package has one dtype "
                             f"(expected --dtype {m.dtype}, or export it again)")
    result = measure(pkg, backend, device, batches, prompt_lens, steps, args.warmup, args.prefill_reps,
                     bandwidth, args.prefill_chunk, log)
    result["source"] = source
    result["settings"]["quick"] = bool(args.quick)
    print(format_table(result), file=out)
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            print(f"wrote {args.json}", file=out)
    return 0
