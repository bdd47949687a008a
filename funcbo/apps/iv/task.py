"""One resumable IV run: a method on a dataset, seed and budget (the experiment layer's Task).

The outer loop is a :class:`~funcbo.Trainer` (batch draws, timing, peak memory, iteration
count); the task gives it the method's update as its ``update`` hook. Each outer iteration draws
the stage-1 (inner) batches a method consumes and then one stage-2 (outer) batch, as random
subsets without replacement drawn from a ``torch.Generator`` owned by the task (the whole half
when the batch size is None or at least the half's size, with no draw), then

* library kinds (``funcid``, ``funcid_linear``, ``aid``, ``itd``, ``gradient_penalty``,
  ``value_penalty``): ``estimator.step`` on :class:`~funcbo.apps.iv.problem.IVProblem` and one
  step of the outer optimizer; with a covariate network χ (the demand design) and
  ``covariate_steps > 0``, χ is then trained as in DFIV: ``covariate_steps`` steps of its own
  optimizer on the mean outer loss at the inner model's predictions h(z) on the stage-2 batch,
  held fixed. The inner solution h*_ω regresses the treatment features only, so it does not
  depend on χ and these are exact gradient steps on F(ω) in χ (block-coordinate, as DFIV's
  ``update_covariate_net``); χ is then left out of the hypergradient and the outer optimizer;
* ``dfiv``: one :class:`~funcbo.apps.iv.dfiv.DFIV` iteration (with its covariate steps when
  the design has covariates).

Networks (and a fresh network adjoint) are initialised from ``torch.manual_seed(seed)`` inside a
forked generator, so building a task leaves the global generator untouched, and a task restored
from :meth:`IVTask.state_dict` continues exactly as an uninterrupted one.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from funcbo.apps.iv.config import (
    DFIVMethod,
    IVBuildContext,
    IVLibraryMethod,
    IVMethodConfig,
    IVProblemConfig,
    as_method_config,
    as_problem_config,
)
from funcbo.apps.iv.data import IVData, IVTensors, dsprites_data
from funcbo.apps.iv.demand import demand_data
from funcbo.apps.iv.dfiv import DFIV
from funcbo.apps.iv.evaluate import eval_mode, out_of_sample_mse
from funcbo.apps.iv.networks import build_iv_networks
from funcbo.apps.iv.problem import IVFeatureProblem, IVProblem, feature_outer_batch
from funcbo.estimator import Batches, HypergradientEstimator
from funcbo.experiments.methods import make_optimizer
from funcbo.experiments.task import RunSpec, Task
from funcbo.inner import frozen
from funcbo.parametric import ITD
from funcbo.trainer import Trainer


def make_dataset(cfg: IVProblemConfig, seed: int) -> IVData:
    """The dataset a problem config describes, for a data seed (cached on disk)."""
    if cfg.dataset == "demand":
        return demand_data(cfg.n, seed, rho=cfg.rho, use_cache=cfg.cache, cache_dir=cfg.cache_dir)
    return dsprites_data(
        cfg.n,
        seed,
        source=cfg.source,
        archive_path=cfg.archive_path,
        matrix=cfg.matrix_path,
        matrix_seed=cfg.matrix_seed,
        use_cache=cfg.cache,
        cache_dir=cfg.cache_dir,
    )


class IVTask(Task):
    """A method of the IV experiments on one dataset and seed.

    Args:
        spec: the run (``problem`` an :class:`IVProblemConfig` or a mapping of its fields,
            ``method_config`` an IV method spec (:class:`IVMethodConfig`), a former flat
            ``MethodConfig`` or a config entry mapping).
        data: the dataset, when already generated (default: :func:`make_dataset` with the data
            seed, which is the run's seed unless ``problem.data_seed`` fixes it).
    """

    def __init__(self, spec: RunSpec, *, data: IVData | None = None) -> None:
        self.spec = spec
        self.config: IVProblemConfig = as_problem_config(spec.problem)
        self.method: IVMethodConfig = as_method_config(spec.method_config)
        self.iterations = spec.iterations
        pc, mc = self.config, self.method
        self.device = torch.device(spec.device)
        self.dtype = spec.torch_dtype
        data_seed = spec.seed if pc.data_seed is None else pc.data_seed
        self.data = data if data is not None else make_dataset(pc, data_seed)
        self.tensors = IVTensors.from_data(self.data, self.dtype, self.device)
        if isinstance(mc, DFIVMethod):
            head = "closed_form"
        else:
            assert isinstance(mc, IVLibraryMethod)
            head = mc.head or pc.head
        self.features_formulation = isinstance(mc, IVLibraryMethod) and mc.features_formulation
        own = getattr(mc, "stage1_ridge", None)
        #: λ₁ of this run: the method's own (feature formulation) or the problem's
        self.stage1_ridge = float(pc.stage1_ridge if own is None else own)
        self.problem: IVProblem | IVFeatureProblem
        if self.features_formulation:
            if pc.dataset == "demand":
                raise ValueError(
                    "formulation='features' is defined for designs without covariates; use "
                    "formulation: functional for the demand design"
                )
            self.problem = IVFeatureProblem(
                stage1_ridge=self.stage1_ridge, stage2_ridge=pc.stage2_ridge
            )
        else:
            self.problem = IVProblem(head=head, outer_ridge=pc.stage2_ridge)
        # Optimizer settings are stated on the reference's sum scale (IVProblemConfig.
        # weight_decay_scale): each optimizer is converted to the mean losses by the number of
        # samples its loss sums over.
        n_in, n_out = self._summed_samples()
        self.estimator: HypergradientEstimator | None = None
        self.dfiv: DFIV | None = None
        self.covariate_optimizer: torch.optim.Optimizer | None = None
        standardize = pc.dataset == "demand" if pc.standardize is None else pc.standardize
        stats: dict[str, tuple[Tensor, Tensor] | None] = {"t": None, "z": None, "x": None}
        if standardize:
            for k in stats:
                x = self.tensors.stage1.get(k)
                stats[k] = None if x is None else (x.mean(0), x.std(0))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            self.outer, self.inner = build_iv_networks(
                pc.dataset,
                treatment_hidden=pc.treatment_hidden,
                instrument_hidden=pc.instrument_hidden,
                covariate_hidden=pc.covariate_hidden,
                feature_dim=pc.feature_dim,
                covariate_dim=pc.covariate_dim,
                spectral=pc.spectral_norm,
                learned_head=head == "learned",
                treatment_stats=stats["t"],
                instrument_stats=stats["z"],
                covariate_stats=stats["x"],
                dtype=self.dtype,
                device=self.device,
            )
            summed = {1: n_in, 2: n_out}
            context = IVBuildContext(
                inner=self.inner,
                outer=self.outer,
                stage1_ridge=self.stage1_ridge,
                stage2_ridge=pc.stage2_ridge,
                optimizer=lambda name, params, lr, wd, stage: self._optimizer(
                    name, params, lr, wd, summed[stage]
                ),
            )
            if isinstance(mc, DFIVMethod):
                self.dfiv = mc.build(context)
                self.outer_optimizer = None
            else:
                assert isinstance(mc, IVLibraryMethod)
                self.estimator = mc.build(context)
                # The estimator's own optimizers: inner steps (a value penalty's value network,
                # ITD's unrolled steps) descend stage-1 losses.
                for solver in (getattr(self.estimator, n, None) for n in ("inner", "value")):
                    opt = getattr(solver, "optimizer", None)
                    if opt is not None:
                        self._to_mean_scale(opt, n_in)
                if isinstance(self.estimator, ITD):  # the optimizer it unrolls
                    self._to_mean_scale(self.estimator.optimizer, n_in)
                covariate = self.outer.covariate
                omega = list(self.outer.parameters())
                if covariate is not None and mc.covariate_steps > 0:
                    self.covariate_optimizer = self._optimizer(
                        mc.outer_optimizer,
                        covariate.parameters(),
                        mc.outer_lr,
                        mc.covariate_weight_decay,
                        n_out,
                    )
                    chi = {id(p) for p in covariate.parameters()}
                    omega = [p for p in omega if id(p) not in chi]
                self.outer_optimizer = self._optimizer(
                    mc.outer_optimizer, omega, mc.outer_lr, mc.outer_weight_decay, n_out
                )
        self.generator = torch.Generator().manual_seed(spec.seed)
        #: linear solves that gave up so far (CG returned its start: no implicit term)
        self.solver_gave_up_total = 0
        #: the outer loop: draws the batches, times the update and counts iterations
        self.trainer = Trainer(
            self.problem,
            self.outer,
            self.estimator,
            self.outer_optimizer,
            self.inner_batch,
            self.outer_batch,
            device=self.device,
            shard=False,
            update=self._update,
            inner_steps=None if self.dfiv is None else self.dfiv.inner_steps,
        )

    def _summed_samples(self) -> tuple[int, int]:
        """Samples the stage-1 and stage-2 losses of one step sum over in the reference code
        (the batch sizes: the halves in the paper's full-batch protocol)."""
        pc = self.config
        n1 = next(iter(self.tensors.stage1.values())).shape[0]
        n2 = next(iter(self.tensors.stage2.values())).shape[0]
        b1 = n1 if pc.inner_batch_size is None else min(pc.inner_batch_size, n1)
        b2 = n2 if pc.outer_batch_size is None else min(pc.outer_batch_size, n2)
        return b1, b2

    def _optimizer(
        self, name: str, params: Any, lr: float, weight_decay: float, summed: int
    ) -> torch.optim.Optimizer:
        """``make_optimizer`` for a loss that sums over ``summed`` samples in the reference."""
        return self._to_mean_scale(make_optimizer(name, params, lr, weight_decay), summed)

    def _to_mean_scale(
        self, optimizer: torch.optim.Optimizer, summed: int
    ) -> torch.optim.Optimizer:
        """Convert an optimizer configured for a loss summed over ``summed`` samples to the
        mean loss (``problem.weight_decay_scale: sum``): weight decay and Adam's ε divided by
        ``summed``. Adam's step (g + wd·θ)/(√v + ε) on the sum is then exactly the step on the
        mean; coupled weight decay alone is not scale-invariant. Returns the optimizer."""
        if self.config.weight_decay_scale == "sum":
            for group in optimizer.param_groups:
                for key in ("weight_decay", "eps"):
                    if key in group:
                        group[key] = group[key] / summed
        return optimizer

    def _covariate_update(self, batch: dict[str, Tensor]) -> float:
        """``covariate_steps`` optimizer steps on χ: the mean outer loss at v = h(z) on the
        stage-2 batch (fixed); returns the last loss."""
        assert self.covariate_optimizer is not None and self.outer.covariate is not None
        with torch.no_grad(), eval_mode(self.inner):
            v = self.inner(batch["z"])
        params = list(self.outer.covariate.parameters())
        last = float("nan")
        for _ in range(self.method.covariate_steps):
            loss = self.problem.outer_loss(self.outer, v, batch).mean()
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            self.covariate_optimizer.step()
            last = float(loss.detach())
        self.covariate_optimizer.zero_grad(set_to_none=True)
        return last

    # ------------------------------------------------------------------------------ batches
    def _batch(self, part: dict[str, Tensor], size: int | None) -> dict[str, Tensor]:
        n = next(iter(part.values())).shape[0]
        if size is None or size >= n:
            return part
        idx = torch.randperm(n, generator=self.generator)[:size].to(self.device)
        return {k: v[idx] for k, v in part.items()}

    def inner_batch(self) -> dict[str, Tensor]:
        """A stage-1 batch ``{"z", "t"}``."""
        return self._batch(self.tensors.stage1, self.config.inner_batch_size)

    def outer_batch(self) -> dict[str, Tensor]:
        """A stage-2 batch ``{"z", "y"}``."""
        return self._batch(self.tensors.stage2, self.config.outer_batch_size)

    # ------------------------------------------------------------------------------ update
    def _update(
        self, trainer: Trainer, inner: Batches, outer_batch: dict[str, Tensor]
    ) -> dict[str, float]:
        """One outer update on the batches the trainer drew (see the module docstring)."""
        if self.dfiv is not None:
            return self.dfiv.step(inner, outer_batch)
        covariate = self.outer.covariate if self.covariate_optimizer is not None else None
        # The feature formulation refits stage 1 inside the outer loss: the outer batch
        # carries the (last) stage-1 batch too.
        est_outer = (
            feature_outer_batch(inner[-1], outer_batch)
            if self.features_formulation
            else outer_batch
        )
        # χ has its own steps: keep it out of the hypergradient (and of the grad norm).
        with nullcontext() if covariate is None else frozen(covariate):
            stats = trainer.default_update(inner, est_outer)
        assert self.estimator is not None and self.estimator.diagnostics is not None
        self.solver_gave_up_total += self.estimator.diagnostics.solves_gave_up
        stats["solver_gave_up_total"] = float(self.solver_gave_up_total)
        if covariate is not None:
            stats["covariate_loss"] = self._covariate_update(outer_batch)
        return stats

    # ------------------------------------------------------------------------- Task interface
    @property
    def iteration(self) -> int:
        """Outer iterations done."""
        return self.trainer.iteration

    @property
    def elapsed(self) -> float:
        """Seconds spent in the outer updates so far."""
        return self.trainer.elapsed

    def step(self) -> dict[str, float]:
        """One outer iteration of the trainer; returns ``outer_loss``, ``inner_loss``,
        ``grad_norm``, the method's other diagnostics (``adjoint_loss``, ...), ``iteration``,
        timing and peak memory."""
        return self.trainer.step()

    def evaluate(self) -> dict[str, float]:
        """``test_mse``: out-of-sample MSE after the closed-form 2SLS refit with this run's λ₁
        (see :mod:`funcbo.apps.iv.evaluate`)."""
        mse = out_of_sample_mse(
            self.outer.treatment,
            self.inner.features,
            self.tensors,
            self.stage1_ridge,
            self.config.stage2_ridge,
            self.outer.covariate,
        )
        return {"test_mse": mse}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "iteration": self.iteration,
            "elapsed": self.elapsed,
            "outer": self.outer.state_dict(),
            "inner": self.inner.state_dict(),
            "generator": self.generator.get_state(),
            "solver_gave_up_total": self.solver_gave_up_total,
        }
        if self.dfiv is not None:
            state["dfiv"] = self.dfiv.state_dict()
        else:
            assert self.estimator is not None and self.outer_optimizer is not None
            state["outer_optimizer"] = self.outer_optimizer.state_dict()
            state["estimator"] = self.estimator.state_dict()
            if self.covariate_optimizer is not None:
                state["covariate_optimizer"] = self.covariate_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.iteration = int(state["iteration"])
        self.trainer.elapsed = float(state["elapsed"])
        self.outer.load_state_dict(state["outer"])
        self.inner.load_state_dict(state["inner"])
        self.generator.set_state(state["generator"])
        self.solver_gave_up_total = int(state.get("solver_gave_up_total", 0))
        if self.dfiv is not None:
            self.dfiv.load_state_dict(state["dfiv"])
        else:
            assert self.estimator is not None and self.outer_optimizer is not None
            self.outer_optimizer.load_state_dict(state["outer_optimizer"])
            self.estimator.load_state_dict(state["estimator"])
            if self.covariate_optimizer is not None:
                self.covariate_optimizer.load_state_dict(state["covariate_optimizer"])


def make_task(spec: RunSpec) -> IVTask:
    """The experiment layer's factory: an :class:`IVTask` for a run."""
    return IVTask(spec)


__all__ = ["IVTask", "make_dataset", "make_task"]
