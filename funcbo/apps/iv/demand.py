"""The demand-design IV benchmark (Hartford et al., 2017), as generated in DFIV's code.

With ψ(t) = 2((t − 5)⁴/600 + exp(−4(t − 5)²) + t/10 − 2) and
f(p, t, s) = 100 + (10 + p)·s·ψ(t) − 2p, the draws from ``rng = np.random.default_rng(seed)`` are,
in order (each of size n):

1. s = rng.choice([1, …, 7], n)        (customer type / "emotion")
2. t = rng.uniform(0, 10, n)           (time of year)
3. c = rng.normal(0, 1, n)             (cost shifter, the instrument)
4. v = rng.normal(0, 1, n)             (price noise)
5. e = ρ·v + rng.normal(0, √(1 − ρ²), n)   (outcome noise, correlated with v: the confounding)

price p = 25 + (c + 3)·ψ(t) + v and outcome Y = f(p, t, s) + e. As in DFIV's paper and code
(``generate_train_demand_design(..., old_flg=False)``), the treatment is the price p ``[n, 1]``,
the observed covariates are (t, s) ``[n, 2]`` and the instrument is (c, t, s) ``[n, 3]`` (the
covariates are exogenous, so they instrument themselves). The test set is the 2800-point grid
p ∈ linspace(10, 25, 20) × t ∈ linspace(0, 10, 20) × s ∈ {1..7} (nested in that order: treatment
p, covariates (t, s)), scored against f. The split into stage-1 and stage-2 halves is the one
of :func:`funcbo.apps.iv.data.split_indices`.

The prices seen in training depend on t: for t near 10, ψ(t) ≈ 0 and p ≈ 25 ± 1, while the test
grid asks for p down to 10 at every t. The structural function is affine in p for fixed (t, s),
f = a(t, s) + b(t, s)·p, which is why DFIV's networks for this design (a price network and a
covariate network combined by an outer product, see :mod:`funcbo.apps.iv.networks`) extrapolate
to the grid.
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from funcbo.apps.iv.cache import cached_arrays
from funcbo.apps.iv.data import IVData, IVTestSet, split_train

#: bump when the generation code or the array layout changes (cached datasets are regenerated)
DEMAND_VERSION = 2
TEST_PRICES = np.linspace(10.0, 25.0, 20)
TEST_TIMES = np.linspace(0.0, 10.0, 20)
TEST_TYPES = np.arange(1, 8)


def demand_psi(t: np.ndarray) -> np.ndarray:
    """ψ(t) = 2((t − 5)⁴/600 + exp(−4(t − 5)²) + t/10 − 2)."""
    t = np.asarray(t, dtype=np.float64)
    return 2.0 * ((t - 5.0) ** 4 / 600.0 + np.exp(-4.0 * (t - 5.0) ** 2) + t / 10.0 - 2.0)


def demand_f(p: np.ndarray, t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """f(p, t, s) = 100 + (10 + p)·s·ψ(t) − 2p."""
    p = np.asarray(p, dtype=np.float64)
    return 100.0 + (10.0 + p) * np.asarray(s, dtype=np.float64) * demand_psi(t) - 2.0 * p


def generate_demand_train(n: int, rho: float, seed: int) -> dict[str, np.ndarray]:
    """The n training points of the demand design (see the module docstring for the draws).

    Returns:
        ``instrument`` (c, t, s) [n, 3], ``treatment`` p [n, 1], ``covariate`` (t, s) [n, 2],
        ``outcome`` [n, 1], ``structural`` [n, 1], all float64.
    """
    if n < 2:
        raise ValueError(f"the demand design needs n ≥ 2, got {n}")
    if not -1.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [-1, 1], got {rho}")
    rng = np.random.default_rng(seed)
    s = rng.choice(list(range(1, 8)), n)
    t = rng.uniform(0.0, 10.0, n)
    c = rng.normal(0.0, 1.0, n)
    v = rng.normal(0.0, 1.0, n)
    e = rho * v + rng.normal(0.0, np.sqrt(1.0 - rho**2), n)
    p = 25.0 + (c + 3.0) * demand_psi(t) + v
    structural = demand_f(p, t, s)
    return {
        "instrument": np.stack([c, t, s], axis=1).astype(np.float64),
        "treatment": p[:, None],
        "covariate": np.stack([t, s], axis=1).astype(np.float64),
        "outcome": (structural + e)[:, None],
        "structural": structural[:, None],
    }


def generate_demand_test() -> IVTestSet:
    """The 2800-point test grid: treatment p ``[2800, 1]``, covariates (t, s) ``[2800, 2]`` and
    f on it ``[2800, 1]``."""
    grid = np.array(list(itertools.product(TEST_PRICES, TEST_TIMES, TEST_TYPES)), dtype=np.float64)
    f = demand_f(grid[:, 0], grid[:, 1], grid[:, 2])[:, None]
    return IVTestSet(grid[:, :1], f, grid[:, 1:])


def demand_data(
    n: int = 5000,
    seed: int = 0,
    *,
    rho: float = 0.5,
    use_cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> IVData:
    """The demand-design IV dataset: stage-1/stage-2 halves of n points and the 2800-point test
    (treatment p, covariates (t, s), instrument (c, t, s); see the module docstring).

    Args:
        n: training points (1000, 5000 or 10000 in the benchmark), split 50/50.
        seed: data seed (draws and split).
        rho: correlation of the price and outcome noises, ρ ∈ {0.1, 0.25, 0.5, 0.75, 0.9}.
        use_cache, cache_dir: the on-disk cache (see :mod:`funcbo.apps.iv.cache`).
    """
    params = {
        "dataset": "demand",
        "version": DEMAND_VERSION,
        "n": int(n),
        "seed": int(seed),
        "rho": float(rho),
    }

    def build() -> dict[str, np.ndarray]:
        s1, s2 = split_train(generate_demand_train(n, rho, seed), seed)
        return IVData(s1, s2, generate_demand_test()).to_arrays()

    arrays = cached_arrays("demand", params, build, use_cache=use_cache, directory=cache_dir)
    return IVData.from_arrays(arrays, params)


__all__ = [
    "demand_data",
    "demand_f",
    "demand_psi",
    "generate_demand_test",
    "generate_demand_train",
]
