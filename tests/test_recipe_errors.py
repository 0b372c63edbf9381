"""Malformed recipes: each gives one located line on stderr, exit code 2, and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import MINIMAL_RECIPE, _merge


CASES = [  # (name, recipe text or changes to the minimal recipe, --set overrides)
 ("bad_yaml", "name: x\nmodel: [unclosed\n", ()),
 ("not_a_mapping", "- just\n- a list\n", ()),
 ("empty", "", ()),
 ("duplicate_key", "name: a\nname: b\n", ()),
 ("unknown_top_key", {"trainng": {"lr": 1e-4}}, ()),
 ("unknown_nested_key", {"training": {"micro_bach": 4}}, ()),
 ("missing_model", "name: x\ndata: {paths: [corpus]}\n", ()),
 ("wrong_type_int", {"hardware": {"nodes": "two"}}, ()),
 ("negative_nodes", {"hardware": {"nodes": -1}}, ()),
 ("zero_gpus", {"hardware": {"gpus_per_node": 0}}, ()),
 ("negative_lr", {"training": {"lr": -0.001}}, ()),
 ("bad_micro_batch", {"training": {"micro_batch": -4}}, ()),
 ("bad_strategy", {"strategy": "zero4"}, ()),
 ("bad_method", {"method": {"name": "ia3"}}, ()),
 ("shell_in_name", {"name": "run; rm -rf /"}, ()),
 ("shell_in_partition", {"launch": {"slurm": {"partition": "gpu$(reboot)"}}}, ()),
 ("bad_env_name", {"launch": {"env": {"BAD-NAME": "1"}}}, ()),
 ("bad_slurm_time", {"launch": {"slurm": {"time": "forever"}}}, ()),
 ("unknown_gpu", {"hardware": {"gpu": "H100-80GB"}}, ()),
 ("cpu_without_memory", {"hardware": {"gpu": "cpu"}}, ()),
 ("custom_gpu_incomplete", {"hardware": {"gpu": "custom", "gpu_memory_gib": 40}}, ()),
 ("unknown_model", {"model": {"source": "meta-llama/Llama-3.1-8b-instruct-typo"}}, ()),
 ("missing_corpus", {"data": {"paths": ["nothere/*.txt"]}}, ()),
 ("batch_not_divisible", {"training": {"global_batch_tokens": None, "global_batch_sequences": 100}}, ()),
 ("tokens_not_multiple", {"training": {"global_batch_tokens": 1000000}}, ()),
 ("both_batch_sizes", {"training": {"global_batch_sequences": 256}}, ()),
 ("micro_batch_not_dividing", {"training": {"micro_batch": 3}}, ()),
 ("lora_bad_target", {"method": {"name": "lora", "lora": {"target_modules": ["qkv"]}}}, ()),
 ("base_missing", "base: nothere.yaml\nname: x\n", ()),
 ("set_bad_syntax", {}, ("hardware.nodes",)),
 ("set_bad_value", {}, ("hardware.nodes=lots",)),
 ("set_into_value", {}, ("name.first=x",)),
]


EXPECTED = {
    'bad_yaml': "error: recipe.yaml:3:1: invalid YAML: expected ',' or ']', but got '<stream end>'",
    'not_a_mapping': 'error: recipe.yaml:1:1: a recipe is a mapping of sections, got a list',
    'empty': 'error: recipe.yaml: recipe is empty',
    'duplicate_key': "error: recipe.yaml:2:1: duplicate key 'name'",
    'unknown_top_key': "error: recipe.yaml:15:1: unknown key 'trainng' in recipe (did you mean 'training'?)",
    'unknown_nested_key': "error: recipe.yaml:11:3: unknown key 'micro_bach' in training (did you mean 'micro_batch'?)",
    'missing_model': 'error: recipe.yaml:1:1: model: required field is missing',
    'wrong_type_int': "error: recipe.yaml:14:10: hardware.nodes: input should be a valid integer, unable to parse string as an integer (got 'two')",
    'negative_nodes': 'error: recipe.yaml:14:10: hardware.nodes: input should be greater than or equal to 1 (got -1)',
    'zero_gpus': 'error: recipe.yaml:13:18: hardware.gpus_per_node: input should be greater than or equal to 1 (got 0)',
    'negative_lr': 'error: recipe.yaml:11:7: training.lr: input should be greater than 0 (got -0.001)',
    'bad_micro_batch': "error: recipe.yaml:11:16: training.micro_batch: input should be 'auto'; or input should be greater than or equal to 1 (got -4)",
    'bad_strategy': "error: recipe.yaml:15:11: strategy: input should be 'auto'; or input should be 'ddp', 'fsdp2-full', 'fsdp2-hybrid', 'fsdp2-offload-cpu', 'zero1', 'zero2', 'zero2-offload-cpu', 'zero3', 'zero3-offload-cpu', 'zero3-offload-cpu-full' or 'zero3-offload-nvme' (got 'zero4')",
    'bad_method': "error: recipe.yaml:16:9: method.name: input should be 'full', 'lora' or 'qlora' (got 'ia3')",
    'shell_in_name': "error: recipe.yaml:1:7: name: string should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' (got 'run; rm -rf /')",
    'shell_in_partition': "error: recipe.yaml:17:16: launch.slurm.partition: string should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' (got 'gpu$(reboot)')",
    'bad_env_name': "error: recipe.yaml:17:5: launch.env: value error, 'BAD-NAME' is not a valid environment variable name",
    'bad_slurm_time': "error: recipe.yaml:17:11: launch.slurm.time: string should match pattern '^([0-9]+-)?[0-9]{1,3}:[0-9]{2}:[0-9]{2}$' (got 'forever')",
    'unknown_gpu': "error: recipe.yaml:12:8: unknown gpu 'H100-80GB': did you mean 'H100-SXM-80GB'? known: H100-SXM-80GB, H100-PCIe-80GB, H200-SXM-141GB, A100-SXM-80GB, A100-SXM-40GB, A100-PCIe-80GB, RTX-A6000-48GB, RTX-4090-24GB, RTX-3090-24GB, L40S-48GB, B200-180GB, MI300X-192GB, cpu, custom",
    'cpu_without_memory': 'error: recipe.yaml:12:8: gpu: cpu needs hardware.gpu_memory_gib (the RAM one training process may use)',
    'custom_gpu_incomplete': 'error: recipe.yaml:12:8: gpu: custom needs hardware.gpu_bf16_tflops',
    'unknown_model': "error: recipe.yaml:3:11: model 'meta-llama/Llama-3.1-8b-instruct-typo' not found: no file or folder at {dir}/meta-llama/Llama-3.1-8b-instruct-typo; not among the 8 catalog names; no config.json under the Hugging Face cache entry {dir}/hf/models--meta-llama--Llama-3.1-8b-instruct-typo. Did you mean 'meta-llama/Llama-3.3-70B-Instruct', 'meta-llama/Llama-3.1-8B' or 'meta-llama/Llama-3.1-70B'?",
    'missing_corpus': 'error: recipe.yaml:6:5: corpus path {dir}/nothere/*.txt matches no file',
    'batch_not_divisible': 'error: recipe.yaml:10:27: global batch 100 sequences is not divisible by 8 GPUs (1 node × 8); 100 / 8 = 12.50',
    'tokens_not_multiple': 'error: recipe.yaml:10:24: global_batch_tokens 1,000,000 is not a multiple of data.seq_len 4096 (1,000,000 / 4096 = 244.14)',
    'both_batch_sizes': 'error: recipe.yaml:9:3: training: value error, set global_batch_tokens or global_batch_sequences, not both',
    'micro_batch_not_dividing': 'error: recipe.yaml:11:16: micro_batch 3 × 8 GPUs × grad_accum must equal the global batch of 256 sequences, but 256 / 8 = 32 per GPU is not a multiple of 3',
    'lora_bad_target': "error: recipe.yaml:19:7: method.lora.target_modules[0]: input should be 'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj' or 'down_proj' (got 'qkv')",
    'base_missing': "error: recipe.yaml:1:7: base recipe 'nothere.yaml' not found (looked for nothere.yaml)",
    'set_bad_syntax': 'error: --set hardware.nodes: expected --set key.path=value, e.g. --set hardware.nodes=2',
    'set_bad_value': "error: --set hardware.nodes=lots: hardware.nodes: input should be a valid integer, unable to parse string as an integer (got 'lots')",
    'set_into_value': 'error: --set name.first=x: name is a value, not a section',
}


def _write(tmp_path: Path, recipe) -> Path:
    (tmp_path / "corpus").mkdir(exist_ok=True)
    (tmp_path / "corpus" / "a.txt").write_text("text\n")
    if isinstance(recipe, str):
        text = recipe
    else:
        merged = _merge(MINIMAL_RECIPE, recipe)
        merged["training"] = {k: v for k, v in merged["training"].items() if v is not None}
        text = yaml.safe_dump(merged, sort_keys=False)
    (tmp_path / "recipe.yaml").write_text(text)
    return tmp_path / "recipe.yaml"


def test_there_are_at_least_twenty_malformed_recipes():
    assert len(CASES) >= 20 and set(EXPECTED) == {name for name, _, _ in CASES}


@pytest.mark.parametrize("name,recipe,overrides", CASES, ids=[c[0] for c in CASES])
def test_malformed_recipe_gives_one_located_line_and_exit_2(tmp_path, name, recipe, overrides):
    _write(tmp_path, recipe)
    args = [sys.executable, "-m", "dapc", "plan", "recipe.yaml"] + [a for s in overrides for a in ("--set", s)]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == EXPECTED[name].replace("{dir}", str(tmp_path)) + "\n"
