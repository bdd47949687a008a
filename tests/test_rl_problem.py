"""The RL bilevel problem: FuncID's hypergradient against finite differences of F(ω).

With a tabular inner model (one free value per sample and head) the inner problem is solved
exactly, h*(x_i) = ŷ_i(ω), so F(ω) = mean_i ½Σ_k (ŷ_i(ω) − y_i)² can be differentiated by central
finite differences in float64 and compared with FuncID's total gradient, for every parameter of
both heads of the model (next state and reward).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from funcbo import AID, CG, FuncID, Identity, LinearAdjoint, NetworkAdjoint
from funcbo.apps.rl.adjoint import PointwiseAdjoint
from funcbo.apps.rl.config import RLMethodConfig
from funcbo.apps.rl.networks import DoubleQ, DynamicsModel, QOfAction
from funcbo.apps.rl.problem import SoftBellmanProblem, soft_value, with_target
from funcbo.errors import ShapeError

N = 6  # transitions in the fixed batch
DT = torch.float64


class TabularQ(nn.Module):
    """h(i) = W e_i: a free prediction per sample (index) and head."""

    def __init__(self, n: int, heads: int = 2) -> None:
        super().__init__()
        self.n = n
        self.table = nn.Linear(n, heads, bias=False)
        nn.init.zeros_(self.table.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table(nn.functional.one_hot(idx, self.n).to(self.table.weight.dtype))


class TabularProblem(SoftBellmanProblem):
    """The RL problem with the tabular model's input: the sample index."""

    def inner_input(self, batch):
        return batch["idx"]


def make_case(target: str = "min", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DynamicsModel(4, 2, hidden=3).to(DT)
        tq = DoubleQ(4, 2, hidden=8).to(DT)
    # larger output weights than OMD's 1e-2 init, so that both heads matter at this point
    with torch.no_grad():
        for p in [*model.parameters(), *tq.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.7)
    for p in tq.parameters():
        p.requires_grad_(False)
    batch = {
        "obs": torch.randn(N, 4, generator=g, dtype=DT),
        "action": torch.tensor([0, 1, 0, 1, 1, 0]),
        "reward": torch.randn(N, 1, generator=g, dtype=DT),
        "next_obs": torch.randn(N, 4, generator=g, dtype=DT),
        "not_done": torch.tensor([[1.0], [1.0], [0.0], [1.0], [1.0], [1.0]], dtype=DT),
        "idx": torch.arange(N),
    }
    # α = 0.5: a smooth soft-max, so central differences are accurate
    problem = TabularProblem(gamma=0.9, alpha=0.5, target=target)
    return problem, model, tq, with_target(batch, tq)


def exact_inner(problem, model, batch) -> torch.Tensor:
    """h* at the batch's points: one Newton step from 0 on the quadratic inner loss (H = I)."""
    with torch.enable_grad():
        v0 = torch.zeros(N, 2, dtype=DT, requires_grad=True)
        (grad,) = torch.autograd.grad(problem.inner_loss(model, v0, batch).sum(), v0)
    return (v0 - grad).detach()


def F(problem, model, batch) -> float:
    with torch.no_grad():
        pred = exact_inner(problem, model, batch)
        return float(problem.outer_loss(model, pred, batch).mean())


def finite_differences(problem, model, batch, eps: float = 1e-6) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        g = torch.zeros_like(p)
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = float(flat[i])
            flat[i] = old + eps
            fp = F(problem, model, batch)
            flat[i] = old - eps
            fm = F(problem, model, batch)
            flat[i] = old
            g.view(-1)[i] = (fp - fm) / (2 * eps)
        out.append(g)
    return out


def rel_err(a, b) -> float:
    num = sum(float((x - y).square().sum()) for x, y in zip(a, b, strict=True)) ** 0.5
    den = sum(float(y.square().sum()) for y in b) ** 0.5
    return num / den


def tabular_at_solution(problem, model, batch) -> TabularQ:
    h = TabularQ(N).to(DT)
    with torch.no_grad():
        h.table.weight.copy_(exact_inner(problem, model, batch).T)
    return h


def split_heads(model: DynamicsModel, grads):
    names = [n for n, _ in model.named_parameters()]
    ns = [g for n, g in zip(names, grads, strict=True) if n.startswith("next_state")]
    rw = [g for n, g in zip(names, grads, strict=True) if n.startswith("reward")]
    return ns, rw


def adjoint_cases():
    tab_adjoint = TabularQ(N).to(DT)
    # J(a) = ½ mean ‖a_i‖² + mean ⟨g_i, a_i⟩: one SGD step of size N from 0 lands on a = −g
    net = NetworkAdjoint(tab_adjoint, lambda ps: torch.optim.SGD(ps, lr=float(N)), steps=1)
    return {
        "pointwise": PointwiseAdjoint(),
        "pointwise_hessian": PointwiseAdjoint(use_hessian=True),
        # ridge 1e-8: smaller ridges lose digits in the sample-space (Woodbury) solve
        "linear": LinearAdjoint(ridge=1e-8),
        "network": net,
    }


@pytest.mark.parametrize("target", ["min", "per_head"])
@pytest.mark.parametrize("adjoint", ["pointwise", "pointwise_hessian", "linear", "network"])
def test_funcid_hypergradient_matches_finite_differences(target, adjoint):
    problem, model, _, batch = make_case(target)
    fd = finite_differences(problem, model, batch)
    h = tabular_at_solution(problem, model, batch)
    est = FuncID(h, torch.optim.SGD(h.parameters(), lr=0.0), 1, adjoint_cases()[adjoint])
    hg = est.hypergradient(problem, model, batch, batch)
    assert rel_err(hg, fd) < 1e-6, rel_err(hg, fd)
    # both heads of the model receive (the right) nonzero gradient
    hg_ns, hg_r = split_heads(model, hg)
    fd_ns, fd_r = split_heads(model, fd)
    assert rel_err(hg_ns, fd_ns) < 1e-6 and rel_err(hg_r, fd_r) < 1e-6
    assert sum(float(g.abs().sum()) for g in hg_ns) > 1e-3
    assert sum(float(g.abs().sum()) for g in hg_r) > 1e-3


def test_parametric_aid_on_tabular_q_is_exact_and_omd_identity_is_scaled():
    """In the tabular case the θ-Hessian is I/n: CG is exact; OMD's identity is off by 1/n."""
    problem, model, _, batch = make_case()
    fd = finite_differences(problem, model, batch)
    h = tabular_at_solution(problem, model, batch)
    aid = AID(h, torch.optim.SGD(h.parameters(), lr=0.0), solver=CG(maxiter=20))
    hg = aid.hypergradient(problem, model, batch, batch)
    assert rel_err(hg, fd) < 1e-6
    omd = AID(h, torch.optim.SGD(h.parameters(), lr=0.0), solver=Identity())
    hg_id = omd.hypergradient(problem, model, batch, batch)
    assert rel_err([g * N for g in hg_id], fd) < 1e-6


def test_inner_loss_is_a_unit_squared_loss_in_the_prediction():
    problem, model, _, batch = make_case()
    pred = torch.randn(N, 2, dtype=DT)
    assert problem.check_strong_convexity(model, pred, batch) == pytest.approx(1.0)


def test_targets_follow_the_soft_double_q_formula():
    problem, model, tq, batch = make_case()
    ns, r = model(batch["obs"], batch["action"])
    q = tq(ns)  # [2, N, 2]
    v = 0.5 * torch.logsumexp(torch.minimum(q[0], q[1]) / 0.5, dim=1, keepdim=True)
    expected = r + 0.9 * batch["not_done"] * v
    assert torch.allclose(problem.model_target(model, batch), expected)
    per_head = soft_value(q, 0.5, "per_head")
    assert per_head.shape == (N, 2)
    assert torch.allclose(per_head[:, :1], 0.5 * torch.logsumexp(q[0] / 0.5, 1, keepdim=True))


def test_cached_targets_give_the_same_hypergradient_and_expire():
    problem = SoftBellmanProblem(gamma=0.9, alpha=0.5)
    _, model, tq, batch = make_case()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        h = QOfAction(DoubleQ(4, 2, hidden=8)).to(DT)
    plain = with_target({k: v for k, v in batch.items() if k != "idx"}, tq)
    cached = with_target(plain, tq, problem, model)
    grads = []
    for b in (plain, cached):
        est = FuncID(h, torch.optim.SGD(h.parameters(), lr=0.0), 1, PointwiseAdjoint())
        grads.append(est.hypergradient(problem, model, b, b))
    assert rel_err(grads[1], grads[0]) < 1e-12
    y0 = problem.model_target(model, cached)
    with torch.no_grad():
        next(model.reward.parameters()).add_(1.0)  # ω changes: the cache must not be used
    y1 = problem.model_target(model, cached)
    assert not torch.allclose(y0, y1)
    with torch.no_grad():
        assert torch.allclose(y1, problem.model_target(model, plain))


def test_pointwise_adjoint_needs_the_same_points():
    problem, model, _, batch = make_case()
    h = tabular_at_solution(problem, model, batch)
    est = FuncID(h, torch.optim.SGD(h.parameters(), lr=0.0), 1, PointwiseAdjoint())
    other = dict(batch)
    other["idx"] = torch.arange(N).flip(0)
    with pytest.raises(ValueError, match="same points"):
        est.hypergradient(problem, model, batch, other)
    short = {k: (v[:3] if torch.is_tensor(v) else v) for k, v in batch.items()}
    with pytest.raises(ShapeError, match="same points"):
        est.hypergradient(problem, model, batch, short)


def build_variant(kind: str, problem, model, tq, q_inner=None):
    """The hypergradient estimator and problem of a FuncID variant, on the test's networks."""
    if q_inner is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2)
            q_inner = QOfAction(DoubleQ(4, 2, hidden=8)).to(DT)
    _, est, hp = RLMethodConfig(kind=kind).estimator(problem, q_inner, model, tq, N)
    return est, hp


@pytest.mark.parametrize("target", ["min", "per_head"])
def test_solution_variant_is_the_exact_hypergradient(target):
    """funcid_solution evaluates the adjoint at h* = ŷ: ∇F(ω) exactly, whatever the Q-network."""
    problem, model, tq, batch = make_case(target)
    fd = finite_differences(problem, model, batch)
    plain = SoftBellmanProblem(problem.gamma, problem.alpha, target)
    raw = {k: v for k, v in batch.items() if k not in ("idx", "target_q")}
    # a table-valued Q placed at h* (the exact inner solution), and an arbitrary Q-network
    tab = tabular_at_solution(problem, model, batch)
    q_tab = FuncID(tab, torch.optim.SGD(tab.parameters(), lr=0.0), 1, PointwiseAdjoint())
    hg_tab = q_tab.hypergradient(problem, model, batch, batch)
    est, hp = build_variant("funcid_solution", plain, model, tq)
    hb = with_target(raw, tq, hp, model)
    hg = est.hypergradient(hp, model, hb, hb)
    assert rel_err(hg, fd) < 1e-6, rel_err(hg, fd)
    assert rel_err(hg, hg_tab) < 1e-10
    hg_ns, _ = split_heads(model, hg)
    assert sum(float(g.abs().sum()) for g in hg_ns) > 1e-3


def test_reference_variant_gives_no_gradient_to_the_next_state_head():
    """funcid_reference (the authors' backward pass): V̄ at the real s′, reward head only."""
    problem, model, tq, batch = make_case()
    plain = SoftBellmanProblem(problem.gamma, problem.alpha)
    raw = {k: v for k, v in batch.items() if k not in ("idx", "target_q")}
    est, hp = build_variant("funcid_reference", plain, model, tq)
    assert hp.next_value == "real"
    hb = with_target(raw, tq, hp, model)
    hg = est.hypergradient(hp, model, hb, hb)
    hg_ns, hg_r = split_heads(model, hg)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in hg_ns)
    assert sum(float(g.abs().sum()) for g in hg_r) > 1e-3
    # the reward head's gradient is the both-heads variant's reward-head gradient
    est_both, hp_both = build_variant("funcid_identity", plain, model, tq)
    hb_both = with_target(raw, tq, hp_both, model)
    _, hg_r_both = split_heads(model, est_both.hypergradient(hp_both, model, hb_both, hb_both))
    assert rel_err(hg_r, hg_r_both) < 1e-12


def test_cache_of_one_next_value_is_not_used_by_the_other():
    problem, model, tq, batch = make_case()
    raw = {k: v for k, v in batch.items() if k not in ("idx", "target_q")}
    cached = with_target(raw, tq, problem, model)
    real = problem.with_next_value("real")
    _, r = model(batch["obs"], batch["action"])
    expected = real.bellman_target(tq, r, batch["next_obs"], batch["not_done"])
    assert torch.allclose(real.model_target(model, cached), expected)
    assert not torch.allclose(problem.model_target(model, cached), expected)
