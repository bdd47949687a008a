"""Experiment configs: YAML files validated into typed dataclasses.

A config file names a registered experiment and holds its sections::

    experiment: iv_dsprites          # registered experiment (funcbo list shows them)
    name: iv_dsprites_quick          # default: the file name
    seeds: [0, 1, 2]                 # or "0-19"
    iterations: 2000
    eval_every: 100
    problem: {...}                   # the experiment's problem dataclass
    methods:                         # name -> the experiment's method dataclass
      funcid_linear: {kind: funcid_linear, inner_lr: 1.0e-3}
    grid:                            # optional: dotted key -> values, crossed with methods
      methods.*.inner_lr: [3.0e-4, 1.0e-3]
    resources: {cpus: 1, gpus: 0}    # optional: what each run asks of a Ray cluster

Every value is checked against the dataclass field's type: an unknown key, a wrong type or a
missing required value raises :class:`ConfigError` naming the key and the file. ``--set`` overrides
(``problem.n=500``, ``methods.funcid.inner_lr=3e-4``, ``seeds=0-4``) go through the same checks.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from funcbo.experiments.errors import ExperimentError
from funcbo.experiments.methods import (
    MethodConfig,
    MethodSpec,
    method_class,
    method_kinds,
    translate_legacy,
    value_classes,
    value_fields,
    value_name,
)
from funcbo.experiments.task import ExperimentSpec, RunSpec, get_experiment


class ConfigError(ExperimentError):
    """A config file or override is invalid; the message names the key and the file."""


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("reading configs needs PyYAML: pip install 'funcbo[experiments]'") from e
    return yaml


@dataclass
class Resources:
    """What one run asks of a cluster when a sweep runs on Ray (``funcbo run --executor ray``).

    Attributes:
        cpus: CPU cores per run (fractions allowed); also the run's torch threads when the
            config sets no ``threads``.
        gpus: GPUs per run (fractions share a device); Ray sets ``CUDA_VISIBLE_DEVICES``.
    """

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass
class ExperimentConfig:
    """The validated content of a config file.

    Attributes:
        experiment: registered experiment name.
        name: name of the sweep (default: the config file's stem).
        seeds: run seeds.
        iterations: outer iterations per run.
        eval_every: evaluation period (outer iterations).
        log_every: period of metrics.jsonl lines (evaluation iterations are always logged).
        checkpoint_every: checkpoint period (outer iterations).
        device, dtype: where and in which precision runs compute.
        threads: torch threads per run (default: CPU cores divided by the number of workers).
        tensorboard: also write TensorBoard event files (needs the ``tensorboard`` package).
        problem: the experiment's problem section (its own dataclass).
        methods: method name -> the experiment's method dataclass.
        grid: dotted key -> list of values; every combination is a variant of every method.
        resources: CPUs and GPUs each run requests from a Ray cluster (how a run is executed,
            not what it computes).
        batch_seeds: run all seeds of a method (and grid points that share shapes) in one
            process as one batched program, where the experiment supports it (each run still
            has its own directory). Part of what a run computes: a batched run draws its
            randomness from other streams than the same seed run alone.
        batch_max_runs: with ``batch_seeds``, the most runs one batched program holds; a
            method's runs are split seed-major (all grid points of a seed, then the next seed)
            into batches of at most this many, which ``workers`` run side by side (runs
            already finished are left out of the split). How runs are
            executed, not what they compute (every run draws from its own generators): use it
            to fit a batch into memory or into the time a machine is held. Default: no limit.
    """

    experiment: str
    problem: Any
    methods: dict[str, Any]
    name: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    iterations: int = 1000
    eval_every: int = 100
    log_every: int = 1
    checkpoint_every: int = 200
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    threads: int | None = None
    tensorboard: bool = False
    grid: dict[str, list[Any]] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    batch_seeds: bool = False
    batch_max_runs: int | None = None
    source: str = field(default="<dict>", init=False, repr=False, compare=False)

    def spec(self) -> ExperimentSpec:
        return get_experiment(self.experiment)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for config.yaml); round-trips through :func:`load_config_dict`."""
        d = to_plain(self)
        d.pop("source", None)
        return d


# ------------------------------------------------------------------------------ validation
def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """Check ``value`` against type ``tp`` (and build dataclasses); raise ConfigError naming key."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    tagged = _tagged_types(tp)
    if tagged:
        return _coerce_tagged(value, tagged, type(None) in get_args(tp), key, src)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, src)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{src}: {key}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{src}: {key}: expected one of {choices}, got {_describe(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{src}: {key}: expected a list, got {_describe(value)}")
        (inner,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {key}: expected a mapping, got {_describe(value)}")
        kt, vt = get_args(tp) or (Any, Any)
        return {
            _coerce(k, kt, f"{key} key", src): _coerce(v, vt, f"{key}.{k}", src)
            for k, v in value.items()
        }
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key, src)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: {key}: expected true/false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src}: {key}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{src}: {key}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src}: {key}: expected a string, got {_describe(value)}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{src}: {key}: expected {_type_name(tp)}, got {_describe(value)}")
    return value


def _tagged_types(tp: Any) -> dict[str, type]:
    """The named values ``tp`` admits (``CG | Neumann | Identity``: all three), by name."""
    args = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    by_class = value_classes()
    kept = [a for a in args if a is not type(None)]
    if not kept or not all(isinstance(a, type) and a in by_class for a in kept):
        return {}
    return {by_class[a]: a for a in kept}


def _coerce_tagged(value: Any, choices: dict[str, type], nullable: bool, key: str, src: str) -> Any:
    """A solver value from ``{name: {field: value}}`` (or just ``name``, its defaults)."""
    if value is None and nullable:
        return None
    if any(type(value) is cls for cls in choices.values()):
        return value
    names = ", ".join(choices)
    params: Any
    if isinstance(value, str):
        name, params = value, {}
    elif isinstance(value, dict) and len(value) == 1:
        ((name, params),) = value.items()
        params = {} if params is None else params
    else:
        raise ConfigError(
            f"{src}: {key}: expected one of {names} as a name or a one-key mapping such as "
            f"{{{next(iter(choices))}: {{...}}}}, got {_describe(value)}"
        )
    if name not in choices:
        close = difflib.get_close_matches(str(name), list(choices), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{src}: {key}: unknown {name!r}{hint}; known: {names}")
    cls = choices[name]
    own = value_fields(cls)
    if not isinstance(params, dict):
        raise ConfigError(f"{src}: {key}.{name}: expected a mapping, got {_describe(params)}")
    for k in params:
        if k not in own:
            close = difflib.get_close_matches(str(k), own, n=1)
            hint = f" (did you mean '{key}.{name}.{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{src}: unknown key '{key}.{name}.{k}'{hint}; known keys: {', '.join(own)}"
            )
    return build_dataclass(cls, params, f"{key}.{name}", src)


def build_method(data: Any, key: str, src: str, base: type[MethodSpec] = MethodSpec) -> Any:
    """The registered method spec a config entry ``{kind: ..., field: ...}`` selects, its
    fields validated (former flat fields translated by
    :func:`~funcbo.experiments.methods.translate_legacy`)."""
    if isinstance(data, MethodSpec):
        data = to_plain(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: {key}: expected a mapping, got {_describe(data)}")
    data = dict(data)
    kind = data.pop("kind", None)
    if isinstance(kind, str) and ":" in kind:
        try:
            method_class(kind, base.scope)  # imports the module that registers it
        except (ImportError, KeyError) as e:
            raise ConfigError(f"{src}: {key}.kind: {kind!r}: {e}") from e
    known = method_kinds(base)
    if kind is None:
        raise ConfigError(f"{src}: missing required key '{key}.kind' (known: {', '.join(known)})")
    if kind not in known:
        close = difflib.get_close_matches(str(kind), list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{src}: {key}.kind: unknown kind {kind!r}{hint}; known: {', '.join(known)}"
        )
    cls = method_class(kind, base.scope)
    return build_dataclass(cls, translate_legacy(kind, data, base.scope), key, src)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_dataclass(cls: type, data: Any, key: str, src: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys, types and required fields."""
    prefix = f"{key}." if key else ""
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: {key or 'top level'}: expected a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{src}: unknown key '{prefix}{k}'{hint}; known keys: {known}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}", src)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{src}: missing required key '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{src}: {key or cls.__name__}: {e}") from e


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples → plain dicts/lists (for YAML and JSON)."""
    name = value_name(obj)
    if name is not None:
        return {name: {k: to_plain(getattr(obj, k)) for k in value_fields(obj)}}
    if isinstance(obj, MethodSpec):
        fields = {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"kind": obj.kind, **fields}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------- parsing
_SEED_PART = re.compile(r"(\d+)(?:-(\d+))?")


def parse_seeds(value: Any) -> list[int]:
    """``3`` → [3]; ``"0-4"`` → [0..4]; ``"0,2,5"`` → [0, 2, 5]; lists pass through.

    Seeds are non-negative integers, each at most once; a string is comma-separated parts, each
    ``N`` or an inclusive range ``N-M`` with N ≤ M. Anything else raises ``ValueError`` saying
    what is wrong.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a seed specification: {value!r}")
    if isinstance(value, int):
        out = [value]
    elif isinstance(value, (list, tuple)):
        out = []
        for v in value:
            out += parse_seeds(v)
    elif isinstance(value, str):
        out = []
        for part in value.split(","):
            part = part.strip()
            match = _SEED_PART.fullmatch(part)
            if match is None:
                why = "an empty part" if not part else f"{part!r}"
                raise ValueError(
                    f"{value!r}: {why} is not a seed; write non-negative integers N or ranges "
                    "N-M separated by commas, e.g. 0-4 or 0,3,5"
                )
            lo = int(match.group(1))
            hi = int(match.group(2)) if match.group(2) is not None else lo
            if hi < lo:
                raise ValueError(f"{value!r}: empty seed range {part!r} (write {hi}-{lo})")
            out += list(range(lo, hi + 1))
    else:
        raise ValueError(f"not a seed specification: {value!r}")
    negative = [s for s in out if s < 0]
    if negative:
        raise ValueError(f"seeds must be non-negative integers, got {negative[0]}")
    repeated = sorted({s for s in out if out.count(s) > 1})
    if repeated:
        raise ValueError(
            f"{value!r}: seed {', '.join(map(str, repeated))} given more than once (each run "
            "needs its own seed)"
        )
    return out


def parse_value(text: str) -> Any:
    """A ``--set`` value, read as YAML (``3e-4`` → float, ``true``, ``[1, 2]``, ``null``)."""
    yaml = _yaml()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "3e-4" as a string; numbers written that way are numbers here.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str], src: str) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to raw (unvalidated) config data."""
    data = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        value = parse_value(text)
        parts = key.split(".")
        _check_method_exists(data, parts, key, src)
        targets = [data]
        for i, part in enumerate(parts[:-1]):
            nxt = []
            for t in targets:
                if part == "*" and isinstance(t, dict):
                    nxt += [v for v in t.values() if isinstance(v, dict)]
                    continue
                if part not in t or t[part] is None:
                    t[part] = {}
                if not isinstance(t[part], dict):
                    raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a section")
                nxt.append(t[part])
            targets = nxt
        for t in targets:
            t[parts[-1]] = value
    return data


def _check_method_exists(data: dict[str, Any], parts: list[str], key: str, src: str) -> None:
    """``methods.NAME.field`` must name a method the config defines: a typo would otherwise
    add a method of default settings to the sweep."""
    if len(parts) < 3 or parts[0] != "methods" or parts[1] == "*":
        return
    methods = data.get("methods")
    known = [str(m) for m in methods] if isinstance(methods, dict) else []
    if parts[1] in known:
        return
    close = difflib.get_close_matches(parts[1], known, n=1)
    hint = f" (did you mean 'methods.{close[0]}'?)" if close else ""
    raise ConfigError(
        f"{src}: --set {key}: the config defines no method {parts[1]!r}{hint}; "
        f"its methods: {', '.join(known) or 'none'}"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    yaml = _yaml()
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate a config file."""
    p = Path(path)
    raw = _read_yaml(p)
    raw = apply_overrides(raw, overrides or [], str(p))
    cfg = load_config_dict(raw, src=str(p))
    if not cfg.name:
        cfg.name = p.stem
    return cfg


def load_config_dict(raw: dict[str, Any], src: str = "<dict>") -> ExperimentConfig:
    """Validate raw config data (already parsed) into an :class:`ExperimentConfig`."""
    raw = dict(raw)
    if "experiment" not in raw:
        raise ConfigError(f"{src}: missing required key 'experiment'")
    exp_name = raw["experiment"]
    if not isinstance(exp_name, str):
        raise ConfigError(f"{src}: experiment: expected a string, got {_describe(exp_name)}")
    try:
        spec = get_experiment(exp_name)
    except KeyError as e:
        raise ConfigError(f"{src}: experiment: {e.args[0]}") from e
    if "seeds" in raw:
        try:
            raw["seeds"] = parse_seeds(raw["seeds"])
        except ValueError as e:
            raise ConfigError(f"{src}: seeds: {e}") from e
    problem = build_dataclass(spec.problem_config, raw.pop("problem", {}) or {}, "problem", src)
    methods_raw = raw.pop("methods", None)
    if not methods_raw:
        raise ConfigError(f"{src}: missing required key 'methods' (at least one method)")
    if not isinstance(methods_raw, dict):
        raise ConfigError(f"{src}: methods: expected a mapping of name to settings")
    if issubclass(spec.method_config, MethodSpec):
        methods = {
            str(name): build_method(m or {}, f"methods.{name}", src, spec.method_config)
            for name, m in methods_raw.items()
        }
    else:
        methods = {
            str(name): build_dataclass(spec.method_config, m or {}, f"methods.{name}", src)
            for name, m in methods_raw.items()
        }
    raw["problem"] = {}
    raw["methods"] = {}
    cfg = build_dataclass(ExperimentConfig, raw, "", src)
    cfg.problem = problem
    cfg.methods = methods
    cfg.source = src
    _check_ranges(cfg, src)
    for key in cfg.grid:
        _check_grid_key(cfg, key, src)
    return cfg


def _check_ranges(cfg: ExperimentConfig, src: str) -> None:
    for name in ("iterations", "eval_every", "log_every", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{src}: {name}: must be ≥ 1, got {getattr(cfg, name)}")
    if not cfg.seeds:
        raise ConfigError(f"{src}: seeds: at least one seed is needed")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"{src}: threads: must be ≥ 1, got {cfg.threads}")
    if cfg.batch_max_runs is not None and cfg.batch_max_runs < 1:
        raise ConfigError(f"{src}: batch_max_runs: must be ≥ 1, got {cfg.batch_max_runs}")
    if not cfg.resources.cpus > 0:
        raise ConfigError(f"{src}: resources.cpus: must be > 0, got {cfg.resources.cpus}")
    if not cfg.resources.gpus >= 0:
        raise ConfigError(f"{src}: resources.gpus: must be ≥ 0, got {cfg.resources.gpus}")
    for name, m in cfg.methods.items():
        kinds_known = cfg.spec().kinds
        if isinstance(m, MethodConfig) and m.kind not in kinds_known:
            kinds = ", ".join(kinds_known)
            raise ConfigError(
                f"{src}: methods.{name}.kind: unknown kind {m.kind!r}; known: {kinds}"
            )


def _check_grid_key(cfg: ExperimentConfig, key: str, src: str) -> None:
    values = cfg.grid[key]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{src}: grid.{key}: needs a non-empty list of values")
    for v in values:
        _grid_apply(cfg, {key: v})  # validates the overridden config


def _grid_apply(cfg: ExperimentConfig, point: dict[str, Any]) -> ExperimentConfig:
    raw = cfg.to_dict()
    raw.pop("grid", None)
    sets = [f"{k}={_yaml_dump_scalar(v)}" for k, v in point.items()]
    out = load_config_dict(
        apply_overrides(raw, sets, cfg.source), src=f"{cfg.source} (grid {point})"
    )
    out.name = cfg.name
    return out


def _yaml_dump_scalar(v: Any) -> str:
    yaml = _yaml()
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def grid_points(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """The grid's points as dictionaries (one empty point when there is no grid)."""
    if not cfg.grid:
        return [{}]
    keys = list(cfg.grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*cfg.grid.values())]


def variant_name(method: str, point: dict[str, Any]) -> str:
    """``funcid`` or ``funcid[inner_lr=0.001,tau=0.01]`` for a grid point."""
    if not point:
        return method
    tag = ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
    return f"{method}[{tag}]"


@dataclass
class PlannedRun:
    """One (method variant, seed) of a sweep."""

    method: str
    variant: str
    seed: int
    point: dict[str, Any]
    spec: RunSpec
    config: ExperimentConfig

    @property
    def run_id(self) -> str:
        safe = self.variant.replace("[", "__").replace("]", "").replace(",", "_").replace("=", "-")
        return f"{safe}/seed_{self.seed}"


def plan_runs(
    cfg: ExperimentConfig, methods: list[str] | None = None, seeds: list[int] | None = None
) -> list[PlannedRun]:
    """Every run of a sweep: methods × grid points × seeds, validated."""
    names = list(cfg.methods) if methods is None else list(methods)
    if not names:
        raise ConfigError(
            f"{cfg.source}: --methods: no method named; the config has {', '.join(cfg.methods)}"
        )
    for m in names:
        if m not in cfg.methods:
            close = difflib.get_close_matches(m, list(cfg.methods), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{cfg.source}: --methods: unknown method {m!r}{hint}; the config has "
                f"{', '.join(cfg.methods)}"
            )
    repeated = sorted({m for m in names if names.count(m) > 1})
    if repeated:
        raise ConfigError(f"{cfg.source}: --methods: {', '.join(repeated)} named more than once")
    if seeds is None:
        seed_list = cfg.seeds
    else:
        try:
            seed_list = parse_seeds(list(seeds))
        except ValueError as e:
            raise ConfigError(f"{cfg.source}: --seeds: {e}") from e
        if not seed_list:
            raise ConfigError(f"{cfg.source}: --seeds: no seed given")
    runs = []
    for point in grid_points(cfg):
        pc = _grid_apply(cfg, point) if point else cfg
        for m in names:
            for s in seed_list:
                spec = RunSpec(
                    experiment=pc.experiment,
                    method=m,
                    method_config=pc.methods[m],
                    problem=pc.problem,
                    seed=s,
                    iterations=pc.iterations,
                    eval_every=pc.eval_every,
                    device=pc.device,
                    dtype=pc.dtype,
                )
                runs.append(PlannedRun(m, variant_name(m, point), s, point, spec, pc))
    return runs


def dump_yaml(data: Any) -> str:
    """YAML text of plain data (sorted keys off, block style)."""
    return _yaml().safe_dump(data, sort_keys=False, default_flow_style=False)


__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "PlannedRun",
    "Resources",
    "apply_overrides",
    "build_dataclass",
    "build_method",
    "dump_yaml",
    "grid_points",
    "load_config",
    "load_config_dict",
    "parse_seeds",
    "plan_runs",
    "to_plain",
    "variant_name",
]
