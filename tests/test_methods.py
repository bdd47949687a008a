"""Method specs: the registry, YAML entries (did-you-mean errors, solvers as values), the
translation of former flat entries, what each library spec builds, and a method added from a
test module (the tutorial's example) run in a 2-iteration linear_iv sweep."""

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import funcbo.cli  # noqa: F401 - registers the built-in experiments
from funcbo import (
    AID,
    CG,
    ITD,
    FuncID,
    GradientPenalty,
    Identity,
    LinearAdjoint,
    NetworkAdjoint,
    Neumann,
    ValuePenalty,
)
from funcbo.experiments.config import ConfigError, load_config_dict, plan_runs
from funcbo.experiments.methods import (
    AIDMethod,
    BuildContext,
    EstimatorMethod,
    FuncIDLinear,
    MethodConfig,
    MethodSpec,
    library_method,
    make_method,
    method_class,
    method_kinds,
    register_method,
    translate_legacy,
)
from funcbo.experiments.runner import run_sweep


def _load(entry):
    cfg = load_config_dict({"experiment": "linear_iv", "methods": {"m": entry}})
    return cfg.methods["m"]


def test_library_kinds_are_registered():
    assert set(method_kinds(EstimatorMethod)) >= {
        "funcid",
        "funcid_linear",
        "aid",
        "itd",
        "gradient_penalty",
        "value_penalty",
    }
    assert method_class("funcid_linear") is FuncIDLinear and FuncIDLinear.kind == "funcid_linear"
    with pytest.raises(KeyError, match="unknown method kind 'nope'"):
        method_class("nope")


def test_a_spec_holds_only_its_own_fields():
    names = {f.name for f in dataclasses.fields(AIDMethod)}
    assert "solver" in names and "ridge" not in names and "adjoint_lr" not in names
    assert "solver_iters" not in names and "solver" not in {
        f.name for f in dataclasses.fields(FuncIDLinear)
    }


def test_yaml_entry_selects_the_spec_and_solvers_are_values():
    m = _load({"kind": "aid", "inner_steps": 3, "solver": {"cg": {"maxiter": 2}}})
    assert isinstance(m, AIDMethod) and m.inner_steps == 3
    assert m.solver == CG(maxiter=2)
    assert _load({"kind": "aid", "solver": "neumann"}).solver == Neumann()
    assert _load({"kind": "aid", "solver": {"identity": {}}}).solver == Identity()
    assert _load({"kind": "aid"}).solver == CG(maxiter=10)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"kind": "funcid_lineer"}, "unknown kind 'funcid_lineer' (did you mean 'funcid_linear'?)"),
        ({"kind": "aid", "inner_lrr": 1.0}, "unknown key 'methods.m.inner_lrr' (did you mean"),
        ({"kind": "funcid_linear", "ridge": "big"}, "methods.m.ridge: expected a number"),
        ({"kind": "aid", "solver": {"cgg": {}}}, "unknown 'cgg' (did you mean 'cg'?)"),
        (
            {"kind": "aid", "solver": {"cg": {"maxiters": 2}}},
            "unknown key 'methods.m.solver.cg.maxiters' (did you mean "
            "'methods.m.solver.cg.maxiter'",
        ),
        ({"kind": "aid", "solver": {"cg": {}, "neumann": {}}}, "a one-key mapping"),
        ({"inner_lr": 1.0}, "missing required key 'methods.m.kind'"),
    ],
)
def test_invalid_entries_name_the_key(entry, message):
    with pytest.raises(ConfigError) as e:
        _load(entry)
    assert message in str(e.value)


def test_former_flat_entries_are_translated():
    flat = {
        "inner_lr": 1e-2,
        "solver": "cg",
        "solver_iters": 2,
        "cg_safeguards": False,
        "damping": 0.1,
        "ridge": 0.2,
        "adjoint_lr": 1e-5,
        "penalty": 3.0,
        "options": {},
    }
    out = translate_legacy("aid", flat)
    assert out == {
        "inner_lr": 1e-2,
        "solver": {"cg": {"maxiter": 2, "safeguards": False, "damping": 0.1}},
    }
    m = _load({"kind": "aid", **flat})
    assert m.solver == CG(maxiter=2, damping=0.1, safeguards=False)
    n = _load({"kind": "aid", "solver": "neumann", "solver_iters": 4, "neumann_lr": 0.5})
    assert n.solver == Neumann(iters=4, lr=0.5)
    assert _load({"kind": "funcid_linear", **flat}) == FuncIDLinear(inner_lr=1e-2, ridge=0.2)
    # a flat solver key also updates a solver given as a value (--set on a new config)
    k = _load({"kind": "aid", "solver": {"cg": {"maxiter": 2}}, "solver_iters": 5})
    assert k.solver == CG(maxiter=5)
    # a whole former flat record (every field) gives the same spec as its own fields
    old = dataclasses.asdict(MethodConfig(kind="aid", solver_iters=2, inner_steps=4))
    assert _load(old) == AIDMethod(inner_steps=4, solver=CG(maxiter=2))


def test_config_round_trip_writes_the_new_form():
    cfg = load_config_dict(
        {"experiment": "linear_iv", "methods": {"a": {"kind": "aid", "solver_iters": 3}}}
    )
    d = cfg.to_dict()["methods"]["a"]
    assert d["kind"] == "aid" and "solver_iters" not in d
    assert d["solver"] == {"cg": {"maxiter": 3, "tol": 1e-10, "damping": 0.0, "safeguards": True}}
    assert load_config_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def _inner():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_library_specs_build_the_estimators_with_their_settings():
    inner = _inner()
    ctx = BuildContext(inner)
    f = make_method("funcid_linear", ridge=0.2, ridge_relative=False, inner_steps=3).build(ctx)
    assert isinstance(f, FuncID) and isinstance(f.adjoint, LinearAdjoint)
    assert f.adjoint.ridge == 0.2 and not f.adjoint.relative and f.inner.steps == 3
    n = make_method("funcid", adjoint_steps=4, adjoint_init="inner").build(ctx)
    assert isinstance(n.adjoint, NetworkAdjoint) and n.adjoint.steps == 4
    spec = make_method("aid", solver={"cg": {"maxiter": 2, "safeguards": False}})
    a = spec.build(ctx)
    assert isinstance(a, AID) and a.solver == CG(maxiter=2, safeguards=False)
    t = make_method("itd", inner_lr=0.1, unroll=5, truncate=2).build(ctx)
    assert isinstance(t, ITD) and (t.lr, t.unroll, t.truncate) == (0.1, 5, 2)
    assert isinstance(make_method("gradient_penalty", penalty=0.5).build(ctx), GradientPenalty)
    assert isinstance(make_method("value_penalty").build(ctx), ValuePenalty)
    with pytest.raises(ValueError, match="does not take a replacement inner solver"):
        make_method("itd").build(BuildContext(inner, inner_solver=object()))


def test_library_method_of_a_flat_record():
    assert library_method(MethodConfig(kind="aid", solver="identity")) == AIDMethod(
        solver=Identity()
    )
    with pytest.raises(ValueError, match="not a library estimator"):
        library_method(MethodConfig(kind="dfiv"))


def test_register_rejects_non_specs_and_a_second_class_under_one_name():
    with pytest.raises(TypeError):
        register_method("plain")(dict)
    with pytest.raises(ValueError, match="already registered"):

        @register_method("aid")
        @dataclass
        class Other(MethodSpec):
            pass


# ---- the tutorial's example: a method added in one file, used from one config entry -------
@register_method("funcid_sgd")
@dataclass
class FuncIDSGD(EstimatorMethod):
    """FuncID with plain SGD inner steps and a closed-form adjoint of absolute ridge."""

    inner_lr: float = 0.05
    ridge: float = 1e-3

    def _build(self, context: BuildContext) -> FuncID:
        opt = torch.optim.SGD(context.inner_model.parameters(), lr=self.inner_lr)
        adjoint = LinearAdjoint(self.ridge, relative=False)
        return FuncID(context.inner_model, opt, self.inner_steps, adjoint)


def test_a_method_registered_in_a_test_module_runs_in_a_sweep(tmp_path):
    # the tutorial's runnable copy of this example (tests/test_docs.py) registers a class of the
    # same name after this module was imported: make this module's class the registered one
    register_method("funcid_sgd")(FuncIDSGD)
    raw = {
        "experiment": "linear_iv",
        "seeds": [0],
        "iterations": 2,
        "eval_every": 1,
        "dtype": "float64",
        "problem": {"n": 200, "width": 16, "batch_size": 32},
        "methods": {"mine": {"kind": "funcid_sgd", "inner_steps": 2, "ridge": 1e-2}},
    }
    cfg = load_config_dict(raw)
    assert cfg.methods["mine"] == FuncIDSGD(inner_steps=2, ridge=1e-2)
    result = run_sweep(plan_runs(cfg), tmp_path / "out", workers=1, progress=False)
    assert result.ok and result.finished == ["mine/seed_0"]
    summary = json.loads((tmp_path / "out" / "mine" / "seed_0" / "summary.json").read_text())
    assert summary["method"] == "mine" and summary["iterations"] == 2
    run_config = (tmp_path / "out" / "mine" / "seed_0" / "config.yaml").read_text()
    assert "kind: funcid_sgd" in run_config


def test_a_qualified_kind_imports_its_module(tmp_path, monkeypatch):
    (tmp_path / "my_methods_mod.py").write_text(
        "from dataclasses import dataclass\n"
        "from funcbo.experiments.methods import FuncIDLinear, register_method\n\n\n"
        '@register_method("funcid_mod")\n'
        "@dataclass\n"
        "class FuncIDMod(FuncIDLinear):\n"
        '    """A linear FuncID under another name."""\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = _load({"kind": "my_methods_mod:funcid_mod", "ridge": 0.5})
    assert type(m).__name__ == "FuncIDMod" and m.ridge == 0.5
    # written back with the qualified kind, so a fresh process finds the module again
    cfg = load_config_dict({"experiment": "linear_iv", "methods": {"m": {"kind": m.kind}}})
    assert cfg.to_dict()["methods"]["m"]["kind"] == "my_methods_mod:funcid_mod"
    with pytest.raises(ConfigError, match="no_such_module"):
        _load({"kind": "no_such_module:x"})
