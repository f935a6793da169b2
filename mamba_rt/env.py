"""Every environment variable mamba-rt reads, in one place (also listed in README.md).

MAMBA_RT_CACHE_DIR   where compiled CUDA kernels (cubins) are cached.
                     Default: $XDG_CACHE_HOME/mamba-rt, else ~/.cache/mamba-rt.
MAMBA_RT_DEBUG       "1": the CLI prints tracebacks for user errors too (same as --debug).
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    explicit = os.environ.get("MAMBA_RT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mamba-rt"


def debug() -> bool:
    return os.environ.get("MAMBA_RT_DEBUG", "") not in ("", "0", "false", "False")
