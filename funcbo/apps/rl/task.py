"""The RL experiment as a resumable :class:`~funcbo.experiments.task.Task`."""

from __future__ import annotations

from typing import Any

from funcbo.apps.rl.agent import Agent
from funcbo.apps.rl.config import RLMethodConfig, RLProblemConfig
from funcbo.experiments.task import RunSpec, Task


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
        problem = spec.problem
        if not isinstance(problem, RLProblemConfig):
            problem = RLProblemConfig(**dict(problem or {}))
        method = spec.method_config
        if not isinstance(method, RLMethodConfig):
            fields = dict(vars(method)) if not isinstance(method, dict) else dict(method)
            method = RLMethodConfig(**fields)
        if spec.device != "cpu":
            raise ValueError(
                f"the RL experiment runs on the CPU (small networks, one environment step per "
                f"update); got device {spec.device!r}"
            )
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


__all__ = ["RLTask"]
