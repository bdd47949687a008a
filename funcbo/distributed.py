"""Data-parallel helpers on top of ``torch.distributed``.

Under data parallelism every rank holds a shard of each batch and every expectation in the
bilevel problem is a mean over the ranks' shard means (exact when shards have equal sizes). The
helpers below are no-ops when ``torch.distributed`` is not initialised or has one rank, so the
library calls them unconditionally.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_mean_(tensors: Sequence[Tensor | None]) -> Sequence[Tensor | None]:
    """Average tensors across ranks, in place (``None`` entries are skipped); returns them."""
    if not is_distributed():
        return tensors
    n = world_size()
    live = [t for t in tensors if t is not None]
    if not live:
        return tensors
    # One flat buffer per dtype: one collective instead of one per tensor.
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in live:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(n)
        offset = 0
        for t in group:
            k = t.numel()
            t.copy_(flat[offset : offset + k].view_as(t))
            offset += k
    return tensors


def all_reduce_mean(t: Tensor) -> Tensor:
    """The mean of a tensor across ranks (a new tensor; not differentiable)."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    all_reduce_mean_([out])
    return out


def differentiable_all_reduce_mean(t: Tensor) -> Tensor:
    """Mean across ranks that autograd can differentiate through (used by unrolled ITD)."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM) / world_size()


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every rank (same initial state everywhere)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


__all__ = [
    "all_reduce_mean",
    "all_reduce_mean_",
    "broadcast_module_",
    "differentiable_all_reduce_mean",
    "is_distributed",
    "rank",
    "world_size",
]
