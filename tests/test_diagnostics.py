"""Typed diagnostics records: the metric names each estimator logs, and their reduction."""

import dataclasses

import pytest
import torch

import funcbo
from funcbo.adjoints import AdjointStats
from funcbo.diagnostics import Metrics, mean_over_ranks
from funcbo.estimator import StepStats
from funcbo.functional import FuncIDStats
from funcbo.linalg import SolveInfo
from funcbo.parametric import AIDStats
from funcbo.synthetic import LinearQuadratic

IMPLICIT = ["outer_loss", "inner_loss_at_hypergrad", "grad_norm"]


def _estimators(inner):
    sgd = torch.optim.SGD(inner.parameters(), lr=0.1)
    adam = lambda ps: torch.optim.Adam(ps, lr=1e-3)  # noqa: E731
    return {
        "funcid_linear": (
            funcbo.FuncID(inner, sgd, 1, funcbo.LinearAdjoint(1e-3)),
            [
                *IMPLICIT,
                *("adjoint_loss", "adjoint_ridge", "adjoint_cg_iters", "adjoint_isotropic"),
                *("adjoint_cg_gave_up", "inner_loss"),
            ],
        ),
        "funcid_network": (
            funcbo.FuncID(inner, sgd, 1, funcbo.NetworkAdjoint(None, adam, 2, holdout=0.25)),
            [
                *IMPLICIT,
                *("adjoint_loss", "adjoint_loss_first", "adjoint_holdout_loss"),
                *("adjoint_best_step", "inner_loss"),
            ],
        ),
        "aid": (
            funcbo.AID(inner, sgd, 1, solver=funcbo.CG(maxiter=3)),
            [
                *IMPLICIT,
                *("solver_iters", "solver_gave_up", "solver_diverged", "dual_norm", "inner_loss"),
            ],
        ),
        "itd": (funcbo.ITD(inner, lr=0.1, unroll=2), ["inner_loss", "outer_loss", "grad_norm"]),
        "gradient_penalty": (
            funcbo.GradientPenalty(inner, sgd, 1),
            ["inner_loss", "outer_loss", "penalty", "grad_norm"],
        ),
        "value_penalty": (
            funcbo.ValuePenalty(inner, sgd, 1),
            ["inner_loss", "outer_loss", "value_loss", "penalty", "grad_norm"],
        ),
    }


@pytest.mark.parametrize(
    "name",
    ["funcid_linear", "funcid_network", "aid", "itd", "gradient_penalty", "value_penalty"],
)
def test_each_estimator_logs_the_metric_names_of_its_record(name):
    lq = LinearQuadratic(seed=0)
    outer, inner = lq.make_outer(), lq.make_inner()
    est, keys = _estimators(inner)[name]
    assert est.stats == {} and est.diagnostics is None
    est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    assert list(est.stats) == keys  # names and order as written before the records
    assert all(isinstance(v, float) for v in est.stats.values())
    assert est.diagnostics.solves_gave_up == 0


def test_records_read_by_field_and_count_solves_that_gave_up():
    lq = LinearQuadratic(seed=0)
    outer, inner = lq.make_outer(), lq.make_inner()
    est = funcbo.AID(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 1)
    est.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    d = est.diagnostics
    assert isinstance(d, AIDStats) and d.grad_norm == est.stats["grad_norm"]
    assert d.solve.iterations == est.stats["solver_iters"] and d.inner_loss is not None
    gave_up = dataclasses.replace(d, solve=SolveInfo(1, 1.0, gave_up=True))
    assert gave_up.solves_gave_up == 1 and gave_up.metrics()["solver_gave_up"] == 1.0
    adjoint = AdjointStats(0.5, ridge=1e-3, solve=SolveInfo(4, 1.0, gave_up=True), isotropic=False)
    f = FuncIDStats(outer_loss=1.0, inner_loss_at_hypergrad=2.0, grad_norm=3.0, adjoint=adjoint)
    assert f.solves_gave_up == 1 and "inner_loss" not in f.metrics()
    assert f.metrics()["adjoint_cg_iters"] == 4.0


def test_plain_dict_stats_and_one_process_reduction():
    class Plain(funcbo.HypergradientEstimator):
        def step(self, problem, outer, inner_batches, outer_batch):
            self.stats = {"outer_loss": 1.5}
            return ()

    est = Plain()
    est.step(None, None, None, None)
    assert est.stats == {"outer_loss": 1.5} and isinstance(est.diagnostics, Metrics)
    rec = StepStats(outer_loss=1.0, grad_norm=2.0)
    assert mean_over_ranks(rec) is rec
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.outer_loss = 3.0  # type: ignore[misc]
