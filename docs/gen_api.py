"""Generate docs/api.md: the reference of every public name, from the docstrings.

    python docs/gen_api.py          # rewrite docs/api.md
    python docs/gen_api.py --check  # exit 1 if docs/api.md is out of date (used by the tests)

Public names are each module's ``__all__``; a class lists its public methods. Every module of
the library and of the experiment layer is listed (``--check`` fails on one that is not); an
application is documented by its package's namespace.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

#: documented modules, in reading order, with a one-line heading
MODULES = [
    ("funcbo", "the public namespace"),
    ("funcbo.problem", "problems on predictions"),
    ("funcbo.functional", "FuncID"),
    ("funcbo.adjoints", "adjoint solvers"),
    ("funcbo.parametric", "AID and ITD"),
    ("funcbo.penalty", "penalty methods"),
    ("funcbo.linalg", "solvers and output-space Hessians"),
    ("funcbo.inner", "inner solvers"),
    ("funcbo.estimator", "the estimator interface"),
    ("funcbo.diagnostics", "diagnostics records"),
    ("funcbo.trainer", "the outer loop and callbacks"),
    ("funcbo.distributed", "data parallelism"),
    ("funcbo.errors", "errors"),
    ("funcbo.io", "atomic files"),
    ("funcbo.memory", "peak memory"),
    ("funcbo.rng", "global random generators"),
    ("funcbo.synthetic", "problems with exact answers"),
    ("funcbo.experiments.config", "experiment configs"),
    ("funcbo.experiments.methods", "method configs"),
    ("funcbo.experiments.task", "tasks and the experiment registry"),
    ("funcbo.experiments.trainer_task", "Trainer-based tasks"),
    ("funcbo.experiments.runner", "runs and sweeps"),
    ("funcbo.experiments.batch", "batched runs"),
    ("funcbo.experiments.executors", "executors: local processes, Ray"),
    ("funcbo.experiments.errors", "errors of the experiment layer"),
    ("funcbo.experiments.store", "the run store"),
    ("funcbo.experiments.report", "reports"),
    ("funcbo.cli", "the funcbo command"),
    ("funcbo.apps.linear_iv", "the linear_iv experiment"),
    ("funcbo.apps.iv", "instrumental-variable regression (dSprites, demand)"),
    ("funcbo.apps.rl", "model-based reinforcement learning (CartPole)"),
]


def unlisted_modules() -> list[str]:
    """Modules of ``funcbo`` and ``funcbo.experiments`` missing from :data:`MODULES`."""
    import funcbo
    import funcbo.experiments

    listed = {name for name, _ in MODULES}
    found = [
        m.name
        for pkg in (funcbo, funcbo.experiments)
        for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + ".")
        if not m.ispkg and not m.name.rsplit(".", 1)[1].startswith("_")
    ]
    return sorted(set(found) - listed)


def _doc(obj: object) -> str:
    return inspect.cleandoc(inspect.getdoc(obj) or "").strip()


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def _public_names(module: object) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
            and (inspect.isclass(v) or inspect.isfunction(v))
        ]
    return sorted(names)


def render_member(qual: str, obj: object) -> list[str]:
    out: list[str] = []
    if inspect.isclass(obj):
        out.append(f"### `{qual}{_signature(obj)}`\n")
        out.append((_doc(obj) or "*(no docstring)*") + "\n")
        for name, member in inspect.getmembers(obj):
            if name.startswith("_") or name not in obj.__dict__:
                continue
            if inspect.isfunction(member) or isinstance(
                obj.__dict__[name], (classmethod, staticmethod)
            ):
                doc = _doc(member)
                if doc:
                    out.append(f"- `{name}{_signature(member)}`: {doc.splitlines()[0]}")
            elif isinstance(obj.__dict__[name], property):
                doc = _doc(obj.__dict__[name])
                if doc:
                    out.append(f"- `{name}` (property): {doc.splitlines()[0]}")
        out.append("")
    elif callable(obj):
        out.append(f"### `{qual}{_signature(obj)}`\n")
        out.append((_doc(obj) or "*(no docstring)*") + "\n")
    else:
        out.append(f"### `{qual}`\n")
        out.append(f"Constant: `{obj!r}`\n")
    return out


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py`; every public name of every",
        "module (its `__all__`) is listed. Math conventions are in the module docstrings.",
        "",
    ]
    for modname, heading in MODULES:
        module = importlib.import_module(modname)
        lines.append(f"## `{modname}`: {heading}\n")
        doc = _doc(module)
        if doc:
            lines.append(doc + "\n")
        if modname == "funcbo":
            names = _public_names(module)
            lines.append("Re-exports: " + ", ".join(f"`{n}`" for n in names) + ".\n")
            continue
        for name in _public_names(module):
            obj = getattr(module, name)
            lines += render_member(f"{modname}.{name}", obj)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    path = Path(__file__).with_name("api.md")
    missing = unlisted_modules()
    if missing:
        print(f"modules missing from MODULES in {__file__}: {', '.join(missing)}", file=sys.stderr)
        return 1
    text = render()
    if args.check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
