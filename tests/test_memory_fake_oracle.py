"""The memory model against torch's own memory tracker, running transformers' Llama on fake tensors.

`torch.distributed._tools.mem_tracker.MemTracker` follows every tensor a real training step allocates (by
category: parameters, gradients, activations, temporaries, optimizer states) without allocating anything,
so layer-heavy shapes too large for a CPU test still run. It is an oracle independent of dapc's inventory:
the same HF code the runtime trains, counted by torch. Compared: the peak without gradients (which a plain
module without DDP or FSDP allocates lazily, while the runtime's backends hold them: dapc counts them in
full), against dapc's weights + optimizer + activations + logits at its peak phase.
"""

from __future__ import annotations

import warnings

import pytest

GIB = 1024**3
# (hidden, intermediate, layers, heads, kv heads, vocab, micro-batch, seq, activation checkpointing)
SHAPES = [
    (1024, 2816, 4, 8, 4, 1024, 2, 1024, "off"),  # layers dominate, no recomputation
    (1024, 2816, 8, 8, 8, 1024, 4, 1024, "full"),  # full checkpointing: the layer-backward moment
    (512, 1408, 4, 8, 4, 32000, 2, 1024, "off"),  # the logits dominate: the loss moment
    (2048, 5632, 2, 16, 4, 2048, 1, 2048, "full"),  # GQA, wider layers
    (1024, 2816, 8, 8, 4, 1024, 4, 1024, "selective"),  # matmul and attention outputs kept, the rest recomputed
    (2048, 5632, 4, 16, 4, 2048, 2, 1024, "selective"),  # GQA, wider layers
]


def _tracked(h, i, layers, heads, kv, vocab, b, s, ckpt) -> dict[str, int]:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoModelForCausalLM, LlamaConfig

    from runtime.train.checkpointing import checkpoint_kwargs

    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=max(4096, s),
                      tie_word_embeddings=False, use_cache=False)
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)  # pure bf16: params and AdamW states
        if ckpt != "off":  # as the runtime applies it
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(ckpt))
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
        ids = torch.randint(0, vocab, (b, s))
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            for step in range(2):  # the second step has optimizer states
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step == 0:
                    tracker.reset_mod_stats()
        snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {kind.value if hasattr(kind, "value") else kind: size for kind, size in snapshot.items()}


def _planned(h, i, layers, heads, kv, vocab, b, s, ckpt) -> int:
    from dapc.memory import Workload, peak
    from dapc.models import count_params
    from dapc.models.architecture import Architecture
    from dapc.strategies import STRATEGIES

    arch = Architecture("fake", "llama", vocab, h, i, layers, heads, kv, h // heads, False, False, False, False,
                        max(4096, s), "bfloat16", "")
    params = count_params(arch)
    w = Workload(arch=arch, params=params, method="full", trainable_params=params.total, precision="bf16",
                 optimizer="adamw", strategy=STRATEGIES["ddp"], world_size=1, gpus_per_node=1, nodes=1, micro_batch=b,
                 seq_len=s, activation_checkpointing=ckpt, lora_dropout=0.0, lora_targets=(), nf4_double_quant=True,
                 on_cpu=True, weights_dtype="bf16")  # the tracker runs CPU kernels: no CUDA flash workspace
    figures = peak(w).figures
    return sum(figures[name].bytes for name in ("weights", "optimizer", "activations", "logits"))


@pytest.mark.parametrize("shape", SHAPES, ids=["layers", "checkpointed", "logits", "gqa-wide", "selective",
                                                "selective-gqa-wide"])
def test_peak_matches_torch_mem_tracker_on_fake_llama(shape):
    tracked = _tracked(*shape)
    measured = tracked["Total"] - tracked["Gradient"]
    planned = _planned(*shape)
    print(f"{shape}: mem_tracker {measured / 2**20:.1f} MiB (+{tracked['Gradient'] / 2**20:.1f} grads), "
          f"dapc {planned / 2**20:.1f} MiB, {planned / measured - 1:+.1%}")
    assert -0.05 <= planned / measured - 1 <= 0.15
