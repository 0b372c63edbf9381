"""`python -m runtime.evaluate`: parse the flags, call `evaluate_models` (score one or several model
directories side by side), `run_evaluation` (a model and its `--compare-to` base, or a plan's export and
its base) or `evaluate_responses` (score answers produced elsewhere), exit 2 on a DapcError. Scoring
responses imports neither torch nor transformers; model directories are checked before torch loads."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from dapc.errors import DapcError
from runtime.errors import print_error
from runtime.evaluate.benchmarks import BENCHMARKS
from runtime.evaluate.model_dirs import named_models, parse_model
from runtime.evaluate.scoring import MODES

# Flags that only a model evaluation reads: refused beside --responses when set.
_MODEL_FLAGS = ("plan", "model", "compare_to", "no_baseline", "general_text", "domain_text", "mode", "k_shot",
                "limit", "max_new_tokens", "ppl_seq_len", "ppl_max_tokens", "batch_tokens", "device")
_ID_RULES = "\n".join(f"    {b.name}: {b.id_rule}" for b in BENCHMARKS.values())
_EPILOG = f"""\
comparing model directories (base -> CPT -> SFT -> DPO):
  --model is repeatable: every model is scored on the same benchmarks and texts with the same settings
  (mode, k-shot, limit, perplexity windows), one loaded at a time, in the order given. The table has a
  column per model, headed NAME, or DIR as given, and each later model's change from the first
  (--no-baseline: none). --compare-to DIR is scored first, as the base. One --model DIR, with or
  without --compare-to, keys results.json "model" and "compare_to" and heads the columns
  "model: FOLDER" and "base: FOLDER", as --plan does. A LoRA export holding only adapters is no model
  directory: train it with checkpoint.merge_lora: true. Example:
    dapc eval --model cpt=runs/chain-cpt/export --model sft=runs/chain-sft/export \\
      --model dpo=runs/chain-dpo/export --benchmark cti-mcq=cti-mcq.tsv --domain-text held-out/ --out eval

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


def _model(value: str) -> tuple[str | None, str]:
    try:
        return parse_model(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


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
        description="Score model directories side by side (a model and the base it was adapted from, or a "
        "chain base -> CPT -> SFT -> DPO) on security benchmarks and perplexity; or score responses produced "
        "elsewhere, for any number of models.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--plan", help="plan.json: evaluate its export against its base, as its recipe's eval says")
    parser.add_argument(
        "--model",
        type=_model,
        action="append",
        metavar="[NAME=]DIR",
        help="Hugging Face model directory to evaluate, its column headed NAME (repeatable: one column per "
        "model, in this order, the first the base); see below",
    )
    parser.add_argument("--compare-to", metavar="DIR", help="the base model directory, scored first")
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="with several --model: no change columns (the first model is not the others' base)",
    )
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
        parser.error("--baseline names one of the --responses models; with --model, the first model is the base "
                     "(or --compare-to DIR)")
    elif not args.plan and not (args.model and args.out):
        parser.error("give --plan plan.json, or --model DIR and --out DIR, or --responses MODEL:BENCHMARK=FILE")
    elif args.no_baseline and args.compare_to:
        parser.error("--no-baseline contradicts --compare-to, which names the base: drop one")
    try:
        if args.responses:
            return _score_responses(args)
        if args.plan:
            from runtime.evaluate.from_plan import evaluate_from_plan

            evaluate_from_plan(args.plan, device=args.device)
            return 0
        return _score_models(args)
    except DapcError as e:
        return print_error(e)


def _score_models(args: argparse.Namespace) -> int:
    options = {
        "general_text": args.general_text,
        "domain_text": args.domain_text,
        "mode": args.mode,
        "k_shot": args.k_shot,
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "ppl_seq_len": args.ppl_seq_len,
        "ppl_max_tokens": args.ppl_max_tokens,
        "device": args.device,
        "batch_tokens": args.batch_tokens,
    }
    [(name, path), *more] = args.model
    if name is None and not more:  # today's form: results keyed "model" and "compare_to"
        from runtime.evaluate.run import run_evaluation  # imports torch and transformers

        run_evaluation(path, dict(args.benchmark), args.out, compare_to=args.compare_to, **options)
        return 0
    models = named_models(args.model, args.compare_to)  # a bad directory fails before torch loads
    from runtime.evaluate.run import evaluate_models

    evaluate_models(models, dict(args.benchmark), args.out, baseline=not args.no_baseline, **options)
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
