"""The Hugging Face side on a random-init tiny Llama (2.1M parameters, the 32,000-piece Mistral
tokenizer): batched scoring equals one-at-a-time scoring, perplexity is sane, and
`run_evaluation` / `python -m runtime.evaluate` write the results, the table and the chart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dapc.errors import DapcError
from runtime.evaluate import HFModel, Prompt, perplexity, run_evaluation
from runtime.evaluate.__main__ import main
from runtime.evaluate.perplexity import text_files
from runtime.tokenizer import resolve_tokenizer_dir

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
BENCHMARK_FILES = {
    "cti-mcq": FIXTURES / "cti-mcq.tsv",
    "cybermetric": FIXTURES / "cybermetric.json",
    "seceval": FIXTURES / "seceval.json",
}
TEXT = (
    "Zero trust architecture assumes no implicit trust in any network location. "
    "Every request is authenticated, authorized and encrypted before access is granted. "
) * 20


def build_tiny_llama(directory: Path, seed: int) -> Path:
    """A random-init 2-layer Llama with the Mistral v1 SentencePiece tokenizer, saved to `directory`
    (loaded back with `AutoTokenizer.from_pretrained(directory)` by `HFModel`)."""
    directory.mkdir(parents=True)
    # dapc's offline conversion of mistral-common's tokenizer.model.v1 (no protobuf needed).
    for file in resolve_tokenizer_dir("mistral-common:v1").iterdir():
        shutil.copy(file, directory / file.name)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return build_tiny_llama(root / "base", seed=0), build_tiny_llama(root / "adapted", seed=1)


@pytest.fixture(scope="module")
def base(models) -> HFModel:
    return HFModel(models[0], device="cpu", batch_tokens=256)


def test_tokenizer_is_the_mistral_one(base):
    assert len(base.tokenizer) == 32000
    assert base.tokenizer.encode("Zero trust architecture", add_special_tokens=False) == [23697, 4893, 13811]


def test_batched_loglik_equals_one_request_at_a_time_and_a_direct_forward(base):
    contexts = ["Question: which port?\nAnswer:", "A much longer context about zero trust and networks.\nAnswer:"] * 3
    continuations = [" A", " B", " AB", " ABCD", " C", " D"]
    batched = base.loglik(contexts, continuations)
    single = [base.loglik([c], [k])[0] for c, k in zip(contexts, continuations, strict=True)]
    assert batched == pytest.approx(single, abs=1e-4)
    whole = base.tokenizer.encode(contexts[3] + continuations[3])
    n_context = len(base.tokenizer.encode(contexts[3]))
    with torch.inference_mode():
        logprobs = base.model(torch.tensor([whole])).logits[0].log_softmax(-1)
    direct = sum(float(logprobs[i - 1, whole[i]]) for i in range(n_context, len(whole)))
    assert batched[3] == pytest.approx(direct, abs=1e-4)


def test_batched_greedy_generation_equals_one_prompt_at_a_time(base):
    prompts = [Prompt(plain=text, chat=()) for text in ("Question: port?", "Zero trust means", "A B C D")]
    batched = base.generate(prompts, max_new_tokens=6)
    assert batched == [base.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert all(text for text in batched)


def test_chat_prompts_go_through_the_template_and_a_refused_system_turn_is_folded_in(models):
    model = HFModel(models[0], device="cpu", chat=True)
    model.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    )
    prompt = Prompt(
        plain="unused", chat=({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    )
    assert model.tokenizer.decode(model.encode_prompt(prompt)) == "[user] Be brief.\n\nHi\n[assistant]"


def test_missing_model_directory_is_a_located_error(tmp_path):
    with pytest.raises(DapcError) as e:
        run_evaluation(tmp_path / "nope", {}, tmp_path / "out", general_text=tmp_path)
    assert str(e.value) == f"{tmp_path / 'nope'}: model directory not found"


def test_perplexity_of_a_text_file_equals_that_of_its_tokens(base, tmp_path):
    path = tmp_path / "domain.txt"
    path.write_text(TEXT)
    from_text = perplexity(base, path, seq_len=64, max_tokens=300)
    tokens = base.encode(TEXT)[:300]
    from_tokens = perplexity(base, lambda: [tokens], seq_len=64, max_tokens=300)
    assert (from_text.tokens, from_text.windows) == (300 - 5, 5)
    assert from_text.perplexity == pytest.approx(from_tokens.perplexity, rel=1e-6)
    assert 20_000 < from_text.perplexity < 45_000  # a random model is close to uniform over 32,000 pieces


def test_text_directory_reads_its_text_files_but_not_licence_or_readme(tmp_path):
    for name in ("b.md", "a/c.txt", "LICENSE.txt", "README.md", "data.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("text")
    assert text_files(tmp_path) == [tmp_path / "a" / "c.txt", tmp_path / "b.md"]
    with pytest.raises(DapcError) as e:
        text_files([tmp_path / "missing.txt"])
    assert str(e.value) == f"{tmp_path / 'missing.txt'}: text file or directory not found"


def test_run_evaluation_compares_two_models_and_writes_json_markdown_and_png(models, tmp_path):
    (tmp_path / "general.txt").write_text("object: a tangible and visible entity.\n" * 30)
    (tmp_path / "domain.txt").write_text(TEXT)
    result = run_evaluation(
        models[1],
        BENCHMARK_FILES,
        tmp_path / "out",
        compare_to=models[0],
        general_text=tmp_path / "general.txt",
        domain_text=[tmp_path / "domain.txt"],
        k_shot=2,
        ppl_seq_len=128,
        ppl_max_tokens=512,
        device="cpu",
    )
    saved = json.loads(result.results_path.read_text())
    assert saved == json.loads(json.dumps(result.results))
    adapted, base = saved["models"]["model"], saved["models"]["compare_to"]
    assert adapted["path"] == str(models[1].resolve()) and base["path"] == str(models[0].resolve())
    assert adapted["revision"].startswith("sha256:") and adapted["revision"] != base["revision"]
    for name, n in (("cti-mcq", 8), ("cybermetric", 10), ("seceval", 8)):
        score = adapted["benchmarks"][name]
        assert (score["n"], score["mode"], score["k_shot"]) == (n, "loglik", 2)
        assert score["ci95"][0] <= score["accuracy"] <= score["ci95"][1]
        assert score["prompt_sha256"] == base["benchmarks"][name]["prompt_sha256"]
        assert score["model_revision"] == adapted["revision"]
    assert set(adapted["benchmarks"]["seceval"]["per_topic"]) >= {"WebSecurity", "Cryptography"}
    assert set(adapted["perplexity"]) == {"general", "domain"}
    table = result.table_path.read_text().splitlines()
    assert table[0] == "| metric | detail | base: base | model: adapted | change |"
    assert table[2].startswith("| cti-mcq accuracy (%) | n=8, loglik, 2-shot | ")
    assert table[-1].startswith("| domain text perplexity | 508 tokens, windows of 128 | ")
    assert result.chart_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_mode_runs_the_official_prompts(models, tmp_path):
    result = run_evaluation(
        models[0], BENCHMARK_FILES, tmp_path, mode="generate", limit=2, max_new_tokens=4, device="cpu"
    )
    scores = result.results["models"]["model"]["benchmarks"]
    assert {name: (s["n"], s["mode"], s["k_shot"]) for name, s in scores.items()} == {
        "cti-mcq": (2, "generate", 0),
        "cybermetric": (2, "generate", 0),
        "seceval": (2, "generate", 5),
    }


def test_command_line_exits_2_with_the_located_message_for_a_bad_file(models, tmp_path, capsys):
    bad = tmp_path / "questions.json"
    bad.write_text('[{"question": "q"}')
    code = main(["--model", str(models[0]), "--benchmark", f"seceval={bad}", "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err == f"error: {bad}:1:19: not valid JSON: Expecting ',' delimiter\n"
