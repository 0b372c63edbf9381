"""Which checkpoint a run resumes from, and whether it may: the same plan, or the same training on another
GPU layout.

A checkpoint's meta.json names the plan that wrote it (`plan_sha256`) and the training it belongs to
(`trajectory_sha256`: model, method, data, global batch, schedule and numerics, not the layout). The same plan
resumes as is. Another plan with the same trajectory (other node or GPU counts, micro-batch, strategy) resumes
where the backend can reshard its states: DDP and FSDP2 save through DCP, which stores each tensor with its
global shape and loads it into any sharding, and the sampler continues at the same optimizer step (its order
depends on the seed and the global batch only). DeepSpeed's ZeRO checkpoints are partitioned per rank and this
runtime does not convert them, so they resume only on the world size and backend that wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.checkpoint import META_NAME, CheckpointError, load_trainer_state, read_meta

from .config import TrainPlan

__all__ = ["Resume", "check_resumable", "trainer_state"]

_RESHARDABLE = frozenset({"ddp", "fsdp2"})  # DCP-backed


@dataclass(frozen=True)
class Resume:
    """A checkpoint this plan may resume from, and the world size that wrote it."""
    folder: Path
    world_size: int
    backend: str
    same_plan: bool

    def describe(self, world_size: int) -> str:
        """Returns how the states are carried over, for the run's log."""
        if self.same_plan:
            return f"resuming from {self.folder}"
        return (f"resuming from {self.folder}, written by another plan of the same training on {self.world_size} "
                f"ranks ({self.backend}), resharded to {world_size} ranks")


def check_resumable(folder: Path, plan: TrainPlan) -> Resume:
    """Returns how `plan` resumes from the checkpoint `folder`; raises CheckpointError (naming both plans, or
    both world sizes) when it cannot. Reads files only: every rank calls it before any collective."""
    meta = read_meta(folder)
    where = str(folder / META_NAME)
    if not isinstance(meta.get("world_size"), int) or not isinstance(meta.get("backend"), str):
        raise CheckpointError("checkpoint metadata names no world_size and backend: not written by this runtime",
                              where)
    saved_world, saved_backend = meta["world_size"], meta["backend"]
    if meta.get("plan_sha256") == plan.plan_sha256:
        return Resume(folder, saved_world, saved_backend, same_plan=True)
    if meta.get("trajectory_sha256") != plan.trajectory_sha256:
        raise CheckpointError(
            f"checkpoint was written under plan_sha256 {meta.get('plan_sha256')}, but {plan.path} has plan_sha256 "
            f"{plan.plan_sha256} and trains something else (model, method, data, global batch, schedule or "
            "numerics differ); resume with the plan that wrote it, or give this plan another output directory", where)
    same_layout = saved_world == plan.world_size and saved_backend == plan.backend
    if not same_layout and not {saved_backend, plan.backend} <= _RESHARDABLE:
        raise CheckpointError(
            f"checkpoint was written by {saved_backend} on {saved_world} ranks; this plan runs {plan.backend} on "
            f"{plan.world_size} ranks. DeepSpeed ZeRO checkpoints are partitioned per rank and this runtime does "
            f"not reshard them: resume on {saved_world} ranks with {saved_backend}, or start a new output "
            "directory", where)
    return Resume(folder, saved_world, saved_backend, same_plan=False)


def trainer_state(resume: Resume, rank: int, world_size: int) -> tuple[dict[str, Any], bool]:
    """Returns this rank's trainer state (step, sampler, RNG) and whether its RNG state applies as is.

    On another world size there is no state written for this rank's position; the sampler state is the same on
    every rank (it counts samples of all ranks), so any rank's serves, but RNG streams (dropout) cannot be
    carried over exactly."""
    if world_size == resume.world_size:
        return load_trainer_state(resume.folder, rank), True
    return load_trainer_state(resume.folder, rank % resume.world_size), False
