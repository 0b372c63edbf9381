"""dapc.models: catalog configs load in transformers, counts match the real modules, sources resolve offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers

from dapc.errors import DapcError, ModelNotFoundError
from dapc.models import (
    LINEAR_MODULES,
    ModelConfigError,
    catalog_names,
    count_params,
    decoder_linear_shapes,
    load_architecture,
    lora_trainable_params,
)


# Totals the model cards publish (billions of parameters).
PUBLISHED_TOTALS = {
    "meta-llama/Llama-3.1-8B": 8.03e9,
    "meta-llama/Llama-3.1-70B": 70.6e9,
    "meta-llama/Llama-3.3-70B-Instruct": 70.6e9,
    "meta-llama/Llama-3.1-405B": 405.9e9,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": 14.8e9,
    "Qwen/Qwen2.5-7B": 7.61e9,
    "mistralai/Mistral-7B-v0.1": 7.24e9,
}
TINY = "dapc/tiny-llama"
MINIMAL_CONFIG = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}


def _meta_model(name: str):
    """The transformers model of a catalog entry, built on the meta device (no memory, no weights)."""
    config = transformers.AutoConfig.from_pretrained(load_architecture(name).config_path)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _group(parameter_name: str) -> str:
    if parameter_name == "model.embed_tokens.weight":
        return "embedding"
    if parameter_name == "lm_head.weight":
        return "lm_head"
    if ".self_attn." in parameter_name:
        return "attention"
    if ".mlp." in parameter_name:
        return "mlp"
    if parameter_name.endswith("norm.weight"):
        return "norms"
    raise AssertionError(f"parameter {parameter_name} belongs to no group")


def _write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_catalog_lists_every_bundled_model():
    assert catalog_names() == sorted([*PUBLISHED_TOTALS, TINY], key=str.lower)


@pytest.mark.parametrize("name", catalog_names())
def test_counts_match_transformers_modules_on_meta_device(name):
    model = _meta_model(name)
    measured = dict.fromkeys(["embedding", "attention", "mlp", "norms", "lm_head"], 0)
    for parameter_name, parameter in model.named_parameters():  # a tied matrix is listed once
        measured[_group(parameter_name)] += parameter.numel()
    counts = count_params(load_architecture(name))

    assert {group: getattr(counts, group) for group in measured} == measured
    assert counts.experts == 0
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.tied == (counts.lm_head == 0) == model.config.tie_word_embeddings
    assert counts.per_layer == sum(p.numel() for p in model.model.layers[0].parameters())
    # DeepSpeed's model_to_params (runtime/zero/stage3.py): largest_layer_params.
    assert counts.largest_layer == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


@pytest.mark.parametrize("name", catalog_names())
def test_decoder_linear_shapes_match_transformers_modules(name):
    layer = _meta_model(name).model.layers[0]
    modules = dict(layer.named_modules())
    actual = {
        leaf: (modules[path].in_features, modules[path].out_features)
        for path in modules
        if (leaf := path.rsplit(".", 1)[-1]) in LINEAR_MODULES
    }
    assert decoder_linear_shapes(load_architecture(name)) == actual


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_totals_match_published_totals_within_half_a_percent(name):
    total = count_params(load_architecture(name)).total
    assert total == pytest.approx(PUBLISHED_TOTALS[name], rel=0.005)


def test_tiny_llama_is_about_five_million_tied_parameters_over_mistral_vocab():
    arch = load_architecture(TINY)
    counts = count_params(arch)
    assert (arch.vocab_size, counts.tied, counts.lm_head, counts.total) == (32000, True, 0, 5_080_192)


def test_qwen2_has_qkv_bias_and_llama_has_none():
    qwen = load_architecture("Qwen/Qwen2.5-7B")
    llama = load_architecture("meta-llama/Llama-3.1-8B")
    assert (qwen.qkv_bias, qwen.o_bias, qwen.mlp_bias) == (True, False, False)
    assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias) == (False, False, False)


@pytest.mark.parametrize(
    ("name", "r", "target_modules"),
    [
        pytest.param(name, r, targets, id=f"{name}-r{r}-{'+'.join(targets)}")
        for name, r, targets in [(name, 16, ["all-linear"]) for name in catalog_names()]
        + [
            ("Qwen/Qwen2.5-7B", 8, ["q_proj", "v_proj"]),
            ("mistralai/Mistral-7B-v0.1", 64, ["o_proj", "down_proj"]),
            (TINY, 4, ["gate_proj", "up_proj", "k_proj"]),
        ]
    ],
)
def test_lora_trainable_params_match_peft_on_meta_device(name, r, target_modules):
    peft_targets = "all-linear" if target_modules == ["all-linear"] else target_modules
    model = peft.get_peft_model(_meta_model(name), peft.LoraConfig(r=r, target_modules=peft_targets))
    trainable, _ = model.get_nb_trainable_parameters()
    assert lora_trainable_params(load_architecture(name), r, target_modules) == trainable


def test_lora_rejects_unknown_target_module():
    with pytest.raises(DapcError) as caught:
        lora_trainable_params(load_architecture(TINY), 8, ["q_proj", "qkv_proj"])
    assert str(caught.value) == (
        "LoRA target_modules ['q_proj', 'qkv_proj'] must name modules from q_proj, k_proj, v_proj, "
        "o_proj, gate_proj, up_proj, down_proj, or be ['all-linear']"
    )


def test_catalog_names_match_case_insensitively():
    assert load_architecture("META-LLAMA/llama-3.1-8b").name == "meta-llama/Llama-3.1-8B"


def test_unknown_name_lists_what_was_tried_and_suggests_catalog_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as caught:
        load_architecture("meta-llama/Llama-3.1-8b-base", base_dir=tmp_path)
    assert str(caught.value) == (
        "model 'meta-llama/Llama-3.1-8b-base' not found: "
        f"no file or folder at {tmp_path}/meta-llama/Llama-3.1-8b-base; not among the 8 catalog names; "
        f"no config.json under the Hugging Face cache entry {tmp_path}/hub/models--meta-llama--Llama-3.1-8b-base. "
        "Did you mean 'meta-llama/Llama-3.1-8B', 'meta-llama/Llama-3.1-70B' or 'meta-llama/Llama-3.1-405B'?"
    )


def test_name_with_no_close_match_lists_the_catalog(tmp_path):
    with pytest.raises(ModelNotFoundError) as caught:
        load_architecture("gpt2", base_dir=tmp_path)
    assert str(caught.value) == (
        f"model 'gpt2' not found: no file or folder at {tmp_path}/gpt2; not among the 8 catalog names; "
        "not an org/name id, so not looked up in the Hugging Face cache. Catalog names: dapc/tiny-llama, "
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B, meta-llama/Llama-3.1-405B, meta-llama/Llama-3.1-70B, "
        "meta-llama/Llama-3.1-8B, meta-llama/Llama-3.3-70B-Instruct, mistralai/Mistral-7B-v0.1, Qwen/Qwen2.5-7B."
    )


def test_config_json_path_resolves_against_base_dir(tmp_path):
    _write_config(tmp_path / "models" / "small", MINIMAL_CONFIG)
    arch = load_architecture("models/small/config.json", base_dir=tmp_path)
    assert arch.name == "models/small/config.json"
    assert arch.config_path == str(tmp_path / "models" / "small" / "config.json")
    # Defaults are transformers' LlamaConfig defaults: MHA, head_dim = hidden / heads, untied, float32.
    defaults = (arch.num_key_value_heads, arch.head_dim, arch.tie_word_embeddings, arch.torch_dtype)
    assert defaults == (4, 16, False, "float32")


def test_directory_with_config_json_loads(tmp_path):
    path = _write_config(tmp_path / "small", MINIMAL_CONFIG | {"num_hidden_layers": 3})
    arch = load_architecture(str(tmp_path / "small"))
    assert (arch.num_layers, arch.config_path) == (3, str(path))


def test_directory_without_config_json_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError) as caught:
        load_architecture("empty", base_dir=tmp_path)
    assert str(caught.value) == f"folder {tmp_path}/empty has no config.json"


def test_hf_cache_snapshot_named_by_refs_main_loads_offline(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--small-lm"
    _write_config(repo / "snapshots" / "aaaa", MINIMAL_CONFIG | {"num_hidden_layers": 5})
    main = _write_config(repo / "snapshots" / "bbbb", MINIMAL_CONFIG | {"num_hidden_layers": 7})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbbb")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    arch = load_architecture("acme/small-lm", base_dir=tmp_path)
    assert (arch.name, arch.num_layers, arch.config_path) == ("acme/small-lm", 7, str(main))


def test_hf_home_hub_is_searched_when_hf_hub_cache_is_unset(tmp_path, monkeypatch):
    _write_config(tmp_path / "home" / "hub" / "models--acme--small-lm" / "snapshots" / "cccc", MINIMAL_CONFIG)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert load_architecture("acme/small-lm", base_dir=tmp_path).vocab_size == 1000


def _config_text(**fields) -> str:
    return json.dumps(MINIMAL_CONFIG | fields)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"model_type": "llama",', "{path}:1:24: not valid JSON: Expecting property name enclosed in double quotes"),
        ("[1, 2]", "{path}: expected a JSON object, got list"),
        (_config_text(hidden_size=None), "{path}: field 'hidden_size' is missing"),
        (_config_text(hidden_size="64"), "{path}: field 'hidden_size' must be a positive integer, got '64'"),
        (_config_text(num_hidden_layers=0), "{path}: field 'num_hidden_layers' must be a positive integer, got 0"),
        (_config_text(tie_word_embeddings="yes"), "{path}: field 'tie_word_embeddings' must be true or false, got 'yes'"),
        (_config_text(num_key_value_heads=3), "{path}: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        (
            _config_text(model_type="gpt2"),
            "{path}: model_type 'gpt2' is not supported; supported: llama, mistral, qwen2 "
            "(decoders with RMSNorm, rotary GQA attention and a SwiGLU MLP)",
        ),
    ],
)
def test_bad_config_file_names_the_file_and_the_field(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ModelConfigError) as caught:
        load_architecture(str(path))
    assert str(caught.value) == message.format(path=path)


def test_loading_and_counting_never_import_torch_or_transformers():
    script = (
        "import sys\n"
        "from dapc.models import count_params, load_architecture, lora_trainable_params\n"
        "arch = load_architecture('meta-llama/Llama-3.1-8B')\n"
        "count_params(arch)\n"
        "lora_trainable_params(arch, 16, ['all-linear'])\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=repo_root)
    assert result.stdout == "[]\n"
