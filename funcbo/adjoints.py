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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from funcbo.diagnostics import Diagnostics, Metrics
from funcbo.distributed import all_reduce_mean_, is_distributed
from funcbo.errors import ShapeError
from funcbo.linalg import CG, OutputHessian, SolveInfo

OptimizerLike = torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer]


@dataclass
class AdjointProblem:
    """Everything an adjoint solver needs for one hypergradient.

    Attributes:
        x_in, x_out: the inner model's inputs on the inner and outer batches.
        hessian: per-sample output Hessians H_i at the inner points.
        g_out: per-sample output gradients g_j = ∂_v ℓ_out at the outer points, ``[m, d_v]``.
        z_in, z_out: last hidden features of the inner model, for a feature-based adjoint
            called directly (under FuncID, :meth:`LinearAdjoint.prepare` records them).
    """

    x_in: Any
    x_out: Any
    hessian: OutputHessian
    g_out: Tensor
    z_in: Tensor | None = None
    z_out: Tensor | None = None


@dataclass(frozen=True)
class AdjointStats(Diagnostics):
    """Diagnostics of one adjoint solve (the metric names are in :meth:`metrics`).

    Attributes:
        loss: J at the returned adjoint (``adjoint_loss``).
        loss_first: :class:`NetworkAdjoint`: J before its first step (``adjoint_loss_first``).
        holdout_loss, best_step: :class:`NetworkAdjoint` with a holdout: the held-out J of the
            kept iterate and its step (``adjoint_holdout_loss``, ``adjoint_best_step``).
        ridge: :class:`LinearAdjoint`: λ (``adjoint_ridge``).
        solve: :class:`LinearAdjoint`: its CG solve, 0 iterations for the closed form
            (``adjoint_cg_iters``, ``adjoint_cg_gave_up``).
        isotropic: :class:`LinearAdjoint`: every H_i was a multiple of I
            (``adjoint_isotropic``).
    """

    loss: float
    loss_first: float | None = None
    holdout_loss: float | None = None
    best_step: int | None = None
    ridge: float | None = None
    solve: SolveInfo | None = None
    isotropic: bool | None = None

    def metrics(self) -> dict[str, float]:
        out = {"adjoint_loss": self.loss}
        if self.loss_first is not None:
            out["adjoint_loss_first"] = self.loss_first
        if self.holdout_loss is not None and self.best_step is not None:
            out["adjoint_holdout_loss"] = self.holdout_loss
            out["adjoint_best_step"] = float(self.best_step)
        if self.ridge is not None:
            out["adjoint_ridge"] = self.ridge
        if self.solve is not None:
            out["adjoint_cg_iters"] = float(self.solve.iterations)
        if self.isotropic is not None:
            out["adjoint_isotropic"] = float(self.isotropic)
        if self.solve is not None:
            out["adjoint_cg_gave_up"] = float(self.solve.gave_up)
        return out

    @property
    def solves_gave_up(self) -> int:
        return int(self.solve is not None and self.solve.gave_up)


def adjoint_objective(A_in: Tensor, HA_in: Tensor, A_out: Tensor, g_out: Tensor) -> Tensor:
    """J = ½ mean_i ⟨a_i, H_i a_i⟩ + mean_j ⟨g_j, a_j⟩ given H_i a_i."""
    return 0.5 * (A_in * HA_in).sum(1).mean() + (A_out * g_out).sum(1).mean()


class Adjoint(ABC):
    """An adjoint solver: returns a*(x) at the inner points, shape ``[n, d_v]``.

    FuncID calls :meth:`bind` once, then per hypergradient :meth:`prepare` (the inner model's
    forward passes) and :meth:`solve`. An adjoint that needs more of the inner model than its
    predictions takes it in :meth:`prepare` and keeps it for the next :meth:`solve` only.
    """

    #: diagnostics of the last solve (adjoint loss, iterations, ...; None before the first)
    diagnostics: Diagnostics | None = None

    @property
    def stats(self) -> dict[str, float]:
        """The last solve's diagnostics as metrics (empty before the first). An adjoint may also
        assign a plain dictionary (kept as a :class:`~funcbo.diagnostics.Metrics` record)."""
        return {} if self.diagnostics is None else self.diagnostics.metrics()

    @stats.setter
    def stats(self, values: dict[str, float]) -> None:
        self.diagnostics = Metrics(dict(values))

    def bind(self, inner_model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Attach to the inner model (called once by FuncID)."""

    def prepare(self, inner_model: nn.Module, x_in: Any, x_out: Any) -> tuple[Tensor, Tensor]:
        """The inner model's predictions at the inner and outer inputs, ``(h(x_in), h(x_out))``
        (FuncID calls it under ``torch.no_grad``), and whatever else of the inner model the next
        :meth:`solve` needs, kept until that solve (default: nothing)."""
        return inner_model(x_in), inner_model(x_out)

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
            them (default: Adam with lr 1e-3, with its fused kernel where torch has one for
            the parameters' device: the per-tensor update of the default kernel costs as much
            as a forward pass on a 34M-parameter network and a temporary as large as its
            largest weight).
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
        self.diagnostics: AdjointStats | None = None
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
            self.optimizer = _default_adam(self.model.parameters())
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
            opt.step(closure)  # type: ignore[arg-type] # torch types the closure as returning a float; optimizers accept a Tensor
            opt.zero_grad(set_to_none=True)
            step += 1
        holdout: tuple[float, int] | None = None
        if x_val is not None and g_val is not None and best is not None:
            with torch.no_grad():
                A_in = model(prob.x_in)
                j_last = float(
                    adjoint_objective(A_in, prob.hessian.matvec(A_in), model(x_val), g_val)
                )
            if j_last < best[0]:
                best = (j_last, step, {})
            elif best[2]:
                model.load_state_dict(best[2])
            holdout = (best[0], best[1])
        with torch.no_grad():
            A_in = model(prob.x_in)
            A_out = A_in if prob.x_in is prob.x_out else model(prob.x_out)
            J = adjoint_objective(A_in, prob.hessian.matvec(A_in), A_out, g)
        self.diagnostics = AdjointStats(
            float(J),
            loss_first=values[0],
            holdout_loss=None if holdout is None else holdout[0],
            best_step=None if holdout is None else holdout[1],
        )
        return A_in.detach()

    def state_dict(self) -> dict[str, Any]:
        assert self.model is not None and self.optimizer is not None
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.model is not None and self.optimizer is not None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def _default_adam(params: Iterable[nn.Parameter], lr: float = 1e-3) -> torch.optim.Optimizer:
    """Adam with its fused kernel (one call for every tensor, no temporaries), or the default
    kernel where this torch has no fused one for the parameters' device or dtype. The update
    is the same up to rounding."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


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
        parametrizations = cast(nn.ModuleDict, m.parametrizations)
        names = list(parametrizations.keys())
        for name in names:
            parametrize.remove_parametrizations(plain, name, leave_parametrized=False)
        cast(Callable[[], None], plain.reset_parameters)()
        with torch.no_grad():
            for name, value in plain.named_parameters(recurse=False):
                if name in names:
                    cast(Any, parametrizations[name]).right_inverse(value.detach().clone())
                else:
                    getattr(m, name).copy_(value)


# ------------------------------------------------------------------------------ linear adjoint
class LinearAdjoint(Adjoint):
    """Closed-form adjoint a(x) = W [φ(x); 1] on the inner model's last hidden features φ.

    Minimises J(W) + (λ/2)‖W‖²_F, i.e. solves

        (1/n) Σ_i H_i W z_i z_iᵀ + λ W = −(1/m) Σ_j g_j z_jᵀ = M,      z = [φ(x); 1].

    When every H_i = c_i·I (squared losses, scalar outputs) this is W = M S⁻¹ with
    S = Z̃ᵀ D² Z̃ + λI, D² = diag(c_i/n), Z̃ the n × q matrix of the z_iᵀ, solved exactly by
    Cholesky: in feature space when q ≤ n, otherwise in sample space, where
    a(x_i) = (Z̃ Wᵀ)_i = (D⁻¹ K⁻¹ D Z̃ Mᵀ)_i with K = D Z̃ Z̃ᵀ D + λI (n × n; the push-through
    identity Z̃ S⁻¹ = D⁻¹ K⁻¹ D Z̃), so W itself is never formed. Otherwise it runs CG on the
    operator W ↦ (1/n) Σ H_i W z_i z_iᵀ + λW, preconditioned by that isotropic solve with
    c_i = tr(H_i)/d_v, so CG converges in a few iterations. Only the inner model's forward pass
    is needed: nothing is back-propagated through it.

    The features stay in the model's dtype: products with them are computed in ``solve_dtype``
    on blocks converted one at a time (a few MB), the bias column is never materialised, and
    only the Gram matrix (n × n or q × q) and its factor are held in ``solve_dtype``.

    Args:
        ridge: λ. With ``relative=True`` (default) it is a fraction of the mean eigenvalue
            tr(S₀)/q of the unregularised S₀, so one value fits features of any scale.
        relative: interpret ``ridge`` relative to the feature scale (see above).
        head: the module whose *input* is φ(x): a module or its name in the inner model.
            Default: the last ``nn.Linear`` registered in the inner model or, in a model
            without one, the last ``nn.Embedding``, whose features are the one-hot encodings
            of its indices (for a discrete input such as an instrument).
        solver: CG used for non-isotropic Hessians.
        solve_dtype: dtype of the linear algebra (float64 by default, whatever the model's;
            None: the model's). A float32 solve halves the cost of the Gram matrix but its
            error grows with the condition number (up to 1/ridge with a relative ridge), and
            with a small ridge its Cholesky factorisation fails: keep float64 unless the ridge
            is large.
    """

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
        self.diagnostics: AdjointStats | None = None
        #: the features (z_in, z_out) recorded by :meth:`prepare`, until the next solve
        self._features: tuple[Tensor, Tensor] | None = None

    def bind(self, inner_model: nn.Module) -> None:
        self.head = find_head(inner_model, self._head_spec)

    def prepare(self, inner_model: nn.Module, x_in: Any, x_out: Any) -> tuple[Tensor, Tensor]:
        """The predictions, recording φ(x_in) and φ(x_out) (the head's inputs) for the next
        :meth:`solve`, which releases them."""
        if self.head is None:
            raise RuntimeError("LinearAdjoint is not bound to an inner model (use it via FuncID)")
        self._features = None
        with FeatureRecorder(self.head) as feats:
            v_in = inner_model(x_in)
            v_out = inner_model(x_out)
        if len(feats) != 2:
            raise RuntimeError(
                f"LinearAdjoint's head ran {len(feats)} times for 2 forward passes: pass "
                "head= naming the module applied once, to the last hidden features"
            )
        self._features = (feats[0].detach(), feats[1].detach())
        feats.clear()  # the adjoint holds the only references: they go with the solve
        return v_in, v_out

    def solve(self, prob: AdjointProblem) -> Tensor:
        """a* at the inner points, on the features in ``prob`` (``z_in``, ``z_out``) or, when it
        has none, those the last :meth:`prepare` recorded (released here)."""
        features, self._features = self._features, None
        if prob.z_in is not None and prob.z_out is not None:
            z_in, z_out = prob.z_in, prob.z_out
        elif features is not None:
            z_in, z_out = features
        else:
            raise RuntimeError(
                "LinearAdjoint needs the inner model's features: z_in and z_out in the "
                "problem, or a prepare() before the solve (FuncID calls it)"
            )
        del features
        out_dtype = prob.g_out.dtype
        dt = self.solve_dtype or out_dtype
        Zo = _Features(z_out, dt)
        Z = _Features(z_in, dt)
        del z_in, z_out
        if Zo.q != Z.q:
            raise ShapeError(
                f"inner and outer features differ in size: {Z.q - 1} and {Zo.q - 1} columns"
            )
        G = prob.g_out.detach().to(dt)
        n, q, m = Z.n, Z.q, Zo.n
        H = prob.hessian
        iso = H.isotropic is not None
        c = H.trace_scale().to(dt)
        if bool((c <= 0).any()):
            raise_not_convex(c)
        # Right-hand side  M = −(1/m) Σ_j g_j z_jᵀ   (d × q)
        M = Zo.times(G.T).div_(-m)
        Z._buffer = Zo._buffer  # one conversion buffer for both
        del Zo
        primal = q <= n or is_distributed()
        sq = (c / n).sqrt()  # the diagonal of D
        all_reduce_mean_([M])

        def gram() -> Tensor:
            if primal:
                S = Z.gram_features(sq.square())  # S₀ = Z̃ᵀ D² Z̃
                all_reduce_mean_([S])
                return S
            return Z.gram_samples(sq)  # K₀ = D Z̃ Z̃ᵀ D: the trace and non-zero spectrum of S₀

        S = gram()
        scale = torch.diagonal(S).sum() / q
        lam = self.ridge * float(scale) if self.relative else self.ridge
        lam = max(lam, torch.finfo(dt).tiny)

        def regularised(S: Tensor) -> Tensor:
            S.diagonal().add_(lam)
            return S

        L = _cholesky(regularised(S), lambda: regularised(gram()))  # L overwrites S
        del S

        def precond(R: Tensor) -> Tensor:  # R S⁻¹ (by Woodbury in sample space)
            if primal:
                return _cholesky_solve(L, R.T).T
            y = _cholesky_solve(L, (Z.times_t(R) * sq).T)
            return (R - Z.times(y.T * sq)) / lam

        info = SolveInfo(0)  # the closed form
        if iso and not primal:
            # a = D⁻¹ K⁻¹ D Z̃ Mᵀ; ⟨W, M⟩ = tr(M S⁻¹ Mᵀ) = (‖M‖² − ⟨D Z̃ Mᵀ, K⁻¹ D Z̃ Mᵀ⟩)/λ.
            b = (Z.times_t(M) * sq).T
            y = _cholesky_solve(L, b)
            A_in = y / sq[:, None]
            WM = (M.square().sum() - (b * y).sum()) / lam
            J = 0.5 * (c[:, None] * A_in.square()).sum(1).mean() - WM
        else:
            W = precond(M)
            if not iso:
                Hd = _hessian_in(H, dt)

                def op(Ws: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
                    (W_,) = Ws
                    out = Z.times(Hd(Z.times_t(W_).T).T / n)  # (1/n) Σ_i H_i W z_i z_iᵀ
                    all_reduce_mean_([out])
                    return (out + lam * W_,)

                (W,), info = self.solver(
                    op, (M,), x0=(W,), preconditioner=lambda Rs: (precond(Rs[0]),)
                )
            A_in = Z.times_t(W).T
            # mean_j ⟨a(x_j), g_j⟩ = −⟨W, M⟩ (M is the mean over every rank's outer points)
            J = 0.5 * (A_in * _hessian_in(H, dt)(A_in)).sum(1).mean() - (W * M).sum()
        self.diagnostics = AdjointStats(float(J), ridge=lam, solve=info, isotropic=iso)
        return A_in.to(out_dtype)


#: elements of a block of features converted to the solve dtype at a time (1 MB in float64)
FEATURE_BLOCK = 2**17


class _Features:
    """The features Z̃ = [Z, 1] (n × q, q = p + 1), multiplied in the solve dtype ``dt``.

    Neither the bias column nor a copy of Z in ``dt`` is ever built: when Z has another dtype,
    blocks of at most :data:`FEATURE_BLOCK` elements are converted one at a time into one
    reused buffer. Thin factors are d × n or d × q (rows of length n or q), the orientation in
    which these products run fastest.
    """

    def __init__(self, Z: Tensor, dt: torch.dtype, buffer: Tensor | None = None) -> None:
        if Z.dim() != 2:
            raise ShapeError(
                f"the inner model's last hidden features must be [B, p], got {tuple(Z.shape)}"
            )
        self.Z = Z.detach()
        self.dt = dt
        self.n, p = Z.shape
        self.q = p + 1
        self.same = Z.dtype == dt
        self._buffer = buffer

    def buffer(self, numel: int) -> Tensor:
        """A flat work buffer in ``dt`` with at least ``numel`` elements (reused)."""
        if self._buffer is None or self._buffer.numel() < numel:
            size = max(numel, min(FEATURE_BLOCK, self.Z.numel()))
            self._buffer = torch.empty(size, dtype=self.dt, device=self.Z.device)
        return self._buffer

    def _convert(self, block: Tensor) -> Tensor:
        rows, cols = block.shape
        return self.buffer(rows * cols)[: rows * cols].view(rows, cols).copy_(block)

    def _rows(self) -> Iterator[tuple[int, int, Tensor]]:
        """(i0, i1, Z[i0:i1] in dt) over blocks of rows; a block is valid until the next."""
        if self.same:
            yield 0, self.n, self.Z
            return
        step = max(1, FEATURE_BLOCK // max(self.q - 1, 1))
        for i0 in range(0, self.n, step):
            i1 = min(i0 + step, self.n)
            yield i0, i1, self._convert(self.Z[i0:i1])

    def times_t(self, W: Tensor) -> Tensor:
        """W Z̃ᵀ for W of shape [k, q]: shape [k, n] (row i of Z̃ Wᵀ is column i)."""
        out = torch.empty(W.shape[0], self.n, dtype=self.dt, device=self.Z.device)
        bias = W[:, -1:]
        for i0, i1, Zb in self._rows():
            out[:, i0:i1] = torch.addmm(bias, W[:, :-1], Zb.T)
        return out

    def times(self, Y: Tensor) -> Tensor:
        """Y Z̃ for Y of shape [k, n]: shape [k, q]."""
        out = torch.empty(Y.shape[0], self.q, dtype=self.dt, device=self.Z.device)
        out[:, :-1] = 0
        for i0, i1, Zb in self._rows():
            out[:, :-1].addmm_(Y[:, i0:i1], Zb)
        out[:, -1] = Y.sum(1)
        return out

    def gram_features(self, w: Tensor) -> Tensor:
        """Z̃ᵀ diag(w) Z̃, shape [q, q]."""
        p = self.q - 1
        S = torch.zeros(self.q, self.q, dtype=self.dt, device=self.Z.device)
        for i0, i1, Zb in self._rows():
            S[:p, :p].addmm_(Zb.T, Zb * w[i0:i1, None])
        S[p] = self.times(w[None, :])[0]
        S[:p, p] = S[p, :p]
        return S

    def gram_samples(self, s: Tensor) -> Tensor:
        """diag(s) Z̃ Z̃ᵀ diag(s), shape [n, n].

        Only the blocks on and below the diagonal are multiplied (4 row blocks: 5/8 of the
        work of the full product), then mirrored; Z is converted by blocks of columns.
        """
        n, p = self.n, self.q - 1
        K = torch.ones(n, n, dtype=self.dt, device=self.Z.device)  # the bias: 1 1ᵀ
        rb = n if n < 512 else -(-n // 4)
        step = max(p, 1) if self.same else max(1, FEATURE_BLOCK // n)
        for j0 in range(0, p, step):
            block = self.Z[:, j0 : j0 + step]
            C = block if self.same else self._convert(block)
            for i0 in range(0, n, rb):
                i1 = min(i0 + rb, n)
                K[i0:i1, :i1].addmm_(C[i0:i1], C[:i1].T)
        for i0 in range(rb, n, rb):
            i1 = min(i0 + rb, n)
            K[:i0, i0:i1] = K[i0:i1, :i0].T
        return K.mul_(s[:, None]).mul_(s[None, :])


def _hessian_in(H: OutputHessian, dt: torch.dtype) -> Callable[[Tensor], Tensor]:
    """H_i a_i computed in the solve dtype (casting the Hessians once when dense)."""
    if H.isotropic is not None:
        c = H.isotropic.to(dt)
        return lambda A: c[:, None] * A
    if H.dense is not None:
        Hd = H.dense.to(dt)
        return lambda A: torch.einsum("bij,bj->bi", Hd, A)
    return lambda A: H.matvec(A.to(H.dtype)).to(dt)


def _cholesky(S: Tensor, rebuild: Callable[[], Tensor] | None = None) -> Tensor:
    """Lower Cholesky factor L of the symmetric positive definite S, written over S.

    S is symmetric, so Sᵀ (a view) is the same matrix already in LAPACK's column-major order:
    factorising it into itself needs no copy (the n × n factor is the largest array of a
    sample-space solve). If the factorisation fails, S is lost: ``rebuild()`` returns it again
    (default: a copy is kept beforehand, and S is factorised out of place).
    """
    if rebuild is None:
        S, kept = S.clone(), S
        rebuild = lambda: kept  # noqa: E731
    St = S.mT
    info = torch.zeros((), dtype=torch.int32, device=S.device)
    try:
        L, info = torch.linalg.cholesky_ex(St, out=(St, info))
    except RuntimeError:  # an out= this torch does not accept: factorise a copy
        L, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        # Only reachable with a pathological ridge: add jitter proportional to the scale.
        S = rebuild()
        S.diagonal().add_(1e-10 * float(torch.diagonal(S).abs().mean()))
        L = torch.linalg.cholesky(S)
    return L


def _cholesky_solve(L: Tensor, B: Tensor) -> Tensor:
    """(L Lᵀ)⁻¹ B by two triangular solves (``torch.cholesky_solve`` copies L)."""
    y = torch.linalg.solve_triangular(L, B, upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True)


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
    "AdjointStats",
    "FeatureRecorder",
    "LinearAdjoint",
    "NetworkAdjoint",
    "adjoint_objective",
    "find_head",
    "reset_parameters",
]
