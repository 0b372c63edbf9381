"""The worker's job: read one unit, assign each document to a split, tokenize, join documents with EOS.

Split rule: a document goes to validation when blake2b(sha256(document bytes), key=seed) read as a
fraction of 2**64 is below `validation_fraction`. The document's identity is its content (for a text file,
the file's sha256), so the rule ignores order and worker count, and duplicate documents share a split.

With filters on, the worker also signs each document (`filters.sign_documents`) and returns its tokens
without EOS; the main process decides which are kept and joins those with EOS (`keep_pieces`).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .filters import Piece, SignSettings, sign_documents
from .records import RecordSettings, encode_record_texts, read_records
from .sources import Document, PrepareError, Unit, read_documents
from .word_cache import word_cache_encoder

SPLITS = ("train", "validation")
SPLIT_RULE = "validation iff blake2b(sha256(document utf-8 bytes), digest_size=8, key=int64le(seed)) / 2**64 < fraction"


@dataclass(frozen=True)
class TokenizerSource:
    """What a worker builds its encoder from: `backend_json`, a file holding the main process's Rust backend,
    where encoding with it is exactly what the transformers tokenizer does (the worker then needs neither
    transformers nor torch), else `directory` for `AutoTokenizer`."""

    directory: str
    backend_json: str | None


@dataclass(frozen=True)
class EncodeSettings:
    fmt: str
    text_field: str | None
    seed: int
    validation_fraction: float
    eos_token_id: int
    dtype: str  # of the shards: "uint16" or "uint32"
    tokenizer: TokenizerSource
    filters: SignSettings | None = None
    records: RecordSettings | None = None  # records (chat, prompt-completion, preference) instead of documents


@dataclass
class UnitResult:
    index: int
    input_bytes: int
    tokens: dict[str, np.ndarray]  # per split, shard dtype: documents in order, each followed by EOS if it ends
    documents: dict[str, int]
    words: dict[str, int]
    content_tokens: dict[str, int]  # EOS not counted
    pieces: list[Piece] | None = None  # with filters: per document, its signatures; `tokens` then hold no EOS
    masks: dict[str, np.ndarray] | None = None  # records: per split, 1 where `tokens` holds a target (uint8)
    record_tokens: dict[str, list[int]] | None = None  # records: per split, each one's length with EOS


def tokenizer_source(tokenizer, directory: str, scratch: Path) -> TokenizerSource:
    """Returns where workers load `tokenizer` (from `load_tokenizer`, out of `directory`) from: its Rust backend,
    saved in `scratch`, where the tokenizer is a fast one that keeps transformers' own `_encode_plus` (exactly
    the backend's `encode_batch`), else the directory."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if not (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
        and hasattr(tokenizer.backend_tokenizer, "encode_batch_fast")
    ):
        return TokenizerSource(directory, None)
    path = scratch / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(path))
    return TokenizerSource(directory, str(path))


_encoder = None  # texts -> ids, built on this process's first unit of a preparation
_encoder_source: TokenizerSource | None = None


def _encoder_for(source: TokenizerSource):
    """Returns the encoder for `source`, built once per process and preparation (a worker gets no initializer)."""
    global _encoder, _encoder_source
    if source != _encoder_source:
        _encoder, _encoder_source = _batch_encoder(source), source
    return _encoder


def _batch_encoder(source: TokenizerSource):
    """Returns texts → uint32 token ids per text: no special tokens added, a literal "</s>" in the text encoded
    as text.

    From a backend: `word_cache_encoder` where it is exact (a SentencePiece-style BPE, ~10x faster), else the
    backend's `encode_batch_fast` (no offsets: ~25% faster than calling the transformers tokenizer).
    """
    if source.backend_json is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(source.backend_json)
        backend.encode_special_tokens = True
        backend.no_truncation()  # as transformers' call does: a tokenizer.json may carry both
        backend.no_padding()
        return word_cache_encoder(backend) or (
            lambda texts: [_ids(e.ids) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.directory)
    return lambda texts: [
        _ids(ids)
        for ids in tokenizer(
            texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False
        )["input_ids"]
    ]


def _ids(ids: list[int]) -> np.ndarray:
    return np.array(ids, dtype=np.uint32)


def is_validation(identity: bytes, seed: int, fraction: float) -> bool:
    key = struct.pack("<q", seed)
    value = int.from_bytes(hashlib.blake2b(identity, digest_size=8, key=key).digest(), "little")
    return value < fraction * 2**64


def _split_of(doc: Document, settings: EncodeSettings) -> str:
    identity = doc.identity if doc.identity is not None else hashlib.sha256(doc.text.encode("utf-8")).digest()
    return "validation" if is_validation(identity, settings.seed, settings.validation_fraction) else "train"


def encode_unit(unit: Unit, settings: EncodeSettings) -> UnitResult:
    """Returns the unit's tokens per split, in the shard dtype (half the bytes to pickle for a 32k vocabulary).
    With filters, the tokens of the documents not contaminated, without EOS, and the pieces (`keep_pieces`)."""
    if settings.records is not None:
        return _encode_records(unit, settings)
    docs = read_documents(unit, settings.fmt, settings.text_field)
    if settings.filters is not None:
        return _encode_signed(unit, docs, settings)
    ids = _encoder_for(settings.tokenizer)([d.text for d in docs]) if docs else []
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    documents, words, content = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    eos = np.array([settings.eos_token_id], dtype=np.uint32)
    for doc, tokens in zip(docs, ids, strict=True):
        split = _split_of(doc, settings)
        parts[split].append(tokens)
        words[split] += len(doc.text.split())
        content[split] += len(tokens)
        if doc.ends_document:
            parts[split].append(eos)
            documents[split] += 1
    return UnitResult(unit.index, unit.input_bytes, _arrays(parts, settings.dtype, unit), documents, words, content)


def _encode_records(unit: Unit, settings: EncodeSettings) -> UnitResult:
    """Returns the unit's records per split: tokens, each record (each half of a preference pair) followed by
    EOS, their target mask, and each one's length; `documents` counts records (a pair once), `content_tokens`
    their tokens without EOS. Both halves of a pair share the record's identity, hence its split."""
    records = read_records(unit, settings.records)
    special = settings.records.template_has_special_tokens
    encoded = encode_record_texts(_offsets_encoder_for(settings.tokenizer, special), records)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    masks: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
    documents, words, content = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    for record, (ids, mask) in zip(records, encoded, strict=True):
        split = "validation" if is_validation(hashlib.sha256(record.identity).digest(), settings.seed,
                                              settings.validation_fraction) else "train"
        parts[split] += [ids, np.array([settings.eos_token_id], dtype=np.uint32)]
        masks[split] += [mask, np.array([int(record.ends_with_target)], dtype=np.uint8)]
        lengths[split].append(len(ids) + 1)
        documents[split] += record.opens_record
        words[split] += len(record.text.split())
        content[split] += len(ids)
    mask_arrays = {s: np.concatenate(masks[s]) if masks[s] else np.zeros(0, dtype=np.uint8) for s in SPLITS}
    return UnitResult(unit.index, unit.input_bytes, _arrays(parts, settings.dtype, unit), documents, words, content,
                      masks=mask_arrays, record_tokens=lengths)


_offsets_encoder = None  # texts -> (ids, offsets), for sft records
_offsets_source: tuple | None = None


def _offsets_encoder_for(source: TokenizerSource, special_tokens: bool):
    """Returns texts → (ids, character offsets) per text, no special tokens added; a special token's text in
    the input is that token when `special_tokens` (a tokenizer's own template writes them), else plain text."""
    global _offsets_encoder, _offsets_source
    if (source, special_tokens) != _offsets_source:
        _offsets_encoder, _offsets_source = _build_offsets_encoder(source, special_tokens), (source, special_tokens)
    return _offsets_encoder


def _build_offsets_encoder(source: TokenizerSource, special_tokens: bool):
    if source.backend_json is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(source.backend_json)
        backend.encode_special_tokens = not special_tokens
        backend.no_truncation()
        backend.no_padding()
        return lambda texts: [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.directory)
    if not getattr(tokenizer, "is_fast", False):
        raise PrepareError("sft records need a fast tokenizer (character offsets of each token)", source.directory)

    def encode(texts):
        r = tokenizer(texts, add_special_tokens=False, split_special_tokens=not special_tokens,
                      return_offsets_mapping=True, return_attention_mask=False)
        return list(zip(r["input_ids"], r["offset_mapping"], strict=True))

    return encode


def _encode_signed(unit: Unit, docs: list[Document], settings: EncodeSettings) -> UnitResult:
    pieces = sign_documents(docs, settings.filters)
    clean = [d for d, p in zip(docs, pieces) if p.contaminated is None]
    ids = iter(_encoder_for(settings.tokenizer)([d.text for d in clean]) if clean else [])
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for doc, piece in zip(docs, pieces):
        piece.split = _split_of(doc, settings)
        if piece.contaminated is None:
            tokens = next(ids)
            parts[piece.split].append(tokens)
            piece.words, piece.content_tokens = len(doc.text.split()), len(tokens)
    zeros = dict.fromkeys(SPLITS, 0)
    return UnitResult(unit.index, unit.input_bytes, _arrays(parts, settings.dtype, unit), zeros, zeros, zeros, pieces)


def sign_unit(unit: Unit, settings: EncodeSettings) -> UnitResult:
    """Returns the unit's pieces, not tokenized: what resuming needs to decide the units done again."""
    pieces = sign_documents(read_documents(unit, settings.fmt, settings.text_field), settings.filters)
    zeros = dict.fromkeys(SPLITS, 0)
    return UnitResult(unit.index, unit.input_bytes, {}, zeros, zeros, zeros, pieces)


def keep_pieces(result: UnitResult, decisions: list[tuple[bool, bool]], eos_token_id: int) -> UnitResult:
    """Returns `result` (from `encode_unit` with filters) as the unfiltered encoder would have made it from the
    pieces kept: their tokens joined by EOS where `decisions` (`FilterState.decide`) end a document."""
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    documents, words, content = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    start = dict.fromkeys(SPLITS, 0)
    for piece, (keep, ends) in zip(result.pieces, decisions, strict=True):
        split, tokens = piece.split, result.tokens[piece.split]
        if keep:
            parts[split].append(tokens[start[split] : start[split] + piece.content_tokens])
            words[split] += piece.words
            content[split] += piece.content_tokens
        start[split] += piece.content_tokens
        if ends:
            parts[split].append(np.array([eos_token_id], dtype=tokens.dtype))
            documents[split] += 1
    arrays = {s: np.concatenate(parts[s]) if parts[s] else result.tokens[s][:0] for s in SPLITS}
    return UnitResult(result.index, result.input_bytes, arrays, documents, words, content)


def _arrays(parts: dict[str, list[np.ndarray]], dtype: str, unit: Unit) -> dict[str, np.ndarray]:
    """Returns each split's parts joined, in the shard dtype; a PrepareError for an id the dtype cannot hold."""
    bound = int(np.iinfo(dtype).max) + 1
    arrays = {}
    for split in SPLITS:
        joined = np.concatenate(parts[split]) if parts[split] else np.zeros(0, dtype=np.uint32)
        if len(joined) and int(joined.max()) >= bound:
            raise PrepareError(
                f"token id {int(joined.max())} does not fit the shard dtype (ids < {bound})", unit.segments[0].path
            )
        arrays[split] = joined.astype(dtype)
    return arrays
