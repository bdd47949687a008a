"""The IV experiments' method specs: registered in scope "iv", selected by kind, their former
flat entries translated, and DFIV and the ridge-head inner solver built by the specs."""

import dataclasses

import pytest

import funcbo.cli  # noqa: F401 - registers the built-in experiments
from funcbo.apps.iv.config import (
    FEATURE_KINDS,
    IV_KINDS,
    IVAID,
    IVITD,
    PAPER_METHODS,
    RIDGE_HEAD_KINDS,
    DFIVMethod,
    GradientSteps,
    IVFuncIDLinear,
    IVMethodConfig,
    RidgeHead,
    as_method_config,
    paper_method,
)
from funcbo.experiments.config import ConfigError, load_config_dict
from funcbo.experiments.methods import FuncIDLinear, MethodConfig
from funcbo.linalg import CG


def _load(entry, experiment="iv_dsprites"):
    return load_config_dict({"experiment": experiment, "methods": {"m": entry}}).methods["m"]


def test_iv_kinds_are_the_apps_specs():
    assert (
        set(IV_KINDS)
        == set(PAPER_METHODS)
        == {
            "funcid",
            "funcid_linear",
            "dfiv",
            "aid",
            "itd",
            "gradient_penalty",
            "value_penalty",
        }
    )
    assert set(FEATURE_KINDS) == {"aid", "itd", "gradient_penalty", "value_penalty"}
    assert set(RIDGE_HEAD_KINDS) == {"funcid", "funcid_linear", "aid"}
    # the same kind names another spec in linear_iv (the library's) and in the IV experiments
    m = _load({"kind": "funcid_linear", "inner_solver": "ridge_head"})
    assert isinstance(m, IVFuncIDLinear) and isinstance(m, FuncIDLinear)
    lin = load_config_dict({"experiment": "linear_iv", "methods": {"m": {"kind": "funcid_linear"}}})
    assert type(lin.methods["m"]) is FuncIDLinear
    with pytest.raises(ConfigError, match="unknown kind 'dfiv'"):
        load_config_dict({"experiment": "linear_iv", "methods": {"m": {"kind": "dfiv"}}})


def test_each_iv_spec_has_only_its_fields():
    names = {k: {f.name for f in dataclasses.fields(type(m))} for k, m in PAPER_METHODS.items()}
    assert "stage2_steps" in names["dfiv"] and "head" not in names["dfiv"]
    assert "formulation" not in names["funcid"] and "inner_solver" in names["funcid"]
    assert "inner_solver" not in names["itd"] and "formulation" in names["itd"]
    assert all("covariate_steps" in n for n in names.values())
    assert isinstance(PAPER_METHODS["aid"], IVAID)
    assert PAPER_METHODS["aid"].solver == CG(maxiter=2, safeguards=False)


def test_former_flat_iv_entries_load_and_their_errors_stay_errors():
    flat = dataclasses.asdict(MethodConfig(kind="dfiv", inner_steps=20))
    flat.update(head=None, formulation="functional", inner_solver="gradient", stage2_steps=1)
    flat.update(covariate_steps=20, covariate_weight_decay=0.1)
    assert _load(flat) == DFIVMethod(inner_steps=20)
    aid = {**flat, "kind": "aid", "formulation": "features", "solver_iters": 2}
    assert _load(aid) == IVAID(inner_steps=20, formulation="features", solver=CG(maxiter=2))
    # a value a kind never accepted is still an error (an unknown key now)
    with pytest.raises(ConfigError, match="unknown key 'methods.m.inner_solver'"):
        _load({"kind": "itd", "inner_solver": "ridge_head"})
    with pytest.raises(ConfigError, match="unknown key 'methods.m.formulation'"):
        _load({"kind": "funcid_linear", "formulation": "features"})
    with pytest.raises(ConfigError, match="formulation='features' fits the stage-1 head"):
        _load({"kind": "aid", "formulation": "features", "inner_solver": "ridge_head"})
    with pytest.raises(ConfigError, match=r"unknown 'ridge' \(did you mean 'ridge_head'\?\)"):
        _load({"kind": "aid", "inner_solver": "ridge"})
    with pytest.raises(ValueError, match="inner_solver must be one of"):
        IVFuncIDLinear(inner_solver="ridge")


def test_the_inner_solver_is_a_value():
    m = _load({"kind": "funcid_linear", "inner_solver": "ridge_head"})
    assert (
        m.inner_solver
        == RidgeHead()
        == _load({"kind": "funcid_linear", "inner_solver": {"ridge_head": {}}}).inner_solver
    )
    assert _load({"kind": "aid"}).inner_solver == GradientSteps()
    assert IVFuncIDLinear(inner_solver="ridge_head").inner_solver == RidgeHead()
    entry = load_config_dict({"experiment": "iv_dsprites", "methods": {"m": m}}).to_dict()
    assert entry["methods"]["m"]["inner_solver"] == {"ridge_head": {}}


def test_paper_method_and_as_method_config():
    m = paper_method("itd", inner_steps=2, adjoint_steps=2, covariate_steps=2)
    assert isinstance(m, IVITD) and (m.inner_steps, m.covariate_steps, m.unroll) == (2, 2, 20)
    assert as_method_config(m) is m
    assert as_method_config(MethodConfig(kind="aid", inner_steps=3)) == IVAID(inner_steps=3)
    assert isinstance(as_method_config({"kind": "dfiv"}), IVMethodConfig)
    with pytest.raises(ValueError, match="unknown IV method kind"):
        as_method_config({"kind": "nope"})
