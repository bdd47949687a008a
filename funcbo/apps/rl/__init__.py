"""Model-based reinforcement learning on CartPole as a functional bilevel problem.

The model T_ω(s, a) = (ŝ′, r̂) is the outer variable; the double soft Q-function fitted to the
model's Bellman targets is the inner one; the outer objective is the Bellman error of that
Q-function on real transitions (Nikishin et al., AAAI 2022; Petrulionyte, Mairal & Arbel,
NeurIPS 2024). gymnasium is imported only when an environment is made.

Modules: ``env`` (CartPole wrapper with termination/truncation and saveable state), ``vec_env``
(CartPole-v1 in torch, N environments stepped as one batch, matching gymnasium), ``replay``,
``networks``, ``problem`` (the :class:`~funcbo.BilevelProblem`), ``adjoint`` (the identity
output-Hessian shortcut), ``solution`` (the inner solution h* = ŷ, at which FuncID's adjoint is
evaluated by ``funcid_solution`` and ``funcid_network``), ``methods`` (update rules), ``agent``
(the loop), ``config``, ``task`` and ``experiment`` (registers ``rl_cartpole``), ``speed``
(environment steps per second of every method: ``python -m funcbo.apps.rl.speed``).
"""

from funcbo.apps.rl.adjoint import PointwiseAdjoint
from funcbo.apps.rl.config import RL_KINDS, RLMethodConfig, RLProblemConfig
from funcbo.apps.rl.networks import DoubleQ, DynamicsModel, QOfAction, ValueEnsemble
from funcbo.apps.rl.problem import SoftBellmanProblem, soft_value, with_target
from funcbo.apps.rl.replay import ReplayBuffer
from funcbo.apps.rl.solution import BellmanSolution, SolutionProblem
from funcbo.apps.rl.vec_env import TorchCartPole, VecStep

__all__ = [
    "RL_KINDS",
    "BellmanSolution",
    "DoubleQ",
    "DynamicsModel",
    "PointwiseAdjoint",
    "QOfAction",
    "RLMethodConfig",
    "RLProblemConfig",
    "ReplayBuffer",
    "SoftBellmanProblem",
    "SolutionProblem",
    "TorchCartPole",
    "ValueEnsemble",
    "VecStep",
    "soft_value",
    "with_target",
]
