"""Data parallelism for the Trainer under torchrun: the process group from torchrun's environment,
the same initial weights on every rank, and gradients averaged across ranks after each step's
backward (what DDP does, with one all-reduce over a flat buffer instead of buckets overlapped with
the backward: the Trainer's backward runs its towers outside any one module's forward, in
micro-batches and a cached first pass, which DDP's hooks do not follow)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that logs, evaluates and checkpoints."""
        return self.rank == 0


def from_environment(device_type: str) -> Ranks:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK: joins (or initialises) the default process group,
    NCCL for CUDA, gloo for CPU. Without them (or with WORLD_SIZE=1): one rank, no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":  # before NCCL starts: its collectives, and the CUDA RNG, use this device
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def average_gradients(params: list, world: int) -> None:
    """Every parameter's .grad := its mean over the ranks, a missing .grad counting as 0; a
    parameter no rank has a gradient for keeps none (the optimizer then skips it, as in one
    process). One all-reduce of the flat gradients and a has-gradient flag per parameter."""
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    has = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([*grads, has])
    dist.all_reduce(flat)
    parts = flat.split([p.numel() for p in params] + [len(params)])
    for p, g, any_rank in zip(params, parts[:-1], parts[-1].tolist()):
        p.grad = (g / world).view_as(p) if any_rank else None
