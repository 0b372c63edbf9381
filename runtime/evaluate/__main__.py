"""`python -m runtime.evaluate`: parse the flags, call `run_evaluation` (score models) or
`evaluate_responses` (score answers produced elsewhere), exit 2 on a DapcError. Scoring responses
imports neither torch nor transformers."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from dapc.errors import DapcError
from runtime.errors import print_error
from runtime.evaluate.benchmarks import BENCHMARKS
from runtime.evaluate.scoring import MODES

# Flags that only a model evaluation reads: refused beside --responses when set.
_MODEL_FLAGS = ("plan", "model", "compare_to", "general_text", "domain_text", "mode", "k_shot", "limit",
                "max_new_tokens", "ppl_seq_len", "ppl_max_tokens", "batch_tokens", "device")
_ID_RULES = "\n".join(f"    {b.name}: {b.id_rule}" for b in BENCHMARKS.values())
_EPILOG = f"""\
scoring responses produced elsewhere (no model is loaded):
  --responses MODEL:BENCHMARK=FILE names a JSONL file of one model's answers to one benchmark,
  one object per line: {{"id": ..., "response": "the model's full answer text"}}. Each response is
  read with the benchmark's official rule, exactly as answers generated here are. The "id" names
  the question (a position is a JSON integer, or its digits as a string):
{_ID_RULES}
  A question without a line counts as unparsed (and wrong), and the count is reported; a bad line,
  an unknown id or an id answered twice is an error naming FILE:LINE. Example:
    dapc eval --benchmark cti-mcq=cti-mcq.tsv --responses base:cti-mcq=base.jsonl \\
      --responses cpt:cti-mcq=cpt.jsonl --responses sft:cti-mcq=sft.jsonl --baseline base --out eval
"""


def _benchmark(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH with NAME one of {', '.join(BENCHMARKS)}, got {value!r}")
    return name, path


def _responses(value: str) -> tuple[str, str, str]:
    # Split at the first "=" (a path may hold more) and the last ":" before it (a model name such as
    # "llama:8b" may hold one); a benchmark name holds neither.
    left, sep, path = value.partition("=")
    model, colon, benchmark = left.rpartition(":")
    if not sep or not path or not colon or not model or not benchmark:
        raise argparse.ArgumentTypeError(
            f"expected MODEL:BENCHMARK=FILE with BENCHMARK one of {', '.join(BENCHMARKS)}, got {value!r}"
        )
    return model, benchmark, path


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag on one line, as the dapc CLI does, instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m runtime.evaluate",
        description="Score a model, and the model it was adapted from, on security benchmarks and perplexity; "
        "or score responses produced elsewhere, for any number of models.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    parser.add_argument(
        "--responses",
        type=_responses,
        action="append",
        default=[],
        metavar="MODEL:BENCHMARK=FILE",
        help="JSONL answers of MODEL to BENCHMARK, scored without a model (repeatable: several models and "
        "benchmarks; models are listed in the order first named); see below",
    )
    parser.add_argument(
        "--baseline",
        metavar="MODEL",
        help="with --responses: the model the others were adapted from; listed first, with each other's change",
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
    parser.add_argument(
        "--out", "--output", metavar="DIR", help="directory for results.json, comparison.md, comparison.png"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.responses:
        given = [f"--{f.replace('_', '-')}" for f in _MODEL_FLAGS if getattr(args, f) != parser.get_default(f)]
        if given:
            parser.error(f"--responses scores answers without a model: drop {', '.join(given)}")
        if not args.out:
            parser.error("--responses needs --out DIR")
    elif args.baseline:
        parser.error("--baseline names one of the --responses models; with --model, the base is --compare-to")
    elif not args.plan and not (args.model and args.out):
        parser.error("give --plan plan.json, or --model DIR and --out DIR, or --responses MODEL:BENCHMARK=FILE")
    try:
        if args.responses:
            return _score_responses(args)
        if args.plan:
            from runtime.evaluate.from_plan import evaluate_from_plan

            evaluate_from_plan(args.plan, device=args.device)
            return 0
        from runtime.evaluate.run import run_evaluation  # imports torch and transformers

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


def _score_responses(args: argparse.Namespace) -> int:
    from runtime.evaluate.from_responses import evaluate_responses

    files: dict[str, dict[str, str]] = {}
    for model, benchmark, path in args.responses:
        if benchmark in files.setdefault(model, {}):
            raise DapcError(f"--responses {model}:{benchmark} is given twice ({files[model][benchmark]} and {path})")
        files[model][benchmark] = path
    benchmarks = dict(args.benchmark)
    if len(benchmarks) < len(args.benchmark):
        raise DapcError("--benchmark names the same benchmark twice")
    evaluate_responses(files, benchmarks, args.out, baseline=args.baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
