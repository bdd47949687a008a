"""The RL loop: a short run of every method, and exact resumption of an RLTask."""

from __future__ import annotations

import io
import math

import pytest
import torch

pytest.importorskip("gymnasium")

from funcbo.apps.rl.config import BILEVEL_KINDS, RL_KINDS, RLMethodConfig, RLProblemConfig
from funcbo.apps.rl.experiment import SPEC
from funcbo.apps.rl.task import RLTask
from funcbo.experiments.task import RunSpec, get_experiment

SMALL = RLProblemConfig(init_steps=50, batch_size=32, eval_episodes=2, buffer_capacity=1000)
TIMING = {"step_time_s", "steps_per_s"}  # wall-clock metrics: not reproducible


def spec(kind: str, seed: int = 0, iterations: int = 300, problem=SMALL) -> RunSpec:
    return RunSpec(
        experiment="rl_cartpole",
        method=kind,
        method_config=RLMethodConfig(kind=kind),
        problem=problem,
        seed=seed,
        iterations=iterations,
    )


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", RL_KINDS)
def test_short_run_of_every_method_gives_finite_metrics(kind):
    task = RLTask(spec(kind))
    assert task.iterations == 300
    metrics = {}
    for _ in range(task.iterations):
        metrics = task.step()
    assert metrics["env_steps"] == 300
    assert "q_loss" in metrics
    if kind in BILEVEL_KINDS:
        assert {"outer_loss", "grad_norm"} <= set(metrics)
    if kind in ("mle", "vep"):
        assert "model_loss" in metrics
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    ev = task.evaluate()
    assert set(ev) == {"return", "return_std"} and 1.0 <= ev["return"] <= 500.0


@pytest.mark.parametrize("kind", ["funcid_solution", "funcid_network", "funcid_reference"])
def test_model_learns_from_the_hypergradient(kind):
    task = RLTask(spec(kind, iterations=120))
    model = task.agent.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(task.iterations):
        task.step()
    moved = {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}
    if kind == "funcid_reference":
        # the authors' backward pass: only the reward head gets a hypergradient
        assert all(v for n, v in moved.items() if n.startswith("reward"))
        assert not any(v for n, v in moved.items() if n.startswith("next_state"))
    else:
        assert all(moved.values()), "every parameter of both model heads should be updated"


def test_evaluation_does_not_perturb_training():
    a, b = RLTask(spec("omd", iterations=80)), RLTask(spec("omd", iterations=80))
    for t in range(80):
        ma, mb = a.step(), b.step()
        if t % 20 == 0:
            a.evaluate()
    assert {k: v for k, v in ma.items() if k not in TIMING} == {
        k: v for k, v in mb.items() if k not in TIMING
    }
    assert a.evaluate() == b.evaluate()


@pytest.mark.parametrize(
    "kind", ["funcid_network", "funcid_solution", "omd_cg", "vep", "model_free"]
)
def test_task_state_roundtrip_continues_exactly(kind):
    k, m = 70, 40  # save after the random phase (50 steps), mid-episode
    ref = RLTask(spec(kind, seed=3))
    for _ in range(k):
        ref.step()
    state = roundtrip(ref.state_dict())
    resumed = RLTask(spec(kind, seed=3))
    resumed.load_state_dict(state)
    for _ in range(m):
        a, b = ref.step(), resumed.step()
        assert {n: v for n, v in a.items() if n not in TIMING} == {
            n: v for n, v in b.items() if n not in TIMING
        }
    for name, net in ref.agent.networks().items():
        other = resumed.agent.networks()[name]
        for p, q in zip(net.state_dict().values(), other.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
    assert ref.evaluate() == resumed.evaluate()


def test_state_of_another_method_is_rejected():
    state = RLTask(spec("mle")).state_dict()
    with pytest.raises(ValueError, match="mle"):
        RLTask(spec("vep")).load_state_dict(state)


def test_experiment_is_registered():
    exp = get_experiment("rl_cartpole")
    assert exp is SPEC and exp.metric == "return" and exp.metric_mode == "max"
    assert exp.problem_config is RLProblemConfig and exp.method_config is RLMethodConfig


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="kind"):
        RLMethodConfig(kind="ppo")
    with pytest.raises(ValueError, match="tau"):
        RLProblemConfig(tau=0.0)
    with pytest.raises(ValueError, match="device"):
        RLTask(RunSpec("rl_cartpole", "x", RLMethodConfig(), SMALL, 0, 10, device="cuda"))


def test_float64_runs():
    s = spec("funcid_network", iterations=80)
    s.dtype = "float64"
    task = RLTask(s)
    for _ in range(task.iterations):
        metrics = task.step()
    assert all(p.dtype == torch.float64 for p in task.agent.model.parameters())
    assert math.isfinite(metrics["outer_loss"])


def test_train_helper_evaluates_on_schedule():
    from funcbo.apps.rl.agent import train

    records = train(SMALL, RLMethodConfig(kind="model_free"), steps=60, eval_every=30)
    assert [r["step"] for r in records] == [0.0, 30.0, 60.0]
