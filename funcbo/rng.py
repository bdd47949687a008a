"""The global random generators' states, as a checkpoint can hold them.

A resumed run ends where an uninterrupted one would only if it draws the same random numbers, so
a checkpoint saves the state of every global generator a run may draw from: torch's CPU
generator, CUDA's (one per device, when CUDA has been initialised in this process), numpy's
legacy global ``RandomState`` and Python's ``random``. The state is made of tensors, lists,
strings and numbers only, so it loads with ``torch.load(..., weights_only=True)``:

``{"torch": ByteTensor, "numpy": [name, Int64Tensor(624), pos, has_gauss, cached_gaussian],
"python": [version, [624 + 1 ints], gauss_next], "cuda": [ByteTensor, ...]}``

(``"cuda"`` only when CUDA was initialised). Generators a task owns (a ``torch.Generator``
drawing its minibatches, say) are the task's state, not this one.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Capture the states of the global generators (torch CPU, CUDA when initialised, numpy,
    Python ``random``) as tensors and lists; restore them with :func:`set_rng_state`."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the legacy form: (name, key, pos, has_gauss, cached)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # numpy's key is uint32, which torch tensors cannot hold exactly: widen it to int64.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        # Python's state is nested tuples; weights_only loading accepts lists, not tuples.
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a :func:`rng_state` (the CUDA states only when present and CUDA is available)."""
    torch.set_rng_state(state["torch"])
    ns = state["numpy"]
    np.random.set_state((ns[0], ns[1].numpy().astype(np.uint32), *ns[2:]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


__all__ = ["rng_state", "set_rng_state"]
