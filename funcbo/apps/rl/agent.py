"""The environment loop of the model-based RL experiment (following OMD's CartPole agent).

Every call of :meth:`Agent.step` takes one environment step and, once ``init_steps`` random
steps are in the replay buffer, one update of the method (so a run's iterations are environment
steps). Behaviour policy: a uniformly random action with probability ε, otherwise a sample of
softmax(Q̄(s)/α) where Q̄ = ½(Q_1 + Q_2) is the mean of the double-Q heads of the online network
(OMD's code; ``act_with="target"`` uses the Polyak network). Evaluation runs ``eval_episodes``
episodes of the same softmax policy without ε on a separate environment; it is a pure function
of the networks, the seed and the step count, so it never perturbs training.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from typing import Any

import numpy as np
import torch
from torch import nn

from funcbo.apps.rl.config import RLBuildContext, RLMethodConfig, RLProblemConfig
from funcbo.apps.rl.env import GymEnv, obs_tensor
from funcbo.apps.rl.methods import Updater
from funcbo.apps.rl.networks import DoubleQ, DynamicsModel, QOfAction, ValueEnsemble
from funcbo.apps.rl.problem import SoftBellmanProblem
from funcbo.apps.rl.replay import ReplayBuffer

#: window (in steps) of the environment-steps-per-second metric
RATE_WINDOW = 200


class Agent:
    """One run of one method: environment, replay buffer, networks, update rule, RNGs.

    Args:
        problem: the shared protocol (:class:`RLProblemConfig`).
        method: the method (:class:`RLMethodConfig`).
        seed: seeds the networks' initialisation, the environment, the replay sampling and
            the behaviour policy (each its own stream).
        dtype: float32 or float64 for the networks and batches.
    """

    def __init__(
        self,
        problem: RLProblemConfig,
        method: RLMethodConfig,
        seed: int = 0,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.cfg = problem
        self.method = method
        self.seed = seed
        self.dtype = dtype
        self.env = GymEnv(problem.env_id, problem.max_episode_steps, seed=seed)
        self._eval_env: GymEnv | None = None
        obs_dim, n_actions = self.env.obs_dim, self.env.n_actions
        self.replay = ReplayBuffer(obs_dim, problem.buffer_capacity, seed=seed + 1)
        self.generator = torch.Generator().manual_seed(seed + 2)
        self.problem = SoftBellmanProblem(problem.gamma, problem.alpha, problem.target)

        # Every initialisation (networks, the adjoint network's copy) draws from the global
        # generator inside a forked RNG context: deterministic in the seed, invisible outside.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.q = DoubleQ(obs_dim, n_actions, problem.q_hidden).to(dtype)
            self.q_inner = QOfAction(self.q)
            self.target_q = copy.deepcopy(self.q)
            for p in self.target_q.parameters():
                p.requires_grad_(False)
            self.model: DynamicsModel | None = None
            self.values: ValueEnsemble | None = None
            if method.kind != "model_free":
                self.model = DynamicsModel(
                    obs_dim, n_actions, problem.model_hidden, predict_delta=problem.predict_delta
                ).to(dtype)
            if method.kind == "vep":
                self.values = ValueEnsemble(obs_dim, problem.vep_members, problem.q_hidden).to(
                    dtype
                )
            self.updater = self._build_updater()

        self.env_steps = 0
        self.updates = 0
        self.episodes = 0
        self.episode_return = 0.0
        self.last_episode_return = 0.0
        self.obs = self.env.reset()
        self.next_action = self.act(self.obs)
        self._times: deque[float] = deque(maxlen=RATE_WINDOW)

    # ----------------------------------------------------------------------------- building
    def _build_updater(self) -> Updater:
        context = RLBuildContext(
            self.cfg,
            self.problem,
            self.q,
            self.q_inner,
            self.target_q,
            model=self.model,
            values=self.values,
        )
        return self.method.build(context)

    # ----------------------------------------------------------------------------- acting
    def policy_logits(self, obs: np.ndarray) -> torch.Tensor:
        """Q̄(s)/α with Q̄ the mean of the heads of the acting network, shape ``[A]``."""
        net = self.q if self.cfg.act_with == "online" else self.target_q
        with torch.no_grad():
            q = net(obs_tensor(obs, self.dtype))  # [K, 1, A]
            return q.mean(0)[0] / self.cfg.alpha

    def _softmax_sample(self, obs: np.ndarray, gen: torch.Generator) -> int:
        probs = torch.softmax(self.policy_logits(obs).double(), dim=0)
        u = torch.rand((), generator=gen, dtype=torch.float64)
        return min(int((probs.cumsum(0) < u).sum()), probs.numel() - 1)

    def act(self, obs: np.ndarray) -> int:
        """The behaviour policy: random during the first ``init_steps`` steps, then ε-softmax."""
        n = self.env.n_actions
        g = self.generator
        explore = torch.rand((), generator=g).item() < self.cfg.eps
        if self.env_steps < self.cfg.init_steps or explore:
            return int(torch.randint(0, n, (), generator=g))
        return self._softmax_sample(obs, g)

    # ----------------------------------------------------------------------------- training
    def sample(self) -> dict[str, torch.Tensor]:
        """A replay batch of the configured size and dtype."""
        return self.replay.sample(self.cfg.batch_size, self.dtype)

    def step(self) -> dict[str, float]:
        """One environment step and, after the random phase, one update; returns metrics.

        The next action is chosen before the update, from the networks that acted so far (as
        OMD's training loop does): the update of step t shapes the behaviour from step t + 2.
        """
        t0 = time.perf_counter()
        action = self.next_action
        out = self.env.step(action)
        self.replay.add(self.obs, action, out.reward, out.obs, out.terminated)
        self.env_steps += 1
        self.episode_return += out.reward
        metrics: dict[str, float] = {}
        if out.done:
            self.last_episode_return = self.episode_return
            self.episodes += 1
            self.episode_return = 0.0
            self.obs = self.env.reset()
        else:
            self.obs = out.obs
        self.next_action = self.act(self.obs)
        if self.env_steps >= self.cfg.init_steps:
            metrics.update(self.updater.update(self.sample))
            self.updates += 1
        dt = time.perf_counter() - t0
        self._times.append(dt)
        metrics.update(
            {
                "env_steps": float(self.env_steps),
                "episodes": float(self.episodes),
                "train_return": float(self.last_episode_return),
                "step_time_s": dt,
                "steps_per_s": len(self._times) / max(sum(self._times), 1e-12),
            }
        )
        return metrics

    # --------------------------------------------------------------------------- evaluation
    def evaluate(self, episodes: int | None = None) -> dict[str, float]:
        """Mean and sd of the undiscounted return over ``eval_episodes`` episodes (no ε).

        The evaluation environment's first reset is seeded by (seed, env_steps) and the policy
        samples from a generator seeded the same way, so evaluating never changes training and a
        resumed run evaluates exactly as an uninterrupted one.
        """
        n = self.cfg.eval_episodes if episodes is None else episodes
        if self._eval_env is None:
            self._eval_env = GymEnv(self.cfg.env_id, self.cfg.max_episode_steps)
        env = self._eval_env
        key = (self.seed * 1_000_003 + self.env_steps * 7919 + 12345) % (2**31 - 1)
        gen = torch.Generator().manual_seed(key)
        returns = []
        obs = env.reset(seed=key)
        for _ in range(n):
            total, done = 0.0, False
            while not done:
                out = env.step(self._softmax_sample(obs, gen))
                total += out.reward
                done = out.done
                obs = out.obs
            returns.append(total)
            obs = env.reset()
        r = np.asarray(returns, dtype=np.float64)
        return {"return": float(r.mean()), "return_std": float(r.std())}

    # ------------------------------------------------------------------------ checkpointing
    def networks(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {"q": self.q, "target_q": self.target_q}
        if self.model is not None:
            nets["model"] = self.model
        if self.values is not None:
            nets["values"] = self.values
        return nets

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: tensors, numbers, strings, lists, dicts."""
        return {
            "kind": self.method.kind,
            "env_steps": self.env_steps,
            "updates": self.updates,
            "episodes": self.episodes,
            "episode_return": self.episode_return,
            "last_episode_return": self.last_episode_return,
            "obs": torch.from_numpy(np.asarray(self.obs, dtype=np.float32).copy()),
            "next_action": self.next_action,
            "env": self.env.state_dict(),
            "replay": self.replay.state_dict(),
            "generator": self.generator.get_state(),
            "networks": {k: m.state_dict() for k, m in self.networks().items()},
            "updater": self.updater.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into an agent built with the same configuration."""
        if state["kind"] != self.method.kind:
            raise ValueError(
                f"checkpoint is for method kind {state['kind']!r}, this agent runs "
                f"{self.method.kind!r}"
            )
        nets = self.networks()
        if set(state["networks"]) != set(nets):
            raise ValueError(
                f"checkpoint networks {sorted(state['networks'])} do not match {sorted(nets)}"
            )
        for k, m in nets.items():
            m.load_state_dict(state["networks"][k])
        self.updater.load_state_dict(state["updater"])
        self.env.load_state_dict(state["env"])
        self.replay.load_state_dict(state["replay"])
        self.generator.set_state(state["generator"])
        self.env_steps = int(state["env_steps"])
        self.updates = int(state["updates"])
        self.episodes = int(state["episodes"])
        self.episode_return = float(state["episode_return"])
        self.last_episode_return = float(state["last_episode_return"])
        self.obs = state["obs"].numpy().astype(np.float32)
        self.next_action = int(state["next_action"])


def train(
    problem: RLProblemConfig,
    method: RLMethodConfig,
    seed: int = 0,
    *,
    steps: int = 200_000,
    eval_every: int = 1000,
    log: Any = None,
) -> list[dict[str, float]]:
    """Run one agent outside the experiment layer; returns the evaluation records.

    Evaluates at step 0, every ``eval_every`` environment steps and at the end; ``log`` (a
    callable) receives every evaluation record.
    """
    agent = Agent(problem, method, seed)
    records = []
    for t in range(steps + 1):
        if t % eval_every == 0 or t == steps:
            rec = {"step": float(agent.env_steps), **agent.evaluate()}
            records.append(rec)
            if log is not None:
                log(rec)
        if t < steps:
            agent.step()
    return records


__all__ = ["Agent", "train"]
