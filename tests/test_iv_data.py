"""The IV data protocol: dSprites DGP, test grid, structural matrix, cache, demand design."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from funcbo.apps.iv import data as ivdata
from funcbo.apps.iv.data import (
    IVTensors,
    dsprites_data,
    grid_latents,
    load_structural_matrix,
    split_indices,
    structural_function,
    structural_matrix,
)
from funcbo.apps.iv.demand import demand_data, demand_f, demand_psi
from funcbo.apps.iv.dsprites import render_classes
from funcbo.apps.iv.evaluate import out_of_sample_mse

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MATRIX = SHARED / "dsprite_mat.npy"
N = 200


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return dsprites_data(N, 0, use_cache=False)


def test_shapes_and_value_ranges(data) -> None:  # type: ignore[no-untyped-def]
    s1, s2, test = data.stage1, data.stage2, data.test
    assert len(s1) == len(s2) == N // 2 and len(test) == 588
    for s in (s1, s2):
        assert s.instrument.shape == (N // 2, 3) and s.treatment.shape == (N // 2, 4096)
        assert s.outcome.shape == s.structural.shape == (N // 2, 1)
        assert s.treatment.dtype == np.float32
        scale, orient, pos_x = s.instrument.T
        assert np.isin(np.round(scale, 6), np.round(np.linspace(0.5, 1, 6), 6)).all()
        assert orient.min() >= 0 and orient.max() <= 2 * np.pi
        assert pos_x.min() >= 0 and pos_x.max() <= 1
        # treatment = binary image + N(0, 0.1²) noise
        noise = s.treatment - np.round(s.treatment)
        assert abs(noise.std() - 0.1) < 0.005 and abs(noise.mean()) < 0.002
        # outcome − f = (posY − 16) + N(0, 0.5²) lies in [−16, 15] ± a few noise sd
        conf = (s.outcome - s.structural)[:, 0]
        assert conf.min() > -16 - 3 and conf.max() < 15 + 3
    assert test.treatment.shape == (588, 4096) and test.structural.shape == (588, 1)
    assert set(np.unique(test.treatment)) <= {0.0, 1.0}


def test_dgp_follows_the_documented_draw_order() -> None:
    """Re-derive the data from the specification, draw by draw, and compare exactly."""
    n, seed = 40, 7
    rng = np.random.default_rng(seed)
    pos_x, pos_y = rng.integers(32, size=n), rng.integers(32, size=n)
    scale, orient = rng.integers(6, size=n), rng.integers(40, size=n)
    imgs = render_classes(2, scale, orient, pos_x, pos_y).reshape(n, 4096).astype(float)
    X = imgs + rng.normal(0.0, 0.1, size=(n, 4096))
    y_noise = rng.normal(0.0, 0.5, size=n)
    A = np.random.default_rng(0).uniform(0, 1, size=(4096, 10))
    f = (np.mean((X @ A) ** 2, axis=1) - 5000) / 1000
    Y = f + (pos_y - 16) + y_noise
    Z = np.c_[np.linspace(0.5, 1, 6)[scale], np.linspace(0, 2 * np.pi, 40)[orient], pos_x / 31]

    d = dsprites_data(n, seed, use_cache=False)
    perm = np.random.RandomState(seed).permutation(n)
    i2, i1 = perm[: n // 2], perm[n // 2 :]
    np.testing.assert_allclose(d.stage1.instrument, Z[i1], rtol=1e-12)
    np.testing.assert_array_equal(d.stage2.treatment, X[i2].astype(np.float32))
    np.testing.assert_allclose(d.stage1.structural[:, 0], f[i1], rtol=1e-12)
    np.testing.assert_allclose(d.stage2.outcome[:, 0], Y[i2], rtol=1e-12)


def test_test_grid() -> None:
    lat = grid_latents()
    assert lat.shape == (588, 4)
    expected = list(itertools.product(range(0, 32, 5), range(0, 32, 5), (0, 3, 5), (0, 10, 20, 30)))
    assert [tuple(r) for r in lat.tolist()] == expected


def test_determinism_per_seed(data) -> None:  # type: ignore[no-untyped-def]
    again = dsprites_data(N, 0, use_cache=False)
    for a, b in zip(data.to_arrays().values(), again.to_arrays().values(), strict=True):
        np.testing.assert_array_equal(a, b)
    other = dsprites_data(N, 1, use_cache=False)
    assert not np.array_equal(other.stage1.outcome, data.stage1.outcome)
    np.testing.assert_array_equal(other.test.structural, data.test.structural)  # same f, grid


def test_split_is_half_and_half() -> None:
    i1, i2 = split_indices(11, 3)
    assert len(i1) == 5 and len(i2) == 6
    assert sorted(np.r_[i1, i2].tolist()) == list(range(11))


def test_constant_predictor_scores_the_test_variance(data) -> None:  # type: ignore[no-untyped-def]
    f = data.test.structural[:, 0]
    assert 15 < f.var() < 40  # about 25 for a U(0, 1) matrix

    class Constant(nn.Module):  # treatment features that ignore the image
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 4, dtype=x.dtype)

    T = IVTensors.from_data(data, torch.float64)
    mse = out_of_sample_mse(Constant(), nn.Linear(3, 4).double(), T)
    # the refit predicts (a shrunk) mean outcome: the MSE is var(f) plus a small bias
    assert f.var() <= mse < 1.3 * f.var()


@pytest.mark.skipif(not MATRIX.is_file(), reason=f"DFIV's matrix not found at {MATRIX}")
def test_shared_matrix_option() -> None:
    A = load_structural_matrix(MATRIX)
    assert A.shape == (4096, 10) and A.dtype == np.float64
    assert 0 <= A.min() and A.max() <= 1
    d = dsprites_data(20, 0, matrix=MATRIX, use_cache=False)
    f = d.test.structural[:, 0]
    assert 22 < f.var() < 28  # "a constant predictor scores about 25"
    np.testing.assert_allclose(f, structural_function(d.test.treatment, A), rtol=1e-5)


def test_matrix_file_validation(tmp_path: Path) -> None:
    good = tmp_path / "A.npy"
    np.save(good, structural_matrix(5))
    np.testing.assert_array_equal(load_structural_matrix(good), structural_matrix(5))
    d = dsprites_data(10, 0, matrix=good, use_cache=False)
    assert d.params["matrix"].startswith("npy-sha256:")
    with pytest.raises(FileNotFoundError):
        load_structural_matrix(tmp_path / "missing.npy")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((10, 4096)))
    with pytest.raises(ValueError, match="shape"):
        load_structural_matrix(wrong)
    ints = tmp_path / "ints.npy"
    np.save(ints, np.zeros((4096, 10), dtype=np.int64))
    with pytest.raises(ValueError, match="dtype"):
        load_structural_matrix(ints)
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_structural_matrix(pickled)


def test_cache_hit_returns_identical_arrays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FUNCBO_CACHE", str(tmp_path))
    first = dsprites_data(30, 2)
    files = list((tmp_path / "iv").glob("dsprites-*.npz"))
    assert len(files) == 1

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(ivdata, "generate_dsprites_train", boom)
    second = dsprites_data(30, 2)
    for a, b in zip(first.to_arrays().values(), second.to_arrays().values(), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert second.params == first.params
    with pytest.raises(AssertionError, match="cache"):
        dsprites_data(30, 3)  # other parameters: a different file, generated again
    monkeypatch.undo()

    # a torn file is regenerated, with a warning
    files[0].write_bytes(b"torn")
    monkeypatch.setenv("FUNCBO_CACHE", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        third = dsprites_data(30, 2)
    assert any("unreadable dataset cache" in str(w.message) for w in caught)
    np.testing.assert_array_equal(third.stage1.treatment, first.stage1.treatment)


def test_demand_design(tmp_path: Path) -> None:
    d = demand_data(1000, 0, rho=0.5, cache_dir=tmp_path)
    assert len(d.stage1) == len(d.stage2) == 500 and len(d.test) == 2800
    for s in (d.stage1, d.stage2):
        assert s.instrument.shape == (500, 3) and s.treatment.shape == (500, 1)
        assert s.covariate is not None and s.covariate.shape == (500, 2)
        p = s.treatment[:, 0]
        t, typ = s.covariate.T
        np.testing.assert_array_equal(s.instrument[:, 1:], s.covariate)  # exogenous covariates
        assert t.min() >= 0 and t.max() <= 10 and set(np.unique(typ)) <= set(range(1, 8))
        np.testing.assert_allclose(s.structural[:, 0], demand_f(p, t, typ))
        c = s.instrument[:, 0]
        v = p - 25 - (c + 3) * demand_psi(t)  # the price noise
        e = (s.outcome - s.structural)[:, 0]
        assert 0.3 < np.corrcoef(v, e)[0, 1] < 0.7  # ρ = 0.5
    assert d.test.treatment.shape == (2800, 1)
    assert d.test.covariate is not None and d.test.covariate.shape == (2800, 2)
    grid = np.c_[d.test.treatment, d.test.covariate]
    expected = list(itertools.product(np.linspace(10, 25, 20), np.linspace(0, 10, 20), range(1, 8)))
    np.testing.assert_allclose(grid, np.array(expected, dtype=float))
    np.testing.assert_allclose(d.test.structural[:, 0], demand_f(*grid.T))
    assert demand_f(25.0, 5.0, 1) == pytest.approx(100 + 35 * demand_psi(5.0) - 50)
    again = demand_data(1000, 0, rho=0.5, use_cache=False)
    np.testing.assert_array_equal(again.stage1.outcome, d.stage1.outcome)
    cached = demand_data(1000, 0, rho=0.5, cache_dir=tmp_path)  # read back from the cache
    assert cached.stage2.covariate is not None
    np.testing.assert_array_equal(cached.stage2.covariate, d.stage2.covariate)
    with pytest.raises(ValueError, match="rho"):
        demand_data(100, 0, rho=2.0, use_cache=False)


def test_demand_draws_follow_the_documented_order() -> None:
    """Re-derive the demand data from its specification, draw by draw (as DFIV's generator)."""
    n, seed, rho = 30, 4, 0.9
    rng = np.random.default_rng(seed)
    s = rng.choice(list(range(1, 8)), n)
    t = rng.uniform(0, 10, n)
    c = rng.normal(0, 1.0, n)
    v = rng.normal(0, 1.0, n)
    e = rho * v + rng.normal(0, np.sqrt(1 - rho**2), n)
    p = 25 + (c + 3) * demand_psi(t) + v
    d = demand_data(n, seed, rho=rho, use_cache=False)
    i1, i2 = split_indices(n, seed)
    for part, idx in ((d.stage1, i1), (d.stage2, i2)):
        np.testing.assert_allclose(part.treatment[:, 0], p[idx], rtol=1e-12)
        np.testing.assert_allclose(part.covariate, np.c_[t, s][idx], rtol=1e-12)
        np.testing.assert_allclose(part.instrument, np.c_[c, t, s][idx], rtol=1e-12)
        np.testing.assert_allclose(part.outcome[:, 0], demand_f(p, t, s)[idx] + e[idx])


def test_demand_constant_predictor_scores_the_test_variance(tmp_path: Path) -> None:
    """Features that ignore the treatment and covariates: the refit predicts (nearly) the mean
    outcome, so the MSE is about the variance of f on the grid (≈ 32,600), on f's scale."""
    d = demand_data(1000, 0, rho=0.5, cache_dir=tmp_path)
    f = d.test.structural[:, 0]
    assert 32_000 < f.var() < 33_300

    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 1, dtype=x.dtype)

    T = IVTensors.from_data(d, torch.float64)
    assert set(T.stage2) == {"z", "y", "x"} and set(T.test) == {"t", "f", "x"}
    instrument = nn.Linear(3, 4).double()
    mse = out_of_sample_mse(Constant(), instrument, T)
    y = d.stage2.outcome[:, 0]
    # the ridge shrinks the intercept: ŷ = mean(y)/(1 + λ) with a zero feature
    shrunk = y.mean() / (1 + 0.1)
    assert mse == pytest.approx(float(np.mean((f - shrunk) ** 2)), rel=1e-9)
    assert f.var() <= mse < 1.02 * f.var()
    # with a (constant) covariate network too: Φ(v, χ) = [v·χ, v, χ] are all zero
    mse_cov = out_of_sample_mse(Constant(), instrument, T, covariate=Constant())
    assert mse_cov == pytest.approx(mse, rel=1e-12)


def test_demand_refit_recovers_an_exact_structural_model(tmp_path: Path) -> None:
    """f(p, t, s) = α(t, s) + β(t, s)·p is linear in the outer product of [p; 1] with the
    features (s·ψ(t), ψ(t), s) of the covariates: with those exact features, the exact
    E[p | z] as instrument feature and a tiny ridge, the 2SLS refit predicts f on the grid with
    an error far below var(f) (what is left is estimation noise, amplified where the grid's
    prices lie outside the training prices), on f's own scale."""
    d = demand_data(1000, 0, rho=0.0, cache_dir=tmp_path)

    class Price(nn.Module):
        def forward(self, p: torch.Tensor) -> torch.Tensor:
            return p

    class Cells(nn.Module):  # α and β as functions of (ψ(t), s): features s·ψ(t), ψ(t), s
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t, s = x[:, 0], x[:, 1]
            psi = 2 * ((t - 5) ** 4 / 600 + torch.exp(-4 * (t - 5) ** 2) + t / 10 - 2)
            return torch.stack([s * psi, psi, s], dim=1)

    class Instrument(nn.Module):  # E[p | z] = 25 + (c + 3)ψ(t): an exact linear feature
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            c, t = z[:, 0], z[:, 1]
            psi = 2 * ((t - 5) ** 4 / 600 + torch.exp(-4 * (t - 5) ** 2) + t / 10 - 2)
            return (25 + (c + 3) * psi)[:, None]

    T = IVTensors.from_data(d, torch.float64)
    mse = out_of_sample_mse(Price(), Instrument(), T, 1e-9, 1e-9, covariate=Cells())
    assert mse < 1e-3 * d.test.structural.var()  # var(f) ≈ 32,600
