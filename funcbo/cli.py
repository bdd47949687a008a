"""The ``funcbo`` command: run sweeps from configs, report on them, run the demo.

    funcbo run CONFIG [--set key=value ...] [--methods a,b] [--seeds 0-19] [--workers N] [--out DIR]
               [--overwrite] [--restart RUN ...] [--batch-seeds]
               [--executor ray [--address ADDR] [--ray-results shared|driver]]
    funcbo report DIR [--out DIR] [--name NAME] [--preamble FILE] [--seeds common|0-4]
                  [--select-by KEY [--select-mode min|max]] [--paired]
    funcbo demo [--workers N] [--out DIR]
    funcbo list

Also available as ``python -m funcbo``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from funcbo.experiments.errors import ExperimentError
from funcbo.experiments.task import known_experiments, register_lazy


class UsageError(ExperimentError):
    """A command-line argument is invalid (printed as one line; exit status 2)."""


#: experiments shipped with funcbo, imported on first use
BUILTIN_EXPERIMENTS = {
    "linear_iv": "funcbo.apps.linear_iv",
    "iv_dsprites": "funcbo.apps.iv.experiment",
    "iv_demand": "funcbo.apps.iv.experiment",
    "rl_cartpole": "funcbo.apps.rl.experiment",
}
for _name, _module in BUILTIN_EXPERIMENTS.items():
    register_lazy(_name, _module)

#: the config ``funcbo demo`` runs (relative to the repository root)
DEMO_CONFIG = "configs/demo.yaml"


def repo_root() -> Path:
    """The source checkout this package lives in (configs/ sits at its root)."""
    return Path(__file__).resolve().parents[1]


def _split(text: str | None, what: str) -> list[str] | None:
    """A comma-separated list (None when not given; an error when it names nothing)."""
    if text is None:
        return None
    items = [s.strip() for s in text.split(",")]
    if not any(items):
        raise UsageError(f"{what} {text!r}: names nothing (write e.g. {what} a,b)")
    if not all(items):
        raise UsageError(f"{what} {text!r}: an empty name between commas")
    return items


def plural(n: int, word: str) -> str:
    """``1 run``, ``2 runs``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def cmd_run(args: argparse.Namespace) -> int:
    """Run a config's methods × seeds (skipping finished runs, resuming interrupted ones)."""
    from funcbo.experiments.config import load_config, parse_seeds, plan_runs
    from funcbo.experiments.executors import make_executor
    from funcbo.experiments.runner import RunOptions, prepare_run_dirs, run_sweep

    _check_executor_args(args)
    sets = list(args.set) + (["batch_seeds=true"] if args.batch_seeds else [])
    cfg = load_config(args.config, sets)
    seeds = None
    if args.seeds is not None:
        try:
            seeds = parse_seeds(args.seeds)
        except ValueError as e:
            raise UsageError(f"--seeds: {e}") from e
    runs = plan_runs(cfg, _split(args.methods, "--methods"), seeds)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    opts = RunOptions.from_config(cfg)
    print(f"{cfg.name}: {plural(len(runs), 'run')} ({cfg.experiment}) -> {out}", file=sys.stderr)
    if args.dry_run:
        for r in runs:
            print(r.run_id)
        return 0
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    # Checked before any run starts: a stale or unknown run stops the command with one line.
    prepare_run_dirs(runs, out, overwrite=args.overwrite, restart=args.restart)
    executor = make_executor(
        args.executor,
        workers=args.workers or 1,
        address=args.address,
        results=args.ray_results or "shared",
    )
    try:
        res = run_sweep(runs, out, options=opts, progress=not args.quiet, executor=executor)
    finally:
        executor.close()
    print(
        f"{len(res.finished)} finished, {len(res.skipped)} already done, {len(res.failed)} failed "
        f"in {res.wall_time_s:.1f} s",
        file=sys.stderr,
    )
    for run_id, err in res.failed.items():
        trace = out / run_id / "error.txt"
        # a run held by another process was not touched: no traceback of this command is there
        where = "" if err.startswith("RunInUseError") else f" (traceback in {trace})"
        print(f"  FAILED {run_id}: {err}{where}", file=sys.stderr)
    return 0 if res.ok else 1


def _check_executor_args(args: argparse.Namespace) -> None:
    """Options that belong to one executor are errors with the other."""
    if args.executor == "ray":
        from funcbo.experiments.executors import ray_available

        if not ray_available():
            raise UsageError(
                "--executor ray needs Ray, which is not installed: pip install 'funcbo[ray]'"
            )
        if args.workers is not None:
            raise UsageError(
                "--workers: with --executor ray, the cluster runs as many runs at once as its "
                "resources allow (each run asks for the config's resources.cpus and .gpus)"
            )
        return
    for flag, value in (("--address", args.address), ("--ray-results", args.ray_results)):
        if value:
            raise UsageError(f"{flag} needs --executor ray")


def cmd_report(args: argparse.Namespace) -> int:
    """Aggregate a sweep directory's finished runs into tables and figures."""
    from funcbo.experiments.report import make_report

    root = Path(args.dir)
    if not root.exists():
        raise UsageError(f"funcbo report {root}: no such directory")
    if not root.is_dir():
        raise UsageError(f"funcbo report {root}: not a directory (pass a sweep's --out directory)")
    preamble = None
    if args.preamble:
        try:
            preamble = Path(args.preamble).read_text()
        except OSError as e:
            raise UsageError(f"funcbo report: cannot read --preamble {args.preamble}: {e}") from e
    if args.select_mode and not args.select_by:
        raise UsageError("funcbo report: --select-mode needs --select-by KEY")
    seeds: str | list[int] | None = None
    if args.seeds is not None:
        if args.seeds.strip() == "common":
            seeds = "common"
        else:
            from funcbo.experiments.config import parse_seeds

            try:
                seeds = parse_seeds(args.seeds)
            except ValueError as e:
                raise UsageError(f"funcbo report --seeds: {e} (or write 'common')") from e
    rep = make_report(
        args.dir,
        args.out,
        args.name,
        iteration_label=_iteration_label(args.dir),
        preamble=preamble,
        select_by=args.select_by,
        select_mode=args.select_mode,
        seeds=seeds,
        paired=args.paired,
    )
    print(rep.markdown)
    for p in rep.figures:
        print(f"figure: {p}")
    return 0


def _iteration_label(run_root: str | Path) -> str:
    """The x-axis label of a sweep's curves, from its experiment (``sweep.json``)."""
    import json

    from funcbo.experiments.task import get_experiment

    sweep = Path(run_root) / "sweep.json"
    try:
        return get_experiment(json.loads(sweep.read_text())["experiment"]).iteration_label
    except (OSError, KeyError, ValueError):
        return "iteration"


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo config end to end and print its report."""
    from funcbo.experiments.config import load_config, plan_runs
    from funcbo.experiments.report import make_report
    from funcbo.experiments.runner import RunOptions, prepare_run_dirs, run_sweep

    path = repo_root() / DEMO_CONFIG
    if not path.exists():
        print(f"funcbo demo needs a source checkout: {path} not found", file=sys.stderr)
        return 2
    cfg = load_config(path, args.set)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    runs = plan_runs(cfg)
    t0 = time.perf_counter()
    print(f"demo: {plural(len(runs), 'run')} of {cfg.experiment} -> {out}", file=sys.stderr)
    # The demo shows the current config: runs left by an older demo config are replaced.
    replaced = prepare_run_dirs(runs, out, overwrite=True)
    if replaced:
        print(
            f"demo: replaced {plural(len(replaced), 'run')} made with another config",
            file=sys.stderr,
        )
    opts = RunOptions.from_config(cfg)
    res = run_sweep(runs, out, workers=args.workers, options=opts, progress=not args.quiet)
    rep = make_report(out, iteration_label=_iteration_label(out))
    print(rep.markdown)
    for p in rep.figures:
        print(f"figure: {p}")
    print(f"demo wall time: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0 if res.ok else 1


def cmd_list(args: argparse.Namespace) -> int:
    """Print the registered experiments."""
    from funcbo.experiments.task import get_experiment

    for name in known_experiments():
        try:
            spec = get_experiment(name)
            print(f"{name:14s} metric={spec.metric} ({spec.metric_mode})  {spec.description}")
        except Exception as e:
            print(f"{name:14s} unavailable: {type(e).__name__}: {e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the funcbo command."""
    ap = argparse.ArgumentParser(prog="funcbo", description="Functional bilevel optimization")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a config's methods × seeds (resumable)")
    run.add_argument("config", help="YAML config file (see configs/)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. problem.n=500 (repeatable)",
    )
    run.add_argument("--methods", help="comma-separated subset of the config's methods")
    run.add_argument("--seeds", help="seeds, e.g. 0-19 or 0,3,5 (default: the config's)")
    run.add_argument(
        "--workers", type=_positive_int, default=None, help="runs in parallel local processes"
    )
    run.add_argument("--out", help="output directory (default: runs/<config name>)")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace runs in --out that were made with a different config (default: stop "
        "with an error naming the differing keys)",
    )
    run.add_argument(
        "--restart",
        action="append",
        default=[],
        metavar="RUN",
        help="delete run RUN (e.g. funcid/seed_0) and start it again from scratch, e.g. after a "
        "damaged checkpoint (repeatable)",
    )
    run.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where runs execute: local processes (default) or tasks on a Ray cluster "
        "(pip install 'funcbo[ray]'), each asking for the config's resources",
    )
    run.add_argument(
        "--address",
        help="Ray cluster to use (auto, HOST:6379 or ray://HOST:10001; default: RAY_ADDRESS, "
        "a cluster started with `ray start` on this machine, else a local one for this sweep)",
    )
    run.add_argument(
        "--ray-results",
        choices=("shared", "driver"),
        default=None,
        help="shared (default): tasks write run directories under --out, which must be the same "
        "path on every machine; driver: tasks send their run directories back to be written here",
    )
    run.add_argument(
        "--batch-seeds",
        action="store_true",
        help="run all seeds of a method (and grid points that share shapes) in one process "
        "as one batched program, where the experiment supports it (the config key "
        "batch_seeds: true)",
    )
    run.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="aggregate finished runs into tables and figures")
    rep.add_argument("dir", help="a sweep's output directory")
    rep.add_argument("--out", help="where to write the report (default: DIR)")
    rep.add_argument("--name", help="file name stem of the report (default: the sweep's name)")
    rep.add_argument(
        "--preamble",
        metavar="FILE",
        help="markdown file placed under the report's title (a written summary of the results)",
    )
    rep.add_argument(
        "--select-by",
        metavar="KEY",
        help="report each method at its best grid point only: a run's score is the mean of KEY "
        "(a metric of metrics.jsonl, e.g. train_return) over its logged records, a grid "
        "point's the median over seeds",
    )
    rep.add_argument(
        "--select-mode",
        choices=("min", "max"),
        help="whether the lowest or the highest score is best (default: the experiment's "
        "metric mode); needs --select-by",
    )
    rep.add_argument(
        "--seeds",
        metavar="SEEDS",
        help="report only runs of these seeds (0-4, 0,2,5) or, with 'common', of the seeds at "
        "which every variant has a finished run (a sweep still under way)",
    )
    rep.add_argument(
        "--paired",
        action="store_true",
        help="also compare the variants seed by seed: on how many seeds each is best, and "
        "better than each other variant",
    )
    rep.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="the README's main job: a small end-to-end comparison")
    demo.add_argument("--workers", type=_positive_int, default=2)
    demo.add_argument("--out", help="output directory (default: runs/<demo config name>)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)

    lst = sub.add_parser("list", help="list the registered experiments")
    lst.set_defaults(func=cmd_list)
    return ap


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of the funcbo command; returns the exit status (2 for a user error, printed
    as one line naming the cause)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExperimentError as e:
        from funcbo.experiments.config import ConfigError

        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"{kind}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: finished runs are kept; run the same command to resume", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
