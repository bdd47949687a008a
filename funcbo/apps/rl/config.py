"""Typed configuration of the model-based RL experiment: the ``problem:`` section and methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from funcbo.experiments.methods import LEGACY_FIELDS, MethodSpec, register_method
from funcbo.linalg import CG

#: FuncID variants (see ``RLMethodConfig.kind``)
FUNCID_KINDS = ("funcid_reference", "funcid_solution", "funcid_network", "funcid_identity")
#: method kinds of this application
RL_KINDS = (*FUNCID_KINDS, "omd", "omd_cg", "mle", "vep", "model_free")
#: kinds whose model gradient comes from a library hypergradient estimator
BILEVEL_KINDS = (*FUNCID_KINDS, "omd", "omd_cg")
#: where FuncID's adjoint network reads the outer gradient g = ∂_v ℓ_out
ADJOINT_AT = ("solution", "prediction")


@dataclass
class RLProblemConfig:
    """The environment and the agent shared by every method (the ``problem:`` section).

    The run length and the evaluation period are the config's top-level ``iterations`` (one
    iteration = one environment step) and ``eval_every``.

    Attributes:
        env_id: gymnasium environment (discrete actions; CartPole-v1).
        max_episode_steps: time limit (None: the environment's default, 500 for CartPole-v1).
        init_steps: uniformly random steps before learning starts.
        eps: probability of a uniformly random action after that.
        alpha: temperature of the soft value and of the softmax(Q/α) policy.
        gamma: discount.
        batch_size: transitions per update (one update per environment step).
        buffer_capacity: replay capacity.
        tau: Polyak coefficient of the target network, Q̄ ← τQ + (1 − τ)Q̄.
        q_hidden: width of the Q-network's hidden layers.
        model_hidden: width h of the model's hidden layers (3: capacity-limited; 32: ample).
        predict_delta: the model predicts s′ − s instead of s′ (OMD predicts s′).
        target: soft-value target of double Q: ``"min"`` over heads (OMD) or ``"per_head"``.
        act_with: network of the behaviour/evaluation policy softmax(Q/α): ``"online"`` (OMD's
            code) or ``"target"`` (Q̄).
        vep_members: number of random value functions of VEP.
        eval_episodes: episodes per evaluation (on a separate environment, no ε).
    """

    env_id: str = "CartPole-v1"
    max_episode_steps: int | None = None
    init_steps: int = 1000
    eps: float = 0.1
    alpha: float = 0.01
    gamma: float = 0.99
    batch_size: int = 256
    buffer_capacity: int = 200_000
    tau: float = 0.01
    q_hidden: int = 32
    model_hidden: int = 3
    predict_delta: bool = False
    target: Literal["min", "per_head"] = "min"
    act_with: Literal["online", "target"] = "online"
    vep_members: int = 5
    eval_episodes: int = 10

    def __post_init__(self) -> None:
        if self.init_steps < 0 or self.batch_size < 1 or self.eval_episodes < 1:
            raise ValueError(
                "RL config: init_steps must be ≥ 0, batch_size and eval_episodes ≥ 1 "
                f"(got {self.init_steps}, {self.batch_size}, {self.eval_episodes})"
            )
        if not 0.0 <= self.eps <= 1.0:
            raise ValueError(f"RL config: eps must be in [0, 1], got {self.eps}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"RL config: tau must be in (0, 1], got {self.tau}")
        if self.act_with not in ("online", "target"):
            raise ValueError(
                f"RL config: act_with must be 'online' or 'target', got {self.act_with!r}"
            )
        if self.target not in ("min", "per_head"):
            raise ValueError(f"RL config: target must be 'min' or 'per_head', got {self.target!r}")


#: the RL fields of the former flat method record (see ``translate_legacy``)
RL_LEGACY_FIELDS = (
    *LEGACY_FIELDS,
    "warm_opt",
    "cg_damping",
    "cg_warm_start",
    "model_steps",
    "adjoint_scale",
    "adjoint_at",
)


@dataclass
class RLBuildContext:
    """What an RL method's update rule is built over (made by the unbatched
    :class:`~funcbo.apps.rl.agent.Agent`).

    Attributes:
        config: the protocol.
        problem: the soft Bellman problem.
        q, q_inner, target_q: the double Q-network, its Q-of-the-taken-action view, its target.
        model: the dynamics model (None for ``model_free``).
        values: VEP's random value ensemble (None otherwise).
    """

    config: RLProblemConfig
    problem: Any
    q: Any
    q_inner: Any
    target_q: Any
    model: Any = None
    values: Any = None


@dataclass
class RLMethodConfig(MethodSpec):
    """Base of the RL experiment's methods (kinds in scope ``"rl"``; defaults: the paper's
    hyperparameters). ``RLMethodConfig(kind="omd", inner_lr=1e-3)`` builds the registered spec
    of that kind (``RLMethodConfig()``: the authors' FuncID, ``funcid_reference``).

    The kinds: the FuncID variants ``funcid_reference`` (the authors' code, what the paper
    ran: adjoint a = −g at the Q-network's prediction, identity output Hessian, and V̄ at the
    *real* s′ in the cross derivative, so only the reward head gets a hypergradient),
    ``funcid_solution`` (adjoint at the function-space inner solution h* = ŷ, both heads: the
    exact hypergradient of the empirical problem), ``funcid_network`` (an adjoint network fitted
    to the same target, both heads; see ``adjoint_at``), ``funcid_identity`` (a = −g at the
    Q-network's prediction with both heads: the earlier variant, which diverges; kept as a
    counter-example); and ``omd`` (parameter-space implicit differentiation, identity inverse
    Hessian), ``omd_cg`` (same with CG), ``mle`` (model by maximum likelihood), ``vep`` (value
    equivalence), ``model_free`` (soft Q-learning on real transitions).

    Attributes:
        inner_optimizer, inner_lr, inner_weight_decay: the Q-function's optimizer (Adam 3e-4).
    """

    scope: ClassVar[str] = "rl"
    default_kind: ClassVar[str] = "funcid_reference"
    legacy_fields: ClassVar[tuple[str, ...]] = RL_LEGACY_FIELDS
    inner_optimizer: str = "adam"
    inner_lr: float = 3e-4
    inner_weight_decay: float = 0.0

    def build(self, context: RLBuildContext) -> Any:
        """The method's update rule (:class:`~funcbo.apps.rl.methods.Updater`)."""
        raise NotImplementedError

    def q_optimizer(self, params: Any) -> torch.optim.Optimizer:
        from funcbo.apps.rl.methods import make_optimizer

        return make_optimizer(self.inner_optimizer, params, self.inner_lr, self.inner_weight_decay)


@dataclass
class RLModelMethod(RLMethodConfig):
    """A method with a dynamics model (every kind but ``model_free``).

    Attributes:
        outer_optimizer, outer_lr, outer_weight_decay: the model's optimizer (Adam 1e-3).
    """

    outer_optimizer: str = "adam"
    outer_lr: float = 1e-3
    outer_weight_decay: float = 0.0

    def model_optimizer(self, params: Any) -> torch.optim.Optimizer:
        from funcbo.apps.rl.methods import make_optimizer

        return make_optimizer(self.outer_optimizer, params, self.outer_lr, self.outer_weight_decay)


@dataclass
class RLBilevelMethod(RLModelMethod):
    """A bilevel kind: the model's gradient comes from a library hypergradient estimator.

    Attributes:
        inner_steps: Q-steps per environment step (1).
        warm_opt: keep the Adam statistics of the Q-steps (and of the adjoint) across
            environment steps. OMD's and FuncID's reference code re-initialise them at every
            outer step (``warm_opt=False``).
    """

    inner_steps: int = 1
    warm_opt: bool = False

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"RL method {self.kind}: inner_steps must be ≥ 1")

    def estimator(
        self,
        problem: Any,
        q_inner: nn.Module,
        model: nn.Module,
        target_q: nn.Module,
        batch_size: int = 256,
    ) -> tuple[Any, Any, Any]:
        """The Q-step solver, the hypergradient estimator and its problem (initialisations
        draw from the global torch generator); see :mod:`funcbo.apps.rl.methods`."""
        raise NotImplementedError

    def build(self, context: RLBuildContext) -> Any:
        from funcbo.apps.rl.methods import BilevelUpdater

        c = context
        assert c.model is not None
        inner, est, hp = self.estimator(
            c.problem, c.q_inner, c.model, c.target_q, c.config.batch_size
        )
        opt = self.model_optimizer(c.model.parameters())
        return BilevelUpdater(
            inner, est, c.problem, hp, c.model, opt, c.q, c.target_q, c.config.tau,
            warm_opt=self.warm_opt,
        )  # fmt: skip


@dataclass
class _PointwiseFuncID(RLBilevelMethod):
    def estimator(self, problem, q_inner, model, target_q, batch_size=256):
        from funcbo.apps.rl.methods import pointwise_funcid

        return pointwise_funcid(self, problem, q_inner, model, target_q, batch_size)


@register_method("funcid_reference")
@dataclass
class FuncIDReference(_PointwiseFuncID):
    """FuncID as the authors ran it: a = −g at the Q-network's prediction, identity output
    Hessian, V̄ at the real s′ in the cross derivative (reward head only)."""


@register_method("funcid_identity")
@dataclass
class FuncIDIdentity(_PointwiseFuncID):
    """a = −g at the Q-network's prediction with both heads (diverges; a counter-example)."""


@register_method("funcid_solution")
@dataclass
class FuncIDSolution(_PointwiseFuncID):
    """FuncID with the adjoint at the function-space inner solution h* = ŷ (both heads)."""


@register_method("funcid_network")
@dataclass
class FuncIDNetworkRL(RLBilevelMethod):
    """FuncID with an adjoint network of the Q-network's architecture (both heads).

    Attributes:
        adjoint_optimizer, adjoint_lr, adjoint_weight_decay, adjoint_steps: its optimizer steps.
        adjoint_init: ``"fresh"``, ``"inner"`` (a copy of the Q-network) or ``"zero"`` (fresh,
            output layer zero: a ≡ 0).
        adjoint_scale: the network outputs a = adjoint_scale · net(s, a); None: the batch
            size, so that net regresses the gradient of the batch-mean outer loss as in the
            reference implementation (see ``networks.ScaledOutput``).
        adjoint_at: fit the network to g evaluated at the inner solution h* (``"solution"``)
            or at the Q-network's prediction (``"prediction"``, the earlier variant).
    """

    adjoint_optimizer: str = "adam"
    adjoint_lr: float = 3e-4
    adjoint_weight_decay: float = 0.0
    adjoint_steps: int = 5
    adjoint_init: str = "fresh"
    adjoint_scale: float | None = None
    adjoint_at: str = "solution"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adjoint_steps < 1:
            raise ValueError(f"RL method {self.kind}: adjoint_steps must be ≥ 1")
        if self.adjoint_scale is not None and not self.adjoint_scale > 0:
            raise ValueError(f"RL method {self.kind}: adjoint_scale must be > 0")
        if self.adjoint_at not in ADJOINT_AT:
            raise ValueError(f"RL method {self.kind}: adjoint_at must be one of {ADJOINT_AT}")
        if self.adjoint_init not in ("fresh", "inner", "zero"):
            raise ValueError(
                f"RL method {self.kind}: adjoint_init must be 'fresh', 'inner' or 'zero'"
            )

    def estimator(self, problem, q_inner, model, target_q, batch_size=256):
        from funcbo.apps.rl.methods import network_funcid

        return network_funcid(self, problem, q_inner, model, target_q, batch_size)


@register_method("omd")
@dataclass
class OMD(RLBilevelMethod):
    """OMD: AID with the identity "inverse Hessian" in parameter space."""

    def estimator(self, problem, q_inner, model, target_q, batch_size=256):
        from funcbo.linalg import Identity
        from funcbo.parametric import AID

        opt = self.q_optimizer(q_inner.parameters())
        # one replay batch serves as inner and outer batch, and the Q-network is
        # deterministic: one forward pass for both losses
        est = AID(
            q_inner,
            opt,
            self.inner_steps,
            solver=Identity(),
            warm_start=False,
            share_prediction=True,
        )
        return est.inner, est, problem


def _omd_cg() -> CG:
    return CG(maxiter=10, damping=1e-5)


@register_method("omd_cg")
@dataclass
class OMDCG(RLBilevelMethod):
    """OMD with damped CG (solves (H + δI)v = g, as OMD's ``with_inv_jac``).

    Attributes:
        solver: the CG value, ``solver: {cg: {maxiter: 10, damping: 1.0e-5}}`` by default (10
            iterations, δ = 1e-5); a ``solver: {cg: {...}}`` in a config takes
            :class:`~funcbo.linalg.CG`'s defaults for the fields it leaves out.
        warm_start: start CG from the previous solution (OMD starts from zero).

    Former flat fields: ``solver_iters`` and ``cg_damping`` are the CG's ``maxiter`` and
    ``damping``, ``cg_warm_start`` is ``warm_start`` (see :meth:`translate_legacy_fields`).
    """

    solver: CG = field(default_factory=_omd_cg)
    warm_start: bool = False

    @classmethod
    def translate_legacy_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
        """``solver_iters``/``cg_damping`` → ``solver: {cg: {maxiter, damping}}`` (from the
        default CG, or updating a ``solver: {cg: ...}`` given with them), ``cg_warm_start`` →
        ``warm_start``. The flat record's AID fields (``solver`` as a name, ``damping``,
        ``cg_safeguards``, ``neumann_lr``) never applied to ``omd_cg`` and are dropped."""
        out = dict(data)
        flat = {
            to: out.pop(k)
            for k, to in (("solver_iters", "maxiter"), ("cg_damping", "damping"))
            if k in out
        }
        if "cg_warm_start" in out:
            warm = out.pop("cg_warm_start")
            out.setdefault("warm_start", warm)
        for k in ("damping", "cg_safeguards", "neumann_lr"):
            out.pop(k, None)
        solver = out.get("solver")
        if isinstance(solver, str):  # the flat record's solver name: always this CG
            solver = None
            out.pop("solver")
        if flat:
            if solver is None:
                default = _omd_cg()
                params: Any = {"maxiter": default.maxiter, "damping": default.damping}
            elif isinstance(solver, dict) and set(solver) == {"cg"}:
                params = dict(solver["cg"] or {})
            else:
                return out  # not a CG: the spec's validation names it
            out["solver"] = {"cg": {**params, **flat}}
        return out

    def estimator(self, problem, q_inner, model, target_q, batch_size=256):
        from funcbo.parametric import AID

        opt = self.q_optimizer(q_inner.parameters())
        est = AID(
            q_inner,
            opt,
            self.inner_steps,
            solver=self.solver,
            warm_start=self.warm_start,
            share_prediction=True,
        )
        return est.inner, est, problem


@dataclass
class _ModelFitting(RLModelMethod):
    """Attributes:
    model_steps: model updates per environment step.
    """

    model_steps: int = 1

    def __post_init__(self) -> None:
        if self.model_steps < 1:
            raise ValueError(f"RL method {self.kind}: model_steps must be ≥ 1")

    def build(self, context: RLBuildContext) -> Any:
        from funcbo.apps.rl.methods import ModelFittingUpdater

        c = context
        assert c.model is not None
        q_opt = self.q_optimizer(c.q.parameters())
        model_opt = self.model_optimizer(c.model.parameters())
        return ModelFittingUpdater(
            self.kind, c.problem, c.model, model_opt, c.q_inner, q_opt, c.q,
            c.target_q, c.config.tau, model_steps=self.model_steps, values=c.values,
        )  # fmt: skip


@register_method("mle")
@dataclass
class MLE(_ModelFitting):
    """The model fitted by maximum likelihood (least squares on real transitions)."""


@register_method("vep")
@dataclass
class VEP(_ModelFitting):
    """Value equivalence (Grimm et al., 2020) with random value functions, as OMD's code."""


@register_method("model_free")
@dataclass
class ModelFree(RLMethodConfig):
    """Soft Q-learning on real transitions (no model): a reference."""

    def build(self, context: RLBuildContext) -> Any:
        from funcbo.apps.rl.methods import ModelFreeUpdater

        c = context
        q_opt = self.q_optimizer(c.q.parameters())
        return ModelFreeUpdater(c.problem, c.q_inner, q_opt, c.q, c.target_q, c.config.tau)


__all__ = [
    "ADJOINT_AT",
    "BILEVEL_KINDS",
    "FUNCID_KINDS",
    "MLE",
    "OMD",
    "OMDCG",
    "RL_KINDS",
    "VEP",
    "FuncIDIdentity",
    "FuncIDNetworkRL",
    "FuncIDReference",
    "FuncIDSolution",
    "ModelFree",
    "RLBilevelMethod",
    "RLBuildContext",
    "RLMethodConfig",
    "RLModelMethod",
    "RLProblemConfig",
]
