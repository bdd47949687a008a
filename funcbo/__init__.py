"""funcbo: functional bilevel optimization for machine learning, in PyTorch.

The public namespace re-exports the library's building blocks:

* problems: :class:`BilevelProblem` (per-sample inner/outer losses on predictions);
* estimators of ∇F(ω): :class:`FuncID` with :class:`LinearAdjoint` or :class:`NetworkAdjoint`,
  and the baselines :class:`AID`, :class:`ITD`, :class:`GradientPenalty`, :class:`ValuePenalty`;
* linear solvers passed as values: :class:`CG`, :class:`Neumann`, :class:`Identity`;
* the outer loop: :class:`Trainer` with :class:`ProgressBar`, :class:`JSONLLogger`,
  :class:`Checkpoint` and :class:`TensorBoardLogger` callbacks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from funcbo.adjoints import Adjoint, AdjointProblem, LinearAdjoint, NetworkAdjoint
    from funcbo.errors import (
        BilevelError,
        EmptyBatchError,
        NonFiniteLossError,
        NotStronglyConvexError,
        ShapeError,
    )
    from funcbo.estimator import Batches, HypergradientEstimator
    from funcbo.functional import FuncID
    from funcbo.inner import InnerSolver
    from funcbo.linalg import CG, Identity, Neumann, OutputHessian
    from funcbo.parametric import AID, ITD
    from funcbo.penalty import GradientPenalty, ValuePenalty
    from funcbo.problem import BilevelProblem
    from funcbo.trainer import (
        Callback,
        Checkpoint,
        JSONLLogger,
        ProgressBar,
        TensorBoardLogger,
        Trainer,
    )

#: public name -> the module defining it; imported on first use, so that commands that do not
#: compute (``funcbo --help``, ``funcbo list``) start without importing torch
_EXPORTS = {
    "AID": "funcbo.parametric",
    "CG": "funcbo.linalg",
    "ITD": "funcbo.parametric",
    "Adjoint": "funcbo.adjoints",
    "AdjointProblem": "funcbo.adjoints",
    "Batches": "funcbo.estimator",
    "BilevelError": "funcbo.errors",
    "BilevelProblem": "funcbo.problem",
    "Callback": "funcbo.trainer",
    "Checkpoint": "funcbo.trainer",
    "EmptyBatchError": "funcbo.errors",
    "FuncID": "funcbo.functional",
    "GradientPenalty": "funcbo.penalty",
    "HypergradientEstimator": "funcbo.estimator",
    "Identity": "funcbo.linalg",
    "InnerSolver": "funcbo.inner",
    "JSONLLogger": "funcbo.trainer",
    "LinearAdjoint": "funcbo.adjoints",
    "NetworkAdjoint": "funcbo.adjoints",
    "Neumann": "funcbo.linalg",
    "NonFiniteLossError": "funcbo.errors",
    "NotStronglyConvexError": "funcbo.errors",
    "OutputHessian": "funcbo.linalg",
    "ProgressBar": "funcbo.trainer",
    "ShapeError": "funcbo.errors",
    "TensorBoardLogger": "funcbo.trainer",
    "Trainer": "funcbo.trainer",
    "ValuePenalty": "funcbo.penalty",
}


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule such as ``funcbo.distributed``) on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "AID",
    "CG",
    "ITD",
    "Adjoint",
    "AdjointProblem",
    "Batches",
    "BilevelError",
    "BilevelProblem",
    "Callback",
    "Checkpoint",
    "EmptyBatchError",
    "FuncID",
    "GradientPenalty",
    "HypergradientEstimator",
    "Identity",
    "InnerSolver",
    "JSONLLogger",
    "LinearAdjoint",
    "NetworkAdjoint",
    "Neumann",
    "NonFiniteLossError",
    "NotStronglyConvexError",
    "OutputHessian",
    "ProgressBar",
    "ShapeError",
    "TensorBoardLogger",
    "Trainer",
    "ValuePenalty",
    "__version__",
]
