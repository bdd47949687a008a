"""CartPole-v1 in torch, vectorised over N independent environments.

Reproduces gymnasium's ``CartPoleEnv`` (Euler integration, its constants and thresholds) with a
``TimeLimit`` of 500 steps, step for step: the state is float64 as in gymnasium, observations are
float32. On the CPU the arithmetic is done in gymnasium's order and sin/cos are numpy's, so the
states are bit-identical to gymnasium's for the same initial states and actions (torch's own
sin/cos differ from numpy's by an ulp for a few arguments in a thousand). On other devices
sin/cos are torch's and the states agree to rounding.

Each environment draws its initial states from its own ``torch.Generator``, so its trajectory
depends on its seed and its actions only, never on the other environments of the batch.
gymnasium is not imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class VecStep:
    """The outcome of one step of N environments.

    Attributes:
        obs: ``[N, 4]`` the next observations s′ of the transitions (before any reset).
        reward: ``[N]`` r (1 on every step, the terminating one included).
        terminated: ``[N]`` bool, s′ is terminal (the pole fell, the cart left the track).
        truncated: ``[N]`` bool, the episode reached the time limit (bootstrap from s′ as usual).
    """

    obs: Tensor
    reward: Tensor
    terminated: Tensor
    truncated: Tensor

    @property
    def done(self) -> Tensor:
        """``[N]`` bool, the episode is over (either way): reset these before stepping again."""
        return self.terminated | self.truncated


class TorchCartPole:
    """N CartPole-v1 environments stepped together as one batch of tensor operations.

    Dynamics (gymnasium's, Euler step τ = 0.02 with force F = ±10):
        temp = (F + m_p·l·θ̇²·sin θ)/(m_c + m_p),
        θ̈ = (g·sin θ − cos θ·temp)/(l·(4/3 − m_p·cos²θ/(m_c + m_p))),
        ẍ = temp − m_p·l·θ̈·cos θ/(m_c + m_p),
        (x, ẋ, θ, θ̇) ← (x + τẋ, ẋ + τẍ, θ + τθ̇, θ̇ + τθ̈);
    terminated when |x| > 2.4 or |θ| > 12°, truncated when the episode's step count reaches
    ``max_episode_steps``. :meth:`step` does not reset: the caller stores s′ and then calls
    ``reset(mask=step.done)``; stepping an environment that is done raises ``ValueError``.
    Initial states are uniform in [−0.05, 0.05]⁴, drawn from the environment's own generator.

    Args:
        num_envs: N.
        seeds: one seed per environment (default 0, …, N − 1); seed i seeds environment i's
            reset generator.
        max_episode_steps: time limit (None: no truncation).
        obs_dtype: dtype of the returned observations and rewards.
        device: where the state lives (the reset generators are on the CPU).
    """

    gravity = 9.8
    masscart = 1.0
    masspole = 0.1
    total_mass = masspole + masscart
    length = 0.5  # half the pole's length
    polemass_length = masspole * length
    force_mag = 10.0
    tau = 0.02
    theta_threshold_radians = 12 * 2 * math.pi / 360
    x_threshold = 2.4
    obs_dim = 4
    n_actions = 2

    def __init__(
        self,
        num_envs: int,
        seeds: Sequence[int] | None = None,
        max_episode_steps: int | None = 500,
        *,
        obs_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be ≥ 1, got {num_envs}")
        seeds = list(range(num_envs)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != num_envs:
            raise ValueError(f"got {len(seeds)} seeds for {num_envs} environments")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be ≥ 1 or None, got {max_episode_steps}")
        self.num_envs = num_envs
        self.seeds = seeds
        self.max_episode_steps = max_episode_steps
        self.obs_dtype = obs_dtype
        self.device = torch.device(device)
        self._generators = [torch.Generator().manual_seed(s) for s in seeds]
        self._state = torch.zeros(num_envs, 4, dtype=torch.float64, device=self.device)
        self._elapsed = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        # True where the episode is over (or never started) and a reset is due.
        self._needs_reset = torch.ones(num_envs, dtype=torch.bool, device=self.device)
        self._reward = torch.ones(num_envs, dtype=obs_dtype, device=self.device)
        kw: dict[str, Any] = {"dtype": torch.float64, "device": self.device}
        self._force_right = torch.tensor(self.force_mag, **kw)
        self._force_left = torch.tensor(-self.force_mag, **kw)
        self._thresholds = torch.tensor([self.x_threshold, self.theta_threshold_radians], **kw)

    # ------------------------------------------------------------------------------ stepping
    def reset(self, mask: Tensor | None = None) -> Tensor:
        """Start new episodes in all environments, or only where ``mask`` is True.

        Each reset environment draws its initial state uniformly in [−0.05, 0.05]⁴ from its own
        generator; its step counter restarts at 0. The others are left as they are.

        Args:
            mask: ``[N]`` bool (None: all).

        Returns:
            ``[N, 4]`` the current observations of all environments.
        """
        if mask is None:
            idx = list(range(self.num_envs))
        else:
            mask = torch.as_tensor(mask, dtype=torch.bool)
            if mask.shape != (self.num_envs,):
                raise ValueError(
                    f"reset mask has shape {tuple(mask.shape)}, need ({self.num_envs},)"
                )
            idx = mask.nonzero().flatten().tolist()
        if idx:
            fresh = torch.stack(
                [
                    torch.empty(4, dtype=torch.float64).uniform_(
                        -0.05, 0.05, generator=self._generators[i]
                    )
                    for i in idx
                ]
            )
            rows = torch.tensor(idx, device=self.device)
            self._state[rows] = fresh.to(self.device)
            self._elapsed[rows] = 0
            self._needs_reset[rows] = False
        return self.obs

    def step(self, actions: Tensor) -> VecStep:
        """Push every cart left (action 0) or right (action 1) for one time step τ.

        Args:
            actions: ``[N]`` integer or bool tensor of 0/1.

        Returns:
            :class:`VecStep` with s′, r, terminated and truncated of every environment.

        Raises:
            ValueError: an environment is done (or was never reset), or an action is not 0/1.
        """
        a = torch.as_tensor(actions, device=self.device)
        if a.shape != (self.num_envs,):
            raise ValueError(f"actions have shape {tuple(a.shape)}, need ({self.num_envs},)")
        if a.is_floating_point() or a.is_complex():
            raise ValueError(f"actions must be integers or bools, got {a.dtype}")
        right = a == 1
        bad = self._needs_reset
        if a.dtype != torch.bool:
            bad = bad | (~right & (a != 0))
        # One synchronising check per step; the diagnosis runs only when it fails.
        if bool(bad.any()):
            self._raise_invalid(a)

        s = self._state
        x_dot, theta_dot = s[:, 1], s[:, 3]
        force = torch.where(right, self._force_right, self._force_left)
        costheta, sintheta = _cos_sin(s[:, 2])
        # gymnasium's operations in gymnasium's order, so that the float64 results are identical.
        temp = (force + self.polemass_length * torch.square(theta_dot) * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * torch.square(costheta) / self.total_mass)
        )
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        # Euler: (x, ẋ, θ, θ̇) + τ·(ẋ, ẍ, θ̇, θ̈), elementwise as gymnasium's x + τ·ẋ etc.
        new = s + self.tau * torch.stack((x_dot, xacc, theta_dot, thetaacc), dim=1)
        self._state = new
        # |x| > 2.4 or |θ| > 12° (abs is exact, so this is gymnasium's four comparisons).
        terminated = (new[:, 0::2].abs() > self._thresholds).any(dim=1)
        self._elapsed += 1
        if self.max_episode_steps is None:
            truncated = torch.zeros_like(terminated)
        else:
            truncated = self._elapsed >= self.max_episode_steps
        self._needs_reset = terminated | truncated
        return VecStep(
            obs=new.to(self.obs_dtype),
            reward=self._reward.clone(),
            terminated=terminated,
            truncated=truncated,
        )

    def _raise_invalid(self, actions: Tensor) -> None:
        bad_actions = ((actions != 0) & (actions != 1)).nonzero().flatten().tolist()
        if bad_actions:
            raise ValueError(f"actions must be 0 or 1; environments {bad_actions} got other values")
        done = self._needs_reset.nonzero().flatten().tolist()
        raise ValueError(
            f"environments {done} are done (or were never reset): call reset(mask=...) on them "
            "before stepping again"
        )

    # ---------------------------------------------------------------------------------- state
    @property
    def obs(self) -> Tensor:
        """``[N, 4]`` the current observations (the state rounded to ``obs_dtype``)."""
        return self._state.to(self.obs_dtype)

    @property
    def state(self) -> Tensor:
        """``[N, 4]`` float64 (x, ẋ, θ, θ̇) of every environment (a copy)."""
        return self._state.clone()

    @property
    def elapsed(self) -> Tensor:
        """``[N]`` long, steps taken in each environment's current episode (a copy)."""
        return self._elapsed.clone()

    @property
    def needs_reset(self) -> Tensor:
        """``[N]`` bool, environments whose episode is over (or never started) (a copy)."""
        return self._needs_reset.clone()

    def set_state(
        self, state: Tensor, mask: Tensor | None = None, elapsed: Tensor | int = 0
    ) -> None:
        """Place environments (all, or where ``mask`` is True) in given states.

        They continue from there as running episodes with step counters ``elapsed`` (0: a new
        episode), as after ``env.unwrapped.state = state`` following a reset in gymnasium.

        Args:
            state: ``[N, 4]`` (x, ẋ, θ, θ̇), cast to float64; rows outside ``mask`` are ignored.
            mask: ``[N]`` bool (None: all).
            elapsed: the step counters of the placed environments, an int or an ``[N]`` tensor.
        """
        state = torch.as_tensor(state, dtype=torch.float64, device=self.device)
        if state.shape != (self.num_envs, 4):
            raise ValueError(f"state has shape {tuple(state.shape)}, need ({self.num_envs}, 4)")
        elapsed = torch.as_tensor(elapsed, dtype=torch.long, device=self.device)
        elapsed = elapsed.expand(self.num_envs)
        if mask is None:
            self._state = state.clone()
            self._elapsed = elapsed.clone()
            self._needs_reset = torch.zeros_like(self._needs_reset)
        else:
            mask = torch.as_tensor(mask, dtype=torch.bool, device=self.device)
            if mask.shape != (self.num_envs,):
                raise ValueError(f"mask has shape {tuple(mask.shape)}, need ({self.num_envs},)")
            self._state = torch.where(mask[:, None], state, self._state)
            self._elapsed = torch.where(mask, elapsed, self._elapsed)
            self._needs_reset = self._needs_reset & ~mask

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as tensors and plain values.

        Keys: ``num_envs``, ``seeds``, ``max_episode_steps``, ``state`` (float64 [N, 4]),
        ``elapsed`` ([N] long), ``needs_reset`` ([N] bool), ``generators`` ([N, L] uint8, the
        reset generators' states). Loads with ``torch.load(..., weights_only=True)``.
        """
        return {
            "num_envs": self.num_envs,
            "seeds": list(self.seeds),
            "max_episode_steps": self.max_episode_steps,
            "state": self._state.detach().cpu().clone(),
            "elapsed": self._elapsed.cpu().clone(),
            "needs_reset": self._needs_reset.cpu().clone(),
            "generators": torch.stack([g.get_state() for g in self._generators]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (into environments made with the same N and time limit)."""
        if int(state["num_envs"]) != self.num_envs:
            raise ValueError(
                f"state is for {state['num_envs']} environments, this batch has {self.num_envs}"
            )
        if state["max_episode_steps"] != self.max_episode_steps:
            raise ValueError(
                f"state has time limit {state['max_episode_steps']}, "
                f"these environments {self.max_episode_steps}"
            )
        self.seeds = [int(s) for s in state["seeds"]]
        self._state = state["state"].to(self.device, torch.float64).clone()
        self._elapsed = state["elapsed"].to(self.device, torch.long).clone()
        self._needs_reset = state["needs_reset"].to(self.device, torch.bool).clone()
        for g, g_state in zip(self._generators, state["generators"], strict=True):
            g.set_state(g_state.clone())


def _cos_sin(theta: Tensor) -> tuple[Tensor, Tensor]:
    """cos θ and sin θ: numpy's on the CPU (gymnasium's values; torch's can differ by an ulp)."""
    if theta.device.type == "cpu" and not theta.requires_grad:
        t = theta.numpy()
        return torch.from_numpy(np.cos(t)), torch.from_numpy(np.sin(t))
    return torch.cos(theta), torch.sin(theta)


__all__ = ["TorchCartPole", "VecStep"]
