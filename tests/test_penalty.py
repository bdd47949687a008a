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
