"""Which model directories an evaluation loads, and the names its columns take: `--model [NAME=]DIR` read,
and every directory checked before the first model loads. Imports neither torch nor transformers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dapc.errors import DapcError

CONFIG_FILE = "config.json"
# Where dapc's export of LoRA without checkpoint.merge_lora puts the adapters (runtime/export.py), and
# the file PEFT writes beside them.
_ADAPTER_CONFIGS = ("adapter/adapter_config.json", "adapter_config.json")


def model_dir(path: str | Path) -> Path:
    """`path` resolved, when it is a Hugging Face model directory (holds config.json); else a DapcError
    located at `path` saying what is there instead."""
    directory = Path(path)
    if not directory.exists():
        raise DapcError("model directory not found", str(path))
    if not directory.is_dir():
        raise DapcError("is a file, not a model directory", str(path))
    if not (directory / CONFIG_FILE).is_file():
        adapter = next((name for name in _ADAPTER_CONFIGS if (directory / name).is_file()), None)
        if adapter is not None:
            raise DapcError(
                f"holds only LoRA adapters ({adapter}, no {CONFIG_FILE}): set checkpoint.merge_lora: true in the "
                "recipe that trained it, so that its export holds the full model",
                str(path),
            )
        raise DapcError(
            f"no {CONFIG_FILE}: not a Hugging Face model directory (a LoRA export holding only adapters needs "
            "checkpoint.merge_lora: true)",
            str(path),
        )
    return directory.resolve()


def parse_model(value: str) -> tuple[str | None, str]:
    """`--model` as (NAME, DIR) for `NAME=DIR`, or (None, DIR) for a plain DIR; a value that names an
    existing path is a plain DIR even when it holds "=". Raises ValueError for an empty NAME or DIR."""
    name, sep, path = value.partition("=")
    if not sep or Path(value).exists():
        return None, value
    if not name or not path:
        raise ValueError(f"expected DIR or NAME=DIR, got {value!r}")
    return name, path


def named_models(models: Sequence[tuple[str | None, str]], compare_to: str | None = None) -> dict[str, Path]:
    """Column name -> resolved model directory, in order: `compare_to` first when given, then `models`
    ((NAME or None, DIR) as `parse_model` reads them). A model without a NAME is named by its DIR as given.
    Raises DapcError for a directory that is not a model (see `model_dir`) or a name given twice."""
    paths: dict[str, str] = {}
    first = [(None, compare_to)] if compare_to is not None else []
    for name, path in [*first, *models]:
        key = path if name is None else name
        if key in paths:
            raise DapcError(
                f"two models are named {key!r} ({paths[key]} and {path}): name the columns apart with --model NAME=DIR"
            )
        paths[key] = path
    return {key: model_dir(path) for key, path in paths.items()}
