"""Errors raised by funcbo when a problem is ill-posed or its inputs are malformed.

Every error subclasses :class:`BilevelError` (itself a ``ValueError``) and names the cause, so
that a user can tell a wrong shape from a diverged loss from a loss that is not strongly convex.
"""

from __future__ import annotations


class BilevelError(ValueError):
    """Base class of funcbo's input and problem errors."""


class ShapeError(BilevelError):
    """A prediction or a per-sample loss has the wrong shape."""


class EmptyBatchError(BilevelError):
    """A batch holds no samples."""


class NonFiniteLossError(BilevelError):
    """A loss (or its gradient) evaluated to NaN or infinity."""


class NotStronglyConvexError(BilevelError):
    """The inner loss is not strongly convex in the prediction on some sample."""
