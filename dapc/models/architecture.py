"""Architecture facts of a Llama-like decoder, read from a Hugging Face `config.json`.

A source is a file or folder on disk, a name in the bundled catalog (`catalog/<org>--<name>.json`,
public configs copied without weights), or a model id in the local Hugging Face cache. Nothing is
downloaded and neither torch nor transformers is imported. (A source that is another run's export,
planned but not trained yet, is `dapc.models.source`'s: its config comes from that run's plan.json.)
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dapc.errors import DapcError, ModelNotFoundError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

CONFIG_FILENAME = "config.json"
ADAPTER_DIR = "adapter"  # where dapc's export puts LoRA adapters (runtime/export.py)
ADAPTER_CONFIG_FILENAME = "adapter_config.json"  # peft's
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ConfigKind = Literal["catalog", "folder", "hf-cache"]


class ModelConfigError(DapcError):
    """A config.json that does not parse, lacks a field, or describes an unsupported architecture."""


@dataclass(frozen=True)
class Architecture:
    """The shapes of a decoder-only transformer with RMSNorm, rotary attention (GQA) and a SwiGLU MLP.

    Sizes are element counts; `head_dim` is per attention head. `qkv_bias`, `o_bias` and `mlp_bias`
    say which projections carry a bias (Qwen2: q, k and v only). `config_path` is the file read.
    """

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_position_embeddings: int
    torch_dtype: str
    config_path: str


@dataclass(frozen=True)
class FoundConfig:
    """A config.json that a source names: where it was found (`kind`), the model's name, the file."""

    kind: ConfigKind
    name: str
    path: Path | Traversable


def catalog_names() -> list[str]:
    """Return the Hugging Face ids of the bundled configs (`org/name`), sorted case-insensitively."""
    return sorted(_catalog(), key=str.lower)


def load_architecture(source: str, base_dir: Path | None = None) -> Architecture:
    """Return the architecture named by `source` (see `find_config` for where it is looked up, offline).

    Raises `ModelNotFoundError` (listing what was tried, with a "did you mean") when none matches,
    and `ModelConfigError` (naming the file and the field) when the config is unusable.
    """
    found = find_config(source, base_dir)
    return architecture_of_config(found.name, read_config(found.path), str(found.path))


def find_config(source: str, base_dir: Path | None = None) -> FoundConfig:
    """Return the config.json that `source` names, looked up in this order, offline:

    1. a config.json file, or a folder holding one (a relative path resolves against `base_dir`,
       else the working directory);
    2. a catalog name, matched case-insensitively (see `catalog_names()`);
    3. an `org/name` id in the Hugging Face cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, or
       `~/.cache/huggingface/hub`), reading `models--org--name/snapshots/<revision>/config.json`.

    A folder holding only LoRA adapters (dapc's export of LoRA without `checkpoint.merge_lora`) is
    refused: it has no full model to plan. Raises `ModelNotFoundError` when nothing matches.
    """
    tried: list[str] = []
    local = local_path(source, base_dir)
    if local.is_dir():
        if not (local / CONFIG_FILENAME).is_file():
            adapter = next((a for a in (local / ADAPTER_DIR / ADAPTER_CONFIG_FILENAME, local / ADAPTER_CONFIG_FILENAME)
                            if a.is_file()), None)
            if adapter is not None:
                raise ModelNotFoundError(adapters_only_message(f"folder {local.resolve()} holds only LoRA adapters "
                                                               f"({adapter.relative_to(local)}, no {CONFIG_FILENAME})"))
            raise ModelNotFoundError(f"folder {local} has no {CONFIG_FILENAME}")
        return FoundConfig("folder", source, local / CONFIG_FILENAME)
    if local.is_file():
        return FoundConfig("folder", source, local)
    tried.append(f"no file or folder at {local.absolute()}")

    catalog = _catalog()
    by_lower = {name.lower(): name for name in catalog}
    if source.lower() in by_lower:
        name = by_lower[source.lower()]
        return FoundConfig("catalog", name, catalog[name])
    tried.append(f"not among the {len(catalog)} catalog names")

    cached = _cached_config(source, tried)
    if cached is not None:
        return FoundConfig("hf-cache", source, cached)
    raise ModelNotFoundError(f"model {source!r} not found: {'; '.join(tried)}. {_suggestion(source, catalog)}")


def local_path(source: str, base_dir: Path | None = None) -> Path:
    """The file or folder `source` names if it is a path: against `base_dir` when relative (and given)."""
    local = Path(source).expanduser()
    return base_dir / local if not local.is_absolute() and base_dir is not None else local


def adapters_only_message(what: str) -> str:
    """Why a source that is (or will be) LoRA adapters alone cannot be planned, and what to change."""
    return f"{what}; set checkpoint.merge_lora: true in the recipe that produced it, so its export holds the full model"


def _catalog() -> dict[str, Traversable]:
    folder = resources.files(__package__).joinpath("catalog")
    return {
        entry.name.removesuffix(".json").replace("--", "/", 1): entry
        for entry in folder.iterdir()
        if entry.name.endswith(".json")
    }


def _suggestion(source: str, catalog: dict[str, Traversable]) -> str:
    """'Did you mean ...?' over full ids and their name parts, else the whole catalog."""
    keys: dict[str, str] = {}
    for name in sorted(catalog, key=str.lower):
        keys.setdefault(name.lower(), name)
        keys.setdefault(name.split("/", 1)[-1].lower(), name)
    close = difflib.get_close_matches(source.lower(), keys, n=3, cutoff=0.6)
    matches = list(dict.fromkeys(keys[key] for key in close))
    if matches:
        quoted = [repr(name) for name in matches]
        return f"Did you mean {' or '.join(filter(None, [', '.join(quoted[:-1]), quoted[-1]]))}?"
    return "Catalog names: " + ", ".join(sorted(catalog, key=str.lower)) + "."


def _hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads, by its own precedence of environment variables."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg_cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return xdg_cache / "huggingface" / "hub"


def _cached_config(source: str, tried: list[str]) -> Path | None:
    """The cached config.json of `org/name`: the `refs/main` revision, else the newest snapshot."""
    parts = source.split("/")
    if len(parts) != 2 or not all(parts):
        tried.append("not an org/name id, so not looked up in the Hugging Face cache")
        return None
    repo = _hub_cache_dir() / f"models--{parts[0]}--{parts[1]}"
    main_ref = repo / "refs" / "main"
    if main_ref.is_file():
        pinned = repo / "snapshots" / main_ref.read_text().strip() / CONFIG_FILENAME
        if pinned.is_file():
            return pinned
    snapshots = sorted(repo.glob(f"snapshots/*/{CONFIG_FILENAME}"), key=lambda p: p.stat().st_mtime)
    if snapshots:
        return snapshots[-1]
    tried.append(f"no {CONFIG_FILENAME} under the Hugging Face cache entry {repo}")
    return None


def architecture_of_config(name: str, config: dict[str, Any], path: str) -> Architecture:
    """Return the architecture of an HF config already read (from `path`, which errors name and which
    becomes `config_path`: a config.json, or a plan.json whose `model.config` it is)."""
    fields = _Fields(config, path)
    model_type = fields.text("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(decoders with RMSNorm, rotary GQA attention and a SwiGLU MLP)",
            path,
        )
    hidden_size = fields.positive_int("hidden_size")
    num_attention_heads = fields.positive_int("num_attention_heads")
    num_key_value_heads = fields.positive_int("num_key_value_heads", default=num_attention_heads)
    if num_attention_heads % num_key_value_heads:
        raise ModelConfigError(
            f"num_attention_heads {num_attention_heads} is not a multiple of "
            f"num_key_value_heads {num_key_value_heads}",
            path,
        )
    qkv_bias, o_bias, mlp_bias = _biases(model_type, fields)
    return Architecture(
        name=name,
        model_type=model_type,
        vocab_size=fields.positive_int("vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=fields.positive_int("intermediate_size"),
        num_layers=fields.positive_int("num_hidden_layers"),
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=fields.positive_int("head_dim", default=hidden_size // num_attention_heads),
        tie_word_embeddings=fields.flag("tie_word_embeddings"),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        max_position_embeddings=fields.positive_int("max_position_embeddings"),
        torch_dtype=fields.text("torch_dtype", default=fields.text("dtype", default="float32")),
        config_path=path,
    )


def _biases(model_type: str, fields: _Fields) -> tuple[bool, bool, bool]:
    """(qkv, o, mlp) bias, as transformers' modeling_<model_type>.py builds the projections."""
    if model_type == "llama":
        attention_bias = fields.flag("attention_bias")
        return attention_bias, attention_bias, fields.flag("mlp_bias")
    if model_type == "qwen2":
        return True, False, False
    return False, False, False


def read_config(path: Path | Traversable) -> dict[str, Any]:
    """Return the JSON object in the config.json at `path`; `ModelConfigError`, naming the file, otherwise."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ModelConfigError(f"cannot read: {error.strerror or error}", str(path)) from error
    except UnicodeDecodeError as error:
        raise ModelConfigError("not UTF-8 text", str(path)) from error
    except json.JSONDecodeError as error:
        raise ModelConfigError(f"not valid JSON: {error.msg}", f"{path}:{error.lineno}:{error.colno}") from error
    if not isinstance(config, dict):
        raise ModelConfigError(f"expected a JSON object, got {type(config).__name__}", str(path))
    return config


_MISSING = object()


class _Fields:
    """Typed reads of config.json fields; each error names the file and the field."""

    def __init__(self, config: dict[str, Any], location: str):
        self._config = config
        self._location = location

    def _get(self, field: str, default: Any) -> Any:
        value = self._config.get(field)
        if value is not None:
            return value
        if default is _MISSING:
            raise ModelConfigError(f"field {field!r} is missing", self._location)
        return default

    def positive_int(self, field: str, default: Any = _MISSING) -> int:
        value = self._get(field, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelConfigError(f"field {field!r} must be a positive integer, got {value!r}", self._location)
        return value

    def flag(self, field: str) -> bool:
        value = self._get(field, False)
        if not isinstance(value, bool):
            raise ModelConfigError(f"field {field!r} must be true or false, got {value!r}", self._location)
        return value

    def text(self, field: str, default: Any = _MISSING) -> str:
        value = self._get(field, default)
        if not isinstance(value, str) or not value:
            raise ModelConfigError(f"field {field!r} must be a non-empty string, got {value!r}", self._location)
        return value
