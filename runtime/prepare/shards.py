"""Pack one split's token stream into fixed-length sequences and write them as committed shards.

A shard is a raw little-endian array of `sequences × seq_len` tokens (`np.memmap`-able), named
`{split}-{index:05d}.bin`. It is written as `.bin.partial`, and committed when full (or at the end) by fsync
and an atomic rename, in order. Tokens that do not fill a last sequence are carried to the next unit; at the
end of the corpus that remainder (< seq_len tokens per split) is dropped and counted.

`state()` is everything needed to continue after a kill: the committed shards, how many sequences of the
partial shard are durable, and the carried tokens. `SplitWriter.resume` truncates the partial shard back to
that point (a kill may leave it longer, or already renamed) and rebuilds its running sha256.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.durable import fsync_path


class ResumeMismatch(Exception):
    """The files on disk do not match the progress record; the caller starts over."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    split: str
    first_sequence: int
    sequences: int
    bytes: int
    sha256: str


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class SplitWriter:
    def __init__(self, directory: Path, split: str, seq_len: int, dtype: str, shard_sequences: int):
        self.directory, self.split, self.seq_len = directory, split, seq_len
        self.dtype, self.shard_sequences = np.dtype(dtype), shard_sequences
        self.row_bytes = seq_len * self.dtype.itemsize
        self.committed: list[ShardInfo] = []
        self.carry = np.zeros(0, dtype=np.uint32)
        self._file = None
        self._hash = hashlib.sha256()
        self._partial_sequences = 0

    @property
    def sequences(self) -> int:
        return sum(s.sequences for s in self.committed) + self._partial_sequences

    def add(self, tokens: np.ndarray) -> int:
        """Append tokens; returns how many shards this committed."""
        stream = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        rows = len(stream) // self.seq_len
        self.carry = stream[rows * self.seq_len :].copy()
        packed = stream[: rows * self.seq_len].astype(self.dtype).reshape(rows, self.seq_len)
        commits = 0
        while len(packed):
            take = min(self.shard_sequences - self._partial_sequences, len(packed))
            self._write(packed[:take])
            packed = packed[take:]
            if self._partial_sequences == self.shard_sequences:
                self._commit()
                commits += 1
        return commits

    def state(self) -> dict:
        """Make the partial shard durable and describe where this split stands."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {
            "committed": [asdict(s) for s in self.committed],
            "partial_sequences": self._partial_sequences,
            "carry": self.carry.tolist(),
        }

    def finish(self) -> int:
        """Commit the last partial shard; returns the number of remainder tokens dropped."""
        if self._partial_sequences:
            self._commit()
        dropped, self.carry = len(self.carry), self.carry[:0]
        return dropped

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @classmethod
    def resume(cls, directory: Path, split: str, seq_len: int, dtype: str, shard_sequences: int, state: dict):
        writer = cls(directory, split, seq_len, dtype, shard_sequences)
        writer.committed = [ShardInfo(**s) for s in state["committed"]]
        for info in writer.committed:
            path = directory / info.file
            if not path.is_file() or path.stat().st_size != info.bytes:
                raise ResumeMismatch(f"{info.file} is missing or has the wrong size")
        writer.carry = np.asarray(state["carry"], dtype=np.uint32)
        index, keep = len(writer.committed), state["partial_sequences"] * writer.row_bytes
        final, partial = directory / shard_name(split, index), writer._partial_path()
        if not partial.exists() and final.exists():  # killed between the rename and the progress record
            os.replace(final, partial)
        if keep and (not partial.exists() or partial.stat().st_size < keep):
            raise ResumeMismatch(f"{partial.name} holds fewer than the {state['partial_sequences']} recorded sequences")
        for stale in directory.glob(f"{split}-*.bin*"):  # written after the progress record: redone below
            number = stale.name[len(split) + 1 :].split(".")[0]
            if number.isdigit() and (int(number) > index or (int(number) == index and stale != partial)):
                stale.unlink()
        if partial.exists():
            writer._file = open(partial, "r+b")
            writer._file.truncate(keep)
            for block in iter(lambda: writer._file.read(1 << 20), b""):
                writer._hash.update(block)
            writer._partial_sequences = state["partial_sequences"]
        return writer

    def _partial_path(self) -> Path:
        return self.directory / (shard_name(self.split, len(self.committed)) + ".partial")

    def _write(self, rows: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self._partial_path(), "wb")
        data = rows.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._partial_sequences += len(rows)

    def _commit(self) -> None:
        partial = self._partial_path()
        self._file.flush()
        os.fsync(self._file.fileno())
        self.close()
        info = ShardInfo(
            file=shard_name(self.split, len(self.committed)),
            split=self.split,
            first_sequence=sum(s.sequences for s in self.committed),
            sequences=self._partial_sequences,
            bytes=self._partial_sequences * self.row_bytes,
            sha256=self._hash.hexdigest(),
        )
        os.replace(partial, self.directory / info.file)
        fsync_path(self.directory)
        self.committed.append(info)
        self._hash, self._partial_sequences = hashlib.sha256(), 0
