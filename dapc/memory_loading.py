"""What loading and offload need beside the training step: the device while the model loads, host RAM and
NVMe per node. Pure arithmetic on a `dapc.memory.Workload`, in the same notation.
"""

from __future__ import annotations

from dapc.memory import (
    Figure,
    Workload,
    gathered_param_bytes,
    nf4_bytes,
    optimizer_bytes_per_param,
    trained_param_bytes,
    weights,
)
from dapc.models import Architecture, decoder_linear_shapes


def largest_linear_params(arch: Architecture) -> int:
    """Returns the elements of the largest decoder Linear weight (what the NF4 loader quantizes whole)."""
    return max(i * o for i, o in decoder_linear_shapes(arch).values())


# torchao's NF4 quantizer works through the weight in chunks of 2^20 values, holding each value's distance to
# the 16 code points: 16·(2c) bytes per value plus indices (runtime/train/nf4.py; torchao nf4_tensor.py).
_NF4_QUANTIZER_CHUNK = 1 << 20


def load_peak(w: Workload) -> Figure:
    """Returns bytes on each device while the model loads: nonzero where loading holds more than the
    steady state's weights do (plan.json `loading.mode` says how the runtime loads).

    - `meta-sharded-quantize` (QLoRA under FSDP2, the torchtune way, runtime/train/nf4.py): the model is built
      on the meta device and sharded first; then tensor by tensor each rank reads only its rows of a
      non-quantized tensor, and quantizes a Linear weight whole before keeping its rows. The peak is the
      rank's shard, plus for the largest Linear (n values) its copy in the base dtype, a scaled copy and the
      2-byte codes (n·(2c + 2)), its NF4, and the quantizer's chunk of distances (min(n, 2^20)·(32c + 8)).
    - `every-rank` QLoRA (1 process, DDP, DeepSpeed): every rank quantizes and keeps the whole base.
    - Otherwise the model is whole on each rank only where the steady state holds it whole anyway (DDP,
      ZeRO-1/2), or arrives sharded (rank-0 broadcast, ZeRO-3 partitioning at creation).
    """
    if w.method != "qlora":
        return Figure(0, "no more than the steady state")
    if w.loading.mode == "meta-sharded-quantize":
        n, c = largest_linear_params(w.arch), w.base_bytes
        transient = n * (2 * c + 2) + nf4_bytes(n, w.nf4_double_quant) + min(n, _NF4_QUANTIZER_CHUNK) * (32 * c + 8)
        return Figure(weights(w).bytes + transient,
                      "weights shard + largest Linear: n·(2c + 2) + NF4(n) + min(n, 2^20)·(32c + 8) quantizer")
    return Figure(gathered_param_bytes(w), "whole NF4 base on each device (every-rank loader)")


def _host_load(w: Workload) -> tuple[int, str]:
    ranks, n = min(w.gpus_per_node, w.world_size), w.params.total
    full = 4 if w.method == "full" else w.base_bytes
    mode = w.loading.mode
    if w.method == "qlora" or mode == "zero3-init":
        # Streams from mmap'd safetensors to the device (QLoRA) or partitions at creation (ZeRO-3):
        # at most the file pages, shared through the page cache.
        return n * w.base_bytes, "N·c checkpoint pages"
    if mode == "rank0-broadcast":
        return n * full, f"N·{full} on rank 0, which loads and broadcasts the shards"
    return ranks * n * full, f"{ranks} ranks × N·{full}: each rank builds the whole model before wrapping"


def host_per_node(w: Workload) -> Figure:
    """Returns CPU RAM per node: the model as the runtime loads it, plus offloaded states."""
    s, n_t = w.strategy, w.trainable_params
    load, load_formula = _host_load(w)
    offloaded, parts = 0, [load_formula]
    if s.optimizer_on == "cpu":
        per_param, text = optimizer_bytes_per_param(w)
        offloaded += int(n_t * (per_param + 4)) // w.nodes
        parts.append(f"N_t·({text} + 4 fp32 grads) / nodes")
    if s.params_on == "cpu":
        offloaded += n_t * trained_param_bytes(w) // w.nodes
        parts.append("N·c params / nodes")
    # Loading comes first and its copies are freed before the offloaded states exist.
    formula = f"max({parts[0]}, {' + '.join(parts[1:])})" if offloaded else parts[0]
    return Figure(max(load, offloaded), formula)


def nvme_per_node(w: Workload) -> Figure:
    """Returns NVMe bytes per node used by ZeRO-Infinity (params and optimizer states swapped out)."""
    if w.strategy.optimizer_on != "nvme":
        return Figure(0, "no NVMe offload")
    per_param, text = optimizer_bytes_per_param(w)
    total = int(w.trainable_params * (per_param + w.compute_bytes)) // w.nodes
    return Figure(total, f"N·({text} + c) / nodes")


def checkpoint_bytes(w: Workload) -> Figure:
    """Returns the bytes one checkpoint writes, all ranks together: the trained parameters as the backend
    stores them and their optimizer states (a LoRA checkpoint holds the adapters only; the frozen base is
    rebuilt from the plan). DCP and DeepSpeed write each element once, whatever the sharding."""
    per_param, text = optimizer_bytes_per_param(w)
    t = trained_param_bytes(w)
    return Figure(int(w.trainable_params * (t + per_param)), f"N_t·({t} + {text})")
