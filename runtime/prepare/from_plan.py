"""The plan's corpus, prepared with the plan's settings: what `python -m runtime.prepare --plan` runs."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from dapc.plan_schema import Plan

from .manifest import Manifest, write_corpus_stat
from .pipeline import prepare_corpus
from .sources import PrepareError

__all__ = ["prepare_from_plan"]


def prepare_from_plan(
    plan: Plan,
    *,
    workers: int | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> list[Manifest]:
    """Prepares every source of the plan's corpus (`corpus.sources`, resolved by the compiler), one after the other,
    each into its `prepared_dir`, with the plan's data settings and filters, split with its training seed; returns
    their manifests in the plan's order.

    Raises PrepareError where a listed file is gone or changed size since the plan was made: the plan's token
    estimate and step count were computed from those files.
    """
    data = plan.recipe.data
    for listed in plan.corpus.files:
        try:
            size = os.stat(listed.path).st_size
        except OSError as e:
            raise PrepareError(f"corpus file listed in the plan cannot be read: {e.strerror}", listed.path) from None
        if size != listed.bytes:
            raise PrepareError(f"corpus file changed since the plan was made ({listed.bytes:,} bytes planned, "
                               f"{size:,} now); compile the recipe again", listed.path)
    dedup, decontamination = _filters(plan)
    manifests = []
    for source in plan.corpus.sources:
        if console is not None and len(plan.corpus.sources) > 1:
            console.print(f"source {source.name} ({source.role}, {source.share:.1%} of the stream)", highlight=False)
        manifest = prepare_corpus(
            [f.path for f in source.files],  # files resolve to themselves: the plan's list, as it is
            locked_sha256=plan.provenance.lock.corpus_sha256,
            data_format=source.format,
            text_field=source.text_field,
            tokenizer=data.tokenizer,  # resolved by the compiler; load_plan refuses a plan without one
            seq_len=data.seq_len,
            validation_fraction=data.validation_fraction,
            seed=plan.recipe.training.seed,
            prepared_dir=source.prepared_dir,
            chat_template=plan.objective.chat_template,
            workers=workers,
            console=console,
            progress=progress,
            **({"dedup": dedup} if dedup is not None else {}),
            **({"decontamination": decontamination} if decontamination is not None else {}),
        )
        write_corpus_stat(Path(source.prepared_dir), manifest)
        manifests.append(manifest)
    return manifests


def _filters(plan: Plan) -> tuple[object | None, object | None]:
    """The plan's dedup and decontamination settings as `prepare_corpus` takes them (None where off)."""
    corpus = plan.corpus
    if corpus.dedup is None and corpus.decontamination is None:
        return None, None
    from .filters import DecontaminationSettings, DedupSettings, benchmark_items

    dedup = None if corpus.dedup is None else DedupSettings(**corpus.dedup.model_dump())
    x = corpus.decontamination
    decontamination = None if x is None else DecontaminationSettings(
        ngram=x.ngram, min_matches=x.min_matches, items=benchmark_items(x.benchmarks))
    return dedup, decontamination
