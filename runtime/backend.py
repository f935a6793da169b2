"""Execution backends: the common runner interface, the registry and ``auto``.

Each backend is one module with the same two roles (after Polygraphy): a *loader* that turns a model
package into what it runs (``OrtSessionsFromPackage``, ``TorchModelFromPackage``) and a *runner*, a
:class:`Backend` subclass that runs it on the state in its own :class:`StateBuffers`.

Runner lifecycle: ``activate()`` loads and allocates (the state for ``max_batch`` sequences, once),
``deactivate()`` frees; runners are context managers. ``forward`` validates, then calls
``_forward_impl``. Token ids are checked by the :class:`~mamba_rt.runtime.session.Session` before
any device work.

Registry: name -> ``module:Class``; modules are imported only when chosen, so ``import
mamba_rt.runtime`` imports neither torch nor onnxruntime.
"""
from __future__ import annotations

import abc
import importlib
from pathlib import Path

import numpy as np

from mamba_rt.errors import InputError, InternalError, MambaRTError
from mamba_rt.manifest import GRAPH_DECODE, GRAPH_PREFILL, Manifest, load_manifest

from .sampling import HostSampler, Sampler
from .state import StateBuffers

BACKENDS: dict[str, str] = {
    "onnxruntime": "mamba_rt.runtime.backend_onnxruntime:OnnxRuntimeBackend",
    "torch": "mamba_rt.runtime.backend_torch:TorchBackend",
    "tensorrt": "mamba_rt.runtime.tensorrt_backend:TensorRTBackend",
    "tensorrt-rtx": "mamba_rt.runtime.tensorrt_backend:TensorRTRTXBackend",
}
AUTO = "auto"


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' | 'cuda' | 'cuda:N' -> (kind, index)."""
    if not isinstance(device, str):
        raise InputError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    kind, _, idx = device.partition(":")
    if kind == "cpu" and not idx:
        return "cpu", 0
    if kind == "cuda" and (not idx or idx.isdigit()):
        return "cuda", int(idx or 0)
    raise InputError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def batch_bucket(n: int, max_batch: int) -> int:
    """The smallest of 1, 2, 4, ..., max_batch holding ``n`` rows: the fixed batch sizes of captured
    decode graphs."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max_batch)


class Backend(abc.ABC):
    """A runner: one model package on one device, state for ``max_batch`` sequences.

    ``forward(slots, ids)`` feeds ``ids[i]`` (shape (b, L), int64) to the sequence in ``slots[i]``,
    updates those slots' state in place (every other slot is untouched) and returns the logits of
    the last position, (b, vocab) float32, in the backend's own memory (see ``logits_to_host``).
    """

    name = "abstract"
    #: prompt tokens per ``forward`` a Session feeds by default (its ``prefill_chunk``)
    prefill_chunk = 256
    #: True where the ids ``make_sampler().queue`` leaves on the device stay readable after later
    #: calls (the torch backend's CUDA graphs keep them): only then may a caller queue another step
    #: (``forward_next``) before reading them
    runs_ahead = False

    def __init__(self, pkg_dir: str | Path, device: str = "cpu", max_batch: int = 8,
                 manifest: Manifest | None = None):
        self.pkg_dir = Path(pkg_dir)
        self.manifest = manifest if manifest is not None else load_manifest(pkg_dir)
        self.device = device
        self.device_kind, self.device_index = parse_device(device)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch: expected an integer >= 1, got {max_batch!r}")
        self.max_batch = max_batch
        self.config = self.manifest.config
        self.vocab = self.config.vocab_size
        self.state: StateBuffers | None = None
        self.active = False

    # -- lifecycle ----------------------------------------------------------------------------------
    def activate(self) -> "Backend":
        if not self.active:
            self._activate_impl()
            if self.state is None or self.state.max_batch != self.max_batch:
                raise InternalError(f"{self.name}: activate did not allocate state for {self.max_batch} sequences")
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self._deactivate_impl()
            self.state = None
            self.active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    # -- running ------------------------------------------------------------------------------------
    def forward(self, slots, ids: np.ndarray):
        if not self.active:
            raise InternalError(f"{self.name} backend used before activate()")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] < 1 or slots.shape != (ids.shape[0],):
            raise InternalError(f"forward: ids {ids.shape} and slots {slots.shape} do not agree")
        return self._forward_impl(slots, ids)

    def forward_next(self, slots, after):
        """Queue the decode step after ``after`` (what the last ``forward`` or ``forward_next`` call
        returned, a decode step of these ``slots``): each slot fed the token chosen for it on the
        device (by the sampler's ``queue``: the greedy argmax, or a draw), without waiting for it.
        Returns what ``forward`` returns, or None where this backend cannot or something else ran
        since ``after`` (the caller then reads the tokens of ``after`` and feeds them to
        ``forward``). With a repetition penalty only where the sampler keeps the seen-token mask on the
        device too (the torch backend's fused decode steps)."""
        return None

    def make_sampler(self) -> Sampler:
        """A sampler that works on this backend's logits (host numpy unless overridden)."""
        return HostSampler(self.max_batch, self.vocab)

    def logits_to_host(self, logits) -> np.ndarray:
        """A host copy the caller owns (``forward`` may return a view of a buffer reused next call)."""
        return np.array(logits, dtype=np.float32, copy=True)

    def describe(self) -> str:
        return f"{self.name} on {self.device}"

    # -- hooks --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _activate_impl(self) -> None: ...

    def _deactivate_impl(self) -> None:
        pass

    @abc.abstractmethod
    def _forward_impl(self, slots: np.ndarray, ids: np.ndarray): ...

    # -- capability ---------------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls, manifest: Manifest, device: str) -> str | None:
        """None when this backend can run ``manifest`` on ``device`` here, else why not (cheap: no
        model is loaded)."""
        return None


def backend_class(name: str) -> type[Backend]:
    """The runner class of backend ``name`` (its module imported now). A backend whose engine library
    is missing raises MissingDependencyError naming the extra."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}: expected one of {sorted(BACKENDS) + [AUTO]}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _why_unavailable(name: str, manifest: Manifest, device: str) -> str | None:
    try:
        return backend_class(name).unavailable_reason(manifest, device)
    except ImportError as e:  # MissingDependencyError included: the message names the extra
        return str(e)


# preference order for `auto`, per device kind (the TensorRT backends are chosen by name only: whether
# an engine was built for this GPU is known only when the package is opened)
_AUTO_ORDER = {"cpu": ("onnxruntime", "torch"), "cuda": ("torch", "onnxruntime")}


def choose_backend(manifest: Manifest, device: str = "cpu") -> tuple[str, str]:
    """The best backend available for ``manifest`` on ``device``: (name, why)."""
    kind, _ = parse_device(device)
    why_not = []
    for name in _AUTO_ORDER[kind]:
        reason = _why_unavailable(name, manifest, device)
        if reason is None:
            skipped = f" ({'; '.join(why_not)})" if why_not else ""
            return name, f"auto chose {name} on {device}{skipped}"
        why_not.append(f"{name}: {reason}")
    raise MambaRTError(f"no backend can run this package on {device}: " + "; ".join(why_not))


def load_backend(pkg_dir: str | Path, backend: str = AUTO, device: str = "cpu", max_batch: int = 8,
                 **options) -> Backend:
    """Open ``pkg_dir`` with the named backend (or ``auto``), activated. The chosen backend's
    ``choice`` attribute says why it was picked."""
    if not isinstance(backend, str) or (backend != AUTO and backend not in BACKENDS):
        raise InputError(f"unknown backend {backend!r}: expected one of {sorted(BACKENDS) + [AUTO]}")
    parse_device(device)
    manifest = load_manifest(pkg_dir)
    if backend == AUTO:
        name, why = choose_backend(manifest, device)
    else:
        name, why = backend, f"{backend} on {device} (asked for)"
        reason = backend_class(name).unavailable_reason(manifest, device)  # a missing library raises here
        if reason is not None:
            raise MambaRTError(f"backend {name!r} cannot run {pkg_dir} on {device}: {reason}")
    b = backend_class(name)(pkg_dir, device=device, max_batch=max_batch, manifest=manifest, **options)
    b.choice = why
    return b.activate()


def portable_graphs_reason(manifest: Manifest) -> str | None:
    """Why the portable ONNX graphs cannot be used, or None."""
    if GRAPH_PREFILL not in manifest.graphs and GRAPH_DECODE not in manifest.graphs:
        return f"the package has no portable graph ({GRAPH_PREFILL!r} or {GRAPH_DECODE!r})"
    return None

