"""The learning rate at every optimizer step, as a pure function of the plan's `schedule`: the compiler prints
its key points, the runtime sets it before every step. One function for both, so they cannot disagree.

Shapes after a linear warmup from `warmup_start_lr` to `peak_lr` over `warmup_steps` (step s of the warmup
takes start + (peak - start)·(s+1)/warmup_steps, so the last warmup step reaches the peak):
- cosine / linear: decay to `min_lr` over the remaining steps, reaching it at the last step;
- constant: the peak to the end;
- wsd (warmup-stable-decay; Hu et al. 2024, MiniCPM): the peak until the last `decay_steps`, then linear to `min_lr`;
- constant-with-cooldown: the same with a 1-sqrt cooldown (Hägele et al. 2024, arXiv 2405.18392).
Re-warming a pretrained model (Ibrahim et al. 2024, arXiv 2403.08763) is a warmup that starts from the
model's final pretraining learning rate rather than 0.
"""

from __future__ import annotations

import math

from dapc.plan_schema import Schedule

__all__ = ["decay_start", "key_points", "lr_at"]


def decay_start(schedule: Schedule) -> int:
    """Returns the first step (0-based) of the decay phase: the step after warmup for cosine and linear, the last
    `decay_steps` for wsd and constant-with-cooldown, `total_steps` (never) for constant."""
    if schedule.kind == "constant":
        return schedule.total_steps
    if schedule.kind in ("wsd", "constant-with-cooldown"):
        return max(schedule.warmup_steps, schedule.total_steps - schedule.decay_steps)
    return schedule.warmup_steps


def lr_at(schedule: Schedule, step: int) -> float:
    """Returns the learning rate of optimizer step `step` (0-based)."""
    peak, floor, warmup = schedule.peak_lr, schedule.min_lr, schedule.warmup_steps
    if step < warmup:
        return schedule.warmup_start_lr + (peak - schedule.warmup_start_lr) * (step + 1) / warmup
    start = decay_start(schedule)
    if step < start:
        return peak
    # Progress 0 at the decay's first step, 1 at the last step of the run.
    progress = min(1.0, (step - start) / max(1, schedule.total_steps - 1 - start))
    if schedule.kind == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule.kind == "constant-with-cooldown":
        return floor + (peak - floor) * (1 - math.sqrt(progress))
    return peak - (peak - floor) * progress  # linear and wsd


def key_points(schedule: Schedule) -> tuple[tuple[int, float], ...]:
    """Returns the (step, learning rate) points that describe the schedule: the first step, the end of warmup,
    the start of the decay, and the last step; each once, in order."""
    last = schedule.total_steps - 1
    steps = sorted({0, max(0, schedule.warmup_steps - 1), min(decay_start(schedule), last), last})
    return tuple((s, lr_at(schedule, s)) for s in steps)
