"""Executors: a sweep on a local Ray cluster (2 CPUs, started here) gives the local executor's
results, isolates a failing run, survives a SIGKILL of its driver, and stops on Ctrl-C; the
command's executor options; Ray stays an optional, lazily imported extra."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from failing_experiment import NAME as FAILING

import funcbo.cli  # noqa: F401 - registers the built-in experiments
from funcbo.cli import main
from funcbo.experiments import runner
from funcbo.experiments.config import ConfigError, load_config, plan_runs
from funcbo.experiments.errors import ExperimentError
from funcbo.experiments.executors import LocalExecutor, RayExecutor, write_returned_run
from funcbo.experiments.runner import run_sweep
from funcbo.experiments.store import RunDir

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
#: values that measure the machine, not the computation
TIMING = {"wall_time_s", "iter_time_s", "time_s", "peak_memory_mb"}

TINY = {
    "experiment": "linear_iv",
    "seeds": [0, 1, 2, 3],
    "iterations": 12,
    "eval_every": 4,
    "log_every": 2,
    "checkpoint_every": 4,
    "dtype": "float64",
    "threads": 1,
    "problem": {"n": 200, "width": 16, "batch_size": 32},
    "methods": {
        "lin": {"kind": "funcid_linear", "inner_lr": 3e-3, "inner_steps": 2, "outer_lr": 3e-2},
    },
}


def _config(tmp_path, data, name="tiny.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _final_bytes(rd: RunDir) -> str:
    """The summary's final metrics as the bytes JSON stores them, machine timings aside."""
    final = json.loads(rd.summary_path.read_text())["final"]
    return json.dumps({k: v for k, v in final.items() if k not in TIMING}, sort_keys=True)


def _untimed_metrics(rd: RunDir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rd.metrics()]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for this module's tests; yields its address."""
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed (pip install 'funcbo[ray]'): Ray executor untested"
    )
    # the workers import failing_experiment, a module of this folder, by name
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    ctx = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The tiny sweep on the local executor (in this process, one thread per run)."""
    tmp = tmp_path_factory.mktemp("local")
    cfg = load_config(_config(tmp, TINY))
    res = run_sweep(plan_runs(cfg), tmp / "out", progress=False, executor=LocalExecutor(1))
    assert res.ok and len(res.finished) == 4
    return tmp / "out"


def test_ray_sweep_equals_local_sweep_byte_for_byte(ray_cluster, local_reference, tmp_path):
    cfg = load_config(_config(tmp_path, TINY))
    out = tmp_path / "out"
    res = run_sweep(plan_runs(cfg), out, progress=False, executor=RayExecutor(ray_cluster))
    assert res.ok and sorted(res.finished) == [f"lin/seed_{s}" for s in range(4)]
    for s in range(4):
        a, b = RunDir(local_reference / f"lin/seed_{s}"), RunDir(out / f"lin/seed_{s}")
        assert b.summary()["status"] == "finished"
        assert _final_bytes(b) == _final_bytes(a)
        assert _untimed_metrics(b) == _untimed_metrics(a)
        assert b.config_path.read_bytes() == a.config_path.read_bytes()
    # Run again: every run is skipped without a task.
    again = run_sweep(plan_runs(cfg), out, progress=False, executor=RayExecutor(ray_cluster))
    assert sorted(again.skipped) == sorted(res.finished) and not again.finished


def test_ray_failing_run_is_isolated_results_sent_to_driver(ray_cluster, local_reference, tmp_path):
    data = {
        **TINY,
        "experiment": FAILING,
        "seeds": [0, 1, 2],
        "problem": {**TINY["problem"], "fail_seed": 1},
    }
    cfg = load_config(_config(tmp_path, data))
    out = tmp_path / "out"
    ex = RayExecutor(ray_cluster, results="driver")
    res = run_sweep(plan_runs(cfg), out, progress=False, executor=ex)
    assert sorted(res.finished) == ["lin/seed_0", "lin/seed_2"]
    assert list(res.failed) == ["lin/seed_1"] and "deliberate failure" in res.failed["lin/seed_1"]
    failed = RunDir(out / "lin/seed_1")
    assert failed.summary()["status"] == "failed"
    tb = failed.error_path.read_text()
    assert "Traceback" in tb and "DeliberateFailure" in tb
    for s in (0, 2):  # written here from what the tasks sent back; the same as linear_iv's
        rd = RunDir(out / f"lin/seed_{s}")
        assert rd.checkpoint_path.exists()
        assert _final_bytes(rd) == _final_bytes(RunDir(local_reference / f"lin/seed_{s}"))
    # The failed run is retried (from its checkpoint, sent to the task); the others are skipped.
    again = run_sweep(plan_runs(cfg), out, progress=False, executor=ex)
    assert sorted(again.skipped) == ["lin/seed_0", "lin/seed_2"]
    assert list(again.failed) == ["lin/seed_1"]


def _cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "funcbo", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ray_driver_killed_then_rerun_completes_the_rest(ray_cluster, local_reference, tmp_path):
    data = {**TINY, "iterations": 120, "eval_every": 40, "log_every": 10, "checkpoint_every": 10}
    path = _config(tmp_path, data)
    out = tmp_path / "out"
    cmd = ("run", str(path), "--out", str(out), "--quiet", "--executor", "ray")
    p = _cli(*cmd, "--address", ray_cluster)
    runs = [RunDir(out / f"lin/seed_{s}") for s in range(4)]

    def finished() -> list[RunDir]:
        return [rd for rd in runs if (rd.summary() or {}).get("status") == "finished"]

    deadline = time.time() + 600  # generous: a loaded machine starts Ray tasks slowly
    while not finished() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL, p.stderr.read()
    time.sleep(1.0)  # Ray stops the dead driver's tasks
    done = {rd.path: rd.summary_path.stat().st_mtime_ns for rd in finished()}
    assert 0 < len(done) < 4, "the sweep ended before its driver could be killed"

    p = _cli(*cmd, "--address", ray_cluster)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    err = p.stderr.read()
    counts = re.search(r"(\d+) finished, (\d+) already done, 0 failed", err)
    assert counts, err
    assert int(counts.group(2)) == len(done) and int(counts.group(1)) == 4 - len(done)
    for rd in runs:
        assert rd.summary()["status"] == "finished"
        assert [r["iteration"] for r in rd.metrics()] == list(range(0, 121, 10))
    for path, mtime in done.items():  # not redone
        assert RunDir(path).summary_path.stat().st_mtime_ns == mtime


def test_ray_ctrl_c_cancels_outstanding_tasks(ray_cluster, tmp_path, monkeypatch):
    data = {**TINY, "iterations": 20000, "eval_every": 1000, "log_every": 20}
    cfg = load_config(_config(tmp_path, data))
    out = tmp_path / "out"
    seen = []

    def interrupt(self, run_id, it, total):  # Ctrl-C once a run has made progress
        seen.append(run_id)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner._Progress, "progress", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan_runs(cfg), out, progress=False, executor=RayExecutor(ray_cluster))
    assert seen
    time.sleep(1.0)
    sizes = {p: p.stat().st_size for p in out.rglob("metrics.jsonl")}
    time.sleep(1.5)
    assert sizes and all(p.stat().st_size == n for p, n in sizes.items()), "tasks still running"
    for p in out.rglob("summary.json"):  # stopped where they were: resumable
        assert json.loads(p.read_text())["status"] == "running"


# ------------------------------------------------------------------ without a cluster
def test_returned_run_directory_replaces_the_old_one(tmp_path):
    rd = tmp_path / "run"
    (rd / "tensorboard").mkdir(parents=True)
    (rd / "error.txt").write_text("old failure")
    (rd / "tensorboard" / "old").write_text("x")
    write_returned_run(rd, {"summary.json": b"{}", "metrics.jsonl": b"", "tensorboard/ev": b"1"})
    files = sorted(p.relative_to(rd).as_posix() for p in rd.rglob("*") if p.is_file())
    assert files == ["metrics.jsonl", "summary.json", "tensorboard/ev"]


def test_resources_section_is_validated(tmp_path):
    cfg = load_config(_config(tmp_path, {**TINY, "resources": {"cpus": 2, "gpus": 0.5}}))
    assert cfg.resources.cpus == 2.0 and cfg.resources.gpus == 0.5
    with pytest.raises(
        ConfigError, match=r"unknown key 'resources.cpu' \(did you mean 'resources.cpus'"
    ):
        load_config(_config(tmp_path, {**TINY, "resources": {"cpu": 2}}))
    with pytest.raises(ConfigError, match=r"resources.cpus: must be > 0"):
        load_config(_config(tmp_path, {**TINY, "resources": {"cpus": 0}}))
    with pytest.raises(ConfigError, match=r"resources.gpus: expected a number"):
        load_config(_config(tmp_path, {**TINY, "resources": {"gpus": "one"}}))


def test_resources_do_not_make_a_finished_run_stale(tmp_path, capsys):
    path = _config(tmp_path, {**TINY, "seeds": [0], "iterations": 4})
    out = str(tmp_path / "out")
    assert main(["run", str(path), "--out", out, "--quiet"]) == 0
    rc = main(["run", str(path), "--out", out, "--quiet", "--set", "resources.cpus=4"])
    assert rc == 0 and "0 finished, 1 already done" in capsys.readouterr().err


def test_ray_runs_on_cuda_must_ask_for_gpus(tmp_path):
    cfg = load_config(_config(tmp_path, {**TINY, "device": "cuda"}))
    with pytest.raises(ExperimentError, match=r"device 'cuda' on Ray needs resources.gpus > 0"):
        RayExecutor().run(plan_runs(cfg), tmp_path / "out", runner.RunOptions(), None)


@pytest.mark.parametrize(
    "args, cause",
    [
        (["--address", "auto"], "--address needs --executor ray"),
        (["--ray-results", "driver"], "--ray-results needs --executor ray"),
        (["--executor", "ray", "--workers", "2"], "--workers: with --executor ray"),
    ],
)
def test_executor_options_belong_to_their_executor(tmp_path, capsys, args, cause, monkeypatch):
    import funcbo.experiments.executors as executors

    monkeypatch.setattr(executors, "ray_available", lambda: True)
    assert main(["run", str(_config(tmp_path, TINY)), "--dry-run", *args]) == 2
    assert cause in capsys.readouterr().err


def test_ray_executor_without_ray_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import funcbo.experiments.executors as executors

    monkeypatch.setattr(executors, "ray_available", lambda: False)
    assert main(["run", str(_config(tmp_path, TINY)), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert "error: --executor ray needs Ray" in err and "funcbo[ray]" in err
    assert not (tmp_path / "runs").exists()


def test_ray_is_imported_only_when_a_sweep_runs_on_it():
    code = (
        "import sys, funcbo, funcbo.cli, funcbo.experiments.executors\n"
        "try:\n"
        "    funcbo.cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('ray' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip().splitlines()[-1] == "False"
