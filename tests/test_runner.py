"""Sweeps: failure isolation, skipping finished runs, and resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from failing_experiment import NAME as FAILING

import funcbo.cli  # noqa: F401 - registers the built-in experiments
from funcbo.experiments.config import load_config, plan_runs
from funcbo.experiments.runner import RunOptions, execute_run, run_sweep
from funcbo.experiments.store import RunDir, find_runs

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"wall_time_s", "iter_time_s", "time_s", "peak_memory_mb"}

TINY = {
    "experiment": "linear_iv",
    "seeds": [0, 1, 2],
    "iterations": 12,
    "eval_every": 4,
    "log_every": 2,
    "checkpoint_every": 4,
    "dtype": "float64",
    "problem": {"n": 200, "width": 16, "batch_size": 32},
    "methods": {
        "lin": {"kind": "funcid_linear", "inner_lr": 3e-3, "inner_steps": 2, "outer_lr": 3e-2},
    },
}


def _config(tmp_path, data=TINY, name="tiny.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _untimed(d):
    return {k: v for k, v in d.items() if k not in TIMING}


@pytest.mark.parametrize("workers", [1, 2])
def test_failing_run_is_isolated_and_reported(tmp_path, workers):
    data = {**TINY, "experiment": FAILING, "problem": {**TINY["problem"], "fail_seed": 1}}
    cfg = load_config(_config(tmp_path, data))
    out = tmp_path / "out"
    res = run_sweep(plan_runs(cfg), out, workers=workers, progress=False)
    assert sorted(res.finished) == ["lin/seed_0", "lin/seed_2"]
    assert list(res.failed) == ["lin/seed_1"] and "deliberate failure" in res.failed["lin/seed_1"]
    failed = RunDir(out / "lin/seed_1")
    assert failed.summary()["status"] == "failed"
    tb = failed.error_path.read_text()
    assert "Traceback" in tb and "DeliberateFailure" in tb
    for seed in (0, 2):
        s = RunDir(out / f"lin/seed_{seed}").summary()
        assert s["status"] == "finished" and s["final"]["beta_error"] < 1.0
    # A second invocation skips finished runs and retries the failed one.
    again = run_sweep(plan_runs(cfg), out, workers=workers, progress=False)
    assert sorted(again.skipped) == ["lin/seed_0", "lin/seed_2"] and list(again.failed) == [
        "lin/seed_1"
    ]


def test_run_store_files(tmp_path):
    cfg = load_config(_config(tmp_path))
    run = plan_runs(cfg, seeds=[0])[0]
    s = execute_run(run, tmp_path / "out", RunOptions(log_every=2, checkpoint_every=4))
    rd = RunDir(tmp_path / "out" / "lin/seed_0")
    assert rd.checkpoint_path.exists() and s["status"] == "finished"
    lines = rd.metrics()
    assert [r["iteration"] for r in lines] == [0, 2, 4, 6, 8, 10, 12]
    assert all("beta_error" in r for r in lines if r["iteration"] % 4 == 0)
    for key in ("outer_loss", "inner_loss", "adjoint_loss", "grad_norm", "peak_memory_mb"):
        assert key in lines[-1]
    resolved = yaml.safe_load(rd.config_path.read_text())
    assert resolved["run"] == {"method": "lin", "variant": "lin", "seed": 0, "grid_point": {}}
    assert resolved["problem"]["n"] == 200 and list(resolved["methods"]) == ["lin"]
    assert len(find_runs(tmp_path / "out")) == 1


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "funcbo", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    data = {
        **TINY,
        "seeds": [5],
        "iterations": 200,
        "eval_every": 25,
        "log_every": 1,
        "checkpoint_every": 10,
        "methods": {
            "net": {
                "kind": "funcid",
                "inner_lr": 3e-3,
                "inner_steps": 2,
                "outer_lr": 3e-2,
                "adjoint_lr": 3e-3,
                "adjoint_steps": 2,
            },
        },
    }
    path = _config(tmp_path, data)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    p = _cli("run", str(path), "--out", str(ref), "--quiet")
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()

    p = _cli("run", str(path), "--out", str(killed), "--quiet")
    rd = RunDir(killed / "net/seed_5")
    deadline = time.time() + 120
    while not rd.checkpoint_path.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    summary = rd.summary()
    assert summary["status"] == "running", "the run ended before it could be killed"
    interrupted_at = len(rd.metrics())

    p = _cli("run", str(path), "--out", str(killed), "--quiet")
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    a, b = RunDir(ref / "net/seed_5"), rd
    assert 0 < interrupted_at < 201
    assert b.summary()["status"] == "finished"
    # Same final metrics to float tolerance (LAPACK may round the last bit differently).
    assert _untimed(b.summary()["final"]) == pytest.approx(
        _untimed(a.summary()["final"]), rel=1e-10
    )
    la, lb = a.metrics(), b.metrics()
    assert [r["iteration"] for r in lb] == list(range(201))
    for ra, rb in zip(la, lb, strict=True):
        assert _untimed(rb) == pytest.approx(_untimed(ra), rel=1e-10)


def test_cli_config_error_exit_code_and_message(tmp_path):
    path = _config(tmp_path, {**TINY, "problem": {"nn": 3}})
    p = _cli("run", str(path))
    assert p.wait(timeout=120) == 2
    err = p.stderr.read().decode()
    assert "config error" in err and "unknown key 'problem.nn'" in err and str(path) in err


def test_cli_dry_run_lists_runs(tmp_path):
    p = _cli("run", str(_config(tmp_path)), "--dry-run", "--seeds", "3-4", "--methods", "lin")
    assert p.wait(timeout=120) == 0
    assert p.stdout.read().decode().split() == ["lin/seed_3", "lin/seed_4"]


def test_sweep_file_names_the_sweep(tmp_path):
    cfg = load_config(_config(tmp_path))
    run_sweep(plan_runs(cfg, seeds=[0]), tmp_path / "o", progress=False)
    sweep = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert sweep["name"] == "tiny" and sweep["experiment"] == "linear_iv"


def test_tensorboard_event_files_when_enabled(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = load_config(_config(tmp_path, {**TINY, "tensorboard": True}))
    run_sweep(plan_runs(cfg, seeds=[0]), tmp_path / "o", progress=False)
    events = list((tmp_path / "o" / "lin/seed_0" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_cli_run_then_report_on_a_tiny_sweep(tmp_path, capsys):
    from funcbo.cli import main

    path = _config(tmp_path, {**TINY, "seeds": [0, 1]})
    out = tmp_path / "sweep"
    assert main(["run", str(path), "--out", str(out), "--workers", "2", "--quiet"]) == 0
    summary = tmp_path / "summary.md"
    summary.write_text("## Summary\n\nThe linear IV sweep.\n")
    assert main(["report", str(out), "--preamble", str(summary)]) == 0
    printed = capsys.readouterr().out
    assert "| **lin** | 2 |" in printed and "beta_error" in printed  # the only variant: best
    assert "The linear IV sweep." in (out / "tiny.md").read_text()
    capsys.readouterr()
    assert main(["report", str(out), "--preamble", str(tmp_path / "missing.md")]) == 2
    assert "cannot read --preamble" in capsys.readouterr().err
    for name in (
        "tiny.md",
        "tiny.json",
        "tiny_box.png",
        "tiny_box.svg",
        "tiny_curves.png",
        "tiny_curves.svg",
    ):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "tiny.json").read_text())
    assert report["methods"]["lin"]["beta_error"]["n"] == 2
