"""Registers the IV experiments with the experiment layer: ``iv_dsprites`` and ``iv_demand``.

Importing this module registers both; their headline metric is ``test_mse`` (lower is better),
the out-of-sample MSE of the structural function after the closed-form 2SLS refit. ``iv_dsprites``
runs seeds as a batch dimension with ``batch_seeds`` (:mod:`funcbo.apps.iv.batched_task`).
"""

from __future__ import annotations

from typing import Any

from funcbo.apps.iv.config import IV_KINDS, DemandProblemConfig, IVMethodConfig, IVProblemConfig
from funcbo.apps.iv.task import make_task
from funcbo.experiments.task import ExperimentSpec, RunSpec, register_experiment


def make_batch_task(specs: list[RunSpec]) -> Any:
    """The batched task of several runs (``batch_seeds``; see
    :mod:`funcbo.apps.iv.batched_task`)."""
    from funcbo.apps.iv.batched_task import IVBatchTask

    return IVBatchTask(specs)


def batch_key(spec: RunSpec) -> Any:
    """Runs with equal keys share a batch; a method without a batched step is refused
    (:func:`funcbo.apps.iv.batched_task.batch_key`)."""
    from funcbo.apps.iv.batched_task import batch_key as key

    return key(spec)


IV_DSPRITES = register_experiment(
    ExperimentSpec(
        name="iv_dsprites",
        problem_config=IVProblemConfig,
        method_config=IVMethodConfig,
        make_task=make_task,
        metric="test_mse",
        metric_mode="min",
        description="2SLS instrumental-variable regression on the DFIV dSprites benchmark",
        kinds=IV_KINDS,
        make_batch_task=make_batch_task,
        batch_key=batch_key,
    )
)

IV_DEMAND = register_experiment(
    ExperimentSpec(
        name="iv_demand",
        problem_config=DemandProblemConfig,
        method_config=IVMethodConfig,
        make_task=make_task,
        metric="test_mse",
        metric_mode="min",
        description="2SLS instrumental-variable regression on the demand design (Hartford et al.)",
        kinds=IV_KINDS,
    )
)

__all__ = ["IV_DEMAND", "IV_DSPRITES"]
