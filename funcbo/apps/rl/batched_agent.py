"""R runs of one RL method in one process: the environment loop of :mod:`.agent`, batched.

Every run has its own CartPole (a :class:`~funcbo.apps.rl.vec_env.TorchCartPole` of R
environments), its own replay storage (one ``[R, capacity, ...]`` buffer written in lockstep),
its own generators (replay sampling, behaviour policy, evaluation) and its own networks, stacked
by :class:`~funcbo.apps.rl.batched.BatchedUpdater`. A run's trajectory therefore depends on its
seed and configuration only, never on which other runs share its batch. It is *not* the
trajectory of the unbatched :class:`~funcbo.apps.rl.agent.Agent` with the same seed: the
environment is torch's CartPole (gymnasium's dynamics, its own reset generator) and the random
draws come from other streams; the networks start from the same initialisation.

The loop is :class:`~funcbo.apps.rl.agent.Agent`'s: random actions for ``init_steps`` steps,
then ε-softmax(Q̄/α) with the action chosen before the update; evaluation runs ``eval_episodes``
episodes of every run at once on fresh environments seeded by (seed, step), without ε.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from funcbo.adjoints import reset_parameters
from funcbo.apps.rl.batched import BatchedUpdater, check_batchable
from funcbo.apps.rl.config import FuncIDNetworkRL, RLMethodConfig, RLProblemConfig
from funcbo.apps.rl.networks import DoubleQ, DynamicsModel, ValueEnsemble
from funcbo.apps.rl.replay import distinct_indices
from funcbo.apps.rl.vec_env import TorchCartPole
from funcbo.memory import set_malloc_thresholds

#: window (in steps) of the environment-steps-per-second metric
RATE_WINDOW = 200
OBS_DIM, N_ACTIONS = TorchCartPole.obs_dim, TorchCartPole.n_actions


def initial_networks(
    problem: RLProblemConfig, method: RLMethodConfig, seed: int, dtype: torch.dtype
) -> dict[str, Any]:
    """The networks a run starts from: the unbatched agent's initialisation for this seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        q = DoubleQ(OBS_DIM, N_ACTIONS, problem.q_hidden).to(dtype)
        target = copy.deepcopy(q)
        model = values = None
        if method.kind != "model_free":
            model = DynamicsModel(
                OBS_DIM, N_ACTIONS, problem.model_hidden, predict_delta=problem.predict_delta
            ).to(dtype)
        if method.kind == "vep":
            values = ValueEnsemble(OBS_DIM, problem.vep_members, problem.q_hidden).to(dtype)
        adjoint = None
        if method.kind == "funcid_network":  # methods._adjoint_network's initialisation
            assert isinstance(method, FuncIDNetworkRL)
            adjoint = copy.deepcopy(q)
            if method.adjoint_init in ("fresh", "zero"):
                reset_parameters(adjoint)
            if method.adjoint_init == "zero":
                with torch.no_grad():
                    adjoint.net.l3.weight.zero_()
                    adjoint.net.l3.bias.zero_()
    return {"q": q, "target_q": target, "model": model, "values": values, "adjoint": adjoint}


def keep_freed_memory_in_heap() -> bool:
    """Ask glibc's malloc to serve large blocks from the heap and keep freed memory there.

    A batched step allocates and frees tensors of a few MB (activations of R runs × batch ×
    width) many times; above malloc's mmap threshold each one is a fresh mmap whose pages the
    kernel faults in and zeroes, which made element-wise ops 3–6× slower than their arithmetic
    (measured: 39 % of a 30-run FuncID step). Raising the threshold (64 MiB) and the trim
    threshold (128 MiB) keeps them in the heap. Process-wide, Linux/glibc only (elsewhere a
    no-op); numerics are unchanged. Memory measured from the resident set afterwards in the same
    process (:class:`funcbo.memory.PhaseMeter`) needs :func:`funcbo.memory.use_low_mmap_threshold`
    first.

    Returns:
        True when the setting was applied.
    """
    return set_malloc_thresholds(64 << 20, 128 << 20)


def _eval_key(seed: int, env_steps: int) -> int:
    return (seed * 1_000_003 + env_steps * 7919 + 12345) % (2**31 - 1)


class BatchedAgent:
    """R runs (seeds, and grid points differing only in Q learning rate and τ) of one method.

    Args:
        problems: each run's protocol (equal except ``tau``).
        methods: each run's method (equal except ``inner_lr``).
        seeds: each run's seed.
        dtype: float32 or float64 for the networks and batches.
    """

    def __init__(
        self,
        problems: Sequence[RLProblemConfig],
        methods: Sequence[RLMethodConfig],
        seeds: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        r = len(seeds)
        if not (r >= 1 and len(problems) == r and len(methods) == r):
            raise ValueError("need one problem config and one method config per seed")
        check_batchable(methods, problems)
        cfg = problems[0]
        if cfg.env_id != "CartPole-v1":
            raise ValueError(
                f"batched runs simulate CartPole-v1 in torch; env_id {cfg.env_id!r} runs unbatched"
            )
        keep_freed_memory_in_heap()
        self.cfg = cfg
        self.method = methods[0]
        self.seeds = [int(s) for s in seeds]
        self.runs = r
        self.dtype = dtype
        limit = 500 if cfg.max_episode_steps is None else cfg.max_episode_steps
        self.max_episode_steps = limit
        self.env = TorchCartPole(r, self.seeds, limit)
        nets = [
            initial_networks(p, m, s, dtype)
            for p, m, s in zip(problems, methods, seeds, strict=True)
        ]
        self.updater = BatchedUpdater(
            cfg,
            self.method,
            [n["q"] for n in nets],
            [n["target_q"] for n in nets],
            None if self.method.kind == "model_free" else [n["model"] for n in nets],
            [n["values"] for n in nets] if self.method.kind == "vep" else None,
            [n["adjoint"] for n in nets] if self.method.kind == "funcid_network" else None,
            inner_lrs=[m.inner_lr for m in methods],
            taus=[p.tau for p in problems],
        )
        cap = cfg.buffer_capacity
        self.buf_obs = torch.zeros(r, cap, OBS_DIM)
        self.buf_action = torch.zeros(r, cap, dtype=torch.long)
        self.buf_reward = torch.zeros(r, cap)
        self.buf_next_obs = torch.zeros(r, cap, OBS_DIM)
        self.buf_not_done = torch.zeros(r, cap)
        self.ptr = 0
        self.size = 0
        self.replay_gens = [torch.Generator().manual_seed(s + 1) for s in self.seeds]
        self.act_gens = [torch.Generator().manual_seed(s + 2) for s in self.seeds]
        self._offsets = (torch.arange(r) * cap).unsqueeze(1)

        self.env_steps = 0
        self.updates = 0
        self.episodes = torch.zeros(r)
        self.episode_return = torch.zeros(r)
        self.last_episode_return = torch.zeros(r)
        self.obs = self.env.reset()
        self.next_action = self.act(self.obs)
        self._times: deque[float] = deque(maxlen=RATE_WINDOW)
        #: seconds spent so far in each part of :meth:`step` and :meth:`evaluate` (all runs)
        self.timings = {"env": 0.0, "replay": 0.0, "act": 0.0, "update": 0.0, "evaluation": 0.0}

    # ---------------------------------------------------------------------------- acting
    def act(self, obs: Tensor) -> Tensor:
        """Every run's behaviour action: random for ``init_steps`` steps, then ε-softmax.

        Each run draws two uniforms from its own generator: one decides exploration, the other
        picks the action (uniformly, or by inverting the softmax's cumulative distribution).
        """
        u = torch.stack([torch.rand(2, generator=g, dtype=torch.float64) for g in self.act_gens])
        random_action = (u[:, 1] * N_ACTIONS).long().clamp_(max=N_ACTIONS - 1)
        if self.env_steps < self.cfg.init_steps:
            return random_action
        logits = self.policy_logits(obs.unsqueeze(1))[:, 0]  # [R, A]
        sampled = _softmax_sample(logits, u[:, 1:])
        explore = u[:, 0] < self.cfg.eps
        return torch.where(explore, random_action, sampled)

    def policy_logits(self, obs: Tensor) -> Tensor:
        """Q̄(s)/α of the acting network for observations ``[R, n, d]``: ``[R, n, A]``."""
        u = self.updater
        params = u.qp if self.cfg.act_with == "online" else u.tq
        with torch.no_grad():
            return u.q_values(params, obs.to(self.dtype)).mean(1) / u.alpha

    # -------------------------------------------------------------------------- training
    def sample(self) -> dict[str, Tensor]:
        """A replay batch per run ``[R, B, ...]``: distinct transitions, uniformly drawn."""
        b = self.cfg.batch_size
        idx = _distinct_rows(self.size, b, self.replay_gens)
        flat = (idx + self._offsets).reshape(-1)  # rows of the [R · capacity, ...] storage
        r, d = self.runs, self.dtype

        def take(buf: Tensor) -> Tensor:
            return buf.view(r * buf.shape[1], -1).index_select(0, flat).view(r, b, -1)

        return {
            "obs": take(self.buf_obs).to(d),
            "action": take(self.buf_action).view(r, b),
            "reward": take(self.buf_reward).to(d),
            "next_obs": take(self.buf_next_obs).to(d),
            "not_done": take(self.buf_not_done).to(d),
        }

    def step(self) -> dict[str, Any]:
        """One environment step of every run and, after the random phase, one update.

        Returns per-run metrics as tensors ``[R]`` (plus the batch's timing as floats).
        """
        t0 = time.perf_counter()
        action = self.next_action
        out = self.env.step(action)
        done = out.done
        if bool(done.any()):
            self.obs_after_reset = self.env.reset(mask=done)
        t1 = time.perf_counter()
        i = self.ptr
        self.buf_obs[:, i] = self.obs
        self.buf_action[:, i] = action
        self.buf_reward[:, i] = out.reward
        self.buf_next_obs[:, i] = out.obs
        self.buf_not_done[:, i] = (~out.terminated).float()
        self.ptr = (i + 1) % self.cfg.buffer_capacity
        self.size = min(self.size + 1, self.cfg.buffer_capacity)
        self.env_steps += 1
        self.episode_return += out.reward
        self.obs = out.obs
        if bool(done.any()):
            self.last_episode_return = torch.where(
                done, self.episode_return, self.last_episode_return
            )
            self.episodes += done.float()
            self.episode_return = torch.where(done, 0.0, self.episode_return)
            self.obs = self.obs_after_reset
        t2 = time.perf_counter()
        self.next_action = self.act(self.obs)
        t3 = time.perf_counter()
        metrics: dict[str, Any] = {}
        sample_time = 0.0
        if self.env_steps >= self.cfg.init_steps:

            def sample() -> dict[str, Tensor]:
                nonlocal sample_time
                ts = time.perf_counter()
                batch = self.sample()
                sample_time += time.perf_counter() - ts
                return batch

            metrics.update(self.updater.update(sample))
            self.updates += 1
        t4 = time.perf_counter()
        for key, dt in (
            ("env", t1 - t0),
            ("replay", t2 - t1 + sample_time),
            ("act", t3 - t2),
            ("update", t4 - t3 - sample_time),
        ):
            self.timings[key] += dt
        dt = time.perf_counter() - t0
        self._times.append(dt)
        rate = len(self._times) / max(sum(self._times), 1e-12)
        metrics.update(
            {
                "env_steps": float(self.env_steps),
                "episodes": self.episodes.clone(),
                "train_return": self.last_episode_return.clone(),
                "step_time_s": dt,
                "steps_per_s": rate,
                "batch_steps_per_s": rate * self.runs,
            }
        )
        return metrics

    # ------------------------------------------------------------------------ evaluation
    def evaluate(self, episodes: int | None = None) -> list[dict[str, float]]:
        """Mean and sd of the undiscounted return of every run over ``eval_episodes`` episodes
        (no ε), all R × episodes environments at once.

        Environment (r, j) is seeded by (seed_r, env_steps, j) and run r's policy samples from
        a generator seeded by (seed_r, env_steps): evaluating never changes training, and a
        resumed run evaluates exactly as an uninterrupted one.
        """
        t0 = time.perf_counter()
        n = self.cfg.eval_episodes if episodes is None else episodes
        r = self.runs
        keys = [_eval_key(s, self.env_steps) for s in self.seeds]
        env = TorchCartPole(
            r * n, [k * 1009 + j for k in keys for j in range(n)], self.max_episode_steps
        )
        gens = [torch.Generator().manual_seed(k) for k in keys]
        obs = env.reset()
        total = torch.zeros(r * n)
        alive = torch.ones(r * n, dtype=torch.bool)
        while bool(alive.any()):
            u = torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in gens])
            logits = self.policy_logits(obs.reshape(r, n, OBS_DIM))  # [R, n, A]
            action = _softmax_sample(logits.reshape(r * n, -1), u.reshape(r * n, 1))
            out = env.step(action)
            total += out.reward * alive
            alive &= ~out.done
            obs = out.obs
            if bool(out.done.any()):
                obs = env.reset(mask=out.done)
        ret = total.reshape(r, n).double()
        mean, std = ret.mean(1), ret.std(1, unbiased=False)
        self.timings["evaluation"] += time.perf_counter() - t0
        return [{"return": float(mean[i]), "return_std": float(std[i])} for i in range(r)]

    # --------------------------------------------------------------------- checkpointing
    def state_dict(self, run: int) -> dict[str, Any]:
        """Run ``run``'s state: tensors, numbers, strings, lists and dicts."""
        env = self.env.state_dict()
        n = self.size
        return {
            "kind": self.method.kind,
            "seed": self.seeds[run],
            "env_steps": self.env_steps,
            "updates": self.updates,
            "episodes": float(self.episodes[run]),
            "episode_return": float(self.episode_return[run]),
            "last_episode_return": float(self.last_episode_return[run]),
            "obs": self.obs[run].clone(),
            "next_action": int(self.next_action[run]),
            "env": {
                "state": env["state"][run].clone(),
                "elapsed": int(env["elapsed"][run]),
                "needs_reset": bool(env["needs_reset"][run]),
                "generator": env["generators"][run].clone(),
            },
            "replay": {
                "ptr": self.ptr,
                "size": n,
                "obs": self.buf_obs[run, :n].clone(),
                "action": self.buf_action[run, :n].clone(),
                "reward": self.buf_reward[run, :n].clone(),
                "next_obs": self.buf_next_obs[run, :n].clone(),
                "not_done": self.buf_not_done[run, :n].clone(),
                "generator": self.replay_gens[run].get_state(),
            },
            "act_generator": self.act_gens[run].get_state(),
            "updater": self.updater.state_dict(run),
        }

    def load_state_dict(self, run: int, state: dict[str, Any]) -> None:
        """Restore run ``run`` from :meth:`state_dict`. All runs of a batch must be restored
        from states at the same environment step."""
        if state["kind"] != self.method.kind:
            raise ValueError(
                f"checkpoint is for method kind {state['kind']!r}, this batch runs "
                f"{self.method.kind!r}"
            )
        if int(state["seed"]) != self.seeds[run]:
            raise ValueError(f"checkpoint is for seed {state['seed']}, run {run} has seed "
                             f"{self.seeds[run]}")  # fmt: skip
        self.updater.load_state_dict(run, state["updater"])
        env = self.env.state_dict()
        e = state["env"]
        env["state"][run] = e["state"]
        env["elapsed"][run] = int(e["elapsed"])
        env["needs_reset"][run] = bool(e["needs_reset"])
        env["generators"][run] = e["generator"]
        self.env.load_state_dict(env)
        rp = state["replay"]
        n = int(rp["size"])
        self.ptr, self.size = int(rp["ptr"]), n
        for name in ("obs", "action", "reward", "next_obs", "not_done"):
            getattr(self, f"buf_{name}")[run, :n] = rp[name]
        self.replay_gens[run].set_state(rp["generator"])
        self.act_gens[run].set_state(state["act_generator"])
        self.env_steps = int(state["env_steps"])
        self.updates = int(state["updates"])
        self.episodes[run] = float(state["episodes"])
        self.episode_return[run] = float(state["episode_return"])
        self.last_episode_return[run] = float(state["last_episode_return"])
        self.obs = self.obs.clone()
        self.obs[run] = state["obs"]
        self.next_action = self.next_action.clone()
        self.next_action[run] = int(state["next_action"])


def _distinct_rows(n: int, batch_size: int, gens: list[torch.Generator]) -> Tensor:
    """Row r: ``batch_size`` distinct indices in [0, n) from generator r, exactly as
    :func:`~funcbo.apps.rl.replay.distinct_indices` draws them, with its duplicate check and
    redraws done for all rows at once (only the draws are per row, each from its generator)."""
    if batch_size > n or n <= 8 * batch_size:
        return torch.stack([distinct_indices(n, batch_size, g) for g in gens])
    idx = torch.stack([torch.randint(0, n, (batch_size,), generator=g) for g in gens])
    idx = idx.to(torch.int32)  # sorts 3× faster than int64 (indices < 2³¹)
    while True:
        srt = idx.sort(dim=1).values
        dup = torch.zeros_like(srt, dtype=torch.bool)
        dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
        missing = dup.sum(dim=1)
        redraw = missing.nonzero().flatten().tolist()
        if not redraw:
            return idx.long()
        # distinct_indices: cat([unique(row) (sorted), randint(missing)])
        packed = srt.gather(1, torch.argsort(dup.to(torch.int8), dim=1, stable=True))
        counts = missing.tolist()
        draws = [torch.randint(0, n, (counts[r],), generator=gens[r]) for r in redraw]
        # the last `missing` places of each row, filled row by row in order
        tail = torch.arange(batch_size) >= batch_size - missing.unsqueeze(1)
        packed[tail] = torch.cat(draws).to(torch.int32)
        idx = torch.where((missing > 0).unsqueeze(1), packed, idx)


def _softmax_sample(logits: Tensor, u: Tensor) -> Tensor:
    """Rows of ``logits [N, A]`` sampled by inverting the softmax's CDF at ``u [N, 1]``."""
    probs = torch.softmax(logits.double(), dim=-1)
    a = (probs.cumsum(-1) < u).sum(-1)
    return a.clamp_(max=logits.shape[-1] - 1)


__all__ = ["BatchedAgent", "initial_networks", "keep_freed_memory_in_heap"]
