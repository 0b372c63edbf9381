"""Errors a user can act on. The CLI prints them on one line, without a traceback, and exits 2."""

from __future__ import annotations


class DapcError(Exception):
    """Bad input: a recipe, a file or a flag. `location` is `file:line:col` (or just `file`) when known."""

    exit_code = 2

    def __init__(self, message: str, location: str | None = None):
        super().__init__(message)
        self.message = message
        self.location = location

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class RecipeError(DapcError):
    """A recipe that does not parse or does not validate."""


class ModelNotFoundError(DapcError):
    """A model source that names neither a catalog entry, a config.json, nor an HF cache entry."""


class HardwareError(DapcError):
    """A GPU type that is not in the catalog, or hardware that cannot exist."""
