"""The backends behind one small interface: a micro-step (forward + backward), an optimizer step, and
saving/loading their states into a checkpoint folder.

- `TorchEngine`: DDP (the bare model in a single process) or FSDP2 (`fully_shard` per decoder layer, then the
  root), a torch optimizer, states through DCP (`get_*_state_dict` / `set_*_state_dict`; LoRA saves only the
  trainable parameters).
- `DeepSpeedEngine`: ZeRO 1/2/3 (with offload) from the plan's DeepSpeed config, passed as is, with our
  torch AdamW; states through DeepSpeed's own `save_checkpoint` / `load_checkpoint`.
The learning rate is a pure function of the step (`optim.lr_at`), set on the param groups before every
optimizer step, so no scheduler state exists to save. What a micro-step's loss is (next tokens, or a preference
pair's score against a reference) is the plan's objective (`_objective`): the DPO reference is the policy with its
adapters off, a frozen copy built like the policy and sharded by the same backend (never optimized or saved), or
a table the policy scored before step 1 (`score`, reference precomputed).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .config import PlanError, TrainPlan
from .loss import causal_lm_loss, chunked_loss_head
from .model import (
    DTYPES,
    PENDING_LOAD,
    QuantizedBase,
    RankZeroWeights,
    build_model,
    compute_dtype,
    decoder_layers,
    non_persistent_buffers,
)
from .nf4 import is_nf4, unshardable_nf4
from .optim import build_optimizer, param_groups
from .preference import PreferenceLoss, adapters_off, sequence_logps
from .reference_logps import PrecomputedReference

__all__ = ["DCP_DIR", "DEEPSPEED_DIR", "DeepSpeedEngine", "Engine", "TorchEngine", "make_engine"]

DCP_DIR = "dcp"
DEEPSPEED_DIR = "deepspeed"  # the folder DeepSpeed writes; also its checkpoint tag


class Engine:
    """What the loop drives. `model` is the wrapped module (for evaluation, not for stepping)."""

    model: nn.Module

    def micro_step(self, input_ids: torch.Tensor, last: bool, position_ids: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch; returns the (detached) mean loss and the objective's
        statistics (dpo/orpo: rewards, margin, accuracy; else none). `last` is the final micro-batch of the
        step: gradients are synchronized only then. `position_ids`: per-document positions
        (data.document_boundaries separate), else None."""
        raise NotImplementedError

    def score(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Returns the policy's summed log-probabilities of each row's targets [rows] (forward only; call under
        torch.no_grad): what a precomputed dpo reference stores, scored before step 1."""
        raise NotImplementedError

    def optimizer_step(self, lr: float) -> torch.Tensor | float:
        """Clips, steps the optimizer at learning rate `lr`, clears gradients; returns the gradient norm, as a
        0-d tensor where it was computed as one (reading it waits for the device: the loop does so only when
        it logs)."""
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """Writes this rank's part of the model and optimizer states under `folder` (collective)."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        """Restores the states `save` wrote (collective)."""
        raise NotImplementedError


def make_engine(plan: TrainPlan, model: nn.Module, device: torch.device) -> Engine:
    if plan.backend == "deepspeed":
        return DeepSpeedEngine(plan, model, device)
    return TorchEngine(plan, model, device)


LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], tuple[torch.Tensor, dict]]
Reference = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _objective(plan: TrainPlan, forward: nn.Module, reference: Reference | None) -> LossFn:
    """The micro-batch loss of the plan's objective, as a function of (input_ids, position_ids, labels), computed
    through `forward` (the wrapped policy)."""
    head = chunked_loss_head(forward)
    if plan.preference is None:
        return lambda ids, positions, labels: (causal_lm_loss(forward, ids, head, positions, labels), {})
    loss = PreferenceLoss(plan.preference, reference)
    return lambda ids, positions, labels: loss(forward, head, ids, labels)


def _adapters_off_reference(forward: nn.Module) -> Reference:
    """The policy itself with its LoRA adapters disabled: the base, the model before any update; no copy."""
    disabled, head = adapters_off(forward), chunked_loss_head(forward)

    def score(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with disabled():
            return sequence_logps(forward, ids, labels, head)[0]
    return score


def _copy_reference(module: nn.Module) -> Reference:
    head = chunked_loss_head(module)
    return lambda ids, labels: sequence_logps(module, ids, labels, head)[0]


def _reference_plan(plan: TrainPlan) -> TrainPlan:
    """How the frozen reference copy is built: the starting model (same source or seeded init), in the compute
    dtype, without activation checkpointing (no backward ever runs through it) or compilation."""
    return replace(plan, trained_dtype=plan.precision, activation_checkpointing="off", compile_layers=False)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """The module in eval mode (no dropout), as a frozen reference copy runs; back to training after."""
    module.eval()
    try:
        yield
    finally:
        module.train()


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


class TorchEngine(Engine):
    def __init__(self, plan: TrainPlan, model: nn.Module, device: torch.device):
        self.plan, self.device = plan, device
        if plan.precision == "fp16" and plan.backend == "fsdp2":
            raise PlanError("recipe.training.precision fp16 with FSDP2 needs a sharded gradient scaler, which this "
                            "runtime does not provide; use bf16", plan.path)
        if plan.backend == "fsdp2":
            _apply_fsdp2(plan, model, device)
            self.model = model
            self._autocast: Any = contextlib.nullcontext
        else:
            # A group of one has no gradients to all-reduce: DDP would add only its hooks and bucket copies.
            single = dist.get_world_size() == 1
            self.model = model if single else _wrap_ddp(model, device)
            self._no_sync = contextlib.nullcontext if single else self.model.no_sync
            mixed = plan.precision != "fp32"
            self._autocast = lambda: torch.autocast(device.type, dtype=compute_dtype(plan), enabled=mixed)
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # DTensors after fully_shard
        self._loss = _objective(plan, self.model, self._reference(plan, device))
        self.optimizer = build_optimizer(plan, param_groups(model, plan.weight_decay))
        self.scaler = torch.amp.GradScaler(device.type) if plan.precision == "fp16" else None
        self._options = StateDictOptions(ignore_frozen_params=plan.method != "full")

    def micro_step(self, input_ids: torch.Tensor, last: bool, position_ids: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.plan.backend == "fsdp2":
            # Skipping the sync would accumulate every layer's *unsharded* gradients until the last micro-batch.
            self.model.set_requires_gradient_sync(last or self.plan.fsdp.sync_every_micro_batch)
            sync = contextlib.nullcontext()
        else:
            sync = contextlib.nullcontext() if last else self._no_sync()
        with sync:
            with self._autocast():
                loss, stats = self._loss(input_ids, position_ids, labels)
            scaled = loss / self.plan.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach(), stats

    def score(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with _eval_mode(self.model), self._autocast():
            return sequence_logps(self.model, input_ids, labels, chunked_loss_head(self.model))[0]

    def _reference(self, plan: TrainPlan, device: torch.device) -> Reference | None:
        kind = plan.preference.reference if plan.preference else "none"
        if kind == "adapters-off":
            return _adapters_off_reference(self.model)
        if kind == "precomputed":
            self.precomputed = PrecomputedReference()
            return self.precomputed
        if kind != "copy":
            return None
        reference_plan = _reference_plan(plan)
        reference = _frozen(build_model(reference_plan, device))
        if plan.backend == "fsdp2":
            _apply_fsdp2(reference_plan, reference, device)  # sharded like the policy; gathered layer by layer
        self.reference_model = reference
        return _copy_reference(reference)

    def optimizer_step(self, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.trainable if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding this rank's partial norm
            norm = norm.full_tensor()
        if self.plan.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.trainable, self.plan.grad_clip, norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, folder: Path) -> None:
        dcp.save(self._state(), checkpoint_id=str(folder / DCP_DIR))

    def load(self, folder: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=str(folder / DCP_DIR))  # in place: LoRA adapters are restored here
        if self.plan.method == "full":
            set_model_state_dict(self.model, state["model"], options=self._options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"], options=self._options)
        if self.scaler:
            self.scaler.load_state_dict(state["scaler"])

    def _state(self) -> dict[str, Any]:
        """What a checkpoint holds: model and optimizer states; for LoRA the adapters only (the frozen base is
        rebuilt from the plan). The adapters are taken as parameters rather than through `model.state_dict()`,
        which for a 4-bit base would also hold the NF4 weights."""
        if self.plan.method == "full":
            model_state = get_model_state_dict(self.model, options=self._options)
        else:
            model_state = {name.removeprefix("module."): p.detach()  # DDP's prefix; FSDP2 keeps the names
                           for name, p in self.model.named_parameters() if p.requires_grad}
        state = {"model": model_state,
                 "optim": get_optimizer_state_dict(self.model, self.optimizer, options=self._options)}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Every rank read the same frozen NF4 base from the checkpoint: DDP need not broadcast it from rank 0.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [name for name, p in model.named_parameters() if is_nf4(p)])
    # The buckets are views of the gradients: no second copy of them (dapc.memory assumes this).
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def _apply_fsdp2(plan: TrainPlan, model: nn.Module, device: torch.device) -> None:
    """fully_shard each decoder layer, then the root (which takes the embedding, final norm and head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    s = plan.fsdp
    # A 1-D mesh shards over every rank (fsdp2-full); a 2-D ("replicate", "shard") mesh is HSDP (fsdp2-hybrid):
    # replicated across nodes, sharded within one.
    mesh = init_device_mesh(device.type, s.mesh, mesh_dim_names=s.mesh_dims)
    options = {
        "mesh": mesh,
        "reshard_after_forward": s.reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=DTYPES[s.param_dtype], reduce_dtype=DTYPES[s.reduce_dtype]),
        # Pinned host memory needs an accelerator; on the CPU device the offload is a no-op placement anyway.
        "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if s.cpu_offload else OffloadPolicy(),
    }
    pending = model.__dict__.get(PENDING_LOAD)
    uneven = unshardable_nf4(model, s.mesh[-1]) if isinstance(pending, QuantizedBase) else []
    if uneven:
        raise PlanError(f"FSDP2 shards NF4 weights by rows over {s.mesh[-1]} ranks, which must divide out_features: "
                        f"{', '.join(uneven[:3])}{' ...' if len(uneven) > 3 else ''}", plan.path)
    # Order: each decoder layer, then (untied) the embedding and the head as units of their own so that they
    # are resharded after use rather than held gathered by the root through backward, then the root.
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    if s.separate_embedding_units:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            fully_shard(module, **options)
    fully_shard(model, **options)
    pending = model.__dict__.pop(PENDING_LOAD, None)
    target = torch.device("cpu") if s.cpu_offload else device
    if isinstance(pending, RankZeroWeights):
        _load_from_rank0(model, pending, target)
    elif isinstance(pending, QuantizedBase):
        pending.load(model, target)  # each rank reads, quantizes and keeps its own shards


def _load_from_rank0(model: nn.Module, weights: RankZeroWeights, device: torch.device) -> None:
    """Materializes a meta-built, sharded model on `device` and fills it with rank 0's weights: each tensor is
    broadcast from rank 0 and every rank keeps its shard; non-persistent buffers are broadcast whole."""
    model.to_empty(device=device)
    set_model_state_dict(model, weights.state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    rank = dist.get_rank()
    for name, buffer in non_persistent_buffers(model).items():  # same modules, same order on every rank
        if rank == 0:
            buffer.copy_(weights.buffers[name])
        dist.broadcast(buffer, src=0)
    weights.state.clear()
    weights.buffers.clear()
    if rank == 0:
        print(f"loaded weights on rank 0, broadcast to {dist.get_world_size()} ranks", file=sys.stderr, flush=True)


class DeepSpeedEngine(Engine):
    def __init__(self, plan: TrainPlan, model: nn.Module, device: torch.device):
        import deepspeed

        self.plan = plan
        _unregister_nf4(model)
        optimizer = build_optimizer(plan, param_groups(model, plan.weight_decay))
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=plan.deepspeed,
                                               dist_init_required=False)
        self.model = self.engine
        self._frozen_excluded = plan.method != "full"
        self._loss = _objective(plan, self.engine, self._reference(plan, device))

    def micro_step(self, input_ids: torch.Tensor, last: bool, position_ids: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, stats = self._loss(input_ids, position_ids, labels)
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        if not last:
            self.engine.step()  # DeepSpeed counts micro-steps; it steps the optimizer only at the boundary
        return loss.detach(), stats

    def _reference(self, plan: TrainPlan, device: torch.device) -> Reference | None:
        import deepspeed

        kind = plan.preference.reference if plan.preference else "none"
        if kind == "adapters-off":
            return _adapters_off_reference(self.engine)
        if kind == "precomputed":
            self.precomputed = PrecomputedReference()
            return self.precomputed
        if kind != "copy":
            return None
        reference = _frozen(build_model(_reference_plan(plan), device))
        if plan.zero_stage == 3:
            # Partitioned like the policy, with no optimizer: DeepSpeed gathers each layer for its forward.
            config = {k: v for k, v in plan.deepspeed.items() if k not in ("optimizer", "scheduler")}
            engine, *_ = deepspeed.initialize(model=reference, config=config, dist_init_required=False)
            engine.eval()  # DeepSpeedEngine.eval returns None
            self.reference_model = engine
        else:  # ZeRO-1/2 keep whole parameters on every rank: so does the reference, in the compute dtype
            self.reference_model = reference.to(device=device, dtype=compute_dtype(plan))
        return _copy_reference(self.reference_model)

    def score(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with _eval_mode(self.engine):
            return sequence_logps(self.engine, input_ids, labels, chunked_loss_head(self.engine))[0]

    def optimizer_step(self, lr: float) -> float:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()  # clips to the config's gradient_clipping, steps, zeroes the gradients
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_DIR, client_state={}, save_latest=False,
                                    exclude_frozen_parameters=self._frozen_excluded)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_DIR, load_lr_scheduler_states=False,
                                              load_module_strict=not self._frozen_excluded)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {folder / DEEPSPEED_DIR}")


def _unregister_nf4(model: nn.Module) -> None:
    """Turns the frozen NF4 weights of a QLoRA base into plain attributes, out of DeepSpeed's sight: DeepSpeed
    moves, casts, broadcasts and (ZeRO-3) partitions every parameter, none of which an NF4 tensor supports.
    Every rank read the same weights from the checkpoint, so they stay whole and identical on each; the
    Linear layers use them as before (`NF4Linear.forward` reads `self.weight`, registered or not)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and is_nf4(param):
                del module._parameters[name]
                setattr(module, name, param.detach())


def init_deepspeed_distributed(timeout: timedelta) -> None:
    """Hands the already initialized process group to DeepSpeed. On the CPU accelerator DeepSpeed would
    JIT-compile a shared-memory collective op (needs a compiler, ~30 s); gloo serves instead."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=dist.get_backend(), timeout=timeout, dist_init_required=False)
