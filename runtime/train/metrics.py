"""Training metrics: one JSON object per line in `paths.metrics_path` and a console line, from rank 0.

Records (`event`): `start` (where the run begins, resumed or not), `step` (loss, lr, grad norm, tokens/s,
MFU, peak memory), `checkpoint`, `stopped`, `memory` (the measured peak next to the plan's estimate),
`export`, `end`. Each record also goes to the run's tracker (`tracking.py`: TensorBoard, W&B, MLflow).
The file is appended to, so a resumed run continues it; a step that ran twice (before a kill and after the
resume) appears twice, and the later record is the one that counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from .tracking import Tracker

__all__ = ["MetricsLog", "mfu"]

_MIB = 1024**2


def mfu(tokens_per_second: float, flops_per_token: float, devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s (tokens/s × FLOPs per token) over the devices' peak
    [PaLM, Chowdhery et al. 2022, appendix B]. FLOPs per token and the peak come from the plan."""
    return tokens_per_second * flops_per_token / (devices * peak_flops_per_device)


class MetricsLog:
    """Writes records on the main rank only, and hands each to `tracker`; other ranks get a no-op log."""

    def __init__(self, path: str, enabled: bool, tracker: Tracker | None = None):
        self.enabled = enabled
        self._tracker = tracker if enabled else None
        self.console = Console(stderr=True, highlight=False)
        self._file = None
        if enabled:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")

    def record(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"event": event, **fields}, sort_keys=True) + "\n")
        self._file.flush()  # in the kernel's hands: survives kill -9 (fsync per step would cost throughput)
        if self._tracker is not None:
            self._tracker.record(event, fields)

    def say(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, soft_wrap=True)

    def step(self, step: int, steps: int, **fields: Any) -> None:
        self.record("step", step=step, **fields)
        self.say(
            f"step {step:>{len(str(steps))}}/{steps}  loss {fields['loss']:.4f}  lr {fields['lr']:.2e}  "
            f"grad {fields['grad_norm']:.3f}  {fields['tokens_per_second']:,.0f} tok/s  "
            f"MFU {100 * fields['mfu']:.2f}%  peak {fields['peak_memory_bytes'] / _MIB:,.0f} MiB"
            + (f"  margin {fields['rewards_margin']:.3f}  accuracy {fields['rewards_accuracy']:.2f}"
               if "rewards_margin" in fields else "")
        )

    def close(self) -> None:
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        if self._file is not None:
            self._file.close()
            self._file = None
