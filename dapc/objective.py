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
from dapc.recipe.schema import RECORD_FORMATS

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
    formats = [d.format] if d.paths else [s.format or d.format for s in d.sources]
    if d.replay is not None:
        formats.append(d.replay.format or d.format)
    if objective == "cpt":
        records = next((f for f in formats if f in RECORD_FORMATS), None)
        if records is not None:
            raise PlanInputError(f"format {records} holds supervised fine-tuning records; set training.objective "
                                 "sft, or give text, jsonl or parquet documents", ("data", "format"))
        return {"name": "cpt", "data_format": d.format, "chat_template": None,
                "targets": "every next token (labels = input_ids)", "reason": "training.objective cpt"}
    if not d.paths or d.replay is not None:
        where = ("data", "replay") if d.paths else ("data", "sources")
        raise PlanInputError("objective sft reads one set of records: give them as data.paths (sources and replay "
                             "mix packed text, not records)", where)
    if d.format not in RECORD_FORMATS:
        raise PlanInputError(f"objective sft needs chat or prompt-completion records, not format {d.format}",
                             ("data", "format"))
    if d.dedup.exact or d.dedup.near or d.decontamination.enabled is True:
        key = ("data", "decontamination", "enabled") if d.decontamination.enabled is True else ("data", "dedup")
        raise PlanInputError("deduplication and decontamination read documents, not chat records; turn them off "
                             "for objective sft", key)
    targets = ("the assistant turns' tokens, each turn's end marker included, and the EOS after a record that ends "
               "with one" if d.format == "chat" else "the completion's tokens and the EOS after it")
    base = {"name": "sft", "data_format": d.format, "targets": targets}
    if d.format == "prompt-completion":
        return {**base, "chat_template": None, "reason": "prompt-completion records are joined as prompt + "
                "completion, no template"}
    if d.chat_template != "auto":
        return {**base, "chat_template": d.chat_template, "reason": f"data.chat_template {d.chat_template}"}
    has = tokenizer_has_chat_template(d.tokenizer or recipe.model.source)
    if has is None:
        raise PlanInputError(f"chat_template auto cannot tell whether tokenizer {d.tokenizer!r} has a chat "
                             "template (not a local directory); name one: chatml", ("data", "chat_template"))
    if has:
        return {**base, "chat_template": "tokenizer", "reason": "auto: the tokenizer's own chat_template"}
    return {**base, "chat_template": "chatml", "reason": "auto: the tokenizer has no chat_template; the built-in "
            "chatml, as plain text"}
