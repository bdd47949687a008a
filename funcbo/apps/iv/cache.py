"""On-disk cache of generated datasets, keyed by a hash of every generation parameter.

A dataset is a mapping of names to numpy arrays, saved as an uncompressed ``.npz`` (no pickle:
object arrays are refused) next to the JSON of its parameters, written atomically (temporary
file + rename) so that concurrent runs never read a torn file. Loading uses
``allow_pickle=False`` and checks that the stored parameters are the requested ones; a file that
cannot be read is regenerated.

The folder is ``$FUNCBO_CACHE/iv`` when that variable is set, ``~/.cache/funcbo/iv`` otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from funcbo.io import atomic_write

_PARAMS_KEY = "__params__"


def cache_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """The dataset cache folder: ``directory`` if given, else ``$FUNCBO_CACHE/iv``, else
    ``~/.cache/funcbo/iv``."""
    if directory is not None:
        return Path(directory).expanduser()
    root = os.environ.get("FUNCBO_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "funcbo"
    return base / "iv"


def params_key(params: Mapping[str, Any]) -> str:
    """A short hash of the parameters (canonical JSON, sorted keys)."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_arrays(
    name: str,
    params: Mapping[str, Any],
    build: Callable[[], dict[str, np.ndarray]],
    *,
    use_cache: bool = True,
    directory: str | os.PathLike[str] | None = None,
) -> dict[str, np.ndarray]:
    """Arrays built by ``build()``, read from the cache when present, written to it otherwise.

    Args:
        name: file-name prefix (e.g. ``"dsprites"``).
        params: every parameter the arrays depend on (JSON-serialisable).
        build: makes the arrays when they are not cached.
        use_cache: False to always build (and never write).
        directory: cache folder (default: see :func:`cache_dir`).

    Returns:
        name → array (a fresh dict; arrays are read-write copies).
    """
    if not use_cache:
        return build()
    text = json.dumps(params, sort_keys=True, default=str)
    path = cache_dir(directory) / f"{name}-{params_key(params)}.npz"
    if path.exists():
        try:
            return _load(path, text)
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(
                f"ignoring unreadable dataset cache {path} ({e}); regenerating", stacklevel=2
            )
    arrays = build()
    _save(path, arrays, text)
    return arrays


def _load(path: Path, params_text: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        stored = str(npz[_PARAMS_KEY])
        if stored != params_text:
            raise ValueError("stored parameters differ from the requested ones")
        return {k: np.array(npz[k]) for k in npz.files if k != _PARAMS_KEY}


def _save(path: Path, arrays: Mapping[str, np.ndarray], params_text: str) -> None:
    for k, a in arrays.items():
        if a.dtype == object:
            raise TypeError(f"refusing to cache object array {k!r} (it would need pickle)")
    # Any: numpy's stubs match **payload against savez's allow_pickle: bool as well
    payload: dict[str, Any] = {**arrays, _PARAMS_KEY: np.array(params_text)}
    atomic_write(path, lambda f: np.savez(f, **payload), "wb")


__all__ = ["cache_dir", "cached_arrays", "params_key"]
