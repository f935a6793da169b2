"""Text in, text out: the package's ``tokenizer.json`` through ``tokenizers``, or a byte-level fallback.

Byte-level fallback (a package without a tokenizer): the text's UTF-8 bytes are the token ids
(id = byte value). Rules:

* encoding needs every byte value of the text to be a token id: with a vocabulary of fewer than 256
  tokens, a text containing a byte >= vocab_size is refused with an :class:`InputError` naming it
  (plain ASCII needs vocab_size >= 128);
* decoding: ids 0..255 are bytes, decoded as UTF-8 with invalid sequences shown as U+FFFD; an id
  >= 256 (a model with a larger vocabulary can generate one) has no byte and is shown as U+FFFD too,
  so nothing is dropped silently.

:class:`TextStream` turns a growing list of ids into text deltas for streaming: it holds back text
while the last token ends inside a multi-byte character.
"""
from __future__ import annotations

from pathlib import Path

from mamba_rt._optional import require
from mamba_rt.errors import InputError
from mamba_rt.manifest import Manifest

REPLACEMENT = "\ufffd"


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``; ``kind`` says which one this is."""

    kind = "abstract"

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    kind = "bytes"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"prompt: expected text (str), got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if self.vocab_size < 256:
            for i, b in enumerate(ids):
                if b >= self.vocab_size:
                    raise InputError(f"prompt byte {b} (0x{b:02x}) at byte offset {i} has no token: this package "
                                     f"has no tokenizer.json and its vocabulary ({self.vocab_size}) covers bytes "
                                     f"0..{self.vocab_size - 1} only; pass token ids instead")
        return ids

    def decode(self, ids) -> str:
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(REPLACEMENT)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer(Tokenizer):
    kind = "tokenizer.json"

    def __init__(self, path: str | Path):
        tokenizers = require("tokenizers")
        self.path = Path(path)
        self._tok = tokenizers.Tokenizer.from_file(str(self.path))

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"prompt: expected text (str), got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(pkg_dir: str | Path, manifest: Manifest) -> Tokenizer:
    """The package's tokenizer.json when it has one, else the byte-level fallback."""
    if manifest.tokenizer:
        return HFTokenizer(Path(pkg_dir) / manifest.tokenizer)
    return ByteTokenizer(manifest.config.vocab_size)


class TextStream:
    """Incremental detokenisation: ``push(id) -> new text`` (possibly ""), ``flush() -> the rest``.

    Decodes a short window of recent ids and emits only what the window adds, holding text back while
    it ends in U+FFFD (an incomplete multi-byte character).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []  # the window: ids[:_read] were emitted already, the rest not yet
        self._read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[:self._read])
        now = self.tok.decode(self.ids)
        if len(now) > len(before) and not now.endswith(REPLACEMENT):
            del self.ids[:self._read]  # only the window is kept: memory does not grow with the text
            self._read = len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[:self._read])
        now = self.tok.decode(self.ids)
        self.ids.clear()
        self._read = 0
        return now[len(before):]
