"""The memory model: bytes per GPU by component, each with the formula (and its source) that produced it.

Pure arithmetic on a `Workload`: no files, no environment. Notation in the formulas: N parameters,
N_t trainable parameters, D the shard degree, c the bytes of the compute dtype, s the sequence length,
b the micro-batch, h the hidden size, i the MLP width, L the layers, V the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from dapc.dtypes import DTYPE_BYTES
from dapc.loading import Loading, decide_loading
from dapc.models import Architecture, ParamCounts, decoder_linear_shapes
from dapc.strategies import Strategy, shard_degree

GIB = 1024**3

# QLoRA (Dettmers et al. 2023, §3 "Double Quantization"): NF4 stores 4 bits per weight plus one
# absmax per block of 64; double quantization stores those absmaxes in 8 bits with one fp32
# constant per 256 of them: 8/64 + 32/(64*256) = 0.127 bits per parameter (0.5 bits without it).
NF4_BITS_PER_PARAM = 4.0
NF4_CONSTANT_BITS_DOUBLE_QUANT = 8 / 64 + 32 / (64 * 256)
NF4_CONSTANT_BITS_SINGLE = 32 / 64
# bitsandbytes AdamW8bit: two uint8 states plus one fp32 absmax per 256-element block for each.
ADAM8BIT_BYTES_PER_PARAM = 2 + 2 * 4 / 256
# CUDA caching-allocator fragmentation on top of transient tensors (activations, logits, buffers),
# with expandable_segments enabled by the rendered launch scripts; PyTorch's own guidance puts
# fragmentation under expandable segments in the single-digit percent. Stated, checked on CPU only.
CUDA_FRAGMENTATION = 0.10
# Resident memory of one CPU training process before its model: the interpreter, torch, transformers,
# the gloo process group. Fitted as the intercept of the measured peaks of the tiny example under seven
# configurations (fsdp2, zero2, zero3, ddp, lora, checkpointing, 4x the tokens): 560 MiB, each run within
# 11% (tests/test_e2e_launch.py holds the runs to 15%). Tensors this size are served by glibc's mmap path
# and unmapped on free, so the high-water mark sees live tensors; no fragmentation factor is added on CPU.
CPU_PROCESS_BASELINE_BYTES = 560 * 1024**2
# DeepSpeed's engine on the CPU accelerator peaks above the FSDP2 run of the same model by 70-120 MiB over
# a 12-step run (its flat partition buffers, the shm/gloo comm setup): measured, not derived.
CPU_DEEPSPEED_EXTRA_BYTES = 96 * 1024**2


@dataclass(frozen=True)
class Figure:
    """A memory figure in bytes and the formula that produced it."""

    bytes: int
    formula: str


@dataclass(frozen=True)
class Workload:
    """Everything the memory model depends on, already resolved by the planner."""

    arch: Architecture
    params: ParamCounts
    method: str  # full | lora | qlora
    trainable_params: int
    precision: str  # bf16 | fp16 | fp32: the compute dtype
    optimizer: str  # adamw | adamw-8bit
    strategy: Strategy
    world_size: int
    gpus_per_node: int
    nodes: int
    micro_batch: int
    seq_len: int
    activation_checkpointing: bool
    lora_dropout: float
    lora_targets: tuple[str, ...]
    nf4_double_quant: bool
    on_cpu: bool
    model_init: str = "pretrained"  # pretrained | random: how the runtime builds the base
    model_dtype: str = "bf16"  # recipe model.dtype
    weights_dtype: str = "fp32"  # recipe training.weights_dtype: fp32 master, or pure bf16
    zero_fp32_grad_partition: bool = True

    @property
    def loading(self) -> Loading:
        """How the runtime loads this model (the decision plan.json records)."""
        return decide_loading(self.method, self.strategy, self.model_init, self.precision, self.model_dtype,
                              self.weights_dtype)

    @property
    def base_bytes(self) -> int:
        """Bytes per element of the frozen base as the runtime stores it."""
        return DTYPE_BYTES[self.loading.base_dtype]

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of the compute dtype (c)."""
        return 4 if self.precision == "fp32" else 2

    @property
    def shard(self) -> int:
        """The shard degree D."""
        return shard_degree(self.strategy, self.world_size, self.gpus_per_node)

    @property
    def frozen_params(self) -> int:
        """Parameters of the frozen base (0 for full training)."""
        return 0 if self.method == "full" else self.params.total


def quantized_params(params: ParamCounts) -> int:
    """Returns the parameters QLoRA stores in NF4: the decoder Linear layers (attention and MLP).

    Embeddings, norms and the LM head stay in the compute dtype (bitsandbytes skips `lm_head`).
    """
    return params.attention + params.mlp


def nf4_bytes(num_params: int, double_quant: bool) -> int:
    """Returns bytes of `num_params` weights stored in NF4 with their quantization constants (QLoRA §3)."""
    constant_bits = NF4_CONSTANT_BITS_DOUBLE_QUANT if double_quant else NF4_CONSTANT_BITS_SINGLE
    return ceil(num_params * (NF4_BITS_PER_PARAM + constant_bits) / 8)


def gathered_param_bytes(w: Workload) -> int:
    """Returns bytes of the whole parameter set as collectives move it: compute dtype, NF4 where quantized."""
    if w.method == "qlora":
        quantized = quantized_params(w.params)
        return nf4_bytes(quantized, w.nf4_double_quant) + (w.params.total - quantized) * w.base_bytes
    return w.params.total * (w.compute_bytes if w.method == "full" else w.base_bytes)


def _uses_master_copy(w: Workload) -> bool:
    # DeepSpeed keeps low-precision trainable params and an fp32 master copy in the optimizer (ZeRO
    # paper §3: 2Ψ + 2Ψ + KΨ with K = 12); FSDP2 and DDP keep the trained params themselves as the
    # master (fp32, or bf16 under pure bf16 training, where no fp32 copy exists at all).
    return w.strategy.backend == "deepspeed" and w.loading.trained_dtype != "fp32"


def _trained_param_bytes(w: Workload) -> int:
    return DTYPE_BYTES[w.loading.trained_dtype]


def _on_gpu(place: str) -> bool:
    return place == "gpu"


def weights(w: Workload) -> Figure:
    """Returns bytes per GPU of stored parameters: trained weights plus any frozen base."""
    d = w.shard if w.strategy.params_sharded else 1
    if not _on_gpu(w.strategy.params_on):
        return Figure(0, f"parameters live on {w.strategy.params_on}; gathered per layer (see buffers)")
    trained = w.trainable_params * _trained_param_bytes(w)
    trained_formula = f"N_t·{_trained_param_bytes(w)}"
    if w.method == "qlora":
        nf4 = nf4_bytes(quantized_params(w.params), w.nf4_double_quant)
        rest = (w.params.total - quantized_params(w.params)) * w.base_bytes
        base, base_formula = nf4 + rest, (
            f"N_linear·(4 + {NF4_CONSTANT_BITS_DOUBLE_QUANT if w.nf4_double_quant else 0.5:.3f} bits) NF4 "
            f"+ (N - N_linear)·{w.base_bytes} [QLoRA §3]"
        )
    elif w.method == "lora":
        base, base_formula = w.params.total * w.base_bytes, f"N·{w.base_bytes} frozen ({w.loading.base_dtype})"
    else:
        base, base_formula = 0, ""
    total = (base + trained) // d
    formula = " + ".join(f for f in (base_formula, trained_formula) if f)
    return Figure(total, f"({formula}) / D={d}" if d > 1 else formula)


def gradients(w: Workload) -> Figure:
    """Returns bytes per GPU of gradient storage for the trainable parameters.

    FSDP2 and DDP: fp32 gradients of the fp32 parameters. DeepSpeed with bf16/fp16: the ZeRO paper
    (§3) counts 2 bytes of 16-bit gradients; DeepSpeed's runtime also keeps an fp32 copy of each
    rank's gradient partition for the step (its estimator: "18 = 2_grads_16bit + 4_grads_32bit +
    4_params_32bit + 8_optimizer_states", deepspeed/runtime/zero/stage_1_and_2.py), and under ZeRO-3
    reduces straight into that fp32 partition (stage3.py estimate: 18·N/D = 2 + 4 + 12).
    `w.zero_fp32_grad_partition` False gives the paper's accounting.
    """
    if w.strategy.optimizer_on != "gpu":
        return Figure(0, "gradients are moved to the offload device each step (see buffers)")
    n_t, d = w.trainable_params, w.shard if w.strategy.grads_sharded else 1
    if not _uses_master_copy(w):
        t, name = _trained_param_bytes(w), w.loading.trained_dtype
        return Figure(n_t * t // d, f"N_t·{t} / D={d} ({name} gradients of {name} parameters)")
    c = w.compute_bytes
    if not w.zero_fp32_grad_partition:
        return Figure(n_t * c // d, f"N_t·{c} / D={d} [ZeRO paper §3: 16-bit gradients]")
    shard = w.shard
    if w.strategy.zero_stage == 3:
        return Figure(n_t * 4 // shard, f"N_t·4 / D={shard} fp32 partitions [DeepSpeed stage3 estimator]")
    return Figure(n_t * c // d + n_t * 4 // shard,
                  f"N_t·{c} / D={d} 16-bit + N_t·4 / D={shard} fp32 partition [DeepSpeed stage_1_and_2 estimator]")


def _optimizer_bytes_per_param(w: Workload) -> tuple[float, str]:
    # torch AdamW keeps m and v in the parameter's dtype (`zeros_like(param)`): fp32, or bf16 when pure bf16.
    moment = 2 * _trained_param_bytes(w) if not _uses_master_copy(w) else 8
    states = ADAM8BIT_BYTES_PER_PARAM if w.optimizer == "adamw-8bit" else float(moment)
    states_text = ("2.03 (8-bit m, v + block absmax)" if w.optimizer == "adamw-8bit"
                   else f"{moment} ({'fp32' if moment == 8 else 'bf16'} m, v)")
    if _uses_master_copy(w):
        return states + 4, f"4 (fp32 master) + {states_text}"
    return states, states_text


def optimizer(w: Workload) -> Figure:
    """Returns bytes per GPU of optimizer state (AdamW moments, plus the fp32 master copy under ZeRO)."""
    per_param, text = _optimizer_bytes_per_param(w)
    if w.strategy.optimizer_on != "gpu":
        return Figure(0, f"optimizer states on {w.strategy.optimizer_on}")
    d = w.shard if w.strategy.optimizer_sharded else 1
    return Figure(int(w.trainable_params * per_param) // d, f"N_t·({text}) / D={d} [ZeRO paper §3, K=12]")


def _norm_bytes_per_token(w: Workload) -> int:
    # transformers' LlamaRMSNorm upcasts to fp32 and keeps that copy for backward (4h), then the
    # weight multiply keeps the normalized input in the compute dtype (c·h) and the output feeds the
    # next Linear, which keeps it (c·h).
    return (4 + 2 * w.compute_bytes) * w.arch.hidden_size


def layer_activation_bytes_per_token(w: Workload) -> int:
    """Returns bytes saved for backward by one decoder layer per token (SDPA/flash attention, no dropout).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4.1)
    count 34·s·b·h bytes per layer for GPT with fp16 and flash-style attention (no 5·a·s²·b term).
    Here the same inventory is taken tensor by tensor for transformers' Llama layer, and checked
    against the tensors autograd actually saves (tests/test_memory_activations.py): two RMSNorms (see
    above); attention keeps the rotated q (c·h), k and v at their GQA width (2·c·h_kv; SDPA takes
    `enable_gqa`), the SDPA output, which o_proj reads as a view (c·h), and the fp32 log-sum-exp
    (4·a); the SwiGLU MLP keeps gate, up, silu(gate) and their product (4·c·i). RoPE's cos and sin
    are computed once per model and shared by all layers (see `activations`).
    """
    c, a = w.compute_bytes, w.arch
    kv_width = a.num_key_value_heads * a.head_dim
    attention = c * (2 * a.hidden_size + 2 * kv_width) + 4 * a.num_attention_heads
    mlp = 4 * c * a.intermediate_size
    lora = 0
    if w.method != "full" and w.lora_dropout > 0:
        # peft applies dropout to each targeted Linear's input: the dropped copy (c) and mask (1 byte).
        shapes = decoder_linear_shapes(a)
        lora = sum((c + 1) * shapes[name][0] for name in w.lora_targets)
    return 2 * _norm_bytes_per_token(w) + attention + mlp + lora


def activations(w: Workload) -> Figure:
    """Returns bytes per GPU of activations kept for backward for one micro-batch."""
    tokens = w.micro_batch * w.seq_len
    layer = layer_activation_bytes_per_token(w) * tokens
    # The final norm (its output is what lm_head keeps) and RoPE's cos and sin, shared by all layers.
    final_norm = (_norm_bytes_per_token(w) + 2 * w.compute_bytes * w.arch.head_dim) * tokens
    if w.activation_checkpointing:
        # Korthikanti et al. §5 full recomputation: keep each layer's input (2·s·b·h per layer in fp16),
        # then one layer's activations are live again while it is recomputed in backward.
        kept = w.arch.num_layers * w.compute_bytes * w.arch.hidden_size * tokens
        return Figure(kept + layer + final_norm, "L·c·s·b·h (layer inputs) + one layer recomputed + final norm, RoPE")
    return Figure(w.arch.num_layers * layer + final_norm, "L·(per-layer inventory)·s·b + final norm, RoPE [Korthikanti 2022]")


def logits(w: Workload) -> Figure:
    """Returns bytes per GPU of the output logits and cross-entropy tensors at their peak (in backward).

    transformers' ForCausalLMLoss upcasts the logits to fp32 and calls cross_entropy, which keeps only
    its fp32 log-softmax output (4·s·b·V); the logits themselves are not kept for backward. In backward
    nll_loss's gradient (4) and log_softmax's (4) are alive together with that output: 12·s·b·V, in
    bf16 as in fp32 (the forward peak, c + 4 + 4, is lower).
    """
    tokens = w.micro_batch * w.seq_len
    return Figure(12 * w.arch.vocab_size * tokens, "12·s·b·V (fp32 log-softmax + its two gradients)")


def _comm_buffer_bytes(w: Workload) -> tuple[int, str]:
    c, h, p = w.compute_bytes, w.arch.hidden_size, w.params
    s = w.strategy
    if s.backend == "ddp":
        # Mixed precision through autocast keeps a compute-dtype copy of every weight for backward.
        cast = w.params.total * c if c < 4 and w.method == "full" else 0
        # The runtime sets gradient_as_bucket_view: DDP's buckets are the gradients, no second copy.
        return cast, "DDP buckets are views of the gradients" + (" + N·c autocast weight copies" if cast else "")
    if s.backend == "fsdp2":
        # fully_shard per decoder layer: the running layer and the prefetched next are unsharded in
        # param dtype; the root group (embedding, head, final norm) stays gathered through the step;
        # one layer's gradients are unsharded (c) and upcast for the fp32 reduce-scatter (4).
        root = (p.embedding + p.lm_head + h) * c
        layers = 2 * p.per_layer * c + p.per_layer * (c + 4)
        return root + layers, "(emb + head)·c + 2·layer·c all-gather + layer·(c+4) reduce-scatter"
    # DeepSpeed with the bucket sizes the rendered ds_config sets (HF's `auto`: h² elements).
    reduce_bucket = h * h * c * 2
    if s.zero_stage == 3:
        gathered = 4 * p.largest_layer  # DeepSpeed estimate_zero3_model_states_mem_needs: 4·largest layer
        prefetch = int(0.9 * h * h) * c
        return gathered + prefetch + reduce_bucket, "4·largest_layer + 0.9·h²·c prefetch + 2·h²·c reduce buckets"
    allgather_bucket = h * h * c
    return reduce_bucket + allgather_bucket, "2·h²·c reduce + h²·c all-gather buckets"


def buffers(w: Workload, transient_bytes: int) -> Figure:
    """Returns bytes per GPU of communication buffers, quantization scratch and allocator overhead.

    `transient_bytes` is activations + logits: the allocations whose churn fragments memory.
    """
    comm, comm_formula = _comm_buffer_bytes(w)
    # QLoRA: one Linear dequantized to the compute dtype at a time (bitsandbytes matmul_4bit).
    scratch = _qlora_scratch(w)
    scratch_formula = " + largest Linear dequantized" if scratch else ""
    overhead, over_formula = _overhead(w, transient_bytes + comm + scratch)
    return Figure(comm + scratch + overhead, comm_formula + scratch_formula + over_formula)


def allocator_reserve(w: Workload, transient_bytes: int) -> int:
    """Returns the part of `buffers` that the caching allocator reserves beyond what tensors occupy: what
    `cuda.max_memory_reserved` counts and `cuda.max_memory_allocated` does not (0 on the CPU)."""
    if w.on_cpu:
        return 0
    comm, _ = _comm_buffer_bytes(w)
    return _overhead(w, transient_bytes + comm + _qlora_scratch(w))[0]


def _qlora_scratch(w: Workload) -> int:
    if w.method != "qlora":
        return 0
    return max(i * o for i, o in decoder_linear_shapes(w.arch).values()) * w.compute_bytes


def _overhead(w: Workload, churn_bytes: int) -> tuple[int, str]:
    if w.on_cpu:
        deepspeed = w.strategy.backend == "deepspeed"
        overhead = CPU_PROCESS_BASELINE_BYTES + (CPU_DEEPSPEED_EXTRA_BYTES if deepspeed else 0)
        return overhead, f" + {overhead // 1024**2} MiB process baseline{' with DeepSpeed' if deepspeed else ''} (measured)"
    return int(CUDA_FRAGMENTATION * churn_bytes), f" + {CUDA_FRAGMENTATION}·(transient + comm) fragmentation"


def largest_tensor_params(arch: Architecture) -> int:
    """Returns the elements of the model's largest single tensor: the embedding (or head) or the largest Linear."""
    return max([arch.vocab_size * arch.hidden_size] + [i * o for i, o in decoder_linear_shapes(arch).values()])


def load_peak(w: Workload) -> Figure:
    """Returns bytes on each device while the model loads: nonzero where loading holds more than the
    steady state's weights do (plan.json `loading.mode` says how the runtime loads).

    - `meta-sharded-quantize` (QLoRA under FSDP2, the torchtune way): the model is built on the meta device
      and sharded first; then each tensor is read from the checkpoint, quantized on the device and cut to this
      rank's shard, so the peak is the rank's shard plus one whole tensor in the base dtype and its NF4 copy.
    - `every-rank` QLoRA: bitsandbytes quantizes the whole base onto each device before any sharding.
    - Otherwise the model is whole on each rank only where the steady state holds it whole anyway (DDP,
      ZeRO-1/2), or arrives sharded (rank-0 broadcast, ZeRO-3 partitioning at creation).
    """
    if w.method != "qlora":
        return Figure(0, "no more than the steady state")
    if w.loading.mode == "meta-sharded-quantize":
        one = largest_tensor_params(w.arch)
        transient = one * w.base_bytes + nf4_bytes(one, w.nf4_double_quant)
        return Figure(weights(w).bytes + transient,
                      "weights shard + largest tensor in the base dtype + its NF4 copy (meta-sharded loader)")
    return Figure(gathered_param_bytes(w), "whole NF4 base on each device before sharding (every-rank loader)")


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
        per_param, text = _optimizer_bytes_per_param(w)
        offloaded += int(n_t * (per_param + 4)) // w.nodes
        parts.append(f"N_t·({text} + 4 fp32 grads) / nodes")
    if s.params_on == "cpu":
        offloaded += n_t * _trained_param_bytes(w) // w.nodes
        parts.append("N·c params / nodes")
    # Loading comes first and its copies are freed before the offloaded states exist.
    formula = f"max({parts[0]}, {' + '.join(parts[1:])})" if offloaded else parts[0]
    return Figure(max(load, offloaded), formula)


def nvme_per_node(w: Workload) -> Figure:
    """Returns NVMe bytes per node used by ZeRO-Infinity (params and optimizer states swapped out)."""
    if w.strategy.optimizer_on != "nvme":
        return Figure(0, "no NVMe offload")
    per_param, text = _optimizer_bytes_per_param(w)
    total = int(w.trainable_params * (per_param + w.compute_bytes)) // w.nodes
    return Figure(total, f"N·({text} + c) / nodes")
