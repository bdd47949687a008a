"""The interface every estimator shares: what a batch is, and errors instead of NaN or inf."""

import warnings

import pytest
import torch

import funcbo
from funcbo.estimator import as_batch_list
from funcbo.synthetic import LinearQuadratic

ESTIMATORS = ["funcid_linear", "funcid_network", "aid", "itd", "gradient_penalty", "value_penalty"]


def _estimator(kind: str, inner: torch.nn.Module, lr: float = 0.1, steps: int = 2):
    opt = torch.optim.SGD(inner.parameters(), lr=lr)
    if kind == "funcid_linear":
        return funcbo.FuncID(inner, opt, steps, adjoint=funcbo.LinearAdjoint(1e-6))
    if kind == "funcid_network":
        adjoint = funcbo.NetworkAdjoint(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), steps=2)
        return funcbo.FuncID(inner, opt, steps, adjoint=adjoint)
    if kind == "aid":
        return funcbo.AID(inner, opt, steps, solver=funcbo.CG(maxiter=5))
    if kind == "itd":
        return funcbo.ITD(inner, lr=lr, unroll=steps)
    if kind == "gradient_penalty":
        return funcbo.GradientPenalty(inner, opt, steps, penalty=10.0)
    return funcbo.ValuePenalty(inner, opt, steps, penalty=10.0)


def _field(batch, key: str, index: int):
    return batch[key] if isinstance(batch, dict) else batch[index]


def _problem(lq: LinearQuadratic, check_finite: bool = True) -> funcbo.BilevelProblem:
    """The linear-quadratic problem on batches given as dicts, tuples or lists."""

    def inner_loss(outer, pred, batch):
        return 0.5 * ((pred - outer(_field(batch, "t", 1))) ** 2).sum(1)

    def outer_loss(outer, pred, batch):
        reg = 0.5 * lq.rho * (outer.weight**2).sum()
        return 0.5 * ((pred - _field(batch, "y", 1)) ** 2).sum(1) + reg

    return funcbo.BilevelProblem(inner_loss, outer_loss, check_finite=check_finite)


def _as(form: str, batch: dict, second: str):
    x, other = batch["x"], batch[second]
    return {"dict": batch, "tuple": (x, other), "list": [x, other]}[form]


def _step(kind: str, form: str, inner_batches=None):
    lq = LinearQuadratic(seed=0)
    outer, inner = lq.make_outer(), lq.make_inner()
    est = _estimator(kind, inner)
    if inner_batches is None:
        inner_batches = _as(form, lq.inner_batch, "t")
    return est.step(_problem(lq), outer, inner_batches, _as(form, lq.outer_batch, "y"))


@pytest.mark.parametrize("kind", ESTIMATORS)
@pytest.mark.parametrize("form", ["tuple", "list"])
def test_tuple_and_list_batches_are_one_batch_in_every_estimator(kind, form):
    # [x, t] is what a DataLoader over a TensorDataset yields: one batch, not two.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="a plain list of batches")
        got = _step(kind, form)
    want = _step(kind, "dict")
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ESTIMATORS)
def test_batches_wrapper_gives_several_batches(kind):
    lq = LinearQuadratic(seed=0)
    half = {k: v[:100] for k, v in lq.inner_batch.items()}
    rest = {k: v[100:] for k, v in lq.inner_batch.items()}
    both = _step(kind, "dict", funcbo.Batches([half, rest]))
    one = _step(kind, "dict", funcbo.Batches([rest, rest]))
    only_last = _step(kind, "dict", rest)
    for a, b in zip(one, only_last, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the first inner step saw the other half: a different estimate
    assert any(not torch.allclose(a, b) for a, b in zip(both, one, strict=True))


def test_as_batch_list_contract():
    x, y = torch.zeros(3, 2), torch.zeros(3, 1)
    assert as_batch_list([x, y]) == [[x, y]]
    assert as_batch_list((x, y)) == [(x, y)]
    d = {"x": x}
    assert as_batch_list(d) == [d]
    assert as_batch_list(funcbo.Batches([d, d])) == [d, d]
    with pytest.raises(funcbo.EmptyBatchError):
        as_batch_list(funcbo.Batches([]))
    with pytest.warns(DeprecationWarning, match="funcbo.Batches"):
        assert as_batch_list([d, d]) == [d, d]


@pytest.mark.parametrize("kind", ESTIMATORS)
def test_non_finite_inner_weights_raise_in_every_estimator(kind):
    lq = LinearQuadratic(seed=0)
    outer, inner = lq.make_outer(), lq.make_inner()
    est = _estimator(kind, inner)
    with torch.no_grad():
        inner.weight[0, 0] = float("nan")
    problem = _problem(lq, check_finite=False)  # the estimator's own checks, not the losses'
    with pytest.raises(funcbo.NonFiniteLossError, match="not finite .*NaN"):
        est.step(problem, outer, lq.inner_batch, lq.outer_batch)
    assert outer.weight.grad is None  # nothing reached the outer optimizer


@pytest.mark.parametrize("kind", ESTIMATORS)
def test_non_finite_hypergradient_raises_in_every_estimator(kind):
    lq = LinearQuadratic(seed=0)
    outer, inner = lq.make_outer(), lq.make_inner()
    est = _estimator(kind, inner, steps=1)
    with torch.no_grad():
        outer.weight[0, 0] = float("inf")
    problem = _problem(lq, check_finite=False)
    with pytest.raises(funcbo.NonFiniteLossError, match="not finite"):
        est.step(problem, outer, lq.inner_batch, lq.outer_batch)


def test_itd_at_a_too_large_step_raises_instead_of_diverging_silently():
    lq = LinearQuadratic(seed=0)
    outer, inner = lq.make_outer(), lq.make_inner()
    est = funcbo.ITD(inner, lr=5.0, unroll=20)
    with pytest.raises(funcbo.NonFiniteLossError, match="diverged: lower"):
        for _ in range(20):
            est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
            assert est.stats["grad_norm"] < float("inf")
