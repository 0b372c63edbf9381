"""Throughput and peak memory of `runtime.prepare` against a plain `datasets.map` + group_texts baseline.

    python bench/prepare_bench.py --size-mb 1024 [--workers N] [--seq-len 2048] [--work-dir DIR]

Writes a synthetic jsonl corpus (documents of 20-2,000 words drawn from the NIST corpus's own vocabulary
at its word frequencies), then runs each method in a child process on the same files while a sampler
thread reads the child's whole process tree every 0.2 s. Reported: wall seconds (tokenizer load included),
CPU seconds of the whole tree (user + sys: the fair figure on a shared machine), content tokens per second
(EOS not counted), and peak memory of the tree, as the sum of RSS (counts pages
shared by forked workers once per process, so it overstates) and the sum of PSS (shares them out).
The load average before and after each method is printed: other users of the machine slow either side.

Both sides load the same tokenizer (`runtime.tokenizer.load_tokenizer`) and must produce the same number
of content tokens, or the bench fails. What each side does:
- runtime.prepare: N worker processes sha256 the input files while the main process loads the tokenizer,
  then read their own byte ranges, parse JSON, split by document hash, and encode with
  `runtime.prepare.word_cache` (the Rust backend's ids, BPE run once per distinct word); the main process
  packs seq_len rows, sha256s and fsyncs the shards, and records progress for resuming.
- datasets: the Hugging Face `run_clm.py` recipe: `load_dataset("json")`, `map(tokenize, batched=True,
  num_proc=N)` with the same tokenizer's `__call__` (its Rust `encode_batch`) and EOS appended, then
  `map(group_texts, batched=True, num_proc=N)` into seq_len blocks, in a fresh datasets cache (its Arrow
  files count as disk written). group_texts drops each batch's remainder, so it packs fewer sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NIST = REPO / ".." / "shared" / "data" / "corpus" / "nist-sp800-63-3"
TOKENIZER = "mistral-common:v1"
FILE_BYTES = 64 << 20


def make_corpus(directory: Path, size_mb: int, seed: int = 0) -> list[Path]:
    """Synthetic jsonl files of about 64 MiB, `size_mb` MiB in all; reused when already there."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    done = directory / "COMPLETE"
    if done.exists() and json.loads(done.read_text()) == {"size_mb": size_mb, "seed": seed}:
        return sorted(directory.glob("*.jsonl"))
    for old in directory.glob("*.jsonl"):
        old.unlink()
    counts = Counter(" ".join(p.read_text() for p in sorted(NIST.rglob("*.md"))).split())
    words = np.array(list(counts))
    weights = np.array(list(counts.values()), dtype=np.float64)
    rng = np.random.default_rng(seed)
    remaining, files = size_mb << 20, []
    while remaining > 0:
        path = directory / f"part-{len(files):04d}.jsonl"
        target, written = min(FILE_BYTES, remaining), 0
        with open(path, "w") as f:
            while written < target:
                lengths = rng.integers(20, 2000, size=256)
                drawn = rng.choice(words, size=int(lengths.sum()), p=weights / weights.sum())
                bounds = np.cumsum(lengths)[:-1]
                lines = "".join(json.dumps({"text": " ".join(doc)}) + "\n" for doc in np.split(drawn, bounds))
                written += f.write(lines)
        remaining -= written
        files.append(path)
    done.write_text(json.dumps({"size_mb": size_mb, "seed": seed}))
    return files


def run_ours(files: list[Path], out: Path, workers: int, seq_len: int) -> dict:
    from runtime.prepare import prepare_corpus

    manifest = prepare_corpus(
        [str(f) for f in files],
        data_format="jsonl",
        text_field="text",
        tokenizer=TOKENIZER,
        seq_len=seq_len,
        prepared_dir=str(out),
        validation_fraction=0.0,
        seed=0,
        workers=workers,
        progress=False,
    )
    return {"tokens": manifest.content_tokens, "sequences": manifest.splits["train"].sequences}


def run_baseline(files: list[Path], out: Path, workers: int, seq_len: int) -> dict:
    from datasets import load_dataset

    from runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    eos = tok.eos_token_id
    raw = load_dataset("json", data_files=[str(f) for f in files], split="train", cache_dir=str(out))

    def tokenize(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids], "content_tokens": [len(x) for x in ids]}

    tokenized = raw.map(tokenize, batched=True, num_proc=workers, remove_columns=raw.column_names)
    tokens = sum(tokenized["content_tokens"])

    def group_texts(batch):
        joined = [t for ids in batch["input_ids"] for t in ids]
        usable = len(joined) // seq_len * seq_len
        return {"input_ids": [joined[i : i + seq_len] for i in range(0, usable, seq_len)]}

    grouped = tokenized.map(group_texts, batched=True, num_proc=workers, remove_columns=tokenized.column_names)
    return {"tokens": tokens, "sequences": len(grouped)}


def measure(method: str, files: list[Path], out: Path, workers: int, seq_len: int) -> dict:
    """Run one method in a child process; sample its process tree's memory until it exits."""
    import psutil

    command = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--seq-len",
        str(seq_len),
        *map(str, files),
    ]
    started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    peak = {"rss": 0, "pss": 0}

    def sample():
        root = psutil.Process(child.pid)
        while child.poll() is None:
            rss = pss = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    info = proc.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
            except psutil.Error:
                pass
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = child.communicate()
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and every descendant it waited for
    cpu_seconds = sum(getattr(after, k) - getattr(before, k) for k in ("ru_utime", "ru_stime"))
    sampler.join()
    if child.returncode:
        raise SystemExit(f"{method} failed with exit code {child.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {
        "method": method,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        **result,
        "peak_rss": peak["rss"],
        "peak_pss": peak["pss"],
        "disk": disk,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="synthetic corpus size in MiB (default 1024)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "dapc-prepare-bench")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--child", choices=["ours", "datasets"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        run = run_ours if args.child == "ours" else run_baseline
        print(json.dumps(run(args.files, args.out, args.workers, args.seq_len)))
        return

    corpus_dir = args.work_dir / f"corpus-{args.size_mb}mb"
    t0 = time.monotonic()
    files = make_corpus(corpus_dir, args.size_mb)
    corpus_bytes = sum(f.stat().st_size for f in files)
    print(
        f"corpus: {len(files)} jsonl files, {corpus_bytes:,} bytes in {corpus_dir} ({time.monotonic() - t0:.0f} s to make)"
    )
    rows = []
    for method in ["ours"] + ([] if args.skip_baseline else ["datasets"]):
        out = args.work_dir / f"out-{method}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        load_before = os.getloadavg()[0]
        rows.append({**measure(method, files, out, args.workers, args.seq_len), "load_before": load_before,
                     "load_after": os.getloadavg()[0]})
        subprocess.run(["rm", "-rf", str(out)], check=True)
    if len({r["tokens"] for r in rows}) > 1:
        raise SystemExit(f"the methods disagree on the content tokens: {[(r['method'], r['tokens']) for r in rows]}")
    print(f"workers {args.workers}, seq_len {args.seq_len}, tokenizer {TOKENIZER}, {os.cpu_count()} CPUs")
    header = (
        f"{'method':<20}{'wall s':>8}{'CPU s':>8}{'tokens':>13}{'tokens/s':>11}{'tokens/CPU-s':>14}"
        f"{'peak RSS sum':>14}{'peak PSS sum':>14}{'disk':>10}{'load 1-min':>13}"
    )
    print(header)
    print("-" * len(header))
    names = {"ours": "runtime.prepare", "datasets": "datasets.map+group"}
    for r in rows:
        print(
            f"{names[r['method']]:<20}{r['seconds']:>8.1f}{r['cpu_seconds']:>8.1f}{r['tokens']:>13,}"
            f"{r['tokens'] / r['seconds']:>11,.0f}{r['tokens'] / r['cpu_seconds']:>14,.0f}"
            f"{r['peak_rss'] / 2**20:>10,.0f} MiB{r['peak_pss'] / 2**20:>10,.0f} MiB{r['disk'] / 2**20:>6,.0f} MiB"
            f"{r['load_before']:>7.2f}→{r['load_after']:.2f}"
        )
    if len(rows) == 2:
        ours, base = rows
        print(
            f"runtime.prepare / datasets.map: {base['seconds'] / ours['seconds']:.2f}x tokens/s (wall), "
            f"{base['cpu_seconds'] / ours['cpu_seconds']:.2f}x tokens per CPU-second, same {ours['tokens']:,} tokens"
        )
    print("load average (1, 5, 15 min) at the end:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
