"""A uniform replay buffer of transitions stored in preallocated tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def distinct_indices(n: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """``batch_size`` distinct indices in [0, n): a uniformly random subset (with replacement
    when ``n < batch_size``).

    A small range is permuted; a large one is sampled with replacement and its repeated draws
    redrawn until all are distinct (every subset stays equally likely, by symmetry), which costs
    O(batch) instead of the O(n) of a permutation.
    """
    g = generator
    if batch_size > n:
        return torch.randint(0, n, (batch_size,), generator=g)
    if n <= 8 * batch_size:
        return torch.randperm(n, generator=g)[:batch_size]
    idx = torch.randint(0, n, (batch_size,), generator=g)
    while True:
        uniq = torch.unique(idx)
        missing = batch_size - uniq.numel()
        if missing == 0:
            return idx
        idx = torch.cat([uniq, torch.randint(0, n, (missing,), generator=g)])


class ReplayBuffer:
    """Ring buffer of (s, a, r, s′, not_done) with uniform sampling without replacement.

    ``not_done`` = 1 − terminated is the bootstrap mask (truncation keeps it at 1). Sampling uses
    the buffer's own ``torch.Generator``, so a restored buffer draws the same batches as an
    uninterrupted one.

    Args:
        obs_dim: observation size.
        capacity: maximum number of transitions (oldest overwritten first).
        seed: seed of the sampling generator.
    """

    def __init__(self, obs_dim: int, capacity: int = 200_000, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be ≥ 1, got {capacity}")
        self.obs_dim = obs_dim
        self.capacity = capacity
        self.obs = torch.zeros(capacity, obs_dim)
        self.action = torch.zeros(capacity, dtype=torch.long)
        self.reward = torch.zeros(capacity)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.not_done = torch.zeros(capacity)
        # numpy views of the storage: writing one transition through them skips the tensor
        # indexing machinery (the same float32/int64 values land in the same memory)
        self._np = {
            name: getattr(self, name).numpy()
            for name in ("obs", "action", "reward", "next_obs", "not_done")
        }
        self.ptr = 0
        self.size = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def add(
        self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, terminated: bool
    ) -> None:
        """Store one transition; the bootstrap mask is 1 − terminated."""
        i = self.ptr
        a = self._np
        a["obs"][i] = np.asarray(obs, dtype=np.float32)
        a["action"][i] = int(action)
        a["reward"][i] = float(reward)
        a["next_obs"][i] = np.asarray(next_obs, dtype=np.float32)
        a["not_done"][i] = 0.0 if terminated else 1.0
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """A batch of distinct transitions drawn uniformly (as OMD's buffer samples them).

        With fewer stored transitions than ``batch_size`` it draws with replacement.

        Returns:
            ``{"obs": [B, d], "action": [B] (long), "reward": [B, 1], "next_obs": [B, d],
            "not_done": [B, 1]}``.
        """
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        idx = self.indices(batch_size)
        return {
            "obs": self.obs[idx].to(dtype),
            "action": self.action[idx],
            "reward": self.reward[idx].to(dtype).unsqueeze(1),
            "next_obs": self.next_obs[idx].to(dtype),
            "not_done": self.not_done[idx].to(dtype).unsqueeze(1),
        }

    def indices(self, batch_size: int) -> Tensor:
        """``batch_size`` distinct indices, a uniformly random subset of the filled part (see
        :func:`distinct_indices`)."""
        return distinct_indices(self.size, batch_size, self.generator)

    def state_dict(self) -> dict[str, Any]:
        """The filled part of the storage, the write pointer and the sampling generator."""
        n = self.size
        return {
            "capacity": self.capacity,
            "ptr": self.ptr,
            "size": n,
            "obs": self.obs[:n].clone(),
            "action": self.action[:n].clone(),
            "reward": self.reward[:n].clone(),
            "next_obs": self.next_obs[:n].clone(),
            "not_done": self.not_done[:n].clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (into a buffer of the same capacity)."""
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"replay state has capacity {state['capacity']}, this buffer {self.capacity}"
            )
        n = int(state["size"])
        for name in ("obs", "action", "reward", "next_obs", "not_done"):
            getattr(self, name)[:n] = state[name]
        self.size = n
        self.ptr = int(state["ptr"])
        self.generator.set_state(state["generator"])


__all__ = ["ReplayBuffer", "distinct_indices"]
