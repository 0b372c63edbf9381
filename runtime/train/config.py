"""plan.json → `TrainPlan`: the trainer's view of the typed plan, read through `dapc.plan_schema.load_plan`.

`dapc.plan_schema.load_plan` is the one reader of plan.json (schema_version, every key and type, the hash);
`TrainPlan` only gathers the fields the trainer uses under short names. Nothing is defaulted or derived
here: plan.json is complete by contract, and what the runtime does (load mode, dtypes, schedule points) the
compiler decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapc.plan_schema import Plan, PlanError, Schedule, Tracking
from dapc.plan_schema import load_plan as load_typed_plan

__all__ = ["FsdpSettings", "LoraSettings", "PlanError", "SourceData", "Tracking", "TrainPlan", "load_plan", "train_plan"]


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class FsdpSettings:
    mesh: tuple[int, ...]  # sizes, outermost first; their product is the world size
    mesh_dims: tuple[str, ...]  # ("shard",) or ("replicate", "shard")
    reshard_after_forward: bool
    param_dtype: str  # torch dtype name
    reduce_dtype: str
    cpu_offload: bool
    separate_embedding_units: bool  # embedding and LM head as FSDP2 units of their own
    sync_every_micro_batch: bool  # reduce-scatter each micro-batch (no unsharded gradient accumulation)


@dataclass(frozen=True)
class SourceData:
    name: str
    prepared_dir: str
    share: float  # of the training stream's sequences


@dataclass(frozen=True)
class PreferenceSettings:
    """plan.json `objective.preference`, as the trainer reads it."""

    loss: str  # sigmoid (dpo) | orpo
    beta: float
    label_smoothing: float
    reference: str  # copy | adapters-off | precomputed | none
    reference_logps_path: str | None  # precomputed: plan.json paths.reference_logps_path


@dataclass(frozen=True)
class TrainPlan:
    path: str
    plan_sha256: str
    trajectory_sha256: str  # equal across plans that differ only in the GPU layout: resumable across them
    # model
    model_source: str
    model_dtype: str  # bf16 | fp16 | fp32: recipe model.dtype
    model_init: str  # random | pretrained
    model_config: dict[str, Any]  # the full HF config, passed to the model class as is
    tokenizer: str
    # loading, as the compiler decided it (plan.json `loading`)
    load_mode: str  # every-rank | rank0-broadcast | meta-sharded-quantize | zero3-init
    base_dtype: str  # bf16 | fp16 | fp32: the frozen base (LoRA/QLoRA)
    trained_dtype: str  # bf16 | fp16 | fp32: the trained parameters as the backend stores them
    # method
    method: str
    lora: LoraSettings
    quant_type: str
    double_quant: bool
    # training
    lr: float
    min_lr: float
    schedule: str
    warmup_steps: int
    lr_schedule: Schedule  # plan.json `schedule` as is: dapc.schedule.lr_at reads it
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    grad_clip: float | None
    precision: str
    seed: int
    log_every_steps: int
    optimizer: str
    # batch and run length
    seq_len: int
    micro_batch: int
    grad_accum: int
    global_batch_sequences: int
    world_size: int
    activation_checkpointing: str  # off | selective | full (runtime/train/checkpointing.py)
    checkpoint_every_layers: int  # full: every k-th decoder layer is checkpointed
    loss_chunk_tokens: int  # 0: the plain loss; else positions per chunk of the chunked loss (runtime/train/loss.py)
    compile_layers: bool  # torch.compile each decoder layer
    steps: int
    flops_per_token: float
    planned_step_seconds: float  # cost.step_seconds: the modelled step, next to the measured one
    device_peak_flops: float  # per device, from the plan's device entry (bf16 TFLOP/s)
    # backend
    strategy: str
    backend: str
    zero_stage: int | None  # DeepSpeed's ZeRO stage (plan.json strategy.zero_stage); None for DDP/FSDP2
    fsdp: FsdpSettings | None
    deepspeed: dict[str, Any] | None  # the full DeepSpeed config (ds_config.json), passed to DeepSpeed as is
    # checkpoints and outputs
    checkpoint_every_steps: int
    keep_last: int
    export_hf: bool
    merge_lora: bool
    output_dir: str
    prepared_dir: str
    sources: tuple[SourceData, ...]  # plan.json corpus.sources: where each was prepared, its share
    document_boundaries: str  # concatenate | separate (positions and attention per packed document)
    objective: str  # cpt (labels = input_ids) | sft (labels masked to the assistant's tokens) | dpo | orpo
    preference: PreferenceSettings | None  # dpo/orpo: plan.json objective.preference
    tokens_per_step: int  # plan.json batch.global_batch_tokens (dpo/orpo: both sequences of every pair)
    checkpoint_dir: str
    export_dir: str
    metrics_path: str
    stop_file: str  # when it exists, checkpoint after the current step and exit (a preemption notice)
    tracking: Tracking  # runtime.tracking as is: TensorBoard, W&B, MLflow (rank 0)
    # memory
    memory_total_bytes: int
    memory_counter: str


def load_plan(path: str | Path) -> TrainPlan:
    """Reads the plan at `path` through the typed loader and returns the trainer's view of it.

    Raises PlanError (one line, exit 2) when it cannot be run."""
    return train_plan(load_typed_plan(path), str(path))


def train_plan(plan: Plan, path: str) -> TrainPlan:
    """Returns the trainer's view of a typed plan read from `path`."""
    r, t, b = plan.recipe, plan.recipe.training, plan.batch
    fsdp = plan.runtime.fsdp
    return TrainPlan(
        path=path,
        plan_sha256=plan.plan_sha256,
        trajectory_sha256=plan.trajectory_sha256,
        model_source=r.model.source,
        model_dtype=r.model.dtype,
        model_init=r.model.init,
        model_config=plan.model.config,
        tokenizer=r.data.tokenizer,  # resolved by the compiler; load_plan refuses a plan without one
        load_mode=plan.loading.mode,
        base_dtype=plan.loading.base_dtype,
        trained_dtype=plan.loading.trained_dtype,
        method=r.method.name,
        lora=LoraSettings(r.method.lora.r, r.method.lora.alpha, r.method.lora.dropout,
                          tuple(r.method.lora.target_modules)),
        quant_type=r.method.quant_type,
        double_quant=r.method.double_quant,
        lr=plan.schedule.peak_lr,
        min_lr=plan.schedule.min_lr,
        schedule=plan.schedule.kind,
        warmup_steps=plan.schedule.warmup_steps,
        lr_schedule=plan.schedule,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        grad_clip=t.grad_clip,
        precision=t.precision,
        seed=t.seed,
        log_every_steps=t.log_every_steps,
        optimizer=t.optimizer,
        seq_len=b.seq_len,
        micro_batch=b.micro_batch,
        grad_accum=b.grad_accum,
        global_batch_sequences=b.global_batch_sequences,
        world_size=b.world_size,
        activation_checkpointing=plan.activation_checkpointing,
        checkpoint_every_layers=plan.activation_checkpointing_every_layers,
        loss_chunk_tokens=plan.loss.chunk_tokens,
        compile_layers=plan.torch_compile.enabled,
        steps=plan.cost.steps,
        flops_per_token=plan.cost.flops_per_token,
        planned_step_seconds=plan.cost.step_seconds,
        device_peak_flops=plan.device.bf16_tflops * 1e12,
        strategy=plan.strategy.name,
        backend=plan.runtime.backend,
        zero_stage=plan.strategy.zero_stage,
        fsdp=None if fsdp is None else FsdpSettings(
            tuple(fsdp.mesh), tuple(fsdp.mesh_dims), fsdp.reshard_after_forward, fsdp.param_dtype,
            fsdp.reduce_dtype, fsdp.cpu_offload, fsdp.separate_embedding_units, fsdp.sync_every_micro_batch),
        deepspeed=plan.runtime.deepspeed,
        checkpoint_every_steps=r.checkpoint.every_steps,
        keep_last=r.checkpoint.keep_last,
        export_hf=r.checkpoint.export_hf,
        merge_lora=r.checkpoint.merge_lora,
        output_dir=plan.paths.output_dir,
        prepared_dir=plan.paths.prepared_dir,
        sources=tuple(SourceData(s.name, s.prepared_dir, s.share) for s in plan.corpus.sources),
        document_boundaries=r.data.document_boundaries,
        objective=plan.objective.name,
        preference=None if (p := plan.objective.preference) is None else PreferenceSettings(
            p.loss, p.beta, p.label_smoothing, p.reference, plan.paths.reference_logps_path),
        tokens_per_step=b.global_batch_tokens,
        checkpoint_dir=plan.paths.checkpoint_dir,
        export_dir=plan.paths.export_dir,
        metrics_path=plan.paths.metrics_path,
        stop_file=plan.runtime.preemption.stop_file,
        tracking=plan.runtime.tracking,
        memory_total_bytes=plan.memory.per_gpu_bytes.total,
        memory_counter=plan.memory.counter,
    )
