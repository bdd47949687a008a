"""Typed configuration of the IV experiments: the ``problem:`` section and the methods.

Paper protocol (FuncID, Petrulionyte, Mairal & Arbel, NeurIPS 2024, §5.1 / App. F, dSprites 2SLS),
as set in the authors' code, github.com/inria-thoth/funcBO, ``applications/IVRegression``
(``launch_*.sh`` and ``*/configs/*.yaml``):

* data: n = 5000 (also 10000), split 50/50 (``split_ratio: 0.5``); seeds 1..20;
  λ₁ = λ₂ = 0.1 per sample (``lam_u: 0.1``, ``lam_V: 0.2`` used as 0.5·lam_V·n = 0.1·n on sums);
* budget: 100 outer iterations (``max_epochs=100``) with full-batch halves
  (``batch_size=2500`` for n = 5000, 5000 for n = 10000);
* the reference writes every loss as a *sum* over the stage's batch (ridges λ·n) and uses
  ``Adam(weight_decay=wd)``, i.e. *coupled* weight decay; funcbo writes means. Adam's step is
  invariant to the loss scale but coupled weight decay is not, so the configs state the
  reference's weight decays and ``problem.weight_decay_scale: sum`` (the default) divides each
  optimizer's weight decay, and Adam's ε, by the number of samples its loss sums over: then
  funcbo takes the reference's Adam steps exactly (``tests/test_iv_features.py``).

Per method, funcbo's settings (``PAPER_METHODS``, ``configs/iv_dsprites_paper.yaml``) against
the authors' (n = 5000: stage batches of 2500; at n = 10000 every "/2500" is "/5000"):

===================  ====================================  =====================================
method               authors' code                         funcbo (as applied to mean losses)
===================  ====================================  =====================================
FuncID linear        inner: CompositeSolver, 20 Adam steps  ``inner_solver: ridge_head``, 20 Adam
                     lr 1e-3 wd 0.1 on the features (sum);  steps lr 1e-3 wd 0.1/2500 ε 1e-8/2500;
                     closed-form dual, ridge lam_V = 0.2;   LinearAdjoint ridge 0.2 absolute
                     outer Adam lr 1e-3 wd 0.1 (sum)        ``ridge_relative: false``, the same
                                                            system); outer lr 1e-3 wd 0.1/2500
FuncID (network)     dual: DualNetwork = copy of the inner  ``adjoint_init: inner``, Adam lr 1e-5,
                     network, 20 Adam steps lr 1e-5 wd 0.1  wd 0.1 (not rescaled: both adjoint
                     on a *mean* objective (no ½); inner    objectives are means); inner and outer
                     and outer as FuncID linear             as FuncID linear
DFIV                 stage 1: 20 Adam steps lr 1e-3 wd 0.1  wd 0.1/2500 on both stages (sums over
                     (sum); stage 2: 1 step lr 1e-3 wd 0.1  each half), ε/2500
AID                  inner variable: the feature network,   ``formulation: features``
                     ridge-head stage-1 loss (sum), 20      (:class:`~funcbo.apps.iv.problem.
                     warm-started torchopt Adam steps lr    IVFeatureProblem`), 20 Adam steps lr
                     1e-3 wd 1e-3; outer loss = fit_2sls    1e-3 wd 1e-3/2500; textbook CG(2) from
                     stage-2 loss (sum); CG 2 iterations    the warm-started dual
                     from the previous dual, last iterate   (``cg_safeguards: false``); outer lr
                     returned; outer lr 1e-3 wd 0.1; λ₁     1e-3 wd 0.1/2500; ``stage1_ridge:
                     0.5·0.1·n                              0.05``
ITD                  feature formulation; 18 warm-start +   feature formulation; 20 Adam steps lr
                     2 unrolled torchopt Adam steps lr      1e-3 wd 0.01/2500, the last 2
                     1e-3 wd 0.01 (``DiffOpt``: the         differentiated through Adam's update
                     optimizer state carries over between   (moments included), its state carried
                     outer steps); outer lr 1e-2 wd 0.1;    over (:class:`funcbo.ITD` with an
                     λ₁ 0.5·0.1·n                           Adam ``optimizer``); outer lr 1e-2
                                                            wd 0.1/2500; ``stage1_ridge: 0.05``
Gradient penalty     joint Adam on (ψ, φ), loss =           feature formulation; θ-steps on
                     stage-2 loss + γ‖∇_φ stage-1 loss‖     L_out/γ + ½‖∇_θ L_in‖², outer gradient
                     (sums, norm not squared), γ = 0.1      of L_out + γ·½‖∇_θ L_in‖² (means,
                     in the config, grid {1, …, 1e-3},      squared), γ = 0.1; Adam lr 1e-3 wd
                     Adam lr 1e-5 wd 0.1, 2000 steps        0.1/2500 for both (20 θ-steps per ω)
Value penalty        ``PenaltyBasedMinMax`` (no main.py):   feature formulation; ``value_steps:
                     20 Adam steps of an auxiliary copy     20`` on θ̂, then ``joint: true`` with
                     θ̂ of φ on the stage-1 loss, then one   ``inner_steps: 1``: θ's step and ω's
                     Adam step of (ψ, φ) together on        from the same point on L_out +
                     stage-2 loss + γ(stage-1 loss −        γ·(L_in − L_in(θ̂)) (means), γ = 0.01;
                     stage-1 loss at θ̂) (sums), γ = 0.01,   Adam lr 1e-3 wd 0.1/2500 for all three
                     lr 1e-3 wd 0.1 (all), 100 epochs
===================  ====================================  =====================================

The stage-1 ridge: the authors' DFIV, FuncID and value-penalty code use λ₁ = 0.1 per sample
(``lam1·n``), their AID and ITD (``parametricBO``) 0.05 (``0.5·lam_V·n``) in training and in the
refit that scores them; funcbo's AID and ITD set ``stage1_ridge: 0.05`` (the method's own λ₁, in
their losses and their score), every other method the problem's 0.1. Known differences kept: the
gradient penalty's norm is squared (``squared: false`` gives the authors' norm; side by side at
n = 5000 it ends higher on 5 of 6 seeds, ``docs/results/iv_dsprites_paper.md``); runs use
float32 (the authors' float64).

The authors' gradient penalty as coded (``PenaltyBased/trainer.py``) has no penalty gradient: it
takes the stage-1 gradient norm from ``p.grad`` after a plain ``backward()`` (no graph), so
γ·‖∇‖ is a constant, and the stage-1 gradient left in the instrument network's ``.grad`` makes
its step a plain stage-1 step: one Adam step of each network per epoch, DFIV with one stage-1
step. funcbo's ``gradient_penalty`` is the penalty method as described (the penalty's gradient
included), not that code.

The hidden widths and the demand design's settings are DFIV's (Xu et al., 2021; its code,
github.com/liyuan9988/DeepFeatureIV, ``final_configs/dfiv_low_dim/configs.json``): λ₁ = λ₂ = 0.1
per sample, 100 full-batch epochs of 20 instrument steps, 20 covariate steps and 1 treatment step,
Adam (lr 1e-3) with weight decay 0 on the treatment and instrument networks and 0.1 on the
covariate network, and no rescaling of the outcome.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypedDict

import torch

from funcbo.apps.iv.dfiv import DFIV
from funcbo.apps.iv.inner import RidgeHeadInnerSolver
from funcbo.apps.iv.problem import HEADS
from funcbo.estimator import HypergradientEstimator
from funcbo.experiments.methods import (
    LEGACY_FIELDS,
    AIDMethod,
    BuildContext,
    EstimatorMethod,
    FuncIDLinear,
    FuncIDNetwork,
    GradientPenaltyMethod,
    InnerSteps,
    ITDMethod,
    MethodConfig,
    MethodSpec,
    OuterStep,
    ValuePenaltyMethod,
    make_method,
    make_optimizer,
    method_kinds,
    register_method,
    register_value,
)
from funcbo.linalg import CG

DATASETS = ("dsprites", "demand")
#: how weight decays are stated: on the reference's sum-scale losses, or on funcbo's means
WEIGHT_DECAY_SCALES = ("sum", "mean")
#: problem formulations of the parametric baselines: funcbo's functional one (inner model =
#: instrument features + linear head, ω seen through h* only) or the FuncID authors' (inner
#: variable = the instrument features, stage-1 head in closed form, stage-1 refit in the outer
#: loss; :class:`~funcbo.apps.iv.problem.IVFeatureProblem`)
FORMULATIONS = ("functional", "features")
SOURCES = ("render", "archive")
#: inner solvers: the library's optimizer steps on all weights, or the paper's ridge-head solver
INNER_SOLVERS = ("gradient", "ridge_head")

#: outer iterations of the paper's protocol (full-batch halves)
PAPER_ITERATIONS = 100


@dataclass
class IVProblemConfig:
    """The ``problem:`` section of an IV experiment.

    Attributes:
        dataset: ``"dsprites"`` or ``"demand"``.
        n: training points, split 50/50 into stage 1 (inner) and stage 2 (outer).
        rho: noise correlation of the demand design (ignored for dSprites).
        data_seed: seed of the data; None: the run's seed (a new dataset per seed, as in the
            paper).
        source: ``"render"`` (the procedural renderer) or ``"archive"`` (the real dSprites file).
        archive_path: the dSprites archive (``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``).
        matrix_path: a ``.npy`` structural matrix A (e.g. DFIV's ``dsprite_mat.npy``); None: A is
            drawn U(0, 1) from ``matrix_seed``.
        matrix_seed: seed of the drawn A (fixed across runs).
        stage1_ridge, stage2_ridge: λ₁, λ₂ of the 2SLS ridges (per-sample scale).
        head: outcome head ``"closed_form"`` (DFIV) or ``"learned"`` (part of ω); a method may
            override it.
        inner_batch_size, outer_batch_size: minibatch sizes; None: the whole half.
        treatment_hidden, instrument_hidden: hidden widths (None: the paper's networks; three
            each for dSprites, one for the demand design's price network and two for its
            instrument network).
        covariate_hidden: hidden widths of the demand design's covariate network (None:
            DFIV's, (128, 32)).
        feature_dim: output dimension of the instrument features, and of the treatment
            features for dSprites (the demand design's price network has one output, as DFIV's).
        covariate_dim: output dimension of the demand design's covariate network (16, DFIV's).
        spectral_norm: spectral norm on the feature Linears (None: on for dSprites only).
        standardize: standardise the networks' inputs with the stage-1 half's mean and standard
            deviation (None: on for the demand design only).
        weight_decay_scale: how the methods' weight decays are stated. ``"sum"`` (default):
            as in the reference code (the FuncID authors', DFIV's), whose losses are *sums* over
            the stage's batch while funcbo's are means; coupled weight decay (Adam's
            ``weight_decay``, added to the gradient before Adam normalises it) then acts
            ``batch size`` times more strongly on the mean, so each optimizer's weight decay is
            divided by the number of samples its loss sums over (the stage-1 batch for inner,
            feature and DFIV stage-1 steps; the stage-2 batch for outer, DFIV stage-2 and
            covariate steps), and so is Adam's ε (which is added to √v, a gradient scale). This
            takes exactly the reference's Adam steps (tested). The adjoint optimizer is never
            rescaled (the reference's adjoint objective is a mean). ``"mean"``: applied as
            written to funcbo's mean losses.
        cache, cache_dir: the on-disk dataset cache.
    """

    dataset: str = "dsprites"
    n: int = 5000
    rho: float = 0.5
    data_seed: int | None = None
    source: str = "render"
    archive_path: str | None = None
    matrix_path: str | None = None
    matrix_seed: int = 0
    stage1_ridge: float = 0.1
    stage2_ridge: float = 0.1
    head: str = "closed_form"
    inner_batch_size: int | None = None
    outer_batch_size: int | None = None
    treatment_hidden: list[int] | None = None
    instrument_hidden: list[int] | None = None
    covariate_hidden: list[int] | None = None
    feature_dim: int = 32
    covariate_dim: int = 16
    spectral_norm: bool | None = None
    standardize: bool | None = None
    weight_decay_scale: str = "sum"
    cache: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.weight_decay_scale not in WEIGHT_DECAY_SCALES:
            raise ValueError(
                f"problem.weight_decay_scale must be one of {WEIGHT_DECAY_SCALES}, got "
                f"{self.weight_decay_scale!r}"
            )
        if self.dataset not in DATASETS:
            raise ValueError(f"problem.dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.source not in SOURCES:
            raise ValueError(f"problem.source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "archive" and not self.archive_path:
            raise ValueError("problem.source='archive' needs problem.archive_path")
        if self.head not in HEADS:
            raise ValueError(f"problem.head must be one of {HEADS}, got {self.head!r}")
        if self.n < 4:
            raise ValueError(f"problem.n must be ≥ 4, got {self.n}")
        for name in ("stage1_ridge", "stage2_ridge"):
            if not getattr(self, name) > 0:
                raise ValueError(f"problem.{name} must be > 0, got {getattr(self, name)}")
        for name in ("inner_batch_size", "outer_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"problem.{name} must be ≥ 1 or null, got {v}")
        for name in ("feature_dim", "covariate_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"problem.{name} must be ≥ 1, got {getattr(self, name)}")


@dataclass
class DemandProblemConfig(IVProblemConfig):
    """The ``problem:`` section of ``iv_demand``: :class:`IVProblemConfig` for the demand design.

    DFIV's setting for this design (its ``dfiv_low_dim`` config): λ₁ = λ₂ = 0.1 per sample
    (its 0.1·n on sums), DFIV's networks (price, covariate and instrument networks, see
    :mod:`funcbo.apps.iv.networks`), and the outcome on its own scale, as DFIV trains it (its
    code rescales the demand outcome for DeepIV only). Nothing here was chosen on the test set.
    The networks' inputs are standardised with the stage-1 half's statistics
    (``standardize``; an invertible change of input coordinates).
    """

    dataset: str = "demand"
    stage1_ridge: float = 0.1
    stage2_ridge: float = 0.1


#: the IV fields of the former flat method record (see ``translate_legacy``)
IV_LEGACY_FIELDS = (
    *LEGACY_FIELDS,
    "head",
    "formulation",
    "inner_solver",
    "stage2_steps",
    "covariate_steps",
    "covariate_weight_decay",
)


@dataclass
class IVBuildContext:
    """What an IV method is built over (made by :class:`~funcbo.apps.iv.task.IVTask`).

    Attributes:
        inner: the instrument model h = head ∘ φ (:class:`~funcbo.apps.iv.networks.
            InstrumentModel`).
        outer: the outcome model ω (treatment network, covariate network, learned head).
        stage1_ridge, stage2_ridge: λ₁, λ₂ of the problem.
        optimizer: ``optimizer(name, params, lr, weight_decay, stage)`` with ``stage`` 1 or 2:
            an optimizer converted to the mean losses by the samples the reference's loss of
            that stage sums over (``problem.weight_decay_scale``).
    """

    inner: Any
    outer: Any
    stage1_ridge: float
    stage2_ridge: float
    optimizer: Callable[[str, Any, float, float, int], torch.optim.Optimizer]


@dataclass
class IVMethodConfig(MethodSpec):
    """Base of the IV experiments' methods (their kinds live in scope ``"iv"``).

    Attributes:
        covariate_steps, covariate_weight_decay: for designs with covariates, the covariate
            network's steps per iteration with its own optimizer (``outer_optimizer`` with
            learning rate ``outer_lr``) and its weight decay (DFIV's demand setting: 20 and
            0.1); every kind takes these steps (see :mod:`funcbo.apps.iv.task`). With 0 steps
            the library kinds train it as part of ω with the outer optimizer, and DFIV leaves
            it at its initialisation.
    """

    scope: ClassVar[str] = "iv"
    legacy_fields: ClassVar[tuple[str, ...]] = IV_LEGACY_FIELDS
    # A kind without these fields rejected other values (e.g. ridge_head for itd).
    legacy_defaults: ClassVar[dict[str, Any]] = {
        "formulation": "functional",
        "inner_solver": "gradient",
    }
    covariate_steps: int = 20
    covariate_weight_decay: float = 0.1

    def __post_init__(self) -> None:
        if self.covariate_steps < 0:
            raise ValueError(f"covariate_steps must be ≥ 0, got {self.covariate_steps}")
        if self.covariate_weight_decay < 0:
            raise ValueError(
                f"covariate_weight_decay must be ≥ 0, got {self.covariate_weight_decay}"
            )


@dataclass
class IVLibraryMethod(IVMethodConfig, EstimatorMethod):
    """A library estimator in the IV experiments (the IV variant of its library spec).

    Attributes:
        head: outcome head for this method (None: the problem's).
    """

    scope: ClassVar[str] = "iv"
    head: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head is not None and self.head not in HEADS:
            raise ValueError(f"method head must be one of {HEADS} or null, got {self.head!r}")

    @property
    def features_formulation(self) -> bool:
        return getattr(self, "formulation", "functional") == "features"

    def build(self, context: IVBuildContext) -> HypergradientEstimator:  # type: ignore[override]
        if self.features_formulation:
            # The FuncID authors' baselines: the inner variable is the feature network alone.
            return EstimatorMethod.build(self, BuildContext(context.inner.features))
        value = getattr(self, "inner_solver", None)
        inner_solver = None if value is None else value.build(self, context)
        return EstimatorMethod.build(
            self,
            BuildContext(context.inner, linear_head=context.inner.head, inner_solver=inner_solver),
        )


@register_value("gradient")
@dataclass
class GradientSteps:
    """The library's inner solver: the method's ``inner_*`` optimizer steps on every inner
    weight (``inner_solver: gradient``)."""

    def build(self, method: IVLibraryMethod, context: IVBuildContext) -> None:
        return None  # the estimator takes its own optimizer steps


@register_value("ridge_head")
@dataclass
class RidgeHead:
    """The paper's inner solver (``inner_solver: ridge_head``): the method's ``inner_*`` steps on
    the instrument features through a closed-form ridge head with the problem's
    ``stage1_ridge`` (:class:`~funcbo.apps.iv.inner.RidgeHeadInnerSolver`)."""

    def build(self, method: IVLibraryMethod, context: IVBuildContext) -> RidgeHeadInnerSolver:
        feature_opt = make_optimizer(
            method.inner_optimizer,
            context.inner.features.parameters(),
            method.inner_lr,
            method.inner_weight_decay,
        )
        return RidgeHeadInnerSolver(
            context.inner, feature_opt, method.inner_steps, context.stage1_ridge
        )


#: the inner solvers by config name
INNER_SOLVER_VALUES: dict[str, type] = {"gradient": GradientSteps, "ridge_head": RidgeHead}


@dataclass
class RidgeHeadOption(IVLibraryMethod):
    """Attributes:
    inner_solver: :class:`GradientSteps` (``gradient``: optimizer steps on every inner weight)
        or :class:`RidgeHead` (``ridge_head``: the paper's steps on the instrument features
        through a closed-form ridge head); a name is accepted in Python too.
    """

    scope: ClassVar[str] = "iv"
    inner_solver: GradientSteps | RidgeHead = field(default_factory=GradientSteps)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.inner_solver, str):
            if self.inner_solver not in INNER_SOLVER_VALUES:
                raise ValueError(
                    f"inner_solver must be one of {INNER_SOLVERS}, got {self.inner_solver!r}"
                )
            self.inner_solver = INNER_SOLVER_VALUES[self.inner_solver]()


@dataclass
class FeatureOption(IVLibraryMethod):
    """Attributes:
    formulation: ``"functional"`` (the inner model h = head ∘ φ regresses ψ_ω(t); ω is seen
        through h* only) or ``"features"`` (the FuncID authors' formulation of their AID, ITD
        and penalty baselines: the inner variable is φ with the stage-1 head in closed form,
        and the outer loss refits the stage-1 head on ψ_ω(t₁); see
        :class:`~funcbo.apps.iv.problem.IVFeatureProblem`).
    stage1_ridge: this method's λ₁ (per-sample scale) in place of the problem's, wherever
        its run uses λ₁: in the feature formulation its inner loss and the outer loss's
        stage-1 refit, and in either formulation the refit that scores the run (as the
        reference's trainers score each method with its own λ₁; the FuncID authors' AID and
        ITD use 0.05). None: the problem's.
    """

    scope: ClassVar[str] = "iv"
    formulation: str = "functional"
    stage1_ridge: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {self.formulation!r}")
        if self.stage1_ridge is not None and not self.stage1_ridge > 0:
            raise ValueError(f"stage1_ridge must be > 0 or null, got {self.stage1_ridge}")
        if self.formulation == "features" and isinstance(
            getattr(self, "inner_solver", None), RidgeHead
        ):
            raise ValueError(
                "formulation='features' fits the stage-1 head inside the inner loss: use "
                "inner_solver='gradient'"
            )


@register_method("funcid")
@dataclass
class IVFuncID(RidgeHeadOption, FuncIDNetwork):
    """FuncID with a network adjoint (:class:`~funcbo.experiments.methods.FuncIDNetwork`)."""


@register_method("funcid_linear")
@dataclass
class IVFuncIDLinear(RidgeHeadOption, FuncIDLinear):
    """FuncID with the closed-form adjoint on the instrument features."""


@register_method("aid")
@dataclass
class IVAID(FeatureOption, RidgeHeadOption, AIDMethod):
    """AID (:class:`~funcbo.experiments.methods.AIDMethod`)."""


@register_method("itd")
@dataclass
class IVITD(FeatureOption, ITDMethod):
    """ITD (:class:`~funcbo.experiments.methods.ITDMethod`)."""


@register_method("gradient_penalty")
@dataclass
class IVGradientPenalty(FeatureOption, GradientPenaltyMethod):
    """The gradient-norm penalty (:class:`~funcbo.experiments.methods.GradientPenaltyMethod`)."""


@register_method("value_penalty")
@dataclass
class IVValuePenalty(FeatureOption, ValuePenaltyMethod):
    """The value-function penalty (:class:`~funcbo.experiments.methods.ValuePenaltyMethod`)."""


@register_method("dfiv")
@dataclass
class DFIVMethod(IVMethodConfig, OuterStep, InnerSteps):
    """DFIV (:class:`~funcbo.apps.iv.dfiv.DFIV`): stage 1 (instrument network) from the
    ``inner_*`` settings, stage 2 (treatment network) from ``outer_*``.

    Attributes:
        stage2_steps: treatment-network steps per iteration.
    """

    scope: ClassVar[str] = "iv"
    stage2_steps: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage2_steps < 1:
            raise ValueError(f"stage2_steps must be ≥ 1, got {self.stage2_steps}")

    def build(self, context: IVBuildContext) -> DFIV:
        covariate = context.outer.covariate
        return DFIV(
            context.outer.treatment,
            context.inner.features,
            context.optimizer(
                self.outer_optimizer,
                context.outer.treatment.parameters(),
                self.outer_lr,
                self.outer_weight_decay,
                2,
            ),
            context.optimizer(
                self.inner_optimizer,
                context.inner.features.parameters(),
                self.inner_lr,
                self.inner_weight_decay,
                1,
            ),
            stage1_steps=self.inner_steps,
            stage2_steps=self.stage2_steps,
            lam1=context.stage1_ridge,
            lam2=context.stage2_ridge,
            covariate=covariate,
            covariate_optimizer=None
            if covariate is None
            else context.optimizer(
                self.outer_optimizer,
                covariate.parameters(),
                self.outer_lr,
                self.covariate_weight_decay,
                2,
            ),
            covariate_steps=self.covariate_steps,
        )


#: method kinds of the IV experiments (registered in scope ``"iv"``)
IV_KINDS = method_kinds(IVMethodConfig)
#: kinds that can take the feature formulation
FEATURE_KINDS = method_kinds(FeatureOption)
#: kinds whose inner solver can be the ridge-head one
RIDGE_HEAD_KINDS = method_kinds(RidgeHeadOption)


class _CommonSteps(TypedDict):
    """The optimizer settings every kind of the paper's table shares."""

    inner_optimizer: str
    inner_lr: float
    inner_weight_decay: float
    inner_steps: int
    outer_optimizer: str
    outer_lr: float
    outer_weight_decay: float


def _paper() -> dict[str, IVMethodConfig]:
    common: _CommonSteps = {
        "inner_optimizer": "adam",
        "inner_lr": 1e-3,
        "inner_weight_decay": 0.1,
        "inner_steps": 20,
        "outer_optimizer": "adam",
        "outer_lr": 1e-3,
        "outer_weight_decay": 0.1,
    }
    aid_steps: _CommonSteps = {**common, "inner_weight_decay": 1e-3}
    itd_steps: _CommonSteps = {**common, "inner_weight_decay": 0.01, "outer_lr": 1e-2}
    joint_steps: _CommonSteps = {**common, "inner_steps": 1}
    return {
        "funcid": IVFuncID(
            adjoint_optimizer="adam",
            adjoint_lr=1e-5,
            adjoint_weight_decay=0.1,
            adjoint_steps=20,
            adjoint_init="inner",
            inner_solver=RidgeHead(),
            **common,
        ),
        "funcid_linear": IVFuncIDLinear(
            inner_solver=RidgeHead(), ridge=0.2, ridge_relative=False, **common
        ),
        "dfiv": DFIVMethod(stage2_steps=1, **common),
        "aid": IVAID(
            formulation="features",
            solver=CG(maxiter=2, safeguards=False),
            stage1_ridge=0.05,
            **aid_steps,
        ),
        "itd": IVITD(formulation="features", unroll=20, truncate=2, stage1_ridge=0.05, **itd_steps),
        "gradient_penalty": IVGradientPenalty(formulation="features", penalty=0.1, **common),
        "value_penalty": IVValuePenalty(
            formulation="features",
            penalty=0.01,
            value_steps=20,
            joint=True,
            **joint_steps,
        ),
    }


#: the paper's settings per method kind (see the module docstring for sources)
PAPER_METHODS: dict[str, IVMethodConfig] = _paper()


def paper_method(kind: str, **overrides: object) -> IVMethodConfig:
    """A copy of the paper's settings for ``kind``, with fields replaced by ``overrides``
    (validated as a config entry; former flat fields such as ``solver_iters`` are translated
    and those ``kind`` does not have are dropped, so one set of overrides fits every kind)."""
    if kind not in PAPER_METHODS:
        raise ValueError(f"unknown IV method kind {kind!r}; use one of {IV_KINDS}")
    from funcbo.experiments.config import ConfigError, to_plain

    try:
        fields = {**to_plain(PAPER_METHODS[kind]), **overrides}
        fields.pop("kind")
        return make_method(kind, IVMethodConfig, **fields)
    except ConfigError as e:
        raise ValueError(str(e)) from e


def as_problem_config(cfg: IVProblemConfig | dict | None) -> IVProblemConfig:
    """An :class:`IVProblemConfig` from itself, a mapping of its fields (a
    :class:`DemandProblemConfig` when ``dataset`` is ``"demand"``), or None (the defaults)."""
    if cfg is None:
        return IVProblemConfig()
    if isinstance(cfg, IVProblemConfig):
        return cfg
    if isinstance(cfg, dict):
        known = {f.name for f in dataclasses.fields(IVProblemConfig)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown problem field(s) {unknown}; known: {sorted(known)}")
        cls = DemandProblemConfig if cfg.get("dataset") == "demand" else IVProblemConfig
        return cls(**cfg)
    raise TypeError(f"expected an IVProblemConfig or a dict, got {type(cfg).__name__}")


def as_method_config(cfg: MethodSpec | MethodConfig | dict) -> IVMethodConfig:
    """An IV method spec from itself, a former flat record (:class:`MethodConfig`), or a
    config entry (a mapping with ``kind``)."""
    if isinstance(cfg, IVMethodConfig):
        return cfg
    from funcbo.experiments.config import ConfigError, to_plain

    if isinstance(cfg, (MethodConfig, MethodSpec)):
        cfg = to_plain(cfg)
    if isinstance(cfg, dict):
        data = dict(cfg)
        kind = data.pop("kind", "funcid_linear")
        if kind not in IV_KINDS:
            raise ValueError(f"unknown IV method kind {kind!r}; use one of {IV_KINDS}")
        try:
            return make_method(kind, IVMethodConfig, **data)
        except ConfigError as e:
            raise ValueError(str(e)) from e
    raise TypeError(f"expected an IV method spec or a dict, got {type(cfg).__name__}")


__all__ = [
    "DATASETS",
    "FEATURE_KINDS",
    "FORMULATIONS",
    "INNER_SOLVERS",
    "IVAID",
    "IVITD",
    "IV_KINDS",
    "PAPER_ITERATIONS",
    "PAPER_METHODS",
    "WEIGHT_DECAY_SCALES",
    "DFIVMethod",
    "DemandProblemConfig",
    "FeatureOption",
    "GradientSteps",
    "IVBuildContext",
    "IVFuncID",
    "IVFuncIDLinear",
    "IVGradientPenalty",
    "IVLibraryMethod",
    "IVMethodConfig",
    "IVProblemConfig",
    "IVValuePenalty",
    "RidgeHead",
    "RidgeHeadOption",
    "as_method_config",
    "as_problem_config",
    "paper_method",
]
