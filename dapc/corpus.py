"""Which files a recipe's `data.paths` name: the one resolver, used by the compiler, whose list the runtime reads.

Rules, per entry (an absolute path):
- an existing file is taken as it is, whatever its name (a file called `a[1].txt` is a file, not a glob);
- an existing directory contributes the files under it whose suffix belongs to the format (`SUFFIXES`),
  skipping hidden files and hidden folders, without following symbolic links to folders (no loops);
- anything else with `*`, `?` or `[` is a glob (`**` recursive), hidden names skipped;
- every entry must match at least one file; files named twice count once, in first-seen order.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from dapc.errors import DapcError

_JSON_LINES = (".jsonl", ".ndjson", ".json")
# What a directory contributes, per format (recipe data.format); a file named directly or matched by a glob is
# taken as it is.
SUFFIXES = {"text": (".txt", ".md", ".text", ".rst"), "jsonl": _JSON_LINES, "parquet": (".parquet",),
            "chat": _JSON_LINES, "prompt-completion": _JSON_LINES, "preference": _JSON_LINES}
FORMATS = tuple(SUFFIXES)
_GLOB_CHARS = "*?["


class CorpusError(DapcError):
    """A corpus entry that matches no file, or cannot be read; `entry_index` says which entry."""

    def __init__(self, message: str, entry_index: int | None = None):
        super().__init__(message)
        self.entry_index = entry_index


@dataclass(frozen=True)
class CorpusFile:
    """One input file: absolute path and size in bytes, as the compiler saw it."""

    path: str
    bytes: int


def resolve_corpus(entries: list[str], fmt: str) -> list[CorpusFile]:
    """Returns the files the absolute `entries` name (rules in the module docstring), with their sizes.

    Raises CorpusError naming the entry (by index) that matches nothing or cannot be read.
    """
    if fmt not in FORMATS:
        raise CorpusError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    found: dict[str, int] = {}
    for index, entry in enumerate(entries):
        try:
            matches = _matches(entry, fmt)
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
            raise CorpusError(f"corpus path {entry!r} cannot be read: {_why(e)}", index) from e
        if not matches:
            raise CorpusError(_nothing_matches(entry, fmt), index)
        for path in matches:
            if path not in found:
                try:
                    found[path] = os.stat(path).st_size
                except OSError as e:
                    raise CorpusError(f"corpus file {path} cannot be read: {_why(e)}", index) from e
    return [CorpusFile(path, size) for path, size in found.items()]


def _matches(entry: str, fmt: str) -> list[str]:
    if not entry:
        return []
    if os.path.isfile(entry):
        return [os.path.abspath(entry)]
    if os.path.isdir(entry):
        return _walk(entry, SUFFIXES[fmt])
    if any(c in entry for c in _GLOB_CHARS):
        hits = glob.glob(entry, recursive=True)  # hidden names are skipped by default
        return sorted(os.path.abspath(p) for p in hits if os.path.isfile(p))
    return []


def _walk(root: str, suffixes: tuple[str, ...]) -> list[str]:
    out = []
    for folder, dirs, names in os.walk(root):  # followlinks=False: a link to a folder is not entered
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(folder, n) for n in names if not n.startswith(".") and n.lower().endswith(suffixes)]
    out = [p for p in out if os.path.isfile(p)]
    return sorted((os.path.abspath(p) for p in out), key=lambda p: os.path.relpath(p, root).split(os.sep))


def _nothing_matches(entry: str, fmt: str) -> str:
    if not entry:
        return "corpus path is empty"
    if os.path.isdir(entry):
        return (f"corpus folder {entry} holds no {fmt} files (a folder contributes {', '.join(SUFFIXES[fmt])}, "
                "hidden names skipped)")
    return f"corpus path {entry} matches no file"


def _why(error: Exception) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def count_records(files: tuple[CorpusFile, ...] | list[CorpusFile]) -> int:
    """Returns the non-blank lines of JSONL `files`: one record each, as `prepare` reads them."""
    count = 0
    for f in files:
        try:
            with open(f.path, "rb") as handle:
                count += sum(1 for line in handle if line.strip())
        except OSError as e:
            raise CorpusError(f"corpus file {f.path} cannot be read: {_why(e)}") from e
    return count
