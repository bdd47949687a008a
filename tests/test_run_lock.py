"""A run directory is written by one process at a time: a second sweep on the same --out is
refused run by run and touches nothing of a run another process holds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import funcbo.cli  # noqa: F401 - registers the built-in experiments
from funcbo.cli import main
from funcbo.experiments.batch import execute_batch
from funcbo.experiments.config import load_config_dict, plan_runs
from funcbo.experiments.errors import RunInUseError
from funcbo.experiments.executors import _read_tree, write_returned_run
from funcbo.experiments.runner import RunOptions, execute_run
from funcbo.experiments.store import LOCK, RunDir

pytest.importorskip("fcntl")

TINY = {
    "experiment": "linear_iv",
    "seeds": [0, 1],
    "iterations": 4,
    "eval_every": 2,
    "log_every": 2,
    "checkpoint_every": 2,
    "dtype": "float64",
    "problem": {"n": 100, "width": 8, "batch_size": 32},
    "methods": {
        "lin": {"kind": "funcid_linear", "inner_lr": 3e-3, "inner_steps": 1, "outer_lr": 3e-2},
    },
}

RL = {
    "experiment": "rl_cartpole",
    "seeds": [0, 1],
    "iterations": 20,
    "eval_every": 10,
    "log_every": 10,
    "checkpoint_every": 10,
    "threads": 1,
    "batch_seeds": True,
    "problem": {
        "init_steps": 10,
        "batch_size": 8,
        "buffer_capacity": 100,
        "eval_episodes": 1,
        "max_episode_steps": 20,
    },
    "methods": {"mle": {"kind": "mle"}},
}


def _runs(data: dict) -> list:
    return plan_runs(load_config_dict(json.loads(json.dumps(data)), src="test"))


def test_a_held_run_is_refused_and_left_untouched(tmp_path: Path) -> None:
    run = _runs(TINY)[0]
    rd = RunDir(tmp_path / run.run_id)
    with rd.locked():
        with pytest.raises(RunInUseError, match=f"{rd.path} is being run by process"):
            execute_run(run, tmp_path, RunOptions(log_every=2, checkpoint_every=2))
        assert sorted(p.name for p in rd.path.iterdir()) == [LOCK]  # no summary, no error
    # Once released the run goes ahead; the lock file stays, holding nothing.
    s = execute_run(run, tmp_path, RunOptions(log_every=2, checkpoint_every=2))
    assert s["status"] == "finished"
    with rd.locked():
        pass


def test_a_lock_is_released_when_its_process_is_killed(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "m" / "seed_0")
    code = (
        "import sys, time\n"
        "from funcbo.experiments.store import RunDir\n"
        f"with RunDir({str(rd.path)!r}).locked():\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match=f"process {p.pid} on "):
            with rd.locked():
                pass
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel releases an flock when its holder dies, however it dies
        try:
            with rd.locked():
                break
        except RunInUseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_batch_runs_the_free_runs_and_reports_the_held_one(tmp_path: Path) -> None:
    runs = _runs(RL)
    held = RunDir(tmp_path / runs[1].run_id)
    seen: dict[str, str | None] = {}
    with held.locked():
        res = execute_batch(runs, tmp_path, on_result=lambda r, s, e: seen.__setitem__(r, e))
        assert sorted(p.name for p in held.path.iterdir()) == [LOCK]
    assert list(res) == [runs[0].run_id] and res[runs[0].run_id]["status"] == "finished"
    assert seen[runs[0].run_id] is None
    assert "RunInUseError" in str(seen[runs[1].run_id])
    # The run that finished is not held while its companions run: a second batch skips it.
    with held.locked():
        again = execute_batch(runs[:1], tmp_path)
    assert again[runs[0].run_id]["skipped"] is True


def test_a_second_command_runs_the_others_and_names_the_holder(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    held = RunDir(out / "lin/seed_0")
    with held.locked():
        assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "FAILED lin/seed_0" in x)
    assert "RunInUseError" in line and "is being run by process" in line
    assert "traceback in" not in line and not held.error_path.exists()
    assert RunDir(out / "lin/seed_1").summary()["status"] == "finished"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0  # free: it runs now
    assert held.summary()["status"] == "finished"


def test_restart_of_a_held_run_is_refused(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "seeds": [0]}))
    out = tmp_path / "out"
    common = ["run", str(cfg), "--out", str(out), "--quiet"]
    assert main(common) == 0
    rd = RunDir(out / "lin/seed_0")
    before = rd.metrics_path.read_text()
    with rd.locked():
        assert main([*common, "--restart", "lin/seed_0"]) == 2
    err = capsys.readouterr().err
    assert "is being run by process" in err and rd.metrics_path.read_text() == before
    assert main([*common, "--restart", "lin/seed_0"]) == 0  # free again: restarted


def test_lock_files_do_not_travel_with_returned_runs(tmp_path: Path) -> None:
    src = tmp_path / "remote"
    src.mkdir()
    (src / "summary.json").write_text("{}")
    (src / LOCK).write_text("process 1 on elsewhere\n")
    files = _read_tree(src)
    assert sorted(files) == ["summary.json"]
    dst = tmp_path / "local"
    dst.mkdir()
    (dst / LOCK).write_text("")
    (dst / "old.txt").write_text("stale")
    write_returned_run(dst, files)
    assert sorted(p.name for p in dst.iterdir()) == [LOCK, "summary.json"]
