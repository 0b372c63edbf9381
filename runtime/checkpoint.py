"""Atomic, resumable checkpoints in `checkpoint_dir/step-N` folders, tied to the plan that wrote them.

Protocol (every rank takes part; `checkpoint_dir` must be shared by all nodes). It runs in three stages; after
each, every rank learns (one `all_gather_object`) whether any rank failed, so all raise together instead of
leaving the others waiting in the next collective:
1. rank 0 clears a leftover `.step-N.partial` (a save killed earlier) and creates it afresh.
2. every rank writes its part into `.step-N.partial/`: the backend's states (DCP `dcp/`, or DeepSpeed's
   `deepspeed/`) and `trainer/rank-R.pt` (step, sampler position, RNG states); then fsyncs what it sees.
3. rank 0 walks the folder and writes `meta.json` (plan_sha256, step, world size, backend, and a manifest:
   every file's relative path and size in bytes), fsyncs it and the folder, renames the folder to `step-N`
   (atomic) and fsyncs the parent: kill -9 at any moment leaves the previous checkpoint (or this one) usable.
   Then it keeps the newest `keep_last` complete checkpoints: older `step-*` folders are renamed to `.trash-*`
   first, then deleted, so a kill mid-deletion never leaves a partial `step-N`. One it cannot delete is named on
   stderr: the save has succeeded.

A save that fails (a full disk: ENOSPC, EDQUOT, EFBIG) never touches a `step-N` folder: rank 0 removes the partial
folder and every rank raises CheckpointError naming the error and the checkpoint that remains. A failure that is
not the storage's (a bug) is re-raised as is on the rank that hit it, with its traceback. A rank that fails
inside the backend's own collectives (DeepSpeed's barriers) cannot reach the agreement: the others wait there
until the process group's timeout, then torchrun stops the job; the next launch's `clear_leftovers` removes
the partial folder.

On resume the newest `step-N` whose meta.json parses and whose files all exist with the recorded sizes is
loaded; each newer, damaged one is skipped with one line on stderr saying what is wrong. Checkpoints of
format 1 (no manifest) count as complete when their meta.json parses. One written under another
`plan_sha256` is refused, naming the file and both hashes.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException

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
FORMAT_VERSION = 2  # 2: meta.json holds `manifest`, {relative path: size in bytes} of every other file
_STEP_RE = re.compile(r"^step-(\d+)$")
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# torch.save to a path reports ENOSPC as a bare RuntimeError: with less free space than this, the disk is why
_LOW_SPACE_BYTES = 16 * 1024**2


class CheckpointError(DapcError):
    """A checkpoint that cannot be resumed from (written by another plan, or unreadable), or one that could not
    be written."""


class _Failure(NamedTuple):
    """What one rank saw go wrong in a stage of a save. `remedy` is None for an error that is not the storage's."""

    rank: int
    reason: str
    remedy: str | None


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root` (see `_damage`), oldest first."""
    return [(step, folder) for step, folder in _step_folders(root) if _damage(folder) is None]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `root`, or None. Each newer, damaged `step-N` is skipped with
    one line on stderr (from the main rank only) naming it and what is wrong."""
    skipped = []
    for _, folder in reversed(_step_folders(root)):
        damage = _damage(folder)
        if damage is None:
            break
        skipped.append(f"skipping {folder}: {damage}")
    else:
        folder = None
    fallback = f"falling back to {folder.name}" if folder else "no earlier complete checkpoint"
    for line in skipped:
        _say(f"{line}; {fallback}")
    return folder


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
    """Writes checkpoint `step` through `write(partial_folder)` (called on every rank); returns its folder.
    Raises CheckpointError, on every rank, when a rank could not write its part (see the module's docstring)."""
    root = Path(root)
    main = _rank() == 0
    final, partial = root / f"step-{step}", root / f".step-{step}.partial"
    _stage(root, step, partial, lambda: _prepare(root, partial) if main else None)
    _stage(root, step, partial, lambda: _write_part(write, partial))
    _stage(root, step, partial, lambda: _finish(root, partial, final, meta, step, keep_last) if main else None)
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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _say(line: str) -> None:
    """Prints `line` to stderr from the main rank: rank 0 of the process group, or, before one exists (the loop
    looks for a checkpoint before `init_process_group`), the process torchrun started as RANK 0."""
    main = _rank() == 0 if dist.is_initialized() else os.environ.get("RANK", "0") == "0"
    if main:
        print(line, file=sys.stderr, flush=True)


def _step_folders(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-N` folder under `root`, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _damage(folder: Path) -> str | None:
    """What makes `folder` no complete checkpoint (the first of its files that differs from the manifest, and how
    many more do), or None when it is complete."""
    try:
        meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {META_NAME}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{META_NAME} does not parse ({e})"
    if not isinstance(meta, dict):
        return f"{META_NAME} is not a JSON object"
    manifest = meta.get("manifest")
    if manifest is None and meta.get("format_version") == 1:
        return None  # format 1 recorded no sizes: complete by presence, as it was written
    if not isinstance(manifest, dict) or not all(isinstance(v, int) for v in manifest.values()):
        return f"{META_NAME} has no manifest of file sizes"
    problems = [p for p in (_file_damage(folder, name, size) for name, size in sorted(manifest.items())) if p]
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1:,} more files)" if len(problems) > 1 else "")


def _file_damage(folder: Path, name: str, size_bytes: int) -> str | None:
    """How file `name` of `folder` differs from its manifest entry, or None when it has the recorded size."""
    try:
        actual_bytes = (folder / name).stat().st_size
    except FileNotFoundError:
        return f"{name} is missing, {META_NAME} recorded {size_bytes:,} bytes"
    except OSError as e:
        return f"{name} is unreadable ({e.strerror})"
    if actual_bytes != size_bytes:
        return f"{name} has {actual_bytes:,} bytes, {META_NAME} recorded {size_bytes:,}"
    return None


def _manifest(folder: Path) -> dict[str, int]:
    """Relative path (with `/`) → size in bytes of every file under `folder`."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _prepare(root: Path, partial: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()


def _write_part(write: Callable[[Path], None], partial: Path) -> None:
    write(partial)
    _fsync_tree(partial)


def _finish(root: Path, partial: Path, final: Path, meta: dict[str, Any], step: int, keep_last: int) -> None:
    """Seals `partial` as `final` (meta.json last, then the rename) and prunes what it supersedes."""
    manifest = _manifest(partial)
    _write_json(partial / META_NAME, {**meta, "step": step, "format_version": FORMAT_VERSION, "manifest": manifest})
    fsync_path(partial)
    if final.exists():  # a damaged `step-N` (a complete one would have been resumed from, not rewritten)
        _discard(final, root)
    os.rename(partial, final)
    fsync_path(root)
    _prune(root, keep_last)


def _prune(root: Path, keep_last: int) -> None:
    """Deletes every `step-N` folder older than the newest `keep_last` complete checkpoints: older complete ones,
    and damaged ones that no resume would reach. Damaged folders newer than those are left for the user to see
    (a later save of that step replaces them)."""
    kept = complete_checkpoints(root)[-keep_last:]
    for step, folder in _step_folders(root):
        if kept and step < kept[0][0]:
            try:
                _discard(folder, root)
            except OSError as e:
                _say(f"could not delete old checkpoint {folder.name} ({e.strerror}: {e.filename}); delete it by hand")


def _stage(root: Path, step: int, partial: Path, action: Callable[[], None]) -> None:
    """Runs `action` on this rank, then learns whether any rank failed. On a failure rank 0 removes `partial`
    and every rank raises: CheckpointError when a rank's storage failed (or, for the ranks that did not fail,
    naming the first one that did), else the error this rank hit."""
    error = None
    try:
        action()
    except (Exception, DcpCheckpointException) as e:  # DCP's exception is a BaseException
        error = e
    failures = [f for f in _all_gather(_failure(error, root, partial) if error else None) if f]
    if not failures:
        return
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    storage = [f for f in failures if f.remedy]
    if error is not None and not storage:
        raise error
    raise CheckpointError(_failure_message(root, step, (storage or failures)[0]), str(root)) from error


def _failure(error: BaseException, root: Path, partial: Path) -> _Failure:
    """What `error`, raised on this rank while saving into `partial`, says about the storage."""
    rank = _rank()
    where = f"rank {rank}: " if dist.is_initialized() else ""
    os_error = _os_error(error)
    if os_error is not None:
        path = f", writing {_relative(os_error.filename, partial)}" if os_error.filename else ""
        space = os_error.errno in _SPACE_ERRNOS
        return _Failure(rank, f"{where}{os_error.strerror or os_error}{path}", "free space" if space else "fix that")
    summary = _summary(error)
    free_bytes = shutil.disk_usage(root).free if root.is_dir() else None
    if free_bytes is not None and free_bytes < _LOW_SPACE_BYTES:
        return _Failure(rank, f"{where}{summary}, with {free_bytes:,} bytes free on that filesystem", "free space")
    return _Failure(rank, f"{where}{summary}", None)


def _summary(error: BaseException) -> str:
    """`Type: first line of its message` of `error` (for DCP's exception, of the first rank's failure)."""
    if isinstance(error, DcpCheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _os_error(error: BaseException) -> OSError | None:
    """The first OSError among `error`, its causes and contexts, and (DCP) each rank's wrapped failure."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        pending += [e.__cause__, e.__context__]
        if isinstance(e, DcpCheckpointException):
            pending += [wrapped for wrapped, _ in e.failures.values()]
    return None


def _relative(filename: str | os.PathLike, partial: Path) -> str:
    """`filename` relative to the partial folder when inside it (as the manifest names it), else as given."""
    try:
        return Path(os.fsdecode(filename)).resolve().relative_to(partial.resolve()).as_posix()
    except ValueError:
        return os.fsdecode(filename)


def _failure_message(root: Path, step: int, failure: _Failure) -> str:
    """One line: the checkpoint that failed and why, the checkpoint that remains, and what to do."""
    found = complete_checkpoints(root)
    kept = f"{found[-1][1].name} is intact" if found else "no complete checkpoint remains"
    failed = f"could not write checkpoint step-{step} ({failure.reason})"
    if failure.remedy is None:
        return f"{failed}; {kept}; rank {failure.rank}'s traceback says why"
    then = "resume from it" if found else "start from step 0"
    return f"{failed}; {kept}; {failure.remedy} and relaunch to {then}"


def _all_gather(value: Any) -> list[Any]:
    """`value` of every rank, by rank (just this one's without a process group)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


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
