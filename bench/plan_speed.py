"""Cold `dapc plan` wall time for every shipped recipe: a fresh interpreter each run, as a user types it.

    python bench/plan_speed.py [--runs 5]

Prints the median and worst wall seconds per recipe; the target is under 0.3 s cold.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 0.3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    recipes = sorted((REPO / "recipes").glob("*.yaml")) + [REPO / "examples" / "tiny" / "recipe.yaml"]
    worst_overall = 0.0
    print(f"{'recipe':55} {'median s':>9} {'worst s':>8}")
    for recipe in recipes:
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "dapc", "plan", str(recipe), "--json"], cwd=REPO,
                                  capture_output=True)
            if done.returncode not in (0, 3):  # 3: planned, nothing fits (the 405B QLoRA recipe)
                raise SystemExit(done.stderr.decode())
            times.append(time.perf_counter() - start)
        worst_overall = max(worst_overall, max(times))
        print(f"{recipe.relative_to(REPO).as_posix():55} {statistics.median(times):9.3f} {max(times):8.3f}")
    verdict = "under" if worst_overall < TARGET_SECONDS else "OVER"
    print(f"worst cold run {worst_overall:.3f} s: {verdict} the {TARGET_SECONDS} s target")
    return 0 if worst_overall < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
