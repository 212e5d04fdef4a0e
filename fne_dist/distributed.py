"""torch.distributed helpers that work unchanged with one process (no process group)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce `t` in place over all ranks (a no-op in one process); returns `t`."""
    if is_distributed():
        dist.all_reduce(t, op=op)
    return t


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of every rank along dim 0, in rank order (no gradient)."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_to_all(t: torch.Tensor) -> torch.Tensor:
    """Exchange equal chunks along dim 0: chunk s of every rank goes to rank s, and the result holds, in rank
    order, the chunks every rank sent here (t itself in one process)."""
    if not is_distributed():
        return t
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t.contiguous())
    return out
