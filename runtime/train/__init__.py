"""The trainer: `python -m runtime.train --plan plan.json` (under torchrun for more than one process).

It reads plan.json and nothing else; see `loop` for the order of a run, `engines` for the backends,
`runtime.checkpoint` for checkpoints and `runtime.export` for the final Hugging Face export.
"""

from .config import PlanError, TrainPlan, load_plan

__all__ = ["PlanError", "TrainPlan", "load_plan", "train"]


def __getattr__(name: str):
    # `train` imports torch: not before `python -m runtime.train` has applied the plan's allocator settings.
    if name == "train":
        from .loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
