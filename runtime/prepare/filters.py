"""Document filters for corpus preparation: benchmark decontamination, then exact and near deduplication.

Who does what: the workers sign each document (`sign_documents`: the benchmark item it contains, if any; the
hash of its normalized text; its MinHash), in parallel; the main process decides (`FilterState.decide`) in
unit order. So of documents that duplicate each other the first in corpus order (files in the order given,
documents in file order) is kept, whatever the worker count. A contaminated document is dropped first, in the
worker (it is not tokenized), so deduplication never sees it and no later copy is kept in its place.

Decontamination follows GPT-3 and lm-evaluation-harness: words are lower-cased with ASCII punctuation deleted,
an n-gram is n consecutive words, and an item shorter than n words is one n-gram of all its words. A document
is contaminated when at least `min_matches` distinct n-grams of it occur in one benchmark item.

What a document is here: as `sources` reads them, except that a text file larger than `unit_bytes` is filtered
segment by segment, so that no decision waits for a later unit: a dropped segment leaves the rest of the file,
and EOS still ends the file where any of it was kept.

Memory in the main process grows with the kept documents: ~150 bytes each for exact dedup (hash and where), and
~1 KiB more for near dedup (the MinHash and the LSH's band keys).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.evaluate.benchmarks import load_benchmarks

from .manifest import FilterStats
from .shards import ResumeMismatch
from .sources import Document, InputFile, PrepareError, line_numbers

# datasketch 2.0 changed the default scheme; naming it keeps a MinHash, and so the output, fixed across versions.
MINHASH_SCHEME = "affine32"
MINHASH_SEED = 1
NORMALIZATION = "NFKC, lower-cased, whitespace collapsed to one space; hashed with blake2b (16 bytes)"
SHINGLE_HASH = ("the high 32 bits of sum(h(w_i) * 0x100000001B3**(k-1-i)) mod 2**64 over the shingle's k words, "
                "h = blake2b (8 bytes, little-endian)")
NGRAM_RULE = ("words: lower-cased, ASCII punctuation deleted, split on whitespace; n-gram: n consecutive words, "
              "an item shorter than n words is one n-gram")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")  # re.sub: ~4x faster than str.translate here
_PRESENT_MASK = (1 << 23) - 1  # 8 MiB of bools: ~3% of probes pass for the ~250k n-grams of CTI-MCQ and SecEval
_MULTIPLIER = np.uint64(0x100000001B3)  # odd, so each step of the rolling n-gram hash is a bijection mod 2**64
REASONS = ("contaminated", "exact_duplicates", "near_duplicates")


@dataclass(frozen=True)
class DedupSettings:
    """Which duplicates to drop. `exact`: the same normalized text (NORMALIZATION) as a kept document. `near`:
    MinHash LSH over shingles of `shingle_words` normalized words finds a kept document whose estimated Jaccard
    similarity is at least `near_threshold`."""

    exact: bool = True
    near: bool = False
    near_threshold: float = 0.8
    num_perm: int = 128
    shingle_words: int = 5

    def __post_init__(self):
        if not 0.0 < self.near_threshold <= 1.0:
            raise PrepareError(f"dedup near_threshold {self.near_threshold!r} must be in (0, 1]")
        if self.num_perm < 2 or self.shingle_words < 1:
            raise PrepareError(f"dedup num_perm ({self.num_perm}) must be at least 2 and shingle_words "
                               f"({self.shingle_words}) at least 1")


@dataclass(frozen=True)
class BenchmarkItem:
    benchmark: str
    row: str  # where the item is, as the benchmark loader says: `file:line` or `file:[index]`
    text: str  # the question and its four options, joined by newlines


@dataclass(frozen=True)
class DecontaminationSettings:
    """Drop documents holding at least `min_matches` distinct `ngram`-word n-grams of one of `items`."""

    items: tuple[BenchmarkItem, ...]
    ngram: int = 13
    min_matches: int = 1

    def __post_init__(self):
        if not self.items:
            raise PrepareError("decontamination has no benchmark items")
        if self.ngram < 1 or self.min_matches < 1:
            raise PrepareError(f"decontamination ngram ({self.ngram}) and min_matches ({self.min_matches}) must be "
                               "positive")


def benchmark_items(files: Mapping[str, str | Path]) -> tuple[BenchmarkItem, ...]:
    """Returns the items of the benchmark files ({benchmark name: path}, as `load_benchmarks` reads them), in
    file order: each question with its options, one per line."""
    return tuple(
        BenchmarkItem(name, q.row, "\n".join((q.text, *q.options)))
        for name, (_, questions) in load_benchmarks(files).items()
        for q in questions
    )


def settings_record(dedup: DedupSettings | None, decontamination: DecontaminationSettings | None) -> dict:
    """Returns the filter settings as the manifest records them and the fingerprint covers them; the items by
    count per benchmark and a sha256 over all of them."""
    record = {}
    if dedup is not None:
        record["dedup"] = {**asdict(dedup), "normalization": NORMALIZATION,
                           "minhash": f"datasketch MinHash scheme {MINHASH_SCHEME} seed {MINHASH_SEED} over "
                                      f"shingles hashed as {SHINGLE_HASH}"}
    if decontamination is not None:
        items = decontamination.items
        counts: dict[str, int] = {}
        for item in items:
            counts[item.benchmark] = counts.get(item.benchmark, 0) + 1
        digest = hashlib.sha256(json.dumps([asdict(i) for i in items], separators=(",", ":")).encode()).hexdigest()
        record["decontamination"] = {"ngram": decontamination.ngram, "min_matches": decontamination.min_matches,
                                     "rule": NGRAM_RULE, "items": counts, "items_sha256": digest}
    return record


# --- in the workers -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignSettings:
    """What a worker needs to sign documents. It travels with every unit, so the n-gram index travels as the
    path of a file (`write_ngram_index`), read once per process."""

    dedup: DedupSettings | None
    min_matches: int = 1
    index_path: str | None = None


@dataclass
class Piece:
    """One document as the filters see it (for a text file read in segments, one segment) and its signatures."""

    path: str
    offset: int  # Document.offset: a byte offset, or a parquet row
    ends_document: bool
    contaminated: tuple[int, int] | None = None  # (item index, distinct n-grams it shares with that item)
    exact: bytes = b""  # blake2b of the normalized text; empty unless exact dedup is on
    minhash: np.ndarray | None = None  # num_perm uint32 values; None unless near dedup is on
    split: str = ""  # filled in by the encoder, like the counts
    words: int = 0
    content_tokens: int = 0  # 0 where contaminated: it is not tokenized


def sign_documents(docs: Sequence[Document], settings: SignSettings) -> list[Piece]:
    """Returns each document's piece: the item it contaminates, else the signatures dedup is set to compare."""
    index = _index_at(settings.index_path) if settings.index_path is not None else None
    word_hashes = _WordHashes()
    pieces = [Piece(d.path, d.offset, d.ends_document) for d in docs]
    if index is not None:
        for piece, doc in zip(pieces, docs):
            piece.contaminated = _contamination(doc.text, index, settings.min_matches, word_hashes)
    dedup = settings.dedup
    clean = [(p, d) for p, d in zip(pieces, docs) if p.contaminated is None]
    if dedup is None or not clean:
        return pieces
    normalized = [" ".join(unicodedata.normalize("NFKC", d.text).lower().split()) for _, d in clean]
    if dedup.exact:
        for (piece, _), text in zip(clean, normalized):
            piece.exact = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
    if dedup.near:
        from datasketch import MinHash  # here: datasketch imports scipy (~0.4 s), which nothing else needs

        shingles = [_shingles(text, dedup.shingle_words, word_hashes) for text in normalized]
        # The shingles arrive hashed (SHINGLE_HASH, ~3x faster than datasketch's sha1 of each), so its hashfunc
        # only passes them on.
        sketches = MinHash.bulk(shingles, num_perm=dedup.num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME,
                                hashfunc=int)
        for (piece, _), sketch in zip(clean, sketches):
            piece.minhash = sketch.hashvalues
    return pieces


def _shingles(normalized: str, size: int, cache: _WordHashes) -> list[int]:
    """Returns the 32-bit hashes of the text's word `size`-grams; a text shorter than that is one shingle."""
    words = normalized.split(" ")
    hashes = np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))
    return (_ngram_hashes(hashes, min(size, len(words))) >> np.uint64(32)).tolist()


class _WordHashes(dict):
    """word → 64-bit hash, computed on first sight: the same in every process (str.__hash__ is salted)."""

    def __missing__(self, word: str) -> int:
        value = self[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        return value


def _word_hashes(text: str, cache: _WordHashes) -> np.ndarray:
    words = _PUNCTUATION.sub("", text.lower()).split()
    return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))


def _ngram_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """Returns the hash of each run of n word hashes: a polynomial over them mod 2**64, vectorized."""
    count = len(words) - n + 1
    if count < 1:
        return np.zeros(0, dtype=np.uint64)
    out = words[:count].copy()
    for j in range(1, n):
        out = out * _MULTIPLIER + words[j : j + count]
    return out


@dataclass(frozen=True)
class NgramIndex:
    """{n-gram hash → benchmark items} as arrays: `keys` sorted and unique, the items of keys[k] are
    `items[starts[k]:starts[k + 1]]`; `lengths`, the n-gram lengths present (n, and shorter items' lengths);
    `present[h & _PRESENT_MASK]` is False for most hashes not in `keys` (a one-probe Bloom filter)."""

    keys: np.ndarray
    starts: np.ndarray
    items: np.ndarray
    lengths: tuple[int, ...]
    present: np.ndarray


def _present(keys: np.ndarray) -> np.ndarray:
    """Returns the `present` bitmap: a document's n-grams are then looked up in `keys` (a binary search, ~4x
    slower than the probe) only where it says they may be."""
    present = np.zeros(_PRESENT_MASK + 1, dtype=bool)
    present[keys & np.uint64(_PRESENT_MASK)] = True
    return present


def ngram_index(settings: DecontaminationSettings) -> NgramIndex:
    """Returns the index of every item's distinct n-grams (hashes; an item of no words has none)."""
    cache = _WordHashes()
    hashes, owners, lengths = [], [], set()
    for i, item in enumerate(settings.items):
        words = _word_hashes(item.text, cache)
        n = min(settings.ngram, len(words))
        if n:
            grams = np.unique(_ngram_hashes(words, n))
            hashes.append(grams)
            owners.append(np.full(len(grams), i, dtype=np.int32))
            lengths.add(n)
    hashes_all = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
    owners_all = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int32)
    order = np.lexsort((owners_all, hashes_all))
    keys, starts = np.unique(hashes_all[order], return_index=True)
    return NgramIndex(keys, np.append(starts, len(order)), owners_all[order], tuple(sorted(lengths)), _present(keys))


def write_ngram_index(index: NgramIndex, directory: Path) -> str:
    """Writes `index` for the workers into `directory`; returns its path, which names its contents' sha256 (the
    workers' cache key)."""
    arrays = {"keys": index.keys, "starts": index.starts, "items": index.items, "lengths": np.array(index.lengths)}
    digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays.values())).hexdigest()
    path = directory / f"ngram-index-{digest[:16]}.npz"
    np.savez(path, **arrays)
    return str(path)


_index: tuple[str, NgramIndex] | None = None  # this process's copy, read on its first unit of a preparation


def _index_at(path: str) -> NgramIndex:
    global _index
    if _index is None or _index[0] != path:
        with np.load(path) as data:
            keys, lengths = data["keys"], tuple(int(n) for n in data["lengths"])
            loaded = NgramIndex(keys, data["starts"], data["items"], lengths, _present(keys))
        _index = (path, loaded)
    return _index[1]


def _contamination(text: str, index: NgramIndex, min_matches: int, cache: _WordHashes) -> tuple[int, int] | None:
    """Returns (item, distinct n-grams shared) for the item sharing the most (the first on a tie), if at least
    `min_matches`; else None."""
    if not len(index.keys):
        return None
    words = _word_hashes(text, cache)
    found = []
    for n in index.lengths:
        grams = _ngram_hashes(words, n)
        grams = grams[index.present[grams & np.uint64(_PRESENT_MASK)]]
        at = np.minimum(np.searchsorted(index.keys, grams), len(index.keys) - 1)
        found.append(at[index.keys[at] == grams])
    hits = np.unique(np.concatenate(found))
    if not len(hits):
        return None
    owners = np.concatenate([index.items[index.starts[k] : index.starts[k + 1]] for k in hits])
    counts = np.bincount(owners)
    best = int(np.argmax(counts))
    return (best, int(counts[best])) if counts[best] >= min_matches else None


# --- in the main process --------------------------------------------------------------------------------------


class FilterState:
    """Decides, piece by piece in corpus order, what is kept, and remembers why the rest was dropped.

    Resuming rebuilds it by deciding again over the units already done, signed anew in the workers without
    tokenizing (`encode.sign_unit`), rather than saving it beside progress.json: it grows with the corpus (a
    hash, and for near dedup a MinHash, per kept document), so saving it at every checkpoint would rewrite all
    of it each time, and an append-only log would need its own truncation protocol. Signing is a pure function
    of a unit, so deciding again gives the same state; `check` compares its counts with the progress record.
    """

    def __init__(self, dedup: DedupSettings | None, decontamination: DecontaminationSettings | None, fmt: str,
                 files: Sequence[InputFile]):
        self.dedup, self.decontamination, self.fmt = dedup, decontamination, fmt
        self.paths = [f.path for f in files]
        self._file_index = {path: i for i, path in enumerate(self.paths)}
        self.seen = 0
        self.reasons = dict.fromkeys(REASONS, 0)
        # (where, reason, *detail): where = (file index, offset); detail = the item and its n-gram count, or the
        # original's where (and the estimated Jaccard)
        self.dropped: list[tuple] = []
        self._exact: dict[bytes, tuple[int, int]] = {}
        self._near = _NearIndex(dedup) if dedup is not None and dedup.near else None
        self._open_kept = False  # a text file read in segments: some segment of it kept so far

    def decide(self, pieces: Sequence[Piece]) -> list[tuple[bool, bool]]:
        """Returns, per piece, (keep its tokens, end a document after it: its file's EOS)."""
        decisions = []
        for piece in pieces:
            self.seen += 1
            where = (self._file_index[piece.path], piece.offset)
            why = self._why_dropped(piece, where)
            if why is not None:
                self.reasons[why[0]] += 1
                self.dropped.append((where, *why))
            keep = why is None
            decisions.append((keep, piece.ends_document and (keep or self._open_kept)))
            self._open_kept = not piece.ends_document and (keep or self._open_kept)
        return decisions

    def _why_dropped(self, piece: Piece, where: tuple[int, int]) -> tuple | None:
        if piece.contaminated is not None:
            return ("contaminated", *piece.contaminated)
        if self.dedup is None:
            return None
        if self.dedup.exact and piece.exact in self._exact:
            return "exact_duplicates", self._exact[piece.exact]
        if self._near is not None:
            similar = self._near.match_or_add(piece.minhash, where)
            if similar is not None:
                return ("near_duplicates", *similar)
        if self.dedup.exact:
            self._exact[piece.exact] = where
        return None

    def counts(self) -> dict[str, int]:
        """Returns the counts so far, as progress.json records them."""
        return {"documents_seen": self.seen, "documents_kept": self.seen - len(self.dropped), **self.reasons}

    def check(self, recorded: dict) -> None:
        """Raises ResumeMismatch where the counts rebuilt on resuming differ from the progress record's."""
        if recorded != self.counts():
            raise ResumeMismatch(f"filter counts rebuilt {self.counts()}, recorded {recorded}")

    def stats(self, settings: dict) -> FilterStats:
        """Returns the manifest's filters section: the settings, the counts, and each dropped document."""
        originals = [detail[0] for _, reason, *detail in self.dropped if reason != "contaminated"]
        where = self._locator([at for at, *_ in self.dropped] + originals)
        dropped = []
        for at, reason, *detail in self.dropped:
            entry = {"where": where(at), "reason": reason}
            if reason == "contaminated":
                item = self.decontamination.items[detail[0]]
                entry.update(benchmark=item.benchmark, row=item.row, matching_ngrams=detail[1])
            else:
                entry["original"] = where(detail[0])
                if reason == "near_duplicates":
                    entry["jaccard"] = detail[1]
            dropped.append(entry)
        return FilterStats(settings=settings, **self.counts(), dropped=dropped)

    def _locator(self, wheres: list[tuple[int, int]]):
        """Returns where → {path, and byte, line (jsonl) or row (parquet)}; jsonl lines found in one pass a file."""
        lines: dict[int, dict[int, int]] = {}
        if self.fmt == "jsonl":
            for file in sorted({f for f, _ in wheres}):
                lines[file] = line_numbers(self.paths[file], [o for f, o in wheres if f == file])

        def locate(at: tuple[int, int]) -> dict:
            file, offset = at
            if self.fmt == "parquet":
                return {"path": self.paths[file], "row": offset}
            if self.fmt == "jsonl":
                return {"path": self.paths[file], "line": lines[file][offset], "byte": offset}
            return {"path": self.paths[file], "byte": offset}

        return locate


class _NearIndex:
    """The kept documents' MinHashes in a MinHashLSH, keyed by their number in corpus order."""

    def __init__(self, dedup: DedupSettings):
        from datasketch import MinHashLSH

        self.threshold = dedup.near_threshold
        self._lsh = MinHashLSH(threshold=dedup.near_threshold, num_perm=dedup.num_perm)
        self._signatures: list[np.ndarray] = []
        self._where: list[tuple[int, int]] = []

    def match_or_add(self, hashvalues: np.ndarray, where: tuple[int, int]) -> tuple[tuple[int, int], float] | None:
        """Returns (where, estimated Jaccard) of the first kept document the LSH finds at or above the
        threshold; where there is none, adds this one and returns None."""
        from datasketch import LeanMinHash

        sketch = LeanMinHash(seed=MINHASH_SEED, hashvalues=hashvalues, scheme=MINHASH_SCHEME)
        for key in sorted(self._lsh.query(sketch)):
            jaccard = float(np.count_nonzero(self._signatures[key] == hashvalues)) / len(hashvalues)  # MinHash.jaccard
            if jaccard >= self.threshold:
                return self._where[key], jaccard
        self._lsh.insert(len(self._signatures), sketch)
        self._signatures.append(hashvalues)
        self._where.append(where)
        return None
