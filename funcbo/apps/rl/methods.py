"""The update rules compared on the RL loop: one call per environment step.

* bilevel (``funcid``, ``funcid_identity``, ``omd``, ``omd_cg``): a library hypergradient
  estimator takes the Q-step(s) on the model's Bellman targets and returns ∇_ω of the real
  Bellman error; the model takes an optimizer step on it. One replay batch serves as inner and
  outer batch (as in OMD's code).
* ``mle``: the model is fitted to real transitions by least squares (a Gaussian likelihood with
  fixed variance), then the Q-function takes a step on the model's targets.
* ``vep``: value equivalence (Grimm et al., 2020) as in OMD's code: the model is fitted so that
  V_e(ŝ′) ≈ V_e(s′) for a fixed ensemble of random value functions, plus the reward error.
* ``model_free``: soft Q-learning on real transitions (no model), a reference.

Every rule ends with the Polyak update of the target network.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from funcbo.adjoints import NetworkAdjoint, reset_parameters
from funcbo.apps.rl.adjoint import PointwiseAdjoint
from funcbo.apps.rl.config import RLMethodConfig
from funcbo.apps.rl.networks import ScaledOutput, ValueEnsemble, polyak_update
from funcbo.apps.rl.problem import SoftBellmanProblem, with_target
from funcbo.estimator import HypergradientEstimator
from funcbo.experiments.methods import make_optimizer
from funcbo.functional import FuncID
from funcbo.linalg import CG, Identity
from funcbo.parametric import AID

Sampler = Callable[[], dict[str, Tensor]]


class Updater(ABC):
    """One learning update per environment step; owns the optimizers it steps."""

    @abstractmethod
    def update(self, sample: Sampler) -> dict[str, float]:
        """Draw batch(es) with ``sample()``, update the networks, return metrics."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Optimizer and estimator state (the networks are saved by the agent)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def q_step(
    problem: SoftBellmanProblem,
    q_inner: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    target: Tensor,
) -> tuple[float, Tensor]:
    """One optimizer step on mean ½Σ_k (Q_k(s, a) − y)² for a fixed target y.

    Returns:
        the loss and the predictions Q_k(s, a) before the step (detached).
    """
    pred = q_inner(problem.inner_input(batch))
    loss = 0.5 * (pred - target).square().sum(1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), pred.detach()


def model_errors(model: nn.Module, batch: dict[str, Any]) -> dict[str, float]:
    """Diagnostics of T_ω on real transitions: mean ‖ŝ′ − s′‖² and mean (r̂ − r)²."""
    with torch.no_grad():
        ns, r = model(batch["obs"], batch["action"])
        return {
            "model_mse": float((ns - batch["next_obs"]).square().sum(1).mean()),
            "reward_mse": float((r - batch["reward"]).square().mean()),
        }


def bellman_error(problem: SoftBellmanProblem, pred: Tensor, batch: dict[str, Any]) -> float:
    """The outer objective on a batch: mean ½Σ_k (Q_k(s, a) − y)² with the real target y."""
    with torch.no_grad():
        return float(problem.outer_loss(nn.Identity(), pred, batch).mean())


class BilevelUpdater(Updater):
    """Model update by a hypergradient estimator (FuncID or AID), then the Polyak update.

    Args:
        estimator: a library estimator over the inner model (the online Q of the taken action).
        problem: the soft Bellman bilevel problem.
        model: T_ω.
        model_optimizer: optimizer over ω.
        online_q: the online double-Q network (wrapped by the estimator's inner model).
        target_q: its Polyak average Q̄.
        tau: Polyak coefficient.
        warm_opt: keep the Q-step (and adjoint) optimizer statistics across outer steps.
    """

    def __init__(
        self,
        estimator: HypergradientEstimator,
        problem: SoftBellmanProblem,
        model: nn.Module,
        model_optimizer: torch.optim.Optimizer,
        online_q: nn.Module,
        target_q: nn.Module,
        tau: float,
        *,
        warm_opt: bool = False,
    ) -> None:
        self.estimator = estimator
        self.problem = problem
        self.model = model
        self.model_optimizer = model_optimizer
        self.online_q = online_q
        self.target_q = target_q
        self.tau = tau
        self.warm_opt = warm_opt

    def _fresh_optimizers(self) -> None:
        # OMD / FuncID reference code: Adam's statistics are re-initialised at every outer
        # step (their ``warm_opt=False``); the parameters themselves stay warm.
        est = self.estimator
        inner = getattr(est, "inner", None)
        if inner is not None:
            inner.optimizer.state.clear()
        adjoint = getattr(est, "adjoint", None)
        if isinstance(adjoint, NetworkAdjoint) and adjoint.optimizer is not None:
            adjoint.optimizer.state.clear()

    def update(self, sample: Sampler) -> dict[str, float]:
        batch = with_target(sample(), self.target_q, self.problem, self.model)
        errors = model_errors(self.model, batch)
        if not self.warm_opt:
            self._fresh_optimizers()
        self.estimator.step(self.problem, self.model, batch, batch)
        self.model_optimizer.step()
        polyak_update(self.target_q, self.online_q, self.tau)
        st = self.estimator.stats
        out = {
            "q_loss": st.get("inner_loss", float("nan")),
            "outer_loss": st.get("outer_loss", float("nan")),
            "grad_norm": st.get("grad_norm", float("nan")),
            **errors,
        }
        if "adjoint_loss" in st:
            out["adjoint_loss"] = st["adjoint_loss"]
        if "solver_iters" in st:
            out["solver_iters"] = st["solver_iters"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator.state_dict(),
            "model_optimizer": self.model_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state["estimator"])
        self.model_optimizer.load_state_dict(state["model_optimizer"])


class ModelFittingUpdater(Updater):
    """``mle`` and ``vep``: ``model_steps`` model updates on a proxy loss, then one Q-step on
    the model's targets (fresh batches for each, as in OMD's code).

    Model losses (per batch mean, summed over state coordinates):
        mle:  ‖ŝ′ − s′‖² + (r̂ − r)²
        vep:  Σ_e (V_e(ŝ′) − V_e(s′))² + (r̂ − r)²,  V_e fixed random value functions.
    """

    def __init__(
        self,
        kind: str,
        problem: SoftBellmanProblem,
        model: nn.Module,
        model_optimizer: torch.optim.Optimizer,
        q_inner: nn.Module,
        q_optimizer: torch.optim.Optimizer,
        online_q: nn.Module,
        target_q: nn.Module,
        tau: float,
        *,
        model_steps: int = 1,
        values: ValueEnsemble | None = None,
    ) -> None:
        if kind not in ("mle", "vep"):
            raise ValueError(f"ModelFittingUpdater kind must be 'mle' or 'vep', got {kind!r}")
        if kind == "vep" and values is None:
            raise ValueError("vep needs the ensemble of random value functions (values=)")
        self.kind = kind
        self.problem = problem
        self.model = model
        self.model_optimizer = model_optimizer
        self.q_inner = q_inner
        self.q_optimizer = q_optimizer
        self.online_q = online_q
        self.target_q = target_q
        self.tau = tau
        self.model_steps = model_steps
        self.values = values

    def model_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The method's model loss, and the next-state and reward squared errors."""
        ns, r = self.model(batch["obs"], batch["action"])
        mse = (ns - batch["next_obs"]).square().sum(1).mean()
        rew = (r - batch["reward"]).square().mean()
        if self.kind == "mle":
            return mse + rew, mse.detach(), rew.detach()
        assert self.values is not None
        with torch.no_grad():
            v_real = self.values(batch["next_obs"])
        v_pred = self.values(ns)
        loss = (v_pred - v_real).square().mean(dim=(1, 2)).sum() + rew
        return loss, mse.detach(), rew.detach()

    def update(self, sample: Sampler) -> dict[str, float]:
        for _ in range(self.model_steps):
            loss, mse, rew = self.model_loss(sample())
            self.model_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.model_optimizer.step()
        batch = with_target(sample(), self.target_q)
        with torch.no_grad():
            y = self.problem.model_target(self.model, batch)
        q_loss, pred = q_step(self.problem, self.q_inner, self.q_optimizer, batch, y)
        polyak_update(self.target_q, self.online_q, self.tau)
        return {
            "q_loss": q_loss,
            "outer_loss": bellman_error(self.problem, pred, batch),
            "model_loss": float(loss.detach()),
            "model_mse": float(mse),
            "reward_mse": float(rew),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "model_optimizer": self.model_optimizer.state_dict(),
            "q_optimizer": self.q_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model_optimizer.load_state_dict(state["model_optimizer"])
        self.q_optimizer.load_state_dict(state["q_optimizer"])


class ModelFreeUpdater(Updater):
    """Soft Q-learning on real transitions: one Q-step on y = r + γ(1 − d)V̄(s′)."""

    def __init__(
        self,
        problem: SoftBellmanProblem,
        q_inner: nn.Module,
        q_optimizer: torch.optim.Optimizer,
        online_q: nn.Module,
        target_q: nn.Module,
        tau: float,
    ) -> None:
        self.problem = problem
        self.q_inner = q_inner
        self.q_optimizer = q_optimizer
        self.online_q = online_q
        self.target_q = target_q
        self.tau = tau

    def update(self, sample: Sampler) -> dict[str, float]:
        batch = with_target(sample(), self.target_q)
        y = self.problem.real_target(batch)
        q_loss, _ = q_step(self.problem, self.q_inner, self.q_optimizer, batch, y)
        polyak_update(self.target_q, self.online_q, self.tau)
        # the Q-step's own loss is the real Bellman error here
        return {"q_loss": q_loss, "outer_loss": q_loss}

    def state_dict(self) -> dict[str, Any]:
        return {"q_optimizer": self.q_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q_optimizer.load_state_dict(state["q_optimizer"])


def build_estimator(
    cfg: RLMethodConfig, q_inner: nn.Module, batch_size: int = 256
) -> HypergradientEstimator:
    """The library estimator of a bilevel RL method over the inner model ``q_inner``.

    ``funcid``: FuncID with a :class:`~funcbo.NetworkAdjoint` of the inner model's architecture
    (a fresh copy taking (s, a), its output scaled by ``cfg.adjoint_scale`` or, when that is
    None, by ``batch_size``: see :class:`ScaledOutput`); ``funcid_identity``: FuncID with
    :class:`PointwiseAdjoint` (a = −g); ``omd``: AID with the identity "inverse Hessian";
    ``omd_cg``: AID with damped CG. Initialisations draw from the global torch generator.
    """
    inner_opt = make_optimizer(
        cfg.inner_optimizer, q_inner.parameters(), cfg.inner_lr, cfg.inner_weight_decay
    )
    if cfg.kind == "funcid":
        net = copy.deepcopy(q_inner)
        if cfg.adjoint_init == "fresh":
            reset_parameters(net)
        elif cfg.adjoint_init != "inner":
            raise ValueError(f"adjoint_init must be 'fresh' or 'inner', got {cfg.adjoint_init!r}")
        scale = float(batch_size) if cfg.adjoint_scale is None else cfg.adjoint_scale
        adjoint = NetworkAdjoint(
            ScaledOutput(net, scale),
            lambda ps: make_optimizer(cfg.adjoint_optimizer, ps, cfg.adjoint_lr),
            cfg.adjoint_steps,
        )
        return FuncID(q_inner, inner_opt, cfg.inner_steps, adjoint)
    if cfg.kind == "funcid_identity":
        return FuncID(q_inner, inner_opt, cfg.inner_steps, PointwiseAdjoint())
    if cfg.kind == "omd":
        return AID(q_inner, inner_opt, cfg.inner_steps, solver=Identity(), warm_start=False)
    if cfg.kind == "omd_cg":
        solver = CG(maxiter=cfg.solver_iters, damping=cfg.cg_damping)
        return AID(q_inner, inner_opt, cfg.inner_steps, solver=solver, warm_start=cfg.cg_warm_start)
    raise ValueError(f"method kind {cfg.kind!r} does not use a hypergradient estimator")


__all__ = [
    "BilevelUpdater",
    "ModelFittingUpdater",
    "ModelFreeUpdater",
    "Updater",
    "bellman_error",
    "build_estimator",
    "model_errors",
    "q_step",
]
