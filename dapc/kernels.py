"""Which kernels the runtime runs: the cross-entropy (plan.json `loss`: plain, or chunked inside the LM head) and
whether torch.compile compiles the decoder layers (plan.json `torch_compile`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CompileDecision", "LossDecision", "decide_compile", "decide_loss"]


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


@dataclass(frozen=True)
class CompileDecision:
    """Whether the runtime compiles each decoder layer with torch.compile, and why."""

    enabled: bool
    reason: str


def decide_compile(choice: str | bool, on_cpu: bool, method: str, backend: str) -> CompileDecision:
    """Returns whether the decoder layers are compiled for recipe `training.compile` (auto | true | false).

    `auto` compiles on GPUs, each decoder layer on its own as torchtitan does (fused norms, SwiGLU and RoPE:
    fewer kernel launches and memory round trips), for full fine-tuning and LoRA under DDP and FSDP2, the
    paths the CPU tests compile end to end. It stays off for QLoRA (torchao's NF4 tensor subclass) and
    DeepSpeed (its hooks around every parameter), and on the CPU device, where compiling takes longer than
    a short run gains. The memory model counts eager activations, an upper bound for compiled layers.
    """
    if choice == "auto":
        if on_cpu:
            return CompileDecision(False, "off: auto on the CPU device (compiling costs more than it gains)")
        if method == "qlora" or backend == "deepspeed":
            what = "QLoRA's NF4 base" if method == "qlora" else "DeepSpeed's parameter hooks"
            return CompileDecision(False, f"off: auto does not compile with {what}")
        return CompileDecision(True, "on: auto on GPUs (each decoder layer compiled, as torchtitan does)")
    if choice:
        return CompileDecision(True, "on: training.compile true")
    return CompileDecision(False, "off: training.compile false")
