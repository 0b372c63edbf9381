"""Exact, faster encoding for SentencePiece-style BPE tokenizers: BPE runs once per distinct word, then a lookup.

Why it is needed: a tokenizer converted from SentencePiece (Llama, Mistral, `runtime.tokenizer`'s
mistral-common conversion) turns a text into n = "▁" + text.replace(" ", "▁") and runs BPE on all of n as one
word. The merges are then applied across the whole document and the Rust BPE cache never hits: ~1 µs per
token, 93% of a worker's time (issue 11's profile), so no arrangement of processes could beat a plain
`datasets.map` by much.

Why it is exact: cut n before every run of "▁" that follows another character ("▁the▁▁cat▁" → "▁the",
"▁▁cat", "▁"). BPE merges two adjacent symbols at a time, starting from single characters. If no merge joins
a left side that ends in a character other than "▁" to a right side that starts with "▁", no symbol ever
spans a cut, and within each piece the same merges apply in the same order: BPE of n is the concatenation of
BPE of its pieces. `word_cache_encoder` checks that property on the merges, and the exact normalizer and
pre-tokenizer that give n, and returns None for any other tokenizer (the caller keeps its `encode_batch`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import numpy as np

_SPACE = "\u2581"
_RUN_START = re.compile(f"(?<!{_SPACE}){_SPACE}")
_CACHE_BYTES = 48 << 20  # per process; then the cache is emptied, which never changes the ids
_ENTRY_BYTES = 120  # a dict slot, a str and a bytes object, beyond the key's characters and the ids' bytes

_REPLACE_SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}
_METASPACE = {"type": "Metaspace", "replacement": _SPACE, "prepend_scheme": "always", "split": False}
# (normalizer, pre_tokenizer) pairs that each turn a non-empty text into "▁" + text.replace(" ", "▁"), one word
_SENTENCEPIECE_FORMS = (
    (  # transformers' build_tokenizer_from_spm_proto (runtime.tokenizer's conversion): a leading space keeps "▁▁"
        {"type": "Sequence", "normalizers": [
            _REPLACE_SPACE, {"type": "Replace", "pattern": {"Regex": f"\\A{_SPACE}"}, "content": _SPACE * 2}]},
        {"type": "Sequence", "pretokenizers": [_METASPACE]},
    ),
    (  # the legacy Llama / Mistral tokenizer.json
        {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": _SPACE}, _REPLACE_SPACE]},
        None,
    ),
)


def word_cache_encoder(backend) -> Callable[[list[str]], list[np.ndarray]] | None:
    """Returns texts → uint32 token ids per text, equal to `backend.encode_batch(texts, add_special_tokens=False)`
    with `encode_special_tokens` set, or None where `backend` is not a SentencePiece-style BPE this is exact for."""
    spec = json.loads(backend.to_str())
    if not _is_word_separable(spec):
        return None
    from tokenizers import Tokenizer

    # The same model with nothing before or after it: encodes one piece as one BPE word.
    bare = {**spec, "normalizer": None, "pre_tokenizer": None, "post_processor": None, "truncation": None,
            "padding": None}
    pieces = Tokenizer.from_str(json.dumps(bare))
    pieces.encode_special_tokens = True
    return _WordCache(pieces)


class _WordCache:
    def __init__(self, pieces):
        self._pieces = pieces
        self._ids: dict[str, bytes] = {}  # piece without its first "▁" → its ids as native uint32 bytes
        self._bytes = 0  # what _ids holds, about

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        return [self._encode(text) for text in texts]

    def _encode(self, text: str) -> np.ndarray:
        if not text:
            return np.zeros(0, dtype=np.uint32)
        t = text.replace(" ", _SPACE)
        # Without "▁▁" in "▁" + t every "▁" starts a piece, and str.split is ~5x faster than the regex.
        keys = _RUN_START.split(_SPACE + t)[1:] if _SPACE * 2 in t or t.startswith(_SPACE) else t.split(_SPACE)
        got = list(map(self._ids.get, keys))
        if None in got:
            got = self._fill(keys)
        return np.frombuffer(b"".join(got), dtype=np.uint32)

    def _fill(self, keys: list[str]) -> list[bytes]:
        """Returns the ids of each key, encoding the missing ones in one call and caching them."""
        missing = list(set(keys).difference(self._ids))  # set operations: no Python loop over the words
        encodings = self._pieces.encode_batch_fast([_SPACE + k for k in missing], add_special_tokens=False)
        fresh = {k: np.array(e.ids, dtype=np.uint32).tobytes() for k, e in zip(missing, encodings)}
        size = sum(len(k) + len(v) + _ENTRY_BYTES for k, v in fresh.items())
        if self._bytes + size > _CACHE_BYTES:
            got = [fresh[k] if k in fresh else self._ids[k] for k in keys]
            self._ids, self._bytes = fresh, size
            return got
        self._ids.update(fresh)
        self._bytes += size
        return list(map(self._ids.__getitem__, keys))


def _is_word_separable(spec: dict) -> bool:
    """True where encoding equals BPE, piece by piece, of "▁" + text.replace(" ", "▁") cut before each "▁" run."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or _SPACE not in model.get("vocab", {}):
        return False
    if any(model.get(k) for k in ("dropout", "ignore_merges", "continuing_subword_prefix", "end_of_word_suffix")):
        return False
    if (spec.get("normalizer"), spec.get("pre_tokenizer")) not in _SENTENCEPIECE_FORMS:
        return False
    # With encode_special_tokens, only non-special added tokens would still be cut out of the text first.
    if not all(t.get("special") for t in spec.get("added_tokens") or []):
        return False
    post = spec.get("post_processor")
    if post is not None and post.get("type") != "TemplateProcessing":  # adds nothing without special tokens
        return False
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left[-1] != _SPACE and right[0] == _SPACE:
            return False
    return True
