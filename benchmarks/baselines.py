"""The baselines of ``benchmarks/run_suite.py``, each run in the suite's process on the same GPU.

* :func:`hf_mamba_decode`: Hugging Face transformers ``MambaForCausalLM.generate``. transformers binds
  mamba_ssm / causal_conv1d kernels when ``modeling_mamba`` is *imported*, so :func:`import_hf_mamba`
  must run before either can be found (the suite calls it first) for this row to be HF's own PyTorch path.
* :class:`MambaSsm`: mamba_ssm (state-spaces/mamba) from a source checkout, never installed or committed
  here, in two variants switched in one process (see the class).
* :class:`Llama`: a Llama-style Transformer of about the parameter count of a Mamba size
  (:func:`llama_config_like`), random weights, SDPA attention, a static KV cache: HF ``generate`` (eager,
  host overhead included) and one decode step replayed as a CUDA graph (validated against eager first).

Step timings use :class:`mamba_rt.bench.Timer` (CUDA events + wall), as the mamba-rt rows do; whole
``generate`` calls (HF, the Llama prefill and eager loop) are timed with ``perf_counter``.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from mamba_rt._gc import collector_paused
from mamba_rt.bench import Timer


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device: str) -> int | None:
    """torch.cuda.max_memory_allocated since the last reset; None on the CPU."""
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def package_weights(pkg) -> dict:
    """The package's canonical weights as CPU tensors memory-mapped from it."""
    from mamba_rt.manifest import load_manifest
    from mamba_rt.runtime.backend_torch import weights_as_tensors

    return weights_as_tensors(pkg, load_manifest(pkg))


def largest_fitting(try_batch, guess: int, cap: int) -> tuple[int | None, list]:
    """The largest power-of-two batch for which ``try_batch(b)`` does not run out of memory, searched
    from ``guess`` (doubling while it fits, halving while it does not), at most ``cap``. Returns
    (batch or None, [{"batch", "fits"}...])."""
    tried, best, b = [], None, max(1, min(cap, 1 << int(math.log2(max(1, guess)))))
    while 1 <= b <= cap:
        try:
            try_batch(b)
        except Exception as e:  # noqa: BLE001 -- only running out of memory ends the search quietly
            if not is_oom(e):
                raise
            free_cuda()
            tried.append({"batch": b, "fits": False})
            if best is not None:
                break
            b //= 2
            continue
        tried.append({"batch": b, "fits": True})
        best = b
        if b * 2 > cap or not tried[0]["fits"]:
            break
        b *= 2
    return best, tried


def timed_generate(model, ids, n: int, device: str, **kw) -> float:
    """Seconds of one greedy HF ``generate`` of exactly ``n`` new tokens."""
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, **kw)
    sync(device)
    if out.shape[1] != ids.shape[1] + n:  # stopped early: a rate per token would be wrong
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {n}")
    return time.perf_counter() - t0


# -- Hugging Face transformers MambaForCausalLM ---------------------------------------------------------
def import_hf_mamba() -> dict:
    """Import transformers' Mamba now, before mamba_ssm / causal_conv1d are importable: it binds their
    kernels at import time when it finds them, and the HF rows are meant to be its PyTorch path."""
    found = [n for n in ("mamba_ssm", "causal_conv1d", "selective_scan_cuda") if importlib.util.find_spec(n)]
    try:
        import transformers
        import transformers.models.mamba.modeling_mamba  # noqa: F401 -- the import is the point
    except ImportError as e:
        return {"error": f"transformers not importable: {e}"}
    return {"transformers": transformers.__version__, "kernel_packages_importable_at_import": found,
            "path": "PyTorch (no mamba_ssm kernels)" if not found else f"may use {found}"}


def hf_mamba_decode(config, weights: dict, dtype: torch.dtype, new_tokens: int = 32, prompt: int = 16,
                    device: str = "cuda") -> dict:
    """Greedy ``generate`` at batch 1: ms per token = wall time of a generate of ``new_tokens`` / its
    tokens (the prompt's prefill included, as a user sees it); ``step_ms`` = the difference of two
    lengths (decode steps only)."""
    import transformers

    hf_cfg = transformers.MambaConfig(
        vocab_size=config.padded_vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
        state_size=config.d_state, conv_kernel=config.d_conv, expand=config.expand, time_step_rank=config.dt_rank,
        intermediate_size=config.d_inner, use_bias=config.bias, use_conv_bias=config.conv_bias,
        residual_in_fp32=config.residual_in_fp32, layer_norm_epsilon=config.norm_epsilon,
        tie_word_embeddings=config.tie_embeddings)
    with torch.device(device):
        hf = transformers.MambaForCausalLM(hf_cfg).to(dtype).eval()
    hf.load_state_dict({("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v
                        for k, v in weights.items()}, strict=True)
    ids = torch.randint(0, config.vocab_size, (1, prompt), device=device)

    def gen(n):
        return timed_generate(hf, ids, n, device)

    with torch.no_grad():
        gen(4)  # warm-up
        reset_peak(device)
        short, full = gen(4), gen(4 + new_tokens)
    return {"median_ms": full / (4 + new_tokens) * 1e3, "p99_ms": None, "step_ms": (full - short) / new_tokens * 1e3,
            "timer": "wall (generate / new tokens)", "steps": 4 + new_tokens, "prompt": prompt,
            "peak_memory_bytes": peak_memory(device), "transformers": transformers.__version__}


# -- mamba_ssm --------------------------------------------------------------------------------------------
def ext_dirs(ext_dir) -> list[str]:
    """The folders under ``ext_dir`` (build_mamba_ssm_ext.py's --build-dir) that hold the .so files."""
    return sorted({str(p.parent) for p in Path(ext_dir).rglob("*.so")
                   if p.name.startswith(("selective_scan_cuda", "causal_conv1d_cuda"))})


class MambaSsm:
    """mamba_ssm imported from a source checkout, with its two Mamba-1 kernel variants switchable in one
    process. Its Mamba block (``mamba_ssm.modules.mamba_simple``) and ``selective_scan_interface`` look
    the kernels up as module globals at call time, so setting those attributes switches the variant;
    a CUDA graph bakes in what it captured, so each variant captures its own.

    * ``no-ext``: as mamba_ssm imports without its CUDA extensions (GitHub HEAD, pip install without
      MAMBA_KEEP_CUDA_BUILD): decode = Triton ``selective_state_update`` + PyTorch conv update; its Mamba-1
      prefill raises (``selective_scan_fn`` needs ``selective_scan_cuda``): recorded as such.
    * ``full``: ``selective_scan_cuda`` and ``causal_conv1d_cuda`` compiled for this GPU
      (build_mamba_ssm_ext.py), found in ``ext_dir``, with causal-conv1d's Python package from
      ``conv_src``: decode = Triton state update + ``causal_conv1d_update``; prefill = ``causal_conv1d_fn``
      + ``selective_scan_cuda``.
    """

    # (module, attribute) that the full variant fills and the no-ext variant empties
    _SWITCHED = [("mamba_ssm.ops.selective_scan_interface", n) for n in (
        "selective_scan_cuda", "causal_conv1d_fn", "causal_conv1d_fwd_function", "causal_conv1d_bwd_function",
        "causal_conv1d_update_function")] + [("mamba_ssm.modules.mamba_simple", n) for n in (
            "causal_conv1d_fn", "causal_conv1d_update")]

    def __init__(self, src, ext_dir=None, conv_src=None):
        self.unavailable: dict[str, str] = {}
        if ext_dir is None or conv_src is None:
            self.unavailable["full"] = "not built here (run_suite.py --mamba-ssm-ext DIR --causal-conv1d SRC)"
        else:
            sys.path[:0] = ext_dirs(ext_dir) + [str(conv_src)]
            try:  # surface an ABI or path problem here: mamba_ssm would swallow it as "not installed"
                for name in ("selective_scan_cuda", "causal_conv1d_cuda", "causal_conv1d"):
                    importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 -- recorded, the no-ext variant still runs
                self.unavailable["full"] = f"extensions from {ext_dir} do not import: {error_text(e)}"
        sys.path.insert(0, str(src))
        import mamba_ssm
        from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        from mamba_ssm.utils.generation import InferenceParams, update_graph_cache

        self.version, self.src = mamba_ssm.__version__, str(src)
        self.SsmConfig, self.LMHead, self.InferenceParams, self.update_graph_cache = (
            SsmConfig, MambaLMHeadModel, InferenceParams, update_graph_cache)
        self._full = {(m, n): getattr(sys.modules[m], n) for m, n in self._SWITCHED}
        if "full" not in self.unavailable and any(v is None for v in self._full.values()):
            self.unavailable["full"] = "mamba_ssm imported without the extensions: " + ", ".join(
                f"{m.rsplit('.', 1)[1]}.{n}" for (m, n), v in self._full.items() if v is None)

    def variants(self) -> list[str]:
        return ["no-ext"] + ([] if "full" in self.unavailable else ["full"])

    def use(self, variant: str) -> dict:
        """Switch to ``variant``; returns which kernels its Mamba block will call."""
        for (m, n), v in self._full.items():
            setattr(sys.modules[m], n, v if variant == "full" else None)
        simple = sys.modules["mamba_ssm.modules.mamba_simple"]
        ssi = sys.modules["mamba_ssm.ops.selective_scan_interface"]
        return {"selective_scan_cuda": ssi.selective_scan_cuda is not None,
                "causal_conv1d": simple.causal_conv1d_update is not None,
                "triton_state_update": simple.selective_state_update is not None}

    def model(self, config, weights: dict, dtype: torch.dtype):
        mc = self.SsmConfig(d_model=config.d_model, n_layer=config.n_layer, vocab_size=config.vocab_size,
                            ssm_cfg={"layer": "Mamba1", "d_state": config.d_state, "d_conv": config.d_conv,
                                     "expand": config.expand},
                            rms_norm=True, residual_in_fp32=config.residual_in_fp32, fused_add_norm=True,
                            pad_vocab_size_multiple=config.pad_vocab_size_multiple,
                            tie_embeddings=config.tie_embeddings)
        model = self.LMHead(mc, device="cuda", dtype=dtype).eval()
        model.load_state_dict(weights, strict=True)
        return model

    @torch.inference_mode()  # as its generate(): update_graph_cache makes inference tensors
    def decode(self, model, batch: int, steps: int, warmup: int) -> dict:
        """Its CUDA-graph decode step as ``generate(cg=True, top_k=1)`` runs it: the captured step
        (``update_graph_cache``), then greedy sampling of the logits; no prompt is needed for the timing
        (the state is fixed-size). Timed per step with CUDA events; the loop does not synchronise, as
        mamba_ssm's own does not."""
        vocab = model.lm_head.weight.shape[0]
        cache = self.update_graph_cache(model, None, batch, 1, steps + warmup + 2)
        tok = [torch.randint(0, vocab, (batch, 1), device="cuda")]
        pos = torch.zeros((batch, 1), dtype=torch.long, device="cuda")
        k = [1]

        def step():
            logits = cache.run(tok[0], pos, k[0])
            tok[0] = logits[:, -1].argmax(-1, keepdim=True)
            k[0] += 1

        for _ in range(warmup):
            step()
        return Timer(cuda=True).run(step, steps)

    @torch.inference_mode()
    def prefill(self, model, length: int, reps: int) -> dict:
        """What its generate does with a prompt: one forward with ``InferenceParams`` (the state-producing
        path), greedy first token back on the host (TTFT, as mamba-rt's ``prefill`` returns it)."""
        vocab = model.lm_head.weight.shape[0]
        ids = torch.randint(0, vocab, (1, length), device="cuda")

        def once():
            params = self.InferenceParams(max_seqlen=length + 1, max_batch_size=1)
            int(model(ids, inference_params=params, num_last_tokens=1).logits[0, -1].argmax())

        once()
        return Timer(cuda=True).run(once, reps)


# -- a Llama-style Transformer with a static KV cache ------------------------------------------------------
def llama_config_like(config, n_params: int, max_positions: int, kv_heads: int | None = None):
    """A LlamaConfig with Mamba ``config``'s width, vocabulary and tied head, head_dim 128, MLP width
    8/3·d rounded up to 256 (Llama's rule) and the number of layers that brings its parameter count
    nearest to ``n_params``. Multi-head attention unless ``kv_heads`` (grouped-query) is given."""
    import transformers

    h = config.d_model
    heads = max(1, h // 128)
    head_dim, kvh = h // heads, kv_heads or heads
    inter = 256 * math.ceil(8 * h / 3 / 256)
    per_layer = 2 * h * h + 2 * h * kvh * head_dim + 3 * h * inter + 2 * h
    layers = max(1, round((n_params - config.padded_vocab_size * h - h) / per_layer))
    return transformers.LlamaConfig(
        vocab_size=config.padded_vocab_size, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kvh, max_position_embeddings=max_positions,
        tie_word_embeddings=True, attn_implementation="sdpa")


class Llama:
    """``LlamaForCausalLM`` with random weights on the GPU, SDPA attention, static KV caches
    (``transformers.StaticCache``: preallocated for ``max_cache_len`` tokens; every decode step attends
    over all of them, masked, so its cost is that of a full cache)."""

    def __init__(self, cfg, dtype: torch.dtype, device: str = "cuda"):
        import transformers

        self.device = device
        with torch.device(device):
            self.model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
        impl = self.model.config._attn_implementation
        if impl != "sdpa":
            raise RuntimeError(f"LlamaForCausalLM uses attention {impl!r}, expected 'sdpa'")
        self.cfg, self.transformers = cfg, transformers.__version__
        self.params = sum(p.numel() for p in self.model.parameters())  # a tied head is one parameter
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype.itemsize

    def describe(self) -> dict:
        c = self.cfg
        return {"parameters": self.params, "hidden_size": c.hidden_size, "layers": c.num_hidden_layers,
                "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "mlp": c.intermediate_size,
                "attention": "sdpa", "cache": "transformers.StaticCache", "transformers": self.transformers,
                "kv_bytes_per_token": self.kv_bytes_per_token}

    def cache(self, length: int):
        from transformers import StaticCache

        return StaticCache(config=self.model.config, max_cache_len=length)

    @torch.no_grad()
    def forward(self, cache, ids, start: int):
        """Eager: ``ids`` (B, L) at positions start..start+L-1; the last position's logits (B, vocab)."""
        pos = torch.arange(start, start + ids.shape[1], device=self.device).expand(ids.shape[0], -1)
        return self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                          logits_to_keep=1).logits[:, -1]

    def prefill(self, cache, length: int, batch: int = 1, chunk: int = 4096) -> float:
        """Feed ``length`` random tokens in chunks (the mask of a chunk is chunk x max_cache_len);
        returns the seconds it took."""
        ids = torch.randint(0, self.cfg.vocab_size, (batch, length), device=self.device)
        sync(self.device)
        t0 = time.perf_counter()
        for a in range(0, length, chunk):
            self.forward(cache, ids[:, a:a + chunk], a)
        sync(self.device)
        return time.perf_counter() - t0

    @staticmethod
    def set_length(cache, n: int) -> None:
        """Where the next token is written (StaticLayer.cumulative_length, a device tensor, so a captured
        graph sees the change)."""
        for layer in cache.layers:
            layer.cumulative_length.fill_(n)

    @torch.no_grad()
    def capture(self, cache, batch: int):
        """One decode step captured as a CUDA graph: (graph, static ids, static positions, static logits).
        Each replay writes the next cache position (the cache's own counter, on the device)."""
        ids = torch.zeros((batch, 1), dtype=torch.long, device="cuda")
        pos = torch.zeros((batch, 1), dtype=torch.long, device="cuda")
        self.forward(cache, ids, 0)  # allocates the cache (lazily, on first use)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with collector_paused(), torch.cuda.graph(graph):
            logits = self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits
        return graph, ids, pos, logits

    @torch.no_grad()
    def validate_graph(self, steps: int = 6) -> dict:
        """Teacher-forced logits of ``steps`` graph replays against eager steps from an empty cache."""
        cache = self.cache(64)
        graph, ids, pos, logits = self.capture(cache, 1)
        toks = torch.randint(0, self.cfg.vocab_size, (steps,), device="cuda")
        cache.reset()
        ref = [self.forward(cache, toks[k].view(1, 1), k).float() for k in range(steps)]
        cache.reset()
        got = []
        for k in range(steps):
            ids.fill_(toks[k])
            pos.fill_(k)
            graph.replay()
            got.append(logits[:, -1].float().clone())
        err = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(got, ref))
        same = sum(int(g.argmax() == r.argmax()) for g, r in zip(got, ref))
        return {"max_rel_err": err, "argmax_agree": f"{same}/{steps}", "ok": err < 2e-2 and same == steps}

    @torch.no_grad()
    def graph_decode(self, cache, batch: int, start: int, steps: int, warmup: int) -> dict:
        """Greedy decode steps replayed from cache position ``start``; per-step CUDA events."""
        graph, ids, pos, logits = self.capture(cache, batch)
        self.set_length(cache, start)
        k = [start]

        def step():
            pos.fill_(k[0])
            graph.replay()
            ids.copy_(logits[:, -1:].argmax(-1))
            k[0] += 1

        for _ in range(warmup):
            step()
        return Timer(cuda=True).run(step, steps)

    @torch.no_grad()
    def eager_generate(self, cache, batch: int, new_tokens: int, prompt: int = 16) -> dict:
        """HF ``generate`` (greedy) with this static cache: ms per decode step = the difference of two
        lengths (prefill and setup cancel); eager PyTorch, host overhead included."""
        ids = torch.randint(0, self.cfg.vocab_size, (batch, prompt), device=self.device)

        def gen(n):
            cache.reset()
            return timed_generate(self.model, ids, n, self.device, past_key_values=cache)

        gen(2)
        # medians of three: one generate call's host jitter is of the order of a few decode steps
        short = statistics.median(gen(4) for _ in range(3))
        full = statistics.median(gen(4 + new_tokens) for _ in range(3))
        return {"median_ms": (full - short) / new_tokens * 1e3, "p99_ms": None, "steps": new_tokens,
                "timer": "wall (difference of the medians of two generate lengths)"}
