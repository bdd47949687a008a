"""Solvers on tuples of tensors and output-space Hessians via torch.func."""

import pytest
import torch
from helpers import rel_err

from funcbo.errors import NonFiniteLossError
from funcbo.linalg import CG, Identity, Neumann, OutputHessian


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
