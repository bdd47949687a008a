"""Smoke tests of the benchmarks: a tiny configuration runs end to end and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "hypergradient_cost.py"
IV_BATCHED = ROOT / "benchmarks" / "iv_batched.py"


def _load(script: Path = SCRIPT) -> ModuleType:
    spec = importlib.util.spec_from_file_location(script.stem, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses (the method specs) look their module up
    spec.loader.exec_module(module)
    return module


def _torchopt_available() -> bool:
    try:
        import torchopt  # noqa: F401
    except Exception:
        return False
    return True


def test_hypergradient_cost_tiny(tmp_path: Path) -> None:
    """Every method runs in its own process on a tiny problem; the JSON holds positive times."""
    out = tmp_path / "cost.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--instances", "base",
        "--widths", "16",
        "--repeats", "1",
        "--batch", "16",
        "--train-steps", "1",
        "--threads", "1",
        "--check-width", "16",
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Targets" in proc.stdout
    assert "FuncID's phases" in proc.stdout
    record = json.loads(out.read_text())
    bench = _load()
    results = {r["method"]: r for r in record["results"]}
    assert set(results) == set(bench.METHODS)
    assert {r["instance"] for r in record["results"]} == {"base"}
    assert record["config"]["instances"]["base"]["batch"] == 16  # the override
    assert record["config"]["instances"]["base"]["out_dim"] == 16  # the instance's own
    for method in ("funcid_linear", "funcid_network"):
        phases = results[method]["phases"]
        assert set(phases) == set(bench.PHASES)
        assert all(p["time_ms"] >= 0 and p["peak_mb"] >= 0 for p in phases.values())
    for method, r in results.items():
        if method == "torchopt_aid_cg" and not _torchopt_available():
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0
        assert r["extra_mb"] >= 0  # a tiny call may fit in memory the process already holds
        assert r["n_params"] > 0
        assert r["time_ratio"] is not None and r["time_ratio"] > 0
    assert record["environment"]["threads"] == 1
    assert record["targets"] == []  # no width ≥ 1024 in this configuration
    if _torchopt_available():
        assert record["check"]["status"] == "ok"
        assert record["check"]["converged_ok"]
        assert record["check"]["rel_diff"] < 1e-8


def test_torchopt_missing_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without TorchOpt its method and the check are skipped with a note, not failed."""
    bench = _load()
    monkeypatch.setitem(sys.modules, "torchopt", None)  # makes `import torchopt` fail
    out = tmp_path / "cost.json"
    argv = ["--instances", "base", "--widths", "16", "--methods", "torchopt_aid_cg"]
    argv += ["--out", str(out)]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["check"]["status"] == "skipped"
    (r,) = record["results"]
    assert r["status"] == "skipped" and "torchopt" in r["note"]
    assert "torchopt not installed" in capsys.readouterr().out


def test_targets_report_misses() -> None:
    """A target that is not reached is reported as missed with its ratio."""
    bench = _load()

    def row(method: str, t: float, m: float, instance: str = "base") -> dict[str, object]:
        return {
            "instance": instance,
            "method": method,
            "width": 1024,
            "status": "ok",
            "time_ms": t,
            "extra_mb": m,
            "adjoint_steps": 10,
        }

    results = [
        row("funcid_linear", 10.0, 5.0),
        row("torchopt_aid_cg", 50.0, 100.0),
        row("aid_cg", 200.0, 100.0),
        row("plain_step", 20.0, 10.0),
        row("funcid_network", 250.0, 10.0),
        row("funcid_linear", 13.0, 5.0, "large"),
        row("plain_step", 20.0, 4.0, "large"),
    ]
    bench.add_ratios(results)
    targets = {(t["instance"], t["target"], t["width"]): t for t in bench.evaluate_targets(results)}
    time_vs_torchopt = targets[("base", "funcid_linear time <= 0.1x torchopt_aid_cg", 1024)]
    assert time_vs_torchopt["ratio"] == pytest.approx(0.2) and time_vs_torchopt["met"] is False
    assert targets[("base", "funcid_linear extra memory <= 0.2x torchopt_aid_cg", 1024)]["met"]
    assert targets[("base", "funcid_linear time <= 0.6x plain_step", 1024)]["met"] is True
    assert targets[("base", "funcid_linear extra memory <= 1x plain_step", 1024)]["met"] is True
    network = targets[("base", "funcid_network time <= 12x plain_step", 1024)]
    assert network["ratio"] == pytest.approx(12.5) and network["met"] is False
    assert targets[("base", "funcid_network extra memory <= 1.1x plain_step", 1024)]["met"]
    # Each instance against its own plain step; no TorchOpt row there: no target.
    assert targets[("large", "funcid_linear time <= 0.6x plain_step", 1024)]["met"] is False
    assert targets[("large", "funcid_linear extra memory <= 1x plain_step", 1024)]["met"] is False
    assert ("large", "funcid_linear time <= 0.1x torchopt_aid_cg", 1024) not in targets
    failed = [*results, {"instance": "large", "method": "torchopt_aid_cg", "width": 1024}]
    failed[-1]["status"] = "failed"
    by_key = {(t["instance"], t["target"]): t for t in bench.evaluate_targets(failed)}
    assert by_key[("large", "funcid_linear time <= 0.1x torchopt_aid_cg")]["met"] is None
    assert "MISSED" in bench.format_targets(list(targets.values()))
    assert "| 1024 | 0.00M |" not in bench.format_table([])  # an empty table is only a header


def test_rounds_are_merged_into_medians() -> None:
    """--rounds: every figure is the median over the rounds; failed rounds are left out."""
    bench = _load()

    def row(t: float, status: str = "ok") -> dict[str, object]:
        phases = {"solve": {"time_ms": t / 2, "peak_mb": 1.0}}
        return {
            "instance": "base",
            "method": "funcid_linear",
            "width": 64,
            "status": status,
            "time_ms": t,
            "cpu_ms": t - 1,
            "extra_mb": 2.0,
            "other_cpu": 0.5,
            "phases": phases,
        }

    rounds = [[row(10.0)], [row(30.0)], [row(20.0)], [row(99.0, "failed")]]
    (merged,) = bench.merge_rounds(rounds)
    assert merged["time_ms"] == 20.0 and merged["cpu_ms"] == 19.0
    assert merged["phases"]["solve"]["time_ms"] == 10.0
    assert [r["time_ms"] for r in merged["rounds"]] == [10.0, 30.0, 20.0]
    assert bench.merge_rounds([[row(5.0)]])[0]["time_ms"] == 5.0
    (failed,) = bench.merge_rounds([[row(1.0, "failed")], [row(2.0, "failed")]])
    assert failed["status"] == "failed"


def test_iv_batched_tiny(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each method has its unbatched time and, per R, the batched step's time and the ratios
    derived from them; the JSON echoes the configuration."""
    monkeypatch.setenv("FUNCBO_CACHE", str(tmp_path / "cache"))  # the dataset, rendered once
    bench = _load(IV_BATCHED)
    out = tmp_path / "iv_batched.json"
    methods = ["dfiv", "funcid_linear"]  # DFIV's own step and a library estimator
    argv = ["--methods", ",".join(methods), "--n", "80", "--runs", "1,2"]
    argv += ["--iters", "1", "--warmup", "0", "--json", str(out)]
    result = bench.main(argv)
    record = json.loads(out.read_text())
    assert record["rows"] == json.loads(json.dumps(result["rows"]))  # what main returns
    assert record["benchmark"] == "iv_batched"
    assert (record["n"], record["iters"], record["warmup"], record["threads"]) == (80, 1, 0, 1)
    assert record["target_ratio"] == bench.TARGET
    assert [r["method"] for r in record["rows"]] == methods
    for row in record["rows"]:
        plain, plain_cpu = row["unbatched_s"], row["unbatched_cpu_s"]
        assert plain > 0 and plain_cpu > 0
        assert sorted(row["batched"]) == ["1", "2"]  # R, a string key in JSON
        for R, b in row["batched"].items():
            assert b["step_s"] > 0 and b["cpu_s"] > 0
            assert b["per_run_s"] == pytest.approx(b["step_s"] / int(R))
            assert b["ratio"] == pytest.approx(b["per_run_s"] / plain)
            assert b["cpu_ratio"] == pytest.approx(b["cpu_s"] / int(R) / plain_cpu)
            assert b["target_met"] == (b["ratio"] <= bench.TARGET)
    table = capsys.readouterr().out
    assert "dSprites n = 80" in table
    assert all(m in table for m in methods)
