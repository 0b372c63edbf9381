"""A precomputed dpo reference (plan.json `objective.preference.reference` precomputed): before step 1 the starting
model scores every training pair once; during training each row's reference log-probability is looked up, so no
reference model is held or run.

The table maps a row (its token ids and labels, hashed) to its summed log-probability, so the lookup needs no
sample index and a repeated row is scored once. It is written once, atomically, at the plan's
`paths.reference_logps_path`, and read back on resume: a trained model can never stand in for the starting one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from .config import PlanError

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def row_key(input_ids: torch.Tensor, labels: torch.Tensor) -> str:
    """Returns the hex digest identifying one row [s] by its token ids and labels."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(input_ids.cpu().numpy().tobytes())
    digest.update(labels.cpu().numpy().tobytes())
    return digest.hexdigest()


class PrecomputedReference:
    """The reference as the loss calls it, (input_ids [2b, s], labels [2b, s]) -> summed log-probabilities [2b],
    read from the table `fill` gives it."""

    def __init__(self) -> None:
        self.table: dict[str, float] | None = None

    def fill(self, table: dict[str, float]) -> None:
        self.table = table

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            raise RuntimeError("the precomputed reference was used before its table was filled")
        ids, lab = input_ids.cpu(), labels.cpu()
        try:
            values = [self.table[row_key(ids[i], lab[i])] for i in range(ids.shape[0])]
        except KeyError as e:
            raise RuntimeError(f"a training row has no precomputed reference log-probability ({e}): the table was "
                               "made from other prepared data") from e
        return torch.tensor(values, dtype=torch.float32, device=input_ids.device)


def reference_table(path: str, pairs, micro_batch: int, score: Scorer, device: torch.device, resuming: bool,
                    say: Callable[[str], None]) -> dict[str, float]:
    """Returns the table of every training pair's two rows: read from `path` when a complete one is there, else
    scored now by `score` (the starting model; collective: every rank scores a share and all gather) and written
    by rank 0. Raises PlanError when a resumed run has lost it (the starting model is gone)."""
    stored = _read(Path(path))
    if stored is not None and _all_keys(pairs) <= stored.keys():
        say(f"reference: {len(pairs):,} pairs' log-probabilities read from {path}")
        return stored
    if resuming:
        raise PlanError(f"the run resumes from a checkpoint but its precomputed reference {path} is missing or "
                        "incomplete; it can only be made from the starting model: start the run again in a new "
                        "output directory", path)
    start = time.monotonic()
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(pairs), world)) or [0]
    batches = math.ceil(math.ceil(len(pairs) / world) / micro_batch)  # the same count on every rank: collectives
    local: dict[str, float] = {}
    with torch.no_grad():
        for b in range(batches):
            indices = mine[b * micro_batch:(b + 1) * micro_batch] or mine[-1:]
            ids, labels = pairs.batch(indices), pairs.labels(indices)
            logps = score(ids.to(device), labels.to(device)).float().cpu()
            for i in range(ids.shape[0]):
                local[row_key(ids[i], labels[i])] = float(logps[i])
    gathered: list[dict[str, float] | None] = [None] * world
    dist.all_gather_object(gathered, local)
    table = {k: v for part in gathered for k, v in (part or {}).items()}
    if rank == 0:
        _write(Path(path), table)
    dist.barrier()
    say(f"reference: scored {len(pairs):,} pairs with the starting model in {time.monotonic() - start:.1f} s, "
        f"kept in {path}")
    return table


def _all_keys(pairs) -> set[str]:
    keys: set[str] = set()
    for start in range(0, len(pairs), 256):
        indices = list(range(start, min(start + 256, len(pairs))))
        ids, labels = pairs.batch(indices), pairs.labels(indices)
        keys.update(row_key(ids[i], labels[i]) for i in range(ids.shape[0]))
    return keys


def _read(path: Path) -> dict[str, float] | None:
    try:
        return json.loads(path.read_text())["logps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, table: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        json.dump({"logps": table}, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
