"""IV runs as a batch dimension: R seeds of one method advanced in lockstep in one process.

Every run keeps its own data, networks, optimizer state and linear algebra; only the storage is
shared. The networks of R runs become one :class:`StackedNet` whose tensors have a leading run
axis (``[R, out, in]`` weights, ``baddbmm`` for the layers): one batched matrix product per
layer instead of R small ones, the same FLOPs. Spectral norm keeps its power-iteration vectors
per run and iterates them exactly when torch's parametrization would (once per forward pass in
training mode). Adam's moments and step counts are per run (:class:`StackedAdam`). The ridge
fits, the closed-form adjoint and its Cholesky factors are batched solves, one system per run
(``*_ex`` variants, so that a run whose system breaks down gets NaN alone instead of an error
for the batch).

Batched methods (:data:`BATCHED_KINDS`), on designs without covariates (dSprites):

* ``dfiv``: :meth:`~funcbo.apps.iv.dfiv.DFIV.step` run by run;
* ``funcid_linear`` with the paper's ``inner_solver: ridge_head`` and the closed-form outcome
  head: :class:`~funcbo.apps.iv.inner.RidgeHeadInnerSolver`'s feature steps, the output-Hessian
  isotropy probe per run (two fixed Rademacher probes, as :class:`funcbo.linalg.OutputHessian`),
  :class:`funcbo.LinearAdjoint`'s exact solve for isotropic Hessians, the cross term B a and the
  outer Adam step;
* ``funcid`` (network adjoint) with the same inner solver and head: the adjoint network (a
  stacked copy of the inner model) takes its Adam steps on the adjoint objective run by run
  (:class:`funcbo.NetworkAdjoint` without holdout), then the cross term and the outer step;
* ``aid`` in the authors' feature formulation (:class:`~funcbo.apps.iv.problem.IVFeatureProblem`,
  the paper's): the inner Adam steps on the feature network, then :class:`funcbo.AID`'s
  parameter-space solve with a warm start, by the method's CG (the paper's textbook CG,
  ``safeguards=False``, or with its safeguards and damping; per-run inner products, step sizes,
  stopping and safeguards: :func:`funcbo.linalg.batched_cg`), Neumann or Identity;
* ``itd`` (feature formulation): :class:`funcbo.ITD`'s unrolled Adam steps on the stacked
  feature network's tensors (``params=``, as ``functional_call``; each run's moments and step
  count), the graph kept through the last ``truncate`` steps;
* ``gradient_penalty`` and ``value_penalty`` (feature formulation): the θ-steps on the
  penalised objectives (a Hessian product per step for the gradient penalty; the value
  network's own steps for the value penalty), then the outer gradient of
  :class:`funcbo.GradientPenalty` / :class:`funcbo.ValuePenalty`.

Exactness: from the same state and the same sampled data, run r of a batched step equals the step
:class:`~funcbo.apps.iv.task.IVTask` takes alone (``tests/test_iv_batched.py``: float64, ≤ 1e-10).
The spectral-norm vectors advance as in the unbatched step: the feature network iterates once
per training-mode forward, ψ once for the Hessian probe and once for the cross term.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from funcbo.apps.iv.networks import InstrumentModel, Standardize
from funcbo.linalg import batched_cg, run_dot, run_norm, run_where
from funcbo.parametric import adam_step_dtype

#: IV method kinds with a batched step
BATCHED_KINDS = (
    "dfiv",
    "funcid_linear",
    "funcid",
    "aid",
    "itd",
    "gradient_penalty",
    "value_penalty",
)


# ------------------------------------------------------------------------------ stacked nets
def run_column(values: Tensor, like: Tensor) -> Tensor:
    """Per-run ``values`` ``[R]`` shaped to broadcast against a stacked tensor ``like``
    ``[R, ...]`` (its device and dtype)."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class _Layer:
    """One layer of a :class:`StackedNet`: its kind, settings, the indices of its stacked
    parameters in :attr:`StackedNet.params`, and its stacked buffers."""

    kind: str
    sn: bool = False  # spectral norm on a Linear
    eps: float = 0.0
    shape: tuple[int, ...] = ()
    weight: int | None = None
    bias: int | None = None
    u: Tensor = field(default_factory=lambda: torch.empty(0))
    v: Tensor = field(default_factory=lambda: torch.empty(0))
    mean: Tensor = field(default_factory=lambda: torch.empty(0))
    std: Tensor = field(default_factory=lambda: torch.empty(0))


class StackedNet:
    """R networks of one architecture as tensors with a leading run axis.

    Supported layers (those of :mod:`funcbo.apps.iv.networks`): ``nn.Linear`` (optionally with
    torch's spectral-norm parametrization), ``nn.ReLU``, ``nn.Tanh``, ``nn.LayerNorm`` and
    :class:`~funcbo.apps.iv.networks.Standardize`, in ``nn.Sequential`` containers.

    Args:
        nets: the R networks (same architecture); their values are copied, and
            :meth:`write_run` / :meth:`read_run` copy run r back and forth.
    """

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        if not nets:
            raise ValueError("StackedNet needs at least one network")
        self.runs = len(nets)
        flat = [_flatten(n) for n in nets]
        if len({len(f) for f in flat}) != 1:
            raise ValueError("StackedNet: the networks differ in their number of layers")
        self.layers: list[_Layer] = []
        #: stacked parameters (leaves requiring gradients), in the order of ``_origin[r]``
        self.params: list[Tensor] = []
        #: whether a stacked parameter holds its runs' tensors transposed (Linear weights are
        #: stored ``[R, in, out]``, so that neither the forward product nor the weight's
        #: gradient needs a transposed copy)
        self.transposed: list[bool] = []
        self._origin: list[list[Tensor]] = [[] for _ in nets]  # run r's parameters
        self._buffers: list[tuple[_Layer, str, list[Tensor]]] = []  # (layer, attr, per run)

        def stack_param(tensors: list[Tensor], transpose: bool = False) -> int:
            p = torch.stack([t.detach().T if transpose else t.detach() for t in tensors])
            p.requires_grad_(True)
            self.params.append(p)
            self.transposed.append(transpose)
            for r, t in enumerate(tensors):
                self._origin[r].append(t)
            return len(self.params) - 1  # layers refer to their tensors by index

        def stack_buffer(layer: _Layer, attr: str, tensors: list[Tensor]) -> None:
            setattr(layer, attr, torch.stack([t.detach() for t in tensors]))
            self._buffers.append((layer, attr, tensors))

        for mods in zip(*flat, strict=True):
            m0 = mods[0]
            # (a parametrized module's class is made per instance: compare the plain class)
            if any(_plain_type(m) is not _plain_type(m0) for m in mods):
                raise ValueError("StackedNet: the networks differ in their layers")
            if isinstance(m0, nn.Linear):
                sn = parametrize.is_parametrized(m0, "weight")
                if sn:
                    plist = [m.parametrizations.weight for m in mods]
                    norms = [pl[0] for pl in plist]
                    if len(plist[0]) != 1 or type(norms[0]).__name__ != "_SpectralNorm":
                        raise ValueError(
                            "StackedNet supports spectral norm as the only parametrization"
                        )
                    if norms[0].n_power_iterations != 1 or norms[0].dim != 0:
                        raise ValueError(
                            "StackedNet supports spectral norm with 1 iteration, dim 0"
                        )
                    weights = [pl.original for pl in plist]
                else:
                    weights = [m.weight for m in mods]
                layer = _Layer("linear", sn=sn, eps=norms[0].eps if sn else 0.0)
                layer.weight = stack_param(weights, transpose=True)  # [R, in, out]
                layer.bias = None if m0.bias is None else stack_param([m.bias for m in mods])
                if sn:
                    stack_buffer(layer, "u", [n._u for n in norms])
                    stack_buffer(layer, "v", [n._v for n in norms])
            elif isinstance(m0, nn.LayerNorm):
                if len(m0.normalized_shape) != 1:
                    raise ValueError("StackedNet supports LayerNorm over the last axis only")
                layer = _Layer("layernorm", shape=tuple(m0.normalized_shape), eps=m0.eps)
                layer.weight = None if m0.weight is None else stack_param([m.weight for m in mods])
                layer.bias = None if m0.bias is None else stack_param([m.bias for m in mods])
            elif isinstance(m0, Standardize):
                layer = _Layer("standardize")
                stack_buffer(layer, "mean", [m.mean for m in mods])
                stack_buffer(layer, "std", [m.std for m in mods])
            elif isinstance(m0, (nn.ReLU, nn.Tanh)):
                layer = _Layer("relu" if isinstance(m0, nn.ReLU) else "tanh")
            else:
                raise ValueError(f"StackedNet does not support {type(m0).__name__} layers")
            self.layers.append(layer)

    # ------------------------------------------------------------------ forward
    def __call__(
        self, x: Tensor, *, training: bool, params: Sequence[Tensor] | None = None
    ) -> Tensor:
        """The R networks on ``x`` ``[R, B, in]`` → ``[R, B, out]``; ``training``: spectral
        norms take one power iteration first (as torch's parametrization in training mode);
        ``params``: tensors used in place of :attr:`params` (as ``functional_call``)."""
        P = self.params if params is None else params
        for layer in self.layers:
            k = layer.kind
            if k == "linear":
                assert layer.weight is not None
                Wt = self._weight(layer, P[layer.weight], training)
                if layer.bias is None:
                    x = torch.bmm(x, Wt)
                else:
                    x = torch.baddbmm(P[layer.bias][:, None, :], x, Wt)
            elif k == "relu":
                x = torch.relu(x)
            elif k == "tanh":
                x = torch.tanh(x)
            elif k == "layernorm":
                x = F.layer_norm(x, layer.shape, eps=layer.eps)
                if layer.weight is not None:
                    x = x * P[layer.weight][:, None, :]
                if layer.bias is not None:
                    x = x + P[layer.bias][:, None, :]
            else:  # standardize
                x = (x - layer.mean[:, None]) / layer.std[:, None]
        return x

    def power_iteration(self) -> None:
        """One power iteration of every spectral norm (what a training-mode forward does)."""
        with torch.no_grad():
            for layer in self.layers:
                if layer.kind == "linear" and layer.sn and layer.weight is not None:
                    self._power(layer, self.params[layer.weight])

    def _power(self, layer: _Layer, Wt: Tensor) -> None:
        # u ← W v/‖W v‖, v ← Wᵀu/‖Wᵀu‖ with W = Wtᵀ (as torch's _SpectralNorm._power_method)
        with torch.no_grad():
            layer.u = F.normalize(
                torch.bmm(layer.v[:, None, :], Wt).squeeze(1), dim=1, eps=layer.eps
            )
            layer.v = F.normalize(
                torch.bmm(Wt, layer.u[:, :, None]).squeeze(2), dim=1, eps=layer.eps
            )

    def _weight(self, layer: _Layer, Wt: Tensor, training: bool) -> Tensor:
        if not layer.sn:
            return Wt
        if training:
            self._power(layer, Wt)
        sigma = (layer.u * torch.bmm(layer.v[:, None, :], Wt).squeeze(1)).sum(1)  # uᵀ W v
        return Wt / sigma[:, None, None]

    # ------------------------------------------------------------------ run r in and out
    def write_run(self, run: int) -> None:
        """Copy run ``run``'s values into its own network."""
        with torch.no_grad():
            for p, orig, tr in zip(self.params, self._origin[run], self.transposed, strict=True):
                orig.copy_(p[run].T if tr else p[run])
            for layer, attr, tensors in self._buffers:
                tensors[run].copy_(getattr(layer, attr)[run])

    def read_run(self, run: int) -> None:
        """Copy run ``run``'s own network into the stack."""
        with torch.no_grad():
            for p, orig, tr in zip(self.params, self._origin[run], self.transposed, strict=True):
                p[run].copy_(orig.T if tr else orig)
            for layer, attr, tensors in self._buffers:
                getattr(layer, attr)[run].copy_(tensors[run])

    def origin(self, run: int) -> list[Tensor]:
        """Run ``run``'s own parameters, aligned with :attr:`params`."""
        return self._origin[run]


def _plain_type(module: nn.Module) -> type:
    cls = type(module)
    return cls.__mro__[1] if parametrize.is_parametrized(module) else cls


def _flatten(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [m for child in module for m in _flatten(child)]
    if isinstance(module, InstrumentModel):  # h = head ∘ φ
        return [*_flatten(module.features), module.head]
    return [module]


# ------------------------------------------------------------------------------ optimizer
class StackedAdam:
    """``torch.optim.Adam`` (coupled weight decay) over stacked tensors, one optimizer per run.

    Run r's learning rate, weight decay, ε and step count are its own: the update is
    elementwise, so run r's slice follows exactly the steps of its own ``torch.optim.Adam``.
    When every run has the same hyperparameters and step count (seeds of one method), the
    update is torch's own sequence of operations on the whole stack.

    Args:
        params: stacked tensors ``[R, ...]``.
        optimizers: the R runs' own Adam optimizers (hyperparameters read from their single
            parameter group; :meth:`write_run` / :meth:`read_run` exchange their state).
        origins: run r's own parameters aligned with ``params`` (the keys of its state).
        transposed: which stacked tensors hold their runs' tensors transposed (default: none).
    """

    def __init__(
        self,
        params: list[Tensor],
        optimizers: Sequence[torch.optim.Optimizer],
        origins: Sequence[Sequence[Tensor]],
        transposed: Sequence[bool] | None = None,
    ) -> None:
        self.params = params
        self.optimizers = list(optimizers)
        self.origins = [list(o) for o in origins]
        self.transposed = list(transposed) if transposed is not None else [False] * len(params)
        groups = []
        for opt in self.optimizers:
            if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
                raise ValueError("batched IV runs need Adam optimizers with one parameter group")
            g = opt.param_groups[0]
            if g["amsgrad"] or g["maximize"]:
                raise ValueError("batched IV runs do not support Adam's amsgrad or maximize")
            groups.append(g)
        if len({tuple(g["betas"]) for g in groups}) != 1:
            raise ValueError("the runs of a batch must share Adam's betas")
        self.betas = tuple(groups[0]["betas"])
        dev = params[0].device

        def per_run(key: str) -> Tensor:
            return torch.tensor([float(g[key]) for g in groups], dtype=torch.float64, device=dev)

        self.lr, self.weight_decay, self.eps = (
            per_run("lr"),
            per_run("weight_decay"),
            per_run("eps"),
        )
        self.step_count = torch.zeros(len(groups), dtype=torch.float64)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        """One Adam step of every run with these stacked gradients."""
        b1, b2 = self.betas
        self.step_count += 1
        uniform = all(
            bool((t == t[0]).all()) for t in (self.step_count, self.lr, self.weight_decay, self.eps)
        )
        if uniform:  # torch's single-tensor Adam, on the whole stack
            step = float(self.step_count[0])
            lr, wd, eps = float(self.lr[0]), float(self.weight_decay[0]), float(self.eps[0])
            bc1 = 1.0 - b1**step
            bc2_sqrt = (1.0 - b2**step) ** 0.5
            for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq, strict=True):
                if wd != 0:
                    g = g.add(p, alpha=wd)
                m.lerp_(g, 1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                denom = (v.sqrt() / bc2_sqrt).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bc1)
            return
        bc1 = 1.0 - b1**self.step_count
        bc2_sqrt = (1.0 - b2**self.step_count).sqrt()
        step_size = self.lr / bc1

        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq, strict=True):
            g = torch.addcmul(g, run_column(self.weight_decay, p), p)
            m.lerp_(g, 1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (v.sqrt() / run_column(bc2_sqrt, p)).add_(run_column(self.eps, p))
            p.addcdiv_(m * run_column(-step_size, p), denom)

    def write_run(self, run: int) -> None:
        """Write run ``run``'s moments and step count into its own optimizer's state."""
        opt = self.optimizers[run]
        steps = float(self.step_count[run])
        for orig, m, v, tr in zip(
            self.origins[run], self.exp_avg, self.exp_avg_sq, self.transposed, strict=True
        ):
            if steps == 0:
                opt.state.pop(orig, None)
                continue
            opt.state[orig] = {
                "step": torch.tensor(steps, dtype=adam_step_dtype()),
                "exp_avg": (m[run].T if tr else m[run]).detach().clone(),
                "exp_avg_sq": (v[run].T if tr else v[run]).detach().clone(),
            }

    def read_run(self, run: int) -> None:
        """Read run ``run``'s moments and step count from its own optimizer's state."""
        opt = self.optimizers[run]
        steps = 0.0
        with torch.no_grad():
            for orig, m, v, tr in zip(
                self.origins[run], self.exp_avg, self.exp_avg_sq, self.transposed, strict=True
            ):
                st = opt.state.get(orig)
                if not st:
                    m[run].zero_()
                    v[run].zero_()
                    continue
                m[run].copy_(st["exp_avg"].T if tr else st["exp_avg"])
                v[run].copy_(st["exp_avg_sq"].T if tr else st["exp_avg_sq"])
                steps = float(st["step"])
        self.step_count[run] = steps


# ------------------------------------------------------------------------------ linear algebra
def add_intercept(F_: Tensor) -> Tensor:
    """[F, 1] for stacked features ``[R, n, p]``."""
    return torch.cat([F_, F_.new_ones(*F_.shape[:-1], 1)], dim=-1)


def ridge_fit(features: Tensor, target: Tensor, lam: float) -> Tensor:
    """Run by run :func:`funcbo.apps.iv.ridge.ridge_fit`: W = (F̄ᵀF̄/n + λI)⁻¹F̄ᵀY/n,
    ``[R, p + 1, k]`` (a run whose system is singular gets non-finite values, not an error)."""
    Fb = add_intercept(features)
    n, q = Fb.shape[1], Fb.shape[2]
    S = Fb.mT @ Fb / n + lam * torch.eye(q, dtype=Fb.dtype, device=Fb.device)
    W, _ = torch.linalg.solve_ex(S, Fb.mT @ target / n)
    return W


def ridge_predict(features: Tensor, weight: Tensor) -> Tensor:
    """F̄ W, run by run."""
    return add_intercept(features) @ weight


def ridge_objective(features: Tensor, target: Tensor, weight: Tensor, lam: float) -> Tensor:
    """(1/n)‖Y − F̄W‖² + λ‖W‖² per run, ``[R]``."""
    r = target - ridge_predict(features, weight)
    return (r**2).sum(2).mean(1) + lam * (weight**2).sum((1, 2))


def batched_neumann(
    matvec: Any,
    b: Sequence[Tensor],
    x0: Sequence[Tensor] | None,
    warm: Tensor,
    *,
    iters: int,
    lr: float,
) -> list[Tensor]:
    """:class:`funcbo.linalg.Neumann` on R systems: x ← x + lr·(b − A x), ``iters`` times,
    from ``x0`` for the runs with ``warm``, else from zero (whose first residual is b)."""
    b = list(b)
    warm = warm.to(b[0].device)
    if x0 is None or not bool(warm.any()):
        x = [lr * t for t in b]
        start = 1
    else:
        x = run_where(warm, list(x0), [torch.zeros_like(t) for t in b])
        start = 0
    for _ in range(start, iters):
        Ax = matvec(x)
        x = [xi + lr * (bi - ai) for xi, bi, ai in zip(x, b, Ax, strict=True)]
    return x


def grad_norms(grads: Sequence[Tensor]) -> Tensor:
    """Per-run Euclidean norm of stacked gradients, ``[R]`` (float64)."""
    norms = [
        torch.linalg.vector_norm(g.detach().flatten(1), dim=1, dtype=torch.float64) for g in grads
    ]
    return torch.linalg.vector_norm(torch.stack(norms, 1), dim=1)


__all__ = [
    "BATCHED_KINDS",
    "StackedAdam",
    "StackedNet",
    "add_intercept",
    "batched_cg",
    "batched_neumann",
    "grad_norms",
    "ridge_fit",
    "ridge_objective",
    "ridge_predict",
    "run_column",
    "run_dot",
    "run_norm",
]
