"""Export a checkpoint to a Hugging Face model directory: safetensors weights, config, tokenizer.

Runs in one process (rank 0 at the end of training, or `python -m runtime.export --plan plan.json` for the
latest checkpoint), with no collectives: the trained tensors are read back from the checkpoint itself, DCP
through `no_dist` loading (a checkpoint of any world size loads into one process) and DeepSpeed through its
`zero_to_fp32` consolidation (the fp32 master weights). The model they load into is rebuilt from the plan:
the same seeded or pretrained base, unquantized, with the same LoRA modules; for adapters alone (LoRA or
QLoRA without `merge_lora`) only the base's structure, on the meta device, so that exporting the adapters of
a 405B base reads and holds none of its weights.

Layout of `paths.export_dir`:
- full training: the model (`config.json`, `model.safetensors`, generation config) and the tokenizer.
- LoRA/QLoRA: `adapter/` (peft's `adapter_config.json` + `adapter_model.safetensors`, and the tokenizer);
  with `checkpoint.merge_lora` the merged model and tokenizer at the top level as for full training.
The folder is written as `<export_dir>.partial` and renamed into place, so it is either whole or absent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dapc.errors import DapcError
from runtime.errors import print_error
from runtime.checkpoint import CheckpointError, check_plan, latest_checkpoint
from runtime.tokenizer import load_tokenizer
from runtime.train.config import TrainPlan, load_plan
from runtime.train.engines import DCP_DIR, DEEPSPEED_DIR
from runtime.train.model import DTYPES, base_model, base_skeleton

__all__ = ["export_model", "main", "trained_state"]

ADAPTER_DIR = "adapter"
EXPORT_META = "dapc_export.json"


def export_model(plan: TrainPlan, checkpoint: Path) -> Path:
    """Writes the HF export of `checkpoint` to `paths.export_dir` and returns that folder."""
    model = _rebuild(plan)
    expected = {name for name, p in model.named_parameters() if plan.method == "full" or p.requires_grad}
    state = trained_state(plan, checkpoint, model)
    missing = sorted(expected - state.keys())
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} trained tensors, e.g. {missing[0]}", str(checkpoint))
    # Into a meta skeleton the tensors must be assigned; into a real model they are copied, which keeps tied
    # weights (embedding and head) tied.
    model.load_state_dict(state, strict=False, assign=any(p.is_meta for p in model.parameters()))
    target = Path(plan.export_dir)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = load_tokenizer(plan.tokenizer)
    dtype = DTYPES[plan.model_dtype]
    if plan.method == "full":
        _save_model(model.to(dtype), tokenizer, staging)
    else:
        model.peft_config["default"].base_model_name_or_path = plan.model_source
        model.save_pretrained(str(staging / ADAPTER_DIR), save_embedding_layers=False)  # no hub lookup
        tokenizer.save_pretrained(str(staging / ADAPTER_DIR))
        if plan.merge_lora:
            _save_model(model.merge_and_unload().to(dtype), tokenizer, staging)
    (staging / EXPORT_META).write_text(json.dumps(
        {"plan_sha256": plan.plan_sha256, "checkpoint": str(checkpoint), "method": plan.method,
         "merged": plan.method == "full" or plan.merge_lora}, indent=2, sort_keys=True) + "\n")
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)
    return target


def trained_state(plan: TrainPlan, checkpoint: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of `checkpoint` (all weights for full training, the adapters for LoRA), fp32,
    keyed like `model.state_dict()`."""
    if (checkpoint / DEEPSPEED_DIR).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoint), tag=DEEPSPEED_DIR, exclude_frozen_parameters=plan.method != "full"))
    import torch.distributed.checkpoint as dcp

    wanted = {name: torch.empty(p.shape, dtype=p.dtype) if p.is_meta else p.detach().clone()
              for name, p in model.named_parameters() if plan.method == "full" or p.requires_grad}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": wanted}, checkpoint_id=str(checkpoint / DCP_DIR), no_dist=True)  # raises on a missing key
    return wanted


def _rebuild(plan: TrainPlan) -> nn.Module:
    if plan.method != "full" and not plan.merge_lora:
        model = base_skeleton(plan)  # the adapters' names and shapes are all an adapter export needs
    else:
        model = base_model(plan).float()
    if plan.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=plan.lora.r, lora_alpha=plan.lora.alpha, lora_dropout=plan.lora.dropout,
                        target_modules=list(plan.lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _save_model(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    model.config.use_cache = True
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.export --plan plan.json [--checkpoint DIR]`: export the latest (or given) checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m runtime.export", description=main.__doc__)
    parser.add_argument("--plan", required=True, help="the plan.json the checkpoints were written under")
    parser.add_argument("--checkpoint", help="a step-N folder (default: the latest complete one)")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.plan)
        checkpoint = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(plan.checkpoint_dir)
        if checkpoint is None:
            raise CheckpointError("no complete checkpoint to export", plan.checkpoint_dir)
        check_plan(checkpoint, plan.plan_sha256, plan.path)
        print(export_model(plan, checkpoint))
    except DapcError as e:
        return print_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
