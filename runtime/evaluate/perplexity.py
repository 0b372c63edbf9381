"""Perplexity over fixed-length windows of a text sample: the forgetting side of evaluation,
measured on held-out domain text and on general text, before and after adaptation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dapc.errors import DapcError

if TYPE_CHECKING:  # the model module imports torch; reading text files does not need it
    from runtime.evaluate.hf_model import HFModel

# Text files, or token-id arrays (e.g. the shards `runtime.prepare` writes), or a function
# returning such arrays.
TextSource = str | Path | Sequence[str | Path] | Iterable[Sequence[int]] | Callable[[], Iterable[Sequence[int]]]

_TEXT_SUFFIXES = (".txt", ".md")
# Files in a text directory that describe the text rather than belong to it.
_NOT_TEXT_PREFIXES = ("LICENSE", "README", "ATTRIBUTION")
# A token is shorter than this many characters in any text we read: bounds how much of a large
# file is read and tokenized for `max_tokens` tokens.
_MAX_CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class PerplexityScore:
    """`perplexity` = exp(`nll_nats_per_token`) over `tokens` predicted tokens (every token of a
    window but its first) in `windows` windows of at most `seq_len` tokens; `source` names the
    files read (or says "token arrays")."""

    source: str
    tokens: int
    windows: int
    seq_len: int
    nll_nats_per_token: float
    perplexity: float


def text_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files a text source names: each file as given, and for a directory its `.txt` and
    `.md` files (recursively, in path order) except LICENSE*, README* and ATTRIBUTION*."""
    paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix in _TEXT_SUFFIXES and not p.name.upper().startswith(_NOT_TEXT_PREFIXES)
            )
            if not found:
                raise DapcError("no .txt or .md text files in this directory", str(path))
            files += found
        else:
            raise DapcError("text file or directory not found", str(path))
    return files


def windows_of(stream: Sequence[int], seq_len: int) -> list[Sequence[int]]:
    """`stream` cut into consecutive windows of `seq_len` tokens (the last may be shorter)."""
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


def perplexity(model: HFModel, source: TextSource, *, seq_len: int, max_tokens: int) -> PerplexityScore:
    """Perplexity of `model` on the first `max_tokens` tokens of `source`.

    Text files are tokenized one document each with the model's tokenizer, concatenated in order
    and cut into windows of `seq_len` tokens (capped at the model's context); token arrays are
    cut into windows one array at a time. Windows do not overlap, so every window's first token
    is predicted from nothing and is not counted.
    """
    seq_len = min(seq_len, model.max_length)
    if callable(source):
        source = source()
    if isinstance(source, (str, Path)) or (
        isinstance(source, Sequence) and source and isinstance(source[0], (str, Path))
    ):
        windows, label = _text_windows(model, text_files(source), seq_len, max_tokens)
    else:
        windows, label = _array_windows(source, seq_len, max_tokens), "token arrays"
    nats, tokens = model.token_nll(windows)
    if tokens == 0:
        raise DapcError("the perplexity text has no tokens to predict", label)
    return PerplexityScore(label, tokens, len(windows), seq_len, nats / tokens, math.exp(nats / tokens))


def _text_windows(model: HFModel, files: list[Path], seq_len: int, max_tokens: int) -> tuple[list[Sequence[int]], str]:
    """Windows over the files' token stream, and the names of the files read."""
    read: list[str] = []
    stream: list[int] = []
    for file in files:
        if len(stream) >= max_tokens:
            break
        with file.open(encoding="utf-8") as f:
            stream += model.encode(f.read(max_tokens * _MAX_CHARS_PER_TOKEN))
        read.append(str(file))
    return windows_of(stream[:max_tokens], seq_len), ", ".join(read)


def _array_windows(arrays: Iterable[Sequence[int]], seq_len: int, max_tokens: int) -> list[Sequence[int]]:
    """Windows over each array in turn, until `max_tokens` tokens are taken."""
    windows: list[Sequence[int]] = []
    budget = max_tokens
    for array in arrays:
        if budget <= 0:
            break
        windows += windows_of(list(array)[:budget], seq_len)
        budget -= min(len(array), budget)
    return windows
