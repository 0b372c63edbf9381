"""On one CUDA GPU: tokens/s, MFU and max_memory_reserved of the runtime vs torchtitan, same model and batch.

    pip install --no-deps torchtitan==0.2.2 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 \
        datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 torchdata==0.11.0     # torch, tokenizers etc. as they are
    python bench/gpu_throughput.py [--model 8b|1b] [--gpu NAME] [--seq-len N] [--micro-batch N] [--steps 30]
                                   [--warmup 10] [--set KEY=VALUE ...] [--out FILE] [--side both|runtime|torchtitan]
    python bench/gpu_throughput.py --dry-run      # no GPU needed: the plan, both command lines, torchtitan's check

One plan for one GPU (`hardware.gpu` from `torch.cuda.get_device_name()`, else `--gpu`; 1 GPU, 1 node) trains a
randomly initialised Llama for `--steps` optimizer steps through `python -m runtime.train`, then torchtitan 0.2.2
(`torchrun --nproc_per_node 1 -m torchtitan.train`) trains the same shape with every setting below taken from
that plan. Throughput is the tokens of the steps after `--warmup` over their wall time (the runtime's
`step_seconds`, torchtitan's per-step `tps`, at --metrics.log_freq 1: end of step to end of step, data, forward,
backward, clipping and optimizer inside; ours also holds its metrics line, torchtitan's interval starts after
its log call); start-up, compilation and the first steps are not. Prints one table and writes
it as JSON to `--out` (default `$OUT/gpu_throughput.json` when OUT is set, else ./gpu_throughput.json), each
side's log beside it.

Fairness, both sides:
- the same shape: Llama-3.1-8B (the catalog's, vocab 128,256, untied head) or, `--model 1b`, Llama-3.2-1B's
  with an untied head (torchtitan 0.2 has no weight tying; its `1B` flavor comes from bench/torchtitan_llama.py).
  Before any GPU work (and in --dry-run) torchtitan parses its flags, builds its model on the meta device and
  draws one batch from its loader: parameters, FLOPs per token and batch shape must be the plan's, or it stops.
- the same text: one corpus of random words (written here, a few MB), tokenized by the same tokenizer
  (mistral-common v1: the runtime's prepared shards, torchtitan its `c4_test` loader over the same .txt folder
  with the runtime's tokenizer.json); token ids do not change the work of a dense model.
- the same batch: micro-batch × seq_len tokens per optimizer step, no gradient accumulation (the plan's
  micro-batch, or `--micro-batch`), the same steps, the same warm-up steps left out.
- the same numerics: the plan's trained dtype — fp32 master weights under bf16 autocast (torchtitan on one GPU
  uses torch.autocast, not FSDP: a mesh of one shards nothing), or pure bf16 (ours `training.weights_dtype=bf16`,
  theirs `training.dtype=bfloat16`), fused AdamW with the plan's lr, betas, eps and weight decay, clipping at
  the plan's norm, SDPA causal attention (torchtitan's `8B` default, not its flex/block-causal variants).
- the plan's activation checkpointing (off → none, selective → per-op `selective_ac_option=op`, full → full,
  full on every k-th layer → torchtitan's layer-wise `selective_ac_option=k`: ours layers 0, k, 2k, ...,
  theirs k-1, 2k-1, ..., the same count when k divides the layers) and its torch.compile choice (per decoder
  block on both; torchtitan also compiles its loss, its own default).
- the same allocator settings and threads (the plan's `runtime.env`: expandable segments, OMP_NUM_THREADS).
Each side keeps its own loss (ours chunked when the plan says so, torchtitan's full logits) and its own
selective policy (torchtitan's op-SAC recomputes every second matmul, ours keeps them all).

Why these defaults: the 8B in fp32 master weights needs 16 B × 8.03 G = 120 GiB of weights, gradients and Adam
states before any activation: over an 80 GB H100, and on a 141 GB H200 torchtitan's one-GPU autocast adds its
cache of bf16 weight copies (15 GiB), about the 139 GiB torch can use there before activations. So the 8B
trains pure bf16 on both sides (8 B/param, 60 GiB), at seq 4,096, the seq_len of
recipes/cyber-dap-llama3.1-8b.yaml, which leaves room for a micro-batch on an 80 GB GPU. The 1B keeps fp32
master weights (22 GiB of states) at seq 8,192, Llama 3's original context.

MFU % is the same formula for both: PaLM's 6·N + 12·L·H·Q·T FLOPs per token (N the matmul parameters, no
recomputation counted; torchtitan's own) over the catalog's dense bf16 peak. Each side's own logged MFU is
shown beside it; the runtime's counts the recomputation that full checkpointing and the chunked loss do.
Memory: torch.cuda.max_memory_reserved, the runtime's from its last step record, torchtitan's the largest
`memory:` of its step lines; the plan's estimate is `memory.per_gpu_bytes.total`. The runtime writes a
checkpoint after its last step (8B pure bf16: 45 GiB, most of a lent machine's 64 GiB disk): the bench ends
the training process once the last step is logged, so that write is neither timed nor waited for.
Goal on a GPU: runtime ≥ 1.0× torchtitan tokens/s and MFU (the common one) ≥ 45%. Expected to take about
6 minutes for the 8B on an H100/H200 (not yet timed): `--timeout` bounds each side, `--side` reruns one.
torchtitan 0.2.2 (February 2026) is the release made against torch 2.11, the torch of the lent GPU machine;
0.3.0 pins torch 2.14 and replaced this JobConfig CLI with Python config functions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import signal
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
TINY_RECIPE = REPO / "examples" / "tiny" / "recipe.yaml"
GIB = 1024**3
PROBE_BATCH_SEQUENCES = 8  # the global batch the planner picks a micro-batch within (then G = micro-batch)
TORCHTITAN_SERIES = "0.2."  # the JobConfig CLI driven below is torchtitan 0.2's (0.2.2 pairs with torch 2.11)
LLAMA_3_2_1B_UNTIED = {  # Meta's Llama-3.2-1B config.json, head untied (see bench/torchtitan_llama.py)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}


@dataclass(frozen=True)
class Shape:
    title: str
    torchtitan_flavor: str
    seq_len: int
    weights_dtype: str  # recipe training.weights_dtype
    catalog_name: str | None  # None: written from `config` into the scratch folder
    config: dict | None = None


SHAPES = {
    "8b": Shape("Llama-3.1-8B", "8B", 4096, "bf16", "meta-llama/Llama-3.1-8B"),
    "1b": Shape("Llama-3.2-1B (untied head)", "1B", 8192, "fp32", None, LLAMA_3_2_1B_UNTIED),
}
LENT_GPU, LENT_HOST_RAM_GIB = "H200-SXM-141GB", 128  # what --dry-run plans for without a CUDA device
GPU_NAMES = (("H200", "H200-SXM-141GB"), ("H100 PCIe", "H100-PCIe-80GB"), ("H100 80GB HBM3", "H100-SXM-80GB"))
AC_MODES = {"off": "none", "selective": "selective", "full": "full"}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
TITAN_STEP = re.compile(r"step:\s*(\d+)\s+loss:.*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+).*?mfu:\s*([\d.]+)%")
TITAN_MODEL_MEMORY = re.compile(r"memory usage for model:\s*([\d.]+)GiB")


class BenchError(Exception):
    """A condition the bench cannot run under; printed as one line, exit 2."""


def main() -> int:
    args = _arguments()
    sys.stdout.reconfigure(line_buffering=True)  # our lines before the children's, in a log too
    sys.path.insert(0, str(REPO))  # run as a script from a checkout: dapc and runtime live beside bench/
    if args.torchtitan_check:
        print(json.dumps(_torchtitan_model(json.loads(args.torchtitan_check))))
        return 0
    try:
        if args.scratch:
            return _bench(args, Path(args.scratch))
        with tempfile.TemporaryDirectory(prefix="dapc-gpu-throughput-") as scratch:
            return _bench(args, Path(scratch))
    except BenchError as e:
        print(f"gpu_throughput: {e}", file=sys.stderr)
        return 2


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--gpu", help="catalog device name (default: from torch.cuda.get_device_name())")
    parser.add_argument("--seq-len", type=int, help="default 4096 for 8b, 8192 for 1b")
    parser.add_argument("--micro-batch", type=int, help="sequences per step (default: the plan's micro-batch)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per side (default 30)")
    parser.add_argument("--warmup", type=int, default=10, help="leading steps left out of the timing (default 10)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    parser.add_argument("--side", choices=("both", "runtime", "torchtitan"), default="both")
    parser.add_argument("--timeout", type=int, default=330, help="seconds each side may take (default 330)")
    parser.add_argument("--out", help="JSON result (default $OUT/gpu_throughput.json, else ./gpu_throughput.json)")
    parser.add_argument("--scratch", help="keep model config, corpus, plans and runs here (default: a temporary "
                        "folder, removed at the end)")
    parser.add_argument("--dry-run", action="store_true", help="plan and print both command lines; run nothing")
    parser.add_argument("--torchtitan-check", metavar="FLAGS_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be at least 1 and below --steps {args.steps}")
    return args


def _bench(args: argparse.Namespace, scratch: Path) -> int:
    shape = SHAPES[args.model]
    gpu, host_ram_gib = _gpu(args.gpu, args.dry_run)
    scratch.mkdir(parents=True, exist_ok=True)
    seq_len = args.seq_len or shape.seq_len
    _write_corpus(scratch / "corpus", args.steps * max(PROBE_BATCH_SEQUENCES, args.micro_batch or 0) * seq_len)
    plan, plan_path = _plan(args, shape, gpu, host_ram_gib, seq_len, scratch)
    from runtime.tokenizer import resolve_tokenizer_dir

    tokenizer_dir = resolve_tokenizer_dir(plan.recipe.data.tokenizer)
    flags = _torchtitan_flags(plan, shape, tokenizer_dir, scratch)
    env = {**os.environ, **plan.runtime.env}
    titan_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, (str(BENCH), os.environ.get("PYTHONPATH")))),
                 "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(scratch / "hf-datasets")}
    commands = {
        "prepare": [sys.executable, "-m", "runtime.prepare", "--plan", str(plan_path), "--no-progress"],
        "runtime": [sys.executable, "-m", "runtime.train", "--plan", str(plan_path)],
        "torchtitan": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                       "-m", "torchtitan.train", *flags],
    }
    setting = _setting(plan, shape, gpu, args)
    print(setting["title"])
    lines = {name: _shell_line(titan_env if name == "torchtitan" else env, command)
             for name, command in commands.items()}
    for name, line in lines.items():
        print(f"{name}: {line}")
    titan_model = _check_torchtitan(flags, titan_env, setting, required=not args.dry_run and args.side != "runtime")
    if args.dry_run:
        return 0
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = _measure(args, plan, commands, env, titan_env, out)
    if "torchtitan" in results:
        results["torchtitan"]["version"] = titan_model["version"]
    for row in results.values():
        if "error" not in row:  # the same formula for both sides (see the docstring)
            row["mfu"] = row["tokens_per_second"] * setting["palm_flops_per_token"] / setting["peak_flops"]
    report = {**setting, "commands": lines, **results, "ratio": _ratios(results)}
    _print_table(report)
    out.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


def _shell_line(env: dict[str, str], command: list[str]) -> str:
    """The command as a shell line, prefixed by the variables it sets beyond this process's environment."""
    changed = (f"{k}={shlex.quote(v)}" for k, v in env.items() if os.environ.get(k) != v)
    return " ".join((*changed, shlex.join(command)))


def _measure(args: argparse.Namespace, plan, commands: dict, env: dict, titan_env: dict, out: Path) -> dict:
    """Each side asked for, one after the other: its tokens/s, logged MFU and peak reserved memory, or its error."""
    results = {}
    if args.side in ("both", "runtime"):
        if subprocess.run(commands["prepare"], cwd=REPO, env=env).returncode != 0:
            raise BenchError(f"runtime.prepare failed: {shlex.join(commands['prepare'])}")
        results["runtime"] = _run_runtime(plan, commands["runtime"], env, out.with_suffix(".runtime.log"), args)
    if args.side in ("both", "torchtitan"):
        results["torchtitan"] = _run_torchtitan(plan, commands["torchtitan"], titan_env,
                                                out.with_suffix(".torchtitan.log"), args)
    return results


def _gpu(name: str | None, dry_run: bool) -> tuple[str, int]:
    """The catalog name of the GPU to plan for (`--gpu`, else the CUDA device's, asked in a child process so
    that this one holds no CUDA context while the sides train) and the host's RAM in GiB."""
    probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
    if not found and not dry_run:
        raise BenchError("no CUDA device (torch.cuda.is_available() is False); run on a GPU, or use --dry-run")
    if not found:
        name = name or LENT_GPU
        print(f"no CUDA device: planning for {name} on a host of {LENT_HOST_RAM_GIB} GiB RAM, the lent GPU "
              "machine's (--gpu and --set hardware.cpu_ram_gib=N to plan for another)")
        return name, LENT_HOST_RAM_GIB
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // GIB
    if name:
        return name, ram_gib
    for part, catalog in GPU_NAMES:
        if part in found and "NVL" not in found:
            return catalog, ram_gib
    raise BenchError(f"no catalog entry known for {found!r}; name one with --gpu (see dapc/hardware.py)")


def _write_corpus(folder: Path, tokens: int) -> None:
    """Random lowercase words, 1,000 to a line (a document), seeded: mistral-common v1 makes about 3.9 tokens of
    each, so tokens / 3 words cover `tokens` without repeating."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(4096)]
    folder.mkdir(parents=True, exist_ok=True)
    lines = (" ".join(rng.choices(words, k=1000)) for _ in range(tokens // 3 // 1000 + 1))
    (folder / "random-words.txt").write_text("\n".join(lines) + "\n")


def _plan(args: argparse.Namespace, shape: Shape, gpu: str, ram_gib: int, seq_len: int, scratch: Path):
    """The plan both sides run: global batch = micro-batch (no accumulation). Without --micro-batch a probe plan of
    PROBE_BATCH_SEQUENCES sequences picks the micro-batch, and its checkpointing and strategy are kept."""
    from dapc.compile import compile_recipe

    source = shape.catalog_name
    if source is None:
        (scratch / "model").mkdir(exist_ok=True)
        (scratch / "model" / "config.json").write_text(json.dumps(shape.config))
        source = str(scratch / "model")

    def flags(batch: int, micro_batch: int | str, pins: tuple[str, ...] = ()) -> tuple[str, ...]:
        return (f"model.source={source}", "model.init=random", "model.dtype=bf16", f"hardware.gpu={gpu}",
                "hardware.gpu_memory_gib=null", "hardware.gpus_per_node=1", "hardware.nodes=1",
                f"hardware.cpu_ram_gib={ram_gib}", f"data.paths={json.dumps([str(scratch / 'corpus')])}",
                f"data.prepared_dir={scratch / 'data'}", f"data.seq_len={seq_len}", "training.precision=bf16",
                f"training.weights_dtype={shape.weights_dtype}", f"training.global_batch_sequences={batch}",
                f"training.micro_batch={micro_batch}", f"training.tokens={args.steps * batch * seq_len}",
                "strategy=auto", f"checkpoint.every_steps={args.steps}", "checkpoint.export_hf=false",
                "eval.benchmarks=[]", *pins, *args.set)

    micro_batch, pins = args.micro_batch, ()
    if micro_batch is None:
        probe = compile_recipe(TINY_RECIPE, flags(PROBE_BATCH_SEQUENCES, "auto"), output=str(scratch / "probe")).plan
        micro_batch = probe.batch.micro_batch
        pins = (f"training.activation_checkpointing={probe.activation_checkpointing}",
                f"training.checkpoint_every_layers={probe.activation_checkpointing_every_layers}",
                f"strategy={probe.strategy.name}")
    plan = compile_recipe(TINY_RECIPE, flags(micro_batch, micro_batch, pins), output=str(scratch / "run")).plan
    if not plan.memory.fits:
        raise BenchError(f"the plan does not fit one {gpu}: {plan.memory.misfit}; try --micro-batch 1 or --model 1b")
    path = scratch / "plan.json"
    path.write_text(plan.text())
    return plan, path


def _torchtitan_flags(plan, shape: Shape, tokenizer_dir: Path, scratch: Path) -> list[str]:
    """torchtitan 0.2's JobConfig flags, every number from the plan."""
    t, s, b = plan.recipe.training, plan.schedule, plan.batch
    flags = {
        "--model.name": "llama3", "--model.flavor": shape.torchtitan_flavor,
        "--model.hf_assets_path": str(tokenizer_dir),
        "--training.dataset": "c4_test", "--training.dataset_path": str(scratch / "corpus"),
        "--training.local_batch_size": b.micro_batch, "--training.global_batch_size": b.micro_batch,
        "--training.seq_len": b.seq_len, "--training.steps": plan.cost.steps,
        "--training.dtype": TORCH_DTYPES[plan.loading.trained_dtype], "--training.mixed_precision_param": "bfloat16",
        "--training.max_norm": t.grad_clip, "--parallelism.data_parallel_shard_degree": 1,
        "--optimizer.name": "AdamW", "--optimizer.implementation": "fused", "--optimizer.lr": s.peak_lr,
        "--optimizer.beta1": t.adam_beta1, "--optimizer.beta2": t.adam_beta2, "--optimizer.eps": t.adam_eps,
        "--optimizer.weight_decay": t.weight_decay, "--lr_scheduler.warmup_steps": s.warmup_steps,
        "--lr_scheduler.decay_type": "cosine", "--lr_scheduler.min_lr_factor": s.min_lr / s.peak_lr,
        "--activation_checkpoint.mode": AC_MODES[plan.activation_checkpointing],
        "--metrics.log_freq": 1, "--job.dump_folder": str(scratch / "torchtitan"), "--debug.seed": t.seed,
    }
    every_layers = plan.activation_checkpointing_every_layers
    if plan.activation_checkpointing == "selective":
        flags["--activation_checkpoint.selective_ac_option"] = "op"
    elif plan.activation_checkpointing == "full" and every_layers > 1:  # its layer-wise "selective": every k-th
        flags["--activation_checkpoint.mode"] = "selective"           # block fully checkpointed
        flags["--activation_checkpoint.selective_ac_option"] = every_layers
    if shape.catalog_name is None:
        flags["--experimental.custom_import"] = "torchtitan_llama"
    switches = ["--metrics.disable_color_printing", "--compile.enable" if plan.torch_compile.enabled
                else "--compile.no-enable"]
    return [str(part) for pair in flags.items() for part in pair] + switches


def _setting(plan, shape: Shape, gpu: str, args: argparse.Namespace) -> dict:
    from dapc.cost import flops_per_token
    from dapc.models import count_params, load_architecture

    arch = load_architecture(plan.recipe.model.source)
    b = plan.batch
    palm_flops = flops_per_token(arch, count_params(arch), b.seq_len, "full", recompute=False)
    k = plan.activation_checkpointing_every_layers
    every = f" on one layer in {k}" if k > 1 else ""
    title = (f"{shape.title} shape, random init, 1 × {gpu}, seq {b.seq_len:,}, micro-batch {b.micro_batch} (no "
             f"accumulation), {args.steps - args.warmup} timed steps of {b.micro_batch * b.seq_len:,} tokens after "
             f"{args.warmup}; {plan.loading.trained_dtype} weights, bf16 compute, activation checkpointing "
             f"{plan.activation_checkpointing}{every}, compile {'on' if plan.torch_compile.enabled else 'off'}, "
             f"runtime strategy {plan.strategy.name}; PaLM FLOPs per token {palm_flops:,.0f} (6·N + 12·L·H·Q·T), "
             f"peak {plan.device.bf16_tflops:,.1f} TFLOP/s (catalog)")
    return {"title": title, "model": shape.title, "gpu": gpu, "seq_len": b.seq_len, "micro_batch": b.micro_batch,
            "steps": args.steps, "warmup_steps": args.warmup, "weights_dtype": plan.loading.trained_dtype,
            "activation_checkpointing": plan.activation_checkpointing,
            "activation_checkpointing_every_layers": plan.activation_checkpointing_every_layers,
            "compile": plan.torch_compile.enabled,
            "strategy": plan.strategy.name, "params": plan.model.params.total, "palm_flops_per_token": palm_flops,
            "peak_flops": plan.device.bf16_tflops * 1e12, "plan_memory_bytes": plan.memory.per_gpu_bytes.total}


def _check_torchtitan(flags: list[str], env: dict[str, str], setting: dict, required: bool) -> dict | None:
    """torchtitan parses `flags`, builds its model on the meta device and draws one batch (CPU only): its
    parameters, FLOPs per token and batch shape must be the plan's."""
    done = subprocess.run([sys.executable, __file__, "--torchtitan-check", json.dumps(flags)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        cause = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if required:
            raise BenchError(f"torchtitan cannot take these flags: {cause}")
        print(f"torchtitan check skipped: {cause}")
        return None
    model = json.loads(done.stdout.strip().splitlines()[-1])
    if not model["version"].startswith(TORCHTITAN_SERIES):
        raise BenchError(f"torchtitan {model['version']} is installed; this bench drives 0.2's JobConfig "
                         "(pip install --no-deps torchtitan==0.2.2)")
    theirs = (model["params"], round(model["flops_per_token"]), model["batch_shape"])
    ours = (setting["params"], round(setting["palm_flops_per_token"]), [setting["micro_batch"], setting["seq_len"]])
    if theirs != ours:
        raise BenchError(f"torchtitan's {model['flavor']}: {theirs[0]:,} parameters, {theirs[1]:,} FLOPs per token, "
                         f"batches {theirs[2]}; the plan: {ours[0]:,}, {ours[1]:,}, {ours[2]}")
    print(f"torchtitan {model['version']} accepts the flags; its {model['flavor']} has {theirs[0]:,} parameters and "
          f"{theirs[1]:,} FLOPs per token, and its loader gives batches of {theirs[2]}, as the plan's")
    return model


def _torchtitan_model(flags: list[str]) -> dict:
    """In a child process: torchtitan's config from `flags` and its model's size, built on the meta device."""
    import importlib
    from importlib.metadata import version

    import torch
    from torchtitan.config import ConfigManager
    from torchtitan.protocols.train_spec import get_train_spec

    config = ConfigManager().parse_args(flags)
    if config.experimental.custom_import:
        importlib.import_module(config.experimental.custom_import)
    spec = get_train_spec(config.model.name)
    model_args = spec.model_args[config.model.flavor]
    model_args.update_from_config(config)
    with torch.device("meta"):
        model = spec.model_cls(model_args)
    params, flops = model_args.get_nparams_and_flops(model, config.training.seq_len)
    tokenizer = spec.build_tokenizer_fn(config)
    loader = spec.build_dataloader_fn(dp_world_size=1, dp_rank=0, tokenizer=tokenizer, job_config=config)
    inputs, _ = next(iter(loader))
    return {"version": version("torchtitan"), "flavor": config.model.flavor, "params": params,
            "flops_per_token": flops, "batch_shape": list(inputs["input"].shape)}


def _run_runtime(plan, command: list[str], env: dict[str, str], log_path: Path, args) -> dict:
    """Trains until the last step is logged, then ends the process (it would write a checkpoint next)."""
    metrics = Path(plan.paths.metrics_path)
    deadline = time.monotonic() + args.timeout
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        steps: list[dict] = []
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
            steps = [r for r in _records(metrics) if r["event"] == "step"]
            if steps and steps[-1]["step"] == args.steps:
                break
        _end(process)
    steps = [r for r in _records(metrics) if r["event"] == "step"]
    if not steps or steps[-1]["step"] != args.steps:
        return _failure(process, log_path, f"{len(steps)} of {args.steps} steps logged")
    timed = [r for r in steps if r["step"] > args.warmup]
    seconds = sum(r["step_seconds"] for r in timed)
    return {"tokens_per_second": len(timed) * plan.batch.global_batch_tokens / seconds,
            "logged_mfu": sum(r["mfu"] * r["step_seconds"] for r in timed) / seconds,
            "max_memory_reserved_bytes": steps[-1]["peak_memory_bytes"], "log": str(log_path)}


def _run_torchtitan(plan, command: list[str], env: dict[str, str], log_path: Path, args) -> dict:
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            _end(process)
    text = log_path.read_text(errors="replace")
    steps = {int(m[1]): (float(m[2]), float(m[3].replace(",", "")), float(m[4])) for m in TITAN_STEP.finditer(text)}
    if process.returncode != 0 or len(steps) < args.steps:
        return _failure(process, log_path, f"{len(steps)} of {args.steps} steps logged")
    tokens = plan.batch.micro_batch * plan.batch.seq_len
    timed = [steps[step] for step in range(args.warmup + 1, args.steps + 1)]
    seconds = sum(tokens / tps for _, tps, _ in timed)  # its tps is tokens over one step's time (log_freq 1)
    memory_gib = [gib for gib, _, _ in steps.values()] + [float(m) for m in TITAN_MODEL_MEMORY.findall(text)]
    return {"tokens_per_second": len(timed) * tokens / seconds,
            "logged_mfu": sum(mfu / 100 * tokens / tps for _, tps, mfu in timed) / seconds,
            "max_memory_reserved_bytes": int(max(memory_gib) * GIB), "log": str(log_path)}


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def _end(process: subprocess.Popen) -> None:
    """SIGTERM to the process group this bench started, SIGKILL 30 s later if it still runs."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _failure(process: subprocess.Popen, log_path: Path, what: str) -> dict:
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
    print(f"{log_path.name}: exit {process.returncode}, {what}; last lines:\n  " + "\n  ".join(tail))
    return {"error": f"exit {process.returncode}, {what}", "log": str(log_path)}


def _ratios(results: dict) -> dict | None:
    ours, theirs = results.get("runtime", {}), results.get("torchtitan", {})
    if "tokens_per_second" not in ours or "tokens_per_second" not in theirs:
        return None
    return {"tokens_per_second": ours["tokens_per_second"] / theirs["tokens_per_second"],
            "max_memory_reserved": ours["max_memory_reserved_bytes"] / theirs["max_memory_reserved_bytes"]}


def _print_table(report: dict) -> None:
    print(f"{'side':12} {'tokens/s':>10} {'MFU %':>7} {'logged MFU %':>13} {'max reserved GiB':>17} "
          f"{'plan GiB':>9}")
    for side in ("runtime", "torchtitan"):
        row = report.get(side)
        if row is None:
            continue
        if "error" in row:
            print(f"{side:12} failed: {row['error']} (see {row['log']})")
            continue
        planned = f"{report['plan_memory_bytes'] / GIB:9.1f}" if side == "runtime" else ""
        print(f"{side:12} {row['tokens_per_second']:10,.0f} {100 * row['mfu']:7.1f} {100 * row['logged_mfu']:13.1f} "
              f"{row['max_memory_reserved_bytes'] / GIB:17.1f} {planned}")
    ratio = report["ratio"]
    if ratio:
        mfu = report["runtime"]["mfu"]
        print(f"runtime / torchtitan: {ratio['tokens_per_second']:.2f}× tokens/s, "
              f"{ratio['max_memory_reserved']:.2f}× max reserved")
        print(f"goal: ≥ 1.00× torchtitan tokens/s: {ratio['tokens_per_second']:.2f}× "
              f"({'met' if ratio['tokens_per_second'] >= 1 else 'not met'}); MFU ≥ 45%: {100 * mfu:.1f}% "
              f"({'met' if mfu >= 0.45 else 'not met'})")


if __name__ == "__main__":
    sys.exit(main())
