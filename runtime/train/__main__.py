"""`python -m runtime.train --plan plan.json`: train (or resume) what the plan says. Exit 2 on bad input."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from dapc.errors import DapcError
from runtime.errors import print_error
from runtime.train.host_allocator import MMAP_THRESHOLD_ENV, fix_mmap_threshold


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.train", description=__doc__)
    parser.add_argument("--plan", required=True, help="plan.json written by `dapc render` (or `dapc plan --json`)")
    args = parser.parse_args(argv)
    # gloo's collectives as DeepSpeed and FSDP2 call them: deprecated names, same operations; noise per step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:
        from dapc.plan_schema import load_plan

        plan = load_plan(args.plan)  # torch-free: before torch is imported, so the environment below still applies
        _apply_environment(plan.runtime.env)
        from runtime.lock_check import check_corpus_since_prepare, warn_environment

        rank = int(os.environ.get("RANK", "0"))
        warn_environment(plan, rank)
        check_corpus_since_prepare(plan, rank)
        from runtime.train import train
        from runtime.train.config import train_plan

        train(train_plan(plan, args.plan))
    except DapcError as e:
        return print_error(e)
    return 0


def _apply_environment(env: dict[str, str]) -> None:
    """The plan's `runtime.env` (what the rendered launch files export), for a trainer started some other way.
    A value already set wins, with a warning where the memory model assumed another (the CUDA allocator mode).
    glibc read its variables when the process started, so the mmap threshold is given to it by mallopt."""
    for key, value in env.items():
        if key == MMAP_THRESHOLD_ENV and key not in os.environ and value.isdigit():
            fix_mmap_threshold(int(value))
        current = os.environ.setdefault(key, value)
        if current != value:
            print(f"warning: {key}={current} from the environment, the plan assumed {value}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
