"""Several IV runs (seeds of one method) as one batched task (``batch_seeds: true``).

:class:`IVBatchTask` builds every run's :class:`~funcbo.apps.iv.task.IVTask` as an unbatched
run would (its data, networks initialised from its seed, optimizers, batch generator), then
stacks their networks, data and optimizer states (:mod:`funcbo.apps.iv.batched`) and advances
all runs in lockstep. Batches are drawn from each run's own generator in the order its trainer
would draw them. A run's :meth:`~IVBatchTask.state_dict` is its own task's state dict (the stack
copied back into its networks and optimizers first), so a batched checkpoint holds exactly what
an unbatched one does; evaluation runs each run's own networks.

Every IV method kind has a batched step, in the settings the paper protocol uses
(:func:`unbatched_reason` lists what is not batched: the demand design, the functional
formulation of the parametric baselines, FuncID's gradient inner solver, AID without its
warm start, ...). A run in such a setting is refused: :func:`batch_key` raises a
:class:`~funcbo.experiments.config.ConfigError` naming the method before anything runs
(``funcbo run`` without ``--batch-seeds`` runs it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from funcbo.apps.iv.batched import (
    BATCHED_KINDS,
    StackedAdam,
    StackedNet,
    add_intercept,
    batched_cg,
    batched_neumann,
    grad_norms,
    ridge_fit,
    ridge_objective,
    ridge_predict,
    run_column,
    run_norm,
)
from funcbo.apps.iv.config import (
    IVAID,
    IVITD,
    DFIVMethod,
    FeatureOption,
    IVFuncID,
    IVFuncIDLinear,
    IVGradientPenalty,
    IVValuePenalty,
    RidgeHead,
    as_method_config,
    as_problem_config,
)
from funcbo.apps.iv.task import IVTask
from funcbo.experiments.task import BatchTask, RunSpec
from funcbo.linalg import CG, Identity, Neumann
from funcbo.parametric import unrolled_adam_step
from funcbo.penalty import gradient_penalty_term


def unbatched_reason(spec: RunSpec) -> str | None:
    """Why a run cannot be batched (None when it can)."""
    mc = as_method_config(spec.method_config)
    pc = as_problem_config(spec.problem)
    kind = getattr(mc, "kind", type(mc).__name__)
    if kind not in BATCHED_KINDS:
        return f"kind {kind} has no batched IV step (batched kinds: {', '.join(BATCHED_KINDS)})"
    if pc.dataset != "dsprites":
        return "only the dSprites design (no covariates) is batched"
    if isinstance(mc, (IVFuncIDLinear, IVFuncID)):
        if not isinstance(mc.inner_solver, RidgeHead):
            return f"{kind} is batched with the paper's inner_solver: ridge_head only"
        if (mc.head or pc.head) != "closed_form":
            return f"{kind} is batched with the closed-form outcome head only"
    if isinstance(mc, FeatureOption) and not mc.features_formulation:
        return f"{kind} is batched in the paper's formulation (formulation: features) only"
    if isinstance(mc, IVAID):
        if not getattr(mc, "warm_start", True):
            return "aid is batched with its warm start only"
    if isinstance(mc, IVFuncID) and mc.adjoint_holdout > 0:
        return "funcid is batched without adjoint_holdout only"
    names = ("inner_optimizer", "outer_optimizer", "adjoint_optimizer")
    opts = [getattr(mc, n, "adam") for n in names]
    if any(o.lower() != "adam" for o in opts):
        return "batched IV runs use Adam optimizers only"
    return None


def batch_key(spec: RunSpec) -> Any:
    """Runs with equal keys share a batch: one method variant and problem (so one shape), the
    seeds varying. Raises :class:`~funcbo.experiments.config.ConfigError` for a method without
    a batched step (module docstring)."""
    reason = unbatched_reason(spec)
    if reason is not None:
        from funcbo.experiments.config import ConfigError

        raise ConfigError(
            f"--batch-seeds / batch_seeds: method {spec.method!r} cannot be batched: {reason}; "
            "run it without batch_seeds (e.g. a second `funcbo run` with --methods)"
        )
    return (
        spec.method,
        repr(spec.method_config),
        repr(spec.problem),
        spec.iterations,
        spec.eval_every,
        spec.device,
        spec.dtype,
    )


class IVBatchTask(BatchTask):
    """R runs of one IV method (seeds; see the module docstring).

    Args:
        specs: the runs (one method and problem; seeds differ).
        tasks: the runs' tasks when already built (tests); default: built from ``specs``.
    """

    def __init__(self, specs: list[RunSpec], *, tasks: list[IVTask] | None = None) -> None:
        if not specs:
            raise ValueError("a batch needs at least one run")
        for s in specs:
            reason = unbatched_reason(s)
            if reason is not None:
                raise ValueError(f"method {s.method!r} cannot be batched: {reason}")
        first = specs[0]
        if any(
            (s.iterations, s.eval_every, s.dtype, s.device)
            != (first.iterations, first.eval_every, first.dtype, first.device)
            for s in specs
        ):
            raise ValueError("runs of one batch must share iterations, eval_every, dtype, device")
        self.iterations = int(first.iterations)
        self.tasks = tasks if tasks is not None else [IVTask(s) for s in specs]
        self.runs = R = len(self.tasks)
        t0 = self.tasks[0]
        self.config = t0.config
        self.method = t0.method
        self.is_dfiv = isinstance(self.method, DFIVMethod)
        self.phi_opt: StackedAdam | None
        self.is_aid = self.network_adjoint = self.is_itd = False
        self.penalty_kind: str | None = None
        # Data: one stacked copy; each run's tensors become views of it.
        self.stage1 = _stack_parts([t.tensors.stage1 for t in self.tasks])
        self.stage2 = _stack_parts([t.tensors.stage2 for t in self.tasks])
        for r, t in enumerate(self.tasks):
            t.tensors.stage1 = {k: v[r] for k, v in self.stage1.items()}
            t.tensors.stage2 = {k: v[r] for k, v in self.stage2.items()}
        self.psi = StackedNet([t.outer.treatment for t in self.tasks])
        self.phi = StackedNet([t.inner.features for t in self.tasks])
        self.lam1, self.lam2 = t0.stage1_ridge, self.config.stage2_ridge
        if self.is_dfiv:
            dfivs = [t.dfiv for t in self.tasks]
            assert all(d is not None for d in dfivs)
            self.stage1_steps = dfivs[0].stage1_steps  # type: ignore[union-attr]
            self.stage2_steps = dfivs[0].stage2_steps  # type: ignore[union-attr]
            self.inner_steps = dfivs[0].inner_steps  # type: ignore[union-attr]
            self.phi_opt = StackedAdam(
                self.phi.params,
                [d.instrument_optimizer for d in dfivs],  # type: ignore[union-attr]
                [self.phi.origin(r) for r in range(R)],
                self.phi.transposed,
            )
            self.psi_opt = StackedAdam(
                self.psi.params,
                [d.treatment_optimizer for d in dfivs],  # type: ignore[union-attr]
                [self.psi.origin(r) for r in range(R)],
                self.psi.transposed,
            )
        else:
            ests = [t.estimator for t in self.tasks]
            inner = [getattr(e, "inner", None) for e in ests]
            if isinstance(self.method, IVITD):
                itd = ests[0]
                self.inner_steps = int(itd.unroll)  # type: ignore[union-attr]
                self.itd_truncate = int(itd.truncate)  # type: ignore[union-attr]
            else:
                self.inner_steps = int(inner[0].steps)  # type: ignore[union-attr]
            self.is_aid = isinstance(self.method, IVAID)
            if self.is_aid:
                self.solver = ests[0].solver  # type: ignore[union-attr]
                # the warm start v: φ's trainable parameters in the estimator's order
                self.aid_v = [torch.zeros_like(p) for p in self.phi.params]
                self.aid_warm = torch.zeros(R, dtype=torch.bool)
                self._theta_order = []
                for r in range(R):
                    mine = [id(p) for p in self.phi.origin(r)]
                    theirs = [id(p) for p in self.tasks[r].inner.features.parameters()]
                    self._theta_order.append([mine.index(i) for i in theirs])
            self.is_itd = isinstance(self.method, IVITD)
            self.penalty_kind = (
                "gradient"
                if isinstance(self.method, IVGradientPenalty)
                else "value"
                if isinstance(self.method, IVValuePenalty)
                else None
            )
            if self.penalty_kind is not None:
                self.penalty = float(ests[0].penalty)  # type: ignore[union-attr]
            #: the value penalty's θ-step simultaneous with ω's (ValuePenalty(joint=True))
            self.penalty_joint = bool(getattr(ests[0], "joint", False))
            #: the gradient penalty's ½‖∇‖² (True) or ‖∇‖ (GradientPenalty(squared=False))
            self.penalty_squared = bool(getattr(ests[0], "squared", True))
            if self.penalty_joint:  # its inner solver takes all θ-steps but the joint one
                self.inner_steps = int(ests[0].inner_steps)  # type: ignore[union-attr]
            if self.penalty_kind == "value":
                values = [e.value for e in ests]  # type: ignore[union-attr]
                self.value_net = StackedNet([v.model for v in values])
                self.value_steps = int(values[0].steps)
                self.value_opt = StackedAdam(
                    self.value_net.params,
                    [v.optimizer for v in values],
                    [self.value_net.origin(r) for r in range(R)],
                    self.value_net.transposed,
                )
            adj = getattr(ests[0], "adjoint", None)
            self.inner_ridge = float(getattr(inner[0], "ridge", self.lam1))
            if adj is not None and hasattr(adj, "ridge"):  # LinearAdjoint
                self.adjoint_ridge = float(adj.ridge)
                self.adjoint_relative = bool(adj.relative)
                self.solve_dtype = adj.solve_dtype
            self.phi_opt = StackedAdam(
                self.phi.params,
                # ITD's state: the Adam optimizer whose steps it unrolls
                [
                    e.optimizer if self.is_itd else s.optimizer  # type: ignore[union-attr]
                    for e, s in zip(ests, inner, strict=True)
                ],
                [self.phi.origin(r) for r in range(R)],
                self.phi.transposed,
            )
            self.psi_opt = StackedAdam(
                self.psi.params,
                [t.outer_optimizer for t in self.tasks],  # type: ignore[misc]
                [self.psi.origin(r) for r in range(R)],
                self.psi.transposed,
            )
            self.network_adjoint = isinstance(self.method, IVFuncID)
            if self.network_adjoint:
                adjoints = [e.adjoint for e in ests]  # type: ignore[union-attr]
                self.adjoint = StackedNet([a.model for a in adjoints])
                self.adjoint_steps = int(adjoints[0].steps)
                self.adjoint_opt = StackedAdam(
                    self.adjoint.params,
                    [a.optimizer for a in adjoints],
                    [self.adjoint.origin(r) for r in range(R)],
                    self.adjoint.transposed,
                )
            heads = [t.inner.head for t in self.tasks]
            self.head_weight = torch.stack([h.weight.detach() for h in heads])
            self.head_bias = torch.stack([h.bias.detach() for h in heads])
            self.gave_up_total = torch.zeros(R, dtype=torch.float64)
        for r in range(R):
            self._read(r)

    # ------------------------------------------------------------------ state in and out
    def _read(self, r: int) -> None:
        self.psi.read_run(r)
        self.phi.read_run(r)
        self.psi_opt.read_run(r)
        if self.phi_opt is not None:
            self.phi_opt.read_run(r)
        if self.penalty_kind == "value":
            self.value_net.read_run(r)
            self.value_opt.read_run(r)
        if not self.is_dfiv:
            if self.is_aid:
                v = self.tasks[r].estimator._v  # type: ignore[union-attr]
                self.aid_warm[r] = v is not None
                with torch.no_grad():
                    for k, j in enumerate(self._theta_order[r]):
                        tr = self.phi.transposed[j]
                        self.aid_v[j][r] = 0 if v is None else (v[k].T if tr else v[k])
            if self.network_adjoint:
                self.adjoint.read_run(r)
                self.adjoint_opt.read_run(r)
            head = self.tasks[r].inner.head
            with torch.no_grad():
                self.head_weight[r].copy_(head.weight)
                self.head_bias[r].copy_(head.bias)
            self.gave_up_total[r] = float(self.tasks[r].solver_gave_up_total)

    def _write(self, r: int) -> None:
        self.psi.write_run(r)
        self.phi.write_run(r)
        self.psi_opt.write_run(r)
        if self.phi_opt is not None:
            self.phi_opt.write_run(r)
        if self.penalty_kind == "value":
            self.value_net.write_run(r)
            self.value_opt.write_run(r)
        if not self.is_dfiv:
            if self.is_aid:
                est = self.tasks[r].estimator
                est._v = (  # type: ignore[union-attr]
                    tuple(
                        (self.aid_v[j][r].T if self.phi.transposed[j] else self.aid_v[j][r]).clone()
                        for j in self._theta_order[r]
                    )
                    if bool(self.aid_warm[r])
                    else None
                )
            if self.network_adjoint:
                self.adjoint.write_run(r)
                self.adjoint_opt.write_run(r)
            head = self.tasks[r].inner.head
            with torch.no_grad():
                head.weight.copy_(self.head_weight[r])
                head.bias.copy_(self.head_bias[r])
            self.tasks[r].solver_gave_up_total = int(self.gave_up_total[r])

    def _phi_step(self, grads: Any) -> None:
        """One Adam step of the feature networks (every method but ITD has one)."""
        assert self.phi_opt is not None
        self.phi_opt.step(grads)

    def state_dict(self, run: int) -> dict[str, Any]:
        self._write(run)
        return self.tasks[run].state_dict()

    def load_state_dict(self, run: int, state: dict[str, Any]) -> None:
        self.tasks[run].load_state_dict(state)
        self._read(run)

    def evaluate(self) -> list[dict[str, float]]:
        out = []
        for r, t in enumerate(self.tasks):
            self._write(r)
            out.append(t.evaluate())
        return out

    # ------------------------------------------------------------------ batches
    def _draw(self) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """The stacked inner batches and outer batch, drawn from every run's own generator in
        its trainer's order (no draw, and the stacked halves themselves, for full batches)."""
        pc = self.config
        n1 = next(iter(self.stage1.values())).shape[1]
        n2 = next(iter(self.stage2.values())).shape[1]
        full1 = pc.inner_batch_size is None or pc.inner_batch_size >= n1
        full2 = pc.outer_batch_size is None or pc.outer_batch_size >= n2
        if full1 and full2:
            return [self.stage1] * self.inner_steps, self.stage2
        per_run = []
        for t in self.tasks:
            inner = [t.inner_batch() for _ in range(self.inner_steps)]
            per_run.append((inner, t.outer_batch()))
        if full1:
            inner_b = [self.stage1] * self.inner_steps
        else:
            inner_b = [_stack_parts([p[0][k] for p in per_run]) for k in range(self.inner_steps)]
        outer_b = self.stage2 if full2 else _stack_parts([p[1] for p in per_run])
        return inner_b, outer_b

    # ------------------------------------------------------------------ step
    def step(self) -> dict[str, Any]:
        inner, outer = self._draw()
        if self.is_dfiv:
            stats = self._dfiv_step(inner, outer)
        elif self.is_aid:
            stats = self._aid_step(inner, outer)
        elif self.is_itd:
            stats = self._itd_step(inner, outer)
        elif self.penalty_kind is not None:
            stats = self._penalty_step(inner, outer)
        else:
            stats = self._funcid_step(inner, outer)
        for t in self.tasks:
            t.trainer.iteration += 1
        return stats

    def _dfiv_step(self, batches: list[dict[str, Tensor]], stage2: dict[str, Tensor]) -> dict:
        """:meth:`funcbo.apps.iv.dfiv.DFIV.step`, run by run."""
        psi, phi = self.psi, self.phi
        targets: dict[int, Tensor] = {}
        l1 = torch.full((self.runs,), float("nan"), dtype=torch.float64)
        for k in range(self.stage1_steps):
            b = batches[k % len(batches)]
            if id(b) not in targets:
                with torch.no_grad():
                    targets[id(b)] = psi(b["t"], training=False)
            features = phi(b["z"], training=True)
            loss = ridge_objective(
                features, targets[id(b)], ridge_fit(features, targets[id(b)], self.lam1), self.lam1
            )
            grads = torch.autograd.grad(loss.sum(), phi.params)
            self._phi_step(grads)
            l1 = loss.detach().double()
        b1 = batches[-1]
        l2 = torch.full((self.runs,), float("nan"), dtype=torch.float64)
        gnorm = torch.zeros(self.runs, dtype=torch.float64)
        for _ in range(self.stage2_steps):
            with torch.no_grad():
                phi1 = phi(b1["z"], training=False)
                phi2 = phi(stage2["z"], training=False)
            W1 = ridge_fit(phi1, psi(b1["t"], training=True), self.lam1)
            V2 = ridge_predict(phi2, W1)
            y = stage2["y"]
            loss = ridge_objective(V2, y, ridge_fit(V2, y, self.lam2), self.lam2)
            grads = torch.autograd.grad(loss.sum(), psi.params)
            gnorm = grad_norms(grads)
            self.psi_opt.step(grads)
            l2 = loss.detach().double()
        return {"inner_loss": l1, "outer_loss": l2, "grad_norm": gnorm}

    def _funcid_step(
        self, batches: list[dict[str, Tensor]], outer_batch: dict[str, Tensor]
    ) -> dict[str, Any]:
        """FuncID (closed-form or network adjoint) with the ridge-head inner solver, run by run
        (the IV task's update: inner run, hypergradient, outer Adam step)."""
        psi, phi = self.psi, self.phi
        # Inner run (RidgeHeadInnerSolver.run): feature steps through the ridge head.
        targets: dict[int, Tensor] = {}

        def target(b: dict[str, Tensor]) -> Tensor:
            if id(b) not in targets:
                with torch.no_grad():
                    targets[id(b)] = psi(b["t"], training=False)
            return targets[id(b)]

        last = torch.full((self.runs,), float("nan"), dtype=torch.float64)
        for k in range(self.inner_steps):
            b = batches[k % len(batches)]
            features = phi(b["z"], training=True)
            W = ridge_fit(features, target(b), self.inner_ridge)
            loss = ridge_objective(features, target(b), W, self.inner_ridge)
            grads = torch.autograd.grad(loss.sum(), phi.params)
            self._phi_step(grads)
            last = loss.detach().double()
        with torch.no_grad():
            b = batches[(self.inner_steps - 1) % len(batches)]
            W = ridge_fit(phi(b["z"], training=False), target(b), self.inner_ridge)
            self.head_weight.copy_(W[:, :-1].mT)
            self.head_bias.copy_(W[:, -1])
        # Hypergradient (FuncID.hypergradient with LinearAdjoint) at the last inner batch.
        b_in = batches[-1]
        with torch.no_grad():
            z_in = phi(b_in["z"], training=True)
            z_out = phi(outer_batch["z"], training=True)
            v_in = torch.baddbmm(self.head_bias[:, None, :], z_in, self.head_weight.mT)
            v_out = torch.baddbmm(self.head_bias[:, None, :], z_out, self.head_weight.mT)
        # g_j = m ∂_v mean ℓ_out (closed-form outcome head; ω does not enter: g_ω = 0)
        v_out = v_out.detach().requires_grad_(True)
        y = outer_batch["y"]
        W2 = ridge_fit(v_out, y, self.lam2)
        l_out = ((y - ridge_predict(v_out, W2)) ** 2).sum(2) + self.lam2 * (W2**2).sum((1, 2))[
            :, None
        ]
        m = l_out.shape[1]
        (g_out,) = torch.autograd.grad(l_out.mean(1).sum(), v_out)
        g_out = g_out * m
        # Output Hessians of ℓ_in = ‖ψ(t) − v‖²: the isotropy probe per run (ψ iterates its
        # spectral norms once, as the probe's forward pass does in the unbatched step).
        psi.power_iteration()
        with torch.no_grad():
            t_fixed = psi(b_in["t"], training=False)
        c = _isotropic_probe(lambda v: ((t_fixed - v) ** 2).sum(2), v_in)
        R = self.runs
        zeros = torch.zeros(R, dtype=torch.float64)
        if self.network_adjoint:
            a_in, adjoint_stats = self._network_adjoint(b_in["z"], outer_batch["z"], g_out, c)
        else:
            # Closed-form adjoint (LinearAdjoint, isotropic, primal), per run.
            a_in, J, lam = self._linear_adjoint(z_in, z_out, g_out.detach(), c)
            adjoint_stats = {
                "adjoint_loss": J,
                "adjoint_ridge": lam,
                "adjoint_cg_iters": zeros.clone(),
                "adjoint_isotropic": torch.ones(R, dtype=torch.float64),
                "adjoint_cg_gave_up": zeros.clone(),
            }
        # B a = ∂_ω ⟨∂_v L_in(ω, v), a⟩ at v = h(x_in)
        v = v_in.clone().requires_grad_(True)
        l_in = ((psi(b_in["t"], training=True) - v) ** 2).sum(2)
        (gv,) = torch.autograd.grad(l_in.mean(1).sum(), v, create_graph=True)
        cross = torch.autograd.grad(gv, psi.params, grad_outputs=a_in)
        gnorm = grad_norms(cross)
        self.psi_opt.step(cross)
        return {
            "outer_loss": l_out.detach().mean(1).double(),
            "inner_loss_at_hypergrad": l_in.detach().mean(1).double(),
            "grad_norm": gnorm,
            **adjoint_stats,
            "inner_loss": last,
            "solver_gave_up_total": self.gave_up_total.clone(),
        }

    def _aid_step(
        self, batches: list[dict[str, Tensor]], outer_batch: dict[str, Tensor]
    ) -> dict[str, Any]:
        """AID in the feature formulation, run by run (the IV task's update: the inner Adam
        steps on φ, :meth:`funcbo.AID.hypergradient` on
        :class:`~funcbo.apps.iv.problem.IVFeatureProblem`, the outer Adam step)."""
        psi, phi, lam1, lam2 = self.psi, self.phi, self.lam1, self.lam2
        targets: dict[int, Tensor] = {}
        last = torch.full((self.runs,), float("nan"), dtype=torch.float64)
        for k in range(self.inner_steps):  # ω fixed: ψ(t) in eval mode, once per batch
            b = batches[k % len(batches)]
            if id(b) not in targets:
                with torch.no_grad():
                    targets[id(b)] = psi(b["t"], training=False)
            features = phi(b["z"], training=True)
            loss = ridge_objective(
                features, targets[id(b)], ridge_fit(features, targets[id(b)], lam1), lam1
            )
            self._phi_step(torch.autograd.grad(loss.sum(), phi.params))
            last = loss.detach().double()
        b1 = batches[-1]
        n = b1["t"].shape[1]
        # outer loss: DFIV's stage-2 objective with the stage-1 head refitted on ψ_ω(t₁)
        pred_out = phi(torch.cat([b1["z"], outer_batch["z"]], 1), training=True)
        W1 = ridge_fit(pred_out[:, :n], psi(b1["t"], training=True), lam1)
        V2 = ridge_predict(pred_out[:, n:], W1)
        y = outer_batch["y"]
        W2 = ridge_fit(V2, y, lam2)
        l_out = ridge_objective(V2, y, W2, lam2)
        grads = torch.autograd.grad(l_out.sum(), [*phi.params, *psi.params])
        g_theta, g_omega = grads[: len(phi.params)], grads[len(phi.params) :]
        # inner loss with ω's graph, its θ-gradient with a graph for the Hessian products
        pred_in = phi(b1["z"], training=True)
        psi_in = psi(b1["t"], training=True)
        l_in = ridge_objective(pred_in, psi_in, ridge_fit(pred_in, psi_in, lam1), lam1)
        G = torch.autograd.grad(l_in.sum(), phi.params, create_graph=True)

        def matvec(v: list[Tensor]) -> list[Tensor]:
            return list(torch.autograd.grad(G, phi.params, v, retain_graph=True))

        R = self.runs
        solver = self.solver
        x0 = self.aid_v
        iters = torch.zeros(R, dtype=torch.float64)
        gave_up = torch.zeros(R, dtype=torch.float64)
        diverged = torch.zeros(R, dtype=torch.float64)
        if isinstance(solver, CG):
            # the method's CG run by run: its safeguards (a warm start dropped, the iterate of
            # smallest residual, gave up) and damping as funcbo.linalg.CG applies them
            v, info = batched_cg(
                matvec,
                g_theta,
                x0,
                self.aid_warm,
                maxiter=solver.maxiter,
                tol=solver.tol,
                damping=solver.damping,
                safeguards=solver.safeguards,
            )
            iters, diverged = info.iterations.double(), info.diverged.double()
            gave_up = info.gave_up.double()
        elif isinstance(solver, Neumann):
            v = batched_neumann(
                matvec, g_theta, x0, self.aid_warm, iters=solver.iters, lr=solver.lr
            )
            iters = torch.full((R,), float(solver.iters), dtype=torch.float64)
        else:
            assert isinstance(solver, Identity)
            v = [solver.scale * t for t in g_theta]
        self.aid_v = [t.detach() for t in v]
        self.aid_warm[:] = True
        self.gave_up_total += gave_up  # as the IV task counts its estimator's solves_gave_up
        cross = torch.autograd.grad(G, psi.params, v)
        total = [go + -1.0 * c for go, c in zip(g_omega, cross, strict=True)]
        gnorm = grad_norms(total)
        self.psi_opt.step(total)
        return {
            "outer_loss": l_out.detach().double(),
            "inner_loss_at_hypergrad": l_in.detach().double(),
            "grad_norm": gnorm,
            "solver_iters": iters,
            "solver_gave_up": gave_up,
            "solver_diverged": diverged,
            "dual_norm": run_norm(v),
            "inner_loss": last,
            "solver_gave_up_total": self.gave_up_total.clone(),
        }

    def _feature_losses(
        self,
        net: StackedNet,
        b_in: dict[str, Tensor],
        b_out: dict[str, Tensor],
        target: Any,
        params: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(L_in, L_out) per run of :class:`~funcbo.apps.iv.problem.IVFeatureProblem` for the
        feature network ``net`` (predictions first, then ψ, as the library's ``_losses``);
        ``target(t)`` gives ψ_ω(t) (fixed or with ω's graph)."""
        lam1, lam2 = self.lam1, self.lam2
        pred_in = net(b_in["z"], training=True, params=params)
        pred_out = net(torch.cat([b_out["z1"], b_out["z"]], 1), training=True, params=params)
        T_in = target(b_in["t"])
        l_in = ridge_objective(pred_in, T_in, ridge_fit(pred_in, T_in, lam1), lam1)
        n = b_out["t1"].shape[1]
        W1 = ridge_fit(pred_out[:, :n], target(b_out["t1"]), lam1)
        V2 = ridge_predict(pred_out[:, n:], W1)
        y = b_out["y"]
        l_out = ridge_objective(V2, y, ridge_fit(V2, y, lam2), lam2)
        return l_in, l_out

    def _fixed_target(self) -> Any:
        """ψ_ω(t) with ω fixed: eval mode, no graph, once per treatment tensor."""
        cache: dict[int, Tensor] = {}

        def target(t: Tensor) -> Tensor:
            if id(t) not in cache:
                with torch.no_grad():
                    cache[id(t)] = self.psi(t, training=False)
            return cache[id(t)]

        return target

    def _live_target(self, t: Tensor) -> Tensor:
        """ψ_ω(t) with ω's graph (training mode: its spectral norms iterate)."""
        return self.psi(t, training=True)

    def _itd_step(
        self, batches: list[dict[str, Tensor]], outer_batch: dict[str, Tensor]
    ) -> dict[str, Any]:
        """:meth:`funcbo.ITD.step` unrolling Adam, in the feature formulation, run by run: each
        run's own learning rate, weight decay, ε, moments and step count (its Adam's, held by
        :attr:`phi_opt`)."""
        phi, lam1, opt = self.phi, self.lam1, self.phi_opt
        assert opt is not None
        fixed = self._fixed_target()
        theta = [p.detach() for p in phi.params]
        m, v = list(opt.exp_avg), list(opt.exp_avg_sq)
        steps = opt.step_count.clone()
        b1, b2 = opt.betas
        first_diff = self.inner_steps - self.itd_truncate
        inner_loss = torch.full((self.runs,), float("nan"), dtype=torch.float64)

        for k in range(self.inner_steps):
            b = batches[k % len(batches)]
            diff = k >= first_diff
            if not diff or k == first_diff:
                theta = [t.detach().requires_grad_(True) for t in theta]
                m, v = [t.detach() for t in m], [t.detach() for t in v]
            pred = phi(b["z"], training=True, params=theta)
            T = self._live_target(b["t"]) if diff else fixed(b["t"])
            loss = ridge_objective(pred, T, ridge_fit(pred, T, lam1), lam1)
            g = torch.autograd.grad(loss.sum(), theta, create_graph=diff)
            steps = steps + 1
            bc1, bc2_sqrt = 1.0 - b1**steps, (1.0 - b2**steps).sqrt()
            new = [
                unrolled_adam_step(
                    t,
                    gk,
                    mk,
                    vk,
                    lr=run_column(opt.lr, t),
                    betas=(b1, b2),
                    eps=run_column(opt.eps, t),
                    weight_decay=run_column(opt.weight_decay, t),
                    bias_correction1=run_column(bc1, t),
                    bias_correction2_sqrt=run_column(bc2_sqrt, t),
                )
                for t, gk, mk, vk in zip(theta, g, m, v, strict=True)
            ]
            theta = [n[0] for n in new]
            m, v = [n[1] for n in new], [n[2] for n in new]
            inner_loss = loss.detach().double()
        b1 = batches[-1]
        n = b1["t"].shape[1]
        pred_out = phi(torch.cat([b1["z"], outer_batch["z"]], 1), training=True, params=theta)
        W1 = ridge_fit(pred_out[:, :n], self._live_target(b1["t"]), lam1)
        V2 = ridge_predict(pred_out[:, n:], W1)
        y = outer_batch["y"]
        l_out = ridge_objective(V2, y, ridge_fit(V2, y, self.lam2), self.lam2)
        grads = torch.autograd.grad(l_out.sum(), self.psi.params)
        with torch.no_grad():
            for p, t in zip(phi.params, theta, strict=True):
                p.copy_(t)
            for dst, src in zip(opt.exp_avg + opt.exp_avg_sq, m + v, strict=True):
                dst.copy_(src)
            opt.step_count.copy_(steps)
        gnorm = grad_norms(grads)
        self.psi_opt.step(grads)
        return {
            "inner_loss": inner_loss,
            "outer_loss": l_out.detach().double(),
            "grad_norm": gnorm,
            "solver_gave_up_total": self.gave_up_total.clone(),
        }

    def _penalty_step(
        self, batches: list[dict[str, Tensor]], outer_batch: dict[str, Tensor]
    ) -> dict[str, Any]:
        """:class:`funcbo.GradientPenalty` / :class:`funcbo.ValuePenalty` steps in the feature
        formulation, run by run (θ-steps on the penalised objective over γ, then the outer
        gradient of the penalised objective)."""
        phi, gamma, lam1 = self.phi, self.penalty, self.lam1
        assert self.phi_opt is not None
        fixed = self._fixed_target()
        b1 = batches[-1]
        b_out = {"z1": b1["z"], "t1": b1["t"], "z": outer_batch["z"], "y": outer_batch["y"]}
        if self.penalty_kind == "value":
            net = self.value_net
            for k in range(self.value_steps):
                b = batches[k % len(batches)]
                pred = net(b["z"], training=True)
                T = fixed(b["t"])
                loss = ridge_objective(pred, T, ridge_fit(pred, T, lam1), lam1)
                self.value_opt.step(torch.autograd.grad(loss.sum(), net.params))

        squared = self.penalty_squared

        def grad_penalty(l_in: Tensor) -> Tensor:
            G = torch.autograd.grad(l_in.sum(), phi.params, create_graph=True)
            sq: Tensor = sum((g**2).flatten(1).sum(1) for g in G)  # type: ignore[assignment]
            return gradient_penalty_term(sq, squared)

        joint = self.penalty_joint
        for k in range(self.inner_steps - int(joint)):
            b = batches[k % len(batches)]
            l_in, l_out = self._feature_losses(phi, b, b_out, fixed)
            if self.penalty_kind == "gradient":
                objective = l_out / gamma + grad_penalty(l_in)
            elif joint:
                objective = l_out + gamma * l_in
            else:
                objective = l_out / gamma + l_in
            self._phi_step(torch.autograd.grad(objective.sum(), phi.params))
        l_in, l_out = self._feature_losses(phi, b1, b_out, self._live_target)
        psi_params = self.psi.params
        stats: dict[str, Any] = {"inner_loss": l_in.detach().double()}
        stats["outer_loss"] = l_out.detach().double()
        if self.penalty_kind == "gradient":
            pen = grad_penalty(l_in)
            total = list(torch.autograd.grad((l_out + gamma * pen).sum(), psi_params))
            stats["penalty"] = pen.detach().double()
        else:
            with torch.no_grad():
                pred_hat = self.value_net(b1["z"], training=True)
            T = self._live_target(b1["t"])
            l_hat = ridge_objective(pred_hat, T, ridge_fit(pred_hat, T, lam1), lam1)
            theta = phi.params if joint else []
            g_both = torch.autograd.grad((l_out + gamma * l_in).sum(), [*psi_params, *theta])
            g_main, g_theta = g_both[: len(psi_params)], g_both[len(psi_params) :]
            g_hat = torch.autograd.grad(l_hat.sum(), psi_params)
            total = [a + -gamma * h for a, h in zip(g_main, g_hat, strict=True)]
            if joint:  # θ's step from the point of ω's gradient
                self._phi_step(list(g_theta))
            stats["value_loss"] = l_hat.detach().double()
            stats["penalty"] = (l_in - l_hat).detach().double()
        stats["grad_norm"] = grad_norms(total)
        self.psi_opt.step(total)
        stats["solver_gave_up_total"] = self.gave_up_total.clone()
        return stats

    def _network_adjoint(
        self, x_in: Tensor, x_out: Tensor, g_out: Tensor, c: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:class:`funcbo.NetworkAdjoint`'s solve (no holdout, warm start), run by run: K Adam
        steps on the surrogate mean⟨a, sg(H a)⟩ + mean⟨a, g⟩ (gradient of J), H a = c·a."""
        net, g = self.adjoint, g_out.detach()
        first = None
        for _ in range(self.adjoint_steps):
            A_in = net(x_in, training=True)
            A_out = net(x_out, training=True)
            HA = c[:, :, None] * A_in.detach()
            lin = (A_out * g).sum(2).mean(1)
            quad = (A_in * HA).sum(2).mean(1)
            grads = torch.autograd.grad((quad + lin).sum(), net.params)
            if first is None:
                first = (0.5 * quad.detach() + lin.detach()).double()
            self.adjoint_opt.step(grads)
        with torch.no_grad():
            A_in = net(x_in, training=True)
            A_out = net(x_out, training=True)
            J = 0.5 * (A_in * (c[:, :, None] * A_in)).sum(2).mean(1) + (A_out * g).sum(2).mean(1)
        assert first is not None
        return A_in.detach(), {"adjoint_loss": J.double(), "adjoint_loss_first": first}

    def _linear_adjoint(
        self, z_in: Tensor, z_out: Tensor, g_out: Tensor, c: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:class:`funcbo.LinearAdjoint`'s solve for isotropic Hessians H_i = c_i·I, run by
        run: W = M S⁻¹ with M = −(1/m) Σ_j g_j z̃_jᵀ, S = Z̃ᵀ diag(c/n) Z̃ + λI (Cholesky);
        returns (a at the inner points, J, λ), J and λ per run."""
        out_dtype = g_out.dtype
        dt = self.solve_dtype or out_dtype
        Z = add_intercept(z_in.to(dt))
        Zo = add_intercept(z_out.to(dt))
        G = g_out.to(dt)
        c = c.to(dt)
        n, q, m = Z.shape[1], Z.shape[2], Zo.shape[1]
        if q > n:
            raise ValueError("batched LinearAdjoint: more features than inner points")
        M = (G.mT @ Zo) / -m  # [R, d, q]
        sq = (c / n).sqrt()
        S = Z.mT @ (Z * sq.square()[:, :, None])
        if self.adjoint_relative:
            lam = self.adjoint_ridge * torch.diagonal(S, dim1=1, dim2=2).sum(1) / q
        else:
            lam = torch.full((Z.shape[0],), self.adjoint_ridge, dtype=dt, device=Z.device)
        lam = lam.clamp_min(torch.finfo(dt).tiny)
        S = S + lam[:, None, None] * torch.eye(q, dtype=dt, device=S.device)
        L, info = torch.linalg.cholesky_ex(S)
        if bool((info != 0).any()):  # as LinearAdjoint: jitter proportional to the scale
            bad = info != 0
            Sb = S[bad]
            jitter = 1e-10 * torch.diagonal(Sb, dim1=1, dim2=2).abs().mean(1)
            Sb = Sb + jitter[:, None, None] * torch.eye(q, dtype=dt, device=S.device)
            L = L.clone()
            L[bad] = torch.linalg.cholesky_ex(Sb)[0]
        y = torch.linalg.solve_triangular(L, M.mT, upper=False)
        W = torch.linalg.solve_triangular(L.mT, y, upper=True).mT
        A_in = Z @ W.mT  # [R, n, d]
        J = 0.5 * (c[:, :, None] * A_in.square()).sum(2).mean(1) - (W * M).sum((1, 2))
        return A_in.to(out_dtype), J.double(), lam.double()


def _isotropic_probe(loss: Any, V: Tensor) -> Tensor:
    """c ``[R, n]`` with H_i = c_i·I for the per-sample loss ``loss(V) -> [R, n]`` of stacked
    predictions, judged run by run from the two fixed Rademacher probes of
    :class:`funcbo.linalg.OutputHessian` (the same probe vectors for every run); raises when a
    run's Hessians are not isotropic (the batched adjoint solves isotropic systems only)."""
    R, n, d = V.shape
    gen = torch.Generator().manual_seed(0)
    P = (2 * torch.randint(0, 2, (2, n, d), generator=gen) - 1).to(V.dtype).to(V.device)
    v = V.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(v).sum(), v, create_graph=True)
    HP = torch.stack(
        [torch.autograd.grad(g, v, grad_outputs=P[k].expand(R, n, d), retain_graph=True)[0]
         for k in range(2)]
    )  # fmt: skip
    Pr = P[:, None].expand(2, R, n, d)
    c = (Pr * HP).sum(3) / d  # [2, R, n]
    tol = 1e3 * torch.finfo(V.dtype).eps
    tiny = torch.finfo(V.dtype).tiny
    dev = (HP - c[..., None] * Pr).norm(dim=3)
    scale = HP.norm(dim=3).clamp_min(tiny)
    same = (c[0] - c[1]).abs() <= tol * c.abs().amax(0).clamp_min(tiny)
    iso = (dev <= tol * scale).all(0).all(1) & same.all(1)
    iso |= ~torch.isfinite(HP).flatten(2).all(2).all(0)  # a diverged run fails by its metrics
    if not bool(iso.all()):
        runs = (~iso).nonzero().flatten().tolist()
        raise ValueError(f"batched FuncID: non-isotropic output Hessians in runs {runs}")
    return c[0]


def _stack_parts(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    keys = parts[0].keys()
    return {k: torch.stack([p[k] for p in parts]) for k in keys}


def make_batch_task(specs: list[RunSpec]) -> IVBatchTask:
    """The experiment layer's factory of batched IV tasks (``batch_seeds``)."""
    return IVBatchTask(specs)


__all__ = ["IVBatchTask", "batch_key", "make_batch_task", "unbatched_reason"]
