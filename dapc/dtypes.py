"""The dtype names a recipe uses, and what each is in torch and in bytes: one table for compiler and runtime."""

from __future__ import annotations

from typing import Literal

Precision = Literal["bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = Precision.__args__  # type: ignore[attr-defined]
# torch.<name> of each recipe dtype; the runtime maps these names to torch dtypes, the compiler writes them.
TORCH_DTYPE_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
