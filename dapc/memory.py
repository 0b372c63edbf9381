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
# CUDA caching-allocator reserve beyond live tensors, as a share of the tensors that come and go within a
# step (activations, logits, gathered parameters, scratch): what max_memory_reserved adds to
# max_memory_allocated. With expandable segments (the rendered scripts' default) freed blocks are remapped
# rather than split, and PyTorch's notes on them put the waste in the single digits of percent: 0.10 is kept
# as a margin. Without them, published pairs of reserved vs allocated show far more: fsdp_qlora's LoRA 7B run
# 10.22 vs 9.16 GiB (1.06 GiB over ~2.9 GiB of transients), fms-acceleration's Mistral-7B on 2 A100
# 33.74 GiB allocated under 43.3 GiB on the device; 0.35 of the transients is taken.
CUDA_FRAGMENTATION = 0.10
CUDA_FRAGMENTATION_WITHOUT_EXPANDABLE_SEGMENTS = 0.35
# Device memory outside PyTorch's caching allocator, which no torch counter shows but the card must hold:
# the CUDA context with lazily loaded kernels (CUDA_MODULE_LOADING=LAZY, the default since torch 1.13),
# about 0.5 GiB on A100/H100 hosts; NCCL's buffers per communicator, NCCL_BUFFSIZE (4 MiB, NCCL docs)
# for send and receive on each of up to 32 channels: 256 MiB.
CUDA_CONTEXT_BYTES = 512 * 1024**2
NCCL_BYTES_PER_COMMUNICATOR = 2 * 4 * 1024**2 * 32
# Resident memory of one CPU training process before its model: the interpreter, torch, transformers,
# the gloo process group. Fitted as the intercept of the measured peaks of the tiny example under seven
# configurations (fsdp2, zero2, zero3, ddp, lora, checkpointing, 4x the tokens): 560 MiB, each run within
# 11% (tests/test_e2e_launch.py holds the runs to 15%). Tensors this size are served by glibc's mmap path
# and unmapped on free, so the high-water mark sees live tensors; no fragmentation factor is added on CPU.
CPU_PROCESS_BASELINE_BYTES = 560 * 1024**2
# The same with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_ in the training environment): glibc no
# longer raises the threshold to each freed block's size (up to 32 MiB), so freed tensors leave the heap at
# once and VmHWM counts live tensors only, as a GPU's caching allocator reuses blocks. Fitted as the intercept
# of six runs with the threshold at 128 KiB (the tiny example under DDP, FSDP2 and ZeRO-2; a 4-layer
# 512-wide Llama off, selective and full; tests/test_train_checkpointing.py): 440 MiB, each within 10%.
CPU_PROCESS_BASELINE_FIXED_MMAP_BYTES = 440 * 1024**2
# The threshold a CPU-device plan fixes for its training processes where the recipe sets none (plan.json
# runtime.env): with glibc's dynamic one, the 2 MiB-aligned allocations of transparent huge pages
# (runtime/train/host_allocator.py) land in the heap once the threshold has risen, fragment it, and the resident
# set creeps up every step (the tiny example at seq_len 256 under LoRA DPO: 1,406 to 1,595 MiB over 44 steps),
# which no plan can promise. Fixed at 2 MiB, every huge-page tensor is mapped and unmapped on free while smaller
# ones still reuse the heap: 1,411 to 1,431 MiB over the same 44 steps, flat after the 7th, within the
# 560 MiB-baseline fit above (1.09 at step 44), and as fast (bench/train_throughput.py: 1.24x HF Trainer; at
# 128 KiB the small tensors' page faults cost it 0.97x).
CPU_MMAP_THRESHOLD_BYTES = 2 * 1024**2
# DeepSpeed's engine on the CPU accelerator peaks above the FSDP2 run of the same model by 70-120 MiB over
# a 12-step run (its flat partition buffers, the shm/gloo comm setup): measured, not derived.
CPU_DEEPSPEED_EXTRA_BYTES = 96 * 1024**2


@dataclass(frozen=True)
class Figure:
    """A memory figure in bytes and the formula that produced it."""

    bytes: int
    formula: str


# How the decoder layers recompute activations in backward, from most memory to least (runtime/train/checkpointing.py).
CHECKPOINT_MODES = ("off", "selective", "full")


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
    activation_checkpointing: str  # one of CHECKPOINT_MODES
    lora_dropout: float
    lora_targets: tuple[str, ...]
    nf4_double_quant: bool
    on_cpu: bool
    model_init: str = "pretrained"  # pretrained | random: how the runtime builds the base
    model_dtype: str = "bf16"  # recipe model.dtype
    weights_dtype: str = "fp32"  # recipe training.weights_dtype: fp32 master, or pure bf16
    expandable_segments: bool = True  # the CUDA allocator mode the run uses
    fsdp_embedding_units: str = "auto"  # recipe training.fsdp_embedding_units
    zero_fp32_grad_partition: bool = True
    loss_chunk_tokens: int = 0  # plan.json loss.chunk_tokens: 0 is the plain loss (dapc.kernels)
    cpu_fixed_mmap_threshold: bool = False  # MALLOC_MMAP_THRESHOLD_ set for the training processes (CPU device)
    checkpoint_every_layers: int = 1  # under full checkpointing, every k-th layer is checkpointed
    document_masks: bool = False  # data.document_boundaries separate: a packed-document attention mask
    reference_copy: bool = False  # dpo with full training: a frozen copy of the starting model in the compute dtype

    @property
    def checkpointed_layers(self) -> int:
        """Decoder layers that recompute in backward: all for selective, ceil(L/k) for full (layers 0, k, 2k, ...),
        none when off."""
        if self.activation_checkpointing == "off":
            return 0
        if self.activation_checkpointing == "selective":
            return self.arch.num_layers
        return -(-self.arch.num_layers // self.checkpoint_every_layers)

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
    def stream_bytes(self) -> int:
        """Bytes per element of the residual stream between decoder layers (σ): the embedding's output dtype.
        FSDP2 gathers parameters in the compute dtype and DeepSpeed casts the module to it; under DDP the
        embedding and the norms run in the dtype they are stored in and autocast leaves additions alone, so an
        fp32 embedding (full training's fp32 weights, a LoRA/QLoRA base loaded in fp32: what peft's
        prepare_model_for_kbit_training makes) carries fp32 through every layer."""
        if self.strategy.backend != "ddp":
            return self.compute_bytes
        stored = self.loading.trained_dtype if self.method == "full" else self.loading.base_dtype
        return max(DTYPE_BYTES[stored], self.compute_bytes)

    @property
    def adapter_bytes(self) -> int:
        """Bytes per element of the LoRA adapters as a matmul reads them: FSDP2 and DeepSpeed hand them over in
        the compute dtype, DDP in the dtype they are stored in."""
        if self.strategy.backend != "ddp":
            return self.compute_bytes
        return DTYPE_BYTES[self.loading.trained_dtype]

    @property
    def shard(self) -> int:
        """The shard degree D."""
        return shard_degree(self.strategy, self.world_size, self.gpus_per_node)


def quantized_params(params: ParamCounts) -> int:
    """Returns the parameters QLoRA stores in NF4: the decoder Linear layers (attention and MLP).

    Embeddings, norms and the LM head stay in the base dtype (runtime/train/nf4.py quantizes decoder Linears only).
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


def trained_param_bytes(w: Workload) -> int:
    """Returns bytes per element of the trained parameters as the backend stores them."""
    return DTYPE_BYTES[w.loading.trained_dtype]


def _on_gpu(place: str) -> bool:
    return place == "gpu"


def weights(w: Workload) -> Figure:
    """Returns bytes per GPU of stored parameters: trained weights plus any frozen base."""
    d = w.shard if w.strategy.params_sharded else 1
    if not _on_gpu(w.strategy.params_on):
        return Figure(0, f"parameters live on {w.strategy.params_on}; gathered per layer (see buffers)")
    trained = w.trainable_params * trained_param_bytes(w)
    trained_formula = f"N_t·{trained_param_bytes(w)}"
    if w.method == "qlora" and w.strategy.backend == "deepspeed" and d > 1:
        # The runtime hides the NF4 weights from DeepSpeed, which cannot move, cast or partition them: they stay
        # whole on every rank; ZeRO-3 partitions only the rest.
        nf4 = nf4_bytes(quantized_params(w.params), w.nf4_double_quant)
        rest = (w.params.total - quantized_params(w.params)) * w.base_bytes
        return Figure(nf4 + (rest + trained) // d,
                      f"N_linear NF4 whole + ((N - N_linear)·{w.base_bytes} + N_t·{trained_param_bytes(w)}) / D={d}")
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
    if w.reference_copy:
        # runtime/train/preference.py: the reference is built like the policy, cast to the compute dtype, frozen, and
        # sharded like the policy's parameters (FSDP2 units, ZeRO-3 partitions), else whole on every rank.
        ref_formula = f"N·{w.compute_bytes} frozen dpo reference copy"
        base, base_formula = base + w.params.total * w.compute_bytes, " + ".join(
            f for f in (base_formula, ref_formula) if f)
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
        t, name = trained_param_bytes(w), w.loading.trained_dtype
        return Figure(n_t * t // d, f"N_t·{t} / D={d} ({name} gradients of {name} parameters)")
    c = w.compute_bytes
    if not w.zero_fp32_grad_partition:
        return Figure(n_t * c // d, f"N_t·{c} / D={d} [ZeRO paper §3: 16-bit gradients]")
    shard = w.shard
    if w.strategy.zero_stage == 3:
        return Figure(n_t * 4 // shard, f"N_t·4 / D={shard} fp32 partitions [DeepSpeed stage3 estimator]")
    return Figure(n_t * c // d + n_t * 4 // shard,
                  f"N_t·{c} / D={d} 16-bit + N_t·4 / D={shard} fp32 partition [DeepSpeed stage_1_and_2 estimator]")


def optimizer_bytes_per_param(w: Workload) -> tuple[float, str]:
    """Returns optimizer bytes per trainable parameter (moments, plus DeepSpeed's fp32 master) and the formula."""
    # torch AdamW keeps m and v in the parameter's dtype (`zeros_like(param)`): fp32, or bf16 when pure bf16.
    moment = 2 * trained_param_bytes(w) if not _uses_master_copy(w) else 8
    states = ADAM8BIT_BYTES_PER_PARAM if w.optimizer == "adamw-8bit" else float(moment)
    states_text = ("2.03 (8-bit m, v + block absmax)" if w.optimizer == "adamw-8bit"
                   else f"{moment} ({'fp32' if moment == 8 else 'bf16'} m, v)")
    if _uses_master_copy(w):
        return states + 4, f"4 (fp32 master) + {states_text}"
    return states, states_text


def optimizer(w: Workload) -> Figure:
    """Returns bytes per GPU of optimizer state (AdamW moments, plus the fp32 master copy under ZeRO)."""
    per_param, text = optimizer_bytes_per_param(w)
    if w.strategy.optimizer_on != "gpu":
        return Figure(0, f"optimizer states on {w.strategy.optimizer_on}")
    d = w.shard if w.strategy.optimizer_sharded else 1
    return Figure(int(w.trainable_params * per_param) // d, f"N_t·({text}) / D={d} [ZeRO paper §3, K=12]")


def _norm_bytes_per_token(w: Workload) -> int:
    # transformers' LlamaRMSNorm upcasts its input to fp32 (the stream itself when it is fp32) and keeps that for
    # backward (4h), and its weight multiply keeps the normalized input, cast back to the stream dtype (σ·h), for
    # the weight's gradient (counted for a frozen base too: see `_linear_inputs_bytes_per_token`).
    return (4 + w.stream_bytes) * w.arch.hidden_size


def _linear_inputs_bytes_per_token(w: Workload, width: int, input_bytes: int, consumers: tuple[str, ...],
                                   saved_elsewhere: bool = False) -> int:
    """Returns bytes per token that the Linears reading one tensor (`width` wide, `input_bytes` per element)
    keep of it for their weight gradients.

    A Linear keeps its input in the compute dtype: the tensor itself when it is already in it (one copy for all
    its readers), otherwise autocast's cast, which autocast does not cache for activations: one copy per reader.
    A frozen base is counted as if trained. In dapc's runtime it keeps only its weight (torch's linear
    backward; torchao's LinearNF4 saves the weight alone), but bitsandbytes' MatMul4Bit as the published QLoRA
    runs used it (its 2024 releases: `ctx.tensors = (A, B)` whenever the input needs a gradient) keeps the
    input, and the published runs plan within bounds only with it (tests/published_runs.py: median 3.1% with,
    6.5% without): the plan stays an upper bound on dapc's runtime, by what tests/test_memory_activations.py
    measures. A LoRA adapter's lora_A keeps its input too: peft casts it to the adapter's dtype and autocast
    casts that to the compute dtype, so it is the shared tensor only when all three agree and there is no
    dropout; dropout keeps its mask and lora_A its dropped copy. The mask is bool on a GPU (CUDA's fused
    native_dropout) and in the input's dtype on a CPU (aten's unfused dropout multiplies by a mask of that
    dtype). `saved_elsewhere`: the shared copy is already counted (the SDPA output o_proj reads as a view).
    """
    c = w.compute_bytes
    shared, copies = (True, 0) if input_bytes == c else (False, len(consumers))
    adapters = 0 if w.method == "full" else sum(name in w.lora_targets for name in consumers)
    masks = adapters if w.lora_dropout > 0 else 0
    if masks or not input_bytes == w.adapter_bytes == c:
        copies += adapters
    kept = copies + (1 if shared and not saved_elsewhere else 0)
    mask_bytes = w.adapter_bytes if w.on_cpu else 1
    return width * (c * kept + mask_bytes * masks)


def _lora_rank(w: Workload) -> int:
    shapes = decoder_linear_shapes(w.arch)
    targets = [name for name in w.lora_targets if name in shapes]
    if w.method == "full" or not targets:
        return 0
    return _lora_params_per_layer(w) // sum(shapes[name][0] + shapes[name][1] for name in targets)


def layer_activation_bytes_per_token(w: Workload) -> int:
    """Returns bytes saved for backward by one decoder layer per token (SDPA/flash attention).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4.1)
    count 34·s·b·h bytes per layer for GPT with fp16 and flash-style attention (no 5·a·s²·b term).
    Here the same inventory is taken tensor by tensor for transformers' Llama layer, and checked
    against the tensors autograd actually saves, for full training, LoRA (targets, dropout, adapter dtype) and
    an fp32 residual stream under autocast (tests/test_memory_activations.py): two RMSNorms (see above); the
    inputs the Linears keep (`_linear_inputs_bytes_per_token`); attention keeps the rotated q (c·h_q), k and v at
    their GQA width (2·c·h_kv; SDPA takes `enable_gqa`), the SDPA output, which o_proj reads as a view
    (c·h_q), and the fp32 log-sum-exp (4·a); the SwiGLU MLP keeps gate, up and silu(gate) (3·c·i), and down_proj
    their product; each LoRA adapter's lora_A output (c·r), which lora_B keeps. RoPE's cos and sin are computed
    once per model and shared by all layers (see `activations`). The residual stream is σ wide per element
    (`Workload.stream_bytes`), the matmul outputs c.
    """
    c, a, sigma = w.compute_bytes, w.arch, w.stream_bytes
    q_width, kv_width = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    attention = c * (2 * q_width + 2 * kv_width) + 4 * a.num_attention_heads
    mlp = 3 * c * a.intermediate_size
    inputs = (_linear_inputs_bytes_per_token(w, a.hidden_size, sigma, ("q_proj", "k_proj", "v_proj"))
              + _linear_inputs_bytes_per_token(w, q_width, c, ("o_proj",), saved_elsewhere=True)
              + _linear_inputs_bytes_per_token(w, a.hidden_size, sigma, ("gate_proj", "up_proj"))
              + _linear_inputs_bytes_per_token(w, a.intermediate_size, c, ("down_proj",)))
    adapters = c * _lora_rank(w) * len(w.lora_targets)  # _lora_rank is 0 in full training
    return 2 * _norm_bytes_per_token(w) + attention + mlp + inputs + adapters


def selective_layer_bytes_per_token(w: Workload) -> int:
    """Returns bytes one decoder layer keeps per token under selective checkpointing (runtime/train/
    checkpointing.py: every matmul's and attention's outputs are kept, the ops between them recomputed, as
    torchtitan's op-level policy). Kept: the layer's input (σ·h, checkpoint's own), the q, k, v projections
    (c·h_q + 2·c·h_kv), attention's output and fp32 log-sum-exp (c·h_q + 4·a), o_proj's output (c·h), gate and up
    (2·c·i) and down's output (c·h); with LoRA also each adapter's two matmul outputs (c·(r + out)) [the same
    inventory as `layer_activation_bytes_per_token`, restricted to matmul and attention outputs; checked
    against torch's MemTracker in tests/test_memory_fake_oracle.py]."""
    c, a = w.compute_bytes, w.arch
    q_width, kv_width = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    kept = (w.stream_bytes * a.hidden_size + c * (2 * q_width + 2 * kv_width + 2 * a.hidden_size
                                                  + 2 * a.intermediate_size) + 4 * a.num_attention_heads)
    rank, shapes = _lora_rank(w), decoder_linear_shapes(a)
    if rank:
        kept += sum(c * (rank + shapes[name][1]) for name in w.lora_targets)
    return kept


def _final_norm_and_rope_bytes_per_token(w: Workload) -> int:
    # The final norm, the input lm_head keeps (trained only in full training) and RoPE's cos and sin, shared by
    # all layers and made in the stream's dtype.
    head_input = _linear_inputs_bytes_per_token(w, w.arch.hidden_size, w.stream_bytes, ("lm_head",))
    return _norm_bytes_per_token(w) + head_input + 2 * w.stream_bytes * w.arch.head_dim


def activations_kept(w: Workload) -> Figure:
    """Returns bytes per GPU of activations held for backward once the forward of a micro-batch is done."""
    figure = _activations_kept(w)
    if not w.document_masks:
        return figure
    # transformers builds one boolean [b, 1, s, s] mask for SDPA from the restarting position ids (masking_utils
    # sdpa_mask); every layer's attention saves that same tensor for backward.
    mask = w.micro_batch * w.seq_len**2
    return Figure(figure.bytes + mask, figure.formula + " + b·s² packed-document mask (bool)")


def _activations_kept(w: Workload) -> Figure:
    tokens = w.micro_batch * w.seq_len
    final_norm = _final_norm_and_rope_bytes_per_token(w) * tokens
    if w.activation_checkpointing == "full":
        # Korthikanti et al. §5 full recomputation: each checkpointed layer keeps only its input (c·s·b·h); with
        # every k-th layer checkpointed, the others keep their whole inventory.
        n, rest = w.checkpointed_layers, w.arch.num_layers - w.checkpointed_layers
        kept = (n * w.stream_bytes * w.arch.hidden_size + rest * layer_activation_bytes_per_token(w)) * tokens
        if rest:
            return Figure(kept + final_norm, f"⌈L/{w.checkpoint_every_layers}⌉·σ·s·b·h inputs of checkpointed layers "
                          "+ the other layers' inventory·s·b + final norm, RoPE")
        return Figure(kept + final_norm, "L·σ·s·b·h layer inputs + final norm, RoPE")
    if w.activation_checkpointing == "selective":
        kept = w.arch.num_layers * selective_layer_bytes_per_token(w) * tokens
        return Figure(kept + final_norm, "L·(input + matmul and attention outputs)·s·b selective + final norm, RoPE")
    layers = w.arch.num_layers * layer_activation_bytes_per_token(w) * tokens
    return Figure(layers + final_norm, "L·(per-layer inventory)·s·b + final norm, RoPE [Korthikanti 2022]")


def layer_backward_bytes(w: Workload) -> Figure:
    """Returns bytes per GPU live only while one decoder layer runs its backward: with checkpointing, that
    layer's activations recomputed; always, the gradients flowing through it. Autograd frees each saved
    tensor once its consumer's backward has run, so one layer's worth is the most alive at once.

    Gradients: the layer output's gradient (σ·h per token, the stream's dtype), and inside the SwiGLU MLP the
    gradients of the product, of up and of silu(gate) alive together (3·c·i) [derived from the autograd graph
    of transformers' LlamaMLP]."""
    tokens = w.micro_batch * w.seq_len
    c, a = w.compute_bytes, w.arch
    grads = (w.stream_bytes * a.hidden_size + 3 * c * a.intermediate_size) * tokens
    flash, flash_text = _flash_backward_workspace_bytes_per_token(w) * tokens, ""
    if flash:
        flash_text = " + flash-attention backward workspace"
    if w.activation_checkpointing == "off":
        return Figure(grads + flash, "(σ·h + 3·c·i)·s·b gradients in one layer's backward" + flash_text)
    if w.activation_checkpointing == "full" and (w.arch.num_layers - 1) % w.checkpoint_every_layers:
        # The last layer, whose backward runs first, kept all it needs; a checkpointed layer recomputes only after
        # a later layer's backward freed as much as the recompute makes.
        return Figure(grads + flash, "(σ·h + 3·c·i)·s·b gradients in one layer's backward (the last layer is not "
                      "checkpointed)" + flash_text)
    recomputed = layer_activation_bytes_per_token(w) * tokens
    if w.activation_checkpointing == "selective":  # what was kept is not made again
        recomputed = max(0, layer_activation_bytes_per_token(w) - selective_layer_bytes_per_token(w)) * tokens
    return Figure(recomputed + grads + flash,
                  "one layer recomputed + (σ·h + 3·c·i)·s·b gradients in its backward" + flash_text)


def _flash_backward_workspace_bytes_per_token(w: Workload) -> int:
    # CUDA SDPA's flash backward (aten's copy of flash-attn 2, flash_api.cpp mha_bwd) accumulates dq in fp32
    # (4·h per token) and, under GQA, computes dk and dv at full head count before summing them (2·c·h).
    if w.on_cpu:
        return 0
    a = w.arch
    gqa = a.num_key_value_heads != a.num_attention_heads
    return 4 * a.num_attention_heads * a.head_dim + (2 * w.compute_bytes * a.num_attention_heads * a.head_dim if gqa else 0)


def logits(w: Workload) -> Figure:
    """Returns bytes per GPU of the output logits and cross-entropy tensors at their peak (in backward).

    transformers' ForCausalLMLoss upcasts the logits to fp32 and calls cross_entropy, which keeps only
    its fp32 log-softmax output (4·s·b·V); the logits themselves are not kept for backward. In backward
    nll_loss's gradient (4) and log_softmax's (4) are alive together with that output: 12·s·b·V, in
    bf16 as in fp32 (the forward peak, c + 4 + 4, is lower).

    The chunked loss (runtime/train/loss.py) keeps no chunk's logits past its forward; backward recomputes
    one chunk of T = min(chunk, s·b) positions and holds the same three fp32 tensors for it: 12·T·V.
    """
    tokens = w.micro_batch * w.seq_len
    if w.loss_chunk_tokens:
        chunk = min(w.loss_chunk_tokens, tokens)
        return Figure(12 * w.arch.vocab_size * chunk,
                      f"12·T·V, T = {chunk} positions (one chunk's fp32 log-softmax + its two gradients, recomputed)")
    return Figure(12 * w.arch.vocab_size * tokens, "12·s·b·V (fp32 log-softmax + its two gradients)")


def separate_embedding_units(params: ParamCounts, choice: str = "auto") -> bool:
    """Returns whether the runtime gives the embedding and the LM head FSDP2 units of their own (resharded
    after use, as torchtitan does) rather than leaving them in the root unit, which FSDP2 keeps gathered from
    forward through backward. Tied weights are one parameter and stay in the root."""
    return not params.tied and choice != "root"


def _lora_params_per_layer(w: Workload) -> int:
    return 0 if w.method == "full" else w.trainable_params // w.arch.num_layers


def layer_gathered_bytes(w: Workload) -> int:
    """Returns bytes of one decoder layer as FSDP2 all-gathers it: its parameters in the param dtype (the
    compute dtype), NF4 where QLoRA quantized them, plus its LoRA adapters."""
    c, per_layer = w.compute_bytes, w.params.per_layer
    lora = _lora_params_per_layer(w) * c
    if w.method != "qlora":
        return per_layer * c + lora
    linear = sum(i * o for i, o in decoder_linear_shapes(w.arch).values())
    return nf4_bytes(linear, w.nf4_double_quant) + (per_layer - linear) * c + lora


def _layer_grad_bytes(w: Workload) -> int:
    # FSDP2 computes a layer's unsharded gradients in the param dtype, then casts them to the fp32
    # reduce dtype for the reduce-scatter: c + 4 bytes per trainable element (4 when computing in fp32).
    trainable = w.params.per_layer if w.method == "full" else _lora_params_per_layer(w)
    c = w.compute_bytes
    return trainable * (c + (4 if c < 4 else 0))


def _autocast_weight_copy_bytes(w: Workload) -> int:
    """Returns bytes of the compute-dtype copies autocast makes of fp32 weights that matmuls read, alive through
    backward: a trained weight's copy is cached for the whole forward and backward (torch.autocast's cache
    holds leaves that require grad), a frozen one's is what its Linear keeps for the input gradient. Embedding
    lookups and norms are not cast, and NF4 weights are dequantized one at a time (`_qlora_scratch`)."""
    c, p = w.compute_bytes, w.params
    if c == 4:
        return 0
    head = p.embedding if p.tied else p.lm_head  # a tied head reads the embedding matrix
    linears = p.attention + p.mlp
    if w.method == "full":
        return (linears + head) * c if w.loading.trained_dtype == "fp32" else 0
    adapters = w.trainable_params if w.loading.trained_dtype == "fp32" else 0
    base = head + (linears if w.method == "lora" else 0) if w.loading.base_dtype == "fp32" else 0
    return (adapters + base) * c


def _comm_buffer_bytes(w: Workload, phase: str) -> tuple[int, str]:
    """Communication buffers and gathered parameters live in `phase` ("loss": the cross-entropy's backward,
    every activation still held; "layer": the first decoder layer's backward)."""
    c, h, p = w.compute_bytes, w.arch.hidden_size, w.params
    s = w.strategy
    if s.backend == "ddp":
        cast = _autocast_weight_copy_bytes(w)
        # The runtime sets gradient_as_bucket_view: DDP's buckets are the gradients, no second copy.
        return cast, "DDP buckets are views of the gradients" + (" + N_fp32·c autocast weight copies" if cast else "")
    if s.backend == "fsdp2":
        # fully_shard per decoder layer, then the root: the root group is not resharded after forward
        # (FSDP2's root heuristic), so what it holds stays gathered through backward. In the loss's backward
        # the last layer is being prefetched; in a layer's backward that layer and the prefetched next are
        # gathered, and the layer's gradients exist unsharded with their fp32 reduce copy.
        layer = layer_gathered_bytes(w)
        if separate_embedding_units(w.params, w.fsdp_embedding_units):
            # Embedding and head are FSDP2 units of their own (resharded after use): in the loss's backward
            # only the head is gathered; in the layers' backward neither (the embedding comes last).
            root, root_text = (p.lm_head + h) * c if phase == "loss" else h * c, (
                "head·c gathered" if phase == "loss" else "embedding and head resharded")
            head_grad = 0  # reduce-scattered by the head's own unit right after its backward
        else:
            root, root_text = (p.embedding + p.lm_head + h) * c, "root (emb + head)·c gathered"
            head_grad = p.lm_head * c if w.method == "full" else 0  # reduced with the root at the very end
        if phase == "loss":
            return root + layer, f"{root_text} + 1 layer prefetched"
        return (root + 2 * layer + _layer_grad_bytes(w) + head_grad,
                f"{root_text} + 2 layers gathered + 1 layer's grads·(c+4)" + (" + head grad·c" if head_grad else ""))
    # DeepSpeed with the bucket sizes the rendered ds_config sets (HF's `auto`: h² elements).
    reduce_bucket = h * h * c * 2
    if s.zero_stage == 3:
        gathered = 4 * p.largest_layer  # DeepSpeed estimate_zero3_model_states_mem_needs: 4·largest layer
        prefetch = int(0.9 * h * h) * c
        return gathered + prefetch + reduce_bucket, "4·largest_layer + 0.9·h²·c prefetch + 2·h²·c reduce buckets"
    allgather_bucket = h * h * c
    return reduce_bucket + allgather_bucket, "2·h²·c reduce + h²·c all-gather buckets"


@dataclass(frozen=True)
class Peak:
    """Bytes per GPU by component at the step's peak, which phase it is, and the allocator's share of buffers."""

    figures: dict[str, Figure]
    phase: str
    allocator_reserve_bytes: int
    reclaimable_bytes: int = 0  # of the reserve: cached blocks the allocator frees and retries with before an OOM

    @property
    def total_bytes(self) -> int:
        """All components at the peak."""
        return sum(f.bytes for f in self.figures.values())


PHASES = {"loss": "the loss's backward (all activations held, logits at their peak)",
          "layer": "the first decoder layer's backward (logits freed)"}


def peak(w: Workload) -> Peak:
    """Returns the per-GPU peak of a training step: the model states, plus the larger of two moments.

    Activations, logits and buffers do not peak together: at the loss's backward every activation is held
    and the cross-entropy tensors are at their largest; in the first layer's backward the logits are gone
    but that layer's recomputed activations, its gradients, the gathered layers and the dequantization
    scratch are alive. Each component is reported as it is at the larger moment."""
    states = {"weights": weights(w), "gradients": gradients(w), "optimizer": optimizer(w)}
    kept = activations_kept(w)
    candidates = []
    for phase in PHASES:
        comm, comm_formula = _comm_buffer_bytes(w, phase)
        if phase == "loss":
            acts, logit, scratch = kept, logits(w), 0
        else:
            extra = layer_backward_bytes(w)
            acts = Figure(kept.bytes + extra.bytes, f"{kept.formula} + {extra.formula}")
            logit, scratch = Figure(0, "freed before the decoder layers' backward"), _qlora_scratch(w)
        transient = acts.bytes + logit.bytes
        overhead, over_formula = _overhead(w, transient + comm + scratch)
        scratch_formula = " + largest Linear dequantized" if scratch else ""
        buffer = Figure(comm + scratch + overhead, comm_formula + scratch_formula + over_formula)
        figures = {**states, "activations": acts, "logits": logit, "buffers": buffer}
        # Without expandable segments the cache grows past need; on a failed cudaMalloc the allocator releases
        # its unused cached blocks and retries (c10 CUDACachingAllocator), so only the expandable-segments
        # share of waste decides whether the step fits.
        reclaimable = 0 if w.on_cpu or w.expandable_segments else overhead - int(CUDA_FRAGMENTATION * (
            transient + comm + scratch))
        candidates.append(Peak(figures, phase, 0 if w.on_cpu else overhead, reclaimable))
    return max(candidates, key=lambda c: c.total_bytes)


def _qlora_scratch(w: Workload) -> int:
    # One Linear dequantized to the compute dtype at a time (torchao linear_nf4, runtime/train/nf4.py).
    if w.method != "qlora":
        return 0
    return max(i * o for i, o in decoder_linear_shapes(w.arch).values()) * w.compute_bytes


def _overhead(w: Workload, churn_bytes: int) -> tuple[int, str]:
    if w.on_cpu:
        deepspeed = w.strategy.backend == "deepspeed"
        baseline = CPU_PROCESS_BASELINE_FIXED_MMAP_BYTES if w.cpu_fixed_mmap_threshold else CPU_PROCESS_BASELINE_BYTES
        overhead = baseline + (CPU_DEEPSPEED_EXTRA_BYTES if deepspeed else 0)
        return overhead, f" + {overhead // 1024**2} MiB process baseline{' with DeepSpeed' if deepspeed else ''} (measured)"
    share = CUDA_FRAGMENTATION if w.expandable_segments else CUDA_FRAGMENTATION_WITHOUT_EXPANDABLE_SEGMENTS
    mode = "expandable segments" if w.expandable_segments else "no expandable segments"
    return int(share * churn_bytes), f" + {share}·(transient + comm) allocator reserve ({mode})"


def outside_allocator(w: Workload) -> Figure:
    """Returns device bytes outside PyTorch's allocator (CUDA context, NCCL buffers): not in any torch counter,
    but on the card. 0 on the CPU device."""
    if w.on_cpu:
        return Figure(0, "no CUDA context on the CPU device")
    communicators = 0 if w.world_size == 1 else (2 if w.strategy.hybrid and w.nodes > 1 else 1)
    nccl = communicators * NCCL_BYTES_PER_COMMUNICATOR
    return Figure(CUDA_CONTEXT_BYTES + nccl, f"CUDA context 512 MiB + {communicators} NCCL communicator(s) × 256 MiB")
