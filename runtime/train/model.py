"""Build the model a plan names: the base (random or pretrained, optionally 4-bit), then LoRA, then AC.

Dtypes: trained weights are built in the plan's `loading.trained_dtype` (fp32 as the master copy, or bf16 for
pure bf16 training) under FSDP2 and DDP, and in fp32 under DeepSpeed, which casts to its configured
precision and keeps its own fp32 master. The frozen base of LoRA/QLoRA is loaded in the plan's
`loading.base_dtype` (the FSDP2 param dtype under FSDP2, so that one all-gather dtype serves the layer).

Pretrained weights under FSDP2 (full and LoRA): only global rank 0 reads the checkpoint, into a full CPU
copy (with the LoRA adapters, seeded as always); every rank builds the model to train on the meta device.
The engine shards it, materializes it with `to_empty` and loads rank 0's state dict through
`set_model_state_dict(..., broadcast_from_rank0=True)`; non-persistent buffers (rotary `inv_freq`), which no
state dict holds, are broadcast from rank 0's copy.

QLoRA, every backend: the model is built on the meta device with NF4 placeholders for the decoder Linear
weights, LoRA goes on, and the base is read from safetensors one tensor at a time and quantized while
loading (`runtime/train/nf4.py`). Under FSDP2 the engine shards first and each rank keeps only its shard
(`loads_sharded_nf4`); elsewhere each rank loads the whole base here. A random base is first written by
every rank to a scratch folder of its own (the same seeded values everywhere), so that both inits take the
same loader.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PlanError, TrainPlan
from .checkpointing import checkpoint_kwargs
from .loss import install_chunked_loss

__all__ = ["DTYPES", "PENDING_LOAD", "QuantizedBase", "RankZeroWeights", "base_model", "base_skeleton", "build_model",
           "compute_dtype", "decoder_layers", "hf_config", "loads_from_rank0", "loads_sharded_nf4",
           "non_persistent_buffers"]

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
    pending: RankZeroWeights | QuantizedBase | None = None
    if plan.method == "qlora":
        model, pending = _quantized_base(plan)
    elif loads_from_rank0(plan):
        dtype = _trained_dtype(plan) if plan.method == "full" else _base_dtype(plan)
        pending = _rank0_weights(plan, dtype)
        model = _meta_base(plan, dtype)
    else:
        dtype = _trained_dtype(plan) if plan.method == "full" else _base_dtype(plan)
        with _zero3_init(plan):
            model = _base(plan, dtype)
        if plan.load_mode != "zero3-init":
            model = model.to(device)
    model.config.use_cache = False
    if plan.loss_chunk_tokens:
        install_chunked_loss(model, plan.loss_chunk_tokens)
    if plan.activation_checkpointing != "off":
        # Every decoder layer, non-reentrant (works with frozen inputs under LoRA, and with FSDP2), applied
        # before sharding. transformers 5 renamed gradient_checkpointing_enable; both take the same kwargs.
        kwargs = checkpoint_kwargs(plan.activation_checkpointing)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # Every k-th layer (0, k, 2k, ...) under full checkpointing; transformers reads the flag per layer.
        for index, layer in enumerate(decoder_layers(model)):
            layer.gradient_checkpointing = index % plan.checkpoint_every_layers == 0
    if plan.compile_layers:
        # In place (nn.Module.compile), so parameter names, FSDP2 units and checkpoints stay as in eager mode;
        # each layer is traced at its first call, after LoRA and sharding have replaced what they replace.
        for layer in decoder_layers(model):
            layer.compile()
    if plan.method in ("lora", "qlora"):
        model = _with_lora(plan, model)
        _cast_trainable(model, _trained_dtype(plan))
    if isinstance(pending, QuantizedBase) and not loads_sharded_nf4(plan):
        pending.load(model, device)  # whole tensors on every rank
        pending = None
    if pending is not None:
        model.__dict__[PENDING_LOAD] = pending  # plain attribute: no nn.Module registration, no peft forwarding
    return model.train()  # from_pretrained returns eval mode: no dropout


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
    return DTYPES[plan.base_dtype]  # the compiler's choice (plan.json loading.base_dtype)


def _trained_dtype(plan: TrainPlan) -> torch.dtype:
    """The dtype trained parameters are built in: the plan's `loading.trained_dtype` (fp32, or bf16 for pure
    bf16 training) under DDP and FSDP2; fp32 under DeepSpeed, which casts them itself and keeps the fp32 master."""
    return torch.float32 if plan.backend == "deepspeed" else DTYPES[plan.trained_dtype]


def _cast_trainable(model: nn.Module, dtype: torch.dtype) -> None:
    # peft creates adapters in fp32 (autocast_adapter_dtype); pure bf16 training keeps them in bf16.
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _base(plan: TrainPlan, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if plan.model_init == "random":
        return AutoModelForCausalLM.from_config(hf_config(plan), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(plan.model_source, dtype=dtype)


def loads_sharded_nf4(plan: TrainPlan) -> bool:
    """QLoRA under FSDP2: the engine shards the meta model first, then every rank reads and quantizes the base
    tensor by tensor and keeps its own shard (`QuantizedBase.load`). Other QLoRA runs load whole tensors."""
    return plan.load_mode == "meta-sharded-quantize"


def loads_from_rank0(plan: TrainPlan) -> bool:
    """Pretrained FSDP2 full/LoRA: the model is built on the meta device and gets rank 0's weights after
    sharding (see the module docstring). QLoRA, DDP, DeepSpeed and random init build it as before."""
    return plan.load_mode == "rank0-broadcast"


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


def base_skeleton(plan: TrainPlan) -> nn.Module:
    """The base's structure on the meta device, no weights: what an adapter-only export names adapters by."""
    return _meta_base(plan, torch.float32 if plan.method == "full" else _base_dtype(plan))


def _meta_base(plan: TrainPlan, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = hf_config(plan)  # the config the compiler read (the checkpoint's own): the same structure
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied embeddings share one (meta) parameter, so they stay tied through to_empty
    return model


@contextlib.contextmanager
def _zero3_init(plan: TrainPlan):
    """Under ZeRO-3, build inside `deepspeed.zero.Init` (through transformers' HfDeepSpeedConfig): each
    parameter is partitioned as it is created, so no rank ever holds the whole model."""
    if plan.load_mode != "zero3-init":
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(plan.deepspeed)  # transformers reads it through a weak reference
    try:
        yield
    finally:
        del keep_alive


class QuantizedBase:
    """A QLoRA base still to load: its safetensors folder, the checkpoint name of every base module (taken
    before LoRA and FSDP2 wrap them), and the adapters' seed. `scratch`: the folder is ours to delete."""

    def __init__(self, folder: Path, names: dict[nn.Module, str], adapter_seed: int, scratch: bool):
        self.folder, self.names, self.adapter_seed, self.scratch = folder, names, adapter_seed, scratch

    def load(self, model: nn.Module, device: torch.device) -> None:
        """Fills `model`'s meta parameters (whole, or the FSDP2 shards they stand for) on `device`."""
        import torch.distributed as dist

        from .nf4 import load_base, safetensors_index

        try:
            counts = load_base(model, self.names, safetensors_index(self.folder), device, self.adapter_seed)
        finally:
            if self.scratch:
                shutil.rmtree(self.folder, ignore_errors=True)
        for module in model.modules():  # built real on the CPU; FSDP2 has moved them already
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device != device:
                    module._buffers[name] = buffer.to(device)
        self.names.clear()
        if not dist.is_initialized() or dist.get_rank() == 0:
            ranks = dist.get_world_size() if dist.is_initialized() else 1
            keeps = "its shard" if any(hasattr(p, "placements") for p in model.parameters()) else "whole tensors"
            print(f"QLoRA base: read {counts['tensors']} tensors from safetensors, quantized {counts['quantized']} "
                  f"Linear weights to NF4 while loading, {counts['adapters']} LoRA matrices initialized; each of "
                  f"{ranks} ranks keeps {keeps}", file=sys.stderr, flush=True)


def _quantized_base(plan: TrainPlan) -> tuple[nn.Module, QuantizedBase]:
    """The model on the meta device (buffers real), decoder Linear weights as frozen NF4 placeholders."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .nf4 import to_nf4_placeholders

    if plan.quant_type != "nf4" or not plan.double_quant:
        raise PlanError(f"recipe.method: quant_type {plan.quant_type} with double_quant "
                        f"{str(plan.double_quant).lower()}: this runtime's QLoRA stores NF4 with double-quantized "
                        "constants only (torchao NF4Tensor); set quant_type nf4 and double_quant true", plan.path)
    dtype = _base_dtype(plan)
    folder, scratch = _safetensors_folder(plan, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config(plan), dtype=dtype)
    model.tie_weights()  # tied embeddings share one (meta) parameter, loaded once
    to_nf4_placeholders(decoder_layers(model), dtype)
    names = {module: name for name, module in model.named_modules()}
    return model, QuantizedBase(folder, names, plan.seed + 1, scratch)


def _safetensors_folder(plan: TrainPlan, dtype: torch.dtype) -> tuple[Path, bool]:
    """Where the base's safetensors are: the pretrained folder (or its hub snapshot), or for a random init a
    scratch folder this rank writes the seeded model to (identical on every rank, as `base_model` rebuilds it)."""
    if plan.model_init == "pretrained":
        if os.path.isdir(plan.model_source):
            return Path(plan.model_source), False
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(plan.model_source, allow_patterns=["*.json", "*.safetensors"])), False
    from safetensors.torch import save_model

    scratch = Path(tempfile.mkdtemp(prefix="dapc-qlora-base-"))
    base = _base(plan, dtype)
    base.config.to_json_file(str(scratch / "config.json"))
    save_model(base, str(scratch / "model.safetensors"), metadata={"format": "pt"})
    del base
    return scratch, True


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
