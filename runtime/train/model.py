"""Build the model a plan names: the base (random or pretrained, optionally 4-bit), then LoRA, then AC.

Dtypes: trained weights are fp32 (FSDP2 and DDP keep them as the master copy; DeepSpeed casts to its
configured precision and keeps its own fp32 master). The frozen base of LoRA/QLoRA is loaded in
`recipe.model.dtype`; under FSDP2 it is loaded in the FSDP param dtype so that one all-gather dtype serves
the layer. QLoRA stores its 4-bit weights in that same dtype (`bnb_4bit_quant_storage`) so that
`fully_shard` can shard them like any other parameter.

Pretrained weights under FSDP2 (full and LoRA): only global rank 0 reads the checkpoint, into a full CPU
copy (with the LoRA adapters, seeded as always); every rank builds the model to train on the meta device.
The engine shards it, materializes it with `to_empty` and loads rank 0's state dict through
`set_model_state_dict(..., broadcast_from_rank0=True)`; non-persistent buffers (rotary `inv_freq`), which no
state dict holds, are broadcast from rank 0's copy. QLoRA still loads the whole checkpoint on every rank
(bitsandbytes quantizes while loading).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

import torch
from torch import nn

from .config import TrainPlan

__all__ = ["DTYPES", "PENDING_LOAD", "RankZeroWeights", "base_model", "build_model", "compute_dtype",
           "decoder_layers", "hf_config", "loads_from_rank0", "non_persistent_buffers"]

PENDING_LOAD = "_dapc_rank0_weights"  # attribute on a meta-built model: the weights the engine still loads

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(plan: TrainPlan) -> torch.dtype:
    return DTYPES[plan.precision]


def hf_config(plan: TrainPlan) -> Any:
    """The model's `PretrainedConfig` from the plan's `model.config` (no file or hub lookup)."""
    from transformers import AutoConfig

    config = dict(plan.model_config)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def build_model(plan: TrainPlan, device: torch.device) -> nn.Module:
    """The model to train, on `device`, before any parallel wrapping. Seeded by `recipe.training.seed`."""
    torch.manual_seed(plan.seed)
    pending = None
    if plan.method == "qlora":
        model = _quantized_base(plan, device)
    elif loads_from_rank0(plan):
        dtype = torch.float32 if plan.method == "full" else _base_dtype(plan)
        pending = _rank0_weights(plan, dtype)
        model = _meta_base(plan, dtype)
    else:
        dtype = torch.float32 if plan.method == "full" else _base_dtype(plan)
        with _zero3_init(plan):
            model = _base(plan, dtype)
        if plan.backend != "deepspeed" or not _is_zero3(plan):
            model = model.to(device)
    model.config.use_cache = False
    if plan.activation_checkpointing:
        # Every decoder layer, non-reentrant (works with frozen inputs under LoRA, and with FSDP2), applied
        # before sharding. transformers 5 renamed gradient_checkpointing_enable; both take the same kwargs.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if plan.method in ("lora", "qlora"):
        model = _with_lora(plan, model)
    if pending is not None:
        model.__dict__[PENDING_LOAD] = pending  # plain attribute: no nn.Module registration, no peft forwarding
    # from_pretrained returns eval mode: no dropout, and bitsandbytes would switch its 4-bit weights to an
    # inference-only CPU layout (absmax rounded to bf16) on the first forward without gradients.
    return model.train()


def base_model(plan: TrainPlan) -> nn.Module:
    """The base as training built it (same seed, dtype and values) but never quantized, on the CPU: what an
    export loads the trained tensors into, and what LoRA adapters merge into."""
    torch.manual_seed(plan.seed)
    return _base(plan, torch.float32 if plan.method == "full" else _base_dtype(plan))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules whose class the HF model lists in `_no_split_modules`."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError(f"{type(model).__name__} declares no _no_split_modules; cannot find its decoder layers")
    return layers


def _base_dtype(plan: TrainPlan) -> torch.dtype:
    if plan.fsdp is not None:
        return DTYPES[plan.fsdp.param_dtype]
    return DTYPES[plan.model_dtype]


def _base(plan: TrainPlan, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if plan.model_init == "random":
        return AutoModelForCausalLM.from_config(hf_config(plan), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(plan.model_source, dtype=dtype)


def loads_from_rank0(plan: TrainPlan) -> bool:
    """Pretrained FSDP2 full/LoRA: the model is built on the meta device and gets rank 0's weights after
    sharding (see the module docstring). QLoRA, DDP, DeepSpeed and random init build it as before."""
    return plan.backend == "fsdp2" and plan.model_init == "pretrained" and plan.method in ("full", "lora")


class RankZeroWeights:
    """What rank 0 read (the full state dict and the non-persistent buffers, on the CPU); empty elsewhere."""

    def __init__(self, state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]):
        self.state, self.buffers = state, buffers


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    found = {}
    for prefix, module in model.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            buffer = module._buffers.get(name)
            if buffer is not None:
                found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def _rank0_weights(plan: TrainPlan, dtype: torch.dtype) -> RankZeroWeights:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return RankZeroWeights({}, {})
    with torch.random.fork_rng(devices=[]):  # the RNG stream stays the same on every rank
        reference = _base(plan, dtype)
        if plan.method == "lora":
            reference = _with_lora(plan, reference)  # the adapters' seeded init travels with the base
    weights = RankZeroWeights(reference.state_dict(), {k: v.detach().clone() for k, v in
                                                       non_persistent_buffers(reference).items()})
    del reference
    return weights


def _meta_base(plan: TrainPlan, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(plan.model_source)  # the checkpoint's own config: same structure
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied embeddings share one (meta) parameter, so they stay tied through to_empty
    return model


def _is_zero3(plan: TrainPlan) -> bool:
    return plan.deepspeed is not None and plan.deepspeed.get("zero_optimization", {}).get("stage") == 3


@contextlib.contextmanager
def _zero3_init(plan: TrainPlan):
    """Under ZeRO-3, build inside `deepspeed.zero.Init` (through transformers' HfDeepSpeedConfig): each
    parameter is partitioned as it is created, so no rank ever holds the whole model."""
    if not _is_zero3(plan):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(plan.deepspeed)  # transformers reads it through a weak reference
    try:
        yield
    finally:
        del keep_alive


def _quantized_base(plan: TrainPlan, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = _base_dtype(plan)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=plan.quant_type,
        bnb_4bit_use_double_quant=plan.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(plan),
        bnb_4bit_quant_storage=dtype if plan.fsdp is not None else torch.uint8,
    )
    load = {"quantization_config": quant, "dtype": dtype, "device_map": {"": device}}
    if plan.model_init == "pretrained":
        return AutoModelForCausalLM.from_pretrained(plan.model_source, **load)
    # bitsandbytes quantizes while loading a checkpoint: write the seeded random model to a scratch folder,
    # one per rank (not `save_pretrained`, which writes on rank 0 only once a process group exists).
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="dapc-qlora-base-") as scratch:
        base = _base(plan, dtype)
        base.config.to_json_file(os.path.join(scratch, "config.json"))
        save_model(base, os.path.join(scratch, "model.safetensors"), metadata={"format": "pt"})
        del base
        return AutoModelForCausalLM.from_pretrained(scratch, **load)


def _with_lora(plan: TrainPlan, model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=plan.lora.r,
        lora_alpha=plan.lora.alpha,
        lora_dropout=plan.lora.dropout,
        target_modules=list(plan.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(plan.seed + 1)  # adapter init independent of how many draws the base took
    return get_peft_model(model, config)
