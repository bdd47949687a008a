"""Errors of the experiment layer that a user can fix: the ``funcbo`` command prints their
message as one line and exits with status 2 (a traceback would only hide the cause)."""

from __future__ import annotations


class ExperimentError(ValueError):
    """A user error in running or reporting experiments; the message names the cause."""


class DamagedRunError(ExperimentError):
    """A file of a run directory (``summary.json``, ``checkpoint.pt``) cannot be read."""


class StaleRunError(ExperimentError):
    """A run directory holds a run made with a different config than the one requested."""


class RunInUseError(ExperimentError):
    """Another process is running this run (it holds the run directory's lock)."""


class LostProgressWarning(UserWarning):
    """An interrupted run has logged progress but has no checkpoint to resume from, so it
    starts afresh (checkpoints stay in the run directory that wrote them; committed results
    and copies without ``checkpoint.pt`` carry none)."""


__all__ = [
    "DamagedRunError",
    "ExperimentError",
    "LostProgressWarning",
    "RunInUseError",
    "StaleRunError",
]
