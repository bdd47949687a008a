"""Solvers on tuples of tensors and output-space Hessians via torch.func."""

import pytest
import torch
from helpers import rel_err

from funcbo.errors import NonFiniteLossError
from funcbo.linalg import (
    CG,
    Identity,
    Neumann,
    OutputHessian,
    SolverGaveUpWarning,
    run_dot,
    run_norm,
    run_where,
)


def _spd(n, seed=0, cond=10.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return Q @ torch.diag(ev) @ Q.T


def _split_matvec(A, sizes):
    def mv(v):
        x = torch.cat([t.reshape(-1) for t in v])
        y = A @ x
        return tuple(
            y[sum(sizes[:i]) : sum(sizes[: i + 1])].reshape(v[i].shape) for i in range(len(v))
        )

    return mv


def test_cg_solves_tuple_system_exactly():
    A = _spd(12)
    b = (torch.randn(2, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
    cg = CG(maxiter=50, tol=1e-14)
    x, info = cg(_split_matvec(A, [6, 6]), b)
    want = torch.linalg.solve(A, torch.cat([t.reshape(-1) for t in b]))
    assert rel_err(torch.cat([t.reshape(-1) for t in x]), want) <= 1e-10
    assert 1 <= info.iterations <= 13 and info.residual <= 1e-13


def test_cg_warm_start_from_solution_takes_no_iteration():
    A = _spd(5)
    b = (torch.randn(5, dtype=torch.float64),)
    x = (torch.linalg.solve(A, b[0]),)
    cg = CG(maxiter=10, tol=1e-10)
    _, info = cg(lambda v: (A @ v[0],), b, x0=x)
    assert info.iterations == 0


def test_cg_damping_and_preconditioner():
    A = _spd(8, cond=1e4)
    b = (torch.randn(8, dtype=torch.float64),)
    x, _ = CG(maxiter=100, tol=1e-14, damping=0.5)(lambda v: (A @ v[0],), b)
    want = torch.linalg.solve(A + 0.5 * torch.eye(8, dtype=torch.float64), b[0])
    assert rel_err(x[0], want) <= 1e-10
    Ainv = torch.linalg.inv(A)
    cg = CG(maxiter=100, tol=1e-12)
    _, info = cg(lambda v: (A @ v[0],), b, preconditioner=lambda r: (Ainv @ r[0],))
    assert info.iterations <= 2


def test_solvers_are_immutable_values_that_return_their_diagnostics():
    import dataclasses

    from funcbo.linalg import SolveInfo

    cg = CG(maxiter=3)
    b = (torch.ones(3, dtype=torch.float64),)
    out = cg(lambda v: v, b)
    assert isinstance(out[1], SolveInfo) and cg == CG(maxiter=3)
    for solver in (cg, Neumann(), Identity()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            solver.maxiter = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        out[1].iterations = 5  # type: ignore[misc]


def test_cg_non_finite_product_raises():
    with pytest.raises(NonFiniteLossError):
        CG(maxiter=3)(lambda v: (v[0] * float("nan"),), (torch.ones(3),))


def test_neumann_converges_and_identity_is_b():
    A = _spd(6, cond=3.0)
    b = (torch.randn(6, dtype=torch.float64),)
    lr = 1.0 / 3.0
    x, info = Neumann(iters=400, lr=lr)(lambda v: (A @ v[0],), b)
    assert info.iterations == 400
    assert rel_err(x[0], torch.linalg.solve(A, b[0])) <= 1e-10
    # From x0 = 0 it is the truncated series lr·Σ_k (I − lr·A)^k b.
    x3, _ = Neumann(iters=3, lr=lr)(lambda v: (A @ v[0],), b)
    M = torch.eye(6, dtype=torch.float64) - lr * A
    series = lr * (b[0] + M @ b[0] + M @ M @ b[0])
    assert rel_err(x3[0], series) <= 1e-12
    x, info = Identity(scale=2.0)(lambda v: v, b)
    assert x[0].equal(2.0 * b[0]) and info.iterations == 0


def _softmax_ridge(v, mu=0.1):
    return torch.logsumexp(v, 1) + 0.5 * mu * (v**2).sum(1) - v[:, 0]


def test_output_hessian_matches_autograd_hessian():
    V = torch.randn(7, 4, dtype=torch.float64)
    H = OutputHessian.of_loss(_softmax_ridge, V)
    for i in range(7):
        want = torch.autograd.functional.hessian(lambda v: _softmax_ridge(v[None])[0], V[i])
        assert torch.allclose(H.dense[i], want, atol=1e-12)
    A = torch.randn(7, 4, dtype=torch.float64)
    assert torch.allclose(H.matvec(A), torch.einsum("bij,bj->bi", H.dense, A))
    assert H.isotropic is None
    assert torch.allclose(H.trace_scale(), torch.diagonal(H.dense, dim1=1, dim2=2).mean(1))


def test_output_hessian_matrix_free_matches_dense():
    V = torch.randn(5, 4, dtype=torch.float64)
    dense = OutputHessian.of_loss(_softmax_ridge, V)
    free = OutputHessian.of_loss(_softmax_ridge, V, dense=False)
    assert free.dense is None
    A = torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(free.matvec(A), dense.matvec(A), atol=1e-12)
    est = free.trace_scale(probes=300, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(est, dense.trace_scale(), rtol=0.3)


def test_isotropic_detection_and_scalar_outputs():
    V = torch.randn(6, 3, dtype=torch.float64)
    H = OutputHessian.of_loss(lambda v: 1.5 * (v**2).sum(1), V)
    assert H.isotropic is not None and torch.allclose(
        H.isotropic, torch.full((6,), 3.0, dtype=torch.float64)
    )
    s = OutputHessian.of_loss(
        lambda v: torch.nn.functional.softplus(v[:, 0]) + v[:, 0] ** 2, V[:, :1]
    )
    assert s.isotropic is not None  # every 1×1 Hessian is isotropic


def test_output_hessian_without_vmap_support_falls_back():
    def loss(v):
        out = torch.zeros(v.shape[0], dtype=v.dtype)
        out += (v**2).sum(1)  # in-place write of a batched tangent: vmap cannot run this
        return out

    V = torch.randn(4, 3, dtype=torch.float64)
    H = OutputHessian.of_loss(loss, V, dense=True)
    assert torch.allclose(H.dense, 2 * torch.eye(3, dtype=torch.float64).expand(4, 3, 3))
    auto = OutputHessian.of_loss(loss, V)  # the isotropy probe cannot vmap either
    assert torch.allclose(
        auto.matvec(torch.ones(4, 3, dtype=torch.float64)),
        torch.full((4, 3), 2.0, dtype=torch.float64),
    )


def test_isotropy_probe_avoids_dense_hessians():
    V = torch.randn(6, 8, dtype=torch.float64)
    iso = OutputHessian.of_loss(lambda v: 1.5 * (v**2).sum(1) * (1 + 0 * v[:, 0]), V)
    assert iso.dense is None and torch.allclose(
        iso.isotropic, torch.full((6,), 3.0, dtype=torch.float64)
    )
    general = OutputHessian.of_loss(_softmax_ridge, V)
    assert general.dense is not None and general.isotropic is None
    # The probes are drawn once per shape and reused, without touching the global generator.
    from funcbo.linalg import _PROBES

    state = torch.random.get_rng_state()
    again = OutputHessian.of_loss(lambda v: 1.5 * (v**2).sum(1) * (1 + 0 * v[:, 0]), V)
    assert torch.equal(again.isotropic, iso.isotropic)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (6, 8, torch.float64, V.device) in _PROBES and len(_PROBES) <= 8


def test_output_hessian_carries_no_graph_to_outer_parameters():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    H = OutputHessian.of_loss(
        lambda v: (torch.exp(v * w)).sum(1), torch.randn(4, 3, dtype=torch.float64)
    )
    assert not H.dense.requires_grad


def test_cg_discards_a_warm_start_worse_than_zero():
    A = _spd(6)
    b = (torch.randn(6, dtype=torch.float64),)
    bad = (1e6 * torch.randn(6, dtype=torch.float64),)
    cg = CG(maxiter=50, tol=1e-12)
    x, _ = cg(lambda v: (A @ v[0],), b, x0=bad)
    assert rel_err(x[0], torch.linalg.solve(A, b[0])) <= 1e-8


def test_cg_on_indefinite_operator_returns_smallest_residual_iterate():
    A = torch.diag(torch.tensor([1.0, 1e-9, -1.0], dtype=torch.float64))
    b = (torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),)
    cg = CG(maxiter=10)
    with pytest.warns(SolverGaveUpWarning, match="CG gave up"):
        x, info = cg(lambda v: (A @ v[0],), b)
    r = b[0] - A @ x[0]
    assert float(r.norm()) <= float(b[0].norm())  # never worse than x = 0
    assert info.residual == pytest.approx(float(r.norm() / b[0].norm()))


def _diag_matvec(d):
    return lambda v: (d * v[0],)


def test_cg_that_makes_no_progress_says_so():
    # Indefinite diag(1, -1), b = (1, 2): the first CG step raises the residual from √5 to ≈ 2.98,
    # so the safeguarded solver returns its (zero) start, flags it and warns.
    from funcbo.linalg import SolverGaveUpWarning

    d = torch.tensor([1.0, -1.0], dtype=torch.float64)
    b = (torch.tensor([1.0, 2.0], dtype=torch.float64),)
    cg = CG(maxiter=1)
    with pytest.warns(SolverGaveUpWarning, match="gave up"):
        (x,), info = cg(_diag_matvec(d), b)
    assert torch.equal(x, torch.zeros(2, dtype=torch.float64))
    assert info.gave_up and not info.diverged
    assert info.residual == pytest.approx(1.0)
    # A solve that converges is not flagged.
    cg = CG(maxiter=2)
    _, info = cg(_diag_matvec(torch.tensor([1.0, 2.0], dtype=torch.float64)), b)
    assert not info.gave_up and info.residual < 1e-12


def test_cg_without_safeguards_is_textbook_cg():
    # One textbook step: α = ‖b‖²/⟨b, Ab⟩ = 5/(1 − 4), x = αb, whatever the residual does.
    d = torch.tensor([1.0, -1.0], dtype=torch.float64)
    b = (torch.tensor([1.0, 2.0], dtype=torch.float64),)
    cg = CG(maxiter=1, safeguards=False)
    (x,), info = cg(_diag_matvec(d), b)
    assert torch.allclose(x, (5.0 / -3.0) * b[0], atol=0, rtol=1e-15)
    assert info.diverged and not info.gave_up
    # The warm start is always taken, even one worse than zero.
    x0 = (torch.tensor([10.0, -10.0], dtype=torch.float64),)
    cg = CG(maxiter=1, safeguards=False)
    (x,), _ = cg(_diag_matvec(d), b, x0=x0)
    r0 = b[0] - d * x0[0]
    p = r0
    alpha = (r0 @ r0) / (p @ (d * p))
    assert torch.allclose(x, x0[0] + alpha * p, rtol=1e-14, atol=0)


# ------------------------------------------------------------------ batched CG (R systems)
SHAPES = ((2, 3), (4,))  # every run's unknown: a tuple of a [2, 3] and a [4] tensor (n = 10)


def _stacked_matvec(As):
    """The R operators ``As [R, n, n]`` on stacked tuples shaped ``[R, *SHAPES[k]]``."""

    def mv(v):
        x = torch.cat([t.reshape(t.shape[0], -1) for t in v], 1)
        y = torch.einsum("rij,rj->ri", As, x)
        out, i = [], 0
        for t in v:
            m = t[0].numel()
            out.append(y[:, i : i + m].reshape(t.shape))
            i += m
        return out

    return mv


def _run_matvec(mv, r, runs):
    """Run r's operator alone, through the stacked one (so both solvers see the same
    products, bit for bit)."""

    def mv_r(v):
        full = [torch.zeros(runs, *t.shape, dtype=t.dtype) for t in v]
        for f, t in zip(full, v, strict=True):
            f[r] = t
        return tuple(t[r] for t in mv(full))

    return mv_r


def _split(x):
    """A length-n vector as one run's tuple."""
    return (x[:6].reshape(2, 3), x[6:])


def _stack_runs(vectors):
    """R length-n vectors as a stacked tuple."""
    return [torch.stack([_split(x)[k] for x in vectors]) for k in range(len(SHAPES))]


def _flat(xs):
    return torch.cat([t.reshape(-1) for t in xs])


def _batched_systems(damping):
    """Six systems (A_r − damping·I, so that the damped operators are A_r), their right-hand
    sides and warm starts:

    0. SPD, cond 100, a warm start near the solution (kept);
    1. SPD, a warm start 10⁶ times too large (rejected with safeguards: start from zero);
    2. b = 0 (with a warm start): x = 0 after no iteration;
    3. SPD with three distinct eigenvalues: stops by tol after 3 iterations;
    4. indefinite: no iterate improves on the start within 6 iterations (gives up), cold;
    5. indefinite: the last iterate is worse than the start, an earlier one better (the
       safeguarded solver returns that one);
    6. SPD, warm-started at its solution: no iteration, and no giving up.
    """
    D = torch.float64
    n = 10
    g = torch.Generator().manual_seed(7)
    A0 = _spd(n, seed=1, cond=100.0)
    A1 = _spd(n, seed=2, cond=10.0)
    A2 = _spd(n, seed=3)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    A3 = Q @ torch.diag(torch.tensor([1.0] * 4 + [2.0] * 3 + [4.0] * 3, dtype=D)) @ Q.T
    g22, g1 = torch.Generator().manual_seed(22), torch.Generator().manual_seed(1)
    d4, b4 = torch.randn(n, generator=g22, dtype=D), torch.randn(n, generator=g22, dtype=D)
    d5, b5 = torch.randn(n, generator=g1, dtype=D), torch.randn(n, generator=g1, dtype=D)
    A6 = _spd(n, seed=4, cond=30.0)
    As = torch.stack([A0, A1, A2, A3, torch.diag(d4), torch.diag(d5), A6])
    bs = [torch.randn(n, generator=g, dtype=D) for _ in range(4)] + [b4, b5]
    bs += [torch.randn(n, generator=g, dtype=D)]
    bs[2] = torch.zeros(n, dtype=D)
    x0s = [
        torch.linalg.solve(A0, bs[0]) + 0.05 * torch.randn(n, generator=g, dtype=D),
        1e6 * torch.randn(n, generator=g, dtype=D),
        torch.randn(n, generator=g, dtype=D),
        torch.zeros(n, dtype=D),
        torch.randn(n, generator=g, dtype=D),  # not used: run 4 starts cold
        torch.zeros(n, dtype=D),
        torch.linalg.solve(A6, bs[6]),
    ]
    warm = torch.tensor([True, True, True, False, False, False, True])
    eye = torch.eye(n, dtype=D)
    return As - damping * eye, As, bs, x0s, warm


@pytest.mark.parametrize("safeguards", [True, False])
def test_batched_cg_is_cg_run_by_run(safeguards):
    from funcbo.linalg import SolverGaveUpWarning, batched_cg

    damping, maxiter = 0.25, 6
    shifted, As, bs, x0s, warm = _batched_systems(damping)
    runs = len(bs)
    mv = _stacked_matvec(shifted)
    cg = CG(maxiter=maxiter, damping=damping, safeguards=safeguards)
    want = []
    for r in range(runs):
        x0 = _split(x0s[r]) if warm[r] else None
        if safeguards and r == 4:
            with pytest.warns(SolverGaveUpWarning):
                want.append(cg(_run_matvec(mv, r, runs), _split(bs[r]), x0))
        else:
            want.append(cg(_run_matvec(mv, r, runs), _split(bs[r]), x0))
    if safeguards:
        with pytest.warns(SolverGaveUpWarning, match=r"run\(s\) \[4\]"):
            x, info = batched_cg(
                mv, _stack_runs(bs), _stack_runs(x0s), warm, maxiter=maxiter, damping=damping
            )
    else:
        x, info = batched_cg(
            mv, _stack_runs(bs), _stack_runs(x0s), warm,
            maxiter=maxiter, damping=damping, safeguards=False,
        )  # fmt: skip
    assert [len(t) for t in x] == [runs, runs] and x[0].shape == (runs, 2, 3)
    for r, (xr, ir) in enumerate(want):
        got = _flat([t[r] for t in x])
        assert torch.allclose(got, _flat(xr), rtol=1e-12, atol=1e-14), r
        assert int(info.iterations[r]) == ir.iterations, r
        assert float(info.residual[r]) == pytest.approx(ir.residual, rel=1e-10, abs=1e-15), r
        assert bool(info.gave_up[r]) == ir.gave_up and bool(info.diverged[r]) == ir.diverged, r
        assert info.run(r).iterations == ir.iterations
    assert not bool(info.nonfinite.any())
    # what each run is there for (so that the comparison above covers each path)
    exact = [torch.linalg.solve(A, b) for A, b in zip(As, bs, strict=True)]
    # the kept warm start: 6 iterations from it end well below the cold solve's residual
    _, cold0 = cg(_run_matvec(mv, 0, runs), _split(bs[0]))
    assert int(info.iterations[0]) == maxiter
    assert float(info.residual[0]) < 0.05 and cold0.residual > 0.15
    cold, _ = cg(_run_matvec(mv, 1, runs), _split(bs[1]))
    if safeguards:  # the bad warm start is dropped: run 1 is the cold solve
        assert torch.allclose(_flat(want[1][0]), _flat(cold), rtol=1e-14, atol=0)
        assert float(info.residual[1]) < 0.1
    else:  # taken: the residual stays of the order of the warm start's
        assert float(info.residual[1]) > 1e3
    assert torch.equal(_flat([t[2] for t in x]), torch.zeros(10, dtype=torch.float64))
    assert int(info.iterations[2]) == 0 and float(info.residual[2]) == 0.0
    assert int(info.iterations[3]) == 3 and float(info.residual[3]) <= 1e-10
    assert rel_err(_flat([t[3] for t in x]), exact[3]) <= 1e-9
    assert int(info.iterations[6]) == 0 and float(info.residual[6]) <= 1e-14
    assert torch.equal(_flat([t[6] for t in x]), x0s[6])
    if safeguards:
        assert [bool(g) for g in info.gave_up] == [False] * 4 + [True, False, False]
        assert torch.equal(_flat([t[4] for t in x]), torch.zeros(10, dtype=torch.float64))
        assert float(info.residual[4]) == 1.0 and int(info.iterations[4]) == maxiter
        assert 0.1 < float(info.residual[5]) < 0.5  # the best iterate, not the last
        assert not bool(info.diverged.any())
    else:
        assert not bool(info.gave_up.any())
        # (run 1's residual falls from its warm start's, which is ~10⁶ ‖b‖)
        assert [bool(d) for d in info.diverged] == [False] * 4 + [True, True, False]
        assert float(info.residual[4]) > 1.0 and float(info.residual[5]) > 1.0


def test_batched_cg_non_finite_product_fails_that_run_alone():
    from funcbo.linalg import batched_cg

    shifted, _, bs, _, _ = _batched_systems(0.0)
    As = shifted[:4].clone()
    As[1, 0, 0] = float("inf")
    mv = _stacked_matvec(As)
    x, info = batched_cg(mv, _stack_runs(bs[:4]), maxiter=6)
    assert [bool(f) for f in info.nonfinite] == [False, True, False, False]
    assert bool(torch.isnan(_flat([t[1] for t in x])).all())
    assert torch.isnan(info.residual[1]) and not bool(info.gave_up[1] or info.diverged[1])
    with pytest.raises(NonFiniteLossError):
        CG(maxiter=6)(_run_matvec(mv, 1, 4), _split(bs[1]))
    for r in (0, 2, 3):
        want, wi = CG(maxiter=6)(_run_matvec(mv, r, 4), _split(bs[r]))
        assert torch.allclose(_flat([t[r] for t in x]), _flat(want), rtol=1e-12, atol=1e-14)
        assert int(info.iterations[r]) == wi.iterations


def test_batched_cg_keeps_the_iv_import():
    from funcbo.apps.iv import batched as iv_batched
    from funcbo.linalg import batched_cg

    assert iv_batched.batched_cg is batched_cg


def test_run_by_run_helpers_treat_the_leading_axis_as_the_run() -> None:
    x = [torch.arange(6.0).reshape(3, 2), torch.ones(3, 2, 2)]
    y = [-torch.ones(3, 2), torch.zeros(3, 2, 2)]
    picked = run_where(torch.tensor([True, False, True]), x, y)
    assert picked[0].tolist() == [[0.0, 1.0], [-1.0, -1.0], [4.0, 5.0]]
    assert picked[1].sum(dim=(1, 2)).tolist() == [4.0, 0.0, 4.0]
    assert run_dot(x, x).tolist() == [1.0 + 4.0, 4.0 + 9.0 + 4.0, 16.0 + 25.0 + 4.0]
    assert run_norm(y).tolist() == pytest.approx([2**0.5] * 3)
