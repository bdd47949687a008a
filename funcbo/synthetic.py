"""Synthetic bilevel problems whose value F(ω) and hypergradient ∇F(ω) are known exactly.

They serve as the library's ground truth (tests, the worked example, benchmarks):

* :class:`LinearQuadratic`: an affine inner model regressing Ω·t on x, a least-squares outer
  loss; F is a quadratic in Ω with a closed-form gradient and minimiser.
* :class:`DiscreteIV`: instrumental-variable style 2SLS with a discrete instrument x ∈ {0..K−1},
  so h*_ω(x) = E[ψ_ω(t) | x] is a group mean and F(ω) is exact for any network ψ_ω.
* :class:`LinearIV`: confounded linear IV regression with a discrete instrument; the bilevel
  solution is the classical two-stage least-squares estimate, so the learned structural
  coefficients can be compared with it (and with the biased ordinary least squares).
* :class:`SoftmaxIV`: the :class:`DiscreteIV` structure with a cross-entropy inner loss plus an
  output ridge, strongly convex but not quadratic (non-isotropic output Hessians); h*_ω(x)
  solves a small convex problem per group by Newton's method.

All data are drawn from a seeded generator; everything is float64 by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from funcbo.problem import BilevelProblem

Batch = dict[str, Tensor]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(sizes: list[int], *, activation: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """A multilayer perceptron Linear → act → ... → Linear with the given layer sizes."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _with_ones(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


# ---------------------------------------------------------------------- linear-quadratic
class LinearQuadratic:
    """Linear-quadratic bilevel problem with a closed-form hypergradient and optimum.

    Inner:  ℓ_in(Ω, v, (x, t)) = ½‖v − Ω t‖²        over affine h(x) = Θx + b
    Outer:  ℓ_out(Ω, v, (x, y)) = ½‖v − y‖² + (ρ/2)‖Ω‖²_F

    With x̄ = [x; 1], the inner solution is h*_Ω(x) = Ω P x̄, P = Tᵀ X̄ (X̄ᵀ X̄)⁻¹, so

        F(Ω) = ½ mean_j ‖Ω P x̄_j − y_j‖² + (ρ/2)‖Ω‖²,
        ∇F(Ω) = (Ω P x̄_j − y_j)(P x̄_j)ᵀ averaged over j + ρΩ,
        Ω* = (mean_j y_j (P x̄_j)ᵀ)(P Σ̄_out Pᵀ + ρI)⁻¹.

    The outer variable is ``nn.Linear(q, d, bias=False)`` (weight Ω ∈ R^{d×q}).
    """

    def __init__(
        self,
        p: int = 5,
        q: int = 3,
        d: int = 2,
        n_inner: int = 200,
        n_outer: int = 150,
        rho: float = 0.1,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        g = _gen(seed)
        self.p, self.q, self.d, self.rho, self.dtype = p, q, d, rho, dtype
        # t depends on x (so the regression is informative) plus noise.
        mix = torch.randn(p, q, generator=g, dtype=dtype)
        x_in = torch.randn(n_inner, p, generator=g, dtype=dtype)
        t_in = x_in @ mix + 0.5 * torch.randn(n_inner, q, generator=g, dtype=dtype)
        x_out = torch.randn(n_outer, p, generator=g, dtype=dtype)
        omega_true = torch.randn(d, q, generator=g, dtype=dtype)
        y_out = (x_out @ mix) @ omega_true.T + 0.3 * torch.randn(
            n_outer, d, generator=g, dtype=dtype
        )
        self.inner_batch: Batch = {"x": x_in, "t": t_in}
        self.outer_batch: Batch = {"x": x_out, "y": y_out}
        Xb = _with_ones(x_in)
        self.P = t_in.T @ Xb @ torch.linalg.inv(Xb.T @ Xb)  # q × (p+1)
        self.problem = BilevelProblem(self._inner_loss, self._outer_loss)

    def _inner_loss(self, outer: nn.Module, pred: Tensor, batch: Batch) -> Tensor:
        return 0.5 * ((pred - outer(batch["t"])) ** 2).sum(1)

    def _outer_loss(self, outer: nn.Module, pred: Tensor, batch: Batch) -> Tensor:
        assert isinstance(outer, nn.Linear)
        reg = 0.5 * self.rho * (outer.weight**2).sum()
        return 0.5 * ((pred - batch["y"]) ** 2).sum(1) + reg

    def make_outer(self, seed: int = 1) -> nn.Linear:
        torch.manual_seed(seed)
        return nn.Linear(self.q, self.d, bias=False).to(self.dtype)

    def make_inner(self, seed: int = 2) -> nn.Linear:
        torch.manual_seed(seed)
        return nn.Linear(self.p, self.d).to(self.dtype)

    def _features(self) -> Tensor:
        return _with_ones(self.outer_batch["x"]) @ self.P.T  # rows: (P x̄_j)ᵀ, m × q

    def value(self, omega: Tensor) -> Tensor:
        """F(Ω)."""
        R = self._features() @ omega.T - self.outer_batch["y"]
        return 0.5 * (R**2).sum(1).mean() + 0.5 * self.rho * (omega**2).sum()

    def grad(self, omega: Tensor) -> Tensor:
        """∇F(Ω) in closed form."""
        Fe = self._features()
        R = Fe @ omega.T - self.outer_batch["y"]
        return R.T @ Fe / Fe.shape[0] + self.rho * omega

    def optimum(self) -> Tensor:
        """The bilevel minimiser Ω*."""
        Fe = self._features()
        m = Fe.shape[0]
        A = Fe.T @ Fe / m + self.rho * torch.eye(self.q, dtype=self.dtype)
        return torch.linalg.solve(A, Fe.T @ self.outer_batch["y"] / m).T

    def inner_solution(self, omega: Tensor) -> tuple[Tensor, Tensor]:
        """(Θ*, b*) of the inner least squares for Ω."""
        Wb = omega @ self.P  # d × (p+1)
        return Wb[:, :-1], Wb[:, -1]

    def set_inner_to_solution(self, model: nn.Linear, omega: Tensor) -> None:
        """Write the exact inner solution into an ``nn.Linear(p, d)``."""
        W, b = self.inner_solution(omega.detach())
        with torch.no_grad():
            model.weight.copy_(W)
            model.bias.copy_(b)


# --------------------------------------------------------------------------- discrete IV
class TreatmentOutcome(nn.Module):
    """Outer variable ω of the IV problems: treatment features ψ(t) = tanh(A t + c) ∈ R^d and a
    linear outcome head u (with bias)."""

    def __init__(self, q: int, d: int) -> None:
        super().__init__()
        self.psi = nn.Sequential(nn.Linear(q, d), nn.Tanh())
        self.head = nn.Linear(d, 1)

    def forward(self, t: Tensor) -> Tensor:
        return self.psi(t)


@dataclass
class _GroupData:
    k_in: Tensor
    k_out: Tensor
    inner_batch: Batch
    outer_batch: Batch


def _discrete_iv_data(
    K: int, q: int, n_inner: int, n_outer: int, seed: int, dtype: torch.dtype
) -> _GroupData:
    g = _gen(seed)
    centres = 1.5 * torch.randn(K, q, generator=g, dtype=dtype)
    k_in = torch.arange(n_inner) % K  # every group present in the inner data
    k_in = k_in[torch.randperm(n_inner, generator=g)]
    k_out = torch.randint(0, K, (n_outer,), generator=g)
    conf_in = torch.randn(n_inner, 1, generator=g, dtype=dtype)
    conf_out = torch.randn(n_outer, 1, generator=g, dtype=dtype)
    t_in = centres[k_in] + conf_in + 0.5 * torch.randn(n_inner, q, generator=g, dtype=dtype)
    t_out = centres[k_out] + conf_out + 0.5 * torch.randn(n_outer, q, generator=g, dtype=dtype)
    beta = torch.randn(q, generator=g, dtype=dtype)
    y_out = (
        torch.sin(t_out @ beta)
        + 2.0 * conf_out[:, 0]
        + 0.1 * torch.randn(n_outer, generator=g, dtype=dtype)
    )
    eye = torch.eye(K, dtype=dtype)
    return _GroupData(
        k_in,
        k_out,
        {"x": eye[k_in], "t": t_in},
        {"x": eye[k_out], "y": y_out[:, None]},
    )


class DiscreteIV:
    """Two-stage least squares with a discrete instrument (exact F for any treatment network).

    Instrument x = one-hot of a group k ∈ {0..K−1}; treatment t ∈ R^q depends on k and on a
    confounder that also drives the outcome y. Outer variable ω = (ψ, u), a
    :class:`TreatmentOutcome`.

    Inner:  ℓ_in(ω, v, (x, t)) = ½‖v − ψ_ω(t)‖²    ⇒ h*_ω(k) = mean of ψ_ω(t_i) over group k
    Outer:  ℓ_out(ω, v, (x, y)) = ½(y − u(v))²

    so F(ω) = ½ mean_j (y_j − u(h*_ω(k_j)))² is computed exactly, and differentiably, from the
    inner data's group means.
    """

    def __init__(
        self,
        K: int = 6,
        q: int = 3,
        d: int = 4,
        n_inner: int = 240,
        n_outer: int = 200,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.K, self.q, self.d, self.dtype = K, q, d, dtype
        data = _discrete_iv_data(K, q, n_inner, n_outer, seed, dtype)
        self.k_in, self.k_out = data.k_in, data.k_out
        self.inner_batch, self.outer_batch = data.inner_batch, data.outer_batch
        self.problem = BilevelProblem(self._inner_loss, self._outer_loss)

    @staticmethod
    def _inner_loss(outer: nn.Module, pred: Tensor, batch: Batch) -> Tensor:
        return 0.5 * ((pred - outer(batch["t"])) ** 2).sum(1)

    @staticmethod
    def _outer_loss(outer: nn.Module, pred: Tensor, batch: Batch) -> Tensor:
        assert isinstance(outer, TreatmentOutcome)
        return 0.5 * ((batch["y"] - outer.head(pred)) ** 2).sum(1)

    def make_outer(self, seed: int = 1) -> TreatmentOutcome:
        torch.manual_seed(seed)
        return TreatmentOutcome(self.q, self.d).to(self.dtype)

    def make_inner(self, width: int = 64, depth: int = 2, seed: int = 2) -> nn.Sequential:
        """An over-parameterised MLP on the one-hot instrument."""
        torch.manual_seed(seed)
        return mlp([self.K] + [width] * depth + [self.d]).to(self.dtype)

    def inner_solution(self, outer: nn.Module) -> Tensor:
        """h*_ω at every group, ``[K, d]`` (differentiable in ω)."""
        psi = outer(self.inner_batch["t"])
        sums = torch.zeros(self.K, self.d, dtype=psi.dtype).index_add(0, self.k_in, psi)
        counts = torch.bincount(self.k_in, minlength=self.K).to(psi.dtype)
        return sums / counts[:, None]

    def value(self, outer: nn.Module) -> Tensor:
        """F(ω), exactly (differentiable in ω: autograd gives the exact hypergradient)."""
        h = self.inner_solution(outer)[self.k_out]
        return self.problem.outer_loss(outer, h, self.outer_batch).mean()

    def exact_grad(self, outer: nn.Module) -> tuple[Tensor, ...]:
        """∇F(ω) aligned with ``outer.parameters()``."""
        return torch.autograd.grad(self.value(outer), list(outer.parameters()))


class SoftmaxIV(DiscreteIV):
    """:class:`DiscreteIV` with a strongly convex, non-quadratic inner loss:

        ℓ_in(ω, v, (x, t)) = logsumexp(v) − ⟨softmax(ψ_ω(t)), v⟩ + (μ/2)‖v‖²,

    whose output Hessian diag(σ(v)) − σ(v)σ(v)ᵀ + μI is not a multiple of the identity. The
    group solution h*_ω(k) solves σ(v) + μv = p̄_k (p̄_k the group mean of softmax(ψ_ω(t))), found
    by Newton's method; a final Newton step taken with autograd makes it differentiable with the
    exact implicit gradient.
    """

    def __init__(self, *args: object, mu: float = 0.1, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.mu = mu
        self.problem = BilevelProblem(self._softmax_inner, self._outer_loss)

    def _softmax_inner(self, outer: nn.Module, pred: Tensor, batch: Batch) -> Tensor:
        target = torch.softmax(outer(batch["t"]), dim=1)
        return torch.logsumexp(pred, 1) - (target * pred).sum(1) + 0.5 * self.mu * (pred**2).sum(1)

    def inner_solution(self, outer: nn.Module) -> Tensor:
        target = torch.softmax(outer(self.inner_batch["t"]), dim=1)
        sums = torch.zeros(self.K, self.d, dtype=target.dtype).index_add(0, self.k_in, target)
        counts = torch.bincount(self.k_in, minlength=self.K).to(target.dtype)
        pbar = sums / counts[:, None]

        def residual(v: Tensor, pb: Tensor) -> Tensor:
            return torch.softmax(v, 1) + self.mu * v - pb

        def jac(v: Tensor) -> Tensor:
            s = torch.softmax(v, 1)
            eye = torch.eye(self.d, dtype=v.dtype)
            return torch.diag_embed(s) - s[:, :, None] * s[:, None, :] + self.mu * eye

        v = torch.zeros_like(pbar)
        pb = pbar.detach()
        with torch.no_grad():
            for _ in range(100):
                step = torch.linalg.solve(jac(v), residual(v, pb))
                v = v - step
                if float(step.abs().max()) < 1e-15:
                    break
        # One Newton step with the graph: value unchanged (residual ≈ 0), derivative exact.
        return v - torch.linalg.solve(jac(v).detach(), residual(v, pbar))


# ------------------------------------------------------------------------------ linear IV
class Structural(nn.Module):
    """Outer variable of :class:`LinearIV`: structural coefficients β and outcome intercept b."""

    def __init__(self, q: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(q, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(1, dtype=dtype))


class LinearIV:
    """Confounded linear IV regression with a K-valued instrument.

    y = βᵀt + b + e, where a confounder drives both the treatment t ∈ R^q and the noise e, so
    regressing y on t is biased; the instrument x ∈ {0..K−1} (one-hot) moves t only. Two-stage
    least squares as a functional bilevel problem, with ω = (β, b) (:class:`Structural`):

        inner:  ℓ_in(ω, v, (x, t)) = ½(v − βᵀt)²      ⇒ h*_ω(x) = βᵀ E[t | x]
        outer:  ℓ_out(ω, v, (x, y)) = ½(y − v − b)²

    Its minimiser is the classical 2SLS estimate (:meth:`exact`), computed from the stage-1
    group means of t. The data (n samples) are split in half: stage 1 (inner) and stage 2 (outer).
    """

    def __init__(
        self,
        n: int = 4000,
        K: int = 8,
        q: int = 3,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if n < 4 or K < q + 1:
            raise ValueError(f"LinearIV needs n ≥ 4 and K ≥ q+1 groups (got n={n}, K={K}, q={q})")
        g = _gen(seed)
        self.K, self.q, self.dtype = K, q, dtype
        self.beta_true = torch.linspace(1.0, -2.0, q, dtype=dtype)
        self.b_true = 0.3
        centres = 2.0 * torch.randn(K, q, generator=g, dtype=dtype)
        k = torch.randint(0, K, (n,), generator=g)
        conf = torch.randn(n, 1, generator=g, dtype=dtype)
        t = centres[k] + 2.0 * conf + 0.5 * torch.randn(n, q, generator=g, dtype=dtype)
        noise = 0.1 * torch.randn(n, generator=g, dtype=dtype)
        y = t @ self.beta_true + self.b_true + 3.0 * conf[:, 0] + noise
        x = torch.eye(K, dtype=dtype)[k]
        half = n // 2
        self.k_in, self.k_out = k[:half], k[half:]
        self.inner_data = {"x": x[:half], "t": t[:half]}
        self.outer_data = {"x": x[half:], "t": t[half:], "y": y[half:, None]}
        self.problem = BilevelProblem(self._inner_loss, self._outer_loss)

    @staticmethod
    def _inner_loss(outer: nn.Module, pred: Tensor, batch: Batch) -> Tensor:
        assert isinstance(outer, Structural)
        return 0.5 * (pred[:, 0] - batch["t"] @ outer.beta) ** 2

    @staticmethod
    def _outer_loss(outer: nn.Module, pred: Tensor, batch: Batch) -> Tensor:
        assert isinstance(outer, Structural)
        return 0.5 * (batch["y"][:, 0] - pred[:, 0] - outer.b) ** 2

    def make_outer(self) -> Structural:
        return Structural(self.q, self.dtype)

    def make_inner(self, width: int = 128, depth: int = 2, seed: int = 0) -> nn.Sequential:
        """An over-parameterised MLP on the one-hot instrument, output ``[B, 1]``."""
        torch.manual_seed(seed)
        return mlp([self.K] + [width] * depth + [1]).to(self.dtype)

    def exact(self) -> Tensor:
        """The bilevel solution (β, b): classical 2SLS from the stage-1 group means."""
        t = self.inner_data["t"]
        means = torch.zeros(self.K, self.q, dtype=self.dtype).index_add(0, self.k_in, t)
        means /= torch.bincount(self.k_in, minlength=self.K).to(self.dtype)[:, None]
        A = torch.cat([means[self.k_out], torch.ones(len(self.k_out), 1, dtype=self.dtype)], 1)
        # QR without pivoting ("gels"): the default "gelsy" (MKL) can round the last bit
        # differently from one call to the next, so runs in two processes would disagree.
        return torch.linalg.lstsq(A, self.outer_data["y"], driver="gels").solution[:, 0]

    def ols(self) -> Tensor:
        """Ordinary least squares of y on t (biased by the confounder)."""
        t = self.outer_data["t"]
        A = torch.cat([t, torch.ones(len(t), 1, dtype=self.dtype)], 1)
        return torch.linalg.lstsq(A, self.outer_data["y"], driver="gels").solution[:, 0]

    def truth(self) -> Tensor:
        return torch.cat([self.beta_true, torch.tensor([self.b_true], dtype=self.dtype)])

    @staticmethod
    def estimate(outer: Structural) -> Tensor:
        return torch.cat([outer.beta.detach(), outer.b.detach()])


def minibatches(
    data: dict[str, Tensor], batch_size: int, generator: torch.Generator
) -> Callable[[], dict[str, Tensor]]:
    """A function drawing a minibatch (uniformly, with replacement) from a dict of tensors."""
    n = len(next(iter(data.values())))
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")

    def draw() -> dict[str, Tensor]:
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        return {k: v[idx] for k, v in data.items()}

    return draw


__all__ = [
    "DiscreteIV",
    "LinearIV",
    "LinearQuadratic",
    "SoftmaxIV",
    "Structural",
    "TreatmentOutcome",
    "minibatches",
    "mlp",
]
