"""Supervised fine-tuning records → tokens and a loss mask: 1 where a token is the assistant's (a target).

A `chat` record ({"messages": [{"role", "content"}, ...]}) is rendered with the plan's template, the tokenizer's
own `chat_template` or the built-in `CHATML`, through jinja2 as transformers' `apply_chat_template` does. Which
characters are the assistant's is found turn by turn: assistant turn i spans from the end of
render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i + 1]), in the render of the
whole record (a template that does not render turn by turn as a prefix of the whole is refused). The whole text
is then tokenized once, with offsets, so the tokens are exactly what tokenizing the render gives, and a token is
a target when its first character lies in an assistant span. Why not `return_assistant_tokens_mask`: it needs a
`{% generation %}` block in the template, which few templates have and ours would need written in.

A `prompt-completion` record is prompt + completion, no template: the completion's characters are the targets.
The EOS `prepare` writes after a record is a target when the record ends with an assistant turn (the model learns
to stop there, as TRL appends EOS to a completion).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from .sources import PrepareError, Unit, _line_number, jsonl_lines

__all__ = ["CHATML", "RecordSettings", "encode_record_texts", "pack_records", "read_records", "record_settings",
           "render_record"]

# The built-in template for a tokenizer without one: ChatML written as plain text (the tokenizer has no
# <|im_start|> token; the markers are ordinary text to it).
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RecordSettings:
    fmt: str  # chat | prompt-completion
    template: str | None  # jinja2 text (chat)
    special_tokens: dict  # bos_token, eos_token: what templates may write
    template_has_special_tokens: bool  # the tokenizer's own template: special tokens in its text are special


def record_settings(data_format: str, chat_template: str | None, tok,
                    filtered: bool) -> tuple[RecordSettings | None, dict | None]:
    """Returns what the workers need to render sft records, and the manifest's `records` settings; (None, None)
    for documents."""
    if data_format not in ("chat", "prompt-completion"):
        return None, None
    if filtered:
        raise PrepareError("deduplication and decontamination read documents, not sft records; turn them off")
    template = None
    if data_format == "chat":
        if chat_template not in ("tokenizer", "chatml"):
            raise PrepareError(f"chat records need the plan's chat_template (tokenizer or chatml), got {chat_template!r}")
        template = CHATML if chat_template == "chatml" else tok.chat_template
        if not template:
            raise PrepareError("the plan says the tokenizer's own chat_template, but the tokenizer has none; "
                               "compile the recipe again")
    special = {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}
    settings = RecordSettings(data_format, template, special, chat_template == "tokenizer")
    info = {"settings": {
        "chat_template": chat_template if data_format == "chat" else None,
        "template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "packing": "whole records, several per sequence; one that does not fit the rest of a sequence starts the "
                   "next, the rest padded with EOS (not a target); a record longer than seq_len keeps its first "
                   "seq_len tokens, counted as truncated; the last sequence padded",
        "targets": "mask 1: the token is the assistant's (chat) or the completion's; the EOS after a record ending "
                   "with one"}, "splits": {}}
    return settings, info


@dataclass(frozen=True)
class Record:
    text: str
    spans: tuple[tuple[int, int], ...]  # character ranges of the targets
    ends_with_target: bool
    identity: bytes  # the record's line, for the split rule
    where: str


def read_records(unit: Unit, settings: RecordSettings) -> list[Record]:
    """The unit's records rendered, in order; a located PrepareError for a line that is not a valid record."""
    out = []
    for seg in unit.segments:
        for line, offset in jsonl_lines(seg):
            where = f"{seg.path}:{_line_number(seg.path, offset)}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                why = f"invalid JSON: {e.msg} (column {e.colno})" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise PrepareError(why, where) from None
            text, spans, ends = render_record(record, settings, where)
            out.append(Record(text, spans, ends, bytes(line), where))
    return out


def render_record(record: object, settings: RecordSettings, where: str) -> tuple[str, tuple[tuple[int, int], ...], bool]:
    """Returns (text, target character spans, whether it ends with a target) for one record."""
    if settings.fmt == "prompt-completion":
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "completion")):
            raise PrepareError('expected {"prompt": str, "completion": str}', where)
        prompt, completion = record["prompt"], record["completion"]
        if not completion:
            raise PrepareError("empty completion: nothing to learn", where)
        return prompt + completion, ((len(prompt), len(prompt) + len(completion)),), True
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise PrepareError('expected {"messages": [{"role": ..., "content": ...}, ...]}', where)
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise PrepareError(f"message {i} needs a role ({', '.join(ROLES)}) and a string content", where)
    if not any(m["role"] == "assistant" for m in messages):
        raise PrepareError("no assistant message: nothing to learn", where)
    template = _compiled(settings.template)

    def render(turns: list[dict], generation_prompt: bool) -> str:
        return template.render(messages=turns, add_generation_prompt=generation_prompt, **settings.special_tokens)

    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise PrepareError("the chat template does not render the conversation turn by turn (each turn's text a "
                               "prefix of the whole); use data.chat_template chatml", where)
        spans.append((len(prompt), len(upto)))
    return text, tuple(spans), messages[-1]["role"] == "assistant"


_templates: dict[str, object] = {}


def _compiled(source: str):
    """The jinja2 template as transformers compiles a chat template (sandboxed, trim_blocks, lstrip_blocks)."""
    if source not in _templates:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        _templates[source] = env.from_string(source)
    return _templates[source]


def target_mask(offsets: list[tuple[int, int]], spans: tuple[tuple[int, int], ...]) -> np.ndarray:
    """1 for a token whose first character lies in a target span; uint8."""
    starts = np.array([a for a, _ in offsets], dtype=np.int64)
    mask = np.zeros(len(offsets), dtype=np.uint8)
    for a, b in spans:
        mask |= ((starts >= a) & (starts < b)).astype(np.uint8)
    return mask


def encode_record_texts(encoder, records: list[Record]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Returns (ids uint32, mask uint8) per record; `encoder(texts)` gives (ids, offsets) per text."""
    out = []
    for record, (ids, offsets) in zip(records, encoder([r.text for r in records]) if records else [], strict=True):
        out.append((np.asarray(ids, dtype=np.uint32), target_mask(offsets, record.spans)))
    return out


def pack_records(tokens: np.ndarray, mask: np.ndarray, lengths: list[int], fill: int, seq_len: int,
                 pad_id: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Lays records (their tokens and masks concatenated, `lengths` each) out so none crosses a sequence
    boundary: a record that does not fit what is left of the current sequence (`fill` tokens used) starts the
    next one, the rest padded with `pad_id` (mask 0); a record longer than `seq_len` keeps its first `seq_len`
    tokens, and is counted. Returns (tokens, mask, counts)."""
    out_t, out_m = [], []
    counts = {"truncated_records": 0, "truncated_tokens": 0, "padding_tokens": 0, "target_tokens": 0}
    start = 0
    for n in lengths:
        t, m = tokens[start : start + n], mask[start : start + n]
        start += n
        if n > seq_len:
            counts["truncated_records"] += 1
            counts["truncated_tokens"] += n - seq_len
            t, m, n = t[:seq_len], m[:seq_len], seq_len
        if fill and fill + n > seq_len:
            pad = seq_len - fill
            out_t.append(np.full(pad, pad_id, dtype=tokens.dtype))
            out_m.append(np.zeros(pad, dtype=np.uint8))
            counts["padding_tokens"] += pad
            fill = 0
        out_t.append(t)
        out_m.append(m)
        counts["target_tokens"] += int(m.sum())
        fill = (fill + n) % seq_len
    if not out_t:
        return tokens[:0], mask[:0], counts
    return np.concatenate(out_t), np.concatenate(out_m), counts
