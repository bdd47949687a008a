"""FuncID's adjoint evaluated at the function-space inner solution of the RL problem.

The inner loss ½Σ_k (v_k − ŷ)² is minimised over *functions* by h*(s, a) = ŷ(s, a) for every
head k, in closed form: ŷ = r̂ + γ(1 − d) V̄(ŝ′) is the model's own Bellman target. The functional
adjoint is a*(x) = −H⁻¹ E[∂_v ℓ_out(ω, h*(x)) | x] = −(ŷ − y) (H = I; CartPole is deterministic,
so the conditional mean is the value itself), and the implicit function theorem gives

    ∇F(ω) = E[∂_ω∂_v ℓ_in(ω, h*(x)) a*(x)] = mean_i Σ_k (ŷ_i − y_i) ∂_ω ŷ_i,

the exact gradient of F(ω) = mean ½Σ_k (ŷ − y)² (the outer loss at h*). The Q-network trained
by one Adam step per environment step is a lagging estimate of h*; evaluating the adjoint at the
Q-network's prediction instead, a = −(Q − y), keeps pushing ŷ while Q lags behind it.

:class:`BellmanSolution` is h* as an inner model for :class:`~funcbo.FuncID` (its input is
``(obs, action, not_done)``, see :class:`SolutionProblem`); FuncID then runs unchanged with the
pointwise adjoint (exact, variant ``funcid_solution``) or an adjoint network that regresses the
same target (``funcid_network``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from funcbo.apps.rl.problem import SoftBellmanProblem
from funcbo.inner import InnerSolver
from funcbo.problem import BilevelProblem

_SOLUTION_INPUT = "_solution_input"


class SolutionProblem(SoftBellmanProblem):
    """The RL problem whose inner model input also carries the bootstrap mask.

    h*(s, a) needs 1 − d to form ŷ, so the inner input is ``(obs, action, not_done)``; every loss
    is that of :class:`SoftBellmanProblem`.
    """

    @classmethod
    def like(cls, problem: SoftBellmanProblem) -> SolutionProblem:
        """The same γ, α, target and next-state evaluation as ``problem``."""
        return cls(problem.gamma, problem.alpha, problem.target, problem.next_value)

    def inner_input(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        # one tuple per batch: estimators recognise the same points by identity
        x = batch.get(_SOLUTION_INPUT)
        if x is None:
            x = batch[_SOLUTION_INPUT] = (batch["obs"], batch["action"], batch["not_done"])
        return x


class BellmanSolution(nn.Module):
    """h*(s, a) = ŷ(s, a) for each of ``heads`` heads: the inner problem's minimiser over functions.

    ŷ = r̂ + γ(1 − d) V̄(ŝ′) with (ŝ′, r̂) = T_ω(s, a), computed without a graph (FuncID only
    needs the value of the inner solution). The model and the target network are held by
    reference, not registered: this module has no parameters of its own.

    Input ``(obs [B, d], action [B], not_done [B, 1])``; output ``[B, heads]``.
    """

    # set through __dict__ (not registered), declared for the type checker
    model: nn.Module
    target_q: nn.Module

    def __init__(
        self, problem: SoftBellmanProblem, model: nn.Module, target_q: nn.Module, heads: int = 2
    ) -> None:
        super().__init__()
        if problem.next_value != "model":
            raise ValueError("BellmanSolution solves the problem with next_value='model'")
        self.problem = problem
        self.heads = heads
        # plain attributes: their parameters belong to the model and the target network
        self.__dict__["model"] = model
        self.__dict__["target_q"] = target_q
        self._params = [*model.parameters(), *target_q.parameters()]
        self._memo: tuple[tuple[Tensor, ...], Tensor, tuple[int, ...]] | None = None

    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._params)

    def remember(self, inputs: tuple[Tensor, ...], y: Tensor) -> None:
        """Take ŷ at ``inputs`` as known (the caller computed it with this problem, model and
        target network): the next calls on these very inputs return it while the model's and
        the target network's parameters are unchanged (same tensor versions)."""
        self._memo = (inputs, y.detach(), self._versions())

    def forward(self, inputs: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        obs, action, not_done = inputs
        memo = self._memo
        if memo is not None and memo[0] is inputs and memo[2] == self._versions():
            return memo[1].expand(obs.shape[0], self.heads)
        with torch.no_grad():
            ns, r = self.model(obs, action)
            y = self.problem.bellman_target(self.target_q, r, ns, not_done)
        return y.expand(obs.shape[0], self.heads)


class StateActionInput(nn.Module):
    """``module((obs, action))`` on the solution problem's input ``(obs, action, not_done)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, inputs: tuple[Tensor, ...]) -> Tensor:
        return self.module(inputs[:2])


class NoInnerSteps(InnerSolver):
    """An inner solver that takes no steps: the inner model is already the inner solution."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.optimizer = None  # type: ignore[assignment]
        self.steps = 0

    def run(
        self,
        problem: BilevelProblem,
        outer: nn.Module,
        batches: Any,
        objective: Any = None,
    ) -> float:
        return math.nan

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


__all__ = [
    "BellmanSolution",
    "NoInnerSteps",
    "SolutionProblem",
    "StateActionInput",
]
