"""The docs match the code: the README example runs, the API reference is current."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_example_runs_and_learns_the_weights(capsys):
    code = _python_blocks((ROOT / "README.md").read_text())[0]
    ns: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), ns)
    w, corrupted = ns["w"], ns["corrupted"]
    assert float(w[corrupted].mean()) < 0.1 < 0.3 < float(w[~corrupted].mean())
    out = capsys.readouterr().out
    assert "mean weight: clean" in out and "validation loss" in out


#: put on the line before a tutorial code block that the tests must not run (say why in it)
SKIP_MARK = "<!-- not run by the tests"


def _tutorial_blocks() -> list[tuple[bool, str]]:
    """(skipped, code) of every python block of the tutorial, in order."""
    text = (ROOT / "docs" / "tutorial.md").read_text()
    blocks = re.findall(r"(?:^(<!--[^\n]*-->)\n)?```python\n(.*?)```", text, flags=re.S | re.M)
    return [(mark.startswith(SKIP_MARK), code) for mark, code in blocks]


def _undefined_names(code: str, ns: dict) -> list[str]:
    """Names (and ``module.attr`` chains on modules of ``ns``) a block uses but nothing defines."""
    import ast
    import builtins
    import types

    tree = ast.parse(code)
    defined = set(ns) | set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id not in defined:
                missing.append(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            chain, base = [node.attr, node.value.attr], node.value.value
            if isinstance(base, ast.Name) and isinstance(ns.get(base.id), types.ModuleType):
                obj = ns[base.id]
                for attr in reversed(chain):
                    if not hasattr(obj, attr):
                        missing.append(f"{base.id}.{'.'.join(reversed(chain))}")
                        break
                    obj = getattr(obj, attr)
    return missing


def test_tutorial_code_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    blocks = _tutorial_blocks()
    assert len(blocks) >= 5 and sum(skip for skip, _ in blocks) == 1  # only the torchrun one
    monkeypatch.chdir(tmp_path)  # the training section writes metrics.jsonl and ckpt.pt
    ns: dict = {"__name__": "tutorial"}
    for i, (skip, code) in enumerate(blocks):
        if skip:
            assert not _undefined_names(code, ns), f"tutorial block {i}"
            continue
        exec(compile(code, f"docs/tutorial.md (python block {i})", "exec"), ns)
    w, corrupted = ns["w"], ns["corrupted"]
    assert float(w[corrupted].mean()) < 0.1 < 0.3 < float(w[~corrupted].mean())
    assert (tmp_path / "ckpt.pt").exists() and (tmp_path / "metrics.jsonl").exists()
    assert "clean" in capsys.readouterr().out


def test_undefined_names_are_found():
    import funcbo

    ns = {"funcbo": funcbo, "weigher": 1}
    assert _undefined_names("funcbo.distributed.broadcast_module_(outer)", ns) == ["outer"]
    assert _undefined_names("import x as y\ny(weigher)", ns) == []
    assert _undefined_names("funcbo.distributed.nope(weigher)", ns) == ["funcbo.distributed.nope"]


def test_api_reference_is_current():
    p = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_api.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr


def test_every_public_name_has_a_docstring():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_api
    finally:
        sys.path.pop(0)
    import importlib
    import inspect

    missing = []
    for modname, _ in gen_api.MODULES:
        module = importlib.import_module(modname)
        for name in gen_api._public_names(module):
            obj = getattr(module, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj):
                missing.append(f"{modname}.{name}")
    assert not missing, f"public names without a docstring: {missing}"


def test_make_installs_an_extra_with_tensorboard():
    # the TensorBoard logging test must run under `make test`, not be skipped
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    makefile = (ROOT / "Makefile").read_text()
    installed = re.search(r"^EXTRAS \?= (.*)$", makefile, flags=re.M).group(1).split(",")
    packages = [re.split(r"[<>=\[ ]", dep)[0] for e in installed for dep in extras[e]]
    assert "tensorboard" in packages


def test_readme_documents_the_data_cache_and_the_shared_reference_data(monkeypatch):
    from funcbo.apps.iv.cache import cache_dir

    readme = (ROOT / "README.md").read_text()
    monkeypatch.delenv("FUNCBO_CACHE", raising=False)
    home = Path.home()
    assert "~/" + cache_dir().relative_to(home).as_posix() in readme
    monkeypatch.setenv("FUNCBO_CACHE", "/somewhere")
    assert cache_dir() == Path("/somewhere/iv") and "`$FUNCBO_CACHE/iv`" in readme
    assert "../shared/data/" in readme
