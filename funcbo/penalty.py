"""Penalty baselines: replace the bilevel problem by a single-level one over (ω, θ).

* gradient-norm penalty:  min_{ω,θ} L_out(ω, θ) + (γ/2)·‖∇_θ L_in(ω, θ)‖²
* value-function penalty: min_{ω,θ} L_out(ω, θ) + γ·(L_in(ω, θ) − min_θ' L_in(ω, θ'))

(Shen & Chen 2023; Kwon et al. 2023). Both approach the bilevel solution as γ → ∞ with an O(1/γ)
bias. The θ-steps minimise the penalised objective divided by γ (so inner learning rates keep
their usual scale); the returned outer gradient is that of the penalised objective itself.
Under ``torch.distributed`` the θ-step gradients and the outer gradient are averaged across
ranks; the gradient-norm penalty is the per-rank ‖∇_θ L_in‖², not the norm of the global mean,
so its value (and the θ-steps it drives) depends on the number of ranks: for a shard of b
samples, E‖∇_θ L_in‖² over the shard exceeds ‖∇_θ L_in‖² of the whole batch by the variance of a
b-sample mean. The logged ``penalty`` is the mean over the ranks of that per-rank term; the
losses are means over the whole batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from funcbo.diagnostics import Diagnostics, mean_over_ranks
from funcbo.estimator import (
    HypergradientEstimator,
    StepStats,
    add_grads,
    as_batch_list,
    finish_outer_grads,
    grad_norm,
    trainable,
)
from funcbo.inner import InnerSolver, frozen
from funcbo.problem import Batch, BilevelProblem


def norm_from_squares(sq: Tensor) -> Tensor:
    """√sq elementwise, with gradient 0 (not ∞) where sq = 0: a gradient norm from its square."""
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def gradient_penalty_term(sq: Tensor, squared: bool) -> Tensor:
    """:class:`GradientPenalty`'s penalty from the squared gradient norm ``sq``: ½·sq, or the
    norm √sq when not ``squared``."""
    return 0.5 * sq if squared else norm_from_squares(sq)


def _losses(
    problem: BilevelProblem,
    model: nn.Module,
    outer: nn.Module,
    inner_batch: Batch,
    outer_batch: Batch,
) -> tuple[Tensor, Tensor]:
    pred_in = problem.predict(model, inner_batch, "inner")
    pred_out = problem.predict(model, outer_batch, "outer")
    l_in = problem.eval_inner(outer, pred_in, inner_batch).mean()
    l_out = problem.eval_outer(outer, pred_out, outer_batch).mean()
    return l_in, l_out


@dataclass(frozen=True, kw_only=True)
class PenaltyStats(StepStats):
    """Diagnostics of a penalty method's step.

    Attributes:
        penalty: the penalty term (``penalty``): ½‖∇_θ L_in‖² (‖∇_θ L_in‖ when not squared),
            or L_in − L_in(θ̂) for the value-function penalty.
        value_loss: :class:`ValuePenalty`: L_in(θ̂) (``value_loss``).
    """

    penalty: float
    value_loss: float | None = None

    def metrics(self) -> dict[str, float]:
        out = {} if self.inner_loss is None else {"inner_loss": self.inner_loss}
        out["outer_loss"] = self.outer_loss
        if self.value_loss is not None:
            out["value_loss"] = self.value_loss
        return {**out, "penalty": self.penalty, "grad_norm": self.grad_norm}


class GradientPenalty(HypergradientEstimator):
    """Gradient-norm penalty method.

    θ-steps descend L_out/γ + ½‖∇_θ L_in‖² (a parameter-space Hessian-vector product each); the
    outer gradient is ∂_ω L_out + γ·∂_ω ½‖∇_θ L_in‖². With ``squared=False`` the penalty is the
    norm itself, ‖∇_θ L_in‖, as the authors' IV code writes it (its gradient H·g/‖g‖ does not
    vanish as g → 0, where the squared norm's H·g does). Under ``torch.distributed`` the
    penalty is computed on each rank's shard (see the module docstring).

    Args:
        inner_model, inner_optimizer, inner_steps: the inner network and its θ-steps.
        penalty: γ > 0.
        squared: penalise ½‖∇_θ L_in‖² (default) or ‖∇_θ L_in‖.
    """

    def __init__(
        self,
        inner_model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        inner_steps: int = 1,
        *,
        penalty: float = 10.0,
        squared: bool = True,
    ) -> None:
        if not penalty > 0:
            raise ValueError(f"penalty must be > 0, got {penalty}")
        self.inner_model = inner_model
        self.inner = InnerSolver(inner_model, inner_optimizer, inner_steps)
        self.inner_steps = max(inner_steps, 1)
        self.penalty = penalty
        self.squared = bool(squared)
        self.diagnostics: PenaltyStats | Diagnostics | None = None

    def _penalised(
        self, problem: BilevelProblem, outer: nn.Module, inner_batch: Batch, outer_batch: Batch
    ) -> tuple[Tensor, Tensor, Tensor]:
        theta = trainable(self.inner_model)
        l_in, l_out = _losses(problem, self.inner_model, outer, inner_batch, outer_batch)
        G = torch.autograd.grad(l_in, theta, create_graph=True, allow_unused=True)
        sq: Tensor = sum((g**2).sum() for g in G if g is not None)  # type: ignore[assignment]
        return l_in, l_out, gradient_penalty_term(sq, self.squared)

    def step(
        self,
        problem: BilevelProblem,
        outer: nn.Module,
        inner_batches: Batch | Sequence[Batch],
        outer_batch: Batch,
    ) -> tuple[Tensor, ...]:
        batches = as_batch_list(inner_batches)

        def objective(_model: nn.Module, batch: Batch) -> Tensor:
            with frozen(outer):
                _, l_out, pen = self._penalised(problem, outer, batch, outer_batch)
            return l_out / self.penalty + pen

        self.inner.run(problem, outer, batches, objective=objective)
        l_in, l_out, pen = self._penalised(problem, outer, batches[-1], outer_batch)
        omega = trainable(outer)
        grads = torch.autograd.grad(l_out + self.penalty * pen, omega, allow_unused=True)
        out = finish_outer_grads(outer, list(grads))
        stats = PenaltyStats(
            inner_loss=float(l_in.detach()),
            outer_loss=float(l_out.detach()),
            penalty=float(pen.detach()),
            grad_norm=grad_norm(out),
        )
        self.diagnostics = mean_over_ranks(stats)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])


class ValuePenalty(HypergradientEstimator):
    """Value-function penalty method.

    A second network θ̂ tracks min_θ' L_in(ω, θ') with ``value_steps`` optimizer steps; θ-steps
    descend L_out/γ + L_in; the outer gradient is (Danskin's theorem for the min term)

        ∂_ω L_out(ω, θ) + γ·(∂_ω L_in(ω, θ) − ∂_ω L_in(ω, θ̂)).

    With ``joint=True`` the θ-steps descend the penalised objective itself,
    L_out + γ·L_in (the scale at which an optimizer's coupled weight decay and ε act), and the
    last θ-step is taken from the point where the outer gradient is taken, with that point's
    gradient: with ``inner_steps=1`` a step of θ and the caller's step of ω are one step of a
    single optimizer over (ω, θ) on L_out + γ·(L_in(ω, θ) − L_in(ω, θ̂)), after the θ̂ steps
    (the authors' value-function penalty for IV regression, ``PenaltyBasedMinMax``).

    Args:
        inner_model, inner_optimizer, inner_steps: the inner network and its θ-steps.
        penalty: γ > 0.
        value_model: the network θ̂ (default: a copy of the inner model).
        value_optimizer: its optimizer (default: the inner optimizer's class and settings).
        value_steps: optimizer steps on θ̂ per outer iteration (default: inner_steps).
        joint: θ's last step simultaneous with ω's, on the penalised objective (see above).
    """

    def __init__(
        self,
        inner_model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        inner_steps: int = 1,
        *,
        penalty: float = 10.0,
        value_model: nn.Module | None = None,
        value_optimizer: torch.optim.Optimizer | None = None,
        value_steps: int | None = None,
        joint: bool = False,
    ) -> None:
        if not penalty > 0:
            raise ValueError(f"penalty must be > 0, got {penalty}")
        if joint and inner_steps < 1:
            raise ValueError(
                f"joint=True takes inner_steps ≥ 1 (the last one joint), got {inner_steps}"
            )
        self.inner_model = inner_model
        self.joint = joint
        # joint: the last θ-step is taken in step(), from the outer gradient's point
        self.inner = InnerSolver(inner_model, inner_optimizer, inner_steps - int(joint))
        self.inner_steps = max(inner_steps, 1)
        self.penalty = penalty
        self.value_model = value_model if value_model is not None else copy.deepcopy(inner_model)
        if value_optimizer is None:
            value_optimizer = type(inner_optimizer)(
                self.value_model.parameters(), **inner_optimizer.defaults
            )
        steps = inner_steps if value_steps is None else value_steps
        self.value = InnerSolver(self.value_model, value_optimizer, steps)
        self.diagnostics: PenaltyStats | Diagnostics | None = None

    def step(
        self,
        problem: BilevelProblem,
        outer: nn.Module,
        inner_batches: Batch | Sequence[Batch],
        outer_batch: Batch,
    ) -> tuple[Tensor, ...]:
        batches = as_batch_list(inner_batches)
        self.value.run(problem, outer, batches)

        def objective(model: nn.Module, batch: Batch) -> Tensor:
            with frozen(outer):
                l_in, l_out = _losses(problem, model, outer, batch, outer_batch)
            return l_out + self.penalty * l_in if self.joint else l_out / self.penalty + l_in

        self.inner.run(problem, outer, batches, objective=objective)
        omega = trainable(outer)
        theta = trainable(self.inner_model) if self.joint else []
        batch = batches[-1]
        l_in, l_out = _losses(problem, self.inner_model, outer, batch, outer_batch)
        pred_hat = problem.predict(self.value_model, batch, "inner").detach()
        l_hat = problem.eval_inner(outer, pred_hat, batch).mean()
        g_both = torch.autograd.grad(
            l_out + self.penalty * l_in, [*omega, *theta], allow_unused=True
        )
        g_main, g_theta = g_both[: len(omega)], g_both[len(omega) :]
        g_hat = torch.autograd.grad(l_hat, omega, allow_unused=True)
        out = finish_outer_grads(outer, add_grads(list(g_main), list(g_hat), scale=-self.penalty))
        if self.joint:
            self.inner.step_with(g_theta)
        stats = PenaltyStats(
            inner_loss=float(l_in.detach()),
            outer_loss=float(l_out.detach()),
            value_loss=float(l_hat.detach()),
            penalty=float((l_in - l_hat).detach()),
            grad_norm=grad_norm(out),
        )
        self.diagnostics = mean_over_ranks(stats)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "value": self.value.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.value.load_state_dict(state["value"])


__all__ = ["GradientPenalty", "PenaltyStats", "ValuePenalty"]
