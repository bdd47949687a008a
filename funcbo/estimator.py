"""The interface shared by every hypergradient estimator."""

from __future__ import annotations

import dataclasses
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from funcbo.diagnostics import Diagnostics, Metrics, mean_over_ranks
from funcbo.distributed import all_reduce_mean_
from funcbo.errors import EmptyBatchError, NonFiniteLossError
from funcbo.problem import Batch, BilevelProblem, check_finite_tensors


@dataclass(frozen=True, kw_only=True)
class StepStats(Diagnostics):
    """Diagnostics of one estimator step (ITD's; the base of the others).

    Attributes:
        outer_loss: L_out at the step's inner model (``outer_loss``).
        grad_norm: ‖∇F(ω)‖ of the returned estimate (``grad_norm``).
        inner_loss: L_in after the inner steps (``inner_loss``; None: no inner steps were run,
            as when :meth:`ImplicitEstimator.hypergradient` is called alone).
    """

    outer_loss: float
    grad_norm: float
    inner_loss: float | None = None

    def metrics(self) -> dict[str, float]:
        out = {} if self.inner_loss is None else {"inner_loss": self.inner_loss}
        return {**out, "outer_loss": self.outer_loss, "grad_norm": self.grad_norm}


@dataclass(frozen=True, kw_only=True)
class ImplicitStats(StepStats):
    """Diagnostics of an implicit estimator's step (FuncID's and AID's extend it).

    Attributes:
        inner_loss_at_hypergrad: L_in at the inner model the hypergradient is taken at
            (``inner_loss_at_hypergrad``).
    """

    inner_loss_at_hypergrad: float

    def method_metrics(self) -> dict[str, float]:
        """The metrics of the estimator's own solve, between the losses and ``inner_loss``."""
        return {}

    def metrics(self) -> dict[str, float]:
        out = {
            "outer_loss": self.outer_loss,
            "inner_loss_at_hypergrad": self.inner_loss_at_hypergrad,
            "grad_norm": self.grad_norm,
            **self.method_metrics(),
        }
        if self.inner_loss is not None:
            out["inner_loss"] = self.inner_loss
        return out


class HypergradientEstimator(ABC):
    """Approximates the total gradient ∇F(ω) of a bilevel problem.

    ``step(problem, outer, inner_batches, outer_batch)`` advances the estimator's inner state
    (inner steps, adjoint steps, ...) and returns the estimate as a tuple aligned with
    ``outer.parameters()`` (zeros for frozen parameters); it also writes it to the ``.grad`` of
    the trainable parameters, overwriting them, so that any torch optimizer can take the outer
    step. Diagnostics of the last step are in ``diagnostics``, a typed record (such as
    :class:`StepStats`), and ``stats`` is that record as the metrics dictionary that is logged;
    under ``torch.distributed`` they are means over the ranks
    (:func:`~funcbo.diagnostics.mean_over_ranks`), so that the losses are those of the whole
    batch.

    ``inner_batches`` is one batch, or several wrapped in :class:`Batches`: inner step k uses
    batch ``k mod len(inner_batches)``, and the adjoint and the hypergradient use the last one.
    A plain list or tuple is *one* batch (``(x, y)``, or ``[x, y]`` as a ``DataLoader`` over a
    ``TensorDataset`` yields it); see :func:`as_batch_list`.

    Every estimator raises :class:`~funcbo.NonFiniteLossError` when the inner model's weights,
    the adjoint or the hypergradient stop being finite (a diverging inner problem, say), rather
    than passing NaN or infinity on to the outer optimizer.
    """

    #: how many inner batches one step consumes (the Trainer draws this many)
    inner_steps: int = 1
    #: the diagnostics of the last step (None before the first)
    diagnostics: Diagnostics | None = None

    @property
    def stats(self) -> dict[str, float]:
        """The last step's diagnostics as the metrics that are logged (empty before the first).
        An estimator may also assign a plain dictionary (kept as a :class:`Metrics` record)."""
        return {} if self.diagnostics is None else self.diagnostics.metrics()

    @stats.setter
    def stats(self, values: Mapping[str, float]) -> None:
        self.diagnostics = Metrics(dict(values))

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
        d = self.diagnostics
        if isinstance(d, StepStats):
            d = dataclasses.replace(d, inner_loss=inner_loss)
        else:
            d = Metrics({**self.stats, "inner_loss": inner_loss})
        self.diagnostics = mean_over_ranks(d)
        return grads

    @abstractmethod
    def hypergradient(
        self, problem: BilevelProblem, outer: nn.Module, inner_batch: Batch, outer_batch: Batch
    ) -> tuple[Tensor, ...]:
        """∇F(ω) at the current inner model (no inner steps)."""


class Batches(list):
    """Several inner batches for one estimator step (a ``list`` that says so).

    ``est.step(problem, outer, Batches([b0, b1, b2]), outer_batch)`` runs inner step k on batch
    ``k mod 3``; the :class:`~funcbo.Trainer` passes the batches it draws this way. Without the
    wrapper a list or tuple is one batch.
    """


def as_batch_list(inner_batches: Batch | Sequence[Batch]) -> list[Batch]:
    """The inner batches of one step, as a non-empty list.

    - :class:`Batches` ``([b0, b1, ...])``: those batches;
    - anything else is one batch: a dict, a tensor, a tuple or list of tensors such as
      ``(x, y)`` or the ``[x, y]`` a ``DataLoader`` over a ``TensorDataset`` yields.

    For compatibility, a plain list or tuple whose items are all dicts, lists or tuples (and so
    cannot be a batch of tensors) is still read as several batches, with a
    ``DeprecationWarning``: wrap them in :class:`Batches`.

    Raises:
        EmptyBatchError: ``Batches([])``.
    """
    if isinstance(inner_batches, Batches):
        if not inner_batches:
            raise EmptyBatchError("Batches([]) holds no inner batch")
        return list(inner_batches)
    if (
        isinstance(inner_batches, (list, tuple))
        and inner_batches
        and all(isinstance(b, (Mapping, list, tuple)) for b in inner_batches)
    ):
        warnings.warn(
            "a plain list of batches passed as inner_batches: wrap it in funcbo.Batches "
            "(a plain list or tuple will be read as one batch)",
            DeprecationWarning,
            stacklevel=3,
        )
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
    return finish_outer_grads_and_norm(outer, grads)[0]


def finish_outer_grads_and_norm(
    outer: nn.Module, grads: Sequence[Tensor | None]
) -> tuple[tuple[Tensor, ...], float]:
    """:func:`finish_outer_grads` and the :func:`grad_norm` of its result (computed once: the
    entries of frozen parameters it adds are zeros)."""
    params = trainable(outer)
    full = [
        torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)
    ]
    all_reduce_mean_(full)
    diverged = "the inner or outer iterates diverged: lower the learning rates (or ITD's step)"
    check_finite_tensors(full, "the hypergradient's entries", diverged)
    norm = grad_norm(full)
    if not math.isfinite(norm):
        raise NonFiniteLossError(
            f"the hypergradient's norm overflows (largest entry "
            f"{max(float(g.abs().max()) for g in full if g.numel()):.3g}): {diverged}"
        )
    for p, g in zip(params, full, strict=True):
        p.grad = g
    it = iter(full)
    out = tuple(next(it) if p.requires_grad else torch.zeros_like(p) for p in outer.parameters())
    return out, norm


def grad_norm(grads: Sequence[Tensor]) -> float:
    """Euclidean norm of a tuple of gradients."""
    if not grads:
        return 0.0
    zero = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    return float(torch.sqrt(sum(((g.detach().double() ** 2).sum() for g in grads), zero)))


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
