"""Exact parameter counts of a Llama-like decoder, per tensor group, from its architecture alone.

Each count is a number of elements (parameters), not bytes. The layout is transformers'
`LlamaForCausalLM` (and its Mistral and Qwen2 siblings): per layer q/k/v/o projections, a SwiGLU MLP
(gate, up, down) and two RMSNorm weights; then a final RMSNorm and the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

from dapc.errors import DapcError
from dapc.models.architecture import Architecture

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (elements) by group; biases count with their layer.

    `attention`, `mlp` and `norms` sum over all layers (`norms` includes the final RMSNorm).
    With tied embeddings the shared matrix counts once, in `embedding`: `lm_head` is 0 and `tied`
    is true. `experts` is 0: the supported decoders are dense (MoE configs are refused at load).
    `per_layer` is one decoder layer's parameters. `largest_layer` is the most parameters held
    directly by one module (weight plus bias), DeepSpeed's `largest_layer_params`.
    """

    embedding: int
    attention: int
    mlp: int
    norms: int
    lm_head: int
    experts: int
    tied: bool
    per_layer: int
    largest_layer: int

    @property
    def total(self) -> int:
        """All parameters of the model, in elements, each shared tensor once."""
        return self.embedding + self.attention + self.mlp + self.norms + self.lm_head + self.experts


def decoder_linear_shapes(arch: Architecture) -> dict[str, tuple[int, int]]:
    """Return (in_features, out_features) of each Linear in one decoder layer, by module name."""
    q_features = arch.num_attention_heads * arch.head_dim
    kv_features = arch.num_key_value_heads * arch.head_dim
    return {
        "q_proj": (arch.hidden_size, q_features),
        "k_proj": (arch.hidden_size, kv_features),
        "v_proj": (arch.hidden_size, kv_features),
        "o_proj": (q_features, arch.hidden_size),
        "gate_proj": (arch.hidden_size, arch.intermediate_size),
        "up_proj": (arch.hidden_size, arch.intermediate_size),
        "down_proj": (arch.intermediate_size, arch.hidden_size),
    }


def count_params(arch: Architecture) -> ParamCounts:
    """Return the model's exact parameter counts (elements) by group; see `ParamCounts`."""
    linear = {
        name: in_features * out_features + (out_features if _has_bias(arch, name) else 0)
        for name, (in_features, out_features) in decoder_linear_shapes(arch).items()
    }
    attention_per_layer = sum(linear[name] for name in ATTENTION_MODULES)
    mlp_per_layer = sum(linear[name] for name in MLP_MODULES)
    norms_per_layer = 2 * arch.hidden_size
    embedding = arch.vocab_size * arch.hidden_size
    return ParamCounts(
        embedding=embedding,
        attention=arch.num_layers * attention_per_layer,
        mlp=arch.num_layers * mlp_per_layer,
        norms=arch.num_layers * norms_per_layer + arch.hidden_size,
        lm_head=0 if arch.tie_word_embeddings else embedding,
        experts=0,
        tied=arch.tie_word_embeddings,
        per_layer=attention_per_layer + mlp_per_layer + norms_per_layer,
        largest_layer=max(embedding, *linear.values()),
    )


def lora_trainable_params(arch: Architecture, r: int, target_modules: list[str]) -> int:
    """Return the LoRA adapter parameters (elements) added by rank `r` on the named Linears.

    Each targeted Linear of every layer gains A (r × in) and B (out × r): r·(in + out) parameters.
    `target_modules` names modules from q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj, or is ["all-linear"] for all seven (peft's meaning: every Linear but the LM head).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise DapcError(f"LoRA rank r must be a positive integer, got {r!r}")
    names = set(LINEAR_MODULES) if ALL_LINEAR in target_modules else set(target_modules)
    unknown = sorted(names - set(LINEAR_MODULES))
    if unknown or not names:
        raise DapcError(
            f"LoRA target_modules {target_modules!r} must name modules from "
            f"{', '.join(LINEAR_MODULES)}, or be [{ALL_LINEAR!r}]"
        )
    shapes = decoder_linear_shapes(arch)
    return arch.num_layers * sum(r * (shapes[name][0] + shapes[name][1]) for name in names)


def _has_bias(arch: Architecture, module: str) -> bool:
    if module in ("q_proj", "k_proj", "v_proj"):
        return arch.qkv_bias
    if module == "o_proj":
        return arch.o_bias
    return arch.mlp_bias
