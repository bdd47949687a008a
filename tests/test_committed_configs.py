"""Every committed config and every committed run config still loads, and the committed sweeps'
runs are not stale against their sweep configs (a continued sweep reuses them)."""

import json
from pathlib import Path

import pytest
import yaml

import funcbo.cli  # noqa: F401 - registers the built-in experiments
from funcbo.experiments.config import load_config, load_config_dict, plan_runs
from funcbo.experiments.runner import config_differences, prepare_run_dirs
from funcbo.experiments.store import RunDir
from funcbo.experiments.task import get_experiment

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SWEEPS = sorted(p.parent for p in (ROOT / "results").glob("*/sweep.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_committed_config_loads_and_round_trips(path):
    cfg = load_config(path)
    again = load_config_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())), src=str(path))
    assert again.to_dict() == cfg.to_dict()
    assert plan_runs(cfg)


@pytest.mark.parametrize("out", SWEEPS, ids=lambda p: p.name)
def test_committed_runs_are_not_stale(out):
    """Plan the sweep from its config (``configs/<name>.yaml``) with every seed its run
    directories hold: every run directory is a planned run whose config.yaml agrees with it."""
    cfg = load_config(ROOT / "configs" / f"{out.name}.yaml")
    run_dirs = {p.parent.relative_to(out).as_posix() for p in out.glob("*/seed_*/config.yaml")}
    run_dirs |= {p.parent.relative_to(out).as_posix() for p in out.glob("seed_*/config.yaml")}
    assert run_dirs, out
    seeds = sorted(set(cfg.seeds) | {int(r.rsplit("seed_", 1)[1]) for r in run_dirs})
    runs = {r.run_id: r for r in plan_runs(cfg, seeds=seeds)}
    assert run_dirs <= set(runs), sorted(run_dirs - set(runs))
    stale = {
        rid: diff
        for rid in sorted(run_dirs)
        if (diff := config_differences(runs[rid], RunDir(out / rid)))
    }
    assert not stale, stale
    # the runner's own check, as `funcbo run` makes it before continuing the sweep
    assert prepare_run_dirs([runs[r] for r in sorted(run_dirs)], out) == []
    # the check is not vacuous: a changed method setting is a difference
    rid = sorted(run_dirs)[0]
    method = runs[rid].method
    entry = cfg.to_dict()["methods"][method]
    gridded = {k.split(".")[-1] for k in cfg.grid if k.startswith("methods.")}
    key = next(k for k, v in entry.items() if isinstance(v, float) and k not in gridded)
    changed = load_config(
        ROOT / "configs" / f"{out.name}.yaml", [f"methods.{method}.{key}={entry[key] * 3 + 1}"]
    )
    other = {r.run_id: r for r in plan_runs(changed, seeds=seeds)}[rid]
    assert f"methods.{method}.{key}" in config_differences(other, RunDir(out / rid))


@pytest.mark.parametrize(
    "path", sorted((ROOT / "docs" / "results").glob("*.json")), ids=lambda p: p.name
)
def test_committed_reports_load(path):
    report = json.loads(path.read_text())
    get_experiment(report["experiment"])
    assert report["methods"]
