"""The identity output-Hessian shortcut for FuncID's adjoint (no adjoint fitting)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from funcbo.adjoints import Adjoint, AdjointProblem, AdjointStats, adjoint_objective
from funcbo.errors import ShapeError


class PointwiseAdjoint(Adjoint):
    """a(x_i) = −H_i⁻¹ g_i at the sampled points; with ``use_hessian=False``, a = −g (H ≈ I).

    FuncID's adjoint solves a* = argmin_a ½ E_in[aᵀ H a] + E_out[gᵀ a]. When inner and outer
    expectations are over the same distribution, its minimiser is a*(x) = −H(x)⁻¹ E[g | x]: the
    conditional mean of the outer gradient given the inner model's input x = (s, a). A learned
    adjoint network estimates this regression; this shortcut replaces it by the single-sample
    value −H_i⁻¹ g_i at the batch's own points. For the Bellman losses of this application
    H_i = I, so a_i = −g_i = −(v_i − y_i) (the negative real Bellman residual), and

        B a = −(1/n) Σ_i ∂_ω∂_v ℓ_in(ω, v_i) g_i

    is an unbiased but noisier estimate of the functional hypergradient's second term (E[g|x]
    is replaced by g). It is exact for the empirical problem on the batch (a tabular inner model
    whose values at the n points are free) and it costs no adjoint steps. It requires the inner
    and outer batches to be the same points (checked).

    Args:
        use_hessian: divide by the per-sample output Hessians (−H_i⁻¹ g_i) instead of assuming
            H_i = I. Needs dense or isotropic Hessians.
        check_same_points: verify that the inner and outer inputs are equal (cheap tensor
            comparison); turn off only if the caller guarantees it.
    """

    def __init__(self, *, use_hessian: bool = False, check_same_points: bool = True) -> None:
        self.use_hessian = use_hessian
        self.check_same_points = check_same_points
        self.diagnostics: AdjointStats | None = None

    def prepare(self, inner_model: nn.Module, x_in: Any, x_out: Any) -> tuple[Tensor, Tensor]:
        """The predictions at the inner and outer inputs; one forward pass when they are the
        same object (the shortcut's own case: one batch as inner and outer batch)."""
        v_in = inner_model(x_in)
        return v_in, v_in if x_out is x_in else inner_model(x_out)

    def solve(self, prob: AdjointProblem) -> Tensor:
        g = prob.g_out.detach()
        n_in = prob.hessian.shape[0]
        if g.shape[0] != n_in:
            raise ShapeError(
                f"PointwiseAdjoint needs the inner and outer batches to be the same points; got "
                f"{n_in} inner and {g.shape[0]} outer samples"
            )
        if self.check_same_points and not _same_inputs(prob.x_in, prob.x_out):
            raise ValueError(
                "PointwiseAdjoint needs the inner and outer batches to be the same points "
                "(pass the same batch as inner and outer batch)"
            )
        H = prob.hessian
        if not self.use_hessian:
            a = -g
        elif H.isotropic is not None:
            a = -g / H.isotropic[:, None]
        elif H.dense is not None:
            a = -torch.linalg.solve(H.dense, g.unsqueeze(-1)).squeeze(-1)
        else:
            raise ValueError(
                "PointwiseAdjoint(use_hessian=True) needs dense output Hessians (small d_v)"
            )
        J = adjoint_objective(a, H.matvec(a), a, g)
        self.diagnostics = AdjointStats(float(J))
        return a


def _same_inputs(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_inputs(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_inputs(a[k], b[k]) for k in a)
    return False


__all__ = ["PointwiseAdjoint"]
