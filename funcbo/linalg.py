"""Linear algebra for bilevel hypergradients.

* :class:`OutputHessian`: the per-sample Hessians H_i = ∂²_v ℓ(v_i) of a per-sample loss with
  respect to the prediction v (never the network weights), computed with ``torch.func``
  (forward-over-reverse ``jvp`` of ``grad``, batched over basis directions with ``vmap``). The
  Hessian of a per-sample loss summed over a batch is block diagonal, so one Hessian-vector
  product with a ``[B, d]`` direction yields all B products H_i a_i at once.
* :class:`CG` and :class:`Neumann`: linear solvers passed as values (``solver=CG(maxiter=10)``),
  working on tuples of tensors so that parameter-space solves need no flattening. A solver is
  immutable and keeps no record of its solves: ``x, info = solver(matvec, b)`` returns the
  solution with its diagnostics (:class:`SolveInfo`).
* :func:`batched_cg`: :class:`CG` on R independent systems at once, stacked along a leading run
  axis (R runs of one method advanced as one program), with per-run inner products, step sizes,
  stopping and safeguards; its per-run diagnostics are a :class:`BatchedSolveInfo`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from funcbo.errors import NonFiniteLossError, NotStronglyConvexError

Vec = tuple[Tensor, ...]
MatVec = Callable[[Vec], Vec]


# --------------------------------------------------------------------------- tuple arithmetic
def tdot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """Σ_k ⟨x_k, y_k⟩ over tuples of tensors."""
    terms = [torch.sum(x * y) for x, y in zip(xs, ys, strict=True)]
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def taxpy(a: Tensor | float, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Vec:
    """a·x + y elementwise over tuples."""
    return tuple(y + a * x for x, y in zip(xs, ys, strict=True))


def tnorm(xs: Sequence[Tensor]) -> float:
    """Euclidean norm of a tuple of tensors."""
    return math.sqrt(sum(float(torch.sum(x.detach() ** 2)) for x in xs))


# ------------------------------------------------------------------------------- solvers
class SolverGaveUpWarning(RuntimeWarning):
    """A linear solver returned its starting point because no iterate improved on it."""


@dataclass(frozen=True)
class SolveInfo:
    """What a linear solve did, returned with its solution (``x, info = solver(matvec, b)``):
    iterations run, final relative residual (when measured), whether the solver gave up (no
    progress, so it returned its start) and whether the returned iterate's residual exceeds the
    start's (``diverged``; only CG without safeguards returns such one)."""

    iterations: int = 0
    residual: float = float("nan")
    gave_up: bool = False
    diverged: bool = False


@dataclass(frozen=True)
class CG:
    """Conjugate gradient for A x = b with A symmetric positive definite.

    ``x, info = CG(maxiter=10)(matvec, b, x0)`` returns the solution and a :class:`SolveInfo`.
    Stops after ``maxiter`` iterations or when ‖r‖ ≤ tol·‖b‖. Two safeguards matter for
    parameter-space Hessians of non-convex inner problems, on which plain CG can diverge across
    warm-started outer iterations: a warm start x0 whose residual exceeds ‖b‖ is replaced by
    zero, and if the last iterate's residual exceeds the starting one, the iterate of smallest
    residual is returned instead. When no iterate improves on the start (the solve diverged or
    broke down at once), the start is returned with ``info.gave_up`` set and a
    :class:`SolverGaveUpWarning` is issued: the result is then no solve at all (zero, or the
    warm start), which estimators count and report instead of passing it on silently. Like the
    CG of other implicit-differentiation libraries it does not stop on negative curvature.
    ``damping`` solves (A + damping·I) instead, which keeps CG well defined when A is only
    positive semi-definite (a parameter-space Hessian of an over-parameterised network, say). An
    optional ``preconditioner`` M ≈ A⁻¹ turns it into preconditioned CG. ``safeguards=False``
    gives textbook CG instead: the warm start is always used and the last iterate returned, as
    in the CG of the FuncID authors' AID baseline; a last residual above the starting one is
    then recorded as ``info.diverged``.
    """

    maxiter: int = 10
    tol: float = 1e-10
    damping: float = 0.0
    safeguards: bool = True

    def __post_init__(self) -> None:
        if self.maxiter < 1:
            raise ValueError(f"CG maxiter must be ≥ 1, got {self.maxiter}")

    def __call__(
        self,
        matvec: MatVec,
        b: Sequence[Tensor],
        x0: Sequence[Tensor] | None = None,
        preconditioner: MatVec | None = None,
    ) -> tuple[Vec, SolveInfo]:
        b = tuple(b)
        A = matvec if self.damping == 0 else _damped(matvec, self.damping)
        M = preconditioner if preconditioner is not None else (lambda r: r)
        bnorm = tnorm(b)
        if bnorm == 0.0:
            return tuple(torch.zeros_like(t) for t in b), SolveInfo(0, 0.0)
        x = tuple(torch.zeros_like(t) for t in b)
        r = b
        warm = False
        if x0 is not None:
            r0 = taxpy(-1.0, A(tuple(x0)), b)
            # A warm start worse than zero (the operator changed a lot, or is indefinite) would
            # only carry the error forward: start from zero instead.
            if tnorm(r0) < bnorm or not self.safeguards:
                x, r, warm = tuple(x0), r0, True
        z = M(r)
        p = z
        rz = tdot(r, z)
        it = 0
        res = start_res = tnorm(r)
        best_x, best_res = x, res
        while it < self.maxiter and res > self.tol * bnorm:
            Ap = A(p)
            pAp = tdot(p, Ap)
            if not torch.isfinite(pAp):
                raise NonFiniteLossError("CG: a Hessian-vector product is not finite")
            if pAp == 0:
                break  # breakdown: no progress possible along p
            alpha = rz / pAp
            x = taxpy(alpha, p, x)
            r = taxpy(-alpha, Ap, r)
            z = M(r)
            rz_new = tdot(r, z)
            p = taxpy(rz_new / rz, p, z)
            rz = rz_new
            it += 1
            res = tnorm(r)
            if res < best_res:
                best_x, best_res = x, res
        if not self.safeguards:
            return x, SolveInfo(it, res / bnorm, diverged=res > start_res)
        if best_res >= start_res and start_res > self.tol * bnorm:
            # No iterate improved on the start (an indefinite or badly scaled operator, or an
            # immediate breakdown): the solve gave up. Say so; never pass the start off as a
            # solution.
            info = SolveInfo(it, start_res / bnorm, gave_up=True)
            warnings.warn(
                f"CG gave up: after {it} iteration(s) no iterate had a smaller residual than the "
                f"start (relative residual {start_res / bnorm:.3g}); returning the start "
                f"({'the warm start' if warm else 'zero'}). The "
                "operator may be indefinite or badly scaled: add damping or change the solver.",
                SolverGaveUpWarning,
                stacklevel=2,
            )
            return best_x, info
        if res > start_res:
            # Diverging (an indefinite or nearly singular operator): fall back to the iterate
            # with the smallest residual. Otherwise keep the last iterate, which CG makes
            # optimal in the A-norm on positive definite operators.
            return best_x, SolveInfo(it, best_res / bnorm)
        return x, SolveInfo(it, res / bnorm)


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series / Richardson iteration for A x = b.

    x_{k+1} = x_k + lr·(b − A x_k); from x_0 = 0 this is lr·Σ_{k<iters} (I − lr·A)^k b, which
    converges to A⁻¹b when 0 < lr < 2/λ_max(A). A warm start x_0 is honoured.
    """

    iters: int = 10
    lr: float = 0.1

    def __post_init__(self) -> None:
        if self.iters < 1 or self.lr <= 0:
            raise ValueError(f"Neumann needs iters ≥ 1 and lr > 0, got {self.iters}, {self.lr}")

    def __call__(
        self,
        matvec: MatVec,
        b: Sequence[Tensor],
        x0: Sequence[Tensor] | None = None,
        preconditioner: MatVec | None = None,
    ) -> tuple[Vec, SolveInfo]:
        b = tuple(b)
        x = tuple(torch.zeros_like(t) for t in b) if x0 is None else tuple(x0)
        for k in range(self.iters):
            r = b if (k == 0 and x0 is None) else taxpy(-1.0, matvec(x), b)
            x = taxpy(self.lr, r, x)
        return x, SolveInfo(self.iters, float("nan"))


@dataclass(frozen=True)
class Identity:
    """The "solver" that approximates A⁻¹ by a scaled identity: x = scale·b.

    With a parameter-space Hessian this is the identity approximation of OMD (Nikishin et al.,
    2022): one gradient, no Hessian-vector product.
    """

    scale: float = 1.0

    def __call__(
        self,
        matvec: MatVec,
        b: Sequence[Tensor],
        x0: Sequence[Tensor] | None = None,
        preconditioner: MatVec | None = None,
    ) -> tuple[Vec, SolveInfo]:
        return tuple(self.scale * t for t in b), SolveInfo(0, float("nan"))


Solver = CG | Neumann | Identity


def _damped(matvec: MatVec, damping: float) -> MatVec:
    return lambda v: taxpy(damping, v, matvec(v))


# --------------------------------------------------------------- batched solves (R systems)
def run_dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """Per-run Σ_k ⟨x_k, y_k⟩ of stacked tuples (every tensor's leading axis is the run),
    ``[R]``."""
    out = (xs[0] * ys[0]).flatten(1).sum(1)
    for x, y in zip(xs[1:], ys[1:], strict=True):
        out = out + (x * y).flatten(1).sum(1)
    return out


def run_norm(xs: Sequence[Tensor]) -> Tensor:
    """Per-run Euclidean norm of stacked tuples, ``[R]`` (float64)."""
    return run_dot([x.double() for x in xs], [x.double() for x in xs]).sqrt()


def run_where(mask: Tensor, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> list[Tensor]:
    """Run by run: ``xs`` where ``mask`` (``[R]``, one flag per run) is true, else ``ys``,
    for stacked tuples whose tensors have the run as leading axis."""
    return [
        torch.where(mask.reshape(-1, *([1] * (x.dim() - 1))), x, y)
        for x, y in zip(xs, ys, strict=True)
    ]


def _col(a: Tensor, x: Tensor) -> Tensor:
    """A per-run scalar ``[R]`` shaped to broadcast against ``x`` (and in its dtype)."""
    return a.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


@dataclass(frozen=True)
class BatchedSolveInfo:
    """What :func:`batched_cg` did, run by run: every field is a tensor ``[R]``.

    Attributes:
        iterations: iterations run (long).
        residual: the returned iterate's relative residual ‖b − A x‖/‖b‖ (float64; 0 for
            b = 0, NaN for a run with a non-finite product).
        gave_up: no iterate improved on the start, which was returned (bool; safeguarded only).
        diverged: the returned iterate's residual exceeds the start's (bool; unsafeguarded
            only, as :class:`SolveInfo`).
        nonfinite: a product pᵀAp was not finite; the run's solution is NaN (bool). The
            unbatched :class:`CG` raises :class:`~funcbo.errors.NonFiniteLossError` instead, so
            a batch marks that run failed alone.
    """

    iterations: Tensor
    residual: Tensor
    gave_up: Tensor
    diverged: Tensor
    nonfinite: Tensor

    def run(self, r: int) -> SolveInfo:
        """Run ``r``'s diagnostics as the unbatched solver's :class:`SolveInfo`."""
        return SolveInfo(
            int(self.iterations[r]),
            float(self.residual[r]),
            gave_up=bool(self.gave_up[r]),
            diverged=bool(self.diverged[r]),
        )


def batched_cg(
    matvec: Callable[[list[Tensor]], Sequence[Tensor]],
    b: Sequence[Tensor],
    x0: Sequence[Tensor] | None = None,
    warm: Tensor | None = None,
    *,
    maxiter: int = 10,
    tol: float = 1e-10,
    damping: float = 0.0,
    safeguards: bool = True,
) -> tuple[list[Tensor], BatchedSolveInfo]:
    """:class:`CG` (``CG(maxiter, tol, damping, safeguards)``, no preconditioner) on R
    independent systems A_r x_r = b_r at once.

    Every tensor of ``b``, ``x0`` and of ``matvec``'s argument and result has a leading run
    axis ``[R, ...]`` (stacked tuples); ``matvec`` applies the R operators, run r's block to
    run r's slice (a Hessian-vector product of a sum of per-run losses of unshared parameters is
    one). Each run has its own inner products, step sizes, residual and stopping test
    (‖r‖ ≤ tol·‖b‖, ``maxiter``, or a breakdown pᵀAp = 0); a finished run's iterate stays as it
    is while the others go on, so run r's result is, to rounding, what
    ``CG(...)(A_r, b_r, x0_r)`` returns alone:

    * ``damping`` solves (A + damping·I) x = b;
    * runs with ``warm`` (``[R]`` bool; default: all) start from ``x0``, the others from zero;
      with ``safeguards`` a run's warm start is dropped for zero when its residual is not
      below ‖b‖;
    * with ``safeguards``, a run whose last residual exceeds its starting one returns its
      iterate of smallest residual, and a run where no iterate improved on the start returns
      the start, flagged ``gave_up`` (one :class:`SolverGaveUpWarning` names those runs);
      without, every run returns its last iterate (textbook CG), flagged ``diverged`` when its
      residual exceeds the start's;
    * a run with b = 0 returns zero after no iteration;
    * a run whose pᵀAp is not finite stops there and returns NaN, flagged ``nonfinite`` (the
      unbatched solver raises :class:`~funcbo.errors.NonFiniteLossError`).

    Returns:
        (x ``[R, ...]`` per tensor, :class:`BatchedSolveInfo`).
    """
    if maxiter < 1:
        raise ValueError(f"CG maxiter must be ≥ 1, got {maxiter}")
    b = list(b)

    def A(v: list[Tensor]) -> list[Tensor]:
        out = list(matvec(v))
        if damping:
            out = [h + damping * t for h, t in zip(out, v, strict=True)]
        return out

    bnorm = run_norm(b)
    runs = len(bnorm)
    warm = (
        torch.ones(runs, dtype=torch.bool, device=bnorm.device)
        if warm is None
        else warm.to(device=bnorm.device, dtype=torch.bool)
    )
    x = [torch.zeros_like(t) for t in b]
    r = b
    if x0 is not None and bool(warm.any()):
        xw = run_where(warm, list(x0), x)
        Ax0 = A(xw)
        r0 = [bi - ai for bi, ai in zip(b, Ax0, strict=True)]
        if safeguards:
            # a warm start worse than zero would only carry the error forward (as CG)
            warm = warm & (run_norm(r0) < bnorm)
            x = run_where(warm, xw, x)
        else:
            x = xw
        r = run_where(warm, r0, b)
    p = r
    rz = run_dot(r, r)
    res = start = run_norm(r)
    best_x, best_res = x, res
    iters = torch.zeros(runs, dtype=torch.long, device=bnorm.device)
    active = (bnorm > 0) & (res > tol * bnorm)
    bad = torch.zeros_like(active)
    for _ in range(maxiter):
        if not bool(active.any()):
            break
        Ap = A(p)
        pAp = run_dot(p, Ap)
        bad |= active & ~torch.isfinite(pAp)
        active &= torch.isfinite(pAp) & (pAp != 0)
        alpha = torch.where(active, rz / torch.where(active, pAp, 1), 0)
        x = run_where(active, [xi + _col(alpha, xi) * pi for xi, pi in zip(x, p, strict=True)], x)
        r = run_where(active, [ri - _col(alpha, ri) * ai for ri, ai in zip(r, Ap, strict=True)], r)
        rz_new = run_dot(r, r)
        beta = torch.where(active, rz_new / torch.where(active, rz, 1), 0)
        p = run_where(active, [ri + _col(beta, pi) * pi for ri, pi in zip(r, p, strict=True)], p)
        rz = torch.where(active, rz_new, rz)
        iters += active.long()
        res = torch.where(active, run_norm(r), res)
        if safeguards:
            better = active & (res < best_res)
            best_x = run_where(better, x, best_x)
            best_res = torch.where(better, res, best_res)
        active &= res > tol * bnorm
    zero = bnorm == 0
    no = torch.zeros_like(zero)
    if safeguards:
        gave_up = (best_res >= start) & (start > tol * bnorm) & ~zero & ~bad
        worse = res > start
        # gave up: best_x is the start; diverging: the iterate of smallest residual
        x = run_where(gave_up | worse, best_x, x)
        final = torch.where(gave_up, start, torch.where(worse, best_res, res))
        diverged = no
        if bool(gave_up.any()):
            which = gave_up.nonzero().flatten().tolist()
            warnings.warn(
                f"CG gave up on run(s) {which} of the batch: no iterate had a smaller residual "
                "than the start; returning the start. The operator may be indefinite or badly "
                "scaled: add damping or change the solver.",
                SolverGaveUpWarning,
                stacklevel=2,
            )
    else:
        gave_up = no
        final = res
        diverged = (res > start) & ~bad
    x = run_where(zero, [torch.zeros_like(t) for t in x], x)
    x = run_where(bad, [torch.full_like(t, float("nan")) for t in x], x)
    rel = torch.where(zero, torch.zeros_like(final), final / torch.where(zero, 1, bnorm))
    rel = torch.where(bad, torch.full_like(rel, float("nan")), rel)
    return x, BatchedSolveInfo(iters, rel, gave_up, diverged, bad)


# ------------------------------------------------------------------ output-space Hessians
class OutputHessian:
    """Per-sample Hessians H_i = ∂²_v ℓ(v_i) of a per-sample loss at predictions V ∈ R^{B×d}.

    Built by :meth:`of_loss` with ``torch.func``. Dense storage (``[B, d, d]``) is used for small
    output dimensions; above ``dense_max`` only Hessian-vector products are kept. Structure is
    detected once: ``isotropic`` holds c ∈ R^B when every H_i = c_i·I (squared losses, any
    scalar-output loss), which lets closed-form adjoints skip iterative solves.

    The Hessians are constants: they carry no autograd graph (ω is held fixed).
    """

    def __init__(
        self,
        dense: Tensor | None,
        matvec_fn: Callable[[Tensor], Tensor] | None,
        like: Tensor,
    ) -> None:
        if dense is None and matvec_fn is None:
            raise ValueError("OutputHessian needs dense matrices or a matvec function")
        self.dense = dense
        self._matvec_fn = matvec_fn
        self.shape: tuple[int, int] = (like.shape[0], like.shape[1])
        self.dtype = like.dtype
        self.device = like.device
        self.isotropic: Tensor | None = None
        if dense is not None:
            self.isotropic = _isotropic_scale(dense)

    @classmethod
    def scaled_identity(cls, scale: Tensor | float, V: Tensor) -> OutputHessian:
        """H_i = c_i·I for predictions V (a known Hessian: ½‖v − y‖² has c = 1)."""
        c = torch.as_tensor(scale, dtype=V.dtype, device=V.device).expand(V.shape[0]).clone()
        hess = cls(None, lambda A: c[:, None] * A, V)
        hess.isotropic = c
        return hess

    @classmethod
    def of_loss(
        cls,
        loss_fn: Callable[[Tensor], Tensor],
        V: Tensor,
        *,
        dense: bool | None = None,
        dense_max: int = 128,
    ) -> OutputHessian:
        """Hessians of ``loss_fn`` (predictions ``[B, d]`` → per-sample losses ``[B]``) at V.

        ``dense=None`` picks dense storage when d ≤ ``dense_max``.
        """
        V = V.detach()
        B, d = V.shape
        want_dense = d <= dense_max if dense is None else dense
        g = grad(lambda v: loss_fn(v).sum())

        def hvp(a: Tensor) -> Tensor:
            with torch.no_grad():
                return jvp(g, (V,), (a,))[1]

        if dense is None and d > 2:
            # Two random probes detect an isotropic Hessian (H_i = c_i·I) for the price of two
            # products instead of d: a random vector is an eigenvector of H_i only if H_i ∝ I.
            iso = _probe_isotropic(g, V)
            if iso is not None:
                return cls.scaled_identity(iso, V)
        if not want_dense:
            return cls(None, hvp, V)
        eye = torch.eye(d, dtype=V.dtype, device=V.device)
        basis = eye[:, None, :].expand(d, B, d)  # basis[k, b] = e_k for every sample b
        try:
            with torch.no_grad():
                cols = vmap(lambda e: jvp(g, (V,), (e,))[1])(basis)
        except RuntimeError:
            # Losses with data-dependent Python control flow cannot be vmapped; one
            # Hessian-vector product per output coordinate gives the same matrices.
            cols = torch.stack([hvp(basis[k]) for k in range(d)])
        H = cols.permute(1, 2, 0)  # H[b, i, k] = (H_b e_k)_i
        H = 0.5 * (H + H.transpose(1, 2))
        if not bool(torch.isfinite(H).all()):
            raise NonFiniteLossError("the output Hessian of the inner loss is not finite")
        return cls(H.contiguous(), hvp, V)

    def matvec(self, A: Tensor) -> Tensor:
        """Per-sample products H_i a_i for A ∈ R^{B×d}."""
        if self.isotropic is not None:
            return self.isotropic[:, None] * A
        if self.dense is not None:
            return torch.einsum("bij,bj->bi", self.dense, A)
        assert self._matvec_fn is not None
        return self._matvec_fn(A)

    def trace_scale(self, probes: int = 4, generator: torch.Generator | None = None) -> Tensor:
        """c_i = tr(H_i)/d for every sample (Hutchinson estimate when not stored densely)."""
        if self.isotropic is not None:
            return self.isotropic
        if self.dense is not None:
            return torch.diagonal(self.dense, dim1=1, dim2=2).mean(1)
        B, d = self.shape
        acc = None
        for _ in range(probes):
            r = torch.randint(0, 2, (B, d), generator=generator)
            r = (2 * r - 1).to(dtype=self.dtype, device=self.device)
            est = (r * self.matvec(r)).sum(1) / d
            acc = est if acc is None else acc + est
        assert acc is not None
        return acc / probes

    def eigmin(self) -> Tensor:
        """Smallest eigenvalue of every H_i (needs dense or isotropic Hessians)."""
        if self.isotropic is not None:
            return self.isotropic
        if self.dense is None:
            raise ValueError(
                "eigmin needs dense Hessians: build with OutputHessian.of_loss(dense=True)"
            )
        return torch.linalg.eigvalsh(self.dense)[:, 0]

    def check_positive(self, tol: float = 0.0) -> float:
        """Raise :class:`NotStronglyConvexError` unless every H_i has eigenvalues > tol."""
        lam = self.eigmin()
        worst = int(torch.argmin(lam))
        value = float(lam[worst])
        if not value > tol:
            raise NotStronglyConvexError(
                f"the inner loss is not strongly convex in the prediction: the output Hessian of "
                f"sample {worst} has smallest eigenvalue {value:.3e} (≤ {tol:g}); FuncID needs "
                "∂²_v ℓ_in ≻ 0 (add a ridge term μ/2·‖pred‖² to the inner loss, for instance)"
            )
        return float(lam.min())


_PROBES: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}


def _probes(V: Tensor) -> Tensor:
    """Two fixed Rademacher probes shaped like V (drawn once per shape, dtype and device)."""
    key = (V.shape[0], V.shape[1], V.dtype, V.device)
    R = _PROBES.get(key)
    if R is None:
        gen = torch.Generator().manual_seed(0)  # fixed: never touches the global random state
        R = (2 * torch.randint(0, 2, (2, *V.shape), generator=gen) - 1).to(V.dtype).to(V.device)
        if len(_PROBES) >= 8:
            _PROBES.pop(next(iter(_PROBES)))
        _PROBES[key] = R
    return R


def _probe_isotropic(g: Callable[[Tensor], Tensor], V: Tensor) -> Tensor | None:
    """c with H_i = c_i·I, judged from two fixed Rademacher probes, or None."""
    d = V.shape[1]
    R = _probes(V)
    try:
        with torch.no_grad():
            HR = vmap(lambda r: jvp(g, (V,), (r,))[1])(R)
    except RuntimeError:
        return None  # not vmappable: the dense path has its own fallback
    c = (R * HR).sum(2) / d  # Rayleigh quotients, ‖r‖² = d
    tol = 1e3 * torch.finfo(V.dtype).eps
    dev = (HR - c[:, :, None] * R).norm(dim=2)
    scale = HR.norm(dim=2).clamp_min(torch.finfo(V.dtype).tiny)
    same = (c[0] - c[1]).abs() <= tol * c.abs().amax(0).clamp_min(torch.finfo(V.dtype).tiny)
    if bool((dev <= tol * scale).all()) and bool(same.all()):
        return c[0]
    return None


def _isotropic_scale(H: Tensor) -> Tensor | None:
    """c with H_i = c_i·I for every sample, or None when some H_i is not a multiple of I."""
    d = H.shape[-1]
    c = torch.diagonal(H, dim1=1, dim2=2).mean(1)
    if d == 1:
        return c
    eye = torch.eye(d, dtype=H.dtype, device=H.device)
    dev = torch.linalg.matrix_norm(H - c[:, None, None] * eye)
    scale = torch.linalg.matrix_norm(H).clamp_min(torch.finfo(H.dtype).tiny)
    tol = 100 * torch.finfo(H.dtype).eps
    return c if bool((dev <= tol * scale).all()) else None


__all__ = [
    "CG",
    "BatchedSolveInfo",
    "Identity",
    "Neumann",
    "OutputHessian",
    "SolveInfo",
    "Solver",
    "SolverGaveUpWarning",
    "batched_cg",
    "run_dot",
    "run_norm",
    "run_where",
    "taxpy",
    "tdot",
    "tnorm",
]
