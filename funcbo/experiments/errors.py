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


__all__ = ["DamagedRunError", "ExperimentError", "RunInUseError", "StaleRunError"]
