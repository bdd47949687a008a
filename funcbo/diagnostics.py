"""Typed diagnostics records: what an estimator step or an adjoint solve reports.

Each estimator keeps the record of its last step in ``diagnostics`` (a frozen dataclass such as
:class:`~funcbo.functional.FuncIDStats`); ``record.metrics()`` flattens it into the
``{name: float}`` dictionary that is logged, so the metric names are written in one place, the
record's :meth:`~Diagnostics.metrics`. Code that needs a value reads the record's field
(``est.diagnostics.grad_norm``), not a key of the logged dictionary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from funcbo.distributed import is_distributed, mean_across_ranks

D = TypeVar("D", bound="Diagnostics")


@dataclass(frozen=True)
class Diagnostics:
    """Base of the diagnostics records (frozen dataclasses)."""

    def metrics(self) -> dict[str, float]:
        """The record as the metrics written to the logs (names → floats)."""
        raise NotImplementedError

    @property
    def solves_gave_up(self) -> int:
        """Linear solves of this record that gave up (returned their start: no implicit term)."""
        return 0


@dataclass(frozen=True)
class Metrics(Diagnostics):
    """An untyped record: the metrics themselves (an estimator or adjoint that assigns a plain
    dictionary to its ``stats`` gets one)."""

    values: Mapping[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return dict(self.values)


def _float_fields(record: Any) -> Iterator[tuple[Any, str]]:
    """(record, field name) of every float field, nested dataclasses included, in order."""
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _float_fields(value)
        elif type(value) is float:
            yield record, f.name


def _replace_floats(record: Any, values: Iterator[float]) -> Any:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = _replace_floats(value, values)
        elif type(value) is float:
            changes[f.name] = next(values)
    return dataclasses.replace(record, **changes)


def mean_over_ranks(record: D) -> D:
    """The record with each float field replaced by its mean over the ranks (one collective;
    see :func:`~funcbo.distributed.mean_across_ranks`). Counts and flags (ints, bools) are
    equal on every rank and kept. Every rank must call it with records of the same shape."""
    if not is_distributed():
        return record
    if isinstance(record, Metrics):
        return dataclasses.replace(record, values=mean_across_ranks(dict(record.values)))
    local = {f"{i}": float(getattr(r, name)) for i, (r, name) in enumerate(_float_fields(record))}
    mean = mean_across_ranks(local)
    out: D = _replace_floats(record, iter(mean[k] for k in local))
    return out


__all__ = ["Diagnostics", "Metrics", "mean_over_ranks"]
