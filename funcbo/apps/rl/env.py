"""A gymnasium CartPole environment with explicit termination/truncation and a saveable state.

A transition's bootstrap mask is 1 − terminated: reaching the time limit (truncation, 500 steps
for CartPole-v1) ends the episode but is not a terminal state of the MDP, so its target still
bootstraps, y = r + γ·V(s′). gymnasium is imported inside the functions that need it, so that
``import funcbo`` works with torch and numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


def _gym() -> Any:
    try:
        import gymnasium
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError(
            "the RL application needs gymnasium: pip install 'funcbo[experiments]' "
            "(or pip install gymnasium)"
        ) from err
    return gymnasium


@dataclass
class Step:
    """The outcome of one environment step.

    Attributes:
        obs: the next observation s′ (float32 array).
        reward: r.
        terminated: s′ is terminal (the pole fell, the cart left the track): no bootstrap.
        truncated: the episode was cut by the time limit: bootstrap from s′ as usual.
    """

    obs: np.ndarray
    reward: float
    terminated: bool
    truncated: bool

    @property
    def done(self) -> bool:
        """The episode is over (either way): reset before stepping again."""
        return self.terminated or self.truncated

    @property
    def not_done(self) -> float:
        """The bootstrap mask 1 − terminated (truncation keeps the bootstrap)."""
        return 0.0 if self.terminated else 1.0


class GymEnv:
    """A discrete-action gymnasium environment (CartPole-v1 by default).

    ``reset``/``step`` return observations as float32 numpy arrays; ``step`` reports
    ``terminated`` and ``truncated`` separately. :meth:`state_dict` captures everything needed to
    continue an episode exactly (the simulator state, the time limit's step counter, the
    environment's random generator and the current observation) as tensors and numbers.

    Args:
        env_id: gymnasium id (the state save/restore is written for classic-control
            environments whose whole simulator state is ``unwrapped.state``, such as CartPole).
        max_episode_steps: time limit (None: the environment's registered default, 500).
        seed: seed of the first reset (later resets continue the environment's generator).
    """

    def __init__(
        self, env_id: str = "CartPole-v1", max_episode_steps: int | None = None, seed: int = 0
    ) -> None:
        gym = _gym()
        kwargs: dict[str, Any] = {"disable_env_checker": True}
        if max_episode_steps is not None:
            if max_episode_steps < 1:
                raise ValueError(f"max_episode_steps must be ≥ 1, got {max_episode_steps}")
            kwargs["max_episode_steps"] = max_episode_steps
        self.env_id = env_id
        self.env = gym.make(env_id, **kwargs)
        space = self.env.action_space
        if not hasattr(space, "n"):
            raise ValueError(f"{env_id} has a non-discrete action space {space}; need Discrete")
        self.n_actions = int(space.n)
        self.obs_dim = int(np.prod(self.env.observation_space.shape))
        self._time_limit = _find_wrapper(self.env, "TimeLimit")
        self.max_episode_steps = (
            int(self._time_limit._max_episode_steps) if self._time_limit is not None else None
        )
        self.seed = seed
        self._seeded = False
        self.obs: np.ndarray | None = None

    # ------------------------------------------------------------------------------ stepping
    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode (the first reset uses the constructor's seed, unless given one)."""
        if seed is None and not self._seeded:
            seed = self.seed
        obs, _ = self.env.reset(seed=seed)
        self._seeded = True
        self.obs = np.asarray(obs, dtype=np.float32)
        return self.obs

    def step(self, action: int) -> Step:
        """Apply ``action``; the caller resets when ``Step.done``."""
        if self.obs is None:
            raise RuntimeError("call reset() before step()")
        obs, reward, terminated, truncated, _ = self.env.step(int(action))
        self.obs = np.asarray(obs, dtype=np.float32)
        return Step(self.obs, float(reward), bool(terminated), bool(truncated))

    @property
    def elapsed_steps(self) -> int:
        """Steps taken in the current episode (the time limit's counter)."""
        return int(self._time_limit._elapsed_steps or 0) if self._time_limit is not None else 0

    # --------------------------------------------------------------------------- save/restore
    def state_dict(self) -> dict[str, Any]:
        """The environment's full state as tensors, numbers and strings.

        Keys: ``sim`` (the unwrapped simulator state, float64), ``steps_beyond_terminated``
        (−1 for None), ``elapsed_steps`` (time limit counter), ``rng`` (the numpy bit generator
        state), ``obs`` (current observation, or an empty tensor before the first reset),
        ``seeded``.
        """
        u = self.env.unwrapped
        sim = getattr(u, "state", None)
        sbt = getattr(u, "steps_beyond_terminated", None)
        bg = u.np_random.bit_generator.state
        return {
            "env_id": self.env_id,
            "sim": torch.empty(0, dtype=torch.float64)
            if sim is None
            else torch.as_tensor(np.asarray(sim, dtype=np.float64)).clone(),
            "steps_beyond_terminated": -1 if sbt is None else int(sbt),
            "elapsed_steps": self.elapsed_steps,
            "rng": _bitgen_to_plain(bg),
            "obs": torch.empty(0)
            if self.obs is None
            else torch.as_tensor(self.obs.astype(np.float32)).clone(),
            "seeded": bool(self._seeded),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (into an environment made with the same id and limit)."""
        if state["env_id"] != self.env_id:
            raise ValueError(
                f"environment state is for {state['env_id']!r}, this environment is {self.env_id!r}"
            )
        # A reset initialises the wrappers (order enforcement, time limit); everything it
        # changes is overwritten below.
        self.env.reset(seed=0)
        u = self.env.unwrapped
        sim = state["sim"]
        u.state = None if sim.numel() == 0 else sim.detach().cpu().numpy().astype(np.float64)
        if hasattr(u, "steps_beyond_terminated"):
            sbt = int(state["steps_beyond_terminated"])
            u.steps_beyond_terminated = None if sbt < 0 else sbt
        if self._time_limit is not None:
            self._time_limit._elapsed_steps = int(state["elapsed_steps"])
        u.np_random.bit_generator.state = _plain_to_bitgen(state["rng"])
        obs = state["obs"]
        self.obs = None if obs.numel() == 0 else obs.detach().cpu().numpy().astype(np.float32)
        self._seeded = bool(state["seeded"])

    def close(self) -> None:
        self.env.close()


def obs_tensor(obs: np.ndarray, dtype: torch.dtype = torch.float32) -> Tensor:
    """An observation as a ``[1, obs_dim]`` tensor."""
    return torch.from_numpy(np.asarray(obs, dtype=np.float32)).to(dtype).reshape(1, -1)


def _find_wrapper(env: Any, name: str) -> Any:
    e = env
    while e is not None:
        if type(e).__name__ == name:
            return e
        e = getattr(e, "env", None)
    return None


def _bitgen_to_plain(state: dict[str, Any]) -> dict[str, Any]:
    """numpy bit-generator state → nested dict of strings and ints (loads with weights_only)."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _bitgen_to_plain(v)
        elif isinstance(v, np.ndarray):
            out[k] = torch.as_tensor(v).clone()
        elif isinstance(v, (int, np.integer)):
            # 128-bit PCG64 words: kept as decimal strings so that any reader can load them.
            out[k] = str(int(v))
        else:
            out[k] = v
    return out


def _plain_to_bitgen(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _plain_to_bitgen(v)
        elif isinstance(v, Tensor):
            out[k] = v.numpy()
        elif isinstance(v, str) and k != "bit_generator":
            out[k] = int(v)
        else:
            out[k] = v
    return out


__all__ = ["GymEnv", "Step", "obs_tensor"]
