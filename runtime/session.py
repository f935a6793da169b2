"""Sessions: a backend, its StateCache, a sampler and a tokenizer; prefill, step and generate.

A *slot* holds one sequence's recurrent state. The session also remembers, per slot, the *pending*
token: the last token sampled for the slot and not fed to the model yet. ``generate`` on an existing
slot feeds it first, so a conversation continues exactly where it stopped (snapshots carry it too).

Low level::

    s = Session.open("pkg/", backend="onnxruntime")
    slot = s.alloc()
    t = s.prefill(slot, ids)                      # feeds ids (in chunks), returns the next token
    t = s.step([slot], [t])[0]                     # feeds one token per slot, returns the next ones

High level::

    for tok in s.generate("Once upon a time", max_new_tokens=64, sampling=SamplingParams(0.8, top_p=0.9)):
        print(tok.text, end="")

Several prompts (of any lengths) decode together in one batch: ``s.generate(["a", "bcd"], ...)``
yields :class:`Token` events tagged with the prompt's index.

Every input is checked before any device work (token ids against the vocabulary, empty prompts,
slot ids, batch size), and a refused call leaves every slot's state as it was.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mamba_rt.errors import InputError, InternalError

from .backend import AUTO, Backend, load_backend
from .sampling import GREEDY, SamplingParams, derive_seed
from .state import StateCache
from .tokenizer import TextStream, Tokenizer, load_tokenizer


class Token(NamedTuple):
    """One generated token of sequence ``index``; ``text`` is the text it adds (possibly "", while a
    multi-byte character is incomplete). ``finish`` is None, or on the sequence's last token
    "length" (max_new_tokens reached) or "stop" (a stop token or stop string)."""

    index: int
    id: int
    text: str
    finish: str | None = None


class Generation(NamedTuple):
    """A finished sequence (``generate(..., stream=False)``)."""

    prompt_ids: list[int]
    ids: list[int]
    text: str
    finish: str


class _Pending:
    """StateCache companion: the per-slot pending token (see the module docstring)."""

    snapshot_key = "session"

    def __init__(self, max_batch: int, vocab: int):
        self.tokens: list[int | None] = [None] * max_batch
        self.vocab = vocab

    def reset_slot(self, slot):
        self.tokens[slot] = None

    def copy_slot(self, src, dst):
        self.tokens[dst] = self.tokens[src]

    def save_slot(self, slot):
        return {"pending": self.tokens[slot]}, {}

    def check_slot_state(self, meta, arrays):
        from .state import SnapshotError

        p = meta.get("pending") if isinstance(meta, dict) else "?"
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < self.vocab):
            raise SnapshotError(f"state snapshot: pending token {p!r} is not a token id of this model")

    def load_slot(self, slot, meta, arrays):
        self.tokens[slot] = meta.get("pending")


class Session:
    """A model package opened for generation. Context manager; ``close()`` frees the backend.

    ``run_ahead`` (default True): :meth:`generate` on slots of its own queues each decode step before
    handing out the tokens of the one before (see :meth:`decode`); False waits for every step's tokens
    first (the same tokens either way)."""

    run_ahead = True

    def __init__(self, backend: Backend, tokenizer: Tokenizer | None = None,
                 prefill_chunk: int | None = None):
        _check_chunk(prefill_chunk)
        self.backend = backend.activate()
        self.manifest = backend.manifest
        self.vocab = backend.vocab
        self.max_batch = backend.max_batch
        self.prefill_chunk = backend.prefill_chunk if prefill_chunk is None else prefill_chunk
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(backend.pkg_dir, backend.manifest)
        self.cache = StateCache(backend.state, backend.manifest)
        self.sampler = backend.make_sampler()
        self.cache.add_companion(self.sampler)
        self._pending = _Pending(self.max_batch, self.vocab)
        self.cache.add_companion(self._pending)
        # timings of the last generate(): prefill_s, decode_s, prompt_tokens, generated
        self.stats: dict = {}

    @classmethod
    def open(cls, pkg_dir: str | Path, backend: str = AUTO, device: str = "cpu", max_batch: int = 8,
             prefill_chunk: int | None = None, **options) -> "Session":
        """Open a model package; ``backend`` is 'auto', 'onnxruntime' or 'torch' (``options`` go to it).
        ``prefill_chunk``: prompt tokens per backend call (default: the backend's, 256, or 2048 for
        the torch backend with CUDA graphs, its default on a GPU)."""
        _check_chunk(prefill_chunk)  # before loading anything
        return cls(load_backend(pkg_dir, backend, device, max_batch, **options), prefill_chunk=prefill_chunk)

    def close(self) -> None:
        self.backend.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> str:
        return self.backend.describe()

    # -- slots (StateCache) ---------------------------------------------------------------------------
    def alloc(self, n: int | None = None):
        return self.cache.alloc(n)

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    def reset(self, slot: int) -> None:
        self.cache.reset(slot)

    def fork(self, slot: int) -> int:
        return self.cache.fork(slot)

    def snapshot(self, slot: int) -> bytes:
        return self.cache.snapshot(slot)

    def restore(self, slot: int, data: bytes) -> None:
        self.cache.restore(slot, data)

    def seed(self, slot: int, seed: int) -> None:
        """Start a new random stream for ``slot`` (generate seeds the slots it allocates itself)."""
        self.sampler.seed(self.cache.check_slot(slot), SamplingParams(seed=seed).seed)

    def pending(self, slot: int) -> int | None:
        return self._pending.tokens[self.cache.check_slot(slot)]

    # -- validation -----------------------------------------------------------------------------------
    def check_ids(self, ids, what: str = "prompt") -> np.ndarray:
        """``ids`` as an int64 vector of token ids of this model, or InputError naming the bad one."""
        if isinstance(ids, str):
            raise InputError(f"{what}: expected token ids, got a str (use generate() or tokenizer.encode)")
        a = np.asarray(ids)
        if a.ndim != 1:
            raise InputError(f"{what}: expected a flat sequence of token ids, got shape {list(a.shape)}")
        if a.size and (a.dtype.kind not in "iu"):
            raise InputError(f"{what}: expected integer token ids, got dtype {a.dtype}")
        a = a.astype(np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.vocab):
            i = int(np.flatnonzero((a < 0) | (a >= self.vocab))[0])
            raise InputError(f"{what}: token id {int(a[i])} at position {i} is outside the vocabulary "
                             f"(expected 0 <= id < {self.vocab})")
        return a

    def _check_slots(self, slots) -> np.ndarray:
        s = self.cache.check_slots(slots) if len(slots) else np.zeros(0, np.int64)
        if not s.size:
            raise InputError("slots: expected at least one slot")
        if np.unique(s).size != s.size:
            raise InputError(f"slots: each slot may appear once per step, got {s.tolist()}")
        return s

    # -- low level ------------------------------------------------------------------------------------
    def prefill(self, slot: int, ids, sampling: SamplingParams | None = None, return_logits: bool = False):
        """Feed ``ids`` (any length >= 1) to ``slot`` in chunks of ``prefill_chunk`` with the state
        carried; return the next token (sampled with ``sampling``, greedy by default) or, with
        ``return_logits``, the last position's logits (vocab,) float32 on the host."""
        slot = self.cache.check_slot(slot)
        ids = self.check_ids(ids)
        if ids.size == 0:
            raise InputError("prompt is empty: expected at least one token id")
        sampling = GREEDY if sampling is None else sampling
        slots = np.array([slot], np.int64)
        for a in range(0, ids.size, self.prefill_chunk):
            chunk = ids[None, a:a + self.prefill_chunk]
            logits = self.backend.forward(slots, chunk)
            self.sampler.observe(slots, chunk)
        return self._finish_step(slots, logits, sampling, return_logits)[0]

    def step(self, slots: Sequence[int], token_ids, sampling: SamplingParams | None = None,
             return_logits: bool = False) -> np.ndarray:
        """Feed ``token_ids[i]`` to ``slots[i]`` (one decode step for all of them together); return the
        next tokens (b,) int64, or with ``return_logits`` the logits (b, vocab) float32."""
        slots = self._check_slots(slots)
        ids = self.check_ids(token_ids, "token_ids")
        if ids.shape != slots.shape:
            raise InputError(f"token_ids: expected one id per slot ({len(slots)}), got {ids.size}")
        sampling = GREEDY if sampling is None else sampling
        logits = self.backend.forward(slots, ids[:, None])
        self.sampler.observe(slots, ids[:, None], logits)
        return self._finish_step(slots, logits, sampling, return_logits)

    def decode(self, slots: Sequence[int], steps: int, token_ids=None,
               sampling: SamplingParams | None = None) -> np.ndarray:
        """``steps`` decode steps of ``slots`` together, each feeding every slot the token the step
        before chose (the first feeds ``token_ids``, by default the slots' pending tokens); returns
        the chosen tokens, (steps, len(slots)) int64. Tokens, state and pending tokens afterwards are
        those of as many :meth:`step` calls; but where the backend can (the torch backend's fused
        decode graphs, greedy or sampled on the GPU, with or without a repetition penalty) each step is
        queued on the GPU, fed from the device, before the host reads the step before it, so the GPU
        never waits for the host."""
        run = self._step_run(slots, steps, token_ids, sampling)
        return np.stack([run.next() for _ in range(steps)])

    def _step_run(self, slots, steps: int, token_ids=None, sampling: SamplingParams | None = None) -> "_StepRun":
        """decode()'s loop as an object (the benchmarks time its ``next()`` per step)."""
        slots = self._check_slots(slots)
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InputError(f"steps: expected an integer >= 1, got {steps!r}")
        if token_ids is None:
            missing = [int(s) for s in slots if self._pending.tokens[s] is None]
            if missing:
                raise InputError(f"slots {missing} have no pending token (prefill or step them first, or "
                                 "pass token_ids)")
            token_ids = [self._pending.tokens[s] for s in slots]
        ids = self.check_ids(token_ids, "token_ids")
        if ids.shape != slots.shape:
            raise InputError(f"token_ids: expected one id per slot ({len(slots)}), got {ids.size}")
        sampling = GREEDY if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise InputError(f"sampling: expected SamplingParams, got {type(sampling).__name__}")
        return _StepRun(self, slots, ids, sampling, int(steps))

    def _finish_step(self, slots, logits, sampling, return_logits):
        if return_logits:
            for s in slots:
                self._pending.tokens[s] = None
            return self.backend.logits_to_host(logits)
        return self._hand_out(slots, self.sampler.sample(logits, slots, sampling))

    def _hand_out(self, slots, out: np.ndarray) -> np.ndarray:
        """``out`` (b,) become the slots' pending tokens."""
        for s, t in zip(slots.tolist(), out.tolist()):
            self._pending.tokens[s] = t
        return out

    # -- high level -----------------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 64, sampling: SamplingParams | None = None,
                 stop: Sequence[int | str] = (), stream: bool = True, slots: Sequence[int] | None = None):
        """Generate from one prompt or a list of prompts (text or token ids), decoding them together.

        ``slots=None`` uses fresh slots (seeded with ``derive_seed(sampling.seed, i)``) and frees them
        at the end; with ``slots`` the sequences continue those slots (their pending token is fed
        before the prompt, which may then be empty) and the slots stay allocated. ``stop``: token ids
        and/or strings ending a sequence. ``stream=True`` returns an iterator of :class:`Token`;
        ``stream=False`` a list of :class:`Generation`, one per prompt. Slots taken by a stream are
        freed when it is exhausted or closed (an abandoned generator is closed when collected).
        """
        prompts = [prompt] if isinstance(prompt, str) or _is_id_list(prompt) else list(prompt)
        if not prompts:
            raise InputError("prompt: expected a prompt or a non-empty list of prompts")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
        sampling = GREEDY if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise InputError(f"sampling: expected SamplingParams, got {type(sampling).__name__}")
        stop_ids = {int(x) for x in stop if not isinstance(x, str)}
        stop_strs = [x for x in stop if isinstance(x, str) and x]
        for i, p in enumerate(prompts):
            if not (isinstance(p, str) or _is_id_list(p)):
                raise InputError(f"prompt {i}: expected text or a list of token ids, got {type(p).__name__}")
        encoded = [self.check_ids(self.tokenizer.encode(p) if isinstance(p, str) else p,
                                  f"prompt {i}" if len(prompts) > 1 else "prompt") for i, p in enumerate(prompts)]
        if slots is None:
            if len(prompts) > self.cache.n_free:
                raise InputError(f"{len(prompts)} prompts but only {self.cache.n_free} free slots "
                                 f"(max_batch={self.max_batch}); open the session with a larger max_batch")
            own = True
            feeds = encoded
        else:
            slots = self._check_slots(slots).tolist()
            if len(slots) != len(prompts):
                raise InputError(f"slots: {len(slots)} given for {len(prompts)} prompts")
            own = False
            feeds = [np.concatenate([[self._pending.tokens[s]] if self._pending.tokens[s] is not None else [],
                                     e]).astype(np.int64) for s, e in zip(slots, encoded)]
        for i, f in enumerate(feeds):
            if f.size == 0:
                raise InputError(f"prompt {i} is empty and its slot has no pending token: expected at least "
                                 "one token")
        events = self._generate(encoded, feeds, slots, own, max_new_tokens, sampling, stop_ids, stop_strs)
        if stream:
            return events
        ids = [[] for _ in prompts]
        texts = ["" for _ in prompts]
        finish = ["length" for _ in prompts]
        for ev in events:
            ids[ev.index].append(ev.id)
            texts[ev.index] += ev.text
            finish[ev.index] = ev.finish or finish[ev.index]
        return [Generation(e.tolist(), i, t, f) for e, i, t, f in zip(encoded, ids, texts, finish)]

    def _generate(self, encoded, feeds, slots, own, max_new, sampling, stop_ids, stop_strs) -> Iterator[Token]:
        n = len(feeds)
        if own:
            slots = self.cache.alloc(n)
            for i, s in enumerate(slots):
                self.sampler.seed(s, derive_seed(sampling.seed, i))
        streams = [TextStream(self.tokenizer) for _ in range(n)]
        texts = ["" for _ in range(n)]
        counts = [0] * n
        tail = 2 * max([len(x) for x in stop_strs], default=0) + 64
        run = None  # the _StepRun of the active sequences, while they run a step ahead
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "prompt_tokens": int(sum(f.size for f in feeds)),
                      "generated": 0}
        try:
            t0 = time.perf_counter()
            nxt = [int(self.prefill(s, f, sampling)) for s, f in zip(slots, feeds)]
            self.stats["prefill_s"] = time.perf_counter() - t0
            active = list(range(n))
            while True:
                # Slots of its own (freed at the end) may run a step ahead: it is queued before this
                # step's tokens are handed out, fed them, and thrown away if a sequence stops on one.
                if own and self.run_ahead and run is None and counts[active[0]] + 1 < max_new:
                    t0 = time.perf_counter()  # (the active sequences' counts are all equal)
                    run = _StepRun(self, np.array([slots[i] for i in active], np.int64),
                                   np.array([nxt[i] for i in active], np.int64), sampling,
                                   max_new - counts[active[0]] - 1)
                    self.stats["decode_s"] += time.perf_counter() - t0
                still = []
                for i in active:
                    tok = nxt[i]
                    counts[i] += 1
                    self.stats["generated"] += 1
                    if tok in stop_ids:
                        yield Token(i, tok, streams[i].flush(), "stop")
                        continue
                    text = streams[i].push(tok)
                    texts[i] = (texts[i] + text)[-tail:]  # enough to see a stop string, no more
                    finish = None
                    if any(s in texts[i] for s in stop_strs):
                        finish = "stop"
                    elif counts[i] >= max_new:
                        finish = "length"
                    if finish:
                        text += streams[i].flush()
                    yield Token(i, tok, text, finish)
                    if finish is None:
                        still.append(i)
                if not still:
                    break
                t0 = time.perf_counter()
                rows = active  # a run's step in flight was fed every active sequence's token
                if run is not None and still == active:
                    out = run.next()
                elif run is not None:  # some stopped: the others' tokens, then a new run for them
                    out, run = run.close(), None
                else:
                    out, rows = self.step([slots[i] for i in still], [nxt[i] for i in still], sampling), still
                self.stats["decode_s"] += time.perf_counter() - t0
                for i, t in zip(rows, out.tolist()):
                    nxt[i] = t
                active = still
        finally:
            if own:
                for s in slots:
                    self.cache.free(s)


class _StepRun:
    """``limit`` decode steps of fixed ``slots`` (Session.decode, generate): the first fed ``ids``,
    each next one the tokens of the one before. ``next()`` returns the oldest unread step's tokens
    (observed by the sampler, the slots' pending tokens). Where the sampler leaves a step's tokens on
    the device (``Sampler.queue``: the torch backend; with a repetition penalty, its fused steps) it
    first queues the step after that one (``Backend.forward_next``), so at most two steps are unread;
    otherwise each step is read (sampled) as soon as it is queued. No step is queued past ``limit``."""

    def __init__(self, session: Session, slots: np.ndarray, ids: np.ndarray, sampling: SamplingParams,
                 limit: int):
        self.s, self.slots, self.sampling, self.left = session, slots, sampling, limit
        self.ahead = session.backend.runs_ahead
        self.fed = ids  # the ids the oldest unread step was fed
        # (what forward / forward_next returned, the step's tokens: host ids, or a call that reads them)
        self.flight: list = []
        self._queue(ids)

    def _queue(self, ids) -> bool:
        b, smp = self.s.backend, self.s.sampler
        out = b.forward(self.slots, ids[:, None]) if ids is not None else b.forward_next(self.slots, self.flight[-1][0])
        if out is None:
            return False
        self.left -= 1
        toks = smp.queue(out, self.slots, self.sampling) if self.ahead else None
        if toks is None:  # sampled now: the logits are the backend's until its next call
            if ids is None:
                raise InternalError("decode: a step queued ahead cannot be sampled on the host")
            smp.observe(self.slots, ids[:, None], out)
            toks = self.s._finish_step(self.slots, out, self.sampling, False)
        self.flight.append((out, toks))
        return True

    def next(self) -> np.ndarray:
        if not self.flight:
            raise InternalError(f"decode: all {len(self.slots)}-slot steps were read already")
        if self.left > 0 and len(self.flight) == 1 and callable(self.flight[0][1]):
            self._queue(None)
        toks = self._read()
        if self.left > 0 and not self.flight:
            self._queue(toks)
        return toks

    def close(self) -> np.ndarray | None:
        """Read what is still in flight; the last tokens read (None if there were none)."""
        toks = None
        while self.flight:
            toks = self._read()
        return toks

    def _read(self) -> np.ndarray:
        out, toks = self.flight.pop(0)
        if callable(toks):  # on the device until now: observed and handed out as it is read
            self.s.sampler.observe(self.slots, self.fed[:, None], out)
            toks = self.s._hand_out(self.slots, toks())
        self.fed = toks
        return toks


def _check_chunk(prefill_chunk) -> None:
    if prefill_chunk is None:
        return
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise InputError(f"prefill_chunk: expected an integer >= 1, got {prefill_chunk!r}")


def _is_id_list(p) -> bool:
    if isinstance(p, np.ndarray):
        return p.ndim == 1
    return isinstance(p, (list, tuple)) and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                                                for x in p) and (len(p) == 0 or not isinstance(p[0], (list, tuple)))
