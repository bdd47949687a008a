"""Method configurations and the estimators they build.

A method is a value of :class:`MethodConfig` (one entry of an experiment's ``methods:`` mapping):
its ``kind`` names the algorithm and the remaining fields its hyperparameters. Applications may
subclass :class:`MethodConfig` to add fields, and may define kinds of their own (DFIV, MLE, ...);
:func:`build_estimator` covers the library's estimators.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from funcbo.adjoints import LinearAdjoint, NetworkAdjoint
from funcbo.estimator import HypergradientEstimator
from funcbo.experiments.task import LIBRARY_KINDS
from funcbo.functional import FuncID
from funcbo.inner import InnerSolver
from funcbo.linalg import CG, Identity, Neumann
from funcbo.parametric import AID, ITD
from funcbo.penalty import GradientPenalty, ValuePenalty


@dataclass
class MethodConfig:
    """Hyperparameters of one method.

    Attributes:
        kind: algorithm: ``funcid`` (network adjoint), ``funcid_linear`` (closed-form adjoint),
            ``aid``, ``itd``, ``gradient_penalty``, ``value_penalty``, or an application's own.
        inner_optimizer, inner_lr, inner_steps, inner_weight_decay: the inner θ-steps.
        outer_optimizer, outer_lr, outer_weight_decay: the outer step on ω.
        adjoint_optimizer, adjoint_lr, adjoint_weight_decay, adjoint_steps, adjoint_init,
            adjoint_holdout: the network adjoint (FuncID; see :class:`funcbo.NetworkAdjoint`).
        ridge, ridge_relative: ridge of the closed-form linear adjoint, relative to the feature
            scale (default) or absolute (``ridge_relative: false``).
        solver, solver_iters, neumann_lr: AID's linear solver (``cg``, ``neumann``, ``identity``).
        damping: CG solves (H + damping·I) v = b: keeps AID stable when the parameter-space
            Hessian of an over-parameterised inner network is singular or indefinite.
        cg_safeguards: CG's safeguards (reset a bad warm start, fall back to the best iterate;
            see :class:`funcbo.linalg.CG`); False: textbook CG returning its last iterate.
        unroll, truncate: ITD's unrolled steps (its learning rate is ``inner_lr``).
        penalty: γ of the penalty methods.
        options: free-form extras for an application's own kinds.
    """

    kind: str = "funcid_linear"
    inner_optimizer: str = "adam"
    inner_lr: float = 1e-3
    inner_steps: int = 10
    inner_weight_decay: float = 0.0
    outer_optimizer: str = "adam"
    outer_lr: float = 1e-3
    outer_weight_decay: float = 0.0
    adjoint_optimizer: str = "adam"
    adjoint_lr: float = 1e-3
    adjoint_weight_decay: float = 0.0
    adjoint_steps: int = 10
    adjoint_init: str = "fresh"
    adjoint_holdout: float = 0.0
    ridge: float = 1e-6
    ridge_relative: bool = True
    solver: str = "cg"
    solver_iters: int = 10
    neumann_lr: float = 0.1
    damping: float = 0.0
    cg_safeguards: bool = True
    unroll: int = 10
    truncate: int | None = None
    penalty: float = 10.0
    options: dict[str, Any] = field(default_factory=dict)


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``adam``, ``adamw`` or ``sgd`` (momentum 0.9 for ``sgd_momentum``) over ``params``."""
    name = name.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use adam, adamw, sgd or sgd_momentum")


def build_estimator(
    cfg: MethodConfig,
    inner_model: nn.Module,
    *,
    adjoint_model: nn.Module | None = None,
    linear_head: nn.Module | str | None = None,
    inner_solver: InnerSolver | None = None,
) -> HypergradientEstimator:
    """The library estimator a method config describes, over ``inner_model``.

    Args:
        cfg: the method.
        inner_model: the network h_θ.
        adjoint_model: the adjoint network for ``funcid`` (default: a fresh copy of the inner
            model's architecture).
        linear_head: the module whose input the linear adjoint uses as features (default: the
            inner model's last ``nn.Linear``).
        inner_solver: an inner solver replacing the default optimizer steps (FuncID and AID).
    """
    kind = cfg.kind
    if kind not in LIBRARY_KINDS:
        raise ValueError(
            f"method kind {kind!r} is not a library estimator ({', '.join(LIBRARY_KINDS)})"
        )
    if inner_solver is not None and kind not in ("funcid", "funcid_linear", "aid"):
        raise ValueError(f"method kind {kind!r} does not take a replacement inner solver")
    if kind == "itd":
        return ITD(inner_model, lr=cfg.inner_lr, unroll=cfg.unroll, truncate=cfg.truncate)
    inner_opt = (
        None
        if inner_solver is not None
        else make_optimizer(
            cfg.inner_optimizer, inner_model.parameters(), cfg.inner_lr, cfg.inner_weight_decay
        )
    )
    if kind == "funcid":
        adjoint = NetworkAdjoint(
            adjoint_model,
            lambda ps: make_optimizer(
                cfg.adjoint_optimizer, ps, cfg.adjoint_lr, cfg.adjoint_weight_decay
            ),
            cfg.adjoint_steps,
            init=cfg.adjoint_init,
            holdout=cfg.adjoint_holdout,
        )
        return FuncID(inner_model, inner_opt, cfg.inner_steps, adjoint, inner_solver=inner_solver)
    if kind == "funcid_linear":
        adjoint_lin = LinearAdjoint(cfg.ridge, head=linear_head, relative=cfg.ridge_relative)
        return FuncID(
            inner_model, inner_opt, cfg.inner_steps, adjoint_lin, inner_solver=inner_solver
        )
    if kind == "aid":
        solver: CG | Neumann | Identity
        if cfg.solver == "cg":
            solver = CG(maxiter=cfg.solver_iters, damping=cfg.damping, safeguards=cfg.cg_safeguards)
        elif cfg.solver == "neumann":
            solver = Neumann(iters=cfg.solver_iters, lr=cfg.neumann_lr)
        elif cfg.solver == "identity":
            solver = Identity()
        else:
            raise ValueError(f"unknown AID solver {cfg.solver!r}; use cg, neumann or identity")
        return AID(
            inner_model, inner_opt, cfg.inner_steps, solver=solver, inner_solver=inner_solver
        )
    if kind == "gradient_penalty":
        return GradientPenalty(inner_model, inner_opt, cfg.inner_steps, penalty=cfg.penalty)
    return ValuePenalty(inner_model, inner_opt, cfg.inner_steps, penalty=cfg.penalty)


__all__ = ["LIBRARY_KINDS", "MethodConfig", "build_estimator", "make_optimizer"]
