"""Distribution, applied from outside the model: process group setup, DDP or FSDP2 wrapping,
the sharded state dicts of the trainer's checkpoints (each process holds its own part) and the
full (unsharded) model state of the official folder.

The same code runs as one plain process or under `torchrun --nproc_per_node N`: gloo on CPU,
NCCL on GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
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


def init_distributed(device: str | None = None) -> Distributed:
    """Join the process group when started by torchrun; a plain process is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    target = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def wrap_model(model: nn.Module, mode: str, env: Distributed, precision: str = "fp32") -> nn.Module:
    """Wrap for data parallelism. 'fsdp' shards every block, then the root (FSDP2).

    precision 'bf16' under 'fsdp': FSDP2's mixed precision (`MixedPrecisionPolicy`): each
    block's parameters are all-gathered and computed in bfloat16, and the gradients are
    reduce-scattered and kept in float32 (the sharded master weights and the optimizer stay
    float32). Without it the all-gathers and reduce-scatters move float32 and autocast makes a
    bfloat16 copy of every weight in every forward; the losses differ by the rounding of the
    weights to bfloat16, which autocast applies to the matmuls anyway. DDP keeps float32
    replicas (its gradients are all-reduced in float32) and autocast alone.
    """
    if not env.enabled or mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if precision == "bf16"
            else MixedPrecisionPolicy()
        )
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    raise ValueError(f"unknown parallel mode '{mode}'; use none, ddp or fsdp")


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run one micro-batch's backward with (`enabled`) or without the gradient reduction
    across processes. Gradient accumulation reduces once, in the backward of the last
    micro-batch: the earlier micro-batches' gradients stay in each process (FSDP2: unsharded,
    summed into the next backward's before its reduce-scatter; DDP: in `.grad`, `no_sync`).
    The sum reduced is the same, so the step is too; the communication of the other
    micro-batches is saved. A plain model has nothing to reduce."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """{"model", "optimizer"}: this process's part of the model and optimizer state (FSDP2:
    DTensor shards; DDP or one process: whole tensors, which torch.distributed.checkpoint writes
    once), under the unwrapped model's names. A fresh optimizer gets its state created first
    (by torch, with a zero-lr step), so that the dict is a template to load into."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def load_sharded_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, dict]
) -> None:
    """Put a `sharded_state` dict (filled by torch.distributed.checkpoint.load) in place."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """An unsharded CPU copy of the model state, complete on rank 0 (FSDP2 gathers it there:
    the official folder is written by rank 0 alone)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded CPU copies of the model and optimizer state (complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict into a (possibly sharded) optimizer on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )


def all_reduce_sum(values: list[float], env: Distributed) -> list[float]:
    if not env.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(env: Distributed) -> None:
    if env.enabled:
        dist.barrier()


def shutdown(env: Distributed) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
