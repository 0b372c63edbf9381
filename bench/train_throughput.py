"""Training throughput of the runtime vs Hugging Face `Trainer`: same tiny model, data, CPU, one run.

    python bench/train_throughput.py [--steps 30] [--threads 2] [--repeats 2] [--corpus ../shared/data/corpus]
                                     [--compile]

Both train the tiny example (5M-parameter Llama, random init with the same seed, fp32, no KV cache, AdamW
with the same hyperparameters, warmup then cosine to the same floor, gradients clipped at the same norm,
micro-batch 8 × 128 tokens, no accumulation, 1 process, no checkpoints inside the timed steps) for the same
number of optimizer steps on the same prepared shards, each in its own process with the same thread count.
Each side keeps its own defaults otherwise: HF Trainer its fused AdamW (`adamw_torch_fused`) and no logging
until the last step; the runtime its plan (DDP × 1, a metrics line and TensorBoard scalars every step).

Throughput is tokens over the wall time from the end of step `--warmup` to the end of the last step, the same
span on both sides: everything a step does (drawing and collating the batch, forward, backward, clipping, the
optimizer, zeroing, logging) counts; start-up and the first steps do not. The runtime measures it itself (its
`step_seconds`, end of step to end of step); for HF a `TrainerCallback` takes the time at each `on_step_end`.
The sides alternate `--repeats` times and the best of each counts, since other processes on a shared machine
slow whichever runs beside them. Prints both, their ratio, and each side's peak resident set (VmHWM of the
training process, the largest over the repeats).

`--compile` compiles on both sides: the runtime each decoder layer (`training.compile=true`), HF Trainer the
whole model (`torch_compile=True`); compiling happens in the first steps, outside the timed span on both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_RECIPE = REPO / "examples" / "tiny" / "recipe.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per side (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps left out of the timing (default 5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per side (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best counts")
    parser.add_argument("--corpus", default=str(REPO.parent / "shared" / "data" / "corpus"))
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides (see above)")
    parser.add_argument("--hf-worker", metavar="PLAN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be at least 1 and below --steps {args.steps}")
    sys.path.insert(0, str(REPO))  # run as a script from a checkout: dapc and runtime live beside bench/
    if args.hf_worker:
        print(json.dumps(_hf_trainer_tokens_per_second(Path(args.hf_worker), args.warmup, args.compile)))
        return 0
    with tempfile.TemporaryDirectory(prefix="dapc-bench-") as scratch:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        ours, theirs = [], []
        for repeat in range(args.repeats):  # alternating, so load from other processes hits both sides alike
            plan_path = _plan(Path(scratch) / f"run-{repeat}", args.corpus, args.steps, args.compile)
            if repeat == 0:
                subprocess.run([sys.executable, "-m", "runtime.prepare", "--plan", str(plan_path), "--no-progress"],
                               cwd=REPO, env=env, check=True, capture_output=True)
            ours.append(_runtime_tokens_per_second(plan_path, env, args.warmup))
            worker = [sys.executable, __file__, "--hf-worker", str(plan_path), "--warmup", str(args.warmup),
                      *(["--compile"] if args.compile else [])]
            done = subprocess.run(worker, cwd=REPO, env=env, check=True, capture_output=True, text=True)
            theirs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1} (load average {os.getloadavg()[0]:.2f}): runtime "
                  f"{ours[-1]['tokens_per_second']:,.0f} tokens/s, HF Trainer "
                  f"{theirs[-1]['tokens_per_second']:,.0f} tokens/s", flush=True)
    best_ours, best_theirs = (max(r["tokens_per_second"] for r in side) for side in (ours, theirs))
    rss_ours, rss_theirs = (max(r["peak_rss_bytes"] for r in side) / 1024**2 for side in (ours, theirs))
    print(f"tiny Llama, 1 process, {args.threads} threads, {args.steps - args.warmup} timed steps of 1,024 tokens, "
          f"best of {args.repeats}{', compiled' if args.compile else ''}")
    print(f"runtime (python -m runtime.train, ddp × 1): {best_ours:,.0f} tokens/s, peak RSS {rss_ours:,.0f} MiB")
    print(f"HF Trainer:                                 {best_theirs:,.0f} tokens/s, peak RSS {rss_theirs:,.0f} MiB")
    print(f"ratio runtime / HF Trainer: {best_ours / best_theirs:.2f} tokens/s, {rss_ours / rss_theirs:.2f} peak RSS")
    return 0


def _plan(folder: Path, corpus: str, steps: int, compile_layers: bool) -> Path:
    from dapc.compile import compile_recipe

    overrides = (
        f"data.paths={json.dumps([corpus])}", f"data.prepared_dir={folder.parent / 'data'}",
        "hardware.gpus_per_node=1", "strategy=ddp", "training.micro_batch=8",
        f"training.tokens={steps * 1024}", f"checkpoint.every_steps={steps}", "checkpoint.export_hf=false",
        *(["training.compile=true"] if compile_layers else []),  # else auto: off on the CPU device
    )
    plan = compile_recipe(TINY_RECIPE, overrides=overrides, output=str(folder / "run")).plan
    folder.mkdir(parents=True)
    path = folder / "plan.json"
    path.write_text(plan.text())
    return path


def _runtime_tokens_per_second(plan_path: Path, env: dict[str, str], warmup: int) -> dict[str, float]:
    subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(plan_path)], cwd=REPO, env=env, check=True,
                   capture_output=True)
    plan = json.loads(plan_path.read_text())
    records = [json.loads(line) for line in Path(plan["paths"]["metrics_path"]).read_text().splitlines()]
    timed = [r for r in records if r["event"] == "step" and r["step"] > warmup]
    tokens = len(timed) * plan["batch"]["global_batch_tokens"]
    (memory,) = (r for r in records if r["event"] == "memory")
    return {"tokens_per_second": tokens / sum(r["step_seconds"] for r in timed),
            "peak_rss_bytes": memory["measured_bytes"]}


def _hf_trainer_tokens_per_second(plan_path: Path, warmup: int, compile_model: bool) -> dict[str, float]:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from runtime.data import PackedDataset
    from runtime.memory_probe import vm_hwm_bytes
    from runtime.train.config import load_plan
    from runtime.train.model import base_model

    plan = load_plan(plan_path)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model = base_model(plan)  # the runtime's seeded init, fp32
    model.config.use_cache = False  # as the runtime trains it: no KV cache built in each forward
    dataset = PackedDataset(plan.prepared_dir, split="train")

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    arguments = TrainingArguments(
        output_dir=str(Path(plan.output_dir) / "hf"), max_steps=plan.steps,
        per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum, learning_rate=plan.lr, weight_decay=plan.weight_decay,
        adam_beta1=plan.adam_beta1, adam_beta2=plan.adam_beta2, adam_epsilon=plan.adam_eps,
        max_grad_norm=plan.grad_clip or 0.0, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": plan.min_lr}, warmup_steps=plan.warmup_steps, seed=plan.seed,
        use_cpu=True, save_strategy="no", report_to=[], logging_steps=plan.steps, dataloader_num_workers=0,
        disable_tqdm=True, torch_compile=compile_model,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=_LabelledDataset(dataset), callbacks=[clock])
    trainer.train()
    timed_steps = len(clock.ends) - warmup
    seconds = clock.ends[-1] - clock.ends[warmup - 1]  # end of step `warmup` to end of the last
    return {"tokens_per_second": timed_steps * plan.micro_batch * plan.seq_len / seconds,
            "peak_rss_bytes": vm_hwm_bytes()}


class _LabelledDataset:
    """PackedDataset as the dicts `Trainer`'s default collator stacks: labels are the inputs (the model shifts)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        ids = self.dataset[index]
        return {"input_ids": ids, "labels": ids}


if __name__ == "__main__":
    sys.exit(main())
