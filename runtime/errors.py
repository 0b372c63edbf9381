"""The runtime entry points' one error printer: a DapcError becomes one `error:` line on stderr and its exit code."""

from __future__ import annotations

import sys

from dapc.errors import DapcError


def print_error(error: DapcError) -> int:
    """Prints `error` as one line (`error: location: message`, newlines folded) and returns its exit code (2)."""
    text = " ".join(str(error).split("\n"))
    try:
        print(f"error: {text}", file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr closed or full: the exit code still says it
    return error.exit_code
