"""Typed configuration of the model-based RL experiment: the ``problem:`` section and methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from funcbo.experiments.methods import MethodConfig

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


@dataclass
class RLMethodConfig(MethodConfig):
    """A method of the RL experiment (defaults: the authors' FuncID, the paper's hyperparameters).

    Inherited fields used here: ``inner_optimizer``/``inner_lr``/``inner_steps`` (the Q-function:
    Adam 3e-4, one step per environment step), ``outer_optimizer``/``outer_lr`` (the model:
    Adam 1e-3), ``adjoint_optimizer``/``adjoint_lr``/``adjoint_steps`` (FuncID's adjoint network),
    ``solver_iters`` (CG iterations of ``omd_cg``).

    Attributes:
        kind: the FuncID variants
            ``funcid_reference`` (the authors' code, what the paper ran: adjoint a = −g at the
            Q-network's prediction, identity output Hessian, and V̄ at the *real* s′ in the
            cross derivative, so only the reward head gets a hypergradient),
            ``funcid_solution`` (adjoint at the function-space inner solution h* = ŷ, both
            heads: the exact hypergradient of the empirical problem),
            ``funcid_network`` (an adjoint network fitted to the same target, both heads; see
            ``adjoint_at``),
            ``funcid_identity`` (a = −g at the Q-network's prediction with both heads: the
            earlier variant, which diverges; kept as a counter-example);
            and ``omd`` (parameter-space implicit differentiation, identity inverse
            Hessian), ``omd_cg`` (same with CG), ``mle`` (model by maximum likelihood), ``vep``
            (value equivalence), ``model_free`` (soft Q-learning on real transitions).
        warm_opt: keep the Adam statistics of the Q-steps (and of the adjoint) of the bilevel
            methods across environment steps. OMD's and FuncID's reference code re-initialise
            them at every outer step (``warm_opt=False``); mle/vep/model_free always keep them.
        cg_damping: damping of ``omd_cg`` (solves (H + δI)v = g, as OMD's ``with_inv_jac``).
        cg_warm_start: start CG from the previous solution (OMD starts from zero).
        model_steps: model updates per environment step for mle/vep.
        adjoint_scale: FuncID's adjoint network outputs a = adjoint_scale · net(s, a); None:
            the batch size, so that net regresses the gradient of the batch-mean outer loss as
            in the reference implementation (see ``networks.ScaledOutput``).
        adjoint_at: ``funcid_network`` fits its network to g evaluated at the inner solution
            h* (``"solution"``) or at the Q-network's prediction (``"prediction"``, the earlier
            variant). ``adjoint_init`` may also be ``"zero"`` (fresh, output layer zero: a ≡ 0).
    """

    kind: str = "funcid_reference"
    inner_lr: float = 3e-4
    inner_steps: int = 1
    outer_lr: float = 1e-3
    adjoint_lr: float = 3e-4
    adjoint_steps: int = 5
    solver_iters: int = 10
    warm_opt: bool = False
    cg_damping: float = 1e-5
    cg_warm_start: bool = False
    model_steps: int = 1
    adjoint_scale: float | None = None
    adjoint_at: str = "solution"

    def __post_init__(self) -> None:
        if self.kind not in RL_KINDS:
            raise ValueError(f"unknown RL method kind {self.kind!r}; use one of {RL_KINDS}")
        if self.inner_steps < 1 or self.model_steps < 1 or self.adjoint_steps < 1:
            raise ValueError(
                f"RL method {self.kind}: inner_steps, model_steps and adjoint_steps must be ≥ 1"
            )
        if self.adjoint_scale is not None and not self.adjoint_scale > 0:
            raise ValueError(f"RL method {self.kind}: adjoint_scale must be > 0")
        if self.adjoint_at not in ADJOINT_AT:
            raise ValueError(f"RL method {self.kind}: adjoint_at must be one of {ADJOINT_AT}")
        if self.adjoint_init not in ("fresh", "inner", "zero"):
            raise ValueError(
                f"RL method {self.kind}: adjoint_init must be 'fresh', 'inner' or 'zero'"
            )


__all__ = [
    "ADJOINT_AT",
    "BILEVEL_KINDS",
    "FUNCID_KINDS",
    "RL_KINDS",
    "RLMethodConfig",
    "RLProblemConfig",
]
