"""The FuncID paper's inner solver for 2SLS: feature steps through a closed-form ridge head.

The inner model is h(x) = W [φ(x); 1] (an :class:`~funcbo.apps.iv.networks.InstrumentModel`).
Each of the ``steps`` optimizer steps descends, in the feature network's weights only,

    L₁(φ) = (1/n)‖ψ_ω(t) − [φ(z), 1]W(φ)‖² + λ‖W(φ)‖²,   W(φ) = ridge(φ(z) → ψ_ω(t), λ),

differentiating through the ridge fit (as DFIV's stage 1), with ω fixed (ψ_ω evaluated in eval
mode, so its spectral norms do not iterate); after the last step the head is set to the ridge fit
W(φ) on the last batch. So the head is always the best linear map on the current features
instead of chasing ψ_ω with gradient steps. This is the ``CompositeSolver`` of the authors' code
(github.com/inria-thoth/funcBO, ``funcBO/solvers.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from funcbo.apps.iv.evaluate import eval_mode
from funcbo.apps.iv.networks import InstrumentModel
from funcbo.apps.iv.ridge import ridge_fit, ridge_objective
from funcbo.inner import InnerSolver, frozen
from funcbo.problem import Batch, BilevelProblem


class RidgeHeadInnerSolver(InnerSolver):
    """Inner steps on the instrument features through a closed-form ridge head (see module).

    A drop-in replacement of a :class:`funcbo.inner.InnerSolver` (``estimator.inner``): same
    ``run`` and ``state_dict`` interface; the optimizer must hold ``model.features``'
    parameters only (the head is set, not trained).

    Args:
        model: the inner model, features + linear head.
        optimizer: optimizer over ``model.features.parameters()``.
        steps: optimizer steps per outer iteration.
        ridge: λ of the head's ridge fit (per-sample scale).
    """

    def __init__(
        self, model: InstrumentModel, optimizer: torch.optim.Optimizer, steps: int, ridge: float
    ) -> None:
        super().__init__(model, optimizer, steps)
        head_params = {id(p) for p in model.head.parameters()}
        for group in optimizer.param_groups:
            if any(id(p) in head_params for p in group["params"]):
                raise ValueError(
                    "RidgeHeadInnerSolver's optimizer must not hold the head's parameters "
                    "(the head is set in closed form)"
                )
        self.ridge = ridge
        self._targets: dict[int, torch.Tensor] = {}

    def run(
        self,
        problem: BilevelProblem,
        outer: nn.Module,
        batches: Sequence[Batch],
        objective: Any = None,
    ) -> float:
        if objective is not None:
            raise ValueError("RidgeHeadInnerSolver does not take a replacement objective")
        model: InstrumentModel = self.model  # type: ignore[assignment]
        # ω is fixed during the run: ψ_ω(t) is computed once per batch (the paper's full-batch
        # protocol reuses one batch for every step, so this saves steps − 1 forward passes).
        self._targets = {}
        last = float("nan")
        for k in range(self.steps):
            loss = self._loss(problem, outer, batches[k % len(batches)])[0]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            last = float(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        # The final fit sees the features as they now are (no extra spectral-norm iteration).
        with torch.no_grad(), eval_mode(model):
            _, W = self._loss(problem, outer, batches[(self.steps - 1) % len(batches)])
            model.head.weight.copy_(W[:-1].T)
            model.head.bias.copy_(W[-1])
        self._targets = {}
        return last

    def _loss(
        self, problem: BilevelProblem, outer: nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model: InstrumentModel = self.model  # type: ignore[assignment]
        target = self._targets.get(id(batch["t"]))
        if target is None:
            # ω is fixed here: eval mode, so that spectral norms do not iterate (as in DFIV).
            with torch.no_grad(), frozen(outer), eval_mode(outer):
                target = outer(batch["t"])
            self._targets[id(batch["t"])] = target
        phi = model.features(problem.input(batch, "inner"))
        W = ridge_fit(phi, target, self.ridge)
        return ridge_objective(phi, target, W, self.ridge), W


__all__ = ["RidgeHeadInnerSolver"]
