"""The corpus as named sources, and how much of the training stream each one gets.

A recipe gives its corpus as `data.paths` (one source, `corpus`) or as `data.sources`, each with a `weight`,
`tokens` or `epochs`, plus optionally `data.replay`: general text at a fixed `share` of all training tokens.
The budget T and each source's tokens:
- the replay source gets share·T; the domain sources divide D = (1 - share)·T;
- with `training.tokens` set, T is that. Sources with `tokens`/`epochs` get their amount and those with a
  weight divide the rest of D by weight (none may be left: an error); where no source has a weight, the
  amounts become proportions of D;
- without it, D is the sources' amounts plus `training.epochs` passes over the weighted sources' estimated
  tokens, divided among them by weight; T = D / (1 - share).
A source's estimated tokens are its bytes × `data.tokens_per_byte` (prepare counts them exactly). The
sampler draws whole sequences from each source in proportion to its share (`runtime.data.MixtureSampler`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dapc.corpus import CorpusFile
from dapc.errors import DapcError

__all__ = ["EPOCHS_WARNING", "PlannedSource", "SourceFiles", "plan_sources"]

EPOCHS_WARNING = 4.0  # passes over one source past which repetition stops helping (Muennighoff et al. 2023)
SINGLE_SOURCE_NAME = "corpus"


@dataclass(frozen=True)
class SourceFiles:
    """One source as the recipe names it, its files resolved: exactly one of weight, tokens, epochs, share set
    (share only for replay)."""

    name: str
    role: str  # "domain" | "replay"
    format: str
    text_field: str | None
    files: tuple[CorpusFile, ...]
    weight: float | None = None
    tokens: int | None = None
    epochs: float | None = None
    share: float | None = None
    where: tuple = ()  # the recipe key path of the source, for errors

    @property
    def bytes(self) -> int:
        """Bytes of its files."""
        return sum(f.bytes for f in self.files)


@dataclass(frozen=True)
class PlannedSource:
    """A source with its share of the stream: tokens drawn, share of sequences, passes over it."""

    source: SourceFiles
    estimated_tokens: int
    planned_tokens: int
    share: float
    amount: str

    @property
    def epochs(self) -> float:
        """Passes over its estimated tokens."""
        return self.planned_tokens / self.estimated_tokens if self.estimated_tokens else 0.0


class SourcePlanError(DapcError):
    """A source mix that cannot be met; `key_path` says where in the recipe."""

    def __init__(self, message: str, key_path: tuple):
        super().__init__(message)
        self.key_path = key_path


def plan_sources(sources: tuple[SourceFiles, ...], budget_tokens: int | None, epochs: float,
                 tokens_per_byte: float, counted_tokens: dict[str, int] | None = None
                 ) -> tuple[int, tuple[PlannedSource, ...]]:
    """Returns the training token budget T and every source's share of it (rules in the module docstring).
    `budget_tokens` is `training.tokens` (None: from the sources), `epochs` `training.epochs`; `counted_tokens`,
    per source name, replaces the bytes × tokens_per_byte estimate where the tokens are known otherwise.

    Raises SourcePlanError where the fixed amounts exceed `training.tokens`."""
    estimated = {s.name: int(s.bytes * tokens_per_byte) for s in sources} | (counted_tokens or {})
    replay = [s for s in sources if s.role == "replay"]
    domain = [s for s in sources if s.role != "replay"]
    replay_share = replay[0].share if replay else 0.0
    fixed = {s.name: (s.tokens if s.tokens is not None else s.epochs * estimated[s.name])
             for s in domain if s.tokens is not None or s.epochs is not None}
    weighted = [s for s in domain if s.name not in fixed]
    weights = {s.name: s.weight if s.weight is not None else 1.0 for s in weighted}
    if budget_tokens is not None:
        total = budget_tokens
        domain_tokens = total * (1 - replay_share)
        rest = domain_tokens - sum(fixed.values())
        if weighted and rest <= 0:
            raise SourcePlanError(
                f"the sources' tokens/epochs ({sum(fixed.values()):,.0f} tokens) leave nothing of training.tokens "
                f"{budget_tokens:,}{' less the replay share' if replay else ''} for the weighted sources",
                ("training", "tokens"))
        if not weighted:  # amounts only: they become proportions of the budget
            scale = domain_tokens / sum(fixed.values())
            fixed = {n: t * scale for n, t in fixed.items()}
    else:
        rest = epochs * sum(estimated[s.name] for s in weighted)
        domain_tokens = sum(fixed.values()) + rest
        total = round(domain_tokens / (1 - replay_share))
    tokens = dict(fixed)
    weight_sum = sum(weights.values())
    for s in weighted:
        tokens[s.name] = rest * weights[s.name] / weight_sum
    for s in replay:
        tokens[s.name] = total * replay_share
    planned = []
    for s in sources:
        share = tokens[s.name] / total if total else 1.0 / len(sources)
        planned.append(PlannedSource(s, estimated[s.name], round(tokens[s.name]), share, _amount(s, budget_tokens)))
    return int(total), tuple(planned)


def _amount(s: SourceFiles, budget_tokens: int | None) -> str:
    if s.role == "replay":
        return f"replay share {s.share:g}"
    if s.tokens is not None:
        return f"tokens {s.tokens:,}"
    if s.epochs is not None:
        return f"epochs {s.epochs:g}"
    return f"weight {s.weight if s.weight is not None else 1.0:g}"
