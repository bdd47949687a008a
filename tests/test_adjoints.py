"""Adjoint solvers: the network and closed-form adjoints agree, primal and dual solves agree."""

import copy

import pytest
import torch
from helpers import lbfgs, rel_err
from torch import nn

import funcbo
from funcbo.adjoints import AdjointProblem, LinearAdjoint, NetworkAdjoint, reset_parameters
from funcbo.linalg import OutputHessian
from funcbo.synthetic import DiscreteIV, LinearQuadratic, SoftmaxIV, mlp


def _adjoint_problem(n=40, m=30, p=6, d=3, isotropic=True, seed=0):
    """A random adjoint problem on features Z with per-sample Hessians (SPD)."""
    g = torch.Generator().manual_seed(seed)
    Z_in = torch.randn(n, p, generator=g, dtype=torch.float64)
    Z_out = torch.randn(m, p, generator=g, dtype=torch.float64)
    if isotropic:
        c = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
        H = c[:, None, None] * torch.eye(d, dtype=torch.float64)
    else:
        B = torch.randn(n, d, d, generator=g, dtype=torch.float64)
        H = B @ B.transpose(1, 2) + 0.3 * torch.eye(d, dtype=torch.float64)
    G = torch.randn(m, d, generator=g, dtype=torch.float64)
    V = torch.zeros(n, d, dtype=torch.float64)
    hess = OutputHessian(H, None, V)
    return AdjointProblem(Z_in, Z_out, hess, G, Z_in, Z_out), H


def _brute_force(prob, H, lam):
    """a(x_in) from :func:`_brute_force_w`."""
    Z = torch.cat([prob.z_in, torch.ones(prob.z_in.shape[0], 1, dtype=torch.float64)], 1)
    return Z @ _brute_force_w(prob, H, lam).T


def _brute_force_w(prob, H, lam):
    """Solve the normal equations of J(W) + λ/2‖W‖² by a dense Kronecker system: W."""
    Z = torch.cat([prob.z_in, torch.ones(prob.z_in.shape[0], 1, dtype=torch.float64)], 1)
    Zo = torch.cat([prob.z_out, torch.ones(prob.z_out.shape[0], 1, dtype=torch.float64)], 1)
    n, q = Z.shape
    d = H.shape[1]
    # vec(H_i W z_i z_iᵀ) = (z_i z_iᵀ ⊗ H_i) vec(W)  (column-major vec)
    A = sum(torch.kron(torch.outer(Z[i], Z[i]), H[i]) for i in range(n)) / n
    A = A + lam * torch.eye(q * d, dtype=torch.float64)
    M = -(prob.g_out.T @ Zo) / Zo.shape[0]
    w = torch.linalg.solve(A, M.T.reshape(-1))
    return w.reshape(q, d).T


@pytest.mark.parametrize("isotropic", [True, False])
@pytest.mark.parametrize("n", [40, 5])  # n > p+1: primal solve; n < p+1: Woodbury (dual) solve
def test_linear_adjoint_matches_brute_force(isotropic, n):
    prob, H = _adjoint_problem(n=n, isotropic=isotropic)
    lam = 1e-3
    adj = LinearAdjoint(ridge=lam, relative=False, solver=funcbo.CG(maxiter=200, tol=1e-13))
    adj.head = nn.Identity()  # features are given directly
    A = adj.solve(prob)
    assert rel_err(A, _brute_force(prob, H, lam)) <= 1e-8
    assert adj.stats["adjoint_isotropic"] == float(isotropic)


def test_relative_ridge_is_scale_free():
    prob, _ = _adjoint_problem()
    adj = LinearAdjoint(ridge=1e-4)
    adj.head = nn.Identity()
    A1 = adj.solve(prob)
    scaled = AdjointProblem(
        prob.x_in, prob.x_out, prob.hessian, prob.g_out, 10 * prob.z_in, 10 * prob.z_out
    )
    A2 = adj.solve(scaled)
    # W scales by 1/10 except the bias column; with bias the adjoints differ only through it.
    assert rel_err(A2, A1) <= 0.2
    assert adj.stats["adjoint_ridge"] > 50 * 1e-4


def test_network_and_linear_adjoints_agree_isotropic():
    # The adjoint network is linear in the features, exactly what the linear adjoint spans.
    lq = LinearQuadratic(seed=4)
    outer, inner = lq.make_outer(), lq.make_inner()
    lq.set_inner_to_solution(inner, outer.weight)
    lin = funcbo.FuncID(
        inner, torch.optim.SGD(inner.parameters(), lr=0.1), 0, funcbo.LinearAdjoint(ridge=1e-13)
    )
    net = funcbo.FuncID(
        inner,
        torch.optim.SGD(inner.parameters(), lr=0.1),
        0,
        funcbo.NetworkAdjoint(optimizer=lbfgs, steps=1),
    )
    g_lin = lin.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    g_net = net.step(lq.problem, outer, lq.inner_batch, lq.outer_batch)
    assert rel_err(g_net, g_lin) <= 1e-7
    # The ½ in J: both reach the same minimum value J(a*) = −½⟨d, C⁻¹d⟩.
    assert net.stats["adjoint_loss"] == pytest.approx(lin.stats["adjoint_loss"], rel=1e-9)


def test_network_and_linear_adjoints_agree_non_isotropic():
    # Softmax inner loss (general Hessians): structured CG vs a network adjoint on the same
    # one-hot features, which both represent any function of the K groups exactly.
    sm = SoftmaxIV(mu=0.05, seed=2)
    outer = sm.make_outer()
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(sm.K, sm.d)).double()
    inner_opt = lbfgs(inner.parameters())
    lin = funcbo.FuncID(inner, inner_opt, 1, funcbo.LinearAdjoint(ridge=1e-13))
    g_lin = lin.step(sm.problem, outer, sm.inner_batch, sm.outer_batch)
    net = funcbo.FuncID(inner, inner_opt, 0, funcbo.NetworkAdjoint(optimizer=lbfgs, steps=1))
    g_net = net.step(sm.problem, outer, sm.inner_batch, sm.outer_batch)
    assert lin.stats["adjoint_isotropic"] == 0.0
    assert rel_err(g_net, g_lin) <= 1e-6


def test_network_adjoint_default_is_fresh_copy_of_inner_architecture():
    inner = mlp([3, 8, 2]).double()
    adj = NetworkAdjoint(steps=1)
    adj.bind(inner)
    assert isinstance(adj.model, nn.Sequential) and adj.model is not inner
    assert [p.shape for p in adj.model.parameters()] == [p.shape for p in inner.parameters()]
    assert not torch.equal(adj.model[0].weight, inner[0].weight)
    warm = NetworkAdjoint(steps=1, init="inner")
    warm.bind(inner)
    assert torch.equal(warm.model[0].weight, inner[0].weight)


def test_network_adjoint_default_optimizer_is_fused_adam_where_torch_has_it(monkeypatch):
    adj = NetworkAdjoint(steps=1)
    adj.bind(mlp([3, 8, 2]).double())
    assert isinstance(adj.optimizer, torch.optim.Adam)
    assert adj.optimizer.defaults["lr"] == 1e-3 and adj.optimizer.defaults["fused"]
    plain = torch.optim.Adam

    def no_fused(params, lr, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be on CUDA")
        return plain(params, lr=lr, **kw)

    monkeypatch.setattr(torch.optim, "Adam", no_fused)
    old = NetworkAdjoint(steps=1)
    old.bind(mlp([3, 8, 2]).double())
    assert not old.optimizer.defaults["fused"]


def test_network_adjoint_without_warm_start_resets_each_solve():
    prob, _ = _adjoint_problem()
    model = nn.Linear(6, 3).double()
    w0 = model.weight.detach().clone()
    adj = NetworkAdjoint(model, lambda p: torch.optim.SGD(p, lr=0.1), steps=3, warm_start=False)
    adj.bind(model)
    a1 = adj.solve(prob)
    a2 = adj.solve(prob)
    assert torch.allclose(a1, a2)
    assert not torch.equal(model.weight, w0)
    warm = NetworkAdjoint(
        copy.deepcopy(nn.Linear(6, 3).double()), lambda p: torch.optim.SGD(p, lr=0.1), steps=3
    )
    b1, b2 = warm.solve(prob), warm.solve(prob)
    assert not torch.allclose(b1, b2)


def test_reset_parameters_reaches_spectral_norm_originals():
    from torch.nn.utils.parametrizations import spectral_norm

    net = nn.Sequential(spectral_norm(nn.Linear(4, 3)), nn.ReLU(), nn.Linear(3, 2))
    before = net[0].parametrizations.weight.original.detach().clone()
    reset_parameters(net)
    assert not torch.equal(net[0].parametrizations.weight.original, before)


def test_head_selection_and_errors():
    inner = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    adj = LinearAdjoint()
    adj.bind(inner)
    assert adj.head is inner[2]
    named = LinearAdjoint(head="0")
    named.bind(inner)
    assert named.head is inner[0]
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        LinearAdjoint(head="nope").bind(inner)
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        LinearAdjoint().bind(nn.Sequential(nn.Tanh()))
    with pytest.raises(ValueError, match="ridge > 0"):
        LinearAdjoint(ridge=0.0)


def test_head_called_twice_is_an_error():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(self.lin(x))

    lq = LinearQuadratic(p=2, q=2, d=2)
    inner = Twice().double()
    est = funcbo.FuncID(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 0)
    with pytest.raises(RuntimeError, match="ran 4 times"):
        est.step(lq.problem, lq.make_outer(), lq.inner_batch, lq.outer_batch)


def test_linear_adjoint_on_an_embedding_uses_one_hot_features():
    # A discrete instrument's natural inner model is a table: nn.Embedding(K, d) on the group
    # index. The linear adjoint on one-hot features is then exact (up to the ridge).
    iv = DiscreteIV()
    outer = iv.make_outer()
    torch.manual_seed(0)
    inner = nn.Embedding(iv.K, iv.d).to(torch.float64)
    with torch.no_grad():
        inner.weight.copy_(iv.inner_solution(outer))
    inner_batch = {"x": iv.k_in, "t": iv.inner_batch["t"]}
    outer_batch = {"x": iv.k_out, "y": iv.outer_batch["y"]}
    est = funcbo.FuncID(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 0)
    g = est.step(iv.problem, outer, inner_batch, outer_batch)
    assert rel_err(g, iv.exact_grad(outer)) <= 1e-5
    # indices given as [B, 1] give the same features
    col = {"x": iv.k_in[:, None], "t": iv.inner_batch["t"]}

    class Column(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = inner

        def forward(self, k):
            return self.emb(k)[:, 0]

    est2 = funcbo.FuncID(Column(), torch.optim.SGD(inner.parameters(), lr=0.1), 0)
    g2 = est2.step(iv.problem, outer, col, {"x": iv.k_out[:, None], "y": iv.outer_batch["y"]})
    assert rel_err(g2, g) <= 1e-12


def test_linear_adjoint_without_linear_or_embedding_says_what_to_do():
    with pytest.raises(ValueError, match="nn.Linear or nn.Embedding.*head=.*NetworkAdjoint"):
        LinearAdjoint().bind(nn.Sequential(nn.Tanh()))


def test_network_adjoint_holdout_stops_before_fitting_noise():
    # Outer gradients that are pure noise (E[g | x] = 0) at distinct inputs: the best adjoint is
    # a = 0 (J = 0). Fitting the sample drives the fitted J below 0 and the held-out J above it;
    # with a holdout the adjoint keeps the iterate with the lowest held-out J.
    from funcbo.adjoints import AdjointProblem, NetworkAdjoint
    from funcbo.linalg import OutputHessian

    torch.manual_seed(0)
    x_in = torch.randn(64, 5, dtype=torch.float64)
    x_out = torch.randn(200, 5, dtype=torch.float64)
    g = torch.randn(200, 1, dtype=torch.float64)
    hess = OutputHessian.scaled_identity(1.0, torch.zeros(64, 1, dtype=torch.float64))
    x_test, g_test = torch.randn(1000, 5, dtype=torch.float64), torch.randn(1000, 1).double()

    def test_j(model):  # J on fresh points, the same points for both terms
        with torch.no_grad():
            a = model(x_test)
            return float(0.5 * (a**2).sum(1).mean() + (a * g_test).mean())

    results = {}
    for holdout in (0.0, 0.2):
        torch.manual_seed(1)
        net = torch.nn.Sequential(
            torch.nn.Linear(5, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1)
        ).double()
        with torch.no_grad():
            net[2].weight.zero_()
            net[2].bias.zero_()
        adj = NetworkAdjoint(net, torch.optim.Adam(net.parameters(), lr=1e-2), 300, holdout=holdout)
        adj.solve(AdjointProblem(x_in, x_out, hess, g))
        results[holdout] = (test_j(net), adj.stats)
    (j_all, stats_all), (j_held, stats_held) = results[0.0], results[0.2]
    assert stats_all["adjoint_loss"] < -0.1  # the sample's J: the noise is fitted ...
    assert j_all > 0.05  # ... and on fresh points the adjoint is worse than a = 0
    # With a holdout it keeps an early iterate, never worse than the start (a = 0, J = 0) on
    # the held-out points, and far better than the full fit on fresh points.
    assert stats_held["adjoint_holdout_loss"] <= 0.0
    assert stats_held["adjoint_best_step"] < 300
    assert j_held < 0.2 * j_all
    with pytest.raises(ValueError, match="holdout"):
        NetworkAdjoint(holdout=1.0)


# ------------------------------------------------------------- the closed-form solve's numerics
def _problem_with(Z_in, Z_out, G, H):
    V = torch.zeros(Z_in.shape[0], G.shape[1], dtype=G.dtype)
    return AdjointProblem(Z_in, Z_out, OutputHessian(H, None, V), G, Z_in, Z_out)


def _with_ones(Z):
    return torch.cat([Z, torch.ones(Z.shape[0], 1, dtype=Z.dtype)], 1)


def _dense_isotropic(prob, c, lam):
    """a(x_in) and J of the isotropic solve from the dense q × q system, in float64."""
    Z, Zo = _with_ones(prob.z_in.double()), _with_ones(prob.z_out.double())
    G = prob.g_out.double()
    n, q = Z.shape
    S = Z.T @ (c[:, None] / n * Z) + lam * torch.eye(q, dtype=torch.float64)
    W = torch.linalg.solve(S, -(G.T @ Zo).T / Zo.shape[0]).T
    A = Z @ W.T
    J = 0.5 * (c[:, None] * A * A).sum(1).mean() + ((Zo @ W.T) * G).sum(1).mean()
    return A, float(J)


@pytest.mark.parametrize("isotropic", [True, False])
@pytest.mark.parametrize("n", [40, 5])
def test_linear_adjoint_loss_matches_brute_force(isotropic, n):
    # The reported J (in sample space it comes from ⟨W, M⟩, without forming W).
    prob, H = _adjoint_problem(n=n, isotropic=isotropic)
    adj = LinearAdjoint(ridge=1e-3, relative=False, solver=funcbo.CG(maxiter=200, tol=1e-13))
    adj.head = nn.Identity()
    adj.solve(prob)
    W = _brute_force_w(prob, H, 1e-3)
    A, A_out = _with_ones(prob.z_in) @ W.T, _with_ones(prob.z_out) @ W.T
    J = 0.5 * torch.einsum("bi,bij,bj->b", A, H, A).mean() + (A_out * prob.g_out).sum(1).mean()
    assert adj.stats["adjoint_loss"] == pytest.approx(float(J), rel=1e-8)


@pytest.mark.parametrize("isotropic", [True, False])
@pytest.mark.parametrize("n,p", [(600, 700), (600, 300)])  # sample space (4 row blocks), features
def test_linear_adjoint_converts_float32_features_by_blocks(monkeypatch, isotropic, n, p):
    # A float32 model's features are multiplied in float64 one converted block at a time; the
    # result is the float64 solve of the same values (the summation order differs).
    import funcbo.adjoints as adjoints

    monkeypatch.setattr(adjoints, "FEATURE_BLOCK", 5000)  # many blocks of rows and of columns
    g = torch.Generator().manual_seed(0)
    Z_in = torch.relu(torch.randn(n, p, generator=g))
    Z_out = torch.relu(torch.randn(n // 2, p, generator=g))
    G = torch.randn(n // 2, 3, generator=g)
    c = 0.5 + torch.rand(n, generator=g)
    if isotropic:
        H = c[:, None, None] * torch.eye(3)
    else:
        B = torch.randn(n, 3, 3, generator=g)
        H = B @ B.transpose(1, 2) + 0.3 * torch.eye(3)
    adj = LinearAdjoint(ridge=1e-3, solver=funcbo.CG(maxiter=300, tol=1e-12))
    adj.head = nn.Identity()
    A32 = adj.solve(_problem_with(Z_in, Z_out, G, H))
    J32 = adj.stats["adjoint_loss"]
    prob64 = _problem_with(Z_in.double(), Z_out.double(), G.double(), H.double())
    A64 = adj.solve(prob64)
    assert A32.dtype == torch.float32
    # A32 is rounded to float32 at the end, and its Hessians' scales c_i = tr(H_i)/3 too
    assert rel_err(A32.double(), A64) <= 1e-6
    assert J32 == pytest.approx(adj.stats["adjoint_loss"], rel=1e-6)
    if isotropic:
        A_ref, J_ref = _dense_isotropic(prob64, c.double(), adj.stats["adjoint_ridge"])
        assert rel_err(A64, A_ref) <= 1e-9
        assert adj.stats["adjoint_loss"] == pytest.approx(J_ref, rel=1e-9)


def _reference_mp(prob, c, lam, digits=50):
    """a(x_in) of the isotropic solve in 50-digit arithmetic (mpmath), as float64."""
    import mpmath

    mpmath.mp.dps = digits
    Z = _with_ones(prob.z_in.double()).tolist()
    Zo = _with_ones(prob.z_out.double()).tolist()
    G = prob.g_out.double().tolist()
    cs = c.double().tolist()
    n, q, m, d = len(Z), len(Z[0]), len(Zo), len(G[0])
    S = mpmath.matrix(q, q)
    for i in range(n):
        w = mpmath.mpf(cs[i]) / n
        for a in range(q):
            for b in range(q):
                S[a, b] += w * mpmath.mpf(Z[i][a]) * mpmath.mpf(Z[i][b])
    for a in range(q):
        S[a, a] += mpmath.mpf(lam)
    A = torch.empty(n, d, dtype=torch.float64)
    for k in range(d):
        rhs = mpmath.matrix([-sum(mpmath.mpf(G[j][k]) * Zo[j][a] for j in range(m)) / m
                             for a in range(q)])  # fmt: skip
        w = mpmath.lu_solve(S, rhs)
        for i in range(n):
            A[i, k] = float(mpmath.fsum(mpmath.mpf(Z[i][a]) * w[a] for a in range(q)))
    return A


def _ill_conditioned(n, p, seed=1):
    """Float32 features whose singular values span four decades (S₀'s span eight)."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, p)
    V, _ = torch.linalg.qr(torch.randn(p, k, generator=g, dtype=torch.float64))
    sigma = torch.logspace(0, -4, k, dtype=torch.float64)

    def features(rows):
        U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
        return ((U * sigma) @ V.T).float()

    Z_in, Z_out = features(n), features(n)
    G = torch.randn(n, 2, generator=g).float()
    c = (0.5 + torch.rand(n, generator=g)).float()
    return _problem_with(Z_in, Z_out, G, c[:, None, None] * torch.eye(2)), c


@pytest.mark.parametrize("n,p", [(12, 20), (40, 10)])  # sample space, feature space
def test_linear_adjoint_stays_accurate_when_ill_conditioned(n, p):
    # Nearly collinear float32 features and a relative ridge of 1e-9: the default solve matches
    # a 50-digit solution to the float32 rounding of its result. A float32 solve is off by
    # 2e-2 to 4 here, so this test fails if the default solve loses precision.
    prob, c = _ill_conditioned(n, p)
    adj = LinearAdjoint(ridge=1e-9)
    adj.head = nn.Identity()
    A = adj.solve(prob)
    ref = _reference_mp(prob, c, adj.stats["adjoint_ridge"])
    assert rel_err(A.double(), ref) <= 1e-6
    low = LinearAdjoint(ridge=1e-9, solve_dtype=torch.float32)
    low.head = nn.Identity()
    try:
        err32 = rel_err(low.solve(prob).double(), ref)
    except torch.linalg.LinAlgError:
        err32 = float("inf")  # not even positive definite in float32
    assert not err32 <= 1e-3


def test_cholesky_in_place_and_its_fallback():
    from funcbo.adjoints import _cholesky

    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 40, generator=g, dtype=torch.float64)
    S = X @ X.T + 0.1 * torch.eye(30, dtype=torch.float64)
    want = torch.linalg.cholesky(S)
    work = S.clone()
    L = _cholesky(work, lambda: S.clone())
    assert L.data_ptr() == work.data_ptr()  # no copy
    assert torch.allclose(L, want, rtol=0, atol=1e-12)
    assert torch.equal(L, L.tril())
    assert torch.allclose(_cholesky(S), want, rtol=0, atol=1e-12)  # without rebuild
    assert torch.equal(S, X @ X.T + 0.1 * torch.eye(30, dtype=torch.float64))  # S kept
    # Singular, slightly indefinite: the factorisation fails, S is rebuilt and gets jitter.
    Y = torch.randn(30, 5, generator=g, dtype=torch.float64)
    S = Y @ Y.T - 1e-13 * torch.eye(30, dtype=torch.float64)
    jitter = 1e-10 * float(S.diagonal().abs().mean())
    for L in (_cholesky(S.clone(), lambda: S.clone()), _cholesky(S)):
        assert torch.isfinite(L).all()
        assert torch.allclose(L @ L.T, S + jitter * torch.eye(30, dtype=torch.float64), atol=1e-9)
