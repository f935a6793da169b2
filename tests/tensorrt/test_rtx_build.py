"""TensorRT-RTX builds of the portable graphs on the CPU (no GPU needed): real exported packages go
through TensorRT-RTX's ONNX parser (ONNX Scan, weights as external data) and builder; the engines' I/O
and profiles are checked against the manifest."""
from __future__ import annotations

import argparse
import hashlib
import json

import pytest

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13)")

from mamba_rt.errors import InputError  # noqa: E402
from mamba_rt.exporters import build_cli  # noqa: E402
from mamba_rt.exporters import tensorrt_build as tb  # noqa: E402
from mamba_rt.manifest import GRAPH_DECODE, GRAPH_PREFILL, load_manifest  # noqa: E402


@pytest.mark.parametrize("fixture", ["tiny_fp32", "tiny_fp16"])
def test_rtx_builds_both_portable_graphs(fixture, request):
    pkg, model = request.getfixturevalue(fixture)
    manifest = load_manifest(pkg)
    lines = []
    path, es = tb.build_engines(pkg, tb.TENSORRT_RTX, max_batch=4, max_prefill=64, progress=lines.append)

    assert path == pkg / tb.ENGINE_DIR / f"{es.stem}.json"
    assert es.stem == f"portable-{manifest.dtype}-any-sm80.86.89.120-rtx{trt.__version__}"
    assert [e.graph for e in es.engines] == [GRAPH_DECODE, GRAPH_PREFILL]
    for e in es.engines:
        data = (pkg / tb.ENGINE_DIR / e.file).read_bytes()
        assert len(data) == e.bytes > 100_000 and hashlib.sha256(data).hexdigest() == e.sha256
        # the parsed network's I/O, as recorded, is the manifest's
        tb.check_io(e.io, manifest.graphs[e.graph], e.file)
        conv = next(t for t in e.io if t.name == "conv_state")
        assert conv.dtype == {"fp32": "float32", "fp16": "float16"}[manifest.dtype]
        assert conv.shape == (model.config.n_layer, -1, model.config.d_inner, model.config.d_conv - 1)
    (dec,), (pre,) = es.engine(GRAPH_DECODE).profiles, es.engine(GRAPH_PREFILL).profiles
    assert (dec.batch, dec.seq, pre.batch, pre.seq) == ((1, 1, 4), (1, 1, 1), (1, 1, 4), (1, 64, 64))

    back = tb.EngineSet.from_dict(json.loads(path.read_text()), str(path))
    assert back.to_dict() == es.to_dict()
    assert (back.max_batch, back.max_prefill, back.model_id) == (4, 64, manifest.model_id())
    assert any("Building engine" in x for x in lines) and lines[-1].startswith(f"wrote {tb.ENGINE_DIR}/")
    assert not list((pkg / tb.ENGINE_DIR).glob("timing-*.cache"))  # TensorRT-RTX has no timing cache


def test_rtx_build_cli_and_choice_of_compute_capabilities(tiny_fp16, capsys):
    pkg, _ = tiny_fp16
    p = argparse.ArgumentParser()
    build_cli.add_arguments(p)
    args = p.parse_args([str(pkg), "--backend", "tensorrt-rtx", "--max-batch", "2", "--max-prefill", "16",
                         "--compute-capability", "8.6", "--quiet"])
    assert build_cli.run(args) == 0
    out = capsys.readouterr().out.split()
    stem = f"portable-fp16-any-sm86-rtx{trt.__version__}"
    assert [x.rsplit("/", 1)[1] for x in out] == [f"{stem}.decode.engine", f"{stem}.prefill.engine", f"{stem}.json"]
    es = tb.EngineSet.from_dict(json.loads((pkg / tb.ENGINE_DIR / f"{stem}.json").read_text()), "sidecar")
    assert es.target.compute_capabilities == ("8.6",) and es.max_batch == 2


def test_rtx_refuses_a_compute_capability_it_cannot_target(tiny_fp32):
    with pytest.raises(Exception, match="cannot target compute capability 9.0"):
        tb.build_engines(tiny_fp32[0], tb.TENSORRT_RTX, compute_capabilities=["9.0"])


def test_rtx_backend_refuses_the_cpu(tiny_fp32):
    from mamba_rt.runtime.tensorrt_backend import TensorRTRTXBackend

    manifest = load_manifest(tiny_fp32[0])
    assert TensorRTRTXBackend.unavailable_reason(manifest, "cpu") == "needs a CUDA device"
    with pytest.raises(InputError, match="runs on a CUDA device, got device 'cpu'"):
        TensorRTRTXBackend(tiny_fp32[0], device="cpu")
