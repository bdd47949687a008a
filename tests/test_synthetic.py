"""The synthetic problems' exact answers (float64): inner solutions that are stationary for the
inner loss, hypergradients that match finite differences of F, minimisers where ∇F = 0.

(Finite differences of LinearQuadratic's and DiscreteIV's closed-form gradients are checked in
test_functional.py, next to FuncID's.)
"""

import pytest
import torch
from helpers import rel_err
from torch import nn

from funcbo.synthetic import (
    DiscreteIV,
    LinearIV,
    LinearQuadratic,
    SoftmaxIV,
    minibatches,
    mlp,
)


def _directional_fd(value, outer, dirs, eps=1e-6):
    """(F(ω + εu) − F(ω − εu)) / 2ε, leaving ω as it was."""
    params = list(outer.parameters())
    with torch.no_grad():
        for p, u in zip(params, dirs, strict=True):
            p.add_(eps * u)
        fp = float(value(outer))
        for p, u in zip(params, dirs, strict=True):
            p.sub_(2 * eps * u)
        fm = float(value(outer))
        for p, u in zip(params, dirs, strict=True):
            p.add_(eps * u)
    return (fp - fm) / (2 * eps)


def _group_mean_of_inner_grad(prob, outer, h):
    """mean over each group k of ∂_v ℓ_in(ω, v, ·) at v = h[k]: zero at the inner solution."""
    v = h.detach()[prob.k_in].requires_grad_()
    loss = prob.problem.inner_loss(outer, v, prob.inner_batch).sum()
    (g,) = torch.autograd.grad(loss, v)
    return torch.zeros_like(h).index_add(0, prob.k_in, g.detach())


# ------------------------------------------------------------------------ LinearQuadratic
def test_linear_quadratic_closed_form_gradient_equals_autograd_of_the_value():
    lq = LinearQuadratic(seed=3)
    W = torch.randn(lq.d, lq.q, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(lq.value(W), W)
    assert rel_err(lq.grad(W.detach()), auto) <= 1e-13


def test_linear_quadratic_value_is_the_outer_loss_at_the_inner_solution():
    lq = LinearQuadratic(seed=1)
    outer, inner = lq.make_outer(), lq.make_inner()
    lq.set_inner_to_solution(inner, outer.weight)
    # the inner model written by set_inner_to_solution is stationary for the inner loss
    loss = lq.problem.inner_loss(outer, inner(lq.inner_batch["x"]), lq.inner_batch).mean()
    grads = torch.autograd.grad(loss, list(inner.parameters()))
    assert max(float(g.abs().max()) for g in grads) <= 1e-13
    with torch.no_grad():
        pred = inner(lq.outer_batch["x"])
        want = lq.problem.outer_loss(outer, pred, lq.outer_batch).mean()
    assert float(lq.value(outer.weight.detach())) == pytest.approx(float(want), rel=1e-13)


def test_linear_quadratic_optimum_is_the_minimiser():
    lq = LinearQuadratic(seed=0)
    star = lq.optimum()
    assert float(lq.grad(star).abs().max()) <= 1e-13
    f_star = float(lq.value(star))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        u = torch.randn(star.shape, generator=gen, dtype=torch.float64)
        assert float(lq.value(star + 1e-3 * u)) > f_star


# ---------------------------------------------------------------------------- DiscreteIV
def test_discrete_iv_inner_solution_is_the_group_minimiser():
    iv = DiscreteIV(seed=1)
    outer = iv.make_outer()
    h = iv.inner_solution(outer)
    assert h.shape == (iv.K, iv.d)
    assert float(_group_mean_of_inner_grad(iv, outer, h).abs().max()) <= 1e-13


# ----------------------------------------------------------------------------- SoftmaxIV
def test_softmax_iv_inner_solution_solves_the_group_problem():
    sm = SoftmaxIV(mu=0.1, seed=1)
    outer = sm.make_outer()
    h = sm.inner_solution(outer)
    assert float(_group_mean_of_inner_grad(sm, outer, h).abs().max()) <= 1e-13


@pytest.mark.parametrize("mu", [0.05, 0.5])
def test_softmax_iv_exact_gradient_matches_finite_differences(mu):
    # the gradient flows through one Newton step at the solution: the implicit gradient
    sm = SoftmaxIV(mu=mu, seed=2)
    outer = sm.make_outer()
    exact = sm.exact_grad(outer)
    for k in range(2):
        gen = torch.Generator().manual_seed(k)
        dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in outer.parameters()]
        got = sum(float((g * u).sum()) for g, u in zip(exact, dirs, strict=True))
        assert got == pytest.approx(_directional_fd(sm.value, outer, dirs), rel=1e-7)


def test_softmax_iv_output_hessian_is_not_isotropic():
    sm = SoftmaxIV(mu=0.1)
    outer = sm.make_outer()
    v = sm.inner_solution(outer)[:1].detach()

    def loss(w):
        return sm.problem.inner_loss(outer, w, {"t": sm.inner_batch["t"][:1]}).sum()

    H = torch.autograd.functional.hessian(loss, v).reshape(sm.d, sm.d)
    s = torch.softmax(v[0], 0)
    want = torch.diag(s) - torch.outer(s, s) + 0.1 * torch.eye(sm.d, dtype=torch.float64)
    torch.testing.assert_close(H, want, rtol=1e-12, atol=1e-14)
    assert float((H - H[0, 0] * torch.eye(sm.d, dtype=torch.float64)).abs().max()) > 1e-3


# ------------------------------------------------------------------------------ LinearIV
def _linear_iv_value(iv: LinearIV, outer: nn.Module) -> torch.Tensor:
    """F(β, b) from the problem's outer loss at h*(x) = βᵀ E[t | x] (stage-1 group means)."""
    t = iv.inner_data["t"]
    means = torch.zeros(iv.K, iv.q, dtype=t.dtype).index_add(0, iv.k_in, t)
    means = means / torch.bincount(iv.k_in, minlength=iv.K).to(t.dtype)[:, None]
    pred = (means[iv.k_out] @ outer.beta)[:, None]
    return iv.problem.outer_loss(outer, pred, iv.outer_data).mean()


def test_linear_iv_exact_is_the_bilevel_minimiser_and_corrects_ols():
    iv = LinearIV(seed=0)
    ex = iv.exact()
    outer = iv.make_outer()
    with torch.no_grad():
        outer.beta.copy_(ex[:-1])
        outer.b.copy_(ex[-1:])
    assert torch.equal(iv.estimate(outer), ex)
    g = torch.autograd.grad(_linear_iv_value(iv, outer), list(outer.parameters()))
    assert max(float(x.abs().max()) for x in g) <= 1e-12
    # and away from it the gradient is not small (the check above can fail)
    with torch.no_grad():
        outer.beta.add_(0.1)
    g = torch.autograd.grad(_linear_iv_value(iv, outer), list(outer.parameters()))
    assert max(float(x.abs().max()) for x in g) > 1e-2
    truth = iv.truth()
    assert rel_err(ex, truth) < 0.1 < 0.5 < rel_err(iv.ols(), truth)  # OLS is confounded
    assert torch.equal(iv.exact(), ex)  # the same bits on every call


def test_linear_iv_data_follow_the_seed_and_checks_its_arguments():
    a, b, c = LinearIV(n=100, seed=4), LinearIV(n=100, seed=4), LinearIV(n=100, seed=5)
    assert torch.equal(a.outer_data["y"], b.outer_data["y"])
    assert not torch.equal(a.outer_data["y"], c.outer_data["y"])
    assert a.inner_data["x"].shape == (50, 8) and a.outer_data["t"].shape == (50, 3)
    with pytest.raises(ValueError, match="K ≥ q\\+1"):
        LinearIV(K=3, q=3)


# --------------------------------------------------------------------- helpers of the module
def test_minibatches_draw_rows_with_replacement_from_the_generator():
    data = {"x": torch.arange(10.0)[:, None], "y": -torch.arange(10)}
    draw = minibatches(data, 4, torch.Generator().manual_seed(3))
    ref = torch.Generator().manual_seed(3)
    for _ in range(3):
        batch = draw()
        idx = torch.randint(0, 10, (4,), generator=ref)
        assert torch.equal(batch["x"][:, 0], idx.double()) and torch.equal(batch["y"], -idx)
    with pytest.raises(ValueError, match="batch_size must be ≥ 1, got 0"):
        minibatches(data, 0, torch.Generator())


def test_mlp_layers():
    net = mlp([3, 5, 7, 2], activation=nn.Tanh)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [
        (3, 5),
        (5, 7),
        (7, 2),
    ]
    assert isinstance(mlp([2, 1])[0], nn.Linear) and len(mlp([2, 1])) == 1
