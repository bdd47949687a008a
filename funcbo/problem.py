"""Functional bilevel problems written on predictions.

A functional bilevel problem is

    min_ω F(ω) = L_out(ω, h*_ω),    h*_ω = argmin_h L_in(ω, h),

with L_in(ω, h) = E_in[ℓ_in(ω, h(x), ·)] and L_out(ω, h) = E_out[ℓ_out(ω, h(x), ·)]. The inner
problem is posed over functions h (in L2), where it is strongly convex in the prediction v = h(x)
even when the network representing h is not convex in its weights. Users therefore write the
*per-sample* losses on predictions; how h is parameterised is the estimator's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from funcbo.errors import EmptyBatchError, NonFiniteLossError, NotStronglyConvexError, ShapeError

Batch = Any
LossFn = Callable[[nn.Module, Tensor, Batch], Tensor]
InputFn = Callable[[Batch], Any]


def default_input(batch: Batch) -> Any:
    """What h is applied to, by default: ``batch["x"]`` for a mapping, ``batch[0]`` for a
    tuple or list, the batch itself for a tensor."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "x" not in batch:
            raise KeyError(
                "the batch is a mapping without key 'x': pass inner_input=/outer_input= to "
                "BilevelProblem to say what the inner model is applied to"
            )
        return batch["x"]
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return batch[0]
    raise TypeError(
        f"cannot find the inner model's input in a batch of type {type(batch).__name__}: pass "
        "inner_input=/outer_input= to BilevelProblem"
    )


def batch_size(x: Any) -> int | None:
    """Number of samples of an input (first dimension of its first tensor), or None."""
    if isinstance(x, Tensor):
        return x.shape[0] if x.dim() > 0 else None
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, Sequence) and not isinstance(x, str):
        for item in x:
            n = batch_size(item)
            if n is not None:
                return n
    return None


class BilevelProblem:
    """A functional bilevel problem given by per-sample losses on predictions.

    Subclass it and override :meth:`inner_loss` and :meth:`outer_loss` (and :meth:`inner_input` /
    :meth:`outer_input` when the batch is not ``(x, ...)`` or ``{"x": ...}``), or pass the same
    functions to the constructor.

    ``inner_loss(outer, pred, batch) -> Tensor[B]`` is ℓ_in(ω, h(x_i), batch_i) for every sample
    of the inner batch, where ``outer`` is the ``nn.Module`` holding ω and ``pred`` = h(x) has
    shape ``[B, d_v]``. ``outer_loss`` is the same on outer batches. The inner loss must be
    strongly convex in ``pred`` (see :meth:`check_strong_convexity`); expectations are means over
    the batch, so per-sample losses make every scaling explicit.

    Args:
        inner_loss, outer_loss: per-sample losses (override the methods when given).
        inner_input, outer_input: map a batch to what the inner model h is applied to.
        check_finite: raise :class:`NonFiniteLossError` when a loss is NaN or infinite.
    """

    def __init__(
        self,
        inner_loss: LossFn | None = None,
        outer_loss: LossFn | None = None,
        inner_input: InputFn | None = None,
        outer_input: InputFn | None = None,
        *,
        check_finite: bool = True,
    ) -> None:
        # The given functions replace the methods on this instance (mypy compares them with the
        # methods' unbound signatures, self included, hence the ignores).
        if inner_loss is not None:
            self.inner_loss = inner_loss  # type: ignore[method-assign, assignment]
        if outer_loss is not None:
            self.outer_loss = outer_loss  # type: ignore[method-assign, assignment]
        if inner_input is not None:
            self.inner_input = inner_input  # type: ignore[method-assign, assignment]
        if outer_input is not None:
            self.outer_input = outer_input  # type: ignore[method-assign, assignment]
        self.check_finite = check_finite

    # ----------------------------------------------------------------- user-facing definitions
    def inner_loss(self, outer: nn.Module, pred: Tensor, batch: Batch) -> Tensor:
        """Per-sample inner loss ℓ_in(ω, pred_i, batch_i), shape ``[B]``."""
        raise NotImplementedError("define inner_loss (subclass BilevelProblem or pass inner_loss=)")

    def outer_loss(self, outer: nn.Module, pred: Tensor, batch: Batch) -> Tensor:
        """Per-sample outer loss ℓ_out(ω, pred_j, batch_j), shape ``[B]``."""
        raise NotImplementedError("define outer_loss (subclass BilevelProblem or pass outer_loss=)")

    def output_hessian(self, outer: nn.Module, pred: Tensor, batch: Batch) -> Any:
        """The per-sample output Hessians ∂²_v ℓ_in at ``pred``, when known in closed form.

        Return ``None`` (the default) to have them computed with ``torch.func``, or an
        :class:`~funcbo.linalg.OutputHessian`, e.g. ``OutputHessian.scaled_identity(1.0, pred)``
        for ½‖pred − y‖², which saves the automatic differentiation.
        """
        return None

    def inner_input(self, batch: Batch) -> Any:
        """What the inner model is applied to on an inner batch (default: see default_input)."""
        return default_input(batch)

    def outer_input(self, batch: Batch) -> Any:
        """What the inner model is applied to on an outer batch (default: as inner_input)."""
        return self.inner_input(batch)

    # ---------------------------------------------------------------- validated evaluation
    def input(self, batch: Batch, which: str) -> Any:
        """The inner model's input for an ``"inner"`` or ``"outer"`` batch; rejects empty ones."""
        x = self.inner_input(batch) if which == "inner" else self.outer_input(batch)
        if batch_size(x) == 0:
            raise EmptyBatchError(f"the {which} batch is empty (0 samples)")
        return x

    def predict(self, model: nn.Module, batch: Batch, which: str) -> Tensor:
        """h(x) on a batch, checked to be a ``[B, d_v]`` tensor."""
        return check_pred(model(self.input(batch, which)), f"{which} model output")

    def eval_inner(self, outer: nn.Module, pred: Tensor, batch: Batch) -> Tensor:
        """The per-sample inner loss, checked: shape ``[B]`` and finite."""
        check_pred(pred, "inner prediction")
        return self._checked(self.inner_loss(outer, pred, batch), pred, "inner_loss")

    def eval_outer(self, outer: nn.Module, pred: Tensor, batch: Batch) -> Tensor:
        """The per-sample outer loss, checked: shape ``[B]`` and finite."""
        check_pred(pred, "outer prediction")
        return self._checked(self.outer_loss(outer, pred, batch), pred, "outer_loss")

    def _checked(self, loss: Any, pred: Tensor, name: str) -> Tensor:
        if not isinstance(loss, Tensor):
            raise ShapeError(f"{name} must return a tensor of per-sample losses, got {type(loss)}")
        b = pred.shape[0]
        if loss.shape != (b,):
            hint = ""
            if loss.dim() == 0:
                hint = " (it returned a scalar: return per-sample losses, without .mean())"
            elif loss.dim() == 2 and loss.shape[0] == b and loss.shape[1] == b:
                hint = (
                    f" (a [B, B] result usually means pred of shape {tuple(pred.shape)} was "
                    "broadcast against a target of shape [B]; reshape the target to [B, d_v])"
                )
            elif loss.dim() == 2 and loss.shape[0] == b:
                hint = " (sum over the output dimension to get one loss per sample)"
            raise ShapeError(
                f"{name} returned shape {tuple(loss.shape)} for pred of shape "
                f"{tuple(pred.shape)}; expected per-sample losses of shape ({b},){hint}"
            )
        if self.check_finite:
            check_finite(loss, name)
        return loss

    # ------------------------------------------------------------------- strong convexity
    def check_strong_convexity(
        self, outer: nn.Module, pred: Tensor, batch: Batch, *, tol: float = 0.0
    ) -> float:
        """Smallest eigenvalue of the per-sample output Hessians ∂²_v ℓ_in(ω, v_i) on a batch.

        Raises :class:`NotStronglyConvexError` naming the worst sample when it is ≤ ``tol``.
        Returns the smallest eigenvalue otherwise.
        """
        from funcbo.linalg import OutputHessian

        hess = OutputHessian.of_loss(
            lambda v: self.eval_inner(outer, v, batch), pred.detach(), dense=True
        )
        return hess.check_positive(tol)


def check_pred(pred: Any, name: str) -> Tensor:
    """Check that a prediction is a non-empty ``[B, d_v]`` floating-point tensor."""
    if not isinstance(pred, Tensor):
        raise ShapeError(f"{name} must be a tensor, got {type(pred).__name__}")
    if pred.dim() != 2:
        raise ShapeError(
            f"{name} must have shape [B, d_v], got {tuple(pred.shape)}"
            + (" (use a [B, 1] output for a scalar prediction)" if pred.dim() == 1 else "")
        )
    if pred.shape[0] == 0:
        raise EmptyBatchError(f"{name} is empty (batch of 0 samples)")
    if not pred.is_floating_point():
        raise ShapeError(f"{name} must be floating point, got {pred.dtype}")
    return pred


def check_finite(t: Tensor, name: str) -> None:
    """Raise :class:`NonFiniteLossError` if ``t`` holds a NaN or an infinity."""
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        n_nan = int(torch.isnan(t.detach()).sum())
        n_inf = int(bad.sum()) - n_nan
        raise NonFiniteLossError(
            f"{name} is not finite on {int(bad.sum())} of {t.numel()} entries "
            f"({n_nan} NaN, {n_inf} inf); check the learning rates and the data"
        )


#: total size up to which :func:`check_finite_tensors` checks its tensors through one copy
_JOINT_CHECK_MAX = 1 << 16


def check_finite_tensors(tensors: Iterable[Tensor], what: str, hint: str) -> None:
    """Raise :class:`~funcbo.NonFiniteLossError` if a tensor holds NaN or infinity.

    Args:
        tensors: the tensors to check (weights, an adjoint, a gradient).
        what: what they are, for the message (``"the inner model's weights"``).
        hint: what to do about it.
    """
    ts = [t.detach() for t in tensors]
    floats = [t.reshape(-1) for t in ts if t.is_floating_point()]
    if (
        floats
        and sum(t.numel() for t in floats) <= _JOINT_CHECK_MAX
        and len({(t.device, t.dtype) for t in floats}) == 1
        and bool(torch.isfinite(torch.cat(floats)).all())
    ):
        # small tensors: one check (and one host read) for all of them, through a copy that
        # costs less than a check per tensor; counted tensor by tensor only on failure
        return
    total = n_nan = n_inf = 0
    for t in ts:
        total += t.numel()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan = int(torch.isnan(t).sum())
            n_nan += nan
            n_inf += int((~torch.isfinite(t)).sum()) - nan
    if n_nan or n_inf:
        raise NonFiniteLossError(
            f"{what} are not finite ({n_nan} NaN and {n_inf} inf of {total} entries): {hint}"
        )


__all__ = [
    "BilevelProblem",
    "NotStronglyConvexError",
    "batch_size",
    "check_finite",
    "check_finite_tensors",
    "check_pred",
    "default_input",
]
