"""Activations against what autograd really saves: every tensor a forward pass keeps for backward,
counted once per storage, parameters excluded, on the tiny Llama built by transformers."""

from __future__ import annotations

from dataclasses import replace

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
    pure = replace(_workload(precision, b, s, checkpointing="off"), weights_dtype=precision)  # no autocast
    estimate = memory.activations_kept(pure).bytes
    # Within 1%: what is left is the embedding's saved indices and per-layer rstd (s·b·4 bytes).
    assert saved == pytest.approx(estimate, rel=0.01)


ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _saved_under_autocast(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[int, int]:
    """Bytes autograd saves under bf16 autocast: activations, and apart from them the bf16 copies of fp32 weights
    (the plan counts those with the buffers, `_autocast_weight_copy_bytes`): a saved bf16 tensor shaped like a
    Linear weight. The token count (300) matches no weight dimension, so no activation is taken for one."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    weight_shapes |= {shape[::-1] for shape in weight_shapes}
    storages: dict[int, int] = {}
    copies: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        weight_copy = tensor.dtype == torch.bfloat16 and tuple(tensor.shape) in weight_shapes
        if storage.data_ptr() not in parameters:
            (copies if weight_copy else storages)[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=input_ids)
    return sum(storages.values()), sum(copies.values())


@pytest.mark.parametrize(("method", "base_dtype", "adapter_dtype", "targets", "dropout"), [
    ("full", "fp32", "fp32", (), 0.0),  # DDP's default: fp32 weights under autocast, an fp32 residual stream
    ("lora", "bf16", "fp32", ("q_proj", "v_proj"), 0.0),
    ("lora", "bf16", "fp32", ALL_LINEARS, 0.0),  # each fp32 adapter keeps its own cast of its input
    ("lora", "bf16", "fp32", ALL_LINEARS, 0.1),
    ("lora", "bf16", "bf16", ALL_LINEARS, 0.0),  # pure bf16: adapters share the input their base reads
    ("lora", "bf16", "bf16", ("q_proj", "v_proj", "down_proj"), 0.1),
    ("lora", "fp32", "fp32", ALL_LINEARS, 0.1),  # a base loaded in fp32: the stream is fp32
])
def test_mixed_precision_inventory_matches_the_tensors_autograd_saves(method, base_dtype, adapter_dtype, targets,
                                                                       dropout):
    """Full training: exactly what autograd saves. LoRA: what autograd saves when the base's weights take part in
    autograd as trained ones do (bitsandbytes' 2024 MatMul4Bit keeps a frozen Linear's input; see
    `memory._linear_inputs_bytes_per_token`), which bounds what dapc's frozen base keeps."""
    from peft import LoraConfig, get_peft_model

    config = AutoConfig.from_pretrained(ARCH.config_path)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    b, s = 3, 100
    input_ids = torch.randint(0, config.vocab_size, (b, s))

    def build(base_in_autograd: bool) -> tuple[torch.nn.Module, int]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtypes[base_dtype])
        if method == "full":
            return model.train(), count_params(ARCH).total
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), lora_dropout=dropout)
        model = get_peft_model(model, lora, autocast_adapter_dtype=adapter_dtype == "fp32")
        trained = [p for p in model.parameters() if p.requires_grad]
        for p in trained:
            p.data = p.data.to(dtypes[adapter_dtype])
        if base_in_autograd:
            model.requires_grad_(True)
        return model.train(), sum(p.numel() for p in trained)

    model, trainable = build(base_in_autograd=True)
    saved, weight_copies = _saved_under_autocast(model, input_ids)
    workload = replace(_workload("bf16", b, s, checkpointing="off"), method=method, trainable_params=trainable,
                       model_dtype=base_dtype, weights_dtype=adapter_dtype, lora_targets=targets,
                       lora_dropout=dropout)
    estimate = memory.activations_kept(workload).bytes
    assert saved == pytest.approx(estimate, rel=0.01)
    # The weight copies to within 1% of all that is saved: the first layer's lora_A keeps its input rather than its
    # weight where that input needs no gradient (a few KiB here).
    copies_planned = memory._autocast_weight_copy_bytes(workload)
    assert abs(weight_copies - copies_planned) <= 0.01 * (saved + weight_copies)
    if method == "lora":
        frozen, frozen_copies = _saved_under_autocast(build(base_in_autograd=False)[0], input_ids)
        assert frozen_copies <= copies_planned  # a frozen fp32 weight's cast is kept by its Linear, not cached
        print(f"\ndapc's frozen base keeps {frozen / estimate:.2f} of the planned activations")
        assert frozen < estimate
