"""Networks of the IV benchmarks: treatment features ψ_ω(t), instrument features φ(x), heads.

dSprites (as in DFIV, Xu et al. 2021, with the layer norms of FuncID's code in place of DFIV's
batch norms, so that losses stay per-sample; spectral norm on every feature Linear):

    treatment   SN(4096→1024) ReLU SN(1024→512) ReLU LN SN(512→128) ReLU SN(128→32) LN tanh
    instrument  SN(3→256) ReLU SN(256→128) ReLU LN SN(128→128) ReLU LN SN(128→32) LN ReLU

(the norm follows the ReLU of its layer, as in FuncID's ``build_net_for_dsprite_with_norms``).

Demand design (DFIV's original demand networks on (p, t, s) and (c, t, s), batch norm → layer
norm; no spectral norm unless asked):

    treatment   3→128 ReLU 128→64 ReLU 64→32 tanh
    instrument  3→128 ReLU 128→64 ReLU 64→32 LN

Optionally (the default for the demand design, whose prices are around 20), both networks start
with a fixed :class:`Standardize` layer, (x − mean)/std with statistics of the training data: an
invertible change of input coordinates, so the function classes are unchanged.

The inner model h(x) = head(φ(x)) adds a plain linear head (with bias) on the instrument features;
it is the last ``nn.Linear`` of the inner model, so :class:`funcbo.LinearAdjoint` uses φ(x) as its
features. The outer module holds ψ_ω and, when the outcome head is learned, u (a Linear(d, 1)).
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


def demand_treatment_net(
    in_dim: int = 3, hidden: Sequence[int] = (128, 64), out_dim: int = 32, *, spectral: bool = False
) -> nn.Sequential:
    """ψ: in→h0 ReLU h0→h1 ReLU h1→out tanh."""
    h0, h1 = _two(hidden, "treatment")
    return nn.Sequential(
        _linear(in_dim, h0, spectral),
        nn.ReLU(),
        _linear(h0, h1, spectral),
        nn.ReLU(),
        _linear(h1, out_dim, spectral),
        nn.Tanh(),
    )


def demand_instrument_net(
    in_dim: int = 3, hidden: Sequence[int] = (128, 64), out_dim: int = 32, *, spectral: bool = False
) -> nn.Sequential:
    """φ: in→h0 ReLU h0→h1 ReLU h1→out LN."""
    h0, h1 = _two(hidden, "instrument")
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


def _two(hidden: Sequence[int], name: str) -> tuple[int, int]:
    if len(hidden) != 2:
        raise ValueError(f"the demand {name} network needs 2 hidden widths, got {list(hidden)}")
    return int(hidden[0]), int(hidden[1])


class Standardize(nn.Module):
    """x ↦ (x − mean)/std with fixed statistics (buffers, saved in the state dict)."""

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
    """The outer variable ω: the treatment feature network ψ_ω and, optionally, a learned
    outcome head u (``Linear(d, 1)``); ``forward(t)`` = ψ_ω(t)."""

    def __init__(self, treatment: nn.Module, feature_dim: int, *, learned_head: bool) -> None:
        super().__init__()
        self.treatment = treatment
        self.head: nn.Linear | None = nn.Linear(feature_dim, 1) if learned_head else None

    def forward(self, t: Tensor) -> Tensor:
        return self.treatment(t)


def build_iv_networks(
    dataset: str,
    *,
    treatment_hidden: Sequence[int] | None = None,
    instrument_hidden: Sequence[int] | None = None,
    feature_dim: int = 32,
    spectral: bool | None = None,
    learned_head: bool = False,
    treatment_stats: tuple[Tensor, Tensor] | None = None,
    instrument_stats: tuple[Tensor, Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[IVOuter, InstrumentModel]:
    """(outer ω, inner model h) for ``"dsprites"`` or ``"demand"``.

    Initialisation draws from torch's global generator: seed it (or fork it) before calling.

    Args:
        dataset: which benchmark's networks.
        treatment_hidden, instrument_hidden: hidden widths (default: the paper's).
        feature_dim: d, the output of ψ and φ (32 in the paper).
        spectral: spectral norm on the feature Linears (default: True for dSprites, False for
            demand).
        learned_head: give ω a learned outcome head u.
        treatment_stats, instrument_stats: (mean, std) of the inputs: prepend a
            :class:`Standardize` layer to the treatment / instrument network.
        dtype, device: where the parameters live (float32 or float64).
    """
    if dataset == "dsprites":
        psi = dsprites_treatment_net(
            4096, treatment_hidden or (1024, 512, 128), feature_dim, spectral=spectral is not False
        )
        phi = dsprites_instrument_net(
            3, instrument_hidden or (256, 128, 128), feature_dim, spectral=spectral is not False
        )
    elif dataset == "demand":
        psi = demand_treatment_net(
            3, treatment_hidden or (128, 64), feature_dim, spectral=bool(spectral)
        )
        phi = demand_instrument_net(
            3, instrument_hidden or (128, 64), feature_dim, spectral=bool(spectral)
        )
    else:
        raise ValueError(f"unknown IV dataset {dataset!r}; use 'dsprites' or 'demand'")
    if treatment_stats is not None:
        psi = nn.Sequential(Standardize(*treatment_stats), *psi)
    if instrument_stats is not None:
        phi = nn.Sequential(Standardize(*instrument_stats), *phi)
    outer = IVOuter(psi, feature_dim, learned_head=learned_head)
    inner = InstrumentModel(phi, feature_dim, feature_dim)
    return outer.to(device=device, dtype=dtype), inner.to(device=device, dtype=dtype)


__all__ = [
    "IVOuter",
    "InstrumentModel",
    "Standardize",
    "build_iv_networks",
    "demand_instrument_net",
    "demand_treatment_net",
    "dsprites_instrument_net",
    "dsprites_treatment_net",
]
