"""The worker processes: started before the tokenizer loads, so that each stays the size of its caller.

Why early: loading and checking the tokenizer imports transformers and torch (~260 MiB) in the main process.
A worker forked after that holds all of it, and counts it in its RSS, though it encodes with the Rust backend
alone (`encode.TokenizerSource`); forked before, it is ~100 MiB and hashes the input files while the main
process loads the tokenizer. Each task carries its settings (a few hundred bytes pickled), so a worker needs
nothing at start and builds its encoder on its first unit.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator


class Workers:
    """Ordered maps over `count` processes, or over this process when `count` is 1."""

    def __init__(self, count: int):
        self.count = count
        self._pool = None
        if count > 1:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = multiprocessing.get_context(method).Pool(count, _single_threaded)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def start(self, fn: Callable, items: Iterable) -> Callable[[], list]:
        """Starts fn over every item now; returns a call that waits for the results, in order."""
        if self._pool is None:
            return lambda: [fn(item) for item in items]
        running = self._pool.map_async(fn, items, chunksize=1)
        return running.get

    def ordered(self, fn: Callable, items: Iterable, *args) -> Iterator:
        """Yields fn(item, *args) in item order, with at most 2 × count items in flight (bounded memory)."""
        if self._pool is None:
            yield from (fn(item, *args) for item in items)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self._pool.apply_async(fn, (item, *args)))
            if len(pending) >= 2 * self.count:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _single_threaded() -> None:
    """Pool workers encode single-threaded: the pool is the parallelism."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
