"""How the runtime builds and loads the model, decided once by the compiler: the memory model counts what
this says, and the runtime does what it says (plan.json `loading`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

from dapc.strategies import Strategy

LoadMode = Literal["every-rank", "rank0-broadcast", "meta-sharded-quantize", "zero3-init"]
LOAD_MODES: tuple[str, ...] = LoadMode.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Loading:
    """The load mode, the dtype of the frozen base (LoRA/QLoRA; recipe dtype names), the dtype the trained
    parameters are stored in, and why."""

    mode: str
    base_dtype: str
    trained_dtype: str
    reason: str


@cache  # the planner asks once per memory term of every candidate; the answer depends on the arguments only
def decide_loading(method: str, strategy: Strategy, model_init: str, precision: str, model_dtype: str,
                   weights_dtype: str = "fp32") -> Loading:
    """Returns how the runtime loads the model for this method, strategy, init, precision and weights dtype."""
    if strategy.backend == "fsdp2":
        # One all-gather dtype per layer: the frozen base is stored in FSDP2's param dtype.
        base, base_why = precision, "stored in FSDP2's param dtype (training.precision)"
    elif strategy.backend == "deepspeed" and precision != "fp32":
        base, base_why = precision, "DeepSpeed casts the module to training.precision"
    else:
        base, base_why = model_dtype, "loaded in model.dtype"
    # FSDP2 and DDP keep fp32 trained parameters (they are the master copy); DeepSpeed keeps them in the
    # compute dtype with an fp32 master inside its optimizer (ZeRO paper §3).
    # With weights_dtype bf16 (pure bf16, DDP/FSDP2 only) the trained weights are bf16 and no master exists.
    trained = precision if strategy.backend == "deepspeed" else weights_dtype
    if method == "qlora" and strategy.backend == "fsdp2":
        mode, why = "meta-sharded-quantize", ("built on the meta device, sharded, then each tensor read from the "
                                              "checkpoint, quantized to NF4 and cut to this rank's shard")
    elif strategy.backend == "deepspeed" and strategy.zero_stage == 3 and method != "qlora":
        mode, why = "zero3-init", "built inside deepspeed.zero.Init: each parameter is partitioned as it is created"
    elif strategy.backend == "fsdp2" and model_init == "pretrained":
        mode, why = "rank0-broadcast", "rank 0 reads the checkpoint; the others build on meta and receive shards"
    else:
        mode, why = "every-rank", "each rank builds the whole model before wrapping"
    base_dtype = base if method != "full" else trained
    return Loading(mode, base_dtype, trained, f"{why}; frozen base {base_why}" if method != "full" else why)
