"""BilevelProblem: validation of shapes, finiteness, empty batches, strong convexity."""

import pytest
import torch
from torch import nn

import funcbo
from funcbo.errors import EmptyBatchError, NonFiniteLossError, NotStronglyConvexError, ShapeError
from funcbo.synthetic import LinearQuadratic, SoftmaxIV


def _head(batch, n):
    return {k: v[:n] for k, v in batch.items()}


def _sq(outer, pred, batch):
    return 0.5 * ((pred - outer(batch["t"])) ** 2).sum(1)


def test_loss_broadcasting_bug_is_named():
    # pred [B, 1] against a target of shape [B] broadcasts to [B, B]: a classic silent bug.
    prob = funcbo.BilevelProblem(lambda o, pred, b: (pred - b["y"]) ** 2, _sq)
    pred = torch.zeros(8, 1)
    with pytest.raises(ShapeError, match=r"\[B, B\].*broadcast"):
        prob.eval_inner(nn.Identity(), pred, {"y": torch.zeros(8)})


def test_scalar_loss_is_named():
    prob = funcbo.BilevelProblem(lambda o, pred, b: (pred**2).mean(), _sq)
    with pytest.raises(ShapeError, match="scalar"):
        prob.eval_inner(nn.Identity(), torch.zeros(4, 2), {})


def test_unsummed_loss_is_named():
    prob = funcbo.BilevelProblem(lambda o, pred, b: pred**2, _sq)
    with pytest.raises(ShapeError, match="sum over the output dimension"):
        prob.eval_inner(nn.Identity(), torch.zeros(4, 2), {})


def test_pred_must_be_2d():
    prob = funcbo.BilevelProblem(lambda o, pred, b: pred**2, _sq)
    with pytest.raises(ShapeError, match=r"\[B, 1\]"):
        prob.eval_inner(nn.Identity(), torch.zeros(4), {})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises(bad):
    lq = LinearQuadratic()
    outer, inner = lq.make_outer(), lq.make_inner()
    with torch.no_grad():
        outer.weight[0, 0] = bad
    est = funcbo.FuncID(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 1)
    with pytest.raises(NonFiniteLossError, match="inner_loss is not finite"):
        est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)


def test_non_finite_outer_loss_names_outer():
    lq = LinearQuadratic()
    outer, inner = lq.make_outer(), lq.make_inner()
    batch = dict(lq.outer_batch)
    batch["y"] = batch["y"].clone()
    batch["y"][3, 0] = float("nan")
    est = funcbo.FuncID(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 1)
    with pytest.raises(NonFiniteLossError, match=r"outer_loss is not finite on 1 of"):
        est.step(lq.problem, outer, lq.inner_batch, batch)


@pytest.mark.parametrize("which", ["inner", "outer"])
def test_empty_batch_raises(which):
    lq = LinearQuadratic()
    outer, inner = lq.make_outer(), lq.make_inner()
    inner_batch, outer_batch = lq.inner_batch, lq.outer_batch
    if which == "inner":
        inner_batch = {k: v[:0] for k, v in inner_batch.items()}
    else:
        outer_batch = {k: v[:0] for k, v in outer_batch.items()}
    for est in (
        funcbo.FuncID(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 1),
        funcbo.AID(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 1),
    ):
        with pytest.raises(EmptyBatchError, match=f"{which} batch is empty"):
            est.step(lq.problem, outer, inner_batch, outer_batch)


def test_strong_convexity_check_passes_and_reports_eigenvalue():
    sm = SoftmaxIV(mu=0.1)
    outer = sm.make_outer()
    pred = torch.randn(10, sm.d, dtype=torch.float64)
    lam = sm.problem.check_strong_convexity(outer, pred, _head(sm.inner_batch, 10))
    # Softmax Hessian diag(σ) − σσᵀ is PSD with a zero eigenvalue along 1: the minimum is μ.
    assert lam == pytest.approx(0.1, rel=1e-8)


def test_not_strongly_convex_is_detected():
    # Cross-entropy without the ridge: the Hessian is singular along the all-ones direction.
    def ce(outer, pred, batch):
        return torch.logsumexp(pred, 1) - (torch.softmax(outer(batch["t"]), 1) * pred).sum(1)

    sm = SoftmaxIV()
    prob = funcbo.BilevelProblem(ce, sm.problem.outer_loss)
    pred = torch.randn(10, sm.d, dtype=torch.float64)
    with pytest.raises(NotStronglyConvexError, match="smallest eigenvalue"):
        prob.check_strong_convexity(sm.make_outer(), pred, _head(sm.inner_batch, 10), tol=1e-10)


def test_funcid_convexity_check_on_every_step():
    def concave(outer, pred, batch):
        return -0.5 * ((pred - outer(batch["t"])) ** 2).sum(1)

    lq = LinearQuadratic()
    prob = funcbo.BilevelProblem(concave, lq.problem.outer_loss)
    inner = lq.make_inner()
    est = funcbo.FuncID(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 1, check_convexity=True)
    with pytest.raises(NotStronglyConvexError):
        est.step(prob, lq.make_outer(), lq.inner_batch, lq.outer_batch)


def test_linear_adjoint_rejects_non_convex_inner_loss():
    def concave(outer, pred, batch):
        return -0.5 * ((pred - outer(batch["t"])) ** 2).sum(1)

    lq = LinearQuadratic()
    prob = funcbo.BilevelProblem(concave, lq.problem.outer_loss)
    inner = lq.make_inner()
    est = funcbo.FuncID(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 0)
    with pytest.raises(NotStronglyConvexError):
        est.step(prob, lq.make_outer(), lq.inner_batch, lq.outer_batch)


def test_default_inputs():
    x = torch.zeros(3, 2)
    assert funcbo.BilevelProblem().inner_input((x, 1)) is x
    assert funcbo.BilevelProblem().inner_input({"x": x}) is x
    assert funcbo.BilevelProblem().inner_input(x) is x
    with pytest.raises(KeyError, match="inner_input"):
        funcbo.BilevelProblem().inner_input({"image": x})
