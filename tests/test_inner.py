"""InnerSolver: exactly k closure steps on the inner loss with ω frozen, the last loss, warm
starts, and an error instead of diverged weights (float64, against hand-written SGD)."""

import pytest
import torch
from helpers import lbfgs

import funcbo
from funcbo.inner import InnerSolver, frozen
from funcbo.synthetic import LinearQuadratic


class CountingSGD(torch.optim.SGD):
    """SGD that records, for each call of ``step``, whether it was given a closure."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.closures: list[bool] = []

    def step(self, closure=None):
        self.closures.append(closure is not None)
        return super().step(closure)


def _halves(lq: LinearQuadratic) -> list[dict]:
    b = lq.inner_batch
    return [{k: v[:120] for k, v in b.items()}, {k: v[120:] for k, v in b.items()}]


def _manual_sgd(lq, omega, W, b, batches, lr, steps):
    """SGD on ½‖Wx + b − Ωt‖² (mean over the batch), written out; returns W, b, last loss."""
    W, b = W.clone(), b.clone()
    last = float("nan")
    for k in range(steps):
        batch = batches[k % len(batches)]
        Wv, bv = W.clone().requires_grad_(), b.clone().requires_grad_()
        r = batch["x"] @ Wv.T + bv - batch["t"] @ omega.T
        loss = 0.5 * (r**2).sum(1).mean()
        gW, gb = torch.autograd.grad(loss, (Wv, bv))
        W, b = W - lr * gW, b - lr * gb
        last = float(loss.detach())
    return W, b, last


def test_takes_exactly_k_closure_steps_cycling_the_batches_and_returns_the_last_loss():
    lq = LinearQuadratic(seed=0)
    outer, inner = lq.make_outer(), lq.make_inner()
    W0, b0 = inner.weight.detach().clone(), inner.bias.detach().clone()
    opt = CountingSGD(inner.parameters(), lr=0.3)
    batches = _halves(lq)
    last = InnerSolver(inner, opt, 5).run(lq.problem, outer, batches)
    assert opt.closures == [True] * 5
    W, b, want_last = _manual_sgd(lq, outer.weight.detach(), W0, b0, batches, 0.3, 5)
    torch.testing.assert_close(inner.weight.detach(), W, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(inner.bias.detach(), b, rtol=1e-13, atol=1e-15)
    # the loss of the last step, before its update (step 4 ran on batch 4 mod 2 = 0)
    assert last == pytest.approx(want_last, rel=1e-13)
    assert all(p.grad is None for p in inner.parameters())  # zeroed after each step


def test_run_warm_starts_from_where_the_last_run_stopped():
    lq = LinearQuadratic(seed=1)
    outer = lq.make_outer()
    a, b = lq.make_inner(), lq.make_inner()
    solver_a = InnerSolver(a, torch.optim.SGD(a.parameters(), lr=0.2, momentum=0.9), 3)
    solver_b = InnerSolver(b, torch.optim.SGD(b.parameters(), lr=0.2, momentum=0.9), 6)
    solver_a.run(lq.problem, outer, [lq.inner_batch])
    state = solver_a.state_dict()  # weights and momentum buffers after 3 steps
    c = lq.make_inner(seed=7)
    solver_c = InnerSolver(c, torch.optim.SGD(c.parameters(), lr=0.2, momentum=0.9), 3)
    solver_c.load_state_dict(state)
    solver_c.run(lq.problem, outer, [lq.inner_batch])
    solver_b.run(lq.problem, outer, [lq.inner_batch])
    for pc, pb in zip(c.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pc, pb, rtol=1e-14, atol=1e-15)


def test_lbfgs_solves_the_inner_problem_through_the_closure():
    lq = LinearQuadratic(seed=2)
    outer, inner = lq.make_outer(), lq.make_inner()
    InnerSolver(inner, lbfgs(inner.parameters()), 1).run(lq.problem, outer, [lq.inner_batch])
    W, b = lq.inner_solution(outer.weight.detach())
    torch.testing.assert_close(inner.weight.detach(), W, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(inner.bias.detach(), b, rtol=1e-6, atol=1e-8)


def test_outer_parameters_are_frozen_during_the_steps_and_restored_after():
    lq = LinearQuadratic(seed=0)
    outer, inner = lq.make_outer(), lq.make_inner()
    outer.register_parameter("spare", torch.nn.Parameter(torch.zeros(1), requires_grad=False))
    seen = []

    def inner_loss(om, pred, batch):
        seen.append((om.weight.requires_grad, om.spare.requires_grad))
        return lq.problem.inner_loss(om, pred, batch)

    problem = funcbo.BilevelProblem(inner_loss, lq.problem.outer_loss)
    InnerSolver(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 3).run(
        problem, outer, [lq.inner_batch]
    )
    assert seen == [(False, False)] * 3
    assert outer.weight.requires_grad and not outer.spare.requires_grad  # flags as they were
    assert outer.weight.grad is None  # no gradient reached ω


def test_frozen_restores_each_flag_after_an_error():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    m[1].bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="inside"), frozen(m):
        assert not any(p.requires_grad for p in m.parameters())
        raise RuntimeError("inside")
    assert [p.requires_grad for p in m.parameters()] == [True, True, True, False]


def test_objective_replaces_the_inner_loss():
    lq = LinearQuadratic(seed=0)
    outer, inner = lq.make_outer(), lq.make_inner()
    W0, b0 = inner.weight.detach().clone(), inner.bias.detach().clone()

    def objective(model, batch):  # ½‖h(x)‖²: the manual SGD with Ω = 0
        return 0.5 * (model(batch["x"]) ** 2).sum(1).mean()

    solver = InnerSolver(inner, torch.optim.SGD(inner.parameters(), lr=0.3), 2)
    last = solver.run(lq.problem, outer, [lq.inner_batch], objective=objective)
    W, b, want_last = _manual_sgd(
        lq, torch.zeros_like(outer.weight), W0, b0, [lq.inner_batch], 0.3, 2
    )
    torch.testing.assert_close(inner.weight.detach(), W, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(inner.bias.detach(), b, rtol=1e-13, atol=1e-15)
    assert last == pytest.approx(want_last, rel=1e-13)


def test_zero_steps_leave_the_model_alone_and_return_nan():
    lq = LinearQuadratic(seed=0)
    outer, inner = lq.make_outer(), lq.make_inner()
    before = [p.detach().clone() for p in inner.parameters()]
    last = InnerSolver(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 0).run(
        lq.problem, outer, [lq.inner_batch]
    )
    assert last != last  # NaN
    assert all(torch.equal(p, q) for p, q in zip(inner.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="inner steps must be ≥ 0, got -1"):
        InnerSolver(inner, torch.optim.SGD(inner.parameters(), lr=0.1), -1)


def test_divergence_raises_a_clear_error():
    lq = LinearQuadratic(seed=0)
    outer, inner = lq.make_outer(), lq.make_inner()
    # the problem's own loss checks off: the solver's check on the weights must catch it
    problem = funcbo.BilevelProblem(
        lq.problem.inner_loss, lq.problem.outer_loss, check_finite=False
    )
    solver = InnerSolver(inner, torch.optim.SGD(inner.parameters(), lr=1e6), 100)
    with pytest.raises(
        funcbo.NonFiniteLossError,
        match=r"the inner model's weights after 100 inner steps are not finite \(\d+ NaN and "
        r"\d+ inf of 12 entries\): the inner problem diverged: lower the inner learning rate",
    ):
        solver.run(problem, outer, [lq.inner_batch])
