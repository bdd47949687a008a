"""One FuncID outer step, on one process or data-parallel under torchrun (used by
test_distributed.py).

    python tests/distributed_step.py OUT ADJOINT                       # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        tests/distributed_step.py OUT ADJOINT                          # two ranks (gloo)

Every rank builds the same models and draws the same global batches; the Trainer keeps each
rank's shard. Rank 0 saves the outer parameters and their gradients after the step.
"""

import os
import sys

import torch
import torch.distributed as dist

import funcbo
import funcbo.distributed
from funcbo.synthetic import DiscreteIV


def main(out: str, adjoint_kind: str) -> None:
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    iv = DiscreteIV(n_inner=64, n_outer=48, seed=3)
    outer = iv.make_outer(seed=1)
    inner = iv.make_inner(width=16, depth=2, seed=2)
    if adjoint_kind == "linear":
        adjoint = funcbo.LinearAdjoint(ridge=1e-4)
    else:
        torch.manual_seed(5)
        adjoint = funcbo.NetworkAdjoint(
            iv.make_inner(width=16, depth=2, seed=4),
            lambda p: torch.optim.SGD(p, lr=0.05),
            steps=3,
        )
    est = funcbo.FuncID(inner, torch.optim.SGD(inner.parameters(), lr=0.1), 3, adjoint)
    trainer = funcbo.Trainer(
        iv.problem,
        outer,
        est,
        torch.optim.SGD(outer.parameters(), lr=0.1),
        inner_loader=[iv.inner_batch],
        outer_loader=[iv.outer_batch],
    )
    metrics = trainer.step()
    # The outer step consumed the first hypergradient; compare a second one, at the new state.
    batch_in = funcbo.distributed.shard_batch(iv.inner_batch)
    batch_out = funcbo.distributed.shard_batch(iv.outer_batch)
    grads = est.hypergradient(iv.problem, outer, batch_in, batch_out)
    if funcbo.distributed.rank() == 0:
        torch.save(
            {
                "params": [p.detach() for p in outer.parameters()],
                "grads": list(grads),
                "inner": [p.detach() for p in inner.parameters()],
                "world": funcbo.distributed.world_size(),
                "local_batch": len(batch_in["x"]),
                "stats": {
                    k: float(metrics[k])
                    for k in ("outer_loss", "inner_loss", "inner_loss_at_hypergrad", "adjoint_loss")
                },
            },
            out,
        )
    if dist.is_initialized():
        dist.barrier()  # no rank tears down gloo while another still uses it
        dist.destroy_process_group()
        # Leave without the interpreter's and C++ static teardown: under load a gloo thread
        # still joinable at that point aborts the process ("terminate called without an
        # active exception") after all the work above is done and saved.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
