"""Out-of-sample evaluation of an IV fit: the closed-form refit of both 2SLS stages.

As in DFIV's and FuncID's code, the learned networks only provide features; the two linear
stages are refitted by ridge regression with an intercept on the full halves, then scored on the
test set:

    W₁ = ridge(φ(z₁) → ψ(t₁), λ₁)            stage 1, on the stage-1 half
    W₂ = ridge([φ(z₂), 1]W₁ → y₂, λ₂)          stage 2, on the stage-2 half
    MSE = mean_test (f(t) − [ψ(t), 1]W₂)²

with φ the instrument features (the inner model's last hidden features) and ψ the treatment
features. The linear algebra is done in float64 whatever the networks' dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from funcbo.apps.iv.data import IVTensors
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


def refit_2sls(
    treatment: nn.Module,
    instrument_features: nn.Module,
    data: IVTensors,
    lam1: float = 0.1,
    lam2: float = 0.1,
) -> Tensor:
    """W₂ ``[d + 1, 1]``: the outcome head of the closed-form 2SLS refit (float64)."""
    with torch.no_grad(), eval_mode(treatment, instrument_features):
        psi1 = treatment(data.stage1["t"]).double()
        phi1 = instrument_features(data.stage1["z"]).double()
        phi2 = instrument_features(data.stage2["z"]).double()
        W1 = ridge_fit(phi1, psi1, lam1)
        return ridge_fit(ridge_predict(phi2, W1), data.stage2["y"].double(), lam2)


def out_of_sample_mse(
    treatment: nn.Module,
    instrument_features: nn.Module,
    data: IVTensors,
    lam1: float = 0.1,
    lam2: float = 0.1,
) -> float:
    """Out-of-sample MSE of the structural function after the 2SLS refit (module docstring).

    Args:
        treatment: ψ, the treatment feature network.
        instrument_features: φ, the instrument feature network (without the inner head).
        data: the dataset as tensors.
        lam1, lam2: stage-1 and stage-2 ridges (per-sample scale; DFIV's 0.1·n is 0.1).
    """
    W2 = refit_2sls(treatment, instrument_features, data, lam1, lam2)
    with torch.no_grad(), eval_mode(treatment):
        pred = ridge_predict(treatment(data.test["t"]).double(), W2)
    return float(((data.test["f"].double() - pred) ** 2).mean())


__all__ = ["eval_mode", "out_of_sample_mse", "refit_2sls"]
