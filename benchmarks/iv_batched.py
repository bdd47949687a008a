"""Batched IV seeds (``batch_seeds``): time per run of R runs batched vs one unbatched run.

For each method, one process and one thread, the paper's settings (dSprites, full-batch halves,
paper networks): the unbatched :class:`~funcbo.apps.iv.task.IVTask` and
:class:`~funcbo.apps.iv.batched_task.IVBatchTask` with R runs (seeds 1..R), each after
``--warmup`` untimed outer iterations, then ``--iters`` timed ones. Every run reads the same
dataset (``data_seed`` fixed: the cost does not depend on the data, and no dataset is rendered
per seed). Reports the seconds per outer iteration and the ratio (batched time per run) /
(unbatched time), whose target is ≤ 1.0 (the work is FLOP-bound: batching must not cost more
per run than running alone). Ratios come from one run of the script, blocks interleaved
(unbatched, R₁, R₂, … per method), so that load from other processes falls on all alike; the
CPU time of the process is reported beside the wall time (one thread: the compute itself, which
load from other processes inflates less than the wall time).

    python benchmarks/iv_batched.py                       # dfiv, funcid_linear; n = 5000; R = 1, 20
    python benchmarks/iv_batched.py --n 500 --runs 1,4 --iters 2    # a quick look
    python benchmarks/iv_batched.py --device cuda         # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from funcbo.apps.iv import IVProblemConfig, IVTask, make_dataset, paper_method
from funcbo.apps.iv.batched import BATCHED_KINDS
from funcbo.apps.iv.batched_task import IVBatchTask
from funcbo.experiments.task import RunSpec

#: the issue's target: batched time per run over the unbatched run's
TARGET = 1.0
OUT = Path(__file__).parent / "results" / "iv_batched.json"
MATRIX = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsprite_mat.npy"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(step, iters: int, warmup: int, device: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(wall seconds, CPU seconds of this process) per call of ``step``."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / iters, (time.process_time() - c0) / iters


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the benchmark; print a table and write the JSON (``--json``)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--methods", default=",".join(BATCHED_KINDS))
    ap.add_argument("--n", type=int, default=5000, help="training points (both halves)")
    ap.add_argument("--runs", default="1,20", help="batch sizes R")
    ap.add_argument("--iters", type=int, default=3, help="timed outer iterations per block")
    ap.add_argument("--warmup", type=int, default=1, help="untimed outer iterations first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = IVProblemConfig(
        n=args.n, data_seed=1, matrix_path=str(MATRIX) if MATRIX.exists() else None
    )
    data = make_dataset(problem, 1)
    sizes = [int(r) for r in args.runs.split(",")]
    rows = []
    for kind in args.methods.split(","):
        method = paper_method(kind)

        def spec(seed: int, kind: str = kind, method: object = method) -> RunSpec:
            return RunSpec(
                "iv_dsprites",
                kind,
                method,
                problem,
                seed=seed,
                iterations=100,
                device=args.device,
                dtype=args.dtype,
            )

        task = IVTask(spec(1), data=data)
        plain, plain_cpu = _time(task.step, args.iters, args.warmup, args.device)
        del task
        row: dict[str, object] = {
            "method": kind,
            "unbatched_s": plain,
            "unbatched_cpu_s": plain_cpu,
            "batched": {},
        }
        for R in sizes:
            specs = [spec(s) for s in range(1, R + 1)]
            batch = IVBatchTask(specs, tasks=[IVTask(s, data=data) for s in specs])
            t, cpu = _time(batch.step, args.iters, args.warmup, args.device)
            del batch
            row["batched"][R] = {  # type: ignore[index]
                "step_s": t,
                "per_run_s": t / R,
                "ratio": t / R / plain,
                "cpu_s": cpu,
                "cpu_ratio": cpu / R / plain_cpu,
                "target_met": t / R / plain <= TARGET,
            }
        rows.append(row)
    print(
        f"IV batched seeds, dSprites n = {args.n}, {args.device}, {args.dtype}, "
        f"{args.threads} thread(s), {args.iters} timed iterations"
    )
    head = "".join(f"{'R=' + str(R) + ' wall (ratio)':>22}{'CPU (ratio)':>18}" for R in sizes)
    print(f"{'method':<18}{'unbatched wall':>15}{'CPU':>8}" + head)
    for row in rows:
        cells = "".join(
            f"{b['step_s']:>12.2f} s ({b['ratio']:.2f}×)"  # type: ignore[index]
            f"{b['cpu_s']:>9.2f} s ({b['cpu_ratio']:.2f}×)"  # type: ignore[index]
            for b in row["batched"].values()  # type: ignore[attr-defined]
        )
        print(
            f"{row['method']:<18}{row['unbatched_s']:>13.2f} s"
            f"{row['unbatched_cpu_s']:>6.2f} s" + cells
        )
    print(
        f"(seconds per outer iteration; ratio: batched time per run / unbatched time, wall and "
        f"CPU; target ≤ {TARGET})"
    )
    result: dict[str, object] = {
        "benchmark": "iv_batched",
        "n": args.n,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "iters": args.iters,
        "warmup": args.warmup,
        "target_ratio": TARGET,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
