"""The interface shared by every hypergradient estimator."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from funcbo.distributed import all_reduce_mean_
from funcbo.problem import Batch, BilevelProblem


class HypergradientEstimator(ABC):
    """Approximates the total gradient ∇F(ω) of a bilevel problem.

    ``step(problem, outer, inner_batches, outer_batch)`` advances the estimator's inner state
    (inner steps, adjoint steps, ...) and returns the estimate as a tuple aligned with
    ``outer.parameters()`` (zeros for frozen parameters); it also writes it to the ``.grad`` of
    the trainable parameters, overwriting them, so that any torch optimizer can take the outer
    step. Diagnostics of the last step are in ``stats``.

    ``inner_batches`` is one batch or a sequence of batches: inner step k uses batch
    ``k mod len(inner_batches)``, and the adjoint and the hypergradient use the last one.
    """

    #: how many inner batches one step consumes (the Trainer draws this many)
    inner_steps: int = 1
    stats: dict[str, float]

    @abstractmethod
    def step(
        self,
        problem: BilevelProblem,
        outer: nn.Module,
        inner_batches: Batch | Sequence[Batch],
        outer_batch: Batch,
    ) -> tuple[Tensor, ...]:
        """Run the inner work and return the total-gradient estimate."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (inner model, optimizers, warm starts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless default
        """Restore what :meth:`state_dict` returned."""


class ImplicitEstimator(HypergradientEstimator):
    """An estimator that runs its inner solver, then computes ∇F(ω) at the inner model it left.

    Subclasses (:class:`~funcbo.FuncID`, :class:`~funcbo.AID`) set ``self.inner`` (an
    :class:`~funcbo.inner.InnerSolver`) and implement :meth:`hypergradient`.
    """

    inner: Any

    def step(
        self,
        problem: BilevelProblem,
        outer: nn.Module,
        inner_batches: Batch | Sequence[Batch],
        outer_batch: Batch,
    ) -> tuple[Tensor, ...]:
        batches = as_batch_list(inner_batches)
        inner_loss = self.inner.run(problem, outer, batches)
        grads = self.hypergradient(problem, outer, batches[-1], outer_batch)
        self.stats["inner_loss"] = inner_loss
        return grads

    @abstractmethod
    def hypergradient(
        self, problem: BilevelProblem, outer: nn.Module, inner_batch: Batch, outer_batch: Batch
    ) -> tuple[Tensor, ...]:
        """∇F(ω) at the current inner model (no inner steps)."""


def as_batch_list(inner_batches: Batch | Sequence[Batch]) -> list[Batch]:
    """One batch or a list of batches → a non-empty list of batches.

    A list or tuple whose items are themselves batches (tuples, lists, dicts) is a list of
    batches; a tuple of tensors such as ``(x, y)`` is one batch.
    """
    if isinstance(inner_batches, list) and inner_batches:
        return inner_batches
    if (
        isinstance(inner_batches, tuple)
        and inner_batches
        and all(isinstance(b, (tuple, list, dict)) for b in inner_batches)
    ):
        return list(inner_batches)
    return [inner_batches]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of a module that require gradients."""
    return [p for p in module.parameters() if p.requires_grad]


def finish_outer_grads(outer: nn.Module, grads: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Average across ranks, write ``.grad`` of the trainable parameters, align with
    ``outer.parameters()``.

    ``grads`` are aligned with :func:`trainable`\\ (outer); ``None`` means zero.
    """
    params = trainable(outer)
    full = [
        torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)
    ]
    all_reduce_mean_(full)
    for p, g in zip(params, full, strict=True):
        p.grad = g
    it = iter(full)
    return tuple(next(it) if p.requires_grad else torch.zeros_like(p) for p in outer.parameters())


def grad_norm(grads: Sequence[Tensor]) -> float:
    """Euclidean norm of a tuple of gradients."""
    return float(torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads))) if grads else 0.0


def add_grads(
    a: Sequence[Tensor | None], b: Sequence[Tensor | None], scale: float = 1.0
) -> list[Tensor | None]:
    """a + scale·b elementwise, treating None as zero."""
    out: list[Tensor | None] = []
    for x, y in zip(a, b, strict=True):
        if y is None:
            out.append(x)
        elif x is None:
            out.append(scale * y)
        else:
            out.append(x + scale * y)
    return out
