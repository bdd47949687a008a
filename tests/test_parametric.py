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


# ----------------------------------------------------------------- ITD unrolling an optimizer
def _torch_inner_steps(lq, outer, model, opt, steps):
    """``steps`` steps of the torch optimizer ``opt`` on the mean inner loss of ``model``."""
    for _ in range(steps):
        opt.zero_grad()
        lq.problem.eval_inner(outer, model(lq.inner_batch["x"]), lq.inner_batch).mean().backward()
        opt.step()


def _adam_reference_loss(lq, outer_weight, inner, opt_state, steps):
    """L_out after ``steps`` torch.optim.Adam steps of a copy of ``inner`` (from ``opt_state``)
    on the inner loss at Ω = ``outer_weight``: the function ITD(adam) differentiates."""
    import copy

    outer = lq.make_outer()
    model = copy.deepcopy(inner)
    with torch.no_grad():
        outer.weight.copy_(outer_weight)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.01)
    opt.load_state_dict(copy.deepcopy(opt_state))
    _torch_inner_steps(lq, outer, model, opt, steps)
    with torch.no_grad():
        pred = model(lq.outer_batch["x"])
        return float(lq.problem.eval_outer(outer, pred, lq.outer_batch).mean()), model, opt


def _itd_adam(seed=2):
    lq, outer, inner = _lq(seed=seed, at_solution=False)
    opt = torch.optim.Adam(inner.parameters(), lr=0.05, weight_decay=0.01)
    return lq, outer, inner, funcbo.ITD(inner, unroll=5, optimizer=opt), opt


def test_itd_adam_steps_are_torch_adam_steps_and_keep_its_state():
    # Two outer iterations of ITD(adam): the inner weights and Adam's state (moments, step
    # count 10) are those of torch.optim.Adam taking the same 10 steps.
    import copy

    lq, outer, inner, est, opt = _itd_adam()
    twin = copy.deepcopy(inner)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.05, weight_decay=0.01)
    for _ in range(2):
        est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    _torch_inner_steps(lq, outer, twin, twin_opt, 10)
    for p, q in zip(inner.parameters(), twin.parameters(), strict=True):
        assert (p - q).abs().max() <= 1e-12
        st, tst = opt.state[p], twin_opt.state[q]
        assert float(st["step"]) == float(tst["step"]) == 10
        assert (st["exp_avg"] - tst["exp_avg"]).abs().max() <= 1e-12
        assert (st["exp_avg_sq"] - tst["exp_avg_sq"]).abs().max() <= 1e-14


@pytest.mark.parametrize("truncate", [None, 2])
def test_itd_adam_hypergradient_matches_finite_differences(truncate):
    # After one outer iteration (Adam's state is not zero), the hypergradient of 5 unrolled Adam
    # steps (the last `truncate` differentiated, the first ones constants) against central
    # differences of L_out(Ω, θ_5(Ω)) computed with torch.optim.Adam.
    import copy

    lq, outer, inner, est, opt = _itd_adam()
    est.truncate = 5 if truncate is None else truncate
    est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    W = outer.weight.detach().clone()
    state0, inner0 = copy.deepcopy(opt.state_dict()), copy.deepcopy(inner)
    (g,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    fixed = 5 - est.truncate  # steps taken at the unperturbed Ω
    _, start, start_opt = _adam_reference_loss(lq, W, inner0, state0, fixed)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        d = torch.randn(W.shape, generator=gen, dtype=W.dtype)
        eps = 1e-6
        fp, _, _ = _adam_reference_loss(
            lq, W + eps * d, start, start_opt.state_dict(), est.truncate
        )
        fm, _, _ = _adam_reference_loss(
            lq, W - eps * d, start, start_opt.state_dict(), est.truncate
        )
        fd = (fp - fm) / (2 * eps)
        assert abs(float((g * d).sum()) - fd) <= 1e-6 * max(1.0, abs(fd))


def test_itd_adam_differentiates_through_its_moments(monkeypatch):
    # The finite-difference test above holds with the unrolled graph going through Adam's
    # moments; treating them as constants, or unrolling gradient descent, gives other gradients.
    import copy

    import funcbo.parametric as par

    lq, outer, inner, est, opt = _itd_adam()
    est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    st, inner0 = copy.deepcopy(opt.state_dict()), copy.deepcopy(inner)
    (g,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)

    inner1 = copy.deepcopy(inner0)
    opt1 = torch.optim.Adam(inner1.parameters(), lr=0.05, weight_decay=0.01)
    opt1.load_state_dict(copy.deepcopy(st))
    real = par.unrolled_adam_step

    def constant_moments(param, grad, exp_avg, exp_avg_sq, **kw):
        return real(param, grad, exp_avg.detach(), exp_avg_sq.detach(), **kw)

    monkeypatch.setattr(par, "unrolled_adam_step", constant_moments)
    (g_const,) = par.ITD(inner1, unroll=5, optimizer=opt1).step(
        lq.problem, outer, lq.inner_batch, lq.outer_batch
    )
    monkeypatch.undo()
    assert rel_err(g_const, g) > 1e-2
    (g_gd,) = funcbo.ITD(copy.deepcopy(inner0), lr=0.05, unroll=5).step(
        lq.problem, outer, lq.inner_batch, lq.outer_batch
    )
    assert rel_err(g_gd, g) > 1e-2


def test_itd_sgd_optimizer_equals_lr_and_momentum():
    # ITD(optimizer=SGD(lr, momentum)) is ITD(lr, momentum); with weight decay it is SGD's step.
    import copy

    lq, outer, inner = _lq(seed=2, at_solution=False)
    inner2 = copy.deepcopy(inner)
    a = funcbo.ITD(inner, lr=0.1, unroll=4, momentum=0.5)
    b = funcbo.ITD(
        inner2, unroll=4, optimizer=torch.optim.SGD(inner2.parameters(), lr=0.1, momentum=0.5)
    )
    for _ in range(2):
        (ga,) = a.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
        (gb,) = b.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
        assert (ga - gb).abs().max() <= 1e-14
    twin = copy.deepcopy(inner)
    inner3 = copy.deepcopy(inner)
    c = funcbo.ITD(
        inner3,
        unroll=3,
        optimizer=torch.optim.SGD(inner3.parameters(), lr=0.1, momentum=0.5, weight_decay=0.2),
    )
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.5, weight_decay=0.2)
    c.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    _torch_inner_steps(lq, outer, twin, twin_opt, 3)
    for p, q in zip(inner3.parameters(), twin.parameters(), strict=True):
        assert (p - q).abs().max() <= 1e-13


def test_itd_adam_checkpoint_resumes_exactly():
    import copy

    lq, outer, _, est, _ = _itd_adam()
    est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    saved = copy.deepcopy(est.state_dict())
    (g1,) = est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    *_, est2, _ = _itd_adam()
    est2.load_state_dict(saved)
    (g2,) = est2.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    assert torch.equal(g1, g2)


def test_itd_optimizer_errors():
    _, _, inner = _lq()
    with pytest.raises(ValueError, match="SGD or torch.optim.Adam"):
        funcbo.ITD(inner, unroll=3, optimizer=torch.optim.AdamW(inner.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="amsgrad"):
        funcbo.ITD(
            inner, unroll=3, optimizer=torch.optim.Adam(inner.parameters(), lr=0.1, amsgrad=True)
        )
    with pytest.raises(ValueError, match="leave lr"):
        funcbo.ITD(inner, 0.1, unroll=3, optimizer=torch.optim.Adam(inner.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="lr or an optimizer"):
        funcbo.ITD(inner, unroll=3)
    with pytest.raises(ValueError, match="trainable parameters"):
        funcbo.ITD(inner, unroll=3, optimizer=torch.optim.Adam([inner.weight], lr=0.1))
