"""Registers the ``rl_cartpole`` experiment with the experiment layer."""

from __future__ import annotations

from funcbo.apps.rl.config import RL_KINDS, RLMethodConfig, RLProblemConfig
from funcbo.apps.rl.task import RLBatchTask, RLTask, batch_key
from funcbo.experiments.task import ExperimentSpec, RunSpec, register_experiment


def make_task(spec: RunSpec) -> RLTask:
    """Build the task of one run.

    Defined here, in the module that registers the experiment: worker processes import
    ``make_task``'s module to find the experiment.
    """
    return RLTask(spec)


def make_batch_task(specs: list[RunSpec]) -> RLBatchTask:
    """Build the batched task of several runs (``batch_seeds``)."""
    return RLBatchTask(specs)


SPEC = register_experiment(
    ExperimentSpec(
        name="rl_cartpole",
        problem_config=RLProblemConfig,
        method_config=RLMethodConfig,
        make_task=make_task,
        metric="return",
        metric_mode="max",
        kinds=RL_KINDS,
        iteration_label="environment steps",
        make_batch_task=make_batch_task,
        batch_key=batch_key,
        description=(
            "model-based RL on CartPole-v1: FuncID (learned adjoint) vs OMD, MLE, VEP, "
            "model-free soft Q"
        ),
    )
)

__all__ = ["SPEC", "make_task"]
