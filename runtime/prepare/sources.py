"""Input files: find them, hash them, cut them into work units, and read a unit back as documents.

Which files: `dapc.corpus` resolves them (the compiler writes the list into the plan). A work unit is a description (paths and byte ranges or row groups), never the text: workers read their own
bytes, so the main process moves only token arrays. Units are cut from the file contents and `unit_bytes`
alone, so the same corpus gives the same units, and the same shards, for any number of workers.

Documents per format:
- `text`: one file is one document. A file larger than `unit_bytes` is read in segments cut after a newline
  (else after a space, else at a UTF-8 character boundary); the segments are encoded separately, so each
  segment after the first starts with SentencePiece's dummy-prefix space. EOS follows the last segment only.
- `jsonl`: one line is one document: a JSON object whose `text_field` is a string. Blank lines are skipped.
- `parquet`: one row is one document; a unit is one row group.
Empty documents are skipped (no tokens, no EOS, not counted).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dapc.errors import DapcError

_WINDOW_BYTES = 1 << 16


class PrepareError(DapcError):
    """Bad corpus input, located at `file` or `file:line`. Survives pickling from a worker process."""

    def __reduce__(self):
        return (type(self), (self.message, self.location))


@dataclass(frozen=True)
class InputFile:
    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Segment:
    """Part of one file: bytes [start, end) for text and jsonl, or one row group for parquet."""

    path: str
    start: int
    end: int
    row_group: int = -1
    first_row: int = 0
    doc_sha256: str = ""  # text: the file's sha256, which is the document's identity
    ends_document: bool = True  # text: this segment is the file's last


@dataclass(frozen=True)
class Unit:
    index: int
    segments: tuple[Segment, ...]
    input_bytes: int  # share of the input's bytes, for the progress bar


@dataclass(frozen=True)
class Document:
    text: str
    identity: bytes | None  # None: the sha256 of the text
    ends_document: bool
    path: str
    offset: int  # where it starts: the byte offset in its file (text, jsonl) or the row index (parquet)


def hash_file(path: str) -> InputFile:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return InputFile(path=path, bytes=size, sha256=digest.hexdigest())


def plan_units(files: Sequence[InputFile], fmt: str, text_field: str | None, unit_bytes: int) -> Iterator[Unit]:
    """Work units in corpus order; a function of the files' contents and `unit_bytes` only."""
    if fmt == "parquet":
        yield from _parquet_units(files, text_field)
        return
    segments: list[Segment] = []
    size = index = 0
    for file in files:
        for start, end in _byte_ranges(file, unit_bytes, lines_only=fmt != "text"):
            last = end == file.bytes
            segments.append(
                Segment(file.path, start, end, doc_sha256=file.sha256 if fmt == "text" else "", ends_document=last)
            )
            size += end - start
            if size >= unit_bytes:
                yield Unit(index, tuple(segments), size)
                segments, size, index = [], 0, index + 1
    if segments:
        yield Unit(index, tuple(segments), size)


def read_documents(unit: Unit, fmt: str, text_field: str | None) -> list[Document]:
    docs: list[Document] = []
    for seg in unit.segments:
        if fmt == "text":
            identity = bytes.fromhex(seg.doc_sha256)
            docs.append(Document(_read_text(seg), identity, seg.ends_document, seg.path, seg.start))
        elif fmt == "jsonl":
            docs.extend(_read_jsonl(seg, text_field))
        else:
            docs.extend(_read_parquet(seg, text_field))
    return docs


def _byte_ranges(file: InputFile, unit_bytes: int, lines_only: bool) -> Iterator[tuple[int, int]]:
    start = 0
    with open(file.path, "rb") as f:
        while start < file.bytes:
            if start + unit_bytes >= file.bytes:
                yield start, file.bytes
                return
            cut = _cut_after(f, start + unit_bytes, file.bytes, lines_only)
            yield start, cut
            start = cut


def _cut_after(f, pos: int, size: int, lines_only: bool) -> int:
    """First cut at or after `pos`: after a newline; for text, failing that after a space or at a character."""
    f.seek(pos)
    window = f.read(_WINDOW_BYTES)
    at = window.find(b"\n")
    if at >= 0:
        return pos + at + 1
    if lines_only:
        scanned = pos + len(window)
        while window:
            window = f.read(_WINDOW_BYTES)
            at = window.find(b"\n")
            if at >= 0:
                return scanned + at + 1
            scanned += len(window)
        return size
    at = window.find(b" ")
    if at >= 0:
        return pos + at + 1
    for i, byte in enumerate(window):
        if byte & 0xC0 != 0x80:  # not a UTF-8 continuation byte: a character starts here
            return pos + i
    return min(pos + len(window), size)


def _read_bytes(seg: Segment) -> bytes:
    with open(seg.path, "rb") as f:
        f.seek(seg.start)
        return f.read(seg.end - seg.start)


def _read_text(seg: Segment) -> str:
    try:
        return _read_bytes(seg).decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"not valid UTF-8 at byte {seg.start + e.start}", seg.path) from None


def _line_number(path: str, offset: int) -> int:
    """1-based line of byte `offset`; only on the error path, so it may read the file again."""
    return line_numbers(path, [offset])[offset]


def line_numbers(path: str, offsets: Sequence[int]) -> dict[int, int]:
    """Returns {offset: 1-based line of byte offset} for `offsets`, in one pass over the file's first bytes."""
    lines, count, read = {}, 0, 0
    with open(path, "rb") as f:
        for offset in sorted(set(offsets)):
            while read < offset:
                block = f.read(min(offset - read, 1 << 20))
                if not block:
                    break
                count += block.count(b"\n")
                read += len(block)
            lines[offset] = count + 1
    return lines


def jsonl_lines(seg: Segment) -> Iterator[tuple[bytes, int]]:
    """Yields the segment's non-blank lines with the byte offset of each in its file."""
    data = _read_bytes(seg)
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl
        line, offset, pos = data[pos:end], seg.start + pos, end + 1
        if line.strip():
            yield line, offset


def _read_jsonl(seg: Segment, text_field: str | None) -> Iterator[Document]:
    for line, offset in jsonl_lines(seg):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = (
                f"invalid JSON: {e.msg} (column {e.colno})"
                if isinstance(e, json.JSONDecodeError)
                else "not valid UTF-8"
            )
            raise PrepareError(why, f"{seg.path}:{_line_number(seg.path, offset)}") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            where = f"{seg.path}:{_line_number(seg.path, offset)}"
            if not isinstance(record, dict):
                raise PrepareError(f"expected a JSON object, got {type(record).__name__}", where)
            if text_field not in record:
                fields = ", ".join(sorted(record)[:10]) or "none"
                raise PrepareError(f"no field {text_field!r} (fields: {fields})", where)
            raise PrepareError(f"field {text_field!r} is {type(text).__name__}, expected a string", where)
        if text:
            yield Document(text, None, True, seg.path, offset)


def _parquet_units(files: Sequence[InputFile], text_field: str | None) -> Iterator[Unit]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    for file in files:
        try:
            meta = pq.ParquetFile(file.path)
        except (pa.ArrowException, OSError) as e:
            raise PrepareError(f"not a readable parquet file: {e}", file.path) from None
        schema = meta.schema_arrow
        if text_field not in schema.names:
            raise PrepareError(f"no column {text_field!r} (columns: {', '.join(schema.names[:10])})", file.path)
        kind = schema.field(text_field).type
        is_view = getattr(pa.types, "is_string_view", lambda _: False)
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
            raise PrepareError(f"column {text_field!r} has type {kind}, expected a string", file.path)
        total_rows, first_row, done_bytes = meta.metadata.num_rows, 0, 0
        for group in range(meta.num_row_groups):
            rows = meta.metadata.row_group(group).num_rows
            upto = file.bytes * (first_row + rows) // max(total_rows, 1)
            yield Unit(index, (Segment(file.path, 0, 0, row_group=group, first_row=first_row),), upto - done_bytes)
            index, first_row, done_bytes = index + 1, first_row + rows, upto


def _read_parquet(seg: Segment, text_field: str | None) -> Iterator[Document]:
    import pyarrow.parquet as pq

    column = pq.ParquetFile(seg.path).read_row_group(seg.row_group, columns=[text_field]).column(0)
    for n, text in enumerate(column.to_pylist()):
        if text is None:
            raise PrepareError(f"row {seg.first_row + n}: {text_field!r} is null", seg.path)
        if text:
            yield Document(text, None, True, seg.path, seg.first_row + n)
