"""What the runtime cannot do, in one table: the planner never picks these, and a pinned one is a plan-time error."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dapc.recipe import Recipe
from dapc.strategies import Strategy


@dataclass(frozen=True)
class Incompatibility:
    """A recipe setting the runtime refuses under some strategies, the key that sets it, and why."""

    key_path: tuple[str, ...]
    applies: Callable[[Recipe, Strategy], bool]
    reason: str


INCOMPATIBLE: tuple[Incompatibility, ...] = (
    Incompatibility(("training", "precision"),
                    lambda r, s: r.training.precision == "fp16" and s.backend == "fsdp2",
                    "fp16 with FSDP2 needs a sharded gradient scaler, which the runtime does not have; use bf16"),
    Incompatibility(("training", "weights_dtype"),
                    lambda r, s: r.training.weights_dtype == "bf16" and s.backend == "deepspeed",
                    "weights_dtype bf16 (pure bf16) with DeepSpeed: DeepSpeed always keeps an fp32 master copy"),
    Incompatibility(("training", "optimizer"),
                    lambda r, s: r.training.optimizer == "adamw-8bit" and s.optimizer_on != "gpu",
                    "adamw-8bit with optimizer offload: offloaded states are stepped by DeepSpeed's or torch's "
                    "CPU AdamW in fp32, not by bitsandbytes"),
)


def refusal(recipe: Recipe, strategy: Strategy) -> Incompatibility | None:
    """Returns the first incompatibility of `recipe` under `strategy`, or None when the runtime can run it."""
    return next((i for i in INCOMPATIBLE if i.applies(recipe, strategy)), None)
