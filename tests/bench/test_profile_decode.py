"""benchmarks/profile_decode.py's --leave-out: which kind each launch of a GEMM-path step is (the projections by
their order in the layer), on the CPU with stand-in launches."""
from __future__ import annotations

from types import SimpleNamespace

from tests.bench.conftest import run_suite_module


def _roles(*layer, n_layer=3):
    run_suite_module()  # puts benchmarks/ on sys.path
    import profile_decode

    k = lambda name: SimpleNamespace(name=name)  # noqa: E731
    cublas = lambda: None  # noqa: E731
    launches = [k("embed")] + [cublas if nm == "cuBLAS" else k(nm) for nm in layer] * n_layer + [k("proj_wg")]
    return profile_decode.layer_roles(launches, n_layer)


def test_layer_roles_name_projections_by_their_order():
    # x_proj and dt_proj as projections (dt_proj on cuBLAS), residual_norm after out_proj
    assert _roles("proj_wg", "conv_only", "proj_wg", "cuBLAS", "ssm_step", "proj_wg", "residual_norm") == \
        ["in_proj", "conv_only", "x_proj", "dt_proj", "ssm_step", "out_proj", "residual_norm"] * 3
    # x_proj in the conv kernel, dt_proj in the state update, the norm in the projections' epilogues
    assert _roles("proj_wg", "conv_xproj", "ssm_step", "proj_wg", n_layer=2) == \
        ["in_proj", "conv_xproj", "ssm_step", "out_proj"] * 2
    # x_proj and dt_proj in conv_xproj_rows / dt_rows; cuBLAS for in_proj and out_proj
    assert _roles("cuBLAS", "conv_xproj_rows", "dt_rows", "ssm_step", "cuBLAS", "residual_norm") == \
        ["in_proj", "conv_xproj_rows", "dt_rows", "ssm_step", "out_proj", "residual_norm"] * 3
    # one projection, dt_proj folded: in_proj, x_proj, out_proj
    assert _roles("proj_wg", "conv_only", "proj_wg", "ssm_step", "proj_wg")[:5] == \
        ["in_proj", "conv_only", "x_proj", "ssm_step", "out_proj"]


def test_layer_roles_refuse_unequal_layers():
    run_suite_module()
    import profile_decode

    k = lambda name: SimpleNamespace(name=name)  # noqa: E731
    assert profile_decode.layer_roles([k("embed"), k("layers")], 3) is None  # the batch-1 persistent kernel
    assert profile_decode.layer_roles([k("embed")] + [k("a")] * 7 + [k("head")], 3) is None
