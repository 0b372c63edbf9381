"""Architecture facts and exact parameter counts of Llama-like decoders; imports neither torch nor transformers."""

from dapc.models.architecture import (
    SUPPORTED_MODEL_TYPES,
    Architecture,
    ModelConfigError,
    catalog_names,
    load_architecture,
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
    "ModelConfigError",
    "ParamCounts",
    "catalog_names",
    "count_params",
    "decoder_linear_shapes",
    "load_architecture",
    "lora_trainable_params",
]
