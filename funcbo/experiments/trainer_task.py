"""A :class:`~funcbo.experiments.task.Task` made of a library :class:`~funcbo.Trainer`.

Applications whose methods are library estimators (or any update given to the Trainer as its
``update`` hook) build a Trainer whose loaders draw minibatches from generators they own, and
wrap it here; the task's state is the trainer's (with the global random generators, see
:mod:`funcbo.rng`) plus those generators', so a restored task draws the same batches an
uninterrupted one would. (A task with a checkpoint format of its own, such as the IV task, holds
a Trainer and saves its state itself.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from funcbo.experiments.task import Task
from funcbo.trainer import Trainer


class TrainerTask(Task):
    """Advance a Trainer one outer iteration per :meth:`step`.

    Args:
        trainer: the configured trainer (its ``evaluate`` is not used: pass ``evaluate`` here).
        iterations: total outer iterations of the run.
        evaluate: returns evaluation metrics of the current state.
        generators: every random generator the trainer's loaders (or anything else) draw from.
        extra_state: optional (get, set) pair for further state (e.g. a learning-rate schedule).
    """

    def __init__(
        self,
        trainer: Trainer,
        iterations: int,
        evaluate: Callable[[], dict[str, float]],
        generators: dict[str, torch.Generator],
        extra_state: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
    ) -> None:
        self.trainer = trainer
        self.iterations = iterations
        self._evaluate = evaluate
        self.generators = generators
        self.extra_state = extra_state
        trainer.total_iterations = iterations

    def step(self) -> dict[str, float]:
        return self.trainer.step()

    def evaluate(self) -> dict[str, float]:
        return self._evaluate()

    def state_dict(self) -> dict[str, Any]:
        state = {
            "trainer": self.trainer.state_dict(),
            "generators": {k: g.get_state() for k, g in self.generators.items()},
        }
        if self.extra_state is not None:
            state["extra"] = self.extra_state[0]()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        for k, g in self.generators.items():
            g.set_state(state["generators"][k])
        if self.extra_state is not None:
            self.extra_state[1](state.get("extra"))
