"""Adds the Llama-3.2-1B shape to torchtitan 0.2's llama3 flavors as `1B`, for `bench/gpu_throughput.py`.

torchtitan 0.2.2 ships `8B`, `70B` and `405B` but no 1B. Its trainer imports this module first when run with
`--experimental.custom_import torchtitan_llama` (bench/ on PYTHONPATH), then looks the flavor up in the same
`llama3_args` dict. The shape is Meta's Llama-3.2-1B config.json (hidden 2048, 16 layers, 32 heads of 64, 8 KV
heads, SwiGLU 8192, vocab 128,256, rope theta 500,000, llama3 rope scaling ×32), except that the output head
is untied: torchtitan 0.2's llama3 has no weight tying, so both sides of the bench train the untied shape.
"""

from torchtitan.models.llama3 import TransformerModelArgs, llama3_args
from torchtitan.models.llama3.model.args import RoPEScalingArgs

llama3_args["1B"] = TransformerModelArgs(
    dim=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    ffn_dim_multiplier=1.5,  # int(2/3 · 4 · 2048) = 5461, × 1.5 = 8191, rounded up to a multiple of 1024: 8192
    multiple_of=1024,
    rope_theta=500000,
    rope_scaling_args=RoPEScalingArgs(scaling_factor=32.0),
)
