"""The IV task's outer loop runs on funcbo.Trainer and computes exactly what its own loop did.

``legacy_step`` is the task's outer iteration as it was written before it ran on the Trainer
(batch draws, estimator step or DFIV step, outer optimizer, covariate steps, counters). A task
stepped by its Trainer and a twin stepped by ``legacy_step`` must agree bit for bit: every
metric, every parameter, the batch generator, the evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext

import pytest
import torch

from funcbo.apps.iv import IV_KINDS, IVProblemConfig, IVTask, make_dataset, paper_method
from funcbo.apps.iv.config import DemandProblemConfig
from funcbo.apps.iv.problem import feature_outer_batch
from funcbo.estimator import Batches
from funcbo.experiments.task import RunSpec
from funcbo.inner import frozen

TINY = {
    "dataset": "dsprites",
    "n": 200,
    "treatment_hidden": [16, 16, 8],
    "instrument_hidden": [16, 16, 8],
    "feature_dim": 4,
    "inner_batch_size": 40,
    "outer_batch_size": 50,
}
TINY_DEMAND = {
    "dataset": "demand",
    "n": 200,
    "treatment_hidden": [8],
    "instrument_hidden": [16, 8],
    "covariate_hidden": [16, 8],
    "feature_dim": 4,
    "covariate_dim": 3,
    "inner_batch_size": 40,
    "outer_batch_size": 50,
}
#: metrics that measure the machine, not the computation
MACHINE = {"iteration", "iter_time_s", "time_s", "peak_memory_mb"}


def legacy_step(task: IVTask) -> dict[str, float]:
    """The IV outer iteration as the task computed it before it ran on the Trainer."""
    if task.dfiv is not None:
        inner = [task.inner_batch() for _ in range(task.dfiv.inner_steps)]
        return task.dfiv.step(inner, task.outer_batch())
    assert task.estimator is not None and task.outer_optimizer is not None
    inner = Batches(task.inner_batch() for _ in range(task.estimator.inner_steps))
    outer_batch = task.outer_batch()
    covariate = task.outer.covariate if task.covariate_optimizer is not None else None
    est_outer = (
        feature_outer_batch(inner[-1], outer_batch) if task.features_formulation else outer_batch
    )
    with nullcontext() if covariate is None else frozen(covariate):
        task.estimator.step(task.problem, task.outer, inner, est_outer)
    task.outer_optimizer.step()
    task.outer_optimizer.zero_grad(set_to_none=True)
    stats = dict(task.estimator.stats)
    gave_up = sum(v for k, v in stats.items() if k.endswith("gave_up"))
    if gave_up:
        task.solver_gave_up_total += int(gave_up)
    stats["solver_gave_up_total"] = float(task.solver_gave_up_total)
    if covariate is not None:
        stats["covariate_loss"] = task._covariate_update(outer_batch)
    return stats


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache = str(tmp_path_factory.mktemp("ivcache"))
    out = {}
    for name, cls, fields in (
        ("dsprites", IVProblemConfig, TINY),
        ("demand", DemandProblemConfig, TINY_DEMAND),
    ):
        cfg = cls(cache_dir=cache, **fields)
        out[name] = (cfg, make_dataset(cfg, 0))
    return out


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("batches", ["minibatch", "full"])
@pytest.mark.parametrize("dataset", ["dsprites", "demand"])
@pytest.mark.parametrize("kind", IV_KINDS)
def test_trainer_loop_equals_the_tasks_own_loop(kind: str, dataset: str, batches: str, datasets):  # type: ignore[no-untyped-def]
    cfg, data = datasets[dataset]
    if batches == "full":
        cfg = dataclasses.replace(cfg, inner_batch_size=None, outer_batch_size=None)
    extra = {"formulation": "functional"} if dataset == "demand" else {}
    mc = paper_method(
        kind, inner_steps=2, adjoint_steps=2, unroll=3, truncate=2, covariate_steps=2, **extra
    )
    experiment = "iv_demand" if dataset == "demand" else "iv_dsprites"
    spec = RunSpec(experiment, kind, mc, cfg, seed=0, iterations=3)
    new, old = IVTask(spec, data=data), IVTask(spec, data=data)
    for it in range(1, 4):
        got, want = new.step(), legacy_step(old)
        assert MACHINE <= set(got) and got["iteration"] == it == new.iteration
        got = {k: v for k, v in got.items() if k not in MACHINE}
        assert set(got) == set(want)
        assert all(_same(got[k], want[k]) for k in want), (got, want)
    for a, b in ((new.outer, old.outer), (new.inner, old.inner)):
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y)
    assert torch.equal(new.generator.get_state(), old.generator.get_state())
    assert new.evaluate() == old.evaluate()
