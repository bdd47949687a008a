"""Tests of funcbo.experiments.report on synthetic run directories (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from funcbo.experiments.report import (
    STAT_KEYS,
    _aligned,
    _Run,
    area_under_curve,
    describe,
    make_report,
)
from funcbo.experiments.store import RunDir

# final test_mse per seed; the failed run's value must never reach the statistics
FINALS = {"aid": [1.0, 2.0, 4.0], "funcid": [0.5, 0.7, 0.6]}
WALL = {"aid": [10.0, 20.0, 40.0], "funcid": [5.0, 5.0, 10.0]}
ITERATIONS = 10


def write_run(
    root: Path,
    variant: str,
    seed: int,
    *,
    status: str = "finished",
    final: dict[str, float] | None = None,
    wall: float = 1.0,
    log_every: int = 1,
    experiment: str = "toy",
    mode: str = "min",
    error: str | None = None,
) -> RunDir:
    """A run directory as the runner writes it: metrics.jsonl and summary.json."""
    run = RunDir(root / variant.replace("[", "__").replace("]", "") / f"seed_{seed}")
    final = dict(final or {})
    for it in range(0, ITERATIONS + 1):
        if it % log_every and it % 5:
            continue
        rec: dict[str, Any] = {
            "iteration": it,
            "wall_time_s": wall * it / ITERATIONS,
            "outer_loss": 1.0 / (it + 1) + seed,
            "inner_loss": 2.0 / (it + 1),
            "adjoint_loss": -0.5 + 0.01 * it,
        }
        if it % 5 == 0:  # evaluation points: 10, 4, final
            rec["test_mse"] = {0: 10.0, 5: 4.0}.get(it, final.get("test_mse", 0.0))
        run.append_metrics(rec)
    run.write_summary(
        {
            "status": status,
            "experiment": experiment,
            "name": "toy_sweep",
            "method": variant.split("[")[0],
            "variant": variant,
            "seed": seed,
            "grid_point": {},
            "iterations": ITERATIONS,
            "iteration": ITERATIONS if status == "finished" else 4,
            "metric": "test_mse",
            "metric_mode": mode,
            "wall_time_s": wall,
            "final": final,
            "error": error,
        }
    )
    return run


def write_sweep(root: Path, mode: str = "min", sweep: bool = True) -> Path:
    """Two variants × three seeds, one failed run (funcid) and one still running (aid)."""
    for variant, finals in FINALS.items():
        for seed, value in enumerate(finals):
            final = {"test_mse": value, "outer_loss": 0.1 * (seed + 1), "inner_loss": 0.01}
            # aid's third seed logs every other iteration only
            log_every = 2 if (variant, seed) == ("aid", 2) else 1
            write_run(
                root,
                variant,
                seed,
                final=final,
                wall=WALL[variant][seed],
                log_every=log_every,
                mode=mode,
            )
    write_run(
        root,
        "funcid",
        3,
        status="failed",
        final={"test_mse": 100.0},
        wall=3.0,
        mode=mode,
        error="Traceback (most recent call last):\nRuntimeError: diverged",
    )
    write_run(root, "aid", 3, status="running", final={}, wall=1.0, mode=mode)
    if sweep:
        (root / "sweep.json").write_text(json.dumps({"name": "toy_sweep", "experiment": "toy"}))
    return root


def expected_auc(final: float) -> float:
    # trapezoid over (0, 10), (5, 4), (10, final), divided by the span 10
    return ((10.0 + 4.0) / 2 * 5 + (4.0 + final) / 2 * 5) / 10


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    root = write_sweep(tmp_path_factory.mktemp("sweep"))
    return make_report(root)


# ---------------------------------------------------------------------------- statistics
def test_describe_by_hand():
    s = describe([4.0, 1.0, 2.0])
    assert s["n"] == 3
    assert s["median"] == pytest.approx(2.0)
    assert s["q25"] == pytest.approx(1.5)  # linear interpolation between order statistics
    assert s["q75"] == pytest.approx(3.0)
    assert s["mean"] == pytest.approx(7 / 3)
    assert s["sd"] == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )
    assert describe([3.0]) == {
        "n": 1,
        "median": 3.0,
        "q25": 3.0,
        "q75": 3.0,
        "mean": 3.0,
        "sd": 0.0,
    }
    assert describe([]) == dict.fromkeys(STAT_KEYS) | {"n": 0}
    assert describe([1.0, math.nan, math.inf, 3.0])["n"] == 2


def test_area_under_curve_by_hand():
    assert area_under_curve([10, 0, 5], [2.0, 10.0, 4.0]) == pytest.approx(expected_auc(2.0))
    assert area_under_curve([3], [7.0]) == 7.0
    assert math.isnan(area_under_curve([], []))
    assert math.isnan(area_under_curve([0, 1], [1.0, math.nan]))
    # uneven spacing: the integral is weighted by the iteration gaps
    assert area_under_curve([0, 1, 4], [0.0, 1.0, 1.0]) == pytest.approx((0.5 + 3.0) / 4)


def test_final_metric_statistics(report):
    methods = report.data["methods"]
    aid, funcid = methods["aid"]["test_mse"], methods["funcid"]["test_mse"]
    assert aid == pytest.approx(
        {"n": 3, "median": 2.0, "q25": 1.5, "q75": 3.0, "mean": 7 / 3, "sd": math.sqrt(7 / 3)}
    )
    # the failed run (final test_mse 100) is counted but left out of the statistics
    assert funcid == pytest.approx(
        {"n": 3, "median": 0.6, "q25": 0.55, "q75": 0.65, "mean": 0.6, "sd": 0.1}
    )
    assert methods["aid"]["outer_loss"]["median"] == pytest.approx(0.2)
    assert methods["funcid"]["inner_loss"]["sd"] == 0.0
    assert list(methods["aid"]) == ["test_mse", "outer_loss", "inner_loss"]


def test_wall_time_rate_and_auc(report):
    d = report.data
    assert d["wall_time_s"]["aid"]["median"] == pytest.approx(20.0)
    assert d["wall_time_s"]["aid"]["mean"] == pytest.approx(70 / 3)
    assert d["wall_time_s"]["funcid"]["n"] == 3  # the failed run's 3 s are not in it
    rates = [ITERATIONS / w for w in WALL["funcid"]]
    assert d["iterations_per_s"]["funcid"] == pytest.approx(describe(rates))
    for v, finals in FINALS.items():
        assert d["auc"][v] == pytest.approx(describe([expected_auc(f) for f in finals]))


def test_run_counts(report):
    assert report.data["runs"] == {
        "aid": {"finished": 3, "failed": 0, "running": 1},
        "funcid": {"finished": 3, "failed": 1, "running": 0},
    }


# ---------------------------------------------------------------------------- files
def test_json_schema(report):
    d = json.loads(report.paths["json"].read_text())
    assert d == report.data
    assert set(d) == {
        "experiment",
        "name",
        "metric",
        "metric_mode",
        "methods",
        "wall_time_s",
        "auc",
        "iterations_per_s",
        "runs",
        "warnings",
    }
    assert (d["experiment"], d["name"], d["metric"], d["metric_mode"]) == (
        "toy",
        "toy_sweep",
        "test_mse",
        "min",
    )
    for key in ("wall_time_s", "auc", "iterations_per_s"):
        assert set(d[key]) == {"aid", "funcid"}
        for stats in d[key].values():
            assert set(stats) == set(STAT_KEYS)
    for metrics in d["methods"].values():
        for stats in metrics.values():
            assert set(stats) == set(STAT_KEYS)
    for counts in d["runs"].values():
        assert set(counts) == {"finished", "failed", "running"}


def test_markdown_table_marks_best(report):
    md = report.markdown
    assert report.paths["markdown"].read_text() == md
    assert report.paths["markdown"].name == "toy_sweep.md"
    assert md.startswith("# toy_sweep (experiment `toy`)")
    assert "8 runs (6 finished, 1 failed, 1 running) in 2 variants" in md
    assert (
        "| variant | n | test_mse median [q25, q75] | mean ± sd | AUC | wall time (s) | it/s |"
        in md
    )
    assert "| **funcid** | 3 (1 failed) | **0.6** [0.55, 0.65] | 0.6 ± 0.1 |" in md
    assert "| aid | 3 (1 running) | 2 [1.5, 3] | 2.333 ± 1.528 |" in md
    assert md.index("| aid |") < md.index("| **funcid** |")  # sorted by name
    assert "| metric | aid | funcid |" in md
    assert "| outer_loss | 0.2 [0.15, 0.25] | 0.2 [0.15, 0.25] |" in md
    assert md.index("| outer_loss |") < md.index("| inner_loss |")
    assert "- funcid/seed_3: RuntimeError: diverged" in md
    assert "![final metric](toy_sweep_box.png)" in md
    assert "![curves](toy_sweep_curves.png)" in md


def test_figures_written(report):
    names = sorted(p.name for p in report.figures)
    assert names == [
        "toy_sweep_box.png",
        "toy_sweep_box.svg",
        "toy_sweep_curves.png",
        "toy_sweep_curves.svg",
    ]
    for p in report.figures:
        assert p.parent == report.paths["json"].parent
        assert p.stat().st_size > 0
        head = p.read_bytes()[:16]
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else b"<?xml" in head
    # no temporary files left behind
    assert not list(report.paths["json"].parent.glob(".*.tmp"))


def test_curves_align_on_common_iterations(tmp_path):
    root = write_sweep(tmp_path)
    runs = []
    for seed in range(3):
        rd = RunDir(root / "aid" / f"seed_{seed}")
        runs.append(_Run(rd, f"aid/seed_{seed}", rd.summary(), "finished", "aid", rd.metrics()))
    t, y = _aligned(runs, "inner_loss")
    np.testing.assert_array_equal(t, [0, 2, 4, 5, 6, 8, 10])  # seed 2 logs every other one
    assert y.shape == (3, 7)
    t, y = _aligned(runs, "test_mse")
    np.testing.assert_array_equal(t, [0, 5, 10])
    np.testing.assert_allclose(y[:, -1], FINALS["aid"])


# ---------------------------------------------------------------------------- options
def test_max_mode_name_and_out_dir(tmp_path):
    root = write_sweep(tmp_path / "my_runs", mode="max", sweep=False)
    out = tmp_path / "results"
    rep = make_report(root, out, "report", figures=False)
    assert rep.paths == {"markdown": out / "report.md", "json": out / "report.json"}
    assert rep.paths["markdown"].exists() and rep.paths["json"].exists()
    assert rep.figures == [] and "## Figures" not in rep.markdown
    assert "| **aid** | 3 (1 running) | **2** [1.5, 3]" in rep.markdown
    assert "higher is better" in rep.markdown
    # default name without sweep.json: the run directory's name, written beside the runs
    rep = make_report(root, figures=False)
    assert rep.paths["json"] == root / "my_runs.json"
    assert rep.data["name"] == "my_runs"


def test_preamble_sits_under_the_title_and_survives_regeneration(tmp_path):
    root = write_sweep(tmp_path)
    text = "## Summary\n\nFuncID wins here.\n"
    for _ in range(2):  # regenerating gives the same file, summary included
        rep = make_report(root, name="pre", figures=False, preamble=text)
        md = rep.paths["markdown"].read_text()
        assert md == rep.markdown
        lines = md.splitlines()
        assert lines[0].startswith("# ") and lines[2:5] == ["## Summary", "", "FuncID wins here."]
        assert lines[6] == "The generated report follows."
        assert lines[8].startswith("8 runs (6 finished")
    assert "generated report follows" not in make_report(root, name="p2", figures=False).markdown


def test_metrics_selection(tmp_path):
    root = write_sweep(tmp_path)
    rep = make_report(root, name="sel", metrics=["inner_loss"], figures=False)
    assert list(rep.data["methods"]["aid"]) == ["test_mse", "inner_loss"]
    with pytest.raises(ValueError, match="nope"):
        make_report(root, name="sel", metrics=["nope"], figures=False)


# ---------------------------------------------------------------------------- errors
def test_empty_directory_error(tmp_path):
    with pytest.raises(ValueError, match=r"no run directories.*funcbo run"):
        make_report(tmp_path)


def test_mixed_experiments_error(tmp_path):
    write_run(tmp_path, "aid", 0, final={"test_mse": 1.0}, experiment="iv_dsprites")
    write_run(tmp_path, "aid", 1, final={"test_mse": 1.0}, experiment="rl_cartpole")
    with pytest.raises(ValueError, match=r"iv_dsprites.*rl_cartpole"):
        make_report(tmp_path, figures=False)


def test_reserved_names_rejected(tmp_path):
    write_run(tmp_path, "aid", 0, final={"test_mse": 1.0})
    for bad in ("summary", "sweep", "a/b"):
        with pytest.raises(ValueError, match="invalid report name"):
            make_report(tmp_path, name=bad, figures=False)


def test_variant_without_finished_runs(tmp_path):
    root = write_sweep(tmp_path)
    write_run(root, "itd[unroll=5]", 0, status="failed", final={}, error="ValueError: bad")
    rep = make_report(root)
    assert rep.data["runs"]["itd[unroll=5]"] == {"finished": 0, "failed": 1, "running": 0}
    assert rep.data["methods"]["itd[unroll=5]"]["test_mse"] == dict.fromkeys(STAT_KEYS) | {"n": 0}
    assert "| itd[unroll=5] | 0 (1 failed) | — | — | — | — | — |" in rep.markdown
    assert "| **funcid** |" in rep.markdown
    assert all(p.stat().st_size > 0 for p in rep.figures)


def test_a_damaged_metrics_line_skips_that_run_with_a_warning(tmp_path):
    root = write_sweep(tmp_path)
    bad = RunDir(root / "aid" / "seed_1")
    lines = bad.metrics_path.read_text().splitlines()
    lines[3] = lines[3][:10]  # a damaged line in the middle (not a torn last line)
    bad.metrics_path.write_text("\n".join(lines) + "\n")
    warned: list[str] = []
    rep = make_report(root, name="damaged", figures=False, warn=warned.append)
    assert len(warned) == 1 and f"{bad.metrics_path}, line 4" in warned[0]
    assert "aid/seed_1" in warned[0] and "left out" in warned[0]
    assert rep.data["methods"]["aid"]["test_mse"]["n"] == 2  # the other two aid seeds
    assert rep.data["methods"]["funcid"]["test_mse"]["n"] == 3
    assert rep.data["warnings"] == warned
    assert "## Warnings" in rep.markdown and "line 4" in rep.markdown


def test_a_damaged_summary_skips_that_run_with_a_warning(tmp_path, capsys):
    root = write_sweep(tmp_path)
    (root / "funcid" / "seed_0" / "summary.json").write_text('{"status": ')
    rep = make_report(root, name="damaged", figures=False)
    err = capsys.readouterr().err
    assert "warning: run funcid/seed_0 left out" in err and "summary.json is damaged" in err
    assert rep.data["methods"]["funcid"]["test_mse"]["n"] == 2


def test_linear_solves_that_gave_up_are_reported(tmp_path, capsys):
    root = write_sweep(tmp_path)
    run = RunDir(root / "aid" / "seed_2")
    records = run.metrics()
    for i, rec in enumerate(records):
        rec["solver_gave_up"] = 1.0 if i in (2, 3, 5) else 0.0
        rec["adjoint_cg_gave_up"] = 2.0 if i == 4 else 0.0
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    quiet = RunDir(root / "funcid" / "seed_1")
    records = quiet.metrics()
    quiet.metrics_path.write_text(
        "".join(json.dumps({**r, "solver_gave_up": 0.0}) + "\n" for r in records)
    )
    rep = make_report(root, name="gave_up", figures=False)
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "aid: run aid/seed_2" in warnings[0] and "gave up 5 times" in warnings[0]
    assert "adjoint_cg_gave_up, solver_gave_up" in warnings[0]
    md = (root / "gave_up.md").read_text()
    assert "## Warnings" in md and "- aid: run aid/seed_2: linear solves gave up 5 times" in md
    assert "funcid/seed_1" not in md
    assert rep.data["methods"]["aid"]["test_mse"]["n"] == 3  # still in the statistics


def test_one_run_one_variant_in_the_singular(tmp_path):
    write_run(tmp_path, "aid", 0, final={"test_mse": 1.0})
    rep = make_report(tmp_path, name="one", figures=False)
    assert "1 run (1 finished) in 1 variant. " in rep.markdown


# ---------------------------------------------------------------------------- grid point selection
# train_return of a run at iterations 100, 200, ..., 1000: BASE + seed + k for k = 0..9, so its
# mean (the run's score) is BASE + seed + 4.5 and a grid point's median over seeds 0, 1, 2 is
# BASE + 5.5. The final evaluation return ranks the grid points of omd the other way round, so a
# selection by the final metric instead of the training score would pick the other one.
GRID = {
    ("omd", 0.001): {"base": 10.0, "final": 200.0},
    ("omd", 0.003): {"base": 20.0, "final": 50.0},
    ("funcid", 0.001): {"base": 30.0, "final": 150.0},
    ("funcid", 0.003): {"base": 5.0, "final": 180.0},
}


def write_rl_run(root: Path, method: str, lr: float, seed: int, status: str = "finished") -> None:
    """A run of a method × (inner_lr, tau) grid as the runner writes it (run id as in
    PlannedRun.run_id)."""
    point = {"methods.*.inner_lr": lr, "problem.tau": 0.005}
    variant = f"{method}[inner_lr={lr},tau=0.005]"
    run = RunDir(root / f"{method}__inner_lr-{lr}_tau-0.005" / f"seed_{seed}")
    base, final = GRID[method, lr]["base"], GRID[method, lr]["final"]
    run.append_metrics({"iteration": 0, "return": 10.0, "wall_time_s": 0.0})
    for k in range(10):
        it = 100 * (k + 1)
        rec: dict[str, Any] = {"iteration": it, "train_return": base + seed + k, "episodes": k}
        if it in (500, 1000):
            rec["return"] = final / 2 + seed if it == 500 else final + seed
        run.append_metrics({**rec, "wall_time_s": it / 100})
    run.write_summary(
        {
            "experiment": "rl_toy",
            "name": "rl_grid",
            "method": method,
            "variant": variant,
            "seed": seed,
            "grid_point": point,
            "iterations": 1000,
            "metric": "return",
            "metric_mode": "max",
            "status": status,
            "iteration": 1000 if status == "finished" else 300,
            "wall_time_s": 10.0,
            "final": {"return": final + seed, "train_return": base + seed + 9}
            if status == "finished"
            else {},
            "error": "RuntimeError: diverged" if status == "failed" else None,
        }
    )


def write_grid_sweep(root: Path) -> Path:
    """Two methods × two grid points × three seeds; funcid at inner_lr 0.003 lost seed 2."""
    for method, lr in GRID:
        for seed in range(3):
            bad = (method, lr, seed) == ("funcid", 0.003, 2)
            write_rl_run(root, method, lr, seed, status="failed" if bad else "finished")
    (root / "sweep.json").write_text(json.dumps({"name": "rl_grid", "experiment": "rl_toy"}))
    return root


@pytest.fixture(scope="module")
def grid_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_grid_sweep(tmp_path_factory.mktemp("grid"))


def test_select_by_training_return_picks_the_best_grid_point(grid_root, tmp_path):
    warned: list[str] = []
    rep = make_report(grid_root, tmp_path, "sel", select_by="train_return", warn=warned.append)
    sel = rep.data["selection"]
    assert (sel["select_by"], sel["mode"]) == ("train_return", "max")  # the metric's mode
    omd, funcid = sel["methods"]["omd"], sel["methods"]["funcid"]
    assert omd["variant"] == "omd[inner_lr=0.003,tau=0.005]"
    assert omd["grid_point"] == {"methods.*.inner_lr": 0.003, "problem.tau": 0.005}
    assert omd["label"] == "omd (inner_lr 0.003, tau 0.005)"
    assert (omd["score"], omd["n"]) == (pytest.approx(25.5), 3)
    assert funcid["variant"] == "funcid[inner_lr=0.001,tau=0.005]"
    assert (funcid["score"], funcid["n"]) == (pytest.approx(35.5), 3)
    # every grid point's score: the median over seeds of the mean train_return of each run
    scores = {p["variant"]: (p["score"], p["n"]) for p in omd["grid_points"]}
    assert scores == {
        "omd[inner_lr=0.001,tau=0.005]": (pytest.approx(15.5), 3),
        "omd[inner_lr=0.003,tau=0.005]": (pytest.approx(25.5), 3),
    }
    low = funcid["grid_points"][1]
    assert low["variant"] == "funcid[inner_lr=0.003,tau=0.005]"
    assert low["seeds"] == {"0": pytest.approx(9.5), "1": pytest.approx(10.5)}
    assert (low["score"], low["n"]) == (pytest.approx(10.0), 2)
    assert low["runs"] == {"finished": 2, "failed": 1, "running": 0}

    # the results are those of the selected grid points only, keyed by method
    assert set(rep.data["methods"]) == {"funcid", "omd"}
    assert rep.data["methods"]["omd"]["return"]["median"] == pytest.approx(51.0)  # not 201
    assert rep.data["methods"]["funcid"]["return"]["median"] == pytest.approx(151.0)
    assert rep.data["runs"] == {
        "funcid": {"finished": 3, "failed": 0, "running": 0},
        "omd": {"finished": 3, "failed": 0, "running": 0},
    }
    assert json.loads(rep.paths["json"].read_text()) == json.loads(json.dumps(rep.data))

    # grid points of funcid were scored on different seeds: a warning, in the report too
    assert len(warned) == 1 and warned[0].startswith("funcid: grid points are scored on")
    assert "inner_lr 0.001, tau 0.005: 3 seeds (0, 1, 2)" in warned[0]
    assert "inner_lr 0.003, tau 0.005: 2 seeds (0, 1)" in warned[0]
    assert rep.data["warnings"] == warned == sel["warnings"]

    md = rep.markdown
    selection, results = md.split("## Results")
    assert "mean of `train_return` over its logged records" in selection
    assert "area under its training curve divided by its length" in selection
    assert "| omd | **inner_lr 0.003, tau 0.005** | **25.5** | 3 |" in selection
    assert "| omd | inner_lr 0.001, tau 0.005 | 15.5 | 3 |" in selection
    assert "| funcid | inner_lr 0.003, tau 0.005 | 10 | 2 (1 failed) |" in selection
    assert f"**Warning:** {warned[0]}" in selection
    assert "6 runs (6 finished) of 2 methods, each at its selected grid point" in results
    rows = [ln for ln in results.splitlines() if ln.startswith(("| omd", "| funcid", "| **"))]
    assert rows == [
        "| **funcid (inner_lr 0.001, tau 0.005)** | 3 | **151** [150.5, 151.5] | 151 ± 1 "
        "| 78.25 (78.25 ± 0.75) | 10 (10) | 100 |",
        "| omd (inner_lr 0.003, tau 0.005) | 3 | 51 [50.5, 51.5] | 51 ± 1 "
        "| 28.25 (28.25 ± 0.75) | 10 (10) | 100 |",
    ]
    assert "| metric | funcid (inner_lr 0.001, tau 0.005) | omd (inner_lr 0.003, tau 0.005) |" in md
    assert [p.name for p in rep.figures if p.suffix == ".png"] == ["sel_box.png", "sel_curves.png"]


def test_select_mode_min_inverts_the_direction(grid_root, tmp_path):
    rep = make_report(
        grid_root, tmp_path, "low", figures=False, select_by="train_return", select_mode="min"
    )
    sel = rep.data["selection"]
    assert sel["mode"] == "min"
    assert sel["methods"]["omd"]["variant"] == "omd[inner_lr=0.001,tau=0.005]"
    assert sel["methods"]["omd"]["score"] == pytest.approx(15.5)
    assert sel["methods"]["funcid"]["variant"] == "funcid[inner_lr=0.003,tau=0.005]"
    assert sel["methods"]["funcid"]["score"] == pytest.approx(10.0)
    assert rep.data["methods"]["omd"]["return"]["median"] == pytest.approx(201.0)
    assert "| omd | **inner_lr 0.001, tau 0.005** | **15.5** | 3 |" in rep.markdown
    assert "(lower is better)" in rep.markdown.split("## Results")[0]


def test_select_mode_defaults_to_the_metric_mode(tmp_path):
    root = write_grid_sweep(tmp_path / "runs")
    for summary in root.glob("*/seed_*/summary.json"):
        data = json.loads(summary.read_text())
        summary.write_text(json.dumps({**data, "metric_mode": "min"}))
    rep = make_report(root, tmp_path, "minmode", figures=False, select_by="train_return")
    assert rep.data["selection"]["mode"] == "min"
    assert rep.data["selection"]["methods"]["omd"]["variant"] == "omd[inner_lr=0.001,tau=0.005]"


def test_without_select_by_every_variant_is_a_row(grid_root, tmp_path):
    rep = make_report(grid_root, tmp_path, "all", figures=False)
    assert "selection" not in rep.data
    assert len(rep.data["methods"]) == 4
    assert "## Results" not in rep.markdown and "| variant | n |" in rep.markdown
    # methods are compared at the same grid point: the best median of each point is in bold
    # (omd at 0.001: 201 against funcid's 151; funcid at 0.003: 180.5 against omd's 51)
    assert "the best median at each grid point is in bold" in rep.markdown
    assert "| **omd[inner_lr=0.001,tau=0.005]** | 3 | **201** [" in rep.markdown
    assert "| **funcid[inner_lr=0.003,tau=0.005]** | 2 (1 failed) | **180.5** [" in rep.markdown
    assert "| omd[inner_lr=0.003,tau=0.005] | 3 | 51 [" in rep.markdown
    assert "| funcid[inner_lr=0.001,tau=0.005] | 3 | 151 [" in rep.markdown


def test_bold_is_global_when_a_grid_point_has_one_variant(tmp_path):
    root = tmp_path / "runs"
    for method, lr in [("omd", 0.001), ("omd", 0.003), ("funcid", 0.001)]:
        for seed in range(2):
            write_rl_run(root, method, lr, seed)
    (root / "sweep.json").write_text(json.dumps({"name": "rl_grid", "experiment": "rl_toy"}))
    md = make_report(root, tmp_path / "out", "all", figures=False).markdown
    assert "(higher is better; the best median is in bold)" in md
    bold_rows = [line for line in md.splitlines() if line.startswith("| **")]
    assert bold_rows == [line for line in md.splitlines() if "| **omd[inner_lr=0.001," in line]
    assert len(bold_rows) == 1


def test_select_by_errors(grid_root, tmp_path):
    with pytest.raises(ValueError, match=r"'nope'.*logged: episodes, return, train_return"):
        make_report(grid_root, tmp_path, "e", figures=False, select_by="nope")
    with pytest.raises(ValueError, match="select_mode needs select_by"):
        make_report(grid_root, tmp_path, "e", figures=False, select_mode="max")
    with pytest.raises(ValueError, match="select_mode must be"):
        make_report(grid_root, tmp_path, "e", figures=False, select_by="return", select_mode="up")


def test_cli_select_by(grid_root, tmp_path, capsys):
    from funcbo.cli import main

    out = tmp_path / "cli"
    args = ["report", str(grid_root), "--out", str(out), "--name", "c"]
    assert main([*args, "--select-by", "train_return", "--select-mode", "min"]) == 0
    data = json.loads((out / "c.json").read_text())
    assert data["selection"]["methods"]["omd"]["variant"] == "omd[inner_lr=0.001,tau=0.005]"
    assert "| omd | **inner_lr 0.001, tau 0.005** |" in capsys.readouterr().out
    assert main([*args, "--select-mode", "min"]) == 2
    assert "--select-mode needs --select-by" in capsys.readouterr().err


def test_select_by_with_a_diverged_run_and_a_method_that_does_not_log_the_key(tmp_path):
    root = write_grid_sweep(tmp_path / "runs")
    diverged = RunDir(root / "omd__inner_lr-0.003_tau-0.005" / "seed_0")
    records = diverged.metrics()
    records[3]["train_return"] = math.nan
    diverged.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    GRID["aid", 0.001] = {"base": 0.0, "final": 1.0}
    try:
        write_rl_run(root, "aid", 0.001, 0)
    finally:
        del GRID["aid", 0.001]
    quiet = RunDir(root / "aid__inner_lr-0.001_tau-0.005" / "seed_0")
    records = [{k: v for k, v in r.items() if k != "train_return"} for r in quiet.metrics()]
    quiet.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    warned: list[str] = []
    rep = make_report(
        root, tmp_path, "nan", figures=False, select_by="train_return", warn=warned.append
    )
    omd = rep.data["selection"]["methods"]["omd"]
    top = omd["grid_points"][1]
    assert top["seeds"] == {"0": None, "1": pytest.approx(25.5), "2": pytest.approx(26.5)}
    assert (top["score"], top["n"], top["nonfinite"]) == (pytest.approx(26.0), 2, 1)
    assert omd["variant"] == top["variant"]
    assert "| omd | **inner_lr 0.003, tau 0.005** | **26** | 2 (1 non-finite) |" in rep.markdown
    assert any(w.startswith("omd: grid points are scored on different seeds") for w in warned)
    aid = rep.data["selection"]["methods"]["aid"]
    assert aid["variant"] is None and aid["score"] is None
    assert "aid: no finished run of any grid point logs a finite `train_return`" in warned[0]
    assert set(rep.data["methods"]) == {"funcid", "omd"}
    # report.json is strict JSON: a diverged run's score is null, not NaN
    json.loads(rep.paths["json"].read_text(), parse_constant=lambda c: pytest.fail(c))


# ---------------------------------------------------------------------------- seed restriction
def test_common_seeds_keep_the_seeds_every_variant_finished(tmp_path):
    # funcid's seed 3 failed and aid's is running: the common seeds are 0-2
    root = write_sweep(tmp_path / "runs")
    write_run(root, "funcid", 4, final={"test_mse": 50.0}, wall=1.0)  # funcid only
    rep = make_report(root, tmp_path, "common", figures=False, seeds="common")
    assert rep.data["seeds"] == {
        "rule": "the seeds at which every variant has a finished run",
        "seeds": [0, 1, 2],
        "left_out": 3,
    }
    assert rep.data["runs"]["funcid"] == {"finished": 3, "failed": 0, "running": 0}
    assert rep.data["methods"]["funcid"]["test_mse"]["median"] == pytest.approx(0.6)
    assert rep.data["methods"]["aid"]["test_mse"]["median"] == pytest.approx(2.0)
    assert "Seeds 0–2 only (the seeds at which every variant" in rep.markdown
    assert "3 runs of other seeds left out." in rep.markdown
    everything = make_report(root, tmp_path, "all", figures=False)
    assert everything.data["methods"]["funcid"]["test_mse"]["n"] == 4
    assert "seeds" not in everything.data


def test_listed_seeds_and_their_errors(tmp_path):
    root = write_sweep(tmp_path / "runs")
    rep = make_report(root, tmp_path, "listed", figures=False, seeds=[0, 2, 3])
    assert rep.data["seeds"]["seeds"] == [0, 2, 3]
    assert rep.data["runs"]["funcid"] == {"finished": 2, "failed": 1, "running": 0}
    assert rep.data["methods"]["aid"]["test_mse"]["median"] == pytest.approx(2.5)
    assert "Seeds 0, 2, 3 only (the seeds requested); 2 runs of other seeds" in rep.markdown
    with pytest.raises(ValueError, match="no run of these seeds"):
        make_report(root, tmp_path, "e", figures=False, seeds=[7, 8])
    write_run(root, "ridge", 5, final={"test_mse": 1.0})
    with pytest.raises(ValueError, match=r"no seed has a finished run of every variant.*ridge: 5"):
        make_report(root, tmp_path, "e", figures=False, seeds="common")
    with pytest.raises(ValueError, match="seeds must be 'common'"):
        make_report(root, tmp_path, "e", figures=False, seeds="all")


def test_common_seeds_with_grid_point_selection(grid_root, tmp_path, capsys):
    # funcid at inner_lr 0.003 failed seed 2: the common seeds are 0 and 1, for omd too
    from funcbo.cli import main

    out = tmp_path / "cli"
    args = ["report", str(grid_root), "--out", str(out), "--name", "c", "--seeds", "common"]
    assert main([*args, "--select-by", "train_return"]) == 0
    data = json.loads((out / "c.json").read_text())
    assert data["seeds"]["seeds"] == [0, 1]
    omd = data["selection"]["methods"]["omd"]
    assert (omd["n"], omd["score"]) == (2, pytest.approx(25.0))
    assert "Seeds 0, 1 only" in capsys.readouterr().out
    assert main([*args[:-1], "0-x"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_paired_by_seed_counts_wins_on_the_common_finite_seeds(tmp_path):
    # three methods at two sizes; at n=1 seed 3 of b diverged (nan) and c lacks seed 4, so
    # that point compares seeds 0-2 only; at n=2 every method has seeds 0-4
    finals = {
        ("a", 1): [1.0, 5.0, 2.0, 1.0, 9.0],
        ("b", 1): [2.0, 1.0, 2.0, float("nan"), 0.5],
        ("c", 1): [3.0, 3.0, 0.5, 4.0, None],
        ("a", 2): [1.0, 1.0, 1.0, 1.0, 1.0],
        ("b", 2): [2.0, 2.0, 0.5, 2.0, 2.0],
        ("c", 2): [3.0, 3.0, 3.0, 3.0, 0.1],
    }
    root = tmp_path / "runs"
    for (method, n), values in finals.items():
        for seed, x in enumerate(values):
            if x is None:
                continue
            run = write_run(root, f"{method}[n={n}]", seed, final={"test_mse": x})
            summary = json.loads((run.path / "summary.json").read_text())
            run.write_summary({**summary, "grid_point": {"problem.n": n}})
    rep = make_report(root, tmp_path / "out", "p", figures=False, paired=True)
    first, second = rep.data["paired"]
    assert first["grid_point"] == {"problem.n": 1} and first["seeds"] == [0, 1, 2]
    # seed 0: a; seed 1: b; seed 2: c
    assert first["best"] == {"a[n=1]": 1, "b[n=1]": 1, "c[n=1]": 1}
    # a against b: seed 0 (1 < 2) only; seed 2 is a tie (2 = 2) and counts for neither
    assert first["better"]["a[n=1]"] == {"b[n=1]": 1, "c[n=1]": 1}
    assert first["better"]["b[n=1]"] == {"a[n=1]": 1, "c[n=1]": 2}
    assert second["seeds"] == [0, 1, 2, 3, 4]
    assert second["best"] == {"a[n=2]": 3, "b[n=2]": 1, "c[n=2]": 1}
    assert second["better"]["a[n=2]"] == {"b[n=2]": 4, "c[n=2]": 4}
    md = rep.markdown
    assert "## Paired by seed" in md and "**n 1**: 3 seeds (0–2)." in md
    assert "**n 2**: 5 seeds (0–4)." in md
    assert "| variant | best | a | b | c |" in md
    assert "| a | 3 | — | 4 | 4 |" in md and "| c | 1 | 1 | 1 | — |" in md
    # the comparison is opt-in
    plain = make_report(root, tmp_path / "out", "q", figures=False)
    assert "paired" not in plain.data and "Paired by seed" not in plain.markdown


def test_paired_by_seed_in_max_mode_after_grid_point_selection(grid_root, tmp_path, capsys):
    from funcbo.cli import main

    out = tmp_path / "cli"
    args = ["report", str(grid_root), "--out", str(out), "--name", "s", "--paired"]
    assert main([*args, "--select-by", "train_return"]) == 0
    data = json.loads((out / "s.json").read_text())
    (group,) = data["paired"]
    # the selected points (by train_return): omd at 0.003, final return 50 + seed, and funcid
    # at 0.001, 150 + seed; funcid's failed seed 2 is at the point not selected
    assert group["grid_point"] == {} and group["seeds"] == [0, 1, 2]
    assert group["best"] == {"funcid": 3, "omd": 0}
    assert group["better"] == {"funcid": {"omd": 3}, "omd": {"funcid": 0}}
    assert "the highest value" in capsys.readouterr().out
