"""Atomic, resumable checkpoints in `checkpoint_dir/step-N` folders, tied to the plan that wrote them.

Protocol (every rank takes part; `checkpoint_dir` must be shared by all nodes):
1. rank 0 clears a leftover `.step-N.partial` (a save killed earlier); barrier.
2. every rank writes its part into `.step-N.partial/`: the backend's states (DCP `dcp/`, or DeepSpeed's
   `deepspeed/`) and `trainer/rank-R.pt` (step, sampler position, RNG states); then fsyncs what it sees.
3. barrier; rank 0 writes `meta.json` (plan_sha256, step, world size, backend), fsyncs it and the folder,
   renames the folder to `step-N` (atomic) and fsyncs the parent. A `step-N` folder therefore always holds a
   complete checkpoint: kill -9 at any moment leaves the previous one (or this one) usable.
4. rank 0 keeps the newest `keep_last`: older folders are renamed to `.trash-*` first, then deleted, so a
   kill mid-deletion never leaves a partial `step-N`. Barrier.

On resume the newest `step-N` with a `meta.json` is loaded; one written under another `plan_sha256` is
refused, naming the file and both hashes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dapc.errors import DapcError
from runtime.durable import fsync_path

__all__ = [
    "META_NAME",
    "CheckpointError",
    "check_plan",
    "clear_leftovers",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_trainer_state",
    "read_meta",
    "restore_rng_state",
    "rng_state",
    "save_checkpoint",
    "trainer_state_path",
]

META_NAME = "meta.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(DapcError):
    """A checkpoint that cannot be resumed from: written by another plan, or unreadable."""


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_RE.match(entry.name)
        if match and (entry / META_NAME).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `root`, or None."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable checkpoint metadata: {e}", str(path)) from e


def check_plan(folder: Path, plan_sha256: str, plan_path: str) -> dict[str, Any]:
    """The folder's metadata; raises CheckpointError when another plan wrote it."""
    meta = read_meta(folder)
    if meta.get("plan_sha256") != plan_sha256:
        raise CheckpointError(
            f"checkpoint was written under plan_sha256 {meta.get('plan_sha256')}, but {plan_path} has plan_sha256 "
            f"{plan_sha256}; resume with the plan that wrote it, or give this plan another output directory",
            str(folder / META_NAME),
        )
    return meta


def clear_leftovers(root: str | Path) -> None:
    """Removes partial saves and half-deleted folders left by a killed run. Rank 0 only, before any save."""
    root = Path(root)
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith((".step-", ".trash-")):
                shutil.rmtree(entry, ignore_errors=True)


def save_checkpoint(
    root: str | Path,
    step: int,
    meta: dict[str, Any],
    write: Callable[[Path], None],
    keep_last: int,
) -> Path:
    """Writes checkpoint `step` through `write(partial_folder)` (called on every rank); returns its folder."""
    root = Path(root)
    rank = dist.get_rank() if dist.is_initialized() else 0
    final, partial = root / f"step-{step}", root / f".step-{step}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier()
    write(partial)
    _fsync_tree(partial)
    _barrier()
    if rank == 0:
        _write_json(partial / META_NAME, {**meta, "step": step, "format_version": FORMAT_VERSION})
        fsync_path(partial)
        if final.exists():  # a `step-N` without meta.json is not a checkpoint (see complete_checkpoints)
            _discard(final, root)
        os.rename(partial, final)
        fsync_path(root)
        for _, old in complete_checkpoints(root)[:-keep_last]:
            _discard(old, root)
    _barrier()
    return final


def trainer_state_path(folder: Path, rank: int) -> Path:
    return folder / "trainer" / f"rank-{rank:05d}.pt"


def load_trainer_state(folder: Path, rank: int) -> dict[str, Any]:
    path = trainer_state_path(folder, rank)
    if not path.is_file():
        raise CheckpointError(f"no trainer state for rank {rank}", str(path))
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, sampling): torch CPU and CUDA, Python, NumPy."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _discard(folder: Path, root: Path) -> None:
    trash = root / f".trash-{folder.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    fsync_path(root)
    shutil.rmtree(trash)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(folder: Path) -> None:
    for directory, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


