"""LoRA and QLoRA on the tiny example: adapters train over a frozen (4-bit for QLoRA) base and export.

LoRA over a pretrained (local) base under FSDP2 (2 processes) with merge; QLoRA (torchao NF4, quantized
while loading) in 1 process and under FSDP2 (2 processes, bf16, each rank keeping its shard of the NF4
weights), each resumed exactly from a mid-run checkpoint; LoRA under ZeRO-3, exported through DeepSpeed's
zero_to_fp32. About 1.5 minutes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.train_support import (
    compile_plan,
    generate_from_export,
    losses,
    read_plan,
    records,
    train,
)

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
LAYERS = 4


def test_lora_on_a_pretrained_base_under_fsdp2_exports_adapter_and_merged_model(prepared_dir: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = _write_random_base(tmp_path / "base")
    plan_path = compile_plan(tmp_path, prepared_dir, f"model.source={base_dir}", "model.init=pretrained",
                             "method.name=lora", "checkpoint.merge_lora=true")
    plan = read_plan(plan_path)
    train(plan_path, nproc=2)
    _assert_adapters_trained(plan_path, plan)
    export = Path(plan["paths"]["export_dir"])
    _assert_adapter_folder(export / "adapter", plan)
    assert json.loads((export / "dapc_export.json").read_text())["merged"] is True
    generate_from_export(export)  # the merged model loads as a plain Llama

    ids = torch.arange(100, 164).reshape(2, 32)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(export))(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                            str(export / "adapter"))(input_ids=ids).logits
        untrained = AutoModelForCausalLM.from_pretrained(str(base_dir))(input_ids=ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4)  # merge_lora = the base with the adapter applied
    assert not torch.allclose(merged, untrained, atol=1e-3)  # and the adapter is not a no-op


@pytest.mark.parametrize(
    ("nproc", "overrides"),
    [
        (1, ("hardware.gpus_per_node=1", "strategy=ddp")),
        (2, ("strategy=fsdp2-full", "training.precision=bf16", "model.dtype=bf16")),
    ],
    ids=["1-process", "fsdp2-2-processes"],
)
def test_qlora_trains_adapters_over_a_4bit_base(nproc: int, overrides: tuple[str, ...], prepared_dir: Path,
                                                tmp_path: Path):
    plan_path = compile_plan(tmp_path, prepared_dir, "method.name=qlora", *overrides)
    plan = read_plan(plan_path)
    assert plan["batch"]["world_size"] == nproc
    done = train(plan_path, nproc=nproc)
    keeps = "its shard" if nproc > 1 else "whole tensors"
    assert (f"quantized {LAYERS * LINEARS_PER_LAYER} Linear weights to NF4 while loading, "
            f"{2 * LAYERS * LINEARS_PER_LAYER} LoRA matrices initialized; each of {nproc} ranks keeps {keeps}"
            in done.stderr)
    _assert_adapters_trained(plan_path, plan)
    export = Path(plan["paths"]["export_dir"])
    _assert_adapter_folder(export / "adapter", plan)
    assert not (export / "model.safetensors").exists()  # merge_lora is false by default

    # Resume from step 8: adapters, optimizer, sampler and the dropout RNG come back exactly.
    first = losses(plan_path)
    shutil.rmtree(Path(plan["paths"]["checkpoint_dir"]) / "step-12")
    train(plan_path, nproc=nproc)
    assert records(plan_path, "start")[-1]["step"] == 8
    again = losses(plan_path)
    for step in range(9, 13):
        assert again[step] == pytest.approx(first[step], rel=1e-6), (step, again[step], first[step])


def test_lora_under_zero3_exports_through_zero_to_fp32(prepared_dir: Path, tmp_path: Path):
    plan_path = compile_plan(tmp_path, prepared_dir, "strategy=zero3", "method.name=lora", "checkpoint.merge_lora=true")
    plan = read_plan(plan_path)
    train(plan_path, nproc=2)
    _assert_adapters_trained(plan_path, plan)
    export = Path(plan["paths"]["export_dir"])
    _assert_adapter_folder(export / "adapter", plan)
    generate_from_export(export)


def _write_random_base(folder: Path) -> Path:
    """A 'pretrained' model to start from: the tiny Llama with its HF init, saved as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import REPO

    config = json.loads((REPO / "dapc" / "models" / "catalog" / "dapc--tiny-llama.json").read_text())
    config.pop("_source")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).save_pretrained(folder)
    return folder


def _assert_adapters_trained(plan_path: Path, plan: dict) -> None:
    (start,) = records(plan_path, "start")
    assert start["trainable_params"] == plan["method"]["trainable_params"]  # 180,224: r=16 on every Linear
    by_step = losses(plan_path)
    assert sorted(by_step) == list(range(1, 13))
    assert by_step[12] < by_step[1] - 0.1, by_step  # about 10.37 → 10.21 at this learning rate


def _assert_adapter_folder(folder: Path, plan: dict) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    lora = plan["recipe"]["method"]["lora"]
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        lora["r"], lora["alpha"], sorted(lora["target_modules"]))
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as tensors:
        names = list(tensors.keys())
    assert len(names) == 2 * LAYERS * LINEARS_PER_LAYER and all("lora_" in n for n in names)
    assert (folder / "tokenizer.json").is_file()
