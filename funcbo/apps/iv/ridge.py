"""Ridge regression with an intercept, the closed-form stages of 2SLS (as in DFIV).

With features F ∈ R^{n×p}, targets Y ∈ R^{n×k} and F̄ = [F, 1],

    W(F, Y) = argmin_W (1/n)‖Y − F̄ W‖² + λ‖W‖²  = (F̄ᵀF̄/n + λI)⁻¹ F̄ᵀY/n.

The intercept is penalised too, as in DFIV's code (the constant column is a feature); DFIV writes
the same objective on sums, ‖Y − F̄W‖² + λ'‖W‖² with λ' = λ·n (its "λ = 0.1·n_stage"). Every
function is differentiable in F and Y (a linear solve), so gradients flow through the fit.
"""

from __future__ import annotations

import torch
from torch import Tensor


def add_intercept(features: Tensor) -> Tensor:
    """[F, 1]: append a column of ones."""
    ones = torch.ones(features.shape[0], 1, dtype=features.dtype, device=features.device)
    return torch.cat([features, ones], dim=1)


def ridge_fit(features: Tensor, target: Tensor, lam: float) -> Tensor:
    """W = (F̄ᵀF̄/n + λI)⁻¹ F̄ᵀY/n, shape ``[p + 1, k]`` (last row: the intercept).

    Args:
        features: F, ``[n, p]``.
        target: Y, ``[n, k]``.
        lam: λ > 0 (per-sample scale: the sum-scale ridge is λ·n).
    """
    if not lam > 0:
        raise ValueError(f"the ridge λ must be > 0, got {lam}")
    if target.dim() != 2 or features.dim() != 2 or target.shape[0] != features.shape[0]:
        raise ValueError(
            f"ridge_fit needs features [n, p] and targets [n, k], got {tuple(features.shape)} "
            f"and {tuple(target.shape)}"
        )
    Fb = add_intercept(features)
    n, q = Fb.shape
    S = Fb.T @ Fb / n + lam * torch.eye(q, dtype=Fb.dtype, device=Fb.device)
    return torch.linalg.solve(S, Fb.T @ target / n)


def ridge_predict(features: Tensor, weight: Tensor) -> Tensor:
    """F̄ W."""
    return add_intercept(features) @ weight


def ridge_objective(features: Tensor, target: Tensor, weight: Tensor, lam: float) -> Tensor:
    """(1/n)‖Y − F̄W‖² + λ‖W‖² (a scalar)."""
    r = target - ridge_predict(features, weight)
    return (r**2).sum(1).mean() + lam * (weight**2).sum()


__all__ = ["add_intercept", "ridge_fit", "ridge_objective", "ridge_predict"]
