"""Training throughput of the runtime vs Hugging Face `Trainer`: same tiny model, data, CPU, one run.

    python bench/train_throughput.py [--steps 30] [--threads 2] [--repeats 2] [--corpus ../shared/data/corpus]

Both train the tiny example (5M-parameter Llama, random init with the same seed, fp32, AdamW, cosine schedule,
micro-batch 8 × 128 tokens, no accumulation, 1 process, no checkpoints inside the timed steps) on the same
prepared shards, each in its own process with the same thread count. Throughput is tokens over the wall time
of the steps after the first `--warmup` steps, timed around each optimizer step by each side's own clock
(the runtime's `step_seconds` metric; a `TrainerCallback` for HF). The sides alternate `--repeats` times and the
best of each counts, since other processes on a shared machine slow whichever runs beside them. Prints both
and their ratio.
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
    parser.add_argument("--hf-worker", metavar="PLAN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # run as a script from a checkout: dapc and runtime live beside bench/
    if args.hf_worker:
        print(json.dumps(_hf_trainer_tokens_per_second(Path(args.hf_worker), args.warmup)))
        return 0
    with tempfile.TemporaryDirectory(prefix="dapc-bench-") as scratch:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        ours, theirs = [], []
        for repeat in range(args.repeats):  # alternating, so load from other processes hits both sides alike
            plan_path = _plan(Path(scratch) / f"run-{repeat}", args.corpus, args.steps)
            if repeat == 0:
                subprocess.run([sys.executable, "-m", "runtime.prepare", "--plan", str(plan_path), "--no-progress"],
                               cwd=REPO, env=env, check=True, capture_output=True)
            ours.append(_runtime_tokens_per_second(plan_path, env, args.warmup))
            worker = [sys.executable, __file__, "--hf-worker", str(plan_path), "--warmup", str(args.warmup)]
            done = subprocess.run(worker, cwd=REPO, env=env, check=True, capture_output=True, text=True)
            theirs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}: runtime {ours[-1]:,.0f} tokens/s, HF Trainer "
                  f"{theirs[-1]['tokens_per_second']:,.0f} tokens/s", flush=True)
    best_ours, best_theirs = max(ours), max(t["tokens_per_second"] for t in theirs)
    print(f"tiny Llama, 1 process, {args.threads} threads, {args.steps - args.warmup} timed steps of 1,024 tokens, "
          f"best of {args.repeats}")
    print(f"runtime (python -m runtime.train, ddp × 1): {best_ours:,.0f} tokens/s")
    print(f"HF Trainer:                                 {best_theirs:,.0f} tokens/s")
    print(f"ratio runtime / HF Trainer: {best_ours / best_theirs:.2f}")
    return 0


def _plan(folder: Path, corpus: str, steps: int) -> Path:
    from dapc.compile import compile_recipe

    overrides = (
        f"data.paths={json.dumps([corpus])}", f"data.prepared_dir={folder.parent / 'data'}",
        "hardware.gpus_per_node=1", "strategy=ddp", "training.micro_batch=8",
        f"training.tokens={steps * 1024}", f"checkpoint.every_steps={steps}", "checkpoint.export_hf=false",
    )
    plan = compile_recipe(TINY_RECIPE, overrides=overrides, output=str(folder / "run")).plan
    folder.mkdir(parents=True)
    path = folder / "plan.json"
    path.write_text(plan.text())
    return path


def _runtime_tokens_per_second(plan_path: Path, env: dict[str, str], warmup: int) -> float:
    subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(plan_path)], cwd=REPO, env=env, check=True,
                   capture_output=True)
    plan = json.loads(plan_path.read_text())
    steps = [json.loads(line) for line in Path(plan["paths"]["metrics_path"]).read_text().splitlines()]
    timed = [r for r in steps if r["event"] == "step" and r["step"] > warmup]
    tokens = len(timed) * plan["batch"]["global_batch_tokens"]
    return tokens / sum(r["step_seconds"] for r in timed)


def _hf_trainer_tokens_per_second(plan_path: Path, warmup: int) -> dict[str, float]:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from runtime.data import PackedDataset
    from runtime.train.config import load_plan
    from runtime.train.model import base_model

    plan = load_plan(plan_path)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model = base_model(plan)  # the runtime's seeded init, fp32
    dataset = PackedDataset(plan.prepared_dir, split="train")

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    clock = StepClock()
    arguments = TrainingArguments(
        output_dir=str(Path(plan.output_dir) / "hf"), max_steps=plan.steps,
        per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum, learning_rate=plan.lr, weight_decay=plan.weight_decay,
        adam_beta1=plan.adam_beta1, adam_beta2=plan.adam_beta2, adam_epsilon=plan.adam_eps,
        max_grad_norm=plan.grad_clip or 0.0, lr_scheduler_type="cosine", warmup_steps=1, seed=plan.seed,
        use_cpu=True, save_strategy="no", report_to=[], logging_steps=plan.steps, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=_LabelledDataset(dataset), callbacks=[clock])
    trainer.train()
    timed = clock.seconds[warmup:]
    return {"tokens_per_second": len(timed) * plan.micro_batch * plan.seq_len / sum(timed)}


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
