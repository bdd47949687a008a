"""Networks of the IV benchmarks: treatment features ψ_ω(t), instrument features φ(x), heads.

dSprites (as in DFIV, Xu et al. 2021, with the layer norms of FuncID's code in place of DFIV's
batch norms, so that losses stay per-sample; spectral norm on every feature Linear):

    treatment   SN(4096→1024) ReLU SN(1024→512) ReLU LN SN(512→128) ReLU SN(128→32) LN tanh
    instrument  SN(3→256) ReLU SN(256→128) ReLU LN SN(128→128) ReLU LN SN(128→32) LN ReLU

(the norm follows the ReLU of its layer, as in FuncID's ``build_net_for_dsprite_with_norms``).

Demand design (DFIV's networks for this design, ``build_net_for_demand`` in its code, batch norm
→ layer norm; no spectral norm unless asked): the treatment network sees the price only, a
covariate network sees the observed covariates (t, s), and the outcome is regressed on their
outer product (DFIV's treatment of observed covariates):

    price       1→16 ReLU 16→1                                  a(p)
    covariate   2→128 ReLU 128→32 LN ReLU 32→16 ReLU            χ(t, s)
    instrument  3→128 ReLU 128→64 ReLU 64→32 LN                 φ(c, t, s)
    outcome features  [a(p); 1] ⊗ [χ(t, s); 1] without its constant entry (the ridge's intercept)

Stage 1 regresses a(p) only: χ(t, s) is a function of the instrument (c, t, s), so
E[[a(p); 1] ⊗ [χ(t, s); 1] | z] = [E[a(p) | z]; 1] ⊗ [χ(t, s); 1] exactly. The outer product
can represent f(p, t, s) = α(t, s) + β(t, s)·p with a(p) affine, so it extrapolates in p from
the prices seen at each t to the whole test grid.

Optionally (the default for the demand design, whose prices are around 20), every network
starts with a fixed :class:`Standardize` layer, (x − mean)/std with statistics of the training
data: an invertible change of input coordinates, so the function classes are unchanged.

The inner model h(x) = head(φ(x)) adds a plain linear head (with bias) on the instrument features;
it is the last ``nn.Linear`` of the inner model, so :class:`funcbo.LinearAdjoint` uses φ(x) as its
features. The outer module holds ψ_ω, the covariate network χ when the design has covariates,
and, when the outcome head is learned, u (a Linear over the outcome features).
Hidden widths are configurable (small networks for tests); the layer pattern is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


def _linear(i: int, o: int, spectral: bool) -> nn.Module:
    layer = nn.Linear(i, o)
    return spectral_norm(layer) if spectral else layer


def dsprites_treatment_net(
    in_dim: int = 4096,
    hidden: Sequence[int] = (1024, 512, 128),
    out_dim: int = 32,
    *,
    spectral: bool = True,
) -> nn.Sequential:
    """ψ: SN(in→h0) ReLU SN(h0→h1) ReLU LN SN(h1→h2) ReLU SN(h2→out) LN tanh."""
    h0, h1, h2 = _three(hidden, "treatment")
    return nn.Sequential(
        _linear(in_dim, h0, spectral),
        nn.ReLU(),
        _linear(h0, h1, spectral),
        nn.ReLU(),
        nn.LayerNorm(h1),
        _linear(h1, h2, spectral),
        nn.ReLU(),
        _linear(h2, out_dim, spectral),
        nn.LayerNorm(out_dim),
        nn.Tanh(),
    )


def dsprites_instrument_net(
    in_dim: int = 3,
    hidden: Sequence[int] = (256, 128, 128),
    out_dim: int = 32,
    *,
    spectral: bool = True,
) -> nn.Sequential:
    """φ: SN(in→h0) ReLU SN(h0→h1) ReLU LN SN(h1→h2) ReLU LN SN(h2→out) LN ReLU."""
    h0, h1, h2 = _three(hidden, "instrument")
    return nn.Sequential(
        _linear(in_dim, h0, spectral),
        nn.ReLU(),
        _linear(h0, h1, spectral),
        nn.ReLU(),
        nn.LayerNorm(h1),
        _linear(h1, h2, spectral),
        nn.ReLU(),
        nn.LayerNorm(h2),
        _linear(h2, out_dim, spectral),
        nn.LayerNorm(out_dim),
        nn.ReLU(),
    )


def demand_price_net(
    in_dim: int = 1, hidden: Sequence[int] = (16,), out_dim: int = 1, *, spectral: bool = False
) -> nn.Sequential:
    """a: in→h0 ReLU h0→out (DFIV's treatment network for the demand design)."""
    (h0,) = _widths(hidden, 1, "price")
    return nn.Sequential(_linear(in_dim, h0, spectral), nn.ReLU(), _linear(h0, out_dim, spectral))


def demand_covariate_net(
    in_dim: int = 2,
    hidden: Sequence[int] = (128, 32),
    out_dim: int = 16,
    *,
    spectral: bool = False,
) -> nn.Sequential:
    """χ: in→h0 ReLU h0→h1 LN ReLU h1→out ReLU (DFIV's covariate network)."""
    h0, h1 = _widths(hidden, 2, "covariate")
    return nn.Sequential(
        _linear(in_dim, h0, spectral),
        nn.ReLU(),
        _linear(h0, h1, spectral),
        nn.LayerNorm(h1),
        nn.ReLU(),
        _linear(h1, out_dim, spectral),
        nn.ReLU(),
    )


def demand_instrument_net(
    in_dim: int = 3, hidden: Sequence[int] = (128, 64), out_dim: int = 32, *, spectral: bool = False
) -> nn.Sequential:
    """φ: in→h0 ReLU h0→h1 ReLU h1→out LN."""
    h0, h1 = _widths(hidden, 2, "instrument")
    return nn.Sequential(
        _linear(in_dim, h0, spectral),
        nn.ReLU(),
        _linear(h0, h1, spectral),
        nn.ReLU(),
        _linear(h1, out_dim, spectral),
        nn.LayerNorm(out_dim),
    )


def _three(hidden: Sequence[int], name: str) -> tuple[int, int, int]:
    if len(hidden) != 3:
        raise ValueError(f"the dSprites {name} network needs 3 hidden widths, got {list(hidden)}")
    return int(hidden[0]), int(hidden[1]), int(hidden[2])


def _widths(hidden: Sequence[int], count: int, name: str) -> tuple[int, ...]:
    if len(hidden) != count:
        raise ValueError(
            f"the demand {name} network needs {count} hidden width(s), got {list(hidden)}"
        )
    return tuple(int(h) for h in hidden)


def outcome_features(v: Tensor, c: Tensor | None) -> Tensor:
    """The features the outcome is regressed on: v itself without covariates, else the outer
    product of [v; 1] and [c; 1] without its constant entry (the ridge fits the intercept).

    Args:
        v: treatment features (or their stage-1 prediction), ``[B, d]``.
        c: covariate features ``[B, k]``, or None.

    Returns:
        ``[B, d]`` without covariates, else ``[B, (d + 1)(k + 1) − 1]`` with entries
        v_i·c_j, v_i and c_j (index i·(k + 1) + j of the flattened product).
    """
    if c is None:
        return v
    if c.shape[0] != v.shape[0]:
        raise ValueError(f"features and covariates differ in length: {v.shape[0]} vs {c.shape[0]}")
    one = torch.ones(v.shape[0], 1, dtype=v.dtype, device=v.device)
    u, w = torch.cat([v, one], 1), torch.cat([c, one], 1)
    return (u[:, :, None] * w[:, None, :]).flatten(1)[:, :-1]


class Standardize(nn.Module):
    """x ↦ (x − mean)/std with fixed statistics (buffers, saved in the state dict)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        std = torch.as_tensor(std)
        self.register_buffer("mean", torch.as_tensor(mean).clone())
        self.register_buffer("std", torch.where(std > 0, std, torch.ones_like(std)).clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class InstrumentModel(nn.Module):
    """The inner model h(x) = head(φ(x)): instrument features and a linear head.

    Args:
        features: φ, mapping instruments to ``[B, p]``.
        feature_dim: p.
        out_dim: d_v, the dimension of the treatment features being regressed.
    """

    def __init__(self, features: nn.Module, feature_dim: int, out_dim: int) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class IVOuter(nn.Module):
    """The outer variable ω: the treatment feature network ψ_ω, optionally a covariate network
    χ_ω and a learned outcome head u (a ``Linear`` over the outcome features);
    ``forward(t)`` = ψ_ω(t).

    Args:
        treatment: ψ_ω, mapping treatments to ``[B, d]``.
        feature_dim: d.
        learned_head: give ω an outcome head u.
        covariate: χ_ω, mapping covariates to ``[B, k]`` (None: no covariates).
        covariate_dim: k (with ``covariate``).
    """

    def __init__(
        self,
        treatment: nn.Module,
        feature_dim: int,
        *,
        learned_head: bool,
        covariate: nn.Module | None = None,
        covariate_dim: int = 0,
    ) -> None:
        super().__init__()
        self.treatment = treatment
        self.covariate = covariate
        self.outcome_dim = (
            feature_dim if covariate is None else (feature_dim + 1) * (covariate_dim + 1) - 1
        )
        self.head: nn.Linear | None = nn.Linear(self.outcome_dim, 1) if learned_head else None

    def forward(self, t: Tensor) -> Tensor:
        return self.treatment(t)

    def outcome_features(self, v: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """:func:`outcome_features` of v and χ_ω(``batch["x"]``) (v itself without χ_ω)."""
        if self.covariate is None:
            return v
        if "x" not in batch:
            raise ValueError("this outer model has a covariate network: batches need 'x'")
        return outcome_features(v, self.covariate(batch["x"]))


def build_iv_networks(
    dataset: str,
    *,
    treatment_hidden: Sequence[int] | None = None,
    instrument_hidden: Sequence[int] | None = None,
    covariate_hidden: Sequence[int] | None = None,
    feature_dim: int = 32,
    covariate_dim: int = 16,
    spectral: bool | None = None,
    learned_head: bool = False,
    treatment_stats: tuple[Tensor, Tensor] | None = None,
    instrument_stats: tuple[Tensor, Tensor] | None = None,
    covariate_stats: tuple[Tensor, Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[IVOuter, InstrumentModel]:
    """(outer ω, inner model h) for ``"dsprites"`` or ``"demand"``.

    Initialisation draws from torch's global generator: seed it (or fork it) before calling.

    Args:
        dataset: which benchmark's networks.
        treatment_hidden, instrument_hidden, covariate_hidden: hidden widths (default: the
            paper's; ``covariate_hidden`` for the demand design only).
        feature_dim: output of φ, and of ψ for dSprites (32 in the paper); the demand design's
            price network has one output, as DFIV's.
        covariate_dim: output of the demand design's covariate network χ (16, DFIV's).
        spectral: spectral norm on the feature Linears (default: True for dSprites, False for
            demand).
        learned_head: give ω a learned outcome head u.
        treatment_stats, instrument_stats, covariate_stats: (mean, std) of the inputs: prepend a
            :class:`Standardize` layer to the treatment / instrument / covariate network.
        dtype, device: where the parameters live (float32 or float64).
    """
    chi: nn.Sequential | None = None
    if dataset == "dsprites":
        psi: nn.Sequential = dsprites_treatment_net(
            4096, treatment_hidden or (1024, 512, 128), feature_dim, spectral=spectral is not False
        )
        phi: nn.Sequential = dsprites_instrument_net(
            3, instrument_hidden or (256, 128, 128), feature_dim, spectral=spectral is not False
        )
        treatment_dim = feature_dim
    elif dataset == "demand":
        treatment_dim = 1
        psi = demand_price_net(1, treatment_hidden or (16,), treatment_dim, spectral=bool(spectral))
        phi = demand_instrument_net(
            3, instrument_hidden or (128, 64), feature_dim, spectral=bool(spectral)
        )
        chi = demand_covariate_net(
            2, covariate_hidden or (128, 32), covariate_dim, spectral=bool(spectral)
        )
        if covariate_stats is not None:
            chi = nn.Sequential(Standardize(*covariate_stats), *chi)
    else:
        raise ValueError(f"unknown IV dataset {dataset!r}; use 'dsprites' or 'demand'")
    if treatment_stats is not None:
        psi = nn.Sequential(Standardize(*treatment_stats), *psi)
    if instrument_stats is not None:
        phi = nn.Sequential(Standardize(*instrument_stats), *phi)
    outer = IVOuter(
        psi, treatment_dim, learned_head=learned_head, covariate=chi, covariate_dim=covariate_dim
    )
    inner = InstrumentModel(phi, feature_dim, treatment_dim)
    return outer.to(device=device, dtype=dtype), inner.to(device=device, dtype=dtype)


__all__ = [
    "IVOuter",
    "InstrumentModel",
    "Standardize",
    "build_iv_networks",
    "demand_covariate_net",
    "demand_instrument_net",
    "demand_price_net",
    "dsprites_instrument_net",
    "dsprites_treatment_net",
    "outcome_features",
]
