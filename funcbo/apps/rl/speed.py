"""Environment steps per second of every RL method (``python -m funcbo.apps.rl.speed``).

Each method runs its random phase (not timed), then ``--steps`` timed environment steps, each
followed by one update with the configured batch (256 by default) and networks; evaluation is
not included. Prints a table and, with ``--json``, writes the numbers. Beside the wall-clock
rate it reports the rate in the process's CPU time, which other processes on a busy machine
disturb much less.

The reference column is the official OMD CartPole code (github.com/evgenii-nikishin/omd,
JAX 0.4.30, buffer 4k, batch 256, h = 3) measured on a 2-core CPU, median of 3 seeds: OMD 221,
MLE 130, VEP 130 environment steps per second. The authors' FuncID runs inside that code with the
cost of its OMD update, so the FuncID variants are compared with OMD's 221.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from funcbo.apps.rl.agent import Agent
from funcbo.apps.rl.config import FUNCID_KINDS, RL_KINDS, RLMethodConfig, RLProblemConfig
from funcbo.experiments.methods import make_method

#: environment steps per second of the authors' code (see the module docstring)
REFERENCE_STEPS_PER_S = {"omd": 220.7, "mle": 130.4, "vep": 130.1}
REFERENCE_STEPS_PER_S.update({k: REFERENCE_STEPS_PER_S["omd"] for k in FUNCID_KINDS})


def measure(
    kind: str, problem: RLProblemConfig, steps: int, seed: int = 0, warmup: int = 20
) -> dict[str, float]:
    """Steps per second of ``kind`` after the random phase (env step + one update each).

    Returns:
        ``{"steps_per_s", "ms_per_step", "cpu_steps_per_s", "steps"}`` (``cpu_steps_per_s``:
        per second of the process's CPU time).
    """
    agent = Agent(problem, make_method(kind, RLMethodConfig), seed)
    for _ in range(problem.init_steps + warmup):
        agent.step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        agent.step()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return {
        "steps_per_s": steps / dt,
        "ms_per_step": 1e3 * dt / steps,
        "cpu_steps_per_s": steps / dc,
        "steps": float(steps),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Command line entry point; returns ``{method: measurement}``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(RL_KINDS), help="comma-separated kinds")
    ap.add_argument("--steps", type=int, default=1000, help="timed steps per method")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model-hidden", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = RLProblemConfig(batch_size=args.batch, model_hidden=args.model_hidden)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"batch {args.batch}, model width {args.model_hidden}, {args.threads} thread(s)")
    print(f"load average at start {load0:.2f} on {os.cpu_count()} CPUs")
    print(
        "| method | env steps/s | ms/step | per CPU second | authors' code | ratio |\n"
        "|---|---|---|---|---|---|"
    )
    results: dict[str, dict[str, float]] = {}
    for kind in [k.strip() for k in args.methods.split(",") if k.strip()]:
        r = measure(kind, problem, args.steps)
        ref = REFERENCE_STEPS_PER_S.get(kind)
        if ref is not None:
            r["reference_steps_per_s"] = ref
            r["ratio"] = r["steps_per_s"] / ref
        results[kind] = r
        cols = "— | —" if ref is None else f"{ref:.0f} | {r['ratio']:.2f}×"
        print(
            f"| {kind} | {r['steps_per_s']:.1f} | {r['ms_per_step']:.2f} | "
            f"{r['cpu_steps_per_s']:.1f} | {cols} |",
            flush=True,
        )
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at end {load1:.2f}")
    if args.json is not None:
        payload = {
            "batch": args.batch,
            "model_hidden": args.model_hidden,
            "threads": args.threads,
            "load_average": [load0, load1],
            "cpus": os.cpu_count(),
            "methods": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return results


if __name__ == "__main__":
    main()
