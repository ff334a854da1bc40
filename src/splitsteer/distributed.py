"""Data-parallel training over ``torch.distributed``, as launched by accelerate or torchrun.

Every process builds the same global batches and draws the same factors from the same
seeded generator; each then takes its share of each batch's pairs, and the update's
gradients are summed across processes. With the local losses weighted by their share of
the global batch, the sum is the global batch's gradient, so N processes give the same
update as one (up to float reduction order).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share: every ``size``-th item from ``rank``."""
        return list(items[self.rank :: self.size])


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env() -> World:
    """Join the process group a launcher (accelerate, torchrun) describes in the environment."""
    if current_world().size > 1:
        return current_world()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise InputError(f"--distributed: launcher environment lacks {', '.join(missing)}; "
                         "start with `accelerate launch` or `torchrun`")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return current_world()


def sum_gradients(params: Sequence[torch.Tensor], world: World) -> None:
    """Sum each parameter's gradient over all processes (missing gradients count as 0)."""
    if world.size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def sum_values(values: dict[str, float], world: World) -> dict[str, float]:
    """Sum scalars over all processes (same keys everywhere)."""
    if world.size == 1:
        return values
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(keys, packed.tolist()))


def sum_tensor(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
