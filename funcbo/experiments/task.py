"""The unit of work the experiment layer runs: one method, one seed, one configuration.

An application provides a :class:`Task` per (method, seed); the runner advances it one outer
iteration at a time, evaluates it periodically, logs metrics, and checkpoints its
:meth:`Task.state_dict` so that a killed run resumes and ends exactly where an uninterrupted one
would (same seed, CPU, float tolerance).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and the estimators load when a run is built, not when the CLI starts
    import torch

#: the library's method kinds (registered in :mod:`funcbo.experiments.methods`)
LIBRARY_KINDS = (
    "funcid",
    "funcid_linear",
    "aid",
    "itd",
    "gradient_penalty",
    "value_penalty",
)


class Task(ABC):
    """One resumable run.

    Attributes:
        iterations: total outer iterations of the run.
    """

    iterations: int

    @abstractmethod
    def step(self) -> dict[str, float]:
        """Advance one outer iteration; return its metrics (``outer_loss``, ``inner_loss``,
        ``adjoint_loss``, ``grad_norm``, ... whatever applies)."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Evaluation metrics of the current state (e.g. ``{"test_mse": ...}``)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit: models, optimizers, estimator state, every
        random generator (as tensors), buffers. Must load with ``torch.load(weights_only=True)``:
        tensors, numbers, strings, lists and dicts only."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""


class BatchTask(ABC):
    """Several runs of one method advanced together as one batched program.

    Run ``i`` is the ``i``-th :class:`RunSpec` the task was made with. The runs are
    independent: each run's results depend on its own spec only, never on which other runs
    share the batch.

    Attributes:
        iterations: total outer iterations (the same for every run of the batch).
    """

    iterations: int

    @abstractmethod
    def step(self) -> dict[str, Any]:
        """Advance every run one outer iteration; metrics as per-run tensors ``[R]`` (or
        floats shared by all runs)."""

    @abstractmethod
    def evaluate(self) -> list[dict[str, float]]:
        """Evaluation metrics of every run."""

    @abstractmethod
    def state_dict(self, run: int) -> dict[str, Any]:
        """Run ``run``'s state, as :meth:`Task.state_dict` (loads with ``weights_only``)."""

    @abstractmethod
    def load_state_dict(self, run: int, state: dict[str, Any]) -> None:
        """Restore run ``run``; every run of a batch is restored from the same iteration."""


@dataclass
class RunSpec:
    """What one run is: an experiment's problem config, one method, one seed, the budget.

    Attributes:
        experiment: registered experiment name (e.g. ``"iv_dsprites"``).
        method: the method's name in the config's ``methods:`` mapping.
        method_config: its (typed) hyperparameters: a registered method spec
            (:class:`~funcbo.experiments.methods.MethodSpec`), or an app's flat record.
        problem: the experiment's (typed) problem/data config.
        seed: random seed of the run.
        iterations: outer iterations.
        eval_every: evaluation period in outer iterations.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        dtype: ``"float32"`` or ``"float64"``.
    """

    experiment: str
    method: str
    method_config: Any
    problem: Any
    seed: int
    iterations: int
    eval_every: int = 100
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]


@dataclass
class ExperimentSpec:
    """An application's experiment, as the experiment layer sees it.

    Attributes:
        name: the value of ``experiment:`` in a config file.
        problem_config: dataclass of the ``problem:`` section.
        method_config: what each ``methods:`` entry is: a
            :class:`~funcbo.experiments.methods.MethodSpec` base class (an entry selects the
            registered spec of its ``kind`` among that base's subclasses), or an app's flat
            dataclass (:class:`~funcbo.experiments.methods.MethodConfig` or a subclass).
        make_task: builds the :class:`Task` of one run.
        metric: the headline evaluation metric (a key of :meth:`Task.evaluate`).
        metric_mode: ``"min"`` or ``"max"``: which direction is better.
        description: one line for ``funcbo list``.
        kinds: the method kinds ``make_task`` accepts.
        iteration_label: what one iteration is, for the x-axis of report curves.
        make_batch_task: builds a :class:`BatchTask` of several runs (``batch_seeds``);
            None: the experiment runs one run per process only.
        batch_key: runs with equal keys may share a batch (None: ``make_batch_task`` takes
            any runs of one method variant's seeds).
    """

    name: str
    problem_config: type
    method_config: type
    make_task: Callable[[RunSpec], Task]
    metric: str
    metric_mode: str = "min"
    description: str = ""
    kinds: tuple[str, ...] = LIBRARY_KINDS
    iteration_label: str = "outer iteration"
    make_batch_task: Callable[[list[RunSpec]], BatchTask] | None = None
    batch_key: Callable[[RunSpec], Any] | None = None


_REGISTRY: dict[str, ExperimentSpec] = {}

#: experiments that live in modules imported on first use (keeps ``import funcbo`` light)
_LAZY: dict[str, str] = {}


def register_experiment(spec: ExperimentSpec) -> ExperimentSpec:
    """Make an experiment available to configs and the ``funcbo`` command."""
    _REGISTRY[spec.name] = spec
    return spec


def register_lazy(name: str, module: str) -> None:
    """Declare that importing ``module`` registers experiment ``name``."""
    _LAZY[name] = module


def get_experiment(name: str) -> ExperimentSpec:
    """The registered experiment called ``name`` (importing its module if needed)."""
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in _REGISTRY and ":" in name:
        # "package.module:experiment" names a user's own experiment module.
        module, _, short = name.partition(":")
        importlib.import_module(module)
        if short in _REGISTRY:
            _REGISTRY[name] = _REGISTRY[short]
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_LAZY))
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(known) or 'none'}")
    return _REGISTRY[name]


def experiment_module(name: str) -> str:
    """The module to import (in a fresh process) for experiment ``name`` to be registered."""
    if name in _LAZY:
        return _LAZY[name]
    if ":" in name:
        return name.partition(":")[0]
    return get_experiment(name).make_task.__module__


def known_experiments() -> list[str]:
    """Names of all registered or lazily registered experiments."""
    return sorted(set(_REGISTRY) | set(_LAZY))
