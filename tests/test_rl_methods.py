"""VEP's update rule against the OMD authors' code, number for number.

The reference numbers below come from github.com/evgenii-nikishin/omd, ``cartpole/omd.py``
(``Agent.update`` with ``agent_type="vep"``, ``loss_vep``, ``loss_Q``) and ``cartpole/utils.py``
(``net_fn``, ``soft_update_params``), run unmodified in float64 (jax 0.4.30, haiku 0.0.12,
optax 0.2.2) from the deterministic parameters and batches built here: model hidden width 3,
Q and value networks of width 32, 5 value functions, Adam 1e-3 (model) and 3e-4 (Q), τ = 0.01,
γ = 0.99, α = 0.01. Each update is one model step on one batch, then one Q-step on the next
batch with the updated model's targets, then the Polyak update. (The authors' ``update`` also
draws one batch that VEP never uses; it only advances their sampler.)
"""

from __future__ import annotations

import math

import pytest
import torch

from funcbo.apps.rl.methods import ModelFittingUpdater, make_optimizer
from funcbo.apps.rl.networks import (
    OUTPUT_GAIN,
    DoubleQ,
    DynamicsModel,
    EnsembleLinear,
    QOfAction,
    ValueEnsemble,
)
from funcbo.apps.rl.problem import SoftBellmanProblem

B = 8
F64 = torch.float64

# the authors' code on the parameters and batches below
REF_FIRST_REWARD_TERM = 0.508898437787882
REF_FIRST_VALUE_TERM = 27.252372644996775
REF_UPDATES = [  # (model loss, Q-loss, next-state mse) returned by each update
    (27.76127108278465, 0.1111586449022454, 1.7146453010863747),
    (27.559535330435903, 0.12441311389103511, 1.7171865891909557),
    (28.001916048958893, 0.08655348585207645, 1.7707964559411435),
]
REF_SUMS = (7.796754426115255, -1.3969529274998045, -1.3918957837904995)  # T, Q, target Q


def fill(shape: tuple[int, ...], k: int, scale: float) -> torch.Tensor:
    """scale · sin(0.37 i + k/2) over the entries in row-major order (haiku layout [in, out])."""
    n = math.prod(shape)
    return scale * torch.sin(0.37 * torch.arange(n, dtype=F64) + 0.5 * k).reshape(shape)


def set_linear(lin: torch.nn.Linear, k: int, gain: float) -> None:
    lin.weight.copy_(fill((lin.in_features, lin.out_features), k, gain).T)
    lin.bias.copy_(fill((lin.out_features,), k + 100, 0.1))


def set_member(lay: EnsembleLinear, e: int, k: int, gain: float) -> None:
    lay.weight[e].copy_(fill((lay.in_features, lay.out_features), k, gain))
    lay.bias[e, 0].copy_(fill((lay.out_features,), k + 100, 0.1))


@torch.no_grad()
def reference_networks() -> tuple[DynamicsModel, DoubleQ, DoubleQ, ValueEnsemble]:
    model = DynamicsModel(4, 2, hidden=3).to(F64)
    gains = [0.8, 0.8, 0.3] * 2
    linears = [m for m in (*model.next_state, *model.reward) if isinstance(m, torch.nn.Linear)]
    for j, (lin, g) in enumerate(zip(linears, gains, strict=True)):
        set_linear(lin, 10 + j, g)
    q = DoubleQ(4, 2, 32).to(F64)
    for h in range(2):
        for li, (lay, g) in enumerate(
            zip((q.net.l1, q.net.l2, q.net.l3), (0.5, 0.25, 0.1), strict=True)
        ):
            set_member(lay, h, 20 + 3 * h + li, g)
    target = DoubleQ(4, 2, 32).to(F64)
    target.load_state_dict(q.state_dict())
    for p in target.parameters():
        p.requires_grad_(False)
    values = ValueEnsemble(4, 5, 32).to(F64)
    for e in range(5):
        for li, (lay, g) in enumerate(
            zip((values.net.l1, values.net.l2, values.net.l3), (0.5, 0.25, 0.5), strict=True)
        ):
            set_member(lay, e, 40 + 3 * e + li, g)
    return model, q, target, values


def batch(k: int) -> dict[str, torch.Tensor]:
    i = torch.arange(B, dtype=F64)
    obs = torch.stack(
        [torch.sin(0.9 * i + k + c) * s for c, s in enumerate([1.0, 0.8, 0.15, 1.2])], 1
    )
    not_done = torch.ones(B, 1, dtype=F64)
    not_done[(k + 3) % B] = 0.0
    return {
        "obs": obs,
        "action": (torch.arange(B) + k) % 2,
        "reward": torch.ones(B, 1, dtype=F64),
        "next_obs": obs + 0.05 * torch.cos(1.3 * i + k)[:, None],
        "not_done": not_done,
    }


def vep_updater() -> tuple[ModelFittingUpdater, DynamicsModel, DoubleQ, DoubleQ]:
    model, q, target, values = reference_networks()
    updater = ModelFittingUpdater(
        "vep", SoftBellmanProblem(0.99, 0.01), model,
        make_optimizer("adam", model.parameters(), 1e-3), QOfAction(q),
        make_optimizer("adam", q.parameters(), 3e-4), q, target, 0.01, values=values,
    )  # fmt: skip
    return updater, model, q, target


def test_vep_model_loss_matches_the_authors_loss_vep():
    updater, _, _, _ = vep_updater()
    b = batch(2)
    loss, _, rew = updater.model_loss(b)
    assert float(rew) == pytest.approx(REF_FIRST_REWARD_TERM, rel=1e-12)
    assert float(loss.detach() - rew) == pytest.approx(REF_FIRST_VALUE_TERM, rel=1e-12)


def test_vep_updates_match_the_authors_code():
    updater, model, q, target = vep_updater()
    k = 1  # batch 1 is the authors' unused draw
    for ref in REF_UPDATES:

        def sample() -> dict[str, torch.Tensor]:
            nonlocal k
            k += 1
            return batch(k)

        out = updater.update(sample)
        k += 1  # the next update's unused draw
        assert (out["model_loss"], out["q_loss"], out["model_mse"]) == pytest.approx(ref, rel=1e-9)
    sums = [sum(float(p.detach().sum()) for p in m.parameters()) for m in (model, q, target)]
    assert sums == pytest.approx(REF_SUMS, rel=1e-9)


def test_value_ensemble_is_fixed_and_initialised_as_in_omd():
    values = ValueEnsemble(4, 5, 32)
    assert not any(p.requires_grad for p in values.parameters())
    layers = (values.net.l1, values.net.l2, values.net.l3)
    assert all(float(lay.bias.abs().max()) == 0.0 for lay in layers)
    eye4 = torch.eye(4)
    for e in range(5):
        w1 = values.net.l1.weight[e]  # [4, 32]: orthonormal rows times √2
        assert torch.allclose(w1 @ w1.T, 2.0 * eye4, atol=1e-5)
        assert float(values.net.l3.weight[e].norm()) == pytest.approx(OUTPUT_GAIN, rel=1e-5)
