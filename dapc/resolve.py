"""Recipe → Spec: look up the model's architecture, the device, the corpus size, and make every path absolute."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapc.corpus import CorpusError, CorpusFile, count_records, resolve_corpus
from dapc.errors import DapcError, RecipeError
from dapc.hardware import Device, resolve_device
from dapc.lock import MISTRAL_COMMON_PREFIX
from dapc.models import Architecture, ParamCounts, count_params, lora_trainable_params
from dapc.models.source import ModelSource, resolve_model_source
from dapc.recipe import LoadedRecipe, Recipe
from dapc.recipe.schema import PREFERENCE_OBJECTIVES, RECORD_FORMATS
from dapc.sources import SINGLE_SOURCE_NAME, SourceFiles

MISTRAL_COMMON_TOKENIZER = MISTRAL_COMMON_PREFIX + "v1"
DEFAULT_GLOBAL_BATCH_TOKENS = 4 * 1024 * 1024


@dataclass(frozen=True)
class Spec:
    """A recipe with everything looked up: the planner's whole input."""

    recipe: Recipe  # paths absolute, tokenizer and prepared_dir filled in
    arch: Architecture
    model_config: dict[str, Any]
    model_source: ModelSource  # where the config came from: catalog, folder, hf-cache or export-of-plan
    params: ParamCounts
    trainable_params: int
    device: Device
    world_size: int
    corpus: tuple[CorpusFile, ...]  # every source's files, each once
    sources: tuple[SourceFiles, ...]
    global_batch_sequences: int
    global_batch_sequences_origin: str
    warnings: tuple[str, ...] = ()

    @property
    def corpus_bytes(self) -> int:
        """Bytes of all corpus files."""
        return sum(f.bytes for f in self.corpus)

    @property
    def corpus_files(self) -> int:
        """How many corpus files."""
        return len(self.corpus)


def _relocate(error: DapcError, where: str) -> DapcError:
    if error.location is None:
        error.location = where
    return error


def _absolute(loaded: LoadedRecipe, text: str, *key_path: Any) -> str:
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else (loaded.origin_dir(*key_path) / path).resolve())


def _corpus(data_paths: list[str], fmt: str, loaded: LoadedRecipe, *key: object) -> tuple[CorpusFile, ...]:
    try:
        return tuple(resolve_corpus(data_paths, fmt))
    except CorpusError as e:
        where = loaded.locate(*key, e.entry_index) if e.entry_index is not None else loaded.locate(*key)
        raise RecipeError(e.message, where) from e


def _sources(recipe: Recipe, loaded: LoadedRecipe) -> tuple[tuple[SourceFiles, ...], dict]:
    """Returns the corpus's sources with their files resolved, and the recipe's `data` updates (absolute paths)."""
    d = recipe.data

    def files(entries: list[str], fmt: str, *key: object) -> tuple[list[str], tuple[CorpusFile, ...]]:
        absolute = [_absolute(loaded, p, *key, i) for i, p in enumerate(entries)]
        return absolute, _corpus(absolute, fmt, loaded, *key)

    def field(fmt: str, own: str | None) -> str | None:
        return None if fmt == "text" or fmt in RECORD_FORMATS else own or d.text_field

    if d.paths:
        paths, found = files(d.paths, d.format, "data", "paths")
        return (SourceFiles(SINGLE_SOURCE_NAME, "domain", d.format, field(d.format, None), found, weight=1.0,
                            where=("data", "paths")),), {"paths": paths}
    sources, updated = [], []
    for index, src in enumerate(d.sources):
        fmt = src.format or d.format
        paths, found = files(src.paths, fmt, "data", "sources", index, "paths")
        sources.append(SourceFiles(src.name, "domain", fmt, field(fmt, src.text_field), found, weight=src.weight,
                                   tokens=src.tokens, epochs=src.epochs, where=("data", "sources", index)))
        updated.append(src.model_copy(update={"paths": paths}))
    update: dict = {"sources": updated}
    if d.replay is not None:
        fmt = d.replay.format or d.format
        paths, found = files(d.replay.paths, fmt, "data", "replay", "paths")
        sources.append(SourceFiles(d.replay.name, "replay", fmt, field(fmt, d.replay.text_field), found,
                                   share=d.replay.share, where=("data", "replay")))
        update["replay"] = d.replay.model_copy(update={"paths": paths})
    return tuple(sources), update


def _global_batch_sequences(recipe: Recipe, loaded: LoadedRecipe, world_size: int) -> tuple[int, str]:
    training = recipe.training
    pair = training.objective in PREFERENCE_OBJECTIVES  # a preference pair is two sequences
    seq_len = recipe.data.seq_len * (2 if pair else 1)
    per = "2·data.seq_len (a pair)" if pair else "data.seq_len"
    if training.global_batch_sequences is not None:
        return training.global_batch_sequences, "recipe: training.global_batch_sequences"
    if training.global_batch_tokens is not None:
        if training.global_batch_tokens % seq_len:
            raise RecipeError(
                f"global_batch_tokens {training.global_batch_tokens:,} is not a multiple of {per} {seq_len} "
                f"({training.global_batch_tokens:,} / {seq_len} = {training.global_batch_tokens / seq_len:.2f})",
                loaded.locate("training", "global_batch_tokens"),
            )
        return training.global_batch_tokens // seq_len, f"recipe: training.global_batch_tokens / {per}"
    per_gpu = max(1, DEFAULT_GLOBAL_BATCH_TOKENS // seq_len // world_size)
    return per_gpu * world_size, (
        f"default: about {DEFAULT_GLOBAL_BATCH_TOKENS:,} tokens per step, rounded to a multiple of {world_size} GPUs"
    )


def _corpus_short_of_a_step(recipe: Recipe, corpus: tuple[CorpusFile, ...], global_batch_sequences: int) -> str | None:
    """Says how the corpus falls short when its training split (estimated from its bytes; preference pairs
    counted, a JSONL line each) holds fewer sequences (pairs) than one optimizer step takes, the least the runtime
    trains on; None when it fills one."""
    d = recipe.data
    corpus_bytes = sum(f.bytes for f in corpus)
    if d.format == "preference":
        pairs = int(count_records(corpus) * (1 - d.validation_fraction))
        if pairs >= global_batch_sequences:
            return None
        return (f"the {pairs:,} training preference pairs (JSONL lines, less the {d.validation_fraction:g} validation "
                f"share) cannot fill one optimizer step of {global_batch_sequences:,} pairs")
    sequences = int(corpus_bytes * d.tokens_per_byte * (1 - d.validation_fraction)) // d.seq_len
    if sequences >= global_batch_sequences:
        return None
    return (f"the corpus ({corpus_bytes:,} bytes ≈ {sequences:,} training sequences of {d.seq_len:,} tokens at "
            f"{d.tokens_per_byte:g} tokens/byte, less the {d.validation_fraction:g} validation share) cannot fill "
            f"one optimizer step of {global_batch_sequences:,} sequences")


def resolve(loaded: LoadedRecipe, output_override: str | None = None) -> Spec:
    """Returns the Spec of a loaded recipe. Raises DapcError, located in the recipe, for what cannot be found."""
    recipe = loaded.recipe
    try:
        model = resolve_model_source(recipe.model.source, loaded.origin_dir("model", "source"), recipe.model.init)
    except DapcError as e:
        raise _relocate(e, loaded.locate("model", "source")) from e
    arch, model_config = model.arch, model.config
    hw = recipe.hardware
    try:
        device = resolve_device(hw.gpu, hw.gpu_memory_gib, hw.gpu_bf16_tflops, hw.gpu_memory_bandwidth_gbps,
                                hw.gpu_tdp_watts, hw.intra_node_gbps)
    except DapcError as e:
        raise _relocate(e, loaded.locate("hardware", "gpu")) from e
    world_size = hw.nodes * hw.gpus_per_node

    sources, data_update = _sources(recipe, loaded)
    corpus = tuple({f.path: f for s in sources for f in s.files}.values())
    tokenizer = recipe.data.tokenizer
    if tokenizer is None:  # the model's own: its folder, its name, or the tokenizer of the run that exports it
        tokenizer = model.tokenizer
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
            "model": recipe.model.model_copy(update={"source": model.source}),
            "data": recipe.data.model_copy(update={**data_update, "tokenizer": tokenizer, "prepared_dir": prepared}),
            "eval": recipe.eval.model_copy(update={"benchmarks": benchmarks, "general_text": general}),
            "output": output,
        }
    )
    params = count_params(arch)
    if recipe.method.name == "full":
        trainable = params.total
    else:
        trainable = lora_trainable_params(arch, recipe.method.lora.r, list(recipe.method.lora.target_modules))
    warnings = [f"{loaded.locate('model', 'source')}: {model.warning}"] if model.warning else []
    if recipe.data.seq_len > arch.max_position_embeddings:
        # People do train past it (RoPE scaling in the model config, or plainly longer): plan it, say so.
        scaling = model_config.get("rope_scaling")
        how = f"the config's rope_scaling {json.dumps(scaling, sort_keys=True)}" if scaling else "no rope_scaling in its config"
        warnings.append(f"{loaded.locate('data', 'seq_len')}: seq_len {recipe.data.seq_len:,} exceeds the model's "
                        f"max_position_embeddings {arch.max_position_embeddings:,} ({how}); quality past it is "
                        "the recipe's responsibility")
    sequences, origin = _global_batch_sequences(recipe, loaded, world_size)
    corpus_key = "paths" if recipe.data.paths else "sources"
    if len(sources) == 1:
        try:
            short = _corpus_short_of_a_step(recipe, corpus, sequences)
        except CorpusError as e:
            raise DapcError(e.message, loaded.locate("data", corpus_key)) from e
        if short and recipe.training.tokens is None:
            raise DapcError(f"{short}; add data, or lower the global batch (training.global_batch_sequences) or "
                            "data.seq_len", loaded.locate("data", corpus_key))
        if short:  # an explicit token budget: the plan sizes the run, but training needs a larger corpus
            warnings.append(f"{loaded.locate('data', corpus_key)}: {short}; the plan sizes training.tokens "
                            f"{recipe.training.tokens:,}, but the runtime will not train until the corpus fills a step")
    else:  # a mixture draws whole sequences from each source, epoch after epoch: each needs one
        d = recipe.data
        for source in sources:
            held = int(source.bytes * d.tokens_per_byte * (1 - d.validation_fraction)) // d.seq_len
            if held < 1:
                warnings.append(f"{loaded.locate(*source.where)}: source {source.name} ({source.bytes:,} bytes) "
                                f"holds about {held} training sequences of {d.seq_len:,} tokens; the runtime needs "
                                "at least one from every source")
    return Spec(
        recipe=resolved,
        arch=arch,
        model_config=model_config,
        model_source=model.provenance,
        params=params,
        trainable_params=trainable,
        device=device,
        world_size=world_size,
        corpus=corpus,
        sources=sources,
        global_batch_sequences=sequences,
        global_batch_sequences_origin=origin,
        warnings=tuple(warnings),
    )
