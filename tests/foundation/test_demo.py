"""`mamba-rt demo`, the README's first command, end to end on the CPU (checkpoint -> export -> runtime)."""
import json

from mamba_rt.cli import main


def test_demo_runs_end_to_end_and_reuses_its_package(tmp_path, capsys):
    rc = main(["demo", "--dir", str(tmp_path), "--max-new-tokens", "12", "--device", "cpu",
               "--prompt", "print("])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("print(") and len(out) > len("print(\n")
    assert "exporting" in err and "generating with" in err and "12 tokens" in err
    manifest = json.loads((tmp_path / "package-fp32" / "manifest.json").read_text())
    assert manifest["config"]["vocab_size"] == 256
    # second run: the package is reused, and the seeded sampling gives the same text
    assert main(["demo", "--dir", str(tmp_path), "--max-new-tokens", "12", "--device", "cpu",
                 "--prompt", "print("]) == 0
    out2, err2 = capsys.readouterr()
    assert "reusing the exported package" in err2
    assert out2 == out
