"""A miniature domain-adaptive pretraining (DAP) experiment on the CPU: does adapting lower domain perplexity,
and does general replay bound the rise of general perplexity?

    python bench/dap_experiment.py [--out runs/dap] [--scale full|small]

1. Carves WordNet's glosses (`../shared/data/general/wordnet-glosses/glosses.txt`, in WordNet's order) into
   blocks of 16 consecutive glosses, one JSON line each: every 20th block (offset 10) is the replay slice, the
   rest the pretraining slice (at `--scale small`, a quarter of it: every 4th block).
2. Pretrains the tiny Llama (5M parameters, random init) on the pretraining slice:
   `examples/dap/pretrain-general.yaml`.
3. From that export, adapts on the security corpus (`../shared/data/corpus`) with 0%, 10% and 25% of all
   training tokens replayed from the replay slice (`--scale small`: 0% and 25%): `examples/dap/adapt-security.yaml`
   plus `data.replay`. Every run draws the same domain tokens, so a replay run is longer by share / (1 - share):
   replay is added to the domain data, not taken from it, and a difference in domain perplexity is the cost of
   mixing, not of seeing less of the domain. Same seed, schedule shape and peak lr in every run.
4. Perplexity of the pretrained model and of each adapted model, loaded from its Hugging Face export with
   `AutoModelForCausalLM` (`runtime.evaluate.hf_model.HFModel`, `runtime.evaluate.perplexity`): on the security
   corpus's validation split (every run prepares it with the same fraction and seed, and the split is
   content-hashed, so it is the same documents) and on held-out general text, the validation split of the
   pretraining slice, which no run trains on (the replay slice is disjoint from it). Both are packed
   sequences of `seq_len` tokens exactly as training reads them; each sequence is one window.

Writes `table.md`, `results.json` (with the seconds each stage took) and `dap.png` to `--out`, and prints the
table. Measured on two shared cores: `--scale full` 9 min, `--scale small` about 2 min. A run whose export of the
same plan is in `--out` already is not trained again, so a second call only re-evaluates.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "examples" / "dap"
SHARED_DATA = REPO.parent / "shared" / "data"
GLOSSES = SHARED_DATA / "general" / "wordnet-glosses" / "glosses.txt"
SECURITY = SHARED_DATA / "corpus"
GLOSSES_PER_BLOCK = 16
REPLAY_EVERY_BLOCKS = 20  # block b is replay text when b % 20 == 10, else pretraining text
SEQ_LEN = 128  # the recipes' data.seq_len
EVAL_BATCH_TOKENS = 4096  # 32 windows a forward pass: its logits (32 × 128 × 32,000 fp32) are 0.5 GiB


@dataclass(frozen=True)
class Scale:
    """Optimizer steps of pretraining, and of domain tokens in every adaptation (one per replay share), of
    `batch_sequences` each; every `pretrain_every`-th pretraining block used; `eval_sequences` (at most) of each
    held-out split, evenly spaced."""

    pretrain_steps: int
    domain_steps: int  # a multiple of 9, so that domain / (1 - share) is whole steps at shares 0.10 and 0.25
    batch_sequences: int
    replay_shares: tuple[float, ...]
    pretrain_every: int
    eval_sequences: int

    @property
    def batch_tokens(self) -> int:
        return self.batch_sequences * SEQ_LEN


SCALES = {
    # small: what tests/test_dap_experiment.py runs, in about two minutes: the two ends of the replay range only
    "small": Scale(pretrain_steps=96, domain_steps=18, batch_sequences=8, replay_shares=(0.0, 0.25),
                   pretrain_every=4, eval_sequences=48),
    "full": Scale(pretrain_steps=300, domain_steps=90, batch_sequences=16, replay_shares=(0.0, 0.10, 0.25),
                  pretrain_every=1, eval_sequences=192),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "dap", help="output folder (default runs/dap)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # run as a script from a checkout: dapc and runtime live beside bench/
    if not GLOSSES.is_file() or not SECURITY.is_dir():
        parser.error(f"shared data not found: expected {GLOSSES} and {SECURITY}")
    results = run_experiment(args.out.resolve(), SCALES[args.scale], args.scale)
    print(markdown_table(results))
    print(f"wrote {args.out / 'table.md'}, {args.out / 'results.json'} and {args.out / 'dap.png'}")
    return 0


def run_experiment(out: Path, scale: Scale, scale_name: str) -> dict:
    """Runs steps 1-4 (module docstring) into `out` and writes table.md, results.json and dap.png there."""
    started = time.perf_counter()
    pretrain_text, replay_text = carve_glosses(out / "general", scale.pretrain_every)
    pretrain_plan = _plan(RECIPES / "pretrain-general.yaml", out / "pretrain", (
        f"data.paths={json.dumps([str(pretrain_text)])}", f"data.prepared_dir={out / 'data' / 'pretrain'}",
        f"training.tokens={scale.pretrain_steps * scale.batch_tokens}",
        f"training.global_batch_sequences={scale.batch_sequences}"))
    seconds = {"pretrain": _prepare_and_train(pretrain_plan)}
    pretrained = json.loads(pretrain_plan.read_text())
    domain = json.dumps([{"name": "security", "paths": [str(SECURITY)]}])
    adapted = []
    for share in scale.replay_shares:
        replay = {"name": "general", "paths": [str(replay_text)], "format": "jsonl", "share": share}
        # One source is prepared into prepared_dir itself, several each into prepared_dir/<name>: both ways the
        # security split lands in data/adapt/security, prepared by the first run and found there by the others.
        data = ((f"data.replay={json.dumps(replay)}", f"data.prepared_dir={out / 'data' / 'adapt'}") if share
                else (f"data.prepared_dir={out / 'data' / 'adapt' / 'security'}",))
        plan_path = _plan(RECIPES / "adapt-security.yaml", out / f"adapt-replay-{round(share * 100)}", (
            f"model.source={pretrained['paths']['export_dir']}", f"data.sources={domain}", *data,
            f"training.tokens={round(scale.domain_steps * scale.batch_tokens / (1 - share))}",
            f"training.global_batch_sequences={scale.batch_sequences}"))
        seconds[plan_path.parent.name] = _prepare_and_train(plan_path)
        adapted.append((share, json.loads(plan_path.read_text())))
    evaluating = time.perf_counter()
    results = {
        "scale": scale_name, "settings": asdict(scale),
        **evaluate(pretrained, adapted, domain_dir=out / "data" / "adapt" / "security",
                   general_dir=out / "data" / "pretrain", max_sequences=scale.eval_sequences),
    }
    seconds["evaluate"] = time.perf_counter() - evaluating
    results["seconds"] = {**seconds, "all": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(results))
    write_chart(results, out / "dap.png")
    return results


def carve_glosses(folder: Path, pretrain_every: int) -> tuple[Path, Path]:
    """Writes the pretraining and replay slices of the glosses (module docstring) as JSON lines; returns their
    paths. Deterministic: the same file and arguments give the same bytes."""
    lines = GLOSSES.read_text(encoding="utf-8").splitlines()
    blocks = ["\n".join(lines[i : i + GLOSSES_PER_BLOCK]) for i in range(0, len(lines), GLOSSES_PER_BLOCK)]
    replay = [b for i, b in enumerate(blocks) if i % REPLAY_EVERY_BLOCKS == REPLAY_EVERY_BLOCKS // 2]
    rest = [b for i, b in enumerate(blocks) if i % REPLAY_EVERY_BLOCKS != REPLAY_EVERY_BLOCKS // 2]
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "pretrain.jsonl", folder / "replay.jsonl"
    for path, kept in zip(paths, (rest[::pretrain_every], replay), strict=True):
        text = "".join(json.dumps({"text": b}) + "\n" for b in kept)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:  # unchanged: prepare finds its shards
            path.write_text(text, encoding="utf-8")
    return paths


def evaluate(pretrained: dict, adapted: list[tuple[float, dict]], domain_dir: Path, general_dir: Path,
             max_sequences: int) -> dict:
    """Domain and general perplexity of the pretrained model and of each adapted run (plan dicts; a replay share
    each), with what each run trained on (from its metrics)."""
    import torch

    from runtime.data import PackedDataset
    from runtime.evaluate.hf_model import HFModel
    from runtime.evaluate.perplexity import perplexity

    torch.set_num_threads(os.cpu_count() or 1)
    splits = {name: _spread(PackedDataset(folder, split="validation"), max_sequences)
              for name, folder in (("domain", domain_dir), ("general", general_dir))}

    def scores(export: str) -> dict:
        model = HFModel(export, device="cpu", dtype=torch.float32, batch_tokens=EVAL_BATCH_TOKENS)
        return {name: asdict(perplexity(model, windows, seq_len=len(windows[0]), max_tokens=sum(map(len, windows))))
                for name, windows in splits.items()}

    runs = [{"replay_share": share, **_trained(plan), **scores(plan["paths"]["export_dir"])} for share, plan in adapted]
    return {"pretrained": {**_trained(pretrained), **scores(pretrained["paths"]["export_dir"])}, "adapted": runs}


def _spread(dataset, count: int) -> list[list[int]]:
    """At most `count` sequences of `dataset`, evenly spaced over it (its order is the documents' order)."""
    picked = range(len(dataset)) if len(dataset) <= count else (i * len(dataset) // count for i in range(count))
    return [dataset[i].tolist() for i in picked]


def _trained(plan: dict) -> dict:
    """Steps and sequences per source of a finished run, from its metrics.jsonl."""
    lines = Path(plan["paths"]["metrics_path"]).read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if r["event"] == "step"]
    # a mixture logs the sequences drawn so far from each source; one source logs none: every sequence is its
    single = {plan["corpus"]["sources"][0]["name"]: len(steps) * plan["batch"]["global_batch_sequences"]}
    drawn = steps[-1].get("source_sequences", single)
    seq_len = plan["batch"]["seq_len"]
    return {"steps": len(steps), "lr": plan["schedule"]["peak_lr"],
            "trained_tokens": {name: count * seq_len for name, count in drawn.items()}}


def markdown_table(results: dict) -> str:
    """The results as a Markdown table: perplexities, and each change from the pretrained model."""
    base = results["pretrained"]
    rows = ["| model | steps | general tokens | domain tokens | domain ppl | Δ domain | general ppl | Δ general |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            (f"| pretrained | {base['steps']} | {base['trained_tokens']['corpus']:,} | 0 | "
             f"{base['domain']['perplexity']:.1f} | | {base['general']['perplexity']:.1f} | |")]
    for run in results["adapted"]:
        domain, general = run["domain"]["perplexity"], run["general"]["perplexity"]
        rows.append(f"| adapted, {run['replay_share']:.0%} replay | {run['steps']} | "
                    f"{run['trained_tokens'].get('general', 0):,} | {run['trained_tokens']['security']:,} | "
                    f"{domain:.1f} | {domain - base['domain']['perplexity']:+.1f} | "
                    f"{general:.1f} | {general - base['general']['perplexity']:+.1f} |")
    d, g = base["domain"], base["general"]
    rows.append(f"\nPerplexity over {d['windows']} held-out domain windows ({d['tokens']:,} predicted tokens) and "
                f"{g['windows']} held-out general windows ({g['tokens']:,}) of {d['seq_len']} tokens; "
                f"`--scale {results['scale']}`, {results['seconds']['all']:.0f} s in all.")
    return "\n".join(rows) + "\n"


def write_chart(results: dict, path: Path) -> None:
    """Domain and general perplexity per replay share (points, log scale), the pretrained model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    shares = [run["replay_share"] for run in results["adapted"]]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")
    panels = (("domain", "security (held-out split)", "tab:blue"), ("general", "general (held-out glosses)", "tab:orange"))
    for ax, (name, title, color) in zip(axes, panels, strict=True):
        values = [run[name]["perplexity"] for run in results["adapted"]]
        before = results["pretrained"][name]["perplexity"]
        ax.plot(shares, values, "o-", color=color, label="adapted")
        for share, value in zip(shares, values, strict=True):
            ax.annotate(f"{value:.1f}", (share, value), textcoords="offset points", xytext=(0, 7), ha="center")
        ax.axhline(before, color="black", linestyle="--", label=f"pretrained: {before:.1f}")
        ax.set(title=f"{title} perplexity", xlabel="general replay share (of all training tokens)",
               ylabel="perplexity (log scale)", yscale="log", xticks=shares, xticklabels=[f"{s:.0%}" for s in shares])
        ax.set_xlim(shares[0] - 0.04, shares[-1] + 0.04)
        ax.set_ylim(min(*values, before) / 1.3, max(*values, before) * 1.3)
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(plt.NullFormatter())
        ax.legend(loc="center right")
    figure.suptitle(f"Miniature DAP: tiny Llama, general English → security (--scale {results['scale']})")
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plan(recipe: Path, folder: Path, overrides: tuple[str, ...]) -> Path:
    """Compiles `recipe` with `overrides` (output `folder/run`) to `folder/plan.json`."""
    from dapc.compile import compile_recipe

    plan = compile_recipe(recipe, overrides=overrides, output=str(folder / "run")).plan
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.json"
    path.write_text(plan.text())
    return path


def _prepare_and_train(plan_path: Path) -> float:
    """Prepares the plan's corpus (a source prepared before is found and kept), then trains as the rendered
    launch script does: torchrun, one process per `gpus_per_node`, with the plan's `runtime.env`; not again
    where the export of this very plan (its plan_sha256) is there. The trainer's output goes to
    `<plan folder>/train.log`; returns the seconds it took; raises where it fails."""
    started = time.perf_counter()
    from dapc.plan_schema import load_plan
    from runtime.export import EXPORT_META
    from runtime.prepare import prepare_from_plan

    prepare_from_plan(load_plan(plan_path), workers=os.cpu_count(), progress=False)
    plan = json.loads(plan_path.read_text())
    exported = Path(plan["paths"]["export_dir"]) / EXPORT_META
    if exported.is_file() and json.loads(exported.read_text())["plan_sha256"] == plan["plan_sha256"]:
        print(f"{plan_path.parent.name}: exported before from this plan, not trained again", flush=True)
        return time.perf_counter() - started
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", str(plan["batch"]["gpus_per_node"]), "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{port}", "-m", "runtime.train", "--plan", str(plan_path)]
    log = plan_path.parent / "train.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **plan["runtime"]["env"]}
    with log.open("w") as f:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"training {plan_path} exited {done.returncode}; last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-20:]))
    seconds = time.perf_counter() - started
    print(f"{plan_path.parent.name}: trained {plan['schedule']['total_steps']} steps in {seconds:.0f} s", flush=True)
    return seconds


if __name__ == "__main__":
    sys.exit(main())
