import json
import subprocess
import sys

import pytest

from mamba_rt.checkpoint import save_checkpoint
from mamba_rt.cli import main
from mamba_rt.exporters.model import random_weights
from tests.helpers import tiny_config


def test_import_mamba_rt_and_runtime_without_torch():
    code = ("import sys, mamba_rt, mamba_rt.runtime, mamba_rt.config, mamba_rt.manifest, mamba_rt.cli;"
            "mamba_rt.cli.build_parser();"
            "bad = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'transformers') if m in sys.modules];"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_inspect_reports_format_params_state_and_floor(tmp_path, capsys):
    cfg = tiny_config(pad_vocab_size_multiple=8)
    save_checkpoint(cfg, random_weights(cfg, seed=0), tmp_path, fmt="mamba_ssm")
    assert main(["inspect", str(tmp_path), "--bandwidth", "2TB/s", "--dtype", "fp16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "mamba_ssm"
    assert info["parameters"] == cfg.n_params()
    # stored fp32 (save_checkpoint keeps fp32): 4 bytes per parameter, embedding counted once
    assert info["weights"]["stored_bytes_by_dtype"] == {"F32": 4 * cfg.n_params()}
    d = info["decode"]
    assert d["state_bytes_per_sequence"] == 2 * 72 * 2 * 2 + 2 * 72 * 4 * 4
    assert d["floor_ms_per_token"] == pytest.approx(d["weight_bytes_per_token"] / 2e12 * 1e3)
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "mamba_ssm" in text and "decode floor" in text


def test_floor_matches_published_figures():
    from mamba_rt.config import MambaConfig
    from mamba_rt.inspect import decode_bytes
    # the H100 floors at 3.0 TB/s, fp16: 130m 0.086 ms, 2.8b 1.85 ms
    for (dm, nl), want in {(768, 24): 0.086, (2560, 64): 1.85}.items():
        c = MambaConfig(d_model=dm, n_layer=nl, vocab_size=50277, pad_vocab_size_multiple=8)
        assert decode_bytes(c, "fp16") / 3e12 * 1e3 == pytest.approx(want, rel=0.01)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mamba_rt.cli", "inspect", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mamba-rt: error:") and "no such directory" in lines[0]
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mamba_rt.cli", "inspect", str(tmp_path / "nope"), "--debug"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_bad_bandwidth(tmp_path, capsys):
    cfg = tiny_config()
    save_checkpoint(cfg, random_weights(cfg, seed=0), tmp_path, fmt="hf")
    assert main(["inspect", str(tmp_path), "--bandwidth", "fast"]) == 2
    assert "--bandwidth 'fast': expected a rate" in capsys.readouterr().err
