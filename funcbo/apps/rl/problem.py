"""Model-based RL as a functional bilevel problem (the paper's second experiment).

Outer variable: the model T_ω(s, a) = (ŝ′, r̂). Inner variable: the double soft Q-function,
seen as a function of (s, a) through its prediction v = h(s, a) = [Q_1(s, a), Q_2(s, a)].
With a Polyak-averaged target network Q̄ (constant for both levels) and the soft value

    V̄(s′) = α · logsumexp_a′( min_k Q̄_k(s′, a′) / α )

(OMD's double-Q target; ``target="per_head"`` uses Q̄_k for head k instead), the Bellman target
of a transition is y = r + γ · (1 − terminated) · V̄(s′), and

    inner:  ℓ_in(ω, v; s, a, d)          = ½ Σ_k (v_k − ŷ)²,   ŷ = r̂ + γ(1 − d) V̄(ŝ′),
                                                               (ŝ′, r̂) = T_ω(s, a);
    outer:  ℓ_out(ω, v; s, a, r, s′, d)  = ½ Σ_k (v_k − y)²,   y = r + γ(1 − d) V̄(s′) (real).

The inner loss is a squared loss in v (output Hessian = identity), so FuncID's functional
implicit differentiation applies; ∂_ω reaches the reward head through r̂ and the next-state head
through V̄(ŝ′). The outer loss does not depend on ω directly. Batches are mappings with
``obs, action, reward, next_obs, not_done`` and the target network under ``target_q``.

``next_value="real"`` evaluates V̄ at the *real* next state in the model's target,
ŷ = r̂ + γ(1 − d) V̄(s′): the FuncID authors' backward pass (their ``grad_inner_loss`` receives
V̄(s′) precomputed on the real transition), in which only the reward head of the model gets a
hypergradient. The Q-steps always use the model's own ŝ′.

Both targets are constant in v, and an estimator evaluates the losses several times per step
(inner steps, output Hessians under ``torch.func`` transforms, the cross derivative) at the same
ω. :func:`with_target` therefore caches ŷ (with its graph to ω) and y in the batch; the losses
use the cache only while the model and the target network are the very modules, with unchanged
parameters (same tensor versions), that it was computed with, and recompute otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from funcbo.apps.rl.networks import parameter_list
from funcbo.linalg import OutputHessian
from funcbo.problem import BilevelProblem

TARGETS = ("min", "per_head")
NEXT_VALUES = ("model", "real")


def soft_value(q_next: Tensor, alpha: float, target: str = "min") -> Tensor:
    """Soft state value of target Q-values ``[K, B, A]``.

    V = α · logsumexp(Q/α) over actions, of min_k Q_k (``"min"``: shape ``[B, 1]``) or of
    each head (``"per_head"``: shape ``[B, K]``).
    """
    if target == "min":
        q = q_next.min(dim=0).values  # [B, A]
        return alpha * torch.logsumexp(q / alpha, dim=-1, keepdim=True)
    if target == "per_head":
        return (alpha * torch.logsumexp(q_next / alpha, dim=-1)).transpose(0, 1)
    raise ValueError(f"unknown soft-value target {target!r}; use one of {TARGETS}")


class SoftBellmanProblem(BilevelProblem):
    """The bilevel problem above, with per-sample losses on predictions ``[B, K]``.

    Args:
        gamma: discount γ.
        alpha: soft-max temperature α of the soft value.
        target: ``"min"`` (OMD: min over the target heads) or ``"per_head"``.
        next_value: where the model's target evaluates V̄: ``"model"`` (at ŝ′, the bilevel
            problem) or ``"real"`` (at the real s′: the reward head alone depends on ω).
    """

    def __init__(
        self,
        gamma: float = 0.99,
        alpha: float = 0.01,
        target: str = "min",
        next_value: str = "model",
    ) -> None:
        super().__init__()
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if target not in TARGETS:
            raise ValueError(f"unknown soft-value target {target!r}; use one of {TARGETS}")
        if next_value not in NEXT_VALUES:
            raise ValueError(f"unknown next_value {next_value!r}; use one of {NEXT_VALUES}")
        self.gamma = gamma
        self.alpha = alpha
        self.target = target
        self.next_value = next_value

    def with_next_value(self, next_value: str) -> SoftBellmanProblem:
        """The same problem with the model's target evaluating V̄ at ``next_value``."""
        return SoftBellmanProblem(self.gamma, self.alpha, self.target, next_value)

    # ------------------------------------------------------------------------------ targets
    def bellman_target(
        self, target_q: nn.Module, reward: Tensor, next_obs: Tensor, not_done: Tensor
    ) -> Tensor:
        """y = r + γ (1 − d) V̄(s′): ``[B, 1]`` (``"min"``) or ``[B, K]`` (``"per_head"``)."""
        return self.target_from_value(reward, not_done, self.next_state_value(target_q, next_obs))

    def next_state_value(self, target_q: nn.Module, next_obs: Tensor) -> Tensor:
        """V̄(s′) of the target network: ``[B, 1]`` (``"min"``) or ``[B, K]`` (``"per_head"``)."""
        return soft_value(target_q(next_obs), self.alpha, self.target)

    def target_from_value(self, reward: Tensor, not_done: Tensor, value: Tensor) -> Tensor:
        """r + γ (1 − d) V̄ given V̄ (:meth:`next_state_value`)."""
        return reward + self.gamma * not_done * value

    def model_target(self, model: nn.Module, batch: Any) -> Tensor:
        """ŷ = r̂ + γ (1 − d) V̄(ŝ′) with (ŝ′, r̂) = T_ω(s, a): differentiable in ω.

        With ``next_value="real"``, ŷ = r̂ + γ (1 − d) V̄(s′) on the real next state.
        """
        cache = batch.get(_CACHE)
        if (
            cache is not None
            and cache.y_model is not None
            and cache.next_value == self.next_value
            and cache.valid_model(model, batch)
        ):
            return cache.y_model
        ns, r = model(batch["obs"], batch["action"])
        if self.next_value == "real":
            ns = batch["next_obs"]
        return self.bellman_target(batch["target_q"], r, ns, batch["not_done"])

    def real_target(self, batch: Any) -> Tensor:
        """y = r + γ (1 − d) V̄(s′) on the real transition."""
        cache = batch.get(_CACHE)
        if cache is not None and cache.y_real is not None and cache.valid_target(batch):
            return cache.y_real
        with torch.no_grad():
            return self.bellman_target(
                batch["target_q"], batch["reward"], batch["next_obs"], batch["not_done"]
            )

    # ------------------------------------------------------------------------ bilevel losses
    def inner_input(self, batch: Any) -> tuple[Tensor, ...]:
        # one tuple per batch: estimators recognise the same points by identity
        x = batch.get(_INPUT)
        return x if x is not None else (batch["obs"], batch["action"])

    def inner_loss(self, outer: nn.Module, pred: Tensor, batch: Any) -> Tensor:
        """½ Σ_k (pred_k − ŷ)² with the model's target ŷ."""
        return 0.5 * (pred - self.model_target(outer, batch)).square().sum(1)

    def output_hessian(self, outer: nn.Module, pred: Tensor, batch: Any) -> OutputHessian:
        """The inner loss is ½‖pred − ŷ‖²: its output Hessian is the identity (no autodiff)."""
        return OutputHessian.scaled_identity(1.0, pred)

    def outer_loss(self, outer: nn.Module, pred: Tensor, batch: Any) -> Tensor:
        """½ Σ_k (pred_k − y)² with the real target y (independent of ω)."""
        return 0.5 * (pred - self.real_target(batch)).square().sum(1)


_CACHE = "_targets"
_INPUT = "_inner_input"


def _versions(params: Sequence[Tensor]) -> tuple[int, ...]:
    return tuple(p._version for p in params)


class _TargetCache:
    """ŷ and y computed once for a batch, valid for fixed modules and parameter versions.

    In-place parameter updates (optimizer steps, Polyak averaging) bump the tensors' version
    counters, which invalidates the cache.
    """

    def __init__(
        self, target_q: nn.Module, model: nn.Module | None, next_value: str = "model"
    ) -> None:
        self.target_q = target_q
        self.next_value = next_value
        self.target_params = parameter_list(target_q)
        self.target_versions = _versions(self.target_params)
        self.model = model
        self.model_params = parameter_list(model) if model is not None else []
        self.model_versions = _versions(self.model_params)
        self.y_model: Tensor | None = None
        self.y_real: Tensor | None = None

    def valid_target(self, batch: Any) -> bool:
        return (
            batch["target_q"] is self.target_q
            and _versions(self.target_params) == self.target_versions
        )

    def valid_model(self, model: nn.Module, batch: Any) -> bool:
        # a target computed without a graph cannot serve where gradients to ω are wanted
        graph_ok = (
            self.y_model is None
            or self.y_model.requires_grad
            or not torch.is_grad_enabled()
            or not any(p.requires_grad for p in self.model_params)
        )
        return (
            model is self.model
            and graph_ok
            and _versions(self.model_params) == self.model_versions
            and self.valid_target(batch)
        )


def model_target_value(batch: dict[str, Any]) -> Tensor | None:
    """The model target ŷ cached in a batch by :func:`with_target` (detached), or None."""
    cache = batch.get(_CACHE)
    if cache is None or cache.y_model is None:
        return None
    return cache.y_model.detach()


def with_target(
    batch: dict[str, Tensor],
    target_q: nn.Module,
    problem: SoftBellmanProblem | None = None,
    model: nn.Module | None = None,
    *,
    real: bool = True,
    model_outputs: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """The batch with the target network attached (the context both losses read).

    With ``problem``, the real target y is computed once and cached (unless ``real=False``);
    with ``model`` too, so is the model's target ŷ (keeping its graph to ω, so hypergradients
    still reach the model), from ``model_outputs`` = T_ω(s, a) when the caller has them. The
    cache is ignored as soon as a module or one of its parameters changes.
    """
    out: dict[str, Any] = dict(batch)
    out["target_q"] = target_q
    out[_INPUT] = (batch["obs"], batch["action"])
    if problem is None:
        return out
    cache = _TargetCache(target_q, model, problem.next_value)
    at_real = model is not None and problem.next_value == "real"
    v_real: Tensor | None = None
    if real or at_real:
        # V̄(s′) on the real next state: the real target's, and the model's with
        # ``next_value="real"`` (one target-network pass serves both)
        with torch.no_grad():
            v_real = problem.next_state_value(target_q, out["next_obs"])
    if real:
        assert v_real is not None
        cache.y_real = problem.target_from_value(out["reward"], out["not_done"], v_real)
    if model is not None:
        ns, r = model(out["obs"], out["action"]) if model_outputs is None else model_outputs
        if at_real:
            assert v_real is not None
            cache.y_model = problem.target_from_value(r, out["not_done"], v_real)
        else:
            cache.y_model = problem.bellman_target(target_q, r, ns, out["not_done"])
    out[_CACHE] = cache
    return out


__all__ = [
    "NEXT_VALUES",
    "TARGETS",
    "SoftBellmanProblem",
    "model_target_value",
    "soft_value",
    "with_target",
]
