"""The training run: resume if a checkpoint exists, step to `cost.steps`, checkpoint, measure, export.

Order of a run: check that the latest checkpoint may be resumed by this plan (`resume.py`), that the plan's
tracking packages are installed, and the launch's world size (before any collective, so every rank fails alike)
→ build the model → wrap it in the plan's backend → restore states → train → final checkpoint → measured peak
memory next to the plan's estimate → export (rank 0, from the final checkpoint). Rank 0 logs each record to
metrics.jsonl and the plan's trackers (`tracking.py`). When the plan's stop file appears (the Slurm job creates
it on its preemption signal), the run checkpoints after the current step and returns without exporting.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from runtime import memory_probe
from runtime.checkpoint import (
    CheckpointError,
    clear_leftovers,
    latest_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    trainer_state_path,
)
from runtime.data import (
    DistributedResumableSampler,
    MixtureDataset,
    MixtureSampler,
    PackedDataset,
    PreferencePairs,
)
from runtime.prepare import load_manifest

from .config import PlanError, TrainPlan
from .distributed import Distributed, init_distributed, shutdown_distributed
from .engines import Engine, init_deepspeed_distributed, make_engine
from .host_allocator import use_huge_pages
from .loss import document_positions
from .metrics import MetricsLog, mfu
from .model import build_model
from .nf4 import NF4Linear
from .optim import lr_at
from .reference_logps import reference_table
from .resume import Resume, check_resumable, trainer_state
from .tracking import Tracker, check_installed

Sampler = DistributedResumableSampler | MixtureSampler

__all__ = ["train"]

_MIB = 1024**2


def train(plan: TrainPlan) -> None:
    """Runs (or resumes) the plan's training on this rank; rank 0 exports at the end when the plan says so."""
    latest = latest_checkpoint(plan.checkpoint_dir)
    # Checked by every rank before any collective, so all fail alike.
    resume = None if latest is None else check_resumable(latest, plan)
    check_installed(plan)
    d = init_distributed(plan)
    if d.device.type == "cpu":
        use_huge_pages()  # before any tensor exists: PyTorch reads the setting at its first CPU allocation
    log = MetricsLog(plan.metrics_path, d.is_main, Tracker(plan) if d.is_main else None)
    try:
        _agree_on_resume(latest, d, plan)  # the first collective: after use_huge_pages, as it makes tensors
        final, finished = _run(plan, d, log, resume)
        if finished and d.is_main:
            Path(plan.stop_file).unlink(missing_ok=True)  # a notice that came too late to stop anything
        if finished and d.is_main and plan.export_hf:
            from runtime.export import export_model

            target = export_model(plan, final)
            log.record("export", path=str(target), checkpoint=str(final))
            log.say(f"exported {final.name} to {target}")
        log.record("end")
    finally:
        log.close()
        shutdown_distributed()


def _agree_on_resume(latest: Path | None, d: Distributed, plan: TrainPlan) -> None:
    """Raises CheckpointError on every rank when the ranks found different newest checkpoints: another run (a
    job not yet stopped) is still saving into the same checkpoint_dir, and resuming from two steps would
    deadlock or mix states."""
    found: list[str | None] = [None] * d.world_size
    dist.all_gather_object(found, None if latest is None else latest.name)
    if len(set(found)) > 1:
        seen = ", ".join(f"rank {rank}: {name or 'none'}" for rank, name in enumerate(found))
        raise CheckpointError(f"the ranks found different newest checkpoints ({seen}): another run is still "
                              "writing to this checkpoint directory; stop it, then relaunch", plan.checkpoint_dir)


def _run(plan: TrainPlan, d: Distributed, log: MetricsLog, resume: Resume | None) -> tuple[Path, bool]:
    """Trains from the checkpoint (or step 0) to `cost.steps`, or until a stop is requested; returns the last
    checkpoint's folder and whether training finished."""
    dataset, sampler = _data(plan, d)
    if plan.backend == "deepspeed":
        init_deepspeed_distributed(d.timeout)
    model = build_model(plan, d.device)
    params = _param_counts(model)
    engine = make_engine(plan, model, d.device)
    del model
    if d.is_main:
        clear_leftovers(plan.checkpoint_dir)
    if plan.preference is not None and plan.preference.reference == "precomputed":
        # Before any restore: scored by the starting model, or read back (a resumed run never rescores)
        engine.precomputed.fill(reference_table(plan.preference.reference_logps_path, dataset, plan.micro_batch,
                                                engine.score, d.device, resume is not None, log.say))
    step = 0 if resume is None else _restore(engine, sampler, resume, d, log)
    log.record("start", step=step, steps=plan.steps, resumed_from=str(resume.folder) if resume else None,
               resumed_world_size=resume.world_size if resume else None,
               plan_sha256=plan.plan_sha256, strategy=plan.strategy, world_size=d.world_size, **params)
    log.say(f"{plan.strategy} on {d.world_size} × {d.device.type}: {plan.steps} steps of "
            f"{plan.tokens_per_step:,} tokens"
            + (f", {resume.describe(d.world_size)} after step {step}" if resume else ""))
    final = None if resume is None else resume.folder
    batches = _batches(dataset, sampler, d.device, targets=plan.objective != "cpt")
    eos_token_id = _eos_token_id(plan) if plan.document_boundaries == "separate" else None
    tokens_per_step = plan.tokens_per_step
    mark, steps_since_log = time.perf_counter(), 0
    while step < plan.steps:
        loss, grad_norm, lr, stats = _step(plan, d, engine, batches, step, eos_token_id)
        step, steps_since_log = step + 1, steps_since_log + 1
        if step % plan.log_every_steps == 0 or step == plan.steps:
            now = time.perf_counter()
            seconds = now - mark
            tokens_per_second = steps_since_log * tokens_per_step / seconds
            log.step(step, plan.steps, loss=_mean_over_ranks(loss, d), lr=lr, grad_norm=float(grad_norm),
                     tokens=step * tokens_per_step, tokens_per_second=tokens_per_second,
                     step_seconds=seconds / steps_since_log,
                     mfu=mfu(tokens_per_second, plan.flops_per_token, d.world_size, plan.device_peak_flops),
                     peak_memory_bytes=_max_over_ranks(memory_probe.peak_bytes(plan.memory_counter), d),
                     **_source_sequences(plan, sampler), **{k: _mean_over_ranks(v, d) for k, v in stats.items()})
            mark, steps_since_log = now, 0  # logging counts in the next interval: it is part of training's time
        stop = step < plan.steps and _stop_requested(plan, d)
        if stop or step % plan.checkpoint_every_steps == 0 or step == plan.steps:
            final = _save(plan, d, engine, sampler, step)
            log.record("checkpoint", step=step, path=str(final))
            mark = time.perf_counter()  # checkpoint time is not training throughput
        if stop:
            log.record("stopped", step=step, checkpoint=str(final), stop_file=plan.stop_file)
            log.say(f"stopped after step {step} of {plan.steps} on request ({plan.stop_file}); checkpoint "
                    f"{final} holds it, and relaunching resumes there")
            break
    else:
        _log_memory(plan, d, log)
    del engine
    gc.collect()
    return final, step == plan.steps


def _data(plan: TrainPlan, d: Distributed) -> tuple[PackedDataset | MixtureDataset | PreferencePairs, Sampler]:
    """The training samples and this rank's sampler: one source's order, or the mixture of several at the
    plan's shares. A dpo/orpo sample is a preference pair (two sequences)."""
    datasets = [PackedDataset(s.prepared_dir, split="train") for s in plan.sources]
    if plan.preference is not None:
        datasets = [PreferencePairs(x) for x in datasets]
    for source, dataset in zip(plan.sources, datasets, strict=True):
        if dataset.seq_len != plan.seq_len:
            raise PlanError(f"prepared data in {source.prepared_dir} has seq_len {dataset.seq_len}, the plan's "
                            f"batch.seq_len is {plan.seq_len}; prepare again with this plan", plan.path)
        if len(plan.sources) > 1 and len(dataset) == 0:
            raise PlanError(f"source {source.name} has no training sequence in {source.prepared_dir}; give it more "
                            "text or drop it", plan.path)
    if len(datasets) > 1:
        mixture = MixtureDataset(datasets)
        return mixture, MixtureSampler([len(x) for x in datasets], [s.share for s in plan.sources], d.rank,
                                       d.world_size, plan.seed, plan.micro_batch, plan.global_batch_sequences)
    (dataset,), (source,) = datasets, plan.sources
    if len(dataset) < plan.global_batch_sequences:
        kind = "preference pairs" if plan.preference is not None else "sequences"
        raise PlanError(f"prepared data in {source.prepared_dir} has {len(dataset)} training {kind}, "
                        f"fewer than one optimizer step takes ({plan.global_batch_sequences}); add data, or lower "
                        "training.global_batch_sequences", plan.path)
    return dataset, DistributedResumableSampler(len(dataset), d.rank, d.world_size, plan.seed, plan.micro_batch,
                                                plan.global_batch_sequences)


def _eos_token_id(plan: TrainPlan) -> int:
    """The EOS id `prepare` joined documents with (every source's manifest records it; they must agree)."""
    ids = {load_manifest(s.prepared_dir).tokenizer.eos_token_id for s in plan.sources}
    if len(ids) != 1 or None in ids:
        raise PlanError(f"the prepared sources record EOS ids {sorted(map(str, ids))}: per-document positions need "
                        "one EOS id; prepare them again with the plan's tokenizer", plan.path)
    return ids.pop()


def _source_sequences(plan: TrainPlan, sampler: Sampler) -> dict:
    """The sequences drawn from each source so far, all ranks together (every rank walks the whole stream), for a
    mixture; nothing for one source."""
    if not isinstance(sampler, MixtureSampler):
        return {}
    return {"source_sequences": {s.name: n for s, n in zip(plan.sources, sampler.draws, strict=True)}}


def _restore(engine: Engine, sampler: Sampler, resume: Resume, d: Distributed,
             log: MetricsLog) -> int:
    """Loads model, optimizer, sampler and RNG states; returns the step the checkpoint was taken after."""
    engine.load(resume.folder)
    state, rng_applies = trainer_state(resume, d.rank, d.world_size)
    sampler.load_state_dict(state["sampler"])
    if rng_applies:
        restore_rng_state(state["rng"])  # last: building and loading may draw random numbers
    else:
        log.say(f"world size {resume.world_size} → {d.world_size}: the data order continues at the same sample; "
                "random streams (dropout) start afresh")
    return state["step"]


def _stop_requested(plan: TrainPlan, d: Distributed) -> bool:
    """Whether the stop file exists, as rank 0 sees it, agreed by every rank (one small collective per step,
    none for a single process)."""
    if d.world_size == 1:
        return Path(plan.stop_file).exists()
    flag = torch.tensor([int(d.is_main and Path(plan.stop_file).exists())], dtype=torch.int32, device=d.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _step(plan: TrainPlan, d: Distributed, engine: Engine, batches: Iterator[tuple[torch.Tensor, torch.Tensor | None]],
          step: int, eos_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor | float, float, dict]:
    """One optimizer step over `grad_accum` micro-batches: (this rank's mean loss, grad norm, learning rate, this
    rank's mean of the objective's statistics). With `eos_token_id`, each packed document gets positions of its
    own and attends only to itself."""
    loss_sum = torch.zeros((), dtype=torch.float32, device=d.device)
    stats_sum: dict[str, torch.Tensor] = {}
    for micro in range(plan.grad_accum):
        input_ids, labels = next(batches)
        positions = None if eos_token_id is None else document_positions(input_ids, eos_token_id)
        loss, stats = engine.micro_step(input_ids, last=micro == plan.grad_accum - 1, position_ids=positions,
                                        labels=labels)
        loss_sum += loss.float()
        for name, value in stats.items():
            stats_sum[name] = stats_sum.get(name, 0) + value.float()
    lr = lr_at(plan, step)
    stats_mean = {name: total / plan.grad_accum for name, total in stats_sum.items()}
    return loss_sum / plan.grad_accum, engine.optimizer_step(lr), lr, stats_mean


def _param_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters as built (before sharding): trainable, total (4-bit weights count as their packed storage
    elements), and how many Linear layers are 4-bit."""
    counts = {"trainable_params": 0, "params": 0}
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())  # ZeRO-3 placeholders are empty
        counts["params"] += n
        counts["trainable_params"] += n if param.requires_grad else 0
    counts["quantized_linears"] = sum(isinstance(m, NF4Linear) for m in model.modules())
    return counts


def _batches(dataset: PackedDataset | MixtureDataset | PreferencePairs, sampler: Sampler, device: torch.device,
             targets: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """This rank's micro-batches on `device` as (input_ids, labels), epoch after epoch; labels are None (every
    next token) unless `targets` (sft: the assistant's tokens; dpo/orpo: the responses', `labels` of the
    dataset). Drawn one at a time so the
    sampler state stays exact. On a GPU each batch is read into pinned memory and copied without blocking: the
    copy is queued behind the kernels already launched while the host goes on, so the step never waits on the
    host for its input."""
    pin = device.type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(device, non_blocking=True) if pin else t

    while True:
        for indices in sampler:
            if targets:
                labels = dataset.labels(indices)
                yield move(dataset.batch(indices)), move(labels)
            else:
                yield move(dataset.batch(indices)), None


def _save(plan: TrainPlan, d: Distributed, engine: Engine, sampler: Sampler, step: int) -> Path:
    trainer_state = {"step": step, "sampler": sampler.state_dict(), "rng": rng_state()}

    def write(folder: Path) -> None:
        engine.save(folder)
        path = trainer_state_path(folder, d.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object: a full disk surfaces as OSError, not a bare RuntimeError
            torch.save(trainer_state, f)

    meta = {"plan_sha256": plan.plan_sha256, "trajectory_sha256": plan.trajectory_sha256,
            "world_size": d.world_size, "backend": plan.backend,
            "strategy": plan.strategy, "method": plan.method}
    return save_checkpoint(plan.checkpoint_dir, step, meta, write, plan.keep_last)


def _log_memory(plan: TrainPlan, d: Distributed, log: MetricsLog) -> None:
    """The plan's counter, measured over the whole run on every rank, next to `memory.per_gpu_bytes.total`."""
    per_rank = [0] * d.world_size
    dist.all_gather_object(per_rank, memory_probe.peak_bytes(plan.memory_counter))
    measured, estimated = max(per_rank), plan.memory_total_bytes
    log.record("memory", counter=plan.memory_counter, measured_bytes=measured, per_rank_bytes=per_rank,
               estimated_bytes=estimated, ratio=measured / estimated, strategy=plan.strategy,
               world_size=d.world_size)
    log.say(f"peak memory ({plan.memory_counter}, max over ranks): measured {measured / _MIB:,.0f} MiB, "
            f"plan estimate {estimated / _MIB:,.0f} MiB, measured/estimate {measured / estimated:.2f}")


def _mean_over_ranks(value: torch.Tensor, d: Distributed) -> float:
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return float(total) / d.world_size


def _max_over_ranks(value: int, d: Distributed) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=d.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)
