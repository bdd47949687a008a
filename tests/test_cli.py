"""The funcbo command: user errors exit 2 with one line naming the cause; finished runs are
reused only when their config is the one requested; damaged run files are named."""

import json

import pytest
import yaml

from funcbo.cli import main
from funcbo.experiments.store import RunDir

TINY = {
    "experiment": "linear_iv",
    "seeds": [0],
    "iterations": 4,
    "eval_every": 2,
    "log_every": 2,
    "checkpoint_every": 2,
    "dtype": "float64",
    "problem": {"n": 100, "width": 8, "batch_size": 32},
    "methods": {
        "lin": {"kind": "funcid_linear", "inner_lr": 3e-3, "inner_steps": 1, "outer_lr": 3e-2},
        "aid": {"kind": "aid", "inner_lr": 3e-3, "inner_steps": 1, "outer_lr": 3e-2},
    },
}


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def _run(capsys, *args):
    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "config error:"))]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(
    "seeds, cause",
    [
        ("0-x", "'0-x' is not a seed"),
        ("abc", "'abc' is not a seed"),
        ("0..3", "'0..3' is not a seed"),
        ("0 1 2", "'0 1 2' is not a seed"),
        ("5-2", "empty seed range"),
        ("-1", "'-1' is not a seed"),
        (",", "an empty part"),
        ("0,0", "seed 0 given more than once"),
    ],
)
def test_bad_seeds_exit_2_with_one_line(capsys, config, seeds, cause):
    rc, err = _run(capsys, "run", str(config), "--seeds", seeds, "--dry-run")
    assert rc == 2
    line = _one_error_line(err)
    assert line.startswith("error: --seeds") and cause in line


@pytest.mark.parametrize(
    "methods, cause",
    [("aid,aid", "aid named more than once"), (",", "names nothing"), ("aidd", "did you mean")],
)
def test_bad_methods_exit_2_with_one_line(capsys, config, methods, cause):
    rc, err = _run(capsys, "run", str(config), "--methods", methods, "--dry-run")
    assert rc == 2 and cause in _one_error_line(err)


def test_set_on_an_undefined_method_exits_2(capsys, config):
    rc, err = _run(capsys, "run", str(config), "--set", "methods.linn.inner_lr=1e-3", "--dry-run")
    assert rc == 2 and "did you mean 'methods.lin'" in _one_error_line(err)


def test_dry_run_counts_runs_in_the_singular_and_plural(capsys, config):
    rc, err = _run(capsys, "run", str(config), "--methods", "lin", "--dry-run")
    assert rc == 0 and "tiny: 1 run (linear_iv)" in err
    rc, err = _run(capsys, "run", str(config), "--dry-run")
    assert rc == 0 and "tiny: 2 runs (linear_iv)" in err


@pytest.mark.parametrize("what", ["missing", "empty", "file"])
def test_report_on_a_bad_path_exits_2_with_one_line(capsys, tmp_path, what):
    path = tmp_path / what
    if what == "empty":
        path.mkdir()
    elif what == "file":
        path.write_text("not a sweep")
    rc, err = _run(capsys, "report", str(path))
    line = _one_error_line(err)
    assert rc == 2 and str(path) in line
    expected = {"missing": "no such directory", "empty": "no run directories", "file": "not a dir"}
    assert expected[what] in line


def test_changed_config_does_not_reuse_finished_runs(capsys, tmp_path, config):
    out = tmp_path / "out"
    common = ("run", str(config), "--methods", "lin", "--out", str(out), "--quiet")
    assert _run(capsys, *common)[0] == 0
    rd = RunDir(out / "lin/seed_0")
    before = rd.config_path.read_text()

    rc, err = _run(capsys, *common, "--set", "iterations=6", "--set", "problem.n=120")
    line = _one_error_line(err)
    assert rc == 2 and "differing keys: iterations, problem.n" in line
    assert "--overwrite" in line and "--out" in line
    assert rd.config_path.read_text() == before and rd.summary()["iteration"] == 4

    # A field added since the run was made, at its default value, is no difference.
    stored = yaml.safe_load(before)
    assert stored["methods"]["lin"].pop("ridge_relative") is True
    rd.write_config(yaml.safe_dump(stored))
    rc, err = _run(capsys, *common)
    assert rc == 0 and "1 already done" in err
    # How a run is executed (threads, checkpoints) is not what it computes: reused.
    rc, err = _run(capsys, *common, "--set", "threads=1", "--set", "checkpoint_every=3")
    assert rc == 0 and "1 already done" in err

    rc, err = _run(capsys, *common, "--set", "iterations=6", "--overwrite")
    assert rc == 0 and "1 finished" in err
    assert yaml.safe_load(rd.config_path.read_text())["iterations"] == 6
    assert rd.summary()["iteration"] == 6
    rc, err = _run(capsys, *common, "--set", "iterations=6")
    assert rc == 0 and "1 already done" in err


def test_damaged_checkpoint_is_named_with_how_to_restart(capsys, tmp_path, config):
    out = tmp_path / "out"
    common = ("run", str(config), "--methods", "lin", "--out", str(out), "--quiet")
    assert _run(capsys, *common)[0] == 0
    rd = RunDir(out / "lin/seed_0")
    # An interrupted run whose last checkpoint was damaged on disk.
    rd.write_summary({**rd.summary(), "status": "running", "iteration": 2})
    rd.checkpoint_path.write_bytes(b"\x00 not a checkpoint")
    rc, err = _run(capsys, *common)
    assert rc == 1
    assert f"{rd.checkpoint_path} is damaged" in err and "--restart lin/seed_0" in err
    assert rd.error_path.exists() and "damaged" in rd.error_path.read_text()
    assert _run(capsys, *common)[0] == 1  # it fails the same way until restarted

    rc, err = _run(capsys, *common, "--restart", "lin/seed_0")
    assert rc == 0 and "1 finished" in err and rd.summary()["status"] == "finished"
    assert not rd.error_path.exists()
    rc, err = _run(capsys, *common, "--restart", "nope/seed_0")
    assert rc == 2 and "not a run of this sweep" in _one_error_line(err)


def test_damaged_summary_is_named_as_such(capsys, tmp_path, config):
    out = tmp_path / "out"
    common = ("run", str(config), "--methods", "lin", "--out", str(out), "--quiet")
    assert _run(capsys, *common)[0] == 0
    rd = RunDir(out / "lin/seed_0")
    final = rd.summary()["final"]
    rd.summary_path.write_text('{"status": "fini')
    rc, err = _run(capsys, *common)
    assert rc == 1 and f"{rd.summary_path} is damaged" in err
    assert rd.error_path.exists()  # the message points at it: it is written
    assert json.loads(rd.summary_path.read_text())["status"] == "failed"
    # The next attempt resumes from the final checkpoint and ends with the same metrics.
    rc, err = _run(capsys, *common)
    assert rc == 0 and rd.summary()["status"] == "finished"
    assert rd.summary()["final"]["beta_error"] == pytest.approx(final["beta_error"], rel=1e-12)


def test_the_command_starts_without_importing_torch():
    # `funcbo --help` and argument errors answer at once; torch loads when a run is built
    import subprocess
    import sys

    code = "import sys, funcbo.cli; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "False"


def test_demo_replaces_runs_left_by_another_demo_config(capsys, tmp_path, monkeypatch):
    import funcbo.cli

    root = tmp_path / "checkout"
    (root / "configs").mkdir(parents=True)
    demo = {**TINY, "name": "demo", "methods": {"lin": TINY["methods"]["lin"]}}
    (root / "configs" / "demo.yaml").write_text(yaml.safe_dump(demo))
    monkeypatch.setattr(funcbo.cli, "repo_root", lambda: root)
    out = tmp_path / "demo_out"
    assert _run(capsys, "demo", "--out", str(out), "--workers", "1", "--quiet")[0] == 0
    (root / "configs" / "demo.yaml").write_text(yaml.safe_dump({**demo, "iterations": 6}))
    rc, err = _run(capsys, "demo", "--out", str(out), "--workers", "1", "--quiet")
    assert rc == 0 and "replaced 1 run made with another config" in err
    assert RunDir(out / "lin/seed_0").summary()["iteration"] == 6
