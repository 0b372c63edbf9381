"""The planner: never an unfit choice, pinned choices evaluated as given, and remedies with numbers."""

from __future__ import annotations

import json

import pytest

from click.testing import CliRunner

from dapc.cli import main
from dapc.compile import compile_recipe
from dapc.memory import GIB


def _plan(path, *overrides):
    return compile_recipe(path, tuple(overrides)).plan.model_dump(mode="json")


def test_auto_never_picks_a_strategy_that_does_not_fit(minimal_recipe):
    plan = _plan(minimal_recipe())
    mem = plan["memory"]
    assert mem["fits"] and mem["per_gpu_bytes"]["total"] + mem["headroom_bytes"] <= mem["device_capacity_bytes"]
    assert plan["strategy"]["forced"] is False
    unfit = [a for a in plan["alternatives"] if not a["fits"]]
    assert [a["strategy"] for a in unfit] == ["zero3-offload-nvme", "ddp"]  # closest to fitting first
    assert all(a["lost_because"].startswith("does not fit: needs ") for a in unfit)


def test_alternatives_are_ranked_fitting_first_then_by_step_time(minimal_recipe):
    plan = _plan(minimal_recipe())
    fitting = [a for a in plan["alternatives"] if a["fits"]]
    assert [a["step_seconds"] for a in fitting] == sorted(a["step_seconds"] for a in fitting)
    assert plan["cost"]["step_seconds"] <= fitting[0]["step_seconds"]


def test_components_sum_to_total(minimal_recipe):
    per_gpu = _plan(minimal_recipe())["memory"]["per_gpu_bytes"]
    assert per_gpu["total"] == sum(v for k, v in per_gpu.items() if k != "total")


def test_batch_geometry_multiplies_out(minimal_recipe):
    b = _plan(minimal_recipe())["batch"]
    assert b["micro_batch"] * b["grad_accum"] * b["world_size"] == b["global_batch_sequences"] == 256
    assert b["global_batch_tokens"] == 256 * 4096


def test_pinned_choices_are_evaluated_as_given(minimal_recipe):
    plan = _plan(minimal_recipe({"strategy": "zero3", "training": {"micro_batch": 2, "activation_checkpointing": True}}))
    assert (plan["strategy"]["name"], plan["strategy"]["forced"]) == ("zero3", True)
    assert (plan["batch"]["micro_batch"], plan["batch"]["grad_accum"], plan["activation_checkpointing"]) == (2, 16, "full")  # true means full
    assert plan["alternatives"] == []


def test_pinned_strategy_that_does_not_fit_exits_3_and_says_what_would(minimal_recipe):
    path = minimal_recipe({"strategy": "ddp"})
    result = CliRunner().invoke(main, ["plan", str(path), "--json"])
    assert result.exit_code == 3
    plan = json.loads(result.stdout)
    assert plan["memory"]["fits"] is False and plan["strategy"]["name"] == "ddp"
    assert plan["strategy"]["reason"].startswith("pinned by the recipe: needs ")
    assert plan["suggestions"]


def test_nothing_fits_suggests_more_gpus_qlora_offload_and_shorter_sequences(minimal_recipe):
    path = minimal_recipe({"model": {"source": "meta-llama/Llama-3.1-70B"}, "hardware": {"gpus_per_node": 2}})
    result = CliRunner().invoke(main, ["plan", str(path), "--json"])
    assert result.exit_code == 3
    plan = json.loads(result.stdout)
    suggestions = plan["suggestions"]
    assert plan["memory"]["fits"] is False
    assert plan["strategy"]["reason"].startswith("nothing fits: needs ")
    # The closest candidate is reported, not the first in the list.
    assert plan["memory"]["per_gpu_bytes"]["total"] == min(a["total_bytes"] for a in plan["alternatives"] + [
        {"total_bytes": plan["memory"]["per_gpu_bytes"]["total"]}])
    assert suggestions == [
        "10 nodes (20 GPUs): fsdp2-full with micro_batch 1 and activation checkpointing needs 69.8 GiB per GPU",
        "method: qlora (NF4 base, LoRA r=16): fsdp2-full needs 30.8 GiB per GPU on 2 GPUs",  # chunked loss
    ]


def test_render_writes_nothing_when_nothing_fits(minimal_recipe, tmp_path):
    path = minimal_recipe({"strategy": "ddp"})
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["render", str(path), "-o", str(out)])
    assert result.exit_code == 3
    assert not out.exists()
    result = CliRunner().invoke(main, ["render", str(path), "-o", str(out), "--allow-unfit"])
    assert result.exit_code == 3 and (out / "plan.json").exists()


def test_405b_qlora_fits_two_nodes_loading_sharded_and_names_the_fewest_gpus():
    # The meta-sharded loader quantizes one tensor at a time into this rank's shard: loading never holds the
    # whole NF4 base (201 GiB) on a GPU, so 2 × 8 H100 fit, and the plan says how few would.
    plan = _plan("recipes/llama3.1-405b-qlora.yaml", "hardware.nodes=2", "strategy=fsdp2-full")
    mem = plan["memory"]
    assert plan["batch"]["world_size"] == 16 and plan["loading"]["mode"] == "meta-sharded-quantize"
    assert mem["fits"] is True
    n = 16384 * 53248  # the largest Linear (gate/up), quantized whole: bf16 copy, scaled copy, codes, NF4, chunk
    transient = n * (2 * 2 + 2) + n * 4.127 / 8 + 2**20 * (32 * 2 + 8)
    assert mem["load_peak_bytes"] == pytest.approx(mem["per_gpu_bytes"]["weights"] + transient, rel=1e-4)
    assert mem["load_peak_bytes"] < 20 * GIB  # not the whole 201 GiB base
    few = plan["fewest_gpus"]
    assert few["strategy"] == "fsdp2-full" and few["gpus"] <= 16
    # The next world size down that NF4 rows split over (1024-row k/v projections: powers of two) does not fit.
    half = few["gpus"] // 2
    fewer = _plan("recipes/llama3.1-405b-qlora.yaml", "hardware.nodes=1", f"hardware.gpus_per_node={half}",
                  "strategy=fsdp2-full", "training.micro_batch=1", "training.activation_checkpointing=true",
                  "training.global_batch_tokens=null", f"training.global_batch_sequences={half}")
    assert fewer["memory"]["fits"] is False


def test_70b_qlora_loads_on_one_h100_and_fits():
    plan = _plan("recipes/llama3.1-405b-qlora.yaml", "model.source=meta-llama/Llama-3.3-70B-Instruct")
    assert plan["memory"]["fits"] and plan["memory"]["load_peak_bytes"] < 40 * GIB


def test_tokens_estimated_from_corpus_bytes_when_no_budget(minimal_recipe):
    plan = _plan(minimal_recipe({"data": {"seq_len": 8}, "training": {"tokens": None, "epochs": 2, "global_batch_tokens": None,
                                                                       "global_batch_sequences": 8}}))
    corpus_bytes = len("Zero trust architecture.\n" * 40)
    assert plan["cost"]["tokens_exact"] is False
    assert plan["cost"]["tokens"] == int(corpus_bytes * 0.25 * 2)


def test_cost_is_steps_times_step_time_times_gpus(minimal_recipe):
    c = _plan(minimal_recipe({"hardware": {"usd_per_gpu_hour": 3.0}}))["cost"]
    assert c["steps"] == -(-1_000_000_000 // 1_048_576)
    assert abs(c["wall_seconds"] - c["steps"] * c["step_seconds"]) / c["wall_seconds"] < 1e-5
    assert abs(c["gpu_hours"] - c["wall_seconds"] * 8 / 3600) / c["gpu_hours"] < 1e-5
    assert abs(c["usd"] - c["gpu_hours"] * 3.0) / c["usd"] < 1e-5
    assert abs(c["kwh"] - c["gpu_hours"] * 700 / 1000) / c["kwh"] < 1e-5


def test_activation_checkpointing_costs_a_third_more_compute(minimal_recipe):
    off = _plan(minimal_recipe({"strategy": "zero3", "training": {"activation_checkpointing": False}}))["cost"]
    on = _plan(minimal_recipe({"strategy": "zero3", "training": {"activation_checkpointing": True}}))["cost"]
    assert 1.25 < on["flops_per_token"] / off["flops_per_token"] < 1.34


def test_sequences_past_max_position_embeddings_plan_with_a_located_warning(minimal_recipe):
    # People train past it (RoPE scaling, or plainly longer): a plan with a warning, never a hard error.
    path = minimal_recipe({"data": {"paths": ["corpus"], "seq_len": 262144},
                           "training": {"global_batch_tokens": 262144 * 8}})
    result = CliRunner().invoke(main, ["plan", str(path), "--json"])
    assert result.exit_code in (0, 3)
    plan = json.loads(result.stdout)
    assert plan["batch"]["seq_len"] == 262144
    assert plan["warnings"][:1] == [  # then: the 1 kB corpus cannot fill a step (a warning with a token budget)
        f"{path}:7:12: seq_len 262,144 exceeds the model's max_position_embeddings 131,072 (the config's rope_scaling "
        '{"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, '
        '"rope_type": "llama3"}); quality past it is the recipe\'s responsibility']
    assert f"warning: {plan['warnings'][0]}" in result.stderr


def test_a_corpus_short_of_one_optimizer_step_is_an_error_or_with_a_token_budget_a_warning(minimal_recipe):
    short = minimal_recipe({"training": {"tokens": None, "epochs": 2}})  # 1 kB corpus, 256 sequences of 4096
    result = CliRunner().invoke(main, ["validate", str(short)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        f"error: {short}:6:3: the corpus (1,000 bytes ≈ 0 training sequences of 4,096 tokens at 0.25 tokens/byte, "
        "less the 0.01 validation share) cannot fill one optimizer step of 256 sequences; add data, or lower the "
        "global batch (training.global_batch_sequences) or data.seq_len\n")
    budget = minimal_recipe({"training": {"tokens": 10**9}})
    result = CliRunner().invoke(main, ["plan", str(budget), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["warnings"] == [
        f"{budget}:6:3: the corpus (1,000 bytes ≈ 0 training sequences of 4,096 tokens at 0.25 tokens/byte, less "
        "the 0.01 validation share) cannot fill one optimizer step of 256 sequences; the plan sizes training.tokens "
        "1,000,000,000, but the runtime will not train until the corpus fills a step",
        "source corpus: 4,000,000.0 passes over its estimated 250 tokens; past about 4 repeated data adds little "
        "(Muennighoff et al. 2023)"]


def test_405b_qlora_planned_like_torchtunes_run_fits_at_or_below_its_measured_peak():
    # torchtune's llama3_1/405B_qlora on 8 × A100 80GB, seq 2048, batch 1 (README: 44.8 per GPU). dapc's runtime
    # reshards the embedding and head after use, which torchtune's root unit keeps gathered.
    plan = _plan("recipes/llama3.1-405b-qlora.yaml", "hardware.gpu=A100-SXM-80GB", "hardware.nodes=1",
                 "data.seq_len=2048", "training.micro_batch=1", "strategy=fsdp2-full")
    mem = plan["memory"]
    assert mem["fits"] and plan["loading"]["mode"] == "meta-sharded-quantize"
    assert mem["per_gpu_bytes"]["total"] <= 44.8 * GIB


def test_validate_runs_the_plan_checks_but_fit(minimal_recipe):
    # A micro-batch that does not divide the per-GPU batch is a plan-time error, and validate says so too.
    path = minimal_recipe({"training": {"micro_batch": 3}})
    for command in ("validate", "plan"):
        result = CliRunner().invoke(main, [command, str(path)])
        assert result.exit_code == 2
        assert result.stderr == (f"error: {path}:11:16: micro_batch 3 × 8 GPUs × grad_accum must equal the global batch "
                                 "of 256 sequences, but 256 / 8 = 32 per GPU is not a multiple of 3\n")
    # A plan that does not fit is still a valid recipe.
    big = minimal_recipe({"model": {"source": "meta-llama/Llama-3.1-70B"}, "hardware": {"gpus_per_node": 1}},
                         name="big.yaml")
    assert CliRunner().invoke(main, ["validate", str(big)]).exit_code == 0
    assert CliRunner().invoke(main, ["plan", str(big)]).exit_code == 3


def test_runtime_refusals_are_plan_time_errors_and_auto_avoids_them(minimal_recipe):
    pinned = minimal_recipe({"strategy": "fsdp2-full", "training": {"precision": "fp16"}})
    result = CliRunner().invoke(main, ["plan", str(pinned)])
    assert result.exit_code == 2
    assert result.stderr == (f"error: {pinned}:11:14: fp16 with FSDP2 needs a sharded gradient scaler, which the runtime "
                             "does not have; use bf16 (strategy fsdp2-full)\n")
    auto = minimal_recipe({"training": {"precision": "fp16"}}, name="auto.yaml")
    plan = json.loads(CliRunner().invoke(main, ["plan", str(auto), "--json"]).stdout)
    assert plan["strategy"]["backend"] != "fsdp2"
    assert all(not a["strategy"].startswith("fsdp2") for a in plan["alternatives"])


def test_an_allocator_cache_never_outgrows_the_card(minimal_recipe):
    # Without expandable segments the cache grows past need, but a failed cudaMalloc releases it and retries:
    # the predicted max_memory_reserved is capped at what the card leaves, and `fits` counts only what is needed.
    path = minimal_recipe({"strategy": "fsdp2-full", "launch": {"cuda_expandable_segments": False},
                           "hardware": {"headroom_fraction": 0},
                           "training": {"micro_batch": 8, "activation_checkpointing": True, "chunked_loss": False,
                                        "global_batch_tokens": None, "global_batch_sequences": 64}})
    mem = _plan(path)["memory"]
    assert mem["fits"] and mem["reclaimable_bytes"] < mem["allocator_reserve_bytes"]
    assert mem["per_gpu_bytes"]["total"] + mem["outside_allocator_bytes"] <= mem["device_capacity_bytes"]
    assert mem["formulas"]["buffers"].endswith("cache capped at the card")


@pytest.mark.parametrize(("changes", "message"), [
    ({"method": {"name": "qlora"}, "strategy": "zero3-offload-cpu-full"},
     "QLoRA with DeepSpeed parameter offload: the NF4 base is kept out of DeepSpeed's reach (it cannot move or "
     "partition NF4), so it would stay whole on every GPU (strategy zero3-offload-cpu-full)"),
    ({"model": {"source": "dapc/tiny-llama"}, "training": {"fsdp_embedding_units": "separate"},
      "strategy": "fsdp2-full"},
     "fsdp_embedding_units separate: this model ties its embedding and LM head (one parameter), which can only "
     "live in one FSDP2 unit; use auto or root (strategy fsdp2-full)"),
    ({"method": {"name": "qlora", "quant_type": "fp4"}, "strategy": "fsdp2-full"},
     "quant_type fp4: the runtime's QLoRA base is NF4 (torchao) (strategy fsdp2-full)"),
], ids=["qlora-deepspeed-offload", "separate-tied", "fp4"])
def test_what_the_runtime_refuses_is_refused_at_plan_time(minimal_recipe, changes, message):
    result = CliRunner().invoke(main, ["plan", str(minimal_recipe(changes))])
    assert result.exit_code == 2 and result.stderr.endswith(f": {message}\n"), result.stderr
