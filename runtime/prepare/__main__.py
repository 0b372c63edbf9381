"""`python -m runtime.prepare --plan plan.json`: prepare the plan's corpus. Exit 2 with one line on bad input."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from dapc.errors import DapcError
from runtime.errors import print_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.prepare", description=__doc__)
    parser.add_argument("--plan", required=True, help="plan.json written by `dapc render`")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    try:
        from dapc.plan_schema import load_plan

        from runtime.lock_check import warn_environment

        from . import prepare_from_plan

        plan = load_plan(args.plan)
        warn_environment(plan, rank=0)
        manifests = prepare_from_plan(plan, workers=args.workers, console=console,
                                      progress=not args.no_progress)
    except DapcError as e:
        return print_error(e)
    if args.json:
        named = {s.name: m.to_dict() for s, m in zip(plan.corpus.sources, manifests, strict=True)}
        print(json.dumps(named if len(named) > 1 else next(iter(named.values())), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
