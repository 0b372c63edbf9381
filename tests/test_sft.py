"""Supervised fine-tuning: chat records become tokens and a loss mask (only the assistant's tokens are targets),
packed whole several per sequence, truncation counted; the tiny example trains on them under FSDP2 and ZeRO,
resumes exactly after kill -9, and its measured peak memory stays near the plan's."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from dapc.cli import main
from dapc.compile import compile_recipe
from runtime.data import PackedDataset
from runtime.prepare import prepare_corpus
from runtime.prepare.records import pack_records
from runtime.tokenizer import load_tokenizer
from runtime.train.loss import IGNORE_INDEX, causal_lm_loss, install_chunked_loss
from tests.conftest import REPO
from tests.train_support import (
    RUN_TIMEOUT_SECONDS,
    read_plan,
    records,
    run_env,
    train,
    train_killed_once,
)

SFT_RECIPE = REPO / "examples" / "tiny" / "sft.yaml"
TOKENIZER = "mistral-common:v1"
EOS = 2  # mistral-common v1's </s>

SYSTEM, Q1, A1, Q2, A2 = ("You are a concise security assistant.", "What is phishing?",
                          "A message that pretends to come from someone you trust.", "Give one example.",
                          "An email asking you to reset a password through a strange link.")
CONVERSATION = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                             {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                             {"role": "assistant", "content": A2}]}


def _prepare(tmp_path: Path, conversations: list[dict], seq_len: int, console: Console | None = None) -> Path:
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    out = tmp_path / "data"
    prepare_corpus([str(tmp_path / "chat.jsonl")], data_format="chat", chat_template="chatml", tokenizer=TOKENIZER,
                   seq_len=seq_len, prepared_dir=out, workers=1, console=console, progress=False)
    return out


def _runs(tokens: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """The maximal runs of counted (label != IGNORE_INDEX) tokens, in order."""
    runs, current = [], []
    for t, label in zip(tokens.tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_labels_count_every_assistant_token_and_nothing_else(tmp_path: Path):
    """ChatML as text, two turns: each assistant turn's content and its `<|im_end|>\\n` are targets, then the EOS
    closing the record (it ends with an assistant turn); the system and user turns, every role header and the
    padding after the EOS are not."""
    dataset = PackedDataset(_prepare(tmp_path, [CONVERSATION], seq_len=128))
    tokens, labels = dataset.batch([0])[0], dataset.labels([0])[0]
    tok = load_tokenizer(TOKENIZER)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION["messages"])
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    n = len(encoded["input_ids"])
    assert tokens[:n].tolist() == encoded["input_ids"] and tokens[n] == EOS  # the render, tokenized whole, then EOS
    assert (tokens[n + 1:] == EOS).all() and (labels[n + 1:] == IGNORE_INDEX).all()  # padding: no target
    spans = [(text.index(a), text.index(a) + len(a) + len("<|im_end|>\n")) for a in (A1, A2)]
    for i, (start, _) in enumerate(encoded["offset_mapping"]):
        counted = any(a <= start < b for a, b in spans)
        assert (labels[i] == tokens[i]) if counted else (labels[i] == IGNORE_INDEX), (i, tok.decode([tokens[i]]))
    assert labels[n] == EOS  # the record's closing EOS is a target
    turns = _runs(tokens, labels)
    assert [tok.decode(r) for r in turns] == [f"{A1}<|im_end|>\n", f"{A2}<|im_end|>\n</s>"]


def test_two_conversations_packed_in_one_sequence_keep_their_masks(tmp_path: Path):
    second = {"messages": [{"role": "user", "content": "What is least privilege?"},
                           {"role": "assistant", "content": "Only the access a job needs."}]}
    dataset = PackedDataset(_prepare(tmp_path, [CONVERSATION, second, CONVERSATION], seq_len=200))
    assert len(dataset) == 2  # the third does not fit what is left of the first sequence: it starts the second
    tok = load_tokenizer(TOKENIZER)
    first = dataset.batch([0])[0]
    assert (first == EOS).sum() >= 2 and first[0] != EOS
    assert [tok.decode(r) for r in _runs(first, dataset.labels([0])[0])] == [
        f"{A1}<|im_end|>\n", f"{A2}<|im_end|>\n</s>", "Only the access a job needs.<|im_end|>\n</s>"]
    assert [tok.decode(r) for r in _runs(dataset.batch([1])[0], dataset.labels([1])[0])] == [
        f"{A1}<|im_end|>\n", f"{A2}<|im_end|>\n</s>"]
    manifest = dataset.manifest.records["splits"]["train"]
    assert (manifest["records"], manifest["truncated_records"]) == (3, 0)
    assert manifest["padding_tokens"] == 2 * 200 - dataset.manifest.splits["train"].tokens


def test_a_record_longer_than_seq_len_is_truncated_and_counted(tmp_path: Path):
    console = Console(file=io.StringIO(), width=200)
    dataset = PackedDataset(_prepare(tmp_path, [CONVERSATION], seq_len=32, console=console))
    tokens = dataset.manifest.splits["train"].tokens  # with its EOS
    assert dataset.manifest.records["splits"]["train"] | {"padding_tokens": 0} == {
        "records": 1, "truncated_records": 1, "truncated_tokens": tokens - 32, "padding_tokens": 0,
        "target_tokens": int((dataset.labels([0]) != IGNORE_INDEX).sum())}
    assert len(dataset) == 1
    assert (f"train: 1 records, {int((dataset.labels([0]) != IGNORE_INDEX).sum())} target tokens; 1 longer than "
            f"seq_len truncated ({tokens - 32} tokens cut), 0 padding tokens") in console.file.getvalue()


def test_pack_records_starts_a_record_that_does_not_fit_on_a_new_sequence():
    tokens = np.arange(1, 12, dtype=np.uint32)  # records of 3, 4 and 4 tokens
    mask = np.array([0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1], dtype=np.uint8)
    packed, packed_mask, counts = pack_records(tokens, mask, [3, 4, 4], fill=0, seq_len=5, pad_id=0)
    assert packed.tolist() == [1, 2, 3, 0, 0, 4, 5, 6, 7, 0, 8, 9, 10, 11]
    assert packed_mask.tolist() == [0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1]
    assert counts == {"truncated_records": 0, "truncated_tokens": 0, "padding_tokens": 3, "target_tokens": 8}


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def test_masked_loss_is_the_mean_over_targets_plain_and_chunked():
    """Position t is scored on label t + 1; the mean is over the counted targets; none counted gives 0, not NaN."""
    plain = _tiny_model()
    chunked = _tiny_model()
    head = install_chunked_loss(chunked, 7)
    ids = torch.randint(0, 512, (2, 20))
    labels = torch.where(torch.rand(2, 20) < 0.4, ids, torch.full_like(ids, IGNORE_INDEX))
    logits = plain(input_ids=ids).logits.float()
    targets = labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), targets.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum") / (targets != -100).sum()
    assert causal_lm_loss(plain, ids, None, labels=labels).item() == pytest.approx(expected.item(), rel=1e-5)
    assert causal_lm_loss(chunked, ids, head, labels=labels).item() == pytest.approx(expected.item(), rel=1e-5)
    none = torch.full_like(ids, IGNORE_INDEX)
    assert causal_lm_loss(plain, ids, None, labels=none).item() == 0.0
    assert causal_lm_loss(chunked, ids, head, labels=none).item() == 0.0


TINY_RECIPE = REPO / "examples" / "tiny" / "recipe.yaml"


@pytest.mark.parametrize(("recipe", "override", "line"), [
    (SFT_RECIPE, "training.objective=cpt", (f"{SFT_RECIPE}:9:11: format chat holds records, not documents; set "
                                            "training.objective sft (chat, prompt-completion) or dpo/orpo (preference), "
                                            "or give text, jsonl or parquet documents")),
    (TINY_RECIPE, "training.objective=sft", (f"{TINY_RECIPE}:14:11: objective sft needs chat or prompt-completion "
                                             "records, not format text")),
    (SFT_RECIPE, "data.decontamination.enabled=true", ("--set data.decontamination.enabled=true: deduplication and "
                                                       "decontamination read documents, not records; turn them "
                                                       "off for objective sft")),
])
def test_impossible_objective_and_format_combinations_exit_2_with_one_located_line(recipe: Path, override: str,
                                                                                  line: str):
    result = CliRunner().invoke(main, ["plan", str(recipe), f"--set={override}"])
    assert (result.exit_code, result.stderr.strip().splitlines()) == (2, [f"error: {line}"])


def test_the_plan_records_the_objective_and_the_template_decision():
    plan = compile_recipe(SFT_RECIPE).plan
    assert (plan.objective.name, plan.objective.chat_template) == ("sft", "chatml")
    assert plan.objective.reason == "auto: the tokenizer has no chat_template; the built-in chatml, as plain text"
    assert plan.corpus.decontamination is None  # auto is off for sft; the base recipe's benchmarks stay for eval


# The tiny SFT example run for real: one prepared directory, an FSDP2 reference run that the other tests reuse.

def _compile(folder: Path, data: Path, *extra: str) -> Path:
    compiled = compile_recipe(SFT_RECIPE, overrides=(f"data.prepared_dir={data}", "checkpoint.export_hf=false",
                                                     *extra), output=str(folder / "run"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(compiled.plan.text())
    return folder / "plan.json"


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    plan = _compile(root / "prepare", root / "data")
    subprocess.run([sys.executable, "-m", "runtime.prepare", "--plan", str(plan), "--no-progress"], cwd=REPO,
                   env=run_env(), check=True, capture_output=True, timeout=RUN_TIMEOUT_SECONDS)
    return root / "data"


@pytest.fixture(scope="module")
def fsdp2_run(sft_data: Path, tmp_path_factory) -> Path:
    plan = _compile(tmp_path_factory.mktemp("fsdp2"), sft_data)
    assert read_plan(plan)["strategy"]["name"] == "fsdp2-full" and read_plan(plan)["loss"]["kind"] == "plain"
    train(plan, 2)
    return plan


def _steps(plan: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(plan, "step")}


def test_sft_under_fsdp2_learns_and_its_peak_memory_is_within_15_percent_of_the_plan(fsdp2_run: Path):
    losses = _steps(fsdp2_run)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1] - 0.5
    (memory,) = records(fsdp2_run, "memory")
    planned = read_plan(fsdp2_run)["memory"]["per_gpu_bytes"]["total"]
    assert abs(memory["measured_bytes"] / planned - 1) <= 0.15, (memory["measured_bytes"], planned)


def test_sft_under_zero2_with_the_chunked_loss_learns(sft_data: Path, tmp_path: Path):
    plan = _compile(tmp_path, sft_data, "strategy=zero2", "training.chunked_loss=true")
    assert read_plan(plan)["loss"]["kind"] == "chunked"
    train(plan, 2)
    losses = _steps(plan)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1] - 0.5


def test_sft_killed_9_after_a_checkpoint_resumes_to_the_uninterrupted_losses(fsdp2_run: Path, sft_data: Path,
                                                                            tmp_path: Path):
    plan = _compile(tmp_path, sft_data)
    train_killed_once(plan, 2, tmp_path / "run" / "checkpoints" / "step-4" / "meta.json", tmp_path / "killed.log")
    train(plan, 2)
    reference, resumed = _steps(fsdp2_run), _steps(plan)
    assert sorted(resumed) == list(range(1, 9))
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6), step


def test_an_interrupted_sft_preparation_resumes_to_identical_token_and_mask_shards(tmp_path: Path, monkeypatch):
    from runtime.prepare import pipeline

    corpus = REPO / "examples" / "tiny" / "sft" / "conversations.jsonl"
    settings = {"data_format": "chat", "chat_template": "chatml", "tokenizer": TOKENIZER, "seq_len": 128,
                "validation_fraction": 0.1, "seed": 5, "workers": 1, "shard_sequences": 2, "unit_bytes": 512,
                "progress": False}
    clean = prepare_corpus([str(corpus)], prepared_dir=tmp_path / "clean", **settings)
    add, calls = pipeline._Run.add, []

    def add_then_die(run, result):
        calls.append(result.index)
        if len(calls) == 12:
            raise KeyboardInterrupt  # as a kill would stop it, between two units
        add(run, result)

    monkeypatch.setattr(pipeline._Run, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([str(corpus)], prepared_dir=tmp_path / "killed", **settings)
    monkeypatch.setattr(pipeline._Run, "add", add)
    assert (tmp_path / "killed" / "progress.json").is_file()
    resumed = prepare_corpus([str(corpus)], prepared_dir=tmp_path / "killed", **settings)
    assert resumed == clean and len(clean.loss_masks) == len(clean.shards) > 4
    for info in [*clean.shards, *clean.loss_masks]:
        assert (tmp_path / "killed" / info.file).read_bytes() == (tmp_path / "clean" / info.file).read_bytes()


def test_a_tokenizers_own_template_is_rendered_turn_by_turn_and_only_the_replies_are_targets():
    """A Llama-3-style template (special tokens written as text, a generation prompt): the target spans are each
    reply and its end-of-turn token; a template whose turns are not prefixes of the whole is refused."""
    from runtime.prepare.records import RecordSettings, render_record
    from runtime.prepare.sources import PrepareError

    template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    settings = RecordSettings("chat", template, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, True)
    text, spans, ends = render_record(CONVERSATION, settings, "x.jsonl:1")
    assert [text[a:b] for a, b in spans] == [f"{A1}<|eot_id|>", f"{A2}<|eot_id|>"] and ends
    reversed_turns = RecordSettings("chat", "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}", {}, True)
    with pytest.raises(PrepareError, match="does not render the conversation turn by turn"):
        render_record(CONVERSATION, reversed_turns, "x.jsonl:1")
