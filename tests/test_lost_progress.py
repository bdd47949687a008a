"""An interrupted run whose checkpoint is gone starts afresh, and says so: nothing of its logged
progress is discarded silently."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from test_run_lock import RL, TINY

import funcbo.cli  # noqa: F401 - registers the built-in experiments
from funcbo.experiments.batch import execute_batch
from funcbo.experiments.config import load_config_dict, plan_runs
from funcbo.experiments.errors import LostProgressWarning
from funcbo.experiments.runner import execute_run
from funcbo.experiments.store import RunDir


def _runs(data: dict) -> list:
    return plan_runs(load_config_dict(json.loads(json.dumps(data)), src="test"))


def _interrupt(rd: RunDir, keep_checkpoint: bool, status: str = "running") -> None:
    """Make a finished run look interrupted (status 'running') or failed, with or without its
    checkpoint."""
    summary = rd.summary()
    assert summary is not None
    rd.write_summary({**summary, "status": status, "final": {}})
    if not keep_checkpoint:
        rd.checkpoint_path.unlink()


def _iterations(rd: RunDir) -> list[int]:
    return [int(r["iteration"]) for r in rd.metrics()]


def test_a_run_without_its_checkpoint_warns_and_starts_afresh(tmp_path: Path) -> None:
    run = _runs(TINY)[0]
    rd = RunDir(tmp_path / run.run_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LostProgressWarning)  # a fresh run does not warn
        first = execute_run(run, tmp_path)
    logged = _iterations(rd)
    assert logged[-1] == 4
    _interrupt(rd, keep_checkpoint=False)
    with pytest.warns(LostProgressWarning, match=rf"{run.run_id} had logged iteration 4 .*afresh"):
        again = execute_run(run, tmp_path)
    assert again["status"] == "finished"
    assert _iterations(rd) == logged  # rerun from 0, nothing appended twice
    key = first["metric"]
    assert again["final"][key] == pytest.approx(first["final"][key], rel=1e-12)


def test_a_run_with_its_checkpoint_resumes_without_a_warning(tmp_path: Path) -> None:
    run = _runs(TINY)[0]
    rd = RunDir(tmp_path / run.run_id)
    execute_run(run, tmp_path)
    _interrupt(rd, keep_checkpoint=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LostProgressWarning)
        again = execute_run(run, tmp_path)
    assert again["status"] == "finished"


def test_a_failed_run_retried_without_its_checkpoint_does_not_warn(tmp_path: Path) -> None:
    run = _runs(TINY)[0]
    rd = RunDir(tmp_path / run.run_id)
    execute_run(run, tmp_path)
    _interrupt(rd, keep_checkpoint=False, status="failed")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LostProgressWarning)
        again = execute_run(run, tmp_path)
    assert again["status"] == "finished" and _iterations(rd)[0] == 0


def test_a_batch_names_its_runs_without_checkpoints_in_one_warning(tmp_path: Path) -> None:
    runs = _runs(RL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LostProgressWarning)
        execute_batch(runs, tmp_path)
    for run in runs:
        _interrupt(RunDir(tmp_path / run.run_id), keep_checkpoint=False)
    with pytest.warns(LostProgressWarning) as seen:
        res = execute_batch(runs, tmp_path)
    lost = [w for w in seen if issubclass(w.category, LostProgressWarning)]
    assert len(lost) == 1
    msg = str(lost[0].message)
    assert msg.startswith("2 runs (") and "up to 20" in msg and runs[0].run_id in msg
    assert all(s["status"] == "finished" for s in res.values()) and len(res) == 2
