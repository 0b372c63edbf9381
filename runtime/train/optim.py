"""AdamW (torch, or bitsandbytes 8-bit) over two parameter groups, and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dapc.schedule import lr_at as schedule_lr_at

from .config import TrainPlan

__all__ = ["build_optimizer", "fused_adamw", "lr_at", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable matrices decay; vectors (norms, biases) do not. ZeRO-3 placeholders report `ds_shape`."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            shape = getattr(param, "ds_shape", param.shape)
            (decay if len(shape) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(plan: TrainPlan, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW as the plan names it. Where DeepSpeed offloads optimizer states to the CPU it steps them there with
    its own DeepSpeedCPUAdam (a C++ op built on first use), which the plan's `zero_force_ds_cpu_optimizer` asks for.
    Under DDP and FSDP2 torch's AdamW is the fused one (`fused_adamw`)."""
    settings = {"lr": plan.lr, "betas": (plan.adam_beta1, plan.adam_beta2), "eps": plan.adam_eps}
    if plan.deepspeed is not None and plan.deepspeed.get("zero_force_ds_cpu_optimizer"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **settings)
    if plan.optimizer == "adamw-8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **settings)
    if plan.backend == "deepspeed":
        return torch.optim.AdamW(groups, **settings)  # ZeRO steps it over its own flat partitions: left as is
    return torch.optim.AdamW(groups, fused=fused_adamw(groups), **settings)


def fused_adamw(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused AdamW can step these parameters: floating point, on the CPU or a CUDA device. It
    updates each tensor in one kernel, where the default on the CPU is about ten per tensor, each a pass over
    it; its results equal the default's to within one float32 rounding."""
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def lr_at(plan: TrainPlan, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based), from the plan's schedule (`dapc.schedule.lr_at`, the
    function whose key points `dapc plan` prints)."""
    return schedule_lr_at(plan.lr_schedule, step)
