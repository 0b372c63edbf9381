"""The trainer: `python -m runtime.train --plan plan.json` (under torchrun for more than one process).

It reads plan.json and nothing else; see `loop` for the order of a run, `engines` for the backends,
`runtime.checkpoint` for checkpoints and `runtime.export` for the final Hugging Face export.
"""

from .config import PlanError, TrainPlan, load_plan
from .loop import train

__all__ = ["PlanError", "TrainPlan", "load_plan", "train"]
