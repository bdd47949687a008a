"""The IV problem: exact hypergradients, the seven methods, resumable tasks."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from funcbo import FuncID, LinearAdjoint
from funcbo.apps.iv import (
    IV_KINDS,
    InstrumentModel,
    IVOuter,
    IVProblem,
    IVProblemConfig,
    IVTask,
    dsprites_data,
    make_dataset,
    paper_method,
)
from funcbo.apps.iv.config import DemandProblemConfig, IVMethodConfig, as_method_config
from funcbo.apps.iv.data import IVTensors
from funcbo.apps.iv.dfiv import DFIV
from funcbo.apps.iv.networks import build_iv_networks, dsprites_treatment_net, outcome_features
from funcbo.apps.iv.ridge import ridge_fit, ridge_objective, ridge_predict
from funcbo.experiments.methods import MethodConfig
from funcbo.experiments.task import RunSpec

D64 = torch.float64


# ------------------------------------------------------------------- a tiny exact instance
class DiscreteInstance:
    """2SLS with a one-hot instrument: h*_ω(k) is the group mean of ψ_ω(t), so F is exact."""

    def __init__(self, head: str, K: int = 5, q: int = 5, d: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        n, m = 60, 40
        self.K, self.d = K, d
        centres = 1.5 * torch.randn(K, q, generator=g, dtype=D64)
        self.k_in = torch.arange(n) % K
        self.k_out = torch.randint(0, K, (m,), generator=g)
        conf_in = torch.randn(n, 1, generator=g, dtype=D64)
        conf_out = torch.randn(m, 1, generator=g, dtype=D64)
        t_in = centres[self.k_in] + conf_in + 0.5 * torch.randn(n, q, generator=g, dtype=D64)
        t_out = centres[self.k_out] + conf_out
        y = torch.sin(t_out.sum(1, keepdim=True)) + 2 * conf_out
        eye = torch.eye(K, dtype=D64)
        self.inner_batch = {"z": eye[self.k_in], "t": t_in}
        self.outer_batch = {"z": eye[self.k_out], "y": y}
        self.problem = IVProblem(head=head, outer_ridge=0.1)
        torch.manual_seed(seed + 1)
        psi = dsprites_treatment_net(q, (6, 6, 6), d, spectral=True)
        self.outer = IVOuter(psi, d, learned_head=head == "learned").to(D64).eval()
        # h(z) = W z + b on the one-hot instrument represents every function of the group.
        self.inner = InstrumentModel(nn.Identity(), K, d).to(D64)

    def inner_solution(self) -> torch.Tensor:
        psi = self.outer(self.inner_batch["t"])
        sums = torch.zeros(self.K, self.d, dtype=D64).index_add(0, self.k_in, psi)
        return sums / torch.bincount(self.k_in, minlength=self.K).to(D64)[:, None]

    def value(self) -> torch.Tensor:
        """F(ω) = mean_j ℓ_out(ω, h*_ω(z_j)), differentiable in ω."""
        H = self.inner_solution()[self.k_out]
        return self.problem.outer_loss(self.outer, H, self.outer_batch).mean()

    def set_inner_to_solution(self) -> None:
        with torch.no_grad():
            self.inner.head.weight.copy_(self.inner_solution().T)
            self.inner.head.bias.zero_()


@pytest.mark.parametrize("head", ["closed_form", "learned"])
def test_funcid_hypergradient_matches_exact_gradient(head: str) -> None:
    inst = DiscreteInstance(head)
    inst.set_inner_to_solution()
    params = list(inst.outer.parameters())
    exact = torch.autograd.grad(inst.value(), params)
    est = FuncID(
        inst.inner,
        torch.optim.SGD(inst.inner.parameters(), lr=0.0),
        inner_steps=0,
        adjoint=LinearAdjoint(1e-12, head=inst.inner.head),
    )
    got = est.hypergradient(inst.problem, inst.outer, inst.inner_batch, inst.outer_batch)
    num = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(got, exact, strict=True)))
    den = math.sqrt(sum(float((b**2).sum()) for b in exact))
    assert den > 1e-3
    assert num / den < 1e-7

    # and central finite differences of F along a random direction
    g = torch.Generator().manual_seed(3)
    dirs = [torch.randn(p.shape, generator=g, dtype=D64) for p in params]
    eps = 1e-5
    with torch.no_grad():
        for p, v in zip(params, dirs, strict=True):
            p.add_(eps * v)
        f_plus = float(inst.value())
        for p, v in zip(params, dirs, strict=True):
            p.sub_(2 * eps * v)
        f_minus = float(inst.value())
        for p, v in zip(params, dirs, strict=True):
            p.add_(eps * v)
    fd = (f_plus - f_minus) / (2 * eps)
    directional = sum(float((a * v).sum()) for a, v in zip(got, dirs, strict=True))
    assert directional == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_closed_form_head_output_gradient_is_the_fixed_head_gradient() -> None:
    """m·∂_{v_j} of the mean outer loss equals ∂_v (y_j − [v;1]ᵀW)² at fixed W (envelope)."""
    g = torch.Generator().manual_seed(0)
    V = torch.randn(30, 4, generator=g, dtype=D64, requires_grad=True)
    y = torch.randn(30, 1, generator=g, dtype=D64)
    problem = IVProblem(head="closed_form", outer_ridge=0.1)
    losses = problem.outer_loss(nn.Module(), V, {"y": y})
    assert losses.shape == (30,)
    (gv,) = torch.autograd.grad(losses.mean(), V)
    W = ridge_fit(V.detach(), y, 0.1)
    resid = y - ridge_predict(V.detach(), W)
    fixed = -2 * resid * W[:-1, 0][None, :]
    torch.testing.assert_close(30 * gv, fixed, rtol=1e-9, atol=1e-12)
    # the mean per-sample loss is the ridge objective
    objective = ridge_objective(V.detach(), y, W, 0.1)
    assert float(losses.detach().mean()) == pytest.approx(float(objective), rel=1e-12)


def test_ridge_fit_solves_the_normal_equations() -> None:
    g = torch.Generator().manual_seed(1)
    F = torch.randn(50, 3, generator=g, dtype=D64, requires_grad=True)
    Y = torch.randn(50, 2, generator=g, dtype=D64)
    W = ridge_fit(F, Y, 0.3)
    (gW,) = torch.autograd.grad(ridge_objective(F, Y, W, 0.3), F, create_graph=False)
    # stationarity in W: the gradient of the objective in W vanishes at the fit
    W2 = W.detach().requires_grad_(True)
    (dW,) = torch.autograd.grad(ridge_objective(F.detach(), Y, W2, 0.3), W2)
    assert float(dW.abs().max()) < 1e-12
    assert torch.isfinite(gW).all()
    with pytest.raises(ValueError, match="ridge"):
        ridge_fit(F, Y, 0.0)


def test_problem_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match="head"):
        IVProblem(head="nope")
    problem = IVProblem(head="learned")
    outer = IVOuter(nn.Identity(), 2, learned_head=False)
    with pytest.raises(ValueError, match="learned_head"):
        problem.outer_loss(outer, torch.zeros(3, 2), {"y": torch.zeros(3, 1)})


def test_networks_float64_and_head_is_last_linear() -> None:
    torch.manual_seed(0)
    sizes = {"treatment_hidden": (8, 8, 8), "instrument_hidden": (8, 8, 8), "feature_dim": 4}
    outer, inner = build_iv_networks("dsprites", dtype=D64, learned_head=True, **sizes)
    assert all(p.dtype == D64 for p in [*outer.parameters(), *inner.parameters()])
    linears = [m for m in inner.modules() if isinstance(m, nn.Linear)]
    assert linears[-1] is inner.head
    psi = outer(torch.rand(5, 4096, dtype=D64))
    assert psi.shape == (5, 4) and float(psi.detach().abs().max()) <= 1.0
    assert inner(torch.rand(5, 3, dtype=D64)).shape == (5, 4)
    # spectral norm on every feature Linear, none on the inner head
    from torch.nn.utils import parametrize

    feats = [m for m in inner.features.modules() if isinstance(m, nn.Linear)]
    assert feats and all(parametrize.is_parametrized(m) for m in feats)
    assert not parametrize.is_parametrized(inner.head)


def test_demand_networks_and_outcome_features() -> None:
    torch.manual_seed(0)
    outer, inner = build_iv_networks("demand", feature_dim=4, covariate_dim=3)
    assert outer.covariate is not None and outer.outcome_dim == (1 + 1) * (3 + 1) - 1
    assert outer(torch.rand(7, 1)).shape == (7, 1)  # the price feature a(p)
    assert inner(torch.rand(7, 3)).shape == (7, 1)  # h(z) regresses a(p)
    assert [m for m in inner.modules() if isinstance(m, nn.Linear)][-1] is inner.head
    v, c = torch.randn(7, 2, dtype=D64), torch.randn(7, 3, dtype=D64)
    feats = outcome_features(v, c)
    # [v; 1] ⊗ [c; 1] flattened row-major, without the last (constant) entry
    u, w = torch.cat([v, torch.ones(7, 1, dtype=D64)], 1), torch.cat([c, torch.ones(7, 1)], 1)
    assert feats.shape == (7, 3 * 4 - 1)
    for i in range(3):
        for j in range(4):
            if (i, j) != (2, 3):
                torch.testing.assert_close(feats[:, 4 * i + j], u[:, i] * w[:, j])
    assert outcome_features(v, None) is v
    batch = {"x": torch.rand(7, 2)}
    assert outer.outcome_features(torch.rand(7, 1), batch).shape == (7, 7)
    with pytest.raises(ValueError, match="'x'"):
        outer.outcome_features(torch.rand(7, 1), {})
    with pytest.raises(ValueError, match="hidden width"):
        build_iv_networks("demand", treatment_hidden=(4, 4))


# ------------------------------------------------------------------------------- the tasks
TINY = {
    "n": 200,
    "treatment_hidden": [16, 16, 8],
    "instrument_hidden": [16, 16, 8],
    "feature_dim": 4,
    "inner_batch_size": 40,
    "outer_batch_size": 50,
}


TINY_DEMAND = {
    "dataset": "demand",
    "n": 200,
    "treatment_hidden": [8],
    "instrument_hidden": [16, 8],
    "covariate_hidden": [16, 8],
    "feature_dim": 4,
    "covariate_dim": 3,
    "inner_batch_size": 40,
    "outer_batch_size": 50,
}


def tiny_method(kind: str, dataset: str = "dsprites") -> IVMethodConfig:
    # The feature formulation (the paper's baselines) is defined without covariates.
    extra = {"formulation": "functional"} if dataset == "demand" else {}
    return paper_method(
        kind, inner_steps=2, adjoint_steps=2, unroll=3, truncate=2, covariate_steps=2, **extra
    )


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cfg = IVProblemConfig(cache_dir=str(tmp_path_factory.mktemp("ivcache")), **TINY)
    return cfg, make_dataset(cfg, 0)


@pytest.fixture(scope="module")
def tiny_demand(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cfg = DemandProblemConfig(cache_dir=str(tmp_path_factory.mktemp("ivcache")), **TINY_DEMAND)
    return cfg, make_dataset(cfg, 0)


def spec(kind: str, cfg: IVProblemConfig, dtype: str = "float32") -> RunSpec:
    experiment = "iv_demand" if cfg.dataset == "demand" else "iv_dsprites"
    mc = tiny_method(kind, cfg.dataset)
    return RunSpec(experiment, kind, mc, cfg, seed=0, iterations=3, dtype=dtype)


DATASETS = ("tiny_data", "tiny_demand")


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("kind", IV_KINDS)
def test_every_method_runs_with_finite_metrics(kind: str, dataset: str, request) -> None:  # type: ignore[no-untyped-def]
    cfg, data = request.getfixturevalue(dataset)
    task = IVTask(spec(kind, cfg), data=data)
    for _ in range(2):
        metrics = task.step()
    assert math.isfinite(metrics["outer_loss"]) and math.isfinite(metrics["grad_norm"])
    assert math.isfinite(metrics["inner_loss"])
    if cfg.dataset == "demand":
        assert math.isfinite(metrics["covariate_loss"])
    result = task.evaluate()
    bound = 1e5 if cfg.dataset == "demand" else 1e3  # var(f) ≈ 32,600 vs ≈ 25
    assert set(result) == {"test_mse"} and 0 < result["test_mse"] < bound


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("kind", IV_KINDS)
def test_task_resumes_exactly(kind: str, dataset: str, request) -> None:  # type: ignore[no-untyped-def]
    cfg, data = request.getfixturevalue(dataset)
    full = IVTask(spec(kind, cfg), data=data)
    for _ in range(4):
        last_full = full.step()

    first = IVTask(spec(kind, cfg), data=data)
    for _ in range(2):
        first.step()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = IVTask(spec(kind, cfg), data=data)
    resumed.load_state_dict(state)
    for _ in range(2):
        last_resumed = resumed.step()

    for a, b in zip(
        full.outer.state_dict().values(), resumed.outer.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    for a, b in zip(
        full.inner.state_dict().values(), resumed.inner.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert last_full["outer_loss"] == last_resumed["outer_loss"]
    assert resumed.iteration == 4
    assert full.evaluate() == resumed.evaluate()


def test_task_float64_and_learned_head(tiny_data) -> None:  # type: ignore[no-untyped-def]
    cfg, data = tiny_data
    mc = paper_method("funcid_linear", inner_steps=2, head="learned")
    task = IVTask(
        RunSpec("iv_dsprites", "x", mc, cfg, seed=1, iterations=2, dtype="float64"), data=data
    )
    assert task.outer.head is not None
    assert all(p.dtype == D64 for p in task.outer.parameters())
    task.step()
    assert math.isfinite(task.evaluate()["test_mse"])


def test_task_builds_from_plain_configs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    problem = {**TINY_DEMAND, "cache_dir": str(tmp_path)}
    run = RunSpec("iv_demand", "aid", MethodConfig(kind="aid", inner_steps=2), problem, 0, 2)
    task = IVTask(run)
    assert task.config.dataset == "demand" and len(task.data.test) == 2800
    assert task.config.stage1_ridge == task.config.stage2_ridge == 0.1  # DFIV's λ
    task.step()
    assert math.isfinite(task.evaluate()["test_mse"])
    with pytest.raises(ValueError, match="unknown problem field"):
        IVTask(RunSpec("iv_demand", "aid", MethodConfig(kind="aid"), {"nope": 1}, 0, 1))
    with pytest.raises(ValueError, match="unknown IV method kind"):
        as_method_config({"kind": "nope"})


def test_dfiv_stage_losses_decrease(tiny_data) -> None:  # type: ignore[no-untyped-def]
    _, data = tiny_data
    T = IVTensors.from_data(data, D64)
    torch.manual_seed(0)
    sizes = {"treatment_hidden": (16, 16, 8), "instrument_hidden": (16, 16, 8), "feature_dim": 4}
    outer, inner = build_iv_networks("dsprites", dtype=D64, **sizes)
    dfiv = DFIV(
        outer.treatment,
        inner.features,
        torch.optim.Adam(outer.treatment.parameters(), lr=1e-3),
        torch.optim.Adam(inner.features.parameters(), lr=1e-2),
        stage1_steps=5,
    )
    before = float(dfiv.stage1_loss(T.stage1).detach())
    for _ in range(5):
        dfiv.step([T.stage1], T.stage2)
    assert float(dfiv.stage1_loss(T.stage1).detach()) < before


def test_experiments_are_registered() -> None:
    import funcbo.apps.iv.experiment  # noqa: F401
    from funcbo.experiments.task import get_experiment

    for name in ("iv_dsprites", "iv_demand"):
        exp = get_experiment(name)
        assert exp.metric == "test_mse" and exp.metric_mode == "min"
        assert set(exp.kinds) == set(IV_KINDS)
    assert get_experiment("iv_demand").problem_config().dataset == "demand"


def test_dsprites_data_helper_is_exported() -> None:
    assert callable(dsprites_data)


def test_ridge_head_inner_solver_sets_the_head_to_the_ridge_fit(tiny_data) -> None:  # type: ignore[no-untyped-def]
    from funcbo.apps.iv.inner import RidgeHeadInnerSolver

    _, data = tiny_data
    T = IVTensors.from_data(data, D64)
    torch.manual_seed(0)
    sizes = {"treatment_hidden": (16, 16, 8), "instrument_hidden": (16, 16, 8), "feature_dim": 4}
    outer, inner = build_iv_networks("dsprites", dtype=D64, **sizes)
    problem = IVProblem()
    with pytest.raises(ValueError, match="head"):
        RidgeHeadInnerSolver(inner, torch.optim.Adam(inner.parameters()), 2, 0.1)
    solver = RidgeHeadInnerSolver(inner, torch.optim.Adam(inner.features.parameters()), 3, 0.1)
    head_before = inner.head.weight.detach().clone()
    feats_before = [p.detach().clone() for p in inner.features.parameters()]
    loss = solver.run(problem, outer, [T.stage1])
    assert math.isfinite(loss)
    after = list(inner.features.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(feats_before, after, strict=True))
    assert not torch.equal(head_before, inner.head.weight)
    with torch.no_grad():
        W = ridge_fit(inner.eval().features(T.stage1["z"]), outer.eval()(T.stage1["t"]), 0.1)
    torch.testing.assert_close(inner.head.weight, W[:-1].T)
    torch.testing.assert_close(inner.head.bias, W[-1])
    assert all(p.grad is None for p in outer.parameters())


def test_funcid_linear_equals_dfiv_gradient_for_a_ridge_head(tiny_data) -> None:  # type: ignore[no-untyped-def]
    """With the inner head at its ridge fit (λ₁) on fixed features, DFIV's stage-2 gradient is the
    exact hypergradient of that parametric problem; FuncID's closed-form adjoint with ridge 2λ₁
    (H = 2I) on the same features solves the same adjoint system, so the two agree."""
    _, data = tiny_data
    T = IVTensors.from_data(data, D64)
    torch.manual_seed(0)
    sizes = {"treatment_hidden": (16, 16, 8), "instrument_hidden": (16, 16, 8), "feature_dim": 4}
    outer, inner = build_iv_networks("dsprites", dtype=D64, **sizes)
    outer.eval()
    inner.eval()
    lam1, lam2 = 0.1, 0.1
    with torch.no_grad():
        W = ridge_fit(inner.features(T.stage1["z"]), outer(T.stage1["t"]), lam1)
        inner.head.weight.copy_(W[:-1].T)
        inner.head.bias.copy_(W[-1])
    dfiv = DFIV(
        outer.treatment,
        inner.features,
        torch.optim.SGD(outer.treatment.parameters(), lr=0.0),
        torch.optim.SGD(inner.features.parameters(), lr=0.0),
        lam1=lam1,
        lam2=lam2,
    )
    expected = torch.autograd.grad(
        dfiv.stage2_loss(T.stage1, T.stage2), list(outer.treatment.parameters())
    )
    est = FuncID(
        inner,
        torch.optim.SGD(inner.parameters(), lr=0.0),
        inner_steps=0,
        adjoint=LinearAdjoint(2 * lam1, relative=False, head=inner.head),
    )
    problem = IVProblem(head="closed_form", outer_ridge=lam2)
    got = est.hypergradient(problem, outer, T.stage1, T.stage2)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_funcid_linear_equals_dfiv_gradient_with_covariates(tiny_demand) -> None:  # type: ignore[no-untyped-def]
    """The same agreement with observed covariates (demand design): the outcome is regressed on
    [v; 1] ⊗ [χ(c); 1]; with χ fixed, DFIV's stage-2 gradient on the price network equals
    FuncID's hypergradient, whose direct part g_ω is zero for the price network."""
    _, data = tiny_demand
    T = IVTensors.from_data(data, D64)
    torch.manual_seed(0)
    sizes = {"treatment_hidden": (8,), "instrument_hidden": (16, 8), "covariate_hidden": (8, 8)}
    outer, inner = build_iv_networks("demand", feature_dim=4, covariate_dim=3, dtype=D64, **sizes)
    outer.eval()
    inner.eval()
    assert outer.covariate is not None
    lam1, lam2 = 0.1, 0.1
    with torch.no_grad():
        W = ridge_fit(inner.features(T.stage1["z"]), outer(T.stage1["t"]), lam1)
        inner.head.weight.copy_(W[:-1].T)
        inner.head.bias.copy_(W[-1])
    frozen_opt = torch.optim.SGD(outer.covariate.parameters(), lr=0.0)
    dfiv = DFIV(
        outer.treatment,
        inner.features,
        torch.optim.SGD(outer.treatment.parameters(), lr=0.0),
        torch.optim.SGD(inner.features.parameters(), lr=0.0),
        lam1=lam1,
        lam2=lam2,
        covariate=outer.covariate,
        covariate_optimizer=frozen_opt,
    )
    expected = torch.autograd.grad(
        dfiv.stage2_loss(T.stage1, T.stage2), list(outer.treatment.parameters())
    )
    est = FuncID(
        inner,
        torch.optim.SGD(inner.parameters(), lr=0.0),
        inner_steps=0,
        adjoint=LinearAdjoint(2 * lam1, relative=False, head=inner.head),
    )
    problem = IVProblem(head="closed_form", outer_ridge=lam2)
    got = est.hypergradient(problem, outer, T.stage1, T.stage2)
    n_treatment = len(list(outer.treatment.parameters()))
    for a, b in zip(got[:n_treatment], expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    # χ's part of the hypergradient is the direct derivative of the mean outer loss at h(z)
    with torch.no_grad():
        v = inner(T.stage2["z"])
    direct = torch.autograd.grad(
        problem.outer_loss(outer, v, T.stage2).mean(), list(outer.covariate.parameters())
    )
    for a, b in zip(got[n_treatment:], direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("steps", [0, 2])
def test_covariate_network_training(steps: int, tiny_demand) -> None:  # type: ignore[no-untyped-def]
    """With covariate steps χ has its own optimizer and is left out of ω's optimizer (and of the
    hypergradient); without, χ is part of ω. Either way χ is trained."""
    cfg, data = tiny_demand
    mc = paper_method("funcid_linear", inner_steps=2, covariate_steps=steps)
    task = IVTask(RunSpec("iv_demand", "f", mc, cfg, seed=0, iterations=1), data=data)
    chi = task.outer.covariate
    assert chi is not None and task.outer_optimizer is not None
    in_omega = {id(p) for g in task.outer_optimizer.param_groups for p in g["params"]}
    chi_ids = {id(p) for p in chi.parameters()}
    assert (chi_ids <= in_omega) == (steps == 0) and not (chi_ids & in_omega and steps)
    assert (task.covariate_optimizer is None) == (steps == 0)
    before = [p.detach().clone() for p in chi.parameters()]
    metrics = task.step()
    assert ("covariate_loss" in metrics) == (steps > 0)
    assert any(not torch.equal(a, b) for a, b in zip(before, chi.parameters(), strict=True))
    assert all(p.requires_grad for p in chi.parameters())  # unfrozen after the step


def test_demand_config_file_is_valid() -> None:
    from pathlib import Path

    import funcbo.apps.iv.experiment  # noqa: F401
    from funcbo.experiments.config import load_config, plan_runs

    path = Path(__file__).resolve().parents[1] / "configs" / "iv_demand.yaml"
    cfg = load_config(path)
    assert cfg.experiment == cfg.name == "iv_demand" and cfg.threads == 1
    assert isinstance(cfg.problem, DemandProblemConfig) and cfg.problem.n == 5000
    assert set(cfg.methods) == {"funcid_linear", "dfiv"}
    assert cfg.grid == {"problem.rho": [0.1, 0.5, 0.9]}
    assert len(cfg.seeds) >= 3
    assert len(plan_runs(cfg)) == 2 * 3 * len(cfg.seeds)
    for method in cfg.methods.values():
        assert method.covariate_steps == 20 and method.covariate_weight_decay == 0.1
