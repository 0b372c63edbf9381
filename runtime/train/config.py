"""plan.json → `TrainPlan`: the only input of the trainer, checked key by key before anything starts.

Every key the trainer uses is read here, once, with its type; a missing key, a wrong type, an unknown choice
or an unsupported `schema_version` raises `PlanError` naming the plan file and the key path, which the entry
point prints on one line (exit 2). Nothing is defaulted: plan.json is complete by contract.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapc.errors import DapcError
from runtime.memory_probe import COUNTERS

__all__ = ["SUPPORTED_SCHEMA_VERSIONS", "FsdpSettings", "LoraSettings", "PlanError", "TrainPlan", "load_plan"]

# The plan.json versions this runtime reads (dapc.plan.SCHEMA_VERSION writes them).
SUPPORTED_SCHEMA_VERSIONS = (1,)
BACKENDS = ("ddp", "fsdp2", "deepspeed")
PRECISIONS = ("bf16", "fp16", "fp32")
METHODS = ("full", "lora", "qlora")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw-8bit")
INITS = ("random", "pretrained")
TORCH_DTYPES = ("float32", "bfloat16", "float16")
_MISSING = object()


class PlanError(DapcError):
    """A plan.json the trainer cannot run: unreadable, incomplete, or of another schema version."""


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


@dataclass(frozen=True)
class TrainPlan:
    path: str
    plan_sha256: str
    # model
    model_source: str
    model_dtype: str  # bf16 | fp16 | fp32: the dtype of the (frozen) base weights
    model_init: str  # random | pretrained
    model_config: dict[str, Any]  # the full HF config, passed to the model class as is
    tokenizer: str
    # method
    method: str
    lora: LoraSettings
    quant_type: str
    double_quant: bool
    # training
    lr: float
    min_lr_ratio: float
    schedule: str
    warmup_fraction: float
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
    activation_checkpointing: bool
    steps: int
    flops_per_token: float
    device_peak_flops: float  # per device, from the plan's device entry (bf16 TFLOP/s)
    # backend
    strategy: str
    backend: str
    fsdp: FsdpSettings | None
    deepspeed: dict[str, Any] | None  # the full DeepSpeed config (ds_config.json), passed to DeepSpeed as is
    # checkpoints and outputs
    checkpoint_every_steps: int
    keep_last: int
    export_hf: bool
    merge_lora: bool
    output_dir: str
    prepared_dir: str
    checkpoint_dir: str
    export_dir: str
    metrics_path: str
    # memory
    memory_total_bytes: int
    memory_counter: str


def load_plan(path: str | Path) -> TrainPlan:
    """Reads and checks the plan at `path`. Raises PlanError (one line, exit 2) when it cannot be run."""
    where = str(path)
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise PlanError(f"cannot read the plan: {e.strerror}", where) from e
    except json.JSONDecodeError as e:
        raise PlanError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}", where) from e
    if not isinstance(raw, dict):
        raise PlanError("the plan is not a JSON object", where)
    r = _Reader(raw, where)
    version = r.get("schema_version", int)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_SCHEMA_VERSIONS))
        raise PlanError(f"schema_version {version} is not supported by this runtime (it reads {supported}); "
                        "compile the recipe again with the matching dapc", where)
    backend = r.choice("runtime.backend", BACKENDS)
    plan = TrainPlan(
        path=where,
        plan_sha256=r.get("plan_sha256", str),
        model_source=r.get("recipe.model.source", str),
        model_dtype=r.choice("recipe.model.dtype", PRECISIONS),
        model_init=r.choice("recipe.model.init", INITS),
        model_config=r.get("model.config", dict),
        tokenizer=r.get("recipe.data.tokenizer", str),
        method=r.choice("recipe.method.name", METHODS),
        lora=LoraSettings(
            r=r.get("recipe.method.lora.r", int),
            alpha=r.get("recipe.method.lora.alpha", float),
            dropout=r.get("recipe.method.lora.dropout", float),
            target_modules=tuple(r.get("recipe.method.lora.target_modules", list)),
        ),
        quant_type=r.get("recipe.method.quant_type", str),
        double_quant=r.get("recipe.method.double_quant", bool),
        lr=r.get("recipe.training.lr", float),
        min_lr_ratio=r.get("recipe.training.min_lr_ratio", float),
        schedule=r.choice("recipe.training.schedule", SCHEDULES),
        warmup_fraction=r.get("recipe.training.warmup_fraction", float),
        weight_decay=r.get("recipe.training.weight_decay", float),
        adam_beta1=r.get("recipe.training.adam_beta1", float),
        adam_beta2=r.get("recipe.training.adam_beta2", float),
        adam_eps=r.get("recipe.training.adam_eps", float),
        grad_clip=r.get("recipe.training.grad_clip", float, nullable=True),
        precision=r.choice("recipe.training.precision", PRECISIONS),
        seed=r.get("recipe.training.seed", int),
        log_every_steps=r.positive("recipe.training.log_every_steps"),
        optimizer=r.choice("recipe.training.optimizer", OPTIMIZERS),
        seq_len=r.positive("batch.seq_len"),
        micro_batch=r.positive("batch.micro_batch"),
        grad_accum=r.positive("batch.grad_accum"),
        global_batch_sequences=r.positive("batch.global_batch_sequences"),
        world_size=r.positive("batch.world_size"),
        activation_checkpointing=r.get("activation_checkpointing", bool),
        steps=r.positive("cost.steps"),
        flops_per_token=r.get("cost.flops_per_token", float),
        device_peak_flops=r.get("device.bf16_tflops", float) * 1e12,
        strategy=r.get("strategy.name", str),
        backend=backend,
        fsdp=_fsdp(r) if backend == "fsdp2" else None,
        deepspeed=r.get("runtime.deepspeed", dict) if backend == "deepspeed" else None,
        checkpoint_every_steps=r.positive("recipe.checkpoint.every_steps"),
        keep_last=r.positive("recipe.checkpoint.keep_last"),
        export_hf=r.get("recipe.checkpoint.export_hf", bool),
        merge_lora=r.get("recipe.checkpoint.merge_lora", bool),
        output_dir=r.get("paths.output_dir", str),
        prepared_dir=r.get("paths.prepared_dir", str),
        checkpoint_dir=r.get("paths.checkpoint_dir", str),
        export_dir=r.get("paths.export_dir", str),
        metrics_path=r.get("paths.metrics_path", str),
        memory_total_bytes=r.get("memory.per_gpu_bytes.total", int),
        memory_counter=r.choice("memory.counter", COUNTERS),
    )
    _check_batch(plan)
    return plan


def _fsdp(r: _Reader) -> FsdpSettings:
    settings = FsdpSettings(
        mesh=tuple(r.get("runtime.fsdp.mesh", list)),
        mesh_dims=tuple(r.get("runtime.fsdp.mesh_dims", list)),
        reshard_after_forward=r.get("runtime.fsdp.reshard_after_forward", bool),
        param_dtype=r.choice("runtime.fsdp.param_dtype", TORCH_DTYPES),
        reduce_dtype=r.choice("runtime.fsdp.reduce_dtype", TORCH_DTYPES),
        cpu_offload=r.get("runtime.fsdp.cpu_offload", bool),
    )
    if settings.mesh_dims not in (("shard",), ("replicate", "shard")) or len(settings.mesh) != len(settings.mesh_dims):
        raise PlanError(f"runtime.fsdp: mesh {list(settings.mesh)} with dims {list(settings.mesh_dims)} is neither "
                        "[N] ['shard'] nor [R, S] ['replicate', 'shard']", r.where)
    return settings


def _check_batch(p: TrainPlan) -> None:
    product = p.micro_batch * p.world_size * p.grad_accum
    if product != p.global_batch_sequences:
        raise PlanError(f"batch: micro_batch {p.micro_batch} × world_size {p.world_size} × grad_accum {p.grad_accum} "
                        f"= {product} ≠ global_batch_sequences {p.global_batch_sequences}", p.path)
    if p.fsdp is not None and _product(p.fsdp.mesh) != p.world_size:
        raise PlanError(f"runtime.fsdp.mesh {list(p.fsdp.mesh)} covers {_product(p.fsdp.mesh)} ranks ≠ world_size "
                        f"{p.world_size}", p.path)


def _product(values: tuple[int, ...]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


class _Reader:
    """Typed access to dotted key paths of the plan; every failure names the key."""

    def __init__(self, raw: dict[str, Any], where: str):
        self.raw, self.where = raw, where

    def get(self, key: str, kind: type, nullable: bool = False) -> Any:
        node: Any = self.raw
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            if node is _MISSING:
                raise PlanError(f"missing key {key}", self.where)
        if node is None and nullable:
            return None
        if kind is float and isinstance(node, int) and not isinstance(node, bool):
            return float(node)
        if not isinstance(node, kind) or (kind is int and isinstance(node, bool)):
            raise PlanError(f"{key} is {json.dumps(node)[:60]}, expected {_KIND_NAMES[kind]}", self.where)
        return node

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, str)
        if value not in choices:
            raise PlanError(f"{key} is {value!r}, expected one of {', '.join(choices)}", self.where)
        return value

    def positive(self, key: str) -> int:
        value = self.get(key, int)
        if value < 1:
            raise PlanError(f"{key} is {value}, expected a positive integer", self.where)
        return value


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "an object"}
