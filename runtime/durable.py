"""Durability for files the runtime must not lose on a crash: checkpoints, shards, manifests."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes a file's or a directory's contents (a directory: its entries, so a rename is durable) to disk."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
