"""The causal-LM loss, plain or chunked (plan.json `training.loss`).

Plain: transformers' ForCausalLMLoss over the whole micro-batch's logits, which it upcasts to fp32; in
backward the fp32 log-softmax and its two gradients are alive together, 12·s·b·V bytes.

Chunked (torchtune's LinearCrossEntropyLoss and torchtitan's chunked loss do the same work): the LM head
itself computes the loss, `chunk_tokens` positions at a time, each chunk under activation checkpointing, so
no chunk's logits outlive its own forward; backward recomputes one chunk's logits at a time. The extra cost
is one more LM-head matmul forward (2·h·V FLOPs per token). The loss is the same mean over the same
targets, summed in chunks.

The head is swapped in by class (its parameters, their names and FSDP/DeepSpeed units are unchanged) and
returns the loss as the model's `logits`: the loss is computed inside the model's forward, where FSDP2 and
ZeRO-3 have gathered the head's weight, and recomputed where their backward hooks gather it again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ChunkedLossHead", "causal_lm_loss", "chunked_loss_head", "install_chunked_loss"]

IGNORE_INDEX = -100  # what transformers pads shifted labels with


class ChunkedLossHead(nn.Linear):
    """An LM head (nn.Linear, bias-free or not) whose forward returns the mean next-token loss of the targets
    set by `causal_lm_loss`, computed `chunk_tokens` positions at a time."""

    chunk_tokens: int
    targets: torch.Tensor | None = None
    per_row: bool = False  # set with the targets: return each row's summed target log-probability instead

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # noqa: D102 (nn.Module API)
        targets, self.targets = self.targets, None
        per_row, self.per_row = self.per_row, False
        if targets is None:
            raise RuntimeError("ChunkedLossHead called without targets (use runtime.train.loss.causal_lm_loss)")
        flat = hidden.reshape(-1, hidden.shape[-1])
        target = targets.reshape(-1)
        if per_row:
            rows = torch.arange(flat.shape[0], device=flat.device) // targets.shape[1]
            sums = hidden.new_zeros(targets.shape[0], dtype=torch.float32)
            for start in range(0, flat.shape[0], self.chunk_tokens):
                end = start + self.chunk_tokens
                sums = sums + checkpoint(self._chunk_row_logps, flat[start:end], target[start:end], rows[start:end],
                                         targets.shape[0], use_reentrant=False)
            return sums
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, flat.shape[0], self.chunk_tokens):
            end = start + self.chunk_tokens
            total = total + checkpoint(self._chunk_loss_sum, flat[start:end], target[start:end], use_reentrant=False)
        return total / (target != IGNORE_INDEX).sum().clamp(min=1)

    def _chunk_row_logps(self, hidden: torch.Tensor, target: torch.Tensor, rows: torch.Tensor,
                         num_rows: int) -> torch.Tensor:
        logits = F.linear(hidden, self.weight, self.bias).float()
        token = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
        return torch.zeros(num_rows, dtype=torch.float32, device=hidden.device).index_add(0, rows, -token)

    def _chunk_loss_sum(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight, self.bias).float()
        return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")


def install_chunked_loss(model: nn.Module, chunk_tokens: int) -> ChunkedLossHead:
    """Turns the model's output embedding (its LM head) into a ChunkedLossHead of `chunk_tokens` positions per
    chunk, in place; returns it. Call before wrapping the model (peft, FSDP2, DeepSpeed)."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise TypeError(f"chunked loss needs an nn.Linear LM head, found {type(head).__name__}")
    head.__class__ = ChunkedLossHead
    head.chunk_tokens = chunk_tokens
    return head


def chunked_loss_head(model: nn.Module) -> ChunkedLossHead | None:
    """Returns the model's ChunkedLossHead (through any wrapping: peft, FSDP2, DDP, DeepSpeed), or None."""
    return next((m for m in model.modules() if isinstance(m, ChunkedLossHead)), None)


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, head: ChunkedLossHead | None,
                   position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the mean next-token cross-entropy (fp32 scalar) of `input_ids` under `model` (plain, or chunked
    by `head` when the model's head is one). With `position_ids` that restart per packed document, transformers
    blocks attention across documents (its packed-sequence mask).

    `labels` (sft): input_ids with IGNORE_INDEX where a token is no target; position t is scored on label t + 1,
    and the loss is the mean over the targets counted (0, not NaN, for a micro-batch without any). None: every
    next token (labels = input_ids)."""
    labels = input_ids if labels is None else labels
    if head is None:
        if labels is input_ids:
            return model(input_ids=input_ids, labels=labels, position_ids=position_ids).loss
        counted = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        return model(input_ids=input_ids, labels=labels, position_ids=position_ids, num_items_in_batch=counted).loss
    head.targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts token t + 1
    return model(input_ids=input_ids, position_ids=position_ids).logits


def document_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Returns position ids [b, s] that restart at 0 on the token after every EOS (a new packed document)."""
    b, s = input_ids.shape
    index = torch.arange(s, device=input_ids.device).expand(b, s)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_token_id
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first
