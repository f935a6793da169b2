"""The model package's ``manifest.json``: written by the exporter, read by the runtime (no torch).

A model package is a directory::

    manifest.json      this file's content (format version, config, dtype, graphs, state, hashes)
    model.onnx         the plugin graph: mamba_rt::CausalConv1d / mamba_rt::SelectiveScan nodes
    decode.onnx        portable graph, standard ONNX ops, seq = 1
    prefill.onnx       portable graph, standard ONNX ops, any seq
    weights.bin        every weight once, as ONNX external data shared by all three graphs
                       (the canonical parameters of MambaConfig.param_shapes(), canonical layout and
                       names, lm_head omitted when tied; each starts at a 64-byte aligned offset;
                       layout changes such as transposes or -exp(A_log) are graph nodes)
    tokenizer.json     copied from the checkpoint when it has one

Fixed I/O names (every graph):
    inputs   input_ids [batch, seq] int64, conv_state, ssm_state
    outputs  logits [batch, vocab] float32 (last position; [batch, seq, vocab] when exported with
             all_logits), conv_state_out, ssm_state_out
State is stacked layer-major: conv_state [n_layer, batch, d_inner, d_conv-1] in the model dtype,
ssm_state [n_layer, batch, d_inner, d_state] float32. Symbolic dimensions are strings ("batch", "seq").
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .checkpoint import DTYPES
from .config import MambaConfig
from .errors import MambaRTError

FORMAT = "mamba-rt-package"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

INPUT_IDS, CONV_STATE, SSM_STATE = "input_ids", "conv_state", "ssm_state"
LOGITS, CONV_STATE_OUT, SSM_STATE_OUT = "logits", "conv_state_out", "ssm_state_out"

GRAPH_PLUGIN, GRAPH_DECODE, GRAPH_PREFILL = "plugin", "decode", "prefill"

ONNX_DTYPES = DTYPES  # package dtype -> tensor dtype name


class PackageError(MambaRTError):
    """A model package is missing, malformed, or was written by an incompatible mamba-rt."""


@dataclasses.dataclass
class TensorSpec:
    name: str
    shape: list[int | str]
    dtype: str  # numpy-style name: float32, float16, bfloat16, int64

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(str(d["name"]), list(d["shape"]), str(d["dtype"]))


@dataclasses.dataclass
class GraphSpec:
    file: str
    kind: str  # "plugin" or "portable"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    seq: int | None = None  # fixed sequence length (1 for the decode graph), None for any

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        return cls(str(d["file"]), str(d["kind"]), [TensorSpec.from_dict(t) for t in d["inputs"]],
                   [TensorSpec.from_dict(t) for t in d["outputs"]], d.get("seq"))


@dataclasses.dataclass
class Manifest:
    config: MambaConfig
    dtype: str  # fp32 | fp16 | bf16
    graphs: dict[str, GraphSpec]
    weights_file: str
    weights_sha256: str
    weights_bytes: int
    weights_index: dict[str, dict] = dataclasses.field(default_factory=dict)
    # canonical name -> {"offset": int, "nbytes": int, "shape": [..], "dtype": "float16"}
    all_logits: bool = False
    tokenizer: str | None = None
    mamba_rt_version: str = ""
    format_version: int = FORMAT_VERSION

    # -- state layout ---------------------------------------------------------------------------------
    def state_specs(self) -> dict[str, TensorSpec]:
        c = self.config
        return {
            CONV_STATE: TensorSpec(CONV_STATE, [c.n_layer, "batch", c.d_inner, c.d_conv - 1], ONNX_DTYPES[self.dtype]),
            SSM_STATE: TensorSpec(SSM_STATE, [c.n_layer, "batch", c.d_inner, c.d_state], "float32"),
        }

    def model_id(self) -> str:
        """Identifies the model a state snapshot belongs to (weights hash + dtype)."""
        return f"{self.weights_sha256[:16]}-{self.dtype}"

    # -- (de)serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "mamba_rt_version": self.mamba_rt_version,
            "config": self.config.to_dict(),
            "dtype": self.dtype,
            "all_logits": self.all_logits,
            "weights": {"file": self.weights_file, "sha256": self.weights_sha256, "bytes": self.weights_bytes,
                        "index": self.weights_index},
            "tokenizer": self.tokenizer,
            "state": {k: dataclasses.asdict(v) for k, v in self.state_specs().items()},
            "graphs": {k: dataclasses.asdict(g) for k, g in self.graphs.items()},
        }

    def save(self, pkg_dir: str | Path) -> Path:
        p = Path(pkg_dir) / MANIFEST
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PackageError(f"{where}: not a mamba-rt model package manifest (expected format {FORMAT!r})")
        ver = d.get("format_version")
        if ver != FORMAT_VERSION:
            raise PackageError(f"{where}: package format version {ver!r}, this mamba-rt reads version "
                               f"{FORMAT_VERSION}; re-export the checkpoint")
        try:
            w = d["weights"]
            return cls(
                config=MambaConfig.from_dict(d["config"]),
                dtype=str(d["dtype"]),
                graphs={k: GraphSpec.from_dict(g) for k, g in d["graphs"].items()},
                weights_file=str(w["file"]), weights_sha256=str(w["sha256"]), weights_bytes=int(w["bytes"]),
                weights_index=dict(w.get("index") or {}),
                all_logits=bool(d.get("all_logits", False)),
                tokenizer=d.get("tokenizer"),
                mamba_rt_version=str(d.get("mamba_rt_version", "")),
                format_version=ver,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PackageError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


def load_manifest(pkg_dir: str | Path, check_files: bool = True) -> Manifest:
    """Read and check a package's manifest; with ``check_files`` every file it names must exist and
    the weights file must have the recorded size."""
    d = Path(pkg_dir)
    if not d.is_dir():
        raise PackageError(f"{pkg_dir}: not a directory (expected a model package from `mamba-rt export`)")
    p = d / MANIFEST
    if not p.is_file():
        raise PackageError(f"{d}: no {MANIFEST} (expected a model package from `mamba-rt export`)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PackageError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
    m = Manifest.from_dict(data, str(p))
    if check_files:
        for name, g in m.graphs.items():
            if not (d / g.file).is_file():
                raise PackageError(f"{d}: graph {name!r} file {g.file!r} is missing")
        wf = d / m.weights_file
        if not wf.is_file():
            raise PackageError(f"{d}: weights file {m.weights_file!r} is missing")
        size = wf.stat().st_size
        if size != m.weights_bytes:
            raise PackageError(f"{wf}: {size} bytes, the manifest records {m.weights_bytes} (truncated or "
                               "replaced weights; re-export)")
        if m.tokenizer and not (d / m.tokenizer).is_file():
            raise PackageError(f"{d}: tokenizer file {m.tokenizer!r} is missing")
    return m


def read_weights(pkg_dir: str | Path, manifest: Manifest) -> dict[str, Any]:
    """Memory-map every weight of a package: canonical name -> numpy array (read-only, no copy).

    bfloat16 has no numpy dtype: those arrays come back as uint16 holding the raw bits.
    """
    import numpy as np

    np_dtypes = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
    path = Path(pkg_dir) / manifest.weights_file
    if not manifest.weights_index:
        raise PackageError(f"{pkg_dir}: the manifest has no weights index; re-export the checkpoint")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, e in manifest.weights_index.items():
        dt = np_dtypes.get(e["dtype"])
        if dt is None:
            raise PackageError(f"{path}: weight {name!r} has dtype {e['dtype']!r}, expected one of {list(np_dtypes)}")
        off, nbytes = int(e["offset"]), int(e["nbytes"])
        if off + nbytes > mm.size:
            raise PackageError(f"{path}: weight {name!r} ends at byte {off + nbytes}, past the file's {mm.size}")
        out[name] = mm[off:off + nbytes].view(dt).reshape(e["shape"])
    return out
