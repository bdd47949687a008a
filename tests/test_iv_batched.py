"""Batched IV runs (funcbo.apps.iv.batched_task): run r of a batched step is the lone step.

In float64, from the same state (each run first advanced alone a different number of steps, so
that states, Adam step counts and spectral-norm vectors differ) and the same sampled data, one
step of the batch equals, run by run, the step the unbatched IVTask takes (library estimators
called through the task, that is through their public API): every parameter, buffer, optimizer
moment and metric within 1e-10.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import funcbo.apps.iv.batched_task as batched_task
import funcbo.cli  # noqa: F401 - registers the experiments lazily
from funcbo.apps.iv import IVProblemConfig, IVTask, paper_method
from funcbo.apps.iv.batched import BATCHED_KINDS, StackedAdam, StackedNet
from funcbo.apps.iv.batched_task import IVBatchTask, batch_key
from funcbo.apps.iv.networks import dsprites_treatment_net
from funcbo.experiments.batch import plan_jobs
from funcbo.experiments.config import ConfigError, load_config_dict, plan_runs
from funcbo.experiments.runner import run_sweep
from funcbo.experiments.task import RunSpec
from funcbo.linalg import CG, Neumann, SolverGaveUpWarning, batched_cg, run_norm

TINY = {
    "dataset": "dsprites",
    "n": 120,
    "treatment_hidden": [12, 10, 8],
    "instrument_hidden": [12, 10, 8],
    "feature_dim": 4,
}
SEEDS = (3, 4, 5)
TOL = 1e-10
#: metrics that measure the machine, not the computation
MACHINE = {"iteration", "iter_time_s", "time_s", "peak_memory_mb"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("ivcache"))


#: (kind, method overrides) of every batched method the tests step
CASES = [
    ("dfiv", {}),
    ("funcid_linear", {}),
    ("funcid", {}),
    ("aid", {}),  # the paper's: textbook CG(2) from the warm start
    ("aid", {"solver": CG(maxiter=2)}),  # CG(2) with its safeguards, from the warm start
    ("aid", {"solver": Neumann(iters=3, lr=0.005)}),  # a contracting series (lr < 2/λ_max)
    ("itd", {"unroll": 4, "truncate": 2}),
    ("itd", {"unroll": 3, "truncate": 1, "stage1_ridge": 0.05}),  # a method's own λ₁
    ("gradient_penalty", {}),
    ("gradient_penalty", {"squared": False}),  # the authors' form: the norm, not its square
    ("value_penalty", {}),
    ("value_penalty", {"joint": True, "value_steps": 2}),  # the authors': θ's last step with ω's
]


def _specs(
    kind: str, cache: str, method: dict[str, object] | None = None, **problem: object
) -> list[RunSpec]:
    cfg = IVProblemConfig(cache_dir=cache, **{**TINY, **problem})  # type: ignore[arg-type]
    mc = paper_method(kind, inner_steps=3, **(method or {}))
    return [
        RunSpec("iv_dsprites", kind, mc, cfg, seed=s, iterations=5, dtype="float64") for s in SEEDS
    ]


def _tensors(state: object, prefix: str = "") -> dict[str, torch.Tensor | float]:
    """Every tensor and number of a nested state dict, by path."""
    out: dict[str, torch.Tensor | float] = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_tensors(v, f"{prefix}/{i}"))
    elif isinstance(state, torch.Tensor):
        out[prefix] = state
    elif isinstance(state, (int, float)) and not isinstance(state, bool):
        out[prefix] = float(state)
    return out


def _close(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    """Largest absolute difference (0 for equal generator states and NaN pairs)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype == torch.uint8:  # a generator state
            return 0.0 if torch.equal(a, b) else math.inf
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    a, b = float(a), float(b)  # type: ignore[arg-type]
    return 0.0 if a == b or (math.isnan(a) and math.isnan(b)) else abs(a - b)


CASE_IDS = [
    "dfiv",
    "funcid_linear",
    "funcid",
    "aid_cg",
    "aid_cg_safeguards",
    "aid_neumann",
    "itd",
    "itd_own_ridge",
    "gradient_penalty",
    "gradient_penalty_norm",
    "value_penalty",
    "value_penalty_joint",
]


def test_every_batched_kind_is_tested() -> None:
    assert {k for k, _ in CASES} == set(BATCHED_KINDS)


@pytest.mark.filterwarnings("ignore::funcbo.linalg.SolverGaveUpWarning")
@pytest.mark.parametrize("batches", ["full", "minibatch"])
@pytest.mark.parametrize(("kind", "method"), CASES, ids=CASE_IDS)
def test_a_batched_step_is_every_runs_lone_step(
    kind: str, method: dict[str, object], batches: str, cache: str
) -> None:
    sizes = {} if batches == "full" else {"inner_batch_size": 40, "outer_batch_size": 30}
    specs = _specs(kind, cache, method, **sizes)
    alone = [IVTask(s) for s in specs]
    # Different states: run r first takes r + 1 steps alone.
    for r, task in enumerate(alone):
        for _ in range(r + 1):
            task.step()
    batch = IVBatchTask(specs)
    for r, task in enumerate(alone):
        batch.load_state_dict(r, task.state_dict())
    got = batch.step()
    worst = 0.0
    for r, task in enumerate(alone):
        want = task.step()
        keys = set(want) - MACHINE
        assert keys == set(got), (sorted(keys), sorted(got))
        for k in keys:
            v = got[k]
            d = _close(v[r] if isinstance(v, torch.Tensor) and v.dim() else v, want[k])
            assert d <= TOL, (k, r, d)
        a, b = _tensors(batch.state_dict(r)), _tensors(task.state_dict())
        assert set(a) == set(b)
        for k in set(a) - {"/elapsed"}:  # seconds: the runner keeps a batched run's clock
            d = _close(a[k], b[k])
            assert d <= TOL, (k, r, d)
            worst = max(worst, d)
        assert batch.evaluate()[r]["test_mse"] == pytest.approx(task.evaluate()["test_mse"])
    assert worst <= TOL


def test_a_batch_of_one_equals_the_lone_run_over_iterations(cache: str) -> None:
    spec = _specs("dfiv", cache)[0]
    alone, batch = IVTask(spec), IVBatchTask([spec])
    for _ in range(3):
        got, want = batch.step(), alone.step()
        assert abs(float(got["outer_loss"][0]) - want["outer_loss"]) <= TOL


@pytest.mark.parametrize(
    "solver",
    [CG(maxiter=2), CG(maxiter=4, damping=0.05)],
    ids=["cg_safeguards", "cg_safeguards_damped"],
)
def test_safeguarded_aid_runs_are_their_lone_runs_over_iterations(
    solver: CG, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AID with CG's safeguards: over iterations the batch's own warm start is dropped, kept and
    given up on run by run, as each lone run's CG decides; every step's metrics (solver_gave_up,
    solver_gave_up_total, solver_iters, dual_norm, ...) and the final states are the lone runs'."""
    specs = _specs("aid", cache, {"solver": solver})
    alone, batch = [IVTask(s) for s in specs], IVBatchTask(specs)
    dropped: list[torch.Tensor] = []  # per solve: warm runs whose start was dropped

    def spy(matvec: Any, b: list[Tensor], x0: list[Tensor], warm: Tensor, **kw: Any) -> Any:
        if bool(warm.any()):
            Ax = matvec(list(x0))
            r0 = [bi - ai - kw["damping"] * xi for bi, ai, xi in zip(b, Ax, x0, strict=True)]
            dropped.append(warm & (run_norm(r0) >= run_norm(b)))
        return batched_cg(matvec, b, x0, warm, **kw)

    monkeypatch.setattr(batched_task, "batched_cg", spy)
    gave_up = []
    for it in range(4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SolverGaveUpWarning)
            got = batch.step()
        # one warning for the batch's solve when a run gave up, as the lone runs' warnings
        warned = [w for w in caught if issubclass(w.category, SolverGaveUpWarning)]
        assert len(warned) == int(bool(got["solver_gave_up"].any()))
        for r, task in enumerate(alone):
            with _quiet():
                want = task.step()
            assert set(want) - MACHINE == set(got)
            for k in set(got):
                d = _close(got[k][r], want[k])
                assert d <= TOL, (it, k, r, d)
            gave_up.append(want["solver_gave_up"])
            assert want["solver_iters"] == solver.maxiter
    for r, task in enumerate(alone):
        a, b = _tensors(batch.state_dict(r)), _tensors(task.state_dict())
        assert set(a) == set(b)
        for k in set(a) - {"/elapsed"}:
            assert _close(a[k], b[k]) <= TOL, (k, r)
    # the safeguards acted, differently per run: warm starts dropped and kept, solves given up
    # and not
    drops = torch.stack(dropped)
    totals = [batch.state_dict(r)["solver_gave_up_total"] for r in range(len(specs))]
    assert sum(totals) == sum(gave_up)
    assert bool(drops.any()) and not bool(drops.all())
    assert 0 < sum(gave_up) < len(gave_up)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverGaveUpWarning)
        yield


def test_a_diverged_run_does_not_touch_the_others(cache: str) -> None:
    specs = _specs("funcid_linear", cache)
    batch, ref = IVBatchTask(specs), IVBatchTask(specs)
    with torch.no_grad():
        batch.psi.params[0][1].fill_(float("nan"))
    got, want = batch.step(), ref.step()
    assert not math.isfinite(float(got["grad_norm"][1]))
    for r in (0, 2):
        assert float(got["grad_norm"][r]) == float(want["grad_norm"][r])


def test_stacked_net_forward_and_adam_match_torch() -> None:
    torch.manual_seed(0)
    nets = [dsprites_treatment_net(6, (5, 4, 3), 2).double() for _ in range(2)]
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    stacked = StackedNet(nets)
    opts = [torch.optim.Adam(n.parameters(), lr=1e-2, weight_decay=0.1) for n in nets]
    adam = StackedAdam(
        stacked.params, opts, [stacked.origin(r) for r in range(2)], stacked.transposed
    )
    out = stacked(x, training=True)
    grads = torch.autograd.grad(out.square().sum(), stacked.params)
    adam.step(grads)
    for r, net in enumerate(nets):
        y = net(x[r])  # train mode: one power iteration, as the stacked forward
        assert torch.allclose(out[r], y, atol=1e-12, rtol=0)
        y.square().sum().backward()
        opts[r].step()
        for p, q, tr in zip(stacked.params, stacked.origin(r), stacked.transposed, strict=True):
            assert torch.allclose(p[r].T if tr else p[r], q, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("aid", {"formulation": "functional"}),
        ("itd", {"formulation": "functional"}),
        ("funcid_linear", {"inner_solver": "gradient"}),
    ],
)
def test_variants_without_a_batched_step_are_refused_by_name(
    kind: str, fields: dict[str, object], cache: str
) -> None:
    spec = dataclasses.replace(_specs("dfiv", cache)[0], method=f"my_{kind}")
    spec.method_config = paper_method(kind, **fields)
    with pytest.raises(ConfigError, match=f"my_{kind}"):
        batch_key(spec)
    with pytest.raises(ValueError, match="cannot be batched"):
        IVBatchTask([spec])


def test_a_batched_sweep_writes_the_runs_an_unbatched_sweep_writes(
    cache: str, tmp_path: Path
) -> None:
    config = {
        "experiment": "iv_dsprites",
        "name": "tiny_iv_batch",
        "seeds": [1, 2],
        "iterations": 4,
        "eval_every": 2,
        "checkpoint_every": 2,
        "threads": 1,
        "dtype": "float64",
        "problem": {**TINY, "cache_dir": cache},
        "methods": {"dfiv": {"kind": "dfiv", "inner_steps": 2}},
    }
    batched = load_config_dict({**config, "batch_seeds": True}, src="test")
    plain = load_config_dict(config, src="test")
    assert [len(j) for j in plan_jobs(plan_runs(batched))] == [2]
    run_sweep(plan_runs(batched), tmp_path / "b", progress=False)
    run_sweep(plan_runs(plain), tmp_path / "u", progress=False)
    for seed in (1, 2):
        run = f"dfiv/seed_{seed}"
        files = {p.name for p in (tmp_path / "b" / run).iterdir()}
        assert {"config.yaml", "metrics.jsonl", "summary.json"} <= files
        got = json.loads((tmp_path / "b" / run / "summary.json").read_text())
        want = json.loads((tmp_path / "u" / run / "summary.json").read_text())
        assert got["status"] == want["status"] == "finished" and got["batched_runs"] == 2
        assert got["final"]["test_mse"] == pytest.approx(want["final"]["test_mse"], rel=1e-9)
    refused = load_config_dict(
        {**config, "batch_seeds": True, "methods": {"my_aid": {"kind": "aid"}}}, src="test"
    )
    with pytest.raises(ConfigError, match="my_aid"):
        plan_jobs(plan_runs(refused))
