"""Run sweeps of (method, seed) runs: resumable, in parallel processes, failure-isolated.

:func:`execute_run` runs one :class:`~funcbo.experiments.config.PlannedRun` in the current
process: it skips a finished run, resumes an interrupted one from its last checkpoint (the
task's state and every random generator), logs metrics, evaluates periodically and checkpoints
atomically. Killed at any point (even by SIGKILL), the run resumes and ends with the same final
metrics as an uninterrupted run with the same seed.

:func:`run_sweep` runs many of them on an executor (see :mod:`funcbo.experiments.executors`):
``workers`` at a time in local processes by default, or as tasks on a Ray cluster; with an
overall progress bar (finished / running / failed) and per-run progress. A failing run leaves
its traceback in its directory and does not stop the others.
"""

from __future__ import annotations

import os
import random
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from funcbo.experiments.config import (
    ConfigError,
    ExperimentConfig,
    PlannedRun,
    dump_yaml,
    load_config_dict,
    to_plain,
)
from funcbo.experiments.errors import (
    DamagedRunError,
    ExperimentError,
    LostProgressWarning,
    StaleRunError,
)
from funcbo.experiments.store import SWEEP, RunDir
from funcbo.experiments.task import get_experiment
from funcbo.io import atomic_write_json
from funcbo.rng import rng_state, set_rng_state
from funcbo.trainer import TensorBoardLogger

if TYPE_CHECKING:
    from funcbo.experiments.executors import Executor

ProgressFn = Callable[[str, int, int], None]

#: keys of a task's step metrics that the runner replaces with its own
_RUNNER_KEYS = ("iteration", "time_s", "wall_time_s")


@dataclass
class RunOptions:
    """How runs are executed (not part of what they compute)."""

    log_every: int = 1
    checkpoint_every: int = 200
    threads: int | None = None
    tensorboard: bool = False

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> RunOptions:
        """The execution settings a config file asks for."""
        return cls(cfg.log_every, cfg.checkpoint_every, cfg.threads, cfg.tensorboard)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _numeric(d: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v)
    return out


def _summary_base(run: PlannedRun) -> dict[str, Any]:
    exp = get_experiment(run.spec.experiment)
    return {
        "experiment": run.spec.experiment,
        "name": run.config.name,
        "method": run.method,
        "variant": run.variant,
        "seed": run.seed,
        "grid_point": to_plain(run.point),
        "iterations": run.spec.iterations,
        "metric": exp.metric,
        "metric_mode": exp.metric_mode,
    }


def run_config_text(run: PlannedRun) -> str:
    """The resolved config of one run, as YAML."""
    d = run.config.to_dict()
    d["methods"] = {run.method: d["methods"][run.method]}
    d["seeds"] = [run.seed]
    d.pop("grid", None)
    header = {
        "run": {
            "method": run.method,
            "variant": run.variant,
            "seed": run.seed,
            "grid_point": to_plain(run.point),
        }
    }
    return dump_yaml({**header, **d})


def execute_run(
    run: PlannedRun,
    out: str | Path,
    options: RunOptions | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Run (or resume, or skip) one run; returns its summary. Exceptions propagate after the
    failure is recorded in the run directory.

    Raises:
        RunInUseError: another process is running this run (nothing is written then).
    """
    opts = options or RunOptions()
    rd = RunDir(Path(out) / run.run_id)
    with rd.locked():
        return _execute_locked(run, rd, opts, progress)


def _execute_locked(
    run: PlannedRun, rd: RunDir, opts: RunOptions, progress: ProgressFn | None
) -> dict[str, Any]:
    try:
        done = rd.summary()
    except DamagedRunError as e:
        # A failed summary replaces the damaged one: the next attempt resumes from the checkpoint.
        err = DamagedRunError(
            f"{e}; it is replaced by a 'failed' summary: run the same command again to resume "
            f"this run from its checkpoint, or pass --restart {run.run_id} to start it afresh"
        )
        _record_failure(rd, run, err)
        raise err from e
    finished = _finished_run(run, rd, done)
    if finished is not None:
        return {**finished, "skipped": True}
    if opts.threads:
        torch.set_num_threads(opts.threads)
    exp = get_experiment(run.spec.experiment)
    base = _summary_base(run)
    total = run.spec.iterations
    eval_every = run.spec.eval_every
    tb: TensorBoardLogger | None = None
    try:
        _seed_everything(run.seed)
        task = exp.make_task(run.spec)
        try:
            ckpt = rd.load_checkpoint() if rd.path.exists() else None
        except DamagedRunError as e:
            raise _restart_hint(e, run) from e
        if ckpt is not None:
            task.load_state_dict(ckpt["task"])
            set_rng_state(ckpt["rng"])
            start, elapsed = int(ckpt["iteration"]), float(ckpt["elapsed"])
            last_eval: dict[str, float] = dict(ckpt["last_eval"])
            last_train: dict[str, float] = dict(ckpt["last_train"])
            rd.truncate_metrics(start)
        else:
            _warn_lost_progress([(run.run_id, _interrupted_at(rd, done))])
            rd.clear()
            rd.path.mkdir(parents=True, exist_ok=True)
            rd.write_config(run_config_text(run))
            start, elapsed, last_train = 0, 0.0, {}
            t0 = time.perf_counter()
            last_eval = _numeric(task.evaluate())
            elapsed += time.perf_counter() - t0
            rd.append_metrics({"iteration": 0, "wall_time_s": elapsed, **last_eval})
        if opts.tensorboard:
            tb = TensorBoardLogger(rd.path / "tensorboard")
        rd.write_summary(
            {
                **base,
                "status": "running",
                "iteration": start,
                "wall_time_s": elapsed,
                "final": {},
                "error": None,
            }
        )
        for it in range(start + 1, total + 1):
            t0 = time.perf_counter()
            metrics = _numeric(task.step())
            for key in _RUNNER_KEYS:  # the runner owns the iteration count and the clock
                metrics.pop(key, None)
            is_eval = it % eval_every == 0 or it == total
            if is_eval:
                last_eval = _numeric(task.evaluate())
            elapsed += time.perf_counter() - t0
            last_train = metrics
            if is_eval or it % opts.log_every == 0:
                record = {"iteration": it, "wall_time_s": elapsed, **metrics}
                if is_eval:
                    record.update(last_eval)
                rd.append_metrics(record)
                if tb is not None:
                    tb.log(record, it)
            if it % opts.checkpoint_every == 0 or it == total:
                rd.save_checkpoint(
                    {
                        "task": task.state_dict(),
                        "rng": rng_state(),
                        "iteration": it,
                        "elapsed": elapsed,
                        "last_eval": last_eval,
                        "last_train": last_train,
                    }
                )
            if progress is not None:
                progress(run.run_id, it, total)
        summary = {
            **base,
            "status": "finished",
            "iteration": total,
            "wall_time_s": elapsed,
            "final": {**last_train, **last_eval},
            "error": None,
        }
        rd.write_summary(summary)
        return summary
    except BaseException as e:
        _record_failure(rd, run, e, traceback.format_exc())
        raise
    finally:
        if tb is not None:
            tb.close()


def _interrupted_at(rd: RunDir, summary: dict[str, Any] | None) -> int:
    """The last iteration an interrupted run (summary status ``running``) logged; 0 for a
    fresh or failed run (a failed run's retry starts afresh without its checkpoint, as the
    user was told when it failed)."""
    if summary is None or summary.get("status") != "running":
        return 0
    return rd.logged_iteration()


def _warn_lost_progress(runs: list[tuple[str, int]]) -> None:
    """Warn (:class:`LostProgressWarning`) about runs, ``(run id, last logged iteration)``,
    that start afresh although they had logged iterations: their checkpoint is gone."""
    lost = [(rid, it) for rid, it in runs if it > 0]
    if not lost:
        return
    why = (
        "no checkpoint.pt to resume from (checkpoints stay in the run directory that wrote "
        "them; committed results carry none)"
    )
    if len(lost) == 1:
        rid, it = lost[0]
        msg = f"{rid} had logged iteration {it} but has {why}: it starts afresh from iteration 0"
    else:
        ids = ", ".join(rid for rid, _ in lost[:3]) + (" …" if len(lost) > 3 else "")
        top = max(it for _, it in lost)
        msg = (
            f"{len(lost)} runs ({ids}) had logged iterations (up to {top}) but have {why}: "
            "they start afresh from iteration 0"
        )
    warnings.warn(msg, LostProgressWarning, stacklevel=3)


def _finished_run(
    run: PlannedRun, rd: RunDir, summary: dict[str, Any] | None
) -> dict[str, Any] | None:
    """``summary`` when it is that of a finished run made with ``run``'s config (to reuse);
    None when the run has not finished.

    Raises:
        StaleRunError: the run finished with a different config.
    """
    if summary is None or summary.get("status") != "finished":
        return None
    differing = config_differences(run, rd)
    if differing:
        raise StaleRunError(
            f"{rd.path} was made with a different config (differing keys: "
            f"{', '.join(differing)}); pass --overwrite to replace it"
        )
    return summary


def _restart_hint(e: DamagedRunError, run: PlannedRun) -> DamagedRunError:
    return DamagedRunError(f"{e}; start this run again from scratch with --restart {run.run_id}")


def _safe_summary(rd: RunDir) -> dict[str, Any]:
    try:
        return rd.summary() or {}
    except DamagedRunError:
        return {}


def _record_failure(
    rd: RunDir, run: PlannedRun, e: BaseException, tb_text: str | None = None
) -> None:
    """Write ``error.txt`` and a failed summary (keeping the progress the run had made)."""
    rd.path.mkdir(parents=True, exist_ok=True)
    rd.write_error(tb_text or f"{type(e).__name__}: {e}\n")
    prev = _safe_summary(rd)
    rd.write_summary(
        {
            **_summary_base(run),
            "status": "failed",
            "iteration": prev.get("iteration", 0),
            "wall_time_s": prev.get("wall_time_s", 0.0),
            "final": {},
            "error": f"{type(e).__name__}: {e}",
        }
    )


def record_lost_run(out: str | Path, run: PlannedRun, reason: str) -> None:
    """Record a run whose process ended without reporting (killed, crashed, a lost Ray task):
    ``error.txt`` holds ``reason``, and a failed summary keeps the progress the run had made."""
    rd = RunDir(Path(out) / run.run_id)
    prev = _safe_summary(rd)
    rd.path.mkdir(parents=True, exist_ok=True)
    rd.write_error(reason + "\n")
    rd.write_summary(
        {
            **_summary_base(run),
            **{k: prev.get(k) for k in ("iteration", "wall_time_s")},
            "status": "failed",
            "final": {},
            "error": reason,
        }
    )


#: config keys that say how a run is executed, not what it computes (ignored when comparing)
EXECUTION_KEYS = (
    "batch_max_runs",
    "checkpoint_every",
    "name",
    "resources",
    "tensorboard",
    "threads",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _resolved_config(text: str, src: str) -> dict[str, Any]:
    """A run's config.yaml as flat dotted keys, with every default filled in (so that a field
    added since the run was made, at its default value, is no difference)."""
    import yaml

    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError("not a mapping")
    header = data.pop("run", None)
    resolved = load_config_dict(data, src=src).to_dict()
    return _flatten({"run": header, **resolved})


def config_differences(run: PlannedRun, rd: RunDir) -> list[str]:
    """Dotted keys on which a run directory's ``config.yaml`` differs from ``run``'s config
    (empty when they agree or the directory holds no config yet). Both are compared with their
    defaults filled in; keys that only say how a run is executed (:data:`EXECUTION_KEYS`) are
    ignored."""
    if not rd.config_path.exists():
        return []
    want = _resolved_config(run_config_text(run), "the requested config")
    try:
        have = _resolved_config(rd.config_path.read_text(), str(rd.config_path))
    except ConfigError as e:
        return [f"(its config.yaml is no longer valid: {e})"]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return [f"(unreadable {rd.config_path.name}: {type(e).__name__})"]
    order = {k: i for i, k in enumerate(want)}
    keys = sorted(set(want) | set(have), key=lambda k: (order.get(k, len(order)), k))
    return [
        k
        for k in keys
        if k.split(".")[0] not in EXECUTION_KEYS and want.get(k, _MISSING) != have.get(k, _MISSING)
    ]


_MISSING = object()


def _finished_before(run: PlannedRun, out: Path) -> bool:
    """A finished run whose stored config is the requested one (served without executing)."""
    rd = RunDir(out / run.run_id)
    try:
        done = rd.summary()
    except DamagedRunError:
        return False  # executing it records the damage (execute_run, execute_batch)
    return done is not None and done.get("status") == "finished" and not config_differences(run, rd)


def _short(v: Any) -> str:
    text = "(absent)" if v is _MISSING else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def prepare_run_dirs(
    runs: list[PlannedRun],
    out: str | Path,
    *,
    overwrite: bool = False,
    restart: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """Check the planned runs against what ``out`` already holds, before anything runs.

    Runs named in ``restart`` (run ids such as ``funcid/seed_0``) are deleted, to start again
    from scratch (a damaged checkpoint, say). A run directory whose ``config.yaml`` differs from
    its planned run's config (see :func:`config_differences`) is deleted when ``overwrite`` is
    True; otherwise :class:`StaleRunError` names the differing keys and nothing is touched.

    Returns:
        The run ids that were deleted.

    Raises:
        ExperimentError: a ``restart`` id is not a planned run.
        StaleRunError: runs made with another config, without ``overwrite``.
        RunInUseError: a run to delete is being run by another process.
    """
    out = Path(out)
    by_id = {r.run_id: r for r in runs}
    unknown = [r for r in restart if r.strip("/") not in by_id]
    if unknown:
        known = ", ".join(list(by_id)[:6]) + (", ..." if len(by_id) > 6 else "")
        raise ExperimentError(
            f"--restart {unknown[0]}: not a run of this sweep (its runs: {known})"
        )
    stale: dict[str, list[str]] = {}
    for run in runs:
        if run.run_id in {r.strip("/") for r in restart}:
            continue
        differing = config_differences(run, RunDir(out / run.run_id))
        if differing:
            stale[run.run_id] = differing
    if stale and not overwrite:
        first, keys = next(iter(stale.items()))
        rd = RunDir(out / first)
        want = _resolved_config(run_config_text(by_id[first]), "the requested config")
        try:
            have = _resolved_config(rd.config_path.read_text(), str(rd.config_path))
        except (OSError, UnicodeDecodeError, ValueError):
            have = {}
        example = ", ".join(
            f"{k}: {_short(have.get(k, _MISSING))} there, {_short(want.get(k, _MISSING))} now"
            for k in keys[:3]
            if k in want or k in have
        )
        all_keys = sorted({k for ks in stale.values() for k in ks})
        n = len(stale)
        raise StaleRunError(
            f"{out}: {n} existing run{'s' if n != 1 else ''} made with a different config "
            f"(differing keys: {', '.join(all_keys)}; e.g. {first}: {example}); "
            "pass --overwrite to replace them, or choose another --out"
        )
    cleared = [r for r in by_id if r in {x.strip("/") for x in restart}] + list(stale)
    for run_id in cleared:
        rd = RunDir(out / run_id)
        with rd.locked():
            rd.clear()
    return cleared


# --------------------------------------------------------------------------------- sweeps
@dataclass
class SweepResult:
    """What a sweep did."""

    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    wall_time_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


class _Progress:
    """The sweep's :class:`~funcbo.experiments.executors.SweepEvents`: fills the
    :class:`SweepResult` and shows an overall bar (runs done, ETA; finished / running / failed)
    plus one bar per running run; plain lines without a TTY."""

    def __init__(self, total: int, enabled: bool, result: SweepResult | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.result = result if result is not None else SweepResult()
        self.tty = enabled and sys.stderr.isatty()
        self.done = 0
        self.t0 = time.perf_counter()
        self.last_print = 0.0
        self.running: set[str] = set()
        self.runs: dict[str, tuple[int, int]] = {}
        self._bars: dict[str, Any] = {}
        self._overall: Any = None
        if self.tty:
            try:
                from tqdm.auto import tqdm

                self._tqdm = tqdm
                self._overall = tqdm(
                    total=total, desc="runs", unit="run", position=0, dynamic_ncols=True
                )
            except ImportError:
                self.tty = False

    def counts(self) -> str:
        """``3 finished, 2 running, 1 failed`` (runs finished before the sweep count as
        finished)."""
        r = self.result
        return (
            f"{len(r.finished) + len(r.skipped)} finished, {len(self.running)} running, "
            f"{len(r.failed)} failed"
        )

    def _postfix(self) -> None:
        if self._overall is not None:
            self._overall.set_postfix_str(self.counts(), refresh=True)

    def started(self, run_id: str) -> None:
        self.running.add(run_id)
        self._postfix()

    def progress(self, run_id: str, it: int, total: int) -> None:
        if run_id not in self.running:
            self.started(run_id)
        self.runs[run_id] = (it, total)
        if self.tty:
            bar = self._bars.get(run_id)
            if bar is None:
                bar = self._tqdm(
                    total=total,
                    desc=run_id,
                    position=len(self._bars) + 1,
                    leave=False,
                    dynamic_ncols=True,
                    unit="it",
                )
                self._bars[run_id] = bar
            bar.update(it - bar.n)
        elif self.enabled and time.perf_counter() - self.last_print > 30:
            self.last_print = time.perf_counter()
            print(
                f"[{self.done}/{self.total} runs done] {_active_runs(self.runs)}",
                file=sys.stderr,
                flush=True,
            )

    update = progress  # the name execute_run's callers used

    def finished(self, run_id: str, skipped: bool) -> None:
        (self.result.skipped if skipped else self.result.finished).append(run_id)
        self._end(run_id, "skipped (finished before)" if skipped else "finished")

    def failed(self, run_id: str, error: str) -> None:
        self.result.failed[run_id] = error
        self._end(run_id, f"failed: {error} (see error.txt)")

    def _end(self, run_id: str, status: str) -> None:
        self.done += 1
        self.running.discard(run_id)
        self.runs.pop(run_id, None)
        if self.tty:
            bar = self._bars.pop(run_id, None)
            if bar is not None:
                bar.close()
            self._postfix()
            self._overall.update(1)
            if status != "finished":
                self._overall.write(f"{run_id}: {status}")
        elif self.enabled:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / self.done * (self.total - self.done)
            print(
                f"[{self.done}/{self.total} runs: {self.counts()}] {run_id}: {status} "
                f"(elapsed {elapsed:.0f} s, ETA {eta:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        if self._overall is not None:
            self._overall.close()


def _active_runs(runs: dict[str, tuple[int, int]]) -> str:
    """The running runs in one short line: a run alone as ``id it/total``; runs at the same
    iteration (give or take one: the runs of one batch) as ``30 runs at 2200/200000 (first id
    … last id)``."""
    clusters: list[list[tuple[str, int, int]]] = []
    for rid, (it, total) in runs.items():
        for c in clusters:
            if c[0][2] == total and abs(c[0][1] - it) <= 1:
                c.append((rid, it, total))
                break
        else:
            clusters.append([(rid, it, total)])
    parts = []
    for c in clusters:
        rid, it, total = c[0]
        if len(c) == 1:
            parts.append(f"{rid} {it}/{total}")
            continue
        lo, hi = min(x[1] for x in c), max(x[1] for x in c)
        span = f"{lo}" if lo == hi else f"{lo}–{hi}"
        parts.append(f"{len(c)} runs at {span}/{total} ({rid} … {c[-1][0]})")
    return ", ".join(parts)


def write_sweep_file(out: Path, runs: list[PlannedRun]) -> None:
    """``sweep.json``: what the sweep is (read by the report)."""
    if not runs:
        return
    cfg = runs[0].config
    atomic_write_json(
        out / SWEEP,
        {
            "name": cfg.name,
            "experiment": cfg.experiment,
            "source": cfg.source,
            "runs": [r.run_id for r in runs],
        },
    )


def default_threads(workers: int) -> int:
    """Torch threads per run so that ``workers`` runs share the machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers))


def run_sweep(
    runs: list[PlannedRun],
    out: str | Path,
    *,
    workers: int = 1,
    options: RunOptions | None = None,
    progress: bool = True,
    overwrite: bool = False,
    restart: list[str] | tuple[str, ...] = (),
    executor: Executor | None = None,
) -> SweepResult:
    """Execute runs (skipping finished ones) on ``executor``: by default
    :class:`~funcbo.experiments.executors.LocalExecutor` with ``workers`` processes at a time.

    Finished runs are reused only when their stored config equals the requested one: see
    :func:`prepare_run_dirs` for ``overwrite`` and ``restart``. When neither ``options`` nor
    the config sets ``threads``, the executor chooses each run's torch threads (the cores
    divided by ``workers`` locally, ``resources.cpus`` on Ray). An executor made here is
    closed at the end; one passed in is left open.
    """
    from funcbo.experiments.executors import LocalExecutor

    if executor is not None and workers != 1:
        raise ValueError("pass workers to the executor, not to run_sweep, when giving an executor")
    out = Path(out)
    prepare_run_dirs(runs, out, overwrite=overwrite, restart=restart)
    out.mkdir(parents=True, exist_ok=True)
    if options is not None:
        opts = options
    else:
        opts = RunOptions.from_config(runs[0].config) if runs else RunOptions()
    write_sweep_file(out, runs)
    result = SweepResult()
    t0 = time.perf_counter()
    bar = _Progress(len(runs), progress, result)
    ex = executor if executor is not None else LocalExecutor(max(1, workers))
    try:
        ex.run(runs, out, opts, bar)
    finally:
        bar.close()
        if executor is None:
            ex.close()
    result.wall_time_s = time.perf_counter() - t0
    return result


__all__ = [
    "EXECUTION_KEYS",
    "RunOptions",
    "SweepResult",
    "config_differences",
    "default_threads",
    "execute_run",
    "prepare_run_dirs",
    "record_lost_run",
    "run_sweep",
]
