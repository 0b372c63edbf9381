"""Cold `dapc plan` wall time for every shipped recipe: a fresh interpreter each run, as a user types it.

    python bench/plan_speed.py [--runs 9]

Times both the printed plan (what a user reads) and `--json`, recipes interleaved so that a burst of load
on the machine spreads over all of them. Prints the median and worst wall seconds per recipe and output;
the target is a median under 0.3 s cold. The worst single run is printed beside it: on a shared machine it
measures the scheduler as much as dapc.

dapc's modules are byte-compiled first, as `pip install` does for an installed package: an editable checkout
under PYTHONDONTWRITEBYTECODE (this sandbox sets it) otherwise compiles every module from source on every
run. The bare interpreter's start (`python -c pass`, with this machine's site-packages) is printed for scale.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 0.3
OUTPUTS = {"printed": [], "json": ["--json"]}


def _cold_seconds(recipe: Path, extra: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dapc", "plan", str(recipe), *extra], cwd=REPO,
                          capture_output=True, env={**os.environ, "COLUMNS": "120"})
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 3):  # 3: planned, and nothing fits: still a plan, and timed
        raise SystemExit(done.stderr.decode())
    return seconds


def _interpreter_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    compileall.compile_dir(REPO / "dapc", quiet=1)
    interpreter = statistics.median(_interpreter_seconds() for _ in range(args.runs))
    recipes = sorted((REPO / "recipes").glob("*.yaml")) + [REPO / "examples" / "tiny" / "recipe.yaml"]
    times: dict[tuple[Path, str], list[float]] = {(r, o): [] for r in recipes for o in OUTPUTS}
    for _ in range(args.runs):
        for (recipe, output), seconds in times.items():
            seconds.append(_cold_seconds(recipe, OUTPUTS[output]))
    print(f"{'recipe':55} {'output':8} {'median s':>9} {'worst s':>8}")
    worst_median = 0.0
    for (recipe, output), seconds in times.items():
        median = statistics.median(seconds)
        worst_median = max(worst_median, median)
        print(f"{recipe.relative_to(REPO).as_posix():55} {output:8} {median:9.3f} {max(seconds):8.3f}")
    print(f"bare interpreter start (python -c pass): median {interpreter:.3f} s")
    verdict = "under" if worst_median < TARGET_SECONDS else "OVER"
    print(f"slowest median {worst_median:.3f} s: {verdict} the {TARGET_SECONDS} s target "
          f"(load average {os.getloadavg()[0]:.2f})")
    return 0 if worst_median < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
