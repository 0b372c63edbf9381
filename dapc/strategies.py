"""What each sharding strategy shards, replicates and offloads; the planner and memory model read these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Backend = Literal["ddp", "fsdp2", "deepspeed"]
Place = Literal["gpu", "cpu", "nvme"]


@dataclass(frozen=True)
class Strategy:
    """A strategy's traits. `*_sharded` say whether that model state is split across the shard group."""

    name: str
    backend: Backend
    zero_stage: int  # DeepSpeed ZeRO stage; 0 for DDP; FSDP2 full shard is stage-3-like
    params_sharded: bool
    grads_sharded: bool
    optimizer_sharded: bool
    hybrid: bool  # shard inside a node, replicate across nodes
    optimizer_on: Place
    params_on: Place
    description: str


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("ddp", "ddp", 0, False, False, False, False, "gpu", "gpu",
                 "replicate everything; all-reduce gradients"),
        Strategy("zero1", "deepspeed", 1, False, False, True, False, "gpu", "gpu",
                 "DeepSpeed ZeRO-1: shard optimizer states"),
        Strategy("zero2", "deepspeed", 2, False, True, True, False, "gpu", "gpu",
                 "DeepSpeed ZeRO-2: shard optimizer states and gradients"),
        Strategy("fsdp2-hybrid", "fsdp2", 3, True, True, True, True, "gpu", "gpu",
                 "FSDP2 fully_shard on a 2-D mesh: shard inside each node, replicate across nodes"),
        Strategy("fsdp2-full", "fsdp2", 3, True, True, True, False, "gpu", "gpu",
                 "FSDP2 fully_shard: shard parameters, gradients and optimizer states over all GPUs"),
        Strategy("zero3", "deepspeed", 3, True, True, True, False, "gpu", "gpu",
                 "DeepSpeed ZeRO-3: shard parameters, gradients and optimizer states"),
        Strategy("zero2-offload-cpu", "deepspeed", 2, False, True, True, False, "cpu", "gpu",
                 "ZeRO-2 with optimizer states and the step on the CPU"),
        Strategy("zero3-offload-cpu", "deepspeed", 3, True, True, True, False, "cpu", "gpu",
                 "ZeRO-3 with optimizer states and the step on the CPU"),
        Strategy("fsdp2-offload-cpu", "fsdp2", 3, True, True, True, False, "cpu", "cpu",
                 "FSDP2 with CPUOffloadPolicy: sharded parameters, gradients and the step on the CPU"),
        Strategy("zero3-offload-cpu-full", "deepspeed", 3, True, True, True, False, "cpu", "cpu",
                 "ZeRO-3 with optimizer states and parameters on the CPU"),
        Strategy("zero3-offload-nvme", "deepspeed", 3, True, True, True, False, "nvme", "nvme",
                 "ZeRO-3 with optimizer states and parameters on local NVMe"),
    )
}

# Ties in modelled step time go to the earlier entry: fewer moving parts first.
PREFERENCE_ORDER: tuple[str, ...] = tuple(STRATEGIES)


def shard_degree(strategy: Strategy, world_size: int, gpus_per_node: int) -> int:
    """Returns how many GPUs share one copy of the sharded states (1 where nothing is sharded)."""
    if not (strategy.params_sharded or strategy.grads_sharded or strategy.optimizer_sharded):
        return 1
    return min(gpus_per_node, world_size) if strategy.hybrid else world_size
