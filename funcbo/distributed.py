"""Data-parallel helpers on top of ``torch.distributed``.

Under data parallelism every rank holds a shard of each batch and every expectation in the
bilevel problem is a mean over the ranks' shard means (exact when shards have equal sizes). The
helpers below are no-ops when ``torch.distributed`` is not initialised or has one rank, so the
library calls them unconditionally.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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


def mean_across_ranks(stats: dict[str, float]) -> dict[str, float]:
    """The mean of each scalar diagnostic over the ranks (one collective for all of them).

    Losses an estimator reports are means over this rank's shard; with equal shards their mean
    over the ranks is the loss of the whole batch, so what is logged under ``torchrun`` is what
    one process would log. Values that are equal on every rank (a gradient norm computed after
    averaging, an iteration count) are unchanged. Every rank must call it with the same keys.
    """
    if not is_distributed() or not stats:
        return stats
    keys = sorted(stats)
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    all_reduce_mean_([values])
    return {**stats, **{k: float(v) for k, v in zip(keys, values.tolist(), strict=True)}}


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


def shard_batch(batch: Any, rank_: int | None = None, world: int | None = None) -> Any:
    """This rank's contiguous slice of every tensor of a batch (tensors, tuples, lists, dicts).

    Every rank draws the same global batch (same seed) and keeps its shard, so that the mean of
    the ranks' shard means is the global mean: the batch size must be divisible by the number of
    ranks. Non-tensor leaves are passed through.
    """
    r = rank() if rank_ is None else rank_
    n = world_size() if world is None else world
    if n == 1:
        return batch

    def cut(x: Any) -> Any:
        if isinstance(x, Tensor) and x.dim() > 0:
            b = x.shape[0]
            if b % n:
                raise ValueError(
                    f"a batch of {b} samples cannot be split evenly across {n} ranks: use a "
                    "global batch size divisible by the world size"
                )
            k = b // n
            return x[r * k : (r + 1) * k]
        if isinstance(x, Mapping):
            return {key: cut(v) for key, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(cut(v) for v in x)
        return x

    return cut(batch)


__all__ = [
    "all_reduce_mean",
    "all_reduce_mean_",
    "broadcast_module_",
    "differentiable_all_reduce_mean",
    "is_distributed",
    "mean_across_ranks",
    "rank",
    "shard_batch",
    "world_size",
]
