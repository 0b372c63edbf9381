"""Time, money and energy: FLOPs per token, modelled step time, and what the whole run costs."""

from __future__ import annotations

from dataclasses import dataclass

from dapc.hardware import Device
from dapc.models import Architecture, ParamCounts
from dapc.strategies import Strategy

# PCIe Gen5 x16 host<->device, per direction, as achieved by pinned copies (~50 of 64 GB/s).
HOST_LINK_GBPS = 50.0
# DeepSpeed's CPU Adam: elements updated per second per node with AVX-512 (DeepSpeed ZeRO-Offload
# paper, Table 3: ~1.2e9 params/s on a 2-socket host); stated, not measured here.
CPU_ADAM_PARAMS_PER_SECOND = 1.0e9
# Sequential throughput of one datacenter NVMe drive, GB/s.
NVME_GBPS = 3.0


def matmul_params(params: ParamCounts) -> int:
    """Returns the parameters that take part in matmuls: all but the embedding lookup (a tied head counts)."""
    return params.total - params.embedding + (params.embedding if params.tied else 0)


def flops_per_token(arch: Architecture, params: ParamCounts, seq_len: int, method: str, recompute: float,
                    chunked_loss: bool = False, reference_forward: bool = False) -> float:
    """Returns training FLOPs per token.

    PaLM (Chowdhery et al. 2022, Appendix B): 6·N + 12·L·H·Q·T per token for forward and backward,
    N the matmul parameters, L layers, H heads, Q head size, T sequence length. With frozen weights
    (LoRA/QLoRA) backward skips the weight gradients: 4·N instead of 6·N (adapters are negligible).
    Full activation recomputation adds one more forward of the decoder layers: 2·N + 4·L·H·Q·T, times
    `recompute`, the share of layers that recompute (1 for all; ceil(L/k)/L checkpointing every k-th; 0 for
    none). The chunked loss recomputes the LM head's forward in backward: 2·h·V. DPO's reference model scores
    every token once more, forward only (`reference_forward`): 2·N + 4·L·H·Q·T.
    """
    n = matmul_params(params)
    attention = arch.num_layers * arch.num_attention_heads * arch.head_dim * seq_len
    flops = (6 if method == "full" else 4) * n + 12 * attention
    if recompute:
        flops += recompute * (2 * n + 4 * attention)
    if chunked_loss:
        flops += 2 * arch.hidden_size * arch.vocab_size
    if reference_forward:
        flops += forward_flops_per_token(arch, params, seq_len)
    return float(flops)


def forward_flops_per_token(arch: Architecture, params: ParamCounts, seq_len: int) -> float:
    """Returns the FLOPs per token of one forward pass, no backward (PaLM Appendix B's forward third):
    2·N + 4·L·H·Q·T."""
    attention = arch.num_layers * arch.num_attention_heads * arch.head_dim * seq_len
    return float(2 * matmul_params(params) + 4 * attention)


@dataclass(frozen=True)
class StepTime:
    """Modelled seconds per optimizer step, split into compute and communication."""

    compute_seconds: float
    comm_seconds: float
    offload_seconds: float

    @property
    def step_seconds(self) -> float:
        """Seconds per step: communication overlaps compute (prefetch, bucketed reduce), offload does not."""
        return max(self.compute_seconds, self.comm_seconds) + self.offload_seconds


def _ring_seconds(bytes_per_gpu: float, group: int, gbps: float) -> float:
    # A ring collective moves (g-1)/g of the buffer through each GPU's link.
    return 0.0 if group <= 1 else bytes_per_gpu * (group - 1) / group / (gbps * 1e9)


def compute_seconds(flops: float, world_size: int, device: Device, mfu: float) -> float:
    """Returns the seconds `flops` take spread over `world_size` devices at `mfu` of their dense bf16 peak."""
    return flops / (world_size * device.bf16_tflops * 1e12 * mfu)


def step_time(
    strategy: Strategy,
    device: Device,
    inter_node_gbps: float,
    world_size: int,
    gpus_per_node: int,
    trainable_params: int,
    param_bytes: int,
    compute_bytes: int,
    grad_accum: int,
    tokens_per_step: int,
    flops_token: float,
    mfu: float,
) -> StepTime:
    """Returns the modelled step time at `mfu` of the device's dense bf16 peak, plus collectives.

    `param_bytes` is the whole parameter set as gathered (compute dtype, or NF4 for QLoRA); sharded
    strategies gather it twice per micro-batch (forward, backward) and reduce-scatter gradients.
    """
    compute = compute_seconds(flops_token * tokens_per_step, world_size, device, mfu)
    nodes = max(1, world_size // gpus_per_node)
    link = inter_node_gbps if nodes > 1 else device.intra_node_gbps
    n_t = trainable_params
    if strategy.backend == "ddp":
        comm = 2 * _ring_seconds(4 * n_t, world_size, link)  # all-reduce = reduce-scatter + all-gather
    elif strategy.zero_stage in (1, 2):
        comm = _ring_seconds(compute_bytes * n_t * grad_accum, world_size, link)
        comm += _ring_seconds(compute_bytes * n_t, world_size, link)
    elif strategy.hybrid:
        per_micro = 2 * param_bytes + (compute_bytes + 4) * n_t
        comm = _ring_seconds(per_micro * grad_accum, gpus_per_node, device.intra_node_gbps)
        # The runtime syncs every micro-batch (runtime.fsdp.sync_every_micro_batch): the replicas' all-reduce too.
        comm += 2 * _ring_seconds(4 * n_t / gpus_per_node, nodes, inter_node_gbps) * grad_accum
    else:  # parameters gathered for forward and again for backward, gradients reduce-scattered
        per_micro = 2 * param_bytes + (compute_bytes + 4) * n_t
        comm = _ring_seconds(per_micro * grad_accum, world_size, link)
    offload = 0.0
    shard_params = n_t / world_size
    if strategy.optimizer_on == "cpu":
        offload = shard_params * (4 + compute_bytes) / (HOST_LINK_GBPS * 1e9)
        offload += shard_params * gpus_per_node / CPU_ADAM_PARAMS_PER_SECOND
    elif strategy.optimizer_on == "nvme":
        offload = shard_params * gpus_per_node * 2 * (12 + compute_bytes) / (NVME_GBPS * 1e9)
        offload += shard_params * gpus_per_node / CPU_ADAM_PARAMS_PER_SECOND
    if strategy.params_on != "gpu":
        offload += grad_accum * 2 * param_bytes / world_size / (HOST_LINK_GBPS * 1e9)
    return StepTime(compute, comm, offload)


@dataclass(frozen=True)
class RunCost:
    """What the run costs: steps, seconds, GPU-hours, dollars, kilowatt-hours."""

    steps: int
    wall_seconds: float
    gpu_hours: float
    usd: float
    kwh: float


def run_cost(steps: int, step_seconds: float, world_size: int, usd_per_gpu_hour: float, tdp_watts: float, pue: float,
             before_training_seconds: float = 0.0) -> RunCost:
    """Returns the run's cost: the steps plus what runs once before them (a precomputed dpo reference's pass);
    energy is every GPU at its TDP for the whole run, times the facility PUE."""
    wall = steps * step_seconds + before_training_seconds
    gpu_hours = wall * world_size / 3600
    return RunCost(
        steps=steps,
        wall_seconds=wall,
        gpu_hours=gpu_hours,
        usd=gpu_hours * usd_per_gpu_hour,
        kwh=gpu_hours * tdp_watts * pue / 1000,
    )
