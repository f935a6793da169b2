"""``mamba-rt bench``: an end-to-end CPU run (onnxruntime backend, tiny config) and bad input."""
from __future__ import annotations

import pytest

from mamba_rt.cli import main


def test_bench_reports_latency_prefill_memory_state_and_floor(bench_run):
    r, table = bench_run
    c = r["model"]["config"]
    assert (c["d_model"], c["n_layer"], r["model"]["dtype"]) == (64, 2, "fp32")  # the tiny config, CPU default
    assert r["backend"]["name"] == "onnxruntime" and r["device"]["kind"] == "cpu"
    # conv state (k - 1 columns, model dtype) and SSM state (n columns, fp32) of every layer
    d_inner = c["expand"] * c["d_model"]
    assert r["model"]["state_bytes_per_sequence"] == c["n_layer"] * d_inner * ((c["d_conv"] - 1) * 4 + c["d_state"] * 4)
    assert r["floor_ms_per_step"] == pytest.approx(r["model"]["weight_bytes_per_step"] / r["bandwidth"]["bytes_per_s"] * 1e3)
    assert r["bandwidth"]["bytes_per_s"] > 1e8
    assert [d["batch"] for d in r["decode"]] == [1, 3]
    for d in r["decode"]:
        assert d["timer"] == "wall" and d["steps"] == 20  # --quick's default
        assert 0 < d["median_ms"] <= d["p99_ms"]
        assert d["tokens_per_s"] == pytest.approx(d["batch"] / (d["wall_per_call_ms"] / 1e3))
        assert d["x_floor"] == pytest.approx(d["median_ms"] / r["floor_ms_per_step"])
        steps, mem = zip(*d["memory_trace"])  # host RSS while decoding: sampled, positive
        assert steps[0] == 1 and steps[-1] == 20 and min(mem) > 0
    assert [p["prompt_len"] for p in r["prefill"]] == [16, 64]
    for p in r["prefill"]:
        assert p["ttft_ms"] > 0 and p["tokens_per_s"] == pytest.approx(p["prompt_len"] / (p["ttft_ms"] / 1e3))
    assert r["memory"]["peak_bytes"] is None and "torch backend on a GPU" in r["memory"]["why"]
    assert "TTFT ms" in table and "x floor" in table and "peak device memory: n/a" in table


def test_bench_reuses_its_package(bench_run, bench_env, capsys):
    r, _ = bench_run
    assert main(["bench", "--config", "tiny", "--backend", "onnxruntime", "--device", "cpu", "--quick", "--steps", "3",
                 "--prompt-len", "4", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert "exporting" not in err  # the package of the first run, not a second export
    assert '"package": "' + r["model"]["package"] in out


@pytest.mark.parametrize("argv, expected", [
    (["--config", "7b"], "--config '7b': expected one of 130m, 370m, 790m, 1.4b, 2.8b, tiny"),
    (["--config", "tiny", "--batch", "1,0"], "--batch '1,0': expected positive integers"),
    (["--config", "tiny", "--prompt-len", "-5"], "--prompt-len '-5': expected positive integers"),
    (["--config", "tiny", "--batch", "x"], "--batch 'x': expected positive integers"),
    (["--config", "tiny", "--steps", "50"], "--steps 50: expected at least 200"),
    (["--config", "tiny", "--quick", "--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["--config", "tiny", "--warmup", "0"], "--warmup 0: expected an integer >= 1"),
    (["--config", "tiny", "--prefill-reps", "0"], "--prefill-reps 0: expected an integer >= 1"),
    (["--config", "tiny", "--bandwidth", "0TB/s"], "--bandwidth '0TB/s': expected a positive rate"),
    (["--config", "tiny", "--device", "tpu"], "device: expected 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (["--config", "tiny", "--device", "cpu", "--batch", "100000000"], "--batch 100000000: 100000000 sequences need at least"),
    ([], "expected a package directory or --config NAME (one of them), got neither"),
    (["somewhere", "--config", "tiny"], "got both"),
])
def test_bad_input_is_one_clear_error(argv, expected, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mamba-rt: error:") and expected in err, err
    assert len(err.splitlines()) == 1


def test_device_cuda_without_a_gpu_is_refused(capsys):
    torch = pytest.importorskip("torch")
    # on a GPU machine an index past the last GPU is refused the same way
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert main(["bench", "--config", "tiny", "--device", device]) == 2
    err = capsys.readouterr().err
    assert ("no CUDA GPU is visible" if device == "cuda" else "expected cuda:0..") in err


def test_dtype_must_match_the_package(bench_run, capsys):
    r, _ = bench_run
    assert main(["bench", r["model"]["package"], "--dtype", "bf16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--dtype bf16: the package" in err and "is fp32" in err and "expected --dtype fp32" in err
