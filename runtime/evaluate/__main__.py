"""`python -m runtime.evaluate`: parse the flags, call `run_evaluation`, exit 2 on a DapcError."""

from __future__ import annotations

import argparse
import sys

from dapc.errors import DapcError
from runtime.errors import print_error
from runtime.evaluate.run import BENCHMARKS, MODES, run_evaluation


def _benchmark(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH with NAME one of {', '.join(BENCHMARKS)}, got {value!r}")
    return name, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.evaluate",
        description="Score a model, and the model it was adapted from, on security benchmarks and perplexity.",
    )
    parser.add_argument("--plan", help="plan.json: evaluate its export against its base, as its recipe's eval says")
    parser.add_argument("--model", help="Hugging Face model directory to evaluate (the adapted model)")
    parser.add_argument("--compare-to", help="model directory to compare with (the base model)")
    parser.add_argument(
        "--benchmark",
        type=_benchmark,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help=f"benchmark file, NAME one of {', '.join(BENCHMARKS)} (repeatable)",
    )
    parser.add_argument("--general-text", action="append", help="general text file or directory (repeatable)")
    parser.add_argument("--domain-text", action="append", help="held-out domain text file or directory (repeatable)")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="loglik",
        help="loglik: best-scoring option (base models); generate: official prompt and answer rule",
    )
    parser.add_argument("--k-shot", type=int, default=5, help="worked examples in log-likelihood prompts")
    parser.add_argument("--limit", type=int, help="score only the first N questions of each benchmark")
    parser.add_argument("--max-new-tokens", type=int, help="generation length (default: each benchmark's)")
    parser.add_argument("--ppl-seq-len", type=int, default=1024, help="perplexity window, tokens")
    parser.add_argument("--ppl-max-tokens", type=int, default=1 << 20, help="perplexity tokens per text set")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", help="directory for results.json, comparison.md, comparison.png")
    args = parser.parse_args(argv)
    if not args.plan and not (args.model and args.out):
        parser.error("give --plan plan.json, or --model DIR and --out DIR")
    try:
        if args.plan:
            from runtime.evaluate.from_plan import evaluate_from_plan

            evaluate_from_plan(args.plan, device=args.device)
            return 0
        run_evaluation(
            args.model,
            dict(args.benchmark),
            args.out,
            compare_to=args.compare_to,
            general_text=args.general_text,
            domain_text=args.domain_text,
            mode=args.mode,
            k_shot=args.k_shot,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            ppl_seq_len=args.ppl_seq_len,
            ppl_max_tokens=args.ppl_max_tokens,
            device=args.device,
            batch_tokens=args.batch_tokens,
        )
    except DapcError as e:
        return print_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
