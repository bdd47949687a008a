"""Reports of a sweep: tables (markdown + JSON) and figures (PNG + SVG) of its finished runs.

:func:`make_report` reads the run store written by ``funcbo run`` (see
:mod:`funcbo.experiments.store`), groups runs by variant (a method, or ``method[key=value,...]``
for a grid point) and writes, into ``out_dir``:

- ``<name>.md``: the main table (headline metric median [q25, q75], mean ± sd, area under the
  metric curve, wall time, iterations per second) and a table of the other final metrics;
- ``<name>.json``: the same numbers, machine readable (schema in :func:`make_report`);
- ``<name>_box.{png,svg}``: box plot of the final headline metric per variant, seeds as points;
- ``<name>_curves.{png,svg}``: headline metric, outer, inner (and adjoint) loss against the
  iteration, mean ± sd over seeds per variant.

Statistics use finished runs only; failed and unfinished runs are counted and shown beside ``n``.

With ``select_by`` (``funcbo report --select-by KEY``), each method is reported at one grid point
only, the one with the best training score (mean of ``KEY`` over a run's logged records, median
over seeds), and the report starts with a table of every grid point's score.

With ``paired`` (``funcbo report --paired``), a table follows the main one that compares the
variants seed by seed (how often each is best, and better than each other), which medians alone
do not show.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from funcbo.experiments.errors import DamagedRunError, ExperimentError
from funcbo.experiments.store import METRICS, SUMMARY, SWEEP, RunDir, find_runs
from funcbo.io import atomic_write, atomic_write_json, atomic_write_text

#: training losses reported after the headline metric, in this order, when runs log them
LOSSES = ("outer_loss", "inner_loss", "adjoint_loss")
#: keys of every statistics entry of report.json
STAT_KEYS = ("n", "median", "q25", "q75", "mean", "sd")
#: curves are drawn with at most this many points per variant (evenly strided, last one kept)
MAX_CURVE_POINTS = 2000

_STATUSES = ("finished", "failed", "running")


@dataclass
class Report:
    """A written report.

    Attributes:
        markdown: the content of ``<name>.md``.
        data: the content of ``<name>.json``.
        figures: the figure files written (PNG and SVG of each figure).
        paths: ``{"markdown": <name>.md, "json": <name>.json}``.
    """

    markdown: str
    data: dict[str, Any]
    figures: list[Path] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)


@dataclass
class _Run:
    """One run as the report sees it."""

    run: RunDir
    rel: str
    summary: dict[str, Any]
    status: str
    variant: str
    records: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------- statistics
def describe(values: Any) -> dict[str, Any]:
    """Summary statistics of a sample: n, median, quartiles, mean and sample standard deviation.

    Quartiles are numpy's default (linear interpolation between order statistics); ``sd`` uses
    ``ddof=1`` and is 0 for a single value. Non-finite values are left out (``n`` counts the
    values used); an empty sample gives ``n = 0`` and None for the rest.

    Args:
        values: numbers.

    Returns:
        ``{"n", "median", "q25", "q75", "mean", "sd"}`` as plain Python numbers.
    """
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "median": None, "q25": None, "q75": None, "mean": None, "sd": None}
    q25, median, q75 = np.percentile(v, [25.0, 50.0, 75.0])
    sd = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return {
        "n": int(v.size),
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "mean": float(np.mean(v)),
        "sd": sd,
    }


def area_under_curve(iterations: Any, values: Any) -> float:
    """Mean of a curve over its iteration span: trapezoidal integral divided by the span.

    AUC = (1 / (t_K − t_0)) Σ_k (t_{k+1} − t_k) (y_k + y_{k+1}) / 2 over points sorted by
    iteration t; a single point gives its value. The result is in the metric's units, so it
    compares runs evaluated over the same range; a non-finite value anywhere makes it non-finite.

    Args:
        iterations: iterations of the points (any order, distinct).
        values: metric values at those iterations.

    Returns:
        The AUC, or NaN for an empty curve.
    """
    t = np.asarray(iterations, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if t.shape != y.shape or t.ndim != 1:
        raise ValueError(
            f"iterations and values must be 1-d of one length, got {t.shape}, {y.shape}"
        )
    if t.size == 0:
        return math.nan
    order = np.argsort(t, kind="stable")
    t, y = t[order], y[order]
    span = t[-1] - t[0]
    if t.size == 1 or span == 0:
        return float(np.mean(y))
    return float(np.sum(np.diff(t) * (y[1:] + y[:-1]) / 2.0) / span)


def _is_number(x: Any) -> TypeGuard[int | float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _series(records: list[dict[str, Any]], key: str) -> dict[int, float]:
    """iteration → value of ``key`` from metrics.jsonl lines (the last line wins on repeats)."""
    out: dict[int, float] = {}
    for r in records:
        if _is_number(r.get(key)) and _is_number(r.get("iteration")):
            out[int(r["iteration"])] = float(r[key])
    return out


def _aligned(runs: list[_Run], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Curves of ``key`` on the iterations every run that logs it has: ([T], [seeds, T])."""
    series = [s for s in (_series(r.records, key) for r in runs) if s]
    if not series:
        return np.zeros(0), np.zeros((0, 0))
    common = sorted(set.intersection(*(set(s) for s in series)))
    t = np.asarray(common, dtype=np.float64)
    y = np.asarray([[s[i] for i in common] for s in series], dtype=np.float64)
    return t, y.reshape(len(series), len(common))


# ---------------------------------------------------------------------------- reading runs
def _load_runs(root: Path, skipped: dict[str, str]) -> list[_Run]:
    """The runs under ``root``; a run whose summary cannot be read goes to ``skipped``."""
    run_dirs = find_runs(root)
    if not run_dirs:
        raise ExperimentError(
            f"no run directories under {root} (a run directory holds {SUMMARY}; "
            "runs are written by `funcbo run CONFIG --out DIR`)"
        )
    runs = []
    for rd in run_dirs:
        rel = rd.path.relative_to(root).as_posix() if rd.path != root else rd.path.name
        try:
            summary = rd.summary() or {}
        except DamagedRunError as e:
            skipped[rel] = str(e)
            continue
        status = str(summary.get("status", "running"))
        # anything neither finished nor failed has not ended (yet): count it as running
        status = status if status in _STATUSES else "running"
        variant = str(summary.get("variant") or summary.get("method") or rel.split("/")[0])
        runs.append(_Run(run=rd, rel=rel, summary=summary, status=status, variant=variant))
    return runs


def _one_value(runs: list[_Run], key: str, what: str) -> str:
    """The value of summary[key] shared by every run; an error naming the values otherwise."""
    seen: dict[str, list[str]] = {}
    for r in runs:
        if r.summary.get(key) is not None:
            seen.setdefault(str(r.summary[key]), []).append(r.rel)
    if not seen:
        raise ExperimentError(f"no run summary names its {what} (summary key {key!r})")
    if len(seen) > 1:
        detail = "; ".join(f"{v!r} ({len(p)} runs, e.g. {p[0]})" for v, p in sorted(seen.items()))
        raise ExperimentError(f"runs of different {what}s are mixed in one report: {detail}")
    return next(iter(seen))


def _seed_of(r: _Run) -> int | None:
    seed = r.summary.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _seeds_text(seeds: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0–2, 5, 7, 8"`` (runs of three or more as a range)."""
    groups: list[list[int]] = []
    for s in sorted(seeds):
        if groups and s == groups[-1][-1] + 1:
            groups[-1].append(s)
        else:
            groups.append([s])
    parts = [f"{g[0]}–{g[-1]}" if len(g) > 2 else ", ".join(map(str, g)) for g in groups]
    return ", ".join(parts)


def _filter_seeds(runs: list[_Run], seeds: str | list[int]) -> tuple[list[_Run], dict[str, Any]]:
    """The runs of the requested seeds, and ``report.json``'s ``"seeds"`` entry.

    ``seeds="common"``: the seeds at which every variant has a finished run.
    """
    if seeds == "common":
        per_variant: dict[str, set[int]] = {}
        for r in runs:
            s = per_variant.setdefault(r.variant, set())
            if r.status == "finished" and _seed_of(r) is not None:
                s.add(_seed_of(r))  # type: ignore[arg-type]
        keep = set.intersection(*per_variant.values())
        if not keep:
            detail = "; ".join(
                f"{v}: {_seeds_text(sorted(s)) or 'none'}" for v, s in sorted(per_variant.items())
            )
            raise ExperimentError(
                f"seeds='common': no seed has a finished run of every variant (finished seeds "
                f"per variant: {detail})"
            )
        rule = "the seeds at which every variant has a finished run"
    elif isinstance(seeds, list) and seeds:
        keep = set(seeds)
        present = {_seed_of(r) for r in runs}
        if not keep & present:
            raise ExperimentError(
                f"seeds {_seeds_text(seeds)}: no run of these seeds (runs have seeds "
                f"{_seeds_text(sorted(s for s in present if s is not None)) or 'none'})"
            )
        rule = "the seeds requested"
    else:
        raise ExperimentError(f"seeds must be 'common' or a non-empty list of seeds, got {seeds!r}")
    kept = [r for r in runs if _seed_of(r) in keep]
    info = {"rule": rule, "seeds": sorted(keep), "left_out": len(runs) - len(kept)}
    return kept, info


def _sweep_info(root: Path) -> dict[str, Any]:
    path = root / SWEEP
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExperimentError(f"{path}: not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _final_metric_names(
    finished: list[_Run], metric: str, requested: list[str] | None
) -> list[str]:
    """Headline metric, then the losses, then every other numeric final key (sorted)."""
    available: set[str] = set()
    for r in finished:
        final = r.summary.get("final") or {}
        available |= {k for k, v in final.items() if _is_number(v)}
    if requested is not None:
        missing = [m for m in requested if m not in available and m != metric]
        if missing and finished:
            known = ", ".join(sorted(available)) or "none"
            raise ExperimentError(
                f"metrics not in any finished run's final metrics: {missing}; known: {known}"
            )
        available = set(requested)
    rest = [m for m in LOSSES if m in available]
    rest += sorted(available - {metric, *LOSSES})
    return [metric, *rest]


# ---------------------------------------------------------------------------- markdown
def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _cell(name: str) -> str:
    """A variant name safe inside a markdown table cell."""
    return name.replace("|", "\\|").replace("*", "\\*")


def _n_cell(counts: dict[str, int], nonfinite: int) -> str:
    extra = [f"{counts[s]} {s}" for s in ("failed", "running") if counts[s]]
    if nonfinite:
        extra.append(f"{nonfinite} non-finite")
    return f"{counts['finished']}" + (f" ({', '.join(extra)})" if extra else "")


def _median_iqr(s: dict[str, Any]) -> str:
    if not s["n"]:
        return "—"
    return f"{_fmt(s['median'])} [{_fmt(s['q25'])}, {_fmt(s['q75'])}]"


def _mean_sd(s: dict[str, Any]) -> str:
    return "—" if not s["n"] else f"{_fmt(s['mean'])} ± {_fmt(s['sd'])}"


def _markdown(
    data: dict[str, Any],
    variants: list[str],
    metric_names: list[str],
    best: set[str],
    nonfinite: dict[str, int],
    failures: list[tuple[str, str]],
    figure_names: list[str],
    preamble: str | None = None,
    warnings: list[str] = (),  # type: ignore[assignment]
    labels: dict[str, str] | None = None,
    per_point: bool = False,
    paired_lines: list[str] = (),  # type: ignore[assignment]
) -> str:
    metric, mode = data["metric"], data["metric_mode"]
    counts = {s: sum(data["runs"][v][s] for v in variants) for s in _STATUSES}
    total = sum(counts.values())
    better = "lower" if mode == "min" else "higher"
    bold_scope = "the best median at each grid point" if per_point else "the best median"
    status_text = ", ".join(f"{counts[s]} {s}" for s in _STATUSES if counts[s])
    labels = labels or {}
    selection = data.get("selection")
    if selection is None:
        scope, column, head = f"in {_plural(len(variants), 'variant')}", "variant", []
    else:
        scope = f"of {_plural(len(variants), 'method')}, each at its selected grid point"
        column = "method (grid point)"
        head = [*_selection_markdown(selection), ""]
        for w in selection["warnings"]:
            head += [f"**Warning:** {w}", ""]
        head += ["## Results", ""]
    seed_info = data.get("seeds")
    seed_line = []
    if seed_info is not None:
        left = seed_info["left_out"]
        seed_line = [
            f"Seeds {_seeds_text(seed_info['seeds'])} only ({seed_info['rule']}); "
            f"{_plural(left, 'run')} of other seeds left out.",
            "",
        ]
    lines = [
        f"# {data['name']} (experiment `{data['experiment']}`)",
        "",
        *([preamble.strip(), "", "The generated report follows.", ""] if preamble else []),
        *seed_line,
        *head,
        f"{_plural(total, 'run')} ({status_text}) {scope}. "
        f"Headline metric: "
        f"`{metric}` ({better} is better; {bold_scope} is in bold).",
        "",
        "Statistics over finished runs at the end of training: median [q25, q75] (linear "
        "interpolation), mean ± sd (sample sd). AUC: the metric averaged over the iterations "
        "(trapezoidal rule over the evaluation points, divided by the iteration span); "
        "median (mean ± sd) over seeds. Wall time: median (mean) in seconds. "
        "it/s: iterations per second of wall time, median.",
        "",
        f"| {column} | n | {metric} median [q25, q75] | mean ± sd | AUC | wall time (s) | it/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        s = data["methods"][v][metric]
        name, med = _cell(labels.get(v, v)), _median_iqr(s)
        if v in best:
            name = f"**{name}**"
            med = f"**{_fmt(s['median'])}** [{_fmt(s['q25'])}, {_fmt(s['q75'])}]"
        auc = data["auc"][v]
        auc_text = "—" if not auc["n"] else f"{_fmt(auc['median'])} ({_mean_sd(auc)})"
        wall = data["wall_time_s"][v]
        wall_text = "—" if not wall["n"] else f"{_fmt(wall['median'])} ({_fmt(wall['mean'])})"
        ips = data["iterations_per_s"][v]
        row = [name, _n_cell(data["runs"][v], nonfinite[v]), med, _mean_sd(s), auc_text]
        row += [wall_text, _fmt(ips["median"])]
        lines.append("| " + " | ".join(row) + " |")
    lines += paired_lines
    others = metric_names[1:]
    if others:
        lines += [
            "",
            "Other final metrics, median [q25, q75] over finished runs:",
            "",
            "| metric | " + " | ".join(_cell(labels.get(v, v)) for v in variants) + " |",
            "|---" * (len(variants) + 1) + "|",
        ]
        # one row per metric: runs report many diagnostics, sweeps compare a few variants
        for m in others:
            cells = [_median_iqr(data["methods"][v][m]) for v in variants]
            lines.append(f"| {_cell(m)} | " + " | ".join(cells) + " |")
    if figure_names:
        lines += ["", "## Figures", ""]
        for stem, title in zip(figure_names, ("final metric", "curves"), strict=False):
            lines += [f"![{title}]({stem}.png)", "", f"[SVG]({stem}.svg)", ""]
        lines.pop()
    if failures:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {rel}: {err}" for rel, err in failures]
    if warnings:
        lines += ["", "## Warnings", ""]
        lines += [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- grid point selection
def _method_of(r: _Run) -> str:
    return str(r.summary.get("method") or r.variant.split("[")[0])


def _point_of(runs: list[_Run]) -> dict[str, Any]:
    for r in runs:
        point = r.summary.get("grid_point")
        if isinstance(point, dict):
            return point
    return {}


def _comparison_groups(variants: list[str], finished: dict[str, list[_Run]]) -> list[list[str]]:
    """Variants grouped by grid point, so that methods are compared at the same settings (e.g.
    the same sample size); one group of all variants when that leaves a variant alone or the
    runs have no grid point."""
    groups: dict[str, list[str]] = {}
    for v in variants:
        key = json.dumps(_point_of(finished[v]), sort_keys=True, default=str)
        groups.setdefault(key, []).append(v)
    if len(groups) < 2 or any(len(g) < 2 for g in groups.values()):
        return [list(variants)]
    return list(groups.values())


def _paired(
    groups: list[list[str]],
    finished: dict[str, list[_Run]],
    metric: str,
    mode: str,
    per_point: bool,
) -> list[dict[str, Any]]:
    """Seed-by-seed comparison of the final ``metric`` within each comparison group.

    Per group, on the seeds at which every variant of the group has a finished run with a finite
    final value: ``best[v]``, the seeds where ``v`` has the best value (a tie counts for each
    variant tied), and ``better[a][b]``, the seeds where ``a``'s value is strictly better than
    ``b``'s. Groups of one variant are left out.
    """

    def wins(a: float, b: float) -> bool:
        return a < b if mode == "min" else a > b

    out = []
    for group in groups:
        if len(group) < 2:
            continue
        values: dict[str, dict[int, float]] = {}
        for v in group:
            values[v] = {}
            for r in finished[v]:
                seed, x = _seed_of(r), (r.summary.get("final") or {}).get(metric)
                if seed is not None and _is_number(x) and math.isfinite(float(x)):
                    values[v][seed] = float(x)
        seeds = sorted(set.intersection(*(set(values[v]) for v in group)))
        best = dict.fromkeys(group, 0)
        for s in seeds:
            xs = [values[v][s] for v in group]
            target = min(xs) if mode == "min" else max(xs)
            for v in group:
                best[v] += values[v][s] == target
        better = {
            a: {b: sum(wins(values[a][s], values[b][s]) for s in seeds) for b in group if b != a}
            for a in group
        }
        point = _point_of(finished[group[0]]) if per_point else {}
        out.append(
            {"grid_point": point, "variants": group, "seeds": seeds, "best": best, "better": better}
        )
    # grid points in the order of their values, numbers as numbers (n 5000 before n 10000)
    return sorted(
        out,
        key=lambda g: [
            (0, x, "") if _is_number(x) else (1, 0, str(x)) for x in g["grid_point"].values()
        ],
    )


def _paired_markdown(
    paired: list[dict[str, Any]],
    finished: dict[str, list[_Run]],
    metric: str,
    mode: str,
    labels: dict[str, str],
) -> list[str]:
    better = "lower" if mode == "min" else "higher"
    best = "lowest" if mode == "min" else "highest"
    lines = [
        "",
        "## Paired by seed",
        "",
        f"The final `{metric}` of the variants compared seed by seed"
        + (" at each grid point" if any(g["grid_point"] for g in paired) else "")
        + f", on the seeds at which each of them has a finished run with a finite value. *best*: "
        f"on how many of these seeds the row's variant has the {best} value (a tie counts for "
        f"each variant tied); the column of variant B: on how many the row's value is {better} "
        "than B's.",
    ]
    for g in paired:
        group, seeds = g["variants"], g["seeds"]
        # at one grid point the method names tell the variants apart
        names = {v: labels.get(v, v) for v in group}
        if g["grid_point"]:
            names = {v: _method_of(finished[v][0]) if finished[v] else v for v in group}
            if len(set(names.values())) < len(group):
                names = {v: labels.get(v, v) for v in group}
        where = f"**{_point_text(g['grid_point'])}**: " if g["grid_point"] else ""
        if not seeds:
            lines += ["", f"{where}no seed at which every variant has a finite final value."]
            continue
        lines += [
            "",
            f"{where}{_plural(len(seeds), 'seed')} ({_seeds_text(seeds)}).",
            "",
            "| variant | best | " + " | ".join(_cell(names[b]) for b in group) + " |",
            "|---" * (len(group) + 2) + "|",
        ]
        for a in group:
            cells = ["—" if b == a else str(g["better"][a][b]) for b in group]
            lines.append(f"| {_cell(names[a])} | {g['best'][a]} | " + " | ".join(cells) + " |")
    return lines


def _point_text(point: dict[str, Any]) -> str:
    """``inner_lr 0.001, tau 0.005`` (the last part of each dotted grid key, as in variants)."""
    return ", ".join(f"{str(k).split('.')[-1]} {v}" for k, v in point.items())


def _run_score(r: _Run, key: str) -> float | None:
    """Mean of ``key`` over a run's logged records (None when it logs none)."""
    values = list(_series(r.records, key).values())
    return float(np.mean(values)) if values else None


def _select(
    runs: list[_Run],
    finished: dict[str, list[_Run]],
    counts: dict[str, dict[str, int]],
    key: str,
    mode: str,
) -> tuple[dict[str, Any], list[str]]:
    """Per method, the grid point (variant) with the best median over seeds of the run scores.

    Returns ``({method: entry}, warnings)``; an entry's ``"variant"`` is None when no grid point
    of the method has a finite score.
    """
    by_method: dict[str, list[str]] = {}
    runs_of: dict[str, list[_Run]] = {}
    for r in runs:
        runs_of.setdefault(r.variant, []).append(r)
        variants = by_method.setdefault(_method_of(r), [])
        if r.variant not in variants:
            variants.append(r.variant)
    selection: dict[str, Any] = {}
    warnings: list[str] = []
    for method in sorted(by_method):
        points = []
        for v in sorted(by_method[method]):
            scores = {r.summary.get("seed", r.rel): _run_score(r, key) for r in finished[v]}
            scored = {s: x for s, x in scores.items() if x is not None}
            stats = describe(scored.values())  # leaves non-finite scores out
            seeds = sorted(scored.items(), key=lambda i: _seed_order(str(i[0])))
            points.append(
                {
                    "variant": v,
                    "grid_point": _point_of(runs_of[v]),
                    "score": stats["median"],
                    "n": stats["n"],
                    "nonfinite": sum(1 for x in scored.values() if not math.isfinite(x)),
                    # a non-finite score (a diverged run) is written as null
                    "seeds": {str(s): x if math.isfinite(x) else None for s, x in seeds},
                    "runs": counts[v],
                }
            )
        candidates = [p for p in points if p["score"] is not None]
        best = None
        if candidates:
            pick = min if mode == "min" else max
            # ties go to the first grid point in name order (min and max return the first)
            best = pick(candidates, key=lambda p: p["score"])
        else:
            warnings.append(
                f"{method}: no finished run of any grid point logs a finite `{key}`; "
                "the method is left out of the results"
            )
        seed_sets = {
            p["variant"]: [s for s, x in p["seeds"].items() if x is not None] for p in points
        }
        if len(points) > 1 and len({tuple(s) for s in seed_sets.values()}) > 1:
            detail = "; ".join(
                f"{_point_text(p['grid_point']) or p['variant']}: "
                f"{_plural(len(seed_sets[p['variant']]), 'seed')}"
                + (f" ({', '.join(seed_sets[p['variant']])})" if seed_sets[p["variant"]] else "")
                for p in points
            )
            warnings.append(
                f"{method}: grid points are scored on different seeds ({detail}); their "
                "scores are medians over different seeds, so the selection is not a paired "
                "comparison"
            )
        label = method
        if best is not None and best["grid_point"]:
            label = f"{method} ({_point_text(best['grid_point'])})"
        elif best is not None and best["variant"] != method:
            label = best["variant"]
        selection[method] = {
            "variant": None if best is None else best["variant"],
            "grid_point": None if best is None else best["grid_point"],
            "label": label,
            "score": None if best is None else best["score"],
            "n": 0 if best is None else best["n"],
            "grid_points": points,
        }
    return selection, warnings


def _seed_order(seed: str) -> tuple[int, int | str]:
    return (0, int(seed)) if seed.lstrip("-").isdigit() else (1, seed)


def _selection_markdown(sel: dict[str, Any]) -> list[str]:
    key, mode = sel["select_by"], sel["mode"]
    better = "lower" if mode == "min" else "higher"
    lines = [
        "## Grid point of each method",
        "",
        f"Each method is shown at one grid point, selected by `{key}` ({better} is better). "
        f"A run's score is the mean of `{key}` over its logged records (with evenly spaced "
        "records, the area under its training curve divided by its length); a grid point's "
        "score is the median of its finished seeds' scores (n: seeds with a score); the grid "
        "point with the best score is selected (in bold).",
        "",
        f"| method | grid point | `{key}` score, median over seeds | n |",
        "|---|---|---|---|",
    ]
    for method, entry in sel["methods"].items():
        for p in entry["grid_points"]:
            point = _cell(_point_text(p["grid_point"]) or p["variant"])
            score = _fmt(p["score"])
            if p["variant"] == entry["variant"]:
                point, score = f"**{point}**", f"**{score}**"
            n = _n_cell({**p["runs"], "finished": p["n"]}, p["nonfinite"])
            lines.append(f"| {_cell(method)} | {point} | {score} | {n} |")
    return lines


# ---------------------------------------------------------------------------- figures
def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "report figures need matplotlib: pip install 'funcbo[experiments]' "
            "(or pass figures=False for the tables only)"
        ) from e
    return matplotlib, Figure, FigureCanvasAgg


def _new_figure(figsize: tuple[float, float]) -> Any:
    # a Figure with an Agg canvas, not pyplot: no global backend switch, no figure registry
    _, figure_cls, canvas_cls = _matplotlib()
    fig = figure_cls(figsize=figsize, layout="constrained")
    canvas_cls(fig)
    return fig


def _save_figure(fig: Any, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` atomically (temporary file, then rename)."""
    matplotlib = _matplotlib()[0]
    written = []
    # fixed ids and no date: the same data gives the same SVG (diffs of committed results)
    with matplotlib.rc_context({"svg.hashsalt": "funcbo"}):
        for ext, kwargs in (("png", {"dpi": 150}), ("svg", {"metadata": {"Date": None}})):
            path = stem.with_name(f"{stem.name}.{ext}")
            atomic_write(
                path, lambda f, ext=ext, kwargs=kwargs: fig.savefig(f, format=ext, **kwargs)
            )
            written.append(path)
    return written


def _box_figure(
    finished: dict[str, list[_Run]],
    variants: list[str],
    metric: str,
    mode: str,
    title: str,
    labels: dict[str, str] | None = None,
) -> Any:
    names = [(labels or {}).get(v, v) for v in variants]
    fig = _new_figure((max(4.0, 1.1 * len(variants) + 1.5), 4.0))
    ax = fig.add_subplot()
    better = "lower" if mode == "min" else "higher"
    positions, samples = [], []
    for i, v in enumerate(variants):
        vals = [
            float(r.summary["final"][metric])
            for r in finished[v]
            if _is_number((r.summary.get("final") or {}).get(metric))
        ]
        vals = [x for x in vals if math.isfinite(x)]
        if vals:
            positions.append(i)
            samples.append(vals)
    if samples:
        ax.boxplot(
            samples, positions=positions, widths=0.5, showfliers=False, medianprops={"color": "k"}
        )
        for pos, vals in zip(positions, samples, strict=True):
            # deterministic horizontal spread so that seeds with close values stay visible
            dx = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
            ax.scatter(pos + dx, vals, s=14, color=f"C{pos % 10}", zorder=3, alpha=0.8)
    else:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    tilt = len(variants) > 3 or max(len(v) for v in names) > 12
    ax.set_xticks(
        range(len(variants)), names, rotation=30 if tilt else 0, ha="right" if tilt else "center"
    )
    ax.set_xlim(-0.6, len(variants) - 0.4)
    ax.set_ylabel(f"final {metric} ({better} is better)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _curves_figure(
    finished: dict[str, list[_Run]],
    variants: list[str],
    quantities: list[str],
    metric: str,
    title: str,
    iteration_label: str,
    labels: dict[str, str] | None = None,
) -> Any:
    fig = _new_figure((4.2 * len(quantities), 3.6))
    axes = fig.subplots(1, len(quantities), squeeze=False)[0]
    for ax, q in zip(axes, quantities, strict=True):
        drawn = []
        logged: list[float] = []
        for i, v in enumerate(variants):
            logged += [x for r in finished[v] for x in _series(r.records, q).values()]
            t, y = _aligned(finished[v], q)
            if t.size == 0:
                continue
            if t.size > MAX_CURVE_POINTS:
                idx = np.unique(np.linspace(0, t.size - 1, MAX_CURVE_POINTS).astype(int))
                t, y = t[idx], y[:, idx]
            mean = y.mean(axis=0)
            sd = y.std(axis=0, ddof=1) if y.shape[0] > 1 else np.zeros_like(mean)
            marker = "o" if q == metric and t.size <= 50 else None
            label = f"{(labels or {}).get(v, v)} (n={y.shape[0]})"
            ax.plot(t, mean, color=f"C{i % 10}", label=label, marker=marker, markersize=3)
            drawn.append((f"C{i % 10}", t, mean, sd))
        finite = np.asarray([x for x in logged if math.isfinite(x)])
        log = q in LOSSES and finite.size > 0 and bool(np.all(finite > 0))
        # on a log axis a band's lower edge stops at the smallest value any run logged
        floor = float(finite.min()) if log else -math.inf
        for color, t, mean, sd in drawn:
            lower = np.maximum(mean - sd, floor)
            ax.fill_between(t, lower, mean + sd, color=color, alpha=0.2, linewidth=0)
        if log:
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(iteration_label)
        ax.set_title(q)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        for ax in axes[1:]:
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                break
    if handles:
        axes[0].legend(handles, labels, fontsize="small")
    fig.suptitle(f"{title}: mean ± sd over seeds")
    return fig


def _gave_up_total(records: list[dict[str, Any]]) -> tuple[float, list[str]]:
    """Sum of every ``*_gave_up`` counter over a run's metrics lines, and the keys that were
    nonzero."""
    total, keys = 0.0, set()
    for rec in records:
        for k, v in rec.items():
            if k.endswith("_gave_up") and _is_number(v) and v:
                total += float(v)
                keys.add(k)
    return total, sorted(keys)


def _print_warning(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


# ---------------------------------------------------------------------------- the report
def make_report(
    run_root: str | Path,
    out_dir: str | Path | None = None,
    name: str | None = None,
    *,
    metrics: list[str] | None = None,
    figures: bool = True,
    iteration_label: str = "iteration",
    preamble: str | None = None,
    warn: Callable[[str], None] | None = None,
    select_by: str | None = None,
    select_mode: str | None = None,
    seeds: str | Sequence[int] | None = None,
    paired: bool = False,
) -> Report:
    """Aggregate the runs under ``run_root`` into ``<name>.md``, ``<name>.json`` and figures.

    Runs are the directories holding a ``summary.json``
    (:func:`~funcbo.experiments.store.find_runs`), grouped by their summary's ``variant``.
    Statistics use runs with status ``finished``; failed and unfinished runs are counted per
    variant (``report.json["runs"]``, and beside ``n`` in the table). The headline metric and
    whether lower or higher is better come from the summaries' ``metric`` and ``metric_mode``;
    every run must belong to one experiment and one metric.

    Per variant:

    - final metrics: each numeric key of ``summary["final"]`` (headline metric first, then
      ``outer_loss``, ``inner_loss``, ``adjoint_loss``, then the others by name), summarised by
      :func:`describe` (n, median, q25, q75, mean, sample sd);
    - ``wall_time_s``: the runs' ``wall_time_s``; ``iterations_per_s``: iterations done divided
      by wall time (for an RL experiment, whose iteration is an environment step, environment
      steps per second);
    - ``auc``: :func:`area_under_curve` of each run's headline metric over the ``metrics.jsonl``
      lines that hold it (the metric averaged over the evaluated iterations).

    Figures: a box plot of the final headline metric (seeds as points) and curves of the headline
    metric, ``outer_loss``, ``inner_loss`` and (when logged) ``adjoint_loss`` against the
    iteration, mean ± sd over seeds. Seeds of a variant are aligned on the iterations that all of
    them logged (their intersection; no interpolation), and at most :data:`MAX_CURVE_POINTS`
    evenly strided points are drawn. Losses use a log scale when every logged value is positive.

    report.json::

        {"experiment": str, "name": str, "metric": str, "metric_mode": "min" | "max",
         "methods": {variant: {metric: {"n", "median", "q25", "q75", "mean", "sd"}}},
         "wall_time_s": {variant: stats}, "auc": {variant: stats},
         "iterations_per_s": {variant: stats},
         "runs": {variant: {"finished": int, "failed": int, "running": int}},
         "warnings": [str]}

    Statistics of an empty sample are ``{"n": 0, ...: null}``; non-finite values (a diverged
    run) are left out of the statistics and counted beside ``n`` in the markdown table.

    Selecting a grid point per method (``select_by``), as papers that tune each method on a grid
    report its best grid point by training return:

    - a run's score is the mean of ``select_by`` over the lines of its ``metrics.jsonl`` that
      hold it (one per logged iteration; with evenly spaced lines, the area under its training
      curve divided by its length); finished runs only;
    - a grid point's score is the median of its seeds' scores (non-finite scores, from diverged
      runs, are left out and counted);
    - per method (the summaries' ``method``), the grid point with the best score is selected:
      the highest for ``select_mode="max"``, the lowest for ``"min"`` (default: the
      experiment's ``metric_mode``); ties go to the first grid point in name order. A method
      whose grid points were scored on different sets of seeds gets a warning (the medians are
      then not a paired comparison).

    The report then starts with a table of every grid point's score, the selected one in bold,
    and its tables and figures show each method at its selected grid point only, labelled
    ``method (key value, ...)``; ``methods``, ``wall_time_s``, ``auc``, ``iterations_per_s``
    and ``runs`` are keyed by method name, and ``report.json`` has one more key::

        "selection": {"select_by": str, "mode": "min" | "max", "score": str (the rule),
                      "methods": {method: {"variant": str | null, "grid_point": dict | null,
                                           "label": str, "score": float | null, "n": int,
                                           "grid_points": [{"variant", "grid_point", "score",
                                                            "n", "nonfinite",
                                                            "seeds": {seed: score | null},
                                                            "runs": {status: int}}]}},
                      "warnings": [str]}

    A method none of whose grid points has a scored run is left out with a warning.

    Restricting the seeds (``seeds``), so that every row of a sweep still under way rests on
    the same seeds: ``"common"`` keeps the seeds at which every variant (every method × grid
    point, before any selection) has a finished run; a list keeps the seeds listed. Runs of
    other seeds are left out of everything, counts included; the markdown says which seeds are
    reported and how many runs were left out, and ``report.json`` has one more key::

        "seeds": {"rule": str, "seeds": [int], "left_out": int}

    Comparing seed by seed (``paired=True``), which medians alone do not show: variants are
    compared within the groups in which bold marks the best median (the variants of one grid
    point when every grid point has two or more, otherwise all of them; the methods when a grid
    point is selected), on the seeds at which every variant of the group has a finished run with
    a finite final headline metric. A section "Paired by seed" follows the headline table: per
    group, on how many seeds each variant is best (ties count for each) and, per other variant,
    on how many it is strictly better. ``report.json`` has one more key::

        "paired": [{"grid_point": dict ({} for a group of all variants), "variants": [str],
                    "seeds": [int], "best": {variant: int},
                    "better": {variant: {other variant: int}}}]

    Args:
        run_root: a sweep's output directory (``funcbo run ... --out DIR``), or any directory
            whose run directories all belong to one experiment.
        out_dir: where to write (default: ``run_root``).
        name: file stem (default: the sweep name in ``run_root/sweep.json``, else the name of
            ``run_root``); ``"report"`` gives ``report.md`` and ``report.json``.
        metrics: the final metrics to tabulate (default: every numeric one); the headline metric
            is always included.
        figures: also draw the figures (needs matplotlib).
        iteration_label: x-axis label of the curves (e.g. ``"environment steps"``).
        preamble: markdown placed under the report's title, followed by "The generated report
            follows." (a written summary of the results, kept in its own file so that
            regenerating the report keeps it).
        warn: called with each warning (default: printed to stderr). Warnings are also listed
            under "Warnings" in the markdown and in ``report.json["warnings"]``: a run whose
            ``summary.json`` or ``metrics.jsonl`` cannot be read (named with the file and line)
            is left out of the report, and a finished run whose metrics log a nonzero counter
            ending in ``_gave_up`` (linear solves that diverged or made no progress) is named
            with the count summed over its logged iterations.
        select_by: a metric logged in ``metrics.jsonl`` (e.g. ``"train_return"``): report each
            method at the grid point with the best mean of it over training (see above); None:
            every variant is its own row.
        select_mode: ``"max"`` or ``"min"``: whether the highest or the lowest score is best
            (default: the experiment's ``metric_mode``); needs ``select_by``.
        seeds: ``"common"`` or a list of seeds: report only runs of these seeds (see above);
            None: every run.
        paired: also compare the variants seed by seed (see above).

    Returns:
        The :class:`Report` (markdown, data, figure paths, markdown/JSON paths).

    Raises:
        ValueError: no run under ``run_root``, runs of several experiments or metrics, an
            invalid ``name``, an unknown requested metric, a ``select_by`` that no finished run
            logs, an invalid ``select_mode``, or ``seeds`` that keep no run.
        ImportError: ``figures=True`` without matplotlib.
    """
    root = Path(run_root)
    if not root.is_dir():
        raise ExperimentError(f"not a directory: {root} (runs are written by `funcbo run`)")
    skipped: dict[str, str] = {}
    runs = _load_runs(root, skipped)
    if not runs:
        raise ExperimentError(f"no readable run under {root}: {next(iter(skipped.values()))}")
    sweep = _sweep_info(root)
    experiment = _one_value(runs, "experiment", "experiment")
    if sweep.get("experiment") not in (None, experiment):
        raise ExperimentError(
            f"runs of different experiments are mixed in one report: {SWEEP} names "
            f"{sweep['experiment']!r}, the runs {experiment!r}"
        )
    metric = _one_value(runs, "metric", "headline metric")
    mode = _one_value(runs, "metric_mode", "metric mode")
    if mode not in ("min", "max"):
        raise ExperimentError(f"metric_mode must be 'min' or 'max', got {mode!r}")

    name = name or str(sweep.get("name") or root.resolve().name)
    if "/" in name or "\\" in name or name in (".", "..") or f"{name}.json" in (SUMMARY, SWEEP):
        raise ExperimentError(
            f"invalid report name {name!r} (a file stem other than "
            f"{Path(SUMMARY).stem!r} and {Path(SWEEP).stem!r})"
        )
    if select_mode is not None and select_by is None:
        raise ExperimentError("select_mode needs select_by (the metric that selects grid points)")
    if select_mode not in (None, "min", "max"):
        raise ExperimentError(f"select_mode must be 'min' or 'max', got {select_mode!r}")
    seed_info: dict[str, Any] | None = None
    if seeds is not None:
        runs, seed_info = _filter_seeds(runs, seeds if isinstance(seeds, str) else list(seeds))
    if figures:
        _matplotlib()  # fail before writing anything
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)

    variants = sorted({r.variant for r in runs})
    finished: dict[str, list[_Run]] = {v: [] for v in variants}
    counts = {v: dict.fromkeys(_STATUSES, 0) for v in variants}
    failures = []
    for r in runs:
        counts[r.variant][r.status] += 1
        if r.status == "finished":
            finished[r.variant].append(r)
        elif r.status == "failed":
            err = str(r.summary.get("error") or "").strip().splitlines()
            failures.append((r.rel, (err[-1] if err else "no error message")[:200]))
    gave_up: list[tuple[str, str, float, list[str]]] = []
    logged_keys: set[str] = set()
    for v in variants:
        finished[v].sort(key=lambda r: (str(r.summary.get("seed")), r.rel))
        readable = []
        for r in finished[v]:
            try:
                records = r.run.metrics()
            except ValueError as e:  # a damaged line (not a torn last one): leave the run out
                skipped[r.rel] = str(e)
                counts[v]["finished"] -= 1
                continue
            # keep only what the report reads: long runs log many lines with many keys
            keep = ("iteration", metric, *LOSSES, *([select_by] if select_by else []))
            if select_by is not None:
                logged_keys |= {k for rec in records for k, x in rec.items() if _is_number(x)}
            r.records = [{k: rec[k] for k in keep if k in rec} for rec in records]
            total, keys = _gave_up_total(records)
            if total:
                gave_up.append((v, r.rel, total, keys))
            readable.append(r)
        finished[v] = readable
    warnings = [f"run {rel} left out of the report: {why}" for rel, why in sorted(skipped.items())]
    warnings += [
        f"{v}: run {rel}: linear solves gave up {total:g} times ({', '.join(keys)} summed over "
        "the logged iterations); the hypergradients of those iterations lack their implicit term"
        for v, rel, total, keys in gave_up
    ]
    labels: dict[str, str] = {}
    selection: dict[str, Any] | None = None
    if select_by is not None:
        sel_mode = select_mode or mode
        if logged_keys and select_by not in logged_keys:
            known = ", ".join(sorted(logged_keys - {"iteration"}))
            raise ExperimentError(
                f"select_by {select_by!r}: no finished run logs it in {METRICS}; logged: {known}"
            )
        chosen, sel_warnings = _select(runs, finished, counts, select_by, sel_mode)
        picked = {m: e["variant"] for m, e in chosen.items() if e["variant"] is not None}
        if not picked:
            raise ExperimentError(
                f"select_by {select_by!r}: no method has a finished run that logs a finite "
                f"{select_by!r}: nothing to select"
            )
        warnings += sel_warnings
        # from here on the report is about methods, each at its selected grid point
        variants = sorted(picked)
        finished = {m: finished[picked[m]] for m in variants}
        counts = {m: counts[picked[m]] for m in variants}
        labels = {m: chosen[m]["label"] for m in variants}
        selection = {
            "select_by": select_by,
            "mode": sel_mode,
            "score": f"mean of {select_by} over each finished run's logged records; "
            "a grid point's score is the median over its seeds",
            "methods": chosen,
            "warnings": sel_warnings,
        }
    for w in warnings:
        (warn or _print_warning)(w)
    all_finished = [r for v in variants for r in finished[v]]
    metric_names = _final_metric_names(all_finished, metric, metrics)

    methods: dict[str, dict[str, Any]] = {}
    wall, auc, ips = {}, {}, {}
    nonfinite = {}
    for v in variants:
        fin = [r.summary.get("final") or {} for r in finished[v]]
        methods[v] = {m: describe(f[m] for f in fin if _is_number(f.get(m))) for m in metric_names}
        nonfinite[v] = sum(
            1 for f in fin if _is_number(f.get(metric)) and not math.isfinite(float(f[metric]))
        )
        walls = [r.summary.get("wall_time_s") for r in finished[v]]
        wall[v] = describe(w for w in walls if _is_number(w))
        rates = []
        for r in finished[v]:
            seconds = r.summary.get("wall_time_s")
            iters = r.summary.get("iteration", r.summary.get("iterations"))
            if _is_number(seconds) and _is_number(iters) and seconds > 0:
                rates.append(iters / seconds)
        ips[v] = describe(rates)
        aucs = []
        for r in finished[v]:
            s = _series(r.records, metric)
            if s:
                aucs.append(area_under_curve(list(s), list(s.values())))
        auc[v] = describe(aucs)

    data: dict[str, Any] = {
        "experiment": experiment,
        "name": name,
        "metric": metric,
        "metric_mode": mode,
        "methods": methods,
        "wall_time_s": wall,
        "auc": auc,
        "iterations_per_s": ips,
        "runs": counts,
        "warnings": warnings,
    }
    if selection is not None:
        data["selection"] = selection
    if seed_info is not None:
        data["seeds"] = seed_info

    medians = {v: methods[v][metric]["median"] for v in variants if methods[v][metric]["n"]}
    groups = _comparison_groups(variants, finished) if selection is None else [variants]
    per_point = len(groups) > 1
    best: set[str] = set()
    for group in groups:
        group_medians = [medians[v] for v in group if v in medians]
        if group_medians:
            target = min(group_medians) if mode == "min" else max(group_medians)
            best |= {v for v in group if v in medians and medians[v] == target}

    title = f"{name} ({experiment})"
    written: list[Path] = []
    stems: list[str] = []
    if figures:
        box = _box_figure(finished, variants, metric, mode, title, labels)
        written += _save_figure(box, out / f"{name}_box")
        logged = {k for r in all_finished for rec in r.records for k in rec}
        quantities = [metric] + [q for q in LOSSES if q in logged]
        curves = _curves_figure(
            finished, variants, quantities, metric, title, iteration_label, labels
        )
        written += _save_figure(curves, out / f"{name}_curves")
        stems = [f"{name}_box", f"{name}_curves"]

    paired_lines: list[str] = []
    if paired:
        comparison = _paired(groups, finished, metric, mode, per_point)
        data["paired"] = comparison
        paired_lines = _paired_markdown(comparison, finished, metric, mode, labels)

    markdown = _markdown(
        data,
        variants,
        metric_names,
        best,
        nonfinite,
        failures,
        stems,
        preamble,
        warnings,
        labels,
        per_point=per_point,
        paired_lines=paired_lines,
    )
    md_path, json_path = out / f"{name}.md", out / f"{name}.json"
    atomic_write_json(json_path, data)
    atomic_write_text(md_path, markdown)
    return Report(
        markdown=markdown,
        data=data,
        figures=written,
        paths={"markdown": md_path, "json": json_path},
    )


__all__ = [
    "LOSSES",
    "MAX_CURVE_POINTS",
    "STAT_KEYS",
    "Report",
    "area_under_curve",
    "describe",
    "make_report",
]
