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


def test_update_wrapping_default_update_matches_the_default_loop():
    lq, outer, est, opt = _setup()
    plain = funcbo.Trainer(lq.problem, outer, est, opt, [lq.inner_batch], [lq.outer_batch])
    plain_hist = plain.fit(6)

    calls = []

    def update(trainer, inner_batches, outer_batch):
        calls.append(len(inner_batches))
        metrics = trainer.default_update(inner_batches, outer_batch)
        metrics["extra"] = 1.0
        return metrics

    lq, outer2, est2, opt2 = _setup()
    hooked = funcbo.Trainer(
        lq.problem, outer2, est2, opt2, [lq.inner_batch], [lq.outer_batch], update=update
    )
    hist = hooked.fit(6)
    assert calls == [est2.inner_steps] * 6
    assert torch.equal(outer2.weight, outer.weight)
    for a, b in zip(plain_hist, hist, strict=True):
        assert b.pop("extra") == 1.0
        assert {k: v for k, v in a.items() if "time" not in k and "memory" not in k} == {
            k: v for k, v in b.items() if "time" not in k and "memory" not in k
        }
        assert {"iteration", "iter_time_s", "time_s", "peak_memory_mb"} <= set(b)


class _CountingUpdate:
    """An update without an estimator: records the batches it is given; has a state."""

    def __init__(self):
        self.seen = []
        self.total = 0

    def __call__(self, trainer, inner_batches, outer_batch):
        self.seen.append((list(inner_batches), outer_batch))
        self.total += sum(inner_batches) + outer_batch
        return {"total": float(self.total)}

    def state_dict(self):
        return {"total": self.total}

    def load_state_dict(self, state):
        self.total = state["total"]


def test_update_without_estimator_draws_inner_steps_batches_and_saves_its_state(tmp_path):
    outer = torch.nn.Linear(1, 1)
    upd = _CountingUpdate()
    inner_src, outer_src = iter(range(100)), iter(range(100, 200))
    tr = funcbo.Trainer(
        None,
        outer,
        None,
        None,
        lambda: next(inner_src),
        lambda: next(outer_src),
        update=upd,
        inner_steps=3,
    )
    hist = tr.fit(2)
    # inner batches first, then the outer batch, iteration after iteration
    assert upd.seen == [([0, 1, 2], 100), ([3, 4, 5], 101)]
    assert [m["total"] for m in hist] == [103.0, 216.0] and tr.iteration == 2
    state = tr.state_dict()
    assert state["update"] == {"total": 216} and "estimator" not in state
    upd2 = _CountingUpdate()
    tr2 = funcbo.Trainer(None, outer, None, None, [0], [0], update=upd2, inner_steps=1)
    tr2.load_state_dict(state)
    assert upd2.total == 216 and tr2.iteration == 2


def test_trainer_without_estimator_needs_update_and_inner_steps():
    outer = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="or an update"):
        funcbo.Trainer(None, outer, None, None, [0], [0], inner_steps=1)
    with pytest.raises(ValueError, match="needs inner_steps"):
        funcbo.Trainer(None, outer, None, None, [0], [0], update=_CountingUpdate())
