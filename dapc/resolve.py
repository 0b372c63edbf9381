"""Recipe → Spec: look up the model's architecture, the device, the corpus size, and make every path absolute."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapc.errors import DapcError, RecipeError
from dapc.hardware import Device, resolve_device
from dapc.models import Architecture, ParamCounts, count_params, load_architecture, lora_trainable_params
from dapc.recipe import LoadedRecipe, Recipe

MISTRAL_COMMON_TOKENIZER = "mistral-common:v1"
DEFAULT_GLOBAL_BATCH_TOKENS = 4 * 1024 * 1024


@dataclass(frozen=True)
class Spec:
    """A recipe with everything looked up: the planner's whole input."""

    recipe: Recipe  # paths absolute, tokenizer and prepared_dir filled in
    arch: Architecture
    model_config: dict[str, Any]
    params: ParamCounts
    trainable_params: int
    device: Device
    world_size: int
    corpus_files: int
    corpus_bytes: int
    global_batch_sequences: int
    global_batch_sequences_origin: str


def _relocate(error: DapcError, where: str) -> DapcError:
    if error.location is None:
        error.location = where
    return error


def _absolute(loaded: LoadedRecipe, text: str, *key_path: Any) -> str:
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else (loaded.origin_dir(*key_path) / path).resolve())


def expand_corpus(patterns: list[str], loaded: LoadedRecipe) -> list[Path]:
    """Returns the corpus files the (absolute) `patterns` name: files, directories walked, globs expanded."""
    files: list[Path] = []
    for index, pattern in enumerate(patterns):
        path = Path(pattern)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            raise RecipeError(f"corpus path {pattern} matches no file", loaded.locate("data", "paths", index))
        files.extend(matches)
    return files


def _global_batch_sequences(recipe: Recipe, loaded: LoadedRecipe, world_size: int) -> tuple[int, str]:
    training, seq_len = recipe.training, recipe.data.seq_len
    if training.global_batch_sequences is not None:
        return training.global_batch_sequences, "recipe: training.global_batch_sequences"
    if training.global_batch_tokens is not None:
        if training.global_batch_tokens % seq_len:
            raise RecipeError(
                f"global_batch_tokens {training.global_batch_tokens:,} is not a multiple of seq_len {seq_len} "
                f"({training.global_batch_tokens:,} / {seq_len} = {training.global_batch_tokens / seq_len:.2f})",
                loaded.locate("training", "global_batch_tokens"),
            )
        return training.global_batch_tokens // seq_len, "recipe: training.global_batch_tokens / data.seq_len"
    per_gpu = max(1, DEFAULT_GLOBAL_BATCH_TOKENS // seq_len // world_size)
    return per_gpu * world_size, (
        f"default: about {DEFAULT_GLOBAL_BATCH_TOKENS:,} tokens per step, rounded to a multiple of {world_size} GPUs"
    )


def resolve(loaded: LoadedRecipe, output_override: str | None = None) -> Spec:
    """Returns the Spec of a loaded recipe. Raises DapcError, located in the recipe, for what cannot be found."""
    recipe = loaded.recipe
    source = recipe.model.source
    source_path = loaded.origin_dir("model", "source") / Path(source).expanduser()
    try:
        arch = load_architecture(source, base_dir=loaded.origin_dir("model", "source"))
    except DapcError as e:
        raise _relocate(e, loaded.locate("model", "source")) from e
    model_config = json.loads(Path(arch.config_path).read_text(encoding="utf-8"))
    model_config = {k: v for k, v in model_config.items() if not k.startswith("_")}
    hw = recipe.hardware
    try:
        device = resolve_device(hw.gpu, hw.gpu_memory_gib, hw.gpu_bf16_tflops, hw.gpu_memory_bandwidth_gbps,
                                hw.gpu_tdp_watts, hw.intra_node_gbps)
    except DapcError as e:
        raise _relocate(e, loaded.locate("hardware", "gpu")) from e
    world_size = hw.nodes * hw.gpus_per_node

    data_paths = [_absolute(loaded, p, "data", "paths", i) for i, p in enumerate(recipe.data.paths)]
    files = expand_corpus(data_paths, loaded)
    tokenizer = recipe.data.tokenizer
    if tokenizer is None:
        tokenizer = str(source_path.resolve()) if source_path.exists() else source
    elif tokenizer != MISTRAL_COMMON_TOKENIZER and (loaded.origin_dir("data", "tokenizer") / tokenizer).exists():
        tokenizer = _absolute(loaded, tokenizer, "data", "tokenizer")
    output = output_override if output_override is not None else _absolute(loaded, recipe.output, "output")
    output = str(Path(output).resolve())
    prepared = recipe.data.prepared_dir
    prepared = _absolute(loaded, prepared, "data", "prepared_dir") if prepared else str(Path(output) / "data")
    benchmarks = []
    for index, bench in enumerate(recipe.eval.benchmarks):
        path = _absolute(loaded, bench.path, "eval", "benchmarks", index, "path")
        benchmarks.append(bench.model_copy(update={"path": path}))
    general = [_absolute(loaded, p, "eval", "general_text", i) for i, p in enumerate(recipe.eval.general_text)]
    resolved = recipe.model_copy(
        update={
            "model": recipe.model.model_copy(
                update={"source": str(source_path.resolve()) if source_path.exists() else source}
            ),
            "data": recipe.data.model_copy(update={"paths": data_paths, "tokenizer": tokenizer, "prepared_dir": prepared}),
            "eval": recipe.eval.model_copy(update={"benchmarks": benchmarks, "general_text": general}),
            "output": output,
        }
    )
    params = count_params(arch)
    if recipe.method.name == "full":
        trainable = params.total
    else:
        trainable = lora_trainable_params(arch, recipe.method.lora.r, list(recipe.method.lora.target_modules))
    if recipe.data.seq_len > arch.max_position_embeddings:
        raise RecipeError(
            f"seq_len {recipe.data.seq_len:,} exceeds the model's max_position_embeddings "
            f"{arch.max_position_embeddings:,}",
            loaded.locate("data", "seq_len"),
        )
    sequences, origin = _global_batch_sequences(recipe, loaded, world_size)
    return Spec(
        recipe=resolved,
        arch=arch,
        model_config=model_config,
        params=params,
        trainable_params=trainable,
        device=device,
        world_size=world_size,
        corpus_files=len(files),
        corpus_bytes=sum(f.stat().st_size for f in files),
        global_batch_sequences=sequences,
        global_batch_sequences_origin=origin,
    )
