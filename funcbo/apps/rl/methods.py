"""The update rules compared on the RL loop: one call per environment step.

* bilevel (the ``funcid_*`` variants, ``omd``, ``omd_cg``): Q-step(s) on the model's Bellman
  targets, the Polyak update, then a library hypergradient estimator returns ∇_ω of the real
  Bellman error; the model takes an optimizer step on it. One replay batch serves as inner and
  outer batch (as in OMD's code).
* ``mle``: the model is fitted to real transitions by least squares (a Gaussian likelihood with
  fixed variance), then the Q-function takes a step on the model's targets.
* ``vep``: value equivalence (Grimm et al., 2020) as in OMD's code: the model is fitted so that
  V_e(ŝ′) ≈ V_e(s′) for a fixed ensemble of random value functions, plus the reward error.
* ``model_free``: soft Q-learning on real transitions (no model), a reference.

Every rule updates the target network right after the Q-step, as the reference code does.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from funcbo.adjoints import Adjoint, AdjointStats, NetworkAdjoint, reset_parameters
from funcbo.apps.rl.adjoint import PointwiseAdjoint
from funcbo.apps.rl.config import FuncIDNetworkRL, RLBilevelMethod
from funcbo.apps.rl.networks import EnsembleLinear, ScaledOutput, ValueEnsemble, polyak_update
from funcbo.apps.rl.problem import SoftBellmanProblem, model_target_value, with_target
from funcbo.apps.rl.solution import BellmanSolution, NoInnerSteps, SolutionProblem, StateActionInput
from funcbo.estimator import ImplicitEstimator, ImplicitStats
from funcbo.experiments.methods import make_optimizer as _make_optimizer
from funcbo.functional import FuncID, FuncIDStats
from funcbo.inner import InnerSolver
from funcbo.linalg import CG
from funcbo.parametric import AIDStats

Sampler = Callable[[], dict[str, Tensor]]


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The experiment layer's optimizer, with Adam's fused kernel.

    The networks here are a handful of small tensors, stepped once per environment step: the
    per-tensor Python loop of the default Adam costs more than the arithmetic, and the fused
    kernel does the same update in one call (numerically equal to rounding).
    """
    if name.lower() == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    return _make_optimizer(name, params, lr, weight_decay)


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


def model_errors(
    model: nn.Module, batch: dict[str, Any], outputs: tuple[Tensor, Tensor] | None = None
) -> dict[str, float]:
    """Diagnostics of T_ω on real transitions: mean ‖ŝ′ − s′‖² and mean (r̂ − r)².

    ``outputs``: T_ω(s, a) on the batch, when already computed.
    """
    with torch.no_grad():
        ns, r = model(batch["obs"], batch["action"]) if outputs is None else outputs
        return {
            "model_mse": float((ns - batch["next_obs"]).square().sum(1).mean()),
            "reward_mse": float((r - batch["reward"]).square().mean()),
        }


def bellman_error(problem: SoftBellmanProblem, pred: Tensor, batch: dict[str, Any]) -> float:
    """The outer objective on a batch: mean ½Σ_k (Q_k(s, a) − y)² with the real target y."""
    with torch.no_grad():
        return float(problem.outer_loss(nn.Identity(), pred, batch).mean())


class BilevelUpdater(Updater):
    """Q-step(s) on the model's targets, Polyak update, then the model's hypergradient step.

    The order follows the reference code (OMD's and FuncID's ``fwd_solver``): the target network
    is updated right after the Q-steps, and the hypergradient (and the real Bellman error it
    differentiates) uses the updated target network.

    Args:
        inner: the inner solver taking the Q-steps on the online Q of the taken action.
        estimator: a library estimator whose :meth:`hypergradient` gives ∇_ω of the real
            Bellman error (its inner model is the Q-network, or the inner solution h*).
        problem: the soft Bellman bilevel problem of the Q-steps.
        hypergradient_problem: the problem the hypergradient is taken on (``problem`` itself,
            its ``next_value="real"`` version, or the :class:`SolutionProblem`).
        model: T_ω.
        model_optimizer: optimizer over ω.
        online_q: the online double-Q network (wrapped by the estimator's inner model).
        target_q: its Polyak average Q̄.
        tau: Polyak coefficient.
        warm_opt: keep the Q-step (and adjoint) optimizer statistics across outer steps.
    """

    def __init__(
        self,
        inner: InnerSolver,
        estimator: ImplicitEstimator,
        problem: SoftBellmanProblem,
        hypergradient_problem: SoftBellmanProblem,
        model: nn.Module,
        model_optimizer: torch.optim.Optimizer,
        online_q: nn.Module,
        target_q: nn.Module,
        tau: float,
        *,
        warm_opt: bool = False,
    ) -> None:
        self.inner = inner
        self.estimator = estimator
        self.problem = problem
        self.hypergradient_problem = hypergradient_problem
        self.model = model
        self.model_optimizer = model_optimizer
        self.online_q = online_q
        self.target_q = target_q
        self.tau = tau
        self.warm_opt = warm_opt
        # FuncID at h*: the estimator's outer loss is F(ω) at h*, not the Q-network's error
        self._solution = getattr(estimator, "inner", None) is not inner

    def _fresh_optimizers(self) -> None:
        # OMD / FuncID reference code: Adam's statistics are re-initialised at every outer
        # step (their ``warm_opt=False``); the parameters themselves stay warm.
        self.inner.optimizer.state.clear()
        adjoint = getattr(self.estimator, "adjoint", None)
        if isinstance(adjoint, NetworkAdjoint) and adjoint.optimizer is not None:
            adjoint.optimizer.state.clear()

    def _remember_solution(self, hp: SoftBellmanProblem, hb: dict[str, Any]) -> None:
        # h* at the batch is the model target ŷ that ``with_target`` just cached: hand its
        # value to the inner solution so that the estimator does not recompute it
        sol = getattr(self.estimator, "inner_model", None)
        y = model_target_value(hb)
        if isinstance(sol, BellmanSolution) and y is not None:
            sol.remember(hp.inner_input(hb), y)

    def update(self, sample: Sampler) -> dict[str, float]:
        raw = sample()
        # T_ω(s, a) once, with its graph: ω does not change before the hypergradient, whose
        # model target reuses it; the Q-steps and the diagnostics take it detached.
        outputs = self.model(raw["obs"], raw["action"])
        detached = (outputs[0].detach(), outputs[1].detach())
        with torch.no_grad():  # the Q-steps need the model's targets, not their graph
            batch = with_target(
                raw, self.target_q, self.problem, self.model, real=False, model_outputs=detached
            )
        errors = model_errors(self.model, raw, detached)
        if not self.warm_opt:
            self._fresh_optimizers()
        q_loss = self.inner.run(self.problem, self.model, [batch])
        polyak_update(self.target_q, self.online_q, self.tau)
        hp = self.hypergradient_problem
        hb = with_target(raw, self.target_q, hp, self.model, model_outputs=outputs)
        if self._solution:
            self._remember_solution(hp, hb)
        self.estimator.hypergradient(hp, self.model, hb, hb)
        self.model_optimizer.step()
        d = self.estimator.diagnostics
        assert isinstance(d, ImplicitStats)
        out = {"q_loss": q_loss, "grad_norm": d.grad_norm, **errors}
        if self._solution:
            with torch.no_grad():
                pred = self.inner.model(self.problem.inner_input(hb))
            out["outer_loss"] = bellman_error(self.problem, pred, hb)
            out["solution_outer_loss"] = d.outer_loss
        else:
            out["outer_loss"] = d.outer_loss
        if isinstance(d, FuncIDStats) and isinstance(d.adjoint, AdjointStats):
            out["adjoint_loss"] = d.adjoint.loss
        if isinstance(d, AIDStats):
            out["solver_iters"] = float(d.solve.iterations)
            if isinstance(getattr(self.estimator, "solver", None), CG):
                # omd_cg: how the solve went (a gave-up solve has no implicit term)
                out["solver_residual"] = d.solve.residual
                out["solver_gave_up"] = float(d.solve.gave_up)
                out["solver_diverged"] = float(d.solve.diverged)
                out["dual_norm"] = d.dual_norm
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "estimator": self.estimator.state_dict(),
            "model_optimizer": self.model_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.estimator.load_state_dict(state["estimator"])
        self.model_optimizer.load_state_dict(state["model_optimizer"])


class ModelFittingUpdater(Updater):
    """``mle`` and ``vep``: ``model_steps`` model updates on a proxy loss, then one Q-step on
    the model's targets (fresh batches for each, as in OMD's code).

    Model losses (per batch mean, summed over state coordinates):
        mle:  ‖ŝ′ − s′‖² + (r̂ − r)²
        vep:  Σ_e (V_e(ŝ′) − V_e(s′))² + (r̂ − r)²,  V_e fixed random value functions.

    ``vep`` is OMD's ``loss_vep`` and ``update`` (``cartpole/omd.py``): from the same parameters
    and batches it gives the authors' losses and parameters to float64 rounding
    (``tests/test_rl_methods.py``). VEP does not pull ŝ′ towards s′, only the five values
    V_e(ŝ′), so ŝ′ may leave the visited states; on some seeds the target network then values
    ŝ′ above s′ (γ·V̄(ŝ′)/V̄(s′) ≈ 1.3) and the Q-values grow geometrically. The authors' code
    diverges the same way on some seeds (h = 3).
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


def pointwise_funcid(
    cfg: RLBilevelMethod,
    problem: SoftBellmanProblem,
    q_inner: nn.Module,
    model: nn.Module,
    target_q: nn.Module,
    batch_size: int = 256,
) -> tuple[InnerSolver, ImplicitEstimator, SoftBellmanProblem]:
    """The Q-step solver, estimator and problem of the FuncID kinds with a pointwise adjoint.

    * ``funcid_reference``: FuncID, :class:`PointwiseAdjoint` (a = −g at the Q-network's
      prediction), on ``problem`` with ``next_value="real"`` (reward head only);
    * ``funcid_identity``: the same on ``problem`` (both heads);
    * ``funcid_solution``: FuncID whose inner model is h* (:class:`BellmanSolution`) with the
      pointwise adjoint a* = −(ŷ − y): the exact hypergradient of the batch's problem.
    """
    inner_opt = cfg.q_optimizer(q_inner.parameters())
    kind = cfg.kind
    if kind == "funcid_solution":
        return _at_solution(cfg, problem, q_inner, model, target_q, inner_opt, PointwiseAdjoint)
    est = FuncID(q_inner, inner_opt, cfg.inner_steps, PointwiseAdjoint())
    hp = problem.with_next_value("real") if kind == "funcid_reference" else problem
    return est.inner, est, hp


def network_funcid(
    cfg: FuncIDNetworkRL,
    problem: SoftBellmanProblem,
    q_inner: nn.Module,
    model: nn.Module,
    target_q: nn.Module,
    batch_size: int = 256,
) -> tuple[InnerSolver, ImplicitEstimator, SoftBellmanProblem]:
    """``funcid_network``: FuncID with a :class:`~funcbo.NetworkAdjoint` of the Q-network's
    architecture (output scaled by ``cfg.adjoint_scale``, default the batch size: see
    :class:`ScaledOutput`), fitted to g at h* (``adjoint_at="solution"``) or at the Q-network's
    prediction. Initialisations draw from the global torch generator."""
    inner_opt = cfg.q_optimizer(q_inner.parameters())
    if cfg.adjoint_at == "solution":

        def adjoint_at_solution() -> Adjoint:
            return _adjoint_network(cfg, q_inner, batch_size, state_action_input=True)

        return _at_solution(cfg, problem, q_inner, model, target_q, inner_opt, adjoint_at_solution)
    adjoint = _adjoint_network(cfg, q_inner, batch_size, state_action_input=False)
    est = FuncID(q_inner, inner_opt, cfg.inner_steps, adjoint)
    return est.inner, est, problem


def _at_solution(
    cfg: RLBilevelMethod,
    problem: SoftBellmanProblem,
    q_inner: nn.Module,
    model: nn.Module,
    target_q: nn.Module,
    inner_opt: torch.optim.Optimizer,
    make_adjoint: Callable[[], Adjoint],
) -> tuple[InnerSolver, ImplicitEstimator, SoftBellmanProblem]:
    """FuncID whose inner model is the inner solution h* (the Q-steps taken separately)."""
    heads = int(getattr(getattr(q_inner, "q", None), "heads", 2))
    inner = InnerSolver(q_inner, inner_opt, cfg.inner_steps)
    sol = BellmanSolution(problem, model, target_q, heads)
    adjoint = make_adjoint()  # after the solution, in the former initialisation order
    est = FuncID(sol, None, adjoint=adjoint, inner_solver=NoInnerSteps(sol))
    return inner, est, SolutionProblem.like(problem)


def _adjoint_network(
    cfg: FuncIDNetworkRL, q_inner: nn.Module, batch_size: int, *, state_action_input: bool
) -> NetworkAdjoint:
    net = copy.deepcopy(q_inner)
    if cfg.adjoint_init in ("fresh", "zero"):
        reset_parameters(net)
    if cfg.adjoint_init == "zero":
        last = [m for m in net.modules() if isinstance(m, EnsembleLinear)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
    scale = float(batch_size) if cfg.adjoint_scale is None else cfg.adjoint_scale
    module: nn.Module = ScaledOutput(net, scale)
    if state_action_input:
        module = StateActionInput(module)
    return NetworkAdjoint(
        module,
        lambda ps: make_optimizer(
            cfg.adjoint_optimizer, ps, cfg.adjoint_lr, cfg.adjoint_weight_decay
        ),
        cfg.adjoint_steps,
    )


__all__ = [
    "BilevelUpdater",
    "ModelFittingUpdater",
    "ModelFreeUpdater",
    "Updater",
    "bellman_error",
    "make_optimizer",
    "model_errors",
    "network_funcid",
    "pointwise_funcid",
    "q_step",
]
