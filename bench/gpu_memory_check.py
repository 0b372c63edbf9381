"""On one CUDA GPU: measured torch.cuda.max_memory_reserved of the runtime vs the plan, per strategy and method.

    python bench/gpu_memory_check.py [--steps 4] [--out DIR]

A Llama-3.2-1B-shaped model (random weights, untied head so the embedding units are exercised) trains a few
steps of seq 2048 in each configuration below, through the same `dapc` plan and `python -m runtime.train` a
user runs; the trainer logs its measured peak next to the plan's estimate (metrics.jsonl `memory` record),
and this prints the table. Needs a GPU with ~40 GiB free and the runtime's dependencies; nothing is
downloaded (the corpus is the example's, the tokenizer mistral-common's). Takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = {  # Llama-3.2-1B's shapes with the Mistral tokenizer's 32,000 tokens (what the tiny corpus is prepared with)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 32000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
CASES = {  # name: recipe overrides (1 GPU)
    "full ddp bf16-mixed mb4": ("method.name=full", "strategy=ddp", "training.micro_batch=4",
                                "training.activation_checkpointing=false"),
    "full fsdp2 pure-bf16 ckpt mb8": ("method.name=full", "strategy=fsdp2-full", "training.weights_dtype=bf16",
                                      "training.micro_batch=8", "training.activation_checkpointing=true"),
    "lora fsdp2 mb8": ("method.name=lora", "strategy=fsdp2-full", "training.micro_batch=8",
                       "training.activation_checkpointing=false"),
    "qlora fsdp2 ckpt mb8": ("method.name=qlora", "strategy=fsdp2-full", "training.micro_batch=8",
                             "training.activation_checkpointing=true"),
    "full zero2 mb4": ("method.name=full", "strategy=zero2", "training.micro_batch=4",
                       "training.activation_checkpointing=false"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", help="folder for plans and logs (default: a temporary one)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from dapc.compile import compile_recipe

    scratch = Path(args.out or tempfile.mkdtemp(prefix="dapc-gpu-"))
    (scratch / "model").mkdir(parents=True, exist_ok=True)
    (scratch / "model" / "config.json").write_text(json.dumps(MODEL))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows = []
    for index, (name, overrides) in enumerate(CASES.items()):
        flags = (f"model.source={scratch / 'model'}", "model.init=random", "hardware.gpu=H100-SXM-80GB",
                 "hardware.gpu_memory_gib=null", "hardware.gpus_per_node=1", "hardware.nodes=1", "data.seq_len=2048",
                 "training.precision=bf16", "training.global_batch_sequences=8", f"training.tokens={8 * 2048 * args.steps}",
                 "checkpoint.export_hf=false", f"checkpoint.every_steps={args.steps}", "eval.benchmarks=[]",
                 f"data.prepared_dir={scratch / 'data'}", *overrides)
        plan = compile_recipe(REPO / "examples" / "tiny" / "recipe.yaml", flags, output=str(scratch / f"run-{index}")).plan
        path = scratch / f"plan-{index}.json"
        path.write_text(plan.text())
        if index == 0:
            subprocess.run([sys.executable, "-m", "runtime.prepare", "--plan", str(path), "--no-progress"],
                           cwd=REPO, env=env, check=True)
        done = subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(path)], cwd=REPO,
                              env={**env, **plan.runtime.env},
                              capture_output=True, text=True)
        (scratch / f"train-{index}.log").write_text(done.stdout + done.stderr)
        memory = [json.loads(line) for line in Path(plan.paths.metrics_path).read_text().splitlines()
                  if json.loads(line).get("event") == "memory"] if done.returncode == 0 else []
        measured = memory[0]["measured_bytes"] if memory else None
        rows.append((name, plan.memory.per_gpu_bytes.total, measured, done.returncode))
    print(f"{'case':32} {'planned GiB':>12} {'measured GiB':>13} {'measured/planned':>17}")
    for name, planned, measured, code in rows:
        if measured is None:
            print(f"{name:32} {planned / 2**30:12.2f} {'failed (exit ' + str(code) + ')':>13}")
        else:
            print(f"{name:32} {planned / 2**30:12.2f} {measured / 2**30:13.2f} {measured / planned:17.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
