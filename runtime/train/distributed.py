"""The process group: from torchrun's environment (or a 1-process group when run directly), checked
against the plan's world size before anything collective happens."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import PlanError, TrainPlan

__all__ = ["TIMEOUT_ENV", "Distributed", "init_distributed", "shutdown_distributed"]

# Collective timeout. A rank that fails leaves its peers waiting in a collective; this bounds the wait.
TIMEOUT_ENV = "DAPC_DIST_TIMEOUT_SECONDS"
_DEFAULT_TIMEOUT_SECONDS = 1800


@dataclass(frozen=True)
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    timeout: timedelta

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(plan: TrainPlan) -> Distributed:
    """Joins (or, outside torchrun, creates) the process group: NCCL on CUDA, gloo on the CPU."""
    world_size = launched_world_size()
    if world_size != plan.world_size:
        raise PlanError(f"launched with WORLD_SIZE {world_size}, but the plan's batch.world_size is "
                        f"{plan.world_size}; launch with the plan's nodes × GPUs per node", plan.path)
    if "RANK" not in os.environ:  # run directly: a group of one on a free local port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, _DEFAULT_TIMEOUT_SECONDS)))
    dist.init_process_group(backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    return Distributed(rank, local_rank, world_size, device, timeout)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
