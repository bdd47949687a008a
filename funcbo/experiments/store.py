"""The run store: one directory per run, every file written atomically.

Layout of a sweep written by ``funcbo run CONFIG --out OUT``::

    OUT/
      sweep.json                      the sweep: config name, experiment, runs planned
      <variant>/seed_<k>/             one run (variant = method, or method__key-value for grids)
        config.yaml                   the resolved config of this run
        metrics.jsonl                 one JSON line per logged iteration
        summary.json                  status and final metrics
        checkpoint.pt                 last checkpoint (task state, iteration, RNG states)
        error.txt                     traceback, when the run failed
        .lock                         held by the process running the run (never committed)
        tensorboard/                  event files, when enabled

``metrics.jsonl`` lines hold ``iteration`` (0 = before training), ``wall_time_s`` (time spent in
the run, summed over resumes) and whatever the task reports: ``outer_loss``, ``inner_loss``,
``adjoint_loss``, ``grad_norm``, ``peak_memory_mb``, ... and, on evaluation iterations, the
evaluation metrics (e.g. ``test_mse``).

``summary.json`` = {"status": "running" | "finished" | "failed", "experiment", "name", "method",
"variant", "seed", "grid_point", "iterations", "iteration", "metric", "metric_mode",
"wall_time_s", "final": {metric: value}, "error": str | None}; ``final`` holds the last
evaluation metrics and the last training metrics of the run.

A process runs a run only while it holds the lock of its directory (``flock`` on ``.lock``,
released by the operating system when the process ends, however it ends), so two sweeps started
on the same ``--out`` never write into one run: the second is refused with
:class:`~funcbo.experiments.errors.RunInUseError` and leaves the run to the first.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from funcbo.experiments.errors import DamagedRunError, RunInUseError
from funcbo.io import (
    append_jsonl,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
ERROR = "error.txt"
SWEEP = "sweep.json"
LOCK = ".lock"

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunDir:
    """Files of one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def error_path(self) -> Path:
        return self.path / ERROR

    def summary(self) -> dict[str, Any] | None:
        """The run's summary, or None if it has none yet.

        Raises:
            DamagedRunError: ``summary.json`` exists but is not a JSON object.
        """
        if not self.summary_path.exists():
            return None
        try:
            data = json.loads(self.summary_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DamagedRunError(f"{self.summary_path} is damaged (not valid JSON: {e})") from e
        if not isinstance(data, dict):
            raise DamagedRunError(
                f"{self.summary_path} is damaged (a {type(data).__name__}, not a JSON object)"
            )
        return data

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    def write_config(self, text: str) -> None:
        atomic_write_text(self.config_path, text)

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)

    def logged_iteration(self) -> int:
        """The last iteration ``metrics.jsonl`` records (0 when it records none or cannot be
        read)."""
        try:
            rows = self.metrics()
        except (OSError, ValueError):
            return 0
        return max((int(r.get("iteration", 0)) for r in rows), default=0)

    def truncate_metrics(self, last_iteration: int) -> None:
        """Keep only lines up to ``last_iteration`` (a resumed run redoes the rest)."""
        kept = [r for r in self.metrics() if int(r.get("iteration", 0)) <= last_iteration]
        atomic_write_text(
            self.metrics_path,
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept),
        )

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(state, self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint (loaded with ``weights_only=True``), or None.

        Raises:
            DamagedRunError: the checkpoint exists but cannot be loaded (truncated, corrupted,
                or holding objects other than tensors and plain data).
        """
        if not self.checkpoint_path.exists():
            return None
        try:
            state = torch.load(self.checkpoint_path, weights_only=True, map_location="cpu")
        except Exception as e:
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DamagedRunError(
                f"{self.checkpoint_path} is damaged ({type(e).__name__}: {cause[:200]})"
            ) from e
        if not isinstance(state, dict):
            raise DamagedRunError(
                f"{self.checkpoint_path} is damaged (a {type(state).__name__}, not a dict)"
            )
        return state

    def write_error(self, text: str) -> None:
        atomic_write_text(self.error_path, text)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's lock for the duration of the ``with`` block (creating the directory).

        Raises:
            RunInUseError: another process holds it (is running this run).
        """
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = lock.read_text(errors="replace").strip() or "another process"
                raise RunInUseError(
                    f"{self.path} is being run by {holder}; wait for it to end (or stop it) "
                    "before running, restarting or overwriting this run"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
            yield
        finally:
            os.close(fd)  # releases the lock

    def clear(self) -> None:
        """Remove every file of the run (a fresh start), keeping its lock."""
        if not self.path.exists():
            return
        for p in self.path.iterdir():
            if p.name == LOCK:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def find_runs(root: str | Path) -> list[RunDir]:
    """Every run directory (one holding a summary.json) under ``root``, sorted."""
    root = Path(root)
    return [RunDir(p.parent) for p in sorted(root.rglob(SUMMARY))]


__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "ERROR",
    "LOCK",
    "METRICS",
    "SUMMARY",
    "SWEEP",
    "RunDir",
    "find_runs",
]
