"""Resuming on another world size: a 2-process FSDP2 checkpoint continues on 1 process and the reverse, with
the same data order and the losses of an uninterrupted run; DeepSpeed refuses, naming both sizes. (A stop
request on Slurm's preemption signal, then the requeued resume: tests/test_e2e_launch.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime.checkpoint import CheckpointError
from runtime.train.config import load_plan
from runtime.train.resume import check_resumable
from tests.train_support import compile_plan, losses, read_plan, records, train

# 4 steps of 8 sequences, a checkpoint every 2; the layout differs, the training does not.
SHORT = ("strategy=fsdp2-full", "checkpoint.export_hf=false", "training.tokens=4096", "checkpoint.every_steps=2",
         "training.global_batch_sequences=8", "eval.benchmarks=[]")
# Summation order differs between layouts (one process adds 8 sequences' gradients where two add 4 and reduce),
# so losses agree to float32 rounding, not bit for bit: measured ≤ 2e-7 relative over the resumed steps; a
# different data order moves them by ~1e-2.
LOSS_TOLERANCE = 1e-5


def _layout(gpus: int) -> tuple[str, ...]:
    return (*SHORT, "hardware.nodes=1", f"hardware.gpus_per_node={gpus}")


@pytest.fixture(scope="module")
def uninterrupted(prepared_dir: Path, tmp_path_factory) -> dict[int, Path]:
    """The 4 steps run through on 1 and on 2 processes: plan path per world size."""
    runs = {}
    for gpus in (1, 2):
        plan = compile_plan(tmp_path_factory.mktemp(f"whole-{gpus}"), prepared_dir, *_layout(gpus))
        train(plan, nproc=gpus)
        runs[gpus] = plan
    return runs


def _checkpoint_dir(plan: Path) -> Path:
    return Path(read_plan(plan)["paths"]["checkpoint_dir"])


@pytest.mark.parametrize(("saved", "resumed"), [(2, 1), (1, 2)])
def test_fsdp2_checkpoint_resumes_on_another_world_size_with_the_same_losses(
        uninterrupted, prepared_dir, tmp_path, saved, resumed):
    source, reference = uninterrupted[saved], uninterrupted[resumed]
    assert read_plan(source)["trajectory_sha256"] == read_plan(reference)["trajectory_sha256"]
    assert read_plan(source)["plan_sha256"] != read_plan(reference)["plan_sha256"]
    plan = compile_plan(tmp_path, prepared_dir, *_layout(resumed))
    shutil.copytree(_checkpoint_dir(source) / "step-2", _checkpoint_dir(plan) / "step-2")

    done = train(plan, nproc=resumed)

    start = records(plan, "start")[-1]
    assert (start["step"], start["world_size"], start["resumed_world_size"]) == (2, resumed, saved)
    assert f"written by another plan of the same training on {saved} ranks (fsdp2), resharded to {resumed}" in (
        done.stdout + done.stderr)
    got, same_layout, other_layout = losses(plan), losses(reference), losses(source)
    assert sorted(got) == [3, 4]
    worst = max(abs(got[k] / ref[k] - 1) for ref in (same_layout, other_layout) for k in got)
    print(f"resumed {saved} → {resumed} ranks: largest relative loss difference {worst:.2e}")
    for step in got:  # the run it continues and the run on its own layout: both within the tolerance
        assert got[step] == pytest.approx(other_layout[step], rel=LOSS_TOLERANCE), (step, got, other_layout)
        assert got[step] == pytest.approx(same_layout[step], rel=LOSS_TOLERANCE), (step, got, same_layout)


def test_deepspeed_checkpoint_on_another_world_size_is_refused_naming_both(prepared_dir, tmp_path):
    plan_path = compile_plan(tmp_path, prepared_dir, *SHORT[1:], "strategy=zero2", "hardware.gpus_per_node=1")
    plan = load_plan(plan_path)
    folder = Path(plan.checkpoint_dir) / "step-4"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({
        "plan_sha256": "0" * 64, "trajectory_sha256": plan.trajectory_sha256, "world_size": 2,
        "backend": "deepspeed", "strategy": "zero2", "method": "full", "step": 4}))
    with pytest.raises(CheckpointError, match=r"written by deepspeed on 2 ranks; this plan runs deepspeed on 1 "
                                              r"ranks\. DeepSpeed ZeRO checkpoints are partitioned per rank"):
        check_resumable(folder, plan)



def test_checkpoint_metadata_without_world_size_is_one_checkpoint_error(prepared_dir, tmp_path):
    plan = load_plan(compile_plan(tmp_path, prepared_dir, *_layout(1)))
    folder = Path(plan.checkpoint_dir) / "step-2"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"plan_sha256": plan.plan_sha256, "step": 2}))
    with pytest.raises(CheckpointError, match="names no world_size and backend: not written by this runtime"):
        check_resumable(folder, plan)
