"""Synthetic experiment ``linear_iv``: confounded linear IV regression with a known answer.

The problem is :class:`funcbo.synthetic.LinearIV` (two-stage least squares with a discrete
instrument); its bilevel solution is the classical 2SLS estimate, so every method's error is
measured exactly: ``beta_error`` = ‖ω − ω_2SLS‖/‖ω_2SLS‖. It is small and fast, which makes it
the experiment of the experiment layer's tests and of ``funcbo demo`` on a synthetic problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from funcbo.experiments.methods import BuildContext, EstimatorMethod
from funcbo.experiments.task import ExperimentSpec, RunSpec, Task, register_experiment
from funcbo.experiments.trainer_task import TrainerTask
from funcbo.synthetic import LinearIV, minibatches
from funcbo.trainer import Trainer


@dataclass
class LinearIVConfig:
    """Problem section of a ``linear_iv`` config.

    Attributes:
        n: samples (split in half between the inner and outer stages).
        groups: K, values of the discrete instrument.
        treatment_dim: q, dimension of the treatment.
        width, depth: the inner MLP on the one-hot instrument.
        batch_size: minibatch size of both stages.
        data_seed: fixes the dataset across run seeds (None: the run seed draws it).
    """

    n: int = 2000
    groups: int = 8
    treatment_dim: int = 3
    width: int = 64
    depth: int = 2
    batch_size: int = 128
    data_seed: int | None = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.width < 1 or self.depth < 1:
            raise ValueError("batch_size, width and depth must be ≥ 1")


def make_task(spec: RunSpec) -> Task:
    """The Trainer-based task of one ``linear_iv`` run."""
    cfg: LinearIVConfig = spec.problem
    m: EstimatorMethod = spec.method_config
    dtype = spec.torch_dtype
    data_seed = spec.seed if cfg.data_seed is None else cfg.data_seed
    iv = LinearIV(n=cfg.n, K=cfg.groups, q=cfg.treatment_dim, seed=data_seed, dtype=dtype)
    device = torch.device(spec.device)
    torch.manual_seed(spec.seed)
    outer = iv.make_outer().to(device)
    inner = iv.make_inner(width=cfg.width, depth=cfg.depth, seed=spec.seed).to(device)
    estimator = m.build(BuildContext(inner))
    outer_opt = m.outer_optimizer_for(outer.parameters())
    gen = torch.Generator().manual_seed(spec.seed)
    to = {k: v.to(device) for k, v in iv.inner_data.items()}
    oo = {k: v.to(device) for k, v in iv.outer_data.items()}
    trainer = Trainer(
        iv.problem,
        outer,
        estimator,
        outer_opt,
        inner_loader=minibatches(to, cfg.batch_size, gen),
        outer_loader=minibatches(oo, cfg.batch_size, gen),
        device=device,
    )
    exact = iv.exact().to(device)

    def evaluate() -> dict[str, float]:
        est = iv.estimate(outer)
        return {"beta_error": float((est - exact).norm() / exact.norm())}

    return TrainerTask(trainer, spec.iterations, evaluate, {"batches": gen})


SPEC = register_experiment(
    ExperimentSpec(
        name="linear_iv",
        problem_config=LinearIVConfig,
        method_config=EstimatorMethod,  # any registered method that builds an estimator
        make_task=make_task,
        metric="beta_error",
        metric_mode="min",
        description="confounded linear IV with a discrete instrument (exact 2SLS answer known)",
    )
)
