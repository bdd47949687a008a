"""The RL experiment's method specs: registered in scope "rl", each with its own fields, built
by kind from the base class, and their former flat entries translated."""

import dataclasses

import pytest
import torch

import funcbo.cli  # noqa: F401 - registers the built-in experiments
from funcbo.apps.rl.config import (
    BILEVEL_KINDS,
    OMDCG,
    RL_KINDS,
    FuncIDNetworkRL,
    FuncIDReference,
    ModelFree,
    RLBilevelMethod,
    RLMethodConfig,
    RLModelMethod,
)
from funcbo.experiments.config import ConfigError, load_config_dict
from funcbo.experiments.methods import MethodConfig, method_kinds
from funcbo.linalg import CG


def _load(entry):
    return load_config_dict({"experiment": "rl_cartpole", "methods": {"m": entry}}).methods["m"]


def test_rl_kinds_are_registered_specs():
    assert set(method_kinds(RLMethodConfig)) == set(RL_KINDS)
    assert set(method_kinds(RLBilevelMethod)) == set(BILEVEL_KINDS)
    assert set(method_kinds(RLModelMethod)) == set(RL_KINDS) - {"model_free"}
    assert RLMethodConfig() == FuncIDReference()  # the authors' FuncID by default
    m = RLMethodConfig(kind="omd_cg", inner_lr=1e-3)
    assert isinstance(m, OMDCG) and m.inner_lr == 1e-3
    assert m.solver == CG(maxiter=10, damping=1e-5) and not m.warm_start
    with pytest.raises(ValueError, match="unknown kind 'ppo'"):
        RLMethodConfig(kind="ppo")
    with pytest.raises(ConfigError, match="unknown kind 'aid'"):
        _load({"kind": "aid"})


def test_each_rl_spec_has_only_its_fields():
    free = {f.name for f in dataclasses.fields(ModelFree)}
    assert free == {"inner_optimizer", "inner_lr", "inner_weight_decay"}
    net = {f.name for f in dataclasses.fields(FuncIDNetworkRL)}
    assert {"adjoint_lr", "adjoint_at", "warm_opt", "inner_steps"} <= net
    assert "solver_iters" not in net and "model_steps" not in net
    with pytest.raises(ConfigError, match="unknown key 'methods.m.warm_optt'"):
        _load({"kind": "omd", "warm_optt": True})
    # a field of the former flat record that this kind never read is dropped, as it was ignored
    assert _load({"kind": "omd", "adjoint_lr": 1e-3}) == RLMethodConfig(kind="omd")
    with pytest.raises(ConfigError, match="adjoint_at must be one of"):
        _load({"kind": "funcid_network", "adjoint_at": "nowhere"})


def test_former_flat_rl_entries_are_translated():
    flat = dataclasses.asdict(MethodConfig(kind="omd_cg"))
    flat.update(inner_lr=3e-4, inner_steps=1, outer_lr=1e-3, adjoint_lr=3e-4, adjoint_steps=5)
    flat.update(warm_opt=False, cg_damping=1e-4, cg_warm_start=True, model_steps=1)
    flat.update(adjoint_scale=None, adjoint_at="solution", solver_iters=7)
    m = _load(flat)
    assert m == OMDCG(solver=CG(maxiter=7, damping=1e-4), warm_start=True)
    assert _load({**flat, "kind": "model_free"}) == ModelFree()
    assert _load({**flat, "kind": "mle", "model_steps": 3}).model_steps == 3


def test_omd_cg_solver_is_a_cg_value():
    m = _load({"kind": "omd_cg", "solver": {"cg": {"maxiter": 3, "damping": 1e-3}}})
    assert m.solver == CG(maxiter=3, damping=1e-3)
    assert _load({"kind": "omd_cg"}).solver == CG(maxiter=10, damping=1e-5)
    # the committed paper config's flat entry: OMD's damping kept
    assert _load({"kind": "omd_cg", "solver_iters": 10}) == OMDCG()
    assert _load({"kind": "omd_cg", "cg_damping": 0.1}).solver == CG(maxiter=10, damping=0.1)
    # a flat field updates a solver value given with it (a --set on a new config)
    m = _load({"kind": "omd_cg", "solver": {"cg": {"tol": 1e-6}}, "solver_iters": 4})
    assert m.solver == CG(maxiter=4, tol=1e-6)
    with pytest.raises(ConfigError, match="unknown 'neumann'"):
        _load({"kind": "omd_cg", "solver": {"neumann": {}}})
    with pytest.raises(ConfigError, match="did you mean 'methods.m.solver.cg.maxiter'"):
        _load({"kind": "omd_cg", "solver": {"cg": {"maxiterr": 3}}})
    est = m.estimator(None, torch.nn.Linear(2, 1), None, None)[1]
    assert est.solver == CG(maxiter=4, tol=1e-6) and not est.warm_start
