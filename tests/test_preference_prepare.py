"""Preference records ({"prompt", "chosen", "rejected"}, for DPO and ORPO) prepared as pairs: each record two
sequences of exactly seq_len tokens, chosen at 2i and rejected at 2i + 1 of its split, only the response and its
EOS targets; truncation and pairs left without targets counted; a bad line refused at its line; both halves in
one split; an interrupted preparation resumes to the same bytes."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from runtime.prepare import PrepareError, load_manifest, prepare_corpus
from runtime.prepare.encode import is_validation
from runtime.prepare.records import CHATML, RecordSettings, read_records
from runtime.prepare.sources import hash_file, plan_units
from runtime.tokenizer import load_tokenizer

TOKENIZER = "mistral-common:v1"
EOS = 2  # mistral-common v1's </s>
PROMPT, CHOSEN, REJECTED = "Q: What is phishing?\nA:", " A message that fakes a trusted sender.", " A kind of fishing."


def _write(tmp_path: Path, records: list[object]) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _prepare(tmp_path: Path, records: list[object], seq_len: int, chat_template: str | None = None,
             console: Console | None = None, **settings) -> Path:
    out = tmp_path / "data"
    prepare_corpus([str(_write(tmp_path, records))], data_format="preference", chat_template=chat_template,
                   tokenizer=TOKENIZER, seq_len=seq_len, prepared_dir=out, workers=1, console=console,
                   progress=False, **settings)
    return out


def _rows(out: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of `split`, one row a sequence, read from the shards as the manifest lists them."""
    m = load_manifest(out)
    tokens = [np.fromfile(out / s.file, dtype=m.dtype) for s in m.shards_for(split)]
    masks = [np.fromfile(out / s.file, dtype=np.uint8) for s in m.loss_masks_for(split)]
    return (np.concatenate(tokens).reshape(-1, m.seq_len).astype(np.int64),
            np.concatenate(masks).reshape(-1, m.seq_len))


def _expected(text: str, response_start: int, seq_len: int) -> tuple[list[int], list[int]]:
    """The sequence `text` should become: its tokens (tokenized whole), EOS, EOS padding; targets: the tokens
    starting at or after `response_start`, and the EOS."""
    encoded = load_tokenizer(TOKENIZER)(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, starts = encoded["input_ids"], [a for a, _ in encoded["offset_mapping"]]
    pad = seq_len - len(ids) - 1
    return ids + [EOS] * (1 + pad), [int(a >= response_start) for a in starts] + [1] + [0] * pad


def test_a_string_prompt_pair_is_two_seq_len_sequences_and_only_each_response_and_its_eos_are_targets(tmp_path):
    second = {"prompt": "Q: Name a strong password.\nA:", "chosen": " A long random passphrase.",
              "rejected": [{"role": "assistant", "content": " password123"}]}  # TRL's conversational response
    out = _prepare(tmp_path, [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, second], seq_len=40)
    tokens, mask = _rows(out)
    halves = [(PROMPT, CHOSEN), (PROMPT, REJECTED), (second["prompt"], second["chosen"]),
              (second["prompt"], " password123")]
    assert tokens.shape == (4, 40)  # chosen at 2i, rejected at 2i + 1
    padding = 0
    for row, (prompt, response) in enumerate(halves):
        ids, targets = _expected(prompt + response, len(prompt), 40)
        assert tokens[row].tolist() == ids and mask[row].tolist() == targets, row
        padding += 40 - len(load_tokenizer(TOKENIZER)(prompt + response, add_special_tokens=False)["input_ids"]) - 1
    tok = load_tokenizer(TOKENIZER)
    assert [tok.decode(t[m == 1].tolist()) for t, m in zip(tokens, mask)] == [
        f"{CHOSEN.strip()}</s>", f"{REJECTED.strip()}</s>", "A long random passphrase.</s>", "password123</s>"]
    manifest = load_manifest(out)
    assert manifest.records["settings"]["layout"] == "pairs" and manifest.records["settings"]["chat_template"] is None
    assert manifest.records["splits"]["train"] == {
        "records": 2, "pairs": 2, "truncated_sequences": 0, "truncated_tokens": 0,
        "padding_tokens": padding,
        "target_tokens": int(mask.sum()), "pairs_without_targets": 0}
    assert (manifest.splits["train"].documents, manifest.splits["train"].sequences) == (2, 4)


def test_a_message_prompt_targets_only_the_final_response_not_its_earlier_assistant_turn(tmp_path):
    prompt = [{"role": "system", "content": "You are a security assistant."},
              {"role": "user", "content": "What is phishing?"},
              {"role": "assistant", "content": "A message that fakes a trusted sender."},
              {"role": "user", "content": "Give one example."}]
    chosen, rejected = "An email asking you to reset a password through a strange link.", "A trout."
    out = _prepare(tmp_path, [{"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                               "rejected": rejected}], seq_len=160, chat_template="chatml")
    tokens, mask = _rows(out)
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in prompt)
    start = len(rendered + "<|im_start|>assistant\n")  # the generation prompt is not a target
    for row, response in enumerate((chosen, rejected)):
        ids, targets = _expected(f"{rendered}<|im_start|>assistant\n{response}<|im_end|>\n", start, 160)
        assert tokens[row].tolist() == ids and mask[row].tolist() == targets, row
        assert load_tokenizer(TOKENIZER).decode(tokens[row][mask[row] == 1].tolist()) == f"{response}<|im_end|>\n</s>"
    assert load_manifest(out).records["settings"]["template_sha256"] == hashlib.sha256(CHATML.encode()).hexdigest()


def test_truncated_sequences_and_pairs_left_without_targets_are_counted_and_reported(tmp_path):
    long_prompt = "Explain, in words a new employee understands, why phishing works so often:"
    records = [{"prompt": "Q:", "chosen": " Yes.", "rejected": " No."},  # fits
               {"prompt": "Q:", "chosen": " yes " * 20, "rejected": " No."},  # chosen cut, keeps targets
               {"prompt": long_prompt, "chosen": " Trust.", "rejected": " Luck."}]  # the prompt fills both halves
    console = Console(file=io.StringIO(), width=400)
    out = _prepare(tmp_path, records, seq_len=12, console=console)
    tokens, mask = _rows(out)
    tok = load_tokenizer(TOKENIZER)
    lengths = [len(tok(r["prompt"] + r[k], add_special_tokens=False)["input_ids"]) + 1
               for r in records for k in ("chosen", "rejected")]  # each half with its EOS
    assert lengths[2] > 12 and lengths[3] <= 12 and lengths[4] > 12 and lengths[5] > 12
    assert tokens.shape == (6, 12) and mask[2].sum() > 0 and mask[4].sum() == mask[5].sum() == 0
    cut = sum(n - 12 for n in lengths if n > 12)
    padding = sum(12 - n for n in lengths if n <= 12)
    assert load_manifest(out).records["splits"]["train"] == {
        "records": 3, "pairs": 3, "truncated_sequences": 3, "truncated_tokens": cut, "padding_tokens": padding,
        "target_tokens": int(mask.sum()), "pairs_without_targets": 1}
    assert (f"train: 3 preference pairs → 6 sequences (chosen, rejected), {int(mask.sum())} target tokens; 3 "
            f"sequences longer than seq_len truncated ({cut} tokens cut), 1 pairs with a half left without targets, "
            f"{padding} padding tokens") in console.file.getvalue()


ASSISTANT = [{"role": "assistant", "content": "Hi."}]
REFUSED = [
    ('{"prompt": "a", ', "invalid JSON: Expecting property name enclosed in double quotes (column 17)"),
    (b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}', "not valid UTF-8"),
    ([1, 2], 'expected {"prompt": ..., "chosen": ..., "rejected": ...}, got a list of 2 items'),
    ({"prompt": "a", "chosen": "b"}, "no field 'rejected' (a preference record has prompt, chosen, rejected)"),
    ({"prompt": 5, "chosen": "b", "rejected": "c"}, "prompt is a number, expected a string or a list of messages"),
    ({"prompt": [], "chosen": "b", "rejected": "c"},
     "prompt is an empty list, expected a string or a list of messages"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "b", "rejected": "c"},
     "prompt message 0 needs a role (system, user, assistant) and a string content"),
    ({"prompt": [{"role": "user", "content": "x"}, *ASSISTANT], "chosen": "b", "rejected": "c"},
     "the prompt's last message is assistant, not user: the responses answer a user turn"),
    ({"prompt": "a", "chosen": None, "rejected": "c"},
     'chosen is null, expected a string or [{"role": "assistant", "content": str}]'),
    ({"prompt": "a", "chosen": "b", "rejected": [{"role": "user", "content": "c"}]},
     'rejected is a list of 1 item, expected a string or [{"role": "assistant", "content": str}]'),
    ({"prompt": "a", "chosen": [*ASSISTANT, *ASSISTANT], "rejected": "c"},
     'chosen is a list of 2 items, expected a string or [{"role": "assistant", "content": str}]'),
    ({"prompt": "a", "chosen": "", "rejected": "c"}, "empty chosen: nothing to learn"),
    ({"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant", "content": ""}]},
     "empty rejected: nothing to learn"),
    ({"prompt": "a", "chosen": "Hi.", "rejected": ASSISTANT}, "chosen and rejected are the same: nothing to prefer"),
]


@pytest.mark.parametrize(("line", "why"), REFUSED, ids=[why.split(":")[0][:40] for _, why in REFUSED])
def test_every_refused_record_gives_one_located_line(tmp_path: Path, line: object, why: str):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "Q:", "chosen": " Yes.", "rejected": " No."}).encode()
    bad = line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
    path.write_bytes(good + b"\n\n" + bad + b"\n")  # the blank line counts: the bad one is line 3
    (unit,) = plan_units([hash_file(str(path))], "preference", None, 1 << 20)
    with pytest.raises(PrepareError) as refused:
        read_records(unit, RecordSettings("preference", CHATML, {}, False))
    assert str(refused.value).splitlines() == [f"{path}:3: {why}"]


def test_a_conversation_the_chat_template_raises_on_is_refused_at_its_line(tmp_path: Path):
    strict = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}[assistant] {% endif %}")
    path = _write(tmp_path, [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
                              "chosen": "Yes.", "rejected": "No."}])
    (unit,) = plan_units([hash_file(str(path))], "preference", None, 1 << 20)
    with pytest.raises(PrepareError) as refused:
        read_records(unit, RecordSettings("preference", strict, {}, True))
    assert str(refused.value) == f"{path}:1: the chat template refuses this conversation: System role not supported"


def test_a_message_prompt_without_the_plans_chat_template_is_refused_at_its_line(tmp_path: Path):
    records = [{"prompt": "Q:", "chosen": " Yes.", "rejected": " No."},  # a string prompt needs no template
               {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "Yes.", "rejected": "No."}]
    with pytest.raises(PrepareError) as refused:
        _prepare(tmp_path, records, seq_len=16, chat_template=None)
    assert str(refused.value) == (f"{tmp_path / 'pairs.jsonl'}:2: a message prompt needs a chat template, and the "
                                  "plan has none (data.chat_template)")


def _numbered_pairs(n: int) -> list[dict]:
    return [{"prompt": f"Pair {i}:", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(n)]


def test_both_halves_of_a_pair_land_in_the_split_its_line_hashes_to(tmp_path: Path):
    pairs = _numbered_pairs(24)
    out = _prepare(tmp_path, pairs, seq_len=16, validation_fraction=0.3, seed=3)
    tok = load_tokenizer(TOKENIZER)
    seen = {}
    for split in ("train", "validation"):
        tokens, _ = _rows(out, split)
        texts = [tok.decode(row[row != EOS].tolist()) for row in tokens]
        for i in range(0, len(texts), 2):
            k = int(texts[i].split()[1].rstrip(":"))
            assert (texts[i], texts[i + 1]) == (f"Pair {k}: yes {k}", f"Pair {k}: no {k}")
            seen[k] = split
    expected = {i: "validation" if is_validation(hashlib.sha256(json.dumps(p).encode()).digest(), 3, 0.3) else "train"
                for i, p in enumerate(pairs)}
    assert seen == expected and set(seen.values()) == {"train", "validation"}


def test_an_interrupted_preference_preparation_resumes_to_identical_token_and_mask_shards(tmp_path, monkeypatch):
    from runtime.prepare import pipeline

    corpus = _write(tmp_path, _numbered_pairs(40))
    settings = {"data_format": "preference", "tokenizer": TOKENIZER, "seq_len": 16, "validation_fraction": 0.2,
                "seed": 5, "workers": 1, "shard_sequences": 3, "unit_bytes": 128, "progress": False}
    clean = prepare_corpus([str(corpus)], prepared_dir=tmp_path / "clean", **settings)
    add, calls = pipeline._Run.add, []

    def add_then_die(run, result):
        calls.append(result.index)
        if len(calls) == 8:
            raise KeyboardInterrupt  # as a kill would stop it, between two units
        add(run, result)

    monkeypatch.setattr(pipeline._Run, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([str(corpus)], prepared_dir=tmp_path / "killed", **settings)
    monkeypatch.setattr(pipeline._Run, "add", add)
    assert (tmp_path / "killed" / "progress.json").is_file()
    console = Console(file=io.StringIO(), width=400)
    resumed = prepare_corpus([str(corpus)], prepared_dir=tmp_path / "killed", console=console, **settings)
    assert "resuming at work unit 7 " in console.file.getvalue()  # the units before the interruption not redone
    assert resumed == clean and len(clean.loss_masks) == len(clean.shards) > 4
    for info in [*clean.shards, *clean.loss_masks]:
        assert (tmp_path / "killed" / info.file).read_bytes() == (tmp_path / "clean" / info.file).read_bytes()
