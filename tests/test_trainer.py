"""Trainer: Algorithm 1 reaches the bilevel optimum; logging, checkpoints and resuming."""

import json
import sys

import pytest
import torch

import funcbo
from funcbo.synthetic import LinearQuadratic
from funcbo.trainer import BatchStream


def _setup(estimator="funcid_linear", seed=0):
    lq = LinearQuadratic(seed=seed)
    torch.manual_seed(seed)
    outer, inner = lq.make_outer(), lq.make_inner()
    X = torch.cat(
        [lq.inner_batch["x"], torch.ones(len(lq.inner_batch["x"]), 1, dtype=torch.float64)], 1
    )
    L_in = float(torch.linalg.eigvalsh(X.T @ X / X.shape[0])[-1])
    Fe = lq._features()
    L_out = float(torch.linalg.eigvalsh(Fe.T @ Fe / Fe.shape[0])[-1]) + lq.rho
    inner_opt = torch.optim.SGD(inner.parameters(), lr=1.0 / L_in)
    if estimator == "funcid_linear":
        est = funcbo.FuncID(inner, inner_opt, 5, funcbo.LinearAdjoint(ridge=1e-12))
    elif estimator == "funcid_network":
        adj = funcbo.NetworkAdjoint(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), steps=5)
        est = funcbo.FuncID(inner, inner_opt, 5, adj)
    else:
        est = funcbo.AID(inner, inner_opt, 5, solver=funcbo.CG(maxiter=5))
    outer_opt = torch.optim.SGD(outer.parameters(), lr=1.0 / L_out, momentum=0.5)
    return lq, outer, est, outer_opt


def test_trainer_reaches_bilevel_optimum():
    lq, outer, est, opt = _setup()
    star = lq.optimum()

    def dist(trainer):
        return {"dist": float((outer.weight.detach() - star).norm() / star.norm())}

    tr = funcbo.Trainer(
        lq.problem,
        outer,
        est,
        opt,
        [lq.inner_batch],
        [lq.outer_batch],
        evaluate=dist,
        eval_every=25,
    )
    hist = tr.fit(150)
    assert len(hist) == 150 and tr.iteration == 150
    assert hist[-1]["dist"] <= 1e-3
    assert hist[-1]["outer_loss"] < hist[0]["outer_loss"]
    for key in (
        "inner_loss",
        "outer_loss",
        "adjoint_loss",
        "grad_norm",
        "time_s",
        "peak_memory_mb",
    ):
        assert key in hist[-1], key
    assert "dist" in hist[24] and "dist" not in hist[23]


def test_jsonl_log_and_progress(tmp_path, capsys, monkeypatch):
    lq, outer, est, opt = _setup()
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # plain-text progress fallback
    log = tmp_path / "metrics.jsonl"
    tr = funcbo.Trainer(
        lq.problem,
        outer,
        est,
        opt,
        [lq.inner_batch],
        [lq.outer_batch],
        callbacks=[funcbo.JSONLLogger(log), funcbo.ProgressBar(every=5)],
    )
    tr.fit(10)
    lines = [json.loads(s) for s in log.read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(1, 11))
    assert all(r["outer_loss"] > 0 for r in lines)
    err = capsys.readouterr().err
    assert "[5/10]" in err and "[10/10]" in err and "outer_loss=" in err


@pytest.mark.parametrize("estimator", ["funcid_linear", "funcid_network", "aid"])
def test_checkpoint_resume_matches_uninterrupted_run(tmp_path, estimator):
    lq, outer, est, opt = _setup(estimator)
    full = funcbo.Trainer(lq.problem, outer, est, opt, [lq.inner_batch], [lq.outer_batch])
    full.fit(12)

    lq, outer, est, opt = _setup(estimator)
    ckpt = tmp_path / "ckpt.pt"
    first = funcbo.Trainer(
        lq.problem,
        outer,
        est,
        opt,
        [lq.inner_batch],
        [lq.outer_batch],
        callbacks=[funcbo.Checkpoint(ckpt, every=5)],
    )
    first.fit(7)  # checkpoint at 5 and at the end (7)

    lq, outer2, est2, opt2 = _setup(estimator, seed=0)
    with torch.no_grad():
        outer2.weight.add_(1.0)  # garbage that the checkpoint must overwrite
    resumed = funcbo.Trainer(lq.problem, outer2, est2, opt2, [lq.inner_batch], [lq.outer_batch])
    resumed.load_state_dict(torch.load(ckpt, weights_only=True))
    assert resumed.iteration == 7
    resumed.fit(12)
    assert torch.allclose(outer2.weight, full.outer.weight, rtol=0, atol=1e-12)


def test_batch_stream_cycles_and_reports_exhaustion():
    s = BatchStream([1, 2], "inner")
    assert [s.next() for _ in range(5)] == [1, 2, 1, 2, 1]
    assert s.epoch == 2
    gen = BatchStream(iter([1]), "outer")
    gen.next()
    with pytest.raises(RuntimeError, match=r"outer loader .* exhausted"):
        gen.next()
    with pytest.raises(RuntimeError, match="yields no batches"):
        BatchStream([], "inner").next()
    counter = iter(range(100))
    assert BatchStream(lambda: next(counter), "inner").next() == 0
