"""Corpus → packed token shards: the orchestration.

Order of work: resolve the input paths, start the workers (`workers`) and have them hash the inputs (their
sha256s go in the manifest and the fingerprint) while this process loads and checks the tokenizer; refuse a
file that differs from the lock; then stream work units through the workers, at most `2 × workers` units in
flight, results taken in unit order, each appended to its split's `SplitWriter` (this process only packs,
hashes and writes shards: about a tenth of one core). Memory is bounded by the window (a unit is ~1 MiB of
text) plus one carried partial sequence per split; shards go straight to disk.

Resuming: after a unit that committed a shard, and at least every few seconds, the writers' state and the
next unit number are recorded atomically in `progress.json`. A rerun with the same fingerprint (inputs and
settings) skips the units already done and continues; the output is byte-identical to an uninterrupted run.

Filters (`filters`: decontamination, deduplication): the workers sign documents, this process decides in unit
order and joins the kept ones; on resuming it rebuilds the decisions from the units done (`FilterState`).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from dapc.corpus import FORMATS, CorpusError, resolve_corpus
from dapc.recipe.schema import RECORD_FORMATS
from runtime.tokenizer import load_tokenizer, resolve_tokenizer_dir, tokenizer_sha256

from .encode import (
    SPLIT_RULE,
    SPLITS,
    EncodeSettings,
    UnitResult,
    encode_unit,
    keep_pieces,
    sign_unit,
    tokenizer_source,
)
from .filters import (
    DecontaminationSettings,
    DedupSettings,
    FilterState,
    SignSettings,
    ngram_index,
    settings_record,
    write_ngram_index,
)
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    FilterStats,
    Manifest,
    SplitStats,
    TokenizerInfo,
    load_manifest,
    mask_split,
    write_json_atomic,
)
from .records import PAIR_COUNTERS, lay_out_pairs, pack_records, record_settings
from .shards import ResumeMismatch, SplitWriter
from .sources import InputFile, PrepareError, hash_file, plan_units
from .workers import Workers

DEFAULT_UNIT_BYTES = 1 << 20
DEFAULT_SHARD_BYTES = 1 << 28  # 256 MiB per shard file
CHECKPOINT_SECONDS = 5.0
PROGRESS_NAME = "progress.json"
_COUNTERS = ("documents", "words", "content_tokens", "tokens")
_RECORD_COUNTERS = ("truncated_records", "truncated_tokens", "padding_tokens", "target_tokens")


def prepare_corpus(
    paths: Sequence[str],
    *,
    data_format: str,
    tokenizer: str,
    seq_len: int,
    prepared_dir: str | os.PathLike,
    text_field: str | None = None,
    validation_fraction: float = 0.0,
    seed: int = 0,
    workers: int | None = None,
    shard_sequences: int | None = None,
    unit_bytes: int = DEFAULT_UNIT_BYTES,
    console: Console | None = None,
    progress: bool = True,
    locked_sha256: dict[str, str] | None = None,
    dedup: DedupSettings | None = None,
    decontamination: DecontaminationSettings | None = None,
    chat_template: str | None = None,
) -> Manifest:
    """Tokenize, split, pack and shard a corpus into `prepared_dir`; resumes an interrupted run; returns the manifest.

    `workers` defaults to the CPU count (1 tokenizes in this process). `shard_sequences` defaults to 256 MiB per
    shard. Neither the worker count nor the console changes the output; every other argument does. With
    `locked_sha256` ({path: sha256}, the plan's lock), a file whose bytes differ from the lock is refused.
    `decontamination` drops documents that hold benchmark items, then `dedup` drops duplicates of earlier kept
    documents (`filters`); the manifest's `filters` lists what was dropped and why.
    """
    _check_settings(data_format, text_field, seq_len, validation_fraction, unit_bytes, shard_sequences)
    try:
        files = [f.path for f in resolve_corpus([os.path.abspath(p) for p in paths], data_format)]
    except CorpusError as e:
        raise PrepareError(e.message) from e
    text_field = None if data_format == "text" or data_format in RECORD_FORMATS else text_field
    started = time.monotonic()
    with Workers(workers or os.cpu_count() or 1) as pool, tempfile.TemporaryDirectory(prefix="dapc-") as scratch:
        hashing = pool.start(hash_file, files)  # in the workers, while this process loads the tokenizer
        tok = load_tokenizer(tokenizer)
        vocab_size = len(tok)
        dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
        shard_sequences = shard_sequences or max(1, DEFAULT_SHARD_BYTES // (seq_len * np.dtype(dtype).itemsize))
        source = tokenizer_source(tok, str(resolve_tokenizer_dir(tokenizer)), Path(scratch))
        signing = _sign_settings(dedup, decontamination, Path(scratch))
        records, records_info = record_settings(data_format, chat_template, tok, signing is not None)
        settings = EncodeSettings(
            data_format, text_field, seed, validation_fraction, tok.eos_token_id, dtype, source, signing, records
        )
        tok_info = TokenizerInfo(tokenizer, tokenizer_sha256(tokenizer), vocab_size, tok.eos_token_id)
        out = Path(prepared_dir)
        out.mkdir(parents=True, exist_ok=True)
        with _exclusive(out):
            inputs = hashing()
            _check_locked(inputs, locked_sha256)
            base = Manifest(
                format_version=FORMAT_VERSION,
                fingerprint="",
                seq_len=seq_len,
                dtype=dtype,
                tokenizer=tok_info,
                data_format=data_format,
                text_field=text_field,
                files=inputs,
                seed=seed,
                validation_fraction=validation_fraction,
                split_rule=SPLIT_RULE,
                packing=_packing(shard_sequences, unit_bytes),
                splits={},
                filters=FilterStats(settings_record(dedup, decontamination)) if signing is not None else None,
                records=records_info,
            )
            filters = partial(FilterState, dedup, decontamination, data_format, inputs) if signing is not None else None
            return _tokenize(out, base, settings, filters, pool, unit_bytes, console, progress, started)


def _sign_settings(dedup: DedupSettings | None, decontamination: DecontaminationSettings | None,
                   scratch: Path) -> SignSettings | None:
    """Returns what the workers need to sign documents, the n-gram index written to `scratch`; None: no filters."""
    if dedup is None and decontamination is None:
        return None
    if decontamination is None:
        return SignSettings(dedup)
    index = write_ngram_index(ngram_index(decontamination), scratch)
    return SignSettings(dedup, decontamination.min_matches, index)


def _fingerprint(base: Manifest) -> str:
    """Returns the sha256 of the inputs and settings: the manifest less what preparing found."""
    data = {k: v for k, v in base.to_dict().items() if k not in ("corpus", "splits", "shards")}
    if "filters" in data:
        data["filters"] = data["filters"]["settings"]
    if "records" in data:
        data["records"] = data["records"]["settings"]
        del data["loss_masks"]
    return _sha256_json(data)


def _tokenize(out: Path, base: Manifest, settings: EncodeSettings, filters: Callable[[], FilterState] | None,
              pool: Workers, unit_bytes: int, console: Console | None, progress: bool, started: float) -> Manifest:
    """Encodes, packs and shards the units not done yet into `out`; returns the manifest (the finished one, if
    `out` already holds this preparation). `filters` makes a fresh FilterState; None: no filters."""
    fingerprint = _fingerprint(base)
    done = _finished(out, fingerprint)
    if done is not None:
        _say(console, f"{escape(str(out))} already holds this preparation (fingerprint {fingerprint[:12]})")
        _report(console, out, done, None)
        return done
    layout = base.records["settings"]["layout"] if base.records is not None else None
    run = _Run(out, base.seq_len, base.dtype, base.packing["shard_sequences"], fingerprint, console, filters,
               settings.eos_token_id, layout=layout)
    try:
        plan = partial(plan_units, base.files, base.data_format, base.text_field, unit_bytes)
        run.restore(lambda done: pool.ordered(sign_unit, itertools.islice(plan(), done), settings))
        units = plan()
        with _progress_bar(console, progress, sum(f.bytes for f in base.files), run.input_bytes_done) as advance:
            for result in pool.ordered(encode_unit, itertools.islice(units, run.next_unit, None), settings):
                run.add(result)
                advance(result.input_bytes, run.totals["content_tokens"])
        manifest = run.finish(base, fingerprint)
    finally:
        run.close()
    _report(console, out, manifest, (time.monotonic() - started, run.tokens_this_run))
    return manifest


def _check_locked(inputs: list[InputFile], locked_sha256: dict[str, str] | None) -> None:
    if locked_sha256 is None:
        return
    for f in inputs:
        if locked_sha256.get(f.path) != f.sha256:
            raise PrepareError(f"corpus file changed since `dapc render` locked it (sha256 "
                               f"{str(locked_sha256.get(f.path))[:12]} then, {f.sha256[:12]} now); render again", f.path)


class _Run:
    """The mutable state of one preparation: writers, counters, filters, position, and the progress record."""

    def __init__(self, out: Path, seq_len: int, dtype: str, shard_sequences: int, fingerprint: str, console,
                 new_filters: Callable[[], FilterState] | None = None, eos_token_id: int = 0,
                 layout: str | None = None):
        self.out, self.seq_len, self.dtype, self.shard_sequences = out, seq_len, dtype, shard_sequences
        # records: a loss-mask writer per split beside the tokens'; "packed" (sft) several records per sequence,
        # "pairs" (preference) one sequence per half of a pair; None: documents
        self.layout, self.records = layout, layout is not None
        counters = PAIR_COUNTERS if layout == "pairs" else _RECORD_COUNTERS
        self.record_counters = {s: dict.fromkeys(counters, 0) for s in SPLITS}
        self.mask_writers: dict[str, SplitWriter] = {}
        self.fingerprint, self.console = fingerprint, console
        self.next_unit = self.input_bytes_done = self.tokens_this_run = 0
        self.counters = {s: dict.fromkeys(_COUNTERS, 0) for s in SPLITS}
        self.writers: dict[str, SplitWriter] = {}
        self.new_filters, self.eos_token_id = new_filters, eos_token_id
        self.filters = new_filters() if new_filters is not None else None
        self._last_checkpoint = time.monotonic()

    @property
    def totals(self) -> dict[str, int]:
        return {k: sum(c[k] for c in self.counters.values()) for k in _COUNTERS}

    def restore(self, signed: Callable[[int], Iterable[UnitResult]]) -> None:
        """Continues from progress.json where it matches the files, else starts over; `signed(n)` gives the
        first n units signed, from which the filters' state is rebuilt (`FilterState`)."""
        path = self.out / PROGRESS_NAME
        try:
            record = json.loads(path.read_text()) if path.is_file() else None
        except ValueError:
            record = {"fingerprint": self.fingerprint}  # unreadable: resuming fails below and starts over
        if record is not None and record.get("fingerprint") != self.fingerprint:
            raise PrepareError(
                "holds an unfinished preparation of other inputs or settings (progress.json); "
                "delete the directory or choose another prepared_dir",
                str(self.out),
            )
        if record is not None:
            try:
                for s in SPLITS:
                    self.writers[s] = SplitWriter.resume(
                        self.out, s, self.seq_len, self.dtype, self.shard_sequences, record["splits"][s]
                    )
                    if self.records:
                        self.mask_writers[s] = SplitWriter.resume(
                            self.out, mask_split(s), self.seq_len, "uint8", self.shard_sequences,
                            record["mask_splits"][s])
                if self.records:
                    self.record_counters = record["record_counters"]
                self.next_unit, self.input_bytes_done = record["next_unit"], record["input_bytes_done"]
                self.counters = record["counters"]
                if self.filters is not None:
                    _say(self.console, f"rebuilding the filters' state from the {self.next_unit:,} work units done")
                    for result in signed(self.next_unit):
                        self.filters.decide(result.pieces)
                    self.filters.check(record["filters"])
                _say(
                    self.console,
                    f"resuming at work unit {self.next_unit:,} ({self.input_bytes_done:,} input bytes done)",
                )
                return
            except (ResumeMismatch, KeyError, TypeError, ValueError) as e:
                self.close()
                self.writers, self.mask_writers = {}, {}
                self.filters = self.new_filters() if self.new_filters is not None else None
                _say(self.console, f"progress.json does not match the files ({e}); starting over")
        _remove_outputs(self.out)
        self.writers = {s: SplitWriter(self.out, s, self.seq_len, self.dtype, self.shard_sequences) for s in SPLITS}
        if self.records:
            self.mask_writers = {s: SplitWriter(self.out, mask_split(s), self.seq_len, "uint8", self.shard_sequences)
                                 for s in SPLITS}

    def add(self, result: UnitResult) -> None:
        if result.index != self.next_unit:
            raise RuntimeError(f"work unit {result.index} arrived where {self.next_unit} was due")
        if self.filters is not None:
            result = keep_pieces(result, self.filters.decide(result.pieces), self.eos_token_id)
        commits = 0
        for split in SPLITS:
            if self.records:
                commits += self._add_records(split, result)
            else:
                commits += self.writers[split].add(result.tokens[split])
            stats = self.counters[split]
            stats["documents"] += result.documents[split]
            stats["words"] += result.words[split]
            stats["content_tokens"] += result.content_tokens[split]
            stats["tokens"] += len(result.tokens[split])
            self.tokens_this_run += result.content_tokens[split]
        self.next_unit += 1
        self.input_bytes_done += result.input_bytes
        if commits or time.monotonic() - self._last_checkpoint >= CHECKPOINT_SECONDS:
            self.checkpoint()

    def _add_records(self, split: str, result: UnitResult) -> int:
        """Lays the unit's records of `split` out (`pack_records` whole, or `lay_out_pairs`) into the token and
        mask writers."""
        if self.layout == "pairs":
            tokens, mask, counts = lay_out_pairs(result.tokens[split], result.masks[split],
                                                 result.record_tokens[split], self.seq_len, self.eos_token_id)
        else:
            tokens, mask, counts = pack_records(result.tokens[split], result.masks[split],
                                                result.record_tokens[split], len(self.writers[split].carry),
                                                self.seq_len, self.eos_token_id)
        for key, n in counts.items():
            self.record_counters[split][key] += n
        self.mask_writers[split].add(mask)
        return self.writers[split].add(tokens)

    def _pad_last_sequence(self, split: str) -> None:
        """Records: pads the last partial sequence with EOS (not a target) instead of dropping its records."""
        short = (self.seq_len - len(self.writers[split].carry)) % self.seq_len
        if short:
            self.writers[split].add(np.full(short, self.eos_token_id, dtype=np.uint32))
            self.mask_writers[split].add(np.zeros(short, dtype=np.uint8))
            self.record_counters[split]["padding_tokens"] += short

    def checkpoint(self) -> None:
        record = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "next_unit": self.next_unit,
            "input_bytes_done": self.input_bytes_done,
            "counters": self.counters,
            "splits": {s: w.state() for s, w in self.writers.items()},
        }
        if self.filters is not None:
            record["filters"] = self.filters.counts()
        if self.records:
            record["mask_splits"] = {s: w.state() for s, w in self.mask_writers.items()}
            record["record_counters"] = self.record_counters
        write_json_atomic(self.out / PROGRESS_NAME, record)
        self._last_checkpoint = time.monotonic()

    def finish(self, base: Manifest, fingerprint: str) -> Manifest:
        splits = {}
        for split, writer in self.writers.items():
            if self.records:
                self._pad_last_sequence(split)
                self.mask_writers[split].finish()
            dropped = writer.finish()
            c = self.counters[split]
            splits[split] = SplitStats(
                documents=c["documents"],
                words=c["words"],
                content_tokens=c["content_tokens"],
                tokens=c["tokens"],
                sequences=writer.sequences,
                packed_tokens=writer.sequences * self.seq_len,
                dropped_tokens=dropped,
            )
        shards = [info for split in SPLITS for info in self.writers[split].committed]
        filters = self.filters.stats(base.filters.settings) if self.filters is not None else None
        records = loss_masks = None
        if self.records:
            records = {**base.records, "splits": {s: {"records": self.counters[s]["documents"],
                                                      **self.record_counters[s]} for s in SPLITS}}
            loss_masks = [info for split in SPLITS for info in self.mask_writers[split].committed]
        manifest = Manifest(**{**base.__dict__, "fingerprint": fingerprint, "splits": splits, "shards": shards,
                               "filters": filters, "records": records, "loss_masks": loss_masks or []})
        manifest.write(self.out)
        (self.out / PROGRESS_NAME).unlink(missing_ok=True)
        return manifest

    def close(self) -> None:
        for writer in [*self.writers.values(), *self.mask_writers.values()]:
            writer.close()


def _packing(shard_sequences: int, unit_bytes: int) -> dict:
    return {
        "separator": "eos after every document",
        "bos": False,
        "remainder": "dropped (fewer than seq_len tokens per split, at the end)",
        "shard_sequences": shard_sequences,
        "unit_bytes": unit_bytes,
    }


def _check_settings(fmt, text_field, seq_len, validation_fraction, unit_bytes, shard_sequences) -> None:
    if fmt not in FORMATS:
        raise PrepareError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt not in ("text", *RECORD_FORMATS) and not text_field:
        raise PrepareError(f"format {fmt!r} needs a text_field naming the column that holds the text")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise PrepareError(f"seq_len {seq_len!r} must be an integer of at least 2")
    if not 0.0 <= validation_fraction < 1.0:
        raise PrepareError(f"validation_fraction {validation_fraction!r} must be in [0, 1)")
    if unit_bytes < 1 or (shard_sequences is not None and shard_sequences < 1):
        raise PrepareError(f"unit_bytes ({unit_bytes}) and shard_sequences ({shard_sequences}) must be positive")


def _sha256_json(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _finished(out: Path, fingerprint: str) -> Manifest | None:
    if not (out / MANIFEST_NAME).is_file():
        return None
    manifest = load_manifest(out)
    if manifest.fingerprint != fingerprint:
        raise PrepareError(
            f"holds a finished preparation of other inputs or settings (fingerprint {manifest.fingerprint[:12]}, "
            f"now {fingerprint[:12]}); delete the directory or choose another prepared_dir",
            str(out),
        )
    return manifest


def _remove_outputs(out: Path) -> None:
    """A fresh start: delete what an earlier unrecorded attempt may have left, and only files of our names."""
    for split in (*SPLITS, *map(mask_split, SPLITS)):
        for path in out.glob(f"{split}-*.bin*"):
            if path.name[len(split) + 1 :].split(".")[0].isdigit():
                path.unlink()
    (out / PROGRESS_NAME).unlink(missing_ok=True)


@contextmanager
def _exclusive(out: Path):
    """One preparation per directory at a time (e.g. every rank calling prepare): the others wait, then reuse it."""
    with open(out / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _progress_bar(console: Console | None, enabled: bool, total_bytes: int, done_bytes: int):
    if console is None or not enabled:
        yield lambda n, tokens: None
        return
    columns = (
        TextColumn("tokenizing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("tokenizing", total=total_bytes, completed=done_bytes, tokens=0)
        yield lambda n, tokens: bar.update(task, advance=n, tokens=tokens)


def _say(console: Console | None, text: str) -> None:
    if console is not None:
        console.print(text, highlight=False, soft_wrap=True)


def _report(console: Console | None, out: Path, m: Manifest, timing: tuple[float, int] | None) -> None:
    """Words, tokens and tokens per word first: the figure users compare (the seed paper: 126M words, 118.8M tokens)."""
    d = m.to_dict()["corpus"]
    _say(console, f"corpus: {d['files']:,} files, {d['bytes']:,} bytes, {d['documents']:,} documents")
    _say(
        console,
        f"corpus: {m.words:,} words, {m.content_tokens:,} tokens, {m.tokens_per_word:.3f} tokens/word (EOS not counted)",
    )
    for split, s in m.splits.items():
        shards = len(m.shards_for(split))
        _say(
            console,
            f"{split}: {s.documents:,} documents, {s.tokens:,} tokens with EOS → {s.sequences:,} sequences of {m.seq_len:,} "
            f"tokens in {shards} shard{'s' if shards != 1 else ''} ({s.dropped_tokens:,} remainder tokens dropped)",
        )
    if m.records is not None:
        for split, r in m.records["splits"].items():
            if m.records["settings"]["layout"] == "pairs":
                _say(console, f"{split}: {r['pairs']:,} preference pairs → {2 * r['pairs']:,} sequences (chosen, "
                     f"rejected), {r['target_tokens']:,} target tokens; {r['truncated_sequences']:,} sequences "
                     f"longer than seq_len truncated ({r['truncated_tokens']:,} tokens cut), "
                     f"{r['pairs_without_targets']:,} pairs with a half left without targets, "
                     f"{r['padding_tokens']:,} padding tokens")
                continue
            _say(console, f"{split}: {r['records']:,} records, {r['target_tokens']:,} target tokens; "
                 f"{r['truncated_records']:,} longer than seq_len truncated ({r['truncated_tokens']:,} tokens cut), "
                 f"{r['padding_tokens']:,} padding tokens")
    if m.filters is not None:
        f = m.filters
        _say(
            console,
            f"filters: {f.documents_seen:,} documents seen, {f.documents_kept:,} kept; dropped {f.contaminated:,} "
            f"contaminated, {f.exact_duplicates:,} exact and {f.near_duplicates:,} near duplicates (listed in the "
            "manifest)",
        )
    if timing is not None:
        seconds, tokens = timing
        _say(console, f"{tokens:,} tokens in {seconds:.1f} s: {tokens / max(seconds, 1e-9):,.0f} tokens/s")
    _say(console, f"manifest: {escape(str(out / MANIFEST_NAME))} (shards of {m.dtype}, {len(m.shards)} files)")
