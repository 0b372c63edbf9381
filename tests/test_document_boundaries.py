"""Packed documents kept apart (data.document_boundaries: separate): positions restart after every EOS, attention
never crosses into another document, the plan counts the mask, and the trainer runs with it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dapc.compile import compile_recipe
from runtime.train.loss import document_positions
from tests.train_support import TINY_RECIPE, compile_plan, prepared_dir, records, train  # noqa: F401 (fixture)

EOS = 2


def test_positions_restart_on_the_token_after_each_eos():
    ids = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, 4], [EOS, 3, 3, 3, 3, EOS, EOS, 1]])
    assert document_positions(ids, EOS).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 0, 0]]


def test_a_document_packed_after_another_sees_only_itself():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=EOS,
                                         attn_implementation="sdpa", use_cache=False)).eval()
    first, second = torch.randint(3, 64, (1, 9)), torch.randint(3, 64, (1, 7))
    packed = torch.cat([first, torch.tensor([[EOS]]), second], dim=1)
    with torch.no_grad():
        alone = model(input_ids=second).logits
        apart = model(input_ids=packed, position_ids=document_positions(packed, EOS)).logits[:, 10:]
        together = model(input_ids=packed).logits[:, 10:]
    torch.testing.assert_close(apart, alone, rtol=1e-5, atol=1e-5)
    assert (together - alone).abs().max() > 1e-3  # concatenated, the second document attends to the first


def test_the_plan_counts_one_boolean_mask_per_sequence(tmp_path: Path):
    def activations(mode: str) -> int:
        plan = compile_recipe(TINY_RECIPE, overrides=(f"data.document_boundaries={mode}", "training.micro_batch=4",
                                                      "training.activation_checkpointing=off"),
                              output=str(tmp_path / mode)).plan
        assert plan.recipe.data.document_boundaries == mode
        return plan.memory.per_gpu_bytes.activations

    assert activations("separate") - activations("concatenate") == 4 * 128**2


def test_the_trainer_runs_with_documents_apart(prepared_dir: Path, tmp_path: Path):  # noqa: F811
    apart = compile_plan(tmp_path / "apart", prepared_dir, "data.document_boundaries=separate", "strategy=ddp",
                         "hardware.gpus_per_node=1", "training.max_steps=3", "checkpoint.export_hf=false",
                         "eval.benchmarks=[]")
    train(apart, 1)
    plain = compile_plan(tmp_path / "plain", prepared_dir, "strategy=ddp", "hardware.gpus_per_node=1",
                         "training.max_steps=3", "checkpoint.export_hf=false", "eval.benchmarks=[]")
    train(plain, 1)
    a, b = ([r["loss"] for r in records(p, "step")] for p in (apart, plain))
    assert len(a) == 3 and all(x == x and x < 20 for x in a)
    print(a, b)
    assert a != b  # the same batches, seen with other positions and masks
    assert json.loads(apart.read_text())["recipe"]["data"]["document_boundaries"] == "separate"
