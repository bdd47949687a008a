"""The unit of work the experiment layer runs: one method, one seed, one configuration.

An application provides a :class:`Task` per (method, seed); the runner advances it one outer
iteration at a time, evaluates it periodically, logs metrics, and checkpoints its
:meth:`Task.state_dict` so that a killed run resumes and ends exactly where an uninterrupted one
would (same seed, CPU, float tolerance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Task(ABC):
    """One resumable run.

    Attributes:
        iterations: total outer iterations of the run.
    """

    iterations: int

    @abstractmethod
    def step(self) -> dict[str, float]:
        """Advance one outer iteration; return its metrics (``outer_loss``, ``inner_loss``,
        ``adjoint_loss``, ``grad_norm``, ... whatever applies)."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Evaluation metrics of the current state (e.g. ``{"test_mse": ...}``)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit: models, optimizers, estimator state, every
        random generator (as tensors), buffers. Must load with ``torch.load(weights_only=True)``:
        tensors, numbers, strings, lists and dicts only."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
