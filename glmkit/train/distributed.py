"""Distributed training on torchrun, and the one place where a model is parallelised.

The only module in glmkit that imports `torch.distributed`. The model is written for one device;
`parallelize` applies, in torchtitan's order, activation checkpointing (per block), `torch.compile`
(per block) and then data parallelism: DDP, or FSDP2 (`fully_shard` on every block of `model.layers`,
then on the root so the embeddings, final norm and head are sharded too).

Process groups come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): gloo on the CPU,
NCCL on GPUs. A single process (no torchrun) runs the same code with every collective a no-op.

Everything the trainer calls goes through a `LossModule` whose `forward(batch, attn, loss_index)` is
`model.loss`: DDP and FSDP2 hook a module's `__call__`, so calling `model.loss` directly would skip the
gradient all-reduce (DDP) or the root's parameter all-gather (FSDP2).

State dicts (`model_state_dict`, `optimizer_state_dict`) are always *full* (unsharded, CPU, keyed by
parameter name) and the same in every mode, so a checkpoint written by an FSDP2 run resumes in a
single process and the other way round. Saving gathers them on rank 0; loading gives every rank the
full dict read from the checkpoint and each keeps its shard.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from glmkit.errors import GlmkitError

MODES = ("auto", "none", "ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GlmkitError(f"--device {device} asked for, but CUDA is not available; use --device cpu")
    return device


def init(device: str = "auto") -> DistInfo:
    """Join torchrun's process group if WORLD_SIZE > 1 (idempotent); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = resolve_device(device)
    if kind.startswith("cuda"):
        dev = torch.device("cuda", local_rank if world > 1 else torch.device(kind).index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(kind)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def shutdown() -> None:
    """Leave the process group after a run that finished on every rank: a barrier first, so that no
    rank tears down its gloo/NCCL threads while another is still in a collective (seen as a rare
    "terminate called without an active exception" in a child under load). Not for the error path:
    there a rank may never reach the barrier, so let the process exit and torchrun stop the rest."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- parallelise

class LossModule(nn.Module):
    """`forward(batch, attn, loss_index) -> model.loss(batch, attn, loss_index=loss_index)`, so DDP /
    FSDP2 see the call through their hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, attn=None, loss_index=None):
        return self.model.loss(batch, attn, loss_index=loss_index)


def parallelize(model: nn.Module, info: DistInfo, mode: str = "auto", compile: bool = False,
                activation_checkpointing: bool = False) -> nn.Module:
    """Wrap `model` (already on `info.device`) for training; returns a `LossModule` (maybe wrapped).

    mode: "none" (one process), "ddp", "fsdp" (FSDP2), or "auto" (DDP when WORLD_SIZE > 1).
    Call the result as `loss = module(batch)`; reach the model with `unwrap(module)`.
    """
    if mode not in MODES:
        raise GlmkitError(f"unknown parallel mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "ddp" if info.enabled else "none"
    if mode in ("ddp", "fsdp") and not info.enabled and not dist.is_initialized():
        mode = "none"  # one process: nothing to synchronise
    layers = getattr(model, "layers", None)
    if activation_checkpointing or compile or mode == "fsdp":
        if not isinstance(layers, nn.ModuleList):
            raise GlmkitError("the model has no `layers` ModuleList to checkpoint, compile or shard per block")
    if activation_checkpointing and hasattr(model, "checkpointing"):
        model.checkpointing = True  # the model recomputes each block itself
    elif activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(layers):
            layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)
    if compile:
        for block in layers:
            block.compile()
    module = LossModule(model)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for i, block in enumerate(layers):
            # the last block's parameters are needed again at once by backward: keep them gathered
            fully_shard(block, mesh=mesh, reshard_after_forward=i < len(layers) - 1)
        fully_shard(module, mesh=mesh)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside `parallelize`'s result (for generation, FLOPs, num_params)."""
    module = getattr(module, "module", module)  # DDP
    return module.model if isinstance(module, LossModule) else module


def mode_of(module: nn.Module) -> str:
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(module, DistributedDataParallel):
        return "ddp"
    return "fsdp" if hasattr(module, "set_requires_gradient_sync") else "none"


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter for all but the last micro-batch of a step."""
    mode = mode_of(module)
    if enabled or mode == "none":
        yield
    elif mode == "ddp":
        with module.no_sync():
            yield
    else:
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)


def clip_grad_norm(module: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (across ranks and shards); return it before clipping."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


# ------------------------------------------------------------------------------------------ state dicts
# torch.distributed.checkpoint (slow to import) is needed only for DDP / FSDP2; one process maps
# optimizer state to parameter names itself.

def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def _strip(state: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def model_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict (CPU) on rank 0; {} on other ranks. A collective under FSDP2."""
    if mode_of(module) == "none":
        return {k: v.detach().cpu() for k, v in unwrap(module).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return _strip(get_model_state_dict(module, options=_full_options(cpu_offload=True)))


def load_model_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (on every rank) into a possibly sharded model."""
    if mode_of(module) == "none":
        unwrap(module).load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(module, {f"model.{k}": v for k, v in state.items()}, options=_full_options(strict=True))


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter name of each optimizer slot, in the order torch's Optimizer.state_dict numbers them."""
    names = {id(p): n for n, p in unwrap(module).named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter name (rank 0; {} elsewhere under FSDP2)."""
    if mode_of(module) == "none":
        names, state = _param_names(module, optimizer), optimizer.state_dict()
        return {"state": {names[i]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                          for i, s in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(module, optimizer, options=_full_options(cpu_offload=True))
    if not state:
        return state
    return {"state": _strip(state["state"]),
            "param_groups": [{**g, "params": [p[len("model."):] if p.startswith("model.") else p
                                              for p in g["params"]]} for g in state["param_groups"]]}


def load_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if mode_of(module) == "none":
        index = {n: i for i, n in enumerate(_param_names(module, optimizer))}
        optimizer.load_state_dict({
            "state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]})
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    state = {"state": {f"model.{k}": v for k, v in state["state"].items()},
             "param_groups": [{**g, "params": [f"model.{p}" for p in g["params"]]}
                              for g in state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, state, options=_full_options())


# ------------------------------------------------------------------------------------------ collectives

def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (in place; float64 keeps token counts and loss sums exact enough)."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
