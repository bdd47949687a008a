"""Config validation: every error names the key and the file; overrides use the same checks."""

import pytest
import yaml

import funcbo.cli  # noqa: F401 - registers the built-in experiments
from funcbo.experiments.config import (
    ConfigError,
    load_config,
    load_config_dict,
    parse_seeds,
    plan_runs,
)
from funcbo.experiments.methods import FuncIDLinear

BASE = {
    "experiment": "linear_iv",
    "seeds": [0, 1],
    "iterations": 20,
    "problem": {"n": 200, "width": 8},
    "methods": {"lin": {"kind": "funcid_linear", "inner_lr": 1e-3}, "aid": {"kind": "aid"}},
}


def _write(tmp_path, data, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_valid_config_is_typed(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.name == "exp"
    assert cfg.problem.n == 200 and cfg.problem.width == 8 and cfg.problem.depth == 2
    assert isinstance(cfg.methods["lin"], FuncIDLinear)
    assert cfg.methods["lin"].inner_lr == 1e-3 and isinstance(cfg.methods["aid"].inner_lr, float)


def test_unknown_key_names_key_file_and_suggests(tmp_path):
    data = {**BASE, "problem": {"n": 200, "widht": 8}}
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "unknown key 'problem.widht'" in msg and "problem.width" in msg


def test_unknown_top_level_and_method_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'iteration'"):
        load_config(_write(tmp_path, {**BASE, "iteration": 3}))
    bad = {**BASE, "methods": {"lin": {"kind": "funcid_linear", "inner_lrr": 1.0}}}
    with pytest.raises(ConfigError, match=r"unknown key 'methods\.lin\.inner_lrr'"):
        load_config(_write(tmp_path, bad))


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("iterations", "many", "iterations: expected an integer, got 'many'"),
        ("iterations", 2.5, "iterations: expected an integer"),
        ("dtype", "float16", "dtype: expected one of 'float32', 'float64'"),
        ("tensorboard", "yes", "tensorboard: expected true/false"),
    ],
)
def test_wrong_types_are_named(tmp_path, key, value, expect):
    path = _write(tmp_path, {**BASE, key: value})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert expect in str(e.value) and str(path) in str(e.value)


def test_wrong_nested_type_and_kind(tmp_path):
    bad = {**BASE, "methods": {"lin": {"kind": "funcid_linear", "inner_lr": "fast"}}}
    with pytest.raises(ConfigError, match=r"methods\.lin\.inner_lr: expected a number"):
        load_config(_write(tmp_path, bad))
    bad = {**BASE, "methods": {"x": {"kind": "nonsense"}}}
    with pytest.raises(ConfigError, match=r"methods\.x\.kind: unknown kind 'nonsense'"):
        load_config(_write(tmp_path, bad))


def test_missing_required_values(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'experiment'"):
        load_config(_write(tmp_path, {k: v for k, v in BASE.items() if k != "experiment"}))
    with pytest.raises(ConfigError, match="missing required key 'methods'"):
        load_config(_write(tmp_path, {k: v for k, v in BASE.items() if k != "methods"}))
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        load_config(_write(tmp_path, {**BASE, "experiment": "nope"}))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_range_checks(tmp_path):
    with pytest.raises(ConfigError, match="eval_every: must be ≥ 1"):
        load_config(_write(tmp_path, {**BASE, "eval_every": 0}))
    with pytest.raises(ConfigError, match="batch_size, width and depth must be ≥ 1"):
        load_config(_write(tmp_path, {**BASE, "problem": {"width": 0}}))


def test_overrides_are_validated_the_same_way(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_config(path, ["problem.n=500", "methods.lin.inner_lr=3e-4", "seeds=0-4"])
    assert cfg.problem.n == 500 and cfg.methods["lin"].inner_lr == 3e-4
    assert cfg.seeds == [0, 1, 2, 3, 4]
    cfg = load_config(path, ["methods.*.outer_lr=0.5"])
    assert all(m.outer_lr == 0.5 for m in cfg.methods.values())
    with pytest.raises(ConfigError, match="problem.n: expected an integer, got 'lots'"):
        load_config(path, ["problem.n=lots"])
    with pytest.raises(ConfigError, match="unknown key 'problem.m'"):
        load_config(path, ["problem.m=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["problem.n"])


def test_seed_specifications():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("0,2,5") == [0, 2, 5]
    assert parse_seeds("1-2,7") == [1, 2, 7]
    assert parse_seeds(4) == [4]
    with pytest.raises(ValueError):
        parse_seeds("5-2")


@pytest.mark.parametrize(
    "spec, cause",
    [
        ("0-x", "'0-x' is not a seed"),
        ("abc", "'abc' is not a seed"),
        ("0..3", "'0..3' is not a seed"),
        ("0 1 2", "'0 1 2' is not a seed"),
        ("5-2", "empty seed range '5-2'"),
        ("-1", "'-1' is not a seed"),
        (",", "an empty part is not a seed"),
        ("", "an empty part is not a seed"),
        ("0,0", "seed 0 given more than once"),
        ("0-3,2", "seed 2 given more than once"),
        ([1, -2], "non-negative"),
    ],
)
def test_bad_seed_specifications_name_the_cause(spec, cause):
    with pytest.raises(ValueError, match=cause):
        parse_seeds(spec)


def test_set_on_an_undefined_method_is_an_error_with_a_suggestion(tmp_path):
    path = _write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"no method 'linn' \(did you mean 'methods.lin'\?\)"):
        load_config(path, ["methods.linn.inner_lr=1e-3"])
    with pytest.raises(ConfigError, match="no method 'zzz'; its methods: aid, lin"):
        load_config(path, ["methods.zzz.inner_lr=1e-3"])
    cfg = load_config(path, ["methods.lin.inner_lr=2e-3", "methods.*.outer_lr=0.5"])
    assert sorted(cfg.methods) == ["aid", "lin"] and cfg.methods["lin"].inner_lr == 2e-3
    assert len(plan_runs(cfg)) == 4


def test_duplicate_or_empty_methods_and_seeds_are_rejected(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    with pytest.raises(ConfigError, match="aid named more than once"):
        plan_runs(cfg, ["aid", "aid"])
    with pytest.raises(ConfigError, match="no method named"):
        plan_runs(cfg, [])
    with pytest.raises(ConfigError, match="seed 0 given more than once"):
        plan_runs(cfg, seeds=[0, 0])
    with pytest.raises(ConfigError, match="no seed given"):
        plan_runs(cfg, seeds=[])
    with pytest.raises(ConfigError, match="seeds: .*given more than once"):
        load_config(_write(tmp_path, {**BASE, "seeds": [1, 1]}))


def test_grid_expands_methods_and_validates(tmp_path):
    data = {**BASE, "grid": {"methods.*.inner_lr": [1e-3, 3e-3], "problem.width": [8, 16]}}
    cfg = load_config(_write(tmp_path, data))
    runs = plan_runs(cfg, seeds=[0])
    assert len(runs) == 2 * 2 * 2
    variants = sorted({r.variant for r in runs})
    assert "lin[inner_lr=0.001,width=8]" in variants
    run = next(r for r in runs if r.variant == "aid[inner_lr=0.003,width=16]")
    assert run.spec.method_config.inner_lr == 3e-3 and run.spec.problem.width == 16
    assert run.run_id == "aid__inner_lr-0.003_width-16/seed_0"
    bad = {**BASE, "grid": {"problem.width": ["wide"]}}
    with pytest.raises(ConfigError, match="problem.width: expected an integer"):
        load_config(_write(tmp_path, bad))


def test_plan_runs_methods_and_seeds(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    runs = plan_runs(cfg, ["aid"], [3, 4])
    assert [r.run_id for r in runs] == ["aid/seed_3", "aid/seed_4"]
    with pytest.raises(ConfigError, match="unknown method 'x'"):
        plan_runs(cfg, ["x"])


def test_resolved_config_round_trips():
    cfg = load_config_dict(BASE, "inline")
    again = load_config_dict(cfg.to_dict(), "again")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "path",
    sorted(
        str(p)
        for p in __import__("pathlib").Path(__file__).resolve().parents[1].glob("configs/*.yaml")
    ),
)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert plan_runs(cfg)


def test_problem_fields_may_use_any_name(tmp_path):
    # A problem section's own field called "source" must not clash with the config's bookkeeping.
    import funcbo.apps.iv.experiment  # noqa: F401

    data = {
        "experiment": "iv_dsprites",
        "problem": {"source": "render", "n": 100},
        "methods": {"d": {"kind": "dfiv"}},
        "grid": {"problem.n": [100, 200]},
    }
    cfg = load_config(_write(tmp_path, data))
    assert cfg.problem.source == "render" and len(plan_runs(cfg)) == 2
