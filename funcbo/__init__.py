"""funcbo: functional bilevel optimization for machine learning, in PyTorch.

The public namespace re-exports the library's building blocks:

* problems: :class:`BilevelProblem` (per-sample inner/outer losses on predictions);
* estimators of ∇F(ω): :class:`FuncID` with :class:`LinearAdjoint` or :class:`NetworkAdjoint`,
  and the baselines :class:`AID`, :class:`ITD`, :class:`GradientPenalty`, :class:`ValuePenalty`;
* linear solvers passed as values: :class:`CG`, :class:`Neumann`, :class:`Identity`;
* the outer loop: :class:`Trainer` with :class:`ProgressBar`, :class:`JSONLLogger`,
  :class:`Checkpoint` and :class:`TensorBoardLogger` callbacks.
"""

from funcbo.adjoints import Adjoint, AdjointProblem, LinearAdjoint, NetworkAdjoint
from funcbo.errors import (
    BilevelError,
    EmptyBatchError,
    NonFiniteLossError,
    NotStronglyConvexError,
    ShapeError,
)
from funcbo.estimator import HypergradientEstimator
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

__version__ = "0.1.0"

__all__ = [
    "AID",
    "CG",
    "ITD",
    "Adjoint",
    "AdjointProblem",
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
