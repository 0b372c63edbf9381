"""Rich tables for a plan: memory by component, the choice and its alternatives, batch geometry, cost."""

from __future__ import annotations

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from dapc.memory import GIB, PHASES
from dapc.plan_schema import Plan
from dapc.planner import COMPONENTS


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:,.2f}"


def memory_table(plan: Plan) -> Table:
    """Returns the per-GPU memory table: GiB and formula per component, then total, headroom, capacity."""
    mem = plan.memory
    table = Table(title=f"Memory per GPU at the peak, {escape(PHASES[mem.peak_phase])} ({escape(mem.counter)})",
                  title_justify="left")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("formula", overflow="fold")
    for name in COMPONENTS:
        table.add_row(name, _gib(getattr(mem.per_gpu_bytes, name)), escape(getattr(mem.formulas, name)))
    table.add_row("[bold]total[/bold]", f"[bold]{_gib(mem.per_gpu_bytes.total)}[/bold]", "")
    if mem.outside_allocator_bytes:
        table.add_row("outside torch", _gib(mem.outside_allocator_bytes), "CUDA context + NCCL buffers (in no torch counter)")
    table.add_row("headroom", _gib(mem.headroom_bytes), "hardware.headroom_fraction of capacity")
    verdict = "[green]fits[/green]" if mem.fits else f"[red]does not fit[/red]: {escape(mem.misfit or '')}"
    table.add_row("capacity", _gib(mem.device_capacity_bytes), verdict)
    if mem.load_peak_bytes:
        table.add_row("loading peak", _gib(mem.load_peak_bytes), escape(plan.loading.mode))
    table.add_row("CPU RAM / node", _gib(mem.cpu_per_node_bytes), "")
    if mem.nvme_per_node_bytes:
        table.add_row("NVMe / node", _gib(mem.nvme_per_node_bytes), "")
    return table


def alternatives_table(plan: Plan) -> Table:
    """Returns the table of strategies not chosen, each with its best configuration and why it lost."""
    table = Table(title="Alternatives (best configuration of each strategy)", title_justify="left")
    for column in ("strategy", "micro", "ckpt", "GiB/GPU", "s/step", "lost because"):
        table.add_column(column, justify="right" if column in ("micro", "GiB/GPU", "s/step") else "left")
    for alt in plan.alternatives:
        table.add_row(alt.strategy, str(alt.micro_batch),
                      _checkpointing(alt.activation_checkpointing, alt.activation_checkpointing_every_layers),
                      _gib(alt.total_bytes), f"{alt.step_seconds:.3g}", escape(alt.lost_because))
    return table


def summary_lines(plan: Plan) -> list[str]:
    """Returns the plan's headline numbers, one derived number per line with its unit and origin."""
    r, m, b, c, s = plan.recipe, plan.model, plan.batch, plan.cost, plan.strategy
    pair = plan.objective.preference
    tokens_origin = ("recipe token budget" if r.training.tokens is not None else "the sources' tokens") if c.tokens_exact else (
        f"{plan.corpus.sources[0].estimated_tokens // (pair.sequences_per_example * b.seq_len):,} training pairs (JSONL "
        f"lines less the validation share) × {pair.sequences_per_example} sequences × {b.seq_len:,} tokens × "
        f"{r.training.epochs} epochs" if pair is not None else
        f"estimated: {c.corpus_bytes:,} corpus bytes × {c.tokens_per_byte_assumed} tokens/byte "
        f"× {r.training.epochs} epochs" if len(plan.corpus.sources) == 1 else
        f"estimated from the sources' amounts at {c.tokens_per_byte_assumed} tokens/byte")
    sched = plan.schedule
    return [
        f"model: {escape(m.name)}: {m.params.total:,} parameters "
        f"({plan.method.trainable_params:,} trainable, method {plan.method.name})",
        f"hardware: {b.nodes} node(s) × {b.gpus_per_node} {escape(plan.device.name)} = {b.world_size} GPUs",
        f"strategy: [bold]{s.name}[/bold] ({'pinned' if s.forced else 'chosen'}): {escape(s.reason)}",
        f"batch: micro_batch {b.micro_batch} × grad_accum {b.grad_accum} × {b.world_size} GPUs = "
        f"{_examples(plan)} × {b.seq_len:,} tokens = {b.global_batch_tokens:,} tokens/step",
        f"activation checkpointing: "
        f"{_checkpointing(plan.activation_checkpointing, plan.activation_checkpointing_every_layers, long=True)}",
        _fewest_line(plan),
        f"objective: {plan.objective.name}: {escape(plan.objective.targets)} ({escape(plan.objective.reason)})",
        *([f"reference: {pair.reference} ({escape(pair.reference_reason)})"]
          if (pair := plan.objective.preference) is not None else []),
        f"loading: {plan.loading.mode} ({escape(plan.loading.reason)})",
        f"loss: {escape(plan.loss.reason)}",
        f"torch.compile: {escape(plan.torch_compile.reason)}",
        f"tokens: {c.tokens:,} ({tokens_origin})",
        f"steps: {c.steps:,} at {c.step_seconds:.3g} s/step (compute {c.compute_seconds:.3g} s at MFU "
        f"{c.assumed_mfu}, communication {c.comm_seconds:.3g} s, offload {c.offload_seconds:.3g} s)",
        f"schedule: {sched.kind}"
        + (f" (re-warming from lr {sched.warmup_start_lr:g})" if sched.warmup_start_lr else "")
        + ": " + ", ".join(f"step {step:,} lr {lr:.3g}" for step, lr in sched.points),
        *_source_lines(plan),
        *_filter_lines(plan),
        f"run: {c.wall_seconds / 3600:,.2f} h wall, {c.gpu_hours:,.1f} GPU-hours, ${c.usd:,.0f}, "
        f"{c.kwh:,.1f} kWh",
    ]


def _checkpointing(mode: str, every_layers: int, long: bool = False) -> str:
    if mode != "full" or every_layers == 1:
        return mode
    return f"full, every {every_layers} layers" if long else f"full/{every_layers}"


def _source_lines(plan: Plan) -> list[str]:
    """One line per source when the corpus has several: bytes, tokens estimated and drawn, share, passes."""
    if len(plan.corpus.sources) == 1:
        return []
    return [f"source {escape(s.name)} ({s.role}, {s.amount}): {s.total_bytes:,} bytes ≈ {s.estimated_tokens:,} "
            f"tokens; draws {s.planned_tokens:,} ({s.share:.1%}, {s.epochs:,.2f} epochs)"
            for s in plan.corpus.sources]


def _filter_lines(plan: Plan) -> list[str]:
    lines = []
    if (d := plan.corpus.dedup) is not None:
        kinds = [k for k, on in (("exact", d.exact), (f"near (MinHash LSH, Jaccard ≥ {d.near_threshold:g})", d.near))
                 if on]
        lines.append(f"dedup: {' and '.join(kinds)}, first occurrence kept")
    if (x := plan.corpus.decontamination) is not None:
        lines.append(f"decontamination: documents sharing {x.min_matches} {x.ngram}-gram"
                     f"{'s' if x.min_matches > 1 else ''} with an item of {', '.join(x.benchmarks)} are dropped")
    return lines


def _fewest_line(plan: Plan) -> str:
    few = plan.fewest_gpus
    if few is None:
        return f"fewest GPUs: none up to 65,536 {escape(plan.device.name)} fit this method at micro_batch 1"
    return (f"fewest GPUs: {few.gpus:,} {escape(plan.device.name)} ({few.strategy}, micro_batch 1, activation "
            f"checkpointing {few.activation_checkpointing}: {few.total_bytes / GIB:.1f} GiB per GPU)")


def print_plan(plan: Plan, console: Console) -> None:
    """Prints the whole plan report."""
    console.print("\n".join(summary_lines(plan)), highlight=False)
    console.print(memory_table(plan))
    if plan.alternatives:
        console.print(alternatives_table(plan))
    if plan.suggestions:
        console.print(Group(*(f"[yellow]would fit:[/yellow] {escape(s)}" for s in plan.suggestions)))


def _examples(plan: Plan) -> str:
    """The global batch in the plan's units: sequences, or preference pairs of two sequences each."""
    b, p = plan.batch, plan.objective.preference
    if p is None:
        return f"{b.global_batch_sequences:,} sequences"
    return f"{b.global_batch_sequences:,} pairs ({b.global_batch_sequences * p.sequences_per_example:,} sequences)"
