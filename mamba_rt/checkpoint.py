"""Checkpoint discovery and weight loading for both formats (mamba_ssm and Hugging Face).

* ``open_checkpoint(dir)`` finds the config and the weight files and indexes every tensor's name,
  shape and dtype. For safetensors this reads only the headers (no torch); it also checks that no
  file is truncated.
* ``Checkpoint.load_weights(dtype)`` returns the canonical weights (mamba_ssm naming, see
  :meth:`MambaConfig.param_shapes`) as torch tensors, converted to the model dtype, with ``A_log``,
  ``D`` and ``dt_proj.bias`` kept in float32. Pickled ``.bin`` files are loaded with
  ``torch.load(weights_only=True)`` only: a checkpoint never runs code.
* ``save_checkpoint(...)`` writes canonical weights back in either format (tests and tools use it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
import warnings
from pathlib import Path
from typing import Iterator

from ._optional import require
from .config import FORMAT_HF, FORMAT_MAMBA_SSM, MambaConfig, load_config
from .errors import CheckpointError, ConfigError, UnsupportedError

# Parameters that stay float32 whatever the model dtype (DESIGN.md: A, D, delta_bias are fp32).
FP32_PARAM_SUFFIXES = ("mixer.A_log", "mixer.D", "mixer.dt_proj.bias")

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                   "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointWarning(UserWarning):
    """Something suspicious but loadable in a checkpoint (NaN/Inf weights)."""


def canonical_name(name: str) -> str:
    """Map a checkpoint key to the canonical (mamba_ssm) name."""
    if name.startswith("backbone.embeddings."):
        return "backbone.embedding." + name[len("backbone.embeddings."):]
    return name


def is_fp32_param(name: str) -> bool:
    return name.endswith(FP32_PARAM_SUFFIXES)


def parse_dtype(dtype: str) -> str:
    """'fp16' | 'float16' | ... -> canonical short name ('fp16')."""
    aliases = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "fp16": "fp16", "float16": "fp16",
               "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}
    key = str(dtype).replace("torch.", "")
    if key not in aliases:
        raise UnsupportedError(f"dtype {dtype!r} is not supported: expected one of fp32, fp16, bf16")
    return aliases[key]


def torch_dtype(dtype: str):
    torch = require("torch")
    return getattr(torch, DTYPES[parse_dtype(dtype)])


@dataclasses.dataclass
class TensorInfo:
    file: Path
    key: str  # the key as stored in the file
    shape: tuple[int, ...] | None  # None: unknown until loaded (pickles)
    dtype: str | None  # safetensors dtype code ("F16", ...) or None


@dataclasses.dataclass
class Checkpoint:
    path: Path
    config: MambaConfig
    format: str  # FORMAT_MAMBA_SSM or FORMAT_HF
    weight_files: list[Path]
    kind: str  # "safetensors" or "pickle"
    tensors: dict[str, TensorInfo]  # canonical name -> where it is (safetensors only; {} for pickles)

    # -- torch-free facts ------------------------------------------------------------------------------
    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for info in self.tensors.values():
            if info.shape is None or info.dtype is None:
                continue
            out[info.dtype] = out.get(info.dtype, 0) + math.prod(info.shape) * _ST_DTYPE_BYTES.get(info.dtype, 0)
        return out

    # -- loading -----------------------------------------------------------------------------------------
    def load_weights(self, dtype: str = "fp32", check_finite: bool = True) -> dict:
        """Canonical name -> torch tensor (CPU), converted to ``dtype`` (fp32 params kept fp32).

        Raises CheckpointError naming the key for a missing, unexpected or misshapen tensor.
        """
        torch = require("torch")
        tdt = torch_dtype(dtype)
        expected = self.config.param_shapes()
        out: dict = {}
        for name, tensor in self._iter_raw():
            if name in out:
                raise CheckpointError(f"{self.path}: tensor {name!r} appears twice among the weight files")
            if name not in expected:
                raise CheckpointError(
                    f"{self.path}: unexpected tensor {name!r} with shape {tuple(tensor.shape)}; "
                    f"the config describes {len(expected)} tensors (is the config from another model?)"
                )
            out[name] = tensor
        if "lm_head.weight" not in out and "backbone.embedding.weight" in out:
            if not self.config.tie_embeddings:
                raise CheckpointError(f"{self.path}: missing tensor 'lm_head.weight' (config says the "
                                      "embeddings are not tied)")
            out["lm_head.weight"] = out["backbone.embedding.weight"]
        missing = [k for k in expected if k not in out]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path}: missing tensor {missing[0]!r} (expected shape "
                                  f"{expected[missing[0]]}){more}")
        vocab_rows = self.config.padded_vocab_size
        for name, want in expected.items():
            t = out[name]
            got = tuple(t.shape)
            if name in ("backbone.embedding.weight", "lm_head.weight") and got != want \
                    and len(got) == 2 and got[1] == want[1] and self.config.vocab_size <= got[0] < vocab_rows:
                # an unpadded vocabulary in a checkpoint whose config asks for padding: pad with zeros
                t = torch.cat([t, t.new_zeros(vocab_rows - got[0], got[1])])
                got = tuple(t.shape)
            if got != want:
                raise CheckpointError(f"{self.path}: tensor {name!r} has shape {got}, expected {want} "
                                      "from config.json")
            if not t.is_floating_point():
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {t.dtype}, expected a "
                                      "floating-point tensor")
            bad = count_nonfinite(t) if check_finite else 0
            if bad:
                warnings.warn(f"{self.path}: tensor {name!r} contains {bad} NaN/Inf values",
                              CheckpointWarning, stacklevel=2)
            out[name] = t.to(torch.float32 if is_fp32_param(name) else tdt)
        if self.config.tie_embeddings:
            out["lm_head.weight"] = out["backbone.embedding.weight"]
        return out

    def _iter_raw(self) -> Iterator[tuple[str, object]]:
        if self.kind == "safetensors":
            require("safetensors")
            from safetensors import safe_open

            by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
            for name, info in self.tensors.items():
                by_file.setdefault(info.file, []).append((name, info))
            for f, items in by_file.items():
                try:
                    with safe_open(str(f), framework="pt") as fh:
                        for name, info in items:
                            yield name, fh.get_tensor(info.key)
                except CheckpointError:
                    raise
                except Exception as e:  # safetensors raises its own error types
                    raise CheckpointError(f"{f}: cannot read safetensors data ({e})") from None
        else:
            torch = require("torch")
            for f in self.weight_files:
                try:
                    obj = torch.load(str(f), map_location="cpu", weights_only=True, mmap=False)
                except Exception as e:
                    raise CheckpointError(
                        f"{f}: cannot load as a tensor-only PyTorch checkpoint (loaded with "
                        f"weights_only=True; a checkpoint must hold only tensors): {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}"
                    ) from None
                if not isinstance(obj, dict):
                    raise CheckpointError(f"{f}: expected a dict of tensor names to tensors, got "
                                          f"{type(obj).__name__}")
                for key, value in obj.items():
                    if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                        raise CheckpointError(
                            f"{f}: entry {key!r} is a {type(value).__name__}, expected only tensors"
                        )
                    yield canonical_name(key), value


def count_nonfinite(t, chunk: int = 1 << 22) -> int:
    """NaN/Inf count, in chunks so that no temporary the size of a large weight is allocated."""
    torch = require("torch")
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(flat[i:i + chunk])).sum()) for i in range(0, flat.numel(), chunk))


def _read_safetensors_header(f: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header without torch and check the file is not truncated."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{f}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{f}: truncated or corrupt safetensors file (header of {n} bytes, "
                                      f"file of {size} bytes)")
            header = json.loads(fh.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: cannot read safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: corrupt safetensors header")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            shape = tuple(int(s) for s in meta["shape"])
            dtype = str(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{f}: corrupt safetensors header entry for {key!r}") from None
        if end > data_len:
            raise CheckpointError(f"{f}: truncated file: tensor {key!r} needs bytes up to {end} of the data "
                                  f"section, but the file has only {data_len}")
        out[canonical_name(key)] = TensorInfo(f, key, shape, dtype)
    return out


def _shards_from_index(d: Path, idx: Path) -> list[Path]:
    """The shard files an index (``*.index.json`` with a ``weight_map``) names, each checked present."""
    try:
        weight_map = json.loads(idx.read_text())["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{idx}: not a valid index ({type(e).__name__}: {e})") from None
    for shard in shards:
        if not (d / shard).is_file():
            raise CheckpointError(f"{idx} names shard {shard!r}, which is missing from {d}")
    return [d / shard for shard in shards]


def _find_weight_files(d: Path) -> tuple[str, list[Path]]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        return "safetensors", _shards_from_index(d, idx)
    if (d / "model.safetensors").is_file():
        return "safetensors", [d / "model.safetensors"]
    st = sorted(d.glob("*.safetensors"))
    if st:
        return "safetensors", st
    bidx = d / "pytorch_model.bin.index.json"
    if bidx.exists():
        return "pickle", _shards_from_index(d, bidx)
    if (d / "pytorch_model.bin").is_file():
        return "pickle", [d / "pytorch_model.bin"]
    raise CheckpointError(f"{d}: no weights found: expected model.safetensors, "
                          "model.safetensors.index.json with its shards, or pytorch_model.bin")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Find the config and the weights of a checkpoint directory; torch-free for safetensors."""
    d = Path(path)
    if not d.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not d.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint directory with config.json)")
    if not (d / "config.json").is_file():
        raise ConfigError(f"{d}: missing config.json (expected a mamba_ssm or Hugging Face checkpoint directory)")
    config = load_config(d)
    kind, files = _find_weight_files(d)
    tensors: dict[str, TensorInfo] = {}
    if kind == "safetensors":
        for f in files:
            for name, info in _read_safetensors_header(f).items():
                if name in tensors:
                    raise CheckpointError(f"{d}: tensor {name!r} appears in both {tensors[name].file.name} "
                                          f"and {f.name}")
                tensors[name] = info
    return Checkpoint(d, config, config.source_format, files, kind, tensors)


def save_checkpoint(config: MambaConfig, weights: dict, out_dir: str | Path, fmt: str = FORMAT_MAMBA_SSM,
                    kind: str = "safetensors", shards: int = 1) -> Path:
    """Write canonical ``weights`` (name -> torch tensor) as a checkpoint of format ``fmt``.

    ``fmt='mamba_ssm'`` writes mamba_ssm's config.json and naming; ``fmt='hf'`` Hugging Face's.
    ``kind`` is "safetensors" (optionally sharded with an index) or "pickle" (pytorch_model.bin).
    """
    torch = require("torch")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == FORMAT_MAMBA_SSM:
        cfg = {
            "d_model": config.d_model, "n_layer": config.n_layer, "vocab_size": config.vocab_size,
            "ssm_cfg": {"d_state": config.d_state, "d_conv": config.d_conv, "expand": config.expand,
                        "dt_rank": config.dt_rank, "bias": config.bias, "conv_bias": config.conv_bias},
            "rms_norm": True, "residual_in_fp32": config.residual_in_fp32, "fused_add_norm": True,
            "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
            "tie_embeddings": config.tie_embeddings, "norm_epsilon": config.norm_epsilon,
        }
        if config.d_inner != config.expand * config.d_model:
            raise UnsupportedError("mamba_ssm configs cannot express d_inner != expand * d_model")
        rename = {}
    elif fmt == FORMAT_HF:
        cfg = {
            "model_type": "mamba", "architectures": ["MambaForCausalLM"], "hidden_size": config.d_model,
            "num_hidden_layers": config.n_layer, "vocab_size": config.padded_vocab_size,
            "state_size": config.d_state, "conv_kernel": config.d_conv, "expand": config.expand,
            "intermediate_size": config.d_inner, "time_step_rank": config.dt_rank,
            "use_bias": config.bias, "use_conv_bias": config.conv_bias, "hidden_act": "silu",
            "residual_in_fp32": config.residual_in_fp32, "layer_norm_epsilon": config.norm_epsilon,
            "tie_word_embeddings": config.tie_embeddings,
        }
        rename = {"backbone.embedding.weight": "backbone.embeddings.weight"}
    else:
        raise UnsupportedError(f"checkpoint format {fmt!r}: expected 'mamba_ssm' or 'hf'")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = {}
    for name, t in weights.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        tensors[rename.get(name, name)] = t.detach().to("cpu").contiguous()
    if kind == "pickle":
        torch.save(tensors, out / "pytorch_model.bin")
        return out
    from safetensors.torch import save_file

    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out
