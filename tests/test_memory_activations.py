"""Activations against what autograd really saves: every tensor a forward pass keeps for backward,
counted once per storage, parameters excluded, on the tiny Llama built by transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dapc import memory
from dapc.memory import Workload
from dapc.models import count_params, load_architecture
from dapc.strategies import STRATEGIES

ARCH = load_architecture("dapc/tiny-llama")


def _workload(precision: str, micro_batch: int, seq_len: int, checkpointing: str) -> Workload:
    params = count_params(ARCH)
    return Workload(arch=ARCH, params=params, method="full", trainable_params=params.total, precision=precision,
                    optimizer="adamw", strategy=STRATEGIES["ddp"], world_size=1, gpus_per_node=1, nodes=1,
                    micro_batch=micro_batch, seq_len=seq_len, activation_checkpointing=checkpointing,
                    lora_dropout=0.0, lora_targets=(), nf4_double_quant=True, on_cpu=True)


def _saved_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids)
    return sum(storages.values())


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_activation_inventory_matches_the_tensors_autograd_saves(dtype, precision):
    config = AutoConfig.from_pretrained(ARCH.config_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)
    b, s = 4, 128
    saved = _saved_bytes(model, torch.randint(0, config.vocab_size, (b, s)))
    estimate = memory.activations_kept(_workload(precision, b, s, checkpointing="off")).bytes
    # Within 1%: what is left is the embedding's saved indices and per-layer rstd (s·b·4 bytes).
    assert saved == pytest.approx(estimate, rel=0.01)
