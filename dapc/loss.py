"""How the runtime computes the cross-entropy (plan.json `loss`): plain, or chunked inside the LM head."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LossDecision", "decide_loss"]


@dataclass(frozen=True)
class LossDecision:
    """`chunk_tokens` positions per chunk, 0 for the plain loss over the whole micro-batch, and why."""

    chunk_tokens: int
    reason: str

    @property
    def kind(self) -> str:
        """'chunked' or 'plain'."""
        return "chunked" if self.chunk_tokens else "plain"


def decide_loss(choice: str | bool, chunk_tokens: int, on_cpu: bool) -> LossDecision:
    """Returns the loss the runtime computes for recipe `training.chunked_loss` (auto | true | false) and
    `training.loss_chunk_tokens`.

    `auto` chunks on GPUs, as torchtune and torchtitan do by default: the plain loss's fp32 log-softmax and
    its gradients (12·s·b·V bytes, 23.5 GiB for Llama-3.1-8B at 8192 × 2) become 12·chunk·V, for one more
    LM-head forward (2·h·V FLOPs per token, about 2% of an 8B model's step). On the CPU device memory is
    rarely the limit and the extra matmul is measured time (bench/train_throughput.py), so `auto` is plain.
    """
    if choice == "auto":
        if on_cpu:
            return LossDecision(0, "plain: auto on the CPU device (memory is not the limit; chunking costs a "
                                   "second LM-head forward)")
        return LossDecision(chunk_tokens, f"chunked by {chunk_tokens} positions: auto on GPUs (the whole "
                                          "micro-batch's fp32 logits never exist)")
    if choice:
        return LossDecision(chunk_tokens, f"chunked by {chunk_tokens} positions: training.chunked_loss true")
    return LossDecision(0, "plain: training.chunked_loss false")
