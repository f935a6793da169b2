"""benchmarks/run_suite.py on the CPU (tiny config): the results file, merging two runs, and the plots
drawn from what the run measured."""
from __future__ import annotations

import json
import shutil

import pytest

from mamba_rt.exporters.tensorrt_build import slug
from tests.bench.conftest import SUITE_CPU, run_suite_module


def _rows(doc, **where):
    return [r for r in doc["rows"] if all(r.get(k) == v for k, v in where.items())]


def test_suite_rows_carry_measurements_ratios_and_reasons(suite_run):
    doc = json.loads(suite_run.read_text())
    assert doc["device"]["kind"] == "cpu" and len(doc["runs"]) == 1
    ours = _rows(doc, kind="decode", impl="mamba-rt onnxruntime (cpu)")
    hf = _rows(doc, kind="decode", impl="hf generate")
    assert [r["batch"] for r in ours] == [1, 2] and len(hf) == 1
    for r in ours + hf:
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["x_floor"] == pytest.approx(r["median_ms"] / r["floor_ms"])
    # the ratio to a baseline of the same run, same config, dtype and batch
    assert ours[0]["time_vs"] == {"hf generate": pytest.approx(ours[0]["median_ms"] / hf[0]["median_ms"])}
    assert ours[1]["time_vs"] == {}  # HF is measured at batch 1 only
    prefill = _rows(doc, kind="prefill", impl="mamba-rt onnxruntime (cpu)")
    assert [(r["length"], r["batch"]) for r in prefill] == [(32, 1)] and prefill[0]["median_ms"] > 0
    # what was not measured says why
    assert "no --mamba-ssm SRC" in _rows(doc, impl="mamba_ssm no-ext")[0]["skipped"]
    assert "correctness path" in _rows(doc, impl="mamba-rt torch (cpu)")[0]["skipped"]
    # long context: both models at each context, mamba-rt's throughput over the Transformer's
    lc = _rows(doc, kind="long_context", largest=False)
    ours_lc = [r for r in lc if r["impl"].startswith("mamba-rt") and "median_ms" in r]
    llama = [r for r in lc if r["impl"] == "llama eager generate" and "median_ms" in r]
    assert [r["length"] for r in ours_lc] == [r["length"] for r in llama] == [64, 256]
    for o, t in zip(ours_lc, llama):
        assert o["throughput_vs"]["llama eager generate"] == pytest.approx(o["tokens_per_s"] / t["tokens_per_s"])
    assert "CUDA graphs need a GPU" in _rows(doc, impl="llama cuda-graph", largest=False)[0]["skipped"]
    assert doc["runs"][0]["llama"]["attention"] == "sdpa"


def test_merge_replaces_what_a_second_run_measured_again(suite_run, bench_env, tmp_path):
    rs = run_suite_module()
    merged = tmp_path / "merged.json"
    shutil.copy(suite_run, merged)
    first = json.loads(merged.read_text())
    assert rs.main(SUITE_CPU + ["--batches", "2", "--prompt-lens", "32", "--merge", "--out", str(merged)]) == 0
    doc = json.loads(merged.read_text())
    assert len(doc["runs"]) == 2 and doc["runs"][1]["id"] == 1
    keys = [rs.row_key(r) for r in doc["rows"]]
    assert len(keys) == len(set(keys))  # one row per measurement
    ours = {r["batch"]: r for r in _rows(doc, kind="decode", impl="mamba-rt onnxruntime (cpu)")}
    assert ours[1]["run"] == 0 and ours[2]["run"] == 1  # batch 2 measured again, batch 1 kept
    assert ours[1] == _rows(first, kind="decode", impl="mamba-rt onnxruntime (cpu)", batch=1)[0] | {"run": 0}
    assert _rows(doc, kind="decode", impl="hf generate")[0]["run"] == 1
    assert {r["run"] for r in _rows(doc, kind="long_context")} == {0}  # not part of the second run
    # a ratio never mixes runs: batch 1 of run 0 keeps the ratio to run 0's HF row
    assert ours[1]["time_vs"] == _rows(first, kind="decode", impl="mamba-rt onnxruntime (cpu)", batch=1)[0]["time_vs"]


def test_merge_refuses_results_of_another_device(suite_run):
    rs = run_suite_module()
    doc = json.loads(suite_run.read_text())
    other = json.loads(suite_run.read_text())
    other["device"]["name"] = "NVIDIA H100 80GB HBM3"
    with pytest.raises(SystemExit, match="cannot take rows measured on"):
        rs.merge(other, doc)


def test_plots_draw_the_measured_rows(suite_run, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the 'bench' extra")
    import plots  # benchmarks/ is on sys.path (run_suite_module)

    doc = json.loads(suite_run.read_text())
    paths = plots.write_plots(suite_run, tmp_path)
    assert sorted(p.name for p in paths) == sorted(
        f"{slug(doc['device']['name'])}-{n}.png"
        for n in ("memory", "latency-fp32", "throughput-fp32"))
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    plt = plots._plt()
    ax = plots.latency(doc, "fp32", plt).axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    ours = _rows(doc, kind="decode", impl="mamba-rt onnxruntime (cpu)", batch=1)[0]
    assert list(lines["mamba-rt onnxruntime (cpu)"].get_ydata()) == [ours["median_ms"]]
    assert list(lines["floor: weight bytes / copy bandwidth"].get_ydata()) == [ours["floor_ms"]]
    assert doc["device"]["name"] in ax.get_title()
    tput = plots.throughput(doc, "fp32", plt).axes[0]
    pts = {ln.get_label(): list(ln.get_xdata()) for ln in tput.get_lines()}
    assert pts["mamba-rt onnxruntime (cpu)"] == [1, 2]
    mem = plots.memory(doc, plt).axes[0]
    traced = [ln for ln in mem.get_lines() if "mamba-rt" in ln.get_label()]
    assert len(traced) == 2 and all(len(ln.get_xdata()) > 2 for ln in traced)


def test_markdown_tables_carry_the_measured_numbers(suite_run):
    run_suite_module()
    import plots

    doc = json.loads(suite_run.read_text())
    text = plots.markdown(doc)
    ours = _rows(doc, kind="decode", impl="mamba-rt onnxruntime (cpu)", batch=1)[0]
    assert doc["device"]["name"] in text.splitlines()[0]
    assert f"{ours['median_ms']:.3f} ({ours['x_floor']:.1f}x)" in text
    lc = _rows(doc, kind="long_context", impl="llama eager generate", length=256)[0]
    assert f"| 256 | 1 | llama eager generate | {lc['tokens_per_s']:,.0f} |" in text
