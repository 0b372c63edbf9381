"""Preference optimization (plan.json `objective.preference`): DPO's sigmoid loss and ORPO, on pairs that
`prepare` laid out as two sequences each (layout "pairs": chosen at 2i, rejected at 2i + 1).

A micro-batch of b pairs goes through the model as one batch of 2b sequences, the b chosen first (as TRL's
concatenated forward): one forward and one backward per micro-batch. A sequence's score is the sum of its
target tokens' log-probabilities (the response and the EOS after it; `labels` holds IGNORE_INDEX elsewhere),
read from the plain logits or, where the plan chunks the loss, from the chunked head row by row.

DPO (Rafailov et al. 2023, eq. 7; label smoothing as conservative DPO, TRL's `sigmoid` loss):
    z = β·((log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)))
    loss = −(1 − ε)·log σ(z) − ε·log σ(−z), averaged over the pairs
The reference scores come from the base with LoRA's adapters disabled (no copy), or from a frozen copy of the
starting model built and sharded like the policy (full training); they are computed under no_grad before the
policy's forward, so nothing of theirs is alive at the step's peak. Or they were scored once before step 1 by the
starting model and are looked up (`reference_logps.py`, reference precomputed).

ORPO (Hong et al. 2024, eq. 6-7), reference-free, on the mean log-probability per target token p̄:
    log odds(y) = p̄(y) − log(1 − exp(p̄(y)))
    loss = NLL of the chosen responses' tokens − λ·mean(log σ(log odds(c) − log odds(r)))

Logged per step (mean over the step's pairs and ranks, as TRL names them): rewards/chosen and rewards/rejected
(β·(log π − log π_ref), ORPO: β·p̄), rewards/margin, rewards/accuracy (the share of pairs scored the right way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import PreferenceSettings
from .loss import IGNORE_INDEX, ChunkedLossHead

__all__ = ["PreferenceLoss", "STAT_NAMES", "adapters_off", "dpo_loss", "orpo_loss", "sequence_logps"]

STAT_NAMES = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   head: ChunkedLossHead | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (the summed log-probability of each row's targets, fp32 [rows]; the targets counted per row
    [rows]). Position t is scored on label t + 1. With the chunked `head`, no row's whole logits exist."""
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts token t + 1
    counts = (target != IGNORE_INDEX).sum(dim=1)
    if head is not None:
        head.targets, head.per_row = target, True
        return model(input_ids=input_ids).logits, counts
    logits = model(input_ids=input_ids).logits
    token_loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none")
    return -token_loss.view(target.shape).sum(dim=1), counts


def adapters_off(model: nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """Returns a context factory under which the LoRA adapters of `model` (a peft model, possibly wrapped by DDP,
    FSDP2 or DeepSpeed) are disabled: the base alone, the model before any update."""
    from peft import PeftModel

    peft_model = next((m for m in model.modules() if isinstance(m, PeftModel)), None)
    if peft_model is None:
        raise RuntimeError("the reference is the base with adapters disabled, but the model has no LoRA adapters")
    return peft_model.disable_adapter


class PreferenceLoss:
    """One micro-batch's preference loss: call with the policy (the wrapped module), its chunked head or None,
    and the batch [2b, s] (chosen rows first); returns (the loss, its detached statistics: means over the pairs).

    `reference`: a function of (input_ids, labels) giving the reference's summed log-probabilities [2b]; None
    for ORPO."""

    def __init__(self, settings: PreferenceSettings,
                 reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None):
        if (reference is None) != (settings.reference == "none"):
            raise ValueError(f"reference {settings.reference!r} needs {'no' if reference is None else 'a'} model")
        self.settings, self.reference = settings, reference

    def __call__(self, model: nn.Module, head: ChunkedLossHead | None, input_ids: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = input_ids.shape[0] // 2
        reference = None
        if self.reference is not None:
            with torch.no_grad():
                reference = self.reference(input_ids, labels).float()
        logps, counts = sequence_logps(model, input_ids, labels, head)
        if self.settings.loss == "orpo":
            return orpo_loss(logps, counts, pairs, self.settings.beta)
        return dpo_loss(logps, reference, pairs, self.settings.beta, self.settings.label_smoothing)


def dpo_loss(logps: torch.Tensor, reference: torch.Tensor, pairs: int, beta: float,
             label_smoothing: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns DPO's mean sigmoid loss over `pairs` (rows: chosen then rejected) and the pair statistics."""
    ratios = logps - reference
    chosen, rejected = beta * ratios[:pairs], beta * ratios[pairs:]
    z = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss.mean(), _stats(chosen.detach(), rejected.detach())


def orpo_loss(logps: torch.Tensor, counts: torch.Tensor, pairs: int,
              weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns ORPO's loss over `pairs`: the chosen responses' token NLL plus `weight` × the odds-ratio term."""
    mean = logps / counts.clamp(min=1)
    # log(1 - exp(p̄)), stable as p̄ → 0⁻ (a certain response has infinite odds)
    log_odds = mean - torch.log(-torch.expm1(mean.clamp(max=-1e-6)))
    ratio = log_odds[:pairs] - log_odds[pairs:]
    nll = -logps[:pairs].sum() / counts[:pairs].sum().clamp(min=1)
    loss = nll - weight * F.logsigmoid(ratio).mean()
    return loss, _stats(weight * mean[:pairs].detach(), weight * mean[pairs:].detach())


def _stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
            "rewards_margin": (chosen - rejected).mean(), "rewards_accuracy": (chosen > rejected).float().mean()}
