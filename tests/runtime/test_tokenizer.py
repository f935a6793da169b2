"""Tokenizers: the byte-level fallback's rules, tokenizer.json through `tokenizers`, streaming text."""
import random

import pytest

from mamba_rt.errors import InputError
from mamba_rt.runtime.tokenizer import REPLACEMENT, ByteTokenizer, HFTokenizer, TextStream

TEXTS = ["plain ascii", "héllo wörld — ✓ 日本語 🙂", "tabs\tand\nnewlines", ""]


def bpe_tokenizer_file(path, vocab_size=300):
    """A small byte-level BPE tokenizer.json trained here (no downloads)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "héllo wörld ✓ 日本語"] * 5, trainer)
    tok.save(str(path))
    return path


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_roundtrip(text):
    t = ByteTokenizer(256)
    ids = t.encode(text)
    assert ids == list(text.encode()) and t.decode(ids) == text


def test_byte_tokenizer_small_vocab_and_large_ids():
    t = ByteTokenizer(101)
    assert t.encode("HA!") == [72, 65, 33]
    with pytest.raises(InputError, match=r"byte 195 \(0xc3\) at byte offset 1 .*bytes 0..100"):
        t.encode("Hé")
    with pytest.raises(InputError, match="byte 111 .* offset 2"):
        t.encode("AAo")
    # ids >= 256 have no byte: shown as U+FFFD, never dropped
    big = ByteTokenizer(1000)
    assert big.decode([104, 300, 105]) == "h" + REPLACEMENT + "i"
    # a truncated multi-byte character is U+FFFD as well
    assert big.decode(list("é".encode())[:1]) == REPLACEMENT


def _stream(tok, ids):
    s = TextStream(tok)
    parts = [s.push(i) for i in ids]
    return parts, "".join(parts) + s.flush()


def test_text_stream_holds_back_split_characters():
    t = ByteTokenizer(256)
    ids = t.encode("a✓b")  # ✓ is three bytes
    parts, full = _stream(t, ids)
    assert parts == ["a", "", "", "✓", "b"] and full == "a✓b"


def test_hf_tokenizer_roundtrip_and_stream(tmp_path):
    tok = HFTokenizer(bpe_tokenizer_file(tmp_path / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert _stream(tok, ids)[1] == text
    # random id sequences: the streamed text equals decoding everything at once
    rng = random.Random()
    for _ in range(20):
        ids = [rng.randrange(300) for _ in range(rng.randrange(1, 40))]
        assert _stream(tok, ids)[1] == tok.decode(ids), ids
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges are used
