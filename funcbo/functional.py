"""FuncID: functional implicit differentiation (Petrulionyte, Mairal & Arbel, NeurIPS 2024).

For F(ω) = L_out(ω, h*_ω) with h*_ω = argmin_h L_in(ω, h) over functions, the implicit function
theorem in L2 gives

    ∇F(ω) = g_ω + B a*,       g_ω = E_out[∂_ω ℓ_out(ω, h(x))],
                              B a = E_in[∂_ω ∂_v ℓ_in(ω, h(x)) · a(x)],
    a* = argmin_a ½ E_in[a(x)ᵀ ∂²_v ℓ_in(ω, h(x)) a(x)] + E_out[∂_v ℓ_out(ω, h(x))ᵀ a(x)]
       = −C⁻¹ d   (C = ∂²_h L_in, d = ∂_h L_out).

Every derivative above is taken with respect to ω or to the prediction v = h(x); FuncID never
differentiates through the inner network's weights, which is what makes it cheap and what lets
the inner problem be non-convex in those weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from funcbo.adjoints import Adjoint, AdjointProblem, LinearAdjoint
from funcbo.diagnostics import Diagnostics
from funcbo.estimator import (
    ImplicitEstimator,
    ImplicitStats,
    add_grads,
    finish_outer_grads_and_norm,
    trainable,
)
from funcbo.inner import InnerSolver, make_inner_solver
from funcbo.linalg import OutputHessian
from funcbo.memory import PhaseMeter
from funcbo.problem import Batch, BilevelProblem, check_finite_tensors, check_pred


@dataclass(frozen=True, kw_only=True)
class FuncIDStats(ImplicitStats):
    """Diagnostics of a FuncID step: the losses and gradient norm, and the adjoint's solve.

    Attributes:
        adjoint: the adjoint's diagnostics (:class:`~funcbo.adjoints.AdjointStats`).
    """

    adjoint: Diagnostics | None = None

    def method_metrics(self) -> dict[str, float]:
        return {} if self.adjoint is None else self.adjoint.metrics()

    @property
    def solves_gave_up(self) -> int:
        return 0 if self.adjoint is None else self.adjoint.solves_gave_up


class FuncID(ImplicitEstimator):
    """Functional implicit differentiation (Algorithm 1 of the FuncID paper, one outer step).

    ``step`` runs ``inner_steps`` optimizer steps on the inner model, then fits the adjoint and
    returns ∇F(ω) ≈ g_ω + B a (see the module docstring).

    Args:
        inner_model: the network h_θ representing the inner solution; output ``[B, d_v]``.
        inner_optimizer: optimizer over ``inner_model``'s parameters (SGD, Adam, LBFGS, ...).
        inner_steps: optimizer steps per outer iteration (warm-started from the last ones).
        inner_solver: replaces the default :class:`~funcbo.inner.InnerSolver` built from
            ``inner_optimizer`` and ``inner_steps`` (an application's own inner solver, say).
        adjoint: :class:`~funcbo.LinearAdjoint` (default) or :class:`~funcbo.NetworkAdjoint`.
        check_convexity: verify on every step that the output Hessians are positive definite
            (raises :class:`~funcbo.NotStronglyConvexError`).
        dense_hessian_max: store per-sample output Hessians densely up to this output size.
        phase_meter: a :class:`~funcbo.memory.PhaseMeter` that times each call's phases
            (``forward``, ``outer_grad``, ``hessian``, ``solve``, ``cross``) and their peak
            memory; None (default) measures nothing.
    """

    def __init__(
        self,
        inner_model: nn.Module,
        inner_optimizer: torch.optim.Optimizer | None,
        inner_steps: int = 1,
        adjoint: Adjoint | None = None,
        *,
        inner_solver: InnerSolver | None = None,
        check_convexity: bool = False,
        dense_hessian_max: int = 128,
        phase_meter: PhaseMeter | None = None,
    ) -> None:
        self.inner_model = inner_model
        self.inner = make_inner_solver(inner_model, inner_optimizer, inner_steps, inner_solver)
        self.inner_steps = max(self.inner.steps, 1)
        self.adjoint = adjoint if adjoint is not None else LinearAdjoint()
        self.adjoint.bind(inner_model)
        self.check_convexity = check_convexity
        self.dense_hessian_max = dense_hessian_max
        self.phase_meter = phase_meter
        self.diagnostics: FuncIDStats | Diagnostics | None = None

    def _phase(self, name: str) -> AbstractContextManager[None]:
        return nullcontext() if self.phase_meter is None else self.phase_meter.phase(name)

    def hypergradient(
        self, problem: BilevelProblem, outer: nn.Module, inner_batch: Batch, outer_batch: Batch
    ) -> tuple[Tensor, ...]:
        """∇F(ω) at the current inner model (no inner steps)."""
        if self.phase_meter is not None:
            self.phase_meter.start()
        params = trainable(outer)
        x_in = problem.input(inner_batch, "inner")
        x_out = problem.input(outer_batch, "outer")

        # Predictions without any graph to θ; the adjoint takes what else it needs from the
        # inner model (LinearAdjoint: the last hidden features) and holds it until its solve.
        with self._phase("forward"), torch.no_grad():
            v_in, v_out = self.adjoint.prepare(self.inner_model, x_in, x_out)
        v_in = check_pred(v_in, "inner model output").detach()
        v_out = check_pred(v_out, "inner model output").detach()

        # g_ω and the per-sample output gradients g_j = ∂_v ℓ_out at the outer points.
        with self._phase("outer_grad"):
            v_out.requires_grad_(True)
            l_out = problem.eval_outer(outer, v_out, outer_batch)
            m = l_out.shape[0]
            outer_grads = torch.autograd.grad(l_out.mean(), [v_out, *params], allow_unused=True)
            g_out = outer_grads[0]
            g_out = torch.zeros_like(v_out) if g_out is None else g_out * m
            g_omega = list(outer_grads[1:])

        # Output-space Hessians of the inner loss at the inner points (ω fixed).
        with self._phase("hessian"):
            hess = problem.output_hessian(outer, v_in, inner_batch)
            if hess is None:
                hess = OutputHessian.of_loss(
                    lambda v: problem.inner_loss(outer, v, inner_batch),
                    v_in,
                    dense=True if self.check_convexity else None,
                    dense_max=self.dense_hessian_max,
                )
            if self.check_convexity:
                hess.check_positive()

        with self._phase("solve"):
            prob = AdjointProblem(x_in, x_out, hess, g_out.detach())
            a_in = self.adjoint.solve(prob)
            del prob
        check_finite_tensors(
            [a_in],
            f"the adjoint ({type(self.adjoint).__name__}) values",
            "lower the adjoint learning rate, or raise LinearAdjoint's ridge",
        )

        # B a = ∂_ω ⟨∂_v L_in(ω, v), a⟩ at v = h(x_in): a mixed derivative in ω and the output.
        with self._phase("cross"):
            v = v_in.clone().requires_grad_(True)
            l_in = problem.eval_inner(outer, v, inner_batch)
            (gv,) = torch.autograd.grad(l_in.mean(), v, create_graph=True)
            cross: Sequence[Tensor | None]
            if params and gv.requires_grad:
                cross = torch.autograd.grad(gv, params, grad_outputs=a_in, allow_unused=True)
            else:
                cross = [None] * len(params)
        total = add_grads(g_omega, cross)
        out, norm = finish_outer_grads_and_norm(outer, total)
        self.diagnostics = FuncIDStats(
            outer_loss=float(l_out.detach().mean()),
            inner_loss_at_hypergrad=float(l_in.detach().mean()),
            grad_norm=norm,
            adjoint=self.adjoint.diagnostics,
        )
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "adjoint": self.adjoint.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.adjoint.load_state_dict(state["adjoint"])


__all__ = ["FuncID", "FuncIDStats"]
