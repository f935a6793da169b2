"""The whole TensorRT path, where TensorRT is importable and a GPU is present (``pytest -m tensorrt``):
build the plugin graph's engine (AOT and JIT plugins), run it through the backend against the reference
model (logits and state, prefill and decode, staged and direct state binding), generate exactly what the
ONNX Runtime backend generates in fp32, and refuse what the engine was not built for.

This is how a user with TensorRT checks their install; the project's own GPUs (compute capability 9.0)
cannot run it (README 'TensorRT, what ran where')."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mamba_rt.errors import InputError
from mamba_rt.exporters import tensorrt_build as tb
from tests.helpers import rel_err

pytestmark = pytest.mark.tensorrt

MAX_BATCH, MAX_PREFILL = 4, 32


@pytest.fixture(scope="module", params=["aot", "jit"])
def engine_pkg(request, tiny_fp32, tmp_path_factory):
    """A copy of the tiny fp32 package with a tensorrt engine built with ``params`` plugins."""
    import shutil

    pkg, model = tiny_fp32
    dst = tmp_path_factory.mktemp(f"trt-{request.param}") / "pkg"
    shutil.copytree(pkg, dst, ignore=shutil.ignore_patterns(tb.ENGINE_DIR))
    lines = []
    path, es = tb.build_engines(dst, tb.TENSORRT, max_batch=MAX_BATCH, max_prefill=MAX_PREFILL,
                                plugin_impl=request.param, progress=lines.append)
    assert es.engine("plugin").profiles[0].seq == (1, 1, 1)
    assert list((dst / tb.ENGINE_DIR).glob("timing-*.cache"))
    return dst, model, path


def _backend(pkg, **kw):
    """An activated backend with every slot zeroed (what StateCache.alloc would do)."""
    from mamba_rt.runtime.tensorrt_backend import TensorRTBackend

    b = TensorRTBackend(pkg, device="cuda", max_batch=MAX_BATCH, **kw).activate()
    for s in range(MAX_BATCH):
        b.state.zero(s)
    return b


def _reference(model, ids, state=None):
    import torch

    with torch.no_grad():
        logits, st = model(torch.as_tensor(ids), state, last_only=True)
    return logits.numpy(), st


def test_engine_matches_the_reference_model(engine_pkg):
    pkg, model, _ = engine_pkg
    rng = np.random.default_rng(0)
    b = _backend(pkg)
    try:
        slots = np.array([2, 0, 3])  # staged: a subset, out of order
        prompt = rng.integers(0, model.config.vocab_size, (3, 9))
        want, st = _reference(model, prompt)
        got = b.forward(slots, prompt)
        assert rel_err(got, want) < 1e-4
        for step in range(5):  # decode through CUDA graphs
            ids = rng.integers(0, model.config.vocab_size, (3, 1))
            want, st = _reference(model, ids, st)
            got = b.forward(slots, ids)
            assert rel_err(got, want) < 1e-4, f"decode step {step}"
        for i, s in enumerate(slots):
            conv, ssm = b.state.read(int(s))
            assert rel_err(conv, st.conv[:, i].numpy()) < 1e-4
            assert rel_err(ssm, st.ssm[:, i].numpy()) < 1e-4
        assert not b.state.read(1)[1].any()  # the slot outside the step is untouched
    finally:
        b.deactivate()


def test_direct_binding_over_every_slot(engine_pkg):
    pkg, model, _ = engine_pkg
    rng = np.random.default_rng(1)
    b = _backend(pkg)
    try:
        slots = np.arange(MAX_BATCH)
        st = None
        for step in range(4):  # ping-pong: the state buffers swap every step
            ids = rng.integers(0, model.config.vocab_size, (MAX_BATCH, 1))
            want, st = _reference(model, ids, st)
            assert rel_err(b.forward(slots, ids), want) < 1e-4, f"step {step}"
        conv, ssm = b.state.read(3)
        assert rel_err(ssm, st.ssm[:, 3].numpy()) < 1e-4
    finally:
        b.deactivate()


def test_generation_identical_to_onnxruntime(engine_pkg):
    pytest.importorskip("onnxruntime")
    from mamba_rt.runtime import Session

    pkg, model, _ = engine_pkg
    prompts = [[5, 17, 3, 99, 42], [7, 7, 7]]
    with Session(_backend(pkg)) as trt_s, Session.open(pkg, backend="onnxruntime", max_batch=MAX_BATCH) as ort_s:
        a = [g.ids for g in trt_s.generate(prompts, max_new_tokens=12, stream=False)]
        b = [g.ids for g in ort_s.generate(prompts, max_new_tokens=12, stream=False)]
    assert a == b


def test_requests_beyond_the_engine_are_refused(engine_pkg):
    from mamba_rt.runtime.tensorrt_backend import TensorRTBackend

    pkg, _, _ = engine_pkg
    with pytest.raises(InputError, match=f"max_batch 8: engine .* was built for at most {MAX_BATCH} sequences"):
        TensorRTBackend(pkg, device="cuda", max_batch=8)
    b = _backend(pkg)
    try:
        with pytest.raises(InputError, match=f"prefill of {MAX_PREFILL + 1} tokens"):
            b.forward(np.array([0]), np.zeros((1, MAX_PREFILL + 1), np.int64))
    finally:
        b.deactivate()


def test_engine_of_another_version_is_refused(engine_pkg, tmp_path):
    from mamba_rt.runtime.tensorrt_backend import TensorRTBackend

    pkg, _, sidecar = engine_pkg
    d = json.loads(sidecar.read_text())
    d["version"] = "9.9.9"
    other = tmp_path / sidecar.name
    other.write_text(json.dumps(d))
    with pytest.raises(tb.EngineMismatchError, match="TensorRT 9.9.9; this machine has .*TensorRT"):
        TensorRTBackend(pkg, device="cuda", max_batch=1, engine=other)
