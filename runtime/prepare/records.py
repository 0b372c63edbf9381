"""Records → tokens and a loss mask: 1 where a token is a target (the assistant's, the completion's, the response's).

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

A `preference` record ({"prompt", "chosen", "rejected"}, TRL's convention, for DPO and ORPO) is two sequences,
chosen then rejected, each the prompt followed by that response: a string prompt is joined as prompt-completion
is, a message prompt (ending with a user turn) rendered with the template over prompt + [assistant response], and
only the response, the final assistant turn, is a target. A response is a string or TRL's
[{"role": "assistant", "content": str}]. Both halves carry the record's line as identity, so they share a split;
`lay_out_pairs` gives each half a sequence of its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from dapc.recipe.schema import RECORD_FORMATS

from .sources import PrepareError, Unit, _line_number, jsonl_lines

__all__ = ["CHATML", "PAIR_COUNTERS", "RecordSettings", "encode_record_texts", "lay_out_pairs",
           "pack_records", "read_records", "record_settings", "render_record"]

# The built-in template for a tokenizer without one: ChatML written as plain text (the tokenizer has no
# <|im_start|> token; the markers are ordinary text to it).
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ROLES = ("system", "user", "assistant")
PAIR_FIELDS = ("prompt", "chosen", "rejected")
# Per split, what `lay_out_pairs` counts (the manifest's records.splits, with "records").
PAIR_COUNTERS = ("pairs", "truncated_sequences", "truncated_tokens", "padding_tokens", "target_tokens",
                 "pairs_without_targets")

_PACKED = {
    "layout": "packed",
    "packing": "whole records, several per sequence; one that does not fit the rest of a sequence starts the next, "
               "the rest padded with EOS (not a target); a record longer than seq_len keeps its first seq_len "
               "tokens, counted as truncated; the last sequence padded",
    "targets": "mask 1: the token is the assistant's (chat) or the completion's; the EOS after a record ending "
               "with one",
}
_PAIRS = {
    "layout": "pairs",
    "packing": "one record, two sequences: in its split, sequence 2i is pair i's chosen and 2i+1 its rejected (the "
               "split rule hashes the record's line, so both halves share a split); each sequence is exactly "
               "seq_len tokens: its tokens, then EOS, then EOS padding (not a target); no two records share a "
               "sequence; a sequence longer than seq_len keeps its first seq_len tokens, counted as truncated, and "
               "a pair left with a half holding no target is counted (pairs_without_targets)",
    "targets": "mask 1: the response's tokens (the text after a string prompt; the final assistant turn after a "
               "message prompt, not assistant turns inside the prompt) and the EOS after them",
}


@dataclass(frozen=True)
class RecordSettings:
    fmt: str  # chat | prompt-completion | preference
    template: str | None  # jinja2 text (chat; preference with message prompts); None: no template
    special_tokens: dict  # bos_token, eos_token: what templates may write
    template_has_special_tokens: bool  # the tokenizer's own template: special tokens in its text are special


def record_settings(data_format: str, chat_template: str | None, tok,
                    filtered: bool) -> tuple[RecordSettings | None, dict | None]:
    """Returns what the workers need to render records, and the manifest's `records` settings; (None, None)
    for documents. A preference corpus may have no template (string prompts need none)."""
    if data_format not in RECORD_FORMATS:
        return None, None
    if filtered:
        raise PrepareError("deduplication and decontamination read documents, not sft records; turn them off")
    template = None
    if data_format == "chat" or (data_format == "preference" and chat_template is not None):
        if chat_template not in ("tokenizer", "chatml"):
            raise PrepareError(f"{data_format} records need the plan's chat_template (tokenizer or chatml), got "
                               f"{chat_template!r}")
        template = CHATML if chat_template == "chatml" else tok.chat_template
        if not template:
            raise PrepareError("the plan says the tokenizer's own chat_template, but the tokenizer has none; "
                               "compile the recipe again")
    special = {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}
    settings = RecordSettings(data_format, template, special, chat_template == "tokenizer")
    layout = _PAIRS if data_format == "preference" else _PACKED
    info = {"settings": {
        "chat_template": chat_template if template else None,
        "template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        **layout}, "splits": {}}
    return settings, info


@dataclass(frozen=True)
class Record:
    """One sequence's text: an sft record, or one half of a preference pair (chosen, then rejected)."""

    text: str
    spans: tuple[tuple[int, int], ...]  # character ranges of the targets
    ends_with_target: bool
    identity: bytes  # the record's line, for the split rule: both halves of a pair share it
    opens_record: bool  # False for a pair's rejected half, so that a pair counts as one record


class _Refused(Exception):
    """A line that is not a valid record: the reason; the caller locates it (only then: finding the line
    number reads the file again)."""


def read_records(unit: Unit, settings: RecordSettings) -> list[Record]:
    """The unit's records rendered, in order, a pair as its two halves; a located PrepareError for a line that
    is not a valid record."""
    out = []
    for seg in unit.segments:
        for line, offset in jsonl_lines(seg):
            try:
                rendered = _render_line(line, settings)
            except _Refused as e:
                raise PrepareError(str(e), f"{seg.path}:{_line_number(seg.path, offset)}") from None
            out += [Record(text, spans, ends, bytes(line), i == 0) for i, (text, spans, ends) in enumerate(rendered)]
    return out


def render_record(record: object, settings: RecordSettings, where: str) -> tuple[str, tuple[tuple[int, int], ...], bool]:
    """Returns (text, target character spans, whether it ends with a target) for one sft record."""
    try:
        return _render_sft(record, settings)
    except _Refused as e:
        raise PrepareError(str(e), where) from None


def _render_line(line: bytes, settings: RecordSettings) -> list[tuple[str, tuple[tuple[int, int], ...], bool]]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Refused(f"invalid JSON: {e.msg} (column {e.colno})" if isinstance(e, json.JSONDecodeError)
                       else "not valid UTF-8") from None
    return _render_pair(record, settings) if settings.fmt == "preference" else [_render_sft(record, settings)]


def _render_sft(record: object, settings: RecordSettings) -> tuple[str, tuple[tuple[int, int], ...], bool]:
    if settings.fmt == "prompt-completion":
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "completion")):
            raise _Refused('expected {"prompt": str, "completion": str}')
        prompt, completion = record["prompt"], record["completion"]
        if not completion:
            raise _Refused("empty completion: nothing to learn")
        return prompt + completion, ((len(prompt), len(prompt) + len(completion)),), True
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise _Refused('expected {"messages": [{"role": ..., "content": ...}, ...]}')
    _check_messages(messages, "message")
    if not any(m["role"] == "assistant" for m in messages):
        raise _Refused("no assistant message: nothing to learn")
    text, spans = _render_chat(messages, settings)
    return text, spans, messages[-1]["role"] == "assistant"


def _render_pair(record: object, settings: RecordSettings) -> list[tuple[str, tuple[tuple[int, int], ...], bool]]:
    """Returns the chosen and the rejected sequence of a preference record: (text, target spans, True) each."""
    if not isinstance(record, dict):
        raise _Refused(f'expected {{"prompt": ..., "chosen": ..., "rejected": ...}}, got {_kind(record)}')
    missing = [k for k in PAIR_FIELDS if k not in record]
    if missing:
        raise _Refused(f"no field {missing[0]!r} (a preference record has {', '.join(PAIR_FIELDS)})")
    prompt = record["prompt"]
    responses = [_response(record[k], k) for k in ("chosen", "rejected")]
    if responses[0] == responses[1]:
        raise _Refused("chosen and rejected are the same: nothing to prefer")
    if isinstance(prompt, str):
        return [(prompt + r, ((len(prompt), len(prompt) + len(r)),), True) for r in responses]
    if not isinstance(prompt, list) or not prompt:
        raise _Refused(f"prompt is {_kind(prompt)}, expected a string or a list of messages")
    _check_messages(prompt, "prompt message")
    if prompt[-1]["role"] != "user":
        raise _Refused(f"the prompt's last message is {prompt[-1]['role']}, not user: the responses answer a user turn")
    if settings.template is None:
        raise _Refused("a message prompt needs a chat template, and the plan has none (data.chat_template)")
    out = []
    for response in responses:
        text, spans = _render_chat([*prompt, {"role": "assistant", "content": response}], settings)
        out.append((text, spans[-1:], True))  # the response only: not an assistant turn inside the prompt
    return out


def _response(value: object, key: str) -> str:
    """The text of a chosen or rejected response: a string, or TRL's [{"role": "assistant", "content": str}]."""
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        value = value[0]["content"]
    if not isinstance(value, str):
        raise _Refused(f'{key} is {_kind(value)}, expected a string or [{{"role": "assistant", "content": str}}]')
    if not value:
        raise _Refused(f"empty {key}: nothing to learn")
    return value


def _kind(value: object) -> str:
    """What a JSON value is, in the words of the error message."""
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}" if value else "an empty list"
    names = {dict: "an object", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_messages(messages: list, what: str) -> None:
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise _Refused(f"{what} {i} needs a role ({', '.join(ROLES)}) and a string content")


def _render_chat(messages: list[dict], settings: RecordSettings) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Returns the template's render of `messages` and the character span of each assistant turn in it."""
    from jinja2 import TemplateError

    template = _compiled(settings.template)

    def render(turns: list[dict], generation_prompt: bool) -> str:
        try:
            return template.render(messages=turns, add_generation_prompt=generation_prompt, **settings.special_tokens)
        except (TemplateError, ValueError) as e:  # ValueError: the template's raise_exception
            raise _Refused(f"the chat template refuses this conversation: {e}") from None

    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise _Refused("the chat template does not render the conversation turn by turn (each turn's text a "
                           "prefix of the whole); use data.chat_template chatml")
        spans.append((len(prompt), len(upto)))
    return text, tuple(spans)


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


def lay_out_pairs(tokens: np.ndarray, mask: np.ndarray, lengths: list[int], seq_len: int,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Gives each record (its tokens and masks concatenated, `lengths` each: a pair's chosen, then its rejected)
    a sequence of its own: its first `seq_len` tokens (a longer one is counted as truncated), padded to `seq_len`
    with `pad_id` (mask 0). Returns (tokens, mask, counts), counts as PAIR_COUNTERS name them."""
    if len(lengths) % 2:
        raise ValueError(f"{len(lengths)} halves of preference pairs: a pair has two")
    out_t = np.full((len(lengths), seq_len), pad_id, dtype=tokens.dtype)
    out_m = np.zeros((len(lengths), seq_len), dtype=np.uint8)
    counts = dict.fromkeys(PAIR_COUNTERS, 0)
    start = 0
    for row, n in enumerate(lengths):
        kept = min(n, seq_len)
        out_t[row, :kept], out_m[row, :kept] = tokens[start : start + kept], mask[start : start + kept]
        start += n
        counts["padding_tokens"] += seq_len - kept
        if n > seq_len:
            counts["truncated_sequences"] += 1
            counts["truncated_tokens"] += n - seq_len
    targets = out_m.sum(axis=1, dtype=np.int64)
    counts["pairs"] = len(lengths) // 2
    counts["target_tokens"] = int(targets.sum())
    counts["pairs_without_targets"] = int((targets.reshape(-1, 2).min(axis=1) == 0).sum())
    return out_t.reshape(-1), out_m.reshape(-1), counts
