"""Many runs in one process as one batched program (``batch_seeds: true``).

:func:`plan_jobs` groups a sweep's runs into jobs: runs of one method that the experiment can
batch together (its :attr:`~funcbo.experiments.task.ExperimentSpec.batch_key`) form one job,
every other run is a job of its own. :func:`execute_batch` runs a job of several runs as one
:class:`~funcbo.experiments.task.BatchTask` while keeping every run's directory exactly as
:func:`~funcbo.experiments.runner.execute_run` writes it: its own ``config.yaml``,
``metrics.jsonl``, ``summary.json`` and checkpoint (the run's slice of the batch's state), so
resume, reports and ``funcbo status`` see ordinary runs. A run whose metrics become non-finite
is marked failed alone; the others go on.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch

from funcbo.experiments.config import PlannedRun
from funcbo.experiments.errors import DamagedRunError, RunInUseError
from funcbo.experiments.runner import (
    _RUNNER_KEYS,
    ProgressFn,
    RunOptions,
    _finished_before,
    _finished_run,
    _interrupted_at,
    _numeric,
    _record_failure,
    _summary_base,
    _warn_lost_progress,
    run_config_text,
)
from funcbo.experiments.store import RunDir
from funcbo.experiments.task import get_experiment

#: called with (run_id, summary or None, error message or None) as each run of a job ends
ResultFn = Callable[[str, "dict[str, Any] | None", "str | None"], None]

#: the checkpoint of a run made in a batch says so (an unbatched run cannot continue it)
BATCHED_CHECKPOINT = "batched"


def plan_jobs(runs: list[PlannedRun], out: str | Path | None = None) -> list[list[PlannedRun]]:
    """The sweep's runs as jobs, in the order of their first run.

    With ``batch_seeds`` off, or for an experiment without batched tasks, every run is its own
    job. Otherwise runs of one method variant (and variants the experiment's ``batch_key``
    puts together) share a job; with ``batch_max_runs`` set, such a group is split seed-major
    (every grid point of a seed, then the next seed) into jobs of at most that many runs.
    Given ``out``, runs already finished there with the requested config are left out of that
    split (they form one job of their own, which only serves them), so that every batch of at
    most ``batch_max_runs`` holds runs still to do.
    """
    groups: dict[Any, list[PlannedRun]] = {}
    for i, run in enumerate(runs):
        exp = get_experiment(run.spec.experiment)
        if not run.config.batch_seeds or exp.make_batch_task is None:
            key: Any = ("single", i)
        elif exp.batch_key is not None:
            key = ("batch", run.spec.experiment, exp.batch_key(run.spec))
        else:
            key = ("batch", run.spec.experiment, run.variant)
        groups.setdefault(key, []).append(run)
    jobs: list[list[PlannedRun]] = []
    for group in groups.values():
        size = group[0].config.batch_max_runs
        if size is None or len(group) <= size:
            jobs.append(group)
            continue
        done = [r for r in group if _finished_before(r, Path(out))] if out is not None else []
        if done:
            jobs.append(done)
        served = {r.run_id for r in done}
        todo = sorted((r for r in group if r.run_id not in served), key=lambda r: r.seed)
        # sorted is stable: grid order within a seed
        jobs.extend(todo[k : k + size] for k in range(0, len(todo), size))
    return jobs


def execute_batch(
    runs: list[PlannedRun],
    out: str | Path,
    options: RunOptions | None = None,
    progress: ProgressFn | None = None,
    on_result: ResultFn | None = None,
) -> dict[str, dict[str, Any]]:
    """Run (or resume, or skip) several runs of one method as one batched task.

    Finished runs are skipped (a finished run made with another config raises
    :class:`StaleRunError`, as in :func:`~funcbo.experiments.runner.execute_run`). The others
    resume from their checkpoints; runs whose checkpoints are at different iterations run as
    separate batches, one after the other. ``on_result`` hears of every run as it ends.

    Returns:
        run id → summary, for the runs that finished (or were skipped).
    """
    opts = options or RunOptions()
    out = Path(out)
    results: dict[str, dict[str, Any]] = {}

    def report(run: PlannedRun, summary: dict[str, Any] | None, error: str | None) -> None:
        if summary is not None:
            results[run.run_id] = summary
        if on_result is not None:
            on_result(run.run_id, summary, error)

    with ExitStack() as locks:  # each run's lock, held until the batch ends
        pending: dict[int, list[tuple[PlannedRun, dict[str, Any] | None]]] = {}
        afresh: list[tuple[str, int]] = []
        for run in runs:
            rd = RunDir(out / run.run_id)
            lock = ExitStack()
            try:
                lock.enter_context(rd.locked())
            except RunInUseError as e:  # another process runs it: leave its files alone
                report(run, None, f"{type(e).__name__}: {e}")
                continue
            ckpt = _prepare(run, rd, report, afresh)
            if ckpt is False:  # skipped or failed: not held while the others run
                lock.close()
                continue
            locks.callback(lock.close)
            start = int(ckpt["iteration"]) if ckpt is not None else 0
            pending.setdefault(start, []).append((run, ckpt))
        _warn_lost_progress(afresh)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        for start in sorted(pending):
            _execute_group(pending[start], out, opts, progress, report)
    return results


def _prepare(
    run: PlannedRun,
    rd: RunDir,
    report: Callable[[PlannedRun, dict[str, Any] | None, str | None], None],
    afresh: list[tuple[str, int]],
) -> dict[str, Any] | Literal[False] | None:
    """The run's checkpoint (None: start afresh, noted in ``afresh`` with the iteration an
    interrupted run had logged), or False when it is done (skipped, reported) or cannot run
    (failure recorded, reported)."""
    try:
        summary = rd.summary()
        done = _finished_run(run, rd, summary)
        if done is not None:
            report(run, {**done, "skipped": True}, None)
            return False
        ckpt = rd.load_checkpoint() if rd.path.exists() else None
        if ckpt is not None and not ckpt.get(BATCHED_CHECKPOINT):
            raise DamagedRunError(
                f"{rd.path}: its checkpoint was made by an unbatched run; run it without "
                f"batch_seeds, or start it afresh with --restart {run.run_id}"
            )
    except Exception as e:  # this run alone fails
        _record_failure(rd, run, e, traceback.format_exc())
        report(run, None, f"{type(e).__name__}: {e}")
        return False
    if ckpt is None:
        afresh.append((run.run_id, _interrupted_at(rd, summary)))
    return ckpt


def _execute_group(
    group: list[tuple[PlannedRun, dict[str, Any] | None]],
    out: Path,
    opts: RunOptions,
    progress: ProgressFn | None,
    report: Callable[[PlannedRun, dict[str, Any] | None, str | None], None],
) -> None:
    runs = [r for r, _ in group]
    dirs = [RunDir(out / r.run_id) for r in runs]
    live = list(range(len(runs)))
    first = runs[0]
    exp = get_experiment(first.spec.experiment)
    assert exp.make_batch_task is not None
    total, eval_every = first.spec.iterations, first.spec.eval_every
    bases = [_summary_base(r) for r in runs]
    state: dict[str, Any] = {}

    def fail(i: int, e: BaseException, text: str | None = None) -> None:
        _record_failure(dirs[i], runs[i], e, text)
        report(runs[i], None, f"{type(e).__name__}: {e}")
        live.remove(i)

    try:
        task = exp.make_batch_task([r.spec for r in runs])
        elapsed = [0.0] * len(runs)
        last_eval: list[dict[str, float]] = [{} for _ in runs]
        last_train: list[dict[str, float]] = [{} for _ in runs]
        start = 0
        for i, (run, ckpt) in enumerate(group):
            rd = dirs[i]
            if ckpt is not None:
                task.load_state_dict(i, ckpt["task"])
                start = int(ckpt["iteration"])
                elapsed[i] = float(ckpt["elapsed"])
                last_eval[i] = dict(ckpt["last_eval"])
                last_train[i] = dict(ckpt["last_train"])
                rd.truncate_metrics(start)
            else:
                rd.clear()
                rd.path.mkdir(parents=True, exist_ok=True)
                rd.write_config(run_config_text(run))
        if start == 0:
            t0 = time.perf_counter()
            evals: list[dict[str, float]] | None = task.evaluate()
            assert evals is not None
            dt = (time.perf_counter() - t0) / len(runs)
            for i in live:
                last_eval[i] = _numeric(evals[i])
                elapsed[i] += dt
                dirs[i].append_metrics({"iteration": 0, "wall_time_s": elapsed[i], **last_eval[i]})
        for i in live:
            dirs[i].write_summary(
                {**bases[i], "status": "running", "iteration": start, "batched_runs": len(runs),
                 "wall_time_s": elapsed[i], "final": {}, "error": None}
            )  # fmt: skip
        state["task"] = task
        for it in range(start + 1, total + 1):
            t0 = time.perf_counter()
            raw = task.step()
            is_eval = it % eval_every == 0 or it == total
            evals = task.evaluate() if is_eval else None
            # a run's share of the batch's time: what it would cost per run, amortised
            dt = (time.perf_counter() - t0) / len(runs)
            log = is_eval or it % opts.log_every == 0 or it == total
            bad = _nonfinite_runs(raw, len(runs))
            for i in list(live):
                elapsed[i] += dt
                if i in bad:
                    fail(i, FloatingPointError(f"non-finite {bad[i]} at iteration {it}"))
                    continue
                if evals is not None:
                    last_eval[i] = _numeric(evals[i])
                if log:
                    metrics = _run_metrics(raw, i)
                    last_train[i] = metrics
                    record = {"iteration": it, "wall_time_s": elapsed[i], **metrics}
                    if evals is not None:
                        record.update(last_eval[i])
                    dirs[i].append_metrics(record)
                if it % opts.checkpoint_every == 0 or it == total:
                    dirs[i].save_checkpoint(
                        {
                            BATCHED_CHECKPOINT: True,
                            "task": task.state_dict(i),
                            "iteration": it,
                            "elapsed": elapsed[i],
                            "last_eval": last_eval[i],
                            "last_train": last_train[i],
                        }
                    )
                if progress is not None:
                    progress(runs[i].run_id, it, total)
            if not live:
                return
        for i in list(live):
            summary = {
                **bases[i],
                "status": "finished",
                "iteration": total,
                "batched_runs": len(runs),
                "wall_time_s": elapsed[i],
                "final": {**last_train[i], **last_eval[i]},
                "error": None,
            }
            dirs[i].write_summary(summary)
            report(runs[i], summary, None)
    except BaseException as e:
        text = traceback.format_exc()
        for i in list(live):
            fail(i, e, text)
        if not isinstance(e, Exception):
            raise


def _run_metrics(raw: dict[str, Any], i: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in raw.items():
        if k in _RUNNER_KEYS or isinstance(v, bool):
            continue
        if isinstance(v, torch.Tensor):
            out[k] = float(v[i]) if v.dim() else float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def _nonfinite_runs(raw: dict[str, Any], runs: int) -> dict[int, str]:
    """Run index → the first metric that is non-finite for it."""
    bad: dict[int, str] = {}
    for k, v in raw.items():
        if isinstance(v, torch.Tensor) and v.dim() == 1 and v.is_floating_point():
            fin = torch.isfinite(v)
            if not bool(fin.all()):
                for i in (~fin).nonzero().flatten().tolist():
                    bad.setdefault(i, k)
        elif isinstance(v, float) and not math.isfinite(v):
            for i in range(runs):
                bad.setdefault(i, k)
    return bad


__all__ = ["BATCHED_CHECKPOINT", "execute_batch", "plan_jobs"]
