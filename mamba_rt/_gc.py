"""Python's cyclic garbage collector paused for a block of code (torch-free: the runtime's CUDA graph
captures and the benchmark timer both use it)."""
from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def collector_paused():
    """The collector paused for the block (then as it was before, after an exception too); garbage made or
    left inside is collected at the next collection after it. Around a CUDA graph capture: a collection that
    falls inside a capture runs the destructors of whatever unreachable objects it finds, and one of those
    that touches the GPU in a way a capture forbids aborts the process (the GPU tests aborted so with a fresh
    kernel cache; torch's own ``torch.cuda.graph`` no longer collects first). Around a timed loop, as
    ``timeit`` does: a collection inside would pause a call and free what the caller left behind."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
