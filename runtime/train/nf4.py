"""QLoRA's frozen base in NF4, quantized while loading, one tensor at a time, into the shard each rank keeps.

The 4-bit format is torchao's `NF4Tensor` (QLoRA's NormalFloat-4 with double-quantized block scales), not
bitsandbytes': it implements FSDP2's all-gather extension (`fsdp_pre_all_gather` / `fsdp_post_all_gather`)
and row splits, so `fully_shard` shards the packed values *and* their quantization constants, and the
all-gathered tensor is rebuilt from exactly the shards' bytes. It is plain PyTorch (CPU and GPU, any float
dtype) and `F.linear` on it dequantizes one weight at a time. bitsandbytes keeps its constants in a
`quant_state` that FSDP2 never sees (whole on every rank) and relies on packing 4-bit bytes into a bf16
"storage" for FSDP2 to shard (bitsandbytes issue #1945).

Layout: blocks of 64 values (the QLoRA paper's), each block scale quantized to int8 within groups of up to
256 scales that never straddle a row (`scaler_block_size`), so a row-sharded weight carries exactly its own
constants and the quantization does not depend on how many ranks share it: a 1-process run and an FSDP2 run
train over bit-identical weights. The only constant shared by all rows is the mean of the block scales.

How a model gets its base (`runtime/train/model.py` builds, `engines` shards, this module loads):
1. build on the meta device, buffers real; every `nn.Linear` inside a decoder layer gets a frozen meta NF4
   weight (`to_nf4_placeholders`); embeddings, norms and the head stay in the base dtype;
2. LoRA through peft, on the meta model;
3. under FSDP2, `fully_shard` each decoder layer, then the root: meta shards, NF4 split by rows;
4. `load_base`: per parameter, in model order, read it from the memory-mapped safetensors files (one
   tensor at a time, only this rank's rows where it is not quantized), cast to the base dtype, quantize a
   Linear weight whole on the rank's device (the scale mean is over the whole weight), keep this rank's rows
   of the NF4 data and constants, and put it in place of the meta parameter, as the DTensor shard FSDP2
   made (FSDP2 picks up replaced parameters at its lazy init). The LoRA adapters get peft's own init,
   drawn whole on the CPU from `seed`, whatever the world size.
Without FSDP2 (1 process, DDP, DeepSpeed) step 3 is skipped and every rank keeps whole tensors.

Peak memory of a rank while loading, at most: its shard of the base (NF4 Linear weights and the base-dtype
rest) and of the adapters, plus, for the largest Linear weight, its checkpoint pages, its copy in the base
dtype, its NF4, and torchao's quantizer temporaries (a scaled copy, 2 bytes per value of codes, and per
chunk of 2^20 values the distances to the 16 code points: 72 bytes per value in bf16).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import logging

import torch
from torch import nn

from dapc.errors import DapcError

# torchao's import logs, on every rank, that its optional compiled kernels (CUDA-arch specific) and triton are
# absent, and torch's pytree warns about torchao's enums: NF4 uses none of them, and the noise would bury the
# trainer's own lines.
_QUIET = {name: logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")}
_LEVELS = {name: logger.level for name, logger in _QUIET.items()}
for _logger in _QUIET.values():
    _logger.setLevel(logging.ERROR)
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import (  # noqa: E402
    NF4Tensor,
    SubclassTensorArgs,
    linear_nf4,
    to_nf4,
)

for _name, _logger in _QUIET.items():
    _logger.setLevel(_LEVELS[_name])

__all__ = ["BLOCK_SIZE", "MAX_SCALER_BLOCK_SIZE", "NF4Linear", "NF4Tensor", "is_nf4", "load_base", "quantize",
           "safetensors_index", "scaler_block_size", "to_nf4_placeholders", "unshardable_nf4"]

class CheckpointFormatError(DapcError):
    """A base checkpoint this loader cannot read: no safetensors, or a tensor the model needs is absent."""


BLOCK_SIZE = 64  # values per absmax scale (QLoRA, Dettmers et al. 2023, section 3)
MAX_SCALER_BLOCK_SIZE = 256  # scales per int8 group of the double quantization (QLoRA's choice)
_NF4_TENSORS = ("quantized_data", "quantized_scalers", "quantization_factor")  # sharded by rows


def scaler_block_size(in_features: int) -> int:
    """The largest number of block scales, at most 256, that divides one row's: groups stay within a row."""
    if in_features % BLOCK_SIZE:
        raise ValueError(f"NF4 needs in_features divisible by {BLOCK_SIZE}, got {in_features}")
    per_row = in_features // BLOCK_SIZE
    return max(d for d in range(1, min(per_row, MAX_SCALER_BLOCK_SIZE) + 1) if per_row % d == 0)


def quantize(weight: torch.Tensor) -> NF4Tensor:
    """`weight` (out_features × in_features, any float dtype, any device) as NF4 in its own dtype and device."""
    return to_nf4(weight.contiguous(), BLOCK_SIZE, scaler_block_size(weight.shape[1]))


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an NF4 weight, whole or as the local part of an FSDP2 DTensor."""
    return isinstance(getattr(tensor, "_local_tensor", tensor), NF4Tensor)


class NF4Linear(nn.Linear):
    """A Linear layer whose frozen weight is an NF4Tensor. The forward calls torchao's `linear_nf4` (dequantize,
    then a dense matmul, in forward and backward) itself rather than through `F.linear`, which DeepSpeed ZeRO-3
    replaces with a version that transposes the weight first (an NF4 transpose is only a stride flip)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = linear_nf4(input, self.weight)
        return out if self.bias is None else out + self.bias


def to_nf4_placeholders(layers: list[nn.Module], dtype: torch.dtype) -> int:
    """Replaces every `nn.Linear` in `layers` (built on the meta device) by an `NF4Linear` with a frozen meta NF4
    weight of `dtype` (and the same bias); returns how many. The real values come from `load_base`."""
    found = [(parent, name, child) for layer in layers for parent in layer.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name, linear in found:
        with torch.device("meta"):
            replacement = NF4Linear(linear.in_features, linear.out_features, bias=False, dtype=dtype)
        replacement.weight = nn.Parameter(quantize(torch.empty_like(linear.weight, dtype=dtype)), requires_grad=False)
        replacement.bias = linear.bias
        setattr(parent, name, replacement)
    return len(found)


def unshardable_nf4(model: nn.Module, shards: int) -> list[str]:
    """The NF4 weights FSDP2 cannot split into `shards` equal row blocks (torchao's NF4 has no padding), as
    `name: rows`; empty when every out_features divides."""
    return [f"{name}: {p.shape[0]} rows" for name, p in model.named_parameters() if is_nf4(p) and p.shape[0] % shards]


def safetensors_index(folder: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file in `folder` that holds it (the index file's map where there is one)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointFormatError("holds no *.safetensors files; QLoRA loads only safetensors checkpoints",
                                    str(folder))
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as tensors:
            names.update(dict.fromkeys(tensors.keys(), file))
    return names


def load_base(model: nn.Module, names: dict[nn.Module, str], index: dict[str, Path], device: torch.device,
              seed: int) -> dict[str, int]:
    """Fills every meta parameter of `model` (whole, or the FSDP2 shard it stands for) on `device`, in model
    order: frozen ones from the checkpoint `index`, under the names `names` gives their modules (Linear weights
    quantized to NF4); LoRA adapters with peft's own init (`reset_lora_parameters`), each layer's drawn whole
    on the CPU from `seed` when the loader reaches it, with the global RNG restored afterwards: the same values
    on every rank and for every world size. Returns counts for the log line."""
    from peft.tuners.lora import LoraLayer

    holders = _holders(model)
    counts = {"tensors": 0, "quantized": 0, "adapters": 0}

    def place(meta: nn.Parameter, local: torch.Tensor) -> None:
        new = nn.Parameter(_like(meta, local), requires_grad=meta.requires_grad)
        for holder, leaf in holders[id(meta)]:
            setattr(holder, leaf, new)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for meta, whole in _initial_adapters(module, model.peft_config):
                    place(meta, _rows_of(whole, _row_range(meta)).to(device))
                    counts["adapters"] += 1
            for leaf, param in list(module._parameters.items()):
                if param is None or not param.is_meta:  # absent, or loaded already (tied, or an adapter)
                    continue
                if param.requires_grad:
                    raise RuntimeError(f"trainable parameter {type(module).__name__}.{leaf} is not a LoRA "
                                       "adapter; QLoRA trains adapters only")
                place(param, _load(param, _checkpoint_name(holders[id(param)], names, index), index, device))
                counts["tensors"] += 1
                counts["quantized"] += is_nf4(param)
    return counts


def _load(meta: nn.Parameter, name: str, index: dict[str, Path], device: torch.device) -> torch.Tensor:
    """This rank's part of checkpoint tensor `name` for the meta parameter `meta`, in its dtype, on `device`.
    An NF4 weight is read and quantized whole (the double quantization's mean is over all of it), and its rows
    copied out; anything else is read only for the rows this rank keeps."""
    rows = _row_range(meta)
    if not is_nf4(meta):
        return _read(index[name], name, rows).to(device=device, dtype=meta.dtype, copy=True)
    whole = quantize(_read(index[name], name, None).to(device=device, dtype=meta.dtype, copy=True))
    return _nf4_rows(whole, getattr(meta, "_local_tensor", meta), rows)


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For each parameter (by id), every (module, attribute) that holds it: tied weights have two."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for leaf, param in module._parameters.items():
            if param is not None:
                found.setdefault(id(param), []).append((module, leaf))
    return found


def _checkpoint_name(holders: list[tuple[nn.Module, str]], names: dict[nn.Module, str],
                     index: dict[str, Path]) -> str:
    candidates = [f"{names[m]}.{leaf}" if names.get(m) else leaf for m, leaf in holders if m in names]
    for candidate in candidates:
        if candidate in index:
            return candidate
    raise CheckpointFormatError(f"the checkpoint has no tensor {' or '.join(candidates) or holders[0][1]}")


def _row_range(param: torch.Tensor) -> tuple[int, int] | None:
    """Rows [start, stop) of dim 0 that this rank keeps of an FSDP2 DTensor parameter (torch.chunk's split
    over every mesh dimension that shards); None for a plain (whole) parameter."""
    placements = getattr(param, "placements", None)
    if placements is None:
        return None
    start, stop = 0, param.shape[0]
    for dim, placement in enumerate(placements):
        if placement.is_shard():
            if placement.dim != 0:
                raise NotImplementedError(f"FSDP2 sharding on dim {placement.dim}; this loader shards dim 0")
            parts, rank = param.device_mesh.size(dim), param.device_mesh.get_local_rank(dim)
            chunk = math.ceil((stop - start) / parts)
            start = min(start + rank * chunk, stop)
            stop = min(start + chunk, stop)
    local_rows = param._local_tensor.shape[0] if param._local_tensor.dim() else 0
    if stop - start != local_rows:
        raise RuntimeError(f"rows {start}:{stop} do not match FSDP2's local shard of {local_rows} rows")
    return start, stop


def _read(file: Path, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
    """One tensor (or its rows) from a safetensors file, as a view of the file's memory map: only the pages
    read become resident, and the map goes when the tensor does. Callers copy what they keep (`copy=True`),
    so that no parameter depends on the checkpoint's file (or its page cache, or its network file system)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as tensors:
        if rows is None:
            return tensors.get_tensor(name)
        return tensors.get_slice(name)[rows[0]:rows[1]]


def _rows_of(tensor: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return tensor if rows is None else tensor[rows[0]:rows[1]].clone()


def _nf4_rows(whole: NF4Tensor, template: NF4Tensor, rows: tuple[int, int] | None) -> NF4Tensor:
    """Rows [start, stop) of an NF4 weight as a tensor of its own (packed values and constants copied out, so
    the whole weight can be freed), with the metadata of FSDP2's shard `template`."""
    if rows is None:
        return whole
    start, stop = rows
    if whole.shape[0] % (stop - start) or stop - start != template.shape[0]:
        raise RuntimeError(f"NF4 weight of {whole.shape[0]} rows cannot be split evenly into shards of "
                           f"{stop - start} rows; FSDP2 needs out_features divisible by the number of shards")
    parts = {}
    for attr in _NF4_TENSORS:
        inner = getattr(whole, attr)
        per_row = inner.numel() // whole.shape[0]
        parts[attr] = inner[start * per_row:stop * per_row].clone()
    meta = SubclassTensorArgs(template.shape, template.stride(), 0, whole.dtype, whole.device, False)
    return NF4Tensor(meta, template.block_size, template.n_blocks, template.scaler_block_size,
                     parts["quantized_scalers"], parts["quantization_factor"], whole.scaler_mean.clone(),
                     parts["quantized_data"], whole.nf4.clone())


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` as what stands in `param`'s place: the same DTensor spec (global shape, mesh, placements)."""
    placements = getattr(param, "placements", None)
    if placements is None:
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def _initial_adapters(module: nn.Module, configs: dict) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(meta parameter, whole initial value on the CPU) for every LoRA matrix of one peft `LoraLayer`, drawn by
    peft's `reset_lora_parameters` from the global RNG on stand-in CPU tensors, the placeholders put back."""
    initial = []
    for adapter in list(module.lora_A.keys()):
        pairs = [(module.lora_A[adapter], "weight"), (module.lora_B[adapter], "weight")]
        if module.lora_bias.get(adapter):
            pairs.append((module.lora_B[adapter], "bias"))
        placeholders = [getattr(owner, leaf) for owner, leaf in pairs]
        for (owner, leaf), meta in zip(pairs, placeholders):
            setattr(owner, leaf, nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype)))
        module.reset_lora_parameters(adapter, configs[adapter].init_lora_weights)
        for (owner, leaf), meta in zip(pairs, placeholders):
            initial.append((meta, getattr(owner, leaf).detach()))
            setattr(owner, leaf, meta)
    return initial
