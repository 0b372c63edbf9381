"""Training in stages: a recipe whose model.source is another recipe's export (CPT → SFT → ...) plans before
that export exists, from the producer's plan.json, and is refused where the export holds LoRA adapters only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dapc.cli import main
from dapc.compile import compile_recipe
from dapc.models.source import ModelSource
from dapc.plan_schema import SCHEMA_VERSION
from tests.conftest import REPO

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
    "max_position_embeddings": 256, "tie_word_embeddings": True, "torch_dtype": "float32",
}
CHAT_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"
CPU = "hardware: {gpu: cpu, gpu_memory_gib: 4, gpus_per_node: 1, cpu_ram_gib: 16, usd_per_gpu_hour: 0}\n"
PRODUCER = ("name: cpt\nmodel: {source: base, dtype: fp32}\ndata: {paths: [corpus], seq_len: 64}\n"
            "training: {tokens: 4096, global_batch_sequences: 2, precision: fp32}\n" + CPU)
CONVERSATION = {"messages": [{"role": "user", "content": "What is phishing?"},
                             {"role": "assistant", "content": "A message that pretends to come from someone you trust."}]}
WHERE = "recipe.yaml:3:11"  # model.source in `_consumer`'s recipe


def _consumer(folder: Path, source: str, init: str = "pretrained") -> Path:
    """Writes an SFT recipe at folder/recipe.yaml starting from `source` (line 3) and returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chat.jsonl").write_text((json.dumps(CONVERSATION) + "\n") * 32)  # fills a step, under an epoch
    (folder / "recipe.yaml").write_text(
        f"name: {folder.name}\nmodel:\n  source: {source}\n  dtype: fp32\n  init: {init}\n"
        "data: {paths: [chat.jsonl], format: chat, seq_len: 256}\n"
        "training: {objective: sft, tokens: 1024, global_batch_sequences: 2, precision: fp32}\n" + CPU)
    return folder / "recipe.yaml"


def _render(recipe: Path, out: Path, *overrides: str) -> dict:
    result = CliRunner().invoke(main, ["render", str(recipe), "-o", str(out), *overrides])
    assert result.exit_code == 0, result.output
    return json.loads((out / "plan.json").read_text())


@pytest.fixture
def producer(tmp_path: Path):
    """Renders the CPT recipe (a local base model with a chat template) into tmp/runs/cpt, with `overrides`, and
    returns its plan; the consumer recipe lives in tmp/sft, the working directory."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(TINY_CONFIG))
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("Zero trust architecture.\n" * 200)
    (tmp_path / "cpt.yaml").write_text(PRODUCER)
    (tmp_path / "sft").mkdir()

    def render(*overrides: str) -> dict:
        return _render(tmp_path / "cpt.yaml", tmp_path / "runs" / "cpt", *overrides)

    return render


def _plan(monkeypatch, recipe: Path):
    monkeypatch.chdir(recipe.parent)
    return CliRunner().invoke(main, ["plan", recipe.name, "--json"])


@pytest.mark.parametrize("init,needs", [
    ("pretrained", "training loads its weights, so that run must train and export first"),
    ("random", "model.init random builds the model from that config alone, without the export's weights")])
def test_a_stage_plans_from_the_producers_plan_before_its_export_exists(tmp_path, monkeypatch, producer, init, needs):
    cpt = producer()
    result = _plan(monkeypatch, _consumer(tmp_path / "sft", "../runs/cpt/export", init))
    assert result.exit_code == 0, result.output
    export, plan_file = tmp_path / "runs" / "cpt" / "export", tmp_path / "runs" / "cpt" / "plan.json"
    assert result.stderr == (
        f"warning: {WHERE}: {export} does not exist yet: planned from {plan_file}, the plan of run 'cpt' that "
        f"exports there (its model.config, and its tokenizer unless data.tokenizer is set); {needs}\n")
    plan = json.loads(result.stdout)
    assert plan["model"]["config"] == cpt["model"]["config"]
    without_name = {k: v for k, v in plan["model"]["architecture"].items() if k != "name"}
    assert without_name == {k: v for k, v in cpt["model"]["architecture"].items() if k != "name"}
    assert plan["model"]["params"] == cpt["model"]["params"]
    # The runtime loads the export from where the producer writes it, with the producer's tokenizer, whose chat
    # template the plan already uses.
    assert (plan["recipe"]["model"]["source"], plan["recipe"]["model"]["init"]) == (str(export), init)
    assert plan["recipe"]["data"]["tokenizer"] == cpt["recipe"]["data"]["tokenizer"] == str(tmp_path / "base")
    assert plan["objective"]["chat_template"] == "tokenizer"


def test_the_spec_records_the_producer_plan_and_its_hash(tmp_path, producer):
    cpt = producer()
    spec = compile_recipe(_consumer(tmp_path / "sft", "../runs/cpt/export")).spec
    assert spec.model_source == ModelSource("export-of-plan", str(tmp_path / "runs" / "cpt" / "plan.json"),
                                            cpt["plan_sha256"])
    assert compile_recipe(tmp_path / "cpt.yaml").spec.model_source == ModelSource("folder")
    assert compile_recipe(REPO / "examples/tiny/recipe.yaml").spec.model_source == ModelSource("catalog")


def test_three_stages_plan_before_any_has_run(tmp_path, monkeypatch, producer):
    producer()
    sft = _render(_consumer(tmp_path / "sft", "../runs/cpt/export"), tmp_path / "runs" / "sft")
    result = _plan(monkeypatch, _consumer(tmp_path / "dpo", "../runs/sft/export"))
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["model"]["config"] == sft["model"]["config"] == TINY_CONFIG
    assert plan["recipe"]["data"]["tokenizer"] == str(tmp_path / "base")
    assert result.stderr.startswith(f"warning: {WHERE}: {tmp_path}/runs/sft/export does not exist yet: planned from "
                                    f"{tmp_path}/runs/sft/plan.json, the plan of run 'sft' that exports there")


def test_a_missing_export_without_the_producers_plan_is_one_located_error(tmp_path, monkeypatch, producer):
    producer()
    (tmp_path / "runs" / "cpt" / "plan.json").unlink()
    result = _plan(monkeypatch, _consumer(tmp_path / "sft", "../runs/cpt/export"))
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: {WHERE}: no model at {tmp_path}/runs/cpt/export: no such folder, and no {tmp_path}/runs/cpt/plan.json "
        "of a run that exports there; fix the path, or render the recipe that produces it first (a run rendered "
        "with `dapc render RECIPE -o DIR` exports to DIR/export)\n")


def test_a_plan_that_exports_elsewhere_is_not_taken_for_the_source(tmp_path, monkeypatch, producer):
    producer()
    result = _plan(monkeypatch, _consumer(tmp_path / "sft", "../runs/cpt/exported"))
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: {WHERE}: {tmp_path}/runs/cpt/exported does not exist, and {tmp_path}/runs/cpt/plan.json exports to "
        f"{tmp_path}/runs/cpt/export, not there; point model.source at that run's export folder, or at a folder "
        "holding config.json\n")


def test_a_producer_plan_of_another_schema_version_is_refused(tmp_path, monkeypatch, producer):
    producer()
    plan_file = tmp_path / "runs" / "cpt" / "plan.json"
    plan_file.write_text(json.dumps({**json.loads(plan_file.read_text()), "schema_version": SCHEMA_VERSION - 1}))
    result = _plan(monkeypatch, _consumer(tmp_path / "sft", "../runs/cpt/export"))
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: {WHERE}: {tmp_path}/runs/cpt/export does not exist yet, and the plan beside it cannot say what it "
        f"will hold: {plan_file}: schema_version {SCHEMA_VERSION - 1} is not supported (this dapc reads "
        f"{SCHEMA_VERSION}); compile the recipe again with this dapc\n")


@pytest.mark.parametrize("adapter_config", ["adapter/adapter_config.json", "adapter_config.json"])
def test_an_export_of_lora_adapters_alone_is_refused(tmp_path, monkeypatch, producer, adapter_config):
    producer()
    export = tmp_path / "runs" / "cpt" / "export"
    (export / adapter_config).parent.mkdir(parents=True)
    (export / adapter_config).write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    result = _plan(monkeypatch, _consumer(tmp_path / "sft", "../runs/cpt/export"))
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: {WHERE}: folder {export} holds only LoRA adapters ({adapter_config}, no config.json); set "
        "checkpoint.merge_lora: true in the recipe that produced it, so its export holds the full model\n")


def test_a_producer_plan_of_lora_without_merging_is_refused(tmp_path, monkeypatch, producer):
    producer("--set", "method.name=lora")
    result = _plan(monkeypatch, _consumer(tmp_path / "sft", "../runs/cpt/export"))
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: {WHERE}: {tmp_path}/runs/cpt/export, the export planned in {tmp_path}/runs/cpt/plan.json, holds "
        "only LoRA adapters (method lora without checkpoint.merge_lora); set checkpoint.merge_lora: true in the "
        "recipe that produced it, so its export holds the full model\n")


def test_a_producer_plan_of_lora_merged_into_the_base_plans(tmp_path, monkeypatch, producer):
    producer("--set", "method.name=lora", "--set", "checkpoint.merge_lora=true")
    result = _plan(monkeypatch, _consumer(tmp_path / "sft", "../runs/cpt/export"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["config"] == TINY_CONFIG


def test_an_existing_export_is_read_directly_without_a_warning(tmp_path, monkeypatch, producer):
    producer()
    export = tmp_path / "runs" / "cpt" / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps(TINY_CONFIG | {"num_hidden_layers": 3}))
    (export / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (export / "adapter").mkdir()  # a merged LoRA export keeps its adapters too
    (export / "adapter" / "adapter_config.json").write_text("{}")
    recipe = _consumer(tmp_path / "sft", "../runs/cpt/export")
    result = _plan(monkeypatch, recipe)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    plan = json.loads(result.stdout)
    assert plan["model"]["architecture"]["num_layers"] == 3
    assert (plan["recipe"]["model"]["source"], plan["recipe"]["data"]["tokenizer"]) == (str(export), str(export))
    assert compile_recipe(recipe).spec.model_source == ModelSource("folder")
