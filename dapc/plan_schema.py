"""plan.json, the contract: typed models (torch-free) and the one loader every reader goes through.

The compiler builds a `Plan`; render and report read its fields; every runtime entry point (prepare, train,
export, evaluate) calls `load_plan`, which checks `schema_version` first and then every key and type, and
raises `PlanError` (one line naming the file and the key path, exit 2) for anything else. Nothing indexes a
raw plan dict. `recipe` is the resolved recipe itself (the same record the compiler validated).
"""


import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from dapc.dtypes import Precision
from dapc.errors import DapcError
from dapc.loading import LoadMode
from dapc.memory import CHECKPOINT_MODES
from dapc.recipe.schema import DataFormat, Recipe, StrategyName
from dapc.typed import Field, Model, ValidationError

SCHEMA_VERSION = 5
MAX_PLAN_BYTES = 64 * 1024**2  # a plan is kilobytes; anything this large is not one
Counter = Literal["cuda.max_memory_reserved", "cuda.max_memory_allocated", "cpu.vm_hwm"]
Backend = Literal["ddp", "fsdp2", "deepspeed"]
TorchDtypeName = Literal["float32", "bfloat16", "float16"]


class PlanError(DapcError):
    """A plan.json that cannot be used: unreadable, not a plan, of another schema version, or inconsistent."""


CheckpointMode = Literal[CHECKPOINT_MODES]  # type: ignore[valid-type]


class _Part(Model):
    pass


class ParamGroups(_Part):
    """Exact parameter counts (elements) by tensor group; tied embeddings count once, in `embedding`."""
    total: int
    embedding: int
    attention: int
    mlp: int
    norms: int
    lm_head: int
    experts: int


class ModelInfo(_Part):
    """The model: name, parameter counts, architecture facts, and its HF config as read at compile time."""
    name: str
    params: ParamGroups
    tied: bool
    per_layer_params: int
    largest_layer_params: int
    architecture: dict[str, int | str | bool]
    config: dict[str, Any] = Field(description="The model's HF config.json, passed to transformers as is.")


class MethodInfo(_Part):
    """The training method and how many parameters it trains."""
    name: Literal["full", "lora", "qlora"]
    trainable_params: int


class StrategyInfo(_Part):
    """The sharding strategy, whether the recipe pinned it, why, and its backend."""
    name: StrategyName  # type: ignore[valid-type]
    forced: bool
    reason: str
    backend: Backend
    zero_stage: int
    description: str


class Batch(_Part):
    """The batch geometry: micro_batch × grad_accum × world_size = global_batch_sequences (dpo/orpo: pairs, two
    sequences each; global_batch_tokens counts both)."""
    seq_len: int = Field(ge=1)
    micro_batch: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    global_batch_sequences: int = Field(ge=1)
    global_batch_tokens: int = Field(ge=1)
    global_batch_origin: str
    world_size: int = Field(ge=1)
    nodes: int = Field(ge=1)
    gpus_per_node: int = Field(ge=1)


class PerGpuBytes(_Part):
    """Bytes per GPU by component at the step's peak (`Memory.peak_phase`); total predicts `Memory.counter`."""
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    buffers: int
    total: int


class Formulas(_Part):
    """The formula, with its source, behind each component of `PerGpuBytes`."""
    weights: str
    gradients: str
    optimizer: str
    activations: str
    logits: str
    buffers: str


class Memory(_Part):
    """Memory per GPU, the device, whether it fits (fit needs + outside the allocator + headroom ≤ capacity),
    the loading peak, and host RAM and NVMe per node."""
    per_gpu_bytes: PerGpuBytes
    formulas: Formulas
    device_capacity_bytes: int
    headroom_bytes: int
    fits: bool
    misfit: str | None
    peak_phase: Literal["loss", "layer"] = Field(description="When the step peaks: the loss's backward, or the "
                                                 "first decoder layer's backward (dapc.memory.PHASES).")
    load_peak_bytes: int
    allocator_reserve_bytes: int = Field(description="Part of buffers the caching allocator holds beyond live "
                                         "tensors: total minus this predicts cuda.max_memory_allocated.")
    reclaimable_bytes: int = Field(description="Of the allocator reserve, cached blocks released before an OOM "
                                   "(without expandable segments): `fits` leaves them out.")
    outside_allocator_bytes: int = Field(description="CUDA context and NCCL buffers: on the device, in no torch "
                                         "counter; `fits` adds them to total.")
    cpu_per_node_bytes: int
    nvme_per_node_bytes: int
    counter: Counter


class Alternative(_Part):
    """The best configuration of a strategy that was not chosen, and why it lost."""
    strategy: StrategyName  # type: ignore[valid-type]
    micro_batch: int
    activation_checkpointing: CheckpointMode
    activation_checkpointing_every_layers: int = Field(ge=1)
    fits: bool
    total_bytes: int
    step_seconds: float
    lost_because: str


class FewestGpus(_Part):
    """The fewest GPUs of this type the method fits on at micro-batch 1, with the sharded strategy that does it."""

    gpus: int = Field(ge=1)
    strategy: StrategyName  # type: ignore[valid-type]
    activation_checkpointing: CheckpointMode
    total_bytes: int


class Cost(_Part):
    """Tokens, steps, modelled step time by part, and the run's wall time, GPU-hours, dollars and kWh."""
    tokens: int
    tokens_exact: bool
    tokens_per_byte_assumed: float | None
    corpus_bytes: int
    corpus_files: int
    flops_per_token: float
    assumed_mfu: float
    compute_seconds: float
    comm_seconds: float
    offload_seconds: float
    step_seconds: float
    steps: int = Field(ge=1)
    wall_seconds: float
    gpu_hours: float
    usd: float
    kwh: float


class DeviceInfo(_Part):
    """The accelerator as the plan assumed it: capacity in bytes, dense bf16 TFLOP/s, bandwidths, power."""
    name: str
    memory_bytes: int
    bf16_tflops: float
    memory_bandwidth_gbps: float
    tdp_watts: float
    intra_node_gbps: float
    is_cpu: bool
    source: str


class Paths(_Part):
    """Where the run writes: prepared data, checkpoints, the export, metrics and evaluation."""
    output_dir: str
    prepared_dir: str
    checkpoint_dir: str
    export_dir: str
    metrics_path: str
    eval_dir: str
    reference_logps_path: str | None = Field(description="dpo with a precomputed reference: the starting model's "
                                             "summed log-probabilities of every training pair's two sequences.")


class CorpusFileInfo(_Part):
    """One corpus file: absolute path and its size when the plan was made."""
    path: str
    bytes: int = Field(ge=0)


class Source(_Part):
    """One source of the training stream (`dapc.sources`): its files, what the compiler estimated, and the share of
    the stream the sampler draws from it. `prepare` writes it to `prepared_dir`."""

    name: str
    role: Literal["domain", "replay"]
    format: DataFormat
    text_field: str | None = Field(description="The field holding the text; null for plain text.")
    files: tuple[CorpusFileInfo, ...] = Field(min_length=1)
    total_bytes: int = Field(ge=0)
    estimated_tokens: int = Field(ge=0, description="Its bytes × data.tokens_per_byte.")
    planned_tokens: int = Field(ge=0, description="Training tokens drawn from it: share × cost.tokens.")
    share: float = Field(gt=0, le=1, description="Share of the training stream's sequences drawn from it.")
    epochs: float = Field(ge=0, description="planned / estimated tokens: passes over it.")
    amount: str = Field(description="What the recipe said that set its share.")
    prepared_dir: str


class Dedup(_Part):
    """Deduplication in `prepare`, as `data.dedup` asks: exact (normalized hash) and near (MinHash LSH)."""

    exact: bool
    near: bool
    near_threshold: float
    num_perm: int
    shingle_words: int


class Decontamination(_Part):
    """Documents sharing `min_matches` word `ngram`-grams with one item of these benchmarks are dropped."""

    ngram: int
    min_matches: int
    benchmarks: dict[str, str] = Field(min_length=1, description="Benchmark name → file.")


class Corpus(_Part):
    """The corpus the compiler resolved (`dapc.corpus`, `dapc.sources`): what `prepare` reads, nothing else.
    `files` is every source's files together (the lock hashes them)."""

    sources: tuple[Source, ...] = Field(min_length=1)
    files: tuple[CorpusFileInfo, ...] = Field(min_length=1)
    total_bytes: int
    dedup: Dedup | None
    decontamination: Decontamination | None


class Preference(_Part):
    """How dpo/orpo score a preference pair (`dapc.objective`, runtime/train/preference.py): the loss, its weight,
    and where the reference log-probabilities come from."""

    loss: Literal["sigmoid", "orpo"] = Field(description="sigmoid: DPO (Rafailov et al. 2023, eq. 7); orpo: the "
                                             "chosen response's NLL plus λ·odds-ratio term (Hong et al. 2024).")
    beta: float
    label_smoothing: float
    reference: Literal["copy", "adapters-off", "precomputed", "none"] = Field(
        description="copy: a frozen copy of the starting model, sharded like the policy; adapters-off: the LoRA "
        "base with its adapters disabled (no copy); none: reference-free (orpo).")
    reference_reason: str
    sequences_per_example: int = Field(description="Sequences one example puts through the model: chosen and "
                                       "rejected.")


class Objective(_Part):
    """What the trainer learns (`dapc.objective`): every next token (cpt), only the assistant's (sft), or which of
    two responses is preferred (dpo, orpo); and how `prepare` turns records into text: the tokenizer's own chat
    template or a built-in one."""

    name: Literal["cpt", "sft", "dpo", "orpo"]
    data_format: str
    chat_template: Literal["tokenizer", "chatml"] | None = Field(description="null: no template applies.")
    targets: str = Field(description="Which tokens are loss targets.")
    reason: str
    preference: Preference | None = Field(description="dpo/orpo only.")


class Loading(_Part):
    """How the runtime builds the model (`dapc.loading`), which the memory model counted."""

    mode: LoadMode  # type: ignore[valid-type]
    base_dtype: Precision
    trained_dtype: Precision
    reason: str


class LossInfo(_Part):
    """How the runtime computes the cross-entropy (`dapc.kernels`): over the whole micro-batch, or `chunk_tokens`
    positions at a time inside the LM head (runtime/train/loss.py)."""

    kind: Literal["plain", "chunked"]
    chunk_tokens: int = Field(ge=0, description="0 for the plain loss.")
    reason: str


class TorchCompile(_Part):
    """Whether the runtime compiles each decoder layer with torch.compile (`dapc.kernels`)."""

    enabled: bool
    reason: str


class Schedule(_Part):
    """The learning rate at every step (`dapc.schedule.lr_at`): linear warmup from `warmup_start_lr` to `peak_lr`
    over `warmup_steps`, then the `kind`'s shape down to `min_lr` at the last of `total_steps` (wsd and
    constant-with-cooldown: over the last `decay_steps`). `points` are its (step, lr) key points."""

    kind: Literal["cosine", "linear", "constant", "wsd", "constant-with-cooldown"]
    peak_lr: float
    min_lr: float
    warmup_start_lr: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    decay_steps: int = Field(ge=0)
    total_steps: int = Field(ge=1)
    points: tuple[tuple[int, float], ...]


class FsdpSettings(_Part):
    """How the runtime calls `fully_shard`: mesh, dtypes, offload, unit layout and gradient sync."""
    mesh: tuple[int, ...]
    mesh_dims: tuple[Literal["replicate", "shard"], ...]
    reshard_after_forward: bool
    param_dtype: TorchDtypeName
    reduce_dtype: TorchDtypeName
    cpu_offload: bool
    separate_embedding_units: bool
    sync_every_micro_batch: bool


class Preemption(_Part):
    """How a run stops cleanly before it is killed: the Slurm job asks for SIGUSR1 `signal_seconds` before its
    time limit and creates `stop_file` when it arrives; the trainer checks for the file after every optimizer
    step, checkpoints and exits, and the job requeues itself."""
    stop_file: str
    signal_seconds: int = Field(ge=1, le=65535)
    reason: str


class TensorBoardTracking(_Part):
    """TensorBoard: event files written into `log_dir` (offline; `tensorboard --logdir` reads them)."""
    log_dir: str


class WandbTracking(_Part):
    """Weights & Biases, as `wandb.init` is called: `offline` writes under `dir`/wandb and opens no connection."""
    mode: Literal["offline", "online"]
    project: str
    entity: str | None
    dir: str


class MlflowTracking(_Part):
    """MLflow: the tracking URI (a `file:` URI is a local file store) and the experiment the run is logged in."""
    tracking_uri: str
    experiment: str


class Tracking(_Part):
    """Where the trainer's rank 0 sends each metrics.jsonl record besides the file (None: off). W&B and MLflow
    keep one run per training, identified by `trajectory_sha256` and `paths.output_dir`: a resumed run appends."""
    run_name: str
    tensorboard: TensorBoardTracking | None
    wandb: WandbTracking | None
    mlflow: MlflowTracking | None


class RuntimeSettings(_Part):
    """The backend settings the runtime applies as they are, and the training processes' environment."""
    env: dict[str, str] = Field(description="Environment of the training processes, as the launch files export it.")
    passthrough_env: tuple[str, ...] = Field(
        description="Names of variables the training processes take from the launching environment, never "
        "written into a rendered file (tokens, passwords).")
    backend: Backend
    fsdp: FsdpSettings | None
    deepspeed: dict[str, Any] | None = Field(description="ds_config.json, passed to DeepSpeed as is.")
    preemption: Preemption
    tracking: Tracking


class Lock(_Part):
    """What the plan was made with (`dapc.lock`); the runtime warns where it runs with other versions or another
    tokenizer, and refuses corpus files that changed since they were locked."""
    python: str
    packages: dict[str, str | None] = Field(description="Installed version of each of dapc.lock.PACKAGES, "
                                            "None where it was not installed.")
    tokenizer_sha256: str | None = Field(description="dapc.lock.tokenizer_identity of data.tokenizer; None where "
                                         "the tokenizer is not on the planning machine.")
    corpus_sha256: dict[str, str] | None = Field(description="sha256 of every corpus file, by path: written by "
                                                 "`dapc render` (None in `dapc plan`, which does not read them).")


class ModelSourceInfo(_Part):
    """Where the model's config was read (`dapc.models.source`): a catalog entry, a folder, the HF cache, or the
    plan of a run that will export the model (a stage planned before the stage it starts from has run)."""

    kind: Literal["catalog", "folder", "hf-cache", "export-of-plan"]
    producer_plan: str | None = Field(description="export-of-plan: that run's plan.json.")
    producer_plan_sha256: str | None = Field(description="export-of-plan: that plan's plan_sha256.")


class Provenance(_Part):
    """Where the plan came from; outside both hashes."""
    dapc_version: str
    model_config_path: str
    model_source: ModelSourceInfo
    lock: Lock


class Plan(_Part):
    """The whole plan. Everything but `provenance` is covered by `plan_sha256`."""

    schema_version: Literal[5]
    recipe: Recipe
    recipe_sha256: str
    plan_sha256: str
    trajectory_sha256: str = Field(
        description="Hash of what decides the sequence of optimizer updates (model, method, data, global batch, "
        "schedule, numerics) but not how they are laid out over GPUs: a checkpoint written under another plan "
        "with the same trajectory resumes on another world size.")
    provenance: Provenance
    model: ModelInfo
    method: MethodInfo
    strategy: StrategyInfo
    batch: Batch
    activation_checkpointing: CheckpointMode
    activation_checkpointing_every_layers: int = Field(
        ge=1, description="Under full checkpointing, every k-th decoder layer (0, k, 2k, ...) is checkpointed; 1 "
        "for off and selective.")
    memory: Memory
    alternatives: tuple[Alternative, ...]
    suggestions: tuple[str, ...]
    warnings: tuple[str, ...]
    fewest_gpus: FewestGpus | None
    cost: Cost
    device: DeviceInfo
    paths: Paths
    corpus: Corpus
    objective: Objective
    loading: Loading
    loss: LossInfo
    torch_compile: TorchCompile
    schedule: Schedule
    runtime: RuntimeSettings

    def body(self) -> dict[str, Any]:
        """Returns the hashed part as JSON values: the plan without `provenance` and `plan_sha256`."""
        return self.model_dump(mode="json", exclude={"provenance", "plan_sha256"})

    def text(self) -> str:
        """Returns plan.json's text: sorted keys, two-space indent, strict JSON, trailing newline."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2, ensure_ascii=False,
                          allow_nan=False) + "\n"


# Recipe keys that lay the same training out over devices without changing its updates; everything else in
# `recipe.training` (and the model, method and data sections) is part of the trajectory.
_LAYOUT_TRAINING_KEYS = ("micro_batch", "activation_checkpointing", "checkpoint_every_layers", "fsdp_embedding_units",
                         "chunked_loss", "loss_chunk_tokens", "compile", "log_every_steps",
                         "global_batch_tokens", "global_batch_sequences")  # the last two: resolved, in `batch`


def trajectory_of(plan: Plan) -> dict[str, Any]:
    """Returns, as JSON values, what `trajectory_sha256` covers: the resolved model, method, data and training
    settings, the global batch, the schedule, the corpus and the dtypes, without the GPU layout."""
    recipe = plan.recipe.model_dump(mode="json")
    training = {k: v for k, v in recipe["training"].items() if k not in _LAYOUT_TRAINING_KEYS}
    data = {k: v for k, v in recipe["data"].items() if k != "prepared_dir"}  # where, not what
    return {
        "model": recipe["model"], "model_config": plan.model.config, "method": recipe["method"],
        "data": data, "training": training,
        "corpus": plan.corpus.model_dump(mode="json", exclude={"sources": {"__all__": {"prepared_dir"}}}),
        "seq_len": plan.batch.seq_len, "global_batch_sequences": plan.batch.global_batch_sequences,
        "schedule": plan.schedule.model_dump(mode="json"),
        "dtypes": [plan.loading.base_dtype, plan.loading.trained_dtype],
    }


def canonical_json(value: Any) -> str:
    """Returns `value` as canonical JSON: sorted keys, no whitespace, strict (what the hashes cover)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_of(value: Any) -> str:
    """Returns the hex sha256 of `value`'s canonical JSON."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def load_plan(path: str | Path) -> Plan:
    """Reads, checks and returns the plan at `path`: the only way any runtime module reads plan.json.

    Raises PlanError (location: the file) for a file that cannot be read, is not JSON, is not a plan, has
    another `schema_version`, fails a type check (naming the key path), or whose `plan_sha256` does not match.
    """
    where = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PLAN_BYTES + 1)
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot read the plan: {getattr(e, 'strerror', None) or e}", where) from e
    if len(data) > MAX_PLAN_BYTES:
        raise PlanError(f"not a plan: larger than {MAX_PLAN_BYTES // 1024**2} MiB", where)
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise PlanError(_json_reason(e), where) from e
    if not isinstance(raw, dict) or "schema_version" not in raw:
        raise PlanError("not a plan: no schema_version (write one with `dapc render` or `dapc plan --json`)", where)
    version = raw["schema_version"]
    if version != SCHEMA_VERSION:
        raise PlanError(f"schema_version {json.dumps(version)[:20]} is not supported (this dapc reads "
                        f"{SCHEMA_VERSION}); compile the recipe again with this dapc", where)
    try:
        plan = Plan.model_validate_json(data, strict=True)  # strict: true is not 1, "3" is not 3
    except ValidationError as e:
        raise PlanError(f"not a valid plan: {_first_error(e)}", where) from e
    missing = _first_missing(raw, plan.model_dump(mode="json"))
    if missing:
        raise PlanError(f"not a valid plan: {missing}: missing (a plan is complete: no default is filled in at "
                        "run time)", where)
    if sha256_of(plan.body()) != plan.plan_sha256:
        raise PlanError("plan_sha256 does not match the plan's content: it was edited after `dapc` wrote it; "
                        "change the recipe and render again", where)
    _check_consistent(plan, where)
    return plan


def _check_consistent(plan: Plan, where: str) -> None:
    if plan.recipe.data.tokenizer is None:
        raise PlanError("not a valid plan: recipe.data.tokenizer: null (the compiler resolves it)", where)
    if plan.schedule.total_steps != plan.cost.steps:
        raise PlanError(f"schedule.total_steps {plan.schedule.total_steps} ≠ cost.steps {plan.cost.steps}", where)
    b = plan.batch
    product = b.micro_batch * b.world_size * b.grad_accum
    if product != b.global_batch_sequences:
        raise PlanError(f"batch: micro_batch {b.micro_batch} × world_size {b.world_size} × grad_accum "
                        f"{b.grad_accum} = {product} ≠ global_batch_sequences {b.global_batch_sequences}", where)
    fsdp = plan.runtime.fsdp
    if (plan.runtime.backend == "fsdp2") != (fsdp is not None):
        raise PlanError(f"runtime: backend {plan.runtime.backend} with fsdp settings {fsdp is not None}", where)
    if fsdp is not None:
        covered = 1
        for size in fsdp.mesh:
            covered *= size
        if fsdp.mesh_dims not in (("shard",), ("replicate", "shard")) or len(fsdp.mesh) != len(fsdp.mesh_dims):
            raise PlanError(f"runtime.fsdp: mesh {list(fsdp.mesh)} with dims {list(fsdp.mesh_dims)} is neither "
                            "[N] ['shard'] nor [R, S] ['replicate', 'shard']", where)
        if covered != b.world_size:
            raise PlanError(f"runtime.fsdp.mesh {list(fsdp.mesh)} covers {covered} ranks ≠ world_size "
                            f"{b.world_size}", where)


def _first_missing(raw: Any, typed: Any, path: str = "") -> str | None:
    """The first key path present in `typed` (the validated plan) but absent from `raw` (the file): a key the
    models would fill with a default."""
    if isinstance(typed, dict) and isinstance(raw, dict):
        for key, value in typed.items():
            where = f"{path}.{key}" if path else key
            if key not in raw:
                return where
            if (found := _first_missing(raw[key], value, where)) is not None:
                return found
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_reason(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"not JSON: {error.msg} at line {error.lineno} column {error.colno}"
    if isinstance(error, UnicodeDecodeError):
        return "not a plan: not UTF-8 text"
    if isinstance(error, RecursionError):
        return "not a plan: nested too deeply"
    return f"not JSON: {error}"


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    extra = f" ({len(error.errors())} problems)" if error.error_count() > 1 else ""
    return f"{key}: {first['msg']}{extra}"
