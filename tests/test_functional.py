"""FuncID against exact hypergradients and finite differences (float64)."""

import pytest
import torch
from helpers import lbfgs, rel_err

import funcbo
from funcbo.synthetic import DiscreteIV, LinearQuadratic, SoftmaxIV


def _lq_at_solution(seed: int = 0):
    lq = LinearQuadratic(seed=seed)
    outer, inner = lq.make_outer(), lq.make_inner()
    lq.set_inner_to_solution(inner, outer.weight)
    return lq, outer, inner


def test_closed_form_gradient_matches_finite_differences():
    lq, outer, _ = _lq_at_solution()
    W = outer.weight.detach()
    U = torch.randn_like(W)
    eps = 1e-6
    fd = (lq.value(W + eps * U) - lq.value(W - eps * U)) / (2 * eps)
    assert float(fd) == pytest.approx(float((lq.grad(W) * U).sum()), rel=1e-8)


def test_funcid_linear_adjoint_exact_on_linear_quadratic():
    lq, outer, inner = _lq_at_solution()
    est = funcbo.FuncID(
        inner, torch.optim.SGD(inner.parameters(), lr=0.1), 0, funcbo.LinearAdjoint(ridge=1e-12)
    )
    (g,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    assert rel_err(g, lq.grad(outer.weight.detach())) <= 1e-6
    assert torch.equal(outer.weight.grad, g)


def test_funcid_network_adjoint_exact_on_linear_quadratic():
    lq, outer, inner = _lq_at_solution()
    adjoint = funcbo.NetworkAdjoint(optimizer=lbfgs, steps=1)
    est = funcbo.FuncID(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 0, adjoint)
    (g,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    assert rel_err(g, lq.grad(outer.weight.detach())) <= 1e-6


def test_funcid_with_inner_solve_by_lbfgs():
    # Inner model starts far from h*: the inner solve is part of the estimate.
    lq = LinearQuadratic(seed=3)
    outer, inner = lq.make_outer(), lq.make_inner()
    est = funcbo.FuncID(inner, lbfgs(inner.parameters()), 1, funcbo.LinearAdjoint(ridge=1e-12))
    (g,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    assert rel_err(g, lq.grad(outer.weight.detach())) <= 1e-6
    assert est.stats["inner_loss"] > est.stats["inner_loss_at_hypergrad"]


def test_funcid_matches_finite_differences_of_F():
    lq, outer, inner = _lq_at_solution(seed=1)
    est = funcbo.FuncID(
        inner, torch.optim.SGD(inner.parameters(), lr=0.1), 0, funcbo.LinearAdjoint(ridge=1e-12)
    )
    (g,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    W = outer.weight.detach()
    for k in range(3):
        U = torch.randn(W.shape, generator=torch.Generator().manual_seed(k), dtype=W.dtype)
        eps = 1e-6
        fd = (lq.value(W + eps * U) - lq.value(W - eps * U)) / (2 * eps)
        assert float((g * U).sum()) == pytest.approx(float(fd), rel=1e-6)


# ---------------------------------------------------------------- (b) discrete instrument
@pytest.fixture(scope="module")
def iv():
    return DiscreteIV()


def _trained_iv_estimate(iv, adjoint, *, inner_steps=1000, seed=0):
    outer = iv.make_outer()
    torch.manual_seed(seed)
    inner = iv.make_inner(width=128, depth=2)  # 128·128 weights to fit K=6 group means
    est = funcbo.FuncID(inner, torch.optim.Adam(inner.parameters(), lr=1e-2), inner_steps, adjoint)
    g = est.step(iv.problem, outer, iv.inner_batch, iv.outer_batch)
    return g, iv.exact_grad(outer), est


def test_iv_network_adjoint_with_overparameterised_mlp(iv):
    adjoint = funcbo.NetworkAdjoint(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), steps=300)
    g, exact, est = _trained_iv_estimate(iv, adjoint)
    assert rel_err(g, exact) <= 5e-2
    assert est.stats["adjoint_loss"] < est.stats["adjoint_loss_first"]


def test_iv_linear_adjoint_with_overparameterised_mlp(iv):
    g, exact, est = _trained_iv_estimate(iv, funcbo.LinearAdjoint(ridge=1e-8))
    assert rel_err(g, exact) <= 1e-2
    assert est.stats["adjoint_isotropic"] == 1.0


def test_iv_exact_inner_solve_gives_near_exact_hypergradient(iv):
    outer = iv.make_outer()
    inner = iv.make_inner(width=64, depth=2)
    est = funcbo.FuncID(
        inner, lbfgs(inner.parameters(), 3000), 1, funcbo.LinearAdjoint(ridge=1e-10)
    )
    g = est.step(iv.problem, outer, iv.inner_batch, iv.outer_batch)
    assert rel_err(g, iv.exact_grad(outer)) <= 1e-5


def test_iv_exact_gradient_matches_finite_differences(iv):
    outer = iv.make_outer()
    exact = iv.exact_grad(outer)
    params = list(outer.parameters())
    dirs = [torch.randn_like(p) for p in params]
    eps = 1e-6
    with torch.no_grad():
        for p, u in zip(params, dirs, strict=True):
            p.add_(eps * u)
        fp = float(iv.value(outer))
        for p, u in zip(params, dirs, strict=True):
            p.sub_(2 * eps * u)
        fm = float(iv.value(outer))
        for p, u in zip(params, dirs, strict=True):
            p.add_(eps * u)
    fd = (fp - fm) / (2 * eps)
    got = sum(float((g * u).sum()) for g, u in zip(exact, dirs, strict=True))
    assert got == pytest.approx(fd, rel=1e-7)


# ------------------------------------------------------------- (c) non-quadratic inner loss
def _fd_of_F(prob, outer, dirs, eps=1e-5):
    params = list(outer.parameters())
    with torch.no_grad():
        for p, u in zip(params, dirs, strict=True):
            p.add_(eps * u)
        fp = float(prob.value(outer))
        for p, u in zip(params, dirs, strict=True):
            p.sub_(2 * eps * u)
        fm = float(prob.value(outer))
        for p, u in zip(params, dirs, strict=True):
            p.add_(eps * u)
    return (fp - fm) / (2 * eps)


@pytest.mark.parametrize("adjoint", ["linear", "network"])
def test_softmax_inner_loss_matches_finite_differences(adjoint):
    sm = SoftmaxIV(mu=0.1)
    outer = sm.make_outer()
    inner = sm.make_inner(width=64, depth=2)
    adj = (
        funcbo.LinearAdjoint(ridge=1e-10)
        if adjoint == "linear"
        else funcbo.NetworkAdjoint(optimizer=lbfgs, steps=1)
    )
    est = funcbo.FuncID(inner, lbfgs(inner.parameters(), 3000), 1, adj)
    g = est.step(sm.problem, outer, sm.inner_batch, sm.outer_batch)
    if adjoint == "linear":
        assert est.stats["adjoint_isotropic"] == 0.0  # the structured CG path ran
        assert est.stats["adjoint_cg_iters"] >= 1
    for k in range(3):
        gen = torch.Generator().manual_seed(k)
        dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in outer.parameters()]
        fd = _fd_of_F(sm, outer, dirs)
        got = sum(float((gi * u).sum()) for gi, u in zip(g, dirs, strict=True))
        assert got == pytest.approx(fd, rel=1e-3)
    # and against the exact implicit gradient of the Newton-solved inner problem
    assert rel_err(g, torch.autograd.grad(sm.value(outer), list(outer.parameters()))) <= 1e-4


def test_frozen_and_nested_outer_parameters():
    # Gradients align with outer.parameters(); frozen ones get zeros and keep .grad None.
    iv = DiscreteIV()
    outer = iv.make_outer()
    outer.head.bias.requires_grad_(False)
    outer.register_buffer("scale", torch.ones(1, dtype=torch.float64))
    inner = iv.make_inner(width=64, depth=2)
    est = funcbo.FuncID(inner, lbfgs(inner.parameters(), 3000), 1, funcbo.LinearAdjoint(1e-10))
    g = est.step(iv.problem, outer, iv.inner_batch, iv.outer_batch)
    params = list(outer.parameters())
    assert len(g) == len(params)
    assert all(gi.shape == p.shape for gi, p in zip(g, params, strict=True))
    assert outer.head.bias.grad is None and float(g[-1].abs().sum()) == 0.0
    full = torch.autograd.grad(iv.value(outer), [p for p in params if p.requires_grad])
    assert rel_err([gi for gi, p in zip(g, params, strict=True) if p.requires_grad], full) <= 1e-5
    assert torch.equal(outer.scale, torch.ones(1, dtype=torch.float64))


def test_custom_inner_solver_is_used_and_checked():
    lq = LinearQuadratic()
    inner, other = lq.make_inner(), lq.make_inner()
    solver = funcbo.InnerSolver(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 3)
    est = funcbo.FuncID(inner, None, adjoint=funcbo.LinearAdjoint(), inner_solver=solver)
    assert est.inner is solver and est.inner_steps == 3
    with pytest.raises(ValueError, match="must train the estimator's inner model"):
        funcbo.FuncID(other, None, inner_solver=solver)
    with pytest.raises(ValueError, match="inner optimizer"):
        funcbo.AID(inner, None)


def test_known_output_hessian_skips_autodiff_and_agrees():
    class KnownHessian(funcbo.BilevelProblem):
        def output_hessian(self, outer, pred, batch):
            return funcbo.OutputHessian.scaled_identity(1.0, pred)

    lq, outer, inner = _lq_at_solution()
    known = KnownHessian(lq.problem.inner_loss, lq.problem.outer_loss)
    est = funcbo.FuncID(
        inner,
        torch.optim.SGD(inner.parameters(), lr=0.1),
        0,
        funcbo.LinearAdjoint(ridge=1e-12),
        check_convexity=True,
    )
    (g,) = est.step(known, outer, lq.inner_batch, lq.outer_batch)
    assert rel_err(g, lq.grad(outer.weight.detach())) <= 1e-6


def test_phase_meter_times_every_phase_and_changes_nothing():
    from funcbo.memory import PhaseMeter

    lq, outer, inner = _lq_at_solution()
    est = funcbo.FuncID(
        inner, torch.optim.SGD(inner.parameters(), lr=0.1), 0, funcbo.LinearAdjoint(ridge=1e-12)
    )
    g0 = est.hypergradient(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    est.phase_meter = PhaseMeter()
    g1 = est.hypergradient(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    assert torch.equal(g0[0], g1[0])
    phases = est.phase_meter.phases
    assert list(phases) == ["forward", "outer_grad", "hessian", "solve", "cross"]
    assert all(p["time_s"] >= 0 and p["peak_mb"] >= 0 for p in phases.values())
