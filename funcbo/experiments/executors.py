"""Where a sweep's runs execute: local processes (the default) or a Ray cluster.

An :class:`Executor` takes the planned runs of a sweep and reports, through
:class:`SweepEvents`, when each starts, how far it has got and how it ended. Whatever the
executor, every run goes through :func:`~funcbo.experiments.runner.execute_run`, so the run
directory guarantees are the same: files written atomically, finished runs skipped, interrupted
runs resumed from their checkpoint, a failing run recorded (``error.txt`` and a failed summary)
without stopping the others.

- :class:`LocalExecutor`: ``workers`` runs at a time, each in its own process (in this process
  when ``workers`` is 1). With ``batch_seeds`` the unit is a job of runs batched together
  (:func:`~funcbo.experiments.batch.plan_jobs`), ``workers`` jobs at a time.
- :class:`RayExecutor`: each run is a Ray task requesting the config's ``resources`` (CPUs,
  GPUs), on a running cluster or on a local one started on demand. Ray is optional
  (``pip install 'funcbo[ray]'``) and imported only when this executor runs. Run directories
  are written where the tasks run (``results="shared"``: ``out`` must be the same path on every
  machine, e.g. a shared filesystem), or sent back to this process and written here
  (``results="driver"``: for clusters without a shared filesystem).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import multiprocessing as mp
import queue
import shutil
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal, Protocol

from funcbo.experiments.batch import execute_batch, plan_jobs
from funcbo.experiments.config import PlannedRun
from funcbo.experiments.errors import ExperimentError
from funcbo.experiments.runner import (
    RunOptions,
    _finished_before,
    default_threads,
    execute_run,
    record_lost_run,
)
from funcbo.experiments.store import LOCK, SUMMARY
from funcbo.experiments.task import experiment_module
from funcbo.io import atomic_write

#: a run sends at most this many progress messages (its progress bar needs no more)
_PROGRESS_STEPS = 200


class SweepEvents(Protocol):
    """What an executor reports about each run (the sweep's result and progress display)."""

    def started(self, run_id: str) -> None:
        """The run has begun executing."""

    def progress(self, run_id: str, iteration: int, total: int) -> None:
        """The run has done ``iteration`` of its ``total`` iterations."""

    def finished(self, run_id: str, skipped: bool) -> None:
        """The run ended finished (``skipped``: it had finished before this sweep)."""

    def failed(self, run_id: str, error: str) -> None:
        """The run failed with ``error`` (its directory records the details)."""


class Executor(ABC):
    """Runs a sweep's planned runs, reporting each run's start, progress and end."""

    @abstractmethod
    def run(
        self, runs: list[PlannedRun], out: Path, options: RunOptions, events: SweepEvents
    ) -> None:
        """Execute ``runs`` into ``out`` with ``options``; a failing run is reported through
        ``events`` and does not stop the others. ``options.threads`` may be None: the executor
        then chooses the torch threads of each run."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the executor holds (a Ray connection, say)."""


def _throttled(events_progress: Any) -> Any:
    """A progress callback that forwards at most about ``_PROGRESS_STEPS`` updates per run."""

    def report(run_id: str, it: int, total: int) -> None:
        if it == total or it % max(1, total // _PROGRESS_STEPS) == 0:
            events_progress(run_id, it, total)

    return report


# ------------------------------------------------------------------------------ local
class LocalExecutor(Executor):
    """``workers`` runs at a time in separate processes (in this process when ``workers`` is 1).

    Args:
        workers: runs executing at once.
    """

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {workers}")
        self.workers = workers

    def run(
        self, runs: list[PlannedRun], out: Path, options: RunOptions, events: SweepEvents
    ) -> None:
        if options.threads is None:
            options = dataclasses.replace(options, threads=default_threads(self.workers))
        jobs = plan_jobs(runs, out)
        if self.workers <= 1:
            for job in jobs:
                _run_job(job, out, options, events)
        else:
            _run_processes(jobs, out, self.workers, options, events)


def _run_job(job: list[PlannedRun], out: Path, options: RunOptions, events: SweepEvents) -> None:
    """One job in this process: a single run, or several as one batch (``batch_seeds``)."""
    for run in job:
        events.started(run.run_id)
    if len(job) == 1:
        run = job[0]
        try:
            s = execute_run(run, out, options, events.progress)
        except Exception as e:
            events.failed(run.run_id, f"{type(e).__name__}: {e}")
            return
        events.finished(run.run_id, bool(s.get("skipped")))
        return

    def result(run_id: str, summary: dict[str, Any] | None, error: str | None) -> None:
        if summary is None:
            events.failed(run_id, error or "failed")
        else:
            events.finished(run_id, bool(summary.get("skipped")))

    execute_batch(job, out, options, events.progress, result)


def _process_worker(
    job: list[PlannedRun], out: str, options: RunOptions, q: Any, module: str
) -> None:
    importlib.import_module(module)
    report = _throttled(lambda r, i, t: q.put(("progress", r, i, t)))
    if len(job) > 1:

        def result(run_id: str, summary: dict[str, Any] | None, error: str | None) -> None:
            if summary is None:
                q.put(("failed", run_id, False, error or "failed"))
            else:
                q.put(("done", run_id, bool(summary.get("skipped")), ""))

        try:
            execute_batch(job, out, options, report, result)
        except BaseException:
            sys.exit(1)
        return
    run = job[0]
    try:
        summary = execute_run(run, out, options, report)
        q.put(("done", run.run_id, bool(summary.get("skipped")), ""))
    except BaseException as e:
        q.put(("failed", run.run_id, False, f"{type(e).__name__}: {e}"))
        sys.exit(1)


def _run_processes(
    jobs: list[list[PlannedRun]],
    out: Path,
    workers: int,
    opts: RunOptions,
    events: SweepEvents,
) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    pending = list(jobs)
    active: dict[str, tuple[Any, list[PlannedRun]]] = {}
    reported: set[str] = set()

    def handle(msg: tuple[Any, ...]) -> None:
        kind, run_id = msg[0], msg[1]
        if kind == "progress":
            events.progress(run_id, msg[2], msg[3])
        elif kind == "done":
            reported.add(run_id)
            events.finished(run_id, bool(msg[2]))
        elif kind == "failed":
            reported.add(run_id)
            events.failed(run_id, msg[3])

    def drain() -> None:
        try:
            while True:
                handle(q.get_nowait())
        except queue.Empty:
            pass

    try:
        while pending or active:
            while pending and len(active) < workers:
                job = pending.pop(0)
                module = experiment_module(job[0].spec.experiment)
                p = ctx.Process(
                    target=_process_worker, args=(job, str(out), opts, q, module), daemon=False
                )
                p.start()
                active[job[0].run_id] = (p, job)
                for run in job:
                    events.started(run.run_id)
            try:
                handle(q.get(timeout=0.2))
            except queue.Empty:
                pass
            drain()
            for job_id, (p, job) in list(active.items()):
                if p.is_alive():
                    continue
                p.join()
                drain()  # messages the process sent just before exiting
                del active[job_id]
                for run in job:
                    if run.run_id not in reported:
                        reason = f"worker process exited with code {p.exitcode}"
                        record_lost_run(out, run, reason)
                        events.failed(run.run_id, reason)
    except BaseException:
        # Interrupted (Ctrl-C): the processes got the signal too when it came from a terminal;
        # give them a moment to record where they stopped, then end those still running.
        deadline = time.monotonic() + 5
        for p, _ in active.values():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join()
        raise


# -------------------------------------------------------------------------------- ray
def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ExperimentError(
            "--executor ray needs Ray, which is not installed: pip install 'funcbo[ray]'"
        ) from e
    return ray


def ray_available() -> bool:
    """Whether Ray can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative POSIX path -> content)."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".tmp") and p.name != LOCK
    }


def _write_order(name: str) -> int:
    # summary.json last: a run counts as finished only once everything else is in place; the
    # checkpoint after metrics.jsonl, so that a resume truncates the log to the checkpoint.
    return {SUMMARY: 3, "checkpoint.pt": 2}.get(name, 1 if name.startswith("tensorboard/") else 0)


def write_returned_run(path: Path, files: dict[str, bytes]) -> None:
    """Make run directory ``path`` hold exactly ``files`` (sent back by a Ray task), each file
    written atomically and ``summary.json`` last."""
    path.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: (_write_order(n), n)):
        data = files[name]
        atomic_write(path / name, lambda f, data=data: f.write(data), "wb")
    for p in sorted(path.rglob("*"), reverse=True):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and rel not in files and rel != LOCK:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()


class _ProgressLog:
    """A Ray actor collecting the tasks' messages; the driver drains it."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, ...]] = []

    def put(self, item: tuple[Any, ...]) -> None:
        self.items.append(item)

    def drain(self) -> list[tuple[Any, ...]]:
        items, self.items = self.items, []
        return items


def _ray_task(
    run: PlannedRun,
    out: str | None,
    options: RunOptions,
    module: str,
    log: Any,
    files: dict[str, bytes] | None,
) -> dict[str, Any]:
    """One run on a Ray worker: in ``out`` (shared filesystem) or, when ``out`` is None, in a
    scratch directory seeded with ``files`` and sent back whole."""
    importlib.import_module(module)

    def send(item: tuple[Any, ...]) -> None:
        try:
            log.put.remote(item)  # fire and forget: a lost message costs only display
        except Exception:
            pass

    send(("started", run.run_id))
    report = _throttled(lambda r, i, t: send(("progress", r, i, t)))
    scratch = None
    if out is None:
        scratch = Path(tempfile.mkdtemp(prefix="funcbo-run-"))
        root = scratch
        write_returned_run(scratch / run.run_id, files or {})
    else:
        root = Path(out)
    try:
        summary = execute_run(run, root, options, report)
        outcome: dict[str, Any] = {"ok": True, "skipped": bool(summary.get("skipped"))}
    except Exception as e:
        outcome = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if scratch is not None:
        outcome["files"] = _read_tree(scratch / run.run_id)
        shutil.rmtree(scratch, ignore_errors=True)
    return outcome


class RayExecutor(Executor):
    """Each run a Ray task, requesting ``resources.cpus`` CPUs and ``resources.gpus`` GPUs.

    Ray runs as many tasks at once as the cluster's resources allow. A task that fails records
    its error in its run directory; a task that is lost (its worker or node died) is recorded
    as failed here; neither stops the sweep, and running the sweep again resumes them. Tasks
    are not retried by Ray. An interrupted sweep (Ctrl-C) cancels its outstanding tasks.

    Args:
        address: cluster to connect to (``"auto"``: the one ``ray start`` runs on this machine;
            ``"HOST:6379"``; ``"ray://HOST:10001"``); None: the cluster ``RAY_ADDRESS`` names
            or one ``ray start`` runs here, else a local one started for the sweep.
        results: ``"shared"``: tasks write run directories under ``out`` themselves (the same
            path on every machine); ``"driver"``: each task runs in a scratch directory of its
            machine and sends its run directory back, written under ``out`` here (a run
            interrupted there restarts from what was last sent back).
        init_options: more keyword arguments for ``ray.init`` (e.g. ``num_cpus`` of a local
            cluster).
    """

    def __init__(
        self,
        address: str | None = None,
        results: Literal["shared", "driver"] = "shared",
        init_options: dict[str, Any] | None = None,
    ) -> None:
        if results not in ("shared", "driver"):
            raise ValueError(f"results must be 'shared' or 'driver', got {results!r}")
        self.address = address
        self.results = results
        self.init_options = dict(init_options or {})
        self._started = False

    def _connect(self) -> Any:
        ray = _import_ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"logging_level": logging.WARNING, **self.init_options}
            if self.address is not None:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except ConnectionError as e:
                where = self.address or "RAY_ADDRESS or this machine"
                raise ExperimentError(f"cannot connect to the Ray cluster at {where}: {e}") from e
            self._started = True
        return ray

    def close(self) -> None:
        """Disconnect from Ray (stopping a local cluster it started) if this executor
        connected; a connection made by the caller is left open."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def run(
        self, runs: list[PlannedRun], out: Path, options: RunOptions, events: SweepEvents
    ) -> None:
        out = Path(out).resolve()  # the path the tasks see (on a shared filesystem)
        if any(len(job) > 1 for job in plan_jobs(runs)):
            raise ExperimentError(
                "batch_seeds runs execute on the local executor (one process per batch); "
                "run without --executor ray, or without batch_seeds"
            )
        for run in runs:
            if run.spec.device.startswith("cuda") and not run.config.resources.gpus > 0:
                raise ExperimentError(
                    f"{run.run_id}: device {run.spec.device!r} on Ray needs resources.gpus > 0 "
                    "(Ray gives a task the GPUs it asks for)"
                )
        todo = []
        for run in runs:
            if _finished_before(run, out):
                events.finished(run.run_id, True)
            else:
                todo.append(run)
        if not todo:
            return
        ray = self._connect()
        task = ray.remote(_ray_task)
        log = ray.remote(num_cpus=0)(_ProgressLog).remote()
        refs: dict[Any, PlannedRun] = {}
        ended: set[str] = set()

        def handle(msgs: list[tuple[Any, ...]]) -> None:
            for msg in msgs:
                if msg[1] in ended:
                    continue
                if msg[0] == "started":
                    events.started(msg[1])
                elif msg[0] == "progress":
                    events.progress(msg[1], msg[2], msg[3])

        try:
            for run in todo:
                res = run.config.resources
                opts = options
                if opts.threads is None:
                    opts = dataclasses.replace(opts, threads=max(1, math.floor(res.cpus)))
                files = None
                if self.results == "driver":
                    files = _read_tree(out / run.run_id)
                ref = task.options(
                    num_cpus=res.cpus, num_gpus=res.gpus, max_retries=0, name=run.run_id
                ).remote(
                    run,
                    str(out) if self.results == "shared" else None,
                    opts,
                    experiment_module(run.spec.experiment),
                    log,
                    files,
                )
                refs[ref] = run
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0.2)
                for ref in ready:
                    run = refs.pop(ref)
                    ended.add(run.run_id)
                    self._record(ray, ref, run, out, events)
                handle(ray.get(log.drain.remote()))
        except BaseException:
            for ref in refs:  # interrupted: stop the outstanding tasks where they are
                ray.cancel(ref, force=True)
            raise
        finally:
            try:
                ray.kill(log)
            except Exception:
                pass

    def _record(self, ray: Any, ref: Any, run: PlannedRun, out: Path, events: SweepEvents) -> None:
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as e:
            # The task never returned (its worker or node died, or it was cancelled).
            reason = f"Ray task lost: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
            record_lost_run(out, run, reason)
            events.failed(run.run_id, reason)
            return
        if "files" in outcome:
            write_returned_run(out / run.run_id, outcome["files"])
        if outcome["ok"]:
            events.finished(run.run_id, outcome["skipped"])
        else:
            events.failed(run.run_id, outcome["error"])


def make_executor(
    kind: Literal["local", "ray"] = "local",
    *,
    workers: int = 1,
    address: str | None = None,
    results: Literal["shared", "driver"] = "shared",
) -> Executor:
    """The executor the command line names (``--executor``, ``--workers``, ``--address``,
    ``--ray-results``)."""
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(address=address, results=results)
    raise ValueError(f"unknown executor {kind!r} (known: local, ray)")


__all__ = [
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "SweepEvents",
    "make_executor",
    "ray_available",
    "write_returned_run",
]
