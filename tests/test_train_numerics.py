"""Numerics of the step: gradient accumulation, activation checkpointing, precisions, the 8-bit optimizer.

DDP with 2 micro-batches of 2 per step and activation checkpointing sees the same 8 sequences per step as
FSDP2 with one micro-batch of 4 (the sampler hands out `world_size × micro_batch` entries per micro-step),
so in fp32 both follow the same losses. bf16 autocast with bitsandbytes AdamW8bit, and fp16 with the
gradient scaler, train in one process. About 1.5 minutes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train_support import compile_plan, losses, read_plan, records, train

NO_EXPORT = "checkpoint.export_hf=false"


def test_ddp_accumulating_with_activation_checkpointing_follows_fsdp2_losses(prepared_dir: Path, tmp_path: Path):
    reference = compile_plan(tmp_path / "fsdp2", prepared_dir, NO_EXPORT)
    accumulating = compile_plan(tmp_path / "ddp", prepared_dir, NO_EXPORT, "strategy=ddp", "training.micro_batch=2",
                                "training.activation_checkpointing=true")
    plan = read_plan(accumulating)
    assert (plan["batch"]["micro_batch"], plan["batch"]["grad_accum"], plan["activation_checkpointing"]) == (2, 2, "full")
    train(reference, nproc=2)
    train(accumulating, nproc=2)
    expected, got = losses(reference), losses(accumulating)
    assert sorted(got) == list(range(1, 13))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got[step], expected[step])


@pytest.mark.parametrize(
    ("precision", "optimizer", "steps"),
    [("bf16", "adamw-8bit", 6), ("fp16", "adamw", 2)],  # fp16 matmuls are slow on this CPU: 2 steps
)
def test_mixed_precision_trains_in_one_process(precision: str, optimizer: str, steps: int, prepared_dir: Path,
                                               tmp_path: Path):
    plan_path = compile_plan(tmp_path, prepared_dir, NO_EXPORT, "hardware.gpus_per_node=1", "strategy=ddp",
                             f"training.precision={precision}", f"training.optimizer={optimizer}",
                             f"training.tokens={steps * 1024}")
    train(plan_path, nproc=1)
    by_step = losses(plan_path)
    assert sorted(by_step) == list(range(1, steps + 1))
    assert by_step[steps] < by_step[1] - 0.05, by_step
    assert all(r["grad_norm"] > 0 for r in records(plan_path, "step"))
