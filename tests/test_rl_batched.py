"""Batched RL updates: one batched step equals, run by run, the unbatched updater's step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from funcbo.apps.rl.agent import Agent
from funcbo.apps.rl.batched import (
    BATCHED_KINDS,
    BatchedAdam,
    BatchedUpdater,
    check_batchable,
    ensemble_params,
    sequential_params,
)
from funcbo.apps.rl.config import RLMethodConfig, RLProblemConfig

pytest.importorskip("gymnasium")

D = torch.float64
B = 16
LRS = (3e-4, 1e-3, 3e-3)
TAUS = (0.01, 0.005, 0.02)


def _agents(
    kind: str, target: str = "min", problem_kw: dict | None = None, **method_kw: object
) -> list[Agent]:
    agents = []
    for i in range(3):
        prob = RLProblemConfig(
            batch_size=B, tau=TAUS[i], target=target, init_steps=0, **(problem_kw or {})
        )
        meth = RLMethodConfig(kind=kind, inner_lr=LRS[i], **method_kw)  # type: ignore[arg-type]
        a = Agent(prob, meth, seed=10 + i, dtype=D)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # generic weights: Q-values of order 1, live ReLUs
            for net in a.networks().values():
                for p in net.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=D))
        agents.append(a)
    return agents


def _batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "obs": torch.randn(B, 4, generator=gen, dtype=D),
        "action": torch.randint(0, 2, (B,), generator=gen),
        "reward": torch.ones(B, 1, dtype=D),
        "next_obs": torch.randn(B, 4, generator=gen, dtype=D),
        "not_done": (torch.rand(B, 1, generator=gen, dtype=D) > 0.2).to(D),
    }


def _batched(agents: list[Agent]) -> BatchedUpdater:
    kind = agents[0].method.kind
    return BatchedUpdater(
        agents[0].cfg,
        agents[0].method,
        [a.q for a in agents],
        [a.target_q for a in agents],
        [a.model for a in agents] if kind != "model_free" else None,  # type: ignore[misc]
        [a.values for a in agents] if kind == "vep" else None,  # type: ignore[misc]
        [_adjoint_q(a) for a in agents] if kind == "funcid_network" else None,
        inner_lrs=[a.method.inner_lr for a in agents],
        taus=[a.cfg.tau for a in agents],
    )


def _adjoint_q(agent: Agent) -> torch.nn.Module:
    """The DoubleQ inside funcid_network's adjoint (StateActionInput(ScaledOutput(QOfAction)))."""
    return agent.updater.estimator.adjoint.model.module.module.q  # type: ignore[attr-defined]


def _compare(agents: list[Agent], bu: BatchedUpdater, tol: float = 1e-10) -> float:
    worst = 0.0
    for r, a in enumerate(agents):
        nets = bu.networks(r)
        pairs = [
            (ensemble_params(a.q.net), nets["q"]),
            (ensemble_params(a.target_q.net), nets["target_q"]),
        ]
        if a.method.kind == "funcid_network":
            pairs.append((ensemble_params(_adjoint_q(a).net), nets["adjoint"]))
        if a.model is not None:
            pairs.append((sequential_params(a.model.next_state), nets["model_next_state"]))
            pairs.append((sequential_params(a.model.reward), nets["model_reward"]))
        for mine, theirs in pairs:
            for p, q in zip(mine, theirs, strict=True):
                worst = max(worst, float((p.detach() - q.detach()).abs().max()))
    assert worst <= tol, f"batched parameters differ from the unbatched runs by {worst:.3g}"
    return worst


#: every batched kind, and omd_cg warm-started from its previous solution
CASES = [(k, {}) for k in BATCHED_KINDS] + [("omd_cg", {"warm_start": True})]


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize(
    ("kind", "method_kw"), CASES, ids=[k + ("_warm" if kw else "") for k, kw in CASES]
)
def test_batched_update_equals_unbatched_runs(kind: str, method_kw: dict) -> None:
    """Three runs (different seeds, Q learning rates and τ), three updates: every parameter and
    every metric of every run equals the unbatched updater's on the same batches (float64).

    ``omd_cg``'s ten CG iterations on these indefinite parameter-space Hessians amplify
    rounding: a relative perturbation of 1e-15 of the Hessian-vector products moves one run's
    unbatched solution v by 7.5e-10 relative, and the batched products round differently
    (feature-major layers). Its v is compared at 1e-7 relative and its metrics at 1e-6
    (measured: 3.5e-9 and 4.5e-8); its parameters, like every other kind's, within 1e-10
    (measured: 3e-11). A wrong Hessian, target network, damping or warm start changes v at
    order 1."""
    agents = _agents(kind, **method_kw)
    bu = _batched(agents)
    rel = 1e-6 if kind == "omd_cg" else 1e-9
    gen = torch.Generator().manual_seed(0)
    moved = 0.0
    for _ in range(3):
        n_batches = 1 if kind not in ("mle", "vep") else 2
        batches = [[_batch(gen) for _ in range(n_batches)] for _ in agents]
        before = [p.detach().clone() for p in bu.qp + bu.mp_ns + bu.mp_r]
        metrics_1 = []
        for a, bs in zip(agents, batches, strict=True):
            it = iter(bs)
            metrics_1.append(a.updater.update(lambda it=it: next(it)))
        stacked = iter(
            [
                {k: torch.stack([bs[j][k] for bs in batches]) for k in batches[0][0]}
                for j in range(n_batches)
            ]
        )
        metrics_b = bu.update(lambda it=stacked: next(it))
        after = [p.detach() for p in bu.qp + bu.mp_ns + bu.mp_r]
        moved = max(
            moved, max(float((x - y).abs().max()) for x, y in zip(before, after, strict=True))
        )
        _compare(agents, bu)
        for r, m1 in enumerate(metrics_1):
            for key, val in metrics_b.items():
                assert key in m1, f"{kind}: batched metric {key!r} not reported unbatched"
                assert float(val[r]) == pytest.approx(m1[key], rel=rel, abs=1e-12), key
        if kind == "omd_cg":
            assert {"solver_iters", "solver_residual", "solver_gave_up", "dual_norm"} <= set(
                metrics_b
            )
            for r, a in enumerate(agents):
                # the warm start, in the unbatched AID's checkpoint format
                want = a.updater.state_dict()["estimator"]["v"]
                got = bu.state_dict(r)["v"]
                assert [t.shape for t in got] == [t.shape for t in want]
                err = float((_flat(got) - _flat(want)).norm())
                assert err <= 1e-7 * float(_flat(want).norm())
    assert moved > 1e-5  # the updates did something


def test_per_head_target_and_omd_match() -> None:
    for kind in ("funcid_reference", "omd"):
        agents = _agents(kind, target="per_head")
        bu = _batched(agents)
        gen = torch.Generator().manual_seed(1)
        batches = [_batch(gen) for _ in agents]
        for a, b in zip(agents, batches, strict=True):
            a.updater.update(lambda b=b: b)
        stacked = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
        bu.update(lambda s=stacked: s)
        _compare(agents, bu)


def test_reference_trains_the_reward_head_only() -> None:
    agents = _agents("funcid_reference")
    bu = _batched(agents)
    ns_before = [p.detach().clone() for p in bu.mp_ns]
    gen = torch.Generator().manual_seed(2)
    batches = [_batch(gen) for _ in agents]
    bu.update(lambda: {k: torch.stack([b[k] for b in batches]) for k in batches[0]})
    for p, q in zip(ns_before, bu.mp_ns, strict=True):
        assert torch.equal(p, q.detach())


def test_batched_adam_matches_torch_adam_per_run() -> None:
    gen = torch.Generator().manual_seed(3)
    runs, members = 3, 2
    w = torch.randn(runs * members, 4, 5, generator=gen, dtype=D)
    lrs = torch.tensor([1e-3, 3e-3, 1e-2], dtype=D)
    singles = [w[r * members : (r + 1) * members].clone().requires_grad_(True) for r in range(3)]
    opts = [
        torch.optim.Adam([p], lr=float(lr), weight_decay=0.1)
        for p, lr in zip(singles, lrs, strict=True)
    ]
    stacked = w.clone()
    opt = BatchedAdam([stacked], runs, lrs, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(stacked.shape, generator=gen, dtype=D)
        opt.step([g])
        for r, (p, o) in enumerate(zip(singles, opts, strict=True)):
            p.grad = g[r * members : (r + 1) * members].clone()
            o.step()
    for r, p in enumerate(singles):
        assert torch.allclose(stacked[r * members : (r + 1) * members], p.detach(), atol=1e-14)


def test_state_dict_round_trip_per_run() -> None:
    agents = _agents("omd")
    bu = _batched(agents)
    gen = torch.Generator().manual_seed(4)

    def sample() -> dict[str, torch.Tensor]:
        bs = [_batch(gen) for _ in agents]
        return {k: torch.stack([b[k] for b in bs]) for k in bs[0]}

    bu.update(sample)
    states = [bu.state_dict(r) for r in range(3)]
    other = _batched(_agents("omd"))
    for r in (2, 0, 1):
        other.load_state_dict(r, states[r])
    for x, y in zip(
        bu.qp + bu.tq + bu.mp_ns + bu.mp_r,
        other.qp + other.tq + other.mp_ns + other.mp_r,
        strict=True,
    ):
        assert torch.equal(x.detach(), y.detach())
    assert other.model_opt is not None and bu.model_opt is not None
    for x, y in zip(bu.model_opt.exp_avg_sq, other.model_opt.exp_avg_sq, strict=True):
        assert torch.equal(x, y)


def test_batched_initialisation_is_the_unbatched_agents() -> None:
    from funcbo.apps.rl.batched_agent import initial_networks

    for kind in ("funcid_network", "vep"):
        agent = Agent(RLProblemConfig(), RLMethodConfig(kind=kind), seed=5, dtype=D)
        nets = initial_networks(agent.cfg, agent.method, 5, D)
        pairs = [(agent.q, nets["q"]), (agent.model, nets["model"])]
        pairs += [(agent.values, nets["values"])] if kind == "vep" else []
        pairs += [(_adjoint_q(agent), nets["adjoint"])] if kind == "funcid_network" else []
        for mine, theirs in pairs:
            for p, q in zip(mine.parameters(), theirs.parameters(), strict=True):
                assert torch.equal(p, q)


def test_omd_cg_warm_start_is_per_run_state() -> None:
    """The warm start is each run's previous CG solution: restored from ``state_dict(run)``
    (in any run order) the next update is the same to the bit, and without it (``v: None``, a
    cold solve) it is not."""
    gen = torch.Generator().manual_seed(5)

    def draw() -> dict[str, torch.Tensor]:
        bs = [_batch(gen) for _ in range(3)]
        return {k: torch.stack([b[k] for b in bs]) for k in bs[0]}

    bu = _batched(_agents("omd_cg", warm_start=True))
    assert all(bu.state_dict(r)["v"] is None for r in range(3))  # no solve yet
    for _ in range(2):
        batch = draw()
        bu.update(lambda b=batch: b)
    states = [bu.state_dict(r) for r in range(3)]
    shapes = [p.shape for p in _agents("omd_cg")[0].q.parameters()]
    assert all([t.shape for t in st["v"]] == shapes for st in states)
    batch = draw()
    m = bu.update(lambda: batch)
    resumed = _batched(_agents("omd_cg", warm_start=True))
    cold = _batched(_agents("omd_cg", warm_start=True))
    for r in (2, 0, 1):
        resumed.load_state_dict(r, states[r])
        cold.load_state_dict(r, {**states[r], "v": None} if r == 1 else states[r])
    m_resumed = resumed.update(lambda: batch)
    m_cold = cold.update(lambda: batch)
    model = (bu.mp_ns + bu.mp_r, resumed.mp_ns + resumed.mp_r, cold.mp_ns + cold.mp_r)
    for x, y, z in zip(*model, strict=True):
        assert torch.equal(x.detach(), y.detach())
        assert torch.equal(x[[0, 2]].detach(), z[[0, 2]].detach())  # runs 0, 2 kept theirs
    assert torch.equal(m["solver_residual"], m_resumed["solver_residual"])
    assert float(m_cold["solver_residual"][1]) != pytest.approx(
        float(m["solver_residual"][1]), rel=1e-3
    )
    assert float((_flat(cold.mp_r) - _flat(bu.mp_r)).detach().abs().max()) > 1e-8


def test_unsupported_configurations_and_mixed_runs_are_named() -> None:
    with pytest.raises(ValueError, match="inner_optimizer"):
        _batched(_agents("omd_cg", inner_optimizer="sgd"))
    with pytest.raises(ValueError, match="predict_delta"):
        _batched(_agents("omd_cg", problem_kw={"predict_delta": True}))
    agents = _agents("funcid_network", adjoint_at="prediction")
    with pytest.raises(ValueError, match="adjoint_at"):
        BatchedUpdater(
            agents[0].cfg,
            agents[0].method,
            [a.q for a in agents],
            [a.target_q for a in agents],
            [a.model for a in agents],  # type: ignore[misc]
            adjoints=[a.q for a in agents],
        )
    a = RLMethodConfig(kind="omd", inner_lr=1e-3)
    b = dataclasses.replace(a, outer_lr=3e-3)
    with pytest.raises(ValueError, match="method.outer_lr"):
        check_batchable([a, b], [RLProblemConfig(), RLProblemConfig(tau=0.005)])
    check_batchable([a, dataclasses.replace(a, inner_lr=3e-3)], [RLProblemConfig()] * 2)


@pytest.mark.parametrize("n", [100, 1000, 3000, 200_000])
def test_batched_replay_draws_are_the_unbatched_draws(n: int) -> None:
    """Every run's indices are those ReplayBuffer's sampler draws from the same generator
    (small buffers permuted, duplicates redrawn), so a run does not depend on its batch."""
    from funcbo.apps.rl.batched_agent import _distinct_rows
    from funcbo.apps.rl.replay import distinct_indices

    for _ in range(5):
        gens = [torch.Generator().manual_seed(s) for s in range(6)]
        refs = [torch.Generator().manual_seed(s) for s in range(6)]
        rows = _distinct_rows(n, 256, gens)
        for r, g in enumerate(refs):
            assert torch.equal(rows[r], distinct_indices(n, 256, g))
        if n >= 256:
            assert all(row.unique().numel() == 256 for row in rows)
