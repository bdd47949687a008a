"""Penalty methods: O(1/γ) bias towards the exact hypergradient."""

import pytest
import torch
from helpers import lbfgs, rel_err

import funcbo
from funcbo.synthetic import LinearQuadratic


def _estimate(cls, gamma, seed=0):
    lq = LinearQuadratic(seed=seed)
    outer, inner = lq.make_outer(), lq.make_inner()
    lq.set_inner_to_solution(inner, outer.weight)
    est = cls(inner, lbfgs(inner.parameters()), 1, penalty=gamma)
    (g,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    return rel_err(g, lq.grad(outer.weight.detach())), est


@pytest.mark.parametrize("cls", [funcbo.ValuePenalty, funcbo.GradientPenalty])
def test_penalty_bias_decreases_like_one_over_gamma(cls):
    e2, _ = _estimate(cls, 1e2)
    e3, est = _estimate(cls, 1e3)
    assert e3 <= 5e-3
    assert 5 <= e2 / e3 <= 20  # O(1/γ)
    assert est.stats["penalty"] >= 0


def test_value_penalty_value_model_solves_the_inner_problem():
    _, est = _estimate(funcbo.ValuePenalty, 1e3)
    assert est.stats["value_loss"] <= est.stats["inner_loss"] + 1e-12


def test_penalty_must_be_positive():
    lq = LinearQuadratic()
    inner = lq.make_inner()
    for cls in (funcbo.ValuePenalty, funcbo.GradientPenalty):
        with pytest.raises(ValueError, match="penalty"):
            cls(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 1, penalty=0.0)


def test_joint_value_penalty_is_one_optimizer_over_omega_and_theta():
    """joint=True, one θ-step: after θ̂'s steps, θ and ω take one step of a single Adam over
    (ω, θ) on L_out + γ·(L_in(ω, θ) − L_in(ω, θ̂)), as the authors' IV value penalty."""
    import copy

    lq = LinearQuadratic(seed=3)
    gamma, lr, value_steps = 0.5, 0.05, 3
    outer, inner = lq.make_outer(), lq.make_inner()
    ref_outer, ref_inner, ref_value = (copy.deepcopy(m) for m in (outer, inner, inner))
    est = funcbo.ValuePenalty(
        inner,
        torch.optim.Adam(inner.parameters(), lr=lr, weight_decay=0.01),
        1,
        penalty=gamma,
        value_steps=value_steps,
        joint=True,
    )
    opt = torch.optim.Adam(outer.parameters(), lr=lr, weight_decay=0.01)
    ref_opt = torch.optim.Adam(
        [*ref_outer.parameters(), *ref_inner.parameters()], lr=lr, weight_decay=0.01
    )
    ref_value_opt = torch.optim.Adam(ref_value.parameters(), lr=lr, weight_decay=0.01)
    problem, b_in, b_out = lq.problem, lq.inner_batch, lq.outer_batch

    def l_in(model, omega):
        return problem.eval_inner(omega, problem.predict(model, b_in, "inner"), b_in).mean()

    for _ in range(3):
        grads = est.step(problem, outer, b_in, b_out)
        for p, g in zip(outer.parameters(), grads, strict=True):
            p.grad = g
        opt.step()
        # the reference: θ̂'s steps with ω fixed, then one joint step
        for _ in range(value_steps):
            ref_value_opt.zero_grad()
            loss = l_in(ref_value, ref_outer.requires_grad_(False))
            loss.backward()
            ref_value_opt.step()
        ref_outer.requires_grad_(True)
        ref_opt.zero_grad()
        hat = problem.eval_inner(
            ref_outer, problem.predict(ref_value, b_in, "inner").detach(), b_in
        ).mean()
        pred_out = problem.predict(ref_inner, b_out, "outer")
        l_out = problem.eval_outer(ref_outer, pred_out, b_out).mean()
        (l_out + gamma * (l_in(ref_inner, ref_outer) - hat)).backward()
        ref_opt.step()
    for got, want in (
        (outer, ref_outer),
        (inner, ref_inner),
        (est.value_model, ref_value),
    ):
        for a, b in zip(got.parameters(), want.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-12, rtol=0)
    moved = sum(
        float((a - b).detach().abs().sum())
        for a, b in zip(inner.parameters(), lq.make_inner().parameters(), strict=True)
    )
    assert moved > 1e-3  # θ took its steps


def test_joint_needs_an_inner_step():
    lq = LinearQuadratic()
    inner = lq.make_inner()
    with pytest.raises(ValueError, match="joint"):
        funcbo.ValuePenalty(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 0, joint=True)


def _fd_grad(f, params, eps=1e-6):
    """Central finite differences of the scalar f() in every entry of params (float64)."""
    out = []
    for p in params:
        g = torch.zeros_like(p)
        with torch.no_grad():
            for i in range(p.numel()):
                flat = p.view(-1)
                old = flat[i].item()
                flat[i] = old + eps
                hi = f()
                flat[i] = old - eps
                lo = f()
                flat[i] = old
                g.view(-1)[i] = (hi - lo) / (2 * eps)
        out.append(g)
    return out


@pytest.mark.parametrize("squared", [True, False])
def test_gradient_penalty_steps_match_finite_differences(squared):
    """θ's SGD step descends L_out/γ + P and the outer gradient is ∂_ω(L_out + γ·P), with
    P = ½‖∇_θ L_in‖² or ‖∇_θ L_in‖ (squared=False, the authors' IV form): both checked against
    finite differences of P computed from first-order gradients only (float64)."""
    from funcbo.penalty import _losses

    lq = LinearQuadratic(seed=5)
    gamma, lr = 0.3, 0.01
    outer, inner = lq.make_outer(), lq.make_inner()
    theta = list(inner.parameters())
    omega = list(outer.parameters())

    def objective(scale_out: float, scale_pen: float) -> float:
        with torch.enable_grad():
            l_in, l_out = _losses(lq.problem, inner, outer, lq.inner_batch, lq.outer_batch)
            G = torch.autograd.grad(l_in, theta)
        sq = sum(float((g**2).sum()) for g in G)
        pen = 0.5 * sq if squared else sq**0.5
        return scale_out * float(l_out) + scale_pen * pen

    theta_step = _fd_grad(lambda: objective(1 / gamma, 1.0), theta)
    expected_theta = [p.detach() - lr * g for p, g in zip(theta, theta_step, strict=True)]
    est = funcbo.GradientPenalty(
        inner, torch.optim.SGD(theta, lr=lr), 1, penalty=gamma, squared=squared
    )
    grads = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    for p, e in zip(theta, expected_theta, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-7, atol=1e-9)
    expected_omega = _fd_grad(lambda: objective(1.0, gamma), omega)
    for g, e in zip(grads, expected_omega, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-8)
    sq = 2 * est.stats["penalty"] if squared else est.stats["penalty"] ** 2
    assert sq > 1e-3  # the penalty is not trivially zero here


def test_norm_from_squares_has_a_finite_gradient_at_zero():
    from funcbo.penalty import norm_from_squares

    sq = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    norm = norm_from_squares(sq)
    (g,) = torch.autograd.grad(norm.sum(), sq)
    torch.testing.assert_close(norm.detach(), torch.tensor([0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(g, torch.tensor([0.0, 0.25], dtype=torch.float64))  # d√s = 1/(2√s)
