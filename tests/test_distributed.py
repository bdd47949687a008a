"""Data parallelism: two CPU ranks (gloo, launched by torchrun) equal one process on the
concatenated batches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import rel_err

from funcbo.distributed import shard_batch

SCRIPT = Path(__file__).with_name("distributed_step.py")


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parents[1]))
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("adjoint", ["linear", "network"])
def test_two_ranks_equal_one_process(tmp_path, adjoint):
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    _run([sys.executable, str(SCRIPT), str(single), adjoint], tmp_path)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(SCRIPT),
            str(multi),
            adjoint,
        ],
        tmp_path,
    )
    a = torch.load(single, weights_only=True)
    b = torch.load(multi, weights_only=True)
    assert (a["world"], a["local_batch"]) == (1, 64)
    assert (b["world"], b["local_batch"]) == (2, 32)  # each rank computed on half the batch
    assert rel_err(b["inner"], a["inner"]) <= 1e-10  # inner steps on averaged gradients
    assert rel_err(b["params"], a["params"]) <= 1e-10  # one outer step
    assert rel_err(b["grads"], a["grads"]) <= 1e-10  # the hypergradient after it
    # the logged losses are those of the whole batch, not of rank 0's shard
    assert b["stats"] == pytest.approx(a["stats"], rel=1e-10)


def test_shard_batch_splits_evenly_or_explains():
    batch = {"x": torch.arange(6), "t": (torch.arange(6), "label")}
    assert shard_batch(batch, 1, 2)["x"].tolist() == [3, 4, 5]
    assert shard_batch(batch, 0, 3)["t"][0].tolist() == [0, 1]
    assert shard_batch(batch, 0, 3)["t"][1] == "label"
    with pytest.raises(ValueError, match="divisible by the world size"):
        shard_batch(batch, 0, 4)
