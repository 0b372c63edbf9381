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
) -> Manifest:
    """Prepares the corpus files the plan lists (`corpus.files`, resolved by the compiler) with the plan's data
    settings, split with its training seed; returns the manifest.

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
    manifest = prepare_corpus(
        [f.path for f in plan.corpus.files],  # files resolve to themselves: the plan's list, as it is
        locked_sha256=plan.provenance.lock.corpus_sha256,
        data_format=plan.corpus.format,
        text_field=data.text_field if plan.corpus.format != "text" else None,
        tokenizer=data.tokenizer,  # resolved by the compiler; load_plan refuses a plan without one
        seq_len=data.seq_len,
        validation_fraction=data.validation_fraction,
        seed=plan.recipe.training.seed,
        prepared_dir=plan.paths.prepared_dir,
        workers=workers,
        console=console,
        progress=progress,
    )
    write_corpus_stat(Path(plan.paths.prepared_dir), manifest)
    return manifest
