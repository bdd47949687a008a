"""AID and ITD against the closed-form hypergradient of the linear-quadratic problem."""

import pytest
import torch
from helpers import rel_err

import funcbo
from funcbo.synthetic import DiscreteIV, LinearQuadratic


def _lq(seed=0, at_solution=True):
    lq = LinearQuadratic(seed=seed)
    outer, inner = lq.make_outer(), lq.make_inner()
    if at_solution:
        lq.set_inner_to_solution(inner, outer.weight)
    return lq, outer, inner


def _inner_lipschitz(lq):
    X = torch.cat(
        [lq.inner_batch["x"], torch.ones(len(lq.inner_batch["x"]), 1, dtype=torch.float64)], 1
    )
    ev = torch.linalg.eigvalsh(X.T @ X / X.shape[0])
    return float(ev[-1]), float(ev[0])


def test_aid_cg_matches_exact():
    lq, outer, inner = _lq()
    est = funcbo.AID(
        inner, torch.optim.SGD(inner.parameters(), lr=0.1), 0, solver=funcbo.CG(maxiter=50)
    )
    (g,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    assert rel_err(g, lq.grad(outer.weight.detach())) <= 1e-4
    assert torch.equal(outer.weight.grad, g)


def test_aid_neumann_with_enough_iterations_matches_exact():
    lq, outer, inner = _lq()
    L, mu = _inner_lipschitz(lq)
    est = funcbo.AID(
        inner,
        torch.optim.SGD(inner.parameters(), lr=0.1),
        0,
        solver=funcbo.Neumann(iters=int(30 * L / mu), lr=1.0 / L),
        warm_start=False,
    )
    (g,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    assert rel_err(g, lq.grad(outer.weight.detach())) <= 1e-4


def test_aid_warm_start_improves_a_truncated_solver():
    lq, outer, inner = _lq()
    exact = lq.grad(outer.weight.detach())
    est = funcbo.AID(
        inner,
        torch.optim.SGD(inner.parameters(), lr=0.1),
        0,
        solver=funcbo.CG(maxiter=1),
        warm_start=True,
    )
    errs = [
        rel_err(est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch), exact)
        for _ in range(8)
    ]
    assert errs[-1] < 1e-3 * errs[0]
    cold = funcbo.AID(
        inner,
        torch.optim.SGD(inner.parameters(), lr=0.1),
        0,
        solver=funcbo.CG(maxiter=1),
        warm_start=False,
    )
    cold_errs = [
        rel_err(cold.step(lq.problem, outer, lq.inner_batch, lq.outer_batch), exact)
        for _ in range(3)
    ]
    assert cold_errs[-1] == pytest.approx(cold_errs[0])


def test_aid_identity_is_omd_approximation():
    # With the Hessian replaced by I, v = ∂_θ L_out: the estimate is g_ω − ∂_ω∂_θ L_in · ∂_θ L_out.
    lq, outer, inner = _lq()
    est = funcbo.AID(
        inner, torch.optim.SGD(inner.parameters(), lr=0.1), 0, solver=funcbo.Identity()
    )
    (g,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    assert est.stats["solver_iters"] == 0
    assert torch.isfinite(g).all() and rel_err(g, lq.grad(outer.weight.detach())) > 1e-3


def test_itd_long_unroll_from_scratch_matches_exact():
    # The unroll is the inner solver here: it starts far from θ*.
    lq, outer, inner = _lq(seed=2, at_solution=False)
    L, _ = _inner_lipschitz(lq)
    est = funcbo.ITD(inner, lr=1.0 / L, unroll=300)
    (g,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    assert rel_err(g, lq.grad(outer.weight.detach())) <= 1e-4
    W, _b = lq.inner_solution(outer.weight.detach())
    assert torch.allclose(inner.weight, W, atol=1e-8)  # final θ written back (warm start)


def test_itd_with_momentum_converges_too():
    lq, outer, inner = _lq(seed=2, at_solution=False)
    L, _ = _inner_lipschitz(lq)
    est = funcbo.ITD(inner, lr=0.5 / L, unroll=300, momentum=0.5)
    (g,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    assert rel_err(g, lq.grad(outer.weight.detach())) <= 1e-4


def test_itd_truncation_is_biased_and_shrinks_with_depth():
    lq, outer, _ = _lq(seed=2)
    L, _ = _inner_lipschitz(lq)
    exact = lq.grad(outer.weight.detach())
    errs = []
    for truncate in (1, 5, 50):
        inner = lq.make_inner()
        lq.set_inner_to_solution(inner, outer.weight)
        est = funcbo.ITD(inner, lr=1.0 / L, unroll=50, truncate=truncate)
        errs.append(rel_err(est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch), exact))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] <= 1e-4


def test_itd_argument_errors():
    _, _, inner = _lq()
    with pytest.raises(ValueError, match="truncate"):
        funcbo.ITD(inner, lr=0.1, unroll=5, truncate=6)
    with pytest.raises(ValueError, match="unroll"):
        funcbo.ITD(inner, lr=0.1, unroll=0)


def test_aid_on_overparameterised_network():
    # Parameter-space AID on a non-convex (in θ) inner problem: the parameter Hessian of an
    # over-parameterised MLP is singular; damped CG from zero stays in its range and, at an
    # exactly solved inner problem, still recovers the hypergradient.
    iv = DiscreteIV()
    outer = iv.make_outer()
    inner = iv.make_inner(width=32, depth=2)
    opt = torch.optim.LBFGS(
        inner.parameters(),
        max_iter=3000,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )
    est = funcbo.AID(inner, opt, 1, solver=funcbo.CG(maxiter=200, tol=1e-12, damping=1e-8))
    g = est.step(iv.problem, outer, iv.inner_batch, iv.outer_batch)
    assert rel_err(g, iv.exact_grad(outer)) <= 1e-3
