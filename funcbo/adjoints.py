"""Adjoint functions for FuncID.

The adjoint a* minimises, over functions a: x ↦ R^{d_v},

    J(a) = ½ E_in[a(x)ᵀ H(x) a(x)] + E_out[g(x)ᵀ a(x)],

with H(x) = ∂²_v ℓ_in(ω, h(x)) and g(x) = ∂_v ℓ_out(ω, h(x)) taken with respect to the network
*output* v = h(x). In operator form a* = argmin ½⟨a, C a⟩ + ⟨a, d⟩ = −C⁻¹d (the ½ matters).

* :class:`NetworkAdjoint` fits a neural network a_φ to J with K optimiser steps.
* :class:`LinearAdjoint` restricts a to a linear head on the inner model's last hidden features,
  a(x) = W [φ(x); 1], and minimises J + (λ/2)‖W‖² in closed form.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from funcbo.distributed import all_reduce_mean_, is_distributed
from funcbo.errors import ShapeError
from funcbo.linalg import CG, OutputHessian

OptimizerLike = torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer]


@dataclass
class AdjointProblem:
    """Everything an adjoint solver needs for one hypergradient.

    Attributes:
        x_in, x_out: the inner model's inputs on the inner and outer batches.
        hessian: per-sample output Hessians H_i at the inner points.
        g_out: per-sample output gradients g_j = ∂_v ℓ_out at the outer points, ``[m, d_v]``.
        z_in, z_out: last hidden features of the inner model (only for feature-based adjoints).
    """

    x_in: Any
    x_out: Any
    hessian: OutputHessian
    g_out: Tensor
    z_in: Tensor | None = None
    z_out: Tensor | None = None


def adjoint_objective(A_in: Tensor, HA_in: Tensor, A_out: Tensor, g_out: Tensor) -> Tensor:
    """J = ½ mean_i ⟨a_i, H_i a_i⟩ + mean_j ⟨g_j, a_j⟩ given H_i a_i."""
    return 0.5 * (A_in * HA_in).sum(1).mean() + (A_out * g_out).sum(1).mean()


class Adjoint(ABC):
    """An adjoint solver: returns a*(x) at the inner points, shape ``[n, d_v]``."""

    #: True when the solver needs the inner model's last hidden features.
    needs_features: bool = False
    #: diagnostics of the last solve (adjoint loss, iterations, ...)
    stats: dict[str, float]

    def bind(self, inner_model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Attach to the inner model (called once by FuncID)."""

    @abstractmethod
    def solve(self, prob: AdjointProblem) -> Tensor:
        """a* at the inner points x_in."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless default
        pass


# ----------------------------------------------------------------------------- network adjoint
#: how a default adjoint network starts (see :class:`NetworkAdjoint`)
ADJOINT_INITS = ("fresh", "inner", "zero_head")


class NetworkAdjoint(Adjoint):
    """Adjoint represented by a network a_φ, trained K steps on J per hypergradient.

    The gradient of J with respect to φ is E_in[∂_φa ᵀ H a] + E_out[∂_φa ᵀ g]; it is obtained from
    the surrogate E_in[⟨a, sg(H a)⟩] + E_out[⟨a, g⟩] (sg = stop-gradient), whose gradient it is,
    so each step costs one forward/backward of a_φ and one output-space Hessian product.

    Args:
        model: the adjoint network; default: a copy of the inner model's architecture.
        optimizer: an optimizer over ``model``'s parameters, or a callable building one from
            them (default: Adam with lr 1e-3).
        steps: K, optimizer steps per hypergradient.
        init: ``"fresh"`` (re-initialised copy of the inner model, the default), ``"inner"``
            (start from the inner model's weights) or ``"zero_head"`` (the inner model's weights
            with its last ``nn.Linear`` set to zero, so that a ≡ 0 at the start and the first
            steps move it along −g instead of from an arbitrary function); only used when
            ``model`` is None.
        warm_start: keep φ across outer iterations (True) or reset it before every solve.
        holdout: fraction of the outer points held out of the fit (every ⌊1/holdout⌋-th one):
            the adjoint keeps the iterate with the lowest J on them (the ½E_in[aᵀHa] term plus
            the held-out linear term), i.e. early stopping. The outer term of J is a sample
            average of ⟨g_j, a(x_j)⟩; a network that can separate the outer points (distinct
            inputs) drives J down by fitting the noise in g_j instead of E[g | x], and the
            held-out J is what detects it. 0 (default): no holdout, every step kept.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: OptimizerLike | None = None,
        steps: int = 10,
        *,
        init: str = "fresh",
        warm_start: bool = True,
        holdout: float = 0.0,
    ) -> None:
        if steps < 1:
            raise ValueError(f"NetworkAdjoint needs steps ≥ 1, got {steps}")
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"NetworkAdjoint holdout must be in [0, 1), got {holdout}")
        self.holdout = holdout
        if init not in ADJOINT_INITS:
            raise ValueError(f"init must be one of {ADJOINT_INITS}, got {init!r}")
        self.model = model
        self._optimizer_spec = optimizer
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = steps
        self.init = init
        self.warm_start = warm_start
        self.stats = {}
        self._initial_state: dict[str, Tensor] | None = None
        if model is not None:
            self._make_optimizer()

    def bind(self, inner_model: nn.Module) -> None:
        if self.model is None:
            self.model = copy.deepcopy(inner_model)
            if self.init == "fresh":
                reset_parameters(self.model)
            elif self.init == "zero_head":
                last = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
                if not last:
                    raise ValueError("init='zero_head' needs an inner model with an nn.Linear")
                with torch.no_grad():
                    for p in last[-1].parameters():
                        p.zero_()
            self._make_optimizer()
        if not self.warm_start:
            self._initial_state = copy.deepcopy(self.model.state_dict())

    def _make_optimizer(self) -> None:
        assert self.model is not None
        spec = self._optimizer_spec
        if spec is None:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        elif isinstance(spec, torch.optim.Optimizer):
            self.optimizer = spec
        else:
            self.optimizer = spec(self.model.parameters())

    def solve(self, prob: AdjointProblem) -> Tensor:
        if self.model is None or self.optimizer is None:
            raise RuntimeError("NetworkAdjoint is not bound to an inner model (use it via FuncID)")
        model, opt = self.model, self.optimizer
        if not self.warm_start and self._initial_state is not None:
            model.load_state_dict(self._initial_state)
            opt.state.clear()
        params = [p for p in model.parameters() if p.requires_grad]
        g = prob.g_out.detach()
        values: list[float] = []

        same_points = prob.x_in is prob.x_out
        x_fit, g_fit, x_val, g_val = prob.x_out, g, None, None
        if self.holdout > 0:
            if not isinstance(prob.x_out, Tensor):
                raise TypeError("NetworkAdjoint(holdout=...) needs the outer inputs as a tensor")
            m = g.shape[0]
            val = torch.zeros(m, dtype=torch.bool, device=g.device)
            val[:: max(2, int(1 / self.holdout))] = True
            if int(val.sum()) == 0 or int((~val).sum()) == 0:
                raise ValueError(f"holdout={self.holdout} leaves no point on one side of {m}")
            x_fit, g_fit = prob.x_out[~val], g[~val]
            x_val, g_val = prob.x_out[val], g[val]
            same_points = False
        best: tuple[float, int, dict[str, Tensor]] | None = None
        step = 0

        def closure() -> Tensor:
            nonlocal best
            A_in = _check_adjoint_out(model(prob.x_in), g, "adjoint network")
            # One forward pass when the inner and outer batches are the same points.
            A_out = A_in if same_points else _check_adjoint_out(model(x_fit), g, "adjoint network")
            HA = prob.hessian.matvec(A_in.detach())
            lin = (A_out * g_fit).sum(1).mean()
            quad = (A_in * HA).sum(1).mean()
            if x_val is not None:
                # J on the held-out points at the current weights (before this step).
                with torch.no_grad():
                    j_val = float(0.5 * quad + (model(x_val) * g_val).sum(1).mean())
                if best is None or j_val < best[0]:
                    best = (j_val, step, copy.deepcopy(model.state_dict()))
            # ⟨a, sg(Ha)⟩ has gradient ∂aᵀHa, that of ½⟨a, Ha⟩; its value is not J.
            grads = torch.autograd.grad(quad + lin, params)
            all_reduce_mean_(grads)
            for p, gp in zip(params, grads, strict=True):
                p.grad = gp
            value = 0.5 * quad.detach() + lin.detach()
            values.append(float(value))
            return value

        for _ in range(self.steps):
            opt.step(closure)
            opt.zero_grad(set_to_none=True)
            step += 1
        holdout_stats: dict[str, float] = {}
        if x_val is not None and best is not None:
            with torch.no_grad():
                A_in = model(prob.x_in)
                j_last = float(
                    adjoint_objective(A_in, prob.hessian.matvec(A_in), model(x_val), g_val)
                )
            if j_last < best[0]:
                best = (j_last, step, {})
            elif best[2]:
                model.load_state_dict(best[2])
            holdout_stats = {"adjoint_holdout_loss": best[0], "adjoint_best_step": float(best[1])}
        with torch.no_grad():
            A_in = model(prob.x_in)
            A_out = A_in if prob.x_in is prob.x_out else model(prob.x_out)
            J = adjoint_objective(A_in, prob.hessian.matvec(A_in), A_out, g)
        self.stats = {"adjoint_loss": float(J), "adjoint_loss_first": values[0], **holdout_stats}
        return A_in.detach()

    def state_dict(self) -> dict[str, Any]:
        assert self.model is not None and self.optimizer is not None
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.model is not None and self.optimizer is not None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def _check_adjoint_out(A: Tensor, g: Tensor, name: str) -> Tensor:
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[1] != g.shape[1]:
        shape = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
        raise ShapeError(f"{name} output has shape {shape}; expected [B, {g.shape[1]}] (= d_v)")
    return A


def reset_parameters(module: nn.Module) -> None:
    """Re-initialise every submodule that defines ``reset_parameters``.

    Parametrised tensors (spectral norm, say) are re-initialised through their original: the
    module's own ``reset_parameters`` would write into the computed tensor and change nothing.
    """
    from torch.nn.utils import parametrize

    for m in module.modules():
        fn = getattr(m, "reset_parameters", None)
        if not callable(fn):
            continue
        if not parametrize.is_parametrized(m):
            fn()
            continue
        plain = copy.deepcopy(m)
        names = list(m.parametrizations.keys())
        for name in names:
            parametrize.remove_parametrizations(plain, name, leave_parametrized=False)
        plain.reset_parameters()
        with torch.no_grad():
            for name, value in plain.named_parameters(recurse=False):
                if name in names:
                    m.parametrizations[name].right_inverse(value.detach().clone())
                else:
                    getattr(m, name).copy_(value)


# ------------------------------------------------------------------------------ linear adjoint
class LinearAdjoint(Adjoint):
    """Closed-form adjoint a(x) = W [φ(x); 1] on the inner model's last hidden features φ.

    Minimises J(W) + (λ/2)‖W‖²_F, i.e. solves

        (1/n) Σ_i H_i W z_i z_iᵀ + λ W = −(1/m) Σ_j g_j z_jᵀ,      z = [φ(x); 1].

    When every H_i = c_i·I (squared losses, scalar outputs) this is W = M S⁻¹ with
    S = (1/n) Σ c_i z_i z_iᵀ + λI, solved exactly (by Cholesky in feature space, or in sample
    space by the Woodbury identity when there are more features than samples). Otherwise it runs
    CG on the operator W ↦ (1/n) Σ H_i W z_i z_iᵀ + λW, preconditioned by that isotropic solve with
    c_i = tr(H_i)/d_v, so CG converges in a few iterations. Only the inner model's forward pass
    is needed: nothing is back-propagated through it.

    Args:
        ridge: λ. With ``relative=True`` (default) it is a fraction of the mean eigenvalue
            tr(S₀)/(p+1) of the unregularised S₀, so one value fits features of any scale.
        relative: interpret ``ridge`` relative to the feature scale (see above).
        head: the module whose *input* is φ(x): a module or its name in the inner model.
            Default: the last ``nn.Linear`` registered in the inner model or, in a model
            without one, the last ``nn.Embedding``, whose features are the one-hot encodings
            of its indices (for a discrete input such as an instrument).
        solver: CG used for non-isotropic Hessians.
        solve_dtype: dtype of the linear algebra (float64 by default, whatever the model's).
    """

    needs_features = True

    def __init__(
        self,
        ridge: float = 1e-6,
        *,
        relative: bool = True,
        head: nn.Module | str | None = None,
        solver: CG | None = None,
        solve_dtype: torch.dtype | None = torch.float64,
    ) -> None:
        if not ridge > 0:
            raise ValueError(f"LinearAdjoint needs ridge > 0, got {ridge}")
        self.ridge = ridge
        self.relative = relative
        self._head_spec = head
        self.head: nn.Module | None = None
        self.solver = solver if solver is not None else CG(maxiter=50, tol=1e-10)
        self.solve_dtype = solve_dtype
        self.stats = {}

    def bind(self, inner_model: nn.Module) -> None:
        self.head = find_head(inner_model, self._head_spec)

    @contextmanager
    def capture(self) -> Iterator[list[Tensor]]:
        """Context in which every forward of the inner model records φ(x) (the head's input)."""
        if self.head is None:
            raise RuntimeError("LinearAdjoint is not bound to an inner model (use it via FuncID)")
        with FeatureRecorder(self.head) as feats:
            yield feats

    def solve(self, prob: AdjointProblem) -> Tensor:
        if prob.z_in is None or prob.z_out is None:
            raise RuntimeError("LinearAdjoint needs the inner model's features (z_in, z_out)")
        out_dtype = prob.g_out.dtype
        dt = self.solve_dtype or out_dtype
        Z = _with_bias(prob.z_in.to(dt))
        Zo = _with_bias(prob.z_out.to(dt))
        G = prob.g_out.detach().to(dt)
        n, q = Z.shape
        m = Zo.shape[0]
        H = prob.hessian
        iso = H.isotropic is not None
        c = H.trace_scale().to(dt)
        if bool((c <= 0).any()):
            raise_not_convex(c)
        # Right-hand side  M = −(1/m) Σ_j g_j z_jᵀ   (d × q)
        M = -(G.T @ Zo) / m
        primal = q <= n or is_distributed()
        if primal:
            S0 = (Z * c[:, None]).T @ Z / n
            all_reduce_mean_([S0, M])
            scale = torch.diagonal(S0).sum() / q
        else:
            Zt = Z * (c / n).sqrt()[:, None]  # S0 = Ztᵀ Zt
            scale = (Zt * Zt).sum() / q
        lam = self.ridge * float(scale) if self.relative else self.ridge
        lam = max(lam, torch.finfo(dt).tiny)
        if primal:
            S = S0 + lam * torch.eye(q, dtype=dt, device=Z.device)
            L = _cholesky(S)

            def precond(R: Tensor) -> Tensor:  # R S⁻¹
                return torch.cholesky_solve(R.T, L).T
        else:
            K = Zt @ Zt.T + lam * torch.eye(n, dtype=dt, device=Z.device)
            L = _cholesky(K)

            def precond(R: Tensor) -> Tensor:  # R S⁻¹ by Woodbury
                return (R - torch.cholesky_solve((R @ Zt.T).T, L).T @ Zt) / lam

        W = precond(M)
        iters, gave_up = 0, False
        if not iso:
            Hd = _hessian_in(H, dt)

            def op(Ws: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
                (W_,) = Ws
                HU = Hd(Z @ W_.T)  # [n, d]: H_i W z_i
                out = HU.T @ Z / n
                all_reduce_mean_([out])
                return (out + lam * W_,)

            solver = self.solver
            (W,) = solver(op, (M,), x0=(W,), preconditioner=lambda Rs: (precond(Rs[0]),))
            iters = solver.info.iterations
            gave_up = getattr(solver.info, "gave_up", False)
        A_in = Z @ W.T
        A_out = Zo @ W.T
        HA = _hessian_in(H, dt)(A_in)
        J = adjoint_objective(A_in, HA, A_out, G)
        self.stats = {
            "adjoint_loss": float(J),
            "adjoint_ridge": lam,
            "adjoint_cg_iters": float(iters),
            "adjoint_isotropic": float(iso),
            "adjoint_cg_gave_up": float(gave_up),
        }
        return A_in.to(out_dtype)


def _hessian_in(H: OutputHessian, dt: torch.dtype) -> Callable[[Tensor], Tensor]:
    """H_i a_i computed in the solve dtype (casting the Hessians once when dense)."""
    if H.isotropic is not None:
        c = H.isotropic.to(dt)
        return lambda A: c[:, None] * A
    if H.dense is not None:
        Hd = H.dense.to(dt)
        return lambda A: torch.einsum("bij,bj->bi", Hd, A)
    return lambda A: H.matvec(A.to(H.dtype)).to(dt)


def _with_bias(Z: Tensor) -> Tensor:
    if Z.dim() != 2:
        raise ShapeError(
            f"the inner model's last hidden features must be [B, p], got {tuple(Z.shape)}"
        )
    return torch.cat([Z, torch.ones(Z.shape[0], 1, dtype=Z.dtype, device=Z.device)], dim=1)


def _cholesky(S: Tensor) -> Tensor:
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        # Only reachable with a pathological ridge: add jitter proportional to the scale.
        jitter = 1e-10 * float(torch.diagonal(S).abs().mean())
        L = torch.linalg.cholesky(
            S + jitter * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
        )
    return L


def _one_hot(emb: nn.Embedding, idx: Tensor) -> Tensor:
    if idx.dim() == 2 and idx.shape[1] == 1:
        idx = idx[:, 0]
    if idx.dim() != 1:
        raise ShapeError(
            f"LinearAdjoint on an nn.Embedding needs indices of shape [B] or [B, 1], got "
            f"{tuple(idx.shape)}: pass head= (a later module) or use NetworkAdjoint"
        )
    return nn.functional.one_hot(idx.long(), emb.num_embeddings).to(emb.weight.dtype)


def raise_not_convex(c: Tensor) -> None:
    from funcbo.errors import NotStronglyConvexError

    worst = int(torch.argmin(c))
    raise NotStronglyConvexError(
        f"the inner loss is not strongly convex in the prediction: the output Hessian of sample "
        f"{worst} has mean eigenvalue {float(c[worst]):.3e} ≤ 0"
    )


def find_head(model: nn.Module, spec: nn.Module | str | None) -> nn.Module:
    """The module whose input is the last hidden representation of ``model``."""
    if isinstance(spec, nn.Module):
        if not any(m is spec for m in model.modules()):
            raise ValueError(
                "the head module given to LinearAdjoint is not part of the inner model"
            )
        return spec
    if isinstance(spec, str):
        modules = dict(model.named_modules())
        if spec not in modules:
            known = ", ".join(k for k in modules if k)
            raise ValueError(f"inner model has no submodule {spec!r}; known: {known}")
        return modules[spec]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if embeddings:
        # An embedding is a linear layer on one-hot inputs: φ(x) = onehot(x).
        return embeddings[-1]
    raise ValueError(
        "LinearAdjoint found no nn.Linear or nn.Embedding in the inner model: pass head= (the "
        "module whose input is the last hidden features), or use NetworkAdjoint"
    )


class FeatureRecorder:
    """Context manager recording the input of ``head`` on every forward (the features φ).

    For an ``nn.Embedding`` head the features are the one-hot encodings of its indices (an
    embedding is a linear layer on them, so a linear adjoint on them can be any function of a
    discrete input); indices must have shape ``[B]`` or ``[B, 1]``.
    """

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.features: list[Tensor] = []
        self._handle: Any = None

    def __enter__(self) -> list[Tensor]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if isinstance(self.head, nn.Embedding):
                x = _one_hot(self.head, x)
            self.features.append(x)

        self._handle = self.head.register_forward_pre_hook(hook)
        return self.features

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


__all__ = [
    "Adjoint",
    "AdjointProblem",
    "FeatureRecorder",
    "LinearAdjoint",
    "NetworkAdjoint",
    "adjoint_objective",
    "find_head",
    "reset_parameters",
]
