"""The mamba-rt runtime: state buffers, sessions, sampling and generation over model packages.

``import mamba_rt.runtime`` needs numpy only: the backends import their engine (onnxruntime, torch)
when they are chosen. Entry points::

    from mamba_rt.runtime import Session, SamplingParams
    with Session.open("pkg/", backend="auto", device="cpu", max_batch=8) as s:
        for tok in s.generate("Hello", max_new_tokens=32):
            print(tok.text, end="", flush=True)
"""
from .backend import AUTO, BACKENDS, Backend, choose_backend, load_backend
from .sampling import GREEDY, HostSampler, Sampler, SamplingParams, derive_seed, sample_numpy
from .session import Generation, Session, Token
from .state import HostStateBuffers, SnapshotError, StateBuffers, StateCache
from .tokenizer import ByteTokenizer, HFTokenizer, TextStream, Tokenizer, load_tokenizer

__all__ = [
    "AUTO", "BACKENDS", "Backend", "choose_backend", "load_backend",
    "GREEDY", "HostSampler", "Sampler", "SamplingParams", "derive_seed", "sample_numpy",
    "Generation", "Session", "Token",
    "HostStateBuffers", "SnapshotError", "StateBuffers", "StateCache",
    "ByteTokenizer", "HFTokenizer", "TextStream", "Tokenizer", "load_tokenizer",
]
