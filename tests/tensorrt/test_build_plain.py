"""Engine building's plain tier (no TensorRT): profile ranges, precision, names, the sidecar, the
GPU/version/package mismatch checks, I/O checks, the plugin-graph rewrite and progress lines."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from mamba_rt.errors import InputError
from mamba_rt.exporters import tensorrt_build as tb
from mamba_rt.manifest import GRAPH_DECODE, GRAPH_PLUGIN, GRAPH_PREFILL, PackageError, load_manifest

H100 = tb.Target(tb.TENSORRT, "10.13.3.9", "NVIDIA H100 80GB HBM3", ("9.0",))


@pytest.fixture(scope="module")
def manifest(tiny_fp32):
    return load_manifest(tiny_fp32[0])


# -- profiles ------------------------------------------------------------------------------------------


def test_tensorrt_profiles_one_graph_two_profiles(manifest):
    plans = tb.plan_profiles(manifest, tb.TENSORRT, max_batch=8, max_prefill=512)
    assert list(plans) == [GRAPH_PLUGIN]
    dec, pre = plans[GRAPH_PLUGIN]
    c = manifest.config
    assert (dec.name, dec.batch, dec.seq) == ("decode", (1, 1, 8), (1, 1, 1))
    assert (pre.name, pre.batch, pre.seq) == ("prefill", (1, 1, 8), (2, 256, 512))
    assert dec.shapes["input_ids"] == ((1, 1), (1, 1), (8, 1))
    assert pre.shapes["input_ids"] == ((1, 2), (1, 256), (8, 512))
    k1 = c.d_conv - 1
    assert pre.shapes["conv_state"] == ((c.n_layer, 1, c.d_inner, k1), (c.n_layer, 1, c.d_inner, k1),
                                        (c.n_layer, 8, c.d_inner, k1))
    assert dec.shapes["ssm_state"][2] == (c.n_layer, 8, c.d_inner, c.d_state)


def test_rtx_profiles_two_graphs(manifest):
    plans = tb.plan_profiles(manifest, tb.TENSORRT_RTX, max_batch=4, max_prefill=64, opt_batch=2, opt_prefill=32)
    assert list(plans) == [GRAPH_DECODE, GRAPH_PREFILL]
    (dec,), (pre,) = plans[GRAPH_DECODE], plans[GRAPH_PREFILL]
    assert (dec.batch, dec.seq) == ((1, 2, 4), (1, 1, 1))
    assert (pre.batch, pre.seq) == ((1, 2, 4), (1, 32, 64))  # starts at 1: see plan_profiles
    assert dec.shapes["input_ids"] == ((1, 1), (2, 1), (4, 1))  # the decode graph's seq is a fixed 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_batch=0), "max_batch: expected an integer in \\[1, 65535\\], got 0"),
    (dict(max_batch=True), "max_batch: .* got True"),
    (dict(max_batch=70000), "max_batch: .* got 70000"),
    (dict(max_prefill=1), "max_prefill: expected an integer >= 2, got 1"),
    (dict(opt_batch=9), "opt_batch: expected an integer in \\[1, 8\\], got 9"),
    (dict(opt_prefill=1), "opt_prefill: expected an integer in \\[2, 2048\\], got 1"),
])
def test_profile_arguments_are_checked(manifest, kwargs, match):
    args = dict(max_batch=8, max_prefill=2048)
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        tb.plan_profiles(manifest, tb.TENSORRT, **args)


def test_profiles_need_the_graphs(manifest):
    m = dataclasses.replace(manifest, graphs={k: v for k, v in manifest.graphs.items() if k != GRAPH_PLUGIN})
    with pytest.raises(tb.EngineBuildError, match="builds the graph\\(s\\) \\['plugin'\\].*re-export"):
        tb.plan_profiles(m, tb.TENSORRT)
    g = manifest.graphs[GRAPH_PREFILL]
    bad = dataclasses.replace(g, inputs=[dataclasses.replace(g.inputs[0], shape=["batch", "tokens"])])
    with pytest.raises(tb.EngineBuildError, match="input input_ids has dimension 'tokens'"):
        tb.profile_shapes(bad, (1, 1, 1), (1, 1, 1))


# -- precision and names -------------------------------------------------------------------------------


def test_precision_is_the_package_dtype(manifest):
    assert tb.resolve_precision(None, manifest) == "fp32"
    assert tb.resolve_precision("fp32", manifest) == "fp32"
    with pytest.raises(tb.EngineBuildError, match="fp16 requested, but the package was exported in fp32.*"
                                                  "--dtype fp16.*--precision fp32"):
        tb.resolve_precision("fp16", manifest)
    with pytest.raises(InputError, match="precision 'int8'"):
        tb.resolve_precision("int8", manifest)


def test_engine_names_encode_gpu_cc_and_version():
    assert H100.stem("fp16") == "model-fp16-nvidia-h100-80gb-hbm3-sm90-trt10.13.3.9"
    rtx = tb.rtx_target("1.7.1.116", None)
    assert rtx.stem("bf16") == "portable-bf16-any-sm80.86.89.120-rtx1.7.1.116"
    assert tb.slug("  GeForce RTX 4090 / D ") == "geforce-rtx-4090-d"
    with pytest.raises(InputError, match="compute capability '9'"):
        tb.Target(tb.TENSORRT, "10.0", "x", ("9",))


# -- sidecar and mismatch checks ------------------------------------------------------------------------


def _engine_set(manifest, target=H100, **over):
    plans = tb.plan_profiles(manifest, target.backend, 8, 512)
    engines = [tb.EngineFile(f"{target.stem('fp32')}.engine", g, ps, tb.expected_io(manifest.graphs[g]), "ab" * 32, 10)
               for g, ps in plans.items()]
    es = tb.EngineSet(target, "fp32", 8, 512, manifest.model_id(), engines, "aot")
    return dataclasses.replace(es, **over)


def test_sidecar_round_trip(manifest, tmp_path):
    es = _engine_set(manifest)
    p = es.save(tmp_path)
    assert p.name == H100.stem("fp32") + ".json"
    back = tb.EngineSet.from_dict(json.loads(p.read_text()), str(p))
    assert back.to_dict() == es.to_dict()
    assert back.engine(GRAPH_PLUGIN).profiles[1].seq == (2, 256, 512)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(format="other"), "not a mamba-rt engine sidecar"),
    (lambda d: d.update(format_version=2), "sidecar format version 2, this mamba-rt reads 1"),
    (lambda d: d.pop("max_batch"), "malformed engine sidecar \\(KeyError"),
    (lambda d: d.update(compute_capabilities=["nine"]), "malformed engine sidecar .*compute capability 'nine'"),
])
def test_sidecar_refuses_bad_content(manifest, edit, match):
    d = _engine_set(manifest).to_dict()
    edit(d)
    with pytest.raises(PackageError, match=match):
        tb.EngineSet.from_dict(d, "x.json")


def test_compatible_engine_passes(manifest):
    tb.check_compatible(_engine_set(manifest), H100, manifest)
    rtx = tb.rtx_target("1.7.1", None)
    tb.check_compatible(_engine_set(manifest, rtx), dataclasses.replace(rtx, gpu_name="NVIDIA RTX A6000",
                                                                        compute_capabilities=("8.6",)), manifest)


@pytest.mark.parametrize("current,match", [
    (dataclasses.replace(H100, version="10.14.1"),
     "built with NVIDIA H100 80GB HBM3 \\(compute capability 9.0\\), TensorRT 10.13.3.9; this machine has "
     "NVIDIA H100 80GB HBM3 \\(compute capability 9.0\\), TensorRT 10.14.1"),
    (dataclasses.replace(H100, gpu_name="NVIDIA A100-SXM4-80GB", compute_capabilities=("8.0",)),
     "built for NVIDIA H100 80GB HBM3 \\(compute capability 9.0\\).*this GPU is NVIDIA A100-SXM4-80GB "
     "\\(compute capability 8.0\\)"),
    (dataclasses.replace(H100, gpu_name="NVIDIA H200"),
     "built on NVIDIA H100 80GB HBM3 .*this GPU is NVIDIA H200 \\(compute capability 9.0\\)"),
    (dataclasses.replace(H100, backend=tb.TENSORRT_RTX), "built for backend tensorrt, not tensorrt-rtx"),
])
def test_mismatch_is_refused_naming_both(manifest, current, match):
    with pytest.raises(tb.EngineMismatchError, match=match):
        tb.check_compatible(_engine_set(manifest), current, manifest)


def test_rtx_engine_refused_on_hopper(manifest):
    rtx = tb.rtx_target("1.7.1", None)
    hopper = tb.Target(tb.TENSORRT_RTX, "1.7.1", "NVIDIA H100 80GB HBM3", ("9.0",))
    with pytest.raises(tb.EngineMismatchError, match="compute capability 8.0, 8.6, 8.9, 12.0.*this GPU is "
                                                     "NVIDIA H100 80GB HBM3 \\(compute capability 9.0\\)"):
        tb.check_compatible(_engine_set(manifest, rtx), hopper, manifest)


def test_engine_from_another_export_is_refused(manifest):
    es = _engine_set(manifest, model_id="0123456789abcdef-fp32")
    with pytest.raises(tb.EngineMismatchError, match="built from model 0123456789abcdef-fp32, the package now "
                                                     f"holds {manifest.model_id()}"):
        tb.check_compatible(es, H100, manifest)


def test_find_engine_set_picks_the_one_for_this_gpu(manifest, tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / tb.ENGINE_DIR).mkdir(parents=True)
    a100 = tb.Target(tb.TENSORRT, "10.13.3.9", "NVIDIA A100-SXM4-80GB", ("8.0",))
    _engine_set(manifest, a100).save(pkg / tb.ENGINE_DIR)
    with pytest.raises(tb.EngineMismatchError, match="A100.*this GPU is NVIDIA H100"):
        tb.find_engine_set(pkg, H100, manifest)
    _engine_set(manifest, H100).save(pkg / tb.ENGINE_DIR)
    p, es = tb.find_engine_set(pkg, H100, manifest)
    assert p.name == H100.stem("fp32") + ".json" and es.target == H100
    with pytest.raises(PackageError, match="no tensorrt engine in bf16"):
        tb.find_engine_set(pkg, H100, manifest, precision="bf16")
    with pytest.raises(PackageError, match="no tensorrt-rtx engine .*--backend tensorrt-rtx"):
        tb.find_engine_set(pkg, tb.rtx_target("1.7", None), manifest)


def test_engine_file_must_be_the_recorded_bytes(tmp_path):
    ef = tb.EngineFile("e.engine", GRAPH_PLUGIN, [], [], "", 0)
    with pytest.raises(PackageError, match="e.engine: engine file is missing"):
        tb.verify_engine_file(tmp_path, ef)
    (tmp_path / "e.engine").write_bytes(b"engine bytes")
    import hashlib

    ef = dataclasses.replace(ef, sha256=hashlib.sha256(b"engine bytes").hexdigest(), bytes=12)
    assert tb.verify_engine_file(tmp_path, ef) == b"engine bytes"
    (tmp_path / "e.engine").write_bytes(b"engine byte")
    with pytest.raises(PackageError, match="11 bytes with another hash than the 12 bytes"):
        tb.verify_engine_file(tmp_path, ef)


# -- I/O checks ----------------------------------------------------------------------------------------


def test_io_check(manifest):
    g = manifest.graphs[GRAPH_PLUGIN]
    io = tb.expected_io(g)
    assert [(t.name, t.mode) for t in io] == [("input_ids", "input"), ("conv_state", "input"), ("ssm_state", "input"),
                                              ("logits", "output"), ("conv_state_out", "output"),
                                              ("ssm_state_out", "output")]
    tb.check_io(io, g, "engine")
    c = manifest.config
    rows = [
        ([t for t in io if t.name != "ssm_state"], "input 'ssm_state' is missing"),
        (io + [tb.IOTensor("extra", "output", "float32", (1,))], "unexpected output 'extra'"),
        ([dataclasses.replace(t, dtype="float16") if t.name == "conv_state" else t for t in io],
         "'conv_state' has dtype float16, expected float32"),
        ([dataclasses.replace(t, shape=(-1, 7)) if t.name == "logits" else t for t in io],
         f"'logits' has shape \\[-1, 7\\], expected \\[-1, {c.vocab_size}\\]"),
    ]
    for actual, match in rows:
        with pytest.raises(tb.EngineMismatchError, match=match):
            tb.check_io(actual, g, "engine x")


# -- the plugin graph for TensorRT's parser -------------------------------------------------------------


def test_plugin_nodes_get_the_parser_attributes(tiny_fp32):
    onnx = pytest.importorskip("onnx")
    pkg, model = tiny_fp32
    m = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    n = tb.tag_plugin_nodes(m, aot=True)
    assert n == 2 * model.config.n_layer
    for node in m.graph.node:
        if node.domain == "mamba_rt":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["plugin_namespace"] == b"mamba_rt" and attrs["aot"] == 1
            assert ("activation" in attrs) == (node.op_type == "CausalConv1d")
    assert tb.tag_plugin_nodes(m, aot=False) == n  # re-tagging replaces, never duplicates
    node = next(x for x in m.graph.node if x.domain == "mamba_rt")
    assert [a.name for a in node.attribute].count("aot") == 1
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "aot")) == 0


def test_unknown_custom_op_is_refused():
    onnx = pytest.importorskip("onnx")
    h = onnx.helper
    node = h.make_node("Fancy", ["x"], ["y"], domain="acme", name="n0")
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    with pytest.raises(tb.EngineBuildError, match="node 'n0': op acme::Fancy has no TensorRT plugin"):
        tb.tag_plugin_nodes(h.make_model(g))


# -- progress ------------------------------------------------------------------------------------------


def test_progress_lines_are_few_and_nested():
    lines = []
    p = tb.ProgressPrinter(lines.append, prefix="[1/1 model.onnx] ", max_depth=2, updates=4)
    p.phase_start("Building engine", None, 6)
    p.phase_start("Cloning", "Building engine", 100)
    for i in range(100):
        assert p.step_complete("Cloning", i) is True
    p.phase_start("Deep", "Cloning", 5)  # third level: silent
    p.step_complete("Deep", 0)
    p.phase_finish("Deep")
    p.phase_finish("Cloning")
    p.step_complete("Building engine", 0)
    p.phase_finish("Building engine")
    assert lines == ["[1/1 model.onnx] Building engine (0/6)", "[1/1 model.onnx]   Cloning (0/100)",
                     "[1/1 model.onnx]   Cloning 25/100", "[1/1 model.onnx]   Cloning 50/100",
                     "[1/1 model.onnx]   Cloning 75/100", "[1/1 model.onnx]   Cloning 100/100"]


# -- the CLI module --------------------------------------------------------------------------------------


def test_cli_modules_import_nothing_heavy():
    code = ("import sys, mamba_rt.exporters.build_cli, mamba_rt.exporters.tensorrt_build, "
            "mamba_rt.runtime.tensorrt_backend; "
            "print(sorted(m for m in ('tensorrt', 'tensorrt_rtx', 'torch', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_refuses_a_precision_the_package_lacks_before_loading_tensorrt(tiny_fp32, capsys):
    import argparse

    from mamba_rt.exporters import build_cli

    p = argparse.ArgumentParser()
    build_cli.add_arguments(p)
    args = p.parse_args([str(tiny_fp32[0]), "--precision", "bf16", "--max-batch", "2"])
    with pytest.raises(tb.EngineBuildError, match="bf16 requested, but the package was exported in fp32"):
        build_cli.run(args)
    args = p.parse_args([str(tiny_fp32[0]), "--max-prefill", "1"])
    with pytest.raises(InputError, match="max_prefill: expected an integer >= 2, got 1"):
        build_cli.run(args)
    args = p.parse_args([str(tiny_fp32[0]), "--compute-capability", "8.6"])
    with pytest.raises(InputError, match="compute capabilities are chosen for tensorrt-rtx only"):
        build_cli.run(args)
