"""Pretrained weights under FSDP2: rank 0 alone reads the checkpoint; the others build on the meta device
and receive their shards from rank 0 (`set_model_state_dict(..., broadcast_from_rank0=True)`).

A tiny random Llama (the catalog's tiny config, tied embeddings, rotary buffers) is saved as a pretrained
checkpoint; 2-process FSDP2 must start from exactly its weights: the step-1 loss equals a 1-process DDP run's
(which loads the checkpoint the ordinary way) on the same global batch; so must FSDP2 LoRA (its B matrices
start at zero, so step 1 is the base's loss), whose seeded adapters also travel from rank 0. About 45 s on
2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.train_support import compile_plan, losses, train

CATALOG_CONFIG = REPO / "dapc" / "models" / "catalog" / "dapc--tiny-llama.json"


@pytest.fixture
def pretrained_dir(tmp_path: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in json.loads(CATALOG_CONFIG.read_text()).items() if not k.startswith("_")}
    config.pop("architectures", None)
    torch.manual_seed(7)  # not the recipe's seed: a random init by the trainer could not match by chance
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    assert model.config.tie_word_embeddings
    with torch.no_grad():  # far from any fresh init, so that a run which did not load it cannot match
        model.get_input_embeddings().weight.mul_(8.0)
    folder = tmp_path / "pretrained"
    model.save_pretrained(folder)
    return folder


def test_fsdp2_pretrained_loads_on_rank0_and_broadcasts(pretrained_dir: Path, prepared_dir: Path,  # noqa: F811
                                                        tmp_path: Path):
    common = (f"model.source={pretrained_dir}", "model.init=pretrained", "eval.benchmarks=[]", "training.tokens=2048")
    fsdp = compile_plan(tmp_path / "fsdp2", prepared_dir, *common, "strategy=fsdp2-full")
    ddp = compile_plan(tmp_path / "ddp", prepared_dir, *common, "hardware.gpus_per_node=1", "strategy=ddp")

    sharded = train(fsdp, nproc=2)
    assert sharded.stderr.count("loaded weights on rank 0, broadcast to 2 ranks") == 1
    single = train(ddp, nproc=1)
    assert "broadcast to" not in single.stderr  # DDP loads as before

    assert losses(fsdp)[1] == pytest.approx(losses(ddp)[1], abs=1e-5)
    assert losses(fsdp)[1] > 11.0  # a fresh init starts near ln(32000) = 10.37; the scaled embeddings do not

    lora = compile_plan(tmp_path / "lora", prepared_dir, *common, "strategy=fsdp2-full", "method.name=lora")
    adapted = train(lora, nproc=2)
    assert adapted.stderr.count("loaded weights on rank 0, broadcast to 2 ranks") == 1
    assert losses(lora)[1] == pytest.approx(losses(ddp)[1], abs=1e-5)
    assert losses(lora)[2] < losses(lora)[1]
