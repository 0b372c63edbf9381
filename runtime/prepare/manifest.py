"""`manifest.json`: what a prepared directory holds, and the index from sample number to shard.

Written last, atomically, so its presence means the preparation is complete. It holds no timestamps and
nothing about the machine (not the worker count), so the same inputs and settings give the same bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dapc.lock import corpus_changes
from runtime.durable import fsync_path

from .shards import ShardInfo
from .sources import InputFile, PrepareError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TokenizerInfo:
    spec: str  # as the recipe wrote it: a directory or "mistral-common:v1"
    sha256: str  # over the tokenizer's files (runtime.tokenizer.tokenizer_sha256)
    vocab_size: int  # len(tokenizer), added tokens included
    eos_token_id: int


@dataclass(frozen=True)
class SplitStats:
    documents: int
    words: int  # whitespace-separated, as `str.split()` counts them
    content_tokens: int  # the documents' tokens, EOS not counted
    tokens: int  # content_tokens + one EOS per document
    sequences: int
    packed_tokens: int  # sequences × seq_len
    dropped_tokens: int  # the final remainder shorter than seq_len


@dataclass(frozen=True)
class FilterStats:
    """What the document filters (`filters`) did: their settings (in the fingerprint), the counts, and each
    dropped document: {"where": {"path", and "byte", "line" or "row"}, "reason", and the benchmark item it
    matched or the "original" it duplicates}."""

    settings: dict
    documents_seen: int = 0
    documents_kept: int = 0
    contaminated: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    dropped: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Manifest:
    format_version: int
    fingerprint: str  # sha256 of inputs and every setting that changes the shards; a rerun must match it
    seq_len: int
    dtype: str  # "uint16" or "uint32", little-endian
    tokenizer: TokenizerInfo
    data_format: str
    text_field: str | None
    files: list[InputFile]
    seed: int
    validation_fraction: float
    split_rule: str
    packing: dict  # how documents became sequences: separator, bos, remainder, shard_sequences, unit_bytes
    splits: dict[str, SplitStats]
    shards: list[ShardInfo] = field(default_factory=list)  # the index: shard files in sample order per split
    filters: FilterStats | None = None  # None: no filter was on (and the manifest has no "filters")
    # records: {"settings": {layout, chat_template, template_sha256, packing, targets}, "splits": {split: counts}};
    # layout "packed" (chat, prompt-completion: several records per sequence) or "pairs" (preference: sequence 2i
    # of a split is pair i's chosen, 2i + 1 its rejected, counts with "pairs"); None for documents
    records: dict | None = None
    loss_masks: list[ShardInfo] = field(default_factory=list)  # records: uint8 shards beside `shards`, same shapes

    @property
    def words(self) -> int:
        return sum(s.words for s in self.splits.values())

    @property
    def content_tokens(self) -> int:
        return sum(s.content_tokens for s in self.splits.values())

    @property
    def tokens_per_word(self) -> float:
        return self.content_tokens / self.words if self.words else 0.0

    def shards_for(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def loss_masks_for(self, split: str) -> list[ShardInfo]:
        """The loss-mask shards of `split` (records), one per token shard, in the same order."""
        return [s for s in self.loss_masks if s.split == mask_split(split)]

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.filters is None:
            del out["filters"]  # a preparation without filters keeps the bytes it had before they existed
        if self.records is None:
            del out["records"], out["loss_masks"]
        out["corpus"] = {
            "files": len(self.files),
            "bytes": sum(f.bytes for f in self.files),
            "documents": sum(s.documents for s in self.splits.values()),
            "words": self.words,
            "tokens": self.content_tokens,
            "tokens_per_word": round(self.tokens_per_word, 6),
        }
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        data = {k: v for k, v in data.items() if k != "corpus"}
        if data.get("format_version") != FORMAT_VERSION:
            raise PrepareError(
                f"manifest format_version {data.get('format_version')} is not {FORMAT_VERSION}; prepare again"
            )
        return cls(
            **{
                **data,
                "tokenizer": TokenizerInfo(**data["tokenizer"]),
                "files": [InputFile(**f) for f in data["files"]],
                "splits": {k: SplitStats(**v) for k, v in data["splits"].items()},
                "shards": [ShardInfo(**s) for s in data["shards"]],
                "loss_masks": [ShardInfo(**s) for s in data.get("loss_masks", [])],
                "filters": FilterStats(**data["filters"]) if data.get("filters") is not None else None,
            }
        )

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        write_json_atomic(path, self.to_dict())
        return path


def mask_split(split: str) -> str:
    """The name the loss-mask shards of `split` are written under: `{split}-mask-00000.bin`, ..."""
    return f"{split}-mask"


def load_manifest(prepared_dir: str | os.PathLike) -> Manifest:
    path = Path(prepared_dir) / MANIFEST_NAME
    if not path.is_file():
        raise PrepareError(
            "no manifest.json: the corpus is not prepared (run `python -m runtime.prepare --plan plan.json`)",
            str(prepared_dir),
        )
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise PrepareError(f"unreadable manifest: {e}", str(path)) from e


# Beside the manifest: each corpus file's size and mtime when prepare hashed it, so a trainer that finds both
# unchanged need not read the corpus again to know it is the one the shards came from.
CORPUS_STAT_NAME = "corpus-stat.json"


def write_corpus_stat(prepared_dir: Path, manifest: Manifest) -> None:
    """Writes CORPUS_STAT_NAME: {path: [bytes, mtime_ns]} of the manifest's files as they are now."""
    stats = {}
    for f in manifest.files:
        st = os.stat(f.path)
        if st.st_size == f.bytes:
            stats[f.path] = [st.st_size, st.st_mtime_ns]
    write_json_atomic(Path(prepared_dir) / CORPUS_STAT_NAME, stats)


def corpus_changes_since_prepare(prepared_dir: str | os.PathLike, manifest: Manifest) -> tuple[list[str], list[str]]:
    """Returns (changed, missing): corpus files whose bytes differ from the manifest's sha256, and files gone.
    A file whose size and mtime equal CORPUS_STAT_NAME's record is taken as unchanged without reading it."""
    try:
        stats = json.loads((Path(prepared_dir) / CORPUS_STAT_NAME).read_text())
    except (OSError, ValueError):
        stats = {}
    to_hash: dict[str, tuple[int, str]] = {}
    for f in manifest.files:
        try:
            st = os.stat(f.path)
        except OSError:
            to_hash[f.path] = (f.bytes, f.sha256)  # corpus_changes reports it missing
            continue
        if stats.get(f.path) != [st.st_size, st.st_mtime_ns] or st.st_size != f.bytes:
            to_hash[f.path] = (f.bytes, f.sha256)
    return corpus_changes(to_hash)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
