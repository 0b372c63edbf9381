"""Selective and every-k-layers activation checkpointing, measured: one process trains a small Llama off,
selective, full on every second layer and full; the measured peak (VmHWM) follows the plan within 15% and each
sits, as planned, between off and full."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.test_train_loss import prepared_512  # noqa: F401 (fixture: the shared corpus at seq_len 512)
from tests.train_support import compile_plan, read_plan, records, train

MIB = 1024**2
# Wide enough that the layers' activations, not the process baseline or the logits, set the peak.
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 2048,
          "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
          "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": 1,
          "eos_token_id": 2}


def test_selective_checkpointing_sits_between_off_and_full_measured_and_planned(prepared_512: Path,  # noqa: F811
                                                                             tmp_path: Path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(CONFIG))
    measured, planned, plans = {}, {}, {}
    for mode, every in (("off", 1), ("selective", 1), ("full", 2), ("full", 1)):
        name = mode if every == 1 else f"{mode}/{every}"
        plans[name] = compile_plan(
            tmp_path / name.replace("/", "-"), prepared_512, f"model.source={model_dir}", "strategy=ddp",
            "hardware.gpus_per_node=1", "data.seq_len=512", "training.micro_batch=8",
            "training.global_batch_sequences=8",
            f"training.activation_checkpointing={mode}", f"training.checkpoint_every_layers={every}",
            "training.chunked_loss=true", "training.loss_chunk_tokens=256",
            "training.max_steps=2", "checkpoint.export_hf=false", "eval.benchmarks=[]",
            # glibc's dynamic mmap threshold would keep freed blocks in the heap (dapc.memory's CPU baselines).
            'launch.env={"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}')
        plan = read_plan(plans[name])
        assert (plan["activation_checkpointing"], plan["activation_checkpointing_every_layers"]) == (mode, every)
    # Two single-threaded trainers at a time: each process's own peak (VmHWM) does not depend on its neighbour.
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda path: train(path, nproc=1), plans.values()))
    for name, plan_path in plans.items():
        plan = read_plan(plan_path)
        (memory,) = records(plan_path, "memory")
        measured[name], planned[name] = memory["measured_bytes"], plan["memory"]["per_gpu_bytes"]["total"]
        print(f"\n{name:>9}: measured {measured[name] / MIB:,.0f} MiB, planned {planned[name] / MIB:,.0f} MiB "
              f"({plan['memory']['formulas']['activations']})")
        assert abs(measured[name] / planned[name] - 1) <= 0.15, (name, measured[name], planned[name])
    assert planned["off"] > planned["selective"] > planned["full"]
    assert measured["off"] > measured["selective"] > measured["full"]
    assert measured["off"] - measured["selective"] > 100 * MIB
    assert planned["off"] > planned["full/2"] > planned["full"]
    assert measured["off"] > measured["full/2"] > measured["full"]
