"""TorchCartPole: gymnasium's CartPole-v1 step for step, independent seeds, exact checkpoints."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from funcbo.apps.rl.vec_env import TorchCartPole, VecStep


def roundtrip(state: dict) -> dict:
    """Save and load with the safe unpickler, as checkpoints are."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_matches_gymnasium_step_for_step():
    """8 envs × 1250 steps: same observations, rewards, terminations and truncations."""
    gym = pytest.importorskip("gymnasium")
    n, steps = 8, 1250
    rng = np.random.default_rng(0)
    envs = [gym.make("CartPole-v1") for _ in range(n)]
    vec = TorchCartPole(n)
    fresh = rng.uniform(-0.05, 0.05, size=(n, 4))
    for i, env in enumerate(envs):
        env.reset(seed=i)
        env.unwrapped.state = fresh[i].copy()
    vec.set_state(torch.from_numpy(fresh))
    obs = np.stack([np.asarray(env.unwrapped.state, dtype=np.float32) for env in envs])
    # Envs 0 and 1 balance the pole (their episodes reach the 500-step limit), the others act
    # at random (their episodes end by termination after a few dozen steps).
    controlled = np.arange(n) < 2
    counts = {"terminated": 0, "truncated": 0}
    for _ in range(steps):
        balance = (obs[:, 2] + obs[:, 3] > 0).astype(np.int64)
        actions = np.where(controlled, balance, rng.integers(0, 2, size=n))
        out = [env.step(int(a)) for env, a in zip(envs, actions, strict=True)]
        step = vec.step(torch.from_numpy(actions))
        g_obs = np.stack([o[0] for o in out])
        g_reward = np.array([o[1] for o in out])
        g_term = np.array([o[2] for o in out])
        g_trunc = np.array([o[3] for o in out])
        assert step.obs.dtype == torch.float32
        np.testing.assert_allclose(step.obs.numpy(), g_obs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(
            vec.state.numpy(), np.stack([env.unwrapped.state for env in envs]), rtol=0, atol=1e-6
        )
        np.testing.assert_array_equal(step.reward.numpy(), g_reward)
        np.testing.assert_array_equal(step.terminated.numpy(), g_term)
        np.testing.assert_array_equal(step.truncated.numpy(), g_trunc)
        counts["terminated"] += int(g_term.sum())
        counts["truncated"] += int(g_trunc.sum())
        obs = g_obs
        done = step.done.numpy() | g_term | g_trunc
        if done.any():
            fresh = rng.uniform(-0.05, 0.05, size=(n, 4))
            for i in np.flatnonzero(done):
                envs[i].reset()
                envs[i].unwrapped.state = fresh[i].copy()
                obs[i] = fresh[i].astype(np.float32)
            vec.set_state(torch.from_numpy(fresh), mask=torch.from_numpy(done))
            assert (vec.elapsed[torch.from_numpy(done)] == 0).all()
    assert counts["truncated"] >= 2  # the time limit was reached (and matched)
    assert counts["terminated"] >= 100


def _rollout(env: TorchCartPole, index: int, seed: int, steps: int) -> list[torch.Tensor]:
    """Observations of env ``index`` under actions drawn from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed + 1000)
    others = torch.Generator().manual_seed(12345)
    trajectory = [env.reset()[index].clone()]
    for _ in range(steps):
        actions = torch.randint(0, 2, (env.num_envs,), generator=others)
        actions[index] = torch.randint(0, 2, (1,), generator=g)
        step = env.step(actions)
        trajectory.append(step.obs[index].clone())
        obs = env.reset(mask=step.done)
        trajectory.append(obs[index].clone())
    return trajectory


def test_env_trajectory_does_not_depend_on_the_batch():
    seeds = [3, 7, 11, 0, 42]
    for i, seed in enumerate(seeds):
        alone = _rollout(TorchCartPole(1, seeds=[seed]), 0, seed, 300)
        batched = _rollout(TorchCartPole(5, seeds=seeds), i, seed, 300)
        assert all(torch.equal(a, b) for a, b in zip(alone, batched, strict=True))
    # Different seeds give different initial states.
    first = TorchCartPole(5, seeds=seeds).reset()
    assert len({tuple(row.tolist()) for row in first}) == 5
    assert first.abs().max() <= 0.05


def test_state_dict_round_trip_continues_exactly():
    def run(env: TorchCartPole, g: torch.Generator, steps: int) -> list[VecStep]:
        out = []
        for _ in range(steps):
            out.append(env.step(torch.randint(0, 2, (env.num_envs,), generator=g)))
            env.reset(mask=out[-1].done)
        return out

    env = TorchCartPole(6, seeds=range(10, 16), max_episode_steps=20)
    env.reset()
    g = torch.Generator().manual_seed(0)
    run(env, g, 37)
    saved, g_state = roundtrip(env.state_dict()), g.get_state()
    expected = run(env, g, 60)

    restored = TorchCartPole(6, seeds=range(10, 16), max_episode_steps=20)
    restored.load_state_dict(saved)
    g.set_state(g_state)
    resumed = run(restored, g, 60)
    for a, b in zip(expected, resumed, strict=True):
        assert torch.equal(a.obs, b.obs)
        assert torch.equal(a.terminated, b.terminated)
        assert torch.equal(a.truncated, b.truncated)
    assert torch.equal(env.state, restored.state)
    assert torch.equal(env.elapsed, restored.elapsed)
    assert any(s.truncated.any() for s in expected)  # resets after the limit were replayed too
    with pytest.raises(ValueError, match="environments"):
        TorchCartPole(5).load_state_dict(saved)
    with pytest.raises(ValueError, match="time limit"):
        TorchCartPole(6, max_episode_steps=500).load_state_dict(saved)


def test_stepping_a_done_env_raises():
    env = TorchCartPole(4)
    with pytest.raises(ValueError, match=r"\[0, 1, 2, 3\]"):  # never reset
        env.step(torch.zeros(4, dtype=torch.long))
    env.reset()
    state = env.state
    state[2] = torch.tensor([2.39, 10.0, 0.0, 0.0], dtype=torch.float64)  # leaves the track
    env.set_state(state)
    step = env.step(torch.ones(4, dtype=torch.long))
    assert step.terminated.tolist() == [False, False, True, False]
    assert step.reward.tolist() == [1.0] * 4  # the terminating step is rewarded too
    with pytest.raises(ValueError, match=r"environments \[2\] are done"):
        env.step(torch.ones(4, dtype=torch.long))
    env.reset(mask=step.done)
    with pytest.raises(ValueError, match=r"\[1\] got other values"):
        env.step(torch.tensor([0, 2, 1, 0]))
    env.step(torch.tensor([True, False, True, False]))  # bool actions are accepted


def test_time_limit_and_options():
    env = TorchCartPole(3, max_episode_steps=5, obs_dtype=torch.float64)
    obs = env.reset()
    assert obs.dtype == torch.float64 and torch.equal(obs, env.state)
    for t in range(1, 6):
        step = env.step(torch.tensor([0, 1, 0]))
        assert step.truncated.tolist() == [t == 5] * 3
        assert env.elapsed.tolist() == [t] * 3
    unlimited = TorchCartPole(2, max_episode_steps=None)
    unlimited.set_state(torch.zeros(2, 4, dtype=torch.float64))
    for _ in range(600):
        step = unlimited.step(torch.tensor([0, 1]))
        assert not step.truncated.any()
        unlimited.set_state(torch.zeros(2, 4, dtype=torch.float64), elapsed=unlimited.elapsed)
    assert unlimited.elapsed.tolist() == [600, 600]
    with pytest.raises(ValueError, match="seeds"):
        TorchCartPole(3, seeds=[1, 2])
