"""Registers the IV experiments with the experiment layer: ``iv_dsprites`` and ``iv_demand``.

Importing this module registers both; their headline metric is ``test_mse`` (lower is better),
the out-of-sample MSE of the structural function after the closed-form 2SLS refit.
"""

from __future__ import annotations

from funcbo.apps.iv.config import IV_KINDS, DemandProblemConfig, IVMethodConfig, IVProblemConfig
from funcbo.apps.iv.task import make_task
from funcbo.experiments.task import ExperimentSpec, register_experiment

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
