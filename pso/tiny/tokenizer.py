"""A tiny CLIP BPE tokenizer built offline in pure Python.

The vocabulary is CLIP's byte-level alphabet (each byte alone and with "</w>"), one token per
merge, then the two special tokens. Merges make every listed word a single token; any other
text still tokenizes, down to single characters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import CLIPTokenizer

TOKENIZER_WORDS: tuple[str, ...] = (
    # articles, prepositions, conjunctions
    "a", "an", "the", "on", "in", "of", "with", "and", "at", "to", "above", "below", "under", "over",
    "next", "behind", "near",
    # colours
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "gray", "brown", "cyan",
    # shapes and scene words
    "circle", "square", "triangle", "star", "rectangle", "ellipse", "heart", "cross", "dot", "line",
    "stripe", "shape", "background",
    # sizes and styles
    "small", "large", "big", "bright", "dark", "photo", "painting", "drawing", "sketch", "cartoon", "pixel",
    "art", "style",
    # digits
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
)  # fmt: skip

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges by rank, lowest first, as the BPE model does."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def merges_joining(words: Iterable[list[str]]) -> list[tuple[str, str]]:
    """BPE merges joining each word (given as its initial symbols) left to right into one token, added only
    where earlier merges fall short. A new merge ranks last, so it never changes how an earlier (already
    single-token) word splits. Every tiny BPE tokenizer (CLIP here, Gemma and Qwen in pso/tiny/flow)
    builds its merges so."""
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _bpe(word, ranks)
        while len(symbols) > 1:
            ranks[symbols[0], symbols[1]] = len(ranks)
            symbols = _bpe(symbols, ranks)
    return list(ranks)


def _clip_symbols(word: str, byte_chars: dict[int, str]) -> list[str]:
    chars = [byte_chars[b] for b in word.lower().encode()]
    return [*chars[:-1], chars[-1] + "</w>"]


def build_clip_tokenizer(out_dir: str | Path, words: Sequence[str] | None = None) -> CLIPTokenizer:
    """Write a CLIP tokenizer to `out_dir` in which each of `words` is one token, and load it.

    Words should be runs of letters or single digits, which is how CLIP pre-tokenizes text.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    byte_chars = bytes_to_unicode()
    alphabet = list(byte_chars.values())
    merges = merges_joining(_clip_symbols(w, byte_chars) for w in (TOKENIZER_WORDS if words is None else words))
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *map("".join, merges), BOS, EOS]
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    CLIPTokenizer.from_pretrained(out_dir, model_max_length=MODEL_MAX_LENGTH).save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)
