"""Spec + Decision → plan.json: the contract the runtime reads. Sorted keys, hashed, versioned."""

from __future__ import annotations

import os
from dataclasses import asdict
from math import ceil
from pathlib import Path
from typing import Any

from dapc import __version__
from dapc.cost import flops_per_token, run_cost
from dapc.kernels import decide_compile
from dapc.lock import installed_versions, python_version, tokenizer_identity
from dapc.memory import CPU_MMAP_THRESHOLD_BYTES, GIB
from dapc.objective import objective_decision
from dapc.plan_schema import SCHEMA_VERSION, Plan, Schedule, sha256_of, trajectory_of
from dapc.planner import (
    COMPONENTS,
    Candidate,
    Decision,
    PlanInputError,
    expandable_segments,
    loss_decision,
    reference_forward,
    reference_pass_seconds,
    tokens_per_optimizer_step,
)
from dapc.reference import reference_kind
from dapc.resolve import Spec
from dapc.runtime_config import deepspeed_config, fsdp_section
from dapc.schedule import key_points
from dapc.sources import EPOCHS_WARNING


def _rounded(value: float) -> float:
    # Stable text across platforms: 6 significant digits are far finer than the model's accuracy.
    return float(f"{value:.6g}")


def _memory(c: Candidate) -> dict[str, Any]:
    per_gpu = {name: c.figures[name].bytes for name in COMPONENTS}
    per_gpu["total"] = c.total_bytes
    return {
        "per_gpu_bytes": per_gpu,
        "formulas": {name: c.figures[name].formula for name in COMPONENTS},
        "device_capacity_bytes": c.capacity_bytes,
        "headroom_bytes": c.headroom_bytes,
        "fits": c.fits,
        "misfit": c.misfit,
        "peak_phase": c.peak_phase,
        "load_peak_bytes": c.load_peak_bytes,
        "allocator_reserve_bytes": c.allocator_reserve_bytes,
        "reclaimable_bytes": c.reclaimable_bytes,
        "outside_allocator_bytes": c.outside_allocator_bytes,
        "cpu_per_node_bytes": c.cpu_per_node_bytes,
        "nvme_per_node_bytes": c.nvme_per_node_bytes,
    }


def _paths(spec: Spec) -> dict[str, str]:
    out = Path(spec.recipe.output)
    return {
        "output_dir": str(out),
        "prepared_dir": spec.recipe.data.prepared_dir,  # resolve fills it in (default <output>/data)
        "checkpoint_dir": str(out / "checkpoints"),
        "export_dir": str(out / "export"),
        "metrics_path": str(out / "metrics.jsonl"),
        "eval_dir": str(out / "eval"),
        # dpo with a precomputed reference: the starting model's log-probabilities of every training pair
        "reference_logps_path": str(out / "reference-logps.json")
        if reference_kind(spec.recipe) == "precomputed" else None,
    }


def _training_env(spec: Spec) -> dict[str, str]:
    """The training processes' environment: the recipe's `launch.env`, plus the allocator settings the memory
    model assumed where the recipe does not set them itself: the CUDA allocator mode on GPUs, glibc's fixed mmap
    threshold on the CPU device."""
    env = dict(spec.recipe.launch.env)
    if not spec.device.is_cpu and "PYTORCH_CUDA_ALLOC_CONF" not in env and expandable_segments(spec.recipe):
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if spec.device.is_cpu:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(CPU_MMAP_THRESHOLD_BYTES))  # dapc.memory: no heap creep
    return env


# Assumed checkpoint write rate per node (shared filesystem clients commonly sustain 1-5 GB/s; the low end, so
# that the preemption signal comes early enough), and the shortest warning worth asking Slurm for.
CHECKPOINT_WRITE_BYTES_PER_SECOND_PER_NODE = 1e9
MIN_SIGNAL_SECONDS = 60


def _preemption(spec: Spec, c: Candidate, step_seconds: float) -> dict[str, Any]:
    """Returns how the run stops before its time limit: when Slurm signals it, and the file that asks the
    trainer to checkpoint and exit. The warning covers twice (one step + one checkpoint write)."""
    write_seconds = c.checkpoint_bytes / spec.recipe.hardware.nodes / CHECKPOINT_WRITE_BYTES_PER_SECOND_PER_NODE
    seconds = min(65535, max(MIN_SIGNAL_SECONDS, ceil(2 * (step_seconds + write_seconds))))
    return {
        "stop_file": str(Path(spec.recipe.output) / "stop-requested"),
        "signal_seconds": seconds,
        "reason": f"2 × (one step {step_seconds:.3g} s + writing a {c.checkpoint_bytes / GIB:.3g} GiB checkpoint "
                  f"at {CHECKPOINT_WRITE_BYTES_PER_SECOND_PER_NODE / 1e9:g} GB/s per node {write_seconds:.3g} s), "
                  f"at least {MIN_SIGNAL_SECONDS} s",
    }


def _slurm_seconds(limit: str) -> int:
    """Returns a `[days-]hours:minutes:seconds` Slurm time limit in seconds."""
    days, _, clock = limit.rpartition("-")
    hours, minutes, seconds = (int(x) for x in clock.split(":"))
    return (int(days or 0) * 24 + hours) * 3600 + minutes * 60 + seconds


def _time_limit_warnings(spec: Spec, preemption: dict[str, Any]) -> list[str]:
    limit = spec.recipe.launch.slurm.time
    if _slurm_seconds(limit) > 2 * preemption["signal_seconds"]:
        return []
    return [f"launch.slurm.time {limit} leaves little time before the preemption signal, which Slurm sends "
            f"{preemption['signal_seconds']} s before the limit; each requeued job would train only briefly"]


def _tracking(spec: Spec) -> dict[str, Any]:
    """Returns where rank 0 logs besides metrics.jsonl, every default and path resolved against `output`."""
    r = spec.recipe
    out = Path(r.output)
    tb, wb, ml = r.logging.tensorboard, r.logging.wandb, r.logging.mlflow
    return {
        "run_name": r.name,
        "tensorboard": {"log_dir": os.path.normpath(out / tb.dir)} if tb.enabled else None,
        "wandb": {"mode": wb.mode, "project": wb.project or r.name, "entity": wb.entity,
                  "dir": os.path.normpath(out / wb.dir)} if wb.enabled else None,
        "mlflow": {"tracking_uri": _mlflow_uri(ml.tracking_uri, out),
                   "experiment": ml.experiment or r.name} if ml.enabled else None,
    }


def _mlflow_uri(uri: str | None, out: Path) -> str:
    """Returns the MLflow tracking URI: the recipe's, with a relative `file:` path made absolute under `out`, or a
    file store at <out>/mlruns."""
    if uri is None:
        return (out / "mlruns").as_uri()
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return (out / uri.removeprefix("file:")).resolve().as_uri()
    return uri


def _tracking_warnings(spec: Spec) -> list[str]:
    wb, launch = spec.recipe.logging.wandb, spec.recipe.launch
    if wb.enabled and wb.mode == "online" and "WANDB_API_KEY" not in {*launch.passthrough_env, *launch.env}:
        return ["logging.wandb.mode online: the training processes need W&B credentials; add WANDB_API_KEY to "
                "launch.passthrough_env, or run `wandb login` on every node"]
    return []


def _corpus(spec: Spec, decision: Decision) -> dict[str, Any]:
    """Returns the plan's corpus: every source with its files, estimate and share, and the filters prepare applies."""
    d = spec.recipe.data
    single = len(decision.sources) == 1
    sources = [{
        "name": p.source.name, "role": p.source.role, "format": p.source.format, "text_field": p.source.text_field,
        "files": [{"path": f.path, "bytes": f.bytes} for f in p.source.files], "total_bytes": p.source.bytes,
        "estimated_tokens": p.estimated_tokens, "planned_tokens": p.planned_tokens, "share": _rounded(p.share),
        "epochs": _rounded(p.epochs), "amount": p.amount,
        # One source keeps the layout of a plain corpus; several get a folder each.
        "prepared_dir": d.prepared_dir if single else str(Path(d.prepared_dir) / p.source.name),
    } for p in decision.sources]
    benchmarks = {b.name: b.path for b in spec.recipe.eval.benchmarks}
    decon = d.decontamination
    # auto: off for sft, whose chat records the n-gram filter does not read (dapc.objective refuses `true`)
    on = decon.enabled is True or (decon.enabled == "auto" and bool(benchmarks) and spec.recipe.training.objective == "cpt")
    if decon.enabled is True and not benchmarks:
        raise PlanInputError("decontamination is on, but eval.benchmarks names no benchmark to check against",
                             ("data", "decontamination", "enabled"))
    return {
        "sources": sources,
        "files": [{"path": f.path, "bytes": f.bytes} for f in spec.corpus],
        "total_bytes": spec.corpus_bytes,
        "dedup": d.dedup.model_dump() if d.dedup.exact or d.dedup.near else None,
        "decontamination": {"ngram": decon.ngram, "min_matches": decon.min_matches,
                            "benchmarks": benchmarks} if on else None,
    }


def _source_warnings(decision: Decision) -> list[str]:
    return [f"source {p.source.name}: {p.epochs:,.1f} passes over its estimated {p.estimated_tokens:,} tokens; past "
            f"about {EPOCHS_WARNING:g} repeated data adds little (Muennighoff et al. 2023)"
            for p in decision.sources if p.epochs > EPOCHS_WARNING]


def _schedule(t: Any, steps: int) -> dict[str, Any]:
    """Returns the plan's learning-rate schedule for `steps` optimizer steps, with its key points."""
    warmup = round(t.warmup_fraction * steps)
    decay = round(t.decay_fraction * steps) if t.schedule in ("wsd", "constant-with-cooldown") else steps - warmup
    fields = {"kind": t.schedule, "peak_lr": t.lr, "min_lr": t.lr * (t.min_lr_ratio if t.schedule != "constant" else 1),
              "warmup_start_lr": t.warmup_start_lr, "warmup_steps": warmup,
              "decay_steps": 0 if t.schedule == "constant" else min(decay, steps - warmup), "total_steps": steps,
              "points": ()}
    points = key_points(Schedule.model_validate(fields))
    return {**fields, "points": [(step, _rounded(lr)) for step, lr in points]}


def _recompute_share(spec: Spec, c: Candidate) -> float:
    """The share of decoder layers the chosen configuration recomputes in full (`planner.recompute_share`)."""
    if c.activation_checkpointing != "full":
        return 0.0
    layers = spec.arch.num_layers
    return -(-layers // c.checkpoint_every_layers) / layers


def build_plan(spec: Spec, decision: Decision) -> Plan:
    """Returns the typed plan for a spec and the planner's decision, hashed."""
    c, r = decision.chosen, spec.recipe
    loss = loss_decision(spec)
    hw = r.hardware
    cost_step = c.step
    run = run_cost(decision.steps, cost_step.step_seconds, spec.world_size, hw.usd_per_gpu_hour,
                   spec.device.tdp_watts, hw.pue, reference_pass_seconds(spec))
    arch = asdict(spec.arch)
    arch.pop("config_path")  # where it was read is provenance, not architecture
    t = r.training
    preemption = _preemption(spec, c, cost_step.step_seconds)
    body: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "recipe": r,
        "recipe_sha256": sha256_of(r.model_dump(mode="json")),
        "model": {
            "name": spec.arch.name,
            "params": {
                "total": spec.params.total, "embedding": spec.params.embedding, "attention": spec.params.attention,
                "mlp": spec.params.mlp, "norms": spec.params.norms, "lm_head": spec.params.lm_head,
                "experts": spec.params.experts,
            },
            "tied": spec.params.tied,
            "per_layer_params": spec.params.per_layer,
            "largest_layer_params": spec.params.largest_layer,
            "architecture": arch,
            "config": spec.model_config,
        },
        "method": {"name": r.method.name, "trainable_params": spec.trainable_params},
        "strategy": {
            "name": c.strategy.name, "forced": decision.strategy_forced, "reason": decision.reason,
            "backend": c.strategy.backend, "zero_stage": c.strategy.zero_stage, "description": c.strategy.description,
        },
        "batch": {
            "seq_len": r.data.seq_len,
            "micro_batch": c.micro_batch,
            "grad_accum": c.grad_accum,
            "global_batch_sequences": spec.global_batch_sequences,
            "global_batch_tokens": tokens_per_optimizer_step(spec),
            "global_batch_origin": spec.global_batch_sequences_origin,
            "world_size": spec.world_size,
            "nodes": hw.nodes,
            "gpus_per_node": hw.gpus_per_node,
        },
        "activation_checkpointing": c.activation_checkpointing,
        "activation_checkpointing_every_layers": c.checkpoint_every_layers,
        "memory": {**_memory(c), "counter": "cpu.vm_hwm" if spec.device.is_cpu else "cuda.max_memory_reserved"},
        "alternatives": [
            {
                "strategy": a.candidate.strategy.name, "micro_batch": a.candidate.micro_batch,
                "activation_checkpointing": a.candidate.activation_checkpointing,
                "activation_checkpointing_every_layers": a.candidate.checkpoint_every_layers, "fits": a.candidate.fits,
                "total_bytes": a.candidate.total_bytes, "step_seconds": _rounded(a.candidate.step.step_seconds),
                "lost_because": a.lost_because,
            }
            for a in decision.alternatives
        ],
        "suggestions": decision.suggestions,
        "warnings": [*spec.warnings, *_source_warnings(decision), *_time_limit_warnings(spec, preemption),
                     *_tracking_warnings(spec)],
        "fewest_gpus": None if decision.fewest_gpus is None else asdict(decision.fewest_gpus),
        "cost": {
            "tokens": decision.tokens,
            "tokens_exact": decision.tokens_exact,
            "tokens_per_byte_assumed": None if decision.tokens_exact or r.data.format == "preference"
            else r.data.tokens_per_byte,  # preference: pairs are counted, each padded to seq_len
            "corpus_bytes": spec.corpus_bytes,
            "corpus_files": spec.corpus_files,
            "flops_per_token": _rounded(flops_per_token(
                spec.arch, spec.params, r.data.seq_len, r.method.name,
                _recompute_share(spec, c), loss.chunk_tokens > 0, reference_forward(spec))),
            "assumed_mfu": hw.assumed_mfu,
            "compute_seconds": _rounded(cost_step.compute_seconds),
            "comm_seconds": _rounded(cost_step.comm_seconds),
            "offload_seconds": _rounded(cost_step.offload_seconds),
            "step_seconds": _rounded(cost_step.step_seconds),
            "steps": run.steps,
            "wall_seconds": _rounded(run.wall_seconds),
            "gpu_hours": _rounded(run.gpu_hours),
            "usd": _rounded(run.usd),
            "kwh": _rounded(run.kwh),
        },
        "device": {
            "name": spec.device.name, "memory_bytes": spec.device.memory_bytes, "bf16_tflops": spec.device.bf16_tflops,
            "memory_bandwidth_gbps": spec.device.memory_bandwidth_gbps, "tdp_watts": spec.device.tdp_watts,
            "intra_node_gbps": spec.device.intra_node_gbps, "is_cpu": spec.device.is_cpu, "source": spec.device.source,
        },
        "paths": _paths(spec),
        "corpus": _corpus(spec, decision),
        "objective": objective_decision(r),
        "loss": {"kind": loss.kind, "chunk_tokens": loss.chunk_tokens, "reason": loss.reason},
        "torch_compile": asdict(decide_compile(t.compile, spec.device.is_cpu, r.method.name, c.strategy.backend)),
        "loading": {"mode": c.loading.mode, "base_dtype": c.loading.base_dtype,
                    "trained_dtype": c.loading.trained_dtype, "reason": c.loading.reason},
        "schedule": _schedule(t, decision.steps),
        "runtime": {
            "env": _training_env(spec),
            "backend": c.strategy.backend,
            "fsdp": fsdp_section(spec, c),
            "deepspeed": deepspeed_config(spec, c),
            "passthrough_env": list(r.launch.passthrough_env),
            "preemption": preemption,
            "tracking": _tracking(spec),
        },
        "provenance": {"dapc_version": __version__, "model_config_path": spec.arch.config_path,
                       "model_source": asdict(spec.model_source), "lock": {
            "python": python_version(), "packages": installed_versions(),
            "tokenizer_sha256": tokenizer_identity(r.data.tokenizer) if r.data.tokenizer else None,
            "corpus_sha256": None}},
        "plan_sha256": "",
        "trajectory_sha256": "",
    }
    draft = Plan.model_validate(body)
    unhashed = draft.model_copy(update={"trajectory_sha256": sha256_of(trajectory_of(draft))})
    return unhashed.model_copy(update={"plan_sha256": sha256_of(unhashed.body())})


def plan_json_text(plan: Plan) -> str:
    """Returns plan.json's text: sorted keys, two-space indent, strict JSON, trailing newline."""
    return plan.text()


def gib(n_bytes: int) -> str:
    """Returns `n_bytes` as a GiB string with one decimal."""
    return f"{n_bytes / GIB:.1f}"
