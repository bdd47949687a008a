"""Parametric baselines: approximate implicit differentiation (AID) and iterative
differentiation (ITD), both in the inner network's *parameter* space.

They treat the inner problem as min_θ L_in(ω, θ) with L_in(ω, θ) = E_in[ℓ_in(ω, h_θ(x))], which
is non-convex in θ for a neural network: the implicit function theorem then needs an invertible
parameter-space Hessian, and its Hessian-vector products back-propagate through the network
twice. They are here as the references FuncID is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from funcbo.diagnostics import Diagnostics, mean_over_ranks
from funcbo.distributed import all_reduce_mean_, differentiable_all_reduce_mean
from funcbo.estimator import (
    HypergradientEstimator,
    ImplicitEstimator,
    ImplicitStats,
    StepStats,
    add_grads,
    as_batch_list,
    finish_outer_grads,
    finish_outer_grads_and_norm,
    grad_norm,
    trainable,
)
from funcbo.inner import InnerSolver, frozen, make_inner_solver
from funcbo.linalg import CG, SolveInfo, Solver, tnorm
from funcbo.problem import Batch, BilevelProblem, check_finite_tensors, check_pred


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, like, strict=True))


@dataclass(frozen=True, kw_only=True)
class AIDStats(ImplicitStats):
    """Diagnostics of an AID step: the losses and gradient norm, and the linear solve.

    Attributes:
        solve: the solver's :class:`~funcbo.linalg.SolveInfo` (``solver_iters``;
            ``solver_gave_up``: 1 when the solve returned its start, so the step has no
            implicit term; ``solver_diverged``: 1 when the returned solution has a larger
            residual than the start).
        dual_norm: ‖v‖ (``dual_norm``).
    """

    solve: SolveInfo
    dual_norm: float

    def method_metrics(self) -> dict[str, float]:
        return {
            "solver_iters": float(self.solve.iterations),
            "solver_gave_up": float(self.solve.gave_up),
            "solver_diverged": float(self.solve.diverged),
            "dual_norm": self.dual_norm,
        }

    @property
    def solves_gave_up(self) -> int:
        return int(self.solve.gave_up)


class AID(ImplicitEstimator):
    """Approximate implicit differentiation in parameter space.

    ∇F(ω) ≈ ∂_ω L_out − ∂_ω∂_θ L_in · v,   with v ≈ (∂²_θ L_in)⁻¹ ∂_θ L_out

    found by a linear solver (``CG(maxiter)``, ``Neumann(iters, lr)`` or ``Identity()``) from
    Hessian-vector products in the inner network's parameters, warm-started from the previous outer
    iteration's v when ``warm_start`` is True.

    Args:
        inner_model, inner_optimizer, inner_steps: as for FuncID.
        solver: the linear solver (default ``CG(maxiter=10)``).
        warm_start: start the solve from the previous v.
        inner_solver: replaces the default inner solver (as for FuncID).
        share_prediction: when the inner and outer inputs are one object, evaluate the inner
            model once for both losses (keeping its graph through the outer gradient). Only
            for an inner model whose forward pass is deterministic and stateless (no dropout,
            no batch-norm statistics in training mode); off by default.
    """

    def __init__(
        self,
        inner_model: nn.Module,
        inner_optimizer: torch.optim.Optimizer | None,
        inner_steps: int = 1,
        *,
        solver: Solver | None = None,
        warm_start: bool = True,
        inner_solver: InnerSolver | None = None,
        share_prediction: bool = False,
    ) -> None:
        self.inner_model = inner_model
        self.inner = make_inner_solver(inner_model, inner_optimizer, inner_steps, inner_solver)
        self.inner_steps = max(self.inner.steps, 1)
        self.solver = solver if solver is not None else CG(maxiter=10)
        self.warm_start = warm_start
        self.share_prediction = share_prediction
        self._v: tuple[Tensor, ...] | None = None
        self.diagnostics: AIDStats | Diagnostics | None = None

    def hypergradient(
        self, problem: BilevelProblem, outer: nn.Module, inner_batch: Batch, outer_batch: Batch
    ) -> tuple[Tensor, ...]:
        """∇F(ω) at the current inner model (no inner steps)."""
        theta = trainable(self.inner_model)
        omega = trainable(outer)
        x_out = problem.input(outer_batch, "outer")
        share = self.share_prediction and problem.input(inner_batch, "inner") is x_out
        pred_out = check_pred(self.inner_model(x_out), "outer model output")
        l_out = problem.eval_outer(outer, pred_out, outer_batch).mean()
        grads = torch.autograd.grad(l_out, [*theta, *omega], allow_unused=True, retain_graph=share)
        g_theta = _zeros_for_none(grads[: len(theta)], theta)
        g_omega = list(grads[len(theta) :])
        all_reduce_mean_(g_theta)

        if share:
            pred_in = pred_out
        else:
            pred_in = problem.predict(self.inner_model, inner_batch, "inner")
        l_in = problem.eval_inner(outer, pred_in, inner_batch).mean()
        G = torch.autograd.grad(l_in, theta, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(G) if g is not None and g.requires_grad]
        G_live = [G[i] for i in live]
        theta_live = [theta[i] for i in live]

        def matvec(v: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            if not G_live:
                return tuple(torch.zeros_like(t) for t in v)
            hv = torch.autograd.grad(
                G_live, theta_live, [v[i] for i in live], retain_graph=True, allow_unused=True
            )
            out = [torch.zeros_like(t) for t in v]
            for i, h in zip(live, hv, strict=True):
                if h is not None:
                    out[i] = h
            all_reduce_mean_(out)
            return tuple(out)

        x0 = self._v if (self.warm_start and self._v is not None) else None
        v, info = self.solver(matvec, g_theta, x0=x0)
        self._v = tuple(t.detach() for t in v)
        cross: Sequence[Tensor | None] = [None] * len(omega)
        if omega and G_live:
            cross = torch.autograd.grad(G_live, omega, [v[i] for i in live], allow_unused=True)
        total = add_grads(g_omega, cross, scale=-1.0)
        out, norm = finish_outer_grads_and_norm(outer, total)
        self.diagnostics = AIDStats(
            outer_loss=float(l_out.detach()),
            inner_loss_at_hypergrad=float(l_in.detach()),
            grad_norm=norm,
            solve=info,
            dual_norm=tnorm(v),
        )
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "v": list(self._v) if self._v is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self._v = tuple(state["v"]) if state.get("v") is not None else None


def _safe_sqrt(v: Tensor) -> Tensor:
    """√v whose derivative at v = 0 is 0 instead of ∞ (an unused weight's second moment stays 0;
    ∞·0 would make the unrolled graph NaN). The value is √v exactly."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def unrolled_adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float | Tensor,
    weight_decay: float | Tensor,
    bias_correction1: float | Tensor,
    bias_correction2_sqrt: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of ``torch.optim.Adam`` (coupled weight decay, no amsgrad), out of place so that
    autograd can differentiate through it: the same operations as torch's single-tensor Adam.

    ``lr``, ``eps``, ``weight_decay`` and the bias corrections (1 − β₁ᵗ, √(1 − β₂ᵗ) at the step
    count t after this step) may be tensors that broadcast against ``param`` (one value per run
    of a stacked batch). Returns the new parameter, first and second moments.
    """
    b1, b2 = betas
    if not (isinstance(weight_decay, float | int) and weight_decay == 0):
        grad = grad + weight_decay * param
    exp_avg = torch.lerp(exp_avg, grad, 1.0 - b1)
    exp_avg_sq = exp_avg_sq * b2 + (1.0 - b2) * grad * grad
    denom = _safe_sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    return param - (lr / bias_correction1) * exp_avg / denom, exp_avg, exp_avg_sq


#: the inner optimizers ITD can unroll
ITD_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam)


class ITD(HypergradientEstimator):
    """Iterative differentiation: back-propagate through unrolled inner optimizer steps.

    Runs ``unroll`` inner steps on the inner model with ``torch.func.functional_call``, keeping the
    autograd graph of the last ``truncate`` steps (all of them by default), and returns
    ∂_ω L_out(ω, θ_unroll) through that graph. The final θ is written back to the inner model (a
    warm start for the next step).

    The steps are those of

    * heavy-ball gradient descent θ ← θ − lr·b, b ← μ·b + ∇_θ L_in (``lr``, ``momentum``), or
    * an ``optimizer`` over the inner model's trainable parameters: ``torch.optim.SGD``
      (momentum, weight decay; no dampening or Nesterov) or ``torch.optim.Adam`` (coupled weight
      decay, bias correction; no amsgrad), taken out of place so that autograd differentiates
      through them (Adam's moments included), with its hyperparameters and state. The state
      (momentum buffer; Adam's moments and step count) lives in the optimizer's ``state`` in
      torch's format and carries over from one outer step to the next, as a
      ``torch.optim`` optimizer's would; what the first differentiated step starts from is a
      constant.

    Args:
        inner_model: the network h_θ.
        lr: inner step size of the gradient-descent steps (with ``optimizer``: leave it None).
        unroll: number of inner steps per outer iteration.
        truncate: differentiate through only the last ``truncate`` steps (None = all).
        momentum: heavy-ball momentum μ of the gradient-descent steps.
        optimizer: unroll this optimizer's steps instead (see above).
    """

    def __init__(
        self,
        inner_model: nn.Module,
        lr: float | None = None,
        unroll: int = 10,
        *,
        truncate: int | None = None,
        momentum: float = 0.0,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if unroll < 1:
            raise ValueError(f"ITD needs unroll ≥ 1, got {unroll}")
        if truncate is not None and not 1 <= truncate <= unroll:
            raise ValueError(f"ITD truncate must be in [1, unroll={unroll}], got {truncate}")
        if optimizer is None:
            if lr is None:
                raise ValueError("ITD needs a step size lr or an optimizer to unroll")
            optimizer = torch.optim.SGD(
                [p for p in inner_model.parameters() if p.requires_grad],
                lr=lr,
                momentum=momentum,
            )
        elif lr is not None or momentum:
            raise ValueError(
                "ITD takes its step size and momentum from the optimizer it unrolls: leave lr "
                "and momentum unset"
            )
        _check_unrollable(optimizer, inner_model)
        self.inner_model = inner_model
        self.optimizer = optimizer
        self.unroll = unroll
        self.truncate = unroll if truncate is None else truncate
        self.inner_steps = unroll
        self.diagnostics: StepStats | Diagnostics | None = None

    @property
    def lr(self) -> float:
        """The unrolled optimizer's learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def momentum(self) -> float:
        """The unrolled SGD's momentum (0 for Adam)."""
        return float(self.optimizer.param_groups[0].get("momentum", 0.0))

    @property
    def adam(self) -> bool:
        """Whether the unrolled steps are Adam's."""
        return isinstance(self.optimizer, torch.optim.Adam)

    def _update(
        self,
        names: list[str],
        theta: dict[str, Tensor],
        grads: Sequence[Tensor],
        state: dict[str, dict[str, Tensor]],
    ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        group = self.optimizer.param_groups[0]
        wd = float(group["weight_decay"])
        new_theta: dict[str, Tensor] = {}
        new_state: dict[str, dict[str, Tensor]] = {}
        for n, g in zip(names, grads, strict=True):
            t, st = theta[n], state.get(n, {})
            if self.adam:
                b1, b2 = group["betas"]
                step = (float(st["step"]) if st else 0.0) + 1.0
                t, m, v = unrolled_adam_step(
                    t,
                    g,
                    st["exp_avg"] if st else torch.zeros_like(t),
                    st["exp_avg_sq"] if st else torch.zeros_like(t),
                    lr=float(group["lr"]),
                    betas=(b1, b2),
                    eps=float(group["eps"]),
                    weight_decay=wd,
                    bias_correction1=1.0 - b1**step,
                    bias_correction2_sqrt=(1.0 - b2**step) ** 0.5,
                )
                new_state[n] = {
                    "step": torch.tensor(step, dtype=adam_step_dtype()),
                    "exp_avg": m,
                    "exp_avg_sq": v,
                }
            else:
                d = g + wd * t if wd else g
                mu = float(group["momentum"])
                if mu:
                    buf = st.get("momentum_buffer")
                    d = d if buf is None else mu * buf + d
                    new_state[n] = {"momentum_buffer": d}
                t = t - float(group["lr"]) * d
            new_theta[n] = t
        return new_theta, new_state

    def step(
        self,
        problem: BilevelProblem,
        outer: nn.Module,
        inner_batches: Batch | Sequence[Batch],
        outer_batch: Batch,
    ) -> tuple[Tensor, ...]:
        batches = as_batch_list(inner_batches)
        model = self.inner_model
        omega = trainable(outer)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        theta = {n: p.detach() for n, p in named}
        state = {
            n: {k: v.detach() for k, v in self.optimizer.state[p].items()}
            for n, p in named
            if self.optimizer.state.get(p)
        }
        first_diff = self.unroll - self.truncate
        inner_loss = float("nan")
        for k in range(self.unroll):
            batch = batches[k % len(batches)]
            diff = k >= first_diff
            if not diff or k == first_diff:
                theta = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
                state = {n: {k2: v.detach() for k2, v in st.items()} for n, st in state.items()}
            x = problem.input(batch, "inner")
            if diff:
                pred = check_pred(functional_call(model, theta, (x,)), "inner model output")
                loss = problem.eval_inner(outer, pred, batch).mean()
            else:
                with frozen(outer):
                    pred = check_pred(functional_call(model, theta, (x,)), "inner model output")
                    loss = problem.eval_inner(outer, pred, batch).mean()
            local = torch.autograd.grad(loss, [theta[n] for n in names], create_graph=diff)
            g = [differentiable_all_reduce_mean(t) for t in local]
            theta, state = self._update(names, theta, g, state)
            inner_loss = float(loss.detach())
        check_finite_tensors(
            theta.values(),
            f"ITD's inner weights after {self.unroll} unrolled steps",
            "the unrolled inner steps diverged: lower ITD's step size lr",
        )
        x_out = problem.input(outer_batch, "outer")
        pred_out = check_pred(functional_call(model, theta, (x_out,)), "inner model output")
        l_out = problem.eval_outer(outer, pred_out, outer_batch).mean()
        grads: Sequence[Tensor | None] = (
            torch.autograd.grad(l_out, omega, allow_unused=True) if omega else []
        )
        with torch.no_grad():
            for n, p in named:
                p.copy_(theta[n])
                if n in state:
                    self.optimizer.state[p] = {k: v.detach() for k, v in state[n].items()}
        out = finish_outer_grads(outer, list(grads))
        stats = StepStats(
            inner_loss=inner_loss, outer_loss=float(l_out.detach()), grad_norm=grad_norm(out)
        )
        self.diagnostics = mean_over_ranks(stats)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.inner_model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner_model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        elif state.get("buf"):  # the former format: the heavy-ball buffers by parameter name
            params = dict(self.inner_model.named_parameters())
            for n, b in state["buf"].items():
                self.optimizer.state[params[n]] = {"momentum_buffer": b}


def adam_step_dtype() -> torch.dtype:
    """The dtype of ``torch.optim.Adam``'s step counter: float64 under a float64 default dtype,
    else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _check_unrollable(optimizer: torch.optim.Optimizer, inner_model: nn.Module) -> None:
    """ITD's optimizer: SGD or Adam without the options it does not unroll, one parameter group
    holding exactly the inner model's trainable parameters."""
    if type(optimizer) not in ITD_OPTIMIZERS:
        raise ValueError(
            f"ITD unrolls torch.optim.SGD or torch.optim.Adam steps, not {type(optimizer).__name__}"
        )
    if len(optimizer.param_groups) != 1:
        raise ValueError("ITD's optimizer must have a single parameter group")
    g = optimizer.param_groups[0]
    bad = [
        k
        for k, off in (
            ("amsgrad", False),
            ("maximize", False),
            ("nesterov", False),
            ("dampening", 0),
        )
        if k in g and g[k] != off
    ]
    if bad:
        raise ValueError(f"ITD does not unroll the optimizer option(s) {', '.join(bad)}")
    if isinstance(g["lr"], Tensor):
        raise ValueError("ITD needs a float learning rate")
    mine = {id(p) for p in g["params"]}
    theirs = {id(p) for p in inner_model.parameters() if p.requires_grad}
    if mine != theirs:
        raise ValueError("ITD's optimizer must hold exactly the inner model's trainable parameters")


__all__ = ["AID", "ITD", "ITD_OPTIMIZERS", "AIDStats", "adam_step_dtype", "unrolled_adam_step"]
