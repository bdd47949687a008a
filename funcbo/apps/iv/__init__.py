"""Instrumental-variable regression: two-stage least squares as a functional bilevel problem.

The benchmark of DFIV (Xu et al., ICLR 2021) and of the FuncID paper: treatment features ψ_ω(t)
are the outer variable, the inner model h(x) regresses them on the instrument
(h*_ω(x) = E[ψ_ω(t) | x]), and the outer loss fits the outcome from h*_ω(x).

* data: :func:`dsprites_data` (procedural dSprites renderer or the real archive, the DFIV
  data-generating process and its 588-point test grid), :func:`demand_data` (the demand design);
* :func:`build_iv_networks`, :class:`IVProblem`, the paper's inner solver
  :class:`RidgeHeadInnerSolver`, the :class:`DFIV` baseline and the evaluation
  :func:`out_of_sample_mse` (closed-form refit of both stages);
* :class:`IVTask` runs any of the seven methods (``funcid``, ``funcid_linear``, ``dfiv``,
  ``aid``, ``itd``, ``gradient_penalty``, ``value_penalty``); importing
  :mod:`funcbo.apps.iv.experiment` registers the experiments ``iv_dsprites`` and ``iv_demand``.
"""

from funcbo.apps.iv.config import (
    IV_KINDS,
    PAPER_METHODS,
    DemandProblemConfig,
    IVMethodConfig,
    IVProblemConfig,
    paper_method,
)
from funcbo.apps.iv.data import IVData, IVSplit, IVTensors, IVTestSet, dsprites_data
from funcbo.apps.iv.demand import demand_data
from funcbo.apps.iv.dfiv import DFIV
from funcbo.apps.iv.dsprites import (
    ArchiveError,
    DSpritesArchive,
    make_source,
    pixel_mismatch,
    render,
    render_classes,
)
from funcbo.apps.iv.evaluate import out_of_sample_mse
from funcbo.apps.iv.inner import RidgeHeadInnerSolver
from funcbo.apps.iv.networks import InstrumentModel, IVOuter, build_iv_networks
from funcbo.apps.iv.problem import IVProblem
from funcbo.apps.iv.task import IVTask, make_dataset

__all__ = [
    "DFIV",
    "IV_KINDS",
    "PAPER_METHODS",
    "ArchiveError",
    "DSpritesArchive",
    "DemandProblemConfig",
    "IVData",
    "IVMethodConfig",
    "IVOuter",
    "IVProblem",
    "IVProblemConfig",
    "IVSplit",
    "IVTask",
    "IVTensors",
    "IVTestSet",
    "InstrumentModel",
    "RidgeHeadInnerSolver",
    "build_iv_networks",
    "demand_data",
    "dsprites_data",
    "make_dataset",
    "make_source",
    "out_of_sample_mse",
    "paper_method",
    "pixel_mismatch",
    "render",
    "render_classes",
]
