"""FSDP2 as the plan lays it out: embedding and head as units of their own, gradients reduce-scattered every
micro-batch, and pure bf16 training (trained weights and AdamW states in bf16), on an untied tiny Llama.

2 processes under torchrun with gloo, 4 steps of 2 micro-batches each. The unit layout changes when
parameters are gathered, not the arithmetic: both layouts give the same losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.train_support import compile_plan, losses, read_plan, records, train

SHORT = ("checkpoint.export_hf=false", "training.tokens=8192", "training.global_batch_sequences=16",
         "training.micro_batch=4")  # 4 steps, grad_accum 2 on 2 ranks


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory) -> Path:
    config = json.loads((REPO / "dapc" / "models" / "catalog" / "dapc--tiny-llama.json").read_text())
    config.update(tie_word_embeddings=False, _source="the tiny Llama with its own LM head")
    folder = tmp_path_factory.mktemp("untied")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_separate_embedding_units_follow_the_root_layouts_losses(prepared_dir: Path, tmp_path: Path, untied_model):
    runs = {}
    for units in ("separate", "root"):
        plan_path = compile_plan(tmp_path / units, prepared_dir, *SHORT, f"model.source={untied_model}",
                                 f"training.fsdp_embedding_units={units}")
        fsdp = read_plan(plan_path)["runtime"]["fsdp"]
        assert fsdp["separate_embedding_units"] is (units == "separate") and fsdp["sync_every_micro_batch"]
        assert read_plan(plan_path)["batch"]["grad_accum"] == 2
        train(plan_path, nproc=2)
        runs[units] = losses(plan_path)
    assert sorted(runs["separate"]) == [1, 2, 3, 4]
    for step, loss in runs["root"].items():
        assert runs["separate"][step] == pytest.approx(loss, rel=1e-6)


def test_pure_bf16_training_keeps_bf16_weights_and_the_planned_memory(prepared_dir: Path, tmp_path: Path,
                                                                     untied_model):
    plan_path = compile_plan(tmp_path, prepared_dir, *SHORT, f"model.source={untied_model}",
                             "training.precision=bf16", "training.weights_dtype=bf16")
    plan = read_plan(plan_path)
    assert plan["loading"]["trained_dtype"] == "bf16"
    assert plan["memory"]["formulas"]["optimizer"].startswith("N_t·(4 (bf16 m, v))")
    train(plan_path, nproc=2)
    steps = losses(plan_path)
    assert steps[4] < steps[1]
    memory = records(plan_path, "memory")[0]
    assert 0.85 <= memory["ratio"] <= 1.15, memory
