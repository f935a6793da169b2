"""MambaConfig: one dataclass read from either checkpoint format's config.json.

Two formats are recognised:

* state-spaces ``mamba_ssm`` (``d_model``, ``n_layer``, ``vocab_size``, ``ssm_cfg`` with ``d_state``,
  ``d_conv``, ``expand``, ``dt_rank``, ...; ``pad_vocab_size_multiple``, ``tie_embeddings``);
* Hugging Face ``*-hf`` (``model_type: "mamba"``, ``hidden_size``, ``intermediate_size``,
  ``state_size``, ``conv_kernel``, ``time_step_rank``, ...).

Derived fields (``d_inner``, ``dt_rank``, ``padded_vocab_size``) are computed once, in
``__post_init__``. Mamba-2 and hybrid (attention) configs are refused with a clear error.
This module imports no torch.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnsupportedError

FORMAT_MAMBA_SSM = "mamba_ssm"
FORMAT_HF = "hf"


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """A Mamba-1 language model's shape. Field names follow mamba_ssm."""

    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    d_inner: int | None = None  # default expand * d_model (HF's intermediate_size may differ)
    pad_vocab_size_multiple: int = 1
    tie_embeddings: bool = True
    rms_norm: bool = True
    residual_in_fp32: bool = True
    norm_epsilon: float = 1e-5
    bias: bool = False  # in_proj / out_proj bias
    conv_bias: bool = True
    source_format: str = FORMAT_MAMBA_SSM

    def __post_init__(self):
        def need_int(name, lo=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"config field {name!r}: expected an integer >= {lo}, got {v!r}")

        for name in ("d_model", "n_layer", "vocab_size", "d_state", "expand", "pad_vocab_size_multiple"):
            need_int(name)
        need_int("d_conv", 2)
        if self.d_conv > 4:
            raise UnsupportedError(f"d_conv (conv kernel width) {self.d_conv} is not supported: expected 2, 3 or 4")
        if self.d_state > 64:
            raise UnsupportedError(f"d_state {self.d_state} is not supported: expected at most 64")
        if self.dt_rank == "auto":
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        need_int("dt_rank")
        if self.d_inner is None:
            object.__setattr__(self, "d_inner", self.expand * self.d_model)
        need_int("d_inner")
        if not self.rms_norm:
            raise UnsupportedError("rms_norm=false (LayerNorm blocks) is not supported: expected rms_norm=true")
        if not (isinstance(self.norm_epsilon, (int, float)) and self.norm_epsilon > 0):
            raise ConfigError(f"config field 'norm_epsilon': expected a positive number, got {self.norm_epsilon!r}")

    # -- derived -------------------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter names (mamba_ssm naming) and shapes, lm_head included even when tied."""
        d, n, k, r, dm = self.d_inner, self.d_state, self.d_conv, self.dt_rank, self.d_model
        shapes: dict[str, tuple[int, ...]] = {"backbone.embedding.weight": (self.padded_vocab_size, dm)}
        for i in range(self.n_layer):
            p = f"backbone.layers.{i}."
            shapes[p + "norm.weight"] = (dm,)
            shapes[p + "mixer.in_proj.weight"] = (2 * d, dm)
            if self.bias:
                shapes[p + "mixer.in_proj.bias"] = (2 * d,)
            shapes[p + "mixer.conv1d.weight"] = (d, 1, k)
            if self.conv_bias:
                shapes[p + "mixer.conv1d.bias"] = (d,)
            shapes[p + "mixer.x_proj.weight"] = (r + 2 * n, d)
            shapes[p + "mixer.dt_proj.weight"] = (d, r)
            shapes[p + "mixer.dt_proj.bias"] = (d,)
            shapes[p + "mixer.A_log"] = (d, n)
            shapes[p + "mixer.D"] = (d,)
            shapes[p + "mixer.out_proj.weight"] = (dm, d)
            if self.bias:
                shapes[p + "mixer.out_proj.bias"] = (dm,)
        shapes["backbone.norm_f.weight"] = (dm,)
        shapes["lm_head.weight"] = (self.padded_vocab_size, dm)
        return shapes

    def n_params(self) -> int:
        """Parameters stored once (a tied lm_head is not counted twice)."""
        total = 0
        for name, shape in self.param_shapes().items():
            if name == "lm_head.weight" and self.tie_embeddings:
                continue
            total += math.prod(shape)
        return total

    def state_shapes(self, batch: int = 1) -> dict[str, tuple[int, ...]]:
        """Stacked state of all layers: conv (model dtype) and ssm (float32)."""
        return {
            "conv_state": (self.n_layer, batch, self.d_inner, self.d_conv - 1),
            "ssm_state": (self.n_layer, batch, self.d_inner, self.d_state),
        }

    def state_bytes_per_sequence(self, act_bytes: int) -> int:
        d, L = self.d_inner, self.n_layer
        return L * d * (self.d_conv - 1) * act_bytes + L * d * self.d_state * 4

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MambaConfig":
        """Read a config.json of either format (or a dict written by :meth:`to_dict`)."""
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(data).__name__}")
        if "source_format" in data and "d_model" in data:
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise ConfigError(f"config: unknown fields {unknown}; expected only {sorted(known)}")
            return cls(**data)
        model_type = data.get("model_type")
        if model_type in ("mamba2", "falcon_mamba2", "bamba", "jamba", "zamba", "zamba2", "nemotron_h"):
            raise UnsupportedError(f"model_type {model_type!r} is not supported yet: mamba-rt runs Mamba-1 ('mamba') models")
        if model_type == "mamba" or "hidden_size" in data:
            if model_type not in (None, "mamba"):
                raise ConfigError(f"config: unknown model_type {model_type!r}; expected 'mamba'")
            return _from_hf(data)
        if "d_model" in data:
            if model_type is not None:
                raise ConfigError(f"config: unknown model_type {model_type!r} for a mamba_ssm config")
            return _from_mamba_ssm(data)
        if model_type is not None:
            raise ConfigError(f"config: unknown model_type {model_type!r}; expected 'mamba' (Hugging Face) "
                              "or a mamba_ssm config with 'd_model'")
        raise ConfigError("config: not a Mamba config: expected 'd_model' (mamba_ssm) or "
                          f"model_type 'mamba' with 'hidden_size' (Hugging Face); found keys {sorted(data)[:12]}")


def _get(data: dict, key: str, typ, default=dataclasses.MISSING, where="config"):
    if key not in data or data[key] is None:
        if default is dataclasses.MISSING:
            raise ConfigError(f"{where}: required field {key!r} is missing")
        return default
    v = data[key]
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ConfigError(f"{where} field {key!r}: expected an integer, got {v!r}")
    if typ is bool and not isinstance(v, bool):
        raise ConfigError(f"{where} field {key!r}: expected true or false, got {v!r}")
    if typ is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ConfigError(f"{where} field {key!r}: expected a number, got {v!r}")
    return v


def _dt_rank(v, where):
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    raise ConfigError(f"{where} field 'dt_rank': expected an integer or 'auto', got {v!r}")


def _from_mamba_ssm(data: dict) -> MambaConfig:
    ssm_cfg = data.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise ConfigError(f"config field 'ssm_cfg': expected an object, got {ssm_cfg!r}")
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer != "Mamba1":
        raise UnsupportedError(f"ssm_cfg.layer {layer!r} is not supported yet: mamba-rt runs Mamba-1 models")
    if data.get("attn_layer_idx"):
        raise UnsupportedError("hybrid Mamba/attention models (non-empty attn_layer_idx) are not supported yet")
    w = "ssm_cfg"
    return MambaConfig(
        d_model=_get(data, "d_model", int),
        n_layer=_get(data, "n_layer", int),
        vocab_size=_get(data, "vocab_size", int),
        d_state=_get(ssm_cfg, "d_state", int, 16, w),
        d_conv=_get(ssm_cfg, "d_conv", int, 4, w),
        expand=_get(ssm_cfg, "expand", int, 2, w),
        dt_rank=_dt_rank(ssm_cfg.get("dt_rank", "auto"), w),
        pad_vocab_size_multiple=_get(data, "pad_vocab_size_multiple", int, 8),
        tie_embeddings=_get(data, "tie_embeddings", bool, True),
        rms_norm=_get(data, "rms_norm", bool, True),
        residual_in_fp32=_get(data, "residual_in_fp32", bool, True),
        norm_epsilon=_get(data, "norm_epsilon", float, 1e-5),
        bias=_get(ssm_cfg, "bias", bool, False, w),
        conv_bias=_get(ssm_cfg, "conv_bias", bool, True, w),
        source_format=FORMAT_MAMBA_SSM,
    )


def _from_hf(data: dict) -> MambaConfig:
    act = data.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedError(f"hidden_act {act!r} is not supported: expected 'silu'")
    hidden = _get(data, "hidden_size", int)
    expand = _get(data, "expand", int, 2)
    return MambaConfig(
        d_model=hidden,
        n_layer=_get(data, "num_hidden_layers", int),
        vocab_size=_get(data, "vocab_size", int),
        d_state=_get(data, "state_size", int, 16),
        d_conv=_get(data, "conv_kernel", int, 4),
        expand=expand,
        dt_rank=_dt_rank(data.get("time_step_rank", "auto"), "config"),
        d_inner=_get(data, "intermediate_size", int, expand * hidden),
        pad_vocab_size_multiple=1,
        tie_embeddings=_get(data, "tie_word_embeddings", bool, True),
        rms_norm=True,
        residual_in_fp32=_get(data, "residual_in_fp32", bool, True),
        norm_epsilon=_get(data, "layer_norm_epsilon", float, 1e-5),
        bias=_get(data, "use_bias", bool, False),
        conv_bias=_get(data, "use_conv_bias", bool, True),
        source_format=FORMAT_HF,
    )


def load_config(path: str | Path) -> MambaConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    elif not p.exists():
        raise ConfigError(f"{path}: no such file or directory")
    if not p.is_file():
        raise ConfigError(f"{p.parent}: no config.json found (expected a checkpoint directory containing config.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e})") from None
    return MambaConfig.from_dict(data)
