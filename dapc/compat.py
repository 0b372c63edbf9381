"""What the runtime cannot do, in one table: the planner never picks these, and a pinned one is a plan-time error."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dapc.models import Architecture, decoder_linear_shapes
from dapc.recipe import Recipe
from dapc.reference import reference_kind
from dapc.strategies import Strategy, shard_degree

NF4_BLOCK = 64  # values per NF4 block scale (runtime/train/nf4.py, QLoRA §3)


@dataclass(frozen=True)
class Setting:
    """What a refusal looks at: the recipe, a strategy, the architecture and the world size."""

    recipe: Recipe
    strategy: Strategy
    arch: Architecture
    world_size: int

    @property
    def shard(self) -> int:
        """GPUs one copy of the sharded states is split over."""
        return shard_degree(self.strategy, self.world_size, self.recipe.hardware.gpus_per_node)


@dataclass(frozen=True)
class Incompatibility:
    """A setting the runtime refuses, the recipe key that sets it, and why (a function of the setting)."""

    key_path: tuple[str, ...]
    applies: Callable[[Setting], bool]
    reason: Callable[[Setting], str]


def _qlora(s: Setting) -> bool:
    return s.recipe.method.name == "qlora"


def _reference_copy(s: Setting) -> bool:
    return reference_kind(s.recipe) == "copy"


def _uneven_rows(s: Setting) -> list[str]:
    return [f"{name} ({rows} rows)" for name, (_, rows) in decoder_linear_shapes(s.arch).items() if rows % s.shard]


def _ragged_blocks(s: Setting) -> list[str]:
    return [f"{name} ({cols})" for name, (cols, _) in decoder_linear_shapes(s.arch).items() if cols % NF4_BLOCK]


INCOMPATIBLE: tuple[Incompatibility, ...] = (
    Incompatibility(("training", "precision"),
                    lambda s: s.recipe.training.precision == "fp16" and s.strategy.backend == "fsdp2",
                    lambda s: "fp16 with FSDP2 needs a sharded gradient scaler, which the runtime does not have; "
                              "use bf16"),
    Incompatibility(("training", "weights_dtype"),
                    lambda s: s.recipe.training.weights_dtype == "bf16" and s.strategy.backend == "deepspeed",
                    lambda s: "weights_dtype bf16 (pure bf16) with DeepSpeed: DeepSpeed always keeps an fp32 master "
                              "copy"),
    Incompatibility(("training", "optimizer"),
                    lambda s: s.recipe.training.optimizer == "adamw-8bit" and s.strategy.optimizer_on != "gpu",
                    lambda s: "adamw-8bit with optimizer offload: offloaded states are stepped by DeepSpeed's or "
                              "torch's CPU AdamW in fp32, not by bitsandbytes"),
    Incompatibility(("method", "quant_type"),
                    lambda s: _qlora(s) and s.recipe.method.quant_type != "nf4",
                    lambda s: f"quant_type {s.recipe.method.quant_type}: the runtime's QLoRA base is NF4 (torchao)"),
    Incompatibility(("method", "double_quant"),
                    lambda s: _qlora(s) and not s.recipe.method.double_quant,
                    lambda s: "double_quant false: the runtime's NF4 (torchao) always quantizes its block scales"),
    Incompatibility(("strategy",),
                    lambda s: _qlora(s) and s.strategy.backend == "deepspeed" and s.strategy.params_on != "gpu",
                    lambda s: "QLoRA with DeepSpeed parameter offload: the NF4 base is kept out of DeepSpeed's reach "
                              "(it cannot move or partition NF4), so it would stay whole on every GPU"),
    Incompatibility(("training", "fsdp_embedding_units"),
                    lambda s: s.recipe.training.fsdp_embedding_units == "separate" and s.arch.tie_word_embeddings,
                    lambda s: "fsdp_embedding_units separate: this model ties its embedding and LM head (one "
                              "parameter), which can only live in one FSDP2 unit; use auto or root"),
    Incompatibility(("method", "name"),
                    lambda s: _qlora(s) and bool(_ragged_blocks(s)),
                    lambda s: f"NF4 needs every decoder Linear's input width divisible by {NF4_BLOCK}: "
                              f"{', '.join(_ragged_blocks(s))}"),
    Incompatibility(("strategy",),
                    lambda s: _reference_copy(s) and s.strategy.params_on != "gpu",
                    lambda s: "dpo with full training holds a frozen reference copy of the model, which the runtime "
                              "keeps on the GPUs; with parameter offload it would not be offloaded: use a strategy "
                              "that keeps parameters on the GPU, LoRA (whose reference needs no copy), or "
                              "training.preference.reference precomputed"),
    Incompatibility(("hardware", "gpus_per_node"),
                    lambda s: _qlora(s) and s.strategy.backend == "fsdp2" and bool(_uneven_rows(s)),
                    lambda s: f"FSDP2 shards NF4 weights by rows over {s.shard} GPUs, which must divide every "
                              f"decoder Linear's output rows: {', '.join(_uneven_rows(s))}"),
)


def refusal(setting: Setting) -> tuple[tuple[str, ...], str] | None:
    """Returns (recipe key, reason) for the first thing the runtime refuses in `setting`, or None."""
    found = next((i for i in INCOMPATIBLE if i.applies(setting)), None)
    return None if found is None else (found.key_path, found.reason(setting))
