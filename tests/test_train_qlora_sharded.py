"""QLoRA's NF4 base is quantized while loading and, under FSDP2, each rank keeps only its shard.

- A small Llama (4 layers, hidden 256, untied 32,000-token embedding and head, random weights) saved as bf16
  safetensors is loaded by 2 FSDP2 ranks (gloo); a probe run of this module under torchrun measures each
  rank's peak resident set while sharding and loading (VmHWM after `clear_refs`), and then checks every
  all-gathered NF4 weight against the unsharded quantization of the checkpoint tensor, byte for byte
  (the class of bug bitsandbytes issue #1945 reports: FSDP2 corrupting packed 4-bit weights).
- The tiny example's QLoRA (random base, written to a scratch folder and read back by the same loader) in
  1 process, under FSDP2 on 2 and under ZeRO-3 on 2: the same losses step by step; the 1-process run exports
  its adapters alone (from a meta skeleton of the base), the FSDP2 run merges them too.
About 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.train_support import compile_plan, free_port, losses, read_plan, records, run_env, train

MIB = 1024**2
PROBE_TIMEOUT_SECONDS = 120
PROBE_CONFIG = {  # small enough to load in seconds; the embedding and head dominate the unquantized rest
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 1024,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
    "bos_token_id": 1, "eos_token_id": 2,
}
# glibc raises its mmap threshold as large blocks are freed, so that the quantizer's freed temporaries stay in
# the heap and the peak depends on allocation order (measured by default: 54 to 110 MiB above the baseline
# where the loader holds 33). A fixed threshold returns every large block on free: the probe measures what the
# loader holds.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}
LOSS_RTOL = 1e-6  # fp32, no dropout: the two runs differ only in the order of gradient reductions


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    """Per-rank figures from 2 FSDP2 ranks loading the bf16 checkpoint (see `_probe`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("qlora-probe")
    config = dict(PROBE_CONFIG)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                             dtype=torch.bfloat16)
    model.save_pretrained(root / "base")
    del model
    plan_path = compile_plan(root, root / "unused-data", f"model.source={root / 'base'}", "model.init=pretrained",
                             "method.name=qlora", "strategy=fsdp2-full", "training.precision=bf16",
                             "model.dtype=bf16")
    out = root / "probe.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
               "-m", "tests.test_train_qlora_sharded", "--plan", str(plan_path), "--out", str(out)]
    env = {**run_env(plan_path), **FIXED_MMAP_THRESHOLD}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT_SECONDS, check=False)
    if done.returncode != 0:
        pytest.fail(f"probe exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return {**json.loads(out.read_text()), "plan_load_peak_bytes": read_plan(plan_path)["memory"]["load_peak_bytes"]}


def test_fsdp2_ranks_load_their_nf4_shard_plus_one_tensor_not_the_whole_base(probe: dict):
    for rank in probe["ranks"]:
        shards = rank["nf4_shard_bytes"] + rank["other_shard_bytes"]
        predicted = (shards + rank["largest_linear_bytes"] + rank["largest_linear_nf4_bytes"]
                     + rank["quantizer_workspace_bytes"])
        measured = rank["peak_bytes"] - rank["baseline_bytes"]
        whole = rank["nf4_whole_bytes"] + rank["other_whole_bytes"]
        print(f"rank {rank['rank']}: peak {measured / MIB:.1f} MiB above a {rank['baseline_bytes'] / MIB:.0f} MiB "
              f"baseline; predicted {predicted / MIB:.1f} MiB = NF4 shard {rank['nf4_shard_bytes'] / MIB:.2f} + "
              f"other shard {rank['other_shard_bytes'] / MIB:.2f} + largest Linear "
              f"{rank['largest_linear_bytes'] / MIB:.2f} + its NF4 {rank['largest_linear_nf4_bytes'] / MIB:.2f} + quantizer workspace "
              f"{rank['quantizer_workspace_bytes'] / MIB:.2f}; whole base {whole / MIB:.1f} MiB")
        assert rank["nf4_shard_bytes"] * 2 == rank["nf4_whole_bytes"]  # data and constants both halved
        # An upper bound: the largest weight's transients need not coincide with the last shard loaded.
        assert shards < measured < 1.05 * predicted + 2 * MIB
        assert measured < whole + rank["quantizer_workspace_bytes"]  # what loading the whole base would need
        planned = probe["plan_load_peak_bytes"]  # dapc.memory_loading.load_peak: what the plan promises
        print(f"rank {rank['rank']}: plan's loading peak {planned / MIB:.1f} MiB, measured/planned "
              f"{measured / planned:.3f}")
        assert 0.85 <= measured / planned <= 1.15


def test_all_gathered_nf4_weights_equal_the_unsharded_quantization_bit_for_bit(probe: dict):
    for rank in probe["ranks"]:
        assert rank["nf4_weights_checked"] == 4 * 7
        assert rank["nf4_weights_differing"] == []


TINY_QLORA = ("method.name=qlora", "method.lora.dropout=0", "training.tokens=4096", "eval.benchmarks=[]")


@pytest.fixture(scope="module")
def tiny_runs(prepared_dir: Path, tmp_path_factory) -> dict[int, Path]:
    """The tiny example's QLoRA (fp32, no LoRA dropout, 4 steps) in 1 process, exporting the adapters alone,
    and under FSDP2 on 2, exporting them merged too."""
    root = tmp_path_factory.mktemp("qlora-tiny")
    plans = {1: compile_plan(root / "one", prepared_dir, *TINY_QLORA, "hardware.gpus_per_node=1", "strategy=ddp"),
             2: compile_plan(root / "two", prepared_dir, *TINY_QLORA, "strategy=fsdp2-full",
                             "checkpoint.merge_lora=true")}
    for nproc, plan_path in plans.items():
        done = train(plan_path, nproc=nproc)
        assert "quantized 28 Linear weights to NF4 while loading" in done.stderr
    return plans


def test_fsdp2_qlora_follows_the_1_process_losses(tiny_runs: dict[int, Path]):
    one, two = losses(tiny_runs[1]), losses(tiny_runs[2])
    print("1 process:", one, "\n2 processes:", two)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=LOSS_RTOL), step
    norms = [{r["step"]: r["grad_norm"] for r in records(plan, "step")} for plan in tiny_runs.values()]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    assert one[4] < one[1]


def test_zero3_qlora_follows_the_fsdp2_losses(tiny_runs: dict[int, Path], prepared_dir: Path, tmp_path: Path):
    plan_path = compile_plan(tmp_path, prepared_dir, *TINY_QLORA, "strategy=zero3")
    done = train(plan_path, nproc=2)
    assert "quantized 28 Linear weights to NF4 while loading" in done.stderr  # the same NF4 base, whole per rank
    fsdp2 = losses(tiny_runs[2])
    for step, loss in losses(plan_path).items():
        assert loss == pytest.approx(fsdp2[step], rel=LOSS_RTOL), step


def test_qlora_exports_the_same_adapters_from_1_and_2_processes_and_merges_them(tiny_runs: dict[int, Path]):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    exports = [Path(read_plan(plan)["paths"]["export_dir"]) for plan in tiny_runs.values()]
    assert not (exports[0] / "model.safetensors").exists() and (exports[1] / "model.safetensors").is_file()
    adapters = [load_file(str(folder / "adapter" / "adapter_model.safetensors")) for folder in exports]
    assert len(adapters[0]) == 2 * 4 * 7 and adapters[0].keys() == adapters[1].keys()
    for name, value in adapters[0].items():  # Adam's steps are ±lr where gradients are tiny: 1e-4 of 4e-3 moved
        assert torch.allclose(adapters[1][name], value, atol=1e-4), name
    assert any(bool(value.abs().sum()) for name, value in adapters[0].items() if "lora_B" in name)  # trained

    from runtime.train.config import load_plan
    from runtime.train.model import base_model

    ids = torch.arange(100, 164).reshape(2, 32)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(exports[1]))(input_ids=ids).logits
        base = base_model(load_plan(tiny_runs[2])).float()  # the seeded random base, unquantized
        adapted = PeftModel.from_pretrained(base, str(exports[1] / "adapter"))(input_ids=ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4)  # merged into the unquantized base, as for LoRA


def _probe(plan_path: str, out: str) -> None:
    """Under torchrun: build and load the plan's model as training does, measuring this rank's peak resident
    set, then all-gather every NF4 weight and compare it with the checkpoint tensor quantized whole."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from runtime.train import nf4
    from runtime.train.config import load_plan
    from runtime.train.distributed import init_distributed
    from runtime.train.engines import make_engine
    from runtime.train.model import build_model

    plan = load_plan(plan_path)
    d = init_distributed(plan)
    model = build_model(plan, d.device)  # on the meta device: libraries imported, no tensor data yet
    gc.collect()
    baseline = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    engine = make_engine(plan, model, d.device)  # fully_shard, then read, quantize and keep the shards
    del model
    peak = _status_bytes("VmHWM")

    figures = {"rank": d.rank, "baseline_bytes": baseline, "peak_bytes": peak, **_sizes(engine.model)}
    checked, differing = 0, []
    for layer in [m for m in engine.model.modules() if isinstance(m, FSDPModule) and m is not engine.model]:
        layer.unshard()
        for name, module in layer.named_modules():
            if isinstance(module, nf4.NF4Linear):
                key = _checkpoint_name(engine.model, module)
                whole = nf4.quantize(_checkpoint_tensor(Path(plan.model_source), key).to(torch.bfloat16))
                gathered = module.weight
                same = all(torch.equal(getattr(gathered, a), getattr(whole, a)) for a in
                           ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"))
                if not (same and torch.equal(gathered.get_original_weight(), whole.get_original_weight())):
                    differing.append(key)
                checked += 1
        layer.reshard()
    figures.update(nf4_weights_checked=checked, nf4_weights_differing=differing)
    gathered_figures = [None] * d.world_size
    dist.all_gather_object(gathered_figures, figures)
    if d.rank == 0:
        Path(out).write_text(json.dumps({"ranks": gathered_figures}, indent=2))
    dist.destroy_process_group()


def _sizes(model) -> dict[str, int]:
    """Bytes this rank holds (NF4 data and constants; everything else) and would hold whole, and the largest
    NF4 weight's: whole in the base dtype, as NF4, and what torchao's quantizer allocates besides for it."""
    from runtime.train import nf4

    sizes = dict.fromkeys(("nf4_shard_bytes", "nf4_whole_bytes", "other_shard_bytes", "other_whole_bytes",
                           "largest_linear_bytes", "largest_linear_nf4_bytes", "quantizer_workspace_bytes"), 0)
    for param in model.parameters():
        local = param._local_tensor
        parts = param.device_mesh.size()
        if nf4.is_nf4(param):
            held = sum(getattr(local, a).nbytes for a in ("quantized_data", "quantized_scalers",
                                                          "quantization_factor"))
            sizes["nf4_shard_bytes"] += held
            sizes["nf4_whole_bytes"] += held * parts
            whole = param.numel() * param.element_size()
            if whole > sizes["largest_linear_bytes"]:
                sizes.update(largest_linear_bytes=whole, largest_linear_nf4_bytes=held * parts,
                             quantizer_workspace_bytes=_quantizer_workspace_bytes(param.numel(),
                                                                                  param.element_size()))
        else:
            sizes["other_shard_bytes"] += local.numel() * local.element_size()
            sizes["other_whole_bytes"] += param.numel() * param.element_size()
    return sizes


def _quantizer_workspace_bytes(numel: int, itemsize: int) -> int:
    """torchao's `to_nf4` temporaries beyond its input and output: the scaled copy (base dtype), the 4-bit codes
    before packing (1 byte each) and the two nibble halves (½ byte each), and, per chunk of at most 2^20
    values, the distances to the 16 code points and their absolute values (base dtype) and the int64 argmin."""
    chunk = min(numel, 1024**2)
    return numel * (itemsize + 2) + chunk * (2 * 16 * itemsize + 8)


def _checkpoint_name(model, module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight"
    raise KeyError(module)


def _checkpoint_tensor(folder: Path, name: str):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as tensors:
        return tensors.get_tensor(name)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    _probe(arguments.plan, arguments.out)
