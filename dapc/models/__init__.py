"""Architecture facts and exact parameter counts of Llama-like decoders; imports neither torch nor transformers."""

from dapc.models.architecture import (
    SUPPORTED_MODEL_TYPES,
    Architecture,
    ConfigKind,
    FoundConfig,
    ModelConfigError,
    adapters_only_message,
    architecture_of_config,
    catalog_names,
    find_config,
    load_architecture,
    local_path,
    read_config,
)
from dapc.models.params import (
    LINEAR_MODULES,
    ParamCounts,
    count_params,
    decoder_linear_shapes,
    lora_trainable_params,
)

__all__ = [
    "LINEAR_MODULES",
    "SUPPORTED_MODEL_TYPES",
    "Architecture",
    "ConfigKind",
    "FoundConfig",
    "ModelConfigError",
    "ParamCounts",
    "adapters_only_message",
    "architecture_of_config",
    "catalog_names",
    "count_params",
    "decoder_linear_shapes",
    "find_config",
    "load_architecture",
    "local_path",
    "lora_trainable_params",
    "read_config",
]
