"""Batched sweeps (``batch_seeds``): run directories, independence, resume, failure isolation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import funcbo.cli  # noqa: F401 - registers the experiments lazily
from funcbo.experiments.batch import execute_batch, plan_jobs
from funcbo.experiments.config import ConfigError, load_config_dict, plan_runs
from funcbo.experiments.runner import RunOptions, run_sweep

CONFIG = {
    "experiment": "rl_cartpole",
    "name": "tiny_batch",
    "seeds": [0, 1, 2],
    "iterations": 60,
    "eval_every": 30,
    "log_every": 10,
    "checkpoint_every": 20,
    "threads": 1,
    "batch_seeds": True,
    "problem": {
        "init_steps": 20,
        "batch_size": 8,
        "buffer_capacity": 1000,
        "eval_episodes": 2,
        "max_episode_steps": 40,
    },
    "grid": {"methods.*.inner_lr": [3.0e-4, 3.0e-3]},
    "methods": {"omd": {"kind": "omd"}, "mle": {"kind": "mle"}},
}


def _cfg(**changes: object) -> object:
    d = json.loads(json.dumps(CONFIG))
    d.update(changes)
    return load_config_dict(d, src="test")


def _final(out: Path, run_id: str) -> dict[str, float]:
    return json.loads((out / run_id / "summary.json").read_text())["final"]


def _lines(out: Path, run_id: str) -> list[dict[str, float]]:
    return [json.loads(x) for x in (out / run_id / "metrics.jsonl").read_text().splitlines()]


def test_jobs_group_seeds_and_grid_points_of_a_method() -> None:
    runs = plan_runs(_cfg())
    jobs = plan_jobs(runs)
    assert sorted(len(j) for j in jobs) == [6, 6]  # 3 seeds × 2 learning rates, per method
    assert {r.method for r in jobs[0]} in ({"omd"}, {"mle"})
    assert [len(j) for j in plan_jobs(plan_runs(_cfg(batch_seeds=False)))] == [1] * 12


def test_batch_max_runs_splits_a_method_seed_major() -> None:
    jobs = plan_jobs(plan_runs(_cfg(batch_max_runs=4)))
    assert [len(j) for j in jobs] == [4, 2, 4, 2]
    for job in jobs:
        assert len({r.method for r in job}) == 1
    lr = "methods.*.inner_lr"
    assert [(r.seed, r.point[lr]) for r in jobs[0]] == [
        (0, 3.0e-4), (0, 3.0e-3), (1, 3.0e-4), (1, 3.0e-3)
    ]  # fmt: skip
    assert [(r.seed, r.point[lr]) for r in jobs[1]] == [(2, 3.0e-4), (2, 3.0e-3)]
    assert [len(j) for j in plan_jobs(plan_runs(_cfg(batch_max_runs=6)))] == [6, 6]
    with pytest.raises(ConfigError, match="batch_max_runs: must be ≥ 1"):
        _cfg(batch_max_runs=0)


def test_batch_max_runs_splits_only_the_runs_still_to_do(tmp_path: Path) -> None:
    """Finished runs are served apart, so each batch of at most N holds N runs to do."""
    runs = plan_runs(_cfg(batch_max_runs=4))
    for r in runs:
        if r.seed == 0 or (r.seed == 1 and r.method == "omd"):
            d = tmp_path / r.run_id
            d.mkdir(parents=True)
            status = "finished" if r.seed == 0 else "running"
            (d / "summary.json").write_text(json.dumps({"status": status}))
    jobs = plan_jobs(runs, tmp_path)
    assert [len(j) for j in jobs] == [2, 4, 2, 4]
    assert [{r.seed for r in j} for j in jobs] == [{0}, {1, 2}, {0}, {1, 2}]
    assert [len(j) for j in plan_jobs(runs)] == [4, 2, 4, 2]  # without out: as before


def test_batch_max_runs_is_how_runs_execute_not_what_they_compute(tmp_path: Path) -> None:
    """Split into batches of 4 and 2, each run gives what it gives in the batch of six; a sweep
    with another split serves the finished runs instead of calling them stale."""
    cfg = _cfg(methods={"omd": {"kind": "omd"}}, dtype="float64")
    runs = plan_runs(cfg)
    run_sweep(runs, tmp_path / "all", progress=False)
    split = plan_runs(_cfg(methods={"omd": {"kind": "omd"}}, dtype="float64", batch_max_runs=4))
    res = run_sweep(split, tmp_path / "split", progress=False)
    assert res.ok and len(res.finished) == 6
    sizes = {
        r.run_id: json.loads((tmp_path / "split" / r.run_id / "summary.json").read_text())[
            "batched_runs"
        ]
        for r in split
    }
    assert sorted(sizes.values()) == [2, 2, 4, 4, 4, 4]
    for r in runs:
        a, b = _final(tmp_path / "all", r.run_id), _final(tmp_path / "split", r.run_id)
        for k in ("outer_loss", "q_loss", "grad_norm", "return"):
            assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), (r.run_id, k)
    again = run_sweep(runs, tmp_path / "split", progress=False)
    assert len(again.skipped) == 6


def test_batched_sweep_writes_ordinary_run_dirs(tmp_path: Path) -> None:
    cfg = _cfg(methods={"omd": {"kind": "omd"}})
    runs = plan_runs(cfg)
    res = run_sweep(runs, tmp_path, progress=False)
    assert res.ok and len(res.finished) == 6
    for run in runs:
        d = tmp_path / run.run_id
        assert (d / "config.yaml").exists() and (d / "checkpoint.pt").exists()
        summary = json.loads((d / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["batched_runs"] == 6
        assert "return" in summary["final"] and "grad_norm" in summary["final"]
        assert yaml.safe_load((d / "config.yaml").read_text())["batch_seeds"] is True
        its = [r["iteration"] for r in _lines(tmp_path, run.run_id)]
        assert its == [0, 10, 20, 30, 40, 50, 60]
    # runs differ (seeds and learning rates), so nothing is shared by mistake
    finals = {r.run_id: _final(tmp_path, r.run_id)["outer_loss"] for r in runs}
    assert len(set(finals.values())) == 6
    # finished runs are skipped by a second sweep
    again = run_sweep(runs, tmp_path, progress=False)
    assert len(again.skipped) == 6


def test_a_run_does_not_depend_on_its_batch_companions(tmp_path: Path) -> None:
    """Seed 1 with lr 3e-3 alone, and inside a batch of six, gives the same metrics."""
    cfg = _cfg(methods={"omd": {"kind": "omd"}}, dtype="float64")
    runs = plan_runs(cfg)
    run_sweep(runs, tmp_path / "all", progress=False)
    target = [r for r in runs if r.seed == 1 and r.point["methods.*.inner_lr"] == 3.0e-3]
    execute_batch(target, tmp_path / "one", RunOptions(10, 20, 1))
    rid = target[0].run_id
    a, b = _lines(tmp_path / "all", rid), _lines(tmp_path / "one", rid)
    keys = ("outer_loss", "q_loss", "grad_norm", "return", "train_return")
    for x, y in zip(a, b, strict=True):
        for k in keys:
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12), (k, x["iteration"])


def test_interrupted_batch_resumes_exactly(tmp_path: Path) -> None:
    cfg = _cfg(methods={"mle": {"kind": "mle"}}, seeds=[0, 1])
    runs = plan_runs(cfg)
    opts = RunOptions(10, 20, 1)
    execute_batch(runs, tmp_path / "ref", opts)

    class Stop(Exception):
        pass

    def stop_at_45(run_id: str, it: int, total: int) -> None:
        if it == 45:
            raise Stop

    out = tmp_path / "cut"
    execute_batch(runs, out, opts, stop_at_45)
    for r in runs:
        assert json.loads((out / r.run_id / "summary.json").read_text())["status"] == "failed"
    execute_batch(runs, out, opts)  # resumes from the checkpoints at iteration 40
    for r in runs:
        ref, got = _final(tmp_path / "ref", r.run_id), _final(out, r.run_id)
        for k in ("outer_loss", "q_loss", "model_loss", "return"):
            assert got[k] == ref[k], k
        its = [x["iteration"] for x in _lines(out, r.run_id)]
        assert its == [0, 10, 20, 30, 40, 50, 60]


def test_a_run_with_nonfinite_metrics_fails_alone(tmp_path: Path, monkeypatch) -> None:
    from funcbo.apps.rl.task import RLBatchTask

    step = RLBatchTask.step

    def poisoned(self: RLBatchTask) -> dict[str, object]:
        out = step(self)
        if self.agent.env_steps >= 30 and "q_loss" in out:
            q = out["q_loss"].clone()  # type: ignore[union-attr]
            q[1] = float("nan")
            out["q_loss"] = q
        return out

    monkeypatch.setattr(RLBatchTask, "step", poisoned)
    runs = plan_runs(_cfg(methods={"omd": {"kind": "omd"}}, seeds=[0, 1, 2], grid={}))
    res = run_sweep(runs, tmp_path, progress=False)
    assert list(res.failed) == [runs[1].run_id]
    assert "non-finite q_loss at iteration 30" in res.failed[runs[1].run_id]
    assert (tmp_path / runs[1].run_id / "error.txt").exists()
    assert sorted(res.finished) == sorted([runs[0].run_id, runs[2].run_id])


def test_unbatched_checkpoint_is_not_continued_in_a_batch(tmp_path: Path) -> None:
    cfg = _cfg(methods={"omd": {"kind": "omd"}}, seeds=[0], grid={})
    runs = plan_runs(cfg)
    d = tmp_path / runs[0].run_id
    d.mkdir(parents=True)
    torch.save({"task": {}, "iteration": 20}, d / "checkpoint.pt")
    res = execute_batch(
        runs + plan_runs(_cfg(methods={"omd": {"kind": "omd"}}, seeds=[1], grid={})), tmp_path
    )
    assert runs[0].run_id not in res
    assert "unbatched" in (d / "error.txt").read_text()


def test_progress_line_names_a_batch_once() -> None:
    from funcbo.experiments.runner import _active_runs

    runs = {f"omd/seed_{k}": (2200 + (k == 3), 200000) for k in range(30)}
    runs["mle/seed_0"] = (50, 200000)
    runs["dfiv/seed_0"] = (7, 100)
    assert _active_runs(runs) == (
        "30 runs at 2200–2201/200000 (omd/seed_0 … omd/seed_29), mle/seed_0 50/200000, "
        "dfiv/seed_0 7/100"
    )
