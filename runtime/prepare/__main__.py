"""`python -m runtime.prepare --plan plan.json`: prepare the plan's corpus. Exit 2 with one line on bad input."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.markup import escape

from dapc.errors import DapcError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.prepare", description=__doc__)
    parser.add_argument("--plan", required=True, help="plan.json written by `dapc render`")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    try:
        from . import prepare_from_plan

        try:
            with open(args.plan) as f:
                plan = json.load(f)
        except (OSError, ValueError) as e:
            raise DapcError(f"cannot read the plan: {e}", args.plan) from e
        manifest = prepare_from_plan(
            plan, workers=args.workers, console=console, progress=not args.no_progress, source=args.plan
        )
    except DapcError as e:
        console.print(f"error: {escape(str(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
