"""The training objective: continued pretraining (every next token a target) or supervised fine-tuning (only the
assistant's tokens), and how chat records become text. The compiler decides; `prepare` and the trainer obey.

`data.chat_template: auto` takes the tokenizer's own `chat_template` (its tokenizer_config.json or
chat_template.jinja), else the built-in `chatml`: the tokenizer files are read here, at plan time, so the plan
says which template `prepare` will use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dapc.lock import MISTRAL_COMMON_PREFIX
from dapc.planner import PlanInputError
from dapc.recipe import Recipe
from dapc.recipe.schema import PREFERENCE_OBJECTIVES, RECORD_FORMATS
from dapc.reference import reference_kind

__all__ = ["objective_decision", "tokenizer_has_chat_template"]


def tokenizer_has_chat_template(tokenizer: str) -> bool | None:
    """Whether the tokenizer at `tokenizer` (a resolved spec) carries a chat template; None: cannot tell (not a
    local directory). The `mistral-common:*` SentencePiece models carry none."""
    if tokenizer.startswith(MISTRAL_COMMON_PREFIX):
        return False
    folder = Path(tokenizer)
    if not folder.is_dir():
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template")) if config.is_file() else False
    except (OSError, ValueError) as e:
        raise PlanInputError(f"cannot read {config}: {e}", ("data", "tokenizer")) from e


def objective_decision(recipe: Recipe) -> dict[str, Any]:
    """Returns the plan's `objective`; raises PlanInputError, located, where the objective and the data disagree."""
    d, objective = recipe.data, recipe.training.objective
    if recipe.training.preference.reference == "precomputed" and objective != "dpo":
        raise PlanInputError(f"a precomputed reference is dpo's: objective {objective} has no reference model",
                             ("training", "preference", "reference"))
    formats = [d.format] if d.paths else [s.format or d.format for s in d.sources]
    if d.replay is not None:
        formats.append(d.replay.format or d.format)
    if objective == "cpt":
        records = next((f for f in formats if f in RECORD_FORMATS), None)
        if records is not None:
            raise PlanInputError(f"format {records} holds records, not documents; set training.objective sft (chat, "
                                 "prompt-completion) or dpo/orpo (preference), or give text, jsonl or parquet "
                                 "documents", ("data", "format"))
        return {"name": "cpt", "data_format": d.format, "chat_template": None, "preference": None,
                "targets": "every next token (labels = input_ids)", "reason": "training.objective cpt"}
    if not d.paths or d.replay is not None:
        where = ("data", "replay") if d.paths else ("data", "sources")
        raise PlanInputError(f"objective {objective} reads one set of records: give them as data.paths (sources and "
                             "replay mix packed text, not records)", where)
    preference = objective in PREFERENCE_OBJECTIVES
    if preference != (d.format == "preference") or d.format not in RECORD_FORMATS:
        wanted = "preference pairs (format preference)" if preference else "chat or prompt-completion records"
        raise PlanInputError(f"objective {objective} needs {wanted}, not format {d.format}", ("data", "format"))
    if d.dedup.exact or d.dedup.near or d.decontamination.enabled is True:
        key = ("data", "decontamination", "enabled") if d.decontamination.enabled is True else ("data", "dedup")
        raise PlanInputError("deduplication and decontamination read documents, not records; turn them off "
                             f"for objective {objective}", key)
    if preference:
        base = {"name": objective, "data_format": d.format, "preference": _preference(recipe),
                "targets": "the chosen and the rejected response's tokens and the EOS after each: their summed "
                "log-probabilities score the pair" if objective == "dpo" else "the chosen response's tokens (NLL) "
                "and both responses' mean log-probabilities (odds ratio)"}
        template = _chat_template(recipe)
        return {**base, **template, "reason": f"training.objective {objective}; {template['reason']} for pairs "
                "whose prompt is a list of messages (a string prompt is joined as prompt + response)"}
    targets = ("the assistant turns' tokens, each turn's end marker included, and the EOS after a record that ends "
               "with one" if d.format == "chat" else "the completion's tokens and the EOS after it")
    base = {"name": "sft", "data_format": d.format, "targets": targets, "preference": None}
    if d.format == "prompt-completion":
        return {**base, "chat_template": None, "reason": "prompt-completion records are joined as prompt + "
                "completion, no template"}
    return {**base, **_chat_template(recipe)}


def _preference(recipe: Recipe) -> dict[str, Any]:
    p, method, objective = recipe.training.preference, recipe.method.name, recipe.training.objective
    reference = reference_kind(recipe)
    why = {"none": "orpo is reference-free",
           "precomputed": "training.preference.reference precomputed: the starting model scores every training pair "
                          "once before step 1; no reference model during training",
           "adapters-off": f"{method}: the reference is the base with the adapters disabled, the model before any "
                           "update; no copy is held",
           "copy": "full training changes the weights themselves: a frozen copy of the starting model, sharded like "
                   "the policy, in training.precision"}[reference]
    return {"loss": "sigmoid" if objective == "dpo" else "orpo", "beta": p.beta,
            "label_smoothing": p.label_smoothing if objective == "dpo" else 0.0, "reference": reference,
            "reference_reason": why, "sequences_per_example": 2}


def _chat_template(recipe: Recipe) -> dict[str, Any]:
    """The chat template records are rendered with: `chat_template` and its `reason`."""
    d = recipe.data
    if d.chat_template != "auto":
        return {"chat_template": d.chat_template, "reason": f"data.chat_template {d.chat_template}"}
    has = tokenizer_has_chat_template(d.tokenizer or recipe.model.source)
    if has is None:
        raise PlanInputError(f"chat_template auto cannot tell whether tokenizer {d.tokenizer!r} has a chat "
                             "template (not a local directory); name one: chatml", ("data", "chat_template"))
    if has:
        return {"chat_template": "tokenizer", "reason": "auto: the tokenizer's own chat_template"}
    return {"chat_template": "chatml", "reason": "auto: the tokenizer has no chat_template; the built-in "
            "chatml, as plain text"}
