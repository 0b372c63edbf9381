"""`python -m runtime.train --plan plan.json`: train (or resume) what the plan says. Exit 2 on bad input."""

from __future__ import annotations

import argparse
import sys
import warnings

from dapc.errors import DapcError
from runtime.errors import print_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.train", description=__doc__)
    parser.add_argument("--plan", required=True, help="plan.json written by `dapc render` (or `dapc plan --json`)")
    args = parser.parse_args(argv)
    # gloo's collectives as DeepSpeed and FSDP2 call them: deprecated names, same operations; noise per step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:
        from runtime.train import load_plan, train

        train(load_plan(args.plan))
    except DapcError as e:
        return print_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
