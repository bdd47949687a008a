"""The interface every estimator shares: what a batch is, ``step`` = inner steps + hypergradient,
``.grad`` aligned with ``outer.parameters()``, and errors instead of NaN or inf."""

import warnings

import pytest
import torch

import funcbo
from funcbo.distributed import mean_across_ranks
from funcbo.estimator import add_grads, as_batch_list, finish_outer_grads, grad_norm, trainable
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


# ------------------------------------------------------------ the base-class contract
def test_step_is_the_inner_steps_then_the_hypergradient():
    lq = LinearQuadratic(seed=0)
    batches = funcbo.Batches([{k: v[:100] for k, v in lq.inner_batch.items()}, lq.inner_batch])
    results = []
    for split in (False, True):
        outer, inner = lq.make_outer(), lq.make_inner()
        est = funcbo.FuncID(
            inner, torch.optim.SGD(inner.parameters(), lr=0.2), 3, funcbo.LinearAdjoint(1e-8)
        )
        if split:
            loss = est.inner.run(lq.problem, outer, list(batches))
            grads = est.hypergradient(lq.problem, outer, batches[-1], lq.outer_batch)
        else:
            grads = est.step(lq.problem, outer, batches, lq.outer_batch)
            loss = est.stats["inner_loss"]  # mean_across_ranks: unchanged in one process
        results.append((loss, grads, [p.detach().clone() for p in inner.parameters()]))
    (loss_a, g_a, w_a), (loss_b, g_b, w_b) = results
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(g_a + tuple(w_a), g_b + tuple(w_b), strict=True))


def test_finish_outer_grads_writes_grad_and_aligns_with_outer_parameters():
    outer = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)).double()
    outer[0].bias.requires_grad_(False)
    outer[1].weight.grad = torch.full((1, 3), 7.0, dtype=torch.float64)  # stale: overwritten
    assert trainable(outer) == [outer[0].weight, outer[1].weight, outer[1].bias]
    gw0 = torch.arange(6.0, dtype=torch.float64).reshape(3, 2).requires_grad_()
    gw1 = torch.tensor([[1.0, -2.0, 2.0]], dtype=torch.float64)
    out = finish_outer_grads(outer, [gw0, gw1, None])
    assert [g.shape for g in out] == [p.shape for p in outer.parameters()]
    assert torch.equal(out[0], gw0.detach()) and not out[0].requires_grad
    assert torch.equal(out[1], torch.zeros(3, dtype=torch.float64))  # the frozen bias
    assert torch.equal(out[2], gw1) and torch.equal(out[3], torch.zeros(1, dtype=torch.float64))
    assert outer[0].bias.grad is None
    assert torch.equal(outer[1].weight.grad, gw1)  # not accumulated onto the stale 7s
    assert torch.equal(outer[1].bias.grad, torch.zeros(1, dtype=torch.float64))
    assert grad_norm(out) == pytest.approx((55.0 + 9.0) ** 0.5, rel=1e-15)


def test_finish_outer_grads_refuses_non_finite_entries_and_overflowing_norms():
    outer = torch.nn.Linear(2, 1, bias=False).double()
    bad = torch.tensor([[float("inf"), float("nan")]], dtype=torch.float64)
    with pytest.raises(
        funcbo.NonFiniteLossError,
        match=r"the hypergradient's entries are not finite \(1 NaN and 1 inf of 2 entries\): "
        r"the inner or outer iterates diverged: lower the learning rates",
    ):
        finish_outer_grads(outer, [bad])
    huge = torch.tensor([[1e200, -3e200]], dtype=torch.float64)
    with pytest.raises(
        funcbo.NonFiniteLossError,
        match=r"the hypergradient's norm overflows \(largest entry 3e\+200",
    ):
        finish_outer_grads(outer, [huge])
    assert outer.weight.grad is None  # nothing reached the outer optimizer


def test_grad_norm_is_computed_in_float64():
    assert grad_norm([torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])]) == 13.0
    assert grad_norm([]) == 0.0
    # the squares overflow float32 (9e60): summed in float64 the norm is exact
    assert grad_norm([torch.tensor([3e30, 4e30], dtype=torch.float32)]) == pytest.approx(
        5e30, rel=1e-7
    )


def test_add_grads_treats_none_as_zero():
    one, two = torch.tensor([1.0]), torch.tensor([2.0])
    out = add_grads([one, None, None, one], [None, two, None, two], scale=3.0)
    assert out[0] is one and out[2] is None
    assert torch.equal(out[1], torch.tensor([6.0])) and torch.equal(out[3], torch.tensor([7.0]))


def test_stats_are_unchanged_by_mean_across_ranks_in_one_process():
    stats = {"inner_loss": 0.125, "grad_norm": 3.0}
    assert mean_across_ranks(stats) is stats and mean_across_ranks({}) == {}


def test_base_class_defaults():
    class Constant(funcbo.HypergradientEstimator):
        def step(self, problem, outer, inner_batches, outer_batch):
            return finish_outer_grads(outer, [torch.ones_like(p) for p in trainable(outer)])

    est = Constant()
    assert est.inner_steps == 1 and est.state_dict() == {}
    est.load_state_dict({})
    outer = torch.nn.Linear(2, 1)
    gw, gb = est.step(None, outer, None, None)
    assert torch.equal(gw, torch.ones(1, 2))
    assert torch.equal(outer.weight.grad, torch.ones(1, 2)) and torch.equal(gb, torch.ones(1))
    with pytest.raises(TypeError, match="abstract"):
        funcbo.HypergradientEstimator()
