"""Checkpoint loading: formats, key naming, dtypes, and every kind of bad input."""
import json
import pickle
import warnings

import pytest
import torch

from mamba_rt.checkpoint import CheckpointWarning, open_checkpoint, save_checkpoint
from mamba_rt.errors import CheckpointError, ConfigError, UnsupportedError
from mamba_rt.exporters.model import random_weights
from tests.helpers import tiny_config


@pytest.fixture
def ckpt(tmp_path):
    cfg = tiny_config()
    w = random_weights(cfg, "fp32", seed=int(torch.randint(0, 2**31, ()).item()))
    save_checkpoint(cfg, w, tmp_path / "ck", fmt="hf")
    return tmp_path / "ck", cfg, w


def test_hf_key_naming_is_canonicalised(ckpt):
    d, cfg, w = ckpt
    c = open_checkpoint(d)
    assert c.format == "hf" and c.kind == "safetensors"
    assert "backbone.embedding.weight" in c.tensors
    assert c.tensors["backbone.embedding.weight"].key == "backbone.embeddings.weight"
    loaded = c.load_weights("fp32")
    for k, v in w.items():
        assert torch.equal(loaded[k], v), k
    assert loaded["lm_head.weight"] is loaded["backbone.embedding.weight"]  # tied: one tensor


@pytest.mark.parametrize("dtype, tdt", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_conversion_keeps_fp32_params(ckpt, dtype, tdt):
    d, cfg, _ = ckpt
    w = open_checkpoint(d).load_weights(dtype)
    assert w["backbone.layers.0.mixer.in_proj.weight"].dtype == tdt
    assert w["backbone.layers.1.norm.weight"].dtype == tdt
    for k in ("mixer.A_log", "mixer.D", "mixer.dt_proj.bias"):
        assert w[f"backbone.layers.0.{k}"].dtype == torch.float32


def test_unpadded_vocabulary_is_padded(tmp_path):
    cfg = tiny_config(pad_vocab_size_multiple=8)  # 101 -> 104
    w = random_weights(cfg, "fp32", seed=1)
    w["backbone.embedding.weight"] = w["backbone.embedding.weight"][:101].clone()
    w["lm_head.weight"] = w["backbone.embedding.weight"]
    save_checkpoint(cfg, w, tmp_path, fmt="mamba_ssm")
    out = open_checkpoint(tmp_path).load_weights()
    assert out["backbone.embedding.weight"].shape == (104, 36)
    assert torch.equal(out["backbone.embedding.weight"][:101], w["backbone.embedding.weight"])
    assert not out["backbone.embedding.weight"][101:].any()


def test_untied_head_is_loaded_separately(tmp_path):
    cfg = tiny_config(tie_embeddings=False)
    w = random_weights(cfg, "fp32", seed=2)
    save_checkpoint(cfg, w, tmp_path, fmt="mamba_ssm")
    out = open_checkpoint(tmp_path).load_weights()
    assert torch.equal(out["lm_head.weight"], w["lm_head.weight"])
    assert not torch.equal(out["lm_head.weight"], out["backbone.embedding.weight"])


# ---- bad input -----------------------------------------------------------------------------------

def test_not_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        open_checkpoint(f)
    with pytest.raises(CheckpointError, match="no such directory"):
        open_checkpoint(tmp_path / "missing")


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="missing config.json"):
        open_checkpoint(tmp_path)


def test_invalid_json_and_unknown_model_type(ckpt):
    d, _, _ = ckpt
    (d / "config.json").write_text('{"model_type": "mamba", "hidden_size": 36,')
    with pytest.raises(ConfigError, match="invalid JSON"):
        open_checkpoint(d)
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 36}))
    with pytest.raises(ConfigError, match="unknown model_type 'gpt2'"):
        open_checkpoint(d)
    (d / "config.json").write_text(json.dumps({"model_type": "mamba2", "hidden_size": 36}))
    with pytest.raises(UnsupportedError, match="mamba2.*not supported yet"):
        open_checkpoint(d)


def test_missing_weights(ckpt):
    d, _, _ = ckpt
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        open_checkpoint(d)


def test_truncated_safetensors(ckpt):
    d, _, _ = ckpt
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(d)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(d)


def test_truncated_pickle(tmp_path):
    cfg = tiny_config()
    save_checkpoint(cfg, random_weights(cfg, seed=1), tmp_path, fmt="mamba_ssm", kind="pickle")
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="cannot load"):
        open_checkpoint(tmp_path).load_weights()


def test_shard_named_in_index_but_absent(tmp_path):
    cfg = tiny_config()
    save_checkpoint(cfg, random_weights(cfg, seed=1), tmp_path, fmt="hf", shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        open_checkpoint(tmp_path)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 36, "n_layer": 2, "vocab_size": 101}))
    with open(tmp_path / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"backbone.embedding.weight": _Evil()}, fh, protocol=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        open_checkpoint(tmp_path).load_weights()
    assert not (tmp_path / "PWNED").exists()


def test_pickle_holding_non_tensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 36, "n_layer": 2, "vocab_size": 101}))
    torch.save({"backbone.embedding.weight": [1, 2, 3]}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="expected only tensors"):
        open_checkpoint(tmp_path).load_weights()
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="expected a dict"):
        open_checkpoint(tmp_path).load_weights()


def test_missing_unexpected_and_misshapen_keys(tmp_path):
    cfg = tiny_config()
    w = random_weights(cfg, seed=1)
    bad = dict(w)
    del bad["backbone.layers.1.mixer.D"]
    save_checkpoint(cfg, bad, tmp_path / "a", fmt="hf")
    with pytest.raises(CheckpointError, match=r"missing tensor 'backbone.layers.1.mixer.D' \(expected shape \(72,\)\)"):
        open_checkpoint(tmp_path / "a").load_weights()
    bad = dict(w, **{"backbone.layers.0.mixer.extra": torch.zeros(3)})
    save_checkpoint(cfg, bad, tmp_path / "b", fmt="hf")
    with pytest.raises(CheckpointError, match="unexpected tensor 'backbone.layers.0.mixer.extra'"):
        open_checkpoint(tmp_path / "b").load_weights()
    bad = dict(w, **{"backbone.layers.0.mixer.x_proj.weight": torch.zeros(9, 72)})
    save_checkpoint(cfg, bad, tmp_path / "c", fmt="hf")
    with pytest.raises(CheckpointError, match=r"'backbone.layers.0.mixer.x_proj.weight' has shape \(9, 72\), expected \(13, 72\)"):
        open_checkpoint(tmp_path / "c").load_weights()


def test_nan_weights_warn_naming_the_tensor(tmp_path):
    cfg = tiny_config()
    w = random_weights(cfg, seed=1)
    w["backbone.layers.0.mixer.out_proj.weight"][0, 0] = float("nan")
    w["backbone.layers.0.mixer.out_proj.weight"][1, 0] = float("inf")
    save_checkpoint(cfg, w, tmp_path, fmt="hf")
    with pytest.warns(CheckpointWarning, match="'backbone.layers.0.mixer.out_proj.weight' contains 2 NaN/Inf"):
        open_checkpoint(tmp_path).load_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_checkpoint(tmp_path).load_weights(check_finite=False)


def test_unsupported_dtype(ckpt):
    d, _, _ = ckpt
    with pytest.raises(UnsupportedError, match="dtype 'int8' is not supported: expected one of fp32, fp16, bf16"):
        open_checkpoint(d).load_weights("int8")
