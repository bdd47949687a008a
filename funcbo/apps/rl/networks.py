"""Networks of the model-based RL application: double Q-function, model T_ω, value ensemble.

The architectures follow OMD's CartPole code (Nikishin et al., AAAI 2022; github.com/
evgenii-nikishin/omd, ``cartpole/utils.py::net_fn``): every MLP has two hidden ReLU layers,
orthogonal weights with gain √2 on hidden layers and 1e-2 on the output layer, zero biases. The
double Q-function is two independent MLPs; the model is a next-state MLP and a reward MLP on
[s, one_hot(a)] that predict the next state itself (not the difference), as in OMD.
"""

from __future__ import annotations

import math
from typing import Any
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HIDDEN_GAIN = math.sqrt(2.0)
OUTPUT_GAIN = 1e-2


class EnsembleLinear(nn.Module):
    """E independent affine maps applied in one batched matmul.

    y_e = x_e W_e + b_e with W ∈ R^{E×in×out}; an input ``[B, in]`` is shared by all members,
    an input ``[E, B, in]`` gives each member its own. Output ``[E, B, out]``.
    """

    def __init__(self, members: int, in_features: int, out_features: int, gain: float) -> None:
        super().__init__()
        self.members = members
        self.in_features = in_features
        self.out_features = out_features
        self.gain = gain
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(members, 1, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orthogonal weights (per member) with this layer's gain, zero biases."""
        with torch.no_grad():
            for e in range(self.members):
                w = torch.empty(self.out_features, self.in_features, dtype=self.weight.dtype)
                nn.init.orthogonal_(w, gain=self.gain)
                self.weight[e].copy_(w.T)
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return torch.matmul(x, self.weight) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """E independent MLPs in → hidden → hidden → out (ReLU), evaluated together: ``[E, B, out]``."""

    def __init__(self, members: int, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.l1 = EnsembleLinear(members, in_dim, hidden, HIDDEN_GAIN)
        self.l2 = EnsembleLinear(members, hidden, hidden, HIDDEN_GAIN)
        self.l3 = EnsembleLinear(members, hidden, out_dim, OUTPUT_GAIN)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))


class DoubleQ(nn.Module):
    """Double Q-function: ``heads`` independent MLPs s ↦ Q_k(s, ·) ∈ R^A, output ``[heads, B, A]``.

    Args:
        obs_dim: observation size.
        n_actions: number of discrete actions A.
        hidden: width of both hidden layers (32 in the paper).
        heads: number of Q-functions (2: double Q-learning).
    """

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.n_actions = n_actions
        self.heads = heads
        self.net = EnsembleMLP(heads, obs_dim, hidden, n_actions)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs)


class QOfAction(nn.Module):
    """The inner model h(s, a) = [Q_1(s, a), …, Q_K(s, a)]: the Q-values of the *taken* action.

    Written this way the inner loss ½Σ_k (h_k(s, a) − y)² is a squared loss in the prediction,
    so its output Hessian is the identity (the functional view of FuncID applies exactly).

    Input: the tuple ``(obs [B, d], action [B] long)``; output ``[B, K]``.
    """

    def __init__(self, q: DoubleQ) -> None:
        super().__init__()
        self.q = q

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        obs, action = inputs
        qs = self.q(obs)  # [K, B, A]
        idx = action.reshape(1, -1, 1).expand(qs.shape[0], -1, 1)
        return qs.gather(2, idx).squeeze(2).transpose(0, 1)


class ScaledOutput(nn.Module):
    """x ↦ scale · f(x): a network whose raw output lives on a 1/scale smaller scale.

    FuncID's adjoint of this application is a*(s, a) ≈ −g with g = ∂_v ℓ_out the per-sample
    Bellman residual (order 1 to 100). The reference implementation's adjoint network instead
    regresses the gradient of the *batch-mean* outer loss, g/B; with Adam's scale-free steps that
    parameterisation moves B times faster in output units. ``ScaledOutput(net, B)`` reproduces it
    while keeping the library's per-sample convention a = scale · net(x).
    """

    def __init__(self, module: nn.Module, scale: float) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"output scale must be > 0, got {scale}")
        self.module = module
        self.scale = float(scale)

    def forward(self, x: Any) -> Tensor:
        return self.scale * self.module(x)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    net = nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, out_dim),
    )
    init_mlp(net)
    return net


def init_mlp(net: nn.Sequential) -> None:
    """OMD's initialisation: orthogonal (gain √2 hidden, 1e-2 output), zero biases."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            nn.init.orthogonal_(
                lin.weight, gain=OUTPUT_GAIN if i == len(linears) - 1 else HIDDEN_GAIN
            )
            nn.init.zeros_(lin.bias)


class DynamicsModel(nn.Module):
    """The learned model T_ω(s, a) = (ŝ′, r̂): separate next-state and reward MLPs.

    Both take x = [s, one_hot(a)] and have two hidden ReLU layers of width ``hidden`` (h = 3 is
    the capacity-limited setting of the paper). ``predict_delta`` makes the next-state head
    predict s′ − s (ŝ′ = s + MLP(x)); by default it predicts s′ itself, as OMD does.

    Returns ``(next_obs [B, d], reward [B, 1])``.
    """

    def __init__(
        self, obs_dim: int, n_actions: int, hidden: int = 3, *, predict_delta: bool = False
    ) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"model hidden width must be ≥ 1, got {hidden}")
        self.obs_dim = obs_dim
        self.n_actions = n_actions
        self.predict_delta = predict_delta
        self.next_state = _mlp(obs_dim + n_actions, hidden, obs_dim)
        self.reward = _mlp(obs_dim + n_actions, hidden, 1)

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([obs, F.one_hot(action, self.n_actions).to(obs.dtype)], dim=1)
        ns = self.next_state(x)
        if self.predict_delta:
            ns = obs + ns
        return ns, self.reward(x)

    def reset_parameters(self) -> None:
        init_mlp(self.next_state)
        init_mlp(self.reward)


class ValueEnsemble(nn.Module):
    """E random value functions V_e: R^d → R (VEP's fixed ensemble); output ``[E, B, 1]``."""

    def __init__(self, obs_dim: int, members: int = 5, hidden: int = 32) -> None:
        super().__init__()
        self.net = EnsembleMLP(members, obs_dim, hidden, 1)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs)


_PARAMETERS: WeakKeyDictionary[nn.Module, list[Tensor]] = WeakKeyDictionary()


def parameter_list(module: nn.Module) -> list[Tensor]:
    """``list(module.parameters())``, listed once per module and remembered.

    Walking the submodules costs more than a small network's arithmetic when it happens
    several times per environment step; the networks here keep their parameter tensors for
    life (optimizer steps, Polyak averaging and ``load_state_dict`` write into them in place).
    Do not use it for a module whose parameters are replaced.
    """
    params = _PARAMETERS.get(module)
    if params is None:
        params = _PARAMETERS[module] = list(module.parameters())
    return params


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Q̄ ← τ·Q + (1 − τ)·Q̄, parameter by parameter."""
    torch._foreach_lerp_(parameter_list(target), parameter_list(online), tau)


__all__ = [
    "DoubleQ",
    "DynamicsModel",
    "EnsembleLinear",
    "EnsembleMLP",
    "QOfAction",
    "ScaledOutput",
    "ValueEnsemble",
    "init_mlp",
    "parameter_list",
    "polyak_update",
]
