"""R runs of one RL method as one batched program: stacked networks, per-run optimizer state.

The run index is a leading batch dimension of every tensor. A layer of the double Q-function of
R runs is one ``baddbmm`` over R·K members (K heads per run); the model's next-state and reward
MLPs are R members each; VEP's value ensemble is R·E members. Every loss is a per-run mean,
and gradients are taken of the *sum* of the per-run losses: runs share no parameter, so each
run's gradient is exactly its own loss's gradient. Adam is elementwise, so one optimizer over
the stacked tensors is R independent optimizers; learning rates (and the Polyak rate τ) are
per-run tensors, so grid points that differ only in them share a batch.

The update rules are those of :mod:`funcbo.apps.rl.methods`, written out for the stacked
parameters (the bilevel ones through their closed forms: FuncID with a pointwise adjoint and
OMD's AID, with the identity or CG's solution of the damped parameter-space Hessian, are the
gradient of ω ↦ mean_i c_i · ŷ_i(ω) for a coefficient c computed without a graph to ω, see
:meth:`BatchedUpdater._hypergradient`). ``omd_cg``'s CG runs per run
(:func:`funcbo.linalg.batched_cg`: per-run inner products, step sizes, stopping and safeguards)
on the Hessian-vector products of the sum of the runs' inner losses, which is block diagonal
across runs. In float64 one batched update equals, run by run, the unbatched updater's update
on the same batch to rounding (``tests/test_rl_batched.py``).

Supported kinds: :data:`BATCHED_KINDS`, every RL kind (``funcid_network`` with its adjoint at
the inner solution, the default), with Adam optimizers and without ``predict_delta``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funcbo.apps.rl.config import (
    MLE,
    OMDCG,
    VEP,
    FuncIDNetworkRL,
    RLBilevelMethod,
    RLMethodConfig,
    RLModelMethod,
    RLProblemConfig,
)
from funcbo.apps.rl.networks import DoubleQ, DynamicsModel, EnsembleMLP, ValueEnsemble
from funcbo.linalg import batched_cg, run_norm

#: method kinds with a batched update rule
BATCHED_KINDS = (
    "funcid_reference",
    "funcid_identity",
    "funcid_solution",
    "funcid_network",
    "omd",
    "omd_cg",
    "mle",
    "vep",
    "model_free",
)
#: method fields that may differ between the runs of one batch (per-run tensors)
PER_RUN_METHOD_FIELDS = ("inner_lr",)
#: problem fields that may differ between the runs of one batch
PER_RUN_PROBLEM_FIELDS = ("tau",)

Params = list[Tensor]
Sampler = Callable[[], dict[str, Tensor]]


# ---------------------------------------------------------------------------- stacking
def ensemble_params(net: EnsembleMLP) -> Params:
    """``[W1, b1, W2, b2, W3, b3]`` of an :class:`EnsembleMLP` (W ``[E, in, out]``)."""
    return [t for lin in (net.l1, net.l2, net.l3) for t in (lin.weight, lin.bias)]


def sequential_params(net: nn.Sequential) -> Params:
    """``[W1, b1, ...]`` of an MLP of ``nn.Linear`` layers, as one member: W ``[1, in, out]``,
    b ``[1, 1, out]``."""
    out: Params = []
    for m in net:
        if isinstance(m, nn.Linear):
            out += [m.weight.T.unsqueeze(0), m.bias.reshape(1, 1, -1)]
    return out


def stack(per_run: Sequence[Params], *, requires_grad: bool) -> Params:
    """Concatenate the runs' member-stacked parameters along the member axis (copies)."""
    out = [torch.cat([p[i].detach() for p in per_run], 0).clone() for i in range(len(per_run[0]))]
    for t in out:
        t.requires_grad_(requires_grad)
    return out


def mlp(params: Params, x: Tensor) -> Tensor:
    """Members' MLPs in → h → h → out (ReLU) on ``x [M, B, in]``; output ``[M, B, out]``.

    Computed feature-major (activations ``[M, features, B]``: each product is Wᵀ·X with the B
    samples as its wide dimension), which is faster on the CPU than sample-major for these
    narrow layers (4 inputs, 2 or 4 outputs).
    """
    w1, b1, w2, b2, w3, b3 = params
    h = x.transpose(1, 2)
    h = F.relu(torch.baddbmm(b1.transpose(1, 2), w1.transpose(1, 2), h))
    h = F.relu(torch.baddbmm(b2.transpose(1, 2), w2.transpose(1, 2), h))
    return torch.baddbmm(b3.transpose(1, 2), w3.transpose(1, 2), h).transpose(1, 2)


def per_member(x: Tensor, members: int) -> Tensor:
    """``[R, B, d]`` → ``[R·members, B, d]``: each run's input for each of its members."""
    r, b, d = x.shape
    return x.unsqueeze(1).expand(r, members, b, d).reshape(r * members, b, d)


# --------------------------------------------------------------------------- optimizer
class BatchedAdam:
    """Adam (coupled weight decay, as ``torch.optim.Adam``) over stacked tensors.

    Each tensor's leading axis holds the members of R runs (``members`` per run); ``lr`` is a
    scalar or a per-run tensor ``[R]``. The update is elementwise, so run r's entries follow
    exactly the steps of ``torch.optim.Adam(lr=lr[r])`` on its own parameters.
    """

    def __init__(
        self,
        params: Params,
        runs: int,
        lr: float | Tensor,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = params
        self.runs = runs
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        lr_t = torch.as_tensor(lr, dtype=params[0].dtype).reshape(-1)
        if lr_t.numel() == 1:
            lr_t = lr_t.expand(runs)
        if lr_t.numel() != runs or not bool((lr_t > 0).all()):
            raise ValueError(f"BatchedAdam: lr must be > 0, one per run ({runs}); got {lr}")
        self.lr = lr_t.clone()
        self._lr = [self._broadcast(self.lr, p) for p in params]
        self.reset()

    def _broadcast(self, per_run: Tensor, p: Tensor) -> Tensor:
        members = p.shape[0] // self.runs
        return per_run.repeat_interleave(members).reshape(-1, *([1] * (p.dim() - 1)))

    def reset(self) -> None:
        """Forget the moment estimates and the step count (a fresh optimizer)."""
        self.step_count = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        """One Adam step with these gradients (aligned with ``params``)."""
        b1, b2 = self.betas
        self.step_count += 1
        bc1 = 1.0 - b1**self.step_count
        bc2_sqrt = math.sqrt(1.0 - b2**self.step_count)
        for p, g, m, v, lr in zip(
            self.params, grads, self.exp_avg, self.exp_avg_sq, self._lr, strict=True
        ):
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            m.lerp_(g, 1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom * (bc1 / lr), value=-1.0)

    def state_dict(self, run: int) -> dict[str, Any]:
        """Run ``run``'s moments (its slice of every tensor) and the step count."""
        return {
            "step": self.step_count,
            "exp_avg": [self._slice(t, run).clone() for t in self.exp_avg],
            "exp_avg_sq": [self._slice(t, run).clone() for t in self.exp_avg_sq],
        }

    def load_state_dict(self, run: int, state: dict[str, Any]) -> None:
        """Restore run ``run``'s slice; every run of a batch must be at the same step count."""
        self.step_count = int(state["step"])
        for dst, src in zip(self.exp_avg, state["exp_avg"], strict=True):
            self._slice(dst, run).copy_(src)
        for dst, src in zip(self.exp_avg_sq, state["exp_avg_sq"], strict=True):
            self._slice(dst, run).copy_(src)

    def _slice(self, t: Tensor, run: int) -> Tensor:
        m = t.shape[0] // self.runs
        return t[run * m : (run + 1) * m]


# ------------------------------------------------------------------------------ updater
class BatchedUpdater:
    """The update rule of one method kind for R runs at once (one call per environment step).

    Args:
        problem: the shared protocol; ``tau`` may be a per-run sequence (``taus``).
        method: the method; its ``inner_lr`` is overridden per run by ``inner_lrs``.
        q: the runs' double Q-networks (stacked into one ``[R·K, ...]`` set of tensors).
        target_q: their target networks.
        models: the runs' models (not for ``model_free``).
        values: VEP's value ensembles, one per run.
        adjoints: ``funcid_network``'s adjoint networks (of the Q-network's architecture), one
            per run.
        inner_lrs: per-run learning rates of the Q-function (default ``method.inner_lr``).
        taus: per-run Polyak rates (default ``problem.tau``).
    """

    def __init__(
        self,
        problem: RLProblemConfig,
        method: RLMethodConfig,
        q: Sequence[DoubleQ],
        target_q: Sequence[DoubleQ],
        models: Sequence[DynamicsModel] | None = None,
        values: Sequence[ValueEnsemble] | None = None,
        adjoints: Sequence[DoubleQ] | None = None,
        *,
        inner_lrs: Sequence[float] | None = None,
        taus: Sequence[float] | None = None,
    ) -> None:
        kind = method.kind
        if kind not in BATCHED_KINDS:
            raise ValueError(
                f"method kind {kind!r} has no batched update (batched kinds: "
                f"{', '.join(BATCHED_KINDS)}); run it without batch_seeds"
            )
        for name in ("inner_optimizer", "outer_optimizer"):
            # model_free has no model, hence no outer optimizer
            if getattr(method, name, "adam").lower() != "adam":
                raise ValueError(
                    f"batched runs use Adam; method {kind!r} asks for {name} = "
                    f"{getattr(method, name)!r}: run it without batch_seeds"
                )
        if kind == "funcid_network":
            assert isinstance(method, FuncIDNetworkRL)  # the spec registered under the kind
            if method.adjoint_at != "solution":
                raise ValueError(
                    "batched funcid_network fits its adjoint at the inner solution (adjoint_at: "
                    "solution); run adjoint_at: prediction without batch_seeds"
                )
        for name in ("adjoint_optimizer",) if kind == "funcid_network" else ():
            if getattr(method, name).lower() != "adam":
                raise ValueError(f"batched runs use Adam; method {kind!r} asks for {name}")
        if problem.predict_delta:
            raise ValueError("batched runs do not support predict_delta: run without batch_seeds")
        self.kind = kind
        self.cfg = problem
        self.method = method
        self.runs = r = len(q)
        self.heads = q[0].heads
        self.n_actions = q[0].n_actions
        self.gamma = problem.gamma
        self.alpha = problem.alpha
        self.target = problem.target
        dtype = next(q[0].parameters()).dtype
        self.dtype = dtype
        self.qp = stack([ensemble_params(m.net) for m in q], requires_grad=True)
        self.tq = stack([ensemble_params(m.net) for m in target_q], requires_grad=False)
        lrs = [method.inner_lr] * r if inner_lrs is None else list(inner_lrs)
        tau = [problem.tau] * r if taus is None else list(taus)
        if len(lrs) != r or len(tau) != r:
            raise ValueError(f"need one inner_lr and one tau per run ({r})")
        self.tau = torch.tensor(tau, dtype=dtype)
        self._tau = [self.tau.repeat_interleave(p.shape[0] // r).reshape(-1, 1, 1) for p in self.qp]
        self.q_opt = BatchedAdam(
            self.qp, r, torch.tensor(lrs, dtype=dtype), weight_decay=method.inner_weight_decay
        )
        self.mp_ns: Params = []
        self.mp_r: Params = []
        self.model_opt: BatchedAdam | None = None
        if kind != "model_free":
            assert isinstance(method, RLModelMethod)
            if models is None or len(models) != r:
                raise ValueError(f"method {kind!r} needs one model per run")
            self.mp_ns = stack(
                [sequential_params(m.next_state) for m in models], requires_grad=True
            )
            self.mp_r = stack([sequential_params(m.reward) for m in models], requires_grad=True)
            self.model_opt = BatchedAdam(
                self.mp_ns + self.mp_r, r, method.outer_lr, weight_decay=method.outer_weight_decay
            )
        self.vp: Params = []
        self.members = 0
        if kind == "vep":
            if values is None or len(values) != r:
                raise ValueError("vep needs one value ensemble per run")
            self.vp = stack([ensemble_params(v.net) for v in values], requires_grad=False)
            self.members = self.vp[0].shape[0] // r
        self.ap: Params = []
        self.adj_opt: BatchedAdam | None = None
        if kind == "funcid_network":
            assert isinstance(method, FuncIDNetworkRL)
            if adjoints is None or len(adjoints) != r:
                raise ValueError("funcid_network needs one adjoint network per run")
            self.ap = stack([ensemble_params(a.net) for a in adjoints], requires_grad=True)
            self.adj_opt = BatchedAdam(
                self.ap, r, method.adjoint_lr, weight_decay=method.adjoint_weight_decay
            )
            # a = scale · net(s, a): see networks.ScaledOutput
            self.adjoint_scale = (
                float(problem.batch_size) if method.adjoint_scale is None else method.adjoint_scale
            )
        #: omd_cg's last CG solution per run (stacked like ``qp``; the warm start) and which
        #: runs have one
        self.aid_v: Params = []
        self.aid_warm = torch.zeros(r, dtype=torch.bool)
        if kind == "omd_cg":
            self.aid_v = [torch.zeros_like(p).detach() for p in self.qp]

    # ------------------------------------------------------------------------- networks
    def q_values(self, params: Params, obs: Tensor) -> Tensor:
        """Q_k(s, ·) of every run and head: ``obs [R, B, d]`` → ``[R, K, B, A]``."""
        out = mlp(params, per_member(obs, self.heads))
        return out.reshape(self.runs, self.heads, obs.shape[1], self.n_actions)

    def q_of_action(self, params: Params, obs: Tensor, action: Tensor) -> Tensor:
        """[Q_1(s, a), …, Q_K(s, a)]: ``[R, B, K]``."""
        qs = self.q_values(params, obs)
        idx = action.unsqueeze(1).unsqueeze(-1).expand(-1, self.heads, -1, 1)
        return qs.gather(3, idx).squeeze(3).transpose(1, 2)

    def policy_logits(self, obs: Tensor) -> Tensor:
        """Q̄(s)/α with Q̄ the mean over heads of the online network: ``[R, B, A]``."""
        with torch.no_grad():
            return self.q_values(self.qp, obs).mean(1) / self.alpha

    def model(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """T_ω(s, a) = (ŝ′ ``[R, B, d]``, r̂ ``[R, B, 1]``)."""
        x = torch.cat([obs, F.one_hot(action, self.n_actions).to(obs.dtype)], dim=2)
        return mlp(self.mp_ns, x), mlp(self.mp_r, x)

    def soft_value(self, next_obs: Tensor) -> Tensor:
        """V̄(s′) of the target network: ``[R, B, 1]`` (``"min"``) or ``[R, B, K]``."""
        q = self.q_values(self.tq, next_obs)  # [R, K, B, A]
        if self.target == "min":
            m = q.min(dim=1).values
            return self.alpha * torch.logsumexp(m / self.alpha, dim=-1, keepdim=True)
        return (self.alpha * torch.logsumexp(q / self.alpha, dim=-1)).transpose(1, 2)

    def bellman_target(self, reward: Tensor, next_obs: Tensor, not_done: Tensor) -> Tensor:
        """r + γ (1 − d) V̄(s′) for every run."""
        return reward + self.gamma * not_done * self.soft_value(next_obs)

    @torch.no_grad()
    def polyak(self) -> None:
        """Q̄ ← τ_r Q + (1 − τ_r) Q̄ for every run r."""
        for t, p, w in zip(self.tq, self.qp, self._tau, strict=True):
            t.lerp_(p, w)

    # --------------------------------------------------------------------------- steps
    def _q_step(self, batch: dict[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        """One Adam step on mean ½Σ_k (Q_k(s, a) − y)² per run; the losses ``[R]`` and the
        predictions before the step."""
        pred = self.q_of_action(self.qp, batch["obs"], batch["action"])
        loss = 0.5 * (pred - y).square().sum(2).mean(1)
        grads = torch.autograd.grad(loss.sum(), self.qp)
        self.q_opt.step(grads)
        return loss.detach(), pred.detach()

    def update(self, sample: Sampler) -> dict[str, Tensor]:
        """One update of every run; metrics as per-run tensors ``[R]`` (the unbatched
        updaters' names)."""
        if self.kind == "model_free":
            return self._update_model_free(sample)
        if self.kind in ("mle", "vep"):
            return self._update_model_fitting(sample)
        return self._update_bilevel(sample)

    def _update_model_free(self, sample: Sampler) -> dict[str, Tensor]:
        b = sample()
        with torch.no_grad():
            y = self.bellman_target(b["reward"], b["next_obs"], b["not_done"])
        q_loss, _ = self._q_step(b, y)
        self.polyak()
        return {"q_loss": q_loss, "outer_loss": q_loss}

    def _model_loss(self, b: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        ns, r = self.model(b["obs"], b["action"])
        mse = (ns - b["next_obs"]).square().sum(2).mean(1)
        rew = (r - b["reward"]).square().mean(dim=(1, 2))
        if self.kind == "mle":
            return mse + rew, mse.detach(), rew.detach()
        e = self.members
        with torch.no_grad():
            v_real = mlp(self.vp, per_member(b["next_obs"], e))
        v_pred = mlp(self.vp, per_member(ns, e))
        err = (v_pred - v_real).square().mean(dim=(1, 2)).reshape(self.runs, e).sum(1)
        return err + rew, mse.detach(), rew.detach()

    def _update_model_fitting(self, sample: Sampler) -> dict[str, Tensor]:
        assert self.model_opt is not None
        assert isinstance(self.method, (MLE, VEP))
        for _ in range(self.method.model_steps):
            loss, mse, rew = self._model_loss(sample())
            grads = torch.autograd.grad(loss.sum(), self.model_opt.params)
            self.model_opt.step(grads)
        b = sample()
        with torch.no_grad():
            ns, r = self.model(b["obs"], b["action"])
            y_model = self.bellman_target(r, ns, b["not_done"])
        q_loss, pred = self._q_step(b, y_model)
        self.polyak()
        with torch.no_grad():  # the real Bellman error, with the updated target network
            y = self.bellman_target(b["reward"], b["next_obs"], b["not_done"])
            outer = 0.5 * (pred - y).square().sum(2).mean(1)
        return {
            "q_loss": q_loss,
            "outer_loss": outer,
            "model_loss": loss.detach(),
            "model_mse": mse,
            "reward_mse": rew,
        }

    def _update_bilevel(self, sample: Sampler) -> dict[str, Tensor]:
        assert self.model_opt is not None
        method = self.method
        assert isinstance(method, RLBilevelMethod)
        b = sample()
        obs, action, nd = b["obs"], b["action"], b["not_done"]
        with torch.no_grad():
            ns, r = self.model(obs, action)
            y_model = self.bellman_target(r, ns, nd)
            model_mse = (ns - b["next_obs"]).square().sum(2).mean(1)
            reward_mse = (r - b["reward"]).square().mean(dim=(1, 2))
        if not method.warm_opt:
            self.q_opt.reset()
            if self.adj_opt is not None:
                self.adj_opt.reset()
        q_loss = torch.full((self.runs,), math.nan, dtype=self.dtype)
        for _ in range(method.inner_steps):
            q_loss, _ = self._q_step(b, y_model)
        self.polyak()
        out = self._hypergradient(b)
        self.model_opt.step(out.pop("_grads"))
        return {"q_loss": q_loss, "model_mse": model_mse, "reward_mse": reward_mse, **out}

    def _hypergradient(self, b: dict[str, Tensor]) -> dict[str, Any]:
        """∇_ω of the real Bellman error, per run, through the closed forms of the estimators.

        With ℓ_in = ½Σ_k (v_k − ŷ(ω))² every estimator here gives ∇F = mean_i c_i ∂_ω ŷ_i:

        * FuncID, pointwise adjoint a = −g at the Q-network (``funcid_reference``,
          ``funcid_identity``): B a = −mean_i Σ_k a_ik ∂_ω ŷ_i, so c_i = Σ_k (Q_k(s_i, a_i) − y_i);
          the reference evaluates V̄ at the real s′ in ŷ (only r̂ depends on ω);
        * FuncID at the inner solution h* = ŷ (``funcid_solution``): c_i = K (ŷ_i − y_i);
        * FuncID with an adjoint network a_φ fitted at h* (``funcid_network``): ``adjoint_steps``
          Adam steps on J(φ) = ½ mean Σ_k a_k² + mean Σ_k g_k a_k (identity output Hessian,
          g = h* − y), then c_ik = −a_ik;
        * OMD, AID with v = ∂_θ L_out (identity inverse Hessian): ∇F = −∂_ω⟨∂_θ L_in, v⟩,
          so c_i = Σ_k ⟨∂_θ Q_k(s_i, a_i), ∂_θ L_out⟩, a Jacobian-vector product;
        * OMD with CG (``omd_cg``): the same with v ≈ (H + δI)⁻¹ ∂_θ L_out from
          :meth:`_solve_cg` instead of ∂_θ L_out.

        (With the per-head target, ŷ has one column per head and c_ik multiplies ŷ_ik.)
        """
        obs, action, nd = b["obs"], b["action"], b["not_done"]
        with torch.no_grad():
            y = self.bellman_target(b["reward"], b["next_obs"], nd)
        ns, r = self.model(obs, action)
        if self.kind == "funcid_reference":
            ns = b["next_obs"]
        y_hat = self.bellman_target(r, ns, nd)
        out: dict[str, Any] = {}
        kind = self.kind
        if kind in ("omd", "omd_cg"):
            pred = self.q_of_action(self.qp, obs, action)
            l_out = 0.5 * (pred - y).square().sum(2).mean(1)
            if kind == "omd":
                direction = torch.autograd.grad(l_out.sum(), self.qp)
            else:
                direction = self._solve_cg(pred, l_out, y_hat.detach(), out)
            jv = torch.func.jvp(
                lambda *p: self.q_of_action(list(p), obs, action),
                tuple(t.detach() for t in self.qp),
                tuple(direction),
            )[1]
            coef = jv
            out["outer_loss"] = l_out.detach()
        else:
            with torch.no_grad():
                pred = self.q_of_action(self.qp, obs, action)
                out["outer_loss"] = 0.5 * (pred - y).square().sum(2).mean(1)
                if kind in ("funcid_solution", "funcid_network"):
                    # h* = ŷ: the model's Bellman target computed above (same target network)
                    v = y_hat.detach().expand(-1, -1, self.heads)
                    out["solution_outer_loss"] = 0.5 * (v - y).square().sum(2).mean(1)
                else:
                    v = pred
                g = v - y
            if kind == "funcid_network":
                a, out["adjoint_loss"] = self._fit_adjoint(obs, action, g)
                coef = -a
            else:
                coef = g
                out["adjoint_loss"] = -0.5 * g.square().sum(2).mean(1)
        surrogate = (y_hat * coef.detach()).sum(2).mean(1)
        params = self.model_opt.params  # type: ignore[union-attr]
        grads = torch.autograd.grad(surrogate.sum(), params, allow_unused=True)
        grads = tuple(
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        )
        sq = torch.zeros(self.runs, dtype=self.dtype)
        for g in grads:
            sq += g.reshape(self.runs, -1).square().sum(1)
        out["grad_norm"] = sq.sqrt()
        out["_grads"] = grads
        return out

    def _solve_cg(
        self, pred: Tensor, l_out: Tensor, y_model: Tensor, out: dict[str, Any]
    ) -> tuple[Tensor, ...]:
        """``omd_cg``'s v: every run's CG solution of (H_r + δI) v_r = ∂_θ L_out,r.

        As :meth:`funcbo.AID.hypergradient` with ``share_prediction`` (the Q-network's
        prediction ``pred`` serves both losses): H_r is the Hessian in θ of run r's inner loss
        L_in,r = mean ½Σ_k (Q_k(s, a) − ŷ)² at the Q-network after its steps, with the model
        target ŷ (``y_model``, no graph) of the updated target network; its products are the
        double backward of Σ_r L_in,r, block diagonal across runs. The solver is the method's
        :class:`~funcbo.linalg.CG` run by run (:func:`~funcbo.linalg.batched_cg`), started from
        the run's previous solution with ``warm_start``. Writes the solve's metrics into ``out``
        (the unbatched updater's names) and returns v stacked like the Q-network's tensors.
        """
        method = self.method
        assert isinstance(method, OMDCG)
        cg = method.solver
        qp, runs = self.qp, self.runs
        g_theta = torch.autograd.grad(l_out.sum(), qp, retain_graph=True)
        l_in = 0.5 * (pred - y_model).square().sum(2).mean(1)
        G = torch.autograd.grad(l_in.sum(), qp, create_graph=True)

        def per_run(ts: Sequence[Tensor]) -> list[Tensor]:  # [R·K, ...] → [R, K, ...]
            return [t.reshape(runs, -1, *t.shape[1:]) for t in ts]

        def stacked(ts: Sequence[Tensor]) -> list[Tensor]:  # [R, K, ...] → [R·K, ...]
            return [t.reshape(-1, *t.shape[2:]) for t in ts]

        def matvec(v: list[Tensor]) -> list[Tensor]:
            return per_run(torch.autograd.grad(G, qp, stacked(v), retain_graph=True))

        v, info = batched_cg(
            matvec,
            per_run(g_theta),
            per_run(self.aid_v) if method.warm_start else None,
            self.aid_warm,
            maxiter=cg.maxiter,
            tol=cg.tol,
            damping=cg.damping,
            safeguards=cg.safeguards,
        )
        # contiguous, as a restored warm start is: the next solve then rounds the same way
        self.aid_v = [t.detach().contiguous() for t in stacked(v)]
        self.aid_warm[:] = True
        out["solver_iters"] = info.iterations.double()
        out["solver_residual"] = info.residual
        out["solver_gave_up"] = info.gave_up.double()
        out["solver_diverged"] = info.diverged.double()
        out["dual_norm"] = run_norm(v)
        return tuple(stacked(v))

    def _fit_adjoint(self, obs: Tensor, action: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """``adjoint_steps`` Adam steps of every run's adjoint network on its J; returns a at
        the batch's points after the steps and J there (per run)."""
        assert self.adj_opt is not None
        assert isinstance(self.method, FuncIDNetworkRL)
        scale = self.adjoint_scale
        for _ in range(self.method.adjoint_steps):
            a = scale * self.q_of_action(self.ap, obs, action)
            # ⟨a, sg(a)⟩ has the gradient of ½⟨a, a⟩ (identity output Hessian)
            j = (a * a.detach()).sum(2).mean(1) + (a * g).sum(2).mean(1)
            self.adj_opt.step(torch.autograd.grad(j.sum(), self.ap))
        with torch.no_grad():
            a = scale * self.q_of_action(self.ap, obs, action)
            j = 0.5 * a.square().sum(2).mean(1) + (a * g).sum(2).mean(1)
        return a, j

    # ------------------------------------------------------------------------ run slices
    def networks(self, run: int) -> dict[str, Params]:
        """Run ``run``'s slices of every network (views)."""
        r, k = run, self.heads

        def sl(ps: Params, m: int) -> Params:
            return [p[r * m : (r + 1) * m] for p in ps]

        nets = {"q": sl(self.qp, k), "target_q": sl(self.tq, k)}
        if self.mp_ns:
            nets["model_next_state"] = sl(self.mp_ns, 1)
            nets["model_reward"] = sl(self.mp_r, 1)
        if self.vp:
            nets["values"] = sl(self.vp, self.members)
        if self.ap:
            nets["adjoint"] = sl(self.ap, k)
        return nets

    def state_dict(self, run: int) -> dict[str, Any]:
        """Run ``run``'s networks and optimizer state (copies)."""
        state: dict[str, Any] = {
            "networks": {k: [p.detach().clone() for p in v] for k, v in self.networks(run).items()},
            "q_opt": self.q_opt.state_dict(run),
        }
        if self.model_opt is not None:
            state["model_opt"] = self.model_opt.state_dict(run)
        if self.adj_opt is not None:
            state["adjoint_opt"] = self.adj_opt.state_dict(run)
        if self.kind == "omd_cg":
            # the warm start, as funcbo.AID's state: a list of tensors shaped like the run's
            # Q-network parameters, or None before the first solve
            k = self.heads
            state["v"] = (
                [t[run * k : (run + 1) * k].clone() for t in self.aid_v]
                if bool(self.aid_warm[run])
                else None
            )
        return state

    @torch.no_grad()
    def load_state_dict(self, run: int, state: dict[str, Any]) -> None:
        """Restore run ``run`` from :meth:`state_dict`."""
        nets = self.networks(run)
        if set(state["networks"]) != set(nets):
            raise ValueError(
                f"checkpoint networks {sorted(state['networks'])} do not match {sorted(nets)}"
            )
        for k, dst in nets.items():
            for d, s in zip(dst, state["networks"][k], strict=True):
                d.copy_(s)
        self.q_opt.load_state_dict(run, state["q_opt"])
        if self.model_opt is not None:
            self.model_opt.load_state_dict(run, state["model_opt"])
        if self.adj_opt is not None:
            self.adj_opt.load_state_dict(run, state["adjoint_opt"])
        if self.kind == "omd_cg":
            v = state.get("v")
            heads = self.heads
            if v is not None:
                for t, src in zip(self.aid_v, v, strict=True):
                    t[run * heads : (run + 1) * heads].copy_(src)
            self.aid_warm[run] = v is not None


def check_batchable(methods: Sequence[RLMethodConfig], problems: Sequence[RLProblemConfig]) -> None:
    """Raise ``ValueError`` naming the field when runs cannot share one batch.

    Runs share a batch when they are the same method and protocol except for the per-run fields
    :data:`PER_RUN_METHOD_FIELDS` and :data:`PER_RUN_PROBLEM_FIELDS`.
    """
    kinds = {m.kind for m in methods}
    if len(kinds) > 1:
        raise ValueError(f"runs of one batch must share method.kind (got {sorted(kinds)})")
    for cfgs, per_run, what in (
        (methods, PER_RUN_METHOD_FIELDS, "method"),
        (problems, PER_RUN_PROBLEM_FIELDS, "problem"),
    ):
        first = cfgs[0]
        for other in cfgs[1:]:
            for f in fields(first):
                if f.name in per_run:
                    continue
                a, b = getattr(first, f.name), getattr(other, f.name)
                if a != b:
                    raise ValueError(
                        f"runs of one batch must share {what}.{f.name} (got {a!r} and {b!r})"
                    )


__all__ = [
    "BATCHED_KINDS",
    "PER_RUN_METHOD_FIELDS",
    "PER_RUN_PROBLEM_FIELDS",
    "BatchedAdam",
    "BatchedUpdater",
    "check_batchable",
    "ensemble_params",
    "mlp",
    "per_member",
    "sequential_params",
    "stack",
]
