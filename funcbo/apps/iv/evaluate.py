"""Out-of-sample evaluation of an IV fit: the closed-form refit of both 2SLS stages.

As in DFIV's and FuncID's code, the learned networks only provide features; the two linear
stages are refitted by ridge regression with an intercept on the full halves, then scored on the
test set:

    W₁ = ridge(φ(z₁) → ψ(t₁), λ₁)            stage 1, on the stage-1 half
    W₂ = ridge([φ(z₂), 1]W₁ → y₂, λ₂)          stage 2, on the stage-2 half
    MSE = mean_test (f(t) − [ψ(t), 1]W₂)²

with φ the instrument features (the inner model's last hidden features) and ψ the treatment
features. With a covariate network χ (the demand design), stage 2 and the prediction use the
outcome features of :func:`~funcbo.apps.iv.networks.outcome_features` instead:
W₂ = ridge(Φ([φ(z₂), 1]W₁, χ(c₂)) → y₂, λ₂) and the prediction [Φ(ψ(t), χ(c)), 1]W₂ with
Φ(v, c) = [v; 1] ⊗ [c; 1] without its constant entry. The MSE is always taken on the scale of
the data's outcome and f. The linear algebra is done in float64 whatever the networks' dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from funcbo.apps.iv.data import IVTensors
from funcbo.apps.iv.networks import outcome_features
from funcbo.apps.iv.ridge import ridge_fit, ridge_predict


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules in eval mode (spectral norm stops its power iterations), then restore."""
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.train(flag)


def _covariate_features(
    covariate: nn.Module | None, part: dict[str, Tensor], name: str
) -> Tensor | None:
    if covariate is None:
        return None
    if "x" not in part:
        raise ValueError(f"a covariate network needs covariates 'x' in the {name} data")
    return covariate(part["x"]).double()


def refit_2sls(
    treatment: nn.Module,
    instrument_features: nn.Module,
    data: IVTensors,
    lam1: float = 0.1,
    lam2: float = 0.1,
    covariate: nn.Module | None = None,
) -> Tensor:
    """W₂ ``[q + 1, 1]``: the outcome head of the closed-form 2SLS refit (float64; q the number
    of outcome features)."""
    modules = [m for m in (treatment, instrument_features, covariate) if m is not None]
    with torch.no_grad(), eval_mode(*modules):
        psi1 = treatment(data.stage1["t"]).double()
        phi1 = instrument_features(data.stage1["z"]).double()
        phi2 = instrument_features(data.stage2["z"]).double()
        W1 = ridge_fit(phi1, psi1, lam1)
        chi2 = _covariate_features(covariate, data.stage2, "stage-2")
        features = outcome_features(ridge_predict(phi2, W1), chi2)
        return ridge_fit(features, data.stage2["y"].double(), lam2)


def predict_structural(
    treatment: nn.Module,
    weight: Tensor,
    part: dict[str, Tensor],
    covariate: nn.Module | None = None,
) -> Tensor:
    """The fitted structural function [Φ(ψ(t), χ(c)), 1]W₂ on ``part`` (``{"t"}``, plus
    ``"x"`` with a covariate network), ``[m, 1]`` in float64."""
    modules = [m for m in (treatment, covariate) if m is not None]
    with torch.no_grad(), eval_mode(*modules):
        chi = _covariate_features(covariate, part, "test")
        return ridge_predict(outcome_features(treatment(part["t"]).double(), chi), weight)


def out_of_sample_mse(
    treatment: nn.Module,
    instrument_features: nn.Module,
    data: IVTensors,
    lam1: float = 0.1,
    lam2: float = 0.1,
    covariate: nn.Module | None = None,
) -> float:
    """Out-of-sample MSE of the structural function after the 2SLS refit (module docstring),
    mean_test (f − f̂)².

    Args:
        treatment: ψ, the treatment feature network.
        instrument_features: φ, the instrument feature network (without the inner head).
        data: the dataset as tensors.
        lam1, lam2: stage-1 and stage-2 ridges (per-sample scale; DFIV's 0.1·n is 0.1).
        covariate: χ, the covariate network, for designs with covariates.
    """
    W2 = refit_2sls(treatment, instrument_features, data, lam1, lam2, covariate)
    pred = predict_structural(treatment, W2, data.test, covariate)
    return float(((data.test["f"].double() - pred) ** 2).mean())


__all__ = ["eval_mode", "out_of_sample_mse", "predict_structural", "refit_2sls"]
