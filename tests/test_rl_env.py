"""CartPole wrapper (termination vs truncation, exact save/restore) and the replay buffer."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from funcbo.apps.rl.agent import Agent
from funcbo.apps.rl.config import RLMethodConfig, RLProblemConfig
from funcbo.apps.rl.env import GymEnv
from funcbo.apps.rl.replay import ReplayBuffer


def roundtrip(state: dict) -> dict:
    """Save and load with the safe unpickler, as checkpoints are."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def balance(env: GymEnv) -> int:
    """A linear controller that keeps the pole up (to reach the time limit)."""
    x, xd, th, thd = env.env.unwrapped.state
    return int(th + 0.3 * thd + 0.01 * x + 0.1 * xd > 0)


def test_import_funcbo_does_not_import_gymnasium():
    code = (
        "import sys, funcbo, funcbo.apps.rl, funcbo.apps.rl.experiment; "
        "assert 'gymnasium' not in sys.modules, 'gymnasium imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_time_limit_of_cartpole_v1_is_truncation_not_termination():
    env = GymEnv(seed=3)
    assert env.max_episode_steps == 500
    env.reset()
    steps = 0
    while True:
        out = env.step(balance(env))
        steps += 1
        if out.done:
            break
    assert steps == 500, f"the controller should reach the time limit, stopped at {steps}"
    assert out.truncated and not out.terminated
    assert out.not_done == 1.0  # truncation keeps the bootstrap


def test_termination_drops_the_bootstrap():
    env = GymEnv(seed=0)
    env.reset()
    for _ in range(100):
        out = env.step(0)  # always push left: the pole falls within a few dozen steps
        if out.done:
            break
    assert out.terminated and not out.truncated
    assert out.not_done == 0.0


def test_agent_stores_truncated_transitions_with_bootstrap():
    # a 5-step limit: every episode is truncated unless the pole falls first
    prob = RLProblemConfig(max_episode_steps=5, init_steps=100, batch_size=8)
    agent = Agent(prob, RLMethodConfig(kind="model_free"), seed=0)
    for _ in range(40):
        agent.step()
    buf = agent.replay
    n = len(buf)
    # episodes of ≤ 5 steps; every stored transition is either mid-episode or truncated
    # (bootstrap kept) or a real termination (bootstrap dropped)
    assert agent.episodes >= 40 // 5
    assert torch.all(buf.not_done[:n] == 1.0), "a 5-step CartPole episode cannot terminate"


def test_env_state_roundtrip_continues_the_same_trajectory():
    env = GymEnv(seed=11, max_episode_steps=30)
    env.reset()
    rng = np.random.default_rng(0)
    for _ in range(17):
        if env.step(int(rng.integers(2))).done:
            env.reset()
    state = roundtrip(env.state_dict())
    actions = rng.integers(2, size=80)

    def rollout(e: GymEnv) -> list:
        trace = [e.obs.copy()]
        for a in actions:
            out = e.step(int(a))
            trace.append((out.obs.copy(), out.reward, out.terminated, out.truncated))
            if out.done:  # resets draw from the environment's generator
                trace.append(e.reset().copy())
        return trace

    ref = rollout(env)
    other = GymEnv(seed=999, max_episode_steps=30)
    other.reset()
    other.load_state_dict(state)
    got = rollout(other)
    assert len(ref) == len(got)
    for a, b in zip(ref, got, strict=True):
        if isinstance(a, tuple):
            assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
        else:
            assert np.array_equal(a, b)


def test_env_state_rejects_another_environment():
    state = GymEnv(seed=0).state_dict()
    state["env_id"] = "Acrobot-v1"
    with pytest.raises(ValueError, match="Acrobot"):
        GymEnv(seed=0).load_state_dict(state)


def fill(buf: ReplayBuffer, n: int, seed: int = 0) -> None:
    g = np.random.default_rng(seed)
    for _ in range(n):
        buf.add(g.normal(size=4), int(g.integers(2)), 1.0, g.normal(size=4), bool(g.random() < 0.1))


def test_replay_sampling_shapes_and_masks():
    buf = ReplayBuffer(4, capacity=50, seed=0)
    fill(buf, 30)
    b = buf.sample(16, torch.float64)
    assert b["obs"].shape == (16, 4) and b["obs"].dtype == torch.float64
    assert b["action"].dtype == torch.long and b["action"].shape == (16,)
    assert b["reward"].shape == (16, 1) and b["not_done"].shape == (16, 1)
    assert set(b["not_done"].flatten().tolist()) <= {0.0, 1.0}


def test_replay_wraps_around_at_capacity():
    buf = ReplayBuffer(4, capacity=10, seed=0)
    fill(buf, 25)
    assert len(buf) == 10 and buf.ptr == 5


def test_replay_state_roundtrip_saves_filled_part_and_sampler():
    buf = ReplayBuffer(4, capacity=1000, seed=3)
    fill(buf, 40)
    buf.sample(8)
    state = roundtrip(buf.state_dict())
    assert state["obs"].shape == (40, 4)  # only the filled part
    other = ReplayBuffer(4, capacity=1000, seed=123)
    other.load_state_dict(state)
    for _ in range(3):
        a, b = buf.sample(8), other.sample(8)
        for k in a:
            assert torch.equal(a[k], b[k])
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(4, capacity=10).load_state_dict(state)


def test_agent_stores_terminations_without_bootstrap():
    prob = RLProblemConfig(init_steps=1000, batch_size=8)
    agent = Agent(prob, RLMethodConfig(kind="model_free"), seed=1)
    for _ in range(200):
        agent.step()
    n = len(agent.replay)
    # a random policy never reaches the 500-step limit: every episode ends by termination
    assert agent.episodes > 0
    assert int((agent.replay.not_done[:n] == 0).sum()) == agent.episodes


@pytest.mark.parametrize("stored", [300, 5000])
def test_replay_batches_are_distinct_transitions(stored):
    buf = ReplayBuffer(4, capacity=10_000, seed=0)
    buf.obs[:stored, 0] = torch.arange(stored, dtype=torch.float32)  # a transition's id
    buf.size = stored
    seen = torch.zeros(stored)
    for _ in range(20):
        ids = buf.sample(256)["obs"][:, 0].long()
        assert ids.unique().numel() == 256  # without replacement, as OMD's buffer
        seen[ids] += 1
    # every stored transition is equally likely: inclusion counts have mean 20·256/stored
    assert float(seen.mean()) == pytest.approx(20 * 256 / stored)
    assert int((seen > 0).sum()) > 0.6 * stored * (1 - (1 - 256 / stored) ** 20)
