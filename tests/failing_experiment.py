"""Experiment ``linear_iv_failing``: ``linear_iv`` whose run with seed ``problem.fail_seed``
raises :class:`DeliberateFailure` at its 3rd iteration, to exercise a sweep's failure handling.

Worker processes import it by module name (``failing_experiment``), so the tests folder must be
on their path: a spawned local worker inherits ``sys.path``; Ray workers get it through
``PYTHONPATH`` in the runtime environment (see ``ray_cluster`` in test_executors.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from funcbo.apps import linear_iv
from funcbo.experiments.task import RunSpec, Task, register_experiment

NAME = "linear_iv_failing"


@dataclass
class FailingLinearIVConfig(linear_iv.LinearIVConfig):
    """``linear_iv``'s problem section plus ``fail_seed`` (None: no run fails)."""

    fail_seed: int | None = None


class DeliberateFailure(RuntimeError):
    """Raised by a run whose seed is the config's ``fail_seed``."""


def make_task(spec: RunSpec) -> Task:
    """``linear_iv``'s task; the run with seed ``fail_seed`` fails at its 3rd iteration."""
    task = linear_iv.make_task(spec)
    fail_seed = spec.problem.fail_seed
    if fail_seed is None or spec.seed != fail_seed:
        return task
    original = task.step

    def failing_step() -> dict[str, float]:
        if task.trainer.iteration >= 2:
            raise DeliberateFailure(f"deliberate failure of seed {spec.seed} (fail_seed)")
        return original()

    task.step = failing_step  # type: ignore[method-assign]
    return task


SPEC = register_experiment(
    dataclasses.replace(
        linear_iv.SPEC,
        name=NAME,
        problem_config=FailingLinearIVConfig,
        make_task=make_task,
        description="linear_iv with a run that fails on purpose (tests only)",
    )
)
