import json

import pytest

from mamba_rt.config import MambaConfig, load_config
from mamba_rt.errors import ConfigError, UnsupportedError

MAMBA_SSM_130M = {
    "d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
    "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
}
HF_130M = {
    "model_type": "mamba", "hidden_size": 768, "num_hidden_layers": 24, "vocab_size": 50280,
    "state_size": 16, "conv_kernel": 4, "expand": 2, "intermediate_size": 1536, "time_step_rank": 48,
    "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": 1e-5, "residual_in_fp32": True,
    "tie_word_embeddings": True, "hidden_act": "silu",
}


def test_mamba_ssm_defaults_and_derived_fields():
    c = MambaConfig.from_dict(MAMBA_SSM_130M)
    assert (c.d_inner, c.dt_rank, c.d_state, c.d_conv) == (1536, 48, 16, 4)
    assert c.padded_vocab_size == 50280 and c.vocab_size == 50277
    assert c.source_format == "mamba_ssm"
    # 130m: the published parameter count (embedding tied, counted once)
    assert 129_000_000 < c.n_params() < 129_300_000


def test_hf_and_mamba_ssm_describe_the_same_model():
    a = MambaConfig.from_dict(MAMBA_SSM_130M)
    b = MambaConfig.from_dict(HF_130M)
    assert (a.d_model, a.n_layer, a.d_inner, a.d_state, a.d_conv, a.dt_rank, a.padded_vocab_size) == \
           (b.d_model, b.n_layer, b.d_inner, b.d_state, b.d_conv, b.dt_rank, b.padded_vocab_size)
    assert b.source_format == "hf"


def test_ssm_cfg_overrides():
    d = dict(MAMBA_SSM_130M, ssm_cfg={"d_state": 4, "d_conv": 2, "expand": 3, "dt_rank": 7, "bias": True,
                                      "conv_bias": False})
    c = MambaConfig.from_dict(d)
    assert (c.d_state, c.d_conv, c.d_inner, c.dt_rank, c.bias, c.conv_bias) == (4, 2, 3 * 768, 7, True, False)


def test_round_trip_through_to_dict():
    c = MambaConfig.from_dict(HF_130M)
    assert MambaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("data, match", [
    ({"model_type": "mamba2", "hidden_size": 8}, "not supported yet"),
    (dict(MAMBA_SSM_130M, ssm_cfg={"layer": "Mamba2"}), "not supported yet"),
    (dict(MAMBA_SSM_130M, attn_layer_idx=[3]), "not supported yet"),
    (dict(HF_130M, conv_kernel=5), "d_conv"),
    (dict(HF_130M, state_size=128), "d_state"),
    (dict(HF_130M, hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_configs_are_refused(data, match):
    with pytest.raises(UnsupportedError, match=match):
        MambaConfig.from_dict(data)


@pytest.mark.parametrize("data, match", [
    ({"model_type": "llama", "hidden_size": 8}, "unknown model_type 'llama'"),
    ({"foo": 1}, "not a Mamba config"),
    (dict(MAMBA_SSM_130M, d_model="768"), "'d_model': expected an integer, got '768'"),
    ({k: v for k, v in MAMBA_SSM_130M.items() if k != "n_layer"}, "required field 'n_layer' is missing"),
    (dict(HF_130M, tie_word_embeddings="yes"), "expected true or false"),
    (dict(MAMBA_SSM_130M, ssm_cfg={"dt_rank": "big"}), "dt_rank"),
    ([1, 2], "expected a JSON object"),
])
def test_malformed_configs_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        MambaConfig.from_dict(data)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config(tmp_path)


def test_state_shapes_and_bytes():
    c = MambaConfig.from_dict(MAMBA_SSM_130M)
    s = c.state_shapes(batch=3)
    assert s["conv_state"] == (24, 3, 1536, 3) and s["ssm_state"] == (24, 3, 1536, 16)
    assert c.state_bytes_per_sequence(2) == 24 * 1536 * 3 * 2 + 24 * 1536 * 16 * 4
