"""The benchmarks by name, and reading their files before any model or response is scored."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dapc.errors import DapcError
from runtime.evaluate import cti_mcq, cybermetric, seceval
from runtime.evaluate.common import Benchmark, Question

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (cti_mcq.BENCHMARK, cybermetric.BENCHMARK, seceval.BENCHMARK)}


def load_benchmarks(files: Mapping[str, str | Path]) -> dict[str, tuple[Benchmark, list[Question]]]:
    """Each named benchmark with its questions, in the order given; a DapcError for an unknown name
    or a bad file, raised before anything is scored so a bad file fails fast."""
    loaded = {}
    for name, path in files.items():
        if name not in BENCHMARKS:
            raise DapcError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        loaded[name] = (BENCHMARKS[name], BENCHMARKS[name].load(Path(path)))
    return loaded
