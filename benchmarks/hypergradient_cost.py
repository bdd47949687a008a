"""Time and peak memory of one total-gradient estimate as the inner network widens.

Methods, all on the same instrumental-variable-like functional bilevel problem

    inner:  ℓ_in(ω, v, (x, t)) = s‖v − ψ_ω(t)‖²,        h*_ω = argmin_h E_in[ℓ_in(ω, h(x), t)]
    outer:  ℓ_out(ω, v, (x, y)) = s(y − u_ω(v))²,        F(ω) = E_out[ℓ_out(ω, h*_ω(x), y)]

with continuous instruments x, ω = a small fixed-size treatment network ψ and a linear head u,
and an inner MLP h of depth 3 whose width varies. Two instances (``--instances``):

* ``base``: batch 256, x ∈ R³², t ∈ R⁸, ψ: 8 → 64 → 16 (tanh), d_v = 16, s = ½;
  widths 64, 256, 1024, 4096;
* ``large``: batch 1024, x ∈ R³, t ∈ R⁶⁴, ψ: 64 → 128 → 32 (tanh), d_v = 32, s = 1;
  width 1024, and 4096 with ``--large-4096`` (TorchOpt alone then takes about 100 s a call).

* ``funcid_linear``: ``FuncID.hypergradient`` with ``LinearAdjoint`` (closed form on the last
  hidden features): all the work after the inner steps.
* ``funcid_network``: ``FuncID.hypergradient`` with ``NetworkAdjoint`` (K Adam steps on a warm
  adjoint network of the inner model's architecture).
* ``aid_cg``: funcbo's ``AID.hypergradient`` with ``CG(maxiter)`` in parameter space.
* ``torchopt_aid_cg``: TorchOpt's ``custom_root`` with ``solve_cg(maxiter)`` (an external AID
  reference): the backward pass through the implicit solution.
* ``itd``: funcbo's ``ITD.step`` with ``unroll`` steps; it includes its inner steps by
  construction (the unrolled steps are what it differentiates).
* ``plain_step``: forward and backward of the inner and outer losses on the same batches, the
  cost of one ordinary gradient step, for scale.

Every (instance, method, width) runs in a fresh process (this script re-invoking itself with
``--worker``), with ``MALLOC_MMAP_THRESHOLD_=65536`` so that the resident set tracks live tensors.
A worker builds the models from fixed seeds, trains the inner model a few Adam steps, makes one
warm-up call, then times ``--repeats`` calls (median). The extra memory of a call is its peak
resident set (CUDA: peak allocated bytes) minus the memory in use just before it. For the two
FuncID methods, ``--repeats`` further calls with a :class:`funcbo.memory.PhaseMeter` break the
call down into its phases (forward passes, outer gradient, output Hessian, adjoint solve, cross
derivative): the time of each and its peak memory above the call's start. The script prints,
per instance, a table with ratios to ``funcid_linear`` and to a plain step, the phase table and
the targets, and writes JSON. Each row also reports the CPU time of its calls, which contention
inflates less than the wall time. On a shared machine, ``--rounds N`` measures every row N
times, interleaved, and reports the medians, so that a change in the load during the sweep
does not land on one method only.

Usage::

    python benchmarks/hypergradient_cost.py                      # both instances (~40 min)
    python benchmarks/hypergradient_cost.py --large-4096         # and the large one at 4096
    python benchmarks/hypergradient_cost.py --instances large --methods funcid_linear plain_step
    python benchmarks/hypergradient_cost.py --instances large --rounds 5 \\
        --methods funcid_linear funcid_network plain_step       # medians of 5 interleaved rounds
    python benchmarks/hypergradient_cost.py --widths 64 256 --repeats 3
    python benchmarks/hypergradient_cost.py --check              # funcbo AID vs TorchOpt only
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from funcbo import AID, CG, ITD, BilevelProblem, FuncID, LinearAdjoint, NetworkAdjoint
from funcbo.experiments.methods import MethodSpec, method_class, method_kinds, register_method
from funcbo.inner import InnerSolver
from funcbo.io import atomic_write_json
from funcbo.memory import (
    PhaseMeter,
    current_bytes,
    low_mmap_threshold_env,
    peak_bytes,
    reset_peak,
)
from funcbo.parametric import AIDStats
from funcbo.synthetic import mlp

REFERENCE = "funcid_linear"
NOTES = {
    "funcid_linear": "FuncID.hypergradient, LinearAdjoint (closed form)",
    "funcid_network": "FuncID.hypergradient, NetworkAdjoint (K Adam steps, warm)",
    "aid_cg": "funcbo AID.hypergradient, CG(maxiter) in parameter space",
    "torchopt_aid_cg": "TorchOpt custom_root + solve_cg(maxiter): backward through the solution",
    "itd": "funcbo ITD.step: includes its `unroll` inner steps by construction",
    "plain_step": "forward + backward of inner and outer losses (one gradient step)",
}
RESULT_TAG = "RESULT_JSON "
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "hypergradient_cost.json"
MB = 2.0**20
#: the problem's sizes, set by an instance (each can be overridden on the command line)
INSTANCE_KEYS = ("batch", "in_dim", "treat_dim", "treat_hidden", "out_dim", "loss_scale")
#: the instances: sizes and default widths
INSTANCES: dict[str, dict[str, Any]] = {
    # batch 256, d_v = 16, losses with a ½
    "base": {
        "batch": 256,
        "in_dim": 32,
        "treat_dim": 8,
        "treat_hidden": 64,
        "out_dim": 16,
        "loss_scale": 0.5,
        "widths": [64, 256, 1024, 4096],
    },
    # batch 1024, d_v = 32, 3-dimensional instruments, ‖v − ψ(t)‖² and (y − u(v))²
    "large": {
        "batch": 1024,
        "in_dim": 3,
        "treat_dim": 64,
        "treat_hidden": 128,
        "out_dim": 32,
        "loss_scale": 1.0,
        "widths": [1024],
    },
}
#: widths of the large instance with --large-4096 (TorchOpt takes about 100 s a call at 4096)
LARGE_FULL_WIDTHS = [1024, 4096]
#: options a worker needs, passed on from the parent's command line
CFG_KEYS = (
    "depth dtype device threads repeats train_steps inner_lr adjoint_steps cg_iters unroll "
    "itd_lr seed check_damping check_cg_iters"
).split() + list(INSTANCE_KEYS)
#: FuncID's phases, in call order (see funcbo.memory.PhaseMeter)
PHASES = ("forward", "outer_grad", "hessian", "solve", "cross")


# ------------------------------------------------------------------------------- the problem
class TreatmentNet(nn.Module):
    """Outer variable ω: a small treatment network ψ(t) ∈ R^d and a linear outcome head u."""

    def __init__(self, q: int, d: int, hidden: int = 64) -> None:
        super().__init__()
        self.psi = nn.Sequential(nn.Linear(q, hidden), nn.Tanh(), nn.Linear(hidden, d))
        self.head = nn.Linear(d, 1)

    def forward(self, t: Tensor) -> Tensor:
        """ψ(t), shape ``[B, d]``."""
        return self.psi(t)


def make_problem(scale: float = 0.5) -> BilevelProblem:
    """ℓ_in = s‖v − ψ_ω(t)‖² and ℓ_out = s(y − u(v))² per sample (s = ``scale``)."""

    def inner_loss(
        outer: Callable[[Tensor], Tensor], pred: Tensor, batch: dict[str, Tensor]
    ) -> Tensor:
        # `outer` only needs to map t to ψ(t) (TorchOpt's objective passes a function).
        return scale * ((pred - outer(batch["t"])) ** 2).sum(1)

    def outer_loss(outer: TreatmentNet, pred: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return scale * ((batch["y"] - outer.head(pred)) ** 2).sum(1)

    return BilevelProblem(inner_loss, outer_loss)


def make_batches(
    cfg: dict[str, Any], dtype: torch.dtype, device: torch.device
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Seeded inner batch {x, t} and outer batch {x, y}: continuous instruments x ∈ R^p.

    t = A x + confounder + noise; y = sin(⟨β, t⟩) + 2·confounder + noise.
    """
    g = torch.Generator().manual_seed(cfg["seed"])
    p, q, n = cfg["in_dim"], cfg["treat_dim"], cfg["batch"]
    mix = torch.randn(p, q, generator=g) / math.sqrt(p)
    beta = torch.randn(q, generator=g) / math.sqrt(q)

    def draw() -> tuple[Tensor, Tensor, Tensor]:
        x = torch.randn(n, p, generator=g)
        conf = torch.randn(n, 1, generator=g)
        t = x @ mix + conf + 0.5 * torch.randn(n, q, generator=g)
        return x, t, conf

    x_in, t_in, _ = draw()
    x_out, t_out, conf = draw()
    y = torch.sin(t_out @ beta)[:, None] + 2.0 * conf + 0.1 * torch.randn(n, 1, generator=g)

    def put(b: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(dtype=dtype, device=device) for k, v in b.items()}

    return put({"x": x_in, "t": t_in}), put({"x": x_out, "y": y})


class Setup:
    """Problem, models (fixed seeds) and batches, with the inner model trained a few steps."""

    def __init__(self, cfg: dict[str, Any], width: int) -> None:
        self.cfg = cfg
        self.width = width
        self.dtype = getattr(torch, cfg["dtype"])
        self.device = torch.device(cfg["device"])
        self.problem = make_problem(cfg["loss_scale"])
        self.inner_batch, self.outer_batch = make_batches(cfg, self.dtype, self.device)
        torch.manual_seed(cfg["seed"] + 1)
        self.outer = TreatmentNet(cfg["treat_dim"], cfg["out_dim"], cfg["treat_hidden"])
        self.outer = self.outer.to(self.dtype).to(self.device)
        torch.manual_seed(cfg["seed"] + 2)
        sizes = [cfg["in_dim"], *([width] * cfg["depth"]), cfg["out_dim"]]
        self.inner = mlp(sizes).to(self.dtype).to(self.device)
        self.inner_opt = torch.optim.Adam(self.inner.parameters(), lr=cfg["inner_lr"])
        self.n_params = sum(p.numel() for p in self.inner.parameters())
        self.train_loss = InnerSolver(self.inner, self.inner_opt, cfg["train_steps"]).run(
            self.problem, self.outer, [self.inner_batch]
        )


# ------------------------------------------------------------------------------- the methods
Call = Callable[[], Any]
Info = Callable[[], dict[str, Any]]


def torchopt_call(s: Setup, cg_iters: int, damping: float = 0.0) -> tuple[Call, Info]:
    """TorchOpt implicit differentiation on the same problem and the same trained inner weights.

    ``custom_root`` gets the optimality condition ∇_θ L_in(θ, ω) = 0; its solver returns the
    already trained θ, so a call measures the work after the inner solve: the outer loss at
    θ*(ω) and the backward pass through the implicit solution (CG in parameter space).
    """
    # TorchOpt 0.7.3 calls the deprecated functorch.vjp alias; the warning is not ours to fix.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchopt\.")
    from torchopt.diff.implicit import custom_root
    from torchopt.linear_solve import solve_cg

    inner, outer, problem = s.inner, s.outer, s.problem
    names = [n for n, _ in inner.named_parameters()]
    onames = [n for n, _ in outer.named_parameters()]
    x_in = problem.input(s.inner_batch, "inner")
    x_out = problem.input(s.outer_batch, "outer")

    def inner_objective(theta: tuple[Tensor, ...], omega: tuple[Tensor, ...]) -> Tensor:
        pred = functional_call(inner, dict(zip(names, theta, strict=True)), (x_in,))

        def psi(t: Tensor) -> Tensor:
            return functional_call(outer, dict(zip(onames, omega, strict=True)), (t,))

        return problem.inner_loss(psi, pred, s.inner_batch).mean()

    def optimality(theta: tuple[Tensor, ...], omega: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return torch.func.grad(inner_objective)(theta, omega)

    # rtol matches funcbo's CG tolerance, so that both run all `cg_iters` iterations.
    cg = solve_cg(maxiter=cg_iters, rtol=1e-10, ridge=damping or None)
    count = {"hvp": 0}

    def solve(matvec: Callable[[Any], Any], b: Any) -> Any:
        def counted(v: Any) -> Any:
            count["hvp"] += 1
            return matvec(v)

        return cg(counted, b)

    @custom_root(optimality, argnums=1, solve=solve)
    def inner_solve(theta: tuple[Tensor, ...], omega: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return theta

    def call() -> tuple[Tensor, ...]:
        count["hvp"] = 0
        theta = tuple(p.detach() for p in inner.parameters())
        omega = tuple(outer.parameters())
        theta_star = inner_solve(theta, omega)
        pred = functional_call(inner, dict(zip(names, theta_star, strict=True)), (x_out,))
        loss = problem.outer_loss(outer, pred, s.outer_batch).mean()
        return torch.autograd.grad(loss, omega)

    # TorchOpt's CG also multiplies its zero initial guess: one product more than iterations.
    return call, lambda: {"hessian_vector_products": count["hvp"]}


class Measured(NamedTuple):
    """What a method's spec builds on a :class:`Setup`: the measured work (a zero-argument
    function), its diagnostics, and the FuncID estimator behind it (None for the others),
    whose phases are then measured."""

    call: Call
    info: Info
    funcid: FuncID | None = None


@dataclass
class BenchMethod(MethodSpec):
    """A measured method: a spec registered in scope ``"bench"`` whose fields are worker
    options (see :func:`bench_method`) and whose ``build`` makes its :class:`Measured`."""

    scope: ClassVar[str] = "bench"

    def build(self, context: Setup) -> Measured:
        raise NotImplementedError


@register_method("funcid_linear")
@dataclass
class FuncIDLinearBench(BenchMethod):
    """``FuncID.hypergradient`` with ``LinearAdjoint()`` (closed form)."""

    def build(self, context: Setup) -> Measured:
        return _funcid(context, FuncID(context.inner, context.inner_opt, adjoint=LinearAdjoint()))


@register_method("funcid_network")
@dataclass
class FuncIDNetworkBench(BenchMethod):
    """``FuncID.hypergradient`` with ``NetworkAdjoint(steps=adjoint_steps)`` (warm, its
    default fused Adam)."""

    adjoint_steps: int = 10

    def build(self, context: Setup) -> Measured:
        adjoint = NetworkAdjoint(steps=self.adjoint_steps)
        return _funcid(context, FuncID(context.inner, context.inner_opt, adjoint=adjoint))


def _funcid(s: Setup, est: FuncID) -> Measured:
    prob, outer, ib, ob = s.problem, s.outer, s.inner_batch, s.outer_batch
    return Measured(lambda: est.hypergradient(prob, outer, ib, ob), lambda: dict(est.stats), est)


@register_method("aid_cg")
@dataclass
class AIDCGBench(BenchMethod):
    """funcbo's ``AID.hypergradient`` with ``CG(maxiter=cg_iters)``, started from zero."""

    cg_iters: int = 10

    def build(self, context: Setup) -> Measured:
        s = context
        aid = AID(s.inner, s.inner_opt, solver=CG(maxiter=self.cg_iters), warm_start=False)
        prob, outer, ib, ob = s.problem, s.outer, s.inner_batch, s.outer_batch
        return Measured(lambda: aid.hypergradient(prob, outer, ib, ob), lambda: dict(aid.stats))


@register_method("torchopt_aid_cg")
@dataclass
class TorchOptAIDCG(BenchMethod):
    """TorchOpt's ``custom_root`` with ``solve_cg(maxiter=cg_iters)`` (see
    :func:`torchopt_call`)."""

    cg_iters: int = 10

    def build(self, context: Setup) -> Measured:
        return Measured(*torchopt_call(context, self.cg_iters))


@register_method("itd")
@dataclass
class ITDBench(BenchMethod):
    """funcbo's ``ITD.step`` with ``unroll`` steps of size ``itd_lr``."""

    unroll: int = 10
    itd_lr: float = 1e-2

    def build(self, context: Setup) -> Measured:
        s = context
        itd = ITD(s.inner, lr=self.itd_lr, unroll=self.unroll)
        prob, outer, ib, ob = s.problem, s.outer, s.inner_batch, s.outer_batch
        return Measured(lambda: itd.step(prob, outer, [ib], ob), lambda: dict(itd.stats))


@register_method("plain_step")
@dataclass
class PlainStep(BenchMethod):
    """Forward and backward of the inner and outer losses: one ordinary gradient step."""

    def build(self, context: Setup) -> Measured:
        s = context
        prob, outer, ib, ob = s.problem, s.outer, s.inner_batch, s.outer_batch
        params = [*s.inner.parameters(), *outer.parameters()]

        def plain() -> tuple[Tensor, ...]:
            l_in = prob.inner_loss(outer, prob.predict(s.inner, ib, "inner"), ib).mean()
            l_out = prob.outer_loss(outer, prob.predict(s.inner, ob, "outer"), ob).mean()
            return torch.autograd.grad(l_in + l_out, params)

        return Measured(plain, dict)


#: the methods, in table order (the specs registered in scope "bench")
METHODS = method_kinds(BenchMethod)


def bench_method(method: str, cfg: dict[str, Any]) -> BenchMethod:
    """The spec of ``method`` with its fields taken from the worker options ``cfg``."""
    cls = method_class(method, BenchMethod.scope)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    spec = cls(**{name: cfg[name] for name in names})
    assert isinstance(spec, BenchMethod)
    return spec


def have_torchopt() -> bool:
    """Whether TorchOpt can be imported (the ``bench`` extra)."""
    try:
        import torchopt  # noqa: F401
    except Exception:
        return False
    return True


# -------------------------------------------------------------------------------- the workers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds used by the whole machine, by this process) so far; None if unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def measure(fn: Callable[[], Any], repeats: int, device: torch.device) -> dict[str, Any]:
    """One warm-up call, then ``repeats`` timed calls with their extra peak memory.

    Also returns ``cpu_ms``, the median CPU time of this process per call (on a shared machine
    it is less inflated by contention than the wall time: with one thread, time spent waiting
    for the core is not counted), and ``other_cpu``: the CPU time other processes used during
    the timed calls, as a fraction of the machine's cores (0 on a quiet machine; contention
    inflates the timings).
    """
    out = fn()
    _sync(device)
    del out
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    times, cpus, extras, befores = [], [], [], []
    for _ in range(repeats):
        gc.collect()
        _sync(device)
        reset_peak(device)
        before = current_bytes(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        _sync(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        extras.append(max(peak_bytes(device) - before, 0) / MB)
        befores.append(before / MB)
        times.append(dt * 1e3)
        cpus.append(dc * 1e3)
        del out
    cpu1, wall = _cpu_seconds(), time.perf_counter() - wall0
    other = None
    if cpu0 is not None and cpu1 is not None and wall > 0:
        other = max((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1]), 0.0) / (wall * (os.cpu_count() or 1))
    return {
        "other_cpu": other,
        "time_ms": statistics.median(times),
        "cpu_ms": statistics.median(cpus),
        "extra_mb": statistics.median(extras),
        "time_ms_all": times,
        "cpu_ms_all": cpus,
        "extra_mb_all": extras,
        "mem_before_mb": statistics.median(befores),
    }


def measure_phases(
    est: FuncID, fn: Callable[[], Any], repeats: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """FuncID's phases over ``repeats`` more calls: median time (ms) and peak extra memory (MB).

    Separate from the timed calls, so that the phase meter (which resets the peak counter
    between phases) changes neither their times nor their peaks. A phase's peak is measured
    from the memory in use when the call starts, so it includes what earlier phases still hold.
    """
    est.phase_meter = PhaseMeter(device)
    runs = []
    for _ in range(repeats):
        gc.collect()
        out = fn()
        runs.append(dict(est.phase_meter.phases))
        del out
    est.phase_meter = None
    return {
        name: {
            "time_ms": statistics.median(r[name]["time_s"] * 1e3 for r in runs),
            "peak_mb": statistics.median(r[name]["peak_mb"] for r in runs),
        }
        for name in runs[0]
    }


def worker(cfg: dict[str, Any], method: str, width: int) -> dict[str, Any]:
    """Measure one (method, width) in this process."""
    torch.set_num_threads(cfg["threads"])
    s = Setup(cfg, width)
    fn, info, est = bench_method(method, cfg).build(s)
    res = measure(fn, cfg["repeats"], s.device)
    res.update(
        stats=info(),
        cg_iters=cfg["cg_iters"],
        adjoint_steps=cfg["adjoint_steps"],
        method=method,
        width=width,
        status="ok",
        n_params=s.n_params,
        inner_train_loss=s.train_loss,
        threads=torch.get_num_threads(),
    )
    if est is not None:
        res["phases"] = measure_phases(est, fn, cfg["repeats"], s.device)
    return res


def _rel_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    diff = math.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b, strict=True)))
    norm = math.sqrt(sum(float((y**2).sum()) for y in b))
    return diff / max(norm, 1e-300)


def check_worker(cfg: dict[str, Any], width: int) -> dict[str, Any]:
    """Hypergradients of funcbo AID-CG and TorchOpt AID-CG on the same problem (float64).

    The pass criterion solves the damped system (H + λI) v = ∂_θ L_out to convergence with both
    libraries (λ = ``check_damping`` makes the indefinite parameter-space Hessian positive
    definite), so the answer does not depend on how each CG handles a short, unconverged run.
    The same comparison with the timed settings (no damping, ``cg_iters`` iterations) is
    reported for information.
    """
    torch.set_num_threads(cfg["threads"])
    cfg = {**cfg, "dtype": "float64"}
    s = Setup(cfg, width)
    out: dict[str, Any] = {"width": width, "dtype": "float64"}
    for name, damping, iters in (
        ("converged", cfg["check_damping"], cfg["check_cg_iters"]),
        ("timed_settings", 0.0, cfg["cg_iters"]),
    ):
        aid = AID(s.inner, s.inner_opt, solver=CG(maxiter=iters, damping=damping), warm_start=False)
        g_aid = aid.hypergradient(s.problem, s.outer, s.inner_batch, s.outer_batch)
        assert isinstance(aid.diagnostics, AIDStats)
        solve = aid.diagnostics.solve
        call, info = torchopt_call(s, iters, damping)
        g_to = call()
        out[name] = {
            "damping": damping,
            "maxiter": iters,
            "funcbo_cg_iterations": solve.iterations,
            "funcbo_cg_residual": solve.residual,
            "torchopt_hessian_vector_products": info()["hessian_vector_products"],
            "rel_diff": _rel_diff(g_aid, g_to),
        }
    out["rel_diff"] = out["converged"]["rel_diff"]
    out["converged_ok"] = out["converged"]["funcbo_cg_residual"] <= 1e-8
    return out


# ------------------------------------------------------------------------------ orchestration
def _worker_cmd(cfg: dict[str, Any], extra: list[str]) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra]
    for name in CFG_KEYS:
        cmd += [f"--{name.replace('_', '-')}", str(cfg[name])]
    return cmd


def run_worker(args: argparse.Namespace, cfg: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """Run a worker in a fresh process; its last ``RESULT_JSON`` line is the result."""
    env = low_mmap_threshold_env()
    env["OMP_NUM_THREADS"] = str(cfg["threads"])
    env["MKL_NUM_THREADS"] = str(cfg["threads"])
    try:
        proc = subprocess.run(
            _worker_cmd(cfg, extra),
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"status": "failed", "note": f"timed out after {args.timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    note = f"exit code {proc.returncode}: " + " / ".join(t.replace("|", "/") for t in tail)
    return {"status": "failed", "note": note}


#: the per-call figures that --rounds takes the median of
ROUND_KEYS = ("time_ms", "cpu_ms", "extra_mb", "other_cpu")


def merge_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result per (instance, method, width): the median over the rounds.

    Each round measured every row once, in order, each in a fresh process; a row's time,
    CPU time, extra memory and contention are the medians of its rounds' medians (every
    round's figures are kept under ``rounds``), and its phases the medians of its rounds'. A row
    that failed in some round keeps the rounds that succeeded; in none, the first failure.
    """
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    for i, first in enumerate(rounds[0]):
        runs = [rnd[i] for rnd in rounds]
        ok = [r for r in runs if r["status"] == "ok"]
        if not ok:
            merged.append(first)
            continue
        row = dict(ok[0])
        row["rounds"] = [{k: r.get(k) for k in ROUND_KEYS} for r in ok]
        for k in ROUND_KEYS:
            values = [r[k] for r in ok if r.get(k) is not None]
            row[k] = statistics.median(values) if values else None
        if ok[0].get("phases"):
            row["phases"] = {
                name: {
                    q: statistics.median(r["phases"][name][q] for r in ok)
                    for q in ("time_ms", "peak_mb")
                }
                for name in ok[0]["phases"]
            }
        merged.append(row)
    return merged


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b > 0:
        return None
    return a / b


def _key(r: dict[str, Any]) -> tuple[str, int]:
    return r.get("instance", "base"), r["width"]


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Time and memory ratios of every result to ``funcid_linear`` (same instance and width)."""
    ref = {_key(r): r for r in results if r["method"] == REFERENCE and r["status"] == "ok"}
    for r in results:
        base = ref.get(_key(r))
        ok = r["status"] == "ok" and base is not None
        r["time_ratio"] = _ratio(r.get("time_ms"), base["time_ms"]) if ok else None
        r["mem_ratio"] = _ratio(r.get("extra_mb"), base["extra_mb"]) if ok else None


def _get(
    results: list[dict[str, Any]], method: str, width: int, instance: str = "base"
) -> dict[str, Any] | None:
    for r in results:
        if r["method"] == method and _key(r) == (instance, width) and r["status"] == "ok":
            return r
    return None


#: (method, what, other method, key, bound) of the targets; a None bound is K + 2 (see below)
TARGETS: tuple[tuple[str, str, str, str, float | None], ...] = (
    ("funcid_linear", "time", "torchopt_aid_cg", "time_ms", 0.1),
    ("funcid_linear", "extra memory", "torchopt_aid_cg", "extra_mb", 0.2),
    ("funcid_linear", "time", "plain_step", "time_ms", 0.6),
    ("funcid_linear", "extra memory", "plain_step", "extra_mb", 1.0),
    ("funcid_linear", "time", "aid_cg", "time_ms", 0.1),
    ("funcid_linear", "extra memory", "aid_cg", "extra_mb", 0.2),
    # The network adjoint's K Adam steps each cost one gradient step on a network of the inner
    # model's size (two forward passes and a backward pass, as a plain step) and an optimizer
    # update; four more forward passes (the inner model's two, and the adjoint's at the end)
    # cost about 1.3 plain steps: at most K + 2 plain steps. Memory: one plain step's, with 10%
    # for the optimizer's temporaries.
    ("funcid_network", "time", "plain_step", "time_ms", None),
    ("funcid_network", "extra memory", "plain_step", "extra_mb", 1.1),
)


def evaluate_targets(results: list[dict[str, Any]], min_width: int = 1024) -> list[dict[str, Any]]:
    """The targets at every measured instance and width ≥ ``min_width``.

    Against TorchOpt's AID where it ran; without it funcbo's AID stands in (said in the
    target's name), otherwise comparisons with funcbo's AID are secondary (``primary`` False).
    """
    aid_ref = "torchopt_aid_cg"
    if not any(r["method"] == aid_ref and r["status"] == "ok" for r in results):
        aid_ref = "aid_cg"
    keys = sorted({_key(r) for r in results if r["width"] >= min_width})
    ran = {(r["method"], *_key(r)) for r in results}
    out = []
    for instance, w in keys:
        for method, what, other, key, bound in TARGETS:
            if other == "torchopt_aid_cg" and aid_ref == "aid_cg":
                continue
            if (method, instance, w) not in ran or (other, instance, w) not in ran:
                continue  # not measured: no target (one that failed is reported as n/a)
            f = _get(results, method, w, instance)
            o = _get(results, other, w, instance)
            ratio = _ratio(f[key], o[key]) if f and o else None
            cpu_ratio = (
                _ratio(f.get("cpu_ms"), o.get("cpu_ms")) if f and o and key == "time_ms" else None
            )
            b = float(f.get("adjoint_steps", 10) + 2) if bound is None and f else bound or 0.0
            out.append(
                {
                    "instance": instance,
                    "target": f"{method} {what} <= {b:g}x {other}",
                    "width": w,
                    "ratio": ratio,
                    "cpu_ratio": cpu_ratio,
                    "bound": b,
                    "met": None if ratio is None else ratio <= b,
                    "primary": other != "aid_cg" or aid_ref == "aid_cg",
                }
            )
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


CONTENTION = 0.1  # other processes' CPU share above which a timing is flagged


def _notes(r: dict[str, Any]) -> str:
    stats = r.get("stats") or {}
    notes = []
    if r["method"] == "aid_cg" and "solver_iters" in stats:
        its = int(stats["solver_iters"])
        notes.append(
            f"{its} CG iterations"
            + (" (stopped at negative curvature)" if its < r["cg_iters"] else "")
        )
    if r["method"] == "torchopt_aid_cg" and "hessian_vector_products" in stats:
        notes.append(f"{stats['hessian_vector_products']} Hessian-vector products")
    if r["method"] == "itd":
        notes.append("includes its inner steps")
    other = r.get("other_cpu")
    if other is not None and other > CONTENTION:
        notes.append(f"other processes used {100 * other:.0f}% of the CPU")
    return "; ".join(notes)


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table: method × width with absolute figures and ratios to funcid_linear and
    to a plain gradient step (same instance and width)."""
    lines = [
        "| width | params | method | time (ms) | CPU time (ms) | extra memory (MB) "
        "| time / funcid_linear | memory / funcid_linear | time / plain_step "
        "| CPU time / plain_step | memory / plain_step | notes |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(results, key=lambda r: (_key(r), order.get(r["method"], 99))):
        if r["status"] != "ok":
            lines.append(
                f"| {r['width']} | | {r['method']} | {r['status']} | | | | | | | | "
                f"{r.get('note', '')} |"
            )
            continue
        plain = _get(results, "plain_step", r["width"], r.get("instance", "base"))
        t_plain = _ratio(r["time_ms"], plain["time_ms"]) if plain else None
        c_plain = _ratio(r.get("cpu_ms"), plain.get("cpu_ms")) if plain else None
        m_plain = _ratio(r["extra_mb"], plain["extra_mb"]) if plain else None
        lines.append(
            f"| {r['width']} | {r['n_params'] / 1e6:.2f}M | {r['method']} | {r['time_ms']:.1f} "
            f"| {_fmt(r.get('cpu_ms'), '.1f')} | {r['extra_mb']:.1f} "
            f"| {_fmt(r.get('time_ratio'), '.3f')} | {_fmt(r.get('mem_ratio'), '.3f')} "
            f"| {_fmt(t_plain, '.3f')} | {_fmt(c_plain, '.3f')} | {_fmt(m_plain, '.3f')} "
            f"| {_notes(r)} |"
        )
    return "\n".join(lines)


def format_phases(results: list[dict[str, Any]]) -> str:
    """Markdown table of FuncID's phases: time (ms) / peak extra memory (MB) of each."""
    rows = [r for r in results if r["status"] == "ok" and r.get("phases")]
    if not rows:
        return ""
    lines = [
        "| width | method | " + " | ".join(PHASES) + " | whole call |",
        "|---:|---|" + "---:|" * (len(PHASES) + 1),
    ]
    for r in sorted(rows, key=lambda r: (_key(r), r["method"])):
        cells = []
        for name in PHASES:
            ph = r["phases"].get(name)
            cells.append("" if ph is None else f"{ph['time_ms']:.1f} / {ph['peak_mb']:.1f}")
        lines.append(
            f"| {r['width']} | {r['method']} | "
            + " | ".join(cells)
            + f" | {r['time_ms']:.1f} / {r['extra_mb']:.1f} |"
        )
    return "\n".join(lines)


def format_targets(targets: list[dict[str, Any]]) -> str:
    """One line per target, instance and width: met or missed with the measured ratio."""
    if not targets:
        return "No width >= 1024 was measured: the targets are not evaluated."
    lines = []
    for t in targets:
        verdict = "n/a (missing)" if t["met"] is None else ("met" if t["met"] else "MISSED")
        tag = "" if t["primary"] else "  [also vs funcbo's AID]"
        cpu = t.get("cpu_ratio")
        cpu_note = "" if cpu is None else f" (CPU time: {cpu:.3f})"
        lines.append(
            f"- {t.get('instance', 'base')}, width {t['width']}: {t['target']}: ratio "
            f"{_fmt(t['ratio'], '.3f')}{cpu_note} -> {verdict}{tag}"
        )
    return "\n".join(lines)


def environment(threads: int) -> dict[str, Any]:
    """Versions, threads and machine description for the JSON record."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torchopt

        torchopt_version: str | None = torchopt.__version__
    except Exception:
        torchopt_version = None
    return {
        "torch": torch.__version__,
        "torchopt": torchopt_version,
        "python": platform.python_version(),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "machine": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (the worker options are internal)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--instances", nargs="+", default=list(INSTANCES), choices=list(INSTANCES),
        help="problem instances to measure (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--widths", type=int, nargs="+", default=None,
        help="inner widths for every instance (default: base 64 256 1024 4096, large 1024)",
    )  # fmt: skip
    p.add_argument(
        "--large-4096", action="store_true",
        help="measure the large instance at widths 1024 and 4096 (adds about 40 minutes)",
    )  # fmt: skip
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--depth", type=int, default=3, help="hidden layers of the inner MLP")
    # The instance's sizes; None: the instance's own value.
    p.add_argument("--batch", type=int, default=None, help="inner and outer batch size")
    p.add_argument("--in-dim", type=int, default=None, help="instrument dimension")
    p.add_argument("--treat-dim", type=int, default=None, help="treatment dimension")
    p.add_argument("--treat-hidden", type=int, default=None, help="treatment network width")
    p.add_argument("--out-dim", type=int, default=None, help="inner model output dimension d_v")
    p.add_argument("--loss-scale", type=float, default=None, help="s in s‖v − ψ‖², s(y − u)²")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in workers")
    p.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    p.add_argument(
        "--rounds", type=int, default=1,
        help="measure every row this many times, interleaved (median of the rounds reported)",
    )  # fmt: skip
    p.add_argument("--train-steps", type=int, default=20, help="Adam steps on the inner model")
    p.add_argument("--inner-lr", type=float, default=1e-3)
    p.add_argument("--adjoint-steps", type=int, default=10, help="K for funcid_network")
    p.add_argument("--cg-iters", type=int, default=10, help="CG iterations for AID")
    p.add_argument("--unroll", type=int, default=10, help="ITD unrolled steps")
    p.add_argument("--itd-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    p.add_argument(
        "--check-width", type=int, default=256, help="inner width of the AID agreement check"
    )
    p.add_argument(
        "--check-damping",
        type=float,
        default=1.0,
        help="damping λ of both CGs in the check, enough to make H + λI positive definite",
    )
    p.add_argument("--check-cg-iters", type=int, default=200, help="CG budget of the check")
    p.add_argument("--no-check", action="store_true", help="skip the funcbo/TorchOpt AID check")
    p.add_argument("--check", action="store_true", help="only run the AID agreement check")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--check-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cfg(args: argparse.Namespace, instance: str = "base") -> dict[str, Any]:
    """The worker configuration: the command line, with ``instance``'s sizes where not given."""
    preset = INSTANCES[instance]
    cfg = {k: getattr(args, k) for k in CFG_KEYS}
    for k in INSTANCE_KEYS:
        if cfg[k] is None:
            cfg[k] = preset[k]
    return cfg


def _widths(args: argparse.Namespace, instance: str) -> list[int]:
    if args.widths is not None:
        return list(args.widths)
    if instance == "large" and args.large_4096:
        return list(LARGE_FULL_WIDTHS)
    return list(INSTANCES[instance]["widths"])


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """The funcbo-vs-TorchOpt AID agreement check (base instance) in a fresh process."""
    if not have_torchopt():
        print("check: TorchOpt is not installed (pip install -e '.[bench]'); skipped")
        return {"status": "skipped", "note": "torchopt not installed"}
    res = run_worker(args, _cfg(args), ["--check-worker", "--width", str(args.check_width)])
    if res.get("status") == "failed":
        print(f"check failed: {res['note']}")
        return res
    res["status"] = "ok"
    c, t = res["converged"], res["timed_settings"]
    print(
        f"check (width {res['width']}, float64): (H + {c['damping']:g}·I) v = ∂θ L_out solved by "
        f"both CGs ({c['funcbo_cg_iterations']} iterations, relative residual "
        f"{c['funcbo_cg_residual']:.1e}): relative difference of the hypergradients, funcbo AID vs "
        f"TorchOpt AID = {c['rel_diff']:.2e}"
    )
    if not res["converged_ok"]:
        print("  funcbo's CG did not converge: raise --check-damping or --check-cg-iters")
    print(
        f"  with the timed settings (no damping, {t['maxiter']} iterations, unconverged: relative "
        f"residual {t['funcbo_cg_residual']:.2f}) the difference is {t['rel_diff']:.2e}: on this "
        "indefinite Hessian funcbo's CG falls back to its smallest-residual iterate when its "
        "residual ends above the start, TorchOpt's returns its last iterate"
    )
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: a worker, the check, or the full sweep."""
    args = parse_args(argv)
    if args.worker or args.check_worker:
        cfg = {k: getattr(args, k) for k in CFG_KEYS}  # the parent passes every option
        if args.worker:
            res = worker(cfg, args.worker, args.width)
        else:
            res = check_worker(cfg, args.width)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    instances = {
        name: {**_cfg(args, name), "widths": _widths(args, name)} for name in args.instances
    }
    record: dict[str, Any] = {
        "benchmark": "hypergradient_cost",
        "command": " ".join(
            ["python", "benchmarks/hypergradient_cost.py", *(argv or sys.argv[1:])]
        ),
        "config": {"methods": args.methods, "rounds": args.rounds, "instances": instances},
        "environment": environment(args.threads),
        "methods": {m: NOTES[m] for m in args.methods},
        "load_average_start": list(os.getloadavg()),
    }
    check = {"status": "skipped", "note": "--no-check"} if args.no_check else run_check(args)
    record["check"] = check
    if args.check:
        atomic_write_json(args.out, record)
        return 0 if check.get("status") != "failed" else 1

    torchopt_ok = have_torchopt()
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    rounds: list[list[dict[str, Any]]] = []
    for k in range(args.rounds):
        tag = f" (round {k + 1}/{args.rounds})" if args.rounds > 1 else ""
        rounds.append([])
        for name, icfg in instances.items():
            cfg = {key: icfg[key] for key in CFG_KEYS}
            for width in icfg["widths"]:
                for method in args.methods:
                    if method == "torchopt_aid_cg" and not torchopt_ok:
                        res = {"status": "skipped", "note": "torchopt not installed"}
                    else:
                        res = run_worker(args, cfg, ["--worker", method, "--width", str(width)])
                    res.update(instance=name, method=method, width=width)
                    rounds[-1].append(res)
                    shown = (
                        f"{res['time_ms']:10.1f} ms {res['extra_mb']:9.1f} MB"
                        if res["status"] == "ok"
                        else f"{res['status']}: {res.get('note', '')}"
                    )
                    print(f"  {name:5s} width {width:5d}  {method:16s} {shown}{tag}", flush=True)
    results = merge_rounds(rounds)
    add_ratios(results)
    targets = evaluate_targets(results)
    record.update(
        results=results,
        targets=targets,
        wall_time_s=time.perf_counter() - t_start,
        load_average_end=list(os.getloadavg()),
    )
    for name, icfg in instances.items():
        rows = [r for r in results if r["instance"] == name]
        print(
            f"\n{name}: one total-gradient estimate, depth {args.depth}, batch {icfg['batch']}, "
            f"d_v {icfg['out_dim']}, {args.dtype}, {args.device}, {args.threads} threads, "
            f"median of {args.repeats} calls"
            + (f", median of {args.rounds} rounds:" if args.rounds > 1 else ":")
        )
        print(format_table(rows))
        phases = format_phases(rows)
        if phases:
            print(f"\n{name}: FuncID's phases, time (ms) / peak extra memory (MB):")
            print(phases)
    print()
    print("Targets (width >= 1024):")
    print(format_targets(targets))
    atomic_write_json(args.out, record)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
