"""The FuncID authors' formulation of the IV baselines, and the reference's loss scale.

The reference code (the FuncID authors' and DFIV's) writes every loss as a *sum* over the stage's
batch, with ridges λ·n, and uses Adam with coupled weight decay; funcbo writes means with
per-sample ridges λ. These tests check that funcbo's objectives are the reference's divided by
the batch size, and that with ``weight_decay_scale: sum`` funcbo's optimizers take the reference's
Adam steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from funcbo.apps.iv.config import IVProblemConfig, paper_method
from funcbo.apps.iv.evaluate import eval_mode
from funcbo.apps.iv.problem import IVFeatureProblem, feature_outer_batch
from funcbo.apps.iv.task import IVTask, make_dataset
from funcbo.experiments.task import RunSpec

D64 = torch.float64

TINY = {
    "dataset": "dsprites",
    "n": 200,
    "treatment_hidden": [16, 16, 8],
    "instrument_hidden": [16, 16, 8],
    "feature_dim": 4,
}


# ----------------------------------------------------- the reference's formulas, on sums (λ·n)
def ref_fit_linear(target, feature, reg):
    A = feature.T @ feature + reg * torch.eye(feature.shape[1], dtype=feature.dtype)
    return torch.inverse(A) @ feature.T @ target


def ones(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def ref_stage1_loss(psi, phi, lam1):
    """The authors' ``fi`` (parametricBO) and DFIV's stage-1 loss: sums, λ₁·n."""
    lam = lam1 * phi.shape[0]
    W = ref_fit_linear(psi, ones(phi), lam)
    return torch.norm(psi - ones(phi) @ W) ** 2 + lam * torch.norm(W) ** 2


def ref_stage2_loss(psi1, phi1, phi2, y, lam1, lam2):
    """The authors' ``fit_2sls(...)["stage2_loss"]`` (DFIV's stage-2 loss): sums."""
    W1 = ref_fit_linear(psi1, ones(phi1), lam1 * phi1.shape[0])
    V2 = ones(ones(phi2) @ W1)
    lam = lam2 * y.shape[0]
    W2 = ref_fit_linear(y, V2, lam)
    return torch.norm(y - V2 @ W2) ** 2 + lam * torch.norm(W2) ** 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cfg = IVProblemConfig(cache_dir=str(tmp_path_factory.mktemp("ivcache")), **TINY)
    return cfg, make_dataset(cfg, 0)


def task_for(kind: str, cfg: IVProblemConfig, data, **overrides) -> IVTask:  # type: ignore[no-untyped-def]
    mc = paper_method(kind, **overrides)
    return IVTask(
        RunSpec("iv_dsprites", kind, mc, cfg, seed=0, iterations=1, dtype="float64"), data=data
    )


def test_feature_problem_losses_are_the_reference_sums_over_n(tiny) -> None:  # type: ignore[no-untyped-def]
    cfg, data = tiny
    task = task_for("aid", cfg, data, formulation="features")
    problem = task.problem
    assert isinstance(problem, IVFeatureProblem)
    s1, s2 = task.tensors.stage1, task.tensors.stage2
    phi_net, outer = task.inner.features, task.outer
    with eval_mode(outer, phi_net):  # no spectral-norm iterations between the two evaluations
        psi1 = outer(s1["t"])
        inner = problem.eval_inner(outer, phi_net(s1["z"]), s1).mean()
        ref = ref_stage1_loss(psi1, phi_net(s1["z"]), task.stage1_ridge) / s1["t"].shape[0]
        assert inner.item() == pytest.approx(ref.item(), rel=1e-10)
        ob = feature_outer_batch(s1, s2)
        out = problem.eval_outer(outer, phi_net(ob["z"]), ob).mean()
        ref2 = ref_stage2_loss(
            psi1, phi_net(s1["z"]), phi_net(s2["z"]), s2["y"], task.stage1_ridge, cfg.stage2_ridge
        )
        assert out.item() == pytest.approx(ref2.item() / s2["y"].shape[0], rel=1e-10)
    # The outer loss depends on ω directly (the stage-1 refit on ψ_ω(t₁)), not only through φ.
    with eval_mode(phi_net):
        phi = phi_net(ob["z"]).detach()
    g = torch.autograd.grad(problem.eval_outer(outer, phi, ob).mean(), list(outer.parameters()))
    assert sum(float(t.norm()) for t in g) > 0


def _adam_steps_differ(params_mean, loss_mean, opt_mean, params_sum, loss_sum, wd_ref) -> float:
    """Three Adam steps of funcbo's optimizer on the mean loss and of Adam(wd_ref) on the
    reference's sum loss from the same start; returns the largest parameter difference."""
    opt_ref = torch.optim.Adam(params_sum, lr=opt_mean.defaults["lr"], weight_decay=wd_ref)
    for _ in range(3):
        opt_mean.zero_grad()
        loss_mean().backward()
        opt_mean.step()
        opt_ref.zero_grad()
        loss_sum().backward()
        opt_ref.step()
    return max(
        float((a - b).detach().abs().max()) for a, b in zip(params_mean, params_sum, strict=True)
    )


def _stage_differences(task: IVTask, lam1: float, lam2: float) -> tuple[float, float]:
    """(stage-1, stage-2) differences between DFIV's optimizers in ``task`` and the reference's
    Adam(weight_decay=0.1) on sums."""
    dfiv = task.dfiv
    assert dfiv is not None
    s1, s2 = task.tensors.stage1, task.tensors.stage2
    phi_net, psi_net = dfiv.instrument, dfiv.treatment
    phi_net.eval(), psi_net.eval()  # no spectral-norm iterations: both sides see the same nets
    phi_ref = copy.deepcopy(phi_net)
    with torch.no_grad():
        psi = psi_net(s1["t"])
    d1 = _adam_steps_differ(
        list(phi_net.parameters()),
        lambda: dfiv.stage1_loss(s1, psi),
        dfiv.instrument_optimizer,
        list(phi_ref.parameters()),
        lambda: ref_stage1_loss(psi, phi_ref(s1["z"]), lam1),
        0.1,
    )
    psi_ref = copy.deepcopy(psi_net)
    with torch.no_grad():
        phi1, phi2 = phi_net(s1["z"]), phi_net(s2["z"])
    d2 = _adam_steps_differ(
        list(psi_net.parameters()),
        lambda: dfiv.stage2_loss(s1, s2),
        dfiv.treatment_optimizer,
        list(psi_ref.parameters()),
        lambda: ref_stage2_loss(psi_ref(s1["t"]), phi1, phi2, s2["y"], lam1, lam2),
        0.1,
    )
    return d1, d2


def test_rescaled_weight_decay_takes_the_reference_adam_steps(tiny) -> None:  # type: ignore[no-untyped-def]
    cfg, data = tiny
    task = task_for("dfiv", cfg, data)  # the authors' weight decay, 0.1, on both networks
    n1, n2 = task.tensors.stage1["t"].shape[0], task.tensors.stage2["y"].shape[0]
    assert task.dfiv is not None
    stage1 = task.dfiv.instrument_optimizer.param_groups[0]
    stage2 = task.dfiv.treatment_optimizer.param_groups[0]
    assert stage1["weight_decay"] == pytest.approx(0.1 / n1) and stage1["eps"] == 1e-8 / n1
    assert stage2["weight_decay"] == pytest.approx(0.1 / n2) and stage2["eps"] == 1e-8 / n2
    d1, d2 = _stage_differences(task, cfg.stage1_ridge, cfg.stage2_ridge)
    assert d1 <= 1e-6 and d2 <= 1e-6
    # Applied as written to the mean losses, the same weight decay takes other steps.
    cfg_mean = IVProblemConfig(**{**cfg.__dict__, "weight_decay_scale": "mean"})
    task_mean = task_for("dfiv", cfg_mean, data)
    assert task_mean.dfiv is not None
    assert task_mean.dfiv.instrument_optimizer.param_groups[0]["weight_decay"] == 0.1
    d1, d2 = _stage_differences(task_mean, cfg.stage1_ridge, cfg.stage2_ridge)
    assert d1 > 1e-5 and d2 > 1e-5


def _linear_iv_instance(seed: int = 0) -> tuple[dict, dict]:
    """A small IV problem: instrument z ∈ R³, treatment t ∈ R² confounded by e, y = f(t) + 2e."""
    g = torch.Generator().manual_seed(seed)
    B = torch.tensor([[1.0, 0.5], [-0.5, 1.0], [0.3, 0.3]], dtype=D64)

    def draw(n: int) -> tuple[torch.Tensor, ...]:
        z = torch.randn(n, 3, generator=g, dtype=D64)
        e = torch.randn(n, 1, generator=g, dtype=D64)
        t = z @ B + e + 0.1 * torch.randn(n, 2, generator=g, dtype=D64)
        return z, t, torch.sin(2 * t[:, :1]) + t[:, 1:] + 2 * e

    z1, t1, _ = draw(200)
    z2, _, y2 = draw(200)
    return {"z": z1, "t": t1}, {"z": z2, "y": y2}


def _train_feature_baseline(kind: str, outer_lr: float) -> tuple[list[float], list[float]]:
    """30 outer iterations of AID (textbook CG(2), as the authors') or ITD on the feature
    formulation; returns the outer losses and hypergradient norms."""
    from torch import nn

    from funcbo import AID, CG, ITD
    from funcbo.estimator import Batches

    torch.manual_seed(0)
    psi = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    phi = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    s1, s2 = _linear_iv_instance()
    problem = IVFeatureProblem(stage1_ridge=0.1, stage2_ridge=0.1)
    if kind == "aid":
        est = AID(
            phi,
            torch.optim.Adam(phi.parameters(), lr=1e-2),
            10,
            solver=CG(maxiter=2, safeguards=False),
        )
    else:
        est = ITD(phi, lr=1e-1, unroll=10, truncate=2)
    opt = torch.optim.Adam(psi.parameters(), lr=outer_lr) if outer_lr > 0 else None
    ob = feature_outer_batch(s1, s2)
    losses, norms = [], []
    for _ in range(30):
        est.step(problem, psi, Batches([s1]), ob)
        if opt is not None:
            opt.step()
            opt.zero_grad()
        losses.append(est.stats["outer_loss"])
        norms.append(est.stats["grad_norm"])
    return losses, norms


@pytest.mark.parametrize(
    "kind", ["funcid_linear", "aid", "itd", "gradient_penalty", "value_penalty"]
)
def test_every_optimizer_is_converted_to_the_mean_scale(kind: str, tiny) -> None:  # type: ignore[no-untyped-def]
    cfg, data = tiny
    task = task_for(kind, cfg, data)
    n = task.tensors.stage1["t"].shape[0]  # both halves have n points here
    est = task.estimator
    opts = [
        task.outer_optimizer,
        *(getattr(est, s).optimizer for s in ("inner", "value") if hasattr(est, s)),
        *([est.optimizer] if kind == "itd" else []),  # type: ignore[union-attr]
    ]
    wds = [paper_method(kind).outer_weight_decay] + [paper_method(kind).inner_weight_decay] * (
        len(opts) - 1
    )
    for opt, wd in zip(opts, wds, strict=True):
        assert opt is not None
        group = opt.param_groups[0]
        assert group["weight_decay"] == pytest.approx(wd / n) and group["eps"] == 1e-8 / n


@pytest.mark.parametrize("kind", ["aid", "itd"])
def test_feature_baselines_reduce_the_outer_loss(kind: str) -> None:
    losses, norms = _train_feature_baseline(kind, 1e-2)
    frozen, _ = _train_feature_baseline(kind, 0.0)  # the same inner steps, ω never moves
    assert all(math.isfinite(v) and v > 1e-3 for v in norms)
    assert losses[-1] < 0.97 * losses[0]
    assert losses[-1] < 0.97 * frozen[-1]


def test_a_methods_own_stage1_ridge_is_its_loss_and_its_score(tiny) -> None:  # type: ignore[no-untyped-def]
    # The authors' AID and ITD use λ₁ = 0.05 (their 0.5·lam_V·n): a method's stage1_ridge
    # replaces the problem's in its inner and outer losses and in the refit that scores it.
    from funcbo.apps.iv.evaluate import out_of_sample_mse

    cfg, data = tiny
    own = task_for("aid", cfg, data)  # the paper's AID: 0.05
    base = task_for("aid", cfg, data, stage1_ridge=None)
    assert own.stage1_ridge == 0.05 and base.stage1_ridge == cfg.stage1_ridge == 0.1
    assert isinstance(own.problem, IVFeatureProblem) and own.problem.stage1_ridge == 0.05
    s1 = own.tensors.stage1
    with eval_mode(own.outer, own.inner.features):
        psi1, phi1 = own.outer(s1["t"]), own.inner.features(s1["z"])
        inner = own.problem.eval_inner(own.outer, phi1, s1).mean()
    ref = ref_stage1_loss(psi1, phi1, 0.05) / s1["t"].shape[0]
    assert inner.item() == pytest.approx(ref.item(), rel=1e-10)
    score = own.evaluate()["test_mse"]
    args = (own.outer.treatment, own.inner.features, own.tensors)
    assert score == pytest.approx(out_of_sample_mse(*args, 0.05, cfg.stage2_ridge, None), rel=1e-12)
    assert score != pytest.approx(out_of_sample_mse(*args, 0.1, cfg.stage2_ridge, None), rel=1e-6)
    functional = task_for("aid", cfg, data, formulation="functional")
    assert functional.stage1_ridge == 0.05  # its score's refit
    with pytest.raises(ValueError, match="stage1_ridge must be > 0"):
        paper_method("itd", stage1_ridge=0.0)
