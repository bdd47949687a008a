"""Two-stage least squares (2SLS) as a functional bilevel problem.

Treatment t, outcome y, instrument x. The outer variable ω is the treatment feature network ψ_ω
(plus the outcome head u when it is learned); the inner model h maps instruments to treatment
features. Per sample (no ½ anywhere, matching DFIV's objectives):

    inner   ℓ_in(ω, v, (x, t)) = ‖ψ_ω(t) − v‖²          ⇒ h*_ω(x) = E[ψ_ω(t) | x]   (H = 2I)
    outer   ℓ_out(ω, v, (x, y)) = (y − uᵀv − b)² + λ‖(u, b)‖²

with v = h(x). When the design has observed covariates (the demand design), the outer model also
holds a covariate network χ_ω and the outcome is regressed on the features
[v; 1] ⊗ [χ_ω(c); 1] (without the constant entry; :func:`~funcbo.apps.iv.networks.outcome_features`)
instead of v: χ_ω(c) enters the outer loss directly, so g_ω ≠ 0 for χ's weights. The outcome
head (u, b) is either

* ``head="learned"``: part of ω (``outer.head``, a ``Linear`` over the outcome features); or
* ``head="closed_form"`` (DFIV's stage 2): W = (u, b) = the ridge fit of y on [v, 1] over the
  outer batch, W(V) = argmin_W (1/m)Σ_j (y_j − [v_j; 1]ᵀW)² + λ‖W‖², and
  ℓ_out,j = (y_j − [v_j; 1]ᵀW(V))² + λ‖W(V)‖².

**Per-sample losses with a closed-form head.** W couples the samples of the outer batch, so
ℓ_out,j depends on every v_k. The estimators only use the *mean* outer loss and its derivatives
(FuncID takes g_j = m·∂_{v_j} mean_k ℓ_out,k and ∂_ω of the mean), and the mean is the ridge
objective at its minimiser W(V). By the envelope theorem its gradient in v_j equals the partial
derivative at fixed W: m·∂_{v_j} mean = ∂_v (y_j − [v; 1]ᵀW)²|_{v=v_j} = −2(y_j − ŷ_j)u. So the
coupling through W adds nothing to first order, and differentiating through the solve (as done
here) or not gives the same g_j and the same hypergradient (tested against finite differences).
Without covariates W depends on ω only through the predictions v = h*_ω(x), so g_ω = 0 and the
whole hypergradient is B a*. On a minibatch W is a (biased) estimate of the population ridge
head; the paper's protocol uses the whole stage-2 half as the outer batch.

Batches are mappings: stage-1 (inner) ``{"z": instrument, "t": treatment}``, stage-2 (outer)
``{"z": instrument, "y": outcome [m, 1]}`` plus ``"x"`` (covariates) when the design has them;
h is applied to ``batch["z"]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from funcbo.apps.iv.evaluate import eval_mode
from funcbo.apps.iv.ridge import ridge_fit, ridge_predict
from funcbo.problem import BilevelProblem

HEADS = ("closed_form", "learned")


class IVProblem(BilevelProblem):
    """2SLS with a treatment feature network as outer variable (see the module docstring).

    Args:
        head: ``"closed_form"`` (ridge outcome head fitted on the outer batch, as in DFIV) or
            ``"learned"`` (``outer.head`` is part of ω).
        outer_ridge: λ of the outcome head (per-sample scale; DFIV's λ₂ = 0.1·n is 0.1 here).
        check_finite: raise on NaN/inf losses.
    """

    def __init__(
        self, *, head: str = "closed_form", outer_ridge: float = 0.1, check_finite: bool = True
    ) -> None:
        super().__init__(check_finite=check_finite)
        if head not in HEADS:
            raise ValueError(f"unknown outcome head {head!r}; use one of {HEADS}")
        if not outer_ridge > 0:
            raise ValueError(f"outer_ridge must be > 0, got {outer_ridge}")
        self.head = head
        self.outer_ridge = outer_ridge

    def inner_input(self, batch: Any) -> Tensor:
        return batch["z"]

    def inner_loss(self, outer: nn.Module, pred: Tensor, batch: Any) -> Tensor:
        """‖ψ_ω(t_i) − v_i‖² per sample."""
        return ((outer(batch["t"]) - pred) ** 2).sum(1)

    def outer_loss(self, outer: nn.Module, pred: Tensor, batch: Any) -> Tensor:
        """(y_j − uᵀv_j − b)² + λ‖(u, b)‖² per sample (u, b learned or in closed form; v_j the
        outcome features of ``pred``, see the module docstring)."""
        y = batch["y"]
        lam = self.outer_ridge
        features = getattr(outer, "outcome_features", None)
        if features is not None:
            pred = features(pred, batch)
        if self.head == "learned":
            u = getattr(outer, "head", None)
            if not isinstance(u, nn.Linear):
                raise ValueError(
                    "head='learned' needs the outer module to have a Linear(d, 1) `head` "
                    "(build it with learned_head=True)"
                )
            reg = lam * ((u.weight**2).sum() + (u.bias**2).sum())
            return ((y - u(pred)) ** 2).sum(1) + reg
        W = ridge_fit(pred, y, lam)
        return ((y - ridge_predict(pred, W)) ** 2).sum(1) + lam * (W**2).sum()


class IVFeatureProblem(BilevelProblem):
    """2SLS as the parametric baselines of the FuncID authors' code pose it.

    In github.com/inria-thoth/funcBO (``applications/IVRegression/parametricBO/trainer.py`` for
    AID and ITD, ``PenaltyBased/trainer.py`` for the gradient penalty) the inner variable is the
    instrument *feature* network φ_θ alone, the stage-1 head is fitted in closed form inside the
    inner loss, and the outer loss is DFIV's stage-2 objective with the stage-1 head refitted on
    ψ_ω(t₁) (their ``fit_2sls``), so it depends on ω directly:

        inner   L_in(ω, θ) = (1/n)‖ψ_ω(t₁) − [φ_θ(z₁), 1]W₁‖² + λ₁‖W₁‖²,
                W₁ = ridge(φ_θ(z₁) → ψ_ω(t₁), λ₁)
        outer   L_out(ω, θ) = (1/m)‖y₂ − [V₂, 1]W₂‖² + λ₂‖W₂‖²,
                V₂ = [φ_θ(z₂), 1]W₁,  W₂ = ridge(V₂ → y₂, λ₂)

    (their sums, divided by the number of samples; λ per sample). These are parametric problems
    in θ: the inner loss is not strongly convex in the prediction φ_θ(z) (the features are
    determined only up to the head), so this problem serves the parameter-space estimators (AID,
    ITD, the penalty methods), not FuncID.

    The heads couple the samples, so the per-sample losses returned here are a bookkeeping of
    the batch objectives whose *means* are L_in and L_out (the only thing those estimators use):
    the inner loss gives sample i the term ‖ψ_ω(t_i) − [φ_i, 1]W₁‖² + λ₁‖W₁‖²; the outer batch
    holds the stage-1 half as well (``{"z": [z₁; z₂], "t": t₁, "y": y₂}``, see
    :func:`feature_outer_batch`) and gives the stage-2 rows (n + m)/m times their term and the
    stage-1 rows zero.

    While ω is frozen (inner steps), ψ_ω(t) is computed in eval mode (the spectral norms do not
    iterate, as for the fixed network in DFIV and in the authors' code) and reused for as long
    as the batch, ω's parameters and buffers are unchanged (in-place versions), which saves a
    treatment-network forward pass per inner step; when ω requires gradients it is recomputed.

    Args:
        stage1_ridge, stage2_ridge: λ₁, λ₂ (per-sample scale).
        check_finite: raise on NaN/inf losses.
    """

    def __init__(
        self, *, stage1_ridge: float = 0.1, stage2_ridge: float = 0.1, check_finite: bool = True
    ) -> None:
        super().__init__(check_finite=check_finite)
        for name, lam in (("stage1_ridge", stage1_ridge), ("stage2_ridge", stage2_ridge)):
            if not lam > 0:
                raise ValueError(f"{name} must be > 0, got {lam}")
        self.stage1_ridge = stage1_ridge
        self.stage2_ridge = stage2_ridge
        self._cache: tuple[tuple, Tensor] | None = None

    def treatment_features(self, outer: nn.Module, t: Tensor) -> Tensor:
        """ψ_ω(t): with ω's graph when ω requires gradients, else cached (class docstring)."""
        params = list(outer.parameters())
        if any(p.requires_grad for p in params):
            return outer(t)
        key = (
            id(t),
            t.data_ptr(),
            t._version,
            tuple((id(p), p._version) for p in params),
            tuple((id(b), b._version) for b in outer.buffers()),
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad(), eval_mode(outer):
            value = outer(t)
        self._cache = (key, value)
        return value

    def inner_input(self, batch: Any) -> Tensor:
        return batch["z"]

    def inner_loss(self, outer: nn.Module, pred: Tensor, batch: Any) -> Tensor:
        """Stage-1 ridge residuals of ψ_ω(t) on [φ, 1] (head fitted on the batch) + λ₁‖W₁‖²."""
        target = self.treatment_features(outer, batch["t"])
        W = ridge_fit(pred, target, self.stage1_ridge)
        r = target - ridge_predict(pred, W)
        return (r**2).sum(1) + self.stage1_ridge * (W**2).sum()

    def outer_loss(self, outer: nn.Module, pred: Tensor, batch: Any) -> Tensor:
        """DFIV's stage-2 objective with the stage-1 head refitted on ψ_ω(t₁) (class doc)."""
        t1, y = batch["t"], batch["y"]
        n, m = t1.shape[0], y.shape[0]
        if pred.shape[0] != n + m:
            raise ValueError(
                f"IVFeatureProblem's outer batch holds both halves: expected {n} + {m} "
                f"predictions, got {pred.shape[0]} (build it with feature_outer_batch)"
            )
        phi1, phi2 = pred[:n], pred[n:]
        W1 = ridge_fit(phi1, self.treatment_features(outer, t1), self.stage1_ridge)
        V2 = ridge_predict(phi2, W1)
        lam = self.stage2_ridge
        W2 = ridge_fit(V2, y, lam)
        per = ((y - ridge_predict(V2, W2)) ** 2).sum(1) + lam * (W2**2).sum()
        return torch.cat([per.new_zeros(n), per * ((n + m) / m)])


def feature_outer_batch(stage1: dict[str, Tensor], stage2: dict[str, Tensor]) -> dict[str, Tensor]:
    """The outer batch of :class:`IVFeatureProblem`: ``{"z": [z₁; z₂], "t": t₁, "y": y₂}``."""
    if "x" in stage2:
        raise ValueError(
            "the feature formulation (the FuncID authors' parametric baselines) is defined for "
            "designs without covariates; use formulation: functional for the demand design"
        )
    return {"z": torch.cat([stage1["z"], stage2["z"]]), "t": stage1["t"], "y": stage2["y"]}


__all__ = ["HEADS", "IVFeatureProblem", "IVProblem", "feature_outer_batch"]
