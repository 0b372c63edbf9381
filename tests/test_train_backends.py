"""The tiny example end to end under each sharding backend, 2 processes under torchrun (gloo, CPU).

For FSDP2, ZeRO-2 and ZeRO-3: the loss falls, keep-last prunes, the export loads with
`AutoModelForCausalLM` and generates, and its weights are the trained ones; then the last checkpoint is
removed and the relaunch resumes from the one before with the same losses (DCP and DeepSpeed checkpoints
restore model, optimizer, sampler and RNG exactly). About 1.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from runtime.checkpoint import complete_checkpoints
from tests.train_support import (
    compile_plan,
    generate_from_export,
    losses,
    read_plan,
    records,
    train,
)

STEPS = 12  # the tiny example: 12 steps of 8 × 128 tokens, checkpoints every 4, keep the last 2


@pytest.mark.parametrize("strategy", ["fsdp2-full", "zero2", "zero3"])
def test_tiny_example_trains_exports_and_resumes_exactly(strategy: str, prepared_dir: Path, tmp_path: Path):
    plan_path = compile_plan(tmp_path, prepared_dir, f"strategy={strategy}")
    plan = read_plan(plan_path)
    assert plan["strategy"]["name"] == strategy and plan["batch"]["world_size"] == 2
    train(plan_path, nproc=2)

    first = losses(plan_path)
    assert sorted(first) == list(range(1, STEPS + 1))
    assert first[STEPS] < first[1] - 0.5, first  # 10.37 → about 9.45 on this corpus
    (start,) = records(plan_path, "start")
    assert (start["step"], start["resumed_from"], start["strategy"]) == (0, None, strategy)
    assert start["trainable_params"] == plan["method"]["trainable_params"]
    checkpoints = Path(plan["paths"]["checkpoint_dir"])
    assert [step for step, _ in complete_checkpoints(checkpoints)] == [8, 12]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-12", "step-8"]  # no partial or trash left
    meta = json.loads((checkpoints / "step-12" / "meta.json").read_text())
    assert (meta["plan_sha256"], meta["step"], meta["backend"]) == (plan["plan_sha256"], 12, plan["runtime"]["backend"])

    export = Path(plan["paths"]["export_dir"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in export.iterdir()}
    generate_from_export(export)
    assert _export_loss(export, prepared_dir) < first[1] - 0.5  # the trained weights, not the random init

    shutil.rmtree(checkpoints / "step-12")
    train(plan_path, nproc=2)
    again = losses(plan_path)  # steps 9-12 now hold the resumed run's records
    resumed = records(plan_path, "start")[-1]
    assert (resumed["step"], Path(resumed["resumed_from"]).name) == (8, "step-8")
    for step in range(9, STEPS + 1):
        assert again[step] == pytest.approx(first[step], rel=1e-6), (step, again[step], first[step])


def _export_loss(export: Path, prepared: Path) -> float:
    from transformers import AutoModelForCausalLM

    from runtime.data import PackedDataset

    model = AutoModelForCausalLM.from_pretrained(str(export))
    batch = PackedDataset(prepared, split="validation").batch(range(8))
    with torch.no_grad():
        return float(model(input_ids=batch, labels=batch).loss)
