"""Batched RL runs (``batch_seeds``): aggregate environment steps per second vs one plain run.

For each method, one process and one thread: the unbatched agent (gymnasium, the plain path)
and :class:`~funcbo.apps.rl.batched_agent.BatchedAgent` with R runs, each after its random phase
(not timed), ``--steps`` timed environment steps with one update each, then one evaluation
(``eval_episodes`` episodes per run), timed separately. The blocks are interleaved (plain,
R₁, R₂, …, then again) and the median of ``--repeats`` is kept, so that load from other
processes falls on all of them alike. Reports the aggregate speed-up, R · (plain time per step)
/ (batched time per step), and where a batched step's time goes (environment, replay, acting,
update; evaluation per episode).

    python benchmarks/rl_batched.py    # FuncID (reference), OMD, MLE; R = 1, 10, 60
    python benchmarks/rl_batched.py --methods omd --runs 10 --steps 100
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from funcbo.apps.rl.agent import Agent
from funcbo.apps.rl.batched_agent import BatchedAgent
from funcbo.apps.rl.config import RLMethodConfig, RLProblemConfig

#: the issue's targets: aggregate speed-up over one plain run, by number of runs batched
TARGETS = {10: 5.0, 60: 8.0}
OUT = Path(__file__).parent / "results" / "rl_batched.json"


def _plain(kind: str, problem: RLProblemConfig, steps: int) -> tuple[float, float]:
    agent = Agent(problem, RLMethodConfig(kind=kind), seed=0)
    for _ in range(problem.init_steps + 5):
        agent.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        agent.step()
    step = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    agent.evaluate()
    return step, time.perf_counter() - t0


def _batched(kind: str, problem: RLProblemConfig, runs: int, steps: int) -> dict[str, float]:
    m = RLMethodConfig(kind=kind)
    agent = BatchedAgent([problem] * runs, [m] * runs, list(range(runs)))
    for _ in range(problem.init_steps + 5):
        agent.step()
    before = dict(agent.timings)
    t0 = time.perf_counter()
    for _ in range(steps):
        agent.step()
    step = (time.perf_counter() - t0) / steps
    parts = {k: (agent.timings[k] - before[k]) / steps for k in ("env", "replay", "act", "update")}
    t0 = time.perf_counter()
    agent.evaluate()
    return {"step": step, "evaluation": time.perf_counter() - t0, **parts}


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="funcid_reference,omd,mle")
    ap.add_argument("--runs", default="1,10,60", help="batch sizes R")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per block")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    # the random phase is short: the timed steps all update, with a replay of ≥ 1000
    problem = RLProblemConfig(init_steps=1000)
    sizes = [int(r) for r in args.runs.split(",")]
    rows = []
    for kind in args.methods.split(","):
        plain: list[tuple[float, float]] = []
        batched: dict[int, list[dict[str, float]]] = {r: [] for r in sizes}
        for _ in range(args.repeats):
            plain.append(_plain(kind, problem, args.steps))
            for r in sizes:
                batched[r].append(_batched(kind, problem, r, args.steps))
        p_step = statistics.median(s for s, _ in plain)
        p_eval = statistics.median(e for _, e in plain)
        rows.append(
            {
                "method": kind,
                "runs": 0,
                "ms_per_step": 1e3 * p_step,
                "steps_per_s": 1 / p_step,
                "aggregate_steps_per_s": 1 / p_step,
                "speedup": 1.0,
                "eval_s_per_run": p_eval,
            }
        )
        for r in sizes:
            med = {k: statistics.median(x[k] for x in batched[r]) for k in batched[r][0]}
            rows.append(
                {
                    "method": kind,
                    "runs": r,
                    "ms_per_step": 1e3 * med["step"],
                    "steps_per_s": 1 / med["step"],
                    "aggregate_steps_per_s": r / med["step"],
                    "speedup": r * p_step / med["step"],
                    "target": TARGETS.get(r),
                    "eval_s_per_run": med["evaluation"] / r,
                    **{f"ms_{k}": 1e3 * med[k] for k in ("env", "replay", "act", "update")},
                }
            )
    header = (
        "| method | runs R | ms / step | aggregate env steps/s | speed-up vs plain (target) | "
        "env | replay | act | update (ms) | evaluation s / run |"
    )
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        if row["runs"] == 0:
            lines.append(
                f"| {row['method']} | plain | {row['ms_per_step']:.2f} | "
                f"{row['aggregate_steps_per_s']:.0f} | 1.0× | | | | | {row['eval_s_per_run']:.3f} |"
            )
            continue
        tgt = f" ({row['target']:.0f}×)" if row.get("target") else ""
        lines.append(
            f"| {row['method']} | {row['runs']} | {row['ms_per_step']:.2f} | "
            f"{row['aggregate_steps_per_s']:.0f} | {row['speedup']:.2f}×{tgt} | "
            f"{row['ms_env']:.2f} | {row['ms_replay']:.2f} | {row['ms_act']:.2f} | "
            f"{row['ms_update']:.2f} | {row['eval_s_per_run']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    result = {
        "benchmark": "rl_batched",
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "threads": 1,
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
        "table": table,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
