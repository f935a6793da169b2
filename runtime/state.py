"""Recurrent state: fixed buffers for ``max_batch`` sequences, slots, fork, snapshot and restore.

Two roles, kept apart:

* :class:`StateBuffers` is *where* the state lives. A backend allocates it (numpy arrays on the host
  for the ONNX Runtime CPU backend, torch tensors or ONNX Runtime device values on a GPU), once, with
  the layout of the package's graphs::

      conv  (n_layer, max_batch, d_inner, d_conv - 1)  model dtype (bfloat16 held as uint16 bits on the host)
      ssm   (n_layer, max_batch, d_inner, d_state)     float32

  It knows how to zero, copy, read and write one slot, and nothing else.
* :class:`StateCache` is *who owns what*: it hands out slots, resets, forks, and snapshots a slot to
  host bytes or a file and restores it. It never allocates state after construction, so memory does
  not grow with the number of generated tokens.

Snapshot format (version 1), never pickled::

    b"MAMBA-RT-STATE\\0\\0"        16-byte magic
    uint64 little-endian          length of the JSON header in bytes
    JSON header (UTF-8)           {"format", "version", "model_id", "dtype", "tensors": [{"name",
                                   "shape", "dtype", "offset", "nbytes"}], "extra": {...}}
    raw bytes                     the tensors, C order, at the offsets named in the header

``model_id`` is :meth:`Manifest.model_id` (weights hash + dtype): a snapshot restores only into a
cache of the same model and dtype. ``extra`` carries the sampler's per-slot state (seed, counter,
tokens seen for the repetition penalty) so a restored conversation samples exactly as it would have.
"""
from __future__ import annotations

import abc
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mamba_rt.errors import InputError, InternalError, MambaRTError
from mamba_rt.manifest import Manifest

SNAPSHOT_MAGIC = b"MAMBA-RT-STATE\0\0"
SNAPSHOT_FORMAT = "mamba-rt-state"
SNAPSHOT_VERSION = 1

# host representation of each state dtype (bfloat16 has no numpy dtype: its raw bits as uint16)
HOST_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class SnapshotError(MambaRTError):
    """A state snapshot is malformed, of another format version, or belongs to another model."""


class StateBuffers(abc.ABC):
    """Preallocated conv and SSM state of every layer for ``max_batch`` sequences (one backend's memory).

    Subclasses implement the five slot operations on their own memory; slot ids are already checked.
    ``read`` returns host arrays ``conv (n_layer, d_inner, d_conv-1)`` in :data:`HOST_DTYPES` and
    ``ssm (n_layer, d_inner, d_state)`` float32; ``write`` takes the same.
    """

    def __init__(self, manifest: Manifest, max_batch: int):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch: expected an integer >= 1, got {max_batch!r}")
        specs = manifest.state_specs()
        self.max_batch = max_batch
        self.conv_dtype = specs["conv_state"].dtype  # float32 | float16 | bfloat16
        self.conv_shape = manifest.config.state_shapes(max_batch)["conv_state"]
        self.ssm_shape = manifest.config.state_shapes(max_batch)["ssm_state"]

    def slot_shapes(self) -> dict[str, tuple[int, ...]]:
        c, s = self.conv_shape, self.ssm_shape
        return {"conv_state": (c[0],) + c[2:], "ssm_state": (s[0],) + s[2:]}

    @property
    def nbytes(self) -> int:
        conv = int(np.prod(self.conv_shape)) * np.dtype(HOST_DTYPES[self.conv_dtype]).itemsize
        return conv + int(np.prod(self.ssm_shape)) * 4

    @abc.abstractmethod
    def zero(self, slot: int) -> None: ...

    @abc.abstractmethod
    def copy(self, src: int, dst: int) -> None: ...

    @abc.abstractmethod
    def read(self, slot: int) -> tuple[np.ndarray, np.ndarray]: ...

    @abc.abstractmethod
    def write(self, slot: int, conv: np.ndarray, ssm: np.ndarray) -> None: ...


class HostStateBuffers(StateBuffers):
    """State in host memory as numpy arrays (``conv`` and ``ssm`` attributes, graph layout)."""

    def __init__(self, manifest: Manifest, max_batch: int):
        super().__init__(manifest, max_batch)
        self.conv = np.zeros(self.conv_shape, HOST_DTYPES[self.conv_dtype])
        self.ssm = np.zeros(self.ssm_shape, np.float32)

    def zero(self, slot):
        self.conv[:, slot] = 0
        self.ssm[:, slot] = 0

    def copy(self, src, dst):
        self.conv[:, dst] = self.conv[:, src]
        self.ssm[:, dst] = self.ssm[:, src]

    def read(self, slot):
        return self.conv[:, slot].copy(), self.ssm[:, slot].copy()

    def write(self, slot, conv, ssm):
        self.conv[:, slot] = conv
        self.ssm[:, slot] = ssm


class StateCache:
    """Slots over a backend's :class:`StateBuffers`: alloc/free, reset, fork, snapshot/restore.

    Every method validates its arguments before touching any buffer, so a bad call leaves every
    slot's state as it was.
    """

    def __init__(self, buffers: StateBuffers, manifest: Manifest):
        self.buffers = buffers
        self.model_id = manifest.model_id()
        self.dtype = manifest.dtype
        self.max_batch = buffers.max_batch
        self._free = list(range(self.max_batch))  # kept sorted: alloc returns the lowest free slot
        self._used = bytearray(self.max_batch)     # 1 where allocated: O(1) checks, every decode step
        # hooks run on reset/copy/snapshot/restore so per-slot companions (the sampler) follow the state
        self._companions: list[Any] = []

    # -- slots --------------------------------------------------------------------------------------
    @property
    def n_free(self) -> int:
        return len(self._free)

    def in_use(self) -> list[int]:
        free = set(self._free)
        return [s for s in range(self.max_batch) if s not in free]

    def check_slot(self, slot, name: str = "slot") -> int:
        if isinstance(slot, (bool, np.bool_)) or not isinstance(slot, (int, np.integer)):
            raise InputError(f"{name}: expected an integer slot id, got {slot!r}")
        slot = int(slot)
        if not 0 <= slot < self.max_batch:
            raise InputError(f"{name} {slot}: out of range, expected 0 <= slot < max_batch={self.max_batch}")
        if not self._used[slot]:
            raise InputError(f"{name} {slot}: not allocated (call alloc() first); slots in use: {self.in_use()}")
        return slot

    def check_slots(self, slots, name: str = "slot") -> np.ndarray:
        """``slots`` (any sequence, flattened) as int64 slot ids, each checked as :meth:`check_slot`
        does (same errors). A decode step calls this for every row of every token, so the common case
        (plain ints, or an integer array) is one loop over bytes; anything else takes check_slot's
        way element by element, for its message."""
        items = slots.reshape(-1).tolist() if isinstance(slots, np.ndarray) and slots.dtype.kind in "iu" else slots
        used, n = self._used, self.max_batch
        for x in items:
            if type(x) is not int or not 0 <= x < n or not used[x]:
                return np.asarray([self.check_slot(y, name) for y in np.asarray(slots, dtype=object).reshape(-1).tolist()],
                                  np.int64)
        return np.array(items, np.int64)

    def alloc(self, n: int | None = None):
        """One fresh (zeroed) slot, or a list of ``n``. Refuses when not enough slots are free."""
        want = 1 if n is None else n
        if isinstance(want, bool) or not isinstance(want, int) or want < 1:
            raise InputError(f"alloc: expected a count >= 1, got {n!r}")
        if want > len(self._free):
            raise InputError(f"{want} sequence(s) requested but only {len(self._free)} of max_batch="
                             f"{self.max_batch} slots are free; free slots or open the session with a "
                             "larger max_batch")
        slots = self._free[:want]
        del self._free[:want]
        for s in slots:
            self._used[s] = 1
        for s in slots:
            self._reset(s)
        return slots[0] if n is None else slots

    def free(self, slot: int) -> None:
        slot = self.check_slot(slot)
        self._free.append(slot)
        self._free.sort()
        self._used[slot] = 0

    def reset(self, slot: int) -> None:
        """Zero a slot's state (a fresh sequence), keeping it allocated."""
        self._reset(self.check_slot(slot))

    def _reset(self, slot: int) -> None:
        self.buffers.zero(slot)
        for c in self._companions:
            c.reset_slot(slot)

    def copy(self, src: int, dst: int) -> None:
        """Copy ``src``'s state into the allocated slot ``dst``."""
        src, dst = self.check_slot(src, "src"), self.check_slot(dst, "dst")
        if src != dst:
            self.buffers.copy(src, dst)
            for c in self._companions:
                c.copy_slot(src, dst)

    def fork(self, src: int) -> int:
        """A new slot holding a copy of ``src``'s state: two continuations of one prefix."""
        src = self.check_slot(src, "src")
        dst = self.alloc()
        self.copy(src, dst)
        return dst

    # -- snapshots ----------------------------------------------------------------------------------
    def snapshot(self, slot: int) -> bytes:
        """The slot's state (and its companions' per-slot state) as self-describing bytes."""
        slot = self.check_slot(slot)
        conv, ssm = self.buffers.read(slot)
        extra: dict[str, Any] = {}
        blobs = [("conv_state", conv), ("ssm_state", ssm)]
        for c in self._companions:
            meta, arrays = c.save_slot(slot)
            extra[c.snapshot_key] = meta
            blobs += [(f"{c.snapshot_key}.{k}", v) for k, v in arrays.items()]
        tensors, offset = [], 0
        for name, a in blobs:
            a = np.ascontiguousarray(a)
            dt = self.buffers.conv_dtype if name == "conv_state" else a.dtype.name
            tensors.append({"name": name, "shape": list(a.shape), "dtype": dt, "offset": offset, "nbytes": a.nbytes})
            offset += a.nbytes
        header = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "model_id": self.model_id,
                  "dtype": self.dtype, "tensors": tensors, "extra": extra}
        hb = json.dumps(header, separators=(",", ":")).encode()
        return b"".join([SNAPSHOT_MAGIC, struct.pack("<Q", len(hb)), hb] + [np.ascontiguousarray(a).tobytes() for _, a in blobs])

    def restore(self, slot: int, data: bytes) -> None:
        """Load a snapshot into the allocated ``slot``; refuses, touching nothing, when it does not fit."""
        slot = self.check_slot(slot)
        arrays, extra = self._parse(data)
        for c in self._companions:
            if c.snapshot_key not in extra:
                raise SnapshotError(f"state snapshot: no {c.snapshot_key!r} section")
            c.check_slot_state(extra[c.snapshot_key],
                               {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(c.snapshot_key + ".")})
        self.buffers.write(slot, arrays["conv_state"], arrays["ssm_state"])
        for c in self._companions:
            c.load_slot(slot, extra[c.snapshot_key],
                        {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(c.snapshot_key + ".")})

    def save(self, slot: int, path: str | Path) -> Path:
        p = Path(path)
        p.write_bytes(self.snapshot(slot))
        return p

    def load(self, slot: int, path: str | Path) -> None:
        p = Path(path)
        if not p.is_file():
            raise SnapshotError(f"{p}: no such state snapshot file")
        self.restore(slot, p.read_bytes())

    def _parse(self, data) -> tuple[dict[str, np.ndarray], dict]:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SnapshotError(f"state snapshot: expected bytes, got {type(data).__name__}")
        data = bytes(data)
        n = len(SNAPSHOT_MAGIC)
        if data[:n] != SNAPSHOT_MAGIC or len(data) < n + 8:
            raise SnapshotError("state snapshot: not a mamba-rt state snapshot (bad magic)")
        (hlen,) = struct.unpack("<Q", data[n:n + 8])
        try:
            header = json.loads(data[n + 8:n + 8 + hlen].decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SnapshotError(f"state snapshot: unreadable header ({e})") from None
        if not isinstance(header, dict) or header.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"state snapshot: expected format {SNAPSHOT_FORMAT!r}")
        if header.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError(f"state snapshot: version {header.get('version')!r}, this mamba-rt reads "
                                f"version {SNAPSHOT_VERSION}")
        if header.get("model_id") != self.model_id or header.get("dtype") != self.dtype:
            raise SnapshotError(f"state snapshot belongs to model {header.get('model_id')!r} "
                                f"({header.get('dtype')}), this session runs {self.model_id!r} ({self.dtype})")
        body = data[n + 8 + hlen:]
        want = self.buffers.slot_shapes()
        arrays: dict[str, np.ndarray] = {}
        try:
            for t in header["tensors"]:
                name, shape, dt = str(t["name"]), tuple(int(x) for x in t["shape"]), str(t["dtype"])
                off, nb = int(t["offset"]), int(t["nbytes"])
                npdt = np.dtype(HOST_DTYPES[dt]) if dt in HOST_DTYPES else np.dtype(dt)
                if npdt.kind not in "biuf" or off < 0 or off + nb > len(body) or nb != int(np.prod(shape)) * npdt.itemsize:
                    raise SnapshotError(f"state snapshot: tensor {name!r} is truncated or malformed "
                                        f"({nb} bytes at {off}, shape {list(shape)} {dt}, body {len(body)} bytes)")
                if name in want:
                    want_dt = self.buffers.conv_dtype if name == "conv_state" else "float32"
                    if shape != want[name] or dt != want_dt:
                        raise SnapshotError(f"state snapshot: {name} is {list(shape)} {dt}, this session expects "
                                            f"{list(want[name])} {want_dt}")
                arrays[name] = np.frombuffer(body, npdt, count=int(np.prod(shape)), offset=off).reshape(shape)
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"state snapshot: malformed header ({type(e).__name__}: {e})") from None
        for name in want:
            if name not in arrays:
                raise SnapshotError(f"state snapshot: tensor {name!r} is missing")
        extra = header.get("extra") or {}
        if not isinstance(extra, dict):
            raise SnapshotError("state snapshot: malformed 'extra' section")
        return arrays, extra

    def add_companion(self, companion) -> None:
        """Register an object with per-slot state that must follow reset/copy/snapshot/restore.

        It provides ``snapshot_key``, ``reset_slot(s)``, ``copy_slot(src, dst)``, ``save_slot(s) ->
        (meta: dict, arrays: dict)``, ``check_slot_state(meta, arrays)`` (raise SnapshotError) and
        ``load_slot(s, meta, arrays)``.
        """
        if any(c.snapshot_key == companion.snapshot_key for c in self._companions):
            raise InternalError(f"two state companions with key {companion.snapshot_key!r}")
        self._companions.append(companion)
        for s in range(self.max_batch):
            companion.reset_slot(s)


