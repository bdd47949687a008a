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
