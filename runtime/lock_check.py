"""Compare the machine a run starts on with the plan's lock (`provenance.lock`, `dapc.lock`).

Versions and the tokenizer are warnings: the same plan may be run under a newer torch on purpose, and the
user needs to know which numbers may move. A corpus that changed since `prepare` is refused: the shards no
longer come from the files the plan names.
"""

from __future__ import annotations

import sys

from dapc.lock import installed_versions, tokenizer_identity, version_differences
from dapc.plan_schema import Plan
from runtime.prepare import PrepareError, load_manifest
from runtime.prepare.manifest import corpus_changes_since_prepare

__all__ = ["check_corpus_since_prepare", "environment_warnings", "warn_environment"]


def environment_warnings(plan: Plan) -> list[str]:
    """Returns one line per difference between the plan's lock and this machine: package versions (where the
    plan recorded one) and the tokenizer's identity (where both sides have the files)."""
    lock = plan.provenance.lock
    lines = [f"environment differs from the plan's lock: {d}"
             for d in version_differences(lock.packages, installed_versions())]
    spec = plan.recipe.data.tokenizer
    if spec and lock.tokenizer_sha256 is not None:
        now = tokenizer_identity(spec)
        if now is not None and now != lock.tokenizer_sha256:
            lines.append(f"tokenizer {spec} changed since the plan was made (sha256 {lock.tokenizer_sha256[:12]} "
                         f"then, {now[:12]} now): token ids may differ from the prepared data")
    return lines


def warn_environment(plan: Plan, rank: int) -> None:
    """Prints environment_warnings on stderr, from rank 0 only."""
    if rank == 0:
        for line in environment_warnings(plan):
            print(f"warning: {line}", file=sys.stderr)


def check_corpus_since_prepare(plan: Plan, rank: int) -> None:
    """Raises PrepareError when a corpus file changed since `prepare` wrote the plan's prepared data; does
    nothing when there is no prepared data yet (the trainer says so itself) or a file is not on this machine
    (the corpus may live elsewhere than the shards), which is printed as a warning."""
    for source in plan.corpus.sources:
        _check_source(source.prepared_dir, rank)


def _check_source(prepared_dir: str, rank: int) -> None:
    try:
        manifest = load_manifest(prepared_dir)
    except PrepareError:
        return
    changed, missing = corpus_changes_since_prepare(prepared_dir, manifest)
    if changed:
        raise PrepareError(f"corpus file changed since prepare wrote {prepared_dir}"
                           f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}: the shards no "
                           "longer come from it; prepare again into a new prepared_dir", changed[0])
    if missing and rank == 0:
        print(f"warning: {len(missing)} corpus file(s) of the prepared data are not on this machine "
              f"({missing[0]}, ...): cannot check they are unchanged since prepare", file=sys.stderr)
