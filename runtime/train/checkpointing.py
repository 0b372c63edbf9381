"""Activation checkpointing of the decoder layers (plan.json `activation_checkpointing`: off | selective | full).

Full: each layer keeps only its input and recomputes everything in backward (Korthikanti et al. 2022 §5).
Selective, op by op as torchtitan's default for Llama-3-8B: the outputs of every matmul and of attention
are kept and only the cheap ops between them (norms, RoPE, SiLU, products, casts) are recomputed, so
backward repeats no FLOP-heavy work. `dapc.memory` counts what each keeps.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

__all__ = ["SAVED_OPS", "checkpoint_kwargs"]

_ops = torch.ops.aten
# What selective checkpointing keeps: matmuls (nn.Linear's mm and bmm) and every SDPA kernel's outputs.
SAVED_OPS = frozenset(op for op in (
    _ops.mm.default, _ops.bmm.default, _ops.addmm.default,
    getattr(_ops, "_scaled_dot_product_flash_attention", None),
    getattr(_ops, "_scaled_dot_product_efficient_attention", None),
    getattr(_ops, "_scaled_dot_product_cudnn_attention", None),
    getattr(_ops, "_scaled_dot_product_flash_attention_for_cpu", None),
) if op is not None)
_SAVED = frozenset(getattr(op, "default", op) for op in SAVED_OPS)


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(mode: str) -> dict[str, Any]:
    """Returns the keyword arguments for torch.utils.checkpoint (as transformers passes them on) for `mode`
    'selective' or 'full': non-reentrant (frozen inputs under LoRA, FSDP2), and for selective the policy."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _policy)
    return kwargs
