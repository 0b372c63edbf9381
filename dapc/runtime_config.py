"""The backend settings the runtime applies: the FSDP2 section and the DeepSpeed config, from a decision."""

from __future__ import annotations

from typing import Any

from dapc.dtypes import TORCH_DTYPE_NAMES
from dapc.memory import separate_embedding_units
from dapc.planner import Candidate
from dapc.resolve import Spec


def fsdp_section(spec: Spec, chosen: Candidate) -> dict[str, Any] | None:
    """Returns how the runtime calls `fully_shard`, or None for a non-FSDP2 strategy."""
    s = chosen.strategy
    if s.backend != "fsdp2":
        return None
    gpus = spec.recipe.hardware.gpus_per_node
    return {
        "mesh": [spec.world_size // gpus, gpus] if s.hybrid else [spec.world_size],
        "mesh_dims": ["replicate", "shard"] if s.hybrid else ["shard"],
        "reshard_after_forward": True,
        "param_dtype": TORCH_DTYPE_NAMES[spec.recipe.training.precision],
        "reduce_dtype": "float32",
        "cpu_offload": s.params_on == "cpu",
        # Embedding and head as units of their own, resharded after use (dapc.memory counts this).
        "separate_embedding_units": separate_embedding_units(spec.params, spec.recipe.training.fsdp_embedding_units),
        # Reduce-scatter every micro-batch: skipping the sync would accumulate *unsharded* gradients of
        # every layer across micro-batches (FSDP2 set_requires_gradient_sync), N·c bytes per rank.
        "sync_every_micro_batch": True,
    }


def deepspeed_config(spec: Spec, chosen: Candidate) -> dict[str, Any] | None:
    """Returns the DeepSpeed config (what ds_config.json holds), or None for a non-DeepSpeed strategy.

    Bucket sizes follow the values transformers' `auto` fills in from the hidden size h
    (reduce_bucket_size = h², stage3_prefetch_bucket_size = 0.9·h², persistence threshold 10·h);
    the memory model's buffers assume exactly these.
    """
    s = chosen.strategy
    if s.backend != "deepspeed":
        return None
    r, h = spec.recipe, spec.arch.hidden_size
    zero: dict[str, Any] = {
        "stage": s.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": h * h,
    }
    if s.zero_stage < 3:
        zero["allgather_bucket_size"] = h * h
    else:
        zero.update({
            "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    nvme = {"device": "nvme", "nvme_path": r.hardware.nvme_path, "pin_memory": True}
    if s.optimizer_on == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    elif s.optimizer_on == "nvme":
        zero["offload_optimizer"] = nvme
    if s.params_on == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    elif s.params_on == "nvme":
        zero["offload_param"] = nvme
    offloading = s.optimizer_on != "gpu"
    return {
        "train_batch_size": spec.global_batch_sequences,
        "train_micro_batch_size_per_gpu": chosen.micro_batch,
        "gradient_accumulation_steps": chosen.grad_accum,
        "gradient_clipping": r.training.grad_clip or 0.0,
        "bf16": {"enabled": r.training.precision == "bf16"},
        "fp16": {"enabled": r.training.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        # The runtime passes its own torch AdamW; DeepSpeed's CPU Adam is only needed when offloading.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": offloading,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
