"""Small helpers shared by the tests."""

import torch


def rel_err(got, want) -> float:
    """‖got − want‖ / ‖want‖ over tensors or tuples of tensors."""
    if isinstance(got, torch.Tensor):
        got, want = (got,), (want,)
    a = torch.cat([g.reshape(-1) for g in got])
    b = torch.cat([w.reshape(-1) for w in want])
    return float((a - b).norm() / b.norm())


def lbfgs(params, iters: int = 2000):
    """An LBFGS optimizer that solves smooth float64 problems to near machine precision."""
    return torch.optim.LBFGS(
        params,
        max_iter=iters,
        tolerance_grad=1e-13,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )
