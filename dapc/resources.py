"""Where the bundled templates and recipes live: inside the wheel (`dapc/_data`) or beside a source checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Returns the directory of bundled `name` files (`templates` or `recipes`)."""
    for candidate in (_PACKAGE_DIR / "_data" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"dapc installation is missing its {name}/ directory (looked in {_PACKAGE_DIR})")
