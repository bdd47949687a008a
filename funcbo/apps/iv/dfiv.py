"""DFIV (Deep Feature Instrumental Variable regression; Xu et al., ICLR 2021), the app's baseline.

DFIV alternates two stages, both with closed-form ridge heads (with intercept):

* stage 1 (``stage1_steps`` optimizer steps on the instrument network φ, ψ held fixed):
  minimise L₁(φ) = (1/n)‖ψ(t₁) − [φ(z₁), 1]W₁‖² + λ₁‖W₁‖², W₁ = ridge(φ(z₁) → ψ(t₁), λ₁),
  differentiating through W₁;
* stage 2 (``stage2_steps`` optimizer steps on the treatment network ψ, φ held fixed):
  V₂ = [φ(z₂), 1]W₁(ψ) with W₁ refitted from ψ(t₁) *with its graph*, W₂ = ridge(V₂ → y₂, λ₂),
  minimise L₂(ψ) = (1/m)‖y₂ − [V₂, 1]W₂‖² + λ₂‖W₂‖², differentiating through W₁ and W₂.

With observed covariates (DFIV's demand design) a covariate network χ joins ψ: between the two
stages, ``covariate_steps`` optimizer steps on χ (ψ and φ fixed) minimise the stage-2 objective
L_c(χ) = (1/m)‖y₂ − [Φ(V₂, χ(c₂)), 1]W₂‖² + λ₂‖W₂‖² with V₂ = [φ(z₂), 1]W₁ fixed and
Φ(v, c) = [v; 1] ⊗ [c; 1] without its constant entry
(:func:`~funcbo.apps.iv.networks.outcome_features`); stage 2 then regresses y₂ on Φ(V₂, χ(c₂))
with χ fixed (DFIV's ``update_covariate_net``, between ``stage1_update`` and ``stage2_update``).

In bilevel terms this is the exact hypergradient of the problem whose inner model is a linear
head on *fixed* instrument features. The networks are in eval mode while held fixed (as in
DFIV's code: the spectral norms of the fixed network do not iterate). Losses use per-sample
scale; DFIV writes them on sums with λ' = λ·n, the same objective times n. Adam alone would be
invariant to that factor, but its *coupled* weight decay is not: wd·θ is added to the gradient
before Adam normalises it, so DFIV's ``Adam(weight_decay=0.1)`` on sums is
``Adam(weight_decay=0.1/n, eps=ε/n)`` on the means used here. The IV task converts the configs'
weight decays this way (``problem.weight_decay_scale: sum``, tested against DFIV's sum-scale
step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from funcbo.apps.iv.evaluate import eval_mode
from funcbo.apps.iv.networks import outcome_features
from funcbo.apps.iv.ridge import ridge_fit, ridge_objective, ridge_predict
from funcbo.estimator import grad_norm


class DFIV:
    """DFIV's alternating two-stage training (module docstring).

    Args:
        treatment: ψ, the treatment feature network.
        instrument: φ, the instrument feature network.
        treatment_optimizer, instrument_optimizer: optimizers over ψ's and φ's parameters.
        stage1_steps: φ-steps per iteration (DFIV's dSprites setting: 20).
        stage2_steps: ψ-steps per iteration (DFIV: 1).
        lam1, lam2: stage ridges, per-sample scale (DFIV's λ = 0.1·n is 0.1 here).
        covariate: χ, the covariate network (None: no covariates); stage-2 batches then carry
            the covariates as ``"x"``.
        covariate_optimizer: optimizer over χ's parameters (with ``covariate``).
        covariate_steps: χ-steps per iteration (DFIV's demand setting: 20).
    """

    def __init__(
        self,
        treatment: nn.Module,
        instrument: nn.Module,
        treatment_optimizer: torch.optim.Optimizer,
        instrument_optimizer: torch.optim.Optimizer,
        *,
        stage1_steps: int = 20,
        stage2_steps: int = 1,
        lam1: float = 0.1,
        lam2: float = 0.1,
        covariate: nn.Module | None = None,
        covariate_optimizer: torch.optim.Optimizer | None = None,
        covariate_steps: int = 20,
    ) -> None:
        if stage1_steps < 0 or stage2_steps < 1 or covariate_steps < 0:
            raise ValueError(
                f"DFIV needs stage1_steps ≥ 0, stage2_steps ≥ 1 and covariate_steps ≥ 0, got "
                f"{stage1_steps}, {stage2_steps}, {covariate_steps}"
            )
        if (covariate is None) != (covariate_optimizer is None):
            raise ValueError("DFIV needs both a covariate network and its optimizer, or neither")
        self.covariate = covariate
        self.covariate_optimizer = covariate_optimizer
        self.covariate_steps = covariate_steps if covariate is not None else 0
        self.treatment = treatment
        self.instrument = instrument
        self.treatment_optimizer = treatment_optimizer
        self.instrument_optimizer = instrument_optimizer
        self.stage1_steps = stage1_steps
        self.stage2_steps = stage2_steps
        #: stage-1 batches one step consumes
        self.inner_steps = max(stage1_steps, 1)
        self.lam1 = lam1
        self.lam2 = lam2
        self.stats: dict[str, float] = {}

    def stage1_loss(
        self, batch: dict[str, torch.Tensor], psi: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L₁(φ) on a stage-1 batch, ψ fixed (``psi``: ψ(t) when already computed)."""
        if psi is None:
            with torch.no_grad(), eval_mode(self.treatment):
                psi = self.treatment(batch["t"])
        phi = self.instrument(batch["z"])
        return ridge_objective(phi, psi, ridge_fit(phi, psi, self.lam1), self.lam1)

    def _covariates(self, stage2: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """χ(c₂) with χ fixed (None without covariates)."""
        if self.covariate is None:
            return None
        with torch.no_grad(), eval_mode(self.covariate):
            return self.covariate(stage2["x"])

    def stage2_loss(
        self, stage1: dict[str, torch.Tensor], stage2: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """L₂(ψ) from a stage-1 and a stage-2 batch, φ (and χ) fixed."""
        with torch.no_grad(), eval_mode(self.instrument):
            phi1 = self.instrument(stage1["z"])
            phi2 = self.instrument(stage2["z"])
        W1 = ridge_fit(phi1, self.treatment(stage1["t"]), self.lam1)
        V2 = outcome_features(ridge_predict(phi2, W1), self._covariates(stage2))
        y = stage2["y"]
        return ridge_objective(V2, y, ridge_fit(V2, y, self.lam2), self.lam2)

    def covariate_loss(
        self, predicted: torch.Tensor, stage2: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """L_c(χ) for stage-1 predictions ``predicted`` = [φ(z₂), 1]W₁ (fixed)."""
        assert self.covariate is not None
        V2 = outcome_features(predicted, self.covariate(stage2["x"]))
        y = stage2["y"]
        return ridge_objective(V2, y, ridge_fit(V2, y, self.lam2), self.lam2)

    def _covariate_update(
        self, stage1: dict[str, torch.Tensor], stage2: dict[str, torch.Tensor]
    ) -> float:
        """``covariate_steps`` steps on χ with ψ and φ fixed; returns the last L_c."""
        assert self.covariate is not None and self.covariate_optimizer is not None
        with torch.no_grad(), eval_mode(self.treatment, self.instrument):
            W1 = ridge_fit(self.instrument(stage1["z"]), self.treatment(stage1["t"]), self.lam1)
            predicted = ridge_predict(self.instrument(stage2["z"]), W1)
        last = float("nan")
        for _ in range(self.covariate_steps):
            loss = self.covariate_loss(predicted, stage2)
            self.covariate_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.covariate_optimizer.step()
            last = float(loss.detach())
        self.covariate_optimizer.zero_grad(set_to_none=True)
        return last

    def step(
        self,
        stage1_batches: Sequence[dict[str, torch.Tensor]],
        stage2_batch: dict[str, torch.Tensor],
    ) -> dict[str, float]:
        """One DFIV iteration: stage-1 steps (batch k mod len), the covariate steps (if any),
        then stage-2 steps (both with the last stage-1 batch). Returns the stage losses (and
        ``covariate_loss``) and ψ's gradient norm."""
        batches = list(stage1_batches)
        if not batches:
            raise ValueError("DFIV.step needs at least one stage-1 batch")
        l1 = float("nan")
        psi: dict[int, torch.Tensor] = {}  # ψ is fixed in stage 1: one forward per batch
        for k in range(self.stage1_steps):
            batch = batches[k % len(batches)]
            if id(batch["t"]) not in psi:
                with torch.no_grad(), eval_mode(self.treatment):
                    psi[id(batch["t"])] = self.treatment(batch["t"])
            loss = self.stage1_loss(batch, psi[id(batch["t"])])
            self.instrument_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.instrument_optimizer.step()
            l1 = float(loss.detach())
        lc = float("nan")
        if self.covariate_steps > 0:
            lc = self._covariate_update(batches[-1], stage2_batch)
        l2 = float("nan")
        gnorm = 0.0
        for _ in range(self.stage2_steps):
            loss = self.stage2_loss(batches[-1], stage2_batch)
            self.treatment_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = grad_norm([p.grad for p in self.treatment.parameters() if p.grad is not None])
            self.treatment_optimizer.step()
            l2 = float(loss.detach())
        self.treatment_optimizer.zero_grad(set_to_none=True)
        self.instrument_optimizer.zero_grad(set_to_none=True)
        self.stats = {"inner_loss": l1, "outer_loss": l2, "grad_norm": gnorm}
        if self.covariate is not None:
            self.stats["covariate_loss"] = lc
        return dict(self.stats)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "treatment": self.treatment.state_dict(),
            "instrument": self.instrument.state_dict(),
            "treatment_optimizer": self.treatment_optimizer.state_dict(),
            "instrument_optimizer": self.instrument_optimizer.state_dict(),
        }
        if self.covariate is not None and self.covariate_optimizer is not None:
            state["covariate"] = self.covariate.state_dict()
            state["covariate_optimizer"] = self.covariate_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.treatment.load_state_dict(state["treatment"])
        self.instrument.load_state_dict(state["instrument"])
        self.treatment_optimizer.load_state_dict(state["treatment_optimizer"])
        self.instrument_optimizer.load_state_dict(state["instrument_optimizer"])
        if self.covariate is not None and self.covariate_optimizer is not None:
            self.covariate.load_state_dict(state["covariate"])
            self.covariate_optimizer.load_state_dict(state["covariate_optimizer"])


__all__ = ["DFIV"]
