"""The RL experiment as a resumable :class:`~funcbo.experiments.task.Task`."""

from __future__ import annotations

import dataclasses
from typing import Any

from funcbo.apps.rl.agent import Agent
from funcbo.apps.rl.config import RLMethodConfig, RLProblemConfig
from funcbo.experiments.config import to_plain
from funcbo.experiments.task import BatchTask, RunSpec, Task


def _configs(spec: RunSpec) -> tuple[RLProblemConfig, RLMethodConfig]:
    problem = spec.problem
    if not isinstance(problem, RLProblemConfig):
        problem = RLProblemConfig(**dict(problem or {}))
    method = spec.method_config
    if not isinstance(method, RLMethodConfig):
        # a mapping of a method's fields, or a former flat record
        fields = dict(method) if isinstance(method, dict) else to_plain(method)
        method = RLMethodConfig(**fields)
    if spec.device != "cpu":
        raise ValueError(
            f"the RL experiment runs on the CPU (small networks, one environment step per "
            f"update); got device {spec.device!r}"
        )
    return problem, method


class RLTask(Task):
    """One (method, seed) run: ``step()`` is one environment step plus one update.

    ``iterations`` is the number of environment steps (the run's ``iterations``).
    ``evaluate()`` returns ``{"return": mean, "return_std": sd}`` over the evaluation episodes.
    ``state_dict()`` holds the networks, optimizers, estimator state, the filled replay buffer,
    the training environment's state and every generator, so a restored task continues exactly.

    Args:
        spec: the run (its ``problem`` an :class:`RLProblemConfig`, its ``method_config`` an
            :class:`RLMethodConfig`, or plain mappings of their fields).
    """

    def __init__(self, spec: RunSpec) -> None:
        problem, method = _configs(spec)
        self.spec = spec
        self.iterations = int(spec.iterations)
        self.agent = Agent(problem, method, spec.seed, dtype=spec.torch_dtype)

    def step(self) -> dict[str, float]:
        return self.agent.step()

    def evaluate(self) -> dict[str, float]:
        return self.agent.evaluate()

    def state_dict(self) -> dict[str, Any]:
        return {"agent": self.agent.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agent.load_state_dict(state["agent"])


class RLBatchTask(BatchTask):
    """Several runs of one method as one :class:`~funcbo.apps.rl.batched_agent.BatchedAgent`.

    The runs may differ in seed, the Q learning rate ``inner_lr`` and the Polyak rate ``tau``
    (see :func:`batch_key`); ``step()`` returns per-run metric tensors.
    """

    def __init__(self, specs: list[RunSpec]) -> None:
        from funcbo.apps.rl.batched_agent import BatchedAgent

        if not specs:
            raise ValueError("a batch needs at least one run")
        configs = [_configs(s) for s in specs]
        first = specs[0]
        for s in specs[1:]:
            if (s.iterations, s.eval_every, s.dtype) != (
                first.iterations,
                first.eval_every,
                first.dtype,
            ):
                raise ValueError("runs of one batch must share iterations, eval_every and dtype")
        self.iterations = int(first.iterations)
        self.agent = BatchedAgent(
            [p for p, _ in configs],
            [m for _, m in configs],
            [s.seed for s in specs],
            dtype=first.torch_dtype,
        )

    def step(self) -> dict[str, Any]:
        return self.agent.step()

    def evaluate(self) -> list[dict[str, float]]:
        return self.agent.evaluate()

    def state_dict(self, run: int) -> dict[str, Any]:
        return {"agent": self.agent.state_dict(run)}

    def load_state_dict(self, run: int, state: dict[str, Any]) -> None:
        self.agent.load_state_dict(run, state["agent"])


def batch_key(spec: RunSpec) -> Any:
    """Runs with equal keys share a batch: same method and protocol up to the per-run fields
    (seed, ``inner_lr``, ``tau``); kinds without a batched update get a key of their own."""
    from funcbo.apps.rl.batched import (
        BATCHED_KINDS,
        PER_RUN_METHOD_FIELDS,
        PER_RUN_PROBLEM_FIELDS,
    )

    problem, method = _configs(spec)
    if method.kind not in BATCHED_KINDS or problem.env_id != "CartPole-v1":
        return ("alone", spec.method, spec.seed, repr(problem), repr(method))
    m = {k: v for k, v in dataclasses.asdict(method).items() if k not in PER_RUN_METHOD_FIELDS}
    p = {k: v for k, v in dataclasses.asdict(problem).items() if k not in PER_RUN_PROBLEM_FIELDS}
    return (spec.method, repr(m), repr(p), spec.iterations, spec.eval_every, spec.dtype)


__all__ = ["RLBatchTask", "RLTask", "batch_key"]
