"""Inner solvers: a few optimizer steps on the inner loss, warm-started from the last solution."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from funcbo.distributed import all_reduce_mean_
from funcbo.problem import Batch, BilevelProblem, check_finite_tensors


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop tracking gradients of a module's parameters (restored afterwards).

    Inner steps need gradients for the inner weights only; freezing ω avoids building its graph.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """``p.grad`` of every parameter from ``grads`` (None: zero), averaged across ranks."""
    full = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    all_reduce_mean_(full)
    for p, g in zip(params, full, strict=True):
        p.grad = g


def _check_weights(params: Sequence[torch.Tensor], when: str) -> None:
    check_finite_tensors(
        params,
        f"the inner model's weights {when}",
        "the inner problem diverged: lower the inner learning rate",
    )


class InnerSolver:
    """``steps`` optimizer steps on L_in(ω, h_θ) = mean ℓ_in(ω, h_θ(x), ·) in θ, ω held fixed.

    The optimizer is called with a closure (which recomputes loss and gradients), so SGD, Adam and
    LBFGS all work. Under ``torch.distributed`` gradients are averaged across ranks.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
        if steps < 0:
            raise ValueError(f"inner steps must be ≥ 0, got {steps}")
        self.model = model
        self.optimizer = optimizer
        self.steps = steps

    def run(
        self,
        problem: BilevelProblem,
        outer: nn.Module,
        batches: Sequence[Batch],
        objective: Any = None,
    ) -> float:
        """Take the steps; returns the inner loss of the last step (NaN when steps = 0).

        ``objective(model, batch) -> scalar`` replaces the inner loss (penalty methods use it).
        """
        params = self._params()
        last = float("nan")
        for k in range(self.steps):
            batch = batches[k % len(batches)]

            def closure(batch: Batch = batch) -> torch.Tensor:
                if objective is None:
                    with frozen(outer):
                        pred = problem.predict(self.model, batch, "inner")
                        loss = problem.eval_inner(outer, pred, batch).mean()
                else:
                    loss = objective(self.model, batch)
                _set_grads(params, torch.autograd.grad(loss, params, allow_unused=True))
                return loss.detach()

            loss = self.optimizer.step(closure)  # type: ignore[arg-type] # torch types the closure as returning a float; optimizers accept a Tensor
            self.optimizer.zero_grad(set_to_none=True)
            last = float(loss) if loss is not None else float("nan")
        if self.steps:
            _check_weights(params, f"after {self.steps} inner steps")
        return last

    def step_with(self, grads: Sequence[torch.Tensor | None]) -> None:
        """One optimizer step with given gradients of the trainable parameters (in
        ``model.parameters()`` order; None: zero), averaged across ranks as in :meth:`run`.

        For a step whose gradient comes from a graph shared with other quantities
        (``ValuePenalty(joint=True)``: θ's step from the point of ω's gradient).
        """
        params = self._params()
        _set_grads(params, grads)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _check_weights(params, "after a step with given gradients")

    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def make_inner_solver(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    steps: int,
    solver: InnerSolver | None = None,
) -> InnerSolver:
    """The inner solver of an estimator: ``solver`` if given (it must train ``model``), else
    ``InnerSolver(model, optimizer, steps)``."""
    if solver is not None:
        if solver.model is not model:
            raise ValueError("the inner solver must train the estimator's inner model")
        return solver
    if optimizer is None:
        raise ValueError("pass an inner optimizer (or an inner_solver)")
    return InnerSolver(model, optimizer, steps)
