"""Enumerate strategies × activation checkpointing × micro-batch, keep what fits, rank by modelled step time.

Pure: a Spec in, a Decision out. Where nothing fits, it says what would, with the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import ceil

from dapc import cost, memory, memory_loading
from dapc.compat import Setting, refusal
from dapc.corpus import CorpusError, count_records
from dapc.errors import DapcError
from dapc.kernels import LossDecision, decide_loss
from dapc.loading import Loading
from dapc.memory import CHECKPOINT_MODES, GIB, Workload
from dapc.models import lora_trainable_params
from dapc.recipe.schema import PREFERENCE_OBJECTIVES
from dapc.reference import reference_kind
from dapc.resolve import Spec
from dapc.sources import PlannedSource, SourcePlanError, plan_sources
from dapc.strategies import PREFERENCE_ORDER, STRATEGIES, Strategy

MAX_MICRO_BATCH = 64
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "buffers")


class PlanInputError(DapcError):
    """A pinned choice that cannot be evaluated (e.g. a micro-batch that does not divide the batch)."""

    def __init__(self, message: str, key_path: tuple):
        super().__init__(message)
        self.key_path = key_path


@dataclass(frozen=True)
class Candidate:
    """One evaluated configuration: its memory per GPU, host and NVMe needs, time, and whether it fits."""

    strategy: Strategy
    micro_batch: int
    activation_checkpointing: str  # dapc.memory.CHECKPOINT_MODES
    grad_accum: int
    figures: dict[str, memory.Figure]
    peak_phase: str
    load_peak_bytes: int
    cpu_per_node_bytes: int
    nvme_per_node_bytes: int
    capacity_bytes: int
    headroom_bytes: int
    cpu_ram_bytes: int
    nvme_bytes: int
    step: cost.StepTime
    loading: Loading
    allocator_reserve_bytes: int
    reclaimable_bytes: int
    outside_allocator_bytes: int
    checkpoint_bytes: int  # one checkpoint, all ranks together
    checkpoint_every_layers: int = 1  # full checkpointing of every k-th layer

    @property
    def checkpointing_text(self) -> str:
        """The checkpointing mode as the plan's tables show it: off, selective, full, or full/k (every k-th layer)."""
        k = self.checkpoint_every_layers
        return f"full/{k}" if self.activation_checkpointing == "full" and k > 1 else self.activation_checkpointing

    @property
    def total_bytes(self) -> int:
        """Bytes per GPU, all components."""
        return sum(f.bytes for f in self.figures.values())

    @property
    def fit_bytes(self) -> int:
        """Bytes per GPU that must fit: the total less cached blocks the allocator would release before failing."""
        return self.total_bytes - self.reclaimable_bytes

    @property
    def misfit(self) -> str | None:
        """Why it does not fit, with the arithmetic; None when it fits."""
        outside = self.outside_allocator_bytes
        beside = f" + {outside / GIB:.1f} GiB CUDA context and NCCL" if outside else ""
        if self.fit_bytes + outside + self.headroom_bytes > self.capacity_bytes:
            return (f"needs {self.fit_bytes / GIB:.1f} GiB{beside} + {self.headroom_bytes / GIB:.1f} GiB headroom "
                    f"per GPU > {self.capacity_bytes / GIB:.1f} GiB")
        if self.load_peak_bytes + outside + self.headroom_bytes > self.capacity_bytes:
            return (f"loading needs {self.load_peak_bytes / GIB:.1f} GiB{beside} + {self.headroom_bytes / GIB:.1f} GiB "
                    f"headroom per GPU > {self.capacity_bytes / GIB:.1f} GiB")
        if self.cpu_per_node_bytes > self.cpu_ram_bytes:
            return (f"needs {self.cpu_per_node_bytes / GIB:.0f} GiB CPU RAM per node "
                    f"> {self.cpu_ram_bytes / GIB:.0f} GiB (hardware.cpu_ram_gib)")
        if self.nvme_per_node_bytes > self.nvme_bytes:
            return (f"needs {self.nvme_per_node_bytes / GIB:.0f} GiB NVMe per node "
                    f"> {self.nvme_bytes / GIB:.0f} GiB (hardware.nvme_gib)")
        return None

    @property
    def fits(self) -> bool:
        """True when GPU memory (with headroom), host RAM and NVMe all suffice."""
        return self.misfit is None

    def sort_key(self) -> tuple:
        """Fastest first; ties go to the simpler strategy, less recomputation (selective's elementwise recompute
        is not in the time model), then the larger micro-batch."""
        return (round(self.step.step_seconds, 6), PREFERENCE_ORDER.index(self.strategy.name),
                CHECKPOINT_MODES.index(self.activation_checkpointing), self.checkpoint_every_layers, -self.micro_batch)


@dataclass(frozen=True)
class Alternative:
    """The best configuration of a strategy that was not chosen, and why it lost."""

    candidate: Candidate
    lost_because: str


@dataclass(frozen=True)
class FewestGpus:
    """The smallest GPU count (of this GPU type) on which a sharded strategy fits at micro-batch 1."""

    gpus: int
    strategy: str
    activation_checkpointing: str  # dapc.memory.CHECKPOINT_MODES
    total_bytes: int


@dataclass(frozen=True)
class Decision:
    """The planner's answer: the chosen candidate (possibly not fitting), alternatives, and remedies."""

    chosen: Candidate
    strategy_forced: bool
    reason: str
    alternatives: list[Alternative]
    suggestions: list[str]
    steps: int
    tokens: int
    tokens_exact: bool
    sources: tuple[PlannedSource, ...] = ()
    fewest_gpus: "FewestGpus | None" = None

    @property
    def fits(self) -> bool:
        """True when the chosen configuration fits."""
        return self.chosen.fits


def _workload(spec: Spec, strategy: Strategy, micro_batch: int, checkpointing: str, **changes) -> Workload:
    r = spec.recipe
    workload = Workload(
        arch=spec.arch, params=spec.params, method=r.method.name, trainable_params=spec.trainable_params,
        precision=r.training.precision, optimizer=r.training.optimizer, strategy=strategy,
        world_size=spec.world_size, gpus_per_node=r.hardware.gpus_per_node, nodes=r.hardware.nodes,
        micro_batch=micro_batch * sequences_per_example(r.training.objective), seq_len=r.data.seq_len,
        activation_checkpointing=checkpointing,
        lora_dropout=r.method.lora.dropout, lora_targets=tuple(r.method.lora.target_modules),
        nf4_double_quant=r.method.double_quant, on_cpu=spec.device.is_cpu, model_init=r.model.init,
        model_dtype=r.model.dtype, weights_dtype=r.training.weights_dtype,
        expandable_segments=expandable_segments(r), fsdp_embedding_units=r.training.fsdp_embedding_units,
        loss_chunk_tokens=loss_decision(spec).chunk_tokens,
        # A recipe's own (low) threshold; the plan's default (dapc.memory.CPU_MMAP_THRESHOLD_BYTES) keeps the heap
        # as the 560 MiB baseline was measured, without its creep over long runs.
        cpu_fixed_mmap_threshold="MALLOC_MMAP_THRESHOLD_" in r.launch.env,
        document_masks=r.data.document_boundaries == "separate",
        reference_copy=reference_kind(r) == "copy",
    )
    return replace(workload, **changes) if changes else workload


def checkpoint_mode(choice: str | bool) -> str:
    """Returns the CHECKPOINT_MODES entry for recipe `training.activation_checkpointing` (not `auto`): true and
    false are full and off."""
    return {True: "full", False: "off"}.get(choice, choice)  # type: ignore[call-overload]


def loss_decision(spec: Spec) -> LossDecision:
    """Returns how the runtime computes the loss for this spec (plan.json `loss`)."""
    t = spec.recipe.training
    return decide_loss(t.chunked_loss, t.loss_chunk_tokens, spec.device.is_cpu)


def _refusal(spec: Spec, strategy: Strategy, world_size: int | None = None) -> tuple[tuple[str, ...], str] | None:
    return refusal(Setting(spec.recipe, strategy, spec.arch, world_size or spec.world_size))


def expandable_segments(recipe) -> bool:
    """Returns whether the training processes run with the expandable-segments CUDA allocator."""
    conf = recipe.launch.env.get("PYTORCH_CUDA_ALLOC_CONF")
    if conf is not None:
        return "expandable_segments:true" in conf.replace(" ", "").lower()
    return recipe.launch.cuda_expandable_segments


def evaluate(spec: Spec, strategy: Strategy, micro_batch: int, checkpointing: str, every_layers: int = 1,
             **changes) -> Candidate:
    """Returns the memory, host needs and modelled time of one configuration (`every_layers`: under full
    checkpointing, every k-th decoder layer is checkpointed)."""
    every_layers = every_layers if checkpointing == "full" else 1
    w = _workload(spec, strategy, micro_batch, checkpointing, checkpoint_every_layers=every_layers, **changes)
    at_peak = memory.peak(w)
    hw = spec.recipe.hardware
    per_rank_sequences = spec.global_batch_sequences // w.world_size
    grad_accum = max(1, per_rank_sequences // micro_batch)
    tokens_per_step = tokens_per_optimizer_step(spec)
    flops = cost.flops_per_token(spec.arch, spec.params, w.seq_len, w.method, recompute_share(w),
                                 chunked_loss=w.loss_chunk_tokens > 0, reference_forward=reference_forward(spec))
    step = cost.step_time(strategy, spec.device, hw.inter_node_gbps, w.world_size, w.gpus_per_node,
                          w.trainable_params, memory.gathered_param_bytes(w), w.compute_bytes, grad_accum, tokens_per_step,
                          flops, hw.assumed_mfu)
    capacity = spec.device.memory_bytes
    outside = memory.outside_allocator(w).bytes
    figures, reserve, reclaimable = _cache_capped_at_the_card(at_peak, capacity - outside)
    return Candidate(
        strategy=strategy, micro_batch=micro_batch, activation_checkpointing=checkpointing, grad_accum=grad_accum,
        figures=figures, peak_phase=at_peak.phase, load_peak_bytes=memory_loading.load_peak(w).bytes,
        cpu_per_node_bytes=memory_loading.host_per_node(w).bytes,
        nvme_per_node_bytes=memory_loading.nvme_per_node(w).bytes, capacity_bytes=capacity,
        headroom_bytes=int(capacity * hw.headroom_fraction), cpu_ram_bytes=int(hw.cpu_ram_gib * GIB),
        nvme_bytes=int(hw.nvme_gib * GIB), step=step, loading=w.loading,
        allocator_reserve_bytes=reserve, reclaimable_bytes=reclaimable, outside_allocator_bytes=outside,
        checkpoint_bytes=memory_loading.checkpoint_bytes(w).bytes, checkpoint_every_layers=every_layers,
    )


def sequences_per_example(objective: str) -> int:
    """Returns the sequences one training example puts through the model: 2 for a preference pair (chosen and
    rejected), else 1."""
    return 2 if objective in PREFERENCE_OBJECTIVES else 1


def tokens_per_optimizer_step(spec: Spec) -> int:
    """Returns the tokens one optimizer step puts through the model: the global batch's sequences (dpo/orpo: its
    pairs, two sequences each) × seq_len."""
    r = spec.recipe
    return spec.global_batch_sequences * sequences_per_example(r.training.objective) * r.data.seq_len


def reference_forward(spec: Spec) -> bool:
    """Returns whether every step also runs the dpo reference forward (the copy, or the base with adapters off)."""
    return reference_kind(spec.recipe) in ("copy", "adapters-off")


def reference_pass_tokens(spec: Spec) -> int:
    """Returns the tokens a precomputed dpo reference scores once before training (every training pair, both
    sequences; `_pair_tokens`), else 0."""
    if reference_kind(spec.recipe) != "precomputed":
        return 0
    return sum((_pair_tokens(spec) or {}).values())


def reference_pass_seconds(spec: Spec) -> float:
    """Returns the modelled seconds of a precomputed reference's pass (forward only, every GPU at the assumed
    MFU), else 0."""
    tokens = reference_pass_tokens(spec)
    if not tokens:
        return 0.0
    flops = cost.forward_flops_per_token(spec.arch, spec.params, spec.recipe.data.seq_len) * tokens
    return cost.compute_seconds(flops, spec.world_size, spec.device, spec.recipe.hardware.assumed_mfu)


def recompute_share(w: Workload) -> float:
    """Returns the share of decoder layers whose whole forward runs again in backward: full checkpointing's
    checkpointed layers; selective recomputes only elementwise ops, which the time model does not count."""
    return w.checkpointed_layers / w.arch.num_layers if w.activation_checkpointing == "full" else 0.0


def _cache_capped_at_the_card(at_peak: memory.Peak, available_bytes: int) -> tuple[dict, int, int]:
    """The peak's figures with the allocator's reclaimable cache cut to what the card leaves free: a cache
    cannot outgrow the device (the allocator releases it and retries first), so `total`, the predicted
    max_memory_reserved, never exceeds the card where the step fits. Returns (figures, reserve, reclaimable)."""
    needed = at_peak.total_bytes - at_peak.reclaimable_bytes
    kept = min(at_peak.reclaimable_bytes, max(0, available_bytes - needed))
    cut = at_peak.reclaimable_bytes - kept
    if not cut:
        return at_peak.figures, at_peak.allocator_reserve_bytes, at_peak.reclaimable_bytes
    buffers = at_peak.figures["buffers"]
    capped = memory.Figure(buffers.bytes - cut, buffers.formula + ", cache capped at the card")
    return {**at_peak.figures, "buffers": capped}, at_peak.allocator_reserve_bytes - cut, kept


AUTO_EVERY_LAYERS = (1, 2, 4)


def every_layers_choices(choice: str | int, num_layers: int, mode_auto: bool) -> list[int]:
    """Returns the k of full checkpointing (every k-th layer) to try: the recipe's; for `auto`, AUTO_EVERY_LAYERS up
    to L where the planner also picks the mode, else 1 (a pinned `full` checkpoints every layer)."""
    if choice != "auto":
        return [int(choice)]
    return [k for k in AUTO_EVERY_LAYERS if k <= num_layers] if mode_auto else [1]


def micro_batch_choices(per_rank_sequences: int) -> list[int]:
    """Returns the micro-batches that divide a rank's sequences per step, up to MAX_MICRO_BATCH."""
    return [m for m in range(1, min(per_rank_sequences, MAX_MICRO_BATCH) + 1) if per_rank_sequences % m == 0]


def _check_batch(spec: Spec) -> int:
    g, world = spec.global_batch_sequences, spec.world_size
    t = spec.recipe.training
    batch_key = ("training", "global_batch_sequences" if t.global_batch_sequences else "global_batch_tokens")
    if g % world:
        raise PlanInputError(
            f"global batch {g} sequences is not divisible by {world} GPUs "
            f"({_nodes_text(spec.recipe.hardware.nodes)} × {spec.recipe.hardware.gpus_per_node}); {g} / {world} = {g / world:.2f}",
            batch_key,
        )
    per_rank = g // world
    pinned = spec.recipe.training.micro_batch
    if pinned != "auto" and per_rank % pinned:
        raise PlanInputError(
            f"micro_batch {pinned} × {world} GPUs × grad_accum must equal the global batch of {g} sequences, "
            f"but {g} / {world} = {per_rank} per GPU is not a multiple of {pinned}",
            ("training", "micro_batch"),
        )
    return per_rank


def _nodes_text(nodes: int) -> str:
    return f"{nodes} node{'s' if nodes != 1 else ''}"


def _tokens(spec: Spec) -> tuple[int, bool, tuple[PlannedSource, ...]]:
    """The token budget, whether the recipe gave it exactly, and each source's share of it (`dapc.sources`)."""
    r = spec.recipe
    try:
        total, planned = plan_sources(spec.sources, r.training.tokens, r.training.epochs, r.data.tokens_per_byte,
                                      _pair_tokens(spec))
    except SourcePlanError as e:
        raise PlanInputError(e.message, e.key_path) from e
    exact = r.training.tokens is not None or all(s.tokens is not None for s in spec.sources if s.role == "domain")
    return total, exact, planned


def _pair_tokens(spec: Spec) -> dict[str, int] | None:
    """dpo/orpo: each source's tokens as the trainer reads them, whatever the text's length: every training pair is
    two sequences of seq_len (`prepare` pads each response to it), and a pair is a JSONL line, counted here; the
    validation share is the expected one (prepare splits by a hash of each line)."""
    r = spec.recipe
    if sequences_per_example(r.training.objective) == 1:
        return None
    try:
        pairs = {s.name: count_records(s.files) for s in spec.sources}
    except CorpusError as e:
        raise PlanInputError(e.message, ("data", "paths")) from e
    per_pair = sequences_per_example(r.training.objective) * r.data.seq_len
    return {name: int(n * (1 - r.data.validation_fraction)) * per_pair for name, n in pairs.items()}


def _lost_because(best: Candidate, other: Candidate) -> str:
    if not other.fits:
        return f"does not fit: {other.misfit}"
    if other.step.step_seconds > best.step.step_seconds * (1 + 1e-6):
        return f"slower: {other.step.step_seconds:.3g} s/step vs {best.step.step_seconds:.3g} s/step"
    return f"same modelled speed ({other.step.step_seconds:.3g} s/step); {best.strategy.name} has fewer moving parts"


def _smallest_fitting(cands: list[Candidate]) -> Candidate:
    return min(cands, key=lambda c: (not c.fits, c.total_bytes))


def plan(spec: Spec) -> Decision:
    """Returns the planner's decision for `spec`. Raises PlanInputError for pinned choices that cannot apply."""
    per_rank = _check_batch(spec)
    t = spec.recipe.training
    forced = spec.recipe.strategy != "auto"
    strategies = [STRATEGIES[spec.recipe.strategy]] if forced else [STRATEGIES[n] for n in PREFERENCE_ORDER]
    if forced and (refused := _refusal(spec, strategies[0])):
        raise PlanInputError(f"{refused[1]} (strategy {spec.recipe.strategy})", refused[0])
    allowed = [s for s in strategies if _refusal(spec, s) is None]
    if not allowed:
        key, reason = _refusal(spec, strategies[0])
        raise PlanInputError(f"no strategy the runtime can run: {reason}", key)
    strategies = allowed
    checkpointing = list(CHECKPOINT_MODES) if t.activation_checkpointing == "auto" else [
        checkpoint_mode(t.activation_checkpointing)]
    layer_steps = every_layers_choices(t.checkpoint_every_layers, spec.arch.num_layers,
                                       t.activation_checkpointing == "auto")
    modes = [(c, k) for c in checkpointing for k in (layer_steps if c == "full" else (1,))]
    micro_batches = micro_batch_choices(per_rank) if t.micro_batch == "auto" else [t.micro_batch]
    per_strategy: dict[str, list[Candidate]] = {}
    for strategy in strategies:
        per_strategy[strategy.name] = [
            evaluate(spec, strategy, m, ckpt, k) for ckpt, k in modes for m in micro_batches
        ]
    best_of = {}
    for name, cands in per_strategy.items():
        fitting = sorted((c for c in cands if c.fits), key=Candidate.sort_key)
        best_of[name] = fitting[0] if fitting else _smallest_fitting(cands)
    # Fitting configurations by speed; then the rest by how close they come to fitting.
    ranked = sorted((c for c in best_of.values() if c.fits), key=Candidate.sort_key) + sorted(
        (c for c in best_of.values() if not c.fits), key=lambda c: c.total_bytes)
    chosen = ranked[0]
    tokens, exact, planned_sources = _tokens(spec)
    steps = max(1, ceil(tokens / tokens_per_optimizer_step(spec)))
    if t.max_steps is not None:
        steps = min(steps, t.max_steps)
    suggestions = [] if chosen.fits else suggest(spec, chosen)
    return Decision(
        fewest_gpus=fewest_gpus(spec),
        chosen=chosen,
        strategy_forced=forced,
        reason=_reason(chosen, forced, len(per_strategy), sum(c.fits for c in best_of.values())),
        alternatives=[Alternative(c, _lost_because(chosen, c)) for c in ranked[1:]],
        suggestions=suggestions,
        steps=steps,
        tokens=tokens,
        tokens_exact=exact,
        sources=planned_sources,
    )


MAX_GPUS = 65536


def fewest_gpus(spec: Spec) -> FewestGpus | None:
    """Returns the fewest GPUs of the recipe's type on which the method fits at micro-batch 1 (the recipe's
    activation checkpointing, or on when `auto`), under the recipe's pinned strategy if it shards, else the
    sharded strategies: what a team rents at the least. None when nothing up to MAX_GPUS fits.

    Per-GPU memory of a sharded strategy only falls as GPUs are added, so doubling then bisecting finds it."""
    pinned = spec.recipe.strategy
    # Refusals depend on the world size (NF4 rows must split evenly): `best` checks each size it tries.
    names = [pinned] if pinned != "auto" and STRATEGIES[pinned].params_sharded else ["fsdp2-full", "zero3"]
    ckpt = spec.recipe.training.activation_checkpointing
    ckpt = "full" if ckpt == "auto" else checkpoint_mode(ckpt)
    gpn = spec.recipe.hardware.gpus_per_node

    def best(world: int, runnable_only: bool = False) -> Candidate | None:
        nodes, per_node = -(-world // gpn), min(world, gpn)
        cands = [evaluate(spec, STRATEGIES[n], 1, ckpt, world_size=world, nodes=nodes, gpus_per_node=per_node)
                 for n in names if not runnable_only or _refusal(spec, STRATEGIES[n], world) is None]
        fitting = [c for c in cands if c.fits]
        return min(fitting, key=lambda c: c.total_bytes) if fitting else None

    high = 1
    while best(high) is None:
        if high >= MAX_GPUS:
            return None
        high = min(2 * high, MAX_GPUS)
    low = high // 2  # does not fit (or 0)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if best(middle) else (middle, high)
    # Some world sizes the runtime cannot run (NF4 rows that do not split evenly): the next one it can.
    world = next((n for n in range(high, min(4 * high, MAX_GPUS) + 1) if best(n, runnable_only=True)), None)
    if world is None:
        return None
    found = best(world, runnable_only=True)
    return FewestGpus(world, found.strategy.name, found.activation_checkpointing, found.total_bytes)


def _reason(chosen: Candidate, forced: bool, considered: int, fitting: int) -> str:
    gib = chosen.total_bytes / GIB
    where = f"{gib:.1f} GiB of {chosen.capacity_bytes / GIB:.1f} GiB per GPU"
    if not chosen.fits:
        return f"{'pinned by the recipe' if forced else 'nothing fits'}: {chosen.misfit}"
    if forced:
        return f"pinned by the recipe; fits ({where})"
    return (f"fastest modelled step ({chosen.step.step_seconds:.3g} s) of {fitting} fitting strategies "
            f"out of {considered}; {where}")


def suggest(spec: Spec, closest: Candidate) -> list[str]:
    """Returns what would fit where nothing does: more GPUs, QLoRA, offload, a shorter sequence. With numbers."""
    hw, out = spec.recipe.hardware, []
    sharded = [STRATEGIES["fsdp2-full"], STRATEGIES["zero3"]]

    def fits_with(strategy: Strategy, **changes) -> Candidate | None:
        # Nothing the runtime would refuse (checked with the recipe's own method, at the suggested world size).
        if "method" not in changes and _refusal(spec, strategy, changes.get("world_size")) is not None:
            return None
        cands = [evaluate(spec, strategy, 1, "full", **changes)]
        return cands[0] if cands[0].fits else None

    # A whole-base load peak does not shrink with more GPUs, offload or shorter sequences: only another method
    # helps. The meta-sharded loader's peak is a shard, which more GPUs do shrink.
    load_bound = (closest.load_peak_bytes + closest.outside_allocator_bytes + closest.headroom_bytes
                  > closest.capacity_bytes and closest.loading.mode != "meta-sharded-quantize")
    for nodes in (n for n in range(hw.nodes + 1, 1 if load_bound else 4097) if n == hw.nodes + 1 or n % 2 == 0):
        world = nodes * hw.gpus_per_node
        found = next((c for s in sharded if (c := fits_with(s, world_size=world, nodes=nodes))), None)
        if found:
            out.append(f"{nodes} nodes ({world} GPUs): {found.strategy.name} with micro_batch 1 and activation "
                       f"checkpointing needs {found.total_bytes / GIB:.1f} GiB per GPU")
            break
    if spec.recipe.method.name != "qlora":
        qlora = fits_with(STRATEGIES["fsdp2-full"], method="qlora", trainable_params=_lora_params(spec))
        if qlora:
            out.append(f"method: qlora (NF4 base, LoRA r={spec.recipe.method.lora.r}): fsdp2-full needs "
                       f"{qlora.total_bytes / GIB:.1f} GiB per GPU on {spec.world_size} GPUs")
    for name in () if load_bound else ("zero3-offload-cpu", "zero3-offload-cpu-full", "fsdp2-offload-cpu",
                                       "zero3-offload-nvme"):
        if _refusal(spec, STRATEGIES[name]) is not None:
            continue
        offload = evaluate(spec, STRATEGIES[name], 1, "full")
        if offload.fits:
            out.append(f"strategy: {name}: {offload.total_bytes / GIB:.1f} GiB per GPU, "
                       f"{offload.cpu_per_node_bytes / GIB:.0f} GiB CPU RAM per node")
            break
    seq_len = 0 if load_bound else spec.recipe.data.seq_len // 2
    while seq_len >= 256:
        short = next((c for s in sharded if (c := fits_with(s, seq_len=seq_len))), None)
        if short:
            out.append(f"data.seq_len: {seq_len}: {short.strategy.name} needs {short.total_bytes / GIB:.1f} GiB per GPU")
            break
        seq_len //= 2
    if not out:
        out.append(f"nothing tried fits; the closest, {closest.strategy.name}, {closest.misfit}")
    return out


def _lora_params(spec: Spec) -> int:
    lora = spec.recipe.method.lora
    return lora_trainable_params(spec.arch, lora.r, list(lora.target_modules))
