"""The memory model against independent oracles, each under its own assumptions.

- The ZeRO paper (Rajbhandari et al. 2020), Table 1: 7.5B parameters, K = 12, N_d = 64.
- DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs), whose factors count an fp32
  gradient partition the paper does not.
- The QLoRA paper (Dettmers et al. 2023) §3: double quantization costs 0.127 bits per parameter.
- The seed's 405B QLoRA arithmetic: 405e9 × 0.5 B ≈ 202.5 GB, plus quantization constants.
"""

from __future__ import annotations

import dataclasses

import pytest

from dapc import memory
from dapc.compile import compile_recipe
from dapc.memory import Workload
from dapc.models import ParamCounts, count_params, load_architecture
from dapc.strategies import STRATEGIES

LLAMA_8B = load_architecture("meta-llama/Llama-3.1-8B")


def _workload(strategy: str, params: ParamCounts, world: int, gpus_per_node: int = 8, **changes) -> Workload:
    w = Workload(
        arch=LLAMA_8B, params=params, method="full", trainable_params=params.total, precision="bf16",
        optimizer="adamw", strategy=STRATEGIES[strategy], world_size=world, gpus_per_node=gpus_per_node,
        nodes=max(1, world // gpus_per_node), micro_batch=1, seq_len=2048, activation_checkpointing="full",
        lora_dropout=0.0, lora_targets=(), nf4_double_quant=True, on_cpu=False,
    )
    return dataclasses.replace(w, **changes)


def _model_states(w: Workload) -> int:
    return memory.weights(w).bytes + memory.gradients(w).bytes + memory.optimizer(w).bytes


def _params(total: int, largest_layer: int = 0) -> ParamCounts:
    return ParamCounts(embedding=0, attention=total, mlp=0, norms=0, lm_head=0, experts=0, tied=False,
                       per_layer=0, largest_layer=largest_layer)


# ZeRO paper Table 1, row Ψ = 7.5B, N_d = 64, in GB (1e9 bytes) as printed.
@pytest.mark.parametrize("strategy,printed_gb", [("ddp", 120), ("zero1", 31.4), ("zero2", 16.6), ("zero3", 1.88)])
def test_model_states_match_zero_paper_table_1(strategy, printed_gb):
    w = _workload(strategy, _params(7_500_000_000), world=64, zero_fp32_grad_partition=False)
    assert round(_model_states(w) / 1e9, 2 if printed_gb < 2 else 1) == printed_gb


def test_zero_paper_accounting_is_16_bytes_per_parameter_unsharded():
    w = _workload("zero3", _params(7_500_000_000), world=1, gpus_per_node=1, zero_fp32_grad_partition=False)
    assert _model_states(w) == 16 * 7_500_000_000


@pytest.mark.parametrize("gpus_per_node,nodes", [(8, 1), (8, 2), (4, 1), (1, 1)])
def test_zero3_model_states_match_deepspeed_estimator(gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    params = count_params(LLAMA_8B)
    world = gpus_per_node * nodes
    w = _workload("zero3", params, world=world, gpus_per_node=gpus_per_node)
    _, ds_gpu, largest_layer_bytes = estimate_zero3_model_states_mem_needs(
        params.total, params.largest_layer, gpus_per_node, nodes, cpu_offload=False)
    # DeepSpeed counts the gathered largest layer (params + grads, 2 B each) with the model states;
    # the memory model holds it in `buffers` and names it there.
    assert largest_layer_bytes == 4 * params.largest_layer
    assert "4·largest_layer" in memory.peak(w).figures["buffers"].formula
    assert _model_states(w) + largest_layer_bytes == pytest.approx(ds_gpu, abs=2)


@pytest.mark.parametrize("strategy,offload_params", [("zero3-offload-cpu", False), ("zero3-offload-cpu-full", True)])
def test_zero3_offload_model_states_match_deepspeed_estimator(strategy, offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    params = count_params(LLAMA_8B)
    w = _workload(strategy, params, world=8)
    _, ds_gpu, largest = estimate_zero3_model_states_mem_needs(
        params.total, params.largest_layer, 8, 1, cpu_offload=True, cpu_offload_params=offload_params)
    assert _model_states(w) + largest == pytest.approx(ds_gpu, abs=2)


@pytest.mark.parametrize("gpus_per_node,nodes", [(8, 1), (8, 2), (2, 1)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_match_deepspeed_estimator(gpus_per_node, nodes, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params = count_params(LLAMA_8B)
    strategy = "zero2-offload-cpu" if offload else "zero2"
    w = _workload(strategy, params, world=gpus_per_node * nodes, gpus_per_node=gpus_per_node)
    _, ds_gpu = estimate_zero2_model_states_mem_needs(params.total, gpus_per_node, nodes, cpu_offload=offload)
    assert _model_states(w) == pytest.approx(ds_gpu, abs=2)


def test_feasibility_note_figures_for_llama_8b_reproduce():
    # ../shared/FEASIBILITY.md: DeepSpeed's estimator prints 18.78 "GB" (GiB) for ZeRO-3 on 8 GPUs.
    params = count_params(LLAMA_8B)
    w = _workload("zero3", params, world=8)
    assert round((_model_states(w) + 4 * params.largest_layer) / 2**30, 2) == 18.78


def test_nf4_double_quant_constants_cost_0_127_bits_per_parameter():
    n = 10**9
    assert (memory.nf4_bytes(n, double_quant=True) - n // 2) * 8 / n == pytest.approx(0.127, abs=5e-4)
    assert (memory.nf4_bytes(n, double_quant=False) - n // 2) * 8 / n == pytest.approx(0.5)


def test_405b_qlora_weights_agree_with_the_seed_arithmetic():
    plan = compile_recipe("recipes/llama3.1-405b-qlora.yaml", ("hardware.nodes=2", "strategy=fsdp2-full")).plan.model_dump(mode="json")
    arch = load_architecture("meta-llama/Llama-3.1-405B")
    params = count_params(arch)
    # Seed: 405e9 × 0.5 B ≈ 202.5 GB of 4-bit weights.
    nf4_linear = memory.nf4_bytes(params.attention + params.mlp, double_quant=True)
    assert params.attention + params.mlp == pytest.approx(405e9, rel=0.01)
    assert (params.attention + params.mlp) * 0.5 / 1e9 == pytest.approx(200.9, abs=0.1)
    constants = nf4_linear - (params.attention + params.mlp) // 2
    assert constants / 1e9 == pytest.approx(6.37, abs=0.01)  # 0.127 bits × 401.7e9 / 8
    unquantized = (params.embedding + params.lm_head + params.norms) * 2  # bf16 embedding, head, norms
    assert unquantized / 1e9 == pytest.approx(8.41, abs=0.01)
    world = plan["batch"]["world_size"]
    lora = plan["method"]["trainable_params"]
    lora_bytes = lora * 4
    assert plan["memory"]["per_gpu_bytes"]["weights"] == (nf4_linear + unquantized + lora_bytes) // world
    assert (nf4_linear + unquantized) / 1e9 == pytest.approx(215.7, abs=0.1)
    assert "QLoRA §3" in plan["memory"]["formulas"]["weights"]


def test_qlora_7b_lora_parameters_take_26_mb_as_in_the_qlora_paper():
    # QLoRA §4: "LoRA weights equivalent to ... 0.2% of the original model weights ... take up only 26 MB".
    llama_7b_params = 6_738_415_616
    assert 0.002 * llama_7b_params * 2 / 1e6 == pytest.approx(26, abs=1)
