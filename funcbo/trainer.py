"""The outer loop (Algorithm 1 of the FuncID paper) for any hypergradient estimator.

Each outer iteration draws ``estimator.inner_steps`` inner batches and one outer batch, asks the
estimator for ∇F(ω) (inner steps, adjoint steps, total gradient), and takes one step of the outer
optimizer. Per-iteration metrics (losses, gradient norm, time, peak memory, and anything the
estimator or an ``evaluate`` function reports) go to callbacks: a progress bar, a JSONL log,
checkpoints, or your own.

Two extension points cover methods that are not "one estimator step, one optimizer step", while
the loop itself (batch draws, timing, peak memory, counters, callbacks) stays the same:

* ``update=``: a function ``update(trainer, inner_batches, outer_batch) -> metrics`` that
  replaces the default update (:meth:`Trainer.default_update`): a two-stage method with its own
  optimizers, extra block-coordinate steps after the hypergradient step, an estimator step
  with part of ω frozen (call ``trainer.default_update`` inside your context);
* ``inner_steps=``: how many inner batches one iteration draws, when there is no estimator
  to ask (or another count is wanted).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from funcbo.distributed import is_distributed, rank, shard_batch
from funcbo.estimator import Batches, HypergradientEstimator
from funcbo.io import append_jsonl, atomic_torch_save
from funcbo.memory import peak_bytes, reset_peak
from funcbo.problem import Batch, BilevelProblem
from funcbo.rng import rng_state, set_rng_state

Metrics = dict[str, Any]
#: ``update(trainer, inner_batches, outer_batch) -> metrics``: one outer update (see Trainer)
Update = Callable[["Trainer", Batches, Batch], Metrics]


class Callback:
    """Hooks called by :class:`Trainer`; override the ones you need."""

    def on_start(self, trainer: Trainer) -> None:
        """Before the first iteration of :meth:`Trainer.fit`."""

    def on_step(self, trainer: Trainer, metrics: Metrics) -> None:
        """After every outer iteration, with its metrics."""

    def on_end(self, trainer: Trainer) -> None:
        """After the last iteration of :meth:`Trainer.fit` (also on error)."""


class BatchStream:
    """An endless stream of batches from a re-iterable (a DataLoader, a list of batches), an
    iterator, or a function with no arguments that returns a batch."""

    def __init__(self, source: Iterable[Batch] | Callable[[], Batch], name: str) -> None:
        self.source = source
        self.name = name
        self._it: Iterator[Batch] | None = None
        self.epoch = 0

    def next(self) -> Batch:
        if callable(self.source) and not isinstance(self.source, Iterable):
            return self.source()
        if self._it is None:
            self._it = iter(self.source)
        try:
            return next(self._it)
        except StopIteration:
            if isinstance(self.source, Iterator):
                raise RuntimeError(f"the {self.name} loader (an iterator) is exhausted") from None
            self.epoch += 1
            self._it = iter(self.source)
            try:
                return next(self._it)
            except StopIteration:
                raise RuntimeError(f"the {self.name} loader yields no batches") from None


class Trainer:
    """Runs the outer loop.

    Args:
        problem: the bilevel problem.
        outer: module holding ω.
        estimator: any :class:`~funcbo.estimator.HypergradientEstimator`; may be None when
            ``update`` and ``inner_steps`` are given.
        outer_optimizer: optimizer over ``outer``'s parameters; may be None when ``update``
            steps its own optimizers.
        inner_loader, outer_loader: sources of inner and outer batches (see :class:`BatchStream`).
        callbacks: :class:`Callback` instances.
        evaluate: ``evaluate(trainer) -> dict`` of extra metrics (a test error, say), called
            every ``eval_every`` iterations and after the last one.
        eval_every: evaluation period in outer iterations.
        device: where peak memory is measured (default: that of ``outer``'s first parameter).
        shard: under ``torch.distributed``, keep only this rank's shard of every batch the
            loaders yield (they must yield the same global batches on every rank, e.g. from
            generators seeded alike); inner, adjoint and outer gradients are then averaged across
            ranks, which equals one process training on the whole batches.
        update: ``update(trainer, inner_batches, outer_batch) -> metrics``, one outer update
            in place of :meth:`default_update`, given the batches drawn (and sharded) for this
            iteration; it runs inside the timed and memory-measured part of :meth:`step`, and
            the metrics it returns are the iteration's (before time and memory are added). An
            ``update`` with ``state_dict``/``load_state_dict`` methods has its state saved in
            :meth:`state_dict` under ``"update"``.
        inner_steps: inner batches drawn per iteration (default: ``estimator.inner_steps``).
    """

    def __init__(
        self,
        problem: BilevelProblem,
        outer: nn.Module,
        estimator: HypergradientEstimator | None,
        outer_optimizer: torch.optim.Optimizer | None,
        inner_loader: Iterable[Batch] | Callable[[], Batch],
        outer_loader: Iterable[Batch] | Callable[[], Batch],
        callbacks: Sequence[Callback] = (),
        *,
        evaluate: Callable[[Trainer], Metrics] | None = None,
        eval_every: int = 1,
        device: torch.device | str | None = None,
        shard: bool = True,
        update: Update | None = None,
        inner_steps: int | None = None,
    ) -> None:
        if update is None and (estimator is None or outer_optimizer is None):
            raise ValueError("Trainer needs an estimator and an outer optimizer, or an update")
        if inner_steps is None and estimator is None:
            raise ValueError("Trainer without an estimator needs inner_steps")
        self.problem = problem
        self.shard = shard
        self.outer = outer
        self.estimator = estimator
        self.outer_optimizer = outer_optimizer
        self.update = update
        self.inner_steps = inner_steps
        self.inner_stream = BatchStream(inner_loader, "inner")
        self.outer_stream = BatchStream(outer_loader, "outer")
        self.callbacks = list(callbacks)
        self.evaluate = evaluate
        self.eval_every = max(1, eval_every)
        if device is None:
            first = next(outer.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.iteration = 0
        self.elapsed = 0.0
        self.total_iterations: int | None = None
        self.history: list[Metrics] = []

    def step(self) -> Metrics:
        """One outer iteration; returns its metrics.

        Draws the inner batches (``inner_steps``, default ``estimator.inner_steps``) and then
        the outer batch, runs the update (``update`` or :meth:`default_update`), and adds
        ``iteration``, ``iter_time_s`` (the update's seconds), ``time_s`` (their running total)
        and ``peak_memory_mb`` to its metrics; then ``evaluate``'s, when due.
        """
        n_inner = self.inner_steps
        if n_inner is None:
            assert self.estimator is not None  # checked in __init__
            n_inner = self.estimator.inner_steps
        inner_batches = Batches(self.inner_stream.next() for _ in range(n_inner))
        outer_batch = self.outer_stream.next()
        if self.shard and is_distributed():
            inner_batches = Batches(shard_batch(b) for b in inner_batches)
            outer_batch = shard_batch(outer_batch)
        reset_peak(self.device)
        t0 = time.perf_counter()
        if self.update is not None:
            stats = self.update(self, inner_batches, outer_batch)
        else:
            stats = self.default_update(inner_batches, outer_batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.elapsed += dt
        self.iteration += 1
        metrics: Metrics = {"iteration": self.iteration}
        metrics.update(stats)
        metrics["iter_time_s"] = dt
        metrics["time_s"] = self.elapsed
        metrics["peak_memory_mb"] = peak_bytes(self.device) / 2**20
        last = self.total_iterations is not None and self.iteration >= self.total_iterations
        if self.evaluate is not None and (self.iteration % self.eval_every == 0 or last):
            metrics.update(self.evaluate(self))
        return metrics

    def default_update(self, inner_batches: Batches, outer_batch: Batch) -> Metrics:
        """The update of Algorithm 1: ``estimator.step`` (inner steps, adjoint, ∇F(ω) written
        to ``.grad``), one step of the outer optimizer, gradients cleared. Returns the
        estimator's ``stats``. A custom ``update`` may call it (e.g. inside a context that
        freezes part of ω, or before extra steps of its own)."""
        est, opt = self.estimator, self.outer_optimizer
        if est is None or opt is None:
            raise ValueError("default_update needs the trainer's estimator and outer optimizer")
        est.step(self.problem, self.outer, inner_batches, outer_batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return dict(est.stats)

    def fit(self, iterations: int) -> list[Metrics]:
        """Run until ``iterations`` outer iterations in total have been done (a resumed trainer
        continues from its current iteration). Returns the metrics of the iterations run."""
        self.total_iterations = iterations
        run: list[Metrics] = []
        for cb in self.callbacks:
            cb.on_start(self)
        try:
            while self.iteration < iterations:
                metrics = self.step()
                self.history.append(metrics)
                run.append(metrics)
                for cb in self.callbacks:
                    cb.on_step(self, metrics)
        finally:
            for cb in self.callbacks:
                cb.on_end(self)
        return run

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Outer variable, optimizers, estimator state, the ``update``'s state (when it has
        one), iteration counters and the global RNG states (:func:`funcbo.rng.rng_state`)."""
        state: dict[str, Any] = {
            "iteration": self.iteration,
            "elapsed": self.elapsed,
            "outer": self.outer.state_dict(),
        }
        if self.outer_optimizer is not None:
            state["outer_optimizer"] = self.outer_optimizer.state_dict()
        if self.estimator is not None:
            state["estimator"] = self.estimator.state_dict()
        if hasattr(self.update, "state_dict"):
            state["update"] = self.update.state_dict()  # type: ignore[union-attr]
        state["rng"] = rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.iteration = int(state["iteration"])
        self.elapsed = float(state["elapsed"])
        self.outer.load_state_dict(state["outer"])
        if self.outer_optimizer is not None:
            self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        if self.estimator is not None:
            self.estimator.load_state_dict(state["estimator"])
        if hasattr(self.update, "load_state_dict") and "update" in state:
            self.update.load_state_dict(state["update"])  # type: ignore[union-attr]
        rng = state.get("rng")
        if rng:
            set_rng_state(rng)


# ------------------------------------------------------------------------------- callbacks
class ProgressBar(Callback):
    """A progress bar (tqdm when installed and stderr is a terminal; otherwise a plain line every
    ``every`` iterations, which keeps logs readable), showing the chosen metrics. Rank 0 only."""

    def __init__(self, keys: Sequence[str] = ("outer_loss", "inner_loss"), every: int = 10) -> None:
        self.keys = list(keys)
        self.every = max(1, every)
        self._bar: Any = None

    def on_start(self, trainer: Trainer) -> None:
        self._bar = None
        if rank() != 0 or not sys.stderr.isatty():
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(
            total=trainer.total_iterations,
            initial=trainer.iteration,
            unit="it",
            dynamic_ncols=True,
            leave=False,
        )

    def _fmt(self, metrics: Metrics) -> str:
        parts = []
        for k in self.keys:
            v = metrics.get(k)
            if isinstance(v, float) and math.isfinite(v):
                parts.append(f"{k}={v:.4g}")
        return " ".join(parts)

    def on_step(self, trainer: Trainer, metrics: Metrics) -> None:
        if rank() != 0:
            return
        if self._bar is not None:
            self._bar.update(1)
            if trainer.iteration % self.every == 0:
                self._bar.set_postfix_str(self._fmt(metrics), refresh=False)
        elif trainer.iteration % self.every == 0 or trainer.iteration == trainer.total_iterations:
            total = trainer.total_iterations or "?"
            print(
                f"[{trainer.iteration}/{total}] {self._fmt(metrics)}", file=sys.stderr, flush=True
            )

    def on_end(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class JSONLLogger(Callback):
    """Appends one JSON line of metrics per iteration (every ``every``-th) to ``path``; rank 0."""

    def __init__(self, path: str | Path, every: int = 1) -> None:
        self.path = Path(path)
        self.every = max(1, every)

    def on_step(self, trainer: Trainer, metrics: Metrics) -> None:
        if rank() == 0 and (
            trainer.iteration % self.every == 0 or trainer.iteration == trainer.total_iterations
        ):
            append_jsonl(self.path, metrics)


class Checkpoint(Callback):
    """Saves :meth:`Trainer.state_dict` atomically every ``every`` iterations and at the end;
    rank 0 only. Resume with ``trainer.load_state_dict(torch.load(path, weights_only=True))``."""

    def __init__(self, path: str | Path, every: int = 100) -> None:
        self.path = Path(path)
        self.every = max(1, every)

    def _save(self, trainer: Trainer) -> None:
        if rank() == 0:
            atomic_torch_save(trainer.state_dict(), self.path)

    def on_step(self, trainer: Trainer, metrics: Metrics) -> None:
        if trainer.iteration % self.every == 0:
            self._save(trainer)

    def on_end(self, trainer: Trainer) -> None:
        self._save(trainer)


class TensorBoardLogger(Callback):
    """Writes every numeric metric as a TensorBoard scalar (rank 0); needs ``tensorboard``.

    Optional: the import happens when the logger is created, with a clear error if missing.
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "TensorBoardLogger needs the tensorboard package: pip install tensorboard"
            ) from e
        self.writer = SummaryWriter(str(log_dir)) if rank() == 0 else None

    def log(self, metrics: Metrics, step: int) -> None:
        """Write the numeric entries of ``metrics`` at ``step``."""
        if self.writer is None:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration":
                self.writer.add_scalar(k, v, step)

    def on_step(self, trainer: Trainer, metrics: Metrics) -> None:
        self.log(metrics, trainer.iteration)

    def on_end(self, trainer: Trainer) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


__all__ = [
    "BatchStream",
    "Callback",
    "Checkpoint",
    "JSONLLogger",
    "ProgressBar",
    "TensorBoardLogger",
    "Trainer",
]
